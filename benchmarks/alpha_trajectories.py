"""Group-weight (α) trajectories of GR-IPO on GlobalOpinionQA at the paper's β = 0.01: the α step
divided by the loss at zero margin (η_α = 0.05, the default) against the raw step it replaced
(the same run with η_α × ℓ₀ = 0.05 × 2,500, which is what η_α = 0.05 did before issue 15).

    python -m benchmarks.alpha_trajectories [--model PATH] [--epochs 3] [--json PATH] [--png PATH]

The README's GlobalOpinionQA example (`grpo run --set data.source=globalopinionqa --set
train.method=gr-ipo --set train.beta=0.01`) with the rest of params.yaml: the tiny GPT-2 from a
config unless --model names a model folder (e.g. models/SmolLM2-135M-Instruct, with LoRA). Prints
per run the largest α in the first tenth of the steps, the effective number of groups at the end,
and how many steps α was collapsed (one group > 0.99); writes the trajectories as JSON and a PNG.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

from grpo import metric_names
from grpo.io import write_json

BETA = 0.01
RUNS = {"normalised (η_α = 0.05)": 0.05, "raw step (η_α·ℓ₀ = 125)": 0.05 / (4 * BETA * BETA)}


def trajectories(model: str | None, epochs: int, seed: int) -> dict[str, Any]:
    """Train GR-IPO once per entry of :data:`RUNS`; α per step for each run."""
    from flows.params import load_params, resolve
    from grpo.data.sources import build_pairs
    from grpo.trainer import train

    overrides = [
        "data.source=globalopinionqa", "train.method=gr-ipo", f"train.beta={BETA}",
        f"train.epochs={epochs}", f"train.seed={seed}", "train.progress=false",
    ]  # fmt: skip
    if model:
        overrides += [f"model.name_or_path={model}", "model.lora=true"]
    out: dict[str, Any] = {"settings": overrides, "runs": {}}
    for name, eta in RUNS.items():
        cfgs = resolve(load_params("params.yaml", [*overrides, f"train.eta_alpha={eta}"]))
        pairs, _, _ = build_pairs(cfgs.data)
        with tempfile.TemporaryDirectory() as folder:
            result = train(pairs, cfgs.model, cfgs.train, folder, resume=False)
        out["runs"][name] = {
            "eta_alpha": eta,
            "groups": list(result.groups),
            "alpha": [
                [h[metric_names.train_group_weight(g)] for g in result.groups]
                for h in result.history
            ],
            "effective_groups": [h[metric_names.TRAIN_EFFECTIVE_GROUPS] for h in result.history],
            "mean_batch_loss": {  # each group's mean batch loss over the steps it appeared in
                g: _mean(
                    [h[k] for h in result.history if (k := metric_names.train_group_loss(g)) in h]
                )
                for g in result.groups
            },
            "collapse": result.collapse,
        }
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summary_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, run in data["runs"].items():
        alpha = run["alpha"]
        tenth = max(1, math.ceil(len(alpha) / 10))
        rows.append(
            {
                "run": name,
                "steps": len(alpha),
                "max α, first tenth": max(max(a) for a in alpha[:tenth]),
                "effective groups at the end": run["effective_groups"][-1],
                "steps collapsed (max α > 0.99)": sum(max(a) > 0.99 for a in alpha),
                "smallest α": min(min(a) for a in alpha),
                "highest final α": run["groups"][alpha[-1].index(max(alpha[-1]))],
                "highest mean batch loss": max(
                    run["mean_batch_loss"], key=run["mean_batch_loss"].get
                ),
            }
        )
    return rows


def plot(data: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    runs = data["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.6), sharey=True)
    for ax, (name, run) in zip(axes, runs.items(), strict=True):
        steps = range(1, len(run["alpha"]) + 1)
        for i, group in enumerate(run["groups"]):
            ax.plot(steps, [a[i] for a in run["alpha"]], label=group)
        ax.set_title(f"GR-IPO, β = {BETA}: {name}", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("group weight α (used by the step)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.alpha_trajectories",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="a model folder (LoRA); default: the tiny GPT-2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("outputs/bench/alpha_trajectories.json"))
    parser.add_argument("--png", type=Path, default=Path("outputs/bench/alpha_trajectories.png"))
    args = parser.parse_args(argv)
    data = trajectories(args.model, args.epochs, args.seed)
    data["summary"] = summary_rows(data)
    for row in data["summary"]:
        print(
            " | ".join(
                f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items()
            )
        )
    write_json(args.json, data)
    print(f"wrote {args.json} and {plot(data, args.png)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
