"""MLflow for the synthetic sweep: one run per (scenario, method) in one experiment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

EXPERIMENT = "grpo-synthetic"


def log_sweep(
    summary: dict[str, Any],
    out_dir: str | Path,
    *,
    root: str | Path = ".",
    experiment: str = EXPERIMENT,
) -> list[str]:
    """Log every (scenario, method) of a sweep summary (``grpo.synthetic.report.summarise``) as a
    finished MLflow run: config and hyperparameters as params, the mean worst-group validation
    curve as ``val/worst_group_loss`` by step, converged metrics, and the scenario's PNG.
    Returns the run ids."""
    from tasks.tracking import client, setup

    _, experiment_id = setup(root, experiment)
    mlflow_client = client()
    config = summary["config"]
    run_ids = []
    for name, sc in summary["scenarios"].items():
        for method in sc["methods"]:
            run_ids.append(
                _log_run(mlflow_client, experiment_id, name, method, sc, config, out_dir)
            )
    return run_ids


def _log_run(
    mlflow_client: Any,
    experiment_id: str,
    name: str,
    method: str,
    sc: dict[str, Any],
    config: dict[str, Any],
    out_dir: str | Path,
) -> str:
    """One (scenario, method) as a finished run, so the MLflow UI compares methods side by side."""
    from mlflow.entities import Param, RunTag

    from grpo.synthetic.runner import SCENARIOS

    hyper = SCENARIOS[name].hyper("dpo" if method.endswith("dpo") else "ipo")
    run = mlflow_client.create_run(experiment_id, run_name=f"{name}/{method}")
    run_id = run.info.run_id
    params = {
        "scenario": name,
        "method": method,
        "seeds": sc["seeds"],
        "iterations": sc["iterations"],
        "eta_theta": hyper.eta_theta,
        "beta": hyper.beta,
        "eta_alpha": hyper.eta_alpha if method.startswith("gr-") else 0.0,
        **{f"config.{k}": v for k, v in config.items() if k not in ("scenarios", "methods")},
    }
    metrics = method_metrics(sc["methods"][method], sc["iterations"])
    for start in range(0, len(metrics), 500):
        mlflow_client.log_batch(run_id, metrics=metrics[start : start + 500])
    mlflow_client.log_batch(
        run_id,
        params=[Param(k, str(v)) for k, v in params.items()],
        tags=[RunTag("grpo.kind", "synthetic"), RunTag("grpo.scenario", name)],
    )
    png = Path(out_dir) / f"{name}.png"
    if png.exists():
        mlflow_client.log_artifact(run_id, str(png), "plots")
    mlflow_client.set_terminated(run_id, "FINISHED")
    return run_id


def method_metrics(r: dict[str, Any], iterations: int) -> list[Any]:
    """One method's MLflow metrics: the mean worst-group validation curve by step, then the
    converged values (worst group, max reward error, per-group values and weights) at the end."""
    from mlflow.entities import Metric

    from grpo import metric_names as names

    metrics = [
        Metric(names.VAL_WORST_GROUP_LOSS, float(v), 0, int(step))
        for step, v in r["worst_group_val_loss_curve"]
    ]
    final = {
        names.worst_group("loss"): r["worst_group_val_loss"]["mean"],
        names.worst_group("loss_sem"): r["worst_group_val_loss"]["sem"],
        "eval/max_reward_error": r["max_reward_error"]["mean"],
        "eval/max_reward_error_sem": r["max_reward_error"]["sem"],
    }
    for g, w in enumerate(r["final_group_weights"]):
        final[names.train_group_weight(str(g))] = w
    for g, e in enumerate(r["group_reward_error"]):
        final[names.group_metric(str(g), "reward_error")] = e["mean"]
    for g, e in enumerate(r["group_val_loss"]):
        final[names.group_metric(str(g), "loss")] = e["mean"]
    return metrics + [Metric(k, float(v), 0, iterations) for k, v in final.items()]
