"""The one way to read the pipeline's parameters: project root, ``params.yaml``, overrides, types.

Every command goes through here::

    root = find_root()                                   # nearest folder with params.yaml/dvc.yaml/.git
    params = load_params(params_path("params.yaml", root), ["train.lr=1e-4"])
    cfgs = resolve(params)                               # Configs: one typed config per section
    register_cfg = section(params, "register")           # or just one section (cheap imports)

``load_params``: an absent *default* file (named ``params.yaml``) means the embedded defaults;
any other missing file is an error. Unknown sections and keys fail there, before any config class
is imported (the keys are read from the classes' source): a typo costs a fraction of a second,
not torch's import. Every error names where the value came from, the ``--set`` that wrote it
(``--set train.lrr=1``) or the file's section (``params.yaml:train``, built by :func:`where`),
and an unknown name comes with the closest valid one (``did you mean train.lr?``). This module
imports neither Prefect nor torch: the config classes are imported when a section is resolved,
so ``grpo audit`` never loads the training stack.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import re
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpo.config import ConfigError, apply_overrides, from_dict, load_yaml, parse_override, to_dict

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
    ``section.key=value`` overrides applied.

    Unknown sections and keys raise :class:`ConfigError` here, before any config class (and so
    torch) is imported: the message names where the key came from (``--set train.lrr=1`` or
    ``params.yaml:train``) and the closest valid name.
    """
    params: dict[str, Any] = {}
    origin = DEFAULT_FILE
    if path is not None:
        file = Path(path)
        origin = display_path(file)
        if file.exists():
            params = load_yaml(file)
        elif file.name != DEFAULT_FILE:
            raise ConfigError(f"{path}: no such params file")
    check_keys(params, origin)
    params = apply_overrides(params, list(overrides))
    check_keys(params, origin, overrides)
    return params


def display_path(path: Path) -> str:
    """``path`` relative to the CWD when inside it (``params.yaml``), else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def check_keys(
    params: dict[str, Any], origin: str = DEFAULT_FILE, overrides: Sequence[str] = ()
) -> None:
    """Raise :class:`ConfigError` for the first unknown section or key (nested source sections
    such as ``data.generated`` included), naming its origin and the closest valid name."""
    for name in params:
        if name not in SECTION_CLASSES:
            raise ConfigError(
                f"{origin_of([name], origin, overrides)}: unknown section {name!r}"
                f"{suggestion(name, SECTIONS)} (sections: {', '.join(SECTIONS)})"
            )
        _check_section_keys(params[name], [name], config_fields(name), origin, overrides)


def _check_section_keys(
    values: Any, path: list[str], fields: dict[str, Any], origin: str, overrides: Sequence[str]
) -> None:
    if not isinstance(values, dict):
        return
    for key, value in values.items():
        if key not in fields:
            dotted = ".".join(path)
            raise ConfigError(
                f"{origin_of([*path, key], origin, overrides)}: unknown key {key!r} in "
                f"{dotted}{suggestion(key, fields, prefix=dotted + '.')} ({dotted} takes: "
                f"{', '.join(sorted(fields))})"
            )
        if fields[key] is not None:  # a nested config (a data source's section)
            nested = {f.name: None for f in dataclasses.fields(fields[key])}
            _check_section_keys(value, [*path, key], nested, origin, overrides)


def origin_of(path: Sequence[str], origin: str, overrides: Sequence[str] = ()) -> str:
    """Where the value at ``path`` came from: the last ``--set`` that wrote it (or a key inside
    it), else the params file's section (``params.yaml:train``)."""
    for text in reversed(overrides):
        target, _ = parse_override(text)
        depth = min(len(target), len(path))
        if target[:depth] == list(path[:depth]):
            return f"--set {text}"
    return where(path[0], origin)


def suggestion(word: str, names: Iterable[str], prefix: str = "") -> str:
    """``"; did you mean train.lr?"`` for the closest of ``names`` (difflib), else ``""``."""
    close = difflib.get_close_matches(str(word), [str(n) for n in names], n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


@functools.cache
def config_fields(name: str) -> dict[str, Any]:
    """A section's keys → the nested config class of a key that has one (else None).

    Read from the class's source when the module defines it literally, so checking keys never
    imports the module (``grpo.trainer`` imports torch); a class built at import time
    (``DataConfig``: one field per registered source) is imported.
    """
    module, cls = SECTION_CLASSES[name]
    literal = literal_fields(module, cls)
    if literal is not None:
        return dict.fromkeys(literal)
    config = getattr(importlib.import_module(module), cls)
    hints = typing.get_type_hints(config)
    return {
        f.name: hints[f.name] if dataclasses.is_dataclass(hints.get(f.name)) else None
        for f in dataclasses.fields(config)
    }


def literal_fields(module: str, cls: str) -> list[str] | None:
    """The annotated fields of class ``cls`` (and its bases in the same module) as written in
    ``module``'s source; None when the module does not define the class in a class statement."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    if cls not in classes:
        return None

    def fields(node: ast.ClassDef) -> list[str]:
        inherited = [f for b in node.bases if isinstance(b, ast.Name) and b.id in classes
                     for f in fields(classes[b.id])]  # fmt: skip
        own = [
            stmt.target.id
            for stmt in node.body
            if isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and "ClassVar" not in ast.unparse(stmt.annotation)
        ]
        return [*inherited, *(f for f in own if f not in inherited)]

    return fields(classes[cls])


def where(name: str, origin: str = DEFAULT_FILE) -> str:
    """How an error names a section: ``params.yaml:train``."""
    return f"{origin}:{name}"


def section(
    params: dict[str, Any], name: str, origin: str = DEFAULT_FILE, overrides: Sequence[str] = ()
) -> Any:
    """The typed config of one section (unknown keys and bad values raise ``ConfigError``; a bad
    value set by one of ``overrides`` is blamed on that ``--set``)."""
    if name not in SECTION_CLASSES:
        raise ConfigError(f"unknown section {name!r}{suggestion(name, SECTIONS)}")
    module, cls = SECTION_CLASSES[name]
    config_class = getattr(importlib.import_module(module), cls)
    try:
        return from_dict(config_class, params.get(name), where=where(name, origin))
    except ConfigError as exc:
        raise ConfigError(blame(str(exc), name, origin, overrides)) from None


def blame(message: str, name: str, origin: str, overrides: Sequence[str]) -> str:
    """``message`` (``params.yaml:train: method: ...``) with its origin replaced by the
    ``--set`` of this section whose key the message names, when there is one."""
    prefix = where(name, origin)
    if not message.startswith(prefix):
        return message
    rest = message[len(prefix) :]
    for text in reversed(overrides):
        target, _ = parse_override(text)
        if (
            target[0] == name
            and len(target) > 1
            and re.search(rf"\b{re.escape(target[1])}\b", rest)
        ):
            return f"--set {text}{rest.removeprefix('.' + target[1])}"
    return message


def resolve(
    params: dict[str, Any], origin: str = DEFAULT_FILE, overrides: Sequence[str] = ()
) -> Configs:
    """Typed configs of every section."""
    check_keys(params, origin, overrides)
    return Configs(**{name: section(params, name, origin, overrides) for name in SECTIONS})


def load_configs(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Configs:
    """:func:`resolve` of :func:`load_params`: what the pipeline commands and the flow call."""
    origin = display_path(Path(path)) if path is not None else DEFAULT_FILE
    return resolve(load_params(path, overrides), origin, overrides)
