"""SFT and group-robust preference training of a causal LM (paper Algorithm 1; ``docs/training.md``).

One optimizer step sees a *global* batch of B = ``batch_size`` pairs, split into
``grad_accum × world_size`` micro-batches. With the θ-step group weights w (fixed for DPO/IPO and
IS-*, w = (1−χ)/K + χα for GR-*), every pair gets the coefficient c_i = N w_{g(i)} / (B N_{g(i)})
(:func:`grpo.groups.pair_coefficients`) before its forward pass, and Σ_i c_i ℓ_i = Σ_g w_g L̂_g is
back-propagated micro-batch by micro-batch. After the step's backward passes, the detached
per-group loss sums S_g are all-reduced across ranks, L̂_g = N S_g / (B N_g), the optimizer steps,
and α ← MirrorAscent(α, L̂, η_α), once per optimizer step.

Entry points: :func:`train` (the whole stage: tokenizer, SFT, reference log-probs, preference
training, checkpoints, the saved policy) and :class:`PreferenceTrainer` (one optimizer step at a
time, for benchmarks: ``trainer.train_step(indices)``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from grpo.groups import (
    GroupWeights,
    group_counts,
    group_loss_estimates,
    group_sums,
    pair_coefficients,
    parse_method,
)
from grpo.logprobs import (
    EncodedPairs,
    SequenceScorer,
    SharedPromptBatch,
    collate_sequences,
    encode_pairs,
    score_pairs,
    split_pairs,
)
from grpo.losses import pair_losses, reward_margin
from grpo.modeling import (
    ModelConfig,
    add_lora,
    autocast,
    load_model,
    load_tokenizer,
    resolve_device,
    save_model,
)

LogFn = Callable[[dict[str, float], int], None]
REFERENCE_MODES = ("precomputed", "online")


@dataclass
class TrainConfig:
    """SFT + preference training (``params.yaml`` → ``train``)."""

    method: str = "gr-dpo"  # dpo | ipo | is-dpo | is-ipo | gr-dpo | gr-ipo
    beta: float = 0.1  # β of the DPO/IPO loss
    eta_alpha: float = 0.05  # η_α of the group-weight mirror ascent (our scale: B × authors')
    chi: float = 1.0  # θ-step weights (1−χ)/K + χα; 1 = pure GRPO
    size_c: float = 0.0  # Group-DRO size adjustment C/√N_g in the α update (0 = off)
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.0
    batch_size: int = 16  # pairs per optimizer step, over all micro-batches and ranks
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)
    epochs: int = 3  # passes over the training pairs
    max_steps: int = 0  # cap on optimizer steps (0 = no cap)
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    eval_every: int = 20  # validate every this many steps (0 = at each epoch's end)
    eval_batch_size: int = 32
    scheduler_patience: int = 2  # evaluations without improvement before the LR is cut
    lr_factor: float = 0.1  # ReduceLROnPlateau factor; η_α is halved at each cut
    early_stop_patience: int = 5  # evaluations without improvement before stopping (0 = off)
    keep_best: bool = True  # the saved policy is the best validated one, not the last
    reference: str = "precomputed"  # "precomputed" (once, then freed) | "online" (frozen copy)
    sft_epochs: int = 0  # SFT on the chosen responses first (0 = the base model is the reference)
    sft_lr: float = 1e-3
    sft_batch_size: int = 16
    seed: int = 0  # data order and everything random
    checkpoint_every: int = 50  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    fast_logprobs: bool = True  # vocabulary projection only at response positions
    shared_prompt: bool = True  # each pair's prompt scored once, responses against its KV cache
    progress: bool = True  # tqdm bar (still off when stderr is not a TTY or CI is set)

    def __post_init__(self) -> None:
        self.method = parse_method(self.method).name
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference: one of {REFERENCE_MODES}, got {self.reference!r}")
        positive = ("beta", "lr", "batch_size", "grad_accum", "eval_batch_size", "sft_batch_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        non_negative = (
            "eta_alpha", "size_c", "weight_decay", "epochs", "max_steps", "grad_clip",
            "eval_every", "scheduler_patience", "early_stop_patience", "sft_epochs", "sft_lr",
            "checkpoint_every",
        )  # fmt: skip
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.chi <= 1.0:
            raise ValueError(f"chi must be in [0, 1], got {self.chi}")
        if not 0.0 < self.lr_factor < 1.0:
            raise ValueError(f"lr_factor must be in (0, 1), got {self.lr_factor}")
        if self.epochs == 0 and self.max_steps == 0:
            raise ValueError("give epochs > 0 or max_steps > 0")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


@dataclass
class TrainResult:
    """What :func:`train` leaves behind."""

    model_dir: Path  # the trained policy: save_pretrained model + tokenizer (+ grpo.json)
    reference_dir: Path  # the reference (SFT) policy, needed to evaluate implicit rewards
    groups: list[str]
    alpha: list[float]  # final α (uniform for non-robust methods)
    weights: list[float]  # final θ-step group weights w
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per step
    best: dict[str, float] = field(default_factory=dict)  # best validation metrics
    steps: int = 0
    stopped_early: bool = False

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_dir"], out["reference_dir"] = str(self.model_dir), str(self.reference_dir)
        return out


# --------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_here: bool = False

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
        """Σ over ranks, in place; a no-op for one process."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor


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
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, started)


# --------------------------------------------------------------------------- data


def check_pairs(pairs: pd.DataFrame) -> None:
    """The canonical table's columns needed here, none empty; raises naming the row and field."""
    needed = ("group", "prompt", "chosen", "rejected", "split")
    missing = [c for c in needed if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs table: missing column(s) {missing}; has {list(pairs.columns)}")
    for col in needed:
        bad = pairs[col].isna() | (pairs[col].astype(str).str.len() == 0)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            pid = pairs["pair_id"].iloc[row] if "pair_id" in pairs.columns else row
            raise ValueError(f"pairs table: row {row} (pair_id {pid}): field {col!r} is empty")


def encode_frame(frame: pd.DataFrame, tokenizer, model_cfg: ModelConfig) -> EncodedPairs:
    return encode_pairs(
        tokenizer,
        frame["prompt"].tolist(),
        frame["chosen"].tolist(),
        frame["rejected"].tolist(),
        max_prompt_tokens=model_cfg.max_prompt_tokens,
        max_response_tokens=model_cfg.max_response_tokens,
    )


def group_index(frame: pd.DataFrame, groups: Sequence[str], where: str) -> torch.Tensor:
    lookup = {g: i for i, g in enumerate(groups)}
    unknown = sorted(set(frame["group"]) - set(lookup))
    if unknown:
        raise ValueError(
            f"{where}: group(s) {unknown} do not occur in the training split {list(groups)}"
        )
    return torch.tensor([lookup[g] for g in frame["group"]], dtype=torch.long)


def micro_batches(
    indices: torch.Tensor, grad_accum: int, world: int, rank: int
) -> list[torch.Tensor]:
    """This rank's micro-batches of a global batch: chunk a·world + rank for a < grad_accum."""
    chunks = indices.chunk(grad_accum * world)
    return [chunks[a * world + rank] for a in range(grad_accum)]


def show_progress(enabled: bool, dist_info: DistInfo) -> bool:
    return enabled and dist_info.main and sys.stderr.isatty() and not os.environ.get("CI")


# --------------------------------------------------------------------------- preference step


class PreferenceTrainer:
    """Group-weighted DPO/IPO on encoded pairs; holds policy, optimizer, scheduler and α.

    ``reference_logps`` are the precomputed (chosen (N,), rejected (N,)) reference log-probs of the
    training pairs; otherwise ``reference_model`` scores each micro-batch online.
    """

    def __init__(
        self,
        policy: nn.Module,
        train_pairs: EncodedPairs,
        train_groups: torch.Tensor,
        group_names: Sequence[str],
        cfg: TrainConfig,
        *,
        pad_token_id: int,
        padding_side: str = "right",
        reference_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
        reference_model: nn.Module | None = None,
        val_pairs: EncodedPairs | None = None,
        val_groups: torch.Tensor | None = None,
        val_reference_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
        device: torch.device | str = "cpu",
        dtype: str = "auto",
        dist_info: DistInfo | None = None,
    ) -> None:
        if reference_logps is None and reference_model is None:
            raise ValueError("give reference_logps (precomputed) or reference_model (online)")
        self.cfg = cfg
        self.method = parse_method(cfg.method)
        self.dist = dist_info or DistInfo()
        self.device = torch.device(device)
        self.dtype = dtype
        self.pad, self.padding_side = pad_token_id, padding_side
        self.train_pairs, self.train_groups = train_pairs, train_groups.long()
        self.group_names = list(group_names)
        k = len(self.group_names)
        sizes = torch.bincount(self.train_groups, minlength=k)
        if (sizes == 0).any():
            empty = [g for g, n in zip(self.group_names, sizes.tolist(), strict=True) if n == 0]
            raise ValueError(f"group(s) {empty} have no training pairs")
        self.group_sizes = sizes.to(torch.float64)
        self.weights = GroupWeights(
            self.method, self.group_sizes, eta=cfg.eta_alpha, chi=cfg.chi, size_c=cfg.size_c
        )
        self.reference_logps = reference_logps
        self.reference_scorer = (
            SequenceScorer(reference_model, cfg.fast_logprobs, cfg.shared_prompt)
            .to(self.device)
            .eval()
            if reference_model is not None
            else None
        )
        self.val_pairs, self.val_groups = val_pairs, val_groups
        self.val_reference_logps = val_reference_logps

        self.policy = policy.to(self.device)
        self.scorer = SequenceScorer(self.policy, cfg.fast_logprobs, cfg.shared_prompt)
        self.model: nn.Module = self.scorer
        if self.dist.active:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(
                self.scorer, device_ids=ids, broadcast_buffers=False
            )
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.scheduler_patience
        )
        self.step = 0

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def _reference(
        self, chunk: torch.Tensor, part: EncodedPairs, batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_logps is not None:
            rc, rr = self.reference_logps
            return rc[chunk].to(self.device), rr[chunk].to(self.device)
        with torch.no_grad(), autocast(self.device, self.dtype):
            assert self.reference_scorer is not None
            if isinstance(batch, SharedPromptBatch) and not self.reference_scorer.shared_prompt:
                batch = self.reference_scorer.collate(part, self.pad, self.padding_side)
                batch = batch.to(self.device)
            return split_pairs(self.reference_scorer(**batch.as_kwargs()).float())

    def train_step(self, indices: torch.Tensor) -> dict[str, Any]:
        """One optimizer step on the global batch ``indices`` (B,) of training pairs.

        Returns the step's statistics: ``loss`` (Σ_i c_i ℓ_i, the minimised objective),
        ``group_loss_sums`` / ``group_counts`` (K,) over all ranks, ``group_estimates`` L̂ (K,),
        ``weights`` used by this step (K,), ``alpha`` after the update (K,), ``time_s``.
        """
        start = time.perf_counter()
        cfg, k = self.cfg, self.num_groups
        batch_pairs = int(indices.numel())
        weights = self.weights.weights  # w(α_t): the θ step uses the current weights
        self.model.train()
        stats = torch.zeros(2 * k + 1, dtype=torch.float64)  # [S_g, n_g, objective]
        chunks = micro_batches(indices, cfg.grad_accum, self.dist.world_size, self.dist.rank)
        for a, chunk in enumerate(chunks):
            last = a == len(chunks) - 1
            sync = contextlib.nullcontext()
            if self.dist.active and not last:
                sync = self.model.no_sync()  # type: ignore[operator]
            part = self.train_pairs.select(chunk.tolist())
            batch = self.scorer.collate(part, self.pad, self.padding_side).to(self.device)
            with sync:
                with autocast(self.device, self.dtype):
                    logps = self.model(**batch.as_kwargs())
                policy_c, policy_r = split_pairs(logps.float())
                ref_c, ref_r = self._reference(chunk, part, batch)
                losses = pair_losses(
                    self.method.loss, reward_margin(policy_c, policy_r, ref_c, ref_r), cfg.beta
                )
                groups = self.train_groups[chunk]
                coef = pair_coefficients(weights, groups, self.group_sizes, batch_pairs)
                weighted = (coef.to(device=losses.device, dtype=losses.dtype) * losses).sum()
                # DDP averages gradients over ranks; B is global, so undo the average.
                (weighted * self.dist.world_size).backward()
            detached = losses.detach().to("cpu", torch.float64)
            stats[:k] += group_sums(detached, groups, k)
            stats[k : 2 * k] += group_counts(groups, k)
            stats[-1] += float(weighted.detach())
        stats = self.dist.all_reduce(stats.to(self._reduce_device())).cpu()
        grad_norm = float("nan")
        if cfg.grad_clip > 0:
            params = [p for p in self.policy.parameters() if p.requires_grad]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums, counts = stats[:k], stats[k : 2 * k]
        estimates = group_loss_estimates(sums, self.group_sizes, batch_pairs)
        alpha = self.weights.update(estimates)  # α_{t+1} from this whole step's L̂
        self.step += 1
        return {
            "loss": float(stats[-1]),
            "group_loss_sums": sums,
            "group_counts": counts,
            "group_estimates": estimates,
            "weights": weights,
            "alpha": alpha.clone(),
            "grad_norm": grad_norm,
            "time_s": time.perf_counter() - start,
        }

    def _reduce_device(self) -> torch.device:
        if self.dist.active and dist.get_backend() == "nccl":
            return self.device
        return torch.device("cpu")

    @torch.no_grad()
    def validate(self) -> dict[str, Any] | None:
        """Per-group mean validation loss (K,), its max (worst group) and the pooled average.

        Each rank scores a shard (every world_size-th pair); sums and counts are all-reduced.
        """
        if self.val_pairs is None or self.val_groups is None or len(self.val_pairs) == 0:
            return None
        assert self.val_reference_logps is not None
        k = self.num_groups
        self.scorer.eval()
        shard = list(range(self.dist.rank, len(self.val_pairs), self.dist.world_size))
        stats = torch.zeros(2 * k, dtype=torch.float64)
        if shard:
            policy_c, policy_r = score_pairs(
                self.scorer,
                self.val_pairs.select(shard),
                pad_token_id=self.pad,
                batch_size=self.cfg.eval_batch_size,
                padding_side=self.padding_side,
                device=self.device,
                autocast=autocast(self.device, self.dtype),
            )
            ref_c, ref_r = (t[shard] for t in self.val_reference_logps)
            losses = pair_losses(
                self.method.loss, reward_margin(policy_c, policy_r, ref_c, ref_r), self.cfg.beta
            ).double()
            groups = self.val_groups[shard]
            stats[:k] = group_sums(losses, groups, k)
            stats[k:] = group_counts(groups, k)
        stats = self.dist.all_reduce(stats.to(self._reduce_device())).cpu()
        sums, counts = stats[:k], stats[k:]
        means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, math.nan))
        present = counts > 0
        worst = int(torch.where(present, means, torch.full_like(means, -math.inf)).argmax())
        return {
            "group_loss": means,
            "worst_group_loss": float(means[worst]),
            "worst_group": self.group_names[worst],
            "average_loss": float(sums.sum() / counts.sum()),
        }

    def monitor_value(self, val: dict[str, Any]) -> float:
        """The scheduled / early-stopped quantity: worst group (robust) or pooled average."""
        return val["worst_group_loss"] if self.method.robust else val["average_loss"]

    def scheduler_step(self, value: float) -> bool:
        """ReduceLROnPlateau on ``value``; halves η_α when it cuts the LR. Returns whether it cut."""
        before = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step(value)
        cut = self.optimizer.param_groups[0]["lr"] < before
        if cut:
            self.weights.eta /= 2.0
        return cut


# --------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Completed checkpoints, oldest first."""
    root = out_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "trainer_state.pt").exists())


def save_checkpoint(
    trainer: PreferenceTrainer, loop: dict[str, Any], out_dir: Path, config: dict
) -> Path:
    """Policy (safetensors), optimizer, scheduler, α, loop state, RNG and config; atomically."""
    from safetensors.torch import save_model as save_safetensors

    root = out_dir / "checkpoints"
    final = root / f"step-{trainer.step:07d}"
    tmp = root / f".step-{trainer.step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(trainer.policy, str(tmp / "policy.safetensors"))
    torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {
        "step": trainer.step,
        "group_weights": trainer.weights.state_dict(),
        "loop": loop,
        "rng": _rng_state(),
    }
    torch.save(state, tmp / "trainer_state.pt")  # written last: its presence marks completion
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoint_dirs(out_dir)[: -trainer.cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(trainer: PreferenceTrainer, path: Path) -> dict[str, Any]:
    """Restore ``trainer`` from ``path``; returns the loop state. RNG states are restored too."""
    from safetensors.torch import load_model as load_safetensors

    load_safetensors(trainer.policy, str(path / "policy.safetensors"), device=str(trainer.device))
    trainer.optimizer.load_state_dict(
        torch.load(path / "optimizer.pt", map_location=trainer.device)
    )
    trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    trainer.step = int(state["step"])
    trainer.weights.load_state_dict(state["group_weights"])
    _set_rng_state(state["rng"])
    return state["loop"]


# Settings a resumed run may change: how long to train and how to report, not what is computed.
RESUMABLE_CHANGES = frozenset(
    {"epochs", "max_steps", "progress", "checkpoint_every", "keep_checkpoints", "eval_batch_size"}
)


def check_resumable(checkpoint: Path, resolved: dict[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` under a config that changes what is computed.

    The checkpoint's ``config.json`` must equal ``resolved`` except for :data:`RESUMABLE_CHANGES`
    in the train section; the error names every differing key (start over with ``resume=False``).
    """
    saved = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    current = json.loads(json.dumps(resolved))  # same JSON types as the saved copy
    diffs = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section), current.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new)):
                exempt = section == "train" and key in RESUMABLE_CHANGES
                if not exempt and old.get(key) != new.get(key):
                    diffs.append(f"{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
        elif old != new:
            diffs.append(f"{section}: {old!r} -> {new!r}")
    if diffs:
        raise ValueError(
            f"{checkpoint}: cannot resume, the config changed ({'; '.join(diffs)}); "
            "use another output folder or start over (--no-resume / resume=False)"
        )


# --------------------------------------------------------------------------- SFT


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
    """Supervised fine-tuning: mean NLL per token of the chosen responses, ``sft_epochs`` passes.

    Global batches of ``sft_batch_size`` pairs split over ranks and ``grad_accum``; the loss of a
    global batch is −Σ log π(y_w|x) / (number of its response tokens). Returns the losses.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.sft_lr, weight_decay=cfg.weight_decay)
    scorer = SequenceScorer(model, cfg.fast_logprobs, shared_prompt=False).to(device)
    wrapped: nn.Module = scorer
    if dist_info.active:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(
            scorer, device_ids=ids, broadcast_buffers=False
        )
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    n, b = len(pairs), min(cfg.sft_batch_size, len(pairs))
    parts = cfg.grad_accum * dist_info.world_size
    if b < parts:
        raise ValueError(f"sft_batch_size {b} is smaller than grad_accum × world size = {parts}")
    b -= b % parts
    losses: list[float] = []
    steps = cfg.sft_epochs * (n // b)
    bar = _progress(steps, 0, "sft", show_progress(cfg.progress, dist_info))
    wrapped.train()
    for _ in range(cfg.sft_epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(n // b):
            idx = perm[s * b : (s + 1) * b]
            tokens = sum(len(pairs.chosen[i]) for i in idx.tolist())
            total = 0.0
            chunks = micro_batches(idx, cfg.grad_accum, dist_info.world_size, dist_info.rank)
            for a, chunk in enumerate(chunks):
                part = pairs.select(chunk.tolist())
                batch = collate_sequences(part.prompt, part.chosen, pad_token_id, padding_side)
                sync = contextlib.nullcontext()
                if dist_info.active and a < len(chunks) - 1:
                    sync = wrapped.no_sync()  # type: ignore[operator]
                with sync:
                    with autocast(device, dtype):
                        logps = wrapped(**batch.to(device).as_kwargs())
                    loss = -logps.float().sum() / tokens
                    (loss * dist_info.world_size).backward()
                total += float(loss.detach())
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            reduced = dist_info.all_reduce(torch.tensor([total], dtype=torch.float64))
            losses.append(float(reduced))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(nll=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    return losses


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


def _reference_logps(
    model: nn.Module,
    pairs: EncodedPairs,
    cfg: TrainConfig,
    *,
    pad_token_id: int,
    padding_side: str,
    device: torch.device,
    dtype: str,
    dist_info: DistInfo,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_ref(y_w|x), log π_ref(y_l|x) of every pair (N,) each; ranks score shards then sum."""
    scorer = SequenceScorer(model, cfg.fast_logprobs, cfg.shared_prompt).to(device).eval()
    shard = list(range(dist_info.rank, len(pairs), dist_info.world_size))
    out = torch.zeros(2, len(pairs), dtype=torch.float64)
    if shard:
        c, r = score_pairs(
            scorer,
            pairs.select(shard),
            pad_token_id=pad_token_id,
            batch_size=cfg.eval_batch_size,
            padding_side=padding_side,
            device=device,
            autocast=autocast(device, dtype),
        )
        out[0, shard], out[1, shard] = c.double(), r.double()
    if dist_info.active:
        reduce_dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
        out = dist_info.all_reduce(out.to(reduce_dev)).cpu()
    return out[0].float(), out[1].float()


# --------------------------------------------------------------------------- the stage


def train(
    pairs: pd.DataFrame,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    *,
    log_fn: LogFn | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train a policy on the ``train`` split of the canonical table, validating on ``validation``.

    Leaves in ``out_dir``: ``tokenizer/``, ``reference/`` (the SFT or base model), ``policy/``
    (the result), ``checkpoints/step-*``, ``best_policy.safetensors`` and ``train_result.json``.
    With ``resume`` and a checkpoint in ``out_dir``, continues exactly where it left off.
    Under ``torchrun`` every rank calls this; rank 0 writes files and calls ``log_fn``.
    """
    out_dir = Path(out_dir)
    check_pairs(pairs)
    train_df = pairs[pairs["split"] == "train"].reset_index(drop=True)
    val_df = pairs[pairs["split"] == "validation"].reset_index(drop=True)
    if train_df.empty:
        raise ValueError("pairs table: no rows with split == 'train'")
    group_names = sorted(str(g) for g in train_df["group"].unique())
    dist_info = init_distributed(model_cfg.device)
    device = resolve_device(model_cfg.device)
    if device.type == "cuda" and dist_info.active:
        device = torch.device("cuda", dist_info.local_rank)
    try:
        return _train(
            train_df, val_df, group_names, model_cfg, train_cfg, out_dir,
            log_fn=log_fn, resume=resume, dist_info=dist_info, device=device,
        )  # fmt: skip
    finally:
        if dist_info.started_here and dist.is_initialized():
            dist.destroy_process_group()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _train(
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    group_names: list[str],
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    log_fn: LogFn | None,
    resume: bool,
    dist_info: DistInfo,
    device: torch.device,
) -> TrainResult:
    from grpo.config import to_dict

    resolved = {"model": to_dict(model_cfg), "train": to_dict(cfg), "groups": group_names}
    if dist_info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist_info.barrier()
    checkpoints = checkpoint_dirs(out_dir) if resume else []
    if not resume and dist_info.main:
        for name in ("checkpoints", "tokenizer", "reference", "policy"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
        (out_dir / "best_policy.safetensors").unlink(missing_ok=True)
    dist_info.barrier()
    _seed_everything(cfg.seed)

    # Tokenizer: saved once so a resumed run tokenises exactly as the first one did.
    tok_dir = out_dir / "tokenizer"
    if resume and (tok_dir / "tokenizer_config.json").exists():
        tok_cfg = copy.copy(model_cfg)
        tok_cfg.tokenizer = str(tok_dir)
        tokenizer = load_tokenizer(tok_cfg)
    else:
        texts = pd.concat([train_df["prompt"], train_df["chosen"], train_df["rejected"]]).tolist()
        tokenizer = load_tokenizer(model_cfg, texts)
        if dist_info.main:
            tmp = out_dir / ".tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(tok_dir, ignore_errors=True)
            tmp.rename(tok_dir)
    pad, side = tokenizer.pad_token_id, model_cfg.padding_side
    train_pairs = encode_frame(train_df, tokenizer, model_cfg)
    train_groups = group_index(train_df, group_names, "train split")
    val_pairs = encode_frame(val_df, tokenizer, model_cfg) if len(val_df) else None
    val_groups = group_index(val_df, group_names, "validation split") if len(val_df) else None
    common = {"pad_token_id": pad, "padding_side": side, "device": device, "dtype": model_cfg.dtype}

    # Reference policy: the SFT model (or the base model), saved for evaluation.
    ref_dir = out_dir / "reference"
    sft_losses: list[float] = []
    if resume and (ref_dir / "grpo.json").exists():
        model = load_model(model_cfg, tokenizer, path=ref_dir)
    else:
        model = load_model(model_cfg, tokenizer)
        if cfg.sft_epochs > 0:
            target = add_lora(model, model_cfg) if model_cfg.lora else model
            sft_losses = sft(target.to(device), train_pairs, cfg, dist_info=dist_info, **common)
            model = target.merge_and_unload() if model_cfg.lora else target
        if dist_info.main:
            save_model(
                model.cpu(),
                tokenizer,
                ref_dir,
                extra={"stage": "reference", "sft_losses": sft_losses},
            )
        dist_info.barrier()
    model = model.to(device)

    reference_model = None
    ref_train = ref_val = None
    if cfg.reference == "precomputed":
        ref_train = _reference_logps(model, train_pairs, cfg, dist_info=dist_info, **common)
    else:
        reference_model = copy.deepcopy(model).eval().requires_grad_(False)
    if val_pairs is not None:
        ref_val = _reference_logps(model, val_pairs, cfg, dist_info=dist_info, **common)
    policy = add_lora(model, model_cfg) if model_cfg.lora else model

    trainer = PreferenceTrainer(
        policy, train_pairs, train_groups, group_names, cfg,
        pad_token_id=pad, padding_side=side, reference_logps=ref_train,
        reference_model=reference_model, val_pairs=val_pairs, val_groups=val_groups,
        val_reference_logps=ref_val, device=device, dtype=model_cfg.dtype, dist_info=dist_info,
    )  # fmt: skip
    n_train, b = len(train_pairs), cfg.batch_size
    parts = cfg.grad_accum * dist_info.world_size
    if b % parts:
        raise ValueError(
            f"batch_size {b} is not divisible by grad_accum × world size = {cfg.grad_accum} × "
            f"{dist_info.world_size}"
        )
    if n_train < b:
        raise ValueError(f"{n_train} training pairs are fewer than batch_size {b}")
    steps_per_epoch = n_train // b
    total = cfg.epochs * steps_per_epoch if cfg.epochs else cfg.max_steps
    if cfg.max_steps:
        total = min(total, cfg.max_steps)

    data_gen = torch.Generator().manual_seed(cfg.seed)
    loop: dict[str, Any] = {
        "epoch": 0, "epoch_pos": 0, "perm": None, "data_gen": data_gen.get_state(),
        "best": math.inf, "best_metrics": {}, "bad_evals": 0, "stopped_early": False,
        "history": [], "sft_losses": sft_losses,
    }  # fmt: skip
    if checkpoints:
        check_resumable(checkpoints[-1], resolved)
        loop = load_checkpoint(trainer, checkpoints[-1])
        data_gen.set_state(loop["data_gen"])
    best_file = out_dir / "best_policy.safetensors"
    bar = _progress(total, trainer.step, f"{cfg.method}", show_progress(cfg.progress, dist_info))
    names = group_names

    while trainer.step < total and not loop["stopped_early"]:
        if loop["perm"] is None:
            loop["perm"] = torch.randperm(n_train, generator=data_gen)
            loop["data_gen"] = data_gen.get_state()
        pos = loop["epoch_pos"]
        out = trainer.train_step(loop["perm"][pos * b : (pos + 1) * b])
        loop["epoch_pos"] += 1
        epoch_end = loop["epoch_pos"] == steps_per_epoch
        if epoch_end:
            loop["epoch"] += 1
            loop["epoch_pos"], loop["perm"] = 0, None
        step = trainer.step
        counts = out["group_counts"]
        batch_means = out["group_loss_sums"] / counts.clamp_min(1)
        new_w = trainer.weights.weights
        metrics: dict[str, float] = {
            "train/loss": out["loss"],
            "train/lr": trainer.optimizer.param_groups[0]["lr"],
            "train/eta_alpha": trainer.weights.eta,
            "train/step_time_s": out["time_s"],
        }
        for i, g in enumerate(names):
            if counts[i] > 0:
                metrics[f"train/group_loss/{g}"] = float(batch_means[i])
            metrics[f"train/group_weight/{g}"] = float(new_w[i])
        due = (cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and epoch_end)
        if due or step == total:
            val = trainer.validate()
            if val is not None:
                value = trainer.monitor_value(val)
                metrics["val/worst_group_loss"] = val["worst_group_loss"]
                metrics["val/average_loss"] = val["average_loss"]
                for i, g in enumerate(names):
                    if not math.isnan(float(val["group_loss"][i])):
                        metrics[f"val/group_loss/{g}"] = float(val["group_loss"][i])
                if value < loop["best"]:
                    loop["best"], loop["bad_evals"] = value, 0
                    loop["best_metrics"] = {
                        "step": step,
                        "val/worst_group_loss": val["worst_group_loss"],
                        "val/average_loss": val["average_loss"],
                        "worst_group": val["worst_group"],
                    }
                    if cfg.keep_best and dist_info.main:
                        _save_trainable(trainer.policy, best_file)
                else:
                    loop["bad_evals"] += 1
                if trainer.scheduler_step(value):
                    metrics["train/lr_cut"] = 1.0
                if cfg.early_stop_patience and loop["bad_evals"] >= cfg.early_stop_patience:
                    loop["stopped_early"] = True
        loop["history"].append({"step": step, **metrics})
        if dist_info.main and log_fn is not None:
            log_fn(metrics, step)
        if bar is not None:
            worst = int(torch.argmax(torch.where(counts > 0, batch_means, -math.inf)))
            bar.update(1)
            bar.set_postfix(
                loss=f"{out['loss']:.4f}", worst=names[worst], w=f"{float(new_w[worst]):.2f}"
            )
        ckpt_due = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
        if ckpt_due or step == total or loop["stopped_early"]:
            if dist_info.main:
                save_checkpoint(trainer, loop, out_dir, resolved)
            dist_info.barrier()
    if bar is not None:
        bar.close()

    if cfg.keep_best and best_file.exists():
        _load_trainable(trainer.policy, best_file, device)
    result = TrainResult(
        model_dir=out_dir / "policy",
        reference_dir=ref_dir,
        groups=names,
        alpha=[float(x) for x in trainer.weights.alpha],
        weights=[float(x) for x in trainer.weights.weights],
        history=loop["history"],
        best=loop["best_metrics"],
        steps=trainer.step,
        stopped_early=loop["stopped_early"],
    )
    if dist_info.main:
        extra = {
            "stage": "policy",
            "method": cfg.method,
            "loss": trainer.method.loss,
            "beta": cfg.beta,
            "groups": names,
            "alpha": result.alpha,
            "reference_dir": str(ref_dir),
            "max_prompt_tokens": model_cfg.max_prompt_tokens,
            "max_response_tokens": model_cfg.max_response_tokens,
            "padding_side": model_cfg.padding_side,
        }
        save_model(trainer.policy, tokenizer, result.model_dir, extra=extra)
        _write_json(out_dir / "train_result.json", result.to_json())
    dist_info.barrier()
    return result


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def _save_trainable(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file(_trainable_state(model), str(tmp))
    tmp.replace(path)


def _load_trainable(model: nn.Module, path: Path, device: torch.device) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path), device=str(device))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    tmp.replace(path)
