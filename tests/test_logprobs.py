"""Masked, summed response log-probs: both code paths against a naive per-token loop."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from grpo.logprobs import (
    EncodedPairs,
    SequenceScorer,
    collate_pairs,
    collate_sequences,
    encode_pairs,
    join_response,
    score_pairs,
    split_pairs,
)
from grpo.modeling import ModelConfig, add_lora, disable_dropout, train_tokenizer

VOCAB = 50
PAD = 0


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread is faster, and steady on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    assert enc.prompt[0] == full_prompt[-3:]
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
