"""Two processes under torchrun (gloo, CPU) train exactly what one process trains on the same
global batches: same parameters and the same α on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from grpo.config import from_dict
from grpo.data import write_pairs
from grpo.trainer import TrainConfig, train
from tests.trainer_helpers import TINY_GPT2, load_policy_state, small_pairs, tiny_model_cfg

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {
    "method": "gr-ipo", "beta": 0.5, "eta_alpha": 0.5, "batch_size": 8, "max_steps": 6,
    "epochs": 0, "eval_every": 2, "sft_epochs": 1, "sft_batch_size": 8, "lr": 3e-3,
    "checkpoint_every": 0, "progress": False,
}  # fmt: skip


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    df = small_pairs(150, seed=2)
    data = write_pairs(df, tmp_path / "pairs.jsonl")
    params = tmp_path / "params.yaml"
    model = {"config": TINY_GPT2, "tokenizer_vocab_size": 320}
    params.write_text(yaml.safe_dump({"model": model, "train": {**TRAIN, "grad_accum": 1}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "flows.cli", "train", "--data", str(data), "--params", str(params),
        "--out", str(tmp_path / "ddp"), "--json", str(tmp_path / "ddp.json"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ddp = json.loads((tmp_path / "ddp.json").read_text())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one process, the same global batches as 2 micro-batches of 4
        cfg = from_dict(TrainConfig, {**TRAIN, "grad_accum": 2})
        single = train(df, tiny_model_cfg(), cfg, tmp_path / "single", resume=False)
    finally:
        torch.set_num_threads(threads)

    assert ddp["steps"] == single.steps == 6
    assert ddp["alpha"] == pytest.approx(single.alpha, abs=1e-9, rel=1e-6)
    assert single.alpha != pytest.approx([1 / 3] * 3, abs=1e-3)
    a, b = load_policy_state(ddp["model_dir"]), load_policy_state(single.model_dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    before = load_policy_state(single.reference_dir)
    assert any(not torch.equal(before[k], b[k]) for k in b)
    for h1, h2 in zip(ddp["history"], single.history, strict=True):
        assert h1["train/loss"] == pytest.approx(h2["train/loss"], rel=1e-5)
