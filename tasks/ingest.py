"""The ingest stage: build the canonical pair table, write it, version it with DVC.

``ingest(cfg)`` is what both ``dvc repro`` (through ``grpo ingest``) and the Prefect flow call.
It writes ``<dir>/pairs.parquet`` (and ``<dir>/pairs.source.parquet`` for distributional
sources) into a fresh folder that replaces ``<dir>`` only once complete (an identical folder is
kept), then ``dvc add <dir>`` (→ ``<dir>.dvc``, i.e. ``data.dvc``) and ``dvc push`` to the
default remote. The DVC md5 of the
folder and the git revision are returned: the data version recorded with every training run.
Writing and versioning hold the project's ``ingest`` lock (:mod:`tasks.locks`), so two runs
ingesting at once take turns instead of swapping the folder or running DVC under each other.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from grpo.config import from_dict
from grpo.data.schema import write_pairs
from grpo.data.sources import PAIRS_FILE, SOURCE_FILE, DataConfig, build_pairs
from tasks.locks import file_lock, lock_path


class DvcError(RuntimeError):
    """DVC could not track or push the data; the message says what to do."""


def ingest(
    cfg: DataConfig | dict[str, Any] | None = None, *, root: str | Path = "."
) -> dict[str, Any]:
    """Build, write and version the data; returns the data version and a summary.

    Returns ``{"path", "dir", "source_path", "md5", "previous_md5", "changed", "dvc_file",
    "pushed", "rows", "groups", "group_counts", "split_counts", "sha256", "git_rev", "source"}``.
    ``md5`` is DVC's hash of the folder (``None`` with ``track: false``); ``previous_md5`` the one
    ``data.dvc`` held before (a fresh clone re-creates the same data, so they match).
    """
    if not isinstance(cfg, DataConfig):
        cfg = from_dict(DataConfig, cfg, where="data")
    root = Path(root).resolve()
    out_dir = (root / cfg.dir).resolve()
    pairs, source, groups = build_pairs(cfg)
    # one process at a time swaps the folder and runs DVC on it (two `grpo run` at once)
    with file_lock(lock_path(root, "ingest")):
        return _write_and_track(cfg, root, out_dir, pairs, source, groups)


def _write_and_track(
    cfg: DataConfig, root: Path, out_dir: Path, pairs, source, groups
) -> dict[str, Any]:
    """The folder written (or kept when identical), hashed, and versioned: :func:`ingest`'s
    result."""
    _replace_dir(out_dir, pairs, source)
    pairs_path = out_dir / PAIRS_FILE
    result: dict[str, Any] = {
        "path": str(pairs_path),
        "dir": str(out_dir),
        "source_path": str(out_dir / SOURCE_FILE) if source is not None else None,
        "source": cfg.source,
        "split_rule": pairs.attrs.get("split_rule"),  # how the splits were made (the ingest line)
        "rows": len(pairs),
        "groups": list(groups),
        "group_counts": {
            str(g): int(n) for g, n in pairs["group"].value_counts().sort_index().items()
        },
        "split_counts": {
            str(s): int(n) for s, n in pairs["split"].value_counts().sort_index().items()
        },
        "sha256": hashlib.sha256(pairs_path.read_bytes()).hexdigest(),
        "git_rev": git_revision(root),
        "md5": None,
        "previous_md5": None,
        "changed": None,
        "dvc_file": None,
        "pushed": False,
    }
    if cfg.track:
        result.update(dvc_track(out_dir, push=cfg.push))
    return result


def _replace_dir(out_dir: Path, pairs, source) -> bool:
    """Write the new folder beside the old one, then swap: no half-written data on failure.
    An old folder with the same files, byte for byte, is kept as it is (a run reading it
    meanwhile never finds it missing). Returns whether the folder was replaced."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the data folder is not
    try:
        write_pairs(pairs, staging / PAIRS_FILE)
        if source is not None:
            write_source(source, staging / SOURCE_FILE)
        if _same_files(staging, out_dir):
            shutil.rmtree(staging)
            return False
        if out_dir.is_symlink() or out_dir.is_file():
            out_dir.unlink()
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        staging.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True


def _same_files(new: Path, old: Path) -> bool:
    """Whether folder ``old`` holds exactly ``new``'s files with the same bytes."""
    if old.is_symlink() or not old.is_dir():
        return False
    names = sorted(p.name for p in new.iterdir())
    if sorted(p.name for p in old.iterdir()) != names:
        return False
    return all((new / n).read_bytes() == (old / n).read_bytes() for n in names)


def write_source(source, path: Path) -> None:
    """The distributional source rows (question × group, options, shares), deterministic bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = source.drop(columns=["where"], errors="ignore")
    frame = frame.sort_values(["question_id", "group"], kind="mergesort").reset_index(drop=True)
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    pq.write_table(table, path, compression="zstd")


def git_revision(root: Path) -> str | None:
    """``git rev-parse HEAD`` in ``root`` (None outside a git work tree or before a commit)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def dvc_md5(dvc_file: Path) -> str | None:
    """The md5 recorded in a ``.dvc`` file (None when it does not exist yet)."""
    if not dvc_file.exists():
        return None
    outs = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def dvc_track(out_dir: Path, *, push: bool = True) -> dict[str, Any]:
    """``dvc add`` the folder (and ``dvc push`` it) through DVC's Python API."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        dvc_root = Path(Repo.find_root(str(out_dir.parent)))
    except DvcException:
        raise DvcError(
            f"{out_dir} is not inside a DVC project; run `dvc init` at the repository root, "
            "or set data.track=false to skip versioning"
        ) from None
    dvc_file = out_dir.with_name(out_dir.name + ".dvc")
    previous = dvc_md5(dvc_file)
    target = str(out_dir)  # absolute: DVC would resolve a relative one against the cwd
    try:
        with Repo(str(dvc_root)) as repo:
            repo.add([target])
            pushed = False
            if push:
                if not repo.config.get("core", {}).get("remote"):
                    raise DvcError(
                        "no default DVC remote; add one (`dvc remote add -d NAME URL`) "
                        "or set data.push=false"
                    )
                repo.push(targets=[str(dvc_file)])
                pushed = True
    except DvcException as exc:
        raise DvcError(f"DVC failed on {target}: {exc}") from None
    md5 = dvc_md5(dvc_file)
    return {
        "md5": md5,
        "previous_md5": previous,
        "changed": previous != md5,
        "dvc_file": str(dvc_file),
        "pushed": pushed,
    }
