"""``grpo stage NAME``: one pipeline stage on files, as ``dvc repro`` runs it (see dvc.yaml).

The stages call the same functions as the Prefect flow (``grpo run``); files pass results on:
outputs/data/ingest.json → outputs/data/validation.json → outputs/train/ →
outputs/evaluate/metrics.json → outputs/register/decision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from flows.commands import add_params_arguments

STAGES = ("ingest", "validate", "train", "evaluate", "register")
INGEST_JSON = "outputs/data/ingest.json"
VALIDATION_JSON = "outputs/data/validation.json"
TRAIN_DIR = "outputs/train"
EVALUATE_DIR = "outputs/evaluate"
DECISION_JSON = "outputs/register/decision.json"

DESCRIPTION = f"""\
Run one stage of the pipeline on files: what dvc.yaml's stages call, with the same stage
functions as the Prefect flow (`grpo run`). Paths are relative to the project root.

  ingest    build + DVC-version data/pairs.parquet        -> {INGEST_JSON}
  validate  Great Expectations suite on data/pairs.parquet -> {VALIDATION_JSON} (exit 1 on failure)
  train     SFT (if configured) + preference training     -> {TRAIN_DIR}/ (policy/, reference/,
            history.csv, result.json); always starts fresh (no resume of older checkpoints)
  evaluate  per-group metrics on the test split            -> {EVALUATE_DIR}/ (metrics.json,
            per_group.json, samples.json)
  register  one MLflow run (config, data version, history, metrics, table, plots, model), then
            the worst-group gate and the registry aliases -> {DECISION_JSON}
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
    from flows.commands.run import _params_path, find_root, prepare, quiet_loggers
    from grpo.config import ConfigError

    prepare()
    root = find_root()
    try:
        from flows.retrain import load_params, resolve

        params = load_params(_params_path(args.params, root), args.overrides)
        cfgs = resolve(params)
    except (ConfigError, ValueError) as exc:
        print(f"grpo stage: error: {exc}", file=sys.stderr)
        return 2
    quiet_loggers()
    try:
        out = STAGE_FUNCTIONS[args.name](cfgs, root)
    except Exception as exc:  # one clear line per failure; the report files stay
        from tasks.validate import DataValidationError

        if isinstance(exc, DataValidationError):
            print(str(exc), file=sys.stderr)
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"grpo stage {args.name}: error: {first}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2, default=str))
    return 0


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _pairs_path(cfgs: Any, root: Path) -> Path:
    from grpo.data.sources import PAIRS_FILE

    return root / cfgs.data.dir / PAIRS_FILE


def stage_ingest(cfgs: Any, root: Path) -> dict[str, Any]:
    from flows.commands.ingest import stable_record
    from tasks.ingest import ingest

    record = stable_record(ingest(cfgs.data, root=root), root)
    _write_json(root / INGEST_JSON, record)
    return record


def stage_validate(cfgs: Any, root: Path) -> dict[str, Any]:
    from tasks.validate import validate

    cfgs.validate.report_dir = str(root / cfgs.validate.report_dir)
    result = validate(_pairs_path(cfgs, root), cfgs.validate, cfgs.data.expected_groups())
    record = {k: result.get(k) for k in ("success", "rows", "groups", "expectations")}
    _write_json(root / VALIDATION_JSON, record)
    return record


def stage_train(cfgs: Any, root: Path) -> dict[str, Any]:
    from tasks.train import train

    result = train(_pairs_path(cfgs, root), cfgs.model, cfgs.train, root / TRAIN_DIR, resume=False)
    return {k: v for k, v in result.items() if k != "history"}


def stage_evaluate(cfgs: Any, root: Path) -> dict[str, Any]:
    from tasks.evaluate import evaluate
    from tasks.train import load_result

    trained = load_result(root / TRAIN_DIR)
    result = evaluate(
        _pairs_path(cfgs, root), trained["model_dir"], trained["reference_dir"], cfgs.evaluate,
        root / EVALUATE_DIR, beta=cfgs.train.beta, method=trained["method"], model_cfg=cfgs.model,
    )  # fmt: skip
    return {k: result[k] for k in ("metrics_path", "per_group_path", "split", "pairs")}


def stage_register(cfgs: Any, root: Path) -> dict[str, Any]:
    from tasks import tracking
    from tasks.evaluate import load_evaluation
    from tasks.ingest import git_revision
    from tasks.register import register
    from tasks.train import load_result

    trained = load_result(root / TRAIN_DIR)
    evaluation = load_evaluation(root / EVALUATE_DIR)
    ingest_path = root / INGEST_JSON
    data = json.loads(ingest_path.read_text(encoding="utf-8")) if ingest_path.exists() else {}
    uri, experiment_id = tracking.setup(root, cfgs.register.experiment)
    run_id = tracking.start_run(experiment_id, tags={"train.method": trained["method"]})
    try:
        tracking.log_params(run_id, cfgs.resolved())
        tracking.set_tags(
            run_id,
            {
                "data.md5": data.get("md5"),
                "data.sha256": data.get("sha256"),
                "data.source": data.get("source"),
                "data.rows": data.get("rows"),
                "data.git_rev": git_revision(root),
                "pipeline": "dvc",
                "train.steps": trained["steps"],
            },
        )
        tracking.log_results(run_id, trained["history"], evaluation, cfgs.register.metric)
        model_uri = None
        if cfgs.register.log_model:
            model_uri = tracking.log_model(
                run_id, trained["model_dir"], metadata={"method": trained["method"]}
            )
        decision = register(run_id, evaluation["metrics"], cfgs.register, model_uri=model_uri)
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id, "FINISHED")
    record = {"run_id": run_id, "tracking_uri": uri, **decision}
    _write_json(root / DECISION_JSON, record)
    return record


STAGE_FUNCTIONS = {
    "ingest": stage_ingest,
    "validate": stage_validate,
    "train": stage_train,
    "evaluate": stage_evaluate,
    "register": stage_register,
}
