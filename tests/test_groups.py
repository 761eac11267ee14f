"""Group reductions, weights and the mirror-ascent update against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.groups import (
    ALPHA_FLOOR,
    METHODS,
    GroupWeights,
    collapse_eta,
    effective_groups,
    fixed_group_weights,
    group_counts,
    group_loss_estimates,
    group_means,
    group_sums,
    mirror_ascent_step,
    mix_weights,
    pair_coefficients,
    parse_method,
    robust_objective,
    size_adjustment,
)
from grpo.losses import loss_at_zero_margin

# A pooled training set of N = 40 pairs: group 0 has 30, group 1 has 10.
SIZES = torch.tensor([30.0, 10.0])
# One optimizer step of B = 4 pairs: three from group 0, one from group 1.
IDX = torch.tensor([0, 0, 0, 1])
LOSSES = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)


def test_parse_method_covers_the_six_methods():
    assert sorted(METHODS) == ["dpo", "gr-dpo", "gr-ipo", "ipo", "is-dpo", "is-ipo"]
    m = parse_method("GR-IPO")
    assert (m.loss, m.weighting, m.robust) == ("ipo", "robust", True)
    assert parse_method("is-dpo").weighting == "importance"
    with pytest.raises(ValueError, match="unknown method 'grpo'"):
        parse_method("grpo")


def test_group_sums_counts_means():
    assert group_sums(LOSSES, IDX, 3).tolist() == [6.0, 4.0, 0.0]
    assert group_counts(IDX, 3).tolist() == [3.0, 1.0, 0.0]
    means = group_means(LOSSES, IDX, 3)
    assert means[:2].tolist() == [2.0, 4.0]
    assert math.isnan(means[2].item())


def test_group_loss_estimates_by_hand():
    # L̂_g = N/(B N_g) S_g: 40/(4·30)·6 = 2, 40/(4·10)·4 = 4
    est = group_loss_estimates(torch.tensor([6.0, 4.0], dtype=torch.float64), SIZES, 4)
    assert est.tolist() == pytest.approx([2.0, 4.0])


def test_estimator_is_unbiased_over_all_batches():
    # Average of L̂_g over every uniformly drawn single-pair batch equals the true group mean.
    sizes = torch.tensor([3.0, 1.0])
    idx = torch.tensor([0, 0, 0, 1])
    losses = torch.tensor([1.0, 2.0, 6.0, 5.0], dtype=torch.float64)
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(4):
        total += group_loss_estimates(group_sums(losses[i : i + 1], idx[i : i + 1], 2), sizes, 1)
    assert (total / 4).tolist() == pytest.approx([3.0, 5.0])  # (1+2+6)/3, 5/1


def test_uniform_pair_weights_reproduce_the_mean_loss():
    w = fixed_group_weights("pooled", SIZES)
    assert w.tolist() == pytest.approx([0.75, 0.25])
    c = pair_coefficients(w, IDX, SIZES, 4)
    assert c.tolist() == pytest.approx([0.25] * 4)
    assert (c * LOSSES).sum().item() == pytest.approx(LOSSES.mean().item())


def test_importance_weights_are_proportional_to_inverse_group_size():
    w = fixed_group_weights("importance", SIZES)
    assert w.tolist() == pytest.approx([0.5, 0.5])
    c = pair_coefficients(w, IDX, SIZES, 4)
    # c_i = N w_g/(B N_g): 40·0.5/(4·30) = 1/6 and 40·0.5/(4·10) = 1/2, i.e. ∝ 1/N_g
    assert c.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    assert (c[0] / c[3]).item() == pytest.approx((1 / 30) / (1 / 10))


def test_pair_coefficients_equal_the_weighted_group_objective():
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    c = pair_coefficients(w, IDX, SIZES, 4)
    assert c.tolist() == pytest.approx([1 / 12, 1 / 12, 1 / 12, 0.75])
    est = group_loss_estimates(group_sums(LOSSES, IDX, 2), SIZES, 4)  # (2, 4)
    assert (c * LOSSES).sum().item() == pytest.approx(robust_objective(est, w).item())
    assert robust_objective(est, w).item() == pytest.approx(0.25 * 2 + 0.75 * 4)


def test_mirror_ascent_step_by_hand():
    alpha = torch.tensor([0.5, 0.5], dtype=torch.float64)
    new = mirror_ascent_step(alpha, torch.tensor([1.0, 2.0]), 0.5)
    # α ∝ (0.5 e^{0.5}, 0.5 e^{1}) → α_0 = 1 / (1 + e^{0.5})
    expected0 = 1 / (1 + math.exp(0.5))
    assert new.tolist() == pytest.approx([expected0, 1 - expected0])
    assert new[1] > alpha[1]  # the worst group's weight rises


def test_mirror_ascent_stays_on_simplex_and_does_not_overflow():
    alpha = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    for _ in range(50):
        alpha = mirror_ascent_step(alpha, torch.tensor([10.0, 30.0, 20.0]), 100.0)
        assert torch.isfinite(alpha).all()
        assert (alpha >= 0).all()
        assert alpha.sum().item() == pytest.approx(1.0)
    assert alpha.argmax().item() == 1
    assert alpha[1].item() == pytest.approx(1.0)


def test_mirror_ascent_batched_rows_are_independent():
    alpha = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    losses = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    batched = mirror_ascent_step(alpha, losses, 0.7)
    for row in range(2):
        single = mirror_ascent_step(alpha[row], losses[row], 0.7)
        assert batched[row].tolist() == pytest.approx(single.tolist())


def test_mix_weights_and_size_adjustment():
    alpha = torch.tensor([0.9, 0.1], dtype=torch.float64)
    assert mix_weights(alpha, 1.0).tolist() == pytest.approx([0.9, 0.1])
    assert mix_weights(alpha, 0.0).tolist() == pytest.approx([0.5, 0.5])
    assert mix_weights(alpha, 0.5).tolist() == pytest.approx([0.7, 0.3])
    assert size_adjustment(torch.tensor([4.0, 16.0]), 1.0).tolist() == pytest.approx([0.5, 0.25])


def test_robust_objective_with_worst_group_alpha_is_the_max_loss():
    losses = torch.tensor([0.3, 0.9, 0.5])
    assert robust_objective(losses, torch.tensor([0.0, 1.0, 0.0])).item() == pytest.approx(0.9)


def test_group_weights_robust_update_moves_toward_worst_group():
    gw = GroupWeights("gr-dpo", [30, 10], eta=0.5)
    assert gw.weights.tolist() == pytest.approx([0.5, 0.5])
    gw.update(torch.tensor([1.0, 2.0]))
    expected0 = 1 / (1 + math.exp(0.5))
    assert gw.alpha.tolist() == pytest.approx([expected0, 1 - expected0])
    assert gw.weights.tolist() == pytest.approx(gw.alpha.tolist())


def test_group_weights_size_adjustment_enters_the_update():
    # equal losses, C = 2: adjusted losses 2/√4 = 1 and 2/√16 = 0.5 → the small group gains
    gw = GroupWeights("gr-ipo", [4, 16], eta=1.0, size_c=2.0)
    gw.update(torch.tensor([0.0, 0.0]))
    expected0 = math.exp(1.0) / (math.exp(1.0) + math.exp(0.5))
    assert gw.alpha.tolist() == pytest.approx([expected0, 1 - expected0])


def test_group_weights_chi_tradeoff():
    gw = GroupWeights("gr-dpo", [10, 10], eta=1.0, chi=0.5)
    gw.update(torch.tensor([0.0, math.log(3.0)]))  # α = (1/4, 3/4)
    assert gw.alpha.tolist() == pytest.approx([0.25, 0.75])
    assert gw.weights.tolist() == pytest.approx([0.375, 0.625])


def test_group_weights_fixed_methods_ignore_updates():
    for name, expected in [("dpo", [0.75, 0.25]), ("is-ipo", [0.5, 0.5])]:
        gw = GroupWeights(name, [30, 10], eta=5.0)
        gw.update(torch.tensor([0.1, 9.0]))
        assert gw.weights.tolist() == pytest.approx(expected)


def test_group_weights_state_round_trip_and_validation():
    gw = GroupWeights("gr-dpo", [5, 7, 9], eta=0.3, chi=0.8, size_c=0.1)
    gw.update(torch.tensor([0.2, 0.9, 0.4]))
    other = GroupWeights("gr-dpo", [5, 7, 9])
    other.load_state_dict(gw.state_dict())
    assert torch.equal(other.alpha, gw.alpha)
    assert (other.eta, other.chi, other.size_c) == (0.3, 0.8, 0.1)
    with pytest.raises(ValueError, match="shape"):
        GroupWeights("gr-dpo", [5, 7]).load_state_dict(gw.state_dict())
    with pytest.raises(ValueError, match="chi"):
        GroupWeights("gr-dpo", [5, 7], chi=1.5)
    with pytest.raises(ValueError, match="positive"):
        GroupWeights("gr-dpo", [5, 0])


# --- one meaning of η_α at every loss scale (issue 15) -----------------------------------------


def test_loss_at_zero_margin_by_hand():
    assert loss_at_zero_margin("dpo", 0.1) == pytest.approx(0.6931471805599453)
    assert loss_at_zero_margin("ipo", 0.01) == pytest.approx(2500.0)
    assert loss_at_zero_margin("ipo", 0.5) == pytest.approx(1.0)


def test_first_step_at_ipo_beta_001_with_the_default_eta():
    # L̂ near IPO's starting level 1/(4·0.01²) = 2500: the step moves log α by η·L̂/2500 ≈ 0.05.
    gw = GroupWeights("gr-ipo", [10, 10, 10], eta=0.05, loss_scale=2500.0)
    gw.update(torch.tensor([2500.0, 2600.0, 2400.0]))
    z = [math.exp(0.05), math.exp(0.052), math.exp(0.048)]
    assert gw.alpha.tolist() == pytest.approx([v / sum(z) for v in z], rel=1e-12)
    assert max(gw.alpha.tolist()) < 0.35  # spread, not one-hot
    raw = GroupWeights("gr-ipo", [10, 10, 10], eta=0.05)  # the old, unnormalised step
    raw.update(torch.tensor([2500.0, 2600.0, 2400.0]))
    assert raw.alpha[1] > 1 - 1e-2  # exp(0.05·100) against its neighbours: one-hot at once


def test_first_step_at_dpo_beta_01_with_the_default_eta():
    gw = GroupWeights("gr-dpo", [30, 10], eta=0.05, loss_scale=math.log(2.0))
    gw.update(torch.tensor([0.7, 0.6]))
    d = 0.05 * (0.7 - 0.6) / math.log(2.0)  # log α0 − log α1 after the step
    assert gw.alpha.tolist() == pytest.approx([1 / (1 + math.exp(-d)), 1 / (1 + math.exp(d))])


def test_no_weight_reaches_zero_and_a_floored_group_comes_back():
    gw = GroupWeights("gr-ipo", [10, 10, 10], eta=0.05)  # raw IPO losses at β = 0.01
    for _ in range(1000):
        gw.update(torch.tensor([2500.0, 0.0, 10.0]))
    assert (gw.alpha > 0).all()
    assert gw.alpha[1].item() == pytest.approx(ALPHA_FLOOR, rel=1e-6)
    # log α1 = log(1e-30) ≈ −69.08 climbs 0.05·2500 = 125 per step relative to group 0 once
    # group 1 holds the higher loss: one step lifts it above group 0.
    gw.update(torch.tensor([0.0, 2500.0, 0.0]))
    assert int(gw.alpha.argmax()) == 1


def test_effective_groups_by_hand():
    assert effective_groups(torch.full((5,), 0.2)) == pytest.approx(5.0)
    assert effective_groups(torch.tensor([0.5, 0.5, 0.0])) == pytest.approx(2.0)
    assert effective_groups(torch.tensor([1.0, 0.0])) == pytest.approx(1.0)
    a = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    h = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert effective_groups(a) == pytest.approx(math.exp(h))


def test_collapse_detection_and_the_suggested_eta():
    gw = GroupWeights("gr-dpo", [10, 10, 10], eta=1.0)
    gw.update(torch.tensor([10.0, 0.0, 0.0]))  # log α0 − log α1 = 10: α0 = e¹⁰/(e¹⁰ + 2)
    assert gw.collapsed() == 0
    eta = collapse_eta(gw.alpha, gw.eta, target=0.5)
    # softmax(c·[10, 0, 0]) has max 0.5 when e^{10c} = 2, c = ln 2 / 10
    assert eta == pytest.approx(math.log(2.0) / 10, rel=1e-9)
    calm = GroupWeights("gr-dpo", [10, 10, 10], eta=eta)
    calm.update(torch.tensor([10.0, 0.0, 0.0]))
    assert calm.alpha.max().item() == pytest.approx(0.5)
    assert calm.collapsed() is None
    assert GroupWeights("dpo", [10, 90]).collapsed() is None  # fixed weights never collapse


def test_state_dict_keeps_log_alpha_and_reads_old_checkpoints():
    gw = GroupWeights("gr-ipo", [4, 6], eta=0.05, loss_scale=2500.0)
    gw.update(torch.tensor([3000.0, 1000.0]))
    other = GroupWeights("gr-ipo", [4, 6])
    other.load_state_dict(gw.state_dict())
    assert torch.equal(other.log_alpha, gw.log_alpha) and other.loss_scale == 2500.0
    old = {"alpha": torch.tensor([1.0, 0.0]), "eta": 0.1, "chi": 1.0, "size_c": 0.0}
    other.load_state_dict(old)
    assert other.alpha[1].item() == pytest.approx(ALPHA_FLOOR, rel=1e-6)
    assert other.loss_scale == 1.0
