"""GGUF files as ``model.name_or_path``: a tiny llama written here with the ``gguf`` package, in
llama.cpp's conventions (quantised blocks, permuted q/k rows, tokenizer in the metadata), loads
back through the project's code with the weights and token ids worked out independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from grpo.modeling import (  # noqa: E402
    ModelConfig,
    is_gguf,
    load_model,
    load_pretrained,
    load_tokenizer,
    save_model,
)

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 96, 2
MERGES = ["Ġ t", "h e", "Ġt he"]  # " the" → Ġt, he → Ġthe


def byte_alphabet() -> list[str]:
    """GPT-2's byte → printable character table (bytes 0..255 in order)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


TOKENS = ["<|endoftext|>", *byte_alphabet(), "Ġt", "he", "Ġthe"]
VOCAB = len(TOKENS)  # 260


def q8_0(rows: int, cols: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(raw bytes (rows, cols/32·34), the values they encode (rows, cols)).

    A Q8_0 block is an fp16 scale d then 32 int8 q; value = d·q. Scales are powers of two, so
    every d·q is exact in float32 and the expected values are exact whatever the order of ops.
    """
    blocks = rows * cols // 32
    d = (2.0 ** -rng.integers(4, 9, size=blocks)).astype(np.float16)
    q = rng.integers(-127, 128, size=(blocks, 32)).astype(np.int8)
    raw = np.concatenate([d[:, None].view(np.uint8), q.view(np.uint8)], axis=1)
    values = d.astype(np.float32)[:, None] * q.astype(np.float32)
    return raw.reshape(rows, -1), values.reshape(rows, cols)


def q4_1(rows: int, cols: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(raw bytes (rows, cols/32·20), values (rows, cols)). A Q4_1 block: fp16 d, fp16 m, 16 bytes
    of nibbles; element j < 16 is the low nibble of byte j, element 16+j its high nibble;
    value = d·nibble + m. d a power of two and m a multiple of 1/64 keep it exact."""
    blocks = rows * cols // 32
    d = (2.0 ** -rng.integers(3, 7, size=blocks)).astype(np.float16)
    m = (rng.integers(-32, 1, size=blocks) / 64).astype(np.float16)
    nib = rng.integers(0, 16, size=(blocks, 32)).astype(np.uint8)
    packed = nib[:, :16] | (nib[:, 16:] << 4)
    raw = np.concatenate([d[:, None].view(np.uint8), m[:, None].view(np.uint8), packed], axis=1)
    values = d.astype(np.float32)[:, None] * nib.astype(np.float32) + m.astype(np.float32)[:, None]
    return raw.reshape(rows, -1), values.reshape(rows, cols)


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows per head from the halves layout (rotate_half)
    to interleaved pairs: row (h, i, half) ← (h, half, i)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_tiny_gguf(path) -> dict[str, np.ndarray]:
    """Write the tiny llama; return the weights a Hugging Face LlamaForCausalLM should get."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] + [1] * (VOCAB - 1))  # 3: control, 1: normal
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)

    hf: dict[str, np.ndarray] = {}
    quant = gguf.GGMLQuantizationType

    def dense(name: str, hf_name: str, shape: tuple[int, ...], scale: float = 0.1) -> None:
        value = (rng.standard_normal(shape) * scale).astype(np.float32)
        writer.add_tensor(name, value)
        hf[hf_name] = value

    raw, hf["model.embed_tokens.weight"] = q8_0(VOCAB, HIDDEN, rng)
    writer.add_tensor("token_embd.weight", raw, raw_dtype=quant.Q8_0)
    for i in range(LAYERS):
        pre = f"model.layers.{i}."
        raw, values = q4_1(HIDDEN, HIDDEN, rng)  # q rows permuted: whole blocks move, none split
        writer.add_tensor(
            f"blk.{i}.attn_q.weight", llama_cpp_permute(raw, HEADS), raw_dtype=quant.Q4_1
        )
        hf[pre + "self_attn.q_proj.weight"] = values
        k = (rng.standard_normal((HIDDEN * KV_HEADS // HEADS, HIDDEN)) * 0.1).astype(np.float32)
        writer.add_tensor(f"blk.{i}.attn_k.weight", llama_cpp_permute(k, KV_HEADS))
        hf[pre + "self_attn.k_proj.weight"] = k
        dense(f"blk.{i}.attn_v.weight", pre + "self_attn.v_proj.weight", k.shape)
        dense(f"blk.{i}.attn_output.weight", pre + "self_attn.o_proj.weight", (HIDDEN, HIDDEN))
        dense(f"blk.{i}.ffn_gate.weight", pre + "mlp.gate_proj.weight", (FFN, HIDDEN))
        dense(f"blk.{i}.ffn_up.weight", pre + "mlp.up_proj.weight", (FFN, HIDDEN))
        dense(f"blk.{i}.ffn_down.weight", pre + "mlp.down_proj.weight", (HIDDEN, FFN))
        dense(f"blk.{i}.attn_norm.weight", pre + "input_layernorm.weight", (HIDDEN,), 1.0)
        dense(f"blk.{i}.ffn_norm.weight", pre + "post_attention_layernorm.weight", (HIDDEN,), 1.0)
    dense("output_norm.weight", "model.norm.weight", (HIDDEN,), 1.0)
    dense("output.weight", "lm_head.weight", (VOCAB, HIDDEN))  # untied, as in a Llama-2 file
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf"
    return path, write_tiny_gguf(path)


def reference_model(weights: dict[str, np.ndarray]) -> torch.nn.Module:
    """A plain transformers Llama of the same shape holding ``weights`` (no GGUF code involved)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return model


def test_gguf_tokenizer_reads_vocabulary_and_merges(tiny_gguf):
    path, _ = tiny_gguf
    assert is_gguf(path) and is_gguf("X.GGUF") and not is_gguf("models/SmolLM2")
    tok = load_tokenizer(ModelConfig(name_or_path=str(path)))
    ids = {t: i for i, t in enumerate(TOKENS)}
    # " the cat": Ġ t h e → (merge 1) Ġt h e → (2) Ġt he → (3) Ġthe; " cat" has no merge
    assert tok(" the cat")["input_ids"] == [ids["Ġthe"], ids["Ġ"], ids["c"], ids["a"], ids["t"]]
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == tok.eos_token
    assert tok.decode(tok(" the cat")["input_ids"]) == " the cat"


def test_gguf_weights_are_dequantised_exactly(tiny_gguf):
    path, expected = tiny_gguf
    cfg = ModelConfig(name_or_path=str(path))
    model = load_model(cfg, load_tokenizer(cfg))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    got = model.state_dict()
    assert set(got) == set(expected)
    for name, value in expected.items():
        # exact: the Q8_0/Q4_1 values above are exact in float32 (see q8_0, q4_1)
        assert torch.equal(got[name], torch.from_numpy(value)), name


def test_gguf_model_computes_like_a_plain_llama_and_saves(tiny_gguf, tmp_path):
    path, expected = tiny_gguf
    cfg = ModelConfig(name_or_path=str(path))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok).eval()
    ids = torch.tensor([[1, 70, 259, 5, 33, 200, 258, 12]])
    with torch.no_grad():
        want = reference_model(expected)(ids).logits
        got = model(ids).logits
    # same weights and the same kernels: equal up to float32 rounding of a 2-layer forward
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    save_model(model, tok, tmp_path / "dense")  # transformers refuses to save a GGUF-loaded model
    loaded, tok2, extra = load_pretrained(tmp_path / "dense", "cpu")
    assert extra == {}
    assert tok2(" the cat")["input_ids"] == tok(" the cat")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, got, rtol=0, atol=0)

    direct, tok3, extra = load_pretrained(path, "cpu")  # the file itself, e.g. for evaluation
    assert extra == {} and tok3.eos_token == "<|endoftext|>"
    with torch.no_grad():
        torch.testing.assert_close(direct(ids).logits, got, rtol=0, atol=0)


def test_missing_gguf_file_is_named(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf: no such GGUF file"):
        load_tokenizer(ModelConfig(name_or_path=str(missing)))
