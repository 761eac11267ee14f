"""The batched sweep: every seed, method and scenario of Figure 2 as one tensor computation.

Each run follows Algorithm 1 with full batches (``docs/algorithm.md`` §2): at step t,

    L_g(θ_t)  = mean over group g's training pairs of ℓ(θ_tᵀΔφ_i)      (plain group means)
    α_{t+1}   = α_t ⊙ exp(η_α L(θ_t)) / Σ                               (robust methods only)
    w_{t+1}   = (1−χ)/K + χ α_{t+1}   (robust) | N_g/N (pooled) | 1/K (importance)
    θ_{t+1}   = θ_t − η_θ ∇_θ Σ_g w_g L_g(θ_t)        (DPO family: gradient descent)
    θ_{t+1}   = argmin_θ Σ_g w_g L_g(θ)               (IPO family: closed form, §2 of the doc)

using the trainer's own pieces: :func:`grpo.losses.dpo_loss` (GR-DPO's training group losses,
every method's validation losses), :func:`grpo.losses.ipo_loss` (validation),
:func:`grpo.groups.mirror_ascent_step`, :func:`grpo.groups.mix_weights`,
:func:`grpo.groups.fixed_group_weights`, :func:`grpo.groups.pair_coefficients` (also as the
membership matrix 1{g(i)=g}/N_g that turns per-pair losses into the training group means with
one batched product) and :func:`grpo.groups.group_means` (validation curves). GR-IPO's training group losses
and every IPO solve use the per-group moments Σ ΔφΔφᵀ, Σ Δφ instead of per-pair tensors (exact: the
IPO loss is quadratic in θ; tests check them against ``ipo_loss`` and the per-pair closed form).

Layout: one batch and one loop for everything; S = data sets (scenario × seed, ordered by the
scenario's iteration count), M = methods (columns: DPO fixed-weight, DPO robust, IPO robust, IPO
fixed-weight), N pairs, d = 4 features, K = 2 groups. Per-run hyperparameters are (S, M, 1)
tensors; fixed-weight columns keep their weights in α with η_α = 0. When a scenario reaches its
iteration count its data sets leave the batch (the tensors are sliced), so no work is spent on
finished runs; the others go on with their next step in the same pass, so every scenario runs
exactly its own iteration count, whichever scenarios share the sweep.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from grpo.groups import (
    Method,
    fixed_group_weights,
    group_counts,
    group_means,
    mirror_ascent_step,
    mix_weights,
    pair_coefficients,
    parse_method,
)
from grpo.losses import dpo_loss, ipo_loss
from grpo.synthetic.env import (
    FEATURE_TYPES,
    LABEL_TYPES,
    NUM_ACTIONS,
    NUM_GROUPS,
    TRUE_THETA,
    DataSet,
    features,
    make_dataset,
)
from grpo.synthetic.policy import (
    group_moments,
    ipo_closed_form_grouped,
    ipo_group_losses_scaled,
    margins,
    policy_logits,
)


@dataclass(frozen=True)
class Hyper:
    """η_θ (gradient step; unused by the closed form), β, η_α (mirror ascent; robust only)."""

    eta_theta: float
    beta: float
    eta_alpha: float


@dataclass(frozen=True)
class Scenario:
    name: str
    uneven: bool
    group0_share: float
    iterations: int
    dpo: Hyper
    ipo: Hyper

    def hyper(self, loss: str) -> Hyper:
        return self.dpo if loss == "dpo" else self.ipo


# The authors' final reproduction scripts (GR-DPO: step size, reg_coef = β, exp_step_size = η_α,
# iterations); GR-IPO: closed form, β = 0.1, η_α = 0.01. The baselines share η_θ and β.
IPO_HYPER = Hyper(eta_theta=0.0, beta=0.1, eta_alpha=0.01)
SCENARIOS: dict[str, Scenario] = {
    "even-imbalanced": Scenario(
        "even-imbalanced", False, 0.2, 10_000, Hyper(0.5, 1.0, 0.9), IPO_HYPER
    ),
    "uneven-balanced": Scenario(
        "uneven-balanced", True, 0.5, 5_000, Hyper(5.0, 2.0, 0.01), IPO_HYPER
    ),
    "uneven-imbalanced": Scenario(
        "uneven-imbalanced", True, 0.2, 20_000, Hyper(0.9, 1.0, 0.5), IPO_HYPER
    ),
}
METHOD_ORDER = ("dpo", "is-dpo", "gr-dpo", "ipo", "is-ipo", "gr-ipo")


@dataclass
class SyntheticConfig:
    """The synthetic sweep (params.yaml section ``synthetic``); defaults are the paper's."""

    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    methods: tuple[str, ...] = METHOD_ORDER
    seeds: int = 20
    first_seed: int = 2021  # the authors' seeds are 2021..2040
    iterations: int = 0  # 0: each scenario's paper count (10k / 5k / 20k)
    feature_type: str = "swapped"
    labels: str = "deterministic"
    record_every: int = 100
    train_pairs: int = 300
    val_pairs: int = 1000
    test_states: int = 1000
    chi: float = 1.0
    ridge: float = 0.0  # λ of the closed-form IPO solve
    threads: int = 1  # torch intra-op threads while sweeping (tiny tensors: 1 is fastest)
    # processes, each with a share of the seeds (forked). 1 by default: on the shared 2-core
    # machine 2 processes were measured slower (docs/reproduction.md, Speed)
    workers: int = 1
    dtype: str = "float64"  # "float32" halves the per-pair arithmetic (results agree to ~1e-5)

    def __post_init__(self) -> None:
        self.scenarios = tuple(self.scenarios)
        self.methods = tuple(m.lower() for m in self.methods)
        unknown = [s for s in self.scenarios if s not in SCENARIOS]
        if unknown or not self.scenarios:
            raise ValueError(f"unknown scenario(s) {unknown}; expected some of {sorted(SCENARIOS)}")
        bad = [m for m in self.methods if m not in METHOD_ORDER]
        if bad or not self.methods:
            raise ValueError(f"unknown method(s) {bad}; expected some of {list(METHOD_ORDER)}")
        if len(set(self.methods)) != len(self.methods) or len(set(self.scenarios)) != len(
            self.scenarios
        ):
            raise ValueError("scenarios and methods must not repeat")
        if self.feature_type not in FEATURE_TYPES:
            raise ValueError(
                f"feature_type must be one of {FEATURE_TYPES}, got {self.feature_type!r}"
            )
        if self.labels not in LABEL_TYPES:
            raise ValueError(f"labels must be one of {LABEL_TYPES}, got {self.labels!r}")
        for name in (
            "seeds",
            "record_every",
            "train_pairs",
            "val_pairs",
            "test_states",
            "threads",
            "workers",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0 (0 = the paper's), got {self.iterations}")
        if not 0.0 <= self.chi <= 1.0:
            raise ValueError(f"chi must be in [0, 1], got {self.chi}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")

    def iterations_for(self, scenario: str) -> int:
        return self.iterations or SCENARIOS[scenario].iterations

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))


@dataclass
class MethodRuns:
    """One method in one scenario, every seed. Shapes: (seeds, P) curves, (seeds, K), (seeds, d)."""

    worst_val_curve: torch.Tensor
    val_group_loss: torch.Tensor  # converged per-group validation loss
    reward_error: torch.Tensor  # converged per-group reward error (r*_g − r_g(π̂)) / r*_g
    group_weights: torch.Tensor  # final θ-step weights w (α for robust methods with χ = 1)
    theta: torch.Tensor

    @property
    def worst_val_loss(self) -> torch.Tensor:
        return self.val_group_loss.max(-1).values

    @property
    def max_reward_error(self) -> torch.Tensor:
        return self.reward_error.max(-1).values


@dataclass
class ScenarioResult:
    name: str
    iterations: int
    steps: list[int]  # the iterations at which curves were recorded
    methods: dict[str, MethodRuns] = field(default_factory=dict)


@dataclass
class SweepResult:
    config: SyntheticConfig
    scenarios: dict[str, ScenarioResult]
    seconds: float


def record_steps(iterations: int, every: int) -> list[int]:
    """0, every, 2·every, …, and the last iteration."""
    steps = list(range(0, iterations + 1, every))
    if steps[-1] != iterations:
        steps.append(iterations)
    return steps


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _initial_weights(method: Method, sizes: torch.Tensor) -> torch.Tensor:
    """α_0: uniform for robust methods, else the method's fixed weights. sizes (S, 1, K) → (S, 1, K)."""
    if method.robust:
        return torch.full_like(sizes, 1.0 / sizes.shape[-1])
    return fixed_group_weights(method.weighting, sizes)


@dataclass
class _Segment:
    scenario: Scenario
    iterations: int
    start: int
    stop: int


def _columns(methods: list[Method]) -> list[Method]:
    """Column order: DPO fixed-weight, DPO robust, IPO robust, IPO fixed-weight, so that the runs
    updated by gradient (DPO), the robust runs (α) and the runs whose margins every step needs
    (all but the fixed IPO ones, solved once) are contiguous slices, never gathers."""

    def key(m: Method) -> int:
        return {("dpo", False): 0, ("dpo", True): 1, ("ipo", True): 2, ("ipo", False): 3}[
            (m.loss, m.robust)
        ]

    return sorted(methods, key=key)


@dataclass(frozen=True)
class _Layout:
    """Where each kind of run sits among the columns, so every block is a slice (see _columns)."""

    cols: list[Method]
    n_dpo: int  # DPO columns are [0, n_dpo), IPO ones [n_dpo, M)
    r0: int  # robust columns are [r0, r1)
    r1: int

    @classmethod
    def of(cls, methods: list[Method]) -> _Layout:
        cols = _columns(methods)
        n_dpo = sum(m.loss == "dpo" for m in cols)
        r0 = sum(m.loss == "dpo" and not m.robust for m in cols)  # first robust column
        r1 = r0 + sum(m.robust for m in cols)  # end of the robust columns
        return cls(cols, n_dpo, r0, r1)


@dataclass(frozen=True)
class _Data:
    """Every data set's pairs stacked into batch tensors (float64, as the data sets hold them)."""

    d_train: torch.Tensor  # Δφ, (S, N, d)
    g_train: torch.Tensor  # groups, (S, 1, N)
    d_val_t: torch.Tensor  # validation Δφ transposed and contiguous, (S, d, N_val)
    g_val: torch.Tensor  # (S, 1, N_val)
    sizes: torch.Tensor  # training pairs per group N_g, (S, 1, K)

    @classmethod
    def stack(cls, datasets: list[DataSet], feature_type: str) -> _Data:
        d_train = torch.stack([ds.train.delta_phi(feature_type) for ds in datasets])
        g_train = torch.stack([ds.train.groups for ds in datasets]).unsqueeze(1)
        d_val = torch.stack([ds.val.delta_phi(feature_type) for ds in datasets])
        g_val = torch.stack([ds.val.groups for ds in datasets]).unsqueeze(1)
        sizes = group_counts(g_train, NUM_GROUPS)
        return cls(d_train, g_train, d_val.transpose(1, 2).contiguous(), g_val, sizes)


def _hyper_tensors(
    segments: list[_Segment], cols: list[Method], n_sets: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each run's scenario hyperparameters as tensors, so one batched step serves every scenario.

    Returns η_θ, β, η_α, each (S, M, 1) float64.
    """
    hyper = torch.zeros(n_sets, len(cols), 3, dtype=torch.float64)
    for seg in segments:
        for j, m in enumerate(cols):
            h = seg.scenario.hyper(m.loss)
            hyper[seg.start : seg.stop, j] = torch.tensor([h.eta_theta, h.beta, h.eta_alpha])
    eta_theta, beta, eta_alpha = (hyper[..., i : i + 1].contiguous() for i in range(3))
    return eta_theta, beta, eta_alpha


def _initial_state(
    data: _Data,
    layout: _Layout,
    theta0: torch.Tensor,
    hyper: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    alpha: torch.Tensor,
    cfg: SyntheticConfig,
) -> dict[str, torch.Tensor]:
    """The tensors a step reads and updates, each block of columns its own contiguous tensor.

    theta0 (S, d); alpha (S, M, K) holds α_0 (the fixed weights in fixed-weight columns).
    """
    eta_theta, beta, eta_alpha = hyper
    n_dpo, r0, r1, k = layout.n_dpo, layout.r0, layout.r1, NUM_GROUPS
    d_train, g_train, sizes = data.d_train, data.g_train, data.sizes
    n_pairs = d_train.shape[1]
    coef = pair_coefficients(weights_of(alpha, r0, r1, cfg.chi), g_train, sizes, n_pairs)
    # Full batch, so the group-loss estimator and the pair coefficients are linear maps given by
    # pair_coefficients itself: row g of ``member`` (w = e_g) is 1{g(i)=g}/N_g, i.e. ℓ @ memberᵀ
    # are the group means L_g and w @ member the coefficients c_i = w_{g(i)}/N_{g(i)};
    # ``inv_sizes`` (w = 1 per group) is 1/N_g, the IPO solve's c_g = w_g/N_g.
    member = pair_coefficients(torch.eye(k, dtype=torch.float64), g_train, sizes, n_pairs)
    inv_sizes = pair_coefficients(torch.ones(k, dtype=torch.float64), _GROUP_IDS, sizes, n_pairs)
    theta = theta0.unsqueeze(1).repeat(1, len(layout.cols), 1)
    gram, sums = group_moments(d_train, g_train.squeeze(1), k)
    dt = getattr(torch, cfg.dtype)
    s_all, d = d_train.shape[0], d_train.shape[-1]
    # One gradient step θ ← θ − η_θ ∇ with ∇ = −β Σ_i c_i σ(−βh_i)Δφ_i is θ += Σ_i (η_θ β c_i)
    # σ(−βh_i) Δφ_i: the constant η_θ β is folded into the coefficients once.
    step_scale = (eta_theta * beta)[:, :n_dpo]
    return {
        "d": d_train.to(dt),
        "d_t": d_train.transpose(1, 2).contiguous().to(dt),
        "member": member.to(dt),
        "member_t": member.transpose(1, 2).contiguous().to(dt),
        "inv_sizes": inv_sizes.to(dt),
        "gram": gram.to(dt),
        "gram_flat": gram.reshape(s_all, k, d * d).to(dt),
        "sums": sums.to(dt),
        "theta_dpo": theta[:, :n_dpo].contiguous().to(dt),
        "theta_ipo": theta[:, n_dpo:].contiguous().to(dt),
        "scaled_coef": (coef[:, :n_dpo] * step_scale).contiguous().to(dt),
        "step_scale_rob": step_scale[:, r0:].contiguous().to(dt),
        "neg_beta_dpo": (-beta[:, :n_dpo]).contiguous().to(dt),
        "beta_dpo_rob": beta[:, r0:n_dpo].contiguous().to(dt),
        "beta_ipo": beta[:, n_dpo:].contiguous().to(dt),
        "alpha_rob": alpha[:, r0:r1].contiguous(),
        "eta_alpha_rob": eta_alpha[:, r0:r1].contiguous(),
        "weights_ipo_fixed": alpha[:, r1:].contiguous(),  # fixed columns keep w in α
    }


@dataclass(frozen=True)
class _Validation:
    """The validation pairs in the sweep's dtype, to record every run's validation curve."""

    d_t: torch.Tensor  # (S, d, N_val)
    groups: torch.Tensor  # (S, 1, N_val)
    beta: torch.Tensor  # (S, M, 1)

    def group_losses(self, state: dict[str, torch.Tensor], start: int, n_dpo: int) -> torch.Tensor:
        """Per-group validation loss of the active data sets [start:]: (S_act, M, K)."""
        theta = torch.cat([state["theta_dpo"], state["theta_ipo"]], 1)[start:]
        h = margins(theta, self.d_t[start:])
        pair = torch.cat(
            [
                dpo_loss(h[:, :n_dpo], self.beta[start:, :n_dpo]),
                ipo_loss(h[:, n_dpo:], self.beta[start:, n_dpo:]),
            ],
            dim=1,
        )
        return group_means(pair, self.groups[start:], NUM_GROUPS)


def _final(
    state: dict[str, torch.Tensor], alpha0: torch.Tensor, layout: _Layout, cfg: SyntheticConfig
) -> dict[str, torch.Tensor]:
    """Every data set's θ (float64) and θ-step weights w now, for segments that just finished."""
    theta = torch.cat([state["theta_dpo"], state["theta_ipo"]], dim=1).to(torch.float64)
    alpha = alpha0.clone()  # fixed-weight columns never change; robust ones live in the state
    alpha[:, layout.r0 : layout.r1] = state["alpha_rob"]
    return {"theta": theta, "weights": weights_of(alpha, layout.r0, layout.r1, cfg.chi)}


_Records = list[tuple[int, int, torch.Tensor]]  # (t, start, val group losses (S_act, M, K))


def _loop(
    state: dict[str, torch.Tensor],
    alpha0: torch.Tensor,
    layout: _Layout,
    segments: list[_Segment],
    validation: _Validation,
    cfg: SyntheticConfig,
    tick: Callable[[int], None],
) -> tuple[_Records, dict[int, dict[str, torch.Tensor]]]:
    """Step every run to its scenario's count; returns the records and finals (by segment start)."""
    n_dpo, r0, r1 = layout.n_dpo, layout.r0, layout.r1
    records: _Records = []
    finals: dict[int, dict[str, torch.Tensor]] = {}
    total = max(seg.iterations for seg in segments)
    pending = sorted(segments, key=lambda s: s.iterations)
    to_record = set()
    for seg in segments:
        to_record.update(record_steps(seg.iterations, cfg.record_every))

    start = pending[0].start
    v = _Views(state, start, n_dpo, r0, r1, cfg)
    for t in range(total + 1):
        # After t steps: record, then let the segments that are done leave the batch.
        if t in to_record:
            records.append((t, start, validation.group_losses(state, start, n_dpo)))
            tick(t)
        while pending and pending[0].iterations == t:
            seg = pending.pop(0)
            now = _final(state, alpha0, layout, cfg)
            finals[seg.start] = {key: val[seg.start : seg.stop] for key, val in now.items()}
        if not pending:
            break
        if pending[0].start != start:  # the rest take step t + 1 without the finished ones
            start = pending[0].start
            v = _Views(state, start, n_dpo, r0, r1, cfg)
        if t == 0:
            v.solve_fixed_ipo()  # fixed weights: one solve gives the optimum
        v.step()
    return records, finals


def _collect(
    segments: list[_Segment],
    cols: list[Method],
    records: _Records,
    finals: dict[int, dict[str, torch.Tensor]],
    cfg: SyntheticConfig,
) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Cut the batch's records back into one result per (scenario, method)."""
    out: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for seg in segments:
        steps = record_steps(seg.iterations, cfg.record_every)
        rows = {t: val[seg.start - s : seg.stop - s] for t, s, val in records if s <= seg.start}
        curve = torch.stack([rows[t].max(-1).values for t in steps], dim=-1)  # (S_seg, M, P)
        final = finals[seg.start]
        for j, m in enumerate(cols):
            out[(seg.scenario.name, m.name)] = {
                "curve": curve[:, j].to(torch.float64),
                "val_group_loss": rows[steps[-1]][:, j].to(torch.float64),
                "theta": final["theta"][:, j],
                "weights": final["weights"][:, j],
            }
    return out


def _run_all(
    methods: list[Method],
    segments: list[_Segment],
    datasets: list[DataSet],
    cfg: SyntheticConfig,
    tick: Callable[[int], None],
) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Train every (data set, method) run in one loop; returns results per (scenario, method)."""
    layout = _Layout.of(methods)
    data = _Data.stack(datasets, cfg.feature_type)
    hyper = _hyper_tensors(segments, layout.cols, len(datasets))
    alpha = torch.cat([_initial_weights(m, data.sizes) for m in layout.cols], dim=1)  # (S, M, K)
    theta0 = torch.stack([ds.theta0 for ds in datasets])
    state = _initial_state(data, layout, theta0, hyper, alpha, cfg)
    dt = getattr(torch, cfg.dtype)
    validation = _Validation(data.d_val_t.to(dt), data.g_val, hyper[1].to(dt))
    records, finals = _loop(state, alpha, layout, segments, validation, cfg, tick)
    return _collect(segments, layout.cols, records, finals, cfg)


def weights_of(alpha: torch.Tensor, r0: int, r1: int, chi: float) -> torch.Tensor:
    """θ-step weights w: α itself for fixed-weight columns, (1−χ)/K + χα for robust [r0, r1)."""
    w = alpha.clone()
    w[:, r0:r1] = mix_weights(alpha[:, r0:r1], chi)
    return w


_GROUP_IDS = torch.arange(NUM_GROUPS)


class _Views:
    """The state of the active data sets [start:] (views: updates land in the full tensors) and
    one step of Algorithm 1 for all of them; made once per batch change.

    Every block of columns (DPO, robust, IPO) is its own contiguous tensor, so a step does no
    gathers or copies of non-contiguous slices; a step is ~25 small torch calls.
    """

    def __init__(
        self,
        state: dict[str, torch.Tensor],
        start: int,
        n_dpo: int,
        r0: int,
        r1: int,
        cfg: SyntheticConfig,
    ):
        st = {key: val[start:] for key, val in state.items()}
        self.st, self.chi, self.ridge = st, cfg.chi, cfg.ridge
        self.n_dpo, self.n_dpo_rob, self.n_ipo_rob = n_dpo, n_dpo - r0, r1 - n_dpo
        self.robust = r1 > r0
        self.r0 = r0
        self.theta_ipo_rob = st["theta_ipo"][:, : self.n_ipo_rob]
        self.beta_ipo_rob = st["beta_ipo"][:, : self.n_ipo_rob]
        if self.n_ipo_rob:
            self.inv_beta_ipo_rob = 1.0 / self.beta_ipo_rob
            self.const_ipo_rob = 0.25 / (self.beta_ipo_rob * self.beta_ipo_rob)
            s, k, d = st["sums"].shape
            # (S, d, K·d): θ @ it gives (G_g θ)ᵀ for every group; ΣΔφ / N_g transposed
            self.gram_by_group = (
                (st["gram"] * st["inv_sizes"].view(s, k, 1, 1)).permute(0, 2, 1, 3)
            ).reshape(s, d, k * d)
            self.mean_t = (st["sums"] * st["inv_sizes"].view(s, k, 1)).transpose(1, 2).contiguous()
        self.rob_coef = st["scaled_coef"][:, r0:]

    def solve_fixed_ipo(self) -> None:
        st = self.st
        if st["theta_ipo"].shape[1] > self.n_ipo_rob:
            group_coef = st["weights_ipo_fixed"].to(st["gram"].dtype) * st["inv_sizes"]
            st["theta_ipo"][:, self.n_ipo_rob :].copy_(
                ipo_closed_form_grouped(
                    st["gram"],
                    st["sums"],
                    group_coef,
                    st["beta_ipo"][:, self.n_ipo_rob :],
                    self.ridge,
                )
            )

    def step(self) -> None:
        """One step for every active run, in place: α first, then θ with the new α.

        DPO runs: per-pair losses from the margins h = θᵀΔφ, gradient step. IPO runs: the group
        losses and the closed form come from the group moments (exact; the IPO loss is quadratic).
        """
        st = self.st
        h = torch.matmul(st["theta_dpo"], st["d_t"]) if self.n_dpo else None  # (S, n_dpo, N)
        if self.robust:
            parts = []
            if self.n_dpo_rob:  # full batch: the group means, as ℓ @ memberᵀ
                pair = dpo_loss(h[:, self.r0 :], st["beta_dpo_rob"])
                parts.append(torch.matmul(pair, st["member_t"]))
            if self.n_ipo_rob:
                parts.append(
                    ipo_group_losses_scaled(
                        self.theta_ipo_rob,
                        self.gram_by_group,
                        self.mean_t,
                        self.inv_beta_ipo_rob,
                        self.const_ipo_rob,
                    )
                )
            group_loss = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            alpha = st["alpha_rob"]
            alpha.copy_(mirror_ascent_step(alpha, group_loss, st["eta_alpha_rob"]))
            weights = mix_weights(alpha, self.chi).to(st["d"].dtype)
            if self.n_dpo_rob:  # c_i = w_{g(i)} / N_{g(i)}, times η_θ β
                w = weights[:, : self.n_dpo_rob] * st["step_scale_rob"]
                self.rob_coef.copy_(torch.matmul(w, st["member"]))
            if self.n_ipo_rob:
                group_coef = weights[:, self.n_dpo_rob :] * st["inv_sizes"]
                self.theta_ipo_rob.copy_(
                    ipo_closed_form_grouped(
                        st["gram"], st["sums"], group_coef, self.beta_ipo_rob, self.ridge
                    )
                )
        if self.n_dpo:
            s = torch.sigmoid(h.mul_(st["neg_beta_dpo"]))
            st["theta_dpo"].baddbmm_(s.mul_(st["scaled_coef"]), st["d"])


def reward_errors(
    theta: torch.Tensor, test_states: torch.Tensor, feature_type: str
) -> torch.Tensor:
    """Per-group reward error of the greedy policy (r*_g − r_g(π̂)) / r*_g.

    r*_g = mean over test states of max_a r_g(x, a); r_g(π̂) = mean of r_g(x, argmax_a θᵀφ_g(x,a)).
    theta (S, M, d), test_states (S, T, 2) → (S, M, K).
    """
    s, t = test_states.shape[:2]
    actions = torch.arange(NUM_ACTIONS).view(1, 1, 1, -1)
    groups = torch.arange(NUM_GROUPS).view(1, -1, 1, 1)
    phi = features(test_states.view(s, 1, t, 1, 2), actions, groups, feature_type)  # (S,K,T,A,d)
    rewards = (phi * TRUE_THETA.view(1, NUM_GROUPS, 1, 1, -1)).sum(-1)  # (S, K, T, A)
    optimal = rewards.max(-1).values.mean(-1)  # (S, K)
    logits = policy_logits(theta.view(s, -1, 1, 1, theta.shape[-1]), phi.unsqueeze(1))
    greedy = logits.argmax(-1)  # (S, M, K, T)
    achieved = rewards.unsqueeze(1).expand(*greedy.shape, NUM_ACTIONS)
    achieved = achieved.gather(-1, greedy.unsqueeze(-1)).squeeze(-1).mean(-1)  # (S, M, K)
    return (optimal.unsqueeze(1) - achieved) / optimal.unsqueeze(1)


def _datasets(cfg: SyntheticConfig, scenario: Scenario, seeds: list[int]) -> list[DataSet]:
    stream = list(SCENARIOS).index(scenario.name)
    return [
        make_dataset(
            seed,
            uneven=scenario.uneven,
            group0_share=scenario.group0_share,
            feature_type=cfg.feature_type,
            labels=cfg.labels,
            train_pairs=cfg.train_pairs,
            val_pairs=cfg.val_pairs,
            test_states=cfg.test_states,
            stream=stream,
        )
        for seed in seeds
    ]


def _sweep_seeds(
    cfg: SyntheticConfig, seeds: list[int], tick: Callable[[int], None]
) -> dict[str, ScenarioResult]:
    scenarios = sorted(
        (SCENARIOS[s] for s in cfg.scenarios), key=lambda s: cfg.iterations_for(s.name)
    )
    datasets: list[DataSet] = []
    segments: list[_Segment] = []
    for sc in scenarios:
        sets = _datasets(cfg, sc, seeds)
        segments.append(
            _Segment(sc, cfg.iterations_for(sc.name), len(datasets), len(datasets) + len(sets))
        )
        datasets.extend(sets)
    runs = _run_all([parse_method(m) for m in cfg.methods], segments, datasets, cfg, tick)
    results: dict[str, ScenarioResult] = {}
    for seg in segments:
        name = seg.scenario.name
        res = ScenarioResult(name, seg.iterations, record_steps(seg.iterations, cfg.record_every))
        tests = torch.stack([ds.test_states for ds in datasets[seg.start : seg.stop]])
        thetas = torch.stack([runs[(name, m)]["theta"] for m in cfg.methods], dim=1)  # (S, M, d)
        errors = reward_errors(thetas, tests, cfg.feature_type)
        for j, m in enumerate(cfg.methods):
            r = runs[(name, m)]
            res.methods[m] = MethodRuns(
                r["curve"], r["val_group_loss"], errors[:, j], r["weights"], r["theta"]
            )
        results[name] = res
    return {s: results[s] for s in cfg.scenarios}


_FIELDS = ("worst_val_curve", "val_group_loss", "reward_error", "group_weights", "theta")


def _merge(
    cfg: SyntheticConfig, parts: list[dict[str, ScenarioResult]]
) -> dict[str, ScenarioResult]:
    """Concatenate per-seed-chunk results (in seed order) into one result per scenario."""
    scenarios = {}
    for name in cfg.scenarios:
        first = parts[0][name]
        merged = ScenarioResult(name, first.iterations, first.steps)
        for m in cfg.methods:
            merged.methods[m] = MethodRuns(
                *(torch.cat([getattr(p[name].methods[m], f) for p in parts]) for f in _FIELDS)
            )
        scenarios[name] = merged
    return scenarios


_PROGRESS: dict = {}  # a worker's shared progress counter (set by the pool initializer)


def _init_worker(counter) -> None:
    _PROGRESS["counter"] = counter


def _worker(job: tuple[SyntheticConfig, int, list[int]]) -> dict:
    cfg, index, seeds = job
    counter = _PROGRESS.get("counter")

    def tick(t: int) -> None:
        if index == 0 and counter is not None:  # worker 0 reports; the parent shows it
            counter.value = t

    with _threads(cfg.threads), torch.inference_mode():
        result = _sweep_seeds(cfg, seeds, tick)
    # plain numpy arrays: torch's own pickling of tensors goes through shared-memory file
    # descriptors, which hung here
    return {
        name: (
            sc.iterations,
            sc.steps,
            {m: [getattr(r, f).numpy() for f in _FIELDS] for m, r in sc.methods.items()},
        )
        for name, sc in result.items()
    }


def _from_worker(part: dict) -> dict[str, ScenarioResult]:
    out = {}
    for name, (iterations, steps, methods) in part.items():
        sc = ScenarioResult(name, iterations, steps)
        for m, arrays in methods.items():
            sc.methods[m] = MethodRuns(*(torch.from_numpy(a) for a in arrays))
        out[name] = sc
    return out


def _sweep_in_workers(
    cfg: SyntheticConfig, tick: Callable[[int], None]
) -> dict[str, ScenarioResult]:
    """Split the seeds into ``cfg.workers`` contiguous chunks, one process each (every run is
    independent, so this changes no number; each process keeps ``cfg.threads`` threads).

    The workers are forked (no re-import of torch or of ``__main__``).
    """
    import multiprocessing

    seeds = cfg.seed_list
    n = min(cfg.workers, len(seeds))
    bounds = [round(i * len(seeds) / n) for i in range(n + 1)]
    jobs = [(cfg, i, seeds[bounds[i] : bounds[i + 1]]) for i in range(n)]
    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("q", -1, lock=False)
    with ctx.Pool(n, initializer=_init_worker, initargs=(counter,)) as pool:
        pending = pool.map_async(_worker, jobs, chunksize=1)
        seen = -1
        while not pending.ready():
            pending.wait(0.05)
            if counter.value != seen:
                seen = counter.value
                tick(seen)
        if counter.value != seen:
            tick(counter.value)
        parts = [_from_worker(p) for p in pending.get()]
    return _merge(cfg, parts)


def run_sweep(
    cfg: SyntheticConfig,
    *,
    one_seed_at_a_time: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SweepResult:
    """Run the sweep; batched over seeds by default (split over ``cfg.workers`` processes), or one
    seed per call in this process (for the benchmark).

    ``progress(t)`` is called at every recorded iteration t (for a progress bar).
    """
    tick = progress or (lambda t: None)
    began = time.perf_counter()
    if not one_seed_at_a_time and cfg.workers > 1 and cfg.seeds > 1:
        return SweepResult(cfg, _sweep_in_workers(cfg, tick), time.perf_counter() - began)
    with _threads(cfg.threads), torch.inference_mode():
        if not one_seed_at_a_time:
            scenarios = _sweep_seeds(cfg, cfg.seed_list, tick)
        else:
            scenarios = _merge(cfg, [_sweep_seeds(cfg, [seed], tick) for seed in cfg.seed_list])
    return SweepResult(cfg, scenarios, time.perf_counter() - began)
