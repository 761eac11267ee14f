"""Checkpoints: everything a run needs to continue exactly where it stopped, and nothing that
runs code when read.

A checkpoint folder ``checkpoints/step-NNNNNNN`` holds

- ``policy.safetensors``: the policy's parameters;
- ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()`` (tensors, numbers, strings, lists and
  dicts only), read back with ``torch.load(weights_only=True)``, which refuses any other object;
- ``trainer_state.safetensors``: the other tensors (log α, the data order and its generator, the
  torch RNG states);
- ``trainer_state.json``: the rest (step, group-weight settings, the loop's counters, best value
  and history, the python and numpy RNG states), each tensor replaced by ``{"tensor": name}``;
- ``config.json``: the resolved config the run was started with.

Nothing is unpickled, so a tampered checkpoint cannot execute code. A checkpoint is written into
a temporary folder, each file flushed to disk, ``trainer_state.json`` last (its presence marks a
complete checkpoint), then renamed into place, so a crash never leaves a half checkpoint that
looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from grpo.io import read_json, write_json

if TYPE_CHECKING:
    from grpo.trainer import PreferenceTrainer

# Settings a resumed run may change: how long to train and how to report, not what is computed.
RESUMABLE_CHANGES = frozenset(
    {
        "train.epochs", "train.max_steps", "train.progress", "train.checkpoint_every",
        "train.keep_checkpoints", "train.eval_batch_size", "model.threads",
    }
)  # fmt: skip
STATE_JSON = "trainer_state.json"  # written last: its presence marks a complete checkpoint
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"  # the pickled format of earlier versions, no longer read


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unsafe, of an older format, or of another config."""


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) global generators' states, as JSON values and tensors."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    keys = np.asarray(npy["keys"], dtype=np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def split_tensors(value: Any, tensors: dict[str, torch.Tensor], name: str = "") -> Any:
    """``value`` (dicts with string keys, lists, tuples, JSON scalars and tensors) as JSON values,
    each tensor moved into ``tensors`` under its path (``"loop.permutation"``) and replaced by
    ``{"tensor": path}``. Tuples become lists."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{name or 'state'}: only string keys can be stored, got {list(value)}")
        return {
            k: split_tensors(v, tensors, f"{name}.{k}" if name else k) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [split_tensors(v, tensors, f"{name}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{name}: {type(value).__name__} cannot be stored in a checkpoint")


def join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(value, dict):
        if value.keys() == {"tensor"}:
            return tensors[value["tensor"]]
        return {k: join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    return value


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Completed checkpoints, oldest first. Raises :class:`CheckpointError` on a checkpoint of
    the earlier pickled format, which is no longer read."""
    root = out_dir / "checkpoints"
    if not root.exists():
        return []
    legacy = sorted(p for p in root.glob("step-*") if (p / LEGACY_STATE).exists())
    if legacy:
        raise CheckpointError(
            f"{legacy[-1]}: a checkpoint in the earlier pickled format ({LEGACY_STATE}), which is "
            "no longer loaded (unpickling can run code); start over (--no-resume / "
            "resume=False) or delete the checkpoints folder"
        )
    return sorted(p for p in root.glob("step-*") if (p / STATE_JSON).exists())


def save_checkpoint(
    trainer: PreferenceTrainer, loop: dict[str, Any], out_dir: Path, config: dict
) -> Path:
    """Policy, optimizer, scheduler, group weights, loop state, RNG states and config of
    ``trainer`` at its current step, atomically. Keeps the newest ``keep_checkpoints``."""
    from safetensors.torch import save_file
    from safetensors.torch import save_model as save_safetensors

    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{trainer.step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        save_safetensors(trainer.policy, str(tmp / "policy.safetensors"))
        torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
        write_json(tmp / "config.json", config, sort_keys=True)
        tensors: dict[str, torch.Tensor] = {}
        state = split_tensors(
            {"step": trainer.step, "group_weights": trainer.weights.state_dict(), "loop": loop,
             "rng": rng_state()},
            tensors,
        )  # fmt: skip
        save_file(tensors, str(tmp / STATE_TENSORS))
        for path in tmp.iterdir():
            _fsync(path)
        write_json(tmp / STATE_JSON, state)  # last: marks the checkpoint complete
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_dirs(out_dir)[: -trainer.cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(trainer: PreferenceTrainer, path: Path) -> dict[str, Any]:
    """Restore ``trainer`` from ``path``; returns the loop state. RNG states are restored too.
    Raises :class:`CheckpointError` on a file that holds anything but tensors and plain values."""
    from safetensors.torch import load_file
    from safetensors.torch import load_model as load_safetensors

    load_safetensors(trainer.policy, str(path / "policy.safetensors"), device=str(trainer.device))
    trainer.optimizer.load_state_dict(
        _load_plain(path / "optimizer.pt", map_location=trainer.device)
    )
    trainer.scheduler.load_state_dict(_load_plain(path / "scheduler.pt"))
    state = join_tensors(read_json(path / STATE_JSON), load_file(str(path / STATE_TENSORS)))
    trainer.step = int(state["step"])
    trainer.weights.load_state_dict(state["group_weights"])
    set_rng_state(state["rng"])
    return state["loop"]


def _load_plain(path: Path, **kwargs: Any) -> Any:
    """``torch.load`` restricted to tensors and plain values: a pickled object is refused, not
    built (so code a tampered file carries never runs)."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: holds objects other than tensors and plain values; refusing to unpickle it "
            f"({first})"
        ) from None


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` (an existing ``final`` is moved aside first, removed after)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    with contextlib.suppress(OSError):
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    shutil.rmtree(old, ignore_errors=True)


def check_resumable(checkpoint: Path, resolved: dict[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` under a config that changes what is computed.

    The checkpoint's ``config.json`` must equal ``resolved`` except for :data:`RESUMABLE_CHANGES`
    (``section.key`` names); the error names every differing key (start over with ``resume=False``).
    """
    saved = read_json(checkpoint / "config.json")
    current = json.loads(json.dumps(resolved))  # same JSON types as the saved copy
    diffs = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section), current.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new)):
                exempt = f"{section}.{key}" in RESUMABLE_CHANGES
                if not exempt and old.get(key) != new.get(key):
                    diffs.append(f"{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
        elif old != new:
            diffs.append(f"{section}: {old!r} -> {new!r}")
    if diffs:
        raise CheckpointError(
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
