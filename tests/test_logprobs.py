"""Masked, summed response log-probs: every code path against a naive per-token loop."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from grpo.logprobs import (
    EncodedPairs,
    SequenceBatch,
    SequenceScorer,
    SharedPromptBatch,
    _repeated_cache,
    collate_pairs,
    collate_sequences,
    collate_shared_prompt,
    encode_pairs,
    join_response,
    score_pairs,
    split_pairs,
    supports_fast_path,
    supports_shared_prompt,
)
from grpo.modeling import ModelConfig, add_lora, disable_dropout, train_tokenizer

VOCAB = 50
PAD = 0


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64,
        bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)
    disable_dropout(model)
    return model.eval()


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        bos_token_id=PAD,
        eos_token_id=PAD,
        pad_token_id=PAD,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def lora_gpt2() -> torch.nn.Module:
    model = add_lora(gpt2(), ModelConfig(lora=True, lora_r=4))
    # peft initialises B = 0 (a no-op adapter); make the adapters matter.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


def random_pairs(n: int, seed: int) -> EncodedPairs:
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[list[int]]:
        lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
        return [torch.randint(1, VOCAB, (k,), generator=g).tolist() for k in lens]

    return EncodedPairs(ids(1, 9), ids(1, 5), ids(1, 5))


def naive_logp(model: torch.nn.Module, prompt: list[int], response: list[int]) -> float:
    """Σ over response tokens of log softmax(logits[t-1])[token t], one unpadded sequence."""
    seq = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=seq).logits[0].double()
    total = 0.0
    for t in range(len(prompt), len(prompt) + len(response)):
        total += float(logits[t - 1].log_softmax(-1)[seq[0, t]])
    return total


@pytest.mark.parametrize("make_model", [gpt2, llama, lora_gpt2], ids=["gpt2", "llama", "lora"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "full"])
def test_masked_logps_match_naive_loop(make_model, padding_side, fast):
    model = make_model()
    pairs = random_pairs(5, seed=3)
    scorer = SequenceScorer(model, fast=fast)
    assert scorer.fast is fast
    batch = collate_pairs(pairs, PAD, padding_side)
    with torch.no_grad():
        chosen, rejected = split_pairs(scorer(**batch.as_kwargs()))
    want_c = [naive_logp(model, p, c) for p, c in zip(pairs.prompt, pairs.chosen, strict=True)]
    want_r = [naive_logp(model, p, r) for p, r in zip(pairs.prompt, pairs.rejected, strict=True)]
    torch.testing.assert_close(
        chosen.double(), torch.tensor(want_c, dtype=torch.float64), atol=2e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        rejected.double(), torch.tensor(want_r, dtype=torch.float64), atol=2e-5, rtol=1e-5
    )
    assert (chosen < 0).all()


def test_fast_path_gradients_equal_full_path():
    pairs = random_pairs(4, seed=5)
    batch = collate_pairs(pairs, PAD, "left")
    grads = []
    for fast in (True, False):
        model = gpt2()
        SequenceScorer(model, fast=fast)(**batch.as_kwargs()).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_collate_masks_by_hand():
    batch = collate_sequences([[5, 6], [7]], [[8], [9, 10]], pad_token_id=0, padding_side="left")
    assert batch.input_ids.tolist() == [[5, 6, 8], [7, 9, 10]]
    assert batch.response_mask.tolist() == [[0, 0, 1], [0, 1, 1]]
    batch = collate_sequences([[5, 6], [7]], [[8], [9]], pad_token_id=0, padding_side="left")
    assert batch.input_ids.tolist() == [[5, 6, 8], [0, 7, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 1]]
    assert batch.response_mask.tolist() == [[0, 0, 1], [0, 0, 1]]
    right = collate_sequences([[5, 6], [7]], [[8], [9]], pad_token_id=0, padding_side="right")
    assert right.input_ids.tolist() == [[5, 6, 8], [7, 9, 0]]
    assert right.response_mask.tolist() == [[0, 0, 1], [0, 1, 0]]
    assert right.position_ids.tolist() == [[0, 1, 2], [0, 1, 1]]


def test_encode_pairs_truncates_and_joins():
    tok = train_tokenizer(["Answer: A", "Answer: B", "hello world"] * 5, vocab_size=300)
    enc = encode_pairs(
        tok, ["x y z Answer:"], ["A"], ["B"], max_prompt_tokens=3, max_response_tokens=2
    )
    full_prompt = tok("x y z Answer:")["input_ids"]
    assert len(full_prompt) > 3
    # one line: its first ⌈3/2⌉ = 2 and last 1 tokens (tests/test_truncation.py has the rule)
    assert enc.prompt[0] == full_prompt[:2] + full_prompt[-1:]
    assert (
        enc.chosen[0] == [*tok(" A", add_special_tokens=False)["input_ids"], tok.eos_token_id][:2]
    )
    assert tok.decode(enc.chosen[0][:-1]) == " A"
    assert join_response("Answer:", "A") == " A" and join_response("Answer: ", "A") == "A"
    with pytest.raises(ValueError, match="differ in length"):
        encode_pairs(tok, ["a"], ["b", "c"], ["d"])


def test_score_pairs_batches_like_one_batch():
    model = gpt2()
    pairs = random_pairs(7, seed=9)
    c, r = score_pairs(SequenceScorer(model), pairs, pad_token_id=PAD, batch_size=3)
    with torch.no_grad():
        c1, r1 = split_pairs(SequenceScorer(model)(**collate_pairs(pairs, PAD).as_kwargs()))
    torch.testing.assert_close(c, c1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r, r1, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- shared-prompt path (prompt once)


def test_collate_shared_prompt_by_hand():
    pairs = EncodedPairs([[5, 6, 7], [8]], [[9], [10, 11]], [[12, 13], [14]])
    batch = collate_shared_prompt(pairs, pad_token_id=0)
    assert batch.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 8]]  # left-padded: same last column
    assert batch.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.response_ids.tolist() == [[9, 0], [10, 11], [12, 13], [14, 0]]  # chosen, rejected
    assert batch.response_mask.tolist() == [[1, 0], [1, 1], [1, 1], [1, 0]]
    with pytest.raises(ValueError, match=r"pair\(s\) \[1\] have an empty prompt"):
        collate_shared_prompt(EncodedPairs([[5], []], [[1], [2]], [[3], [4]]), 0)


def test_repeated_cache_copies_rows_without_touching_the_prompt_cache():
    model = gpt2()
    prompt = torch.tensor([[3, 4, 5], [6, 7, 8]])
    out = model.get_decoder()(input_ids=prompt, use_cache=True)
    before = [layer.keys.clone() for layer in out.cache.layers]
    rep = _repeated_cache(out.cache, 2)
    for layer, orig, rl in zip(out.cache.layers, before, rep.layers, strict=True):
        assert rl.keys.shape[0] == 4
        torch.testing.assert_close(rl.keys[:2], orig, rtol=0, atol=0)  # chosen rows
        torch.testing.assert_close(rl.keys[2:], orig, rtol=0, atol=0)  # rejected rows
        torch.testing.assert_close(rl.values[2:], layer.values, rtol=0, atol=0)
        assert torch.equal(layer.keys, orig) and layer.keys.shape[0] == 2


@pytest.mark.parametrize("make_model", [gpt2, llama, lora_gpt2], ids=["gpt2", "llama", "lora"])
def test_shared_prompt_logps_match_naive_loop_and_fast_path(make_model):
    model = make_model()
    pairs = random_pairs(6, seed=11)
    assert len({len(p) for p in pairs.prompt}) > 2  # prompts of several lengths in one batch
    scorer = SequenceScorer(model)
    assert scorer.shared_prompt
    batch = scorer.collate(pairs, PAD)
    assert isinstance(batch, SharedPromptBatch)
    with torch.no_grad():
        chosen, rejected = split_pairs(scorer(**batch.as_kwargs()))
        fast = SequenceScorer(model, shared_prompt=False)
        fast_c, fast_r = split_pairs(fast(**collate_pairs(pairs, PAD, "right").as_kwargs()))
    want_c = [naive_logp(model, p, c) for p, c in zip(pairs.prompt, pairs.chosen, strict=True)]
    want_r = [naive_logp(model, p, r) for p, r in zip(pairs.prompt, pairs.rejected, strict=True)]
    for got, want in ((chosen, want_c), (rejected, want_r)):
        torch.testing.assert_close(
            got.double(), torch.tensor(want, dtype=torch.float64), atol=2e-5, rtol=1e-5
        )
    torch.testing.assert_close(chosen, fast_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected, fast_r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make_model", [gpt2, llama, lora_gpt2], ids=["gpt2", "llama", "lora"])
def test_shared_prompt_gradients_equal_fast_path(make_model):
    pairs = random_pairs(5, seed=13)
    weights = torch.linspace(-1.0, 2.0, 10)  # a loss that weighs every row differently
    grads = []
    for shared in (True, False):
        model = make_model()
        scorer = SequenceScorer(model, shared_prompt=shared)
        assert scorer.shared_prompt is shared
        (weights * scorer(**scorer.collate(pairs, PAD).as_kwargs())).sum().backward()
        grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
    assert grads[0].shape == grads[1].shape and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_shared_prompt_falls_back_where_it_does_not_apply():
    model = gpt2()
    assert not SequenceScorer(model, fast=False).shared_prompt  # the full-logits reference path
    assert not SequenceScorer(model, shared_prompt=False).shared_prompt
    pairs = EncodedPairs([[3, 4], []], [[5], [6]], [[7], [8]])  # an empty prompt
    batch = SequenceScorer(model).collate(pairs, PAD)
    assert isinstance(batch, SequenceBatch)
    from transformers import GPTNeoXConfig

    neox = AutoModelForCausalLM.from_config(
        GPTNeoXConfig(
            num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
            vocab_size=VOCAB, max_position_embeddings=32,
        )
    )  # fmt: skip
    assert supports_fast_path(neox) and not supports_shared_prompt(neox)
    assert not SequenceScorer(neox).shared_prompt


def test_score_pairs_shared_prompt_equals_two_sequence_path():
    model = gpt2()
    pairs = random_pairs(7, seed=17)
    c, r = score_pairs(SequenceScorer(model), pairs, pad_token_id=PAD, batch_size=3)
    c0, r0 = score_pairs(
        SequenceScorer(model, shared_prompt=False), pairs, pad_token_id=PAD, batch_size=3
    )
    torch.testing.assert_close(c, c0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r, r0, atol=1e-5, rtol=1e-5)
    want = [naive_logp(model, p, y) for p, y in zip(pairs.prompt, pairs.chosen, strict=True)]
    torch.testing.assert_close(
        c.double(), torch.tensor(want, dtype=torch.float64), atol=2e-5, rtol=1e-5
    )


def test_train_step_shared_prompt_equals_two_sequence_path():
    """Two GR-DPO steps, online reference, with and without sharing: the same objective, group
    estimates, α and gradient norm (parameters are not compared: Adam's first steps move each
    weight by ≈ lr·sign(g), which turns 1e-9 float noise in a near-zero gradient into lr)."""
    from grpo.trainer import PreferenceTrainer, TrainConfig

    pairs = random_pairs(8, seed=19)
    groups = torch.tensor([0, 1] * 4)
    runs = []
    for shared in (True, False):
        cfg = TrainConfig(
            method="gr-dpo", batch_size=4, reference="online", shared_prompt=shared,
            lr=1e-2, eta_alpha=1.0, progress=False,
        )  # fmt: skip
        trainer = PreferenceTrainer(
            gpt2().train(), pairs, groups, ["a", "b"], cfg, pad_token_id=PAD,
            reference_model=gpt2(),
        )  # fmt: skip
        assert trainer.scorer.shared_prompt is shared
        runs.append([trainer.train_step(torch.arange(4) + 4 * s) for s in range(2)])
    for a, b in zip(*runs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["grad_norm"] > 0
        torch.testing.assert_close(a["group_estimates"], b["group_estimates"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a["alpha"], b["alpha"], rtol=1e-5, atol=1e-7)
