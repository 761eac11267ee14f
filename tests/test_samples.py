"""Scored-option samples (grpo.samples): marks from the data, scores against a naive forward."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from grpo.data.prompts import format_prompt
from grpo.modeling import train_tokenizer
from grpo.samples import parse_options, pick_pairs, sample_rows, score_samples

BETA = 0.5
OPTIONS = ["Strongly agree", "Somewhat agree", "Somewhat disagree", "Strongly disagree"]


def test_parse_options_reads_the_lettered_run_only():
    prompt = format_prompt("Japan", "A. B. or C.?", OPTIONS)
    assert parse_options(prompt) == list(zip("ABCD", OPTIONS, strict=True))
    assert parse_options("no options here\nAnswer:") == []
    assert parse_options("B. starts at B\nC. then C") == []  # not a run from A


def pairs() -> pd.DataFrame:
    # group x: 3 pairs (2 are kept), group y: 1 pair with free-text responses (no letters)
    rows = [
        ("x-2", "x", format_prompt("x", "Tea?", OPTIONS), "B", "D"),
        ("x-1", "x", format_prompt("x", "Rain?", OPTIONS), "A", "C"),
        ("x-3", "x", format_prompt("x", "Snow?", OPTIONS), "D", "A"),
        ("y-1", "y", "Say something kind:", "thank you", "go away"),
    ]
    frame = pd.DataFrame(rows, columns=["pair_id", "group", "prompt", "chosen", "rejected"])
    return frame.assign(question_id=frame["pair_id"], split="test")


def models():
    texts = [*pairs()["prompt"], "A B C D thank you go away"] * 4
    tokenizer = train_tokenizer(texts, vocab_size=300)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=16, n_positions=128)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config).eval()
    torch.manual_seed(1)
    reference = AutoModelForCausalLM.from_config(config).eval()
    return policy, reference, tokenizer


def naive_logp(model, tokenizer, prompt: str, response: str) -> float:
    """Σ log p(response tokens | prompt) from one full forward over prompt + " " + response + EOS."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + response_ids + [tokenizer.eos_token_id]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    targets = ids[0, len(prompt_ids) :]
    positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return float(logp[positions, targets].sum())


def test_pick_pairs_takes_the_first_pairs_of_each_group_by_id():
    assert pick_pairs(pairs(), 2)["pair_id"].tolist() == ["x-1", "x-2", "y-1"]
    assert pick_pairs(pairs(), 0).empty


def test_scored_options_match_the_data_and_a_naive_forward():
    policy, reference, tokenizer = models()
    frame = pairs()
    samples = score_samples(policy, reference, tokenizer, frame, per_group=2, beta=BETA)
    assert [s["pair_id"] for s in samples] == ["x-1", "x-2", "y-1"]
    by_id = frame.set_index("pair_id")
    for sample in samples:
        row = by_id.loc[sample["pair_id"]]
        marks = {o["response"]: o["mark"] for o in sample["options"]}
        # the chosen and rejected marks are the data's, every other option unmarked
        assert marks[row["chosen"]] == "chosen" and marks[row["rejected"]] == "rejected"
        assert sorted(marks.values()).count("") == len(marks) - 2
        for option in sample["options"]:
            pol = naive_logp(policy, tokenizer, row["prompt"], option["response"])
            ref = naive_logp(reference, tokenizer, row["prompt"], option["response"])
            # float32 sums over ≤ 3 response tokens of log-softmax values of order 5: ~1e-5
            assert option["policy_logp"] == pytest.approx(pol, abs=1e-4)
            assert option["reference_logp"] == pytest.approx(ref, abs=1e-4)
            assert option["reward"] == pytest.approx(BETA * (pol - ref), abs=1e-4)
        rewards = {o["response"]: o["reward"] for o in sample["options"]}
        chosen = rewards[row["chosen"]]
        # the rank and the flags follow from the scores
        assert sample["chosen_rank"] == 1 + sum(r > chosen for r in rewards.values())
        assert sample["ranks_chosen_first"] == (chosen >= max(rewards.values()))
        assert sample["prefers_chosen"] == (chosen > rewards[row["rejected"]])
        assert rewards[sample["policy_top"]] == max(rewards.values())
    lettered, free = samples[0], samples[2]
    assert [o["response"] for o in lettered["options"]] == list("ABCD")
    assert [o["text"] for o in lettered["options"]] == OPTIONS
    assert [o["response"] for o in free["options"]] == ["thank you", "go away"]
    # the flat table: one row per option
    rows = sample_rows(samples)
    assert len(rows) == 4 + 4 + 2 and rows[0]["pair_id"] == "x-1"
    assert rows[0]["prompt"] == by_id.loc["x-1", "prompt"] and rows[-1]["response"] == "go away"
