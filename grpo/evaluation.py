"""Per-group evaluation of a preference-trained policy (paper §5.2 metrics).

For every group and overall: the preference loss, the **reward accuracy** (share of pairs whose
implicit reward β(log π − log π_ref) is strictly higher for y_w than for y_l), the **log-prob
accuracy** (share with log π(y_w|x) > log π(y_l|x)), the mean reward margin β·h and the number of
pairs; then the worst group for each metric (max loss, min of the others) and the gap between the
best and the worst group. :func:`flatten_metrics` names them with :mod:`grpo.metric_names`.

Each accuracy carries its Wilson score interval (``<metric>_ci_low``, ``<metric>_ci_high`` at
``confidence``, :func:`grpo.stats.wilson_interval`): groups are small, and 3 of 4 is not 75 of
100. Every *configured* group is reported: one with no evaluated pairs has ``pairs = 0`` and NaN
metrics, and then the worst group is that group with a NaN value (unknown, not silently the
worst of the others), so the gate cannot pass without looking at it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from grpo import metric_names
from grpo.logprobs import EncodedPairs, SequenceScorer, encode_pairs, score_pairs
from grpo.losses import pair_losses, reward_margin
from grpo.stats import wilson_interval

METRICS: tuple[str, ...] = ("loss", "reward_accuracy", "logprob_accuracy", "reward_margin")
ACCURACIES: tuple[str, ...] = ("reward_accuracy", "logprob_accuracy")  # 0/1 per pair: intervals
HIGHER_IS_WORSE = {"loss"}


def pair_metrics(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    loss: str = "dpo",
    beta: float = 0.1,
) -> dict[str, np.ndarray]:
    """Per-pair values (N,) of every metric in :data:`METRICS` (accuracies as 0/1)."""
    margin = reward_margin(
        policy_chosen_logps.double(),
        policy_rejected_logps.double(),
        reference_chosen_logps.double(),
        reference_rejected_logps.double(),
    )
    return {
        "loss": pair_losses(loss, margin, beta).numpy(),
        "reward_accuracy": (beta * margin > 0).double().numpy(),
        "logprob_accuracy": (policy_chosen_logps > policy_rejected_logps).double().numpy(),
        "reward_margin": (beta * margin).numpy(),
    }


def group_row(per_pair: dict[str, np.ndarray], mask: np.ndarray, confidence: float) -> dict:
    """Means of the pairs selected by ``mask`` (N,), ``pairs``, and the accuracies' Wilson
    intervals ``<metric>_ci_low``/``_ci_high``; NaN metrics when ``mask`` selects nothing."""
    n = int(mask.sum())
    row: dict[str, float] = {}
    for m in METRICS:
        row[m] = float(per_pair[m][mask].mean()) if n else math.nan
    row["pairs"] = n
    for m in ACCURACIES:
        correct = round(float(per_pair[m][mask].sum()))
        row[f"{m}_ci_low"], row[f"{m}_ci_high"] = wilson_interval(correct, n, confidence)
    return row


def summarize(
    per_pair: dict[str, np.ndarray],
    groups: Sequence[str],
    *,
    expected_groups: Sequence[str] | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Group means, overall means, worst group and best−worst gap from per-pair values.

    ``groups`` (N,) labels each pair; ``expected_groups``: the configured groups, each reported
    even without pairs (``pairs = 0``, NaN metrics, and then it is the worst group with value
    NaN). Returns ``{"groups": {g: {metric: mean, "pairs": n, "<acc>_ci_low": …}},
    "overall": {...}, "worst_group": {metric: {"group": g, "value": v}},
    "group_gap": {metric: v}, "confidence": c}``.
    """
    labels = np.asarray([str(g) for g in groups], dtype=object)
    if len(labels) == 0:
        raise ValueError("no pairs to evaluate")
    names = sorted(set(labels) | {str(g) for g in expected_groups or ()})
    table = {g: group_row(per_pair, labels == g, confidence) for g in names}
    overall = group_row(per_pair, np.ones(len(labels), dtype=bool), confidence)
    unmeasured = [g for g in names if table[g]["pairs"] == 0]
    worst, gap = {}, {}
    for m in METRICS:
        values = {g: table[g][m] for g in names}
        if unmeasured:  # the worst group is unknown: say which one, never skip it
            worst[m], gap[m] = {"group": unmeasured[0], "value": math.nan}, math.nan
            continue
        pick = max if m in HIGHER_IS_WORSE else min
        w = pick(names, key=lambda g, v=values: v[g])
        worst[m] = {"group": w, "value": values[w]}
        gap[m] = max(values.values()) - min(values.values())
    return {
        "groups": table,
        "overall": overall,
        "worst_group": worst,
        "group_gap": gap,
        "confidence": confidence,
    }


def evaluate_logps(
    groups: Sequence[str],
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    loss: str = "dpo",
    beta: float = 0.1,
    expected_groups: Sequence[str] | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """:func:`summarize` of :func:`pair_metrics`, plus the loss kind, β and ``per_pair``: the
    0/1 outcomes of the accuracies, one list (N,) per metric in the order of ``groups`` (what a
    paired comparison with another model on the same pairs needs)."""
    per_pair = pair_metrics(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        loss=loss,
        beta=beta,
    )
    summary = summarize(per_pair, groups, expected_groups=expected_groups, confidence=confidence)
    outcomes = {m: [int(v) for v in per_pair[m]] for m in ACCURACIES}
    return {"loss_kind": loss, "beta": beta, **summary, "per_pair": outcomes}


def pair_logps(
    policy: nn.Module,
    reference: nn.Module | tuple[torch.Tensor, torch.Tensor],
    tokenizer,
    pairs_df: pd.DataFrame,
    *,
    batch_size: int = 16,
    max_prompt_tokens: int = 192,
    max_response_tokens: int = 32,
    padding_side: str = "right",
    device: torch.device | str | None = None,
    shared_prompt: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy chosen, policy rejected, reference chosen, reference rejected) log-probs, each
    (N,) in the row order of ``pairs_df``; ``reference`` is a model or precomputed
    (chosen, rejected) log-probs."""
    _require_pair_columns(pairs_df)
    if device is None:
        device = next(policy.parameters()).device
    encoded = encode_pairs(
        tokenizer,
        pairs_df["prompt"].tolist(),
        pairs_df["chosen"].tolist(),
        pairs_df["rejected"].tolist(),
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
    )
    kwargs = {
        "pad_token_id": tokenizer.pad_token_id,
        "batch_size": batch_size,
        "padding_side": padding_side,
        "device": device,
    }
    was_training = policy.training
    policy.eval()
    policy_c, policy_r = _score(policy, encoded, shared_prompt, kwargs)
    policy.train(was_training)
    if isinstance(reference, nn.Module):
        reference.eval()
        ref_c, ref_r = _score(reference, encoded, shared_prompt, kwargs)
        return policy_c, policy_r, ref_c, ref_r
    ref_c, ref_r = _given_reference(reference, policy_c.shape, policy_r.shape, len(pairs_df))
    return policy_c, policy_r, ref_c, ref_r


def _require_pair_columns(pairs_df: pd.DataFrame) -> None:
    """Name a missing column up front, before any tokenizing or scoring."""
    for col in ("group", "prompt", "chosen", "rejected"):
        if col not in pairs_df.columns:
            raise ValueError(f"pairs table: missing column {col!r}; has {list(pairs_df.columns)}")


def _score(
    model: nn.Module, encoded: EncodedPairs, shared_prompt: bool, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs (N,) of one model: the policy and the reference score alike."""
    return score_pairs(SequenceScorer(model, shared_prompt=shared_prompt), encoded, **kwargs)


def _given_reference(
    reference: tuple[torch.Tensor, torch.Tensor],
    chosen_shape: torch.Size,
    rejected_shape: torch.Size,
    n_pairs: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Precomputed reference log-probs as float32, checked against the policy's (N,) shapes."""
    ref_c, ref_r = (torch.as_tensor(t, dtype=torch.float32) for t in reference)
    if ref_c.shape != chosen_shape or ref_r.shape != rejected_shape:
        raise ValueError(
            f"reference log-probs have shapes {tuple(ref_c.shape)}, {tuple(ref_r.shape)}; "
            f"expected ({n_pairs},) each"
        )
    return ref_c, ref_r


def evaluate_pairs(
    policy: nn.Module,
    reference: nn.Module | tuple[torch.Tensor, torch.Tensor],
    tokenizer,
    pairs_df: pd.DataFrame,
    *,
    loss: str = "dpo",
    beta: float = 0.1,
    expected_groups: Sequence[str] | None = None,
    confidence: float = 0.95,
    **scoring: Any,
) -> dict[str, Any]:
    """Evaluate ``policy`` against ``reference`` (a model, or precomputed (chosen, rejected)
    log-probs (N,) in the row order of ``pairs_df``) on every row of ``pairs_df``:
    :func:`evaluate_logps` of :func:`pair_logps`.

    ``scoring``: :func:`pair_logps`'s options (batch_size, max_prompt_tokens,
    max_response_tokens, padding_side, device, shared_prompt: score each prompt once for both
    responses where the model supports it; False = the 2B-sequence path)."""
    logps = pair_logps(policy, reference, tokenizer, pairs_df, **scoring)
    return evaluate_logps(
        pairs_df["group"].tolist(),
        *logps,
        loss=loss,
        beta=beta,
        expected_groups=expected_groups,
        confidence=confidence,
    )


def flatten_metrics(result: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """``{prefix}/group/<g>/<metric>``, ``{prefix}/overall/<metric>``,
    ``{prefix}/worst_group/<metric>`` and ``{prefix}/group_gap/<metric>`` (plus ``pairs``)."""
    out: dict[str, float] = {}
    for g, values in result["groups"].items():
        for m, v in values.items():
            out[metric_names.group_metric(g, m, prefix)] = float(v)
    for m, v in result["overall"].items():
        out[metric_names.overall(m, prefix)] = float(v)
    for m, w in result["worst_group"].items():
        out[metric_names.worst_group(m, prefix)] = float(w["value"])
    for m, v in result["group_gap"].items():
        out[metric_names.group_gap(m, prefix)] = float(v)
    return out


def interval_text(low: float, high: float) -> str:
    """``[0.49, 0.94]``, or ``-`` when the interval is unknown (no pairs)."""
    if math.isnan(low) or math.isnan(high):
        return "-"
    return f"[{low:.2f}, {high:.2f}]"


def format_table(result: dict[str, Any]) -> str:
    """A plain-text per-group table (accuracies with their intervals), the overall row, the
    worst group and the gap."""
    level = f"{result.get('confidence', 0.95):.0%} CI"
    header = (
        f"{'group':<20} {'pairs':>6} {'loss':>8} {'reward_acc':>10} {level:>14} "
        f"{'logp_acc':>9} {level:>14} {'margin':>8}"
    )
    lines = [header, "-" * len(header)]

    def row(name: str, v: dict[str, float]) -> str:
        cis = [interval_text(v.get(f"{m}_ci_low", math.nan), v.get(f"{m}_ci_high", math.nan))
               for m in ACCURACIES]  # fmt: skip
        return (
            f"{name:<20} {int(v['pairs']):>6} {v['loss']:>8.4f} {v['reward_accuracy']:>10.3f} "
            f"{cis[0]:>14} {v['logprob_accuracy']:>9.3f} {cis[1]:>14} {v['reward_margin']:>8.4f}"
        )

    for g, v in result["groups"].items():
        lines.append(row(g, v))
    lines.append("-" * len(header))
    lines.append(row("overall", result["overall"]))
    worst = ", ".join(
        f"{m}: {w['group']} ({w['value']:.4g})" for m, w in result["worst_group"].items()
    )
    gap = ", ".join(f"{m}: {v:.4g}" for m, v in result["group_gap"].items())
    lines += [f"worst group  {worst}", f"group gap    {gap}"]
    return "\n".join(lines)
