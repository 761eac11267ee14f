"""``train(..., reference_dir=...)``: several methods trained from one saved reference.

With no SFT the saved reference is the base model itself, so training from it must give exactly
what ``train`` gives when it builds the base model on its own; the reference log-probs are
scored on the first use and read back afterwards.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import grpo.reference as reference
from grpo.trainer import TrainConfig, encode_frame, prepare_reference, train
from tests.trainer_helpers import small_pairs, tiny_model_cfg


def _cfg(method: str, **kw) -> TrainConfig:
    return TrainConfig(
        method=method, batch_size=8, epochs=0, max_steps=3, eval_every=1, checkpoint_every=0,
        progress=False, seed=1, **kw,
    )  # fmt: skip


def test_training_from_a_saved_base_reference_equals_training_alone(tmp_path):
    pairs = small_pairs(120, seed=2)
    model_cfg = tiny_model_cfg()
    alone = train(pairs, model_cfg, _cfg("gr-dpo"), tmp_path / "alone", resume=False)
    ref = prepare_reference(pairs, model_cfg, _cfg("gr-dpo"), tmp_path / "shared")
    shared = train(pairs, model_cfg, _cfg("gr-dpo"), tmp_path / "run", resume=False,
                   reference_dir=ref)  # fmt: skip
    assert shared.reference_dir == ref
    assert [h["train/loss"] for h in shared.history] == [h["train/loss"] for h in alone.history]
    assert shared.final_alpha == alone.final_alpha
    info = json.loads((shared.model_dir / "grpo.json").read_text())
    assert info["reference_dir"] == str(ref)
    assert not (tmp_path / "run" / "reference").exists()  # no copy of the shared reference


def test_the_reference_is_scored_once_for_several_methods(tmp_path, monkeypatch):
    calls = []
    real = reference.score_reference

    def counting(model, pairs, *args, **kwargs):
        calls.append(len(pairs))
        return real(model, pairs, *args, **kwargs)

    monkeypatch.setattr(reference, "score_reference", counting)
    pairs = small_pairs(120, seed=2)
    n_train = int((pairs["split"] == "train").sum())
    n_val = int((pairs["split"] == "validation").sum())
    model_cfg = tiny_model_cfg()
    ref = prepare_reference(pairs, model_cfg, _cfg("dpo", sft_epochs=1), tmp_path / "seed")
    first = train(pairs, model_cfg, _cfg("dpo"), tmp_path / "dpo", resume=False, reference_dir=ref)
    assert calls == [n_train, n_val]
    second = train(pairs, model_cfg, _cfg("gr-dpo"), tmp_path / "gr", resume=False,
                   reference_dir=ref)  # fmt: skip
    assert calls == [n_train, n_val]  # read from reference/logps, not scored again
    # both started from the reference whose cached log-probs they used: at the first step the
    # policy equals the reference, every margin is 0 and every group's batch loss is log 2
    # (float32 log-probs of a few tokens: |h| below 1e-5, so |ℓ − log 2| < β|h|/2 < 1e-6)
    for result in (first, second):
        step = result.history[0]
        losses = [v for k, v in step.items() if k.startswith("train/group_loss/")]
        assert losses and all(v == pytest.approx(math.log(2), abs=1e-6) for v in losses)
    assert len(list((ref / reference.LOGPS_DIR).glob("*.safetensors"))) == 2


def test_cached_log_probs_equal_fresh_scores(tmp_path):
    from grpo.distributed import DistInfo
    from grpo.modeling import load_pretrained

    pairs = small_pairs(60, seed=4)
    model_cfg = tiny_model_cfg()
    ref = prepare_reference(pairs, model_cfg, _cfg("dpo"), tmp_path / "seed")
    model, tok, _ = load_pretrained(ref, "cpu")
    encoded = encode_frame(pairs, tok, model_cfg)
    kwargs = {"dist_info": DistInfo(), "pad_token_id": tok.pad_token_id,
              "padding_side": "right", "device": torch.device("cpu"), "dtype": "auto"}  # fmt: skip
    cache = ref / reference.LOGPS_DIR
    scored = reference.reference_logps(model, encoded, _cfg("dpo"), cache=cache, **kwargs)
    read = reference.reference_logps(model, encoded, _cfg("dpo"), cache=cache, **kwargs)
    fresh = reference.reference_logps(model, encoded, _cfg("dpo"), cache=None, **kwargs)
    for a, b, c in zip(scored, read, fresh, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    other = encode_frame(pairs.iloc[:10], tok, model_cfg)  # other pairs: another file
    reference.reference_logps(model, other, _cfg("dpo"), cache=cache, **kwargs)
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_prepare_reference_needs_training_pairs():
    pairs = small_pairs(60, seed=4)
    with pytest.raises(ValueError, match="split == 'train'"):
        prepare_reference(pairs[pairs["split"] != "train"], tiny_model_cfg(), _cfg("dpo"), "x")
