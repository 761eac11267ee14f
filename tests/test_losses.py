"""Per-pair losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.losses import dpo_loss, implicit_rewards, ipo_loss, pair_losses, reward_margin


def test_reward_margin_by_hand():
    # chosen: log π = -1, log π_ref = -3 (+2); rejected: log π = -4, log π_ref = -2 (-2) → h = 4
    h = reward_margin(
        torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-3.0]), torch.tensor([-2.0])
    )
    assert h.item() == pytest.approx(4.0)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_zero_margin_gives_log2_for_dpo(beta):
    assert dpo_loss(torch.zeros(3), beta).tolist() == pytest.approx([math.log(2)] * 3)


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5])
def test_zero_margin_gives_quarter_beta_squared_for_ipo(beta):
    assert ipo_loss(torch.zeros(2), beta).tolist() == pytest.approx([1 / (4 * beta**2)] * 2)


def test_dpo_loss_by_hand():
    # β h = 0.5 · 2 = 1 → −log σ(1) = log(1 + e^{−1})
    assert dpo_loss(torch.tensor([2.0]), 0.5).item() == pytest.approx(math.log1p(math.exp(-1)))
    # a large negative margin costs about |β h|
    assert dpo_loss(torch.tensor([-100.0]), 1.0).item() == pytest.approx(100.0, rel=1e-6)


def test_ipo_loss_by_hand():
    # β = 0.25 → target margin 1/(2β) = 2; h = 5 → (5 − 2)² = 9
    assert ipo_loss(torch.tensor([5.0]), 0.25).item() == pytest.approx(9.0)
    assert ipo_loss(torch.tensor([2.0]), 0.25).item() == pytest.approx(0.0)


def test_pair_losses_dispatch_and_error():
    h = torch.tensor([0.3, -0.2])
    assert torch.equal(pair_losses("dpo", h, 0.1), dpo_loss(h, 0.1))
    assert torch.equal(pair_losses("ipo", h, 0.1), ipo_loss(h, 0.1))
    with pytest.raises(ValueError, match="unknown preference loss 'kto'"):
        pair_losses("kto", h, 0.1)


def test_implicit_rewards():
    r = implicit_rewards(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), 0.1)
    assert r.tolist() == pytest.approx([0.05, -0.1])
