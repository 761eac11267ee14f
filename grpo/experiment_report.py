"""What ``grpo compare`` and ``grpo reproduce goqa`` write: ``results.json``, ``results.md`` (the
tables) and PNGs in the manner of the paper's Figure 3 (per-group accuracy by method, the worst
group's accuracy and loss by method, α over training steps for the GR methods)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grpo.io import atomic_open, write_text

COLORS = {
    "dpo": "#1f77b4",
    "is-dpo": "#2ca02c",
    "gr-dpo": "#d62728",
    "ipo": "#9467bd",
    "is-ipo": "#8c564b",
    "gr-ipo": "#ff7f0e",
}
METRIC_TITLES = {
    "reward_accuracy": "Reward accuracy",
    "logprob_accuracy": "Log-prob accuracy",
    "loss": "Loss",
}
FIGURES = ("per_group_accuracy.png", "worst_group.png", "group_weights.png")


def label(method: str) -> str:
    """``gr-ipo`` → ``GR-IPO``."""
    return method.upper()


def _groups(results: dict[str, Any]) -> list[str]:
    return list(results.get("groups") or results.get("countries") or [])


def _noun(results: dict[str, Any]) -> str:
    return "country" if "countries" in results else "group"


def _pairs(entry: dict[str, Any]) -> str:
    counts = entry.get("pairs_per_seed") or [entry["pairs"]]
    if len(set(counts)) == 1:
        return str(counts[0])
    return f"{min(counts)}–{max(counts)}"


def metric_table(results: dict[str, Any], metric: str) -> list[str]:
    """Rows: groups (test pairs per seed), then the worst group and the best−worst gap; columns:
    methods; cells: mean ± sem over seeds, [Wilson interval] for accuracies."""
    methods, groups = list(results["methods"]), _groups(results)
    lines = [
        f"| {_noun(results)} | pairs | " + " | ".join(label(m) for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for g in groups:
        cells = []
        for m in methods:
            s = results["methods"][m]["groups"][g][metric]
            cell = f"{s['mean']:.3f} ± {s['sem']:.3f}"
            interval = results.get("intervals", {}).get(m, {}).get(g, {}).get(metric)
            if interval:
                cell += f" [{interval['low']:.2f}, {interval['high']:.2f}]"
            cells.append(cell)
        entry = results["methods"][methods[0]]["groups"][g]
        lines.append(f"| {g} | {_pairs(entry)} | " + " | ".join(cells) + " |")
    for name, key in (("**worst group**", "worst_group"), ("best − worst", "group_gap")):
        cells = [
            f"{results['methods'][m][key][metric]['mean']:.3f} ± "
            f"{results['methods'][m][key][metric]['sem']:.3f}"
            for m in methods
        ]
        lines.append(f"| {name} | | " + " | ".join(cells) + " |")
    return lines


def weights_table(results: dict[str, Any]) -> list[str]:
    methods, groups = list(results["methods"]), _groups(results)
    lines = [
        f"| {_noun(results)} | " + " | ".join(label(m) for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for g in groups:
        cells = [
            f"{results['methods'][m]['final_group_weights'][g]['mean']:.3f} ± "
            f"{results['methods'][m]['final_group_weights'][g]['sem']:.3f}"
            for m in methods
        ]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return lines


def comparison_table(results: dict[str, Any]) -> list[str]:
    """The paired bootstrap of each method's worst-group metric against its baseline."""
    if not results.get("comparisons"):
        return ["(no method ran with its pooled baseline: nothing to compare)"]
    level = f"{results.get('confidence', 0.95):.0%}"
    lines = [
        f"| comparison | worst-group metric | difference | {level} interval | resamples ≤ 0 | test pairs × seeds |",
        "|---|---|---|---|---|---|",
    ]
    for by_metric in results["comparisons"].values():
        for metric, c in by_metric.items():
            lines.append(
                f"| {label(c['method'])} − {label(c['baseline'])} | {metric} | "
                f"{c['estimate']:+.3f} | [{c['low']:+.3f}, {c['high']:+.3f}] | "
                f"{c['share_at_or_below_zero']:.3f} | {c['items']} |"
            )
    return lines


def checkpoint_lines(results: dict[str, Any]) -> list[str]:
    """Which checkpoint each method contributes, per seed, and the rule that chose it."""
    lines = ["| method | seed | kept step / steps | chosen on | stopped early |", "|---|---|---|---|---|"]  # fmt: skip
    for m, picks in results.get("checkpoints", {}).items():
        for c in picks:
            lines.append(
                f"| {label(m)} | {c['seed']} | {c['step']} / {c['steps']} | {c['criterion']} | "
                f"{'yes' if c['stopped_early'] else 'no'} |"
            )
    return lines


def selection_note(results: dict[str, Any]) -> str:
    """A sentence on how much validation data decided the checkpoints (and LR cuts, stopping)."""
    runs = results.get("runs") or []
    counts = [min(r["validation_pairs"].values()) for r in runs if r.get("validation_pairs")]
    if not counts:
        return ""
    span = str(min(counts)) if min(counts) == max(counts) else f"{min(counts)}–{max(counts)}"
    return (
        "Checkpoints, LR cuts and early stopping follow the validation split only (never test); "
        f"the smallest group has {span} validation pairs per seed: a worst-group rule rests on "
        "that many pairs."
    )


def markdown(results: dict[str, Any], title: str) -> str:
    """The whole ``results.md``."""
    seeds = results["seeds"]
    head = [
        f"# {title}",
        "",
        f"Model `{results.get('model') or '?'}`; {len(_groups(results))} {_noun(results)} "
        f"groups; seeds {seeds}; methods {', '.join(label(m) for m in results['methods'])}. "
        "Test split; mean ± standard error over seeds; "
        f"[{results.get('confidence', 0.95):.0%} Wilson interval of the seed mean, "
        "on the group's test pairs per seed]. Worst group: per seed the minimum accuracy "
        "(maximum loss) over groups, then the mean over seeds.",
        "",
    ]
    body = []
    for metric in ("reward_accuracy", "logprob_accuracy", "loss"):
        body += [f"## {METRIC_TITLES[metric]} (test)", "", *metric_table(results, metric), ""]
    body += ["## Final group weights (θ-step weights; α for GR-*)", "", *weights_table(results), ""]
    body += [
        "## Worst group, paired: method − baseline",
        "",
        "Bootstrap over test pairs resampled within each (seed, group), the same pairs for both "
        "methods; accuracies: > 0 favours the method; loss: < 0 does.",
        "",
        *comparison_table(results),
        "",
        "## Checkpoints",
        "",
        selection_note(results),
        "",
        *checkpoint_lines(results),
        "",
        f"Wall time: {results.get('seconds', 0.0) / 60:.1f} min.",
        "",
    ]
    return "\n".join(head + body)


def write_outputs(results: dict[str, Any], out_dir: str | Path, title: str) -> list[Path]:
    """``results.json``, ``results.md`` and the PNGs into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    written = [out / "results.json", out / "results.md"]
    write_text(written[0], json.dumps(results, indent=1, allow_nan=True) + "\n")
    write_text(written[1], markdown(results, title))
    written.append(plot_group_accuracy(results, out / FIGURES[0]))
    written.append(plot_worst_group(results, out / FIGURES[1]))
    weights = plot_group_weights(results, out / FIGURES[2])
    if weights is not None:
        written.append(weights)
    return written


# --------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png")
    _pyplot().close(fig)
    return path


def plot_group_accuracy(results: dict[str, Any], path: Path) -> Path:
    """Figure 3's per-group panels: reward and log-prob accuracy per group, one bar per method,
    error bars ± sem over seeds."""
    plt = _pyplot()
    methods, groups = list(results["methods"]), _groups(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), dpi=90)
    width = 0.8 / len(methods)
    for ax, metric in zip(axes, ("reward_accuracy", "logprob_accuracy"), strict=True):
        for i, m in enumerate(methods):
            cells = [results["methods"][m]["groups"][g][metric] for g in groups]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(groups))]
            ax.bar(xs, [c["mean"] for c in cells], width, yerr=[c["sem"] for c in cells],
                   color=COLORS.get(m), label=label(m), capsize=2)  # fmt: skip
        first = results["methods"][methods[0]]["groups"]
        ticks = [f"{g.split(' (')[0]}\n{_pairs(first[g])} pairs/seed" for g in groups]
        ax.set_xticks(range(len(groups)), ticks, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{METRIC_TITLES[metric]} per {_noun(results)} (test)", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{len(results['seeds'])} seeds, mean ± sem", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_worst_group(results: dict[str, Any], path: Path) -> Path:
    """Worst-group reward accuracy, log-prob accuracy and loss by method (± sem over seeds)."""
    plt = _pyplot()
    methods = list(results["methods"])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=90)
    for ax, metric in zip(axes, ("reward_accuracy", "logprob_accuracy", "loss"), strict=True):
        cells = [results["methods"][m]["worst_group"][metric] for m in methods]
        ax.bar(range(len(methods)), [c["mean"] for c in cells], yerr=[c["sem"] for c in cells],
               color=[COLORS.get(m) for m in methods], capsize=3)  # fmt: skip
        ax.set_xticks(range(len(methods)), [label(m) for m in methods], fontsize=8)
        ax.set_title(f"worst-group {METRIC_TITLES[metric].lower()}", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_group_weights(results: dict[str, Any], path: Path) -> Path | None:
    """α per group over training steps for each GR method: thin lines per seed, a thick line for
    the mean over seeds (on the steps every seed reached). None when no GR method ran."""
    robust = [m for m in results["methods"] if m.startswith("gr-")]
    if not robust:
        return None
    plt = _pyplot()
    groups = _groups(results)
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(robust), figsize=(5.5 * len(robust), 3.3), dpi=90,
                             squeeze=False)  # fmt: skip
    for ax, m in zip(axes[0], robust, strict=True):
        curves = [r["group_weight_history"] for r in results["runs"] if r["method"] == m]
        common = min(len(c["step"]) for c in curves)
        for j, g in enumerate(groups):
            for c in curves:
                ax.plot(c["step"], c[g], color=colors(j), lw=0.6, alpha=0.35)
            mean = [sum(c[g][t] for c in curves) / len(curves) for t in range(common)]
            ax.plot(curves[0]["step"][:common], mean, color=colors(j), lw=1.8,
                    label=g.split(" (")[0])  # fmt: skip
        ax.axhline(1.0 / len(groups), color="grey", lw=0.8, ls=":")
        ax.set_title(f"{label(m)}: group weights α over training", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
