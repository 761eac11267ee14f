"""What a ``retrain`` flow run shows in Prefect: its name and tags, a log line per stage, artifacts.

- Name: what ran, ``<method>-<data version>-s<seed>`` (the MLflow run's name too), set when the
  flow starts and again once the data version is known; tags ``method:<m>``, ``source:<s>``,
  ``model:<registered model>``, so the UI filters runs by them.
- Logs: each stage's start and its result line, through the run logger at INFO (the UI's log
  view); the result lines also go to the plain logger :data:`STAGE_LOGGER`, which ``grpo run``
  prints on the terminal (``ingest     1600 pairs, ... (2.1 s)``).
- Artifacts (keys fixed per registered model, so the UI keeps their history across runs): a
  table of the per-group evaluation, a markdown note of the gate decision and its reason, and
  links to the MLflow run and the registered version.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STAGE_LOGGER = "grpo.stages"
TABLE_COLUMNS = ("group", "pairs", "loss", "reward_accuracy", "logprob_accuracy", "reward_margin")


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow (or task) run's logger; a plain one outside a run (``retrain.fn`` in a test)."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("grpo.flow")


class StageClock:
    """The stage in progress (what a failure is blamed on) and its elapsed time."""

    def __init__(self) -> None:
        self.stage, self.started = "start", time.perf_counter()

    def start(self, stage: str) -> None:
        self.stage, self.started = stage, time.perf_counter()
        run_logger().info("%s: started", stage)

    def done(self, produced: str) -> str:
        """Log ``<stage> <what it produced> (<seconds> s)`` to the run and the terminal."""
        line = f"{self.stage:<10} {produced} ({time.perf_counter() - self.started:.1f} s)"
        run_logger().info(line)
        logging.getLogger(STAGE_LOGGER).info(line)
        return line


# --- one line per finished stage: what it produced ----------------------------------------------


def ingest_line(data: dict[str, Any]) -> str:
    version = f"DVC md5 {str(data['md5'])[:8]}" if data.get("md5") else "not DVC-tracked"
    split = data.get("split_rule") or "splits as built"
    groups = ", ".join(map(str, data.get("groups") or []))
    return f"{data['rows']} pairs of {groups} ({data['source']}, {version}); split {split}"


def validate_line(result: dict[str, Any]) -> str:
    return f"{result['expectations']} expectations passed on {result['rows']} pairs"


def train_line(trained: dict[str, Any], run_id: str, root: Path) -> str:
    """How the model came about: trained now, resumed, or reused (Prefect's cache, or a
    finished run folder of the same inputs), and where it is."""
    streamed, steps = trained.get("streamed_steps") or [], trained["steps"]
    if trained.get("logged_to") != run_id:
        how = "reused from Prefect's cache"
    elif not streamed:
        how = "reused: its run folder held a finished training"
    elif len(streamed) < steps:
        how = f"resumed: {len(streamed)} trained now"
    else:
        how = "trained now"
    where = os.path.relpath(trained["model_dir"], root)
    return f"{trained['method']}: {steps} steps, {how}; policy in {where}"


def evaluate_line(evaluation: dict[str, Any]) -> str:
    worst = evaluation["worst_group"]
    value = worst["value"] if isinstance(worst["value"], float) else float("nan")
    return (
        f"{evaluation['pairs']} {evaluation['split']} pairs; worst group {worst['group']}: "
        f"{worst['metric']} {value:.4f}"
    )


def register_line(decision: dict[str, Any]) -> str:
    if not decision.get("version"):
        return f"{decision['decision']}: {decision['reason']}; nothing registered"
    aliases = ", ".join(decision.get("aliases") or []) or "-"
    return (
        f"{decision['model_name']} version {decision['version']} ({aliases}): {decision['reason']}"
    )


# --- name, tags and artifacts ----------------------------------------------------------------


def flow_run_tags(method: str, source: str, model_name: str) -> list[str]:
    return [f"method:{method}", f"source:{source}", f"model:{model_name}"]


def label_flow_run(name: str, tags: Iterable[str] = ()) -> None:
    """Rename the current flow run and add ``tags`` (nothing outside a flow run)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    run = context.flow_run
    merged = sorted({*run.tags, *tags})
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, name=name, tags=merged)
    run.name, run.tags = name, merged  # the run's log lines use the new name


def artifact_key(model_name: str, what: str) -> str:
    """A fixed artifact key (lowercase letters, digits and dashes: Prefect's rule)."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{model_name}-{what}".lower()).strip("-")


def evaluation_table(per_group: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-group rows with the table's columns, numbers rounded to 4 places."""

    def cell(value: Any) -> Any:
        return round(value, 4) if isinstance(value, float) else value

    return [{c: cell(row.get(c)) for c in TABLE_COLUMNS} for row in per_group]


def gate_markdown(summary: dict[str, Any]) -> str:
    """The gate decision, its reason, and what the registry did."""
    gate, reg, ev = summary["gate"], summary["registered"], summary["evaluation"]
    worst = ev["worst_group"]
    lines = [
        f"# Gate: {gate['decision']}",
        f"**Reason:** {gate['reason']}",
        f"**Worst group:** {worst['group']} ({worst['metric']} {worst['value']}) on the "
        f"{ev['split']} split, {ev['pairs']} pairs",
        f"**Run:** {summary['run_name']} (MLflow run `{summary['run_id']}`)",
    ]
    if reg["version"]:
        lines.append(
            f"**Registered:** {reg['model_name']} version {reg['version']}, aliases "
            f"{', '.join(reg['aliases']) or '-'}; champion: version {reg['champion']} "
            f"({reg['champion_reason']})"
        )
    else:
        lines.append(f"**Registered:** nothing; champion stays version {reg['champion'] or '-'}")
    return "\n\n".join(lines)


def publish_artifacts(summary: dict[str, Any]) -> None:
    """The table, markdown and link artifacts of a finished run (see the module docstring)."""
    from prefect.artifacts import (
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    model, links = summary["registered"]["model_name"], summary["links"]
    ev = summary["evaluation"]
    create_table_artifact(
        table=evaluation_table(ev["per_group"]),
        key=artifact_key(model, "per-group-evaluation"),
        description=f"{summary['run_name']}: per-group evaluation on the {ev['split']} split",
    )
    create_markdown_artifact(
        markdown=gate_markdown(summary),
        key=artifact_key(model, "gate-decision"),
        description=f"{summary['run_name']}: {summary['gate']['decision']}",
    )
    create_link_artifact(
        link=links["mlflow_run"],
        link_text=f"MLflow run {summary['run_name']}",
        key=artifact_key(model, "mlflow-run"),
    )
    if links.get("model_version"):
        create_link_artifact(
            link=links["model_version"],
            link_text=f"{model} version {summary['registered']['version']}",
            key=artifact_key(model, "model-version"),
        )
