"""Group-robust preference training of a causal LM (paper Algorithm 1; ``docs/training.md``).

One optimizer step sees a *global* batch of B = ``batch_size`` pairs, split into
``grad_accum × world_size`` micro-batches. With the θ-step group weights w (fixed for DPO/IPO and
IS-*, w = (1−χ)/K + χα for GR-*), every pair gets the coefficient c_i = N w_{g(i)} / (B N_{g(i)})
(:func:`grpo.groups.pair_coefficients`) before its forward pass, and Σ_i c_i ℓ_i = Σ_g w_g L̂_g is
back-propagated micro-batch by micro-batch. After the step's backward passes, the detached
per-group loss sums S_g are all-reduced across ranks, L̂_g = N S_g / (B N_g), the optimizer steps,
and α ← MirrorAscent(α, L̂, η_α), once per optimizer step.

Entry points: :func:`train` (the whole stage: tokenizer, SFT, reference log-probs, preference
training, checkpoints, the saved policy) and :class:`PreferenceTrainer` (one optimizer step at a
time, for benchmarks: ``trainer.train_step(indices)``). SFT is in :mod:`grpo.sft`, the reference
policy, its tokenizer and its cached log-probs in :mod:`grpo.reference`, checkpoints in
:mod:`grpo.checkpoint`, micro-batches, the accumulated step and DDP in :mod:`grpo.distributed`.

Names: ``policy`` is the causal LM being trained, ``scorer`` its
:class:`~grpo.logprobs.SequenceScorer` (summed response log-probs), ``ddp_scorer`` the scorer
wrapped in DistributedDataParallel under ``torchrun`` (the scorer itself in one process).
"""

from __future__ import annotations

import copy
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from grpo import metric_names
from grpo.checkpoint import (
    check_resumable,
    checkpoint_dirs,
    load_checkpoint,
    load_trainable,
    save_checkpoint,
    save_trainable,
)
from grpo.distributed import (
    DistInfo,
    MicroBatch,
    NonFiniteError,
    accumulate_and_step,
    init_distributed,
    micro_batches,
    progress_bar,
    score_sharded,
    wrap_ddp,
)
from grpo.groups import (
    COLLAPSE_SHARE,
    GroupWeights,
    collapse_eta,
    effective_groups,
    group_counts,
    group_loss_estimates,
    group_sums,
    pair_coefficients,
    parse_method,
)
from grpo.io import write_json
from grpo.logprobs import (
    EncodedPairs,
    SequenceScorer,
    SharedPromptBatch,
    encode_pairs,
    split_pairs,
)
from grpo.losses import loss_at_zero_margin, pair_losses, reward_margin
from grpo.modeling import (
    ModelConfig,
    add_lora,
    autocast,
    load_model,
    resolve_device,
    save_model,
    use_threads,
)
from grpo.reference import (
    LOGPS_DIR,
    make_tokenizer,
    reference_logps,
    reference_policy,
    saved_tokenizer,
)

LogFn = Callable[[dict[str, float], int], None]
REFERENCE_MODES = ("precomputed", "online")
LR_SCHEDULES = ("plateau", "constant")
BEST_POLICY = "best_policy.safetensors"
RESULT_FILE = "train_result.json"


@dataclass
class TrainConfig:
    """SFT + preference training (``params.yaml`` → ``train``)."""

    method: str = "gr-dpo"  # dpo | ipo | is-dpo | is-ipo | gr-dpo | gr-ipo
    beta: float = 0.1  # β of the DPO/IPO loss
    eta_alpha: float = 0.05  # η_α of the α mirror ascent (our scale: B × ℓ₀ × authors')
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
    # plateau: ReduceLROnPlateau on the monitored validation loss (worst group for GR-*, the
    # average for the others, as in the paper), η_α halved at each cut; constant: never cut
    lr_schedule: str = "plateau"
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
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule: one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
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
    alpha: list[float]  # α of the saved policy's step (uniform for non-robust methods)
    weights: list[float]  # θ-step group weights w of the saved policy's step
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per step
    best: dict[str, float] = field(default_factory=dict)  # best validation metrics
    steps: int = 0
    stopped_early: bool = False
    # α and w after the last step; equal to alpha/weights unless keep_best kept an earlier step
    final_alpha: list[float] = field(default_factory=list)
    final_weights: list[float] = field(default_factory=list)
    collapse: dict[str, Any] | None = None  # the first step α put > 0.99 on one group, if any

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_dir"], out["reference_dir"] = str(self.model_dir), str(self.reference_dir)
        return out


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
        groups=frame["group"].astype(str).tolist(),  # a cut prompt must still name its group
        pair_ids=frame["pair_id"].astype(str).tolist() if "pair_id" in frame.columns else None,
    )


def group_index(frame: pd.DataFrame, groups: Sequence[str], where: str) -> torch.Tensor:
    lookup = {g: i for i, g in enumerate(groups)}
    unknown = sorted(set(frame["group"]) - set(lookup))
    if unknown:
        raise ValueError(
            f"{where}: group(s) {unknown} do not occur in the training split {list(groups)}"
        )
    return torch.tensor([lookup[g] for g in frame["group"]], dtype=torch.long)


def group_sizes(train_groups: torch.Tensor, group_names: Sequence[str]) -> torch.Tensor:
    """N_g (K,) float64; raises naming any group without training pairs."""
    sizes = torch.bincount(train_groups, minlength=len(group_names))
    if (sizes == 0).any():
        empty = [g for g, n in zip(group_names, sizes.tolist(), strict=True) if n == 0]
        raise ValueError(f"group(s) {empty} have no training pairs")
    return sizes.to(torch.float64)


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
        self.cfg, self.method = cfg, parse_method(cfg.method)
        self.dist = dist_info or DistInfo()
        self.device, self.dtype = torch.device(device), dtype
        self.pad, self.padding_side = pad_token_id, padding_side
        self.train_pairs, self.train_groups = train_pairs, train_groups.long()
        self.group_names = list(group_names)
        self.group_sizes = group_sizes(self.train_groups, self.group_names)
        # η_α is divided by the loss at zero margin (log 2, or 1/(4β²) for IPO): one meaning of
        # η_α for every method and β (grpo.groups; docs/training.md).
        self.weights = GroupWeights(
            self.method, self.group_sizes, eta=cfg.eta_alpha, chi=cfg.chi, size_c=cfg.size_c,
            loss_scale=loss_at_zero_margin(self.method.loss, cfg.beta),
        )  # fmt: skip
        self.reference_logps = reference_logps
        self.reference_scorer = self._online_reference(reference_model)
        self.val_pairs, self.val_groups = val_pairs, val_groups
        self.val_reference_logps = val_reference_logps

        self.policy = policy.to(self.device)
        self.scorer = SequenceScorer(self.policy, cfg.fast_logprobs, cfg.shared_prompt)
        self.ddp_scorer = wrap_ddp(self.scorer, self.device, self.dist)
        self.optimizer, self.scheduler = self._optimizer()
        self.step = 0

    def _online_reference(self, reference_model: nn.Module | None) -> SequenceScorer | None:
        """The frozen copy that scores each micro-batch online; None with precomputed log-probs."""
        if reference_model is None:
            return None
        scorer = SequenceScorer(reference_model, self.cfg.fast_logprobs, self.cfg.shared_prompt)
        scorer.to(self.device).eval()
        return scorer

    def _optimizer(self) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.ReduceLROnPlateau]:
        """AdamW on the trainable parameters (the adapters under LoRA) and its plateau schedule."""
        cfg = self.cfg
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.scheduler_patience
        )
        return optimizer, scheduler

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def _reference(self, micro: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """log π_ref(y_w|x), log π_ref(y_l|x) (b,) of a micro-batch: looked up or scored online."""
        if self.reference_logps is not None:
            chosen, rejected = self.reference_logps
            return chosen[micro.index].to(self.device), rejected[micro.index].to(self.device)
        assert self.reference_scorer is not None
        batch = micro.batch
        with torch.no_grad(), autocast(self.device, self.dtype):
            if isinstance(batch, SharedPromptBatch) and not self.reference_scorer.shared_prompt:
                batch = self.reference_scorer.collate(micro.pairs, self.pad, self.padding_side)
                batch = batch.to(self.device)
            return split_pairs(self.reference_scorer(**batch.as_kwargs()).float())

    def train_step(self, indices: torch.Tensor) -> dict[str, Any]:
        """One optimizer step on the global batch ``indices`` (B,) of training pairs.

        Returns the step's statistics: ``loss`` (Σ_i c_i ℓ_i, the minimised objective),
        ``group_loss_sums`` / ``group_counts`` (K,) over all ranks, ``group_estimates`` L̂ (K,),
        ``weights`` and ``alpha_used`` by this step's θ update (K,), ``alpha`` after the α update
        (K,, used by the next step), ``grad_norm`` (before
        clipping), ``time_s``. Raises :class:`~grpo.distributed.NonFiniteError` on a NaN or
        infinite loss, gradient norm or group weight.
        """
        start = time.perf_counter()
        k, batch_pairs = self.num_groups, int(indices.numel())
        alpha_used, weights = self.weights.alpha, self.weights.weights  # the θ step uses α_t
        stats = torch.zeros(2 * k + 1, dtype=torch.float64)  # [S_g, n_g, objective]
        loss_fn = partial(
            self._weighted_loss, weights=weights, batch_pairs=batch_pairs, stats=stats
        )
        chunks = micro_batches(indices, self.cfg.grad_accum, self.dist.world_size, self.dist.rank)
        stats[-1], grad_norm = accumulate_and_step(
            self.ddp_scorer, self.train_pairs, chunks, self._collate, loss_fn, self.optimizer,
            grad_clip=self.cfg.grad_clip, dist_info=self.dist, device=self.device, dtype=self.dtype,
        )  # fmt: skip
        stats = self.dist.all_reduce(stats).cpu()
        sums, counts = stats[:k], stats[k : 2 * k]
        self._check_step(float(stats[-1]), sums, counts, grad_norm)
        estimates = group_loss_estimates(sums, self.group_sizes, batch_pairs)
        alpha = self.weights.update(estimates)  # α_{t+1} from this whole step's L̂
        self._check_group_weights(alpha)
        self.step += 1
        return {
            "loss": float(stats[-1]),
            "group_loss_sums": sums,
            "group_counts": counts,
            "group_estimates": estimates,
            "weights": weights,
            "alpha_used": alpha_used,
            "alpha": alpha.clone(),
            "grad_norm": grad_norm,
            "time_s": time.perf_counter() - start,
        }

    def _weighted_loss(
        self,
        micro: MicroBatch,
        logps: torch.Tensor,
        *,
        weights: torch.Tensor,
        batch_pairs: int,
        stats: torch.Tensor,
    ) -> torch.Tensor:
        """Σ_i c_i ℓ_i of a micro-batch for its backward pass; records S_g, n_g for the α update.

        Adds the micro-batch's per-group loss sums and counts into ``stats`` (2K+1,) in place.
        """
        k = self.num_groups
        policy_c, policy_r = split_pairs(logps.float())
        ref_c, ref_r = self._reference(micro)
        margin = reward_margin(policy_c, policy_r, ref_c, ref_r)
        losses = pair_losses(self.method.loss, margin, self.cfg.beta)
        groups = self.train_groups[micro.index]
        coef = pair_coefficients(weights, groups, self.group_sizes, batch_pairs)
        stats[:k] += group_sums(losses.detach().to("cpu", torch.float64), groups, k)
        stats[k : 2 * k] += group_counts(groups, k)
        return (coef.to(device=losses.device, dtype=losses.dtype) * losses).sum()

    def _collate(self, part: EncodedPairs):
        """A micro-batch's tensors, in the layout the scorer takes (shared prompt or not)."""
        return self.scorer.collate(part, self.pad, self.padding_side)

    def _check_step(
        self, objective: float, sums: torch.Tensor, counts: torch.Tensor, grad_norm: float
    ) -> None:
        """Raise on a non-finite loss (naming the groups whose batch loss sum S_g is NaN/inf) or
        gradient norm (naming the groups in the batch). Values already on the CPU: no sync."""
        step, names = self.step + 1, self.group_names
        present = [g for g, n in zip(names, counts.tolist(), strict=True) if n > 0]
        bad = [g for g, s in zip(names, sums.tolist(), strict=True) if not math.isfinite(s)]
        if bad or not math.isfinite(objective):
            detail = f" (batch loss sums {dict(zip(names, sums.tolist(), strict=True))})"
            raise NonFiniteError("preference", step, "loss", bad or present, detail)
        if not math.isfinite(grad_norm):
            detail = f" ({grad_norm}; the batch held these groups)"
            raise NonFiniteError("preference", step, "gradient norm", present, detail)

    def _check_group_weights(self, alpha: torch.Tensor) -> None:
        """Raise naming the groups whose α or θ-step weight is NaN/inf after the update."""
        finite = torch.isfinite(alpha) & torch.isfinite(self.weights.weights)
        if not bool(finite.all()):
            bad = [g for g, ok in zip(self.group_names, finite.tolist(), strict=True) if not ok]
            detail = f" (alpha {alpha.tolist()})"
            raise NonFiniteError("preference", self.step + 1, "group weight", bad, detail)

    @torch.no_grad()
    def validate(self) -> dict[str, Any] | None:
        """Per-group mean validation loss (K,), its max (worst group) and the pooled average;
        None without validation pairs. Ranks score shards (:func:`grpo.distributed.score_sharded`).
        """
        if self.val_pairs is None or self.val_groups is None or len(self.val_pairs) == 0:
            return None
        assert self.val_reference_logps is not None
        k = self.num_groups
        self.scorer.eval()
        policy_c, policy_r = score_sharded(
            self.scorer, self.val_pairs, pad_token_id=self.pad, padding_side=self.padding_side,
            batch_size=self.cfg.eval_batch_size, device=self.device, dtype=self.dtype,
            dist_info=self.dist,
        )  # fmt: skip
        ref_c, ref_r = self.val_reference_logps
        margin = reward_margin(policy_c, policy_r, ref_c, ref_r)
        losses = pair_losses(self.method.loss, margin, self.cfg.beta).double()
        sums = group_sums(losses, self.val_groups, k)
        counts = group_counts(self.val_groups, k)
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
        """ReduceLROnPlateau on ``value``; halves η_α when it cuts the LR. Returns whether it cut.
        A ``constant`` schedule never cuts."""
        if self.cfg.lr_schedule == "constant":
            return False
        before = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step(value)
        cut = self.optimizer.param_groups[0]["lr"] < before
        if cut:
            self.weights.eta /= 2.0
        return cut


# --------------------------------------------------------------------------- the stage


@dataclass
class LoopState:
    """Where the training loop is; checkpointed with the trainer, so a resumed run continues
    exactly (same data order, same best value, same early-stopping count)."""

    generator_state: torch.Tensor  # the data-order generator, after the current epoch's draw
    epoch: int = 0
    position: int = 0  # global batches of the current epoch already trained on
    permutation: torch.Tensor | None = None  # the current epoch's data order (None: draw anew)
    best_value: float = math.inf  # best monitored validation value so far
    best_metrics: dict[str, Any] = field(default_factory=dict)  # its step and validation losses
    best_alpha: list[float] | None = None  # α and w the best step's θ update used (keep_best)
    best_weights: list[float] | None = None
    last_alpha: list[float] | None = None  # α and w the last θ update used
    last_weights: list[float] | None = None
    collapse: dict[str, Any] | None = None  # the first step α put > 0.99 on one group
    bad_evals: int = 0  # validations since the best one
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per step
    sft_losses: list[float] = field(default_factory=list)

    def advance(self, steps_per_epoch: int) -> bool:
        """Count one step; at an epoch's end, start the next one. Returns whether it ended."""
        self.position += 1
        if self.position < steps_per_epoch:
            return False
        self.epoch, self.position, self.permutation = self.epoch + 1, 0, None
        return True

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Encoded(NamedTuple):
    """The tokenised splits: pairs and group ids (N,), validation None when there is none."""

    train_pairs: EncodedPairs
    train_groups: torch.Tensor
    val_pairs: EncodedPairs | None
    val_groups: torch.Tensor | None


def train(
    pairs: pd.DataFrame,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    *,
    log_fn: LogFn | None = None,
    resume: bool = True,
    reference_dir: str | Path | None = None,
) -> TrainResult:
    """Train a policy on the ``train`` split of the canonical table, validating on ``validation``.

    Leaves in ``out_dir``: ``tokenizer/``, ``reference/`` (the SFT or base model), ``policy/``
    (the result), ``checkpoints/step-*``, ``best_policy.safetensors`` and ``train_result.json``.
    With ``resume`` and a checkpoint in ``out_dir``, continues exactly where it left off.
    Under ``torchrun`` every rank calls this; rank 0 writes files and calls ``log_fn``.

    ``reference_dir``: a reference saved by :func:`prepare_reference` (model, tokenizer and
    ``grpo.json``). Training then starts from it with its tokenizer, skips SFT and writes no
    ``tokenizer/`` or ``reference/``; the reference log-probs of the training and validation
    pairs are read from (or, the first time, scored into) ``reference_dir/logps/``, so several
    methods trained from one reference score it once (:func:`reference_logps`).
    """
    check_pairs(pairs)
    use_threads(model_cfg)
    train_df = pairs[pairs["split"] == "train"].reset_index(drop=True)
    val_df = pairs[pairs["split"] == "validation"].reset_index(drop=True)
    if train_df.empty:
        raise ValueError("pairs table: no rows with split == 'train'")
    dist_info, device = _process_device(model_cfg)
    try:
        return _train(
            train_df, val_df, model_cfg, train_cfg, Path(out_dir),
            log_fn=log_fn, resume=resume, dist_info=dist_info, device=device,
            reference_dir=Path(reference_dir) if reference_dir is not None else None,
        )  # fmt: skip
    finally:
        if dist_info.started_here and dist.is_initialized():
            dist.destroy_process_group()


def _process_device(model_cfg: ModelConfig) -> tuple[DistInfo, torch.device]:
    """Join the process group (under ``torchrun``) and pick this process's device (its own GPU
    under DDP on CUDA)."""
    dist_info = init_distributed(model_cfg.device)
    device = resolve_device(model_cfg.device)
    if device.type == "cuda" and dist_info.active:
        device = torch.device("cuda", dist_info.local_rank)
    return dist_info, device


def prepare_reference(
    pairs: pd.DataFrame, model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: str | Path
) -> Path:
    """The reference π_ref of several training runs, made once: the tokenizer (the model's own,
    or a BPE trained on the ``train`` split's texts), the base model, SFT on the chosen responses
    of the ``train`` split when ``sft_epochs`` > 0, saved to ``out_dir/reference`` with its
    tokenizer. Pass the returned folder to :func:`train` as ``reference_dir``: every method then
    starts from the same weights and the same reference log-probs. Only the ``train`` split is
    read; SFT draws its data order from ``train_cfg.seed``.
    """
    check_pairs(pairs)
    use_threads(model_cfg)
    train_df = pairs[pairs["split"] == "train"].reset_index(drop=True)
    if train_df.empty:
        raise ValueError("pairs table: no rows with split == 'train'")
    dist_info, device = _process_device(model_cfg)
    out_dir = Path(out_dir)
    try:
        _prepare_out_dir(out_dir, False, dist_info)
        _seed_everything(train_cfg.seed)
        tokenizer = make_tokenizer(out_dir / "tokenizer", train_df, model_cfg, False, dist_info)
        common = _scoring_args(tokenizer, model_cfg, device)
        encoded = encode_frame(train_df, tokenizer, model_cfg)
        reference_policy(
            out_dir / "reference", encoded, tokenizer, model_cfg, train_cfg, False, dist_info,
            common,
        )  # fmt: skip
    finally:
        if dist_info.started_here and dist.is_initialized():
            dist.destroy_process_group()
    return out_dir / "reference"


def _train(
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    log_fn: LogFn | None,
    resume: bool,
    dist_info: DistInfo,
    device: torch.device,
    reference_dir: Path | None = None,
) -> TrainResult:
    """The stage, set-up first, then :func:`_loop`, then :func:`_finish`."""
    group_names = sorted(str(g) for g in train_df["group"].unique())
    resolved = _resolved_config(model_cfg, cfg, group_names, reference_dir)
    # A fresh start clears what an earlier run left in out_dir; a resume keeps it all.
    checkpoints = _prepare_out_dir(out_dir, resume, dist_info)
    _seed_everything(cfg.seed)
    # The tokenizer is saved once, so a resumed run tokenises exactly as the first one did;
    # a shared reference brings its own.
    if reference_dir is not None:
        tokenizer = saved_tokenizer(reference_dir, model_cfg)
    else:
        tokenizer = make_tokenizer(out_dir / "tokenizer", train_df, model_cfg, resume, dist_info)
    data = _encode(train_df, val_df, tokenizer, group_names, model_cfg)
    common = _scoring_args(tokenizer, model_cfg, device)
    # The reference π_ref: the SFT model (or the base model), saved for evaluation; or the
    # shared one, trained once for several methods (its log-probs cached beside it).
    if reference_dir is not None:
        model, sft_losses = load_model(model_cfg, tokenizer, path=reference_dir).to(device), []
    else:
        model, sft_losses = reference_policy(
            out_dir / "reference", data.train_pairs, tokenizer, model_cfg, cfg, resume,
            dist_info, common,
        )  # fmt: skip
    cache = reference_dir / LOGPS_DIR if reference_dir is not None else None
    trainer = _preference_trainer(
        model, data, group_names, model_cfg, cfg, dist_info, common, cache=cache
    )
    state = LoopState(torch.Generator().manual_seed(cfg.seed).get_state(), sft_losses=sft_losses)
    # Resuming: the checkpoint must come from the same config; it restores trainer, loop, RNGs.
    if checkpoints:
        check_resumable(checkpoints[-1], resolved)
        state = LoopState(**load_checkpoint(trainer, checkpoints[-1]))
    _loop(trainer, state, out_dir, resolved, log_fn)
    return _finish(trainer, state, tokenizer, model_cfg, out_dir, reference_dir)


def _resolved_config(
    model_cfg: ModelConfig, cfg: TrainConfig, group_names: list[str], reference_dir: Path | None
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (saved with it; :func:`check_resumable`)."""
    from grpo.config import to_dict

    resolved = {"model": to_dict(model_cfg), "train": to_dict(cfg), "groups": group_names}
    if reference_dir is not None:
        resolved["reference_dir"] = str(reference_dir)
    return resolved


def _encode(
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    tokenizer,
    group_names: list[str],
    model_cfg: ModelConfig,
) -> Encoded:
    """Tokenise both splits once, up front; an unknown validation group fails here, by name."""
    return Encoded(
        encode_frame(train_df, tokenizer, model_cfg),
        group_index(train_df, group_names, "train split"),
        encode_frame(val_df, tokenizer, model_cfg) if len(val_df) else None,
        group_index(val_df, group_names, "validation split") if len(val_df) else None,
    )


def _scoring_args(tokenizer, model_cfg: ModelConfig, device: torch.device) -> dict[str, Any]:
    """Padding, device and dtype: every scorer, SFT and the trainer must batch pairs alike."""
    return {
        "pad_token_id": tokenizer.pad_token_id, "padding_side": model_cfg.padding_side,
        "device": device, "dtype": model_cfg.dtype,
    }  # fmt: skip


def _loop(
    trainer: PreferenceTrainer,
    state: LoopState,
    out_dir: Path,
    resolved: dict[str, Any],
    log_fn: LogFn | None,
) -> None:
    """Optimizer steps until the step budget is spent or validation stops the run early."""
    cfg, dist_info = trainer.cfg, trainer.dist
    b, n_train = cfg.batch_size, len(trainer.train_pairs)
    steps_per_epoch, total = _step_budget(n_train, cfg, dist_info)
    generator = torch.Generator()
    generator.set_state(state.generator_state)
    bar = progress_bar(total, trainer.step, cfg.method, cfg.progress, dist_info)
    while trainer.step < total and not state.stopped_early:
        # Data order: a fresh permutation each epoch, from a generator whose state is saved.
        if state.permutation is None:
            state.permutation = torch.randperm(n_train, generator=generator)
            state.generator_state = generator.get_state()
        out = trainer.train_step(state.permutation[state.position * b : (state.position + 1) * b])
        epoch_end = state.advance(steps_per_epoch)
        state.last_alpha = [float(x) for x in out["alpha_used"]]
        state.last_weights = [float(x) for x in out["weights"]]
        step, metrics = trainer.step, _step_metrics(trainer, out)
        # A collapsed α (one group > 0.99) trains on that group alone: say so once, with an η_α
        # that would have kept the weights spread.
        if state.collapse is None and trainer.weights.collapsed() is not None:
            state.collapse = _collapse_warning(trainer)
        # Validation every eval_every steps (0: at each epoch's end) and after the last step:
        # it selects the kept policy, drives the LR schedule and early stopping.
        every = step % cfg.eval_every == 0 if cfg.eval_every else epoch_end
        if every or step == total:
            metrics.update(_validate(trainer, state, out_dir / BEST_POLICY))
        state.history.append({"step": step, **metrics})
        if dist_info.main and log_fn is not None:
            log_fn(metrics, step)
        if bar is not None:
            _show_step(bar, trainer, out)
        # Checkpoints: every checkpoint_every steps and at the end, so a killed run resumes.
        every = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
        if every or step == total or state.stopped_early:
            if dist_info.main:
                save_checkpoint(trainer, state.to_dict(), out_dir, resolved)
            dist_info.barrier()
    if bar is not None:
        bar.close()


def _step_metrics(trainer: PreferenceTrainer, out: dict[str, Any]) -> dict[str, float]:
    """The step's loss, LR, η_α and time, each group's batch mean loss and the weight its θ
    update used, and the effective number of groups: exp(entropy) of α (GR-*) or of the fixed
    weights (the other methods, whose α never moves)."""
    counts = out["group_counts"]
    batch_means = out["group_loss_sums"] / counts.clamp_min(1)
    weights = out["weights"]
    spread = out["alpha_used"] if trainer.method.robust else weights
    metrics: dict[str, float] = {
        metric_names.TRAIN_LOSS: out["loss"],
        metric_names.TRAIN_LR: trainer.optimizer.param_groups[0]["lr"],
        metric_names.TRAIN_ETA_ALPHA: trainer.weights.eta,
        metric_names.TRAIN_STEP_TIME: out["time_s"],
        metric_names.TRAIN_EFFECTIVE_GROUPS: effective_groups(spread),
    }
    for i, g in enumerate(trainer.group_names):
        if counts[i] > 0:  # a group absent from the batch has no batch loss
            metrics[metric_names.train_group_loss(g)] = float(batch_means[i])
        metrics[metric_names.train_group_weight(g)] = float(weights[i])
    return metrics


def _validate(trainer: PreferenceTrainer, state: LoopState, best_file: Path) -> dict[str, float]:
    """Validate; on a new best save the parameters (``keep_best``), else count a bad evaluation;
    step the LR schedule; stop early after ``early_stop_patience`` bad ones. Returns metrics."""
    val = trainer.validate()
    if val is None:
        return {}
    cfg, value = trainer.cfg, trainer.monitor_value(val)
    metrics = {
        metric_names.VAL_WORST_GROUP_LOSS: val["worst_group_loss"],
        metric_names.VAL_AVERAGE_LOSS: val["average_loss"],
    }
    for g, loss in zip(trainer.group_names, val["group_loss"].tolist(), strict=True):
        if not math.isnan(loss):  # a group absent from validation has no loss
            metrics[metric_names.val_group_loss(g)] = loss
    if value < state.best_value:
        state.best_value, state.bad_evals = value, 0
        state.best_metrics = {
            "step": trainer.step,
            metric_names.VAL_WORST_GROUP_LOSS: val["worst_group_loss"],
            metric_names.VAL_AVERAGE_LOSS: val["average_loss"],
            "worst_group": val["worst_group"],
        }
        state.best_alpha, state.best_weights = state.last_alpha, state.last_weights
        if cfg.keep_best and trainer.dist.main:
            save_trainable(trainer.policy, best_file)
    else:
        state.bad_evals += 1
    if trainer.scheduler_step(value):
        metrics[metric_names.TRAIN_LR_CUT] = 1.0
    if cfg.early_stop_patience and state.bad_evals >= cfg.early_stop_patience:
        state.stopped_early = True
    return metrics


def _collapse_warning(trainer: PreferenceTrainer) -> dict[str, Any]:
    """Print (rank 0) and return the first collapse of α: step, group, share, suggested η_α."""
    alpha = trainer.weights.alpha
    top = int(alpha.argmax())
    suggestion = collapse_eta(alpha, trainer.weights.eta)
    info = {
        "step": trainer.step,
        "group": trainer.group_names[top],
        "share": float(alpha[top]),
        "eta_alpha": trainer.weights.eta,
        "suggested_eta_alpha": float(f"{suggestion:.2g}"),
    }
    info["message"] = (
        f"warning: after step {info['step']} the group weights are collapsed: "
        f"alpha({info['group']}) = {info['share']:.4f} > {COLLAPSE_SHARE}, so training follows "
        f"that group alone; train.eta_alpha={info['suggested_eta_alpha']:g} (now "
        f"{info['eta_alpha']:g}) would have kept the largest weight at 0.5"
    )
    if trainer.dist.main:  # above the progress bar when there is one
        from tqdm.auto import tqdm

        tqdm.write(info["message"], file=sys.stderr)
    return info


def _show_step(bar, trainer: PreferenceTrainer, out: dict[str, Any]) -> None:
    """Progress bar: the step's loss and the group with the highest batch loss, with its weight."""
    counts = out["group_counts"]
    batch_means = out["group_loss_sums"] / counts.clamp_min(1)
    worst = int(torch.argmax(torch.where(counts > 0, batch_means, -math.inf)))
    bar.update(1)
    bar.set_postfix(
        loss=f"{out['loss']:.4f}",
        worst=trainer.group_names[worst],
        w=f"{float(trainer.weights.weights[worst]):.2f}",
    )


def _finish(
    trainer: PreferenceTrainer,
    state: LoopState,
    tokenizer,
    model_cfg: ModelConfig,
    out_dir: Path,
    reference_dir: Path | None = None,
) -> TrainResult:
    """Restore the best validated parameters and their group weights (``keep_best``); save the
    policy with its ``grpo.json`` (what evaluation and serving need) and ``train_result.json``."""
    cfg, best_file = trainer.cfg, out_dir / BEST_POLICY
    # the α the last θ update used (α after it was never used); a resume with no step left
    # falls back to the current α
    final_alpha = state.last_alpha or [float(x) for x in trainer.weights.alpha]
    final_weights = state.last_weights or [float(x) for x in trainer.weights.weights]
    kept = cfg.keep_best and bool(state.best_metrics) and best_file.exists()
    if kept:
        load_trainable(trainer.policy, best_file, trainer.device)
    result = TrainResult(
        model_dir=out_dir / "policy",
        reference_dir=reference_dir if reference_dir is not None else out_dir / "reference",
        groups=trainer.group_names,
        alpha=state.best_alpha if kept and state.best_alpha is not None else final_alpha,
        weights=state.best_weights if kept and state.best_weights is not None else final_weights,
        history=state.history,
        best=state.best_metrics,
        steps=trainer.step,
        stopped_early=state.stopped_early,
        final_alpha=final_alpha,
        final_weights=final_weights,
        collapse=state.collapse,
    )
    if trainer.dist.main:
        step = state.best_metrics["step"] if kept else trainer.step
        info = _policy_info(trainer, result, model_cfg, step)
        save_model(trainer.policy, tokenizer, result.model_dir, extra=info)
        write_json(out_dir / RESULT_FILE, result.to_json(), sort_keys=True)
    trainer.dist.barrier()
    return result


def _policy_info(
    trainer: PreferenceTrainer, result: TrainResult, model_cfg: ModelConfig, step: int
) -> dict[str, Any]:
    """The saved policy's ``grpo.json``: how it was trained, the group weights of ``step`` (the
    step whose parameters were saved) and the final α, and how to tokenise for it."""
    return {
        "stage": "policy",
        "method": trainer.cfg.method,
        "loss": trainer.method.loss,
        "beta": trainer.cfg.beta,
        "groups": result.groups,
        "alpha": result.alpha,
        "weights": result.weights,
        "step": step,
        "final_alpha": result.final_alpha,
        "reference_dir": str(result.reference_dir),
        "max_prompt_tokens": model_cfg.max_prompt_tokens,
        "max_response_tokens": model_cfg.max_response_tokens,
        "padding_side": model_cfg.padding_side,
    }


# --------------------------------------------------------------------------- set-up steps


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_out_dir(out_dir: Path, resume: bool, dist_info: DistInfo) -> list[Path]:
    """Create ``out_dir``; without ``resume`` remove an earlier run's outputs. Returns the
    completed checkpoints to resume from (oldest first; none without ``resume``)."""
    if dist_info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist_info.barrier()
    checkpoints = checkpoint_dirs(out_dir) if resume else []
    if not resume and dist_info.main:
        for name in ("checkpoints", "tokenizer", "reference", "policy"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
        (out_dir / BEST_POLICY).unlink(missing_ok=True)
    dist_info.barrier()
    return checkpoints


def _preference_trainer(
    model: nn.Module,
    data: Encoded,
    group_names: list[str],
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    dist_info: DistInfo,
    common: dict[str, Any],
    cache: Path | None = None,
) -> PreferenceTrainer:
    """The trainer on a copy of π_ref (LoRA adapters on it when configured). The reference
    log-probs are scored once here (``precomputed``), or by a frozen copy at every step
    (``online``); the validation pairs' are always scored once. With ``cache`` (a shared
    reference's ``logps/`` folder) scores already there are read instead of computed."""

    def score(pairs: EncodedPairs) -> tuple[torch.Tensor, torch.Tensor]:
        return reference_logps(model, pairs, cfg, cache=cache, dist_info=dist_info, **common)

    reference_model = ref_train = ref_val = None
    if cfg.reference == "precomputed":
        ref_train = score(data.train_pairs)
    else:
        reference_model = copy.deepcopy(model).eval().requires_grad_(False)
    if data.val_pairs is not None:
        ref_val = score(data.val_pairs)
    policy = add_lora(model, model_cfg) if model_cfg.lora else model
    return PreferenceTrainer(
        policy, data.train_pairs, data.train_groups, group_names, cfg,
        reference_logps=ref_train, reference_model=reference_model,
        val_pairs=data.val_pairs, val_groups=data.val_groups, val_reference_logps=ref_val,
        dist_info=dist_info, **common,
    )  # fmt: skip


def _step_budget(n_train: int, cfg: TrainConfig, dist_info: DistInfo) -> tuple[int, int]:
    """(steps per epoch, total steps); raises when the global batch cannot be split evenly
    over ``grad_accum × world size`` micro-batches or exceeds the training pairs."""
    b, parts = cfg.batch_size, cfg.grad_accum * dist_info.world_size
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
    return steps_per_epoch, total
