"""Training throughput and peak memory: TRL's DPOTrainer vs our DPO and GR-DPO, side by side.

Same model (a GPT-2 built from a config, saved once so every trainer loads the same initial
weights), same GlobalOpinionQA pairs (the paper's five countries and prompt), same batch size,
sequence lengths, optimizer (AdamW), learning rate, gradient clipping and precision (fp32 on CPU,
bf16 autocast on CUDA for ours; TRL's bf16 and gradient checkpointing are turned off on CPU).
Reference log-probs are precomputed once by every trainer and that pass is not timed.

Each run is its own subprocess, so peak RSS is not shared, and runs alternate
TRL → DPO → GR-DPO, repeated; throughput is the median over timed windows of all repeats.
The first training step's loss is checked against log 2 (policy = reference at step 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    BenchSettings,
    StepClock,
    machine_info,
    median,
    peak_rss_mb,
    prepare_workdir,
    set_threads,
    trl_config,
    trl_dataset,
    trl_lora,
    window_rates,
)
from grpo.io import write_json

TRAINERS = ("trl", "dpo", "grdpo")
LABELS = {"trl": "TRL DPOTrainer", "dpo": "ours, DPO", "grdpo": "ours, GR-DPO"}
IPO_LABELS = {"trl": "TRL DPOTrainer (ipo)", "dpo": "ours, IPO", "grdpo": "ours, GR-IPO"}


def label(name: str, loss: str = "dpo") -> str:
    return (LABELS if loss == "dpo" else IPO_LABELS)[name]


LOSS_TOL = 1e-4
REF_TOL = 1e-3  # summed log-probs of up to ~160 tokens, fp32, two code paths

EPILOG = """examples:
  python -m benchmarks.throughput                 # the full comparison (~7 min on an idle machine)
  python -m benchmarks.throughput --json outputs/bench/throughput.json
  python -m benchmarks.throughput --steps 16 --windows 2 --repeats 1 --trainers dpo,grdpo
  python -m benchmarks.throughput --layers 2 --dim 64 --vocab 512 --max-pairs 64 --steps 4 \\
      --windows 2 --repeats 1                                   # a smoke run (~30 s)
  python -m benchmarks.throughput --model models/SmolLM2-135M-Instruct --loss ipo --beta 0.01 \\
      --max-pairs 96 --warmup 2 --steps 8 --windows 2 --repeats 2 [--lora]   # the real model
"""


# ----------------------------------------------------------------------------- workers


def run_trl(workdir: Path, s: BenchSettings) -> dict[str, Any]:
    """Train with TRL's DPOTrainer (sigmoid loss, precomputed reference log-probs)."""
    set_threads(s.threads)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOTrainer

    rss_after_import = peak_rss_mb()
    torch.manual_seed(s.seed)
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    dataset = trl_dataset(workdir, tokenizer.eos_token)
    clock = StepClock()
    first_loss: list[float] = []

    class _Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    class _FirstLoss(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not first_loss:  # one .item() on the first call only
                first_loss.append(float((out[0] if return_outputs else out).detach()))
            return out

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out_dir:
        args = trl_config(s, out_dir, s.total_steps)
        t0 = time.perf_counter()
        trainer = _FirstLoss(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[_Clock()],
            peft_config=trl_lora(s),
        )
        setup_s = time.perf_counter() - t0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        clock.begin()
        trainer.train()
        ref = trainer.train_dataset  # precomputed in pair order (no shuffling there)
        reference = [list(ref["ref_chosen_logps"]), list(ref["ref_rejected_logps"])]
    result = _result(
        clock, s, first_loss[0] if first_loss else float("nan"), setup_s, rss_after_import
    )
    result["reference_logps"] = reference
    return result


def run_ours(workdir: Path, s: BenchSettings, method: str) -> dict[str, Any]:
    """Train with our trainer (``method`` = "dpo" or "gr-dpo"), reference log-probs precomputed."""
    set_threads(s.threads)
    import torch

    import grpo.trainer  # noqa: F401  (imports counted before the baseline, as for TRL)
    from benchmarks import _ours

    rss_after_import = peak_rss_mb()
    clock = StepClock()
    t0 = time.perf_counter()
    session = _ours.open_session(workdir, s, method)
    setup_s = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    first_loss = float("nan")
    clock.begin()
    for i in range(s.total_steps):
        out = session.step()
        if i == 0:
            first_loss = out["mean_pair_loss"]
        clock.tick()
    result = _result(clock, s, first_loss, setup_s, rss_after_import)
    result["reference_s"] = session.reference_s
    rc, rr = session.trainer.reference_logps
    result["reference_logps"] = [rc.tolist(), rr.tolist()]
    return result


def _result(
    clock: StepClock, s: BenchSettings, first_loss: float, setup_s: float, rss0: float
) -> dict[str, Any]:
    import torch

    rates = window_rates(clock.stamps, clock.start, s.warmup_steps, s.window_steps, s.batch_size)
    cpu_rates = window_rates(
        clock.cpu_stamps, clock.cpu_start, s.warmup_steps, s.window_steps, s.batch_size
    )
    out = {
        "steps": len(clock.stamps),
        "window_pairs_per_s": rates,
        "pairs_per_s": median(rates),
        "window_pairs_per_cpu_s": cpu_rates,
        "pairs_per_cpu_s": median(cpu_rates),
        "first_step_loss": first_loss,
        "setup_s": setup_s,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": rss0,
        "loadavg_1m_at_end": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def worker_main(name: str, workdir: Path, out: Path) -> int:
    settings = BenchSettings.from_json(json.loads((workdir / "settings.json").read_text()))
    if name == "trl":
        result = run_trl(workdir, settings)
    elif name in ("dpo", "grdpo"):
        # "dpo" is our pooled method, "grdpo" the robust one, of the configured loss
        result = run_ours(
            workdir, settings, settings.loss if name == "dpo" else f"gr-{settings.loss}"
        )
    else:
        raise ValueError(f"unknown trainer {name!r}; expected one of {TRAINERS}")
    write_json(out, result, sort_keys=True)
    return 0


# ----------------------------------------------------------------------------- driver


def spawn(name: str, workdir: Path, threads: int, timeout: float) -> dict[str, Any]:
    """Run one trainer in a fresh interpreter; its peak RSS is its own."""
    out = workdir / f"result-{name}-{time.monotonic_ns()}.json"
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TQDM_DISABLE="1",
        HF_DATASETS_CACHE=str(workdir / "hf-cache"),
        PYTHONWARNINGS="ignore",
    )
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--worker", name]
    cmd += ["--workdir", str(workdir), "--worker-out", str(out)]
    proc = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[1],
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise RuntimeError(f"benchmark worker {name!r} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def summarise(
    runs: dict[str, list[dict[str, Any]]], s: BenchSettings, facts: dict[str, Any]
) -> dict[str, Any]:
    """Medians over every timed window of every repeat, ratios, and the log 2 check."""
    import torch

    summary: dict[str, Any] = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": machine_info(),
        "settings": s.to_json(),
        "data": facts,
        "runs": runs,
    }
    for name, rs in runs.items():
        windows = [r for run in rs for r in run["window_pairs_per_s"]]
        summary[f"{name}_pairs_per_s"] = median(windows)
        cpu_windows = [r for run in rs for r in run.get("window_pairs_per_cpu_s", [])]
        summary[f"{name}_pairs_per_cpu_s"] = median(cpu_windows)
        summary[f"{name}_peak_mb"] = median([run["peak_rss_mb"] for run in rs])
        summary[f"{name}_rss_after_imports_mb"] = median(
            [run["rss_after_imports_mb"] for run in rs]
        )
        summary[f"{name}_first_step_loss"] = rs[0]["first_step_loss"]
        summary[f"{name}_setup_s"] = median([run["setup_s"] for run in rs])
        if "peak_cuda_allocated_mb" in rs[0]:
            summary[f"{name}_peak_cuda_mb"] = median([r["peak_cuda_allocated_mb"] for r in rs])
    summary["reference_logps_max_abs_diff"] = reference_agreement(runs)
    for rs in runs.values():
        for run in rs:
            run.pop("reference_logps", None)
    losses = {n: summary[f"{n}_first_step_loss"] for n in runs}
    expected = s.first_step_loss  # log 2, or 1/(4β²) for IPO: tolerance relative to it
    summary["first_step_losses_agree"] = all(
        math.isfinite(v) and abs(v - expected) < LOSS_TOL * max(1.0, expected)
        for v in losses.values()
    )
    diff = summary["reference_logps_max_abs_diff"]
    summary["same_reference_logps"] = diff is None or diff < REF_TOL
    ratios: dict[str, float] = {}
    if "trl" in runs and "grdpo" in runs:
        ratios["grdpo_over_trl_speed_cpu_time"] = (
            summary["grdpo_pairs_per_cpu_s"] / summary["trl_pairs_per_cpu_s"]
        )
        ratios["grdpo_over_trl_speed"] = summary["grdpo_pairs_per_s"] / summary["trl_pairs_per_s"]
        ratios["grdpo_over_trl_peak_mb"] = summary["grdpo_peak_mb"] / summary["trl_peak_mb"]
    if "trl" in runs and "dpo" in runs:
        ratios["dpo_over_trl_speed_cpu_time"] = (
            summary["dpo_pairs_per_cpu_s"] / summary["trl_pairs_per_cpu_s"]
        )
        ratios["dpo_over_trl_speed"] = summary["dpo_pairs_per_s"] / summary["trl_pairs_per_s"]
        ratios["dpo_over_trl_peak_mb"] = summary["dpo_peak_mb"] / summary["trl_peak_mb"]
    if "dpo" in runs and "grdpo" in runs:
        # time per pair of GR-DPO relative to DPO: > 1 means GR-DPO is slower
        ratios["grdpo_over_dpo_time_per_pair"] = (
            summary["dpo_pairs_per_s"] / summary["grdpo_pairs_per_s"]
        )
        # the same ratio, paired: each repeat's two runs were adjacent in time
        paired = [
            median(d["window_pairs_per_s"]) / median(g["window_pairs_per_s"])
            for d, g in zip(runs["dpo"], runs["grdpo"], strict=False)
        ]
        ratios["grdpo_over_dpo_time_per_pair_paired_median"] = median(paired)
        ratios["grdpo_over_dpo_time_per_pair_cpu_time"] = (
            summary["dpo_pairs_per_cpu_s"] / summary["grdpo_pairs_per_cpu_s"]
        )
    summary["ratios"] = ratios
    summary["targets"] = _targets(ratios)
    return summary


def reference_agreement(runs: dict[str, list[dict[str, Any]]]) -> float | None:
    """Max |Δ| between the trainers' precomputed reference log-probs of the same pairs.

    Near 0 means every trainer scores the same tokens of the same pairs with the same model.
    """
    refs = [
        torch_free_pairs(run["reference_logps"])
        for rs in runs.values()
        for run in rs[:1]
        if "reference_logps" in run
    ]
    if len(refs) < 2:
        return None
    first = refs[0]
    return max(abs(a - b) for other in refs[1:] for a, b in zip(first, other, strict=True))


def torch_free_pairs(value: list[list[float]]) -> list[float]:
    chosen, rejected = value
    return [float(x) for x in chosen] + [float(x) for x in rejected]


def _targets(r: dict[str, float]) -> dict[str, Any]:
    out = {}
    if "grdpo_over_trl_speed" in r:
        out["grdpo_speed_ge_2x_trl"] = r["grdpo_over_trl_speed"] >= 2.0
        out["grdpo_speed_ge_2x_trl_cpu_time"] = r["grdpo_over_trl_speed_cpu_time"] >= 2.0
        out["grdpo_peak_le_0.8x_trl"] = r["grdpo_over_trl_peak_mb"] <= 0.8
    if "grdpo_over_dpo_time_per_pair" in r:
        out["grdpo_time_per_pair_le_1.03x_dpo"] = r["grdpo_over_dpo_time_per_pair"] <= 1.03
        out["grdpo_time_per_pair_le_1.03x_dpo_cpu_time"] = (
            r["grdpo_over_dpo_time_per_pair_cpu_time"] <= 1.03
        )
    return out


def format_table(summary: dict[str, Any]) -> str:
    names = [n for n in TRAINERS if f"{n}_pairs_per_s" in summary]
    settings = BenchSettings.from_json(summary["settings"])
    kind, expected = settings.loss, settings.first_step_loss
    base = "trl" if "trl" in names else None
    lines = [
        "| trainer | pairs/s (wall) | × TRL | pairs per CPU-s | × TRL | peak RSS (MB) | × TRL "
        "| first-step loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        sp, mb = summary[f"{n}_pairs_per_s"], summary[f"{n}_peak_mb"]
        cp = summary[f"{n}_pairs_per_cpu_s"]
        xs = f"{sp / summary['trl_pairs_per_s']:.2f}" if base else "-"
        xc = f"{cp / summary['trl_pairs_per_cpu_s']:.2f}" if base else "-"
        xm = f"{mb / summary['trl_peak_mb']:.2f}" if base else "-"
        loss = summary[f"{n}_first_step_loss"]
        lines.append(
            f"| {label(n, kind)} | {sp:.1f} | {xs} | {cp:.1f} | {xc} | {mb:.0f} | {xm} | {loss:.6f} |"
        )
    r = summary["ratios"]
    if "grdpo_over_dpo_time_per_pair" in r:
        lines.append("")
        lines.append(
            f"{label('grdpo', kind)[6:]} time per pair / {label('dpo', kind)[6:]}: "
            f"{r['grdpo_over_dpo_time_per_pair']:.3f} wall (pooled windows), "
            f"{r['grdpo_over_dpo_time_per_pair_paired_median']:.3f} wall (median of adjacent "
            f"runs), {r['grdpo_over_dpo_time_per_pair_cpu_time']:.3f} CPU time"
        )
    lines.append(
        f"first-step losses = the loss at zero margin = {expected:.6f} "
        f"(±{LOSS_TOL * max(1.0, expected):g}): "
        f"{'yes' if summary['first_step_losses_agree'] else 'NO'}"
    )
    diff = summary.get("reference_logps_max_abs_diff")
    if diff is not None:
        lines.append(f"precomputed reference log-probs, max |Δ| between trainers: {diff:.2e}")
    return "\n".join(lines)


def benchmark(
    settings: BenchSettings,
    trainers: tuple[str, ...] = TRAINERS,
    repeats: int = 3,
    workdir: str | Path | None = None,
    timeout: float = 900.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare the shared model/data, run the trainers alternating, return the summary dict."""
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        wd = Path(workdir) if workdir else Path(tmp)
        facts = prepare_workdir(settings, wd)
        write_json(wd / "settings.json", settings.to_json(), sort_keys=True)
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in trainers}
        for rep in range(repeats):
            # rotate the order so no trainer always runs first (or right after another one)
            order = trainers[rep % len(trainers) :] + trainers[: rep % len(trainers)]
            for name in order:
                t0 = time.perf_counter()
                res = spawn(name, wd, settings.threads, timeout)
                runs[name].append(res)
                if progress:
                    print(
                        f"[{rep + 1}/{repeats}] {label(name, settings.loss):<15} {res['pairs_per_s']:7.2f} pairs/s"
                        f"  peak {res['peak_rss_mb']:6.0f} MB  first loss {res['first_step_loss']:.6f}"
                        f"  ({time.perf_counter() - t0:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
        return summarise(runs, settings, facts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    d = BenchSettings()
    p.add_argument("--json", type=Path, help="write the summary as JSON here")
    p.add_argument("--trainers", default=",".join(TRAINERS), help="comma list of trl,dpo,grdpo")
    p.add_argument("--repeats", type=int, default=3, help="runs per trainer, alternating")
    p.add_argument(
        "--steps", type=int, default=d.window_steps * d.windows, help="timed steps per run"
    )
    p.add_argument("--windows", type=int, default=d.windows, help="timed windows per run")
    p.add_argument("--warmup", type=int, default=d.warmup_steps, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads, every trainer")
    p.add_argument("--layers", type=int, default=d.n_layer)
    p.add_argument("--dim", type=int, default=d.n_embd)
    p.add_argument("--heads", type=int, default=d.n_head)
    p.add_argument("--vocab", type=int, default=d.vocab_size)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--max-pairs", type=int, default=0, help="0 = every pair of the 5 countries")
    p.add_argument("--goqa-dir", default=d.goqa_dir)
    p.add_argument("--optim", default=d.optim, help="AdamW implementation, both sides")
    p.add_argument(
        "--model",
        default="",
        help="a saved model folder (e.g. models/SmolLM2-135M-Instruct, from `make models`) "
        "instead of the GPT-2 built from --layers/--dim/--heads/--vocab; its own tokenizer",
    )
    p.add_argument("--loss", choices=("dpo", "ipo"), default=d.loss,
                   help="dpo: TRL sigmoid vs our DPO/GR-DPO; ipo: TRL ipo vs our IPO/GR-IPO")  # fmt: skip
    p.add_argument("--lora", action="store_true", help="LoRA adapters on both sides")
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--beta", type=float, default=d.beta)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.workdir, args.worker_out)
    trainers = tuple(t.strip() for t in args.trainers.split(",") if t.strip())
    bad = sorted(set(trainers) - set(TRAINERS))
    if bad or not trainers:
        print(f"error: --trainers: unknown {bad}; expected some of {TRAINERS}", file=sys.stderr)
        return 2
    if args.steps % args.windows:
        print(f"error: --steps {args.steps} is not a multiple of --windows {args.windows}")
        return 2
    try:
        settings = BenchSettings(
            n_layer=args.layers,
            n_embd=args.dim,
            n_head=args.heads,
            vocab_size=args.vocab,
            goqa_dir=args.goqa_dir,
            max_pairs=args.max_pairs,
            max_length=args.max_length,
            batch_size=args.batch_size,
            warmup_steps=args.warmup,
            window_steps=args.steps // args.windows,
            windows=args.windows,
            threads=args.threads,
            optim=args.optim,
            model=args.model,
            loss=args.loss,
            lora=args.lora,
            lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            beta=args.beta,
            lr=args.lr,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = benchmark(settings, trainers, repeats=args.repeats)
    print(format_table(summary))
    if args.json:
        write_json(args.json, summary, sort_keys=True)
        print(f"wrote {args.json}")
    return 0 if summary["first_step_losses_agree"] and summary["same_reference_logps"] else 1


if __name__ == "__main__":
    sys.exit(main())
