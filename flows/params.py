"""The one way to read the pipeline's parameters: project root, ``params.yaml``, overrides, types.

Every command goes through here::

    root = find_root()                                   # nearest folder with params.yaml/dvc.yaml/.git
    params = load_params(params_path("params.yaml", root), ["train.lr=1e-4"])
    cfgs = resolve(params)                               # Configs: one typed config per section
    register_cfg = section(params, "register")           # or just one section (cheap imports)

``load_params``: an absent *default* file (named ``params.yaml``) means the embedded defaults;
any other missing file is an error. Unknown sections fail, naming the allowed ones. Errors in a
section name where it came from (``params.yaml:train``); :func:`where` is the one place that
wording is built. This module imports neither Prefect nor torch: the config classes are imported
when a section is resolved, so ``grpo audit`` never loads the training stack.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpo.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict

if TYPE_CHECKING:
    from grpo.data.sources import DataConfig
    from grpo.modeling import ModelConfig
    from grpo.trainer import TrainConfig
    from tasks.evaluate import EvaluateConfig
    from tasks.register import RegisterConfig
    from tasks.validate import ValidateConfig

DEFAULT_FILE = "params.yaml"
ROOT_MARKERS = ("params.yaml", "dvc.yaml", ".git")

# params.yaml section -> (module, class) of its typed config; imported only when resolved.
SECTION_CLASSES: dict[str, tuple[str, str]] = {
    "data": ("grpo.data.sources", "DataConfig"),
    "validate": ("tasks.validate", "ValidateConfig"),
    "model": ("grpo.modeling", "ModelConfig"),
    "train": ("grpo.trainer", "TrainConfig"),
    "evaluate": ("tasks.evaluate", "EvaluateConfig"),
    "register": ("tasks.register", "RegisterConfig"),
}
SECTIONS = tuple(SECTION_CLASSES)


@dataclass
class Configs:
    """Every stage's typed config, built from one params dict by :func:`resolve`."""

    data: DataConfig
    validate: ValidateConfig
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    register: RegisterConfig

    def resolved(self) -> dict[str, Any]:
        """Plain dicts of every section after defaults and overrides (what MLflow logs)."""
        return {name: to_dict(getattr(self, name)) for name in SECTIONS}


def find_root(start: str | Path | None = None) -> Path:
    """The project root: the nearest folder (from ``start`` or the CWD upwards) holding
    ``params.yaml``, ``dvc.yaml`` or ``.git``; the CWD itself when there is none."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if any((folder / marker).exists() for marker in ROOT_MARKERS):
            return folder
    return here


def params_path(path: str | Path, root: Path) -> Path:
    """``path`` as given when absolute or present from the CWD, else relative to ``root``."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p.resolve()
    return root / p


def load_params(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """The params file (``None`` or an absent ``params.yaml``: the embedded defaults) with
    ``section.key=value`` overrides applied; unknown sections raise :class:`ConfigError`."""
    params: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if file.exists():
            params = load_yaml(file)
        elif file.name != DEFAULT_FILE:
            raise ConfigError(f"{path}: no such params file")
    _check_sections(params, f"{path}")
    params = apply_overrides(params, list(overrides))
    _check_sections(params, "--set")
    return params


def _check_sections(params: dict[str, Any], origin: str) -> None:
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{origin}: unknown section(s) {unknown}; allowed: {list(SECTIONS)}")


def where(name: str, origin: str = DEFAULT_FILE) -> str:
    """How an error names a section: ``params.yaml:train``."""
    return f"{origin}:{name}"


def section(params: dict[str, Any], name: str, origin: str = DEFAULT_FILE) -> Any:
    """The typed config of one section (unknown keys and bad values raise ``ConfigError``)."""
    if name not in SECTION_CLASSES:
        raise ConfigError(f"unknown section {name!r}; allowed: {list(SECTIONS)}")
    module, cls = SECTION_CLASSES[name]
    config_class = getattr(importlib.import_module(module), cls)
    return from_dict(config_class, params.get(name), where=where(name, origin))


def resolve(params: dict[str, Any], origin: str = DEFAULT_FILE) -> Configs:
    """Typed configs of every section."""
    _check_sections(params, origin)
    return Configs(**{name: section(params, name, origin) for name in SECTIONS})


def load_configs(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Configs:
    """:func:`resolve` of :func:`load_params`: what the pipeline commands and the flow call."""
    return resolve(load_params(path, overrides))
