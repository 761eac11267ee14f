"""The paper's synthetic group bandit (Section 5.1, Figure 2): features, rewards, data collection.

Notation (``docs/algorithm.md`` §3): state x ∈ [0,1]², action a ∈ {0..7}, group g ∈ {0,1},
u = a/8 + 1. Group 0's feature map is φ_0(x,a) = [u cos πx₁, sin πx₁ / u, u cos πx₂, sin πx₂ / u];
group 1's is one of

- ``swapped``: φ_1(x,a) = [sin πx₁ / u, u cos πx₁, sin πx₂ / u, u cos πx₂]   (the paper's scripts)
- ``flipped``: φ_1(x,a) = [u sin πx₁, cos πx₁ / u, u sin πx₂, cos πx₂ / u]   (the plotting script)

True rewards r_g(x,a) = θ*_gᵀ φ_g(x,a) with θ*_0 = [1,3,1,3], θ*_1 = [3,1,3,1]. The policy is one
shared θ ∈ ℝ⁴: π_θ(a|x,g) ∝ exp(θᵀφ_g(x,a)), with a uniform reference policy.

Data (one data set per scenario and seed, shared by every method so that they differ only in
how they train): training pairs with group 0's share of the data fixed exactly
(round(share·N) pairs), validation pairs with equal groups, test states for the reward error,
and the initial θ_0 ~ U[0, 5]⁴.

- ``even`` pairs: two distinct actions drawn uniformly.
- ``uneven`` pairs: group 0 compares a with a±1 (reflected at the ends: the small reward gap makes
  it the harder group), group 1 compares a with (a+4) mod 8.
- Labels: ``deterministic`` (the action with the higher true reward wins; a tie goes to the second
  action) or ``bradley-terry`` (the second wins with probability σ(r₂ − r₁)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUM_ACTIONS = 8
NUM_GROUPS = 2
STATE_DIM = 2
FEATURE_DIM = 2 * STATE_DIM
FEATURE_TYPES = ("swapped", "flipped")
LABEL_TYPES = ("deterministic", "bradley-terry")
TRUE_THETA = torch.tensor([[1.0, 3.0, 1.0, 3.0], [3.0, 1.0, 3.0, 1.0]], dtype=torch.float64)


def features(
    states: torch.Tensor, actions: torch.Tensor, groups: torch.Tensor, feature_type: str = "swapped"
) -> torch.Tensor:
    """φ_g(x, a): states (..., 2), actions (...) int, groups (...) int → (..., 4) float64.

    Leading shapes broadcast against each other.
    """
    if feature_type not in FEATURE_TYPES:
        raise ValueError(f"unknown feature type {feature_type!r}; expected one of {FEATURE_TYPES}")
    x = states.to(torch.float64)
    u = actions.to(torch.float64) / NUM_ACTIONS + 1.0
    cos, sin = torch.cos(torch.pi * x), torch.sin(torch.pi * x)  # (..., 2)
    u = u.unsqueeze(-1)
    group0 = torch.stack(
        [u * cos, sin / u], dim=-1
    )  # (..., 2 coords, 2) → [u cos, sin/u] per coord
    if feature_type == "swapped":
        group1 = torch.stack([sin / u, u * cos], dim=-1)
    else:
        group1 = torch.stack([u * sin, cos / u], dim=-1)
    is1 = (groups != 0).unsqueeze(-1).unsqueeze(-1)
    out = torch.where(is1, group1, group0)
    return out.flatten(-2)


def true_rewards(
    states: torch.Tensor, actions: torch.Tensor, groups: torch.Tensor, feature_type: str = "swapped"
) -> torch.Tensor:
    """r_g(x, a) = θ*_gᵀ φ_g(x, a) → (...)."""
    phi = features(states, actions, groups, feature_type)
    theta = TRUE_THETA[groups.long()]
    return (phi * theta).sum(-1)


@dataclass(frozen=True)
class Pairs:
    """Preference pairs of one data set. Shapes: states (N, 2), chosen/rejected/groups (N,)."""

    states: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    groups: torch.Tensor

    def delta_phi(self, feature_type: str) -> torch.Tensor:
        """Δφ_i = φ_g(x_i, y_w) − φ_g(x_i, y_l), (N, 4)."""
        return features(self.states, self.chosen, self.groups, feature_type) - features(
            self.states, self.rejected, self.groups, feature_type
        )


@dataclass(frozen=True)
class DataSet:
    """Everything one (scenario, seed) needs: train/validation pairs, test states, θ_0."""

    train: Pairs
    val: Pairs
    test_states: torch.Tensor  # (T, 2)
    theta0: torch.Tensor  # (4,)


def group_layout(num_pairs: int, group0_share: float) -> torch.Tensor:
    """Group ids (N,): round(share·N) pairs of group 0 first, then group 1 (full batch: order is moot)."""
    n0 = round(group0_share * num_pairs)
    if not 0 < n0 < num_pairs:
        raise ValueError(
            f"group 0 share {group0_share} of {num_pairs} pairs leaves a group empty ({n0} pairs)"
        )
    return torch.cat(
        [torch.zeros(n0, dtype=torch.long), torch.ones(num_pairs - n0, dtype=torch.long)]
    )


def _actions(
    rng: np.random.Generator, groups: np.ndarray, uneven: bool
) -> tuple[np.ndarray, np.ndarray]:
    n = groups.shape[0]
    first = rng.integers(0, NUM_ACTIONS, size=n)
    if not uneven:
        second = (first + rng.integers(1, NUM_ACTIONS, size=n)) % NUM_ACTIONS  # distinct, uniform
        return first, second
    step = 2 * rng.integers(0, 2, size=n) - 1  # ±1
    near = first + step
    near = np.where(near >= NUM_ACTIONS, first - 1, near)
    near = np.where(near < 0, first + 1, near)
    far = (first + NUM_ACTIONS // 2) % NUM_ACTIONS
    return first, np.where(groups == 0, near, far)


def collect_pairs(
    rng: np.random.Generator,
    groups: torch.Tensor,
    *,
    uneven: bool,
    labels: str,
    feature_type: str,
) -> Pairs:
    """Draw states and action pairs for the given group ids and label them by the true rewards."""
    if labels not in LABEL_TYPES:
        raise ValueError(f"unknown label type {labels!r}; expected one of {LABEL_TYPES}")
    g = groups.numpy()
    states = torch.from_numpy(rng.uniform(0.0, 1.0, size=(g.shape[0], STATE_DIM)))
    first, second = _actions(rng, g, uneven)
    a1, a2 = torch.from_numpy(first), torch.from_numpy(second)
    r1 = true_rewards(states, a1, groups, feature_type)
    r2 = true_rewards(states, a2, groups, feature_type)
    if labels == "deterministic":
        second_wins = r2 >= r1
    else:
        p = torch.sigmoid(r2 - r1).numpy()
        second_wins = torch.from_numpy(rng.uniform(size=p.shape) < p)
    chosen = torch.where(second_wins, a2, a1)
    rejected = torch.where(second_wins, a1, a2)
    return Pairs(states, chosen, rejected, groups.clone())


def make_dataset(
    seed: int,
    *,
    uneven: bool,
    group0_share: float,
    feature_type: str = "swapped",
    labels: str = "deterministic",
    train_pairs: int = 300,
    val_pairs: int = 1000,
    test_states: int = 1000,
    theta_limit: float = 5.0,
    stream: int = 0,
) -> DataSet:
    """One reproducible data set; ``stream`` separates scenarios that share a seed."""
    rng = np.random.default_rng([seed, stream])
    train = collect_pairs(
        rng,
        group_layout(train_pairs, group0_share),
        uneven=uneven,
        labels=labels,
        feature_type=feature_type,
    )
    val = collect_pairs(
        rng, group_layout(val_pairs, 0.5), uneven=uneven, labels=labels, feature_type=feature_type
    )
    test = torch.from_numpy(rng.uniform(0.0, 1.0, size=(test_states, STATE_DIM)))
    theta0 = torch.from_numpy(rng.uniform(0.0, theta_limit, size=FEATURE_DIM))
    return DataSet(train, val, test, theta0)
