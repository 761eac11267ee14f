"""The trainer's step applies exactly the gradient of Σ_i c_i ℓ_i, with c_i from the group
weights it logs (issue 14: rule out a defect before blaming the method).

The trainer's path (shared-prompt scoring with a KV cache, two accumulated micro-batches, gradient
clipping) is compared with a naive reference: each pair scored by a plain full forward pass of its
prompt + response, ℓ_i = −log σ(β h_i), c_i = N w_{g(i)} / (B N_{g(i)}) computed here by hand from
the logged weights, one autograd call on Σ c_i ℓ_i, then the clipping rule. An SGD step of lr 1
makes the parameter change equal to minus the applied gradient.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from grpo.logprobs import SequenceScorer, score_pairs
from grpo.modeling import load_model, load_tokenizer
from grpo.trainer import PreferenceTrainer, TrainConfig, encode_frame, group_index
from tests.trainer_helpers import small_pairs, tiny_model_cfg

BETA, B = 0.1, 8


def naive_logp(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Σ_t log p(response_t | prompt, response_<t) from one full forward pass (no cache)."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return F.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response)[:, None]).sum()


@pytest.mark.parametrize("clip", [False, True])
def test_step_applies_the_gradient_of_the_logged_weights(clip):
    df = small_pairs(150, seed=2)
    mcfg = tiny_model_cfg()
    train_df = df[df["split"] == "train"].reset_index(drop=True)
    tok = load_tokenizer(mcfg, train_df["prompt"].tolist() + train_df["chosen"].tolist())
    pairs = encode_frame(train_df, tok, mcfg)
    names = sorted(train_df["group"].unique())
    groups = group_index(train_df, names, "train")
    model = load_model(mcfg, tok)
    ref = score_pairs(SequenceScorer(model), pairs, pad_token_id=tok.pad_token_id)
    # move the policy off the reference so margins and per-pair gradients differ
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = TrainConfig(
        method="gr-dpo",
        beta=BETA,
        chi=0.5,
        batch_size=B,
        grad_accum=2,
        grad_clip=0.0,
        progress=False,
    )
    trainer = PreferenceTrainer(
        model, pairs, groups, names, cfg, pad_token_id=tok.pad_token_id, reference_logps=ref
    )
    assert trainer.scorer.shared_prompt  # the KV-cache path is the one under test
    trainer.weights.log_alpha = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64).log()
    naive = copy.deepcopy(trainer.policy)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    idx = torch.tensor([3, 17, 40, 41, 55, 60, 71, 90]) % len(pairs)

    # the naive reference gradient, from the weights the trainer will log for this step
    w = trainer.weights.weights.clone()
    sizes = torch.bincount(groups, minlength=3).double()
    n = float(sizes.sum())
    total = 0.0
    for i in idx.tolist():
        g = int(groups[i])
        c = n * float(w[g]) / (B * float(sizes[g]))
        h = (naive_logp(naive, pairs.prompt[i], pairs.chosen[i]) - ref[0][i]) - (
            naive_logp(naive, pairs.prompt[i], pairs.rejected[i]) - ref[1][i]
        )
        total = total + c * -F.logsigmoid(BETA * h)
    total.backward()
    grads = {name: p.grad.detach().clone() for name, p in naive.named_parameters()}
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))

    if clip:  # clipping active: half the gradient's norm
        trainer.cfg.grad_clip = norm / 2
    trainer.optimizer = torch.optim.SGD(
        [p for p in trainer.policy.parameters() if p.requires_grad], lr=1.0
    )
    out = trainer.train_step(idx)
    torch.testing.assert_close(out["weights"], w)  # the logged weights are those used
    assert out["loss"] == pytest.approx(float(total), rel=1e-5)
    scale = (norm / 2) / (norm + 1e-6) if clip else 1.0  # torch's clip_grad_norm_ rule
    assert out["grad_norm"] == pytest.approx(norm, rel=1e-4)
    # float32 on two computation paths (cached vs full prompt, 2 micro-batches vs 1 sum): the
    # gradients agree to ~1e-5 of their largest entry; 1e-4 leaves room, a wrong c_i (α instead
    # of w = (1−χ)/K + χα with χ = 0.5 here, or N_g ignored: factors of 1.3–6) is far outside
    largest = max(float(g.abs().max()) for g in grads.values())
    for name, p in trainer.policy.named_parameters():
        applied = before[name] - p.detach()
        torch.testing.assert_close(applied, scale * grads[name], rtol=0, atol=1e-4 * largest)
