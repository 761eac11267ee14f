"""Summed response log-probabilities log π(y|x) for preference pairs (paper §2, eq. for h).

A pair (x, y_w, y_l) is scored as two sequences, prompt+chosen and prompt+rejected, stacked into
ONE batch of 2B rows so the model runs one forward pass per micro-batch (chosen rows first).
Only response tokens count: prompt and padding positions are masked out.

Two equivalent code paths:

- **fast** (default): run the decoder body for hidden states, gather the positions t whose next
  token t+1 is a response token, and apply the output embedding (the vocabulary projection) at
  those positions only. With long prompts and short answers that skips almost all of the
  (2B, T, V) logits, the largest CPU cost of a DPO step (``docs/training.md``).
- **full**: the model's own full logits, ``log_softmax`` over every position, then masked. Kept as
  the plain reference; the tests check both against a naive per-token loop.

Position ids are ``cumsum(attention_mask) − 1``, so left and right padding give the same values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

# Config attributes of architectures that rescale logits in ways the fast path does not copy.
_UNSUPPORTED_FAST = ("logit_scale", "logits_scaling")


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


@dataclass
class SequenceBatch:
    """R padded sequences: ``input_ids``, ``attention_mask``, ``position_ids``, ``response_mask``
    (all (R, T); ``response_mask`` is 1 on response tokens)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(
            *(t.to(device, non_blocking=True) for t in self.__dict__.values())  # type: ignore[arg-type]
        )

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return dict(self.__dict__)


def join_response(prompt: str, response: str) -> str:
    """The response text as appended to the prompt: a space between them unless one is there."""
    if prompt and not prompt[-1].isspace() and response and not response[0].isspace():
        return " " + response
    return response


def encode_pairs(
    tokenizer,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    *,
    max_prompt_tokens: int = 192,
    max_response_tokens: int = 32,
    append_eos: bool = True,
) -> EncodedPairs:
    """Tokenise N pairs. Prompts keep their last ``max_prompt_tokens`` tokens (the question's end
    and the answer cue), responses their first ``max_response_tokens`` (EOS appended first).

    The prompt gets the tokenizer's special tokens (e.g. Llama's BOS); responses get none.
    """
    if not (len(prompts) == len(chosen) == len(rejected)):
        raise ValueError(
            f"prompts, chosen and rejected differ in length: {len(prompts)}, {len(chosen)}, {len(rejected)}"
        )
    prompts = [str(p) for p in prompts]
    p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []

    def responses(texts: Sequence[str]) -> list[list[int]]:
        joined = [join_response(p, str(r)) for p, r in zip(prompts, texts, strict=True)]
        ids = tokenizer(joined, add_special_tokens=False)["input_ids"]
        return [(list(r) + eos)[:max_response_tokens] for r in ids]

    c_ids, r_ids = responses(chosen), responses(rejected)
    for i, (c, r) in enumerate(zip(c_ids, r_ids, strict=True)):
        if not c or not r:
            raise ValueError(f"pair {i}: empty {'chosen' if not c else 'rejected'} response")
    return EncodedPairs([list(p)[-max_prompt_tokens:] for p in p_ids], c_ids, r_ids)


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


class SequenceScorer(nn.Module):
    """``forward(**SequenceBatch.as_kwargs()) → (R,)`` summed response log-probs of ``model``.

    A module (not a function) so DistributedDataParallel can wrap it: DDP synchronises gradients
    only for work done inside the wrapped module's ``forward``.
    """

    def __init__(self, model: nn.Module, fast: bool = True) -> None:
        super().__init__()
        self.model = model
        self.fast = fast and supports_fast_path(model)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> torch.Tensor:
        fn = response_logps_fast if self.fast else response_logps_full
        return fn(self.model, input_ids, attention_mask, position_ids, response_mask)


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
        batch = collate_pairs(part, pad_token_id, padding_side).to(device)
        with autocast or contextlib.nullcontext():
            c, r = split_pairs(scorer(**batch.as_kwargs()))
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    if not chosen:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(chosen), torch.cat(rejected)
