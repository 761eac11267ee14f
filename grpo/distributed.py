"""Data-parallel training under ``torchrun``: the process group, micro-batches, one accumulated
optimizer step, and scoring split over ranks.

Every rank holds a full copy of the policy. A global batch of B pairs is cut into
``grad_accum × world_size`` micro-batches (:func:`micro_batches`); each rank back-propagates its
own, DistributedDataParallel averages the gradients over ranks once per optimizer step (the other
micro-batches run under ``no_sync``), and :func:`accumulate_and_step` is the one place that does
this, for SFT and for the preference step alike. With one process all of this reduces to plain
gradient accumulation.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from grpo.logprobs import EncodedPairs, score_pairs
from grpo.modeling import autocast, resolve_device


@dataclass
class DistInfo:
    """This process's place in the process group (one process: rank 0 of 1, inactive).

    ``device`` is where a collective's tensors must live: this rank's GPU under NCCL (which
    refuses CPU tensors), the CPU under gloo.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_here: bool = False  # this process created the group, so it destroys it
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of ``tensor``, returned on :attr:`device`; ``tensor`` itself for one
        process. Every collective in ``grpo`` goes through here, so every tensor a collective
        sees is on the device its backend needs."""
        if not self.active:
            return tensor
        on_device = tensor.to(self.device)
        dist.all_reduce(on_device)
        return on_device


def collective_device(backend: str, local_rank: int) -> torch.device:
    """Where a backend's collectives take their tensors: NCCL this rank's GPU, gloo the CPU."""
    return torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    started = False
    if not dist.is_initialized():
        cuda = resolve_device(device_name).type == "cuda"
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
        started = True
    device = collective_device(dist.get_backend(), local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, started, device)


def wrap_ddp(module: nn.Module, device: torch.device, dist_info: DistInfo) -> nn.Module:
    """``module`` in DistributedDataParallel when several processes train; itself otherwise."""
    if not dist_info.active:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def micro_batches(
    indices: torch.Tensor, grad_accum: int, world: int, rank: int
) -> list[torch.Tensor]:
    """This rank's micro-batches of a global batch: chunk a·world + rank for a < grad_accum."""
    chunks = indices.chunk(grad_accum * world)
    return [chunks[a * world + rank] for a in range(grad_accum)]


class NonFiniteError(ValueError):
    """Training met a NaN or infinite value; training stops, nothing of the step is kept.

    ``stage`` is "sft" or "preference", ``step`` the 1-based optimizer step, ``quantity`` what
    was non-finite (loss, gradient norm, group weight) and ``groups`` the groups involved: those
    whose loss or weight is non-finite, or for a gradient the groups in the step's batch.
    """

    def __init__(
        self, stage: str, step: int, quantity: str, groups: Sequence[str] = (), detail: str = ""
    ) -> None:
        self.stage, self.step, self.quantity, self.groups = stage, step, quantity, list(groups)
        where = f" in group(s) {self.groups}" if self.groups else ""
        super().__init__(
            f"{stage} step {step}: non-finite {quantity}{where}{detail}; training stopped "
            "(nothing from this step is saved). Try a smaller lr or eta_alpha, or look at these "
            "groups' pairs"
        )


class MicroBatch(NamedTuple):
    """One micro-batch: its pair ``index`` (b,) into the data, those ``pairs``, and ``batch``, the
    collated model input on the device."""

    index: torch.Tensor
    pairs: EncodedPairs
    batch: Any


def accumulate_and_step(
    model: nn.Module,
    pairs: EncodedPairs,
    chunks: Sequence[torch.Tensor],
    collate: Callable[[EncodedPairs], Any],
    loss_fn: Callable[[MicroBatch, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    grad_clip: float,
    dist_info: DistInfo,
    device: torch.device,
    dtype: str,
) -> tuple[float, float]:
    """One optimizer step from this rank's micro-batches ``chunks`` of ``pairs``.

    For each chunk: collate, forward ``model`` under autocast, ``loss_fn(micro, output)`` gives
    the scalar to minimise, backward. ``loss_fn`` must scale each micro-batch's loss by its share
    of the global batch (the losses add up to the global batch's loss); DDP averages gradients
    over ranks, so the loss is multiplied by world_size to undo that. Gradients are all-reduced
    once, at the last micro-batch. Then the gradient norm is clipped (``grad_clip`` > 0) or just
    measured, the optimizer steps unless the norm is NaN or infinite (a non-finite gradient is
    never applied: the caller raises :class:`NonFiniteError`), and the gradients are freed.

    Returns (Σ of this rank's micro-batch losses, the gradient norm before clipping).
    """
    model.train()
    total = 0.0
    for a, chunk in enumerate(chunks):
        sync = contextlib.nullcontext()
        if dist_info.active and a < len(chunks) - 1:
            sync = model.no_sync()  # type: ignore[operator]
        part = pairs.select(chunk.tolist())
        micro = MicroBatch(chunk, part, collate(part).to(device))
        with sync:
            with autocast(device, dtype):
                output = model(**micro.batch.as_kwargs())
            loss = loss_fn(micro, output)
            (loss * dist_info.world_size).backward()
        total += float(loss.detach())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    else:
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm(grads))
    if math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


def score_sharded(
    scorer: nn.Module,
    pairs: EncodedPairs,
    *,
    pad_token_id: int,
    padding_side: str,
    batch_size: int,
    device: torch.device,
    dtype: str,
    dist_info: DistInfo,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y_w|x), log π(y_l|x) of every pair, (N,) float32 each, on the CPU, on every rank.

    Rank r scores pairs r, r + world_size, ...; the shards are summed over ranks (each pair is
    non-zero on exactly one rank, so the sum is exact).
    """
    shard = list(range(dist_info.rank, len(pairs), dist_info.world_size))
    out = torch.zeros(2, len(pairs), dtype=torch.float64)
    if shard:
        chosen, rejected = score_pairs(
            scorer,
            pairs.select(shard),
            pad_token_id=pad_token_id,
            batch_size=batch_size,
            padding_side=padding_side,
            device=device,
            autocast=autocast(device, dtype),
        )
        out[0, shard], out[1, shard] = chosen.double(), rejected.double()
    if dist_info.active:
        out = dist_info.all_reduce(out).cpu()
    return out[0].float(), out[1].float()


def progress_bar(total: int, initial: int, desc: str, enabled: bool, dist_info: DistInfo):
    """A tqdm bar on the main rank when ``enabled`` and stderr is a terminal outside CI; else None."""
    if not (enabled and dist_info.main and sys.stderr.isatty() and not os.environ.get("CI")):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
