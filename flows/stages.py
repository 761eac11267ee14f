"""The pipeline's stages: the one implementation behind both ``grpo run`` and ``dvc repro``.

Each stage function composes the ``tasks`` that do the work and writes the stage's outputs at
the paths ``dvc.yaml`` declares, so after either path ``outputs/`` holds the latest run::

    ingest    tasks.ingest           -> outputs/data/ingest.json (the data version, stable fields)
    validate  tasks.validate         -> outputs/data/validation.json (+ reports/validation/)
    train     tasks.train            -> outputs/train/result.json, history.csv
    evaluate  tasks.evaluate         -> outputs/evaluate/metrics.json, per_group.json, per_pair.json
    register  tasks.tracking/register -> outputs/register/decision.json (+ the MLflow run)

The Prefect flow (``flows/retrain.py``) calls them as tasks, training into a content-keyed folder
``outputs/runs/<key>/`` that its cache points at, and republishes the small result files to the
paths above (:func:`publish_train`, :func:`publish_evaluation`) even when a result came from its
cache. ``grpo stage NAME`` (:func:`run_from_files`) runs one stage in its own process, reading
what the previous stage wrote. The MLflow record is written by the same functions in both
(``tasks.tracking.open_run`` … ``close_run``); only its ``pipeline`` tag says which path ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpo.io import read_json, write_json

if TYPE_CHECKING:
    from flows.params import Configs

INGEST_JSON = "outputs/data/ingest.json"
VALIDATION_JSON = "outputs/data/validation.json"
TRAIN_DIR = "outputs/train"
EVALUATE_DIR = "outputs/evaluate"
DECISION_JSON = "outputs/register/decision.json"
RUNS_DIR = "outputs/runs"  # the flow's content-keyed training and evaluation folders
TRAIN_LOCK = ".lock"  # in a run folder's train/: held while a process trains or reads it
REGISTRY_WAIT_S = 3600.0  # longest wait for the registry lock (a champion re-scored meanwhile)

INGEST_KEYS = ("source", "md5", "sha256", "rows", "groups", "group_counts", "split_counts")

LogFn = Callable[[dict[str, float], int], None]


def pairs_path(cfgs: Configs, root: Path) -> Path:
    """The ingested pair table (``<data.dir>/pairs.parquet`` under the project root)."""
    from grpo.data.sources import PAIRS_FILE

    return root / cfgs.data.dir / PAIRS_FILE


# --- ingest and validate -----------------------------------------------------------------------


def ingest(data_cfg: Any, root: Path) -> dict[str, Any]:
    """Build, write and DVC-version the pairs; writes :data:`INGEST_JSON`; returns the full
    result of ``tasks.ingest.ingest`` (path, md5, sha256, git_rev, rows, groups, ...)."""
    from tasks.ingest import ingest as build

    result = build(data_cfg, root=root)
    write_json(root / INGEST_JSON, ingest_record(result, root))
    return result


def ingest_record(result: dict[str, Any], root: Path) -> dict[str, Any]:
    """The run-independent part of an ingest result (paths relative to ``root``): what
    :data:`INGEST_JSON` holds, byte-identical when the data did not change."""
    record = {key: result.get(key) for key in INGEST_KEYS}
    for key in ("path", "source_path", "dvc_file"):
        value = result.get(key)
        record[key] = os.path.relpath(value, root) if value else None
    return record


def validate(data_cfg: Any, validate_cfg: Any, root: Path) -> dict[str, Any]:
    """The Great Expectations suite on the ingested table, against the configured groups.

    Writes :data:`VALIDATION_JSON` either way, then raises ``DataValidationError`` on failure.
    """
    from grpo.data.sources import PAIRS_FILE
    from tasks.validate import DataValidationError
    from tasks.validate import validate as check

    cfg = dataclasses.replace(validate_cfg, report_dir=str(root / validate_cfg.report_dir))
    try:
        result = check(root / data_cfg.dir / PAIRS_FILE, cfg, data_cfg.expected_groups())
    except DataValidationError as exc:
        write_json(root / VALIDATION_JSON, validation_record(exc.result))
        raise
    write_json(root / VALIDATION_JSON, validation_record(result))
    return result


def validation_record(result: dict[str, Any]) -> dict[str, Any]:
    """The stable summary of a validation result (no timings or absolute paths)."""
    failed = [f"{f['table']}:{f['expectation']}:{f['column']}" for f in result["failures"]]
    keys = ("success", "rows", "groups", "expectations")
    return {**{k: result.get(k) for k in keys}, "failed": failed}


# --- train and evaluate ------------------------------------------------------------------------


def train(
    pairs: str | Path,
    model_cfg: Any,
    train_cfg: Any,
    out_dir: str | Path,
    root: Path,
    *,
    log_fn: LogFn | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """SFT (if configured) + preference training into ``out_dir``; publishes the result.

    ``resume`` (the flow's content-keyed run folder): one process at a time works in the folder
    (a lock in it, so a second ``grpo run`` of the same settings waits, then reuses the work);
    a folder holding a finished training is read back, not trained again; else training
    continues from the folder's newest checkpoint (``resumed_from_step``).
    """
    from tasks.locks import file_lock
    from tasks.train import train as fit

    if not resume:
        result = fit(pairs, model_cfg, train_cfg, out_dir, log_fn=log_fn, resume=False)
        return publish_train(result, root)
    with file_lock(Path(out_dir) / TRAIN_LOCK):
        result = finished_training(out_dir)
        if result is None:
            result = fit(pairs, model_cfg, train_cfg, out_dir, log_fn=log_fn, resume=True)
    return publish_train(result, root)


def finished_training(out_dir: str | Path) -> dict[str, Any] | None:
    """The result of a training that finished in ``out_dir`` (its ``result.json`` and policy are
    there; ``resumed_from_step`` = its last step), else None. Its policy is not written again,
    so a run evaluating it meanwhile reads whole files."""
    from tasks.train import RESULT_FILE, load_result

    if not (Path(out_dir) / RESULT_FILE).exists():
        return None
    result = load_result(out_dir)
    if not Path(result["model_dir"]).exists():
        return None
    return {**result, "resumed_from_step": result["steps"]}


def publish_train(result: dict[str, Any], root: Path) -> dict[str, Any]:
    """Write the training result and history at :data:`TRAIN_DIR` (unless trained there)."""
    from tasks.train import save_result

    if Path(result["out_dir"]).resolve() != (root / TRAIN_DIR).resolve():
        save_result(result, root / TRAIN_DIR)
    return result


def evaluate(
    pairs: str | Path,
    trained: dict[str, Any],
    eval_cfg: Any,
    model_cfg: Any,
    beta: float,
    out_dir: str | Path,
    root: Path,
    *,
    groups: tuple[str, ...] | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Per-group metrics of the trained policy against its reference, every configured group
    (``groups``) reported, intervals at ``confidence`` (``register.confidence``); publishes them."""
    from tasks.evaluate import evaluate as score

    result = score(
        pairs, trained["model_dir"], trained["reference_dir"], eval_cfg, out_dir,
        beta=beta, method=trained["method"], model_cfg=model_cfg, groups=groups,
        confidence=confidence,
    )  # fmt: skip
    return publish_evaluation(result, root)


def publish_evaluation(result: dict[str, Any], root: Path) -> dict[str, Any]:
    """Write the evaluation files at :data:`EVALUATE_DIR` (unless evaluated there)."""
    from tasks.evaluate import save_evaluation

    if Path(result["metrics_path"]).parent.resolve() != (root / EVALUATE_DIR).resolve():
        save_evaluation(result, root / EVALUATE_DIR)
    return result


# --- register: the MLflow run and the gate -----------------------------------------------------


def log_model(run_id: str, trained: dict[str, Any], enabled: bool) -> str | None:
    """The policy as an MLflow model and its reference as run artifacts (so the version can be
    re-scored from the registry alone); None when ``register.log_model`` is off."""
    from tasks.tracking import log_model as log
    from tasks.tracking import log_reference

    if not enabled:
        return None
    uri = log(run_id, trained["model_dir"], metadata={"method": trained["method"]})
    log_reference(run_id, trained["reference_dir"])
    return uri


REGISTRY_LIMIT = "grpo-registry"  # the Prefect global concurrency limit (1 slot)


@contextlib.contextmanager
def registry_guard(root: Path) -> Iterator[None]:
    """What serialises gate decisions and alias moves, the same for ``grpo run``, ``grpo stage
    register`` and ``grpo promote``: with a shared Prefect server, first its global concurrency
    limit :data:`REGISTRY_LIMIT` of one slot (processes on any machine take turns; created on
    first use; a holder that dies frees its slot when its lease ends), then always the file lock
    ``tasks.tracking.registry_lock`` names (every process of this machine using the store)."""
    from tasks.locks import file_lock
    from tasks.tracking import registry_lock

    with contextlib.ExitStack() as stack:
        if prefect_api_url():
            stack.enter_context(_prefect_registry_limit())
        stack.enter_context(file_lock(registry_lock(root), timeout=REGISTRY_WAIT_S))
        yield


def prefect_api_url() -> str:
    """The Prefect server this process talks to: Prefect's own setting (profiles included) where
    Prefect is already imported (``grpo run``), else ``PREFECT_API_URL`` from the environment,
    so that commands that do not orchestrate need not import Prefect to find out."""
    if "prefect" not in sys.modules:
        return os.environ.get("PREFECT_API_URL", "")
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or ""


def _prefect_registry_limit() -> AbstractContextManager:
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    # another run may create it at the same moment
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.upsert_global_concurrency_limit_by_name(REGISTRY_LIMIT, 1)
    return concurrency(REGISTRY_LIMIT, occupy=1, timeout_seconds=REGISTRY_WAIT_S, strict=True)


def register(
    run: dict[str, str],
    evaluation: dict[str, Any],
    cfgs: Configs,
    model_uri: str | None,
    root: Path,
) -> dict[str, Any]:
    """The gate on the evaluation, the current champion re-scored on the same pairs, the
    registry aliases; writes :data:`DECISION_JSON`.

    All of it under :func:`registry_guard`, so two runs registering at once (or a run and a
    ``grpo promote``) take turns, and each reads the champion afresh inside it.
    """
    with registry_guard(root):
        decision = _gate_and_register(run, evaluation, cfgs, model_uri, root)
    write_json(
        root / DECISION_JSON,
        {"run_id": run["run_id"], "tracking_uri": run["tracking_uri"], **decision},
    )
    return decision


def _gate_and_register(
    run: dict[str, str],
    evaluation: dict[str, Any],
    cfgs: Configs,
    model_uri: str | None,
    root: Path,
) -> dict[str, Any]:
    """The gate, the registration, the aliases and the version's description (in the lock)."""
    from tasks.register import Evidence
    from tasks.register import register as gate
    from tasks.tracking import describe_version

    evidence = Evidence(
        pairs_path=pairs_path(cfgs, root),
        per_pair=evaluation.get("per_pair") or {},
        split=evaluation["split"],
        model_cfg=cfgs.model,
        batch_size=cfgs.evaluate.batch_size,
        groups=cfgs.data.expected_groups(),
    )
    decision = gate(
        run["run_id"], evaluation["metrics"], cfgs.register, model_uri=model_uri, evidence=evidence
    )
    describe_version(run["run_id"], evaluation["metrics"], decision)  # the table, the decision
    return decision


def failure(stage: str, exc: BaseException, report_path: str | None = None) -> dict[str, Any]:
    """What ``tasks.tracking.close_run`` tags on a failed run."""
    return {"stage": stage, "error": str(exc), "report_path": report_path}


# --- `grpo stage NAME`: one stage from the files the previous one wrote -------------------------


def stage_ingest(cfgs: Configs, root: Path) -> dict[str, Any]:
    return ingest(cfgs.data, root)


def stage_validate(cfgs: Configs, root: Path) -> dict[str, Any]:
    return validate(cfgs.data, cfgs.validate, root)


def stage_train(cfgs: Configs, root: Path) -> dict[str, Any]:
    # outputs/train is shared by every config: always start fresh, never resume
    result = train(pairs_path(cfgs, root), cfgs.model, cfgs.train, root / TRAIN_DIR, root)
    return {k: v for k, v in result.items() if k != "history"}


def stage_evaluate(cfgs: Configs, root: Path) -> dict[str, Any]:
    from tasks.train import load_result

    trained = load_result(root / TRAIN_DIR)
    result = evaluate(
        pairs_path(cfgs, root), trained, cfgs.evaluate, cfgs.model, cfgs.train.beta,
        root / EVALUATE_DIR, root, groups=cfgs.data.expected_groups(),
        confidence=cfgs.register.confidence,
    )  # fmt: skip
    return {k: result[k] for k in ("metrics_path", "per_group_path", "split", "pairs")}


def stage_register(cfgs: Configs, root: Path) -> dict[str, Any]:
    """One MLflow run recorded as the flow records it, then the gate."""
    from tasks import tracking
    from tasks.evaluate import load_evaluation
    from tasks.ingest import git_revision
    from tasks.train import load_result

    trained = load_result(root / TRAIN_DIR)
    evaluation = load_evaluation(root / EVALUATE_DIR)
    ingested = root / INGEST_JSON
    data = {"git_rev": git_revision(root), **(read_json(ingested) if ingested.exists() else {})}
    run = tracking.open_run(root, cfgs.register.experiment, cfgs.resolved(), pipeline="dvc")
    try:
        tracking.set_tags(run["run_id"], {tracking.RUN_FOLDER_TAG: TRAIN_DIR})
        tracking.record_data(run["run_id"], data)
        tracking.record_results(run["run_id"], trained, evaluation, cfgs.register.metric)
        model_uri = log_model(run["run_id"], trained, cfgs.register.log_model)
        decision = register(run, evaluation, cfgs, model_uri, root)
    except BaseException as exc:
        tracking.close_run(run["run_id"], "FAILED", failure("register", exc))
        raise
    tracking.close_run(run["run_id"], "FINISHED")
    return {"run_id": run["run_id"], "tracking_uri": run["tracking_uri"], **decision}


FROM_FILES: dict[str, Callable[[Configs, Path], dict[str, Any]]] = {
    "ingest": stage_ingest,
    "validate": stage_validate,
    "train": stage_train,
    "evaluate": stage_evaluate,
    "register": stage_register,
}
STAGES = tuple(FROM_FILES)
