"""The evaluate stage: per-group metrics of the trained policy on the held-out split.

``evaluate(...)`` is what the evaluate stage (``flows.stages``) calls for both ``grpo stage
evaluate`` (dvc.yaml) and the Prefect flow. It writes ``metrics.json`` (flat names from
``grpo.metric_names``: ``eval/group/<g>/<metric>``, ``eval/worst_group/<metric>``,
``eval/overall/<metric>``, ``eval/group_gap/<metric>``, the accuracies' Wilson intervals
``eval/group/<g>/<metric>_ci_low``/``_ci_high``), ``per_group.json`` (one row per group, for
``dvc plots``), ``per_pair.json`` (the evaluated pairs' ids, groups and 0/1 accuracies: what the
champion is re-scored on at registration), ``samples.json`` and ``evaluation.json`` (split,
pairs) into ``out_dir``.

Every configured group is evaluated: ``evaluate.max_pairs`` caps the pairs *per group* (a seeded
sample within each group, never dropping one), and a configured group with no pairs in the split
is reported with ``pairs = 0``, which the gate rejects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo import metric_names
from grpo.io import read_json, write_json

METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.json"
PER_GROUP_FILE = "per_group.json"
SUMMARY_FILE = "evaluation.json"  # what was evaluated: split and number of pairs
PER_PAIR_FILE = "per_pair.json"  # {"pair_id": [...], "group": [...], "<accuracy>": [0/1, ...]}
SPLITS = ("train", "validation", "test")


@dataclass
class EvaluateConfig:
    """``params.yaml`` → ``evaluate``."""

    split: str = "test"  # which split of the pair table to evaluate on
    batch_size: int = 32  # pairs per forward pass
    max_pairs: int = 0  # at most this many pairs per group, a seeded sample (0 = all)
    seed: int = 0  # seed of the max_pairs sample
    samples: int = 2  # pairs per group whose options are scored (grpo.samples; 0 = none)
    generate: bool = False  # also a greedy completion of each sample's prompt (real models)
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split: one of {list(SPLITS)}, got {self.split!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_pairs < 0 or self.samples < 0 or self.max_new_tokens < 1:
            raise ValueError("max_pairs and samples must be >= 0, max_new_tokens >= 1")


def evaluate(
    pairs_path: str | Path,
    model_dir: str | Path,
    reference_dir: str | Path,
    cfg: EvaluateConfig,
    out_dir: str | Path,
    *,
    beta: float = 0.1,
    method: str = "gr-dpo",
    model_cfg: Any = None,
    groups: tuple[str, ...] | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Evaluate ``model_dir`` against ``reference_dir`` on the ``cfg.split`` pairs.

    ``beta`` and ``method`` (its DPO or IPO loss) are the training run's; ``model_cfg``
    (``grpo.modeling.ModelConfig``) gives the device and the truncation lengths; ``groups`` the
    configured groups (each reported, with or without pairs); ``confidence`` the level of the
    accuracies' intervals (``register.confidence``).
    Returns ``{"metrics": {flat name: value}, "result": nested dict, "metrics_path",
    "per_group_path", "split", "pairs", "per_pair", "samples"}``; ``per_pair``: the evaluated
    pairs' ids, groups and 0/1 accuracies; ``samples``: scored options of ``cfg.samples`` pairs
    per group (``grpo.samples.score_samples``).
    """
    from grpo.evaluation import evaluate_pairs, flatten_metrics
    from grpo.groups import parse_method
    from grpo.modeling import ModelConfig, load_pretrained, use_threads

    model_cfg = model_cfg or ModelConfig()
    use_threads(model_cfg)
    frame = split_pairs(pairs_path, cfg)
    policy, tokenizer, _ = load_pretrained(model_dir, device=model_cfg.device)
    reference, _, _ = load_pretrained(reference_dir, device=model_cfg.device)
    scoring = _scoring_args(policy, cfg, model_cfg)
    loss = parse_method(method).loss
    result = evaluate_pairs(
        policy, reference, tokenizer, frame, loss=loss, beta=beta, expected_groups=groups,
        confidence=confidence, **scoring,
    )  # fmt: skip
    metrics = flatten_metrics(result, prefix="eval")
    samples = _scored_samples(policy, reference, tokenizer, frame, cfg, beta, scoring)
    evaluation = {
        "metrics": metrics,
        "result": result,
        "split": cfg.split,
        "pairs": len(frame),
        "per_pair": per_pair_record(frame, result["per_pair"]),
        "samples": samples,
    }
    return save_evaluation(evaluation, out_dir)


def _scoring_args(policy, cfg: EvaluateConfig, model_cfg: Any) -> dict[str, Any]:
    """Batching, truncation and device: the metrics and the samples must score pairs alike."""
    return {
        "batch_size": cfg.batch_size,
        "max_prompt_tokens": model_cfg.max_prompt_tokens,
        "max_response_tokens": model_cfg.max_response_tokens,
        "padding_side": model_cfg.padding_side,
        "device": next(policy.parameters()).device,
    }


def _scored_samples(
    policy, reference, tokenizer, frame, cfg: EvaluateConfig, beta: float, scoring: dict[str, Any]
) -> list[dict[str, Any]]:
    """``cfg.samples`` pairs per group to read: options scored (completed with ``cfg.generate``)."""
    from grpo.samples import score_samples

    samples = score_samples(
        policy, reference, tokenizer, frame, per_group=cfg.samples, beta=beta, **scoring
    )
    if cfg.generate:  # a real model's own answers, beside the scores
        prompts = [s["prompt"] for s in samples]
        for s, g in zip(samples, generate_samples(policy, tokenizer, prompts, cfg), strict=True):
            s["completion"] = g["completion"]
    return samples


def split_pairs(pairs_path: str | Path, cfg: EvaluateConfig):
    """The ``cfg.split`` rows of the pair table (at most ``cfg.max_pairs`` per group)."""
    from grpo.data.schema import read_pairs

    frame = read_pairs(pairs_path)
    frame = frame[frame["split"] == cfg.split].reset_index(drop=True)
    if frame.empty:
        raise ValueError(f"{pairs_path}: no pairs with split == {cfg.split!r} to evaluate")
    return sample_per_group(frame, cfg.max_pairs, cfg.seed)


def sample_per_group(frame, max_pairs: int, seed: int = 0):
    """At most ``max_pairs`` rows of every group (0 = all), drawn without replacement with a
    generator seeded by ``seed``; the kept rows stay in their original order."""
    import numpy as np

    if not max_pairs:
        return frame
    rng = np.random.default_rng(seed)
    keep = []
    for _, rows in sorted(frame.groupby("group", sort=False).groups.items()):
        rows = np.asarray(rows)
        keep.append(rng.choice(rows, max_pairs, replace=False) if len(rows) > max_pairs else rows)
    return frame.loc[np.sort(np.concatenate(keep))].reset_index(drop=True)


def per_pair_record(frame, outcomes: dict[str, list[int]]) -> dict[str, list]:
    """The evaluated pairs (ids and groups, in evaluation order) with their 0/1 outcomes."""
    return {
        "pair_id": frame["pair_id"].astype(str).tolist(),
        "group": frame["group"].astype(str).tolist(),
        **{m: list(v) for m, v in outcomes.items()},
    }


def evaluated_pairs(pairs_path: str | Path, per_pair: dict[str, list]):
    """The rows of the pair table that ``per_pair`` was evaluated on, in its order (to score
    another model on exactly the same pairs); a missing id is an error naming it."""
    from grpo.data.schema import read_pairs

    frame = read_pairs(pairs_path).set_index("pair_id", drop=False)
    missing = [p for p in per_pair["pair_id"] if p not in frame.index]
    if missing:
        raise ValueError(
            f"{pairs_path}: {len(missing)} evaluated pair(s) not in the table, e.g. "
            f"pair_id {missing[0]!r}: the data changed after the evaluation"
        )
    return frame.loc[per_pair["pair_id"]].reset_index(drop=True)


def save_evaluation(evaluation: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Write ``metrics.json``, ``per_group.json`` and ``samples.json`` into ``out_dir``; returns
    ``evaluation`` with ``metrics_path`` and ``per_group_path`` pointing there."""
    out_dir = Path(out_dir)
    metrics = evaluation["metrics"]
    metrics_path = write_json(out_dir / METRICS_FILE, metrics)
    per_group_path = write_json(out_dir / PER_GROUP_FILE, per_group_rows(metrics))
    write_json(out_dir / SAMPLES_FILE, evaluation.get("samples") or [])
    write_json(out_dir / PER_PAIR_FILE, evaluation.get("per_pair") or {})
    write_json(out_dir / SUMMARY_FILE, {k: evaluation[k] for k in ("split", "pairs")})
    return {
        **evaluation,
        "metrics_path": str(metrics_path),
        "per_group_path": str(per_group_path),
    }


def load_evaluation(out_dir: str | Path) -> dict[str, Any]:
    """What :func:`evaluate` wrote into ``out_dir``, read back (for ``grpo stage register``)."""
    out_dir = Path(out_dir)
    path = out_dir / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no evaluation here; run `grpo stage evaluate` first")
    samples, per_pair = out_dir / SAMPLES_FILE, out_dir / PER_PAIR_FILE
    return {
        **read_json(out_dir / SUMMARY_FILE),
        "metrics": read_json(path),
        "metrics_path": str(path),
        "per_group_path": str(out_dir / PER_GROUP_FILE),
        "per_pair": read_json(per_pair) if per_pair.exists() else {},
        "samples": read_json(samples) if samples.exists() else [],
    }


def per_group_rows(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """``[{"group": g, "<metric>": value, ...}]`` from the flat ``eval/group/<g>/<metric>`` names."""
    return [{"group": g, **values} for g, values in metric_names.per_group(metrics).items()]


def generate_samples(
    policy, tokenizer, prompts: list[str], cfg: EvaluateConfig
) -> list[dict[str, str]]:
    """Greedy completions (a smoke test that the saved policy generates text)."""
    import torch

    out = []
    device = next(policy.parameters()).device
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            gen = policy.generate(
                **ids,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        completion = tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        out.append({"prompt": prompt, "completion": completion})
    return out
