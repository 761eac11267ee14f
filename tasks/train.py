"""The train stage: read the validated pair table, run ``grpo.trainer.train`` (SFT first when
``train.sft_epochs > 0``, then the preference method), and write the history next to the model.

``train(...)`` is what both ``grpo stage train`` (dvc.yaml) and the Prefect flow call.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpo.io import atomic_open, read_json, write_json

HISTORY_FILE = "history.csv"
RESULT_FILE = "result.json"


def train(
    pairs_path: str | Path,
    model_cfg: Any,
    train_cfg: Any,
    out_dir: str | Path,
    *,
    log_fn: Callable[[dict[str, float], int], None] | None = None,
    resume: bool = True,
) -> dict[str, Any]:
    """Train on ``pairs_path``; returns a plain dict (JSON-friendly, cacheable).

    ``resume``: continue from a checkpoint in ``out_dir`` (False: start over; use it whenever
    ``out_dir`` is not specific to this data and config).

    Keys: ``out_dir``, ``model_dir``, ``reference_dir``, ``method``, ``groups``, ``alpha``,
    ``weights``, ``steps``, ``stopped_early``, ``best``, ``history`` (one dict per step),
    ``history_path`` (CSV for ``dvc plots``), ``resumed_from_step`` (the checkpoint's step
    training continued from; None when it started afresh).
    """
    from grpo.data.schema import read_pairs
    from grpo.trainer import train as run_training

    out_dir = Path(out_dir)
    resumed_from = resume_step(out_dir) if resume else None
    result = run_training(
        read_pairs(pairs_path), model_cfg, train_cfg, out_dir, log_fn=log_fn, resume=resume
    )
    summary = {
        "out_dir": str(out_dir),
        "model_dir": str(result.model_dir),
        "reference_dir": str(result.reference_dir),
        "method": train_cfg.method,
        "groups": list(result.groups),
        "alpha": list(result.alpha),
        "weights": list(result.weights),
        "steps": int(result.steps),
        "stopped_early": bool(result.stopped_early),
        "best": dict(result.best),
        "collapse": result.collapse,  # the first step α put > 0.99 on one group, or None
        "history": [dict(h) for h in result.history],
        "resumed_from_step": resumed_from,
    }
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 writes files
        return save_result(summary, out_dir)
    return {**summary, "history_path": str(out_dir / HISTORY_FILE)}


def resume_step(out_dir: Path) -> int | None:
    """The step of the checkpoint :func:`train` would resume from (None: none in ``out_dir``)."""
    from grpo.checkpoint import checkpoint_dirs

    found = checkpoint_dirs(out_dir)
    return int(found[-1].name.removeprefix("step-")) if found else None


def save_result(result: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Write ``result.json`` (everything but the history) and ``history.csv`` into ``out_dir``;
    returns ``result`` with ``history_path`` pointing there."""
    out_dir = Path(out_dir)
    history_path = write_history(result["history"], out_dir / HISTORY_FILE)
    summary = {k: v for k, v in result.items() if k != "history"}
    summary["history_path"] = str(history_path)
    write_json(out_dir / RESULT_FILE, summary)
    return {**summary, "history": result["history"]}


def load_result(out_dir: str | Path) -> dict[str, Any]:
    """The dict :func:`train` returned, read back from ``out_dir`` (for ``grpo stage``)."""
    out_dir = Path(out_dir)
    path = out_dir / RESULT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained model here; run `grpo stage train` first")
    return {**read_json(path), "history": read_history(out_dir / HISTORY_FILE)}


def write_history(history: list[dict[str, Any]], path: Path) -> Path:
    """One row per step, one column per metric (missing values empty), written atomically."""
    columns = ["step", *sorted({k for h in history for k in h} - {"step"})]
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(history)
    return path


def read_history(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as handle:
        return [
            {k: (int(float(v)) if k == "step" else float(v)) for k, v in row.items() if v != ""}
            for row in csv.DictReader(handle)
        ]
