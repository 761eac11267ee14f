"""Per-group evaluation metrics on hand-made log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.evaluation import evaluate_logps, flatten_metrics, format_table

# Three pairs of group "a", one of group "b". β = 0.5.
# pair:            a1     a2     a3     b1
# policy chosen   -1.0   -2.0   -3.0   -1.0
# policy rejected -2.0   -1.0   -3.0   -4.0
# ref chosen      -1.0   -1.0   -2.0   -2.0
# ref rejected    -1.0   -1.0   -2.0   -2.0
# h = (pc-rc)-(pr-rr): 1.0, -1.0, 0.0, 3.0 ; reward margin βh: 0.5, -0.5, 0, 1.5
GROUPS = ["a", "a", "a", "b"]
PC = torch.tensor([-1.0, -2.0, -3.0, -1.0])
PR = torch.tensor([-2.0, -1.0, -3.0, -4.0])
RC = torch.tensor([-1.0, -1.0, -2.0, -2.0])
RR = torch.tensor([-1.0, -1.0, -2.0, -2.0])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_group_metrics_by_hand():
    res = evaluate_logps(GROUPS, PC, PR, RC, RR, loss="dpo", beta=0.5)
    a, b = res["groups"]["a"], res["groups"]["b"]
    # DPO loss −log σ(βh) = softplus(−βh)
    assert a["loss"] == pytest.approx((softplus(-0.5) + softplus(0.5) + math.log(2)) / 3)
    assert b["loss"] == pytest.approx(softplus(-1.5))
    assert a["reward_accuracy"] == pytest.approx(1 / 3)  # only a1 (a3 is a tie: not correct)
    assert b["reward_accuracy"] == 1.0
    assert a["logprob_accuracy"] == pytest.approx(1 / 3)  # a1: -1 > -2 ; a3 tie
    assert a["reward_margin"] == pytest.approx(0.0)
    assert b["reward_margin"] == pytest.approx(1.5)
    assert (a["pairs"], b["pairs"]) == (3, 1)
    assert res["overall"]["reward_accuracy"] == pytest.approx(0.5)
    assert res["overall"]["reward_margin"] == pytest.approx(1.5 / 4)
    assert res["overall"]["pairs"] == 4
    assert res["worst_group"]["loss"] == {"group": "a", "value": pytest.approx(a["loss"])}
    assert res["worst_group"]["reward_accuracy"]["group"] == "a"
    assert res["group_gap"]["reward_accuracy"] == pytest.approx(2 / 3)
    assert res["group_gap"]["loss"] == pytest.approx(a["loss"] - b["loss"])


def test_ipo_loss_and_flat_names():
    res = evaluate_logps(GROUPS, PC, PR, RC, RR, loss="ipo", beta=0.5)
    # IPO (h − 1/(2β))² = (h − 1)²: a: 0, 4, 1 → 5/3 ; b: 4
    assert res["groups"]["a"]["loss"] == pytest.approx(5 / 3)
    assert res["groups"]["b"]["loss"] == pytest.approx(4.0)
    assert res["worst_group"]["loss"]["group"] == "b"
    flat = flatten_metrics(res)
    assert flat["eval/group/a/loss"] == pytest.approx(5 / 3)
    assert flat["eval/group/b/pairs"] == 1.0
    assert flat["eval/worst_group/loss"] == pytest.approx(4.0)
    assert flat["eval/overall/pairs"] == 4.0
    assert flat["eval/group_gap/logprob_accuracy"] == pytest.approx(2 / 3)
    metrics = ("loss", "reward_accuracy", "logprob_accuracy", "reward_margin")
    for section in ("worst_group", "group_gap", "overall"):
        assert all(f"eval/{section}/{m}" in flat for m in metrics)
    assert "worst group" in format_table(res)


def test_no_pairs_is_an_error():
    with pytest.raises(ValueError, match="no pairs"):
        evaluate_logps([], torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0))


def test_intervals_per_group_by_hand():
    res = evaluate_logps(GROUPS, PC, PR, RC, RR, loss="dpo", beta=0.5, confidence=0.95)
    a, b = res["groups"]["a"], res["groups"]["b"]
    # a: 1 correct of 3. Wilson, z = 1.959964, z² = 3.841459, z²/n = 1.280486:
    # centre (1/3 + 0.640243)/2.280486 = 0.426916; half 1.959964·√(2/27 + 0.106707)/2.280486
    # = 1.959964·0.425184/2.280486 = 0.365424 → (0.061492, 0.792340)
    assert a["reward_accuracy_ci_low"] == pytest.approx(0.061492, abs=2e-6)
    assert a["reward_accuracy_ci_high"] == pytest.approx(0.792340, abs=2e-6)
    # b: 1 of 1: low = 1/(1 + z²) = 0.206543, high 1
    assert b["reward_accuracy_ci_low"] == pytest.approx(1 / (1 + 3.841459), abs=1e-6)
    assert b["reward_accuracy_ci_high"] == 1.0
    assert (
        res["overall"]["logprob_accuracy_ci_low"] < 0.5 < res["overall"]["logprob_accuracy_ci_high"]
    )
    point = evaluate_logps(GROUPS, PC, PR, RC, RR, beta=0.5, confidence=0.0)["groups"]["a"]
    assert (
        point["reward_accuracy_ci_low"] == point["reward_accuracy_ci_high"] == pytest.approx(1 / 3)
    )
    flat = flatten_metrics(res)
    assert flat["eval/group/a/reward_accuracy_ci_low"] == a["reward_accuracy_ci_low"]
    assert flat["eval/group/b/logprob_accuracy_ci_high"] == 1.0
    assert "[0.06, 0.79]" in format_table(res)  # a's reward-accuracy interval


def test_per_pair_outcomes_in_row_order():
    res = evaluate_logps(GROUPS, PC, PR, RC, RR, beta=0.5)
    assert res["per_pair"] == {"reward_accuracy": [1, 0, 0, 1], "logprob_accuracy": [1, 0, 0, 1]}


def test_a_configured_group_without_pairs_is_reported_and_worst():
    res = evaluate_logps(GROUPS, PC, PR, RC, RR, beta=0.5, expected_groups=["a", "b", "China"])
    china = res["groups"]["China"]
    assert china["pairs"] == 0
    assert all(math.isnan(china[m]) for m in ("loss", "reward_accuracy", "reward_accuracy_ci_low"))
    # the worst group is unknown: named, with a NaN value, never the worst of the others
    assert res["worst_group"]["reward_accuracy"]["group"] == "China"
    assert math.isnan(res["worst_group"]["reward_accuracy"]["value"])
    assert math.isnan(res["group_gap"]["loss"])
    assert res["groups"]["a"]["pairs"] == 3 and res["overall"]["pairs"] == 4
    flat = flatten_metrics(res)
    assert flat["eval/group/China/pairs"] == 0.0
    assert math.isnan(flat["eval/worst_group/reward_accuracy"])
    assert "China" in format_table(res)
