"""Scheduled retraining: serve the ``retrain`` flow as a deployment on a cron schedule.

``flow.serve`` registers the deployment with the Prefect server at ``PREFECT_API_URL`` and runs
its scheduled (and manually triggered) runs in this process until interrupted. For runs on
workers elsewhere, deploy ``prefect.yaml`` to a work pool instead (docs/pipeline.md).
"""

from __future__ import annotations

from typing import Any

DEFAULT_NAME = "grpo-retrain"


def deployment_parameters(params_file: str, overrides: list[str], root: str) -> dict[str, Any]:
    """The flow parameters every scheduled run gets (params.yaml is re-read at each run)."""
    return {"params_file": params_file, "overrides": list(overrides), "root": root}


def serve(
    cron: str,
    *,
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    root: str,
    name: str = DEFAULT_NAME,
    timezone: str = "UTC",
) -> None:
    """Serve ``retrain`` on ``cron`` (blocks; Ctrl-C stops serving, the server keeps the history)."""
    from prefect.schedules import Cron

    from flows.retrain import retrain

    retrain.serve(
        name=name,
        schedule=Cron(cron, timezone=timezone),
        parameters=deployment_parameters(params_file, overrides or [], root),
        tags=["grpo", "retrain"],
        description="Retrain on the newest data; register only if the worst group passes the gate.",
    )
