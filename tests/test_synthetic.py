"""The synthetic reproduction (Figure 2): features, gradients, closed form, Algorithm 1's order,
reward error, and the paper's headline ordering at reduced seeds and iterations."""

from __future__ import annotations

import json
import math

import pytest
import torch

from grpo.groups import group_sums, mirror_ascent_step, pair_coefficients
from grpo.losses import dpo_loss, ipo_loss, reward_margin
from grpo.synthetic.env import TRUE_THETA, features, make_dataset, true_rewards
from grpo.synthetic.policy import (
    dpo_gradient,
    ipo_closed_form,
    ipo_gradient,
    margins,
    policy_log_probs,
)
from grpo.synthetic.runner import SyntheticConfig, reward_errors, run_sweep

R2 = math.sqrt(2.0) / 2.0  # cos(π/4) = sin(π/4)


def _one(x1: float, x2: float, a: int, g: int, kind: str) -> tuple[list[float], float]:
    phi = features(torch.tensor([x1, x2]), torch.tensor(a), torch.tensor(g), kind)
    r = true_rewards(torch.tensor([x1, x2]), torch.tensor(a), torch.tensor(g), kind)
    return phi.tolist(), float(r)


def test_features_and_rewards_match_hand_computation():
    # x = (1/4, 1/2), a = 4 → u = 4/8 + 1 = 1.5; cos πx = (√2/2, 0), sin πx = (√2/2, 1).
    u = 1.5
    phi, r = _one(0.25, 0.5, 4, 0, "swapped")
    assert phi == pytest.approx([u * R2, R2 / u, 0.0, 1 / u], abs=1e-12)
    assert r == pytest.approx(1 * u * R2 + 3 * R2 / u + 1 * 0.0 + 3 / u, abs=1e-12)  # 4.474874
    assert r == pytest.approx(4.474874, abs=1e-6)
    phi, r = _one(0.25, 0.5, 4, 1, "swapped")
    assert phi == pytest.approx([R2 / u, u * R2, 1 / u, 0.0], abs=1e-12)
    assert r == pytest.approx(3 * R2 / u + u * R2 + 3 / u, abs=1e-12)
    phi, r = _one(0.25, 0.5, 4, 1, "flipped")
    assert phi == pytest.approx([u * R2, R2 / u, u * 1.0, 0.0], abs=1e-12)
    assert r == pytest.approx(3 * u * R2 + R2 / u + 3 * u, abs=1e-12)  # 8.153385
    # a = 0 → u = 1; x = (0, 0): cos = 1, sin = 0.
    phi, r = _one(0.0, 0.0, 0, 0, "swapped")
    assert phi == pytest.approx([1.0, 0.0, 1.0, 0.0], abs=1e-12) and r == pytest.approx(2.0)


def test_data_collection_follows_the_scenarios():
    even = make_dataset(7, uneven=False, group0_share=0.2)
    assert even.train.groups.tolist() == [0] * 60 + [1] * 240
    assert (even.train.chosen != even.train.rejected).all()
    assert even.val.groups.bincount().tolist() == [500, 500]
    uneven = make_dataset(7, uneven=True, group0_share=0.5)
    gap = (uneven.train.chosen - uneven.train.rejected).abs()
    g = uneven.train.groups
    assert (gap[g == 0] == 1).all()  # a vs a±1
    assert (gap[g == 1] == 4).all()  # a vs (a+4) mod 8 (always 4 apart)
    for pairs in (even.train, uneven.train, uneven.val):  # deterministic: the better action wins
        rw = true_rewards(pairs.states, pairs.chosen, pairs.groups)
        rl = true_rewards(pairs.states, pairs.rejected, pairs.groups)
        assert (rw >= rl).all()
    assert ((even.theta0 >= 0) & (even.theta0 <= 5)).all()
    bt = make_dataset(7, uneven=False, group0_share=0.2, labels="bradley-terry")
    rw = true_rewards(bt.train.states, bt.train.chosen, bt.train.groups)
    rl = true_rewards(bt.train.states, bt.train.rejected, bt.train.groups)
    assert 0.5 < (rw > rl).float().mean() < 1.0  # noisy labels: mostly, not always, right


def test_margin_is_the_reward_margin_of_the_log_linear_policy():
    ds = make_dataset(3, uneven=False, group0_share=0.2)
    theta = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)
    phi_all = features(ds.train.states.unsqueeze(1), torch.arange(8), ds.train.groups.unsqueeze(1))
    logp = policy_log_probs(theta, phi_all)  # (N, 8)
    ref = torch.full_like(logp, -math.log(8.0))
    pick = lambda t, a: t.gather(1, a.unsqueeze(1)).squeeze(1)  # noqa: E731
    expected = reward_margin(
        pick(logp, ds.train.chosen),
        pick(logp, ds.train.rejected),
        pick(ref, ds.train.chosen),
        pick(ref, ds.train.rejected),
    )
    dphi_t = ds.train.delta_phi("swapped").T.unsqueeze(0)
    got = margins(theta.view(1, 1, 4), dphi_t.contiguous())[0, 0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
def test_log_linear_gradient_equals_autograd(kind):
    gen = torch.Generator().manual_seed(0)
    s, m, n = 3, 2, 50
    d = torch.randn(s, n, 4, generator=gen, dtype=torch.float64)
    theta = torch.randn(s, m, 4, generator=gen, dtype=torch.float64)
    coef = torch.rand(s, m, n, generator=gen, dtype=torch.float64)
    beta = torch.tensor([[0.5], [2.0]], dtype=torch.float64).expand(s, m, 1)
    h = margins(theta, d.transpose(1, 2).contiguous())
    grad = (dpo_gradient if kind == "dpo" else ipo_gradient)(h, d, coef, beta)
    leaf = theta.clone().requires_grad_(True)
    hh = (leaf.unsqueeze(2) * d.unsqueeze(1)).sum(-1)
    loss = dpo_loss(hh, beta) if kind == "dpo" else ipo_loss(hh, beta)
    (coef * loss).sum().backward()
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-10, atol=1e-12)
    # and a central finite difference on one coordinate
    eps = 1e-6
    e = torch.zeros_like(theta)
    e[1, 0, 2] = eps

    def objective(th):
        hh = (th.unsqueeze(2) * d.unsqueeze(1)).sum(-1)
        return (coef * (dpo_loss(hh, beta) if kind == "dpo" else ipo_loss(hh, beta))).sum()

    fd = (objective(theta + e) - objective(theta - e)) / (2 * eps)
    assert float(grad[1, 0, 2]) == pytest.approx(float(fd), rel=1e-6)


def test_closed_form_gr_ipo_minimises_the_weighted_ipo_objective():
    ds = make_dataset(11, uneven=True, group0_share=0.2, train_pairs=60)
    d = ds.train.delta_phi("swapped").unsqueeze(0)  # (1, N, 4)
    sizes = torch.tensor([12.0, 48.0])
    w = torch.tensor([[[0.7, 0.3]]], dtype=torch.float64)
    coef = pair_coefficients(w, ds.train.groups, sizes, 60)  # (1, 1, N): w_g / N_g
    beta = 0.1
    closed = ipo_closed_form(d, coef, beta)
    # gradient descent run to convergence from θ_0, step 1/L with L = 2 λ_max(Σ c ΔφΔφᵀ)
    gram = (coef[0, 0, :, None] * d[0]).T @ d[0]
    step = 1.0 / (2.0 * torch.linalg.eigvalsh(gram).max())
    theta = ds.theta0.view(1, 1, 4).clone()
    dt = d.transpose(1, 2).contiguous()
    for _ in range(200_000):
        grad = ipo_gradient(margins(theta, dt), d, coef, beta)
        theta = theta - step * grad
        if grad.norm() < 1e-11:
            break
    torch.testing.assert_close(theta, closed, rtol=1e-6, atol=1e-6)

    # the weighted objective Σ_g w_g L_g at the closed form is below nearby points
    def objective(th):
        losses = ipo_loss(margins(th, dt), beta)
        return float(group_sums(losses, ds.train.groups, 2)[0, 0] @ (w[0, 0] / sizes))

    base = objective(closed)
    for k in range(4):
        e = torch.zeros(1, 1, 4, dtype=torch.float64)
        e[..., k] = 1e-3
        assert objective(closed + e) > base and objective(closed - e) > base


def test_one_step_follows_algorithm_1_order():
    """α is updated first from L(θ_0); θ_1 uses the *updated* α (checked by hand with autograd)."""
    cfg = SyntheticConfig(
        scenarios=("uneven-imbalanced",), methods=("gr-dpo",), seeds=1, iterations=1
    )
    res = run_sweep(cfg).scenarios["uneven-imbalanced"].methods["gr-dpo"]
    ds = make_dataset(2021, uneven=True, group0_share=0.2, stream=2)
    d, g = ds.train.delta_phi("swapped"), ds.train.groups
    beta, eta_theta, eta_alpha = 1.0, 0.9, 0.5
    theta = ds.theta0.clone().requires_grad_(True)
    losses = dpo_loss(d @ theta, beta)
    group_loss = torch.stack([losses[g == 0].mean(), losses[g == 1].mean()])
    alpha = torch.tensor([0.5, 0.5], dtype=torch.float64) * torch.exp(
        eta_alpha * group_loss.detach()
    )
    alpha = alpha / alpha.sum()
    (alpha * group_loss).sum().backward(retain_graph=True)
    expected = ds.theta0 - eta_theta * theta.grad
    # (torch's vectorised float64 sigmoid differs from autograd's log-sigmoid path by ~1e-9)
    torch.testing.assert_close(res.theta[0], expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(res.group_weights[0], alpha, rtol=1e-12, atol=1e-12)
    # the order matters: weighting with the old (uniform) α gives a θ_1 far outside that tolerance
    theta.grad = None
    (0.5 * group_loss).sum().backward()
    assert (res.theta[0] - (ds.theta0 - eta_theta * theta.grad)).abs().max() > 1e-5


def test_reward_error_matches_a_naive_loop():
    states = torch.tensor([[[0.1, 0.9], [0.6, 0.3], [0.45, 0.55]]], dtype=torch.float64)
    theta = torch.tensor([[[1.0, 3.0, 1.0, 3.0], [0.2, -0.5, 1.5, 0.1]]], dtype=torch.float64)
    got = reward_errors(theta, states, "swapped")  # (1, 2, 2)
    for m in range(2):
        for g in range(2):
            opt = achieved = 0.0
            for x in states[0]:
                rewards = [
                    float(TRUE_THETA[g] @ features(x, torch.tensor(a), torch.tensor(g)))
                    for a in range(8)
                ]
                logits = [
                    float(theta[0, m] @ features(x, torch.tensor(a), torch.tensor(g)))
                    for a in range(8)
                ]
                opt += max(rewards)
                achieved += rewards[max(range(8), key=lambda a: logits[a])]
            assert float(got[0, m, g]) == pytest.approx((opt - achieved) / opt, abs=1e-12)
    assert float(got[0, 0, 0]) == 0.0  # θ*_0 is optimal for group 0
    # swapped features: r_1(x,a) = r_0(x,a), so θ*_0 is not greedy-optimal for group 1 in general,
    # but the error is never negative
    assert (got >= 0).all()


def test_batched_group_functions_match_one_dimensional_ones():
    gen = torch.Generator().manual_seed(1)
    values = torch.rand(3, 2, 7, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, 2, (3, 1, 7), generator=gen)
    sums = group_sums(values, idx, 2)
    sizes = torch.tensor([[[3.0, 4.0]], [[2.0, 5.0]], [[6.0, 1.0]]])
    w = torch.rand(3, 2, 2, generator=gen, dtype=torch.float64)
    coef = pair_coefficients(w, idx, sizes, 7)
    for s in range(3):
        for m in range(2):
            torch.testing.assert_close(sums[s, m], group_sums(values[s, m], idx[s, 0], 2))
            torch.testing.assert_close(
                coef[s, m], pair_coefficients(w[s, m], idx[s, 0], sizes[s, 0], 7)
            )
    alpha = torch.softmax(torch.rand(3, 2, 2, generator=gen, dtype=torch.float64), -1)
    eta = torch.tensor([0.0, 0.5], dtype=torch.float64).view(1, 2, 1)
    out = mirror_ascent_step(alpha, sums, eta)
    torch.testing.assert_close(out[:, 0], alpha[:, 0])  # η = 0 keeps the fixed weights
    torch.testing.assert_close(out[1, 1], mirror_ascent_step(alpha[1, 1], sums[1, 1], 0.5))


def test_gr_dpo_beats_dpo_and_is_dpo_on_worst_group_in_uneven_imbalanced():
    cfg = SyntheticConfig(
        scenarios=("uneven-imbalanced",),
        methods=("dpo", "is-dpo", "gr-dpo"),
        seeds=5,
        iterations=1000,
    )
    runs = run_sweep(cfg).scenarios["uneven-imbalanced"].methods
    worst = {m: float(r.worst_val_loss.mean()) for m, r in runs.items()}
    assert worst["gr-dpo"] < worst["dpo"] and worst["gr-dpo"] < worst["is-dpo"], worst
    # and α moved toward the harder minority group 0
    assert float(runs["gr-dpo"].group_weights[:, 0].mean()) > 0.5


def test_one_seed_at_a_time_gives_the_same_numbers_as_batched():
    cfg = SyntheticConfig(seeds=2, iterations=200)
    a, b = run_sweep(cfg), run_sweep(cfg, one_seed_at_a_time=True)
    for name, sc in a.scenarios.items():
        for m, r in sc.methods.items():
            torch.testing.assert_close(
                r.theta, b.scenarios[name].methods[m].theta, rtol=1e-9, atol=1e-9
            )
            torch.testing.assert_close(
                r.worst_val_curve, b.scenarios[name].methods[m].worst_val_curve
            )


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown scenario"):
        SyntheticConfig(scenarios=("nope",))
    with pytest.raises(ValueError, match="unknown method"):
        SyntheticConfig(methods=("grpo",))
    with pytest.raises(ValueError, match="feature_type"):
        SyntheticConfig(feature_type="same")
    with pytest.raises(ValueError, match="seeds"):
        SyntheticConfig(seeds=0)


def test_cli_writes_results_table_and_figures(tmp_path):
    from flows.cli import main

    out = tmp_path / "out"
    args = ["reproduce", "synthetic", "--scenario", "all", "--seeds", "2", "--iterations", "200"]
    assert main([*args, "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["scenarios"]) == {"even-imbalanced", "uneven-balanced", "uneven-imbalanced"}
    one = json.loads((out / "results-uneven-imbalanced.json").read_text())
    assert (one["scenario"], one["seeds"], one["iterations"]) == ("uneven-imbalanced", 2, 200)
    gr = one["methods"]["gr-dpo"]
    assert set(gr) >= {
        "worst_group_val_loss",
        "max_reward_error",
        "final_group_weights",
        "worst_group_val_loss_curve",
    }
    assert [p[0] for p in gr["worst_group_val_loss_curve"]] == [0, 100, 200]
    assert sum(gr["final_group_weights"]) == pytest.approx(1.0)
    for name in summary["scenarios"]:
        png = out / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 200_000
    assert "| uneven-imbalanced | GR-DPO |" in (out / "results.md").read_text()
    assert main(["reproduce", "synthetic", "--scenario", "bogus", "--out", str(out)]) == 2


@pytest.mark.slow
def test_cli_mlflow_logs_one_run_per_scenario_and_method(tmp_path, monkeypatch):
    import mlflow

    from flows.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "out"
    args = ["reproduce", "synthetic", "--scenario", "uneven-imbalanced", "--methods", "dpo,gr-dpo"]
    assert main([*args, "--seeds", "2", "--iterations", "100", "--out", str(out), "--mlflow"]) == 0
    one = json.loads((out / "results.json").read_text())  # one scenario: the shape
    assert one["scenario"] == "uneven-imbalanced" and set(one["methods"]) == {"dpo", "gr-dpo"}
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("grpo-synthetic").experiment_id])
    assert sorted(r.data.params["method"] for r in runs) == ["dpo", "gr-dpo"]
    run = next(r for r in runs if r.data.params["method"] == "gr-dpo")
    assert run.data.metrics["eval/worst_group/loss"] == pytest.approx(
        one["methods"]["gr-dpo"]["worst_group_val_loss"]["mean"]
    )
    history = client.get_metric_history(run.info.run_id, "val/worst_group_loss")
    assert [m.step for m in history] == [0, 100]


def test_group_moment_forms_equal_the_per_pair_ipo_functions():
    from grpo.groups import group_means
    from grpo.synthetic.policy import (
        group_moments,
        ipo_closed_form_grouped,
        ipo_group_losses,
        ipo_group_losses_scaled,
    )

    gen = torch.Generator().manual_seed(3)
    d = torch.randn(2, 40, 4, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, 2, (2, 40), generator=gen)
    sizes = torch.stack([torch.bincount(i, minlength=2) for i in idx]).double().unsqueeze(1)
    theta = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    gram, sums = group_moments(d, idx, 2)
    per_pair = group_means(
        ipo_loss(margins(theta, d.transpose(1, 2).contiguous()), 0.1), idx.unsqueeze(1), 2
    )
    torch.testing.assert_close(ipo_group_losses(theta, gram, sums, sizes, 0.1), per_pair)
    # the loop's form: moments divided by N_g once, 1/β and 1/(4β²) precomputed
    inv = (1.0 / sizes).view(2, 2, 1, 1)
    scaled = ipo_group_losses_scaled(
        theta,
        (gram * inv).permute(0, 2, 1, 3).reshape(2, 4, 8),
        (sums * inv.view(2, 2, 1)).transpose(1, 2),
        10.0,
        25.0,
    )
    torch.testing.assert_close(scaled, per_pair)
    w = torch.softmax(torch.randn(2, 3, 2, generator=gen, dtype=torch.float64), -1)
    grouped = ipo_closed_form_grouped(
        gram, sums, pair_coefficients(w, torch.arange(2), sizes, 40), 0.1, 0.5
    )
    pairwise = ipo_closed_form(d, pair_coefficients(w, idx.unsqueeze(1), sizes, 40), 0.1, 0.5)
    torch.testing.assert_close(grouped, pairwise)


def test_float32_sweep_agrees_with_float64():
    base = SyntheticConfig(seeds=2, iterations=300)
    a = run_sweep(base)
    b = run_sweep(SyntheticConfig(seeds=2, iterations=300, dtype="float32"))
    for name, sc in a.scenarios.items():
        for m, r in sc.methods.items():
            other = b.scenarios[name].methods[m]
            torch.testing.assert_close(
                other.val_group_loss.double(), r.val_group_loss, rtol=1e-4, atol=1e-4
            )


def test_worker_processes_split_the_seeds_without_changing_numbers():
    """Two worker processes (seeds 2021-2022 | 2023) give the numbers of one process, in seed
    order; the last seed equals a sweep of that seed alone; progress reaches the last step."""
    one = run_sweep(SyntheticConfig(seeds=3, iterations=120, workers=1))
    seen: list[int] = []
    two = run_sweep(SyntheticConfig(seeds=3, iterations=120, workers=2), progress=seen.append)
    alone = run_sweep(SyntheticConfig(seeds=1, first_seed=2023, iterations=120, workers=1))
    assert seen[-1] == 120
    for name, sc in one.scenarios.items():
        for m, r in sc.methods.items():
            other = two.scenarios[name].methods[m]
            for f in ("worst_val_curve", "val_group_loss", "reward_error", "theta"):
                torch.testing.assert_close(getattr(other, f), getattr(r, f), rtol=1e-12, atol=0)
            torch.testing.assert_close(
                other.theta[2:], alone.scenarios[name].methods[m].theta, rtol=1e-12, atol=0
            )


def test_each_scenario_runs_its_own_iteration_count(monkeypatch):
    """Scenarios of 7, 12 and 30 iterations swept together give each scenario the numbers of a
    sweep of it alone (a scenario that finished used to make the others skip a step)."""
    from dataclasses import replace

    from grpo.synthetic import runner
    from grpo.synthetic.policy import group_moments

    counts = {"uneven-balanced": 7, "even-imbalanced": 12, "uneven-imbalanced": 30}
    for name, n in counts.items():
        monkeypatch.setitem(runner.SCENARIOS, name, replace(runner.SCENARIOS[name], iterations=n))
    cfg = SyntheticConfig(seeds=2, record_every=5)
    together = run_sweep(cfg).scenarios
    # Together, each data set does the same float64 operations on the same shapes as alone; only
    # the batch of data sets is longer, which can change an elementwise function's last bit (a
    # vectorised body vs a scalar tail) or a product's blocking. Each step is a sum of at most
    # N + d terms (γ ≤ (N + d)·u of its size); gradient steps here are non-expansive (η_θβ²/4
    # · λ_max(Σ_g w_g G_g/N_g) ≤ 0.66 < 2), so the steps' errors add up over T; the IPO closed
    # form multiplies them by cond(Σ_g c_g G_g) ≤ max_g cond(G_g) (G_g = Σ_{i∈g} Δφ_iΔφ_iᵀ).
    u64, t_max = 2.0**-53, max(counts.values())
    cond = 1.0
    for name in counts:
        sets = runner._datasets(cfg, runner.SCENARIOS[name], cfg.seed_list)
        delta = torch.stack([ds.train.delta_phi(cfg.feature_type) for ds in sets])
        gram, _ = group_moments(delta, torch.stack([ds.train.groups for ds in sets]), 2)
        cond = max(cond, float(torch.linalg.cond(gram).max()))
    rtol = t_max * (cfg.train_pairs + delta.shape[-1]) * u64 * cond
    fields = ("theta", "group_weights", "worst_val_curve", "val_group_loss", "reward_error")
    for name, n in counts.items():
        alone = run_sweep(replace(cfg, scenarios=(name,))).scenarios[name]
        assert together[name].steps == alone.steps == runner.record_steps(n, 5)
        one_less = run_sweep(replace(cfg, scenarios=(name,), iterations=n - 1)).scenarios[name]
        skipped = 0.0
        for m, r in alone.methods.items():
            for f in fields:
                want = getattr(r, f)
                atol = rtol * float(want.abs().max())
                torch.testing.assert_close(
                    getattr(together[name].methods[m], f), want, rtol=rtol, atol=atol
                )
            skipped = max(skipped, float((one_less.methods[m].theta - r.theta).abs().max()))
        # one step fewer is far outside the tolerance: the comparison sees a skipped step
        assert skipped > 1e6 * rtol * float(r.theta.abs().max()), (name, skipped, rtol)
