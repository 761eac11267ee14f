"""The methods × seeds experiment behind `grpo compare` and `grpo reproduce goqa`.

Pure pieces with numbers worked out by hand (the worst group per seed, the paired worst-group
difference, the checkpoint rule), then both commands end to end on a tiny GPT-2 for two steps:
the results.json schema, SFT once per seed, one reference (and one scoring of it) per seed,
no test row ever reaching training or selection, and the summaries recomputed independently
from the per-seed and per-pair numbers the file holds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from grpo import experiment
from grpo.experiment import ExperimentConfig

GOQA_FILE = Path("/work/shared/data/globalopinionqa/goqa_subset.json")
if not GOQA_FILE.exists():  # the shared data beside the checkout, wherever it is
    GOQA_FILE = Path(__file__).resolve().parents[2] / "shared/data/globalopinionqa/goqa_subset.json"

TINY = [
    "train.max_steps=2", "train.epochs=0", "train.eval_every=1", "train.batch_size=8",
    "train.sft_epochs=1", "train.sft_batch_size=8", "train.progress=false",
    "model.tokenizer_vocab_size=300",
    "model.config={model_type: gpt2, n_layer: 1, n_head: 2, n_embd: 16, n_positions: 512}",
]  # fmt: skip


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


# --------------------------------------------------------------------------- pure pieces


def _record(seed, method, groups, metric_values, pair_ids=None):
    """A run record with per-pair values: metric_values = {metric: [values in pair order]}."""
    test = {"pair_id": pair_ids or [f"p{i}" for i in range(len(groups))], "group": list(groups)}
    test.update(metric_values)
    return {
        "seed": seed,
        "method": method,
        "test": test,
        "per_group": experiment.group_table(test),
        "final_group_weights": {g: 1.0 / len(set(groups)) for g in set(groups)},
    }


def test_worst_group_is_per_seed_min_accuracy_and_max_loss_then_the_mean():
    # seed 0: a = 0.5, b = 1.0 -> worst accuracy 0.5 (a); seed 1: a = 1.0, b = 0.5 -> 0.5 (b).
    # The mean of the per-seed worst (0.5) differs from the worst of the means (0.75).
    groups = ["a", "a", "b", "b"]
    runs = [
        _record(0, "dpo", groups, {"reward_accuracy": [1, 0, 1, 1], "logprob_accuracy": [1, 1, 1, 1],
                                   "loss": [0.2, 0.4, 0.9, 0.1]}),
        _record(1, "dpo", groups, {"reward_accuracy": [1, 1, 0, 1], "logprob_accuracy": [0, 0, 1, 1],
                                   "loss": [0.1, 0.1, 0.3, 0.3]}),
    ]  # fmt: skip
    out = experiment.method_summary(runs, ["a", "b"])
    assert out["worst_group"]["reward_accuracy"]["per_seed"] == [0.5, 0.5]
    assert out["worst_group"]["reward_accuracy"]["group_per_seed"] == ["a", "b"]
    assert out["groups"]["a"]["reward_accuracy"]["mean"] == pytest.approx(0.75)
    # losses: seed 0 a = 0.3, b = 0.5 -> 0.5; seed 1 a = 0.1, b = 0.3 -> 0.3; mean 0.4
    assert out["worst_group"]["loss"]["per_seed"] == pytest.approx([0.5, 0.3])
    assert out["worst_group"]["loss"]["mean"] == pytest.approx(0.4)
    # sem of [0.5, 0.3]: sample std 0.1414.../sqrt(2) = 0.1
    assert out["worst_group"]["loss"]["sem"] == pytest.approx(0.1)
    assert out["group_gap"]["reward_accuracy"]["per_seed"] == [0.5, 0.5]
    assert out["groups"]["b"]["pairs"] == 2


def test_paired_worst_group_difference_by_hand():
    groups = ["a", "a", "b", "b"]
    base = [_record(0, "dpo", groups, {"reward_accuracy": [1, 0, 1, 1], "logprob_accuracy": [1] * 4,
                                       "loss": [0.1] * 4})]  # fmt: skip
    gr = [_record(0, "gr-dpo", groups, {"reward_accuracy": [1, 1, 0, 1], "logprob_accuracy": [1] * 4,
                                        "loss": [0.1] * 4})]  # fmt: skip
    cfg = ExperimentConfig(methods=("dpo", "gr-dpo"), seeds=(0,), bootstrap_samples=500)
    # worst group: dpo min(0.5, 1.0) = 0.5, gr-dpo min(1.0, 0.5) = 0.5 -> difference 0
    out = experiment.worst_group_difference(base, gr, ["a", "b"], "reward_accuracy", cfg)
    assert out["estimate"] == pytest.approx(0.0)
    assert out["items"] == 4 and out["seeds"] == 1
    # the same model against itself: every resample draws the same pairs for both -> exactly 0
    same = experiment.worst_group_difference(base, base, ["a", "b"], "reward_accuracy", cfg)
    assert same["low"] == same["high"] == 0.0
    # unpaired resampling of these values would not give a zero-width interval
    assert out["low"] < 0.0 < out["high"]


def test_paired_comparison_refuses_different_test_pairs():
    groups = ["a", "b"]
    vals = {"reward_accuracy": [1, 0], "logprob_accuracy": [1, 0], "loss": [0.1, 0.2]}
    base = [_record(0, "dpo", groups, vals, ["p0", "p1"])]
    other = [_record(0, "gr-dpo", groups, vals, ["p0", "p9"])]
    cfg = ExperimentConfig(methods=("dpo", "gr-dpo"), seeds=(0,))
    with pytest.raises(ValueError, match="same test pairs"):
        experiment.worst_group_difference(base, other, groups, "loss", cfg)


def test_checkpoint_rule_is_stated():
    result = SimpleNamespace(best={"step": 3, "val/worst_group_loss": 0.4}, steps=10,
                             stopped_early=False)  # fmt: skip
    gr = experiment.checkpoint_choice(result, SimpleNamespace(method="gr-ipo", keep_best=True))
    assert gr["step"] == 3 and "worst-group validation loss" in gr["criterion"]
    ipo = experiment.checkpoint_choice(result, SimpleNamespace(method="ipo", keep_best=True))
    assert "average validation loss" in ipo["criterion"]
    final = experiment.checkpoint_choice(result, SimpleNamespace(method="ipo", keep_best=False))
    assert final["step"] == 10 and final["criterion"] == "final step"


def test_baselines():
    assert experiment.baseline_of("gr-ipo") == "ipo"
    assert experiment.baseline_of("is-dpo") == "dpo"
    assert experiment.baseline_of("dpo") == "dpo"


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def spies(monkeypatch):
    """Count SFT runs and reference scorings; record the splits every training call saw."""
    import grpo.reference as reference
    import grpo.trainer as trainer

    seen = {"sft": 0, "scored": 0, "train_splits": [], "reference_splits": []}
    real_sft, real_score = reference.sft, reference.score_reference
    real_train, real_prepare = trainer.train, trainer.prepare_reference

    def sft(*args, **kwargs):
        seen["sft"] += 1
        return real_sft(*args, **kwargs)

    def score(*args, **kwargs):
        seen["scored"] += 1
        return real_score(*args, **kwargs)

    def train(pairs, *args, **kwargs):
        seen["train_splits"].append(set(pairs["split"]))
        return real_train(pairs, *args, **kwargs)

    def prepare(pairs, *args, **kwargs):
        seen["reference_splits"].append(set(pairs["split"]))
        return real_prepare(pairs, *args, **kwargs)

    monkeypatch.setattr(reference, "sft", sft)
    monkeypatch.setattr(reference, "score_reference", score)
    monkeypatch.setattr(trainer, "train", train)
    monkeypatch.setattr(trainer, "prepare_reference", prepare)
    return seen


def _check_schema(results: dict, methods: list[str], groups: list[str], seeds: int) -> None:
    s_keys = {"mean", "sem", "per_seed"}
    assert set(results["methods"]) == set(methods)
    for m in methods:
        entry = results["methods"][m]
        assert set(entry["groups"]) == set(groups)
        for g in groups:
            cell = entry["groups"][g]
            for metric in ("reward_accuracy", "logprob_accuracy", "loss"):
                assert s_keys <= set(cell[metric]) and len(cell[metric]["per_seed"]) == seeds
            assert isinstance(cell["pairs"], int) and cell["pairs"] > 0
        for metric in ("reward_accuracy", "logprob_accuracy", "loss"):
            assert s_keys <= set(entry["worst_group"][metric])
        assert set(entry["final_group_weights"]) == set(groups)
        for g in groups:
            assert s_keys <= set(entry["final_group_weights"][g])


def _worst_by_hand(results: dict, method: str, metric: str) -> float:
    """Per seed the min (max for the loss) of the per-group per-seed values, then the mean."""
    groups = results["methods"][method]["groups"]
    table = np.array([groups[g][metric]["per_seed"] for g in groups])  # (groups, seeds)
    per_seed = table.max(axis=0) if metric == "loss" else table.min(axis=0)
    return float(per_seed.mean())


def _worst_from_pairs(runs: list[dict], metric: str) -> float:
    """The same from the per-pair vectors: group means per seed, then min/max, then the mean."""
    worst = []
    for r in sorted(runs, key=lambda r: r["seed"]):
        groups = np.asarray(r["test"]["group"])
        values = np.asarray(r["test"][metric], dtype=float)
        means = [values[groups == g].mean() for g in sorted(set(groups))]
        worst.append(max(means) if metric == "loss" else min(means))
    return float(np.mean(worst))


def test_compare_end_to_end(tmp_path, monkeypatch, spies):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("")  # the project root: embedded defaults
    data = ["data.generated.n_pairs=240", "data.generated.seed=3"]
    code = main(["compare", "--methods", "dpo,gr-dpo", "--seeds", "2", "--out", "out",
                 *_sets([*TINY, *data])])  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "out/results.json").read_text())
    groups = results["groups"]
    _check_schema(results, ["dpo", "gr-dpo"], groups, seeds=2)
    assert results["seeds"] == [0, 1]
    # SFT once per seed (not once per method); the reference scored once per split per seed
    # (train and validation while training the first method, test for the evaluation)
    assert spies["sft"] == 2
    assert spies["scored"] == 3 * 2
    # training, SFT and checkpoint selection never saw a test row
    assert spies["train_splits"] and all("test" not in s for s in spies["train_splits"])
    assert spies["reference_splits"] and all("test" not in s for s in spies["reference_splits"])
    # one reference per seed, shared by both methods
    refs = {(r["seed"], r["method"]): r["reference_dir"] for r in results["runs"]}
    assert refs[(0, "dpo")] == refs[(0, "gr-dpo")] != refs[(1, "dpo")] == refs[(1, "gr-dpo")]
    _check_worst_and_comparison(results, "dpo", "gr-dpo")
    _check_pooled_weights(results, data)
    for name in ("results.md", "per_group_accuracy.png", "worst_group.png", "group_weights.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def _check_worst_and_comparison(results: dict, base: str, method: str) -> None:
    runs = {m: [r for r in results["runs"] if r["method"] == m] for m in (base, method)}
    for m in (base, method):
        for metric in ("reward_accuracy", "logprob_accuracy", "loss"):
            got = results["methods"][m]["worst_group"][metric]["mean"]
            assert got == pytest.approx(_worst_by_hand(results, m, metric), abs=1e-12)
            assert got == pytest.approx(_worst_from_pairs(runs[m], metric), abs=1e-9)
    # the paired comparison: the same test pairs for both methods in every seed, and its point
    # estimate is the difference of the worst-group means recomputed from the per-pair values
    for a, b in zip(sorted(runs[base], key=lambda r: r["seed"]),
                    sorted(runs[method], key=lambda r: r["seed"]), strict=True):  # fmt: skip
        assert a["test"]["pair_id"] == b["test"]["pair_id"]
    comparison = results["comparisons"][f"{method} - {base}"]
    for metric in ("reward_accuracy", "loss"):
        c = comparison[metric]
        expected = _worst_from_pairs(runs[method], metric) - _worst_from_pairs(runs[base], metric)
        assert c["estimate"] == pytest.approx(expected, abs=1e-9)
        assert c["items"] == sum(len(r["test"]["pair_id"]) for r in runs[base])
        assert c["low"] <= c["high"]


def _check_pooled_weights(results: dict, data: list[str]) -> None:
    """DPO's θ-step weights are the training shares N_g/N of the data the command built."""
    from grpo.data import GeneratedConfig, generate

    pairs = generate(GeneratedConfig(n_pairs=240, seed=3))
    counts = pairs[pairs["split"] == "train"]["group"].value_counts()
    for g, w in results["methods"]["dpo"]["final_group_weights"].items():
        assert w["mean"] == pytest.approx(counts[g] / counts.sum(), rel=1e-9)
    gr = results["methods"]["gr-dpo"]["final_group_weights"]
    for seed in range(2):
        assert sum(gr[g]["per_seed"][seed] for g in gr) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.skipif(not GOQA_FILE.exists(), reason="the shared GlobalOpinionQA subset is absent")
def test_reproduce_goqa_two_countries(tmp_path, monkeypatch, spies):
    from flows.cli import main
    from grpo.data import globalopinionqa as goqa

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("")
    countries = ["Nigeria", "Japan"]
    code = main(["reproduce", "goqa", "--countries", ",".join(countries), "--model", "",
                 "--seeds", "2", "--methods", "ipo,gr-ipo", "--workers", "1", "--out", "out",
                 *_sets([*TINY, "model.lora=false", f"data.globalopinionqa.path={GOQA_FILE}"])])  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "out/results.json").read_text())
    assert results["countries"] == sorted(countries) == results["groups"]
    _check_schema(results, ["ipo", "gr-ipo"], sorted(countries), seeds=2)
    assert spies["sft"] == 2
    assert all("test" not in s for s in spies["train_splits"])
    # each seed has its own question-level split: the test pairs per country match the loader's
    source = goqa.load_source(goqa.GlobalOpinionQAConfig(path=str(GOQA_FILE)))
    for seed in (0, 1):
        pairs = goqa.pairs_from_source(source, countries, seed, (0.8, 0.1, 0.1))
        test = pairs[pairs["split"] == "test"]
        for c in countries:
            cell = results["methods"]["gr-ipo"]["groups"][c]
            assert cell["pairs_per_seed"][seed] == int((test["group"] == c).sum())
        run = next(r for r in results["runs"] if r["seed"] == seed and r["method"] == "ipo")
        assert sorted(run["test"]["pair_id"]) == sorted(test["pair_id"])
    _check_worst_and_comparison(results, "ipo", "gr-ipo")
    # IPO at beta = 0.01: the loss at zero margin is 1/(4 beta^2) = 2500, and two tiny steps
    # barely move it
    assert results["methods"]["ipo"]["worst_group"]["loss"]["mean"] == pytest.approx(2500, rel=0.01)
    interval = results["intervals"]["ipo"]["Japan"]["reward_accuracy"]
    assert 0.0 <= interval["low"] <= interval["mean"] <= interval["high"] <= 1.0


def test_reproduce_goqa_names_make_models_when_the_model_is_missing(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("")
    assert main(["reproduce", "goqa", "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert "make models" in err and "models/SmolLM2-135M-Instruct" in err


def test_a_rerun_reuses_finished_runs(tmp_path, monkeypatch, spies):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("")
    args = ["compare", "--seeds", "1", "--out", "out",
            *_sets([*TINY, "data.generated.n_pairs=160"])]  # fmt: skip
    assert main(args) == 0
    first = json.loads((tmp_path / "out/results.json").read_text())
    trained = len(spies["train_splits"])
    assert main(args) == 0
    assert len(spies["train_splits"]) == trained  # nothing trained again
    again = json.loads((tmp_path / "out/results.json").read_text())
    assert again["methods"] == first["methods"]
    assert not math.isnan(again["methods"]["dpo"]["worst_group"]["loss"]["mean"])


def test_the_reference_key_follows_sft_settings_only():
    from grpo.modeling import ModelConfig
    from grpo.trainer import TrainConfig

    model, train = ModelConfig(), TrainConfig()
    key = experiment.reference_key(model, train, "data")
    assert experiment.reference_key(model, TrainConfig(eta_alpha=0.3, lr=0.1), "data") == key
    assert experiment.reference_key(model, TrainConfig(sft_lr=0.1), "data") != key
    assert experiment.reference_key(model, TrainConfig(seed=1), "data") != key
    assert experiment.reference_key(ModelConfig(lora=True), train, "data") != key
    assert experiment.reference_key(model, train, "other data") != key
    # a run's key covers every setting that changes what it computes
    assert experiment.run_key(model, TrainConfig(eta_alpha=0.3), "data") != experiment.run_key(
        model, train, "data"
    )
    assert experiment.run_key(model, TrainConfig(progress=False), "data") == experiment.run_key(
        model, train, "data"
    )


def test_two_worker_processes_compute_what_one_does(tmp_path, monkeypatch):
    """References and runs spread over two spawned processes: the same per-pair test values."""
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("")
    sets = _sets([*TINY, "data.generated.n_pairs=160", "model.threads=1"])
    assert main(["compare", "--seeds", "2", "--out", "one", *sets]) == 0
    assert main(["compare", "--seeds", "2", "--workers", "2", "--out", "two", *sets]) == 0
    one = json.loads((tmp_path / "one/results.json").read_text())
    two = json.loads((tmp_path / "two/results.json").read_text())
    for a, b in zip(one["runs"], two["runs"], strict=True):
        assert (a["seed"], a["method"]) == (b["seed"], b["method"])
        assert a["test"] == b["test"]
    assert one["methods"] == two["methods"]


def test_the_comparison_table_names_the_configured_confidence():
    from grpo.experiment_report import comparison_table

    c = {"method": "gr-dpo", "baseline": "dpo", "estimate": 0.1, "low": 0.0, "high": 0.2,
         "share_at_or_below_zero": 0.1, "items": 10}  # fmt: skip
    lines = comparison_table({"confidence": 0.9, "comparisons": {"gr-dpo": {"reward_accuracy": c}}})
    assert "| 90% interval |" in lines[0] and "95%" not in lines[0]
    assert "[+0.000, +0.200]" in lines[2]
