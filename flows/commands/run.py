"""``grpo run``: the whole retraining pipeline (the ``retrain`` Prefect flow) on params.yaml."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from flows.commands import add_params_arguments, prepare, quiet_loggers

DESCRIPTION = """\
Run the retraining pipeline as a Prefect flow:

  ingest    build the pair table (data:), write data/pairs.parquet, dvc add + push (data.dvc)
  validate  Great Expectations suite on the table (validate:); a failure stops the run here,
            before training: nothing is trained or registered, the report is kept
  train     SFT first when train.sft_epochs > 0, then the preference method (train.method)
            on a model (model:); cached on the data's content, the config and the code
  evaluate  per-group loss / reward accuracy / log-prob accuracy on the test split (evaluate:)
  register  log everything to MLflow; register the policy only if its worst group passes
            the gate (register.min_worst_group_accuracy); move `champion` if it is at least
            as good as the current champion's worst group

Defaults run offline on a CPU in a few minutes: the generated dataset and a tiny GPT-2 built
from a config. Prefect runs in local mode (PREFECT_HOME=<project>/.prefect, or the server at
PREFECT_API_URL); MLflow writes to sqlite:///<project>/mlruns/mlflow.db with artifacts under
mlruns/ (MLFLOW_TRACKING_URI overrides). Exit status: 0 when the pipeline ran (whether or not
the gate passed), 1 when a stage failed, 2 on a configuration error.
"""

EPILOG = """\
examples:
  grpo run                                          # embedded defaults
  grpo run --set train.method=dpo --json outputs/summary.json
  grpo run --set register.min_worst_group_accuracy=0.7
  grpo run --set data.source=globalopinionqa        # the paper's five countries
  grpo run --set model.name_or_path=/models/SmolLM2-135M --set train.sft_epochs=1
  MLFLOW_TRACKING_URI=http://mlflow:5000 grpo run   # a shared MLflow server
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the retraining pipeline (ingest → validate → train → evaluate → register)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_params_arguments(parser, "train.method=dpo")
    parser.add_argument("--json", metavar="PATH", help="also write the run summary as JSON")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show Prefect's task logs (INFO)"
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from flows.params import load_configs, params_path
    from grpo.config import ConfigError

    root = prepare(verbose=args.verbose)
    params_file = params_path(args.params, root)
    try:  # before Prefect and MLflow are imported: a typo fails in about a second
        load_configs(params_file, args.overrides)
    except (ConfigError, ValueError) as exc:
        print(f"grpo run: error: {exc}", file=sys.stderr)
        return 2
    from flows.retrain import StageFailed, retrain

    server = start_local_server()  # comes up while the heavy imports below run
    quiet_loggers(args.verbose)
    show_stage_lines()
    problem = tracking_unreachable(root)
    if problem:
        print(f"grpo run: error: {problem}", file=sys.stderr)
        return 1
    if server is not None:
        server.join()
    try:
        summary = retrain(params_file=str(params_file), overrides=args.overrides, root=str(root))
    except StageFailed as exc:
        report_failure(exc)
        return 1
    print(format_summary(summary))
    if args.json:
        from grpo.io import write_json

        write_json(Path(args.json), summary)
    return 0


def report_failure(exc) -> None:
    """A failed stage in one line (a failed validation: the report's findings and where it is)."""
    report = getattr(exc.cause, "result", None)
    if isinstance(report, dict) and report.get("report_path"):  # DataValidationError
        print(f"grpo run: error: stage {exc.stage} failed:\n{exc.cause}", file=sys.stderr)
        print(
            f"grpo run: nothing was trained or registered; report kept at {report['report_path']}",
            file=sys.stderr,
        )
    else:
        print(f"grpo run: error: {exc} (grpo run -v shows the traceback)", file=sys.stderr)


class StageLines(logging.Handler):
    """Writes a record's message to the current ``sys.stdout`` (looked up at each line, so a
    replaced stdout is followed; not print(), which the flow's log_prints turns into a log)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stdout.write(record.getMessage() + "\n")
        sys.stdout.flush()


def show_stage_lines() -> None:
    """The flow's one line per finished stage (logger ``grpo.stages``) on stdout, bare."""
    from flows.prefect_ui import STAGE_LOGGER

    logger = logging.getLogger(STAGE_LOGGER)
    if not any(isinstance(h, StageLines) for h in logger.handlers):
        logger.addHandler(StageLines())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def tracking_unreachable(root: Path) -> str | None:
    """A one-line reason when an MLflow server URI does not answer (None: fine or not HTTP)."""
    from tasks.tracking import tracking_uri, unreachable

    problem = unreachable(tracking_uri(root))
    return f"{problem}; check MLFLOW_TRACKING_URI" if problem else None


def start_local_server():
    """Start Prefect's temporary local server in a thread (None when a server URL is set).

    The server is a subprocess that takes ~10 s to come up; starting it before torch, MLflow,
    DVC and GX are imported overlaps the two. Join the thread before the first flow call.
    """
    import threading

    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    thread = threading.Thread(target=SubprocessASGIServer().start, daemon=True)
    thread.start()
    return thread


def format_summary(s: dict[str, Any]) -> str:
    """The human-readable run summary."""
    ev, gate, reg = s["evaluation"], s["gate"], s["registered"]
    lines = [
        f"MLflow run      {s['run_id']}  (experiment {s['experiment_id']})",
        f"data            {s['data']['source']}: {s['data']['rows']} pairs, DVC md5 {s['data']['md5']}, git {str(s['data']['git_rev'])[:10]}",
        f"training        {s['train']['method']}, {s['train']['steps']} steps"
        + (" (cached)" if s["train"]["cached"] else ""),
        "",
        f"per-group evaluation on the {ev['split']} split ({ev['pairs']} pairs):",
        *per_group_lines(ev, gate.get("confidence")),
    ]
    wg = ev["worst_group"]
    lines += [
        "",
        f"worst group     {wg['group']}: {wg['metric']} {_num(wg['value'])} (gap to the best {_num(wg['gap'])})",
        f"gate            {gate['decision']}: {gate['reason']}",
    ]
    if reg["version"]:
        lines.append(
            f"registered      {reg['model_name']} version {reg['version']}, aliases: {', '.join(reg['aliases']) or '-'}"
        )
        lines.append(f"champion        version {reg['champion']} ({reg['champion_reason']})")
        paired = (reg.get("champion_comparison") or {}).get("paired")
        if paired:
            lines.append(
                f"paired          worst-group difference {paired['difference']:+.4f}, "
                f"{paired['confidence']:.0%} bootstrap [{paired['low']:+.4f}, {paired['high']:+.4f}]; "
                f"McNemar on {paired['group']}: p = {paired['mcnemar_p']:.3g}"
            )
    else:
        lines.append(f"registered      nothing (champion stays version {reg['champion'] or '-'})")
    lines.append(f"MLflow UI       {s['mlflow_ui']}")
    return "\n".join(lines)


def _num(value: Any, fmt: str = ".4f") -> str:
    """A number, or ``nan`` for a missing/NaN one."""
    return "nan" if value is None else format(float(value), fmt)


def per_group_lines(ev: dict[str, Any], confidence: float | None) -> list[str]:
    """The per-group table: pairs, the metrics, each accuracy with its interval."""
    level = f"{confidence:.0%} CI" if confidence else "CI"
    # every cell starts with a space, so a wide number (IPO losses run to thousands) never runs
    # into its neighbour
    columns = [("pairs", 6), ("loss", 11), ("reward_accuracy", 15), (level, 14),
               ("logprob_accuracy", 16), (level, 14), ("reward_margin", 13)]  # fmt: skip
    width = max([24, *(len(str(r["group"])) + 2 for r in ev["per_group"])])
    lines = [f"  {'group':<{width}}" + "".join(f" {name:>{w}}" for name, w in columns)]

    def row(name: str, r: dict[str, Any]) -> str:
        cells = [f"{_num(r.get('pairs'), '.0f'):>6}", f"{_num(r.get('loss')):>11}"]
        for m, w in (("reward_accuracy", 15), ("logprob_accuracy", 16)):
            low, high = r.get(f"{m}_ci_low"), r.get(f"{m}_ci_high")
            interval = "-" if low is None or low != low else f"[{low:.2f}, {high:.2f}]"
            cells += [f"{_num(r.get(m)):>{w}}", f"{interval:>14}"]
        cells.append(f"{_num(r.get('reward_margin')):>13}")
        return f"  {name:<{width}}" + "".join(f" {c}" for c in cells)

    lines += [row(str(r["group"]), r) for r in ev["per_group"]]
    lines.append(row("overall", ev["overall"]))
    return lines
