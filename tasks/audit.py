"""The fairness audit: every registered version with its per-group accuracies, from MLflow alone.

For each version (newest first): per-group accuracy with its number of pairs and interval, worst
group and its value, the gap between best and worst group, the data version (DVC md5, git
revision), the training method, creation time and aliases.

- :func:`audit` lists the *logged* figures (no model loaded, no GPU). Each was measured on the
  test split of the data its version was trained on, so versions trained on different data are
  not comparable: ``same_data_as_newest`` marks them (False when the version's ``data.md5``
  differs from the newest version's).
- :func:`reevaluate` scores every (or the listed) version on one and the same pairs
  (``tasks.rescore``), so the rows compare; ``evaluated_on`` says which. :func:`log_audit` records
  such an audit as an MLflow run in the experiment ``grpo-audit``.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from grpo import metric_names
from grpo.io import atomic_open
from grpo.stats import wilson_interval

FORMATS = ("table", "markdown", "json")
AUDIT_EXPERIMENT = "grpo-audit"


def audit(
    name: str, metric: str = "reward_accuracy", confidence: float = 0.95
) -> list[dict[str, Any]]:
    """One record per version of registered model ``name``, newest first, from logged figures.

    Record keys: ``version``, ``created``, ``aliases``, ``groups`` ({group: value}),
    ``group_pairs`` ({group: pairs}), ``groups_ci`` ({group: [low, high]}, Wilson at
    ``confidence`` from the logged value and pairs), ``confidence``, ``worst_group``, ``worst_value``, ``gap``,
    ``overall``, ``data_md5``, ``same_data_as_newest``, ``git_rev``, ``data_source``,
    ``method``, ``gate``, ``run_id``.
    """
    from tasks.tracking import client as get_client

    client = get_client()
    model = client.get_registered_model(name)  # MlflowException names a missing model
    alias_map = _aliases_by_version(model)
    records = [
        _version_record(client, mv, alias_map, metric, confidence)
        for mv in client.search_model_versions(f"name = '{name}'")
    ]
    records.sort(key=lambda r: int(r["version"]), reverse=True)
    newest = records[0]["data_md5"] if records else None
    for r in records:
        r["same_data_as_newest"] = None if not newest else r["data_md5"] == newest
    return records


def _aliases_by_version(model: Any) -> dict[str, list[str]]:
    """``{version: [alias, ...]}``: MLflow maps alias → version, a row needs the reverse."""
    alias_map: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        alias_map.setdefault(str(version), []).append(alias)
    return alias_map


def _version_record(
    client: Any, mv: Any, alias_map: dict[str, list[str]], metric: str, confidence: float
) -> dict[str, Any]:
    """One version's audit row from its run's logged metrics, tags and params (no model loaded)."""
    run = client.get_run(mv.run_id) if mv.run_id else None
    metrics = dict(run.data.metrics) if run else {}
    tags = dict(run.data.tags) if run else {}
    params = dict(run.data.params) if run else {}
    groups = group_values(metrics, metric)
    pairs = group_values(metrics, "pairs")
    worst = min(groups, key=groups.__getitem__) if groups else None
    return {
        "version": str(mv.version),
        "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S"
        ),
        "aliases": sorted(alias_map.get(str(mv.version), [])),
        "metric": metric,
        "groups": groups,
        "group_pairs": {g: int(n) for g, n in pairs.items() if n == n},
        "groups_ci": intervals(groups, pairs, confidence),
        "confidence": confidence,
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


def intervals(
    values: dict[str, float], pairs: dict[str, float], confidence: float
) -> dict[str, list[float]]:
    """``{group: [low, high]}``: the Wilson interval of round(value·pairs) of pairs, for the
    groups with a known count of at least one pair."""
    out = {}
    for g, v in values.items():
        n = pairs.get(g)
        if n is None or n != n or n < 1 or v != v:
            continue
        out[g] = list(wilson_interval(round(v * n), int(n), confidence))
    return out


def reevaluate(
    name: str,
    frame: Any,
    evaluated_on: dict[str, Any],
    *,
    metric: str = "reward_accuracy",
    confidence: float = 0.95,
    versions: list[str] | None = None,
    model_cfg: Any = None,
    batch_size: int = 32,
    groups: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """Every (or each listed) version of ``name`` scored on the rows of ``frame``: the
    :func:`audit` records with ``groups``, ``group_pairs``, ``groups_ci``, ``worst_group``,
    ``worst_value``, ``gap`` and ``overall`` from that scoring, plus ``evaluated_on`` (the same
    dict in every row) and ``reevaluated`` (False, with ``note``, for a version registered
    before references were logged: its figures are left empty, not mixed in)."""
    from tasks.rescore import NotRescorable, score_version

    records = audit(name, metric, confidence)
    if versions:
        known = {r["version"] for r in records}
        unknown = [v for v in versions if v not in known]
        if unknown:
            raise ValueError(f"{name}: no version(s) {', '.join(unknown)}; has {sorted(known)}")
        records = [r for r in records if r["version"] in versions]
    for r in records:
        r.update(evaluated_on=dict(evaluated_on), reevaluated=False, note=None)
        try:
            result = score_version(
                name, r["version"], frame, model_cfg=model_cfg, batch_size=batch_size,
                expected_groups=groups, confidence=confidence,
            )  # fmt: skip
        except NotRescorable as exc:
            r.update(groups={}, group_pairs={}, groups_ci={}, worst_group=None,
                     worst_value=None, gap=None, overall=None, note=str(exc))  # fmt: skip
            continue
        r.update(reevaluated=True, **scored_fields(result, metric))
    return records


def scored_fields(result: dict[str, Any], metric: str) -> dict[str, Any]:
    """The audit fields of a ``grpo.evaluation`` result (NaN as None: JSON has no NaN)."""

    def plain(v: float) -> float | None:
        return None if v != v else float(v)

    table = result["groups"]
    return {
        "groups": {g: plain(v[metric]) for g, v in table.items()},
        "group_pairs": {g: int(v["pairs"]) for g, v in table.items()},
        "groups_ci": {
            g: [v[f"{metric}_ci_low"], v[f"{metric}_ci_high"]]
            for g, v in table.items()
            if v["pairs"]
        },
        "worst_group": result["worst_group"][metric]["group"],
        "worst_value": plain(result["worst_group"][metric]["value"]),
        "gap": plain(result["group_gap"][metric]),
        "overall": plain(result["overall"][metric]),
    }


def audit_pairs(path: str | Path, split: str, max_pairs: int = 0, seed: int = 0) -> Any:
    """The ``split`` rows of the pair table at ``path`` (``evaluate.max_pairs`` per group, as the
    evaluation samples them); a split with no rows is an error naming the file."""
    from grpo.data.schema import read_pairs
    from tasks.evaluate import sample_per_group

    frame = read_pairs(path)
    frame = frame[frame["split"] == split].reset_index(drop=True)
    if frame.empty:
        raise ValueError(f"{path}: no pairs with split == {split!r} to audit on")
    return sample_per_group(frame, max_pairs, seed)


def file_md5(path: str | Path) -> str:
    """The md5 of a file's bytes (a data file given with ``--data``)."""
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def group_values(metrics: dict[str, float], metric: str) -> dict[str, float]:
    """``{group: value}`` from ``eval/group/<group>/<metric>`` names, sorted by group."""
    groups = metric_names.per_group(metrics)  # sorted by group
    return {g: values[metric] for g, values in groups.items() if metric in values}


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def common_pairs(records: list[dict[str, Any]], group: str) -> int | None:
    """The group's number of pairs when every record that has it agrees (re-evaluated), else None."""
    counts = {r.get("group_pairs", {}).get(group) for r in records if group in r["groups"]}
    return counts.pop() if len(counts) == 1 and None not in counts else None


def _cell(r: dict[str, Any], group: str, per_cell_pairs: bool) -> str:
    """``0.750 [0.53, 0.89]`` (and `` n=40`` when the counts differ between versions)."""
    text = _num(r["groups"].get(group))
    ci = r.get("groups_ci", {}).get(group)
    if ci is not None and text != "-":
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    n = r.get("group_pairs", {}).get(group)
    if per_cell_pairs and n is not None and text != "-":
        text += f" n={n}"
    return text


def rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of strings: one column per group plus the summary columns. A group's
    header carries its pairs when every version was scored on the same number; a data md5
    marked ``*`` is another data version than the newest version's."""
    groups = sorted({g for r in records for g in r["groups"]})
    shared = {g: common_pairs(records, g) for g in groups}
    header = [
        "version",
        "aliases",
        *[g if shared[g] is None else f"{g} (n={shared[g]})" for g in groups],
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
        marker = "*" if r.get("same_data_as_newest") is False else ""
        body.append(
            [
                r["version"],
                ",".join(r["aliases"]) or "-",
                *[_cell(r, g, shared[g] is None) for g in groups],
                r["worst_group"] or "-",
                _num(r["worst_value"]),
                _num(r["gap"]),
                r["method"] or "-",
                (r["data_md5"] or "-")[:12] + marker,
                (r["git_rev"] or "-")[:8],
                r["created"],
            ]
        )
    return header, body


def notes(records: list[dict[str, Any]]) -> list[str]:
    """The lines under the table: what the figures were measured on, and what does not compare."""
    lines = []
    where = next((r["evaluated_on"] for r in records if r.get("evaluated_on")), None)
    if where:
        lines.append(
            f"every version scored on the same {where['pairs']} {where['split']} pairs "
            f"(data {where['md5']}); intervals: Wilson at {records[0].get('confidence', 0.95):.0%}"
        )
    for r in records:
        if r.get("note"):
            lines.append(f"version {r['version']}: not re-evaluated: {r['note']}")
    if any(r.get("same_data_as_newest") is False for r in records):
        lines.append(
            "* logged on another data version than the newest version: these figures do not "
            "compare with the others; `grpo audit --reevaluate` scores every version on the "
            "same pairs"
        )
    return lines


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
        extra = notes(records)
        return "\n".join(lines + (["", *extra] if extra else []))
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
    fmt_row = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt_row.format(*header), fmt_row.format(*("-" * w for w in widths))]
        + [fmt_row.format(*r) for r in body]
        + notes(records)
    )


def figure(records: list[dict[str, Any]]):
    """Per-group accuracy by version with interval error bars (groups side by side around each
    version), the worst group's value dashed; a title saying what the figures were measured on."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ordered = sorted(records, key=lambda r: int(r["version"]))
    groups = sorted({g for r in ordered for g in r["groups"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(len(ordered)))
    width = 0.6 / max(len(groups), 1)
    for k, group in enumerate(groups):
        shift = [x + (k - (len(groups) - 1) / 2) * width for x in xs]
        values = [_value(r["groups"].get(group)) for r in ordered]
        cis = [r.get("groups_ci", {}).get(group) for r in ordered]
        below = [v - ci[0] if ci and v == v else 0.0 for v, ci in zip(values, cis, strict=True)]
        above = [ci[1] - v if ci and v == v else 0.0 for v, ci in zip(values, cis, strict=True)]
        ax.errorbar(shift, values, yerr=[below, above], marker="o", capsize=3, label=group)
    ax.plot(xs, [_value(r["worst_value"]) for r in ordered], "k--", label="worst group")
    metric = ordered[0]["metric"] if ordered else "accuracy"
    where = next((r["evaluated_on"] for r in ordered if r.get("evaluated_on")), None)
    subtitle = (
        f"all on {where['pairs']} {where['split']} pairs of data {str(where['md5'])[:12]}"
        if where
        else "as logged, each on its own data"
    )
    ax.set_xticks(xs, [f"v{r['version']}" for r in ordered])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("model version")
    ax.set_ylabel(metric)
    ax.set_title(f"Per-group {metric} by version ({subtitle})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _value(v: Any) -> float:
    return float("nan") if v is None else float(v)


def plot(records: list[dict[str, Any]], path: str | Path) -> Path:
    """:func:`figure` saved as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = figure(records)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, dpi=120, format="png")
    plt.close(fig)
    return path


def log_audit(root: str | Path, name: str, records: list[dict[str, Any]]) -> str:
    """The audit as an MLflow run in experiment ``grpo-audit``: params (model, metric,
    evaluated_on, versions), the records (``audit/audit.json``), the table
    (``audit/audit.md``, and ``audit/per_group.json`` for ``mlflow.load_table``) and the plot
    (``audit/per_group.png``). Returns the run id."""
    import pandas as pd

    from tasks import tracking

    _, experiment_id = tracking.setup(root, AUDIT_EXPERIMENT)
    where = next((r["evaluated_on"] for r in records if r.get("evaluated_on")), {}) or {}
    run_id = tracking.start_run(experiment_id, tags={"audit.model": name})
    params = {"model_name": name, "metric": records[0]["metric"] if records else None,
              "versions": [r["version"] for r in records],
              **{f"evaluated_on.{k}": v for k, v in where.items()}}  # fmt: skip
    tracking.log_params(run_id, params)
    client = tracking.client()
    client.log_dict(run_id, records, "audit/audit.json")
    client.log_text(run_id, render(records, "markdown"), "audit/audit.md")
    long = [
        {"version": r["version"], "group": g, "value": v, "pairs": r["group_pairs"].get(g),
         "ci_low": (r["groups_ci"].get(g) or [None])[0],
         "ci_high": (r["groups_ci"].get(g) or [None, None])[1]}
        for r in records for g, v in r["groups"].items()
    ]  # fmt: skip
    client.log_table(run_id, pd.DataFrame(long), "audit/per_group.json")
    tracking.log_figures(run_id, {"audit/per_group.png": figure(records)})
    tracking.end_run(run_id)
    return run_id
