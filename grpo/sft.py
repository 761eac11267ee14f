"""Supervised fine-tuning on the chosen responses: the reference policy π_ref of DPO/IPO.

The paper (and DPO) starts preference training from an SFT model, so that π_ref puts its mass on
responses like the preferred ones. The loss of a global batch of pairs is the mean negative
log-likelihood per response token, −Σ_i log π(y_w,i | x_i) / Σ_i |y_w,i|.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from grpo.distributed import (
    DistInfo,
    MicroBatch,
    NonFiniteError,
    accumulate_and_step,
    micro_batches,
    progress_bar,
    wrap_ddp,
)
from grpo.logprobs import EncodedPairs, SequenceScorer, collate_sequences

if TYPE_CHECKING:
    from grpo.trainer import TrainConfig

SFT_SEED_OFFSET = 7919  # SFT's data order is its own stream, independent of preference training's


def sft_batch_size(n_pairs: int, cfg: TrainConfig, dist_info: DistInfo) -> int:
    """``sft_batch_size`` capped at the data size, rounded down to a multiple of the
    ``grad_accum × world_size`` micro-batches it is split into."""
    b = min(cfg.sft_batch_size, n_pairs)
    parts = cfg.grad_accum * dist_info.world_size
    if b < parts:
        raise ValueError(f"sft_batch_size {b} is smaller than grad_accum × world size = {parts}")
    return b - b % parts


def sft(
    model: nn.Module,
    pairs: EncodedPairs,
    cfg: TrainConfig,
    *,
    pad_token_id: int,
    padding_side: str,
    device: torch.device,
    dtype: str,
    dist_info: DistInfo,
) -> list[float]:
    """Train ``model`` (on ``device``) for ``sft_epochs`` passes over the chosen responses of
    ``pairs``; global batches of :func:`sft_batch_size` pairs split over ranks and
    ``grad_accum``. Returns each step's loss (the global batch's NLL per token)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.sft_lr, weight_decay=cfg.weight_decay)
    scorer = SequenceScorer(model, cfg.fast_logprobs, shared_prompt=False).to(device)
    ddp_scorer = wrap_ddp(scorer, device, dist_info)
    generator = torch.Generator().manual_seed(cfg.seed + SFT_SEED_OFFSET)
    n, b = len(pairs), sft_batch_size(len(pairs), cfg, dist_info)

    def collate(part: EncodedPairs):
        return collate_sequences(part.prompt, part.chosen, pad_token_id, padding_side)

    losses: list[float] = []
    bar = progress_bar(cfg.sft_epochs * (n // b), 0, "sft", cfg.progress, dist_info)
    for _ in range(cfg.sft_epochs):
        perm = torch.randperm(n, generator=generator)
        for s in range(n // b):
            batch = perm[s * b : (s + 1) * b]
            # per token of the whole global batch, so every micro-batch and rank divides alike
            tokens = sum(len(pairs.chosen[i]) for i in batch.tolist())

            def nll(micro: MicroBatch, logps: torch.Tensor, tokens: int = tokens) -> torch.Tensor:
                return -logps.float().sum() / tokens

            chunks = micro_batches(batch, cfg.grad_accum, dist_info.world_size, dist_info.rank)
            total, grad_norm = accumulate_and_step(
                ddp_scorer, pairs, chunks, collate, nll, optimizer,
                grad_clip=cfg.grad_clip, dist_info=dist_info, device=device, dtype=dtype,
            )  # fmt: skip
            reduced = dist_info.all_reduce(torch.tensor([total], dtype=torch.float64))
            losses.append(float(reduced.cpu()))
            _check_finite(len(losses), losses[-1], grad_norm)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(nll=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    return losses


def _check_finite(step: int, loss: float, grad_norm: float) -> None:
    for quantity, value in (("loss", loss), ("gradient norm", grad_norm)):
        if not math.isfinite(value):
            raise NonFiniteError("sft", step, quantity, detail=f" ({value})")
