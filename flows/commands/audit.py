"""``grpo audit``: the fairness audit of every registered model version, from MLflow alone."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
List every version of a registered model, newest first, with its per-group accuracy (and the
group's number of pairs and confidence interval), the worst group and its value, the gap between
the best and the worst group, the data version (DVC md5, git revision), the training method, the
creation time and its aliases (champion, challenger).

Without --reevaluate the figures are the ones logged when each version was trained, each on the
test split of its own data: versions trained on another data version than the newest one are
marked `*`, as their figures do not compare. Reads only the MLflow store (no model loaded).

With --reevaluate every version (or those in --versions) is scored again on one and the same
pairs: the current ingested data's test split by default (the evaluate stage's choice of pairs,
evaluate.max_pairs per group), or --data/--split. Each version needs its reference model in the
registry (logged since the gate compares versions on the same pairs); older versions are listed
as not re-evaluated. The audit is recorded as an MLflow run in the experiment `grpo-audit`
(table and plot as artifacts). MLflow store: sqlite:///<project>/mlruns/mlflow.db, or
MLFLOW_TRACKING_URI when set.
"""

EPILOG = """\
examples:
  grpo audit                                   # the default model (register.model_name)
  grpo audit --format markdown > audit.md
  grpo audit --format json --metric logprob_accuracy
  grpo audit --model grpo-policy --plot outputs/audit.png
  grpo audit --reevaluate                      # every version on today's test split
  grpo audit --reevaluate --versions 3,4 --data new_pairs.parquet --plot outputs/audit.png
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
        "--reevaluate",
        action="store_true",
        help="score every version again on the same pairs (loads the models)",
    )
    parser.add_argument(
        "--data", metavar="PATH", help="pair table to re-evaluate on (default: the ingested one)"
    )
    parser.add_argument(
        "--split",
        choices=("train", "validation", "test"),
        default="test",
        help="split to re-evaluate on (default: %(default)s)",
    )
    parser.add_argument("--versions", metavar="N,M,...", help="only these versions (default: all)")
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from flows.params import find_root, load_configs, load_params, params_path, section
    from grpo.config import ConfigError

    root = find_root()
    if (args.data or args.versions) and not args.reevaluate:
        print("grpo audit: error: --data and --versions need --reevaluate", file=sys.stderr)
        return 2
    try:  # every section only when models are loaded: the plain audit never imports torch
        path = params_path(args.params, root)
        cfgs = load_configs(path) if args.reevaluate else None
        cfg = cfgs.register if cfgs else section(load_params(path), "register")
    except (ConfigError, ValueError) as exc:
        print(f"grpo audit: error: {exc}", file=sys.stderr)
        return 2
    from mlflow.exceptions import MlflowException

    from grpo.data.schema import DataFormatError
    from tasks import audit, tracking

    name = args.model or cfg.model_name
    metric = args.metric or cfg.metric
    tracking.setup(root, cfg.experiment)
    try:
        if cfgs is not None:
            records = reevaluated(args, cfgs, root, name, metric)
        else:
            records = audit.audit(name, metric, cfg.confidence)
    except MlflowException as exc:
        print(f"grpo audit: error: {name}: {exc.message}", file=sys.stderr)
        return 1
    except (FileNotFoundError, DataFormatError, ValueError) as exc:
        print(f"grpo audit: error: {exc}", file=sys.stderr)
        return 1
    print(audit.render(records, args.format))
    if args.plot:
        path = audit.plot(records, args.plot)
        print(f"plot: {path}", file=sys.stderr)
    if args.reevaluate:
        run_id = audit.log_audit(root, name, records)
        print(f"logged: MLflow run {run_id} (experiment {audit.AUDIT_EXPERIMENT})", file=sys.stderr)
    return 0


def reevaluated(
    args: argparse.Namespace, cfgs: Any, root: Path, name: str, metric: str
) -> list[dict[str, Any]]:
    """Every (listed) version scored on the chosen pairs (``tasks.audit.reevaluate``)."""
    from grpo.data.sources import PAIRS_FILE
    from tasks import audit

    if args.data:
        path = Path(args.data)
        md5 = audit.file_md5(path) if path.exists() else None
        groups = None
    else:  # the ingested table; its DVC md5 is what the runs' data.md5 tags hold
        path = root / cfgs.data.dir / PAIRS_FILE
        md5 = data_version(root) or (audit.file_md5(path) if path.exists() else None)
        groups = cfgs.data.expected_groups()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no pair table here (run `grpo ingest`, or give --data)")
    frame = audit.audit_pairs(path, args.split, cfgs.evaluate.max_pairs, cfgs.evaluate.seed)
    versions = [v.strip() for v in args.versions.split(",") if v.strip()] if args.versions else None
    return audit.reevaluate(
        name, frame, {"md5": md5, "split": args.split, "pairs": len(frame)},
        metric=metric, confidence=cfgs.register.confidence, versions=versions,
        model_cfg=cfgs.model, batch_size=cfgs.evaluate.batch_size, groups=groups,
    )  # fmt: skip


def data_version(root: Path) -> str | None:
    """The DVC md5 of the ingested data (``outputs/data/ingest.json``), None when unknown."""
    from flows.stages import INGEST_JSON
    from grpo.io import read_json

    path = root / INGEST_JSON
    return read_json(path).get("md5") if path.exists() else None
