"""Where a training step's time goes: torch.profiler over a few steps of one trainer.

Prepares the same model and GlobalOpinionQA pairs as :mod:`benchmarks.throughput`, runs the
warm-up steps unprofiled, then profiles ``--steps`` steps and prints the operators with the most
self CPU time, plus a breakdown by phase (forward, backward, optimizer, the rest) from the
profiler's own autograd/optimizer ranges.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._common import BenchSettings, prepare_workdir, set_threads
from grpo.io import write_json

EPILOG = """examples:
  python -m benchmarks.profile_step --trainer grdpo
  python -m benchmarks.profile_step --trainer trl --steps 10 --json /tmp/profile-trl.json
"""


def _trl_trainer(workdir: Path, s: BenchSettings, steps: int, out_dir: Path):
    """A TRL DPOTrainer set up exactly as in :func:`benchmarks.throughput.run_trl`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from benchmarks._common import trl_config, trl_dataset

    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    dataset = trl_dataset(workdir, tokenizer.eos_token)
    args = trl_config(s, out_dir, steps)
    return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def profile(trainer_name: str, s: BenchSettings, steps: int, rows: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    set_threads(s.threads)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        wd = Path(tmp)
        prepare_workdir(s, wd)
        if trainer_name == "trl":
            from transformers import TrainerCallback

            trainer = _trl_trainer(wd, s, s.warmup_steps + steps, wd / "trl-out")
            state: dict[str, Any] = {}

            class _Prof(TrainerCallback):
                def on_step_end(self, args, st, control, **kwargs):
                    if st.global_step == s.warmup_steps:
                        state["prof"] = torch_profile(activities=[ProfilerActivity.CPU])
                        state["prof"].__enter__()

            trainer.add_callback(_Prof())
            trainer.train()
            prof = state["prof"]
            prof.__exit__(None, None, None)
        else:
            from benchmarks import _ours

            session = _ours.open_session(wd, s, "dpo" if trainer_name == "dpo" else "gr-dpo")
            for _ in range(s.warmup_steps):
                session.step()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    session.step()
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    table = [
        {
            "op": e.key,
            "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "share": e.self_cpu_time_total / total_us,
            "calls_per_step": e.count / steps,
        }
        for e in top
    ]
    phases = {}
    for e in events:
        k = e.key
        if k.startswith("autograd::engine::evaluate_function") or k == "autograd::engine":
            continue
        if k.startswith("Optimizer.step#"):
            phases["optimizer.step"] = e.cpu_time_total / 1e3 / steps
        if k.startswith("Optimizer.zero_grad#"):
            phases["optimizer.zero_grad"] = e.cpu_time_total / 1e3 / steps
    backward = sum(
        e.self_cpu_time_total
        for e in events
        if e.key.startswith("autograd::engine::evaluate_function") or "Backward" in e.key
    )
    return {
        "trainer": trainer_name,
        "steps": steps,
        "self_cpu_ms_per_step": total_us / 1e3 / steps,
        "top_ops": table,
        "phases_ms_per_step": phases,
        "backward_self_ms_per_step_approx": backward / 1e3 / steps,
    }


def format_table(res: dict[str, Any]) -> str:
    lines = [
        f"{res['trainer']}: {res['self_cpu_ms_per_step']:.0f} ms of self CPU time per step "
        f"(over {res['steps']} steps)",
        "| op | ms/step | share | calls/step |",
        "|---|---|---|---|",
    ]
    for r in res["top_ops"]:
        lines.append(
            f"| {r['op']} | {r['self_ms_per_step']:.1f} | {100 * r['share']:.1f}% | "
            f"{r['calls_per_step']:.0f} |"
        )
    for k, v in res["phases_ms_per_step"].items():
        lines.append(f"{k}: {v:.1f} ms/step")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_step",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("--trainer", choices=("trl", "dpo", "grdpo"), default="grdpo")
    p.add_argument("--steps", type=int, default=10, help="profiled steps (after warm-up)")
    p.add_argument("--threads", type=int, default=BenchSettings().threads)
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = BenchSettings(threads=args.threads)
    res = profile(args.trainer, s, args.steps, args.rows)
    print(format_table(res))
    if args.json:
        write_json(args.json, res, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
