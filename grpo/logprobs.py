"""Summed response log-probabilities log π(y|x) for preference pairs (paper §2, eq. for h).

Scores come as 2B rows, the B chosen responses then the B rejected ones. Only response tokens
count: prompt and padding positions are masked out.

Three equivalent code paths:

- **shared prompt** (default where it applies, :func:`response_logps_shared`): a pair's chosen and
  rejected sequences start with the same prompt, so the B prompts run through the decoder ONCE
  (left-padded, so every prompt ends in the last column) with a KV cache; the cache is repeated
  for the 2B responses, which are then run in one forward pass against it. Gradients flow through
  the cached keys/values into the prompt pass. With long prompts and short answers this nearly
  halves the decoder work (``docs/training.md``). Decoder-only GPT-2 / Llama models only
  (:func:`supports_shared_prompt`); batches are :class:`SharedPromptBatch`.
- **fast** (the fallback; batches are :class:`SequenceBatch`: prompt+chosen and prompt+rejected
  as 2B full sequences, one forward pass): run the decoder body for hidden states, gather the positions t whose next
  token t+1 is a response token, and apply the output embedding (the vocabulary projection) at
  those positions only. With long prompts and short answers that skips almost all of the
  (2B, T, V) logits, the largest CPU cost of a DPO step (``docs/training.md``).
- **full**: the model's own full logits, ``log_softmax`` over every position, then masked. Kept as
  the plain reference; the tests check all three against a naive per-token loop.

Position ids are ``cumsum(attention_mask) − 1``, so left and right padding give the same values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

# Config attributes of architectures that rescale logits in ways the fast path does not copy.
_UNSUPPORTED_FAST = ("logit_scale", "logits_scaling")
# Architectures whose decoder body is checked (tests) to score responses against a repeated KV
# cache exactly like the whole sequence: absolute (GPT-2) or rotary (Llama) positions from
# ``position_ids``, plain full-attention caches (no sliding window, no recurrent state).
_SHARED_PROMPT_TYPES = ("gpt2", "llama")


@dataclass
class EncodedPairs:
    """Token ids of N pairs (lists of ints, no padding), ready for :func:`collate_pairs`."""

    prompt: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt)

    def select(self, index: Sequence[int]) -> EncodedPairs:
        return EncodedPairs(
            [self.prompt[i] for i in index],
            [self.chosen[i] for i in index],
            [self.rejected[i] for i in index],
        )


class _TensorBatch:
    """A dataclass of tensors that moves to a device together and unpacks as model kwargs."""

    def to(self, device: torch.device | str):
        fields = {k: t.to(device, non_blocking=True) for k, t in self.__dict__.items()}
        return type(self)(**fields)

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return dict(self.__dict__)


@dataclass
class SequenceBatch(_TensorBatch):
    """R padded sequences: ``input_ids``, ``attention_mask``, ``position_ids``, ``response_mask``
    (all (R, T); ``response_mask`` is 1 on response tokens)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor


@dataclass
class SharedPromptBatch(_TensorBatch):
    """B pairs with each prompt stored once.

    ``prompt_ids`` / ``prompt_mask`` (B, P): prompts LEFT-padded, so every prompt's last token is
    in column P−1. ``response_ids`` / ``response_mask`` (2B, L): the B chosen responses, then the
    B rejected ones, RIGHT-padded (mask 1 on response tokens). Row i and row B+i share prompt i.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor


def join_response(prompt: str, response: str) -> str:
    """The response text as appended to the prompt: a space between them unless one is there."""
    if prompt and not prompt[-1].isspace() and response and not response[0].isspace():
        return " " + response
    return response


def first_line_tokens(prompt: str, offsets: Sequence[tuple[int, int]] | None, n: int) -> int:
    """How many of a prompt's ``n`` tokens belong to its first line (through its first ``\\n``).

    ``offsets``: the fast tokenizer's (start, end) character span of each token; a token that
    starts before the line break counts to the first line (leading special tokens such as BOS
    have span (0, 0), so they do too). Without a line break the whole prompt is its first line.
    """
    newline = prompt.find("\n")
    if newline < 0:
        return n
    if offsets is None:
        raise ValueError("first_line_tokens needs the token offsets of a fast tokenizer")
    boundary = newline + 1
    for i, (start, end) in enumerate(offsets):
        if start >= boundary and end > start:
            return i
    return n


def truncate_prompt(ids: Sequence[int], first_line: int, limit: int) -> list[int]:
    """Keep ``limit`` of a prompt's tokens: its start and its end, cutting the middle.

    With n tokens, F of them in the first line (:func:`first_line_tokens`) and R = n − F after
    it, the kept prompt is the first ``a`` tokens and the last ``limit − a``, where

        a = min(F, max(limit − R, ⌈limit/2⌉))

    so the first line (where a prompt names its group: "Opinion of people in X on: …") keeps
    at least half the budget, or all of itself if shorter, and the end (the options and the
    answer cue) keeps the rest: all of it when it fits in what the first line leaves. The cut
    falls where a question's body is: the end of a long first line and/or the start of what
    follows it. A prompt without a line break keeps its first ⌈limit/2⌉ and last ⌊limit/2⌋.
    """
    n = len(ids)
    if n <= limit:
        return list(ids)
    half = (limit + 1) // 2
    head = half if first_line >= n else min(first_line, max(limit - (n - first_line), half))
    return list(ids[:head]) + list(ids[n - (limit - head) :])


def encode_pairs(
    tokenizer,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    *,
    max_prompt_tokens: int = 192,
    max_response_tokens: int = 32,
    append_eos: bool = True,
    groups: Sequence[str] | None = None,
    pair_ids: Sequence[str] | None = None,
) -> EncodedPairs:
    """Tokenise N pairs. A prompt longer than ``max_prompt_tokens`` loses tokens from its middle,
    never its first line's start nor its end (:func:`truncate_prompt`); responses keep their
    first ``max_response_tokens`` tokens (EOS appended first).

    ``groups``: the pairs' group names. When given, a truncated prompt that named its group and
    no longer does raises a ValueError naming the pair (``pair_ids[i]`` or its index): the
    group-robust objective needs the model to see the group. The prompt gets the tokenizer's
    special tokens (e.g. Llama's BOS); responses get none.
    """
    if not (len(prompts) == len(chosen) == len(rejected)):
        raise ValueError(
            f"prompts, chosen and rejected differ in length: {len(prompts)}, {len(chosen)}, {len(rejected)}"
        )
    prompts = [str(p) for p in prompts]
    p_ids = _truncated_prompts(tokenizer, prompts, max_prompt_tokens, groups, pair_ids)
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []

    def responses(texts: Sequence[str]) -> list[list[int]]:
        joined = [join_response(p, str(r)) for p, r in zip(prompts, texts, strict=True)]
        ids = tokenizer(joined, add_special_tokens=False)["input_ids"]
        return [(list(r) + eos)[:max_response_tokens] for r in ids]

    c_ids, r_ids = responses(chosen), responses(rejected)
    for i, (c, r) in enumerate(zip(c_ids, r_ids, strict=True)):
        if not c or not r:
            raise ValueError(f"pair {i}: empty {'chosen' if not c else 'rejected'} response")
    return EncodedPairs(p_ids, c_ids, r_ids)


def _truncated_prompts(
    tokenizer,
    prompts: list[str],
    limit: int,
    groups: Sequence[str] | None,
    pair_ids: Sequence[str] | None,
) -> list[list[int]]:
    """Token ids of ``prompts`` cut to ``limit`` by :func:`truncate_prompt`, group-checked."""
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(prompts, add_special_tokens=True, return_offsets_mapping=fast)
    out = []
    for i, (prompt, ids) in enumerate(zip(prompts, enc["input_ids"], strict=True)):
        ids = list(ids)
        if len(ids) <= limit:
            out.append(ids)
            continue
        if fast:
            first = first_line_tokens(prompt, enc["offset_mapping"][i], len(ids))
        else:  # slow tokenizers give no offsets: count the first line's tokens on its own
            line = prompt.split("\n", 1)[0] + "\n"
            first = min(len(tokenizer(line, add_special_tokens=True)["input_ids"]), len(ids))
        kept = truncate_prompt(ids, first, limit)
        group = None if groups is None else str(groups[i])
        if group and _squash(group) in _squash(prompt):
            shown = _squash(tokenizer.decode(kept, skip_special_tokens=True))
            if _squash(group) not in shown:
                name = f"pair {pair_ids[i]!r}" if pair_ids is not None else f"pair {i}"
                raise ValueError(
                    f"{name}: its prompt has {len(ids)} tokens; cut to model.max_prompt_tokens="
                    f"{limit} it no longer names its group {group!r}. Raise max_prompt_tokens "
                    "or shorten the prompt."
                )
        out.append(kept)
    return out


def _squash(text: str) -> str:
    """Whitespace runs as one space: decoding may respace the text around a cut."""
    return " ".join(text.split())


def collate_sequences(
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    pad_token_id: int,
    padding_side: str = "right",
) -> SequenceBatch:
    """Pad R (prompt + response) sequences to the longest; mark response tokens."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(len(s) for s in seqs)
    rows = len(seqs)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    response = torch.zeros((rows, width), dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        start = width - len(s) if padding_side == "left" else 0
        input_ids[i, start : start + len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, start : start + len(s)] = 1
        response[i, start + len(p) : start + len(s)] = 1
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    return SequenceBatch(input_ids, attention, position_ids, response)


def collate_pairs(
    pairs: EncodedPairs, pad_token_id: int, padding_side: str = "right"
) -> SequenceBatch:
    """2B rows: the B chosen sequences, then the B rejected ones (one forward pass for both)."""
    return collate_sequences(
        pairs.prompt + pairs.prompt, pairs.chosen + pairs.rejected, pad_token_id, padding_side
    )


def collate_shared_prompt(pairs: EncodedPairs, pad_token_id: int) -> SharedPromptBatch:
    """B pairs → :class:`SharedPromptBatch`: prompts left-padded once, 2B responses right-padded.

    Every prompt must have at least one token (its last hidden state predicts the response's
    first token); :meth:`SequenceScorer.collate` falls back to :func:`collate_pairs` otherwise.
    """
    b = len(pairs)
    if b == 0:
        raise ValueError("collate_shared_prompt: no pairs")
    empty = [i for i, p in enumerate(pairs.prompt) if not p]
    if empty:
        raise ValueError(f"collate_shared_prompt: pair(s) {empty[:5]} have an empty prompt")
    p_len = max(len(p) for p in pairs.prompt)
    prompt_ids = torch.full((b, p_len), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((b, p_len), dtype=torch.long)
    for i, p in enumerate(pairs.prompt):
        prompt_ids[i, p_len - len(p) :] = torch.tensor(p, dtype=torch.long)
        prompt_mask[i, p_len - len(p) :] = 1
    responses = list(pairs.chosen) + list(pairs.rejected)
    r_len = max(len(r) for r in responses)
    response_ids = torch.full((2 * b, r_len), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((2 * b, r_len), dtype=torch.long)
    for i, r in enumerate(responses):
        response_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[i, : len(r)] = 1
    return SharedPromptBatch(prompt_ids, prompt_mask, response_ids, response_mask)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside DDP / peft wrappers (LoRA layers stay injected)."""
    from grpo.modeling import unwrap

    model = unwrap(model)
    if hasattr(model, "get_base_model"):  # peft PeftModel
        model = model.get_base_model()
    return model


def supports_fast_path(model: nn.Module) -> bool:
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    return (
        config is not None
        and lm.get_output_embeddings() is not None
        and all(getattr(config, key, None) in (None, 1.0) for key in _UNSUPPORTED_FAST)
    )


def supports_shared_prompt(model: nn.Module) -> bool:
    """True for decoder-only GPT-2 / Llama models (also inside DDP / LoRA wrappers)."""
    if not supports_fast_path(model):
        return False
    config = causal_lm(model).config
    return (
        getattr(config, "model_type", None) in _SHARED_PROMPT_TYPES
        and not getattr(config, "is_encoder_decoder", False)
        and getattr(config, "add_cross_attention", False) is False
    )


def _cache_kwarg(body: nn.Module) -> str:
    """The decoder's keyword for a KV cache: ``cache`` (transformers 5) or ``past_key_values``."""
    import inspect

    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _repeated_cache(cache, times: int):
    """A NEW DynamicCache whose layer l holds ``cat([K_l] × times)`` (batch dim): rows
    [r·B, (r+1)·B) are a copy of the B prompt rows. Built from the prompt cache without mutating
    it; the copies stay in the autograd graph, so gradients reach the prompt pass."""
    from transformers import DynamicCache

    if hasattr(cache, "layers"):
        kv = [(layer.keys, layer.values) for layer in cache.layers]
    else:  # legacy tuple of (key, value) per layer
        kv = [(k, v) for k, v in cache]
    out = DynamicCache()
    for i, (k, v) in enumerate(kv):
        out.update(torch.cat([k] * times), torch.cat([v] * times), i)
    return out


def _select_logps(
    logits: torch.Tensor, targets: torch.Tensor, softcap: float | None
) -> torch.Tensor:
    """log softmax(logits)[target] for (M, V) logits and (M,) targets, in float32."""
    logits = logits.float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def response_logps_fast(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Σ_t log π(x_{t+1} | x_≤t) over response tokens, (R, T) → (R,); output layer only where needed."""
    lm = causal_lm(model)
    body = lm.get_decoder()
    hidden = body(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state  # (R, T, H)
    rows, cols = response_mask[:, 1:].nonzero(as_tuple=True)  # token cols+1 is a response token
    selected = hidden[rows, cols]  # (M, H): the states that predict response tokens
    logits = lm.get_output_embeddings()(selected)  # (M, V)
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    token_logps = _select_logps(logits, input_ids[rows, cols + 1], softcap)
    out = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, rows, token_logps)


def response_logps_full(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Same as :func:`response_logps_fast` from the model's full (R, T, V) logits."""
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).logits  # (R, T, V)
    logps = logits[:, :-1].float().log_softmax(-1)
    token_logps = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (R, T-1)
    return (token_logps * response_mask[:, 1:]).sum(-1)


def response_logps_shared(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) of 2B responses sharing B prompts (a :class:`SharedPromptBatch`).

    (B, P) prompts, (2B, L) responses → (2B,), chosen rows first. Each prompt runs once:

    1. prompt pass: h^x = body(x), position ids cumsum(mask) − 1, keeping the KV cache (K, V);
    2. the cache repeated twice along the batch (rows i and B+i both see prompt i);
    3. response pass: h^y = body(y | K, V), positions |x_i| + 0, 1, …, attention mask
       [prompt mask; response mask] of width P + L;
    4. token y_0 is predicted by h^x at column P−1 (each prompt's last token), y_t (t ≥ 1) by
       h^y_{t−1}; the output layer runs only on those states of real response tokens.
    """
    lm = causal_lm(model)
    body = lm.get_decoder()
    b = prompt_ids.shape[0]
    prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp_min(0)
    out = body(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos, use_cache=True
    )
    prompt_cache = getattr(out, "cache", None)
    if prompt_cache is None:
        prompt_cache = out.past_key_values
    cache = _repeated_cache(prompt_cache, 2)
    r_len = response_ids.shape[1]
    lens = prompt_mask.sum(-1).repeat(2)  # (2B,) real prompt tokens per row
    r_pos = lens[:, None] + torch.arange(r_len, device=lens.device)[None, :]  # (2B, L)
    mask = torch.cat([prompt_mask.repeat(2, 1), response_mask], dim=1)  # (2B, P+L)
    hidden = body(
        input_ids=response_ids,
        attention_mask=mask,
        position_ids=r_pos,
        use_cache=True,  # the repeated cache is a throw-away copy; it may grow
        **{_cache_kwarg(body): cache},
    ).last_hidden_state  # (2B, L, H)
    last_prompt = out.last_hidden_state[:, -1].repeat(2, 1)  # (2B, H): predicts y_0
    states = torch.cat([last_prompt[:, None], hidden[:, :-1]], dim=1)  # (2B, L, H): predict y_t
    rows, cols = response_mask.nonzero(as_tuple=True)
    logits = lm.get_output_embeddings()(states[rows, cols])  # (M, V)
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    token_logps = _select_logps(logits, response_ids[rows, cols], softcap)
    total = torch.zeros(2 * b, dtype=token_logps.dtype, device=token_logps.device)
    return total.index_add(0, rows, token_logps)


class SequenceScorer(nn.Module):
    """``forward(**batch.as_kwargs()) → (R,)`` summed response log-probs of ``model``.

    ``batch`` is a :class:`SequenceBatch` (fast/full paths) or a :class:`SharedPromptBatch`
    (shared-prompt path); build it with :meth:`collate`, which picks the scorer's path.
    A module (not a function) so DistributedDataParallel can wrap it: DDP synchronises gradients
    only for work done inside the wrapped module's ``forward``.
    """

    def __init__(self, model: nn.Module, fast: bool = True, shared_prompt: bool = True) -> None:
        super().__init__()
        self.model = model
        self.fast = fast and supports_fast_path(model)
        # the shared-prompt path also applies the output layer at response positions only, so
        # ``fast=False`` (the plain full-logits reference) turns it off too
        self.shared_prompt = self.fast and shared_prompt and supports_shared_prompt(model)

    def collate(
        self, pairs: EncodedPairs, pad_token_id: int, padding_side: str = "right"
    ) -> SequenceBatch | SharedPromptBatch:
        """The batch for this scorer: shared-prompt when enabled and every prompt is non-empty,
        else :func:`collate_pairs` (2B rows, chosen first)."""
        if self.shared_prompt and len(pairs) and all(pairs.prompt):
            return collate_shared_prompt(pairs, pad_token_id)
        return collate_pairs(pairs, pad_token_id, padding_side)

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        if "prompt_ids" in batch:
            return response_logps_shared(self.model, **batch)
        fn = response_logps_fast if self.fast else response_logps_full
        return fn(self.model, **batch)


def split_pairs(logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) scores of :func:`collate_pairs` rows → (chosen (B,), rejected (B,))."""
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


@torch.no_grad()
def score_pairs(
    scorer: nn.Module,
    pairs: EncodedPairs,
    *,
    pad_token_id: int,
    batch_size: int = 16,
    padding_side: str = "right",
    device: torch.device | str = "cpu",
    autocast=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y_w|x), log π(y_l|x) of every pair, (N,) each, float32 on the CPU (no gradients)."""
    import contextlib

    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        part = pairs.select(range(start, min(start + batch_size, len(pairs))))
        if isinstance(scorer, SequenceScorer):
            batch = scorer.collate(part, pad_token_id, padding_side).to(device)
        else:
            batch = collate_pairs(part, pad_token_id, padding_side).to(device)
        with autocast or contextlib.nullcontext():
            c, r = split_pairs(scorer(**batch.as_kwargs()))
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    if not chosen:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(chosen), torch.cat(rejected)
