"""Group reductions, group weights and the robust objective (paper eq. GRPO, Algorithm 1).

Notation (``docs/algorithm.md``): K groups, N_g pairs of group g in the training set, N = Σ N_g.

**The group-loss estimator.** An optimizer step sees B pairs in all (every micro-batch of the
gradient-accumulation window, every rank), drawn uniformly from the pooled data. Group g's loss
is estimated by the importance-weighted sum

    L̂_g = N / (B · N_g) · Σ_{i in step, g(i)=g} ℓ_i ,

an unbiased estimate of the group mean L_g = (1/N_g) Σ_{i∈D_g} ℓ_i. It is what the authors' code
computes (batch sum × N/N_g) divided by B, and its scale does not depend on B or on the number of
accumulation steps. The α step divides L̂ by ℓ₀, the loss at zero margin (:class:`GroupWeights`'s
``loss_scale``), so ``η_α(ours) = B × ℓ₀ × η_α(authors)`` (``docs/training.md``). The robust
objective Σ_g w_g L̂_g is then linear in the per-pair losses with per-pair coefficients
c_i = N w_{g(i)} / (B N_{g(i)})
(:func:`pair_coefficients`), which are known before the forward pass, so the weighted loss can be
back-propagated micro-batch by micro-batch.

**The methods are one objective with different group weights w ∈ Δ_K:**

- ``dpo``/``ipo`` (pooled): w_g = N_g / N, hence c_i = 1/B: the plain mean over pairs.
- ``is-dpo``/``is-ipo`` (importance sampling): w_g = 1/K, hence c_i ∝ 1/N_g: groups count equally.
- ``gr-dpo``/``gr-ipo`` (robust): w = (1−χ)/K + χ α, with α moved toward the worst group by
  mirror ascent α ← α ⊙ exp(η_α (L̂ + C/√N_g) / ℓ₀), normalised, once per optimizer step.

**One meaning of η_α for every loss.** ℓ₀ is the per-pair loss at zero margin (log 2 for DPO,
1/(4β²) for IPO: 2,500 at β = 0.01), the value every group's loss starts from. Dividing by it
makes η_α the change of a group's log-weight in one step for a group whose loss is at its
starting level, whatever the method and β; without it, GR-IPO at β = 0.01 moves log α by
η_α·2,500 per step and α is one-hot after the first step (``docs/training.md``).
:class:`GroupWeights` keeps log α (float64) and floors it at log :data:`ALPHA_FLOOR`, so no weight
underflows to exactly 0 and every group can come back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from grpo.losses import LOSS_KINDS

# Smallest group weight α may reach: far below anything a float32 gradient can feel (1e-7
# relative), while log α stays finite (−69) so a group recovers in a bounded number of steps.
ALPHA_FLOOR = 1e-30
# ``collapse_warning`` fires when one group holds more than this share of α.
COLLAPSE_SHARE = 0.99


@dataclass(frozen=True)
class Method:
    """A preference method: a per-pair loss kind and a group weighting."""

    name: str
    loss: str  # "dpo" | "ipo"
    weighting: str  # "pooled" | "importance" | "robust"

    @property
    def robust(self) -> bool:
        return self.weighting == "robust"


_PREFIX = {"": "pooled", "is-": "importance", "gr-": "robust"}
METHODS: dict[str, Method] = {
    f"{prefix}{loss}": Method(f"{prefix}{loss}", loss, weighting)
    for prefix, weighting in _PREFIX.items()
    for loss in LOSS_KINDS
}


def parse_method(name: str) -> Method:
    """``"gr-dpo"`` → Method(loss="dpo", weighting="robust"); raises on unknown names."""
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}") from None


def group_sums(values: torch.Tensor, group_idx: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Σ of ``values`` (..., B) per group id in ``group_idx`` → (..., K).

    ``group_idx`` is (B,) (one grouping shared by every leading index) or any shape that
    broadcasts against ``values`` (e.g. (S, 1, B): one grouping per batched data set).
    """
    if values.ndim == 1 and group_idx.ndim == 1:
        out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
        return out.index_add(0, group_idx, values)
    out = values.new_zeros((*values.shape[:-1], num_groups))
    return out.scatter_add_(-1, group_idx.expand(values.shape), values)


def group_counts(group_idx: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Number of pairs per group → (K,) float64; for ``group_idx`` (..., B) → (..., K)."""
    if group_idx.ndim == 1:
        return torch.bincount(group_idx, minlength=num_groups).to(torch.float64)
    ones = torch.ones(group_idx.shape, dtype=torch.float64, device=group_idx.device)
    return group_sums(ones, group_idx, num_groups)


def group_means(values: torch.Tensor, group_idx: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of ``values`` (..., B) per group → (..., K); NaN for a group with no pairs.

    ``group_idx`` as in :func:`group_sums`.
    """
    counts = group_counts(group_idx, num_groups).to(values.dtype)
    sums = group_sums(values, group_idx, num_groups)
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))


def group_loss_estimates(
    loss_sums: torch.Tensor, group_sizes: torch.Tensor, batch_pairs: int | float
) -> torch.Tensor:
    """L̂_g = N / (B N_g) · S_g from per-group loss sums S_g (K,) of a step of B pairs."""
    sizes = group_sizes.to(loss_sums.dtype)
    return loss_sums * (sizes.sum(-1, keepdim=True) / (float(batch_pairs) * sizes))


def fixed_group_weights(weighting: str, group_sizes: torch.Tensor) -> torch.Tensor:
    """Group weights of the non-robust methods: pooled N_g/N, importance 1/K; (K,) float64."""
    sizes = group_sizes.to(torch.float64)
    if weighting == "pooled":
        return sizes / sizes.sum(-1, keepdim=True)
    if weighting == "importance":
        return torch.full_like(sizes, 1.0 / sizes.shape[-1])
    raise ValueError(f"weighting {weighting!r} has no fixed weights; expected pooled or importance")


def mix_weights(alpha: torch.Tensor, chi: float) -> torch.Tensor:
    """θ-step weights w = (1−χ)/K + χ α: χ=1 is pure GRPO, χ=0 weights the groups equally."""
    return (1.0 - chi) / alpha.shape[-1] + chi * alpha


def size_adjustment(group_sizes: torch.Tensor, c: float) -> torch.Tensor:
    """Group-DRO size adjustment C/√N_g (K,), added to L̂ in the α update only."""
    return c / group_sizes.to(torch.float64).sqrt()


def mirror_ascent_step(alpha: torch.Tensor, group_losses: torch.Tensor, eta: float) -> torch.Tensor:
    """One exponentiated-gradient step on the simplex: α ← α ⊙ exp(η L̂) / Σ, shapes (..., K).

    Computed in log space so large η·L̂ cannot overflow. ``eta`` may be a float or a tensor that
    broadcasts against (..., 1) (one step size per batched run).
    """
    logits = alpha.log() + eta * group_losses.to(alpha.dtype)
    return torch.softmax(logits, dim=-1)


def log_mirror_ascent_step(
    log_alpha: torch.Tensor, group_losses: torch.Tensor, eta: float, floor: float = ALPHA_FLOOR
) -> torch.Tensor:
    """:func:`mirror_ascent_step` on log α (K,): log α ← normalise(max(log α + η L̂, log floor)).

    The floor keeps every weight ≥ ``floor`` (up to the renormalisation, which moves log α by
    at most K·floor); with ``floor = 0`` it is the exact exponentiated-gradient step.
    """
    logits = log_alpha + eta * group_losses.to(log_alpha.dtype)
    logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    if floor > 0:
        logits = logits.clamp_min(math.log(floor))
        logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return logits


def effective_groups(alpha: torch.Tensor) -> float:
    """exp(entropy of α): K for uniform weights, 1 when one group holds everything."""
    a = alpha.to(torch.float64)
    entropy = -(a * a.clamp_min(1e-300).log()).sum()
    return float(entropy.exp())


def collapse_eta(alpha: torch.Tensor, eta: float, target: float = 0.5) -> float:
    """A smaller η_α that would have left the largest weight at ``target`` instead of max α.

    From a uniform start log α = η·S + const (S the accumulated normalised losses), so a step
    size c·η gives α(c) = softmax(c·log α); the largest entry grows with c, and c ∈ (0, 1] is
    found by bisection. Exact without LR cuts (which halve η_α) and without the floor.
    """
    logits = alpha.to(torch.float64).clamp_min(1e-300).log()
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(torch.softmax(mid * logits, -1).max()) > target:
            hi = mid
        else:
            lo = mid
    return eta * lo


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Broadcast two shapes (plain Python: ``torch.broadcast_shapes`` costs ~10 µs a call)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    if any(x != y and 1 not in (x, y) for x, y in zip(a, b, strict=False)):
        raise ValueError(f"shapes {a} and {b} do not broadcast")
    return tuple(max(x, y) for x, y in zip(a, b, strict=False))


def pair_coefficients(
    group_weights: torch.Tensor,
    group_idx: torch.Tensor,
    group_sizes: torch.Tensor,
    batch_pairs: int | float,
) -> torch.Tensor:
    """c_i = N w_{g(i)} / (B N_{g(i)}) (B,): Σ_i c_i ℓ_i = Σ_g w_g L̂_g.

    Batched: ``group_weights`` (..., K), ``group_sizes`` (K,) or broadcastable (..., K) and
    ``group_idx`` (B,) or broadcastable (..., B) give (..., B), one row of coefficients per run.
    A full batch (B = N) gives c_i = w_{g(i)} / N_{g(i)}.
    """
    sizes = group_sizes.to(torch.float64)
    weights = group_weights.to(torch.float64)
    per_group = weights * sizes.sum(-1, keepdim=True) / (float(batch_pairs) * sizes)
    if per_group.ndim == 1 and group_idx.ndim == 1:
        return per_group[group_idx]
    lead = _broadcast(tuple(per_group.shape[:-1]), tuple(group_idx.shape[:-1]))
    per_group = per_group.expand((*lead, per_group.shape[-1]))
    return per_group.gather(-1, group_idx.expand((*lead, group_idx.shape[-1])))


def robust_objective(group_losses: torch.Tensor, group_weights: torch.Tensor) -> torch.Tensor:
    """Σ_g w_g L_g over the last axis; with w = α this is the GRPO objective (max over α ∈ Δ_K)."""
    return (group_weights.to(group_losses.dtype) * group_losses).sum(-1)


class GroupWeights:
    """The group weights of one training run, as explicit state.

    ``weights`` are the θ-step weights w (fixed for pooled/importance, (1−χ)/K + χα for robust);
    :meth:`update` applies one mirror-ascent step from a step's loss estimates L̂ (robust only),
    divided by ``loss_scale`` (ℓ₀ of :func:`grpo.losses.loss_at_zero_margin`; 1 = raw L̂).
    α is kept as log α, floored at :data:`ALPHA_FLOOR`.
    """

    def __init__(
        self,
        method: Method | str,
        group_sizes: torch.Tensor | list[int],
        *,
        eta: float = 0.0,
        chi: float = 1.0,
        size_c: float = 0.0,
        loss_scale: float = 1.0,
    ) -> None:
        self.method = parse_method(method) if isinstance(method, str) else method
        self.group_sizes = torch.as_tensor(group_sizes, dtype=torch.float64)
        if self.group_sizes.ndim != 1 or (self.group_sizes <= 0).any():
            raise ValueError(f"group sizes must be positive counts, got {group_sizes}")
        if not 0.0 <= chi <= 1.0:
            raise ValueError(f"chi must be in [0, 1], got {chi}")
        if eta < 0:
            raise ValueError(f"eta_alpha must be >= 0, got {eta}")
        if not loss_scale > 0 or not math.isfinite(loss_scale):
            raise ValueError(f"loss_scale must be a positive number, got {loss_scale}")
        self.eta, self.chi, self.size_c = float(eta), float(chi), float(size_c)
        self.loss_scale = float(loss_scale)
        k = self.group_sizes.numel()
        self.log_alpha = torch.full((k,), -math.log(k), dtype=torch.float64)

    @property
    def num_groups(self) -> int:
        return self.group_sizes.numel()

    @property
    def alpha(self) -> torch.Tensor:
        """α on the simplex (K,) float64; every entry ≥ about :data:`ALPHA_FLOOR`."""
        return self.log_alpha.exp()

    @property
    def weights(self) -> torch.Tensor:
        if self.method.robust:
            return mix_weights(self.alpha, self.chi)
        return fixed_group_weights(self.method.weighting, self.group_sizes)

    def update(self, group_losses: torch.Tensor) -> torch.Tensor:
        """log α ← log α + η_α (L̂ + C/√N_g)/ℓ₀, normalised and floored; a no-op for non-robust
        methods. Returns α."""
        if self.method.robust:
            adjusted = group_losses.detach().to(torch.float64).cpu()
            adjusted = adjusted + size_adjustment(self.group_sizes, self.size_c)
            step = self.eta / self.loss_scale
            self.log_alpha = log_mirror_ascent_step(self.log_alpha, adjusted, step)
        return self.alpha

    def collapsed(self, share: float = COLLAPSE_SHARE) -> int | None:
        """The index of a group holding more than ``share`` of α (robust only), else None."""
        if not self.method.robust:
            return None
        top = int(self.alpha.argmax())
        return top if float(self.alpha[top]) > share else None

    def state_dict(self) -> dict:
        return {
            "log_alpha": self.log_alpha.clone(),
            "eta": self.eta,
            "chi": self.chi,
            "size_c": self.size_c,
            "loss_scale": self.loss_scale,
        }

    def load_state_dict(self, state: dict) -> None:
        if "log_alpha" in state:
            log_alpha = torch.as_tensor(state["log_alpha"], dtype=torch.float64)
        else:  # checkpoints written before α was kept in log space
            alpha = torch.as_tensor(state["alpha"], dtype=torch.float64)
            log_alpha = alpha.clamp_min(ALPHA_FLOOR).log()
        if log_alpha.shape != self.log_alpha.shape:
            raise ValueError(
                f"alpha has shape {tuple(log_alpha.shape)}, expected {tuple(self.log_alpha.shape)}"
            )
        self.log_alpha = log_alpha.clone()
        self.eta, self.chi, self.size_c = (
            float(state["eta"]),
            float(state["chi"]),
            float(state["size_c"]),
        )
        self.loss_scale = float(state.get("loss_scale", 1.0))
