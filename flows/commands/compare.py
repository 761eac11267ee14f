"""``grpo compare``: several methods × seeds on the same data and split, side by side, with a
paired comparison of the worst group. The loop is :mod:`grpo.experiment`, shared with
``grpo reproduce goqa`` (which calls :func:`run_and_report`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.commands import add_params_arguments

DESCRIPTION = """\
Train each method with each seed on the same data and split, from one reference per seed (SFT
once, then every method from it, with the same reference log-probs), select each run's
checkpoint on the validation split only, and evaluate all on the same test pairs.

Prints, per group and method, the test reward accuracy, log-prob accuracy and loss as mean ±
standard error over seeds (with a 95% Wilson interval), the worst group (per seed the minimum
accuracy or maximum loss, then the mean), and for each IS-/GR- method against its pooled
baseline (gr-dpo vs dpo) the worst-group difference with a paired bootstrap interval over the
test pairs of every seed. It says which checkpoint each method contributes and on what
criterion: with train.keep_best, the lowest validation loss (worst group for GR-*, average for
the others; the same value drives LR cuts and early stopping), else the final step.

The data: the `data:` section of params.yaml (as `grpo ingest` would build it, with --set
applied; nothing is written to data/), or a canonical pair table given with --data. Seed s sets
train.seed and model.init_seed; the data and split are the same for every seed.

Writes into --out: results.json (methods.<m>.groups.<g>.<metric> and methods.<m>.worst_group.<metric>,
each {mean, sem, per_seed}; intervals, comparisons, checkpoints, runs), results.md (the tables),
per_group_accuracy.png, worst_group.png, group_weights.png, and runs/seed-<s>/<method>/ (a
run.json per run; a rerun with the same settings reuses the finished runs).
"""

EPILOG = """\
examples:
  grpo compare --methods dpo,gr-dpo --seeds 3 --out outputs/compare
  grpo compare --methods ipo,is-ipo,gr-ipo --seeds 5 --set train.beta=0.5 --out /tmp/ipo
  grpo compare --set train.keep_best=false --set train.early_stop_patience=0 --out /tmp/final-step
  grpo compare --data data/pairs.parquet --methods dpo,gr-dpo --seeds 3 --mlflow --out /tmp/c
"""

EXPERIMENT = "grpo-compare"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="methods × seeds on the same data: per-group table and a paired worst-group test",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--methods", default="dpo,gr-dpo", help="comma list (default: %(default)s)")
    parser.add_argument("--data", type=Path, help="a canonical pair table instead of `data:`")
    add_experiment_arguments(parser)
    add_params_arguments(parser, "train.eta_alpha=0.1")
    parser.set_defaults(func=main)


def add_experiment_arguments(
    parser: argparse.ArgumentParser, seeds: int = 3, workers: int = 1
) -> None:
    """The options ``grpo compare`` and ``grpo reproduce goqa`` share."""
    parser.add_argument("--seeds", type=int, default=seeds, help="number of seeds (default: %(default)s)")  # fmt: skip
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from here (default 0)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--workers",
        type=int,
        default=workers,
        help="processes training side by side (default %(default)s); each uses model.threads "
        "torch threads",
    )
    parser.add_argument(
        "--keep-models", action="store_true", help="keep every policy and reference on disk"
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="rerun (seed, method) runs finished earlier"
    )
    parser.add_argument(
        "--mlflow",
        action="store_true",
        help="also log one MLflow run per method and seed",
    )


def main(args: argparse.Namespace) -> int:
    from flows.commands import prepare
    from flows.params import load_params, resolve
    from grpo.config import ConfigError

    root = prepare()
    prog = "grpo compare"
    try:
        methods = split_list(args.methods)
        cfgs = resolve(load_params(args.params, args.overrides), args.params)
        pairs, source = compare_data(cfgs.data, args.data, root)
        settings = {"data": source, "model": cfgs.model, "train": cfgs.train}
        exp = experiment_config(args, methods, "groups", model_label(cfgs.model), settings)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return run_and_report(
        args, prog, lambda seed: pairs, cfgs.model, cfgs.train, exp,
        title="Method comparison", experiment=EXPERIMENT, root=root,
    )  # fmt: skip


def split_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def compare_data(data_cfg: Any, path: Path | None, root: Path) -> tuple[Any, dict[str, Any]]:
    """The pairs every seed uses: ``--data`` or the ``data:`` section built in memory."""
    from grpo.data.schema import read_pairs
    from grpo.data.sources import build_pairs

    if path is not None:
        return read_pairs(path), {"source": "file", "path": str(path)}
    cwd = Path.cwd()
    try:  # sources read relative paths (data.path, data.globalopinionqa.path) from the root
        os.chdir(root)
        pairs, _, groups = build_pairs(data_cfg)
    finally:
        os.chdir(cwd)
    return pairs, {"source": data_cfg.source, "groups": list(groups), "rows": len(pairs)}


def model_label(model_cfg: Any) -> str:
    if model_cfg.name_or_path:
        return str(model_cfg.name_or_path)
    shape = {k: v for k, v in model_cfg.config.items() if k != "model_type"}
    return f"{model_cfg.config.get('model_type', '?')} from config {shape} (random init)"


def experiment_config(
    args: argparse.Namespace, methods: list[str], group_key: str, model: str, settings: dict
):
    from grpo.config import to_dict
    from grpo.experiment import ExperimentConfig

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    plain = {k: (to_dict(v) if not isinstance(v, dict) else v) for k, v in settings.items()}
    return ExperimentConfig(
        methods=tuple(methods),
        seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)),
        group_key=group_key,
        model_name=model,
        keep_models=args.keep_models,
        resume=not args.no_resume,
        settings=plain | {"workers": args.workers},
        workers=args.workers,
    )


def run_and_report(
    args: argparse.Namespace,
    prog: str,
    data_for_seed: Callable[[int], Any],
    model_cfg: Any,
    train_cfg: Any,
    exp: Any,
    *,
    title: str,
    experiment: str,
    root: Path,
) -> int:
    """Run the experiment under a progress bar, write and print the results, log to MLflow."""
    from grpo.experiment import run_experiment
    from grpo.experiment_report import write_outputs

    try:
        with run_progress(len(exp.seeds) * len(exp.methods)) as progress:
            results = run_experiment(
                data_for_seed, model_cfg, train_cfg, exp, args.out, progress=progress
            )
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    written = write_outputs(results, args.out, title)
    print_summary(results)
    print(f"wrote {', '.join(str(p) for p in written)}")
    if args.mlflow:
        from tasks.experiment_tracking import log_experiment

        ids = log_experiment(results, args.out, root=root, experiment=experiment)
        print(f"mlflow: logged {len(ids)} runs in experiment {experiment!r}")
    return 0


class run_progress:
    """A tqdm bar over the (seed, method) runs with the time left; off when stderr is not a
    terminal or CI is set. Yields ``progress(done, label)``."""

    def __init__(self, total: int) -> None:
        self.total, self.bar = total, None

    def __enter__(self):
        from tqdm.auto import tqdm

        show = sys.stderr.isatty() and not os.environ.get("CI")
        self.bar = tqdm(total=self.total, unit="run", disable=not show, dynamic_ncols=True)
        start = time.monotonic()

        def progress(done: int, what: str) -> None:
            self.bar.n = done
            self.bar.set_description(what)
            self.bar.refresh()
            if not show:  # a log file (nohup, CI) still gets one line per run
                print(f"[{time.monotonic() - start:7.0f} s] {done}/{self.total} runs done; "
                      f"now: {what}", file=sys.stderr, flush=True)  # fmt: skip

        return progress

    def __exit__(self, *exc) -> None:
        self.bar.close()


def print_summary(results: dict[str, Any]) -> None:
    """The tables a user reads first: reward accuracy and loss per group, the paired worst-group
    comparison, and the checkpoint each method contributes."""
    from grpo.experiment_report import (
        checkpoint_lines,
        comparison_table,
        metric_table,
        selection_note,
    )

    print("Reward accuracy on the test split (mean ± sem over seeds [95% Wilson interval])")
    print("\n".join(metric_table(results, "reward_accuracy")))
    print("\nLoss on the test split (mean ± sem over seeds)")
    print("\n".join(metric_table(results, "loss")))
    print("\nWorst group, paired (method − baseline; bootstrap over test pairs and seeds)")
    print("\n".join(comparison_table(results)))
    print("\nCheckpoint each method contributes. " + selection_note(results))
    print("\n".join(checkpoint_lines(results)))
