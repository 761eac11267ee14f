"""Models and tokenizers built offline: determinism, save/load round trips, LoRA, generation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.modeling import (
    ModelConfig,
    add_lora,
    load_model,
    load_pretrained,
    load_tokenizer,
    save_model,
    train_tokenizer,
)

TEXTS = [
    "Opinion of people in Northland on: Should taxes pay for ferry routes?\nAnswer: A",
    "Opinion of people in Island on: Are wind farms a waste of money?\nAnswer: B",
] * 20
LLAMA = {
    "model_type": "llama",
    "num_hidden_layers": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def test_tokenizer_is_deterministic_and_round_trips(tmp_path):
    a, b = train_tokenizer(TEXTS, 320), train_tokenizer(TEXTS, 320)
    assert a.get_vocab() == b.get_vocab()
    ids = a(TEXTS[0])["input_ids"]
    assert a.decode(ids) == TEXTS[0]  # byte-level: lossless
    assert len(ids) < len(TEXTS[0]) / 2  # merges were learnt
    a.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(TEXTS[1])["input_ids"] == a(TEXTS[1])["input_ids"]
    assert (loaded.pad_token, loaded.eos_token) == ("<pad>", "<|endoftext|>")
    assert loaded.pad_token_id != loaded.eos_token_id


@pytest.mark.parametrize("config", [None, LLAMA], ids=["gpt2", "llama"])
def test_model_from_config_is_seeded_and_sized(config):
    cfg = ModelConfig(tokenizer_vocab_size=320, **({"config": config} if config else {}))
    tok = load_tokenizer(cfg, TEXTS)
    m1, m2 = load_model(cfg, tok), load_model(cfg, tok)
    assert m1.config.vocab_size == len(tok)
    assert m1.config.pad_token_id == tok.pad_token_id
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)
    other = load_model(
        ModelConfig(
            tokenizer_vocab_size=320, init_seed=1, **({"config": config} if config else {})
        ),
        tok,
    )
    assert not torch.equal(next(iter(other.parameters())), next(iter(m1.parameters())))
    assert all(not isinstance(m, torch.nn.Dropout) or m.p == 0 for m in m1.modules())


def test_save_load_generate(tmp_path):
    cfg = ModelConfig(tokenizer_vocab_size=320)
    tok = load_tokenizer(cfg, TEXTS)
    model = load_model(cfg, tok).eval()
    save_model(model, tok, tmp_path / "m", extra={"beta": 0.1})
    loaded, tok2, extra = load_pretrained(tmp_path / "m", "cpu")
    assert extra == {"beta": 0.1}
    ids = tok2(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    out = loaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 or tok2.eos_token_id in out[0, ids.shape[1] :].tolist()
    assert isinstance(tok2.decode(out[0]), str)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # what MLflow's flavor does
    assert plain.config.model_type == "gpt2"


def test_lora_trains_adapters_only_and_saves_merged(tmp_path):
    cfg = ModelConfig(tokenizer_vocab_size=320, lora=True, lora_r=4)
    tok = load_tokenizer(cfg, TEXTS)
    peft_model = add_lora(load_model(cfg, tok), cfg)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.05)
    ids = tok(TEXTS[0], return_tensors="pt")["input_ids"]
    save_model(peft_model, tok, tmp_path / "lora")
    merged, _, _ = load_pretrained(tmp_path / "lora", "cpu")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_config_errors():
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig(config={"n_layer": 2})
    with pytest.raises(ValueError, match="padding_side"):
        ModelConfig(padding_side="middle")
