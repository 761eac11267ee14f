"""Our trainer behind a one-step-at-a-time handle, for the benchmarks.

Uses the project's public step API (:class:`grpo.trainer.PreferenceTrainer` and its
``train_step``), the same tokenisation (:func:`grpo.logprobs.encode_pairs`) and the same
reference scoring (:func:`grpo.logprobs.score_pairs`) as ``grpo.trainer.train``; only the
data order is drawn here (a seeded permutation per epoch, as ``train`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import BenchSettings, read_jsonl


@dataclass
class Session:
    """A ready trainer and its data order; ``step()`` runs one optimizer step."""

    trainer: Any
    n_pairs: int
    batch_size: int
    generator: torch.Generator
    perm: torch.Tensor | None = None
    pos: int = 0
    reference_s: float = 0.0

    def next_indices(self) -> torch.Tensor:
        per_epoch = self.n_pairs // self.batch_size
        if self.perm is None or self.pos >= per_epoch:
            self.perm = torch.randperm(self.n_pairs, generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos * self.batch_size : (self.pos + 1) * self.batch_size]
        self.pos += 1
        return idx

    def step(self) -> dict[str, Any]:
        """One optimizer step; the returned dict has ``mean_pair_loss`` besides the trainer's stats.

        ``loss`` is the minimised objective Σ_i c_i ℓ_i; for GR-DPO it is an importance-weighted
        estimate that equals the plain mean only for a group-balanced batch, so the log 2 check
        uses ``mean_pair_loss`` = Σ_g S_g / Σ_g n_g (the plain mean of the per-pair DPO losses).
        """
        out = self.trainer.train_step(self.next_indices())
        out["mean_pair_loss"] = float(out["group_loss_sums"].sum() / out["group_counts"].sum())
        return out


def open_session(
    workdir: str | Path,
    s: BenchSettings,
    method: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
) -> Session:
    """Load the saved model/tokenizer/pairs of ``workdir`` and build a trainer for ``method``."""
    import time

    from transformers import AutoTokenizer

    from grpo.logprobs import SequenceScorer, encode_pairs, score_pairs
    from grpo.modeling import ModelConfig, autocast, load_model
    from grpo.trainer import PreferenceTrainer, TrainConfig

    workdir = Path(workdir)
    model_dir = workdir / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pairs = read_jsonl(workdir / "pairs.jsonl")
    model_cfg = ModelConfig(
        name_or_path=str(model_dir),
        max_prompt_tokens=s.max_length,
        max_response_tokens=32,
        device=device,
        dtype=dtype,
        lora=s.lora,
        lora_r=s.lora_r,
        lora_alpha=s.lora_alpha,
    )
    torch.manual_seed(s.seed)
    model = load_model(model_cfg, tokenizer)
    encoded = encode_pairs(
        tokenizer,
        [p["prompt"] for p in pairs],
        [p["chosen"] for p in pairs],
        [p["rejected"] for p in pairs],
        max_prompt_tokens=model_cfg.max_prompt_tokens,
        max_response_tokens=model_cfg.max_response_tokens,
    )
    names = sorted({p["group"] for p in pairs})
    lookup = {g: i for i, g in enumerate(names)}
    groups = torch.tensor([lookup[p["group"]] for p in pairs], dtype=torch.long)
    cfg = TrainConfig(
        method=method,
        beta=s.beta,
        eta_alpha=s.eta_alpha,
        lr=s.lr,
        weight_decay=0.0,
        batch_size=s.batch_size,
        epochs=0,
        max_steps=s.total_steps,
        grad_clip=s.max_grad_norm,
        eval_batch_size=s.batch_size,
        reference="precomputed",
        seed=s.seed,
        progress=False,
    )
    dev = torch.device(device)
    model = model.to(dev)
    t0 = time.perf_counter()
    ref = score_pairs(
        SequenceScorer(model, cfg.fast_logprobs, cfg.shared_prompt).eval(),
        encoded,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=cfg.eval_batch_size,
        padding_side=model_cfg.padding_side,
        device=dev,
        autocast=autocast(dev, dtype),
    )
    reference_s = time.perf_counter() - t0
    if s.lora:  # adapters on the scored reference, as grpo.trainer.train adds them
        from grpo.modeling import add_lora

        model = add_lora(model, model_cfg)
    trainer = PreferenceTrainer(
        model,
        encoded,
        groups,
        names,
        cfg,
        pad_token_id=tokenizer.pad_token_id,
        padding_side=model_cfg.padding_side,
        reference_logps=ref,
        device=dev,
        dtype=dtype,
    )
    return Session(
        trainer,
        len(encoded),
        s.batch_size,
        torch.Generator().manual_seed(s.seed),
        reference_s=reference_s,
    )
