"""Methods × seeds on the same data from one reference per seed: ``grpo compare`` and
``grpo reproduce goqa`` (paper §5.2, Figure 3) share this loop.

Per seed s (``data_for_seed(s)`` gives the canonical pair table of that seed):

1. the ``test`` split is set aside; training and selection see ``train`` and ``validation`` only;
2. the reference π_ref is made once (:func:`grpo.trainer.prepare_reference`: tokenizer, SFT on
   the chosen responses), and every method trains from it (``train(..., reference_dir=...)``),
   so all methods of a seed share the same reference weights and reference log-probs;
3. each method keeps the checkpoint its validation rule picks (``keep_best``: worst-group
   validation loss for GR-*, the average for the others; or the last step), and is scored on
   the test pairs: per pair its reward correctness 1[β h > 0], log-prob correctness
   1[log π(y_w|x) > log π(y_l|x)] and loss ℓ(h).

:func:`summarise` turns the per-run records into ``results.json``; mean ± standard error over
seeds (:func:`grpo.stats.mean_sem`), Wilson intervals per group and paired bootstrap
comparisons of each IS-/GR- method with its pooled baseline (:func:`grpo.stats.paired_bootstrap`,
strata = (seed, group)). Nothing here writes outside ``out_dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from grpo import metric_names
from grpo.groups import parse_method
from grpo.io import read_json, write_json
from grpo.stats import mean_sem, paired_bootstrap, wilson_interval

METRICS: tuple[str, ...] = ("reward_accuracy", "logprob_accuracy", "loss")
ACCURACIES: tuple[str, ...] = ("reward_accuracy", "logprob_accuracy")
RUN_FILE = "run.json"
REFERENCE_KEY_FILE = "reference.json"
# the train settings SFT and the reference log-probs depend on (grpo.sft, grpo.trainer)
REFERENCE_TRAIN_KEYS = (
    "sft_epochs", "sft_lr", "sft_batch_size", "seed", "grad_accum", "grad_clip", "weight_decay",
    "fast_logprobs", "shared_prompt",
)  # fmt: skip

DataForSeed = Callable[[int], pd.DataFrame]
Progress = Callable[[int, str], None]  # (runs finished, what runs now)


@dataclass
class ExperimentConfig:
    """What to run and how to report it (the model and training settings come separately)."""

    methods: tuple[str, ...] = ("dpo", "gr-dpo")
    seeds: tuple[int, ...] = (0, 1, 2)
    group_key: str = "groups"  # results.json's name for the group list ("countries" for GOQA)
    model_name: str = ""  # how results name the model
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    keep_models: bool = False  # keep every policy and reference (GBs for a real model)
    resume: bool = True  # reuse a finished (seed, method) run whose settings and data match
    workers: int = 1  # processes running the seeds' references and runs side by side
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # recorded as given

    def __post_init__(self) -> None:
        self.methods = tuple(parse_method(m).name for m in self.methods)
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: need distinct methods, got {list(self.methods)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: need distinct seeds, got {list(self.seeds)}")
        if self.bootstrap_samples < 1:
            raise ValueError(f"bootstrap_samples must be >= 1, got {self.bootstrap_samples}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


def run_experiment(
    data_for_seed: DataForSeed,
    model_cfg: Any,
    train_cfg: Any,
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every (seed, method) run, then :func:`summarise`. Run folders go under
    ``out_dir/runs/seed-<s>/<method>/`` (``run.json`` each: the record of that run).

    With ``cfg.workers`` > 1 the references, then the runs, are spread over that many worker
    processes (``model.threads`` torch threads each); what each run computes is the same."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    jobs = [
        seed_job(check_seed_pairs(data_for_seed(seed), seed), seed, model_cfg, train_cfg, out_dir)
        for seed in cfg.seeds
    ]
    records, references = _schedule(jobs, cfg, progress)
    if progress is not None:
        progress(len(records), "done")
    results = summarise(records, cfg, time.perf_counter() - start)
    results["references"] = {str(s): r for s, r in references.items()}
    return results


def check_seed_pairs(pairs: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The seed's table, with rows in every split and every training group in every split."""
    missing = [c for c in ("pair_id", "group", "split") if c not in pairs.columns]
    if missing:
        raise ValueError(f"seed {seed}: pairs table lacks column(s) {missing}")
    groups = sorted(set(pairs.loc[pairs["split"] == "train", "group"].astype(str)))
    for split in ("train", "validation", "test"):
        present = set(pairs.loc[pairs["split"] == split, "group"].astype(str))
        absent = [g for g in groups if g not in present]
        if absent:
            raise ValueError(
                f"seed {seed}: group(s) {absent} have no {split} pairs; every group needs "
                "pairs in train, validation and test to be compared"
            )
    return pairs.reset_index(drop=True)


@dataclass
class SeedJob:
    """One seed's data and settings: ``fit`` (train + validation: all that training and
    selection may read) and ``test`` (scored after training)."""

    seed: int
    fit: pd.DataFrame
    test: pd.DataFrame
    model_cfg: Any
    train_cfg: Any
    seed_dir: Path
    data_key: str


def seed_job(
    pairs: pd.DataFrame, seed: int, model_cfg: Any, train_cfg: Any, out_dir: Path
) -> SeedJob:
    """Seed s sets ``model.init_seed`` and ``train.seed``; the test split is set aside here."""
    return SeedJob(
        seed=seed,
        fit=pairs[pairs["split"] != "test"].reset_index(drop=True),
        test=pairs[pairs["split"] == "test"].reset_index(drop=True),
        model_cfg=dataclasses.replace(model_cfg, init_seed=seed),
        train_cfg=dataclasses.replace(train_cfg, seed=seed),
        seed_dir=out_dir / "runs" / f"seed-{seed}",
        data_key=frame_digest(pairs),
    )


def _schedule(
    jobs: list[SeedJob], cfg: ExperimentConfig, progress: Progress | None
) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """Finished runs are reused; a seed with runs to do gets its reference (SFT) first, then its
    runs. Tasks start in submission order: every seed's reference, then the runs."""
    records, todo = _finished_runs(jobs, cfg)
    references: dict[int, dict[str, Any]] = {}
    with _executor(cfg.workers) as pool:
        pending = {pool.submit(_reference_task, job, cfg.resume): (job, None)
                   for job in jobs if job.seed in todo}  # fmt: skip
        while pending:
            if progress is not None:
                progress(len(records), _running(pending, cfg.workers))
            for future in pool.wait_one(pending):
                job, method = pending.pop(future)
                if method is None:  # the seed's reference is ready: queue its runs
                    folder, ref_test, references[job.seed] = future.result()
                    for m in todo[job.seed]:
                        task = pool.submit(_run_task, job, m, folder, ref_test, cfg.keep_models)
                        pending[task] = (job, m)
                    continue
                records[(job.seed, method)] = future.result()
                if not cfg.keep_models and all((job.seed, m) in records for m in cfg.methods):
                    _drop_reference(job.seed_dir)
    return [records[(j.seed, m)] for j in jobs for m in cfg.methods], references


def _finished_runs(
    jobs: list[SeedJob], cfg: ExperimentConfig
) -> tuple[dict[tuple[int, str], dict[str, Any]], dict[int, list[str]]]:
    """({(seed, method): record} of runs finished earlier with the same key, {seed: methods to
    run})."""
    records: dict[tuple[int, str], dict[str, Any]] = {}
    todo: dict[int, list[str]] = {}
    for job in jobs:
        for method in cfg.methods:
            train_cfg = dataclasses.replace(job.train_cfg, method=method)
            key = run_key(job.model_cfg, train_cfg, job.data_key)
            cached = _cached_run(job.seed_dir / method, key) if cfg.resume else None
            if cached is not None:
                records[(job.seed, method)] = cached
            else:
                todo.setdefault(job.seed, []).append(method)
    return records, todo


def _running(pending: dict, workers: int) -> str:
    """What runs now: the first ``workers`` pending tasks (a pool starts them in order)."""
    names = [
        f"seed {j.seed}: {m or 'reference (SFT)'}" for j, m in list(pending.values())[:workers]
    ]
    return ", ".join(names)


def _reference_task(job: SeedJob, resume: bool):
    """(reference folder, the test pairs' log-probs under it, info), made once per seed."""
    from grpo.modeling import use_threads

    use_threads(job.model_cfg)
    folder, info = _reference(job, resume)
    return folder, _test_reference(folder, job.test, job.model_cfg, job.train_cfg), info


def _run_task(job: SeedJob, method: str, reference: Path, ref_test, keep_models: bool):
    """Train ``method`` from the seed's reference, score it on the test pairs, write run.json."""
    from grpo.modeling import use_threads

    use_threads(job.model_cfg)
    train_cfg = dataclasses.replace(job.train_cfg, method=method)
    record = _train_and_score(
        job.fit, job.test, ref_test, reference, job.model_cfg, train_cfg, job.seed_dir
    )
    record.update(seed=job.seed, method=method, key=run_key(job.model_cfg, train_cfg, job.data_key))
    write_json(job.seed_dir / method / RUN_FILE, record)
    if not keep_models:
        _drop_models(job.seed_dir / method)
    return record


def _drop_reference(seed_dir: Path) -> None:
    shutil.rmtree(seed_dir / "reference", ignore_errors=True)
    shutil.rmtree(seed_dir / "tokenizer", ignore_errors=True)


class _InProcess:
    """One worker, this process: a task runs when it is waited for, in submission order."""

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Callable, *args: Any) -> Future:
        future: Future = Future()
        future.task = (fn, args)  # type: ignore[attr-defined]
        return future

    def wait_one(self, pending: dict) -> list[Future]:
        future = next(iter(pending))
        fn, args = future.task  # type: ignore[attr-defined]
        future.set_result(fn(*args))
        return [future]


class _Pool:
    """Worker processes, spawned (no forked torch or thread-pool state)."""

    def __init__(self, workers: int) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(workers, mp_context=context)

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.pool.shutdown(wait=exc_type is None, cancel_futures=exc_type is not None)

    def submit(self, fn: Callable, *args: Any) -> Future:
        return self.pool.submit(fn, *args)

    def wait_one(self, pending: dict) -> list[Future]:
        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        return list(done)


def _executor(workers: int) -> _InProcess | _Pool:
    return _Pool(workers) if workers > 1 else _InProcess()


# --------------------------------------------------------------------------- one seed's pieces


def frame_digest(pairs: pd.DataFrame) -> str:
    """sha256 (16 hex digits) of the table's content, row order included."""
    text = pairs.astype(str).to_json(orient="split", index=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_key(model_cfg: Any, train_cfg: Any, data_key: str) -> str:
    """What a finished run's result depends on: the model and train settings and the data."""
    from grpo.config import to_dict

    settings = {"model": to_dict(model_cfg), "train": to_dict(train_cfg), "data": data_key}
    settings["train"].pop("progress", None)  # a progress bar and the CPU threads change
    settings["model"].pop("threads", None)  # nothing computed
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def reference_key(model_cfg: Any, train_cfg: Any, data_key: str) -> str:
    """What the reference depends on: the model settings, the data, and SFT's own settings
    (not the preference method's, so a rerun with another η_α or lr reuses the SFT)."""
    from grpo.config import to_dict

    train = to_dict(train_cfg)
    sft = {k: train[k] for k in REFERENCE_TRAIN_KEYS}
    model = {k: v for k, v in to_dict(model_cfg).items() if k != "threads"}
    settings = {"model": model, "train": sft, "data": data_key}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _cached_run(run_dir: Path, key: str) -> dict[str, Any] | None:
    file = run_dir / RUN_FILE
    if not file.exists():
        return None
    record = read_json(file)
    return record if record.get("key") == key else None


def _reference(job: SeedJob, resume: bool) -> tuple[Path, dict[str, Any]]:
    """The seed's reference: reused when an earlier call left one for the same settings and data
    (``reference.json`` holds its key), else made by :func:`grpo.trainer.prepare_reference`."""
    from grpo.trainer import prepare_reference

    key = reference_key(job.model_cfg, job.train_cfg, job.data_key)
    marker, folder = job.seed_dir / REFERENCE_KEY_FILE, job.seed_dir / "reference"
    if resume and marker.exists() and (folder / "grpo.json").exists():
        info = read_json(marker)
        if info.get("key") == key:
            return folder, {**info, "made": False}
    marker.unlink(missing_ok=True)
    start = time.perf_counter()
    folder = prepare_reference(job.fit, job.model_cfg, job.train_cfg, job.seed_dir)
    sft_losses = read_json(folder / "grpo.json").get("sft_losses", [])
    info = {
        "key": key,
        "sft_seconds": round(time.perf_counter() - start, 3),
        "sft_steps": len(sft_losses),
        "sft_final_loss": sft_losses[-1] if sft_losses else None,
    }
    write_json(marker, info)
    return folder, {**info, "made": True}


def _test_reference(
    reference: Path, test: pd.DataFrame, model_cfg: Any, train_cfg: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_ref of the test pairs (N,) each, scored once per seed (cached beside the reference)."""
    from grpo.distributed import DistInfo
    from grpo.modeling import load_pretrained, resolve_device
    from grpo.reference import LOGPS_DIR, reference_logps
    from grpo.trainer import encode_frame

    model, tokenizer, _ = load_pretrained(reference, model_cfg.device)
    tokenizer.padding_side = model_cfg.padding_side
    device = resolve_device(model_cfg.device)
    return reference_logps(
        model, encode_frame(test, tokenizer, model_cfg), train_cfg,
        cache=reference / LOGPS_DIR, dist_info=DistInfo(), pad_token_id=tokenizer.pad_token_id,
        padding_side=model_cfg.padding_side, device=device, dtype=model_cfg.dtype,
    )  # fmt: skip


def _train_and_score(
    fit: pd.DataFrame,
    test: pd.DataFrame,
    ref_test: tuple[torch.Tensor, torch.Tensor],
    reference: Path,
    model_cfg: Any,
    train_cfg: Any,
    seed_dir: Path,
) -> dict[str, Any]:
    """Train one method from the shared reference; its record (test scores, weights, checkpoint)."""
    from grpo.trainer import train

    start = time.perf_counter()
    result = train(
        fit, model_cfg, train_cfg, seed_dir / train_cfg.method,
        resume=False, reference_dir=reference,
    )  # fmt: skip
    train_seconds = time.perf_counter() - start
    per_pair = score_test(result.model_dir, test, ref_test, model_cfg, train_cfg)
    val_counts = fit.loc[fit["split"] == "validation", "group"].astype(str).value_counts()
    return {
        "groups": list(result.groups),
        "reference_dir": str(result.reference_dir),
        "test": per_pair,
        "per_group": group_table(per_pair),
        "final_group_weights": dict(zip(result.groups, result.final_weights, strict=True)),
        "final_alpha": dict(zip(result.groups, result.final_alpha, strict=True)),
        "kept_group_weights": dict(zip(result.groups, result.weights, strict=True)),
        "checkpoint": checkpoint_choice(result, train_cfg),
        "validation_pairs": {g: int(n) for g, n in sorted(val_counts.items())},
        "collapse": result.collapse,
        "history": result.history,
        "train_seconds": round(train_seconds, 3),
        "seconds": round(time.perf_counter() - start, 3),
    }


def score_test(
    policy_dir: Path,
    test: pd.DataFrame,
    ref_test: tuple[torch.Tensor, torch.Tensor],
    model_cfg: Any,
    train_cfg: Any,
) -> dict[str, list]:
    """Per test pair (in ``test``'s order): pair_id, group, reward and log-prob correctness (0/1)
    and the loss ℓ(h) of the method's loss kind at β (:func:`grpo.evaluation.pair_metrics`)."""
    from grpo.evaluation import pair_metrics
    from grpo.logprobs import SequenceScorer, score_pairs
    from grpo.modeling import autocast, load_pretrained
    from grpo.trainer import encode_frame

    policy, tokenizer, _ = load_pretrained(policy_dir, model_cfg.device)
    tokenizer.padding_side = model_cfg.padding_side
    device = next(policy.parameters()).device
    scorer = SequenceScorer(policy, train_cfg.fast_logprobs, train_cfg.shared_prompt)
    policy_c, policy_r = score_pairs(
        scorer, encode_frame(test, tokenizer, model_cfg), pad_token_id=tokenizer.pad_token_id,
        batch_size=train_cfg.eval_batch_size, padding_side=model_cfg.padding_side,
        device=device, autocast=autocast(device, model_cfg.dtype),
    )  # fmt: skip
    values = pair_metrics(
        policy_c, policy_r, ref_test[0], ref_test[1],
        loss=parse_method(train_cfg.method).loss, beta=train_cfg.beta,
    )  # fmt: skip
    out: dict[str, list] = {
        "pair_id": test["pair_id"].astype(str).tolist(),
        "group": test["group"].astype(str).tolist(),
    }
    for m in METRICS:
        out[m] = [float(v) for v in values[m]]
    return out


def group_table(per_pair: dict[str, list]) -> dict[str, dict[str, float]]:
    """{group: {metric: mean over its pairs, "pairs": n}} from :func:`score_test`'s record."""
    groups = np.asarray(per_pair["group"], dtype=object)
    table = {}
    for g in sorted(set(per_pair["group"])):
        mask = groups == g
        table[g] = {m: float(np.asarray(per_pair[m])[mask].mean()) for m in METRICS}
        table[g]["pairs"] = int(mask.sum())
    return table


def checkpoint_choice(result: Any, train_cfg: Any) -> dict[str, Any]:
    """Which step's parameters the run contributes, and the rule that chose it."""
    robust = parse_method(train_cfg.method).robust
    monitored = "worst-group validation loss" if robust else "average validation loss"
    kept = bool(train_cfg.keep_best and result.best)
    step = int(result.best["step"]) if kept else int(result.steps)
    criterion = f"lowest {monitored} (keep_best)" if kept else "final step"
    return {
        "step": step,
        "steps": int(result.steps),
        "criterion": criterion,
        "monitored": monitored,  # also drives LR cuts and early stopping
        "stopped_early": bool(result.stopped_early),
        "validation": {k: v for k, v in result.best.items() if k != "step"},
    }


def _drop_models(run_dir: Path) -> None:
    """The policy, checkpoints and kept parameters of a scored run (hundreds of MB each)."""
    from grpo.trainer import BEST_POLICY

    shutil.rmtree(run_dir / "policy", ignore_errors=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / BEST_POLICY).unlink(missing_ok=True)


# --------------------------------------------------------------------------- results


def summarise(
    records: Sequence[dict[str, Any]], cfg: ExperimentConfig, seconds: float = 0.0
) -> dict[str, Any]:
    """``results.json``: per method, per group mean ± sem over seeds of each metric (and the test
    pairs), the worst group per seed (min accuracy, max loss) averaged over seeds, the final
    group weights; plus Wilson intervals, paired comparisons, checkpoints and the runs."""
    by_method = {m: sorted((r for r in records if r["method"] == m), key=lambda r: r["seed"])
                 for m in cfg.methods}  # fmt: skip
    groups = sorted({g for r in records for g in r["per_group"]})
    methods = {m: method_summary(runs, groups) for m, runs in by_method.items()}
    results: dict[str, Any] = {
        cfg.group_key: groups,
        "seeds": list(cfg.seeds),
        "model": cfg.model_name,
        "settings": cfg.settings,
        "methods": methods,
        "confidence": cfg.confidence,
        "intervals": {
            m: wilson_table(runs, groups, cfg.confidence) for m, runs in by_method.items()
        },
        "comparisons": comparisons(by_method, groups, cfg),
        "checkpoints": {
            m: [r["checkpoint"] | {"seed": r["seed"]} for r in runs]
            for m, runs in by_method.items()
        },
        "runs": [run_summary(r) for r in records],
        "seconds": round(seconds, 3),
    }
    if cfg.group_key != "groups":
        results["groups"] = groups
    return results


def method_summary(runs: Sequence[dict[str, Any]], groups: Sequence[str]) -> dict[str, Any]:
    """One method's entry of ``results.json`` (the issue's schema, plus ``group_gap``)."""
    table = {g: {m: mean_sem([r["per_group"][g][m] for r in runs]) for m in METRICS}
             for g in groups}  # fmt: skip
    for g in groups:
        counts = [int(r["per_group"][g]["pairs"]) for r in runs]
        table[g]["pairs"] = counts[0] if len(set(counts)) == 1 else round(float(np.mean(counts)))
        table[g]["pairs_per_seed"] = counts
    worst, gap = {}, {}
    for m in METRICS:
        per_seed = [[r["per_group"][g][m] for g in groups] for r in runs]
        pick = max if m == "loss" else min
        worst[m] = mean_sem([pick(values) for values in per_seed])
        worst[m]["group_per_seed"] = [
            groups[int(np.argmax(v) if m == "loss" else np.argmin(v))] for v in per_seed
        ]
        gap[m] = mean_sem([max(values) - min(values) for values in per_seed])
    weights = {g: mean_sem([r["final_group_weights"][g] for r in runs]) for g in groups}
    return {"groups": table, "worst_group": worst, "final_group_weights": weights, "group_gap": gap}


def wilson_table(
    runs: Sequence[dict[str, Any]], groups: Sequence[str], confidence: float
) -> dict[str, Any]:
    """Per group and accuracy: the Wilson interval of the seed-mean accuracy p̄ read as one
    evaluation on n pairs (n = the group's test pairs per seed, their mean when seeds differ):
    seeds that share test pairs add no new pairs, so n is not multiplied by the seeds. Also
    each seed's own interval (``per_seed``)."""
    out: dict[str, Any] = {}
    for g in groups:
        counts = [int(r["per_group"][g]["pairs"]) for r in runs]
        n = max(1, round(float(np.mean(counts))))
        out[g] = {}
        for m in ACCURACIES:
            values = [r["per_group"][g][m] for r in runs]
            p = float(np.mean(values))
            low, high = wilson_interval(p * n, n, confidence)
            per_seed = [list(wilson_interval(v * k, k, confidence)) for v, k in zip(values, counts, strict=True)]  # fmt: skip
            out[g][m] = {"mean": p, "low": low, "high": high, "pairs": n, "per_seed": per_seed}
    return out


def baseline_of(method: str) -> str:
    """The pooled method of the same loss (``gr-ipo`` → ``ipo``); the method itself when pooled."""
    parsed = parse_method(method)
    return parsed.loss if parsed.weighting != "pooled" else method


def comparisons(
    by_method: dict[str, list[dict[str, Any]]], groups: Sequence[str], cfg: ExperimentConfig
) -> dict[str, Any]:
    """``"<method> - <baseline>"`` → {metric: paired bootstrap of the worst-group difference}
    for each IS-/GR- method whose pooled baseline also ran."""
    out = {}
    for method, runs in by_method.items():
        base = baseline_of(method)
        if base == method or base not in by_method:
            continue
        out[f"{method} - {base}"] = {
            m: worst_group_difference(by_method[base], runs, groups, m, cfg)
            | {"method": method, "baseline": base}
            for m in METRICS
        }
    return out


def paired_items(
    base_runs: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]], groups: Sequence[str],
    metric: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(stratum id (seed index × K + group index), baseline values, method values), one entry per
    (seed, test pair); raises unless both methods were scored on the same pairs in each seed."""
    lookup = {g: i for i, g in enumerate(groups)}
    keys, a, b = [], [], []
    for s, (ra, rb) in enumerate(zip(base_runs, runs, strict=True)):
        if ra["seed"] != rb["seed"] or ra["test"]["pair_id"] != rb["test"]["pair_id"]:
            raise ValueError(
                f"seed {rb['seed']}: {ra['method']} and {rb['method']} were not scored on the "
                "same test pairs; a paired comparison needs the same pairs"
            )
        keys += [s * len(groups) + lookup[g] for g in rb["test"]["group"]]
        a += ra["test"][metric]
        b += rb["test"][metric]
    return np.asarray(keys), np.asarray(a, dtype=float), np.asarray(b, dtype=float)


def worst_group_difference(
    base_runs: Sequence[dict[str, Any]],
    runs: Sequence[dict[str, Any]],
    groups: Sequence[str],
    metric: str,
    cfg: ExperimentConfig,
) -> dict[str, Any]:
    """Worst-group ``metric`` of the method minus the baseline's (each: per seed the min over
    groups of the group means, max for the loss, then the mean over seeds), with a percentile
    bootstrap interval: test pairs resampled within each (seed, group), the same draw for both
    methods (:func:`grpo.stats.paired_bootstrap`). > 0 favours the method for accuracies, < 0 for
    the loss."""
    keys, a, b = paired_items(base_runs, runs, groups, metric)
    n_strata, pick = len(runs) * len(groups), (np.max if metric == "loss" else np.min)

    def worst(values: np.ndarray, idx: np.ndarray) -> float:
        sums = np.bincount(keys[idx], weights=values[idx], minlength=n_strata)
        counts = np.bincount(keys[idx], minlength=n_strata)
        means = (sums / np.maximum(counts, 1)).reshape(len(runs), len(groups))
        return float(pick(means, axis=1).mean())

    strata = [np.flatnonzero(keys == k) for k in range(n_strata)]
    out = paired_bootstrap(
        lambda idx: worst(b, idx) - worst(a, idx), strata,
        samples=cfg.bootstrap_samples, confidence=cfg.confidence, seed=0,
    )  # fmt: skip
    return out | {"metric": metric, "items": len(keys), "seeds": len(runs)}


def run_summary(record: dict[str, Any]) -> dict[str, Any]:
    """A run in ``results.json``: everything but the full history, plus its group-weight curve."""
    out = {k: v for k, v in record.items() if k not in ("history", "key")}
    out["group_weight_history"] = weight_history(record["history"], record["groups"])
    return out


def weight_history(history: Sequence[dict[str, float]], groups: Sequence[str]) -> dict[str, list]:
    """``{"step": [...], group: [θ-step weight (= α for GR-* with χ = 1), ...]}`` per step."""
    out: dict[str, list] = {"step": [int(h["step"]) for h in history]}
    for g in groups:
        name = metric_names.train_group_weight(g)
        out[g] = [float(h.get(name, math.nan)) for h in history]
    return out
