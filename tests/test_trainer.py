"""The preference trainer: the estimator and α update by hand, accumulation, a tiny run learns."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.config import ConfigError, from_dict
from grpo.distributed import NonFiniteError, micro_batches
from grpo.evaluation import evaluate_pairs
from grpo.logprobs import SequenceScorer, score_pairs
from grpo.modeling import load_model, load_pretrained, load_tokenizer
from grpo.trainer import PreferenceTrainer, TrainConfig, encode_frame, group_index, train
from tests.trainer_helpers import load_policy_state, small_pairs, tiny_model_cfg


@pytest.fixture(scope="module")
def setup():
    df = small_pairs(150, seed=0)
    mcfg = tiny_model_cfg()
    train_df = df[df["split"] == "train"].reset_index(drop=True)
    tok = load_tokenizer(mcfg, train_df["prompt"].tolist() + train_df["chosen"].tolist())
    pairs = encode_frame(train_df, tok, mcfg)
    names = sorted(train_df["group"].unique())
    groups = group_index(train_df, names, "train")
    return df, mcfg, tok, pairs, groups, names


def make_trainer(setup, **cfg):
    _, mcfg, tok, pairs, groups, names = setup
    model = load_model(mcfg, tok)
    ref = score_pairs(SequenceScorer(model), pairs, pad_token_id=tok.pad_token_id)
    tcfg = TrainConfig(**{"progress": False, **cfg})
    return PreferenceTrainer(
        model, pairs, groups, names, tcfg, pad_token_id=tok.pad_token_id, reference_logps=ref
    )


def test_micro_batches_partition_the_global_batch():
    idx = torch.arange(8)
    assert [c.tolist() for c in micro_batches(idx, 2, 1, 0)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # 2 ranks × 2 accumulation steps: rank r takes chunks r and 2 + r
    assert [c.tolist() for c in micro_batches(idx, 2, 2, 0)] == [[0, 1], [4, 5]]
    assert [c.tolist() for c in micro_batches(idx, 2, 2, 1)] == [[2, 3], [6, 7]]


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_first_step_estimate_and_alpha_by_hand(setup, loss):
    """At step 0 the policy is the reference, so every ℓ_i is log 2 (DPO) or 1/(4β²) (IPO), up
    to float32 rounding of the margin h (the step and the precomputed reference score the same
    pairs in different batches, so h is a few float32 ulps of the log-probs away from 0)."""
    beta, eta = 0.5, 0.7
    trainer = make_trainer(setup, method=f"gr-{loss}", beta=beta, eta_alpha=eta, batch_size=12)
    sizes = trainer.group_sizes
    n = float(sizes.sum())
    idx = torch.arange(12) * 3 % len(trainer.train_pairs)
    out = trainer.train_step(idx)
    ell = math.log(2) if loss == "dpo" else 1 / (4 * beta**2)
    counts = torch.bincount(trainer.train_groups[idx], minlength=3).double()
    torch.testing.assert_close(out["group_counts"], counts)
    # |h| ≤ 4 log-probs × 16 ulps each (float32 sums over ≤ 33 response tokens, two batchings);
    # |dℓ/dh| = β σ(−βh) ≈ β/2 for DPO, 2|h − 1/(2β)| ≈ 1/β for IPO.
    ref_c, ref_r = trainer.reference_logps
    h_tol = 4 * 16 * torch.finfo(torch.float32).eps * float(torch.cat([ref_c, ref_r]).abs().max())
    ell_tol = h_tol * (beta / 2 if loss == "dpo" else 1 / beta)
    scale = n / (12 * sizes)  # L̂_g = N/(B N_g) Σ_{i∈g} ℓ_i
    want_hat = scale * counts * ell
    torch.testing.assert_close(
        out["group_estimates"], want_hat, rtol=0, atol=float((scale * counts).max()) * ell_tol
    )
    # the α step divides L̂ by ℓ₀ = the loss at zero margin, so here log α_g moves by η·N_g-scaled
    # counts: α ∝ exp(η · N/(B N_g) · count_g), whatever the loss and β
    want_alpha = torch.exp(eta * scale * counts) / torch.exp(eta * scale * counts).sum()
    alpha_tol = eta * float((scale * counts).max()) * ell_tol / ell  # |d log α| ≤ η δL̂/ℓ₀
    torch.testing.assert_close(out["alpha"], want_alpha, rtol=2 * alpha_tol, atol=0)
    assert out["alpha"].sum().item() == pytest.approx(1.0, abs=1e-12)
    # the θ step used the uniform weights: Σ_g (1/3) L̂_g
    assert out["loss"] == pytest.approx(
        float(want_hat.sum() / 3), abs=float(want_hat.sum()) * ell_tol
    )
    torch.testing.assert_close(out["alpha_used"], torch.full((3,), 1 / 3, dtype=torch.float64))


def test_pooled_dpo_objective_is_the_batch_mean(setup):
    trainer = make_trainer(setup, method="dpo", batch_size=8)
    out = trainer.train_step(torch.arange(8))
    assert out["loss"] == pytest.approx(math.log(2), rel=1e-6)  # mean of log 2
    torch.testing.assert_close(out["alpha"], torch.full((3,), 1 / 3, dtype=torch.float64))


def test_grad_accumulation_equals_one_big_batch(setup):
    runs = []
    for accum in (1, 4):
        trainer = make_trainer(
            setup, method="gr-dpo", batch_size=8, grad_accum=accum, eta_alpha=2.0
        )
        for step in range(3):
            trainer.train_step(torch.arange(8) + 8 * step)
        runs.append(trainer)
    for p1, p4 in zip(runs[0].policy.parameters(), runs[1].policy.parameters(), strict=True):
        # Adam amplifies float noise in near-zero gradients: max |Δ| measured 1.6e-6 with the
        # two-sequence path, 2.1e-6 with the shared-prompt one (the default)
        torch.testing.assert_close(p1, p4, atol=5e-6, rtol=1e-5)
    torch.testing.assert_close(runs[0].weights.alpha, runs[1].weights.alpha)
    assert not torch.allclose(runs[0].weights.alpha, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_online_reference_equals_precomputed(setup):
    _, mcfg, tok, pairs, groups, names = setup
    precomputed = make_trainer(setup, method="gr-ipo", batch_size=8, beta=0.5)
    model = load_model(mcfg, tok)
    reference = load_model(mcfg, tok).requires_grad_(False)
    online = PreferenceTrainer(
        model, pairs, groups, names,
        TrainConfig(method="gr-ipo", batch_size=8, beta=0.5, reference="online", progress=False),
        pad_token_id=tok.pad_token_id, reference_model=reference,
    )  # fmt: skip
    for step in range(2):
        a = precomputed.train_step(torch.arange(8) + 8 * step)
        b = online.train_step(torch.arange(8) + 8 * step)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    torch.testing.assert_close(precomputed.weights.alpha, online.weights.alpha)


def test_lr_cut_halves_eta_alpha(setup):
    trainer = make_trainer(setup, method="gr-dpo", eta_alpha=0.8, scheduler_patience=1, lr=1e-3)
    assert not trainer.scheduler_step(1.0)  # best so far
    assert not trainer.scheduler_step(1.0)  # 1 bad evaluation: within patience
    assert trainer.scheduler_step(1.0)  # 2 bad: cut
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert trainer.weights.eta == pytest.approx(0.4)


def test_constant_schedule_never_cuts(setup):
    trainer = make_trainer(
        setup, method="gr-dpo", eta_alpha=0.8, scheduler_patience=0, lr=1e-3, lr_schedule="constant"
    )
    assert not any(trainer.scheduler_step(1.0) for _ in range(5))
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-3 and trainer.weights.eta == 0.8
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine")


def test_model_threads_set_torch_threads(tmp_path):
    from grpo.modeling import ModelConfig

    cfg = TrainConfig(method="dpo", batch_size=8, epochs=0, max_steps=1, progress=False)
    train(small_pairs(150), tiny_model_cfg(threads=2), cfg, tmp_path)
    assert torch.get_num_threads() == 2  # conftest resets it to 1 for the next test
    with pytest.raises(ValueError, match="threads"):
        ModelConfig(threads=-1)


def test_train_config_validation():
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig(method="grpo")
    with pytest.raises(ValueError, match="divisible"):
        TrainConfig(batch_size=10, grad_accum=4)
    with pytest.raises(ValueError, match="reference"):
        TrainConfig(reference="cached")
    with pytest.raises(ConfigError, match=r"params\.yaml:train: unknown key"):
        from_dict(TrainConfig, {"learning_rate": 1}, where="params.yaml:train")


def test_tiny_run_changes_parameters_and_lowers_loss(setup, tmp_path):
    df, mcfg, *_ = setup
    logged: list[tuple[dict, int]] = []
    cfg = TrainConfig(
        method="gr-dpo", epochs=4, batch_size=8, lr=3e-3, eval_every=5, sft_epochs=1,
        checkpoint_every=0, progress=False, keep_best=False, early_stop_patience=0,
    )  # fmt: skip
    result = train(df, mcfg, cfg, tmp_path, log_fn=lambda m, s: logged.append((m, s)))
    steps = 4 * (len(df[df.split == "train"]) // 8)
    assert result.steps == steps and [s for _, s in logged] == list(range(1, steps + 1))
    names = {f"train/group_weight/{g}" for g in result.groups} | {"train/loss"}
    assert names <= set(logged[0][0])
    assert "val/worst_group_loss" in logged[4][0] and "val/worst_group_loss" not in logged[3][0]
    sft_losses = load_pretrained(result.reference_dir, "cpu")[2]["sft_losses"]
    assert sft_losses[-1] < sft_losses[0]
    before, after = load_policy_state(result.reference_dir), load_policy_state(result.model_dir)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    policy, tok, info = load_pretrained(result.model_dir, "cpu")
    reference, _, _ = load_pretrained(result.reference_dir, "cpu")
    assert info["method"] == "gr-dpo" and info["groups"] == result.groups
    train_rows = df[df.split == "train"]
    ev = evaluate_pairs(policy, reference, tok, train_rows, loss="dpo", beta=0.1)
    assert ev["overall"]["loss"] < math.log(2) - 0.02  # the policy started at log 2 (= reference)
    assert sum(result.alpha) == pytest.approx(1.0)
    assert result.alpha != pytest.approx([1 / 3] * 3)


def test_lora_run_saves_merged_policy_and_resumes(setup, tmp_path):
    df, *_ = setup
    mcfg = tiny_model_cfg(lora=True, lora_r=4)
    base = {"method": "gr-ipo", "beta": 0.5, "batch_size": 8, "epochs": 0, "lr": 1e-2}
    cfg = TrainConfig(**base, max_steps=4, checkpoint_every=2, sft_epochs=1, progress=False)
    first = train(df, mcfg, cfg, tmp_path)
    assert first.steps == 4
    state = load_policy_state(first.model_dir)
    assert not any("lora" in k for k in state)  # adapters merged: a plain model
    reference = load_policy_state(first.reference_dir)
    assert any(not torch.equal(state[k], reference[k]) for k in state)
    more = TrainConfig(**base, max_steps=6, checkpoint_every=2, sft_epochs=1, progress=False)
    second = train(df, mcfg, more, tmp_path)  # resumes the step-4 checkpoint (LoRA weights)
    assert second.steps == 6
    assert [h["step"] for h in second.history] == [1, 2, 3, 4, 5, 6]
    assert second.history[:4] == first.history


def test_saved_policy_records_the_group_weights_of_the_kept_step(tmp_path):
    """keep_best saves an earlier step's parameters: grpo.json and the result carry that step's
    α and w (read back from the step's logged weights: with χ = 1, w = α), not the last step's."""
    cfg = TrainConfig(
        method="gr-dpo",
        eta_alpha=1.0,
        batch_size=8,
        epochs=0,
        max_steps=8,
        eval_every=2,
        checkpoint_every=0,
        lr=0.3,
        scheduler_patience=100,
        early_stop_patience=0,
        keep_best=True,
        progress=False,
    )  # fmt: skip  (lr 0.3 overshoots after step 4: validation 0.38, 0.35, 1.07, 0.62 here)
    result = train(small_pairs(150, seed=3), tiny_model_cfg(), cfg, tmp_path)
    kept = result.best["step"]
    assert kept < result.steps == 8  # the case under test: the best step is not the last
    _, _, info = load_pretrained(result.model_dir, "cpu")

    def logged(step: int) -> list[float]:
        entry = result.history[step - 1]
        return [entry[f"train/group_weight/{g}"] for g in result.groups]

    assert info["alpha"] == result.alpha == logged(kept)
    assert info["weights"] == result.weights == logged(kept)
    assert info["step"] == kept
    assert result.final_alpha == info["final_alpha"] == logged(8)
    assert result.final_alpha != pytest.approx(result.alpha, abs=1e-3)


def _poison_reference(monkeypatch, group: int, at_step: int) -> None:
    """From the step ``at_step`` (1-based) on, the reference log-probs of ``group``'s pairs are
    NaN, so those pairs' losses (and the gradient) are NaN."""
    real = PreferenceTrainer._reference

    def poisoned(self, micro):
        chosen, rejected = real(self, micro)
        if self.step + 1 >= at_step:
            bad = (self.train_groups[micro.index] == group).to(chosen.device)
            chosen = torch.where(bad, torch.full_like(chosen, math.nan), chosen)
        return chosen, rejected

    monkeypatch.setattr(PreferenceTrainer, "_reference", poisoned)


def test_nan_loss_stops_naming_the_step_and_group(setup, monkeypatch):
    _, _, _, _, groups, names = setup
    trainer = make_trainer(setup, method="gr-dpo", batch_size=12)
    batch = torch.arange(12)
    present = sorted({names[g] for g in groups[batch].tolist()})
    assert len(present) > 1  # other groups in the batch must not be named
    trainer.train_step(batch)
    _poison_reference(monkeypatch, group=names.index(present[0]), at_step=2)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    alpha = trainer.weights.alpha.clone()
    with pytest.raises(NonFiniteError, match=rf"preference step 2: non-finite loss in group\(s\) \['{present[0]}'\]") as err:  # fmt: skip
        trainer.train_step(batch)
    assert (err.value.step, err.value.quantity, err.value.groups) == (2, "loss", [present[0]])
    # the NaN gradient was not applied and α did not move
    for b, p in zip(before, trainer.policy.parameters(), strict=True):
        assert torch.equal(b, p)
    assert torch.equal(alpha, trainer.weights.alpha) and trainer.step == 1


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_infinite_gradient_stops_naming_the_batch_groups(setup, grad_clip):
    _, _, _, _, groups, names = setup
    trainer = make_trainer(setup, method="dpo", batch_size=8, grad_clip=grad_clip)
    weight = next(p for p in trainer.policy.parameters() if p.requires_grad)
    weight.register_hook(lambda grad: torch.full_like(grad, math.inf))  # the loss stays finite
    batch = torch.arange(8) + 8
    with pytest.raises(NonFiniteError, match="preference step 1: non-finite gradient norm") as err:
        trainer.train_step(batch)
    assert err.value.groups == sorted({names[g] for g in groups[batch].tolist()})


def test_nan_group_weight_stops_naming_the_group(setup, monkeypatch):
    _, _, _, _, _, names = setup
    trainer = make_trainer(setup, method="gr-dpo", batch_size=8)
    monkeypatch.setattr(
        trainer.weights, "update", lambda losses: torch.tensor([0.5, math.nan, 0.5])
    )
    with pytest.raises(NonFiniteError, match="step 1: non-finite group weight") as err:
        trainer.train_step(torch.arange(8))
    assert err.value.groups == [names[1]]


def test_nan_in_sft_stops_naming_the_step(setup):
    from grpo.distributed import DistInfo
    from grpo.sft import sft

    _, mcfg, tok, pairs, _, _ = setup
    model = load_model(mcfg, tok)
    next(model.parameters()).register_hook(lambda grad: torch.full_like(grad, math.nan))
    cfg = TrainConfig(sft_epochs=1, sft_batch_size=8, progress=False)
    with pytest.raises(NonFiniteError, match=r"sft step 1: non-finite gradient norm \(nan\)"):
        sft(
            model, pairs, cfg, pad_token_id=tok.pad_token_id, padding_side="right",
            device=torch.device("cpu"), dtype="float32", dist_info=DistInfo(),
        )  # fmt: skip


def test_nan_during_train_saves_nothing(setup, tmp_path, monkeypatch):
    df, mcfg, *_ = setup
    _poison_reference(monkeypatch, group=0, at_step=3)
    cfg = TrainConfig(
        method="gr-ipo", batch_size=16, epochs=0, max_steps=5, eval_every=1, checkpoint_every=1,
        progress=False,
    )  # fmt: skip
    with pytest.raises(NonFiniteError, match="preference step 3"):
        train(df, mcfg, cfg, tmp_path)
    assert not (tmp_path / "policy").exists() and not (tmp_path / "train_result.json").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-0000001", "step-0000002",
    ]  # fmt: skip
