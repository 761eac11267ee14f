"""MLflow tracking: where runs go, and what each retraining run records.

Every function takes an explicit ``run_id`` (no reliance on MLflow's thread-local active run),
so Prefect tasks can call them from any thread. What a run holds:

- the experiment: tag ``mlflow.experimentKind`` = ``custom_model_development`` (MLflow 3's UI
  then shows the classic runs/metrics/models view, not the GenAI one) and a description;
- the run's name: what ran, ``<method>-<data version>-s<seed>`` (e.g. ``gr-dpo-a78ad2d8-s0``);
- params: the resolved config, flattened to ``section.key`` (``params.yaml`` after overrides);
- dataset inputs ``pairs-train`` (context ``training``) and ``pairs-<split>`` (``evaluation``):
  digest = the DVC md5, source = the DVC-tracked file (:mod:`tasks.dvc_dataset`);
- tags: the data version (``data.md5`` = DVC md5, ``data.sha256``, ``data.git_rev``,
  ``data.source``, ``data.rows``, ``data.groups``), ``train.method``, ``train.steps``,
  ``eval.split``, ``pipeline`` (``prefect`` or ``dvc``: which path ran) and the gate's decision;
- metrics: per-step training metrics (``train/loss``, ``train/group_loss/<g>``,
  ``train/group_weight/<g>``, ``val/...``) and the evaluation (``eval/group/<g>/<metric>``,
  ``eval/worst_group/<metric>``, ``eval/overall/<metric>``, ``eval/group_gap/<metric>``);
- a per-group table (``eval/per_group.json``, ``mlflow.load_table``), the scored-option samples
  (``eval/samples.json``, a table: one row per option), three plots, and the policy as a
  transformers-flavor model (``mlflow.transformers.load_model("models:/NAME@champion")``) whose
  registered model and versions carry the per-group table and the gate decision as descriptions.

Both pipelines (the Prefect flow and ``dvc repro``) write a run only through :func:`open_run`,
:func:`record_data`, :func:`record_results`, :func:`log_model` and :func:`close_run`, so the two
records hold the same params, tags, metrics and artifacts.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

DB_NAME = "mlflow.db"
TABLE_FILE = "eval/per_group.json"
SAMPLES_TABLE = "eval/samples.json"
PLOT_FILES = {
    "group_accuracy": "plots/group_accuracy.png",
    "group_weights": "plots/group_weights.png",
    "worst_group_loss": "plots/worst_group_loss.png",
}
_BAD_CHARS = re.compile(r"[^\w\-. /:]")
# MLflow 3's UI opens an experiment without this tag as a GenAI one (traces, prompts); this
# value (the UI's "Machine learning" kind) gives the classic runs / metrics / models view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
EXPERIMENT_NOTE = (
    "Group-robust preference optimization (GR-DPO / GR-IPO, arXiv 2405.20304): one run per "
    "`grpo run` or `dvc repro`, named <method>-<data version>-s<seed>. Per-group evaluation "
    "metrics (eval/group/<group>/<metric>, eval/worst_group/...), training curves (train/*, "
    "val/*), the data as a dataset input (DVC md5), and the policy, registered only when its "
    "worst group passes the gate."
)
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow server` serves a local store by default


def _quiet() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")


def default_uri(root: str | Path) -> str:
    """``sqlite:///<root>/mlruns/mlflow.db`` (absolute, so the CWD does not matter)."""
    return f"sqlite:///{(Path(root).resolve() / 'mlruns' / DB_NAME).as_posix()}"


def tracking_uri(root: str | Path) -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else :func:`default_uri`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_uri(root)


def artifact_root(uri: str) -> str | None:
    """Artifacts beside a SQLite database (``<db folder>/artifacts``); a server decides its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
    return None


def unreachable(uri: str, timeout: float = 10.0) -> str | None:
    """Why the MLflow server at ``uri`` does not answer its health check, in one line naming
    the URI (None: it answers, or the store is not a server)."""
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return None
    except OSError as exc:
        return f"MLflow tracking server {uri} does not answer ({exc})"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other store)."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def registry_lock(root: str | Path) -> Path:
    """The lock file that serialises gate decisions and alias moves without a shared Prefect
    server: beside a SQLite store's database (every checkout using that file shares it), else
    in the project's lock folder (a server's registry, serialised on this machine only)."""
    from tasks.locks import lock_path

    db = sqlite_path(tracking_uri(root))
    return db.with_name(f"{db.name}.registry.lock") if db else lock_path(root, "registry")


def setup(root: str | Path, experiment: str) -> tuple[str, str]:
    """Point MLflow at the store and return ``(tracking_uri, experiment_id)``.

    A SQLite store is opened under a lock beside its database: MLflow creates a fresh
    database's tables on first use, and two processes doing so at once fail (measured: 5 of 8
    processes, 'duplicate column name' or an alembic version error).
    """
    _quiet()
    import mlflow

    from tasks.locks import file_lock

    uri = tracking_uri(root)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    lock = file_lock(db.with_name(f"{db.name}.lock")) if db else contextlib.nullcontext()
    with lock:
        client = mlflow.MlflowClient(uri, uri)
        client.search_registered_models(max_results=1)  # the registry's tables too
        return uri, _experiment(client, experiment, artifact_root(uri))


def _experiment(client, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created (tagged) if missing; another process creating it at the
    same moment is no error."""
    from mlflow.exceptions import MlflowException

    tags = {**EXPERIMENT_KIND, "mlflow.note.content": EXPERIMENT_NOTE}
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=tags)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)
    for key, value in tags.items():  # an experiment made before these conventions gets them
        if key not in found.tags:
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def ui_url(uri: str) -> str:
    """The MLflow UI's address for this tracking URI: the server itself, or where
    ``mlflow server`` serves a local store (:data:`LOCAL_UI`)."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_url(uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def version_url(uri: str, name: str, version: str | int) -> str:
    return f"{ui_url(uri)}/#/models/{name}/versions/{version}"


def ui_links(
    uri: str, experiment_id: str, run_id: str, decision: Mapping[str, Any]
) -> dict[str, str | None]:
    """``{"mlflow_run": its URL, "model_version": the registered version's (None: none)}``."""
    version = decision.get("version")
    return {
        "mlflow_run": run_url(uri, experiment_id, run_id),
        "model_version": version_url(uri, decision["model_name"], version) if version else None,
    }


def ui_hint(uri: str, experiment_id: str, run_id: str) -> str:
    """What to do to see this run: open its URL on a server; for a local store, start
    ``mlflow server`` on it first (``mlflow ui --backend-store-uri http://...`` is no command)."""
    url = run_url(uri, experiment_id, run_id)
    if uri.startswith(("http://", "https://")):
        return f"open {url}"
    return f"mlflow server --backend-store-uri {uri} --port 5000, then open {url}"


def client():
    _quiet()
    import mlflow

    return mlflow.MlflowClient()


def start_run(
    experiment_id: str, run_name: str | None = None, tags: Mapping[str, str] | None = None
) -> str:
    """Create a run (status RUNNING) and return its id."""
    run = client().create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Mark the run ``FINISHED`` or ``FAILED``."""
    client().set_terminated(run_id, status=status)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-4}}`` → ``{"train.lr": "0.0001"}`` (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, prefix=f"{name}."))
        else:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            out[name] = text[:6000]  # MLflow's limit on a param value
    return out


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    """The resolved config as ``section.key`` params."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(flatten(params).items())]
    for start in range(0, len(items), 100):
        client().log_batch(run_id, params=items[start : start + 100])


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Tags (values turned into strings; ``None`` values are skipped)."""
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
    if items:
        client().log_batch(run_id, tags=items)


def metric_name(name: str) -> str:
    """MLflow accepts letters, digits, ``_-. /:``; anything else (e.g. a group name) becomes ``_``."""
    return _BAD_CHARS.sub("_", name)


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Numeric metrics at ``step`` (non-numbers are skipped, NaN kept)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(metric_name(k), float(v), now, int(step))
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    for start in range(0, len(items), 500):
        client().log_batch(run_id, metrics=items[start : start + 500])


def metric_logger(run_id: str) -> Callable[[dict[str, float], int], None]:
    """A ``log_fn(metrics, step)`` for ``grpo.trainer.train`` that streams to this run."""

    def log_fn(metrics: dict[str, float], step: int) -> None:
        log_metrics(run_id, metrics, step)

    return log_fn


def log_history(
    run_id: str, history: Iterable[Mapping[str, Any]], skip_steps: Collection[int] = ()
) -> None:
    """Per-step records ``{"step": s, "train/loss": ..., ...}`` but those of ``skip_steps``
    (already streamed into this run); used when training did not stream into this run."""
    skip = set(skip_steps)
    for record in history:
        record = dict(record)
        step = int(record.pop("step", 0))
        if step not in skip:
            log_metrics(run_id, record, step)


def per_group_table(metrics: Mapping[str, float]) -> Any:
    """A DataFrame with one row per group from ``eval/group/<g>/<metric>`` names."""
    import pandas as pd

    from grpo import metric_names

    rows = metric_names.per_group(metrics)
    frame = pd.DataFrame.from_dict(rows, orient="index").sort_index()
    frame.index.name = "group"
    return frame.reset_index()


def log_evaluation(run_id: str, metrics: Mapping[str, float]) -> Any:
    """The flat evaluation metrics and the per-group table; returns the table."""
    log_metrics(run_id, metrics)
    table = per_group_table(metrics)
    client().log_table(run_id, table, TABLE_FILE)
    return table


def log_figures(run_id: str, figures: Mapping[str, Any]) -> None:
    """Log each matplotlib figure (``{artifact_file: figure}``) and close it."""
    import matplotlib.pyplot as plt

    for path, figure in figures.items():
        client().log_figure(run_id, figure, path)
        plt.close(figure)


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """A file or folder as run artifacts."""
    path = Path(path)
    if path.is_dir():
        client().log_artifacts(run_id, str(path), artifact_path)
    elif path.exists():
        client().log_artifact(run_id, str(path), artifact_path)


def log_model(
    run_id: str, model_dir: str | Path, *, metadata: Mapping[str, Any] | None = None
) -> str:
    """Log the saved policy as a transformers ``text-generation`` model; returns its ``models:/`` URI."""
    import logging

    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    previous = logging.getLogger("mlflow.transformers").level
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)  # no Hub: model card warnings
    try:
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            info = mlflow.transformers.log_model(
                {"model": model, "tokenizer": tokenizer},
                name="model",
                task="text-generation",
                pip_requirements=["torch", "transformers", "tokenizers", "safetensors"],
                metadata=dict(metadata or {}),
            )
    finally:
        logging.getLogger("mlflow.transformers").setLevel(previous)
    client().update_run(run_id, status="RUNNING")  # the flow marks the end itself
    return info.model_uri


def log_reference(run_id: str, reference_dir: str | Path) -> None:
    """The reference model (weights, config, tokenizer) as run artifacts ``reference/``: with the
    logged policy, what re-scores a registered version later (``tasks.rescore``). Only the
    folder's files: its cached log-probs (``logps/``) are not needed."""
    for path in sorted(Path(reference_dir).iterdir()):
        if path.is_file():
            client().log_artifact(run_id, str(path), "reference")


# --- the run record, shared by the Prefect flow and `grpo stage register` -----------------------

DATA_TAGS = ("md5", "sha256", "git_rev", "source", "rows", "groups")


def open_run(
    root: str | Path, experiment: str, resolved: Mapping[str, Any], pipeline: str
) -> dict[str, str]:
    """Start a run with the resolved config as params; tags ``train.method`` and ``pipeline``.

    Returns ``{"run_id", "tracking_uri", "experiment_id"}``.
    """
    uri, experiment_id = setup(root, experiment)
    method, seed = resolved["train"]["method"], resolved["train"].get("seed")
    tags = {"train.method": method, "pipeline": pipeline}
    run_id = start_run(experiment_id, run_name=run_name(method, None, seed), tags=tags)
    log_params(run_id, resolved)
    return {"run_id": run_id, "tracking_uri": uri, "experiment_id": experiment_id}


def data_version(data: Mapping[str, Any] | None) -> str | None:
    """The data's short version: the DVC md5's first 8 hex digits (the sha256's when the data
    is not DVC-tracked); None without data."""
    digest = (data or {}).get("md5") or (data or {}).get("sha256")
    return str(digest)[:8] if digest else None


def run_name(method: str, data: Mapping[str, Any] | None, seed: Any) -> str:
    """``gr-dpo-a78ad2d8-s0``: method, data version and seed (each when known)."""
    seed_part = f"s{seed}" if seed is not None else None
    return "-".join(str(p) for p in (method, data_version(data), seed_part) if p is not None)


def record_data(run_id: str, data: Mapping[str, Any]) -> None:
    """The data version as ``data.<key>`` tags (groups comma-separated), in the run's name, and
    as the run's dataset inputs (:func:`log_dataset_inputs`)."""
    tags = {f"data.{key}": data.get(key) for key in DATA_TAGS}
    tags["data.groups"] = ",".join(map(str, data.get("groups") or []))
    set_tags(run_id, tags)
    params = client().get_run(run_id).data.params
    name = run_name(params.get("train.method", "run"), data, params.get("train.seed"))
    client().update_run(run_id, name=name)
    log_dataset_inputs(run_id, data, params.get("evaluate.split", "test"))


def log_dataset_inputs(run_id: str, data: Mapping[str, Any], eval_split: str) -> None:
    """The pair table as two dataset inputs: ``pairs-train`` (context ``training``) and
    ``pairs-<eval_split>`` (``evaluation``), digest = the DVC md5 (36 characters, MLflow's
    limit; the sha256's first 32 hex digits for untracked data), source = the DVC-tracked file
    (:class:`tasks.dvc_dataset.DVCDatasetSource`), schema = the canonical columns. MLflow
    keeps one input per dataset and run, hence one dataset per split; and one dataset per name
    and digest in an experiment, so a later run on the same data version shares the source
    (git revision included) of the first run that logged it."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from grpo.data.schema import COLUMNS
    from tasks import dvc_dataset

    dvc_dataset.register()
    source = dvc_dataset.DVCDatasetSource(
        data.get("path"), data.get("git_rev"), data.get("dvc_file"), data.get("md5")
    )
    digest = data.get("md5") or str(data.get("sha256") or "")[:32] or None
    schema = Schema([ColSpec(DataType.string, c) for c in COLUMNS])
    counts = data.get("split_counts") or {}
    inputs = []
    for split, context in (("train", "training"), (eval_split, "evaluation")):
        dataset = MetaDataset(source, name=f"pairs-{split}", digest=digest, schema=schema)
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
        tags += [InputTag("rows", str(counts[split]))] if split in counts else []
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags))
    client().log_inputs(run_id, datasets=inputs)


def record_results(
    run_id: str,
    trained: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    metric: str,
    *,
    logged_steps: Collection[int] = (),
) -> None:
    """Training history (but the ``logged_steps`` that training streamed into this run),
    evaluation, table, plots, samples, and the ``train.steps`` / ``eval.split`` tags; the
    ``train.alpha_collapse`` tag when α collapsed onto one group (the trainer's warning)."""
    log_results(run_id, trained["history"], evaluation, metric, skip_steps=logged_steps)
    tags = {"train.steps": trained["steps"], "eval.split": evaluation["split"]}
    if trained.get("collapse"):
        tags["train.alpha_collapse"] = trained["collapse"]["message"]
    set_tags(run_id, tags)


def close_run(run_id: str, status: str, failure: Mapping[str, Any] | None = None) -> None:
    """End the run; a failure tags ``pipeline.failed_stage`` and ``pipeline.error`` and attaches
    the validation report when there is one."""
    if failure:
        set_tags(
            run_id,
            {"pipeline.failed_stage": failure["stage"], "pipeline.error": failure["error"][:5000]},
        )
        if failure.get("report_path"):
            log_artifact(run_id, failure["report_path"], "validation")
    end_run(run_id, status)


RUN_FOLDER_TAG = "pipeline.run_folder"  # where the run trains, relative to the project root
RUN_LOCK = "run-{run_id}"  # tasks.locks name, held by a flow run's process while it lives


def end_abandoned_run(run_id: str, found_by: str, run_folder: str | None) -> bool:
    """Mark a run whose process is gone KILLED, if it is still RUNNING (True when marked).

    Tags ``pipeline.error`` (what happened, which run found it) and, when it trained in the
    same run folder as ``found_by`` (whose run then resumes or reuses that work),
    ``pipeline.superseded_by`` = ``found_by``.
    """
    run = client().get_run(run_id)
    if run.info.status != "RUNNING":
        return False
    tags = {
        "pipeline.error": "the run's process ended without closing it (killed, or the tracking "
        f"store was unreachable at its end); found by run {found_by}"
    }
    if run_folder is not None and run.data.tags.get(RUN_FOLDER_TAG) == run_folder:
        tags["pipeline.superseded_by"] = found_by
    set_tags(run_id, tags)
    end_run(run_id, "KILLED")
    return True


def reap_abandoned_runs(root: str | Path, run_id: str, run_folder: str | None) -> list[str]:
    """End (:func:`end_abandoned_run`) every run of this project whose process is gone: its
    ``run-<id>.lock`` is free. Returns their ids. A run this store does not know (the lock of
    a run in another store) is left alone, its lock file kept."""
    from mlflow.exceptions import MlflowException

    from tasks.locks import LOCKS_DIR, release, try_lock

    ended = []
    for path in sorted((Path(root) / LOCKS_DIR).glob(RUN_LOCK.format(run_id="*") + ".lock")):
        other = path.name[len("run-") : -len(".lock")]
        handle = None if other == run_id else try_lock(path)
        if handle is None:  # this run, or one whose process still holds its lock
            continue
        try:
            if end_abandoned_run(other, run_id, run_folder):
                ended.append(other)
            path.unlink(missing_ok=True)
        except MlflowException:
            pass
        finally:
            release(handle)
    return ended


def log_results(
    run_id: str,
    history: list[Mapping[str, Any]],
    evaluation: Mapping[str, Any],
    metric: str,
    *,
    skip_steps: Collection[int] = (),
) -> Any:
    """Everything after training: the history (but ``skip_steps``, streamed already), the
    evaluation metrics and per-group table, the three plots and the scored-option samples (a
    table, one row per option). Returns the per-group table."""
    log_history(run_id, history, skip_steps)
    table = log_evaluation(run_id, evaluation["metrics"])
    log_figures(run_id, training_figures(list(history), table, metric))
    log_samples(run_id, list(evaluation.get("samples") or []))
    return table


def log_samples(run_id: str, samples: list[Mapping[str, Any]]) -> None:
    """``eval/samples.json`` as an MLflow table (``mlflow.load_table``): one row per scored
    option (``grpo.samples.sample_rows``)."""
    import pandas as pd

    from grpo.samples import sample_rows

    if samples:
        client().log_table(run_id, pd.DataFrame(sample_rows(samples)), SAMPLES_TABLE)


# --- the registry's descriptions: the per-group table and the gate decision --------------------

TABLE_METRICS = ("pairs", "loss", "reward_accuracy", "logprob_accuracy", "reward_margin")


def per_group_markdown(metrics: Mapping[str, float]) -> str:
    """The per-group evaluation as a Markdown table (groups by name, then the worst group)."""
    from grpo import metric_names

    def cell(value: Any, metric: str) -> str:
        if not isinstance(value, (int, float)) or math.isnan(value):
            return "–"
        return f"{value:.0f}" if metric == "pairs" else f"{value:.4f}"

    lines = [
        "| group | " + " | ".join(TABLE_METRICS) + " |",
        "|---" * (len(TABLE_METRICS) + 1) + "|",
    ]
    rows = sorted(metric_names.per_group(metrics).items())
    worst = {m: metrics.get(metric_names.worst_group(m)) for m in TABLE_METRICS}
    for group, values in [*rows, ("**worst group**", worst)]:
        lines.append(
            f"| {group} | " + " | ".join(cell(values.get(m), m) for m in TABLE_METRICS) + " |"
        )
    return "\n".join(lines)


def version_description(
    name: str, metrics: Mapping[str, float], decision: Mapping[str, Any]
) -> str:
    """A model version's description: the run, the gate decision and why, the champion rule's
    decision, and the per-group table."""
    lines = [
        f"Run `{name}`. Gate: **{decision.get('decision')}**: {decision.get('reason')}.",
    ]
    if decision.get("champion_reason"):
        lines.append(f"Champion: {decision['champion_reason']}.")
    return "\n\n".join([*lines, per_group_markdown(metrics)])


def describe_version(
    run_id: str, metrics: Mapping[str, float], decision: Mapping[str, Any]
) -> None:
    """Set the registered version's description (:func:`version_description`) and, when it is
    the champion, the registered model's (what the model is, then the champion's table)."""
    version = decision.get("version")
    if not version:
        return
    name = client().get_run(run_id).info.run_name
    text = version_description(name, metrics, decision)
    client().update_model_version(decision["model_name"], version, description=text)
    if "champion" in (decision.get("aliases") or []):
        describe_champion(decision["model_name"], version)


def describe_champion(model_name: str, version: str, how: str = "") -> None:
    """The registered model's description: what the model is, which version is champion (and
    ``how`` it became so), then that version's own description."""
    text = client().get_model_version(model_name, version).description or ""
    header = f"{EXPERIMENT_NOTE}\n\nChampion: version {version}{f' ({how})' if how else ''}."
    client().update_registered_model(model_name, description=f"{header}\n\n{text}".rstrip())


# --- plots (pure matplotlib; logged with log_figures) ------------------------------------------


def _series(
    history: Iterable[Mapping[str, Any]], prefix: str
) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for record in history:
        for key, value in record.items():
            if key.startswith(prefix) and isinstance(value, (int, float)) and not math.isnan(value):
                steps, values = out.setdefault(key[len(prefix) :], ([], []))
                steps.append(int(record.get("step", len(steps))))
                values.append(float(value))
    return out


def accuracy_figure(table: Any, metric: str = "reward_accuracy"):
    """Bar chart: ``metric`` per group, the worst group in red."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    groups = [str(g) for g in table["group"]]
    values = [float(v) for v in table[metric]]
    worst = min(range(len(values)), key=values.__getitem__) if values else -1
    colors = ["tab:red" if i == worst else "tab:blue" for i in range(len(values))]
    ax.bar(groups, values, color=colors)
    ax.set_ylim(0, 1)
    ax.set_ylabel(metric)
    ax.set_title(f"Per-group {metric} on the test split (red: worst group)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def curve_figure(history: Iterable[Mapping[str, Any]], prefix: str, title: str, ylabel: str):
    """One line per series whose name starts with ``prefix`` (e.g. ``train/group_weight/``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (steps, values) in sorted(_series(list(history), prefix).items()):
        ax.plot(steps, values, label=name or prefix.rstrip("/"))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def worst_group_loss_history(history: Iterable[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Per step: the largest ``train/group_loss/<g>`` (and ``val/worst_group_loss`` when logged)."""
    from grpo import metric_names as names

    out = []
    for record in history:
        losses = [
            float(v)
            for v in names.series(record, names.TRAIN_GROUP_LOSS).values()
            if isinstance(v, (int, float)) and not math.isnan(v)
        ]
        row: dict[str, float] = {"step": record.get("step", len(out))}
        if losses:
            row["worst/train"] = max(losses)
        if isinstance(record.get(names.VAL_WORST_GROUP_LOSS), (int, float)):
            row["worst/validation"] = float(record[names.VAL_WORST_GROUP_LOSS])
        if len(row) > 1:
            out.append(row)
    return out


def training_figures(history: list[Mapping[str, Any]], table: Any, metric: str) -> dict[str, Any]:
    """The three plots of a run, keyed by artifact file."""
    from grpo.metric_names import TRAIN_GROUP_WEIGHT

    return {
        PLOT_FILES["group_accuracy"]: accuracy_figure(table, metric),
        PLOT_FILES["group_weights"]: curve_figure(
            history, TRAIN_GROUP_WEIGHT, "Group weights α over training", "weight"
        ),
        PLOT_FILES["worst_group_loss"]: curve_figure(
            worst_group_loss_history(history), "worst/", "Worst-group loss over training", "loss"
        ),
    }
