"""End to end: with a minority whose preferences conflict with the majority's, GR-DPO serves the
worst group better than DPO under the same budget and seed (the paper's claim, on a tiny model).

Data: the generated dataset (``grpo.data.generated``) with 3 groups, two answer options and the
minority ("Island") holding the mirror view on every topic (conflict = 1), restricted to the
questions on which the majority answers "A" (so the minority answers "B"): one clean conflict,
the group named in the prompt. Under the pooled loss the majority's pairs dominate; GR-DPO's α
moves toward the minority until the policy answers by group. Both runs select their checkpoint
on validation (worst group for GR-DPO, average for DPO), as in the paper. Numbers measured while
developing are in docs/training.md ("End-to-end check").
"""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from grpo.data import GeneratedConfig, generate
from grpo.evaluation import evaluate_pairs
from grpo.modeling import ModelConfig, load_pretrained
from grpo.trainer import TrainConfig, train

SEED = int(os.environ.get("GRPO_E2E_SEED", "0"))
MINORITY = "Island"
DATA = GeneratedConfig(
    groups=("Northland", "Southland", MINORITY),
    shares=(0.47, 0.47, 0.06),
    n_pairs=2400,
    n_options=2,
    conflict=1.0,
    seed=SEED,
)
MODEL = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 256}


def conflict_pairs() -> pd.DataFrame:
    df = generate(DATA)
    majority_says_a = ((df["group"] != MINORITY) & (df["chosen"] == "A")) | (
        (df["group"] == MINORITY) & (df["chosen"] == "B")
    )
    return df[majority_says_a].reset_index(drop=True)


def run(method: str, df: pd.DataFrame, out) -> dict:
    cfg = TrainConfig(
        method=method, beta=0.1, eta_alpha=0.05, lr=1e-3, batch_size=16, epochs=0,
        max_steps=150, eval_every=10, early_stop_patience=0, scheduler_patience=100,
        keep_best=True, checkpoint_every=0, seed=SEED, progress=False,
    )  # fmt: skip
    result = train(df, ModelConfig(config=dict(MODEL), init_seed=SEED), cfg, out)
    policy, tok, _ = load_pretrained(result.model_dir, "cpu")
    reference, _, _ = load_pretrained(result.reference_dir, "cpu")
    held_out = df[df["split"] != "train"].reset_index(drop=True)
    return {
        "eval": evaluate_pairs(policy, reference, tok, held_out, loss="dpo", beta=0.1),
        "alpha": dict(zip(result.groups, result.alpha, strict=True)),
    }


@pytest.mark.slow
def test_gr_dpo_lifts_the_worst_group(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster, and steadier on a busy machine
    try:
        df = conflict_pairs()
        dpo = run("dpo", df, tmp_path / "dpo")
        gr = run("gr-dpo", df, tmp_path / "gr")
    finally:
        torch.set_num_threads(threads)
    for name, r in (("dpo", dpo), ("gr-dpo", gr)):
        acc = {g: round(v["reward_accuracy"], 3) for g, v in r["eval"]["groups"].items()}
        print(name, "held-out reward accuracy", acc, "alpha", r["alpha"])
    dpo_worst = dpo["eval"]["worst_group"]["reward_accuracy"]
    gr_worst = gr["eval"]["worst_group"]["reward_accuracy"]
    # DPO serves the majority and fails the minority ...
    assert dpo_worst["group"] == MINORITY
    assert dpo["eval"]["groups"]["Northland"]["reward_accuracy"] > 0.9
    # ... GR-DPO's worst group is clearly better off, and α moved toward the minority.
    assert gr_worst["value"] >= dpo_worst["value"] + 0.1
    assert gr["alpha"][MINORITY] > 0.4
