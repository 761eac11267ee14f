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
:func:`grpo.groups.fixed_group_weights`, :func:`grpo.groups.pair_coefficients` and
:func:`grpo.groups.group_sums` / :func:`grpo.groups.group_means`. GR-IPO's training group losses
and every IPO solve use the per-group moments Σ ΔφΔφᵀ, Σ Δφ instead of per-pair tensors (exact: the
IPO loss is quadratic in θ; tests check them against ``ipo_loss`` and the per-pair closed form).

Layout: one batch and one loop for everything; S = data sets (scenario × seed, ordered by the
scenario's iteration count), M = methods (columns: DPO fixed-weight, DPO robust, IPO robust, IPO
fixed-weight), N pairs, d = 4 features, K = 2 groups. Per-run hyperparameters are (S, M, 1)
tensors; fixed-weight columns keep their weights in α with η_α = 0. When a scenario reaches its
iteration count its data sets leave the batch (the tensors are sliced), so no work is spent on
finished runs.
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
    group_sums,
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
    dpo_gradient,
    group_moments,
    ipo_closed_form_grouped,
    ipo_group_losses,
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
        for name in ("seeds", "record_every", "train_pairs", "val_pairs", "test_states", "threads"):
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


def _run_all(
    methods: list[Method],
    segments: list[_Segment],
    datasets: list[DataSet],
    cfg: SyntheticConfig,
    tick: Callable[[int], None],
) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Train every (data set, method) run in one loop; returns results per (scenario, method)."""
    ft, k = cfg.feature_type, NUM_GROUPS
    cols = _columns(methods)
    n_dpo = sum(m.loss == "dpo" for m in cols)
    r0 = sum(m.loss == "dpo" and not m.robust for m in cols)  # first robust column
    r1 = r0 + sum(m.robust for m in cols)  # end of the robust columns
    n_cols = len(cols)
    d_train = torch.stack([ds.train.delta_phi(ft) for ds in datasets])  # (S, N, d)
    d_train_t = d_train.transpose(1, 2).contiguous()
    g_train = torch.stack([ds.train.groups for ds in datasets]).unsqueeze(1)  # (S, 1, N)
    d_val_t = torch.stack([ds.val.delta_phi(ft) for ds in datasets]).transpose(1, 2).contiguous()
    g_val = torch.stack([ds.val.groups for ds in datasets]).unsqueeze(1)
    sizes = group_counts(g_train, k)  # (S, 1, K)
    n_pairs = d_train.shape[1]

    hyper = torch.zeros(len(datasets), n_cols, 3, dtype=torch.float64)
    for seg in segments:
        for j, m in enumerate(cols):
            h = seg.scenario.hyper(m.loss)
            hyper[seg.start : seg.stop, j] = torch.tensor([h.eta_theta, h.beta, h.eta_alpha])
    eta_theta, beta, eta_alpha = (hyper[..., i : i + 1].contiguous() for i in range(3))
    alpha = torch.cat([_initial_weights(m, sizes) for m in cols], dim=1)  # (S, M, K)
    coef = pair_coefficients(weights_of(alpha, r0, r1, cfg.chi), g_train, sizes, n_pairs)
    theta = torch.stack([ds.theta0 for ds in datasets]).unsqueeze(1).repeat(1, n_cols, 1)
    gram, sums = group_moments(d_train, g_train.squeeze(1), k)
    dt = getattr(torch, cfg.dtype)
    d_train, d_train_t, d_val_t = d_train.to(dt), d_train_t.to(dt), d_val_t.to(dt)
    theta, coef, beta, eta_theta = theta.to(dt), coef.to(dt), beta.to(dt), eta_theta.to(dt)
    gram, sums = gram.to(dt), sums.to(dt)
    state = {
        "d": d_train,
        "d_t": d_train_t,
        "g": g_train,
        "sizes": sizes,
        "gram": gram,
        "sums": sums,
        "theta": theta,
        "coef": coef,
        "beta": beta,
        "alpha": alpha,
        "eta_theta": eta_theta,
        "eta_alpha": eta_alpha,
    }

    def val_group_losses(start: int) -> torch.Tensor:
        h = margins(theta[start:], d_val_t[start:])
        pair = torch.cat(
            [
                dpo_loss(h[:, :n_dpo], beta[start:, :n_dpo]),
                ipo_loss(h[:, n_dpo:], beta[start:, n_dpo:]),
            ],
            dim=1,
        )
        return group_means(pair, g_val[start:], k)

    records: list[tuple[int, int, torch.Tensor]] = []  # (t, start, val group losses (S_act, M, K))
    finals: dict[int, dict[str, torch.Tensor]] = {}
    total = max(seg.iterations for seg in segments)
    pending = sorted(segments, key=lambda s: s.iterations)
    to_record = set()
    for seg in segments:
        to_record.update(record_steps(seg.iterations, cfg.record_every))

    start = -1
    for t in range(total + 1):
        if start != pending[0].start:
            start = pending[0].start
            v = _Views(state, start, n_dpo, r0, r1)
        if t in to_record:
            records.append((t, start, val_group_losses(start)))
            tick(t)
        while pending and pending[0].iterations == t:
            seg = pending.pop(0)
            finals[seg.start] = {
                "theta": theta[seg.start : seg.stop].clone(),
                "weights": weights_of(alpha, r0, r1, cfg.chi)[seg.start : seg.stop],
            }
        if not pending:
            break
        if pending[0].start != start:
            continue  # finished data sets leave the batch before the next step
        _step(v, t, n_pairs, cfg)

    out: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for seg in segments:
        steps = record_steps(seg.iterations, cfg.record_every)
        rows = {t: val[seg.start - s : seg.stop - s] for t, s, val in records if s <= seg.start}
        curve = torch.stack([rows[t].max(-1).values for t in steps], dim=-1)  # (S_seg, M, P)
        final = finals[seg.start]
        for j, m in enumerate(cols):
            out[(seg.scenario.name, m.name)] = {
                "curve": curve[:, j],
                "val_group_loss": rows[steps[-1]][:, j],
                "theta": final["theta"][:, j],
                "weights": final["weights"][:, j],
            }
    return out


def weights_of(alpha: torch.Tensor, r0: int, r1: int, chi: float) -> torch.Tensor:
    """θ-step weights w: α itself for fixed-weight columns, (1−χ)/K + χα for robust [r0, r1)."""
    w = alpha.clone()
    w[:, r0:r1] = mix_weights(alpha[:, r0:r1], chi)
    return w


class _Views:
    """Slices of the batch state for the active data sets [start:], made once per batch change."""

    def __init__(self, state: dict[str, torch.Tensor], start: int, n_dpo: int, r0: int, r1: int):
        st = {k: v[start:] for k, v in state.items()}
        self.n_dpo, self.r0, self.r1 = n_dpo, r0, r1
        self.d, self.d_t, self.g, self.sizes = st["d"], st["d_t"], st["g"], st["sizes"]
        self.gram, self.sums = st["gram"], st["sums"]
        th, co, be, al = st["theta"], st["coef"], st["beta"], st["alpha"]
        self.theta_dpo, self.coef_dpo, self.beta_dpo = th[:, :n_dpo], co[:, :n_dpo], be[:, :n_dpo]
        self.eta_theta_dpo = st["eta_theta"][:, :n_dpo]
        self.alpha_rob, self.eta_alpha_rob = al[:, r0:r1], st["eta_alpha"][:, r0:r1]
        self.coef_dpo_rob, self.beta_dpo_rob = co[:, r0:n_dpo], be[:, r0:n_dpo]
        self.theta_ipo_rob, self.beta_ipo_rob = th[:, n_dpo:r1], be[:, n_dpo:r1]
        self.theta_ipo_fixed, self.beta_ipo_fixed = th[:, r1:], be[:, r1:]
        self.weights_ipo_fixed = al[:, r1:]  # fixed-weight columns keep w in α (η_α = 0)


_GROUP_IDS = torch.arange(NUM_GROUPS)


def _step(v: _Views, t: int, n_pairs: int, cfg: SyntheticConfig) -> None:
    """One step of Algorithm 1 for every active run, in place: α first, then θ with the new α.

    DPO runs: per-pair losses from the margins h = θᵀΔφ, gradient step. IPO runs: the group losses
    and the closed form come from the group moments (exact; the IPO loss is quadratic in θ).
    """
    n_dpo_rob = v.n_dpo - v.r0
    h = margins(v.theta_dpo, v.d_t) if v.n_dpo else None  # (S, n_dpo, N)
    if v.r1 > v.r0:
        parts = []
        if n_dpo_rob:
            pair = dpo_loss(h[:, v.r0 :], v.beta_dpo_rob)
            parts.append(group_sums(pair, v.g, NUM_GROUPS) / v.sizes)  # full batch: group means
        if v.r1 > v.n_dpo:
            parts.append(ipo_group_losses(v.theta_ipo_rob, v.gram, v.sums, v.sizes, v.beta_ipo_rob))
        group_loss = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        v.alpha_rob.copy_(mirror_ascent_step(v.alpha_rob, group_loss, v.eta_alpha_rob))
        weights = mix_weights(v.alpha_rob, cfg.chi)
        if n_dpo_rob:
            v.coef_dpo_rob.copy_(pair_coefficients(weights[:, :n_dpo_rob], v.g, v.sizes, n_pairs))
        if v.r1 > v.n_dpo:
            group_coef = pair_coefficients(weights[:, n_dpo_rob:], _GROUP_IDS, v.sizes, n_pairs)
            group_coef = group_coef.to(v.gram.dtype)
            v.theta_ipo_rob.copy_(
                ipo_closed_form_grouped(v.gram, v.sums, group_coef, v.beta_ipo_rob, cfg.ridge)
            )
    if v.n_dpo:
        v.theta_dpo.sub_(v.eta_theta_dpo * dpo_gradient(h, v.d, v.coef_dpo, v.beta_dpo))
    if t == 0 and v.theta_ipo_fixed.shape[1]:  # fixed weights: one solve gives the optimum
        group_coef = pair_coefficients(v.weights_ipo_fixed, _GROUP_IDS, v.sizes, n_pairs)
        group_coef = group_coef.to(v.gram.dtype)
        v.theta_ipo_fixed.copy_(
            ipo_closed_form_grouped(v.gram, v.sums, group_coef, v.beta_ipo_fixed, cfg.ridge)
        )


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


def run_sweep(
    cfg: SyntheticConfig,
    *,
    one_seed_at_a_time: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SweepResult:
    """Run the sweep; batched over seeds by default, or one seed per call (for the benchmark).

    ``progress(t)`` is called at every recorded iteration t (for a progress bar).
    """
    tick = progress or (lambda t: None)
    began = time.perf_counter()
    with _threads(cfg.threads), torch.inference_mode():
        if not one_seed_at_a_time:
            scenarios = _sweep_seeds(cfg, cfg.seed_list, tick)
        else:
            parts = [_sweep_seeds(cfg, [seed], tick) for seed in cfg.seed_list]
            scenarios = {}
            for name in cfg.scenarios:
                first = parts[0][name]
                merged = ScenarioResult(name, first.iterations, first.steps)
                for m in cfg.methods:
                    merged.methods[m] = MethodRuns(
                        *(
                            torch.cat([getattr(p[name].methods[m], f) for p in parts])
                            for f in (
                                "worst_val_curve",
                                "val_group_loss",
                                "reward_error",
                                "group_weights",
                                "theta",
                            )
                        )
                    )
                scenarios[name] = merged
    return SweepResult(cfg, scenarios, time.perf_counter() - began)
