"""``grpo stage NAME``: one pipeline stage on files, as ``dvc repro`` runs it (see dvc.yaml).

The stages are :mod:`flows.stages`, the same functions the Prefect flow (``grpo run``) calls;
files pass results on: outputs/data/ingest.json → outputs/data/validation.json →
outputs/train/ → outputs/evaluate/ → outputs/register/decision.json.
"""

from __future__ import annotations

import argparse
import json
import sys

from flows.commands import add_params_arguments, first_line, prepare, quiet_loggers
from flows.stages import STAGES

DESCRIPTION = """\
Run one stage of the pipeline on files: what dvc.yaml's stages call, with the same stage
functions as the Prefect flow (`grpo run`). Paths are relative to the project root.

  ingest    build + DVC-version data/pairs.parquet        -> outputs/data/ingest.json
  validate  Great Expectations suite on data/pairs.parquet -> outputs/data/validation.json
            (exit 1 on failure; the report in reports/validation/)
  train     SFT (if configured) + preference training     -> outputs/train/ (policy/, reference/,
            history.csv, result.json); always starts fresh (no resume of older checkpoints)
  evaluate  per-group metrics on the test split            -> outputs/evaluate/ (metrics.json,
            per_group.json, samples.json, evaluation.json)
  register  one MLflow run (config, data version, history, metrics, table, plots, model), then
            the worst-group gate and the registry aliases -> outputs/register/decision.json
"""

EPILOG = """\
examples:
  dvc repro                          # all stages, each only when its inputs changed
  grpo stage train --set train.max_steps=20
  grpo stage evaluate
  grpo stage register --set register.min_worst_group_accuracy=0.6
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stage",
        help="run one pipeline stage on files (what dvc.yaml calls)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=STAGES, help="the stage to run")
    add_params_arguments(parser, "")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from flows.params import load_configs, params_path
    from grpo.config import ConfigError

    root = prepare()
    try:
        cfgs = load_configs(params_path(args.params, root), args.overrides)
    except (ConfigError, ValueError) as exc:
        print(f"grpo stage: error: {exc}", file=sys.stderr)
        return 2
    quiet_loggers()
    from flows.stages import FROM_FILES
    from tasks.validate import DataValidationError, format_report

    try:
        out = FROM_FILES[args.name](cfgs, root)
    except DataValidationError as exc:  # the report names every failed expectation
        print(format_report(exc.result), file=sys.stderr)
        return 1
    except Exception as exc:  # one clear line per failure; the report files stay
        print(f"grpo stage {args.name}: error: {first_line(exc)}", file=sys.stderr)
        return 1
    print(describe(args.name, out))
    return 0


def describe(name: str, out: dict) -> str:
    """What a stage prints: the ingest and validation reports, else its result as JSON."""
    if name == "ingest":
        from flows.commands.ingest import format_summary

        return format_summary(out)
    if name == "validate":
        from tasks.validate import format_report

        return format_report(out)
    return json.dumps(out, indent=2, default=str)
