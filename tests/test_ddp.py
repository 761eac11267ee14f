"""Two processes under torchrun (gloo, CPU) train exactly what one process trains on the same
global batches: same parameters and the same α on every rank. Every collective's tensor is on
the device its backend needs (checked on CPU by recording the calls)."""

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


def test_collective_device_follows_the_backend():
    from grpo.distributed import collective_device

    assert collective_device("nccl", 3) == torch.device("cuda", 3)
    assert collective_device("gloo", 3) == torch.device("cpu")


def test_all_reduce_hands_the_collective_a_tensor_on_its_device(monkeypatch):
    """NCCL refuses CPU tensors: a CPU tensor must reach ``dist.all_reduce`` on the DistInfo's
    device (here ``meta``, standing in for a GPU on a machine without one)."""
    import torch.distributed as dist

    from grpo.distributed import DistInfo

    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: seen.append(tensor.device))
    info = DistInfo(rank=0, world_size=2, device=torch.device("meta"))
    out = info.all_reduce(torch.ones(3, dtype=torch.float64))
    assert seen == [torch.device("meta")] and out.device == torch.device("meta")
    one = DistInfo()  # one process: no collective, the tensor comes back as it was
    assert one.all_reduce(t := torch.ones(2)) is t and len(seen) == 1


@pytest.fixture
def one_process_group():
    """A real gloo group of one process, so DDP, no_sync and barriers run as under torchrun."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_every_collective_goes_through_dist_info(one_process_group, monkeypatch):
    """SFT, reference scoring, the preference step and validation all-reduce only through
    ``DistInfo.all_reduce`` (which puts the tensor on the backend's device, test above)."""
    import sys

    import torch.distributed as dist

    from grpo.distributed import DistInfo, score_sharded
    from grpo.logprobs import SequenceScorer
    from grpo.modeling import load_model, load_tokenizer
    from grpo.sft import sft
    from grpo.trainer import PreferenceTrainer, encode_frame, group_index

    calls: list[tuple[str, bool]] = []

    def record(name):
        def collective(tensor, *args, **kwargs):
            via_helper = sys._getframe(1).f_code is DistInfo.all_reduce.__code__
            calls.append((name, via_helper))  # one process: the sum is the tensor itself

        return collective

    for name in ("all_reduce", "reduce", "broadcast", "all_gather", "reduce_scatter"):
        monkeypatch.setattr(dist, name, record(name))
    df = small_pairs(40, seed=5)
    mcfg = tiny_model_cfg()
    train_df = df[df.split == "train"].reset_index(drop=True)
    val_df = df[df.split == "validation"].reset_index(drop=True)
    tok = load_tokenizer(mcfg, train_df["prompt"].tolist() + train_df["chosen"].tolist())
    pairs, val_pairs = encode_frame(train_df, tok, mcfg), encode_frame(val_df, tok, mcfg)
    names = sorted(train_df["group"].unique())
    # two "ranks" in a group of one: rank 0's share of every batch, collectives recorded
    info = DistInfo(rank=0, world_size=2, device=torch.device("cpu"))
    cfg = from_dict(TrainConfig, {**TRAIN, "sft_batch_size": 8, "batch_size": 8})
    common = {"pad_token_id": tok.pad_token_id, "padding_side": "right", "dtype": "float32"}
    model = load_model(mcfg, tok)
    phases = {}
    sft(model, pairs, cfg, device=torch.device("cpu"), dist_info=info, **common)
    phases["sft"], calls[:] = list(calls), []
    scorer = SequenceScorer(model).eval()
    ref = score_sharded(
        scorer, pairs, batch_size=8, device=torch.device("cpu"), dist_info=info, **common
    )
    val_ref = score_sharded(
        scorer, val_pairs, batch_size=8, device=torch.device("cpu"), dist_info=info, **common
    )
    phases["reference"], calls[:] = list(calls), []
    trainer = PreferenceTrainer(
        model, pairs, group_index(train_df, names, "train"), names, cfg, reference_logps=ref,
        val_pairs=val_pairs, val_groups=group_index(val_df, names, "validation"),
        val_reference_logps=val_ref, dist_info=info, **common,
    )  # fmt: skip
    trainer.train_step(torch.arange(8))
    phases["train_step"], calls[:] = list(calls), []
    trainer.validate()
    phases["validate"] = list(calls)
    for phase, seen in phases.items():
        assert seen, f"{phase}: no collective (the check would be empty)"
        assert all(name == "all_reduce" and via for name, via in seen), (phase, seen)
