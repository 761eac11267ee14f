"""``grpo audit``: the fairness audit of every registered model version, from MLflow alone."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
List every version of a registered model, newest first, with its per-group accuracy on the
test split, the worst group and its value, the gap between the best and the worst group, the
data version (DVC md5, git revision), the training method, the creation time and its aliases
(champion, challenger). Reads only the MLflow store (no retraining, no GPU):
sqlite:///<project>/mlruns/mlflow.db, or MLFLOW_TRACKING_URI when set.
"""

EPILOG = """\
examples:
  grpo audit                                   # the default model (register.model_name)
  grpo audit --format markdown > audit.md
  grpo audit --format json --metric logprob_accuracy
  grpo audit --model grpo-policy --plot outputs/audit.png
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="per-group accuracy of every registered model version (fairness audit)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="registered model name (default: register.model_name)")
    parser.add_argument(
        "--format", choices=("table", "markdown", "json"), default="table", help="output format"
    )
    parser.add_argument(
        "--metric",
        choices=("reward_accuracy", "logprob_accuracy"),
        help="accuracy to show (default: register.metric)",
    )
    parser.add_argument(
        "--plot", metavar="PATH", help="also save per-group accuracy by version (PNG)"
    )
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from flows.params import find_root, load_params, params_path, section
    from grpo.config import ConfigError

    root = find_root()
    try:
        cfg = section(load_params(params_path(args.params, root)), "register")
    except (ConfigError, ValueError) as exc:
        print(f"grpo audit: error: {exc}", file=sys.stderr)
        return 2
    from mlflow.exceptions import MlflowException

    from tasks import audit, tracking

    name = args.model or cfg.model_name
    tracking.setup(root, cfg.experiment)
    try:
        records = audit.audit(name, args.metric or cfg.metric)
    except MlflowException as exc:
        print(f"grpo audit: error: {name}: {exc.message}", file=sys.stderr)
        return 1
    print(audit.render(records, args.format))
    if args.plot:
        path = audit.plot(records, args.plot)
        print(f"plot: {path}", file=sys.stderr)
    return 0
