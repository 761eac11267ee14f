"""The one place that names metrics, and parses the names back.

The scheme (stable: MLflow stores, DVC metrics files and dashboards depend on it)::

    eval/group/<group>/<metric>        one group's value on the evaluated split
    eval/worst_group/<metric>          the worst group's value (max for losses, min otherwise)
    eval/overall/<metric>              all evaluated pairs pooled
    eval/group_gap/<metric>            best group's value minus the worst group's
    train/loss  train/lr  train/eta_alpha  train/step_time_s  train/lr_cut
    train/effective_groups             exp(entropy of α): K when uniform, 1 when one-hot
    train/group_loss/<group>           the step's mean loss of the group's pairs
    train/group_weight/<group>         the group's weight in the step's θ update
    val/worst_group_loss  val/average_loss  val/group_loss/<group>

Group names may contain ``/``: a per-group name is parsed from both ends (the first two parts
and the last one are fixed), so ``eval/group/a/b/loss`` is group ``a/b``, metric ``loss``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

EVAL = "eval"

TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_ETA_ALPHA = "train/eta_alpha"
TRAIN_STEP_TIME = "train/step_time_s"
TRAIN_LR_CUT = "train/lr_cut"
TRAIN_EFFECTIVE_GROUPS = "train/effective_groups"
VAL_WORST_GROUP_LOSS = "val/worst_group_loss"
VAL_AVERAGE_LOSS = "val/average_loss"

TRAIN_GROUP_LOSS = "train/group_loss/"
TRAIN_GROUP_WEIGHT = "train/group_weight/"
VAL_GROUP_LOSS = "val/group_loss/"


def group_metric(group: str, metric: str, prefix: str = EVAL) -> str:
    """``eval/group/<group>/<metric>``."""
    return f"{prefix}/group/{group}/{metric}"


def worst_group(metric: str, prefix: str = EVAL) -> str:
    """``eval/worst_group/<metric>``."""
    return f"{prefix}/worst_group/{metric}"


def overall(metric: str, prefix: str = EVAL) -> str:
    """``eval/overall/<metric>``."""
    return f"{prefix}/overall/{metric}"


def group_gap(metric: str, prefix: str = EVAL) -> str:
    """``eval/group_gap/<metric>``."""
    return f"{prefix}/group_gap/{metric}"


def train_group_loss(group: str) -> str:
    return f"{TRAIN_GROUP_LOSS}{group}"


def train_group_weight(group: str) -> str:
    return f"{TRAIN_GROUP_WEIGHT}{group}"


def val_group_loss(group: str) -> str:
    return f"{VAL_GROUP_LOSS}{group}"


class EvalName(NamedTuple):
    """A parsed evaluation metric name: ``kind`` is group | worst_group | overall | group_gap."""

    kind: str
    metric: str
    group: str | None = None


def parse_eval(name: str, prefix: str = EVAL) -> EvalName | None:
    """``"eval/group/Island/loss"`` → EvalName("group", "loss", "Island"); None if not one."""
    parts = name.split("/")
    if len(parts) < 3 or parts[0] != prefix:
        return None
    kind = parts[1]
    if kind == "group" and len(parts) >= 4:
        return EvalName("group", parts[-1], "/".join(parts[2:-1]))
    if kind in ("worst_group", "overall", "group_gap") and len(parts) == 3:
        return EvalName(kind, parts[2])
    return None


def per_group(metrics: Mapping[str, float], prefix: str = EVAL) -> dict[str, dict[str, float]]:
    """``{group: {metric: value}}`` from the per-group names in ``metrics``, groups sorted."""
    out: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        parsed = parse_eval(name, prefix)
        if parsed is not None and parsed.kind == "group":
            out.setdefault(parsed.group, {})[parsed.metric] = value  # type: ignore[index]
    return dict(sorted(out.items()))


def of_kind(metrics: Mapping[str, float], kind: str, prefix: str = EVAL) -> dict[str, float]:
    """``{metric: value}`` of one summary kind (worst_group, overall or group_gap)."""
    out = {}
    for name, value in metrics.items():
        parsed = parse_eval(name, prefix)
        if parsed is not None and parsed.kind == kind:
            out[parsed.metric] = value
    return out


def series(record: Mapping[str, float], prefix: str) -> dict[str, float]:
    """``{group: value}`` of the names in ``record`` that start with ``prefix``
    (e.g. :data:`TRAIN_GROUP_WEIGHT`)."""
    return {k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix)}
