"""Log-linear policies π_θ(a|x,g) ∝ exp(θᵀφ_g(x,a)) with a uniform reference (paper §4, §5.1).

With a uniform reference the log-partition and the reference cancel inside the reward margin:

    h_i = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)] = θᵀΔφ_i,

Δφ_i = φ(x_i, y_w) − φ(x_i, y_l), so a full-batch step needs only the (N, d) matrix of Δφ.
For the weighted objective J(θ) = Σ_i c_i ℓ(h_i) (c from :func:`grpo.groups.pair_coefficients`):

- DPO, ℓ = −log σ(βh):      ∇J = −β Σ_i c_i σ(−β h_i) Δφ_i
- IPO, ℓ = (h − 1/(2β))²:   ∇J = 2 Σ_i c_i (h_i − 1/(2β)) Δφ_i, minimised in closed form by
  θ = (1/(2β)) (Σ_i c_i Δφ_i Δφ_iᵀ + λI)⁻¹ Σ_i c_i Δφ_i.

Batched shapes: S data sets, M runs per data set (methods), N pairs, d features.
"""

from __future__ import annotations

import torch


def policy_logits(theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """θᵀφ(x, a) for every action: theta (..., d), phi (..., A, d) → (..., A)."""
    return (phi * theta.unsqueeze(-2)).sum(-1)


def policy_log_probs(theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """log π_θ(a|x) = θᵀφ(x,a) − log Σ_a' exp θᵀφ(x,a'): (..., A)."""
    return torch.log_softmax(policy_logits(theta, phi), dim=-1)


def margins(theta: torch.Tensor, delta_phi_t: torch.Tensor) -> torch.Tensor:
    """h = θᵀΔφ for every run and pair: theta (S, M, d), delta_phi_t (S, d, N) → (S, M, N).

    ``delta_phi_t`` is Δφ transposed and contiguous (a batched matrix product is several times
    faster in that layout than with a transposed view).
    """
    return torch.matmul(theta, delta_phi_t)


def dpo_gradient(
    h: torch.Tensor, delta_phi: torch.Tensor, coef: torch.Tensor, beta: torch.Tensor | float
) -> torch.Tensor:
    """∇_θ Σ_i c_i (−log σ(β h_i)) = −β Σ_i c_i σ(−β h_i) Δφ_i.

    h, coef (S, M, N); delta_phi (S, N, d); beta float or (S, M, 1) → (S, M, d).
    """
    weights = coef * torch.sigmoid(h * (-beta))
    return torch.matmul(weights, delta_phi) * (-beta)


def ipo_gradient(
    h: torch.Tensor, delta_phi: torch.Tensor, coef: torch.Tensor, beta: torch.Tensor | float
) -> torch.Tensor:
    """∇_θ Σ_i c_i (h_i − 1/(2β))² = 2 Σ_i c_i (h_i − 1/(2β)) Δφ_i; shapes as :func:`dpo_gradient`."""
    weights = coef * (h - 0.5 / beta)
    return torch.matmul(weights, delta_phi) * 2.0


def ipo_closed_form(
    delta_phi: torch.Tensor,
    coef: torch.Tensor,
    beta: torch.Tensor | float,
    ridge: float = 0.0,
) -> torch.Tensor:
    """argmin_θ Σ_i c_i (θᵀΔφ_i − 1/(2β))² + λ‖θ‖², the weighted least-squares solution

    θ = (1/(2β)) (Σ_i c_i Δφ_i Δφ_iᵀ + λI)⁻¹ Σ_i c_i Δφ_i   (λ = ``ridge``; λ = 0, the paper's
    setting, is the exact minimiser of the weighted IPO objective). delta_phi (S, N, d),
    coef (S, M, N), beta float or (S, M, 1) → (S, M, d).
    """
    weighted = coef.unsqueeze(-1) * delta_phi.unsqueeze(-3)  # (S, M, N, d)
    gram = weighted.transpose(-1, -2) @ delta_phi.unsqueeze(-3)  # (S, M, d, d)
    if ridge:
        gram = gram + ridge * torch.eye(gram.shape[-1], dtype=gram.dtype)
    rhs = weighted.sum(-2)  # (S, M, d)
    return torch.linalg.solve(gram, rhs) / (2.0 * beta)


def group_moments(
    delta_phi: torch.Tensor, group_idx: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group sufficient statistics of the IPO objective: G_g = Σ_{i∈g} Δφ_i Δφ_iᵀ and
    s_g = Σ_{i∈g} Δφ_i. delta_phi (S, N, d), group_idx (S, N) → (S, K, d, d), (S, K, d)."""
    onehot = torch.nn.functional.one_hot(group_idx, num_groups).to(delta_phi.dtype)  # (S, N, K)
    gram = torch.einsum("snk,snd,sne->skde", onehot, delta_phi, delta_phi)
    return gram, onehot.transpose(1, 2) @ delta_phi


def ipo_group_losses(
    theta: torch.Tensor,
    gram: torch.Tensor,
    sums: torch.Tensor,
    sizes: torch.Tensor,
    beta: torch.Tensor | float,
) -> torch.Tensor:
    """L_g(θ) = (1/N_g) Σ_{i∈g} (θᵀΔφ_i − 1/(2β))², exactly, from the group moments:

    L_g = (θᵀG_gθ − θᵀs_g / β + N_g / (4β²)) / N_g. theta (S, M, d), gram (S, K, d, d),
    sums (S, K, d), sizes (S, 1, K), beta float or (S, M, 1) → (S, M, K).
    """
    s, k, d = sums.shape
    g_theta = theta @ gram.permute(0, 2, 1, 3).reshape(s, d, k * d)  # (S, M, K·d): (G_g θ)ᵀ
    quad = (g_theta.view(s, -1, k, d) * theta.unsqueeze(2)).sum(-1)
    lin = theta @ sums.transpose(1, 2)
    return (quad - lin / beta) / sizes + 0.25 / (beta * beta)


def ipo_group_losses_scaled(
    theta: torch.Tensor,
    gram_by_group: torch.Tensor,
    mean_t: torch.Tensor,
    inv_beta: torch.Tensor | float,
    const: torch.Tensor | float,
) -> torch.Tensor:
    """:func:`ipo_group_losses` with the per-group moments divided by N_g once, for a loop:

    L_g = θᵀ(G_g/N_g)θ − θᵀ(s_g/N_g)/β + 1/(4β²). theta (S, M, d); gram_by_group (S, d, K·d),
    column block g = G_g/N_g (``(G/N).permute(0, 2, 1, 3).reshape(S, d, K·d)``); mean_t (S, d, K)
    = (s_g/N_g)ᵀ; inv_beta = 1/β and const = 1/(4β²), floats or (S, M, 1) → (S, M, K).
    """
    s, d, k = mean_t.shape
    g_theta = torch.matmul(theta, gram_by_group).view(s, -1, k, d)  # (G_g θ / N_g)ᵀ
    quad = (g_theta * theta.unsqueeze(2)).sum(-1)
    return quad - torch.matmul(theta, mean_t) * inv_beta + const


def ipo_closed_form_grouped(
    gram: torch.Tensor,
    sums: torch.Tensor,
    group_coef: torch.Tensor,
    beta: torch.Tensor | float,
    ridge: float = 0.0,
) -> torch.Tensor:
    """:func:`ipo_closed_form` when the pair coefficients are constant within a group (c_i =
    c_{g(i)}, as for group weights): Σ_i c_i Δφ_i Δφ_iᵀ = Σ_g c_g G_g and Σ_i c_i Δφ_i = Σ_g c_g s_g.
    group_coef (S, M, K) → θ (S, M, d)."""
    s, k, d = sums.shape
    a = (group_coef @ gram.reshape(s, k, d * d)).view(*group_coef.shape[:2], d, d)
    if ridge:
        a = a + ridge * torch.eye(d, dtype=a.dtype)
    rhs = group_coef @ sums
    return torch.linalg.solve(a, rhs) / (2.0 * beta)
