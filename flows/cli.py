"""The ``grpo`` command line. ``grpo --help`` lists the subcommands; ``grpo CMD --help`` teaches each."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Subcommand modules under flows/commands/, in the order ``--help`` lists them.
COMMANDS = (
    "run",
    "train",
    "evaluate",
    "ingest",
    "validate",
    "stage",
    "compare",
    "reproduce",
    "audit",
    "promote",
    "serve",
)

DESCRIPTION = """\
Group Robust Preference Optimization (GR-DPO / GR-IPO, Ramesh et al. 2024, arXiv 2405.20304):
preference training that minimises the loss of the worst group of users, in a Prefect + MLflow +
DVC + Great Expectations pipeline. (Not DeepSeek's Group *Relative* Policy Optimization.)
"""

EPILOG = """\
examples:
  grpo run                                   # the whole pipeline on embedded defaults
  grpo run --set train.method=dpo --json summary.json
  grpo validate data/pairs.parquet --groups a,b,c
  grpo compare --methods dpo,gr-dpo --seeds 3 --out outputs/compare
  grpo reproduce synthetic --scenario all --out outputs/synthetic
  grpo reproduce goqa --out outputs/goqa      # after `make models`
  grpo audit --format markdown
  grpo COMMAND --help                        # more on each command
"""


def _quiet_defaults() -> None:
    """Telemetry off and offline-friendly defaults; the user's environment wins."""
    for key, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"flows.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"flows.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
