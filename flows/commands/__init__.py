"""One module per ``grpo`` subcommand. Each defines ``register(subparsers)``, adding a parser whose
``set_defaults(func=...)`` runs the command and returns an exit code. Heavy imports (torch,
Prefect, MLflow, GX) happen inside the command functions, so ``grpo --help`` stays fast."""

from __future__ import annotations

import argparse


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
