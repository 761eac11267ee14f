"""The reference policy π_ref and its log-probs, shared by training and by experiments.

DPO-style losses compare the policy with a fixed reference through the margin ``h = (log
π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))``
(:func:`grpo.losses.reward_margin`). Everything about π_ref lives here: the
tokenizer (the model's own, or a BPE trained on the training texts), the reference policy itself
(the base model, fine-tuned on the chosen responses when ``sft_epochs`` > 0, saved once), and its
log-probs of a set of pairs, scored once and, for a shared reference, cached beside it under a
digest of the token ids, so several methods trained from one reference score it once
(:func:`grpo.trainer.prepare_reference`, ``train(..., reference_dir=...)``).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import nn

from grpo.distributed import DistInfo, score_sharded
from grpo.io import atomic_open
from grpo.logprobs import EncodedPairs, SequenceScorer
from grpo.modeling import ModelConfig, add_lora, load_model, load_tokenizer, save_model
from grpo.sft import sft

if TYPE_CHECKING:
    from grpo.trainer import TrainConfig

LOGPS_DIR = "logps"  # a shared reference's cached log-probs, one file per set of pairs


def make_tokenizer(
    tok_dir: Path, train_df: pd.DataFrame, model_cfg: ModelConfig, resume: bool, dist_info: DistInfo
):
    """The saved tokenizer on resume; else a new one (trained on the training texts when the
    model config asks for it), saved to ``tok_dir`` by rank 0."""
    if resume and (tok_dir / "tokenizer_config.json").exists():
        tok_cfg = copy.copy(model_cfg)
        tok_cfg.tokenizer = str(tok_dir)
        return load_tokenizer(tok_cfg)
    texts = pd.concat([train_df["prompt"], train_df["chosen"], train_df["rejected"]]).tolist()
    tokenizer = load_tokenizer(model_cfg, texts)
    if dist_info.main:
        tmp = tok_dir.with_name(f".{tok_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(tok_dir, ignore_errors=True)
        tmp.rename(tok_dir)
    return tokenizer


def saved_tokenizer(folder: Path, model_cfg: ModelConfig):
    """The tokenizer saved with a model in ``folder`` (a shared reference), padded as configured."""
    tok_cfg = copy.copy(model_cfg)
    tok_cfg.tokenizer = str(folder)
    return load_tokenizer(tok_cfg)


def pairs_digest(pairs: EncodedPairs, *extra: str) -> str:
    """sha256 (first 16 hex digits) of the token ids of ``pairs`` and ``extra`` strings: the key
    of their cached reference log-probs (same ids, same reference, same scores)."""
    import hashlib
    import json

    payload = json.dumps([pairs.prompt, pairs.chosen, pairs.rejected, list(extra)])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def reference_logps(
    model: nn.Module,
    pairs: EncodedPairs,
    cfg: TrainConfig,
    *,
    cache: Path | None,
    dist_info: DistInfo,
    pad_token_id: int,
    padding_side: str,
    device: torch.device,
    dtype: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_ref(y_w|x), log π_ref(y_l|x) (N,) of ``pairs`` under ``model``: read from
    ``cache/<digest>.safetensors`` when there (the digest covers the token ids, the device type
    and the dtype), else scored (:func:`score_reference`) and, with a ``cache``, written there
    by rank 0 for the next method that trains from the same reference."""
    from safetensors.torch import load_file, save

    common = {"pad_token_id": pad_token_id, "padding_side": padding_side, "device": device}
    file = None
    if cache is not None:
        file = cache / f"{pairs_digest(pairs, device.type, dtype)}.safetensors"
        if file.exists():
            stored = load_file(str(file))
            return stored["chosen"], stored["rejected"]
    chosen, rejected = score_reference(model, pairs, cfg, dist_info, dtype=dtype, **common)
    if file is not None and dist_info.main:
        # methods of one seed training at once in worker processes may both miss the cache and
        # write this file: a unique temporary name each, the last whole file wins (same scores)
        with atomic_open(file, "wb") as handle:
            handle.write(save({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}))
    dist_info.barrier()
    return chosen, rejected


def score_reference(
    model: nn.Module, pairs: EncodedPairs, cfg: TrainConfig, dist_info: DistInfo, **common: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score ``pairs`` with the reference ``model`` (sharded over ranks)."""
    scorer = SequenceScorer(model, cfg.fast_logprobs, cfg.shared_prompt)
    scorer = scorer.to(common["device"]).eval()
    return score_sharded(
        scorer, pairs, batch_size=cfg.eval_batch_size, dist_info=dist_info, **common
    )


def reference_policy(
    ref_dir: Path,
    train_pairs: EncodedPairs,
    tokenizer,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    resume: bool,
    dist_info: DistInfo,
    common: dict[str, Any],
) -> tuple[nn.Module, list[float]]:
    """π_ref on the device and the SFT losses: the saved one on resume; else the base model,
    fine-tuned on the chosen responses when ``sft_epochs`` > 0, saved to ``ref_dir``."""
    device = common["device"]
    if resume and (ref_dir / "grpo.json").exists():
        return load_model(model_cfg, tokenizer, path=ref_dir).to(device), []
    model = load_model(model_cfg, tokenizer)
    sft_losses: list[float] = []
    if cfg.sft_epochs > 0:
        target = add_lora(model, model_cfg) if model_cfg.lora else model
        sft_losses = sft(target.to(device), train_pairs, cfg, dist_info=dist_info, **common)
        model = target.merge_and_unload() if model_cfg.lora else target
    if dist_info.main:
        extra = {"stage": "reference", "sft_losses": sft_losses}
        save_model(model.cpu(), tokenizer, ref_dir, extra=extra)
    dist_info.barrier()
    return model.to(device), sft_losses
