"""The registration gate: pure predicates on evaluation numbers, no MLflow.

A trained policy is registered only when its *worst* group is good enough (the paper's point:
the average can hide a group the model fails), and it replaces the current champion only when
its worst group is at least as good as the champion's on the same pairs. ``tasks.register``
applies these decisions to the MLflow registry; keeping them here makes them testable with
hand-made numbers.

The gate judges every group on evidence (:func:`check_gate`):

1. every group must have been evaluated (``eval/group/<g>/pairs`` > 0),
2. on at least ``min_group_pairs`` pairs,
3. and every group's accuracy must clear the threshold *at the lower end of its confidence
   interval*: with k correct pairs of n, the Wilson score interval at level c
   (:func:`grpo.stats.wilson_interval`) gives a lower bound L(k, n, c), and the gate passes iff
   min_g L(k_g, n_g, c) ≥ threshold. ``confidence = 0`` gives L = k/n, the point-estimate gate.

The group with the lowest bound decides; the reason names it, its pairs and the margin.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from grpo import metric_names
from grpo.stats import mcnemar_exact, paired_bootstrap, wilson_interval

GATE_METRICS = ("reward_accuracy", "logprob_accuracy")
DEFAULT_MIN_GROUP_PAIRS = 20
DEFAULT_CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class GateDecision:
    """Whether a model may be registered, and why (the reason is stored as a tag).

    ``value`` is the worst group's point value (``eval/worst_group/<metric>``); ``group`` the
    group that decided (the lowest lower bound, or the first group without enough pairs) and
    ``bound`` its lower bound (NaN when a count decided); ``margin = bound − threshold``.
    """

    passed: bool
    metric: str
    value: float
    threshold: float
    reason: str
    group: str | None = None
    bound: float = math.nan
    pairs: int | None = None  # the deciding group's evaluated pairs
    confidence: float = DEFAULT_CONFIDENCE
    min_group_pairs: int = DEFAULT_MIN_GROUP_PAIRS

    @property
    def decision(self) -> str:
        return "passed" if self.passed else "rejected"

    @property
    def margin(self) -> float:
        return self.bound - self.threshold


@dataclass(frozen=True)
class ChampionDecision:
    """Whether a registered model takes the ``champion`` alias from the current one."""

    promote: bool
    value: float
    champion_value: float | None  # None when there is no champion yet
    margin: float
    reason: str


def worst_group_key(metric: str) -> str:
    """The flat metric name of the worst group's value, e.g. ``eval/worst_group/reward_accuracy``."""
    return metric_names.worst_group(metric)


def _number(value: Any) -> float:
    """A float, NaN for anything missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def group_evidence(
    metrics: Mapping[str, float], metric: str, confidence: float
) -> dict[str, dict[str, float]]:
    """``{group: {"value", "pairs", "low", "high"}}`` from the flat per-group names.

    k = round(value · pairs) correct pairs of ``pairs`` (the value is a mean of 0/1 outcomes);
    (low, high) is the Wilson interval at ``confidence``; NaN where the value or the count is
    missing, or the group has no pairs.
    """
    out = {}
    for group, values in metric_names.per_group(metrics).items():
        value, pairs = _number(values.get(metric)), _number(values.get("pairs"))
        low = high = math.nan
        if not math.isnan(value) and not math.isnan(pairs) and pairs > 0:
            low, high = wilson_interval(round(value * pairs), int(pairs), confidence)
        elif not math.isnan(value) and math.isnan(pairs) and confidence == 0.0:
            low = high = value  # the point gate needs no count
        out[group] = {"value": value, "pairs": pairs, "low": low, "high": high}
    return out


def check_gate(
    metrics: Mapping[str, float],
    threshold: float,
    metric: str = "reward_accuracy",
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    min_group_pairs: int = DEFAULT_MIN_GROUP_PAIRS,
) -> GateDecision:
    """Pass iff every group has ≥ ``min_group_pairs`` evaluated pairs and
    min_g L(k_g, n_g, confidence) ≥ ``threshold`` (module docstring).

    A group with no pairs, an unknown count (when one is needed) or a NaN value fails the gate,
    named in the reason; so do metrics without any per-group figure.
    """
    if metric not in GATE_METRICS:
        raise ValueError(f"gate metric must be one of {list(GATE_METRICS)}, got {metric!r}")
    evidence = group_evidence(metrics, metric, confidence)
    value = _number(metrics.get(worst_group_key(metric)))
    settings = {"confidence": confidence, "min_group_pairs": min_group_pairs}

    def reject(reason: str, group: str | None, pairs: float = math.nan) -> GateDecision:
        count = None if math.isnan(pairs) else int(pairs)
        return GateDecision(False, metric, value, threshold, reason, group, pairs=count, **settings)

    if not evidence:
        return reject(f"no per-group {metric} figures (eval/group/<g>/{metric})", None)
    problem = _count_problem(evidence, metric, confidence, min_group_pairs)
    if problem is not None:
        return reject(*problem)
    group = min(evidence, key=lambda g: (evidence[g]["low"], g))
    row = evidence[group]
    pairs = None if math.isnan(row["pairs"]) else int(row["pairs"])
    passed = row["low"] >= threshold
    reason = _bound_reason(group, row, metric, threshold, confidence, passed)
    return GateDecision(
        passed, metric, value, threshold, reason, group, row["low"], pairs, **settings
    )


def _count_problem(
    evidence: dict[str, dict[str, float]], metric: str, confidence: float, min_pairs: int
) -> tuple[str, str, float] | None:
    """(reason, group, pairs) of the first evidence problem, None when every group counts."""
    empty = [g for g, r in evidence.items() if r["pairs"] == 0]
    if empty:
        return f"no evaluated pairs for group(s) {', '.join(empty)}", empty[0], 0.0
    unknown = [g for g, r in evidence.items() if math.isnan(r["pairs"])]
    if unknown and (confidence > 0 or min_pairs > 0):
        names = ", ".join(unknown)
        return f"number of evaluated pairs unknown for group(s) {names}", unknown[0], math.nan
    few = sorted((r["pairs"], g) for g, r in evidence.items() if r["pairs"] < min_pairs)
    if few:
        counts = ", ".join(f"{g} {int(n)}" for n, g in few)
        reason = f"too few evaluated pairs: {counts} < register.min_group_pairs {min_pairs}"
        return reason, few[0][1], few[0][0]
    bad = [g for g, r in evidence.items() if math.isnan(r["value"])]
    if bad:
        return f"{metric} is missing or NaN for group(s) {', '.join(bad)}", bad[0], math.nan
    return None


def _bound_reason(
    group: str, row: dict[str, float], metric: str, threshold: float, confidence: float, ok: bool
) -> str:
    """E.g. ``Island decides: reward_accuracy 0.8000 on 40 pairs, 95% lower bound 0.6520 >=
    threshold 0.6000 (margin +0.0520)``."""
    pairs = "" if math.isnan(row["pairs"]) else f" on {int(row['pairs'])} pairs"
    if confidence > 0:
        bound = f", {confidence:.0%} lower bound {row['low']:.4f}"
    else:
        bound = " (point estimate)"
    sign = ">=" if ok else "<"
    return (
        f"{group} decides: {metric} {row['value']:.4f}{pairs}{bound} {sign} threshold "
        f"{threshold:.4f} (margin {row['low'] - threshold:+.4f})"
    )


def check_champion(
    value: float, champion_value: float | None, margin: float = 0.0
) -> ChampionDecision:
    """Promote iff there is no champion, or ``value >= champion_value + margin``.

    ``margin > 0`` asks a challenger to beat the champion by that much; ``margin < 0`` tolerates a
    small regression. A champion whose value is unknown (NaN) is replaced.
    """
    if champion_value is None:
        return ChampionDecision(True, value, None, margin, "no champion yet")
    if math.isnan(champion_value):
        return ChampionDecision(True, value, champion_value, margin, "champion's value is unknown")
    if value >= champion_value + margin:
        reason = f"worst-group {value:.4f} >= champion's {champion_value:.4f} + margin {margin:g}"
        return ChampionDecision(True, value, champion_value, margin, reason)
    reason = f"worst-group {value:.4f} < champion's {champion_value:.4f} + margin {margin:g}"
    return ChampionDecision(False, value, champion_value, margin, reason)


def worst_group_accuracy(correct: np.ndarray, groups: Sequence[str]) -> tuple[str, float]:
    """(group, accuracy) of the group with the lowest mean of ``correct`` (N,) 0/1 outcomes;
    ties go to the first group name in sorted order."""
    labels = np.asarray([str(g) for g in groups], dtype=object)
    means = {g: float(np.asarray(correct)[labels == g].mean()) for g in sorted(set(labels))}
    group = min(means, key=lambda g: (means[g], g))
    return group, means[group]


def paired_comparison(
    challenger: np.ndarray,
    champion: np.ndarray,
    groups: Sequence[str],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """Challenger vs champion on the *same* pairs: 0/1 outcomes (N,) of each, group labels (N,).

    - ``difference``: worst-group accuracy of the challenger minus the champion's, each model's
      worst group taken on its own; ``low``/``high``: its percentile bootstrap interval at
      ``confidence`` (pairs resampled within each group, the same resample for both models:
      :func:`grpo.stats.paired_bootstrap`); ``share_at_or_below_zero``: the share of resamples
      where the challenger is not better.
    - ``group``: the challenger's worst group; ``only_challenger``/``only_champion``: the pairs of
      that group only one model gets right; ``mcnemar_p``: the exact McNemar p-value on them.
    """
    a, b, labels = _paired_inputs(challenger, champion, groups)
    statistic, strata = _worst_group_gap(a, b, labels)
    boot = paired_bootstrap(
        statistic,
        strata,
        samples=samples,
        confidence=confidence,
        seed=seed,
    )
    group, _ = worst_group_accuracy(a, labels)
    mask = labels == group
    only_a = int(((a == 1) & (b == 0) & mask).sum())
    only_b = int(((a == 0) & (b == 1) & mask).sum())
    return {
        "difference": boot["estimate"],
        "low": boot["low"],
        "high": boot["high"],
        "share_at_or_below_zero": boot["share_at_or_below_zero"],
        "confidence": confidence,
        "samples": samples,
        "seed": seed,
        "group": group,
        "only_challenger": only_a,
        "only_champion": only_b,
        "mcnemar_p": mcnemar_exact(only_a, only_b),
        "pairs": int(a.size),
    }


def _paired_inputs(
    challenger: np.ndarray, champion: np.ndarray, groups: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Outcomes as floats (N,) and labels as strings (N,), checked: a pairing needs equal shapes."""
    a, b = np.asarray(challenger, dtype=float), np.asarray(champion, dtype=float)
    labels = np.asarray([str(g) for g in groups], dtype=object)
    if not (a.shape == b.shape == labels.shape) or a.ndim != 1 or a.size == 0:
        raise ValueError(
            f"paired comparison needs equal, non-empty (N,) outcomes and groups; got "
            f"{a.shape}, {b.shape}, {labels.shape}"
        )
    return a, b, labels


def _worst_group_gap(
    a: np.ndarray, b: np.ndarray, labels: np.ndarray
) -> tuple[Callable[[np.ndarray], float], list[np.ndarray]]:
    """The bootstrap's statistic min_g acc_g(a) − min_g acc_g(b) and one stratum per group."""
    names = sorted(set(labels))
    codes = np.searchsorted(np.asarray(names, dtype=object), labels)
    strata = [np.flatnonzero(codes == k) for k in range(len(names))]

    def worst(x: np.ndarray, idx: np.ndarray) -> float:
        counts = np.bincount(codes[idx], minlength=len(names))
        sums = np.bincount(codes[idx], weights=x[idx], minlength=len(names))
        return float((sums / counts).min())

    return (lambda idx: worst(a, idx) - worst(b, idx)), strata
