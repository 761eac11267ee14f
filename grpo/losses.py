"""Per-pair preference losses (paper section 2; ``docs/algorithm.md``).

All functions take summed sequence log-probabilities of shape ``(B,)`` and return per-pair values
of shape ``(B,)``; reductions over pairs and groups live in :mod:`grpo.groups`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_KINDS = ("dpo", "ipo")


def reward_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)], shape (B,)."""
    return (policy_chosen_logps - reference_chosen_logps) - (
        policy_rejected_logps - reference_rejected_logps
    )


def dpo_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO: ℓ = −log σ(β h). Zero margin gives log 2."""
    return -F.logsigmoid(beta * margin)


def ipo_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: ℓ = (h − 1/(2β))². Zero margin gives 1/(4β²)."""
    return (margin - 1.0 / (2.0 * beta)) ** 2


def pair_losses(kind: str, margin: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair loss of ``kind`` ("dpo" or "ipo"), shape (B,)."""
    if kind == "dpo":
        return dpo_loss(margin, beta)
    if kind == "ipo":
        return ipo_loss(margin, beta)
    raise ValueError(f"unknown preference loss {kind!r}; expected one of {LOSS_KINDS}")


def loss_at_zero_margin(kind: str, beta: float) -> float:
    """ℓ(h = 0): log 2 for DPO, 1/(4β²) for IPO. The loss every pair starts at when the policy
    equals the reference; the group-weight step divides by it (:class:`grpo.groups.GroupWeights`)."""
    if kind == "dpo":
        return math.log(2.0)
    if kind == "ipo":
        return 1.0 / (4.0 * beta * beta)
    raise ValueError(f"unknown preference loss {kind!r}; expected one of {LOSS_KINDS}")


def implicit_rewards(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float
) -> torch.Tensor:
    """DPO implicit reward r = β (log π(y|x) − log π_ref(y|x)), shape (B,)."""
    return beta * (policy_logps - reference_logps)
