"""The ``retrain`` Prefect flow: ingest → validate → train → evaluate → gated registration.

Tasks are one-line wrappers around the stage functions in ``flows/stages.py`` (the same ones
``dvc repro`` calls through ``grpo stage``) and the MLflow record of ``tasks.tracking``; the flow
only wires them. Training and evaluation are cached on content (the data's sha256, the resolved
config and the code of ``grpo/``), with persisted results, so re-running on unchanged data and
config skips straight to tracking. Only I/O tasks (ingest, MLflow logging) retry; training
never does. What the run shows in Prefect (its name, tags, a log line per stage, artifacts) is
:mod:`flows.prefect_ui`'s.

Runs at once and faults (docs/reliability.md): a run folder is trained by one process at a time
and read back once finished; registration is serialised (:func:`flows.stages.registry_guard`);
a run holds ``run-<id>.lock`` while it lives, so the next run closes one whose process died
(:func:`process_alive`); and an MLflow server that stops answering after training ends the run
with one line naming it, the model kept for the next run to register.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from flows import prefect_ui, stages
from flows.params import find_root, load_configs
from flows.prefect_ui import StageClock, label_flow_run

CACHED = (INPUTS - "run_id") + TASK_SOURCE
# the run summary's `gate`: the decision and tasks.register.gate_record's keys
GATE_KEYS = (
    "decision", "reason", "metric", "value", "threshold", "confidence", "bound",
    "min_group_pairs", "group", "group_pairs", "margin",
)  # fmt: skip


TRAINING_CODE = (
    "config.py", "groups.py", "losses.py", "logprobs.py", "modeling.py", "trainer.py", "sft.py",
    "reference.py", "distributed.py", "checkpoint.py", "evaluation.py", "stats.py",
    "metric_names.py", "samples.py", "io.py",
)  # fmt: skip


class StageFailed(RuntimeError):
    """A pipeline stage raised; ``stage`` names it and the message says why in one line."""

    def __init__(self, stage: str, cause: BaseException):
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"stage {stage} failed: {message}")
        self.stage = stage
        self.cause = cause


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


# --- tasks: one stage function (flows.stages) or one MLflow call (tasks.tracking) each -----------


@task(name="start-run", retries=2, retry_delay_seconds=2)
def start_run_task(root: str, experiment: str, resolved: dict[str, Any]) -> dict[str, str]:
    from tasks.tracking import open_run

    return open_run(root, experiment, resolved, pipeline="prefect")


@task(name="ingest", retries=2, retry_delay_seconds=5)
def ingest_task(cfg: Any, root: str) -> dict[str, Any]:
    return stages.ingest(cfg, Path(root))


@task(name="record-data-version", retries=2, retry_delay_seconds=2)
def record_data_task(run_id: str, data: dict[str, Any]) -> None:
    from tasks.tracking import record_data

    record_data(run_id, data)


@task(name="validate")
def validate_task(data_cfg: Any, cfg: Any, root: str) -> dict[str, Any]:
    return stages.validate(data_cfg, cfg, Path(root))


@task(name="train", cache_policy=CACHED, persist_result=True)
def train_task(
    pairs_path: str,
    data_key: str,
    code: str,
    model_cfg: Any,
    train_cfg: Any,
    out_dir: str,
    root: str,
    run_id: str,
) -> dict[str, Any]:
    from tasks.tracking import metric_logger

    stream, streamed, lost = metric_logger(run_id), set(), []

    def log_fn(metrics: dict[str, float], step: int) -> None:
        if lost:  # the store stopped answering: train on, the history is copied at the end
            return
        try:
            stream(metrics, step)  # per-step metrics go into this flow run's MLflow run
        except Exception as exc:
            lost.append(step)
            prefect_ui.run_logger().warning(
                "step %d: metrics not streamed to MLflow: %s", step, exc
            )
            return
        streamed.add(step)

    result = stages.train(
        pairs_path, model_cfg, train_cfg, out_dir, Path(root), log_fn=log_fn, resume=True
    )
    # a finished run folder (same data and config) trains no step: nothing streamed, so the
    # run copies the whole history; a resumed one only the steps before its checkpoint
    return {**result, "logged_to": run_id, "streamed_steps": sorted(streamed)}


def streamed_steps(trained: dict[str, Any], run_id: str) -> list[int]:
    """The training steps whose metrics streamed into MLflow run ``run_id`` (none when the
    result came from Prefect's cache, i.e. from another run)."""
    return list(trained.get("streamed_steps") or []) if trained.get("logged_to") == run_id else []


@task(name="evaluate", cache_policy=CACHED, persist_result=True)
def evaluate_task(
    pairs_path: str,
    data_key: str,
    code: str,
    trained: dict[str, Any],
    cfg: Any,
    model_cfg: Any,
    beta: float,
    out_dir: str,
    root: str,
    groups: tuple[str, ...] | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    return stages.evaluate(
        pairs_path, trained, cfg, model_cfg, beta, out_dir, Path(root),
        groups=groups, confidence=confidence,
    )  # fmt: skip


@task(name="log-results", retries=2, retry_delay_seconds=2)
def log_results_task(
    run_id: str, trained: dict[str, Any], evaluation: dict[str, Any], metric: str
) -> None:
    from tasks.tracking import record_results

    logged = streamed_steps(trained, run_id)  # the rest of the history is copied
    record_results(run_id, trained, evaluation, metric, logged_steps=logged)


@task(name="log-model", retries=2, retry_delay_seconds=2)
def log_model_task(run_id: str, trained: dict[str, Any], enabled: bool) -> str | None:
    return stages.log_model(run_id, trained, enabled)


@task(name="close-abandoned-runs", retries=1, retry_delay_seconds=2)
def reap_task(root: str, run_id: str, run_folder: str) -> list[str]:
    from tasks.tracking import RUN_FOLDER_TAG, reap_abandoned_runs, set_tags

    set_tags(run_id, {RUN_FOLDER_TAG: run_folder})
    return reap_abandoned_runs(root, run_id, run_folder)


@task(name="register")
def register_task(
    run: dict[str, str], evaluation: dict[str, Any], cfgs: Any, model_uri: str | None, root: str
) -> dict[str, Any]:
    return stages.register(run, evaluation, cfgs, model_uri, Path(root))


@task(name="end-run", retries=2, retry_delay_seconds=2)
def end_run_task(run_id: str, status: str, failure: dict[str, Any] | None = None) -> None:
    from tasks.tracking import close_run

    close_run(run_id, status, failure)


@task(name="publish-artifacts", retries=2, retry_delay_seconds=2)
def publish_artifacts_task(summary: dict[str, Any]) -> None:
    prefect_ui.publish_artifacts(summary)


# --- the flow ------------------------------------------------------------------------------------


def train_cached(
    inputs: tuple[str, str, str], cfgs: Any, out_dir: str, home: Path, run_id: str
) -> dict[str, Any]:
    """The train task (cached on ``inputs`` and the configs); retrained when a cached result's
    model folder was deleted; its result published at the DVC path even when cached."""
    args = (*inputs, cfgs.model, cfgs.train, out_dir, str(home), run_id)
    trained = train_task(*args)
    if not Path(trained["model_dir"]).exists():
        trained = train_task.with_options(refresh_cache=True)(*args)
    return stages.publish_train(trained, home)


@flow(name="retrain", log_prints=True)
def retrain(
    params_file: str = "params.yaml", overrides: list[str] | None = None, root: str | None = None
) -> dict[str, Any]:
    """Retrain on the newest data, evaluate every group, register only if the worst group passes.

    Returns the run summary (see :func:`summarize`). Raises :class:`StageFailed` when a stage
    fails; a failed validation stops the run before training (nothing trained or registered).
    """
    from tasks.tracking import run_name

    home = find_root(root)
    params_path = Path(params_file) if Path(params_file).is_absolute() else home / params_file
    cfgs = load_configs(params_path, overrides or [])
    method, model = cfgs.train.method, cfgs.register.model_name
    tags = prefect_ui.flow_run_tags(method, cfgs.data.source, model)
    label_flow_run(run_name(method, None, cfgs.train.seed), tags)
    clock = StageClock()
    try:
        tracking = start_run_task(str(home), cfgs.register.experiment, cfgs.resolved())
    except Exception as exc:
        raise StageFailed("tracking (MLflow)", exc) from exc
    with process_alive(home, tracking["run_id"]) as alive:
        results = run_and_close(cfgs, home, tracking, clock, alive)
    summary = summarize(tracking, *results, cfgs.register.metric, seed=cfgs.train.seed)
    if publish_artifacts_task(summary, return_state=True).is_failed():  # the run stands anyway
        prefect_ui.run_logger().warning("the Prefect artifacts could not be created")
    return summary


class TrackingUnavailable(RuntimeError):
    """The MLflow server stopped answering after training; the message names it, where the
    trained model is kept, and what to do."""


@contextlib.contextmanager
def process_alive(home: Path, run_id: str) -> Iterator[dict[str, bool]]:
    """Hold ``run-<run id>.lock`` while this process works on the run: another ``grpo run``
    that finds it free knows the run's process is gone (``tasks.tracking.reap_abandoned_runs``).
    Set ``["closed"]`` once the run is closed in MLflow; the file is then removed, else it
    stays for a later run to close the run."""
    from tasks.locks import hold, lock_path, release
    from tasks.tracking import RUN_LOCK

    path = lock_path(home, RUN_LOCK.format(run_id=run_id))
    handle, state = hold(path), {"closed": False}
    try:
        yield state
    finally:
        if state["closed"]:
            path.unlink(missing_ok=True)  # while still held: no one reaps a closed run
        release(handle)


def run_and_close(
    cfgs: Any, home: Path, tracking: dict[str, str], clock: StageClock, alive: dict[str, bool]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """:func:`run_stages`, then the MLflow run closed: FINISHED, or FAILED with the stage and
    its error (not tried when the server is gone). Raises :class:`StageFailed`."""
    run_id = tracking["run_id"]
    try:
        results = run_stages(cfgs, home, tracking, clock)
    except BaseException as exc:
        report = str(Path(home / cfgs.validate.report_dir) / "report.json")
        failure = stages.failure(clock.stage, exc, report if clock.stage == "validate" else None)
        if not isinstance(exc, TrackingUnavailable):
            with contextlib.suppress(Exception):  # keep the stage's error, not a tracking one
                end_run_task(run_id, "FAILED", failure)
                alive["closed"] = True
        raise StageFailed(clock.stage, exc) from exc
    try:
        end_run_task(run_id, "FINISHED")
    except Exception as exc:
        raise StageFailed("tracking", exc) from exc
    alive["closed"] = True
    return results


def run_stages(
    cfgs: Any, home: Path, tracking: dict[str, str], clock: StageClock
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The stages in order, one line each when done; ``clock.stage`` names the one running.
    Returns (data, trained, evaluation, decision)."""
    from tasks.tracking import run_name

    run_id, metric = tracking["run_id"], cfgs.register.metric
    clock.start("ingest")
    data = ingest_task(cfgs.data, str(home))
    record_data_task(run_id, {"git_rev": data.get("git_rev"), **stages.ingest_record(data, home)})
    name = run_name(cfgs.train.method, data, cfgs.train.seed)
    label_flow_run(name)  # now that the data version is known
    clock.done(prefect_ui.ingest_line(data))
    clock.start("validate")
    clock.done(prefect_ui.validate_line(validate_task(cfgs.data, cfgs.validate, str(home))))
    clock.start("train")
    code = code_key()
    key = content_key(data["sha256"], cfgs.resolved()["model"], cfgs.resolved()["train"], code)
    run_dir = home / stages.RUNS_DIR / key[:16]
    # runs whose process died (SIGKILL, or a tracking outage at their end) are closed; one of
    # this run folder is superseded by this run, which resumes or reuses its training
    folder = os.path.relpath(run_dir / "train", home)
    if reap_task(str(home), run_id, folder, return_state=True).is_failed():
        prefect_ui.run_logger().warning("abandoned MLflow runs could not be closed")
    inputs = (data["path"], data["sha256"], code)  # what the cached tasks are keyed on
    trained = train_cached(inputs, cfgs, str(run_dir / "train"), home, run_id)
    clock.done(prefect_ui.train_line(trained, run_id, home))
    clock.start("evaluate")
    evaluation = evaluate_task(
        *inputs, trained, cfgs.evaluate, cfgs.model, cfgs.train.beta,
        str(run_dir / f"evaluate-{cfgs.evaluate.split}"), str(home),
        cfgs.data.expected_groups(), cfgs.register.confidence,
    )  # fmt: skip
    stages.publish_evaluation(evaluation, home)  # a cached result skipped publishing
    clock.done(prefect_ui.evaluate_line(evaluation_summary(evaluation, metric)))
    try:
        decision = record_and_register(cfgs, home, tracking, clock, trained, evaluation, name)
    except Exception as exc:
        outage = tracking_outage(tracking["tracking_uri"], run_dir, home)
        if outage is None:
            raise
        raise outage from exc
    return data, trained, evaluation, decision


def record_and_register(
    cfgs: Any,
    home: Path,
    tracking: dict[str, str],
    clock: StageClock,
    trained: dict[str, Any],
    evaluation: dict[str, Any],
    name: str,
) -> dict[str, Any]:
    """The tracking and register stages: history, evaluation and model into the MLflow run,
    then the gate (serialised: :func:`flows.stages.registry_guard`). Returns the decision."""
    run_id = tracking["run_id"]
    clock.start("tracking")
    log_results_task(run_id, trained, evaluation, cfgs.register.metric)
    model_uri = log_model_task(run_id, trained, cfgs.register.log_model)
    clock.done(f"MLflow run {name}: metrics, curves, tables, plots{', model' * bool(model_uri)}")
    clock.start("register")
    decision = register_task(tracking, evaluation, cfgs, model_uri, str(home))
    clock.done(prefect_ui.register_line(decision))
    return decision


def tracking_outage(uri: str, run_dir: Path, home: Path) -> TrackingUnavailable | None:
    """A one-line error when the MLflow server at ``uri`` no longer answers (None when it
    does: the failure was something else)."""
    from tasks.tracking import unreachable

    problem = unreachable(uri)
    if problem is None:
        return None
    kept = os.path.relpath(run_dir, home)
    return TrackingUnavailable(
        f"{problem}; the trained model is kept in {kept}/: run `grpo run` again with the same "
        "settings once it answers, to record and register it without training again"
    )


def summarize(
    tracking: dict[str, str],
    data: dict[str, Any],
    trained: dict[str, Any],
    evaluation: dict[str, Any],
    decision: dict[str, Any],
    metric: str,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """The run summary printed by ``grpo run`` and written by ``--json`` (plain JSON types)."""
    from prefect.runtime import flow_run

    from tasks import tracking as mlflow_record

    uri, run_id, experiment_id = (tracking[k] for k in ("tracking_uri", "run_id", "experiment_id"))
    return {
        "run_id": run_id,
        "run_name": mlflow_record.run_name(trained["method"], data, seed),
        "tracking_uri": uri,
        "experiment_id": experiment_id,
        "flow_run_id": flow_run.get_id(),
        "data": {
            k: data.get(k) for k in ("source", "path", "md5", "sha256", "git_rev", "rows", "groups")
        },
        "train": {
            "method": trained["method"],
            "steps": trained["steps"],
            "model_dir": trained["model_dir"],
            "cached": not streamed_steps(trained, run_id),  # no step trained in this run
            # the checkpoint this run's training continued from (its last step: reused whole)
            "resumed_from_step": trained.get("resumed_from_step"),
            "final_group_weights": dict(zip(trained["groups"], trained["weights"], strict=False)),
        },
        "evaluation": evaluation_summary(evaluation, metric),
        "gate": {k: decision[k] for k in GATE_KEYS},
        "registered": {
            "model_name": decision["model_name"],
            "version": decision["version"],
            "aliases": decision["aliases"],
            "champion": decision["champion"],
            "champion_reason": decision["champion_reason"],
            "champion_comparison": decision.get("champion_comparison"),
        },
        "links": mlflow_record.ui_links(uri, experiment_id, run_id, decision),
        "mlflow_ui": mlflow_record.ui_hint(uri, experiment_id, run_id),
    }


def evaluation_summary(evaluation: dict[str, Any], metric: str) -> dict[str, Any]:
    """The per-group table, the overall row and the worst group on ``metric``."""
    from grpo import metric_names
    from tasks.evaluate import per_group_rows

    metrics = evaluation["metrics"]
    rows = per_group_rows(metrics)  # pairs, the metrics and the accuracies' intervals
    unmeasured = [r["group"] for r in rows if not r.get("pairs")]  # the worst is unknown there
    worst = unmeasured[0] if unmeasured else None
    if rows and worst is None:
        worst = min(rows, key=lambda r: r.get(metric, float("inf")))["group"]
    return {
        "split": evaluation["split"],
        "pairs": evaluation["pairs"],
        "per_group": rows,
        "overall": metric_names.of_kind(metrics, "overall"),
        "worst_group": {
            "metric": metric,
            "group": worst,
            "value": metrics.get(metric_names.worst_group(metric)),
            "gap": metrics.get(metric_names.group_gap(metric)),
        },
        "metrics_path": evaluation["metrics_path"],
    }
