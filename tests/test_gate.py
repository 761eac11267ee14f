"""The registration gate as a pure predicate, with hand-made numbers and hand-computed intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from grpo.gate import (
    check_champion,
    check_gate,
    group_evidence,
    paired_comparison,
    worst_group_key,
)

Z95 = 1.959964  # the two-sided 95% standard normal quantile, from a printed table


def wilson_low_by_hand(k: int, n: int, z: float = Z95) -> float:
    """The Wilson lower bound written out step by step (not grpo.stats' code)."""
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = (z / (1 + z2 / n)) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return centre - half


def _metrics(counts: dict[str, tuple[int, int]], metric: str = "reward_accuracy") -> dict:
    """Flat metrics of groups with (correct, pairs) each, as the evaluation names them."""
    out: dict[str, float] = {}
    for g, (k, n) in counts.items():
        out[f"eval/group/{g}/{metric}"] = k / n if n else math.nan
        out[f"eval/group/{g}/pairs"] = float(n)
    values = [k / n for k, n in counts.values() if n]
    out[worst_group_key(metric)] = min(values) if values else math.nan
    out[f"eval/overall/{metric}"] = 0.95  # a good average must never rescue a bad group
    return out


POINT = {"confidence": 0.0, "min_group_pairs": 0}  # today's point-estimate gate


def test_wilson_bounds_by_hand_and_from_the_textbook():
    # 8 of 10 at 95%: z²/n = 0.384146; centre (0.8 + 0.192073)/1.384146 = 0.716740;
    # half 1.959964·√(0.016 + 0.0096036)/1.384146 = 0.226578 → (0.490162, 0.943318)
    ev = group_evidence(_metrics({"a": (8, 10)}), "reward_accuracy", 0.95)["a"]
    assert ev["low"] == pytest.approx(0.716740 - 0.226578, abs=2e-6)
    assert ev["high"] == pytest.approx(0.716740 + 0.226578, abs=2e-6)
    assert ev["low"] == pytest.approx(wilson_low_by_hand(8, 10), abs=1e-6)
    # Newcombe (1998), Stat. Med. 17:857, Table I, method 3 (score interval): 81/263 and 15/148
    for (k, n), (low, high) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605)}.items():
        ev = group_evidence(_metrics({"g": (k, n)}), "reward_accuracy", 0.95)["g"]
        assert (round(ev["low"], 4), round(ev["high"], 4)) == (low, high)
    assert ev["pairs"] == 148 and ev["value"] == pytest.approx(15 / 148)


def test_point_gate_passes_at_and_above_threshold():
    assert check_gate(_metrics({"a": (9, 10), "b": (6, 10)}), 0.6, **POINT).passed  # equality
    assert check_gate(_metrics({"a": (9, 10), "b": (0, 10)}), 0.0, **POINT).passed
    decision = check_gate(_metrics({"a": (10, 10), "b": (59, 100)}), 0.6, **POINT)
    assert not decision.passed and decision.decision == "rejected"
    assert decision.value == pytest.approx(0.59) and decision.group == "b"
    assert "0.5900 on 100 pairs (point estimate) < threshold 0.6000" in decision.reason
    assert not check_gate(_metrics({"a": (10, 10), "b": (10, 10)}), 1.01, **POINT).passed


def test_gate_on_the_lower_bound():
    # 16/20 = 0.8 looks fine, but its 95% lower bound is 0.5840 < 0.6: rejected
    low16 = wilson_low_by_hand(16, 20)
    assert low16 == pytest.approx(0.58399, abs=1e-4)
    d = check_gate(_metrics({"a": (38, 40), "b": (16, 20)}), 0.6, min_group_pairs=20)
    assert not d.passed and d.group == "b" and d.pairs == 20
    assert d.bound == pytest.approx(low16, abs=1e-6)
    assert d.margin == pytest.approx(low16 - 0.6, abs=1e-6)
    assert d.reason == (
        f"b decides: reward_accuracy 0.8000 on 20 pairs, 95% lower bound {low16:.4f} < "
        f"threshold 0.6000 (margin {low16 - 0.6:+.4f})"
    )
    # the same accuracy on twice the pairs: 32/40 has lower bound 0.6524 >= 0.6
    low32 = wilson_low_by_hand(32, 40)
    d = check_gate(_metrics({"a": (38, 40), "b": (32, 40)}), 0.6)
    assert d.passed and d.group == "b" and d.bound == pytest.approx(low32, abs=1e-6)
    assert (d.confidence, d.min_group_pairs) == (0.95, 20)
    assert f"lower bound {low32:.4f} >= threshold 0.6000 (margin +{low32 - 0.6:.4f})" in d.reason


def test_the_lowest_bound_decides_not_the_lowest_point():
    # a: 9/10 = 0.90 with bound 0.5958; b: 85/100 = 0.85 with bound 0.7672
    metrics = _metrics({"a": (9, 10), "b": (85, 100)})
    d = check_gate(metrics, 0.6, min_group_pairs=10)
    assert not d.passed and d.group == "a"
    assert d.bound == pytest.approx(wilson_low_by_hand(9, 10), abs=1e-6)
    assert d.value == pytest.approx(0.85)  # the worst group's point value is b's
    assert check_gate(metrics, 0.6, **POINT).passed  # the point gate would have passed


def test_too_few_pairs_rejects_whatever_the_threshold():
    metrics = _metrics({"Nigeria": (30, 30), "China": (4, 4), "Japan": (12, 12)})
    d = check_gate(metrics, 0.0)
    assert not d.passed and d.group == "China" and d.pairs == 4
    assert d.reason == ("too few evaluated pairs: China 4, Japan 12 < register.min_group_pairs 20")
    assert check_gate(metrics, 0.0, min_group_pairs=4).passed


def test_a_group_without_pairs_rejects_naming_it():
    metrics = _metrics({"a": (40, 40), "b": (0, 0)})
    d = check_gate(metrics, 0.0, **POINT)
    assert not d.passed and d.group == "b" and d.pairs == 0
    assert d.reason == "no evaluated pairs for group(s) b"


def test_unknown_counts_nan_and_missing_figures():
    no_counts = {"eval/group/a/reward_accuracy": 0.9, "eval/group/b/reward_accuracy": 0.7}
    d = check_gate(no_counts, 0.5)
    assert not d.passed and "number of evaluated pairs unknown for group(s) a, b" in d.reason
    assert check_gate(no_counts, 0.5, **POINT).passed  # the point gate needs no count
    assert not check_gate(no_counts, 0.8, **POINT).passed
    assert not check_gate({}, 0.0).passed and "no per-group" in check_gate({}, 0.0).reason
    nan = {"eval/group/a/reward_accuracy": math.nan, "eval/group/a/pairs": 30.0}
    d = check_gate(nan, 0.0)
    assert not d.passed and math.isnan(d.value) and "missing or NaN for group(s) a" in d.reason


def test_gate_metric_is_configurable():
    metrics = {
        **_metrics({"a": (3, 10), "b": (10, 10)}, "reward_accuracy"),
        **_metrics({"a": (8, 10), "b": (10, 10)}, "logprob_accuracy"),
    }
    assert not check_gate(metrics, 0.5, "reward_accuracy", **POINT).passed
    assert check_gate(metrics, 0.5, "logprob_accuracy", **POINT).passed
    with pytest.raises(ValueError, match="gate metric"):
        check_gate(metrics, 0.5, "loss")


def test_champion_rules():
    assert check_champion(0.4, None).promote  # no champion: the first passing model takes it
    assert check_champion(0.7, 0.7).promote  # "at least as good"
    assert not check_champion(0.69, 0.7).promote
    assert not check_champion(0.72, 0.7, margin=0.05).promote  # must beat by the margin
    assert check_champion(0.75, 0.7, margin=0.05).promote
    assert check_champion(0.68, 0.7, margin=-0.05).promote  # a tolerated regression
    assert check_champion(0.1, float("nan")).promote  # an unmeasured champion is replaced


def test_paired_comparison_by_hand():
    groups = ["a"] * 4 + ["b"] * 4
    challenger = np.array([1, 1, 1, 0, 1, 1, 0, 0])  # a 0.75, b 0.50 → worst b, 0.50
    champion = np.array([0, 0, 1, 0, 1, 1, 1, 1])  # a 0.25, b 1.00 → worst a, 0.25
    out = paired_comparison(challenger, champion, groups, samples=500, seed=3)
    assert out["difference"] == pytest.approx(0.50 - 0.25)
    assert out["group"] == "b"  # the challenger's worst group
    # in b: right only for the challenger: none; only for the champion: 2 (pairs 7, 8)
    assert (out["only_challenger"], out["only_champion"]) == (0, 2)
    assert out["mcnemar_p"] == pytest.approx(2 * (1 / 4))  # 2·P(X ≤ 0), X ~ Bin(2, 1/2)
    assert out["low"] <= out["difference"] <= out["high"] and out["pairs"] == 8
    assert paired_comparison(challenger, champion, groups, samples=500, seed=3) == out  # seeded


def test_paired_comparison_resamples_both_models_together():
    # the same outcomes for both: every paired resample gives 0 (an unpaired one would not)
    rng = np.random.default_rng(0)
    outcomes = rng.integers(0, 2, 60)
    groups = ["x"] * 20 + ["y"] * 40
    out = paired_comparison(outcomes, outcomes.copy(), groups, samples=300)
    assert (out["difference"], out["low"], out["high"]) == (0.0, 0.0, 0.0)
    assert out["share_at_or_below_zero"] == 1.0 and out["mcnemar_p"] == 1.0
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_comparison(outcomes, outcomes[:10], groups)
