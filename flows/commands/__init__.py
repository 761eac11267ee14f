"""One module per ``grpo`` subcommand. Each defines ``register(subparsers)``, adding a parser whose
``set_defaults(func=...)`` runs the command and returns an exit code. Heavy imports (torch,
Prefect, MLflow, GX) happen inside the command functions, so ``grpo --help`` stays fast; only
``grpo run`` and ``grpo serve`` (which orchestrate) ever import Prefect."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_params_arguments(parser: argparse.ArgumentParser, example: str = "") -> None:
    """``--params FILE`` and repeatable ``--set SECTION.KEY=VALUE``, shared by the commands."""
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a params value (repeatable)" + (f", e.g. {example}" if example else ""),
    )


def prepare(verbose: bool = False) -> Path:
    """The project root, with Prefect's local mode and quiet logging set before anything loads
    (harmless for commands that never import Prefect)."""
    from flows.params import find_root

    root = find_root()
    for key, value in {
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_LEVEL": "INFO" if verbose else "WARNING",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        # an MLflow server that stops answering fails a task in seconds, not minutes
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }.items():
        os.environ.setdefault(key, value)
    return root


def quiet_loggers(verbose: bool = False) -> None:
    """Libraries' INFO chatter off (after prefect, when used, is imported: it configures logging)."""
    import logging

    if not verbose:
        # these set their own loggers to INFO when imported: import them first, then quiet them
        import dvc  # noqa: F401
        import great_expectations  # noqa: F401
        import mlflow  # noqa: F401

        noisy = ("mlflow", "dvc", "great_expectations", "alembic", "httpx", "urllib3")
        for name in (*noisy, "great_expectations.data_context.types.base"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # the runs' logs (stage lines at INFO, a failure's traceback) go to the Prefect API and
        # its UI, not the terminal: `grpo run` prints a line per stage and a failure in one
        # line; -v shows them all
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).setLevel(logging.INFO)
            logging.getLogger(name).propagate = False


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
