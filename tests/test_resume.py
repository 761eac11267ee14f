"""Kill-and-resume: a run SIGKILLed after a checkpoint, then resumed, ends exactly where an
uninterrupted run ends (parameters, α, history)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo.checkpoint import checkpoint_dirs
from grpo.config import from_dict
from grpo.data import write_pairs
from grpo.trainer import TrainConfig, train
from tests.trainer_helpers import load_policy_state, small_pairs, tiny_model_cfg

ROOT = Path(__file__).resolve().parents[1]
# η_α = log 2: a step of exactly η·L̂ in log α (the α step divides by DPO's ℓ₀ = log 2), a
# trajectory on which the schedule cuts the LR before the kill, so its state is tested too.
TRAIN = {
    "method": "gr-dpo", "eta_alpha": math.log(2.0), "batch_size": 8, "grad_accum": 2, "max_steps": 10,
    "epochs": 0, "eval_every": 3, "checkpoint_every": 4, "sft_epochs": 1, "lr": 1e-2,
    "scheduler_patience": 0, "progress": False,
}  # fmt: skip


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path):
    df = small_pairs(150, seed=1)
    data = write_pairs(df, tmp_path / "pairs.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "trainer_helpers.py"), str(data),
         str(tmp_path / "resumed"), json.dumps({"train": TRAIN}), "6"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [p.name for p in checkpoint_dirs(tmp_path / "resumed")] == ["step-0000004"]
    assert not (tmp_path / "resumed" / "policy").exists()  # died before the end

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed process
    try:
        cfg = from_dict(TrainConfig, TRAIN)
        resumed = train(df, tiny_model_cfg(), cfg, tmp_path / "resumed", resume=True)
        straight = train(df, tiny_model_cfg(), cfg, tmp_path / "straight", resume=False)
    finally:
        torch.set_num_threads(threads)

    assert resumed.steps == straight.steps == 10
    assert resumed.alpha == straight.alpha
    assert resumed.alpha != pytest.approx([1 / 3] * 3)
    a, b = load_policy_state(resumed.model_dir), load_policy_state(straight.model_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    untimed = [[{k: v for k, v in h.items() if k != "train/step_time_s"} for h in r.history]
               for r in (resumed, straight)]  # fmt: skip
    assert untimed[0] == untimed[1]
    lr_cuts = [h for h in straight.history if h.get("train/lr_cut")]
    assert lr_cuts, "the schedule should have cut the LR (so its state is part of the test)"


def test_resume_refuses_a_changed_config(tmp_path):
    from grpo.checkpoint import check_resumable

    saved = {"model": {"n": 1}, "train": {"lr": 0.01, "max_steps": 10}, "groups": ["a", "b"]}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    # training longer is a resume; the same config is a resume
    check_resumable(tmp_path, {**saved, "train": {"lr": 0.01, "max_steps": 20}})
    check_resumable(tmp_path, saved)
    # the CPU thread count is how fast, not what: a resumed run may use other threads
    check_resumable(tmp_path, {**saved, "model": {"n": 1, "threads": 2}})
    with pytest.raises(ValueError, match=r"model\.n: 1 -> 2"):
        check_resumable(tmp_path, {**saved, "model": {"n": 2}})
    with pytest.raises(ValueError, match=r"train\.lr: 0\.01 -> 0\.02"):
        check_resumable(tmp_path, {**saved, "train": {"lr": 0.02, "max_steps": 10}})
    with pytest.raises(ValueError, match=r"groups: \['a', 'b'\] -> \['a', 'c'\]"):
        check_resumable(tmp_path, {**saved, "groups": ["a", "c"]})


class _RunsCode:
    """A pickle payload: unpickling it creates ``marker`` (any code could run instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


SHORT = {
    "method": "gr-dpo", "batch_size": 8, "epochs": 0, "max_steps": 2, "eval_every": 0,
    "checkpoint_every": 1, "keep_checkpoints": 5, "lr": 1e-2, "progress": False,
}  # fmt: skip


def _short_run(out: Path, **overrides):
    cfg = from_dict(TrainConfig, {**SHORT, **overrides})
    return train(small_pairs(60, seed=4), tiny_model_cfg(), cfg, out)


def test_checkpoint_files_load_without_unpickling(tmp_path):
    _short_run(tmp_path)
    ckpt = checkpoint_dirs(tmp_path)[-1]
    for path in ckpt.glob("*.pt"):  # torch files: tensors and plain values only
        torch.load(path, weights_only=True)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["loop"]["position"] == 2
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary folder left


@pytest.mark.parametrize("victim", ["optimizer.pt", "scheduler.pt"])
def test_resume_refuses_a_checkpoint_that_runs_code(tmp_path, victim):
    from grpo.checkpoint import CheckpointError

    _short_run(tmp_path)
    marker = tmp_path / "code-ran"
    path = checkpoint_dirs(tmp_path)[-1] / victim
    torch.save({"state": _RunsCode(marker)}, path)
    torch.load(path, weights_only=False)  # the payload is real: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match=rf"{victim}: holds objects other than tensors"):
        _short_run(tmp_path, max_steps=3)
    assert not marker.exists()


def test_resume_refuses_the_old_pickled_format(tmp_path):
    from grpo.checkpoint import CheckpointError

    old = tmp_path / "checkpoints" / "step-0000004"
    old.mkdir(parents=True)
    torch.save({"step": 4}, old / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="earlier pickled format"):
        _short_run(tmp_path)
    assert _short_run(tmp_path / "fresh").steps == 2


def test_a_crash_while_saving_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    import grpo.checkpoint

    _short_run(tmp_path, max_steps=1)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-0000001"]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(grpo.checkpoint, "write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        _short_run(tmp_path, max_steps=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-0000001"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000001"]
