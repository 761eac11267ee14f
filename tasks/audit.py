"""The fairness audit: every registered version with its per-group accuracies, from MLflow alone.

For each version (newest first): per-group accuracy, worst group and its value, the gap between
best and worst group, the data version (DVC md5, git revision), the training method, creation
time and aliases. Needs only the tracking store (no retraining, no GPU).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from grpo import metric_names
from grpo.io import atomic_open

FORMATS = ("table", "markdown", "json")


def audit(name: str, metric: str = "reward_accuracy") -> list[dict[str, Any]]:
    """One record per version of registered model ``name``, newest first.

    Record keys: ``version``, ``created``, ``aliases``, ``groups`` ({group: value}),
    ``worst_group``, ``worst_value``, ``gap``, ``overall``, ``data_md5``, ``git_rev``,
    ``data_source``, ``method``, ``gate``, ``run_id``.
    """
    from tasks.tracking import client as get_client

    client = get_client()
    model = client.get_registered_model(name)  # MlflowException names a missing model
    alias_map: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        alias_map.setdefault(str(version), []).append(alias)
    records = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        run = client.get_run(mv.run_id) if mv.run_id else None
        metrics = dict(run.data.metrics) if run else {}
        tags = dict(run.data.tags) if run else {}
        params = dict(run.data.params) if run else {}
        groups = group_values(metrics, metric)
        worst = min(groups, key=groups.__getitem__) if groups else None
        records.append(
            {
                "version": str(mv.version),
                "created": datetime.fromtimestamp(
                    mv.creation_timestamp / 1000, timezone.utc
                ).strftime("%Y-%m-%d %H:%M:%S"),
                "aliases": sorted(alias_map.get(str(mv.version), [])),
                "metric": metric,
                "groups": groups,
                "worst_group": worst,
                "worst_value": metrics.get(metric_names.worst_group(metric)),
                "gap": metrics.get(metric_names.group_gap(metric)),
                "overall": metrics.get(metric_names.overall(metric)),
                "data_md5": tags.get("data.md5"),
                "git_rev": tags.get("data.git_rev"),
                "data_source": tags.get("data.source"),
                "method": tags.get("train.method") or params.get("train.method"),
                "gate": (mv.tags or {}).get("gate.decision"),
                "run_id": mv.run_id,
            }
        )
    records.sort(key=lambda r: int(r["version"]), reverse=True)
    return records


def group_values(metrics: dict[str, float], metric: str) -> dict[str, float]:
    """``{group: value}`` from ``eval/group/<group>/<metric>`` names, sorted by group."""
    groups = metric_names.per_group(metrics)  # sorted by group
    return {g: values[metric] for g, values in groups.items() if metric in values}


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of strings: one column per group plus the summary columns."""
    groups = sorted({g for r in records for g in r["groups"]})
    header = [
        "version",
        "aliases",
        *groups,
        "worst group",
        "worst",
        "gap",
        "method",
        "data md5",
        "git rev",
        "created",
    ]
    body = []
    for r in records:
        body.append(
            [
                r["version"],
                ",".join(r["aliases"]) or "-",
                *[_num(r["groups"].get(g)) for g in groups],
                r["worst_group"] or "-",
                _num(r["worst_value"]),
                _num(r["gap"]),
                r["method"] or "-",
                (r["data_md5"] or "-")[:12],
                (r["git_rev"] or "-")[:8],
                r["created"],
            ]
        )
    return header, body


def render(records: list[dict[str, Any]], fmt: str = "table") -> str:
    """The audit as an aligned text table, a Markdown table, or JSON."""
    if fmt not in FORMATS:
        raise ValueError(f"format: one of {list(FORMATS)}, got {fmt!r}")
    if fmt == "json":
        return json.dumps(records, indent=2, default=str)
    header, body = rows(records)
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
    fmt_row = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt_row.format(*header), fmt_row.format(*("-" * w for w in widths))]
        + [fmt_row.format(*r) for r in body]
    )


def plot(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Per-group accuracy by version (one line per group, the worst group's value dashed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    ordered = sorted(records, key=lambda r: int(r["version"]))
    versions = [f"v{r['version']}" for r in ordered]
    groups = sorted({g for r in ordered for g in r["groups"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    for group in groups:
        ax.plot(
            versions,
            [r["groups"].get(group, float("nan")) for r in ordered],
            marker="o",
            label=group,
        )
    ax.plot(
        versions,
        [r["worst_value"] if r["worst_value"] is not None else float("nan") for r in ordered],
        "k--",
        label="worst group",
    )
    metric = ordered[0]["metric"] if ordered else "accuracy"
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("model version")
    ax.set_ylabel(metric)
    ax.set_title(f"Per-group {metric} by version")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, dpi=120, format="png")
    plt.close(fig)
    return path
