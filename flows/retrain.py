"""The ``retrain`` Prefect flow: ingest → validate → train → evaluate → gated registration.

Tasks are thin wrappers around the stage functions in ``tasks/`` (the same ones ``dvc repro``
calls through ``grpo stage``); the flow only wires them. Training and evaluation are cached on
content (the data's sha256, the resolved config and the code of ``grpo/``), with persisted
results, so re-running on unchanged data and config skips straight to tracking. Only I/O tasks
(ingest, MLflow logging) retry; training never does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from flows.commands.run import find_root

CACHED = (INPUTS - "run_id") + TASK_SOURCE


TRAINING_CODE = (
    "config.py", "groups.py", "losses.py", "logprobs.py", "modeling.py", "trainer.py", "evaluation.py",
)  # fmt: skip


class StageFailed(RuntimeError):
    """A pipeline stage raised; ``stage`` names it and the message says why in one line."""

    def __init__(self, stage: str, cause: BaseException):
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"stage {stage} failed: {message}")
        self.stage = stage
        self.cause = cause


# --- configuration ------------------------------------------------------------------------------


@dataclass
class Configs:
    """Every stage's typed config, built from one params dict."""

    data: Any
    validate: Any
    model: Any
    train: Any
    evaluate: Any
    register: Any

    def resolved(self) -> dict[str, Any]:
        from grpo.config import to_dict

        return {name: to_dict(getattr(self, name)) for name in SECTIONS}


SECTIONS = ("data", "validate", "model", "train", "evaluate", "register")


def load_params(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """``params.yaml`` (or nothing: the embedded defaults) with ``section.key=value`` overrides."""
    from grpo.config import ConfigError, apply_overrides, load_yaml

    params = load_yaml(path) if path is not None and Path(path).exists() else {}
    if path is not None and not Path(path).exists() and Path(path).name != "params.yaml":
        raise ConfigError(f"{path}: no such params file")
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; allowed: {list(SECTIONS)}")
    return apply_overrides(params, list(overrides))


def resolve(params: dict[str, Any]) -> Configs:
    """Typed configs of every stage (unknown keys and bad values raise ``ConfigError``)."""
    from grpo.config import ConfigError, from_dict
    from grpo.data.sources import DataConfig
    from grpo.modeling import ModelConfig
    from grpo.trainer import TrainConfig
    from tasks.evaluate import EvaluateConfig
    from tasks.register import RegisterConfig
    from tasks.validate import ValidateConfig

    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; allowed: {list(SECTIONS)}")
    classes = {
        "data": DataConfig,
        "validate": ValidateConfig,
        "model": ModelConfig,
        "train": TrainConfig,
        "evaluate": EvaluateConfig,
        "register": RegisterConfig,
    }
    return Configs(
        **{k: from_dict(cls, params.get(k), where=f"params.yaml:{k}") for k, cls in classes.items()}
    )


def content_key(*parts: Any) -> str:
    """A sha256 over JSON-serialised parts (the run folder's name and a cache input)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def code_key() -> str:
    """A hash of the training and evaluation code: cached results are redone when it changes.

    Only the modules that shape a trained model or its metrics count (editing, say, the
    synthetic experiments must not throw the cache away); the data code shows in the data hash.
    """
    import grpo

    digest = hashlib.sha256()
    for name in TRAINING_CODE:
        digest.update((Path(grpo.__file__).parent / name).read_bytes())
    return digest.hexdigest()


# --- tasks: one stage function or one MLflow call each -------------------------------------------


@task(name="start-run", retries=2, retry_delay_seconds=2)
def start_run_task(root: str, experiment: str, resolved: dict[str, Any]) -> dict[str, str]:
    from tasks import tracking

    uri, experiment_id = tracking.setup(root, experiment)
    run_id = tracking.start_run(experiment_id, tags={"train.method": resolved["train"]["method"]})
    tracking.log_params(run_id, resolved)
    return {"run_id": run_id, "tracking_uri": uri, "experiment_id": experiment_id}


@task(name="ingest", retries=2, retry_delay_seconds=5)
def ingest_task(cfg: Any, root: str) -> dict[str, Any]:
    from tasks.ingest import ingest

    return ingest(cfg, root=root)


@task(name="record-data-version", retries=2, retry_delay_seconds=2)
def record_data_task(run_id: str, data: dict[str, Any]) -> None:
    from tasks.tracking import set_tags

    set_tags(
        run_id,
        {
            "data.md5": data.get("md5"),
            "data.sha256": data.get("sha256"),
            "data.git_rev": data.get("git_rev"),
            "data.source": data.get("source"),
            "data.rows": data.get("rows"),
            "data.groups": ",".join(map(str, data.get("groups") or [])),
        },
    )


@task(name="validate")
def validate_task(path: str, cfg: Any, groups: list[str] | None) -> dict[str, Any]:
    from tasks.validate import validate

    return validate(path, cfg, groups)


@task(name="train", cache_policy=CACHED, persist_result=True)
def train_task(
    pairs_path: str,
    data_key: str,
    code: str,
    model_cfg: Any,
    train_cfg: Any,
    out_dir: str,
    run_id: str,
) -> dict[str, Any]:
    from tasks.tracking import metric_logger
    from tasks.train import train

    result = train(pairs_path, model_cfg, train_cfg, out_dir, log_fn=metric_logger(run_id))
    return {**result, "logged_to": run_id}


@task(name="evaluate", cache_policy=CACHED, persist_result=True)
def evaluate_task(
    pairs_path: str,
    data_key: str,
    code: str,
    trained: dict[str, Any],
    cfg: Any,
    out_dir: str,
    model_cfg: Any,
) -> dict[str, Any]:
    from tasks.evaluate import evaluate

    return evaluate(
        pairs_path, trained["model_dir"], trained["reference_dir"], cfg, out_dir,
        beta=trained["beta"], method=trained["method"], model_cfg=model_cfg,
    )  # fmt: skip


@task(name="log-results", retries=2, retry_delay_seconds=2)
def log_results_task(
    run_id: str, trained: dict[str, Any], evaluation: dict[str, Any], metric: str
) -> None:
    from tasks import tracking

    cached = trained.get("logged_to") != run_id  # training came from the cache: copy its history
    tracking.log_results(run_id, trained["history"], evaluation, metric, include_history=cached)
    tracking.set_tags(run_id, {"train.steps": trained["steps"], "eval.split": evaluation["split"]})


@task(name="log-model", retries=2, retry_delay_seconds=2)
def log_model_task(run_id: str, trained: dict[str, Any]) -> str:
    from tasks.tracking import log_model

    return log_model(run_id, trained["model_dir"], metadata={"method": trained["method"]})


@task(name="register")
def register_task(
    run_id: str, metrics: dict[str, float], cfg: Any, model_uri: str | None
) -> dict[str, Any]:
    from tasks.register import register

    return register(run_id, metrics, cfg, model_uri=model_uri)


@task(name="end-run", retries=2, retry_delay_seconds=2)
def end_run_task(run_id: str, status: str, failure: dict[str, Any] | None = None) -> None:
    from tasks import tracking

    if failure:
        tracking.set_tags(
            run_id,
            {"pipeline.failed_stage": failure["stage"], "pipeline.error": failure["error"][:5000]},
        )
        if failure.get("report_path"):
            tracking.log_artifact(run_id, failure["report_path"], "validation")
    tracking.end_run(run_id, status)


# --- the flow ------------------------------------------------------------------------------------


@flow(name="retrain", log_prints=True)
def retrain(
    params_file: str = "params.yaml", overrides: list[str] | None = None, root: str | None = None
) -> dict[str, Any]:
    """Retrain on the newest data, evaluate every group, register only if the worst group passes.

    Returns the run summary (see :func:`summarize`). Raises :class:`StageFailed` when a stage
    fails; a failed validation stops the run before training (nothing trained or registered).
    """
    home = find_root(root)
    params_path = Path(params_file) if Path(params_file).is_absolute() else home / params_file
    cfgs = resolve(load_params(params_path, overrides or []))
    cfgs.validate.report_dir = str(home / cfgs.validate.report_dir)
    resolved = cfgs.resolved()
    try:
        tracking = start_run_task(str(home), cfgs.register.experiment, resolved)
    except Exception as exc:
        raise StageFailed("tracking (MLflow)", exc) from exc
    run_id = tracking["run_id"]
    stage, report = "ingest", None
    try:
        data = ingest_task(cfgs.data, str(home))
        record_data_task(run_id, data)
        stage = "validate"
        report = str(Path(cfgs.validate.report_dir) / "report.json")
        validate_task(data["path"], cfgs.validate, list(cfgs.data.expected_groups() or []) or None)
        stage = "train"
        code = code_key()
        key = content_key(data["sha256"], resolved["model"], resolved["train"], code)
        run_dir = home / "outputs" / "runs" / key[:16]
        args = (
            data["path"],
            data["sha256"],
            code,
            cfgs.model,
            cfgs.train,
            str(run_dir / "train"),
        )
        trained = train_task(*args, run_id)
        if not Path(trained["model_dir"]).exists():  # cached result whose files were deleted
            trained = train_task.with_options(refresh_cache=True)(*args, run_id)
        trained = {**trained, "beta": cfgs.train.beta}
        stage = "evaluate"
        evaluation = evaluate_task(
            data["path"], data["sha256"], code, trained, cfgs.evaluate,
            str(run_dir / f"evaluate-{cfgs.evaluate.split}"), cfgs.model,
        )  # fmt: skip
        stage = "tracking"
        log_results_task(run_id, trained, evaluation, cfgs.register.metric)
        model_uri = log_model_task(run_id, trained) if cfgs.register.log_model else None
        stage = "register"
        decision = register_task(run_id, evaluation["metrics"], cfgs.register, model_uri)
    except BaseException as exc:
        failure = {
            "stage": stage,
            "error": str(exc),
            "report_path": report if stage == "validate" else None,
        }
        with contextlib.suppress(Exception):  # keep the stage's error, not a tracking one
            end_run_task(run_id, "FAILED", failure)
        raise StageFailed(stage, exc) from exc
    end_run_task(run_id, "FINISHED")
    return summarize(tracking, data, trained, evaluation, decision, cfgs.register.metric)


def summarize(
    tracking: dict[str, str],
    data: dict[str, Any],
    trained: dict[str, Any],
    evaluation: dict[str, Any],
    decision: dict[str, Any],
    metric: str,
) -> dict[str, Any]:
    """The run summary printed by ``grpo run`` and written by ``--json`` (plain JSON types)."""
    from tasks.evaluate import per_group_rows

    metrics = evaluation["metrics"]
    rows = per_group_rows(metrics)
    worst = min(rows, key=lambda r: r.get(metric, float("inf")))["group"] if rows else None
    uri = tracking["tracking_uri"]
    return {
        "run_id": tracking["run_id"],
        "tracking_uri": uri,
        "experiment_id": tracking["experiment_id"],
        "data": {
            k: data.get(k) for k in ("source", "path", "md5", "sha256", "git_rev", "rows", "groups")
        },
        "train": {
            "method": trained["method"],
            "steps": trained["steps"],
            "model_dir": trained["model_dir"],
            "cached": trained.get("logged_to") != tracking["run_id"],
            "final_group_weights": dict(zip(trained["groups"], trained["weights"], strict=False)),
        },
        "evaluation": {
            "split": evaluation["split"],
            "pairs": evaluation["pairs"],
            "per_group": rows,
            "overall": {
                k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("eval/overall/")
            },
            "worst_group": {
                "metric": metric,
                "group": worst,
                "value": metrics.get(f"eval/worst_group/{metric}"),
                "gap": metrics.get(f"eval/group_gap/{metric}"),
            },
            "metrics_path": evaluation["metrics_path"],
        },
        "gate": {k: decision[k] for k in ("decision", "reason", "metric", "value", "threshold")},
        "registered": {
            "model_name": decision["model_name"],
            "version": decision["version"],
            "aliases": decision["aliases"],
            "champion": decision["champion"],
            "champion_reason": decision["champion_reason"],
        },
        "mlflow_ui": ui_command(uri),
    }


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    return f"mlflow ui --backend-store-uri {uri} --port 5000"
