"""The registration gate as a pure predicate, with hand-made numbers."""

from __future__ import annotations

import math

import pytest

from grpo.gate import check_champion, check_gate, worst_group_key


def _metrics(worst: float, metric: str = "reward_accuracy") -> dict[str, float]:
    # per-group values whose minimum is `worst`; the gate must read the worst-group key only
    return {
        f"eval/group/a/{metric}": 0.9,
        f"eval/group/b/{metric}": worst,
        f"eval/overall/{metric}": 0.95,  # a good average must not rescue a bad worst group
        worst_group_key(metric): worst,
    }


def test_gate_passes_at_and_above_threshold():
    assert check_gate(_metrics(0.6), 0.6).passed  # equality passes (>=)
    assert check_gate(_metrics(0.61), 0.6).passed
    assert check_gate(_metrics(0.0), 0.0).passed


def test_gate_rejects_below_threshold_despite_good_average():
    decision = check_gate(_metrics(0.59), 0.6)
    assert not decision.passed
    assert decision.decision == "rejected"
    assert decision.value == pytest.approx(0.59)
    assert "0.5900 < threshold 0.6000" in decision.reason


def test_threshold_above_one_rejects_a_perfect_model():
    assert not check_gate(_metrics(1.0), 1.01).passed


def test_gate_metric_is_configurable():
    metrics = {**_metrics(0.3, "reward_accuracy"), **_metrics(0.8, "logprob_accuracy")}
    assert not check_gate(metrics, 0.5, "reward_accuracy").passed
    assert check_gate(metrics, 0.5, "logprob_accuracy").passed
    with pytest.raises(ValueError, match="gate metric"):
        check_gate(metrics, 0.5, "loss")


def test_missing_or_nan_metric_fails():
    assert not check_gate({}, 0.0).passed
    nan = check_gate({worst_group_key("reward_accuracy"): float("nan")}, 0.0)
    assert not nan.passed and math.isnan(nan.value) and "missing or NaN" in nan.reason


def test_champion_rules():
    assert check_champion(0.4, None).promote  # no champion: the first passing model takes it
    assert check_champion(0.7, 0.7).promote  # "at least as good"
    assert not check_champion(0.69, 0.7).promote
    assert not check_champion(0.72, 0.7, margin=0.05).promote  # must beat by the margin
    assert check_champion(0.75, 0.7, margin=0.05).promote
    assert check_champion(0.68, 0.7, margin=-0.05).promote  # a tolerated regression
    assert check_champion(0.1, float("nan")).promote  # an unmeasured champion is replaced
