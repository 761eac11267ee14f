"""File locks: what serialises two ``grpo run`` processes on one machine.

An advisory ``flock`` on a lock file. The kernel drops it when its holder's file is closed or
the process dies (SIGKILL included), so a lock never outlives its holder and there is no stale
lock file to clean up by hand. The project's lock files live in :data:`LOCKS_DIR`:

- ``ingest.lock``: building, swapping and ``dvc add``/``push`` of the data folder;
- ``train-<run folder>.lock``: one process trains or reads a content-keyed run folder at a time;
- ``run-<MLflow run id>.lock``: held for a flow run's whole life, so another process can tell a
  run whose process is gone (its lock is free) from one still going;
- ``registry.lock``: gate decisions and alias moves on an MLflow server when no Prefect server
  is shared (a SQLite store's lock sits beside its database instead: see ``tasks.tracking``).

Locks only serialise processes that share the file system. Across machines the registry is
serialised by a Prefect global concurrency limit as well (``flows.stages.registry_guard``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

LOCKS_DIR = "outputs/.locks"  # under the project root; git-ignored with outputs/


class LockTimeout(TimeoutError):
    """The lock was still held by another process when the wait ran out."""


def lock_path(root: str | Path, name: str) -> Path:
    """``<root>/outputs/.locks/<name>.lock``; the folder is made with a ``.gitignore`` of
    ``*``, so git never lists it, whatever the project's own ignore rules."""
    folder = Path(root) / LOCKS_DIR
    if not (folder / ".gitignore").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".gitignore").write_text("*\n")
    return folder / f"{name}.lock"


def try_lock(path: str | Path) -> IO | None:
    """The lock on ``path`` if it is free now (an open handle: :func:`release` it), else None.
    Creates the file and its folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")  # noqa: SIM115 (the handle is the lock; the caller releases it)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except BaseException:
        handle.close()
        raise
    return handle


def hold(path: str | Path) -> IO:
    """Lock a new file ``path`` that no other process ever sees unlocked: the file is locked
    under a temporary name and then renamed into place (the lock follows the file). For a
    lock whose mere presence says "my holder may be alive" (``run-<id>.lock``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    handle = try_lock(tmp)
    if handle is None:  # nobody else uses this pid's temporary name
        raise RuntimeError(f"{tmp}: unexpectedly locked")
    os.replace(tmp, path)
    return handle


def release(handle: IO) -> None:
    """Give a lock back (closing the file drops the flock)."""
    handle.close()


@contextlib.contextmanager
def file_lock(
    path: str | Path, *, timeout: float | None = None, poll: float = 0.05
) -> Iterator[Path]:
    """Hold the exclusive lock on ``path`` for the block, waiting for it first.

    ``timeout``: seconds to wait (None: as long as it takes); then :class:`LockTimeout` naming
    the file. Polls with a growing interval (``poll`` up to 1 s) rather than a blocking
    ``flock``, so a wait stays interruptible and bounded.
    """
    path = Path(path)
    deadline = None if timeout is None else time.monotonic() + timeout
    handle = try_lock(path)
    while handle is None:
        if deadline is not None and time.monotonic() >= deadline:
            raise LockTimeout(f"{path}: still held by another process after {timeout:g} s")
        time.sleep(poll)
        poll = min(poll * 1.5, 1.0)
        handle = try_lock(path)
    try:
        yield path
    finally:
        release(handle)
