"""``grpo run`` with a fault injected at a chosen point, for tests/test_reliability.py:

    python tests/pipeline_faults.py FAULT [grpo run arguments ...]

FAULT is one of

- ``none``: a plain ``grpo run``;
- ``kill-at-step:N``: SIGKILL to the whole process group (this process and the temporary
  Prefect server it started) when training reports step N, i.e. after the checkpoints of the
  earlier steps and before step N's: nothing after it runs, as with the OOM killer;
- ``pause-after-train:DIR``: once training is done, write ``DIR/trained`` and wait (at most
  10 minutes) for ``DIR/go``; the test takes the tracking server away meanwhile.

Start it with ``start_new_session=True`` so that the kill takes nothing else with it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def kill_at_step(kill_at: int) -> None:
    import tasks.tracking

    real = tasks.tracking.metric_logger

    def metric_logger(run_id: str):
        stream = real(run_id)

        def log_fn(metrics: dict[str, float], step: int) -> None:
            if step == kill_at:
                os.killpg(os.getpgid(0), signal.SIGKILL)
            stream(metrics, step)

        return log_fn

    tasks.tracking.metric_logger = metric_logger


def pause_after_train(folder: Path) -> None:
    import flows.stages

    real = flows.stages.publish_train

    def publish_train(result, root):
        published = real(result, root)
        (folder / "trained").write_text(str(os.getpid()))
        deadline = time.monotonic() + 600
        while not (folder / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return published

    flows.stages.publish_train = publish_train


def main(argv: list[str]) -> int:
    fault, args = argv[0], argv[1:]
    kind, _, value = fault.partition(":")
    if kind == "kill-at-step":
        kill_at_step(int(value))
    elif kind == "pause-after-train":
        pause_after_train(Path(value))
    elif kind != "none":
        raise SystemExit(f"unknown fault {fault!r}")
    from flows.cli import main as grpo

    return grpo(["run", *args])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main(sys.argv[1:]))
