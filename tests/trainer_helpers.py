"""Shared pieces of the trainer tests: a tiny model config, small generated data, and a script
entry point that trains and can SIGKILL itself at a given step (for the kill-and-resume test).

    python tests/trainer_helpers.py DATA.jsonl OUT_DIR '{"train": {...}}' KILL_AT_STEP
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pandas as pd

TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 128}


def tiny_model_cfg(**overrides):
    from grpo.modeling import ModelConfig

    return ModelConfig(config=dict(TINY_GPT2), tokenizer_vocab_size=320, **overrides)


def small_pairs(n_pairs: int = 150, seed: int = 0, **kw) -> pd.DataFrame:
    from grpo.data import GeneratedConfig, generate

    return generate(GeneratedConfig(n_pairs=n_pairs, seed=seed, **kw))


def load_policy_state(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def main(argv: list[str]) -> int:
    from grpo.config import from_dict
    from grpo.data import read_pairs
    from grpo.trainer import TrainConfig, train

    data, out, params, kill_at = argv[0], argv[1], json.loads(argv[2]), int(argv[3])

    def log_fn(metrics: dict[str, float], step: int) -> None:
        if step == kill_at:  # a real, uncatchable kill: nothing after this point runs
            os.kill(os.getpid(), signal.SIGKILL)

    train(
        read_pairs(data),
        tiny_model_cfg(**params.get("model", {})),
        from_dict(TrainConfig, params["train"]),
        out,
        log_fn=log_fn,
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main(sys.argv[1:]))
