"""MLflow for ``grpo compare`` (experiment ``grpo-compare``) and ``grpo reproduce goqa``
(``grpo-goqa``): one finished run per (method, seed), named ``<method>-s<seed>``.

Each run holds the experiment's settings as params (``model.*``, ``train.*``, ``data.*``, the
method and seed), its training curves by step (``train/loss``, ``train/group_weight/<g>``,
``val/...``: read from the run's ``run.json``), its test metrics (``eval/group/<g>/<metric>``,
``eval/worst_group/<metric>``) and the kept checkpoint's step, and the experiment's
``results.md`` and figures as artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from grpo import metric_names
from grpo.io import read_json

BATCH_METRICS = 1000  # MLflow's limit per log_batch call
BATCH_PARAMS = 100
ARTIFACTS = ("results.md", "per_group_accuracy.png", "worst_group.png", "group_weights.png")


def log_experiment(
    results: dict[str, Any], out_dir: str | Path, *, root: str | Path = ".", experiment: str
) -> list[str]:
    """Log every run of ``results`` (``grpo.experiment.summarise``); returns the run ids."""
    from tasks.tracking import client, setup

    _, experiment_id = setup(root, experiment)
    mlflow_client = client()
    out_dir = Path(out_dir)
    shared = flat_params(results["settings"])
    run_ids = []
    for run in results["runs"]:
        method, seed = run["method"], run["seed"]
        created = mlflow_client.create_run(
            experiment_id,
            run_name=f"{method}-s{seed}",
            tags={"grpo.kind": experiment, "train.method": method, "seed": str(seed)},
        )
        run_id = created.info.run_id
        params = shared | {"method": method, "seed": seed, "model": results.get("model", "")}
        try:
            _log_run(mlflow_client, run_id, run, params, out_dir)
        except Exception:
            mlflow_client.set_terminated(run_id, "FAILED")
            raise
        mlflow_client.set_terminated(run_id, "FINISHED")
        run_ids.append(run_id)
    return run_ids


def _log_run(
    mlflow_client, run_id: str, run: dict[str, Any], params: dict[str, Any], out_dir: Path
) -> None:
    """Params, the history from the run's ``run.json``, test metrics, the experiment's files."""
    record = out_dir / "runs" / f"seed-{run['seed']}" / run["method"] / "run.json"
    history = read_json(record).get("history", []) if record.exists() else []
    _log(mlflow_client, run_id, params, run_metrics(run, history))
    for name in ARTIFACTS:
        if (out_dir / name).exists():
            mlflow_client.log_artifact(run_id, str(out_dir / name), "experiment")


def flat_params(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` → ``{"train.lr": 1e-4}`` (lists and dicts below two levels
    kept whole, as strings)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not prefix:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = value
    return out


def run_metrics(
    run: dict[str, Any], history: list[dict[str, float]]
) -> list[tuple[str, float, int]]:
    """(name, value, step): the training history by step, then the test metrics at the last step."""
    rows = [(k, float(v), int(h["step"])) for h in history for k, v in h.items() if k != "step"]
    last = int(run["checkpoint"]["steps"])
    final: dict[str, float] = {"train/kept_step": run["checkpoint"]["step"]}
    for g, values in run["per_group"].items():
        for m, v in values.items():
            final[metric_names.group_metric(g, m)] = v
    for m in ("reward_accuracy", "logprob_accuracy", "loss"):
        values = [v[m] for v in run["per_group"].values()]
        final[metric_names.worst_group(m)] = max(values) if m == "loss" else min(values)
    for g, w in run["final_group_weights"].items():
        final[f"final/{metric_names.train_group_weight(g)}"] = w
    return rows + [(k, float(v), last) for k, v in final.items()]


def _log(mlflow_client, run_id: str, params: dict[str, Any], metrics: list) -> None:
    import time

    from mlflow.entities import Metric, Param

    from tasks.tracking import metric_name

    now = int(time.time() * 1000)
    items = [Metric(metric_name(k), v, now, step) for k, v, step in metrics]
    for start in range(0, len(items), BATCH_METRICS):
        mlflow_client.log_batch(run_id, metrics=items[start : start + BATCH_METRICS])
    plain = [Param(metric_name(k), str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(plain), BATCH_PARAMS):
        mlflow_client.log_batch(run_id, params=plain[start : start + BATCH_PARAMS])
