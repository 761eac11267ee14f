"""The registration gate: pure predicates on evaluation numbers, no MLflow.

A trained policy is registered only when its *worst* group is good enough (the paper's point:
the average can hide a group the model fails), and it replaces the current champion only when
its worst group is at least as good as the champion's. ``tasks.register`` applies these
decisions to the MLflow registry; keeping them here makes them testable with hand-made numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from grpo import metric_names

GATE_METRICS = ("reward_accuracy", "logprob_accuracy")


@dataclass(frozen=True)
class GateDecision:
    """Whether a model may be registered, and why (the reason is stored as a tag)."""

    passed: bool
    metric: str
    value: float  # the model's worst-group value of `metric`
    threshold: float
    reason: str

    @property
    def decision(self) -> str:
        return "passed" if self.passed else "rejected"


@dataclass(frozen=True)
class ChampionDecision:
    """Whether a registered model takes the ``champion`` alias from the current one."""

    promote: bool
    value: float
    champion_value: float | None  # None when there is no champion yet
    margin: float
    reason: str


def worst_group_key(metric: str) -> str:
    """The flat metric name the gate reads, e.g. ``eval/worst_group/reward_accuracy``."""
    return metric_names.worst_group(metric)


def check_gate(
    metrics: dict[str, float], threshold: float, metric: str = "reward_accuracy"
) -> GateDecision:
    """Pass iff ``metrics["eval/worst_group/<metric>"] >= threshold``.

    A missing or NaN value fails (a model whose worst group cannot be measured is not trusted).
    """
    if metric not in GATE_METRICS:
        raise ValueError(f"gate metric must be one of {list(GATE_METRICS)}, got {metric!r}")
    key = worst_group_key(metric)
    value = metrics.get(key)
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return GateDecision(False, metric, float("nan"), threshold, f"{key} is missing or NaN")
    value = float(value)
    if value >= threshold:
        reason = f"worst-group {metric} {value:.4f} >= threshold {threshold:.4f}"
        return GateDecision(True, metric, value, threshold, reason)
    reason = f"worst-group {metric} {value:.4f} < threshold {threshold:.4f}"
    return GateDecision(False, metric, value, threshold, reason)


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
