"""Summaries of a sweep: the issue's ``results.json`` shape, a Markdown table, Figure-2-style PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from grpo.io import atomic_open, write_text
from grpo.synthetic.runner import METHOD_ORDER, ScenarioResult, SweepResult

LABELS = {
    "dpo": "DPO",
    "is-dpo": "IS-DPO",
    "gr-dpo": "GR-DPO",
    "ipo": "IPO",
    "is-ipo": "IS-IPO",
    "gr-ipo": "GR-IPO",
}
COLORS = {
    "dpo": "#1f77b4",
    "is-dpo": "#2ca02c",
    "gr-dpo": "#d62728",
    "ipo": "#9467bd",
    "is-ipo": "#8c564b",
    "gr-ipo": "#ff7f0e",
}


def mean_sem(values: torch.Tensor) -> dict[str, float]:
    """Mean and standard error (sample std / √n) over the first axis; sem = 0 for one seed."""
    n = values.shape[0]
    mean = values.mean(0)
    sem = values.std(0, unbiased=True) / math.sqrt(n) if n > 1 else torch.zeros_like(mean)
    return {"mean": float(mean), "sem": float(sem)}


def summarise_scenario(res: ScenarioResult, seeds: int) -> dict[str, Any]:
    """One scenario in the issue's shape (curves are the mean over seeds, with a sem curve)."""
    methods: dict[str, Any] = {}
    for name, runs in res.methods.items():
        curve = runs.worst_val_curve
        mean = curve.mean(0)
        sem = (
            curve.std(0, unbiased=True) / math.sqrt(seeds) if seeds > 1 else torch.zeros_like(mean)
        )
        methods[name] = {
            "worst_group_val_loss": mean_sem(runs.worst_val_loss),
            "max_reward_error": mean_sem(runs.max_reward_error),
            "final_group_weights": [round(float(w), 6) for w in runs.group_weights.mean(0)],
            "worst_group_val_loss_curve": [
                [s, round(float(m), 6)] for s, m in zip(res.steps, mean, strict=False)
            ],
            "worst_group_val_loss_curve_sem": [
                [s, round(float(e), 6)] for s, e in zip(res.steps, sem, strict=False)
            ],
            "group_val_loss": [
                mean_sem(runs.val_group_loss[:, g]) for g in range(runs.val_group_loss.shape[1])
            ],
            "group_reward_error": [
                mean_sem(runs.reward_error[:, g]) for g in range(runs.reward_error.shape[1])
            ],
        }
    return {"scenario": res.name, "seeds": seeds, "iterations": res.iterations, "methods": methods}


def summarise(result: SweepResult) -> dict[str, Any]:
    """All scenarios: ``{"scenarios": {name: <issue shape>}, "config": ..., "seconds": ...}``."""
    cfg = result.config
    return {
        "scenarios": {n: summarise_scenario(r, cfg.seeds) for n, r in result.scenarios.items()},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
        "seconds": round(result.seconds, 3),
    }


def markdown_table(summary: dict[str, Any]) -> str:
    """Scenario × method table: worst-group validation loss and max reward error, mean ± sem."""
    lines = [
        "| scenario | method | worst-group val loss | max reward error | final group weights |",
        "|---|---|---|---|---|",
    ]
    for name, sc in summary["scenarios"].items():
        for m in METHOD_ORDER:
            if m not in sc["methods"]:
                continue
            r = sc["methods"][m]
            wl, re = r["worst_group_val_loss"], r["max_reward_error"]
            w = ", ".join(f"{x:.3f}" for x in r["final_group_weights"])
            lines.append(
                f"| {name} | {LABELS[m]} | {wl['mean']:.4f} ± {wl['sem']:.4f} "
                f"| {re['mean']:.4f} ± {re['sem']:.4f} | {w} |"
            )
    return "\n".join(lines) + "\n"


def plot_scenario(sc: dict[str, Any], path: str | Path) -> None:
    """Figure 2's layout for one scenario: worst-group validation loss over iterations (mean ±
    sem band) for the DPO and the IPO family, and a bar chart of the converged max reward error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHOD_ORDER if m in sc["methods"]]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.1), dpi=80)
    for ax, family in zip(axes[:2], ("dpo", "ipo"), strict=False):
        shown = [m for m in methods if m.endswith(family)]
        for m in shown:
            r = sc["methods"][m]
            steps = [p[0] for p in r["worst_group_val_loss_curve"]]
            mean = torch.tensor([p[1] for p in r["worst_group_val_loss_curve"]])
            sem = torch.tensor([p[1] for p in r["worst_group_val_loss_curve_sem"]])
            ax.plot(steps, mean, color=COLORS[m], label=LABELS[m], lw=1.4)
            ax.fill_between(steps, mean - sem, mean + sem, color=COLORS[m], alpha=0.25, lw=0)
        ax.set_title(f"worst-group val loss ({family.upper()} family)", fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        if shown:
            ax.legend(fontsize=7)
            if family == "ipo":
                ax.set_yscale("log")
        else:
            ax.set_axis_off()
    ax = axes[2]
    means = [sc["methods"][m]["max_reward_error"]["mean"] for m in methods]
    sems = [sc["methods"][m]["max_reward_error"]["sem"] for m in methods]
    ax.bar(range(len(methods)), means, yerr=sems, color=[COLORS[m] for m in methods], capsize=3)
    ax.set_xticks(range(len(methods)), [LABELS[m] for m in methods], fontsize=7, rotation=30)
    ax.set_title("converged max reward error", fontsize=9)
    ax.tick_params(labelsize=7)
    fig.suptitle(f"{sc['scenario']} ({sc['seeds']} seeds)", fontsize=10)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


def write_outputs(result: SweepResult, out_dir: str | Path) -> dict[str, Any]:
    """DIR/results.json, DIR/results.md, DIR/<scenario>.png (and DIR/results-<scenario>.json).

    ``results.json`` is the issue's shape for a single scenario; for several it is
    ``{"scenarios": {name: <issue shape>}, "config": ..., "seconds": ...}``, with each scenario
    also in ``results-<scenario>.json`` in the issue's shape.
    """
    out = Path(out_dir)
    summary = summarise(result)
    scenarios = summary["scenarios"]
    if len(scenarios) == 1:
        (only,) = scenarios.values()
        body = {**only, "config": summary["config"], "seconds": summary["seconds"]}
    else:
        body = summary
        for name, sc in scenarios.items():
            write_text(out / f"results-{name}.json", json.dumps(sc, indent=1) + "\n")
    write_text(out / "results.json", json.dumps(body, indent=1) + "\n")
    cfg = result.config
    md = (
        f"# Synthetic experiments (Figure 2)\n\n{cfg.seeds} seeds from {cfg.first_seed}, "
        f"features `{cfg.feature_type}`, labels `{cfg.labels}`, sweep time {result.seconds:.1f} s.\n"
        "Mean ± standard error over seeds; losses and errors at the last iteration.\n\n"
        + markdown_table(summary)
    )
    write_text(out / "results.md", md)
    for name, sc in scenarios.items():
        plot_scenario(sc, out / f"{name}.png")
    return summary
