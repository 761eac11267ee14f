"""Atomic file writes: a reader never sees half a file, and two writers never share a temp file.

Every file the project leaves for another process (results, metrics, reports, summaries) is
written to a uniquely named temporary file in the destination folder, flushed to disk, then
renamed over the destination (``os.replace`` is atomic on POSIX and Windows within one folder).
If writing fails, the destination keeps its previous content and the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# The process's umask, read once: a temporary file is created private (0600), so before it takes
# the destination's place it gets the mode a plain open() would give (0644 under umask 022).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``.

    ``mode`` is ``"w"`` (text, UTF-8 unless ``encoding`` is given) or ``"wb"``. Parent folders
    are created. The temporary name is unique per call, so concurrent writers of one path
    cannot corrupt each other: the last rename wins, each file whole.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if mode == "w":
        kwargs.setdefault("encoding", "utf-8")
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | Path, data: Any, *, sort_keys: bool = False) -> Path:
    """Write ``data`` as indented JSON (numpy/torch scalars and paths as plain values) atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys, default=_plain) + "\n")


def read_json(path: str | Path) -> Any:
    """The JSON document at ``path``; a parse error names the file, line and column."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def _plain(value: Any) -> Any:
    """JSON fallback: scalars with ``.item()`` (numpy, torch) and everything else as ``str``."""
    item = getattr(value, "item", None)
    if callable(item):
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            return item()
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    return str(value)
