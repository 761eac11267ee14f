"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint folder ``checkpoints/step-NNNNNNN`` holds the policy (safetensors), the optimizer and
scheduler states, the group weights α, the step, the training loop's state (data order, best
validation value, history), every random generator's state and the resolved config. It is
written to a temporary folder renamed into place, ``trainer_state.pt`` last, so a crash never
leaves a half checkpoint that looks complete.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from grpo.trainer import PreferenceTrainer

# Settings a resumed run may change: how long to train and how to report, not what is computed.
RESUMABLE_CHANGES = frozenset(
    {"epochs", "max_steps", "progress", "checkpoint_every", "keep_checkpoints", "eval_batch_size"}
)


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) global generators' states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
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
    """Policy (safetensors), optimizer, scheduler, α, loop state, RNG and config; atomically.
    Keeps the newest ``keep_checkpoints``."""
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
        "rng": rng_state(),
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
    set_rng_state(state["rng"])
    return state["loop"]


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


def save_trainable(model: nn.Module, path: Path) -> None:
    """The trainable parameters of ``model`` (all, or the LoRA adapters) as safetensors, atomically."""
    from safetensors.torch import save_file

    state = {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


def load_trainable(model: nn.Module, path: Path, device: torch.device) -> None:
    """Copy the parameters :func:`save_trainable` wrote back into ``model``."""
    from safetensors.torch import load_file

    state = load_file(str(path), device=str(device))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
