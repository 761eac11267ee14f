"""``grpo promote NAME VERSION``: move the ``champion`` alias by hand."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Point the `champion` alias of a registered model at VERSION (e.g. to roll back). Unless --force,
the version's logged figures are re-checked against the gate as `grpo run` applies it: every
group evaluated on at least register.min_group_pairs pairs, and every group's lower confidence
bound (Wilson, level register.confidence) on register.metric at least
register.min_worst_group_accuracy (or --threshold). The decision is recorded as tags on the
version (champion.decision, champion.reason).
"""

EPILOG = """\
examples:
  grpo audit                                   # pick a version
  grpo promote grpo-policy 3
  grpo promote grpo-policy 2 --threshold 0.6
  grpo promote grpo-policy 1 --force           # roll back even if version 1 fails the gate
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "promote",
        help="move the champion alias to a model version (gate re-checked unless --force)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", help="registered model name")
    parser.add_argument("version", help="model version number")
    parser.add_argument("--force", action="store_true", help="promote even if the gate fails")
    parser.add_argument("--threshold", type=float, help="gate threshold (default: params.yaml)")
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from flows.params import find_root, load_params, params_path, section
    from grpo.config import ConfigError

    root = find_root()
    try:
        overrides = []
        if args.threshold is not None:
            overrides.append(f"register.min_worst_group_accuracy={args.threshold}")
        cfg = section(load_params(params_path(args.params, root), overrides), "register")
    except (ConfigError, ValueError) as exc:
        print(f"grpo promote: error: {exc}", file=sys.stderr)
        return 2
    from mlflow.exceptions import MlflowException

    from flows.stages import registry_guard
    from tasks import tracking
    from tasks.register import GateRejected, promote

    tracking.setup(root, cfg.experiment)
    try:  # the locks `grpo run` registers under
        with registry_guard(root):
            out = promote(args.name, args.version, cfg, force=args.force)
    except GateRejected as exc:
        print(f"grpo promote: refused: {exc}", file=sys.stderr)
        return 1
    except MlflowException as exc:
        print(f"grpo promote: error: {exc.message}", file=sys.stderr)
        return 1
    print(
        f"{out['model_name']} version {out['version']} is now champion "
        f"(was {out['previous_champion'] or '-'}); gate: {out['gate_reason']}"
    )
    return 0
