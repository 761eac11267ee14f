"""Probe: what running each pair's prompt ONCE (shared by chosen and rejected) would save.

Our trainer (like TRL) scores 2B sequences per step: prompt+chosen and prompt+rejected, so every
prompt goes through the decoder twice. On GlobalOpinionQA the prompt is ~98% of the tokens (a
~80-token question, a 2-token answer), so the decoder body does almost twice the necessary work.
This probe scores the B prompts once with a KV cache, then the 2B responses against that cache
(gradients flow through the cached keys/values), checks that the summed response log-probs equal
:func:`grpo.logprobs.response_logps_fast`, and times forward+backward of both, alternating.

It is a measurement for docs/benchmarks.md, not a code path of the trainer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import BenchSettings, median, prepare_workdir, read_jsonl, set_threads

EPILOG = """examples:
  python -m benchmarks.prefix_probe
  python -m benchmarks.prefix_probe --threads 2 --batches 12 --rounds 3
"""


def shared_prompt_logps(lm, prompts, chosen, rejected, pad: int) -> torch.Tensor:
    """(2B,) summed response log-probs, chosen rows then rejected, with each prompt run once.

    Prompts are left-padded (so every prompt ends at the same column), responses right-padded.
    """
    from transformers import DynamicCache

    b = len(prompts)
    p_len = max(len(p) for p in prompts)
    p_ids = torch.full((b, p_len), pad, dtype=torch.long)
    p_mask = torch.zeros((b, p_len), dtype=torch.long)
    for i, p in enumerate(prompts):
        p_ids[i, p_len - len(p) :] = torch.tensor(p)
        p_mask[i, p_len - len(p) :] = 1
    p_pos = (p_mask.cumsum(-1) - 1).clamp_min(0)
    body = lm.get_decoder()
    out = body(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True)
    cache = DynamicCache()
    for i, layer in enumerate(out.cache.layers):
        cache.update(
            torch.cat([layer.keys, layer.keys]), torch.cat([layer.values, layer.values]), i
        )
    responses = list(chosen) + list(rejected)
    r_len = max(len(r) for r in responses)
    r_ids = torch.full((2 * b, r_len), pad, dtype=torch.long)
    r_mask = torch.zeros((2 * b, r_len), dtype=torch.long)
    for i, r in enumerate(responses):
        r_ids[i, : len(r)] = torch.tensor(r)
        r_mask[i, : len(r)] = 1
    lens = p_mask.sum(-1).repeat(2)  # (2B,)
    r_pos = lens[:, None] + torch.arange(r_len)[None, :]
    full_mask = torch.cat([p_mask.repeat(2, 1), r_mask], dim=1)
    hidden_r = body(
        input_ids=r_ids,
        attention_mask=full_mask,
        position_ids=r_pos,
        cache=cache,
        use_cache=False,
    ).last_hidden_state  # (2B, R, H)
    last_prompt = out.last_hidden_state[:, -1].repeat(2, 1)  # (2B, H): predicts response token 0
    states = torch.cat([last_prompt[:, None], hidden_r[:, :-1]], dim=1)  # (2B, R, H)
    rows, cols = r_mask.nonzero(as_tuple=True)
    logits = lm.get_output_embeddings()(states[rows, cols]).float()
    token = logits.gather(-1, r_ids[rows, cols][:, None]).squeeze(-1) - logits.logsumexp(-1)
    return torch.zeros(2 * b).index_add(0, rows, token)


def probe(s: BenchSettings, batches: int, rounds: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.logprobs import collate_pairs, encode_pairs, response_logps_fast

    set_threads(s.threads)
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as tmp:
        wd = Path(tmp)
        facts = prepare_workdir(s, wd)
        tok = AutoTokenizer.from_pretrained(wd / "model")
        lm = AutoModelForCausalLM.from_pretrained(wd / "model")
        pairs = read_jsonl(wd / "pairs.jsonl")
    enc = encode_pairs(
        tok,
        [p["prompt"] for p in pairs],
        [p["chosen"] for p in pairs],
        [p["rejected"] for p in pairs],
        max_prompt_tokens=s.max_length,
    )
    pad = tok.pad_token_id
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(enc), generator=gen)
    chunks = [order[i * s.batch_size : (i + 1) * s.batch_size].tolist() for i in range(batches)]
    # correctness on the first batch
    part = enc.select(chunks[0])
    with torch.no_grad():
        ref = response_logps_fast(lm, **collate_pairs(part, pad).as_kwargs())
        got = shared_prompt_logps(lm, part.prompt, part.chosen, part.rejected, pad)
    max_err = float((ref - got).abs().max())

    def both(chunk) -> float:
        part = enc.select(chunk)
        return collate_pairs(part, pad), part

    def time_fast(chunk) -> float:
        batch, _ = both(chunk)
        t0 = time.perf_counter()
        response_logps_fast(lm, **batch.as_kwargs()).sum().backward()
        return time.perf_counter() - t0

    def time_shared(chunk) -> float:
        _, part = both(chunk)
        t0 = time.perf_counter()
        shared_prompt_logps(lm, part.prompt, part.chosen, part.rejected, pad).sum().backward()
        return time.perf_counter() - t0

    lm.train()
    time_fast(chunks[0]), time_shared(chunks[0])  # warm-up
    fast, shared = [], []
    for r in range(rounds):
        for fn, out in ((time_fast, fast), (time_shared, shared))[:: 1 if r % 2 == 0 else -1]:
            out.append(sum(fn(c) for c in chunks))
            lm.zero_grad(set_to_none=True)
    return {
        "settings": s.to_json(),
        "data": facts,
        "max_abs_logp_diff": max_err,
        "fast_s_per_batch": median(fast) / batches,
        "shared_prompt_s_per_batch": median(shared) / batches,
        "speedup_forward_backward": median(fast) / median(shared),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.prefix_probe",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("--threads", type=int, default=BenchSettings().threads)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    res = probe(BenchSettings(threads=args.threads), args.batches, args.rounds)
    print(
        f"max |Δ log-prob| vs grpo.logprobs.response_logps_fast: {res['max_abs_logp_diff']:.2e}\n"
        f"forward+backward per batch of {res['settings']['batch_size']} pairs: "
        f"fast path {1e3 * res['fast_s_per_batch']:.0f} ms, prompt once "
        f"{1e3 * res['shared_prompt_s_per_batch']:.0f} ms "
        f"({res['speedup_forward_backward']:.2f}× faster)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
