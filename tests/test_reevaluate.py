"""Versions compared on the same data, from the registry alone: the champion re-scored on the
challenger's pairs at registration, and an audit of versions trained on different data versions,
re-evaluated on one.

Two tiny "unigram" GPT-2s make the outcomes known by construction. With ``ln_f.weight = 0`` the
final hidden state is ``ln_f.bias = v`` at every position, so the next-token logits are
``v · wte`` whatever the context. With ``wte`` zero except coordinate 0 for the word "fox"'s
tokens and coordinate 1 for "dog"'s, ``v = (s, −s, 0, …)`` gives fox's tokens logit +s, dog's −s,
every other token 0 (model FOX); ``v = (−s, s, …)`` the reverse (model DOG); ``v = 0`` the uniform
distribution (the reference). Against the uniform reference, with L = log Σ e^logit − log V
(0 < L < s for s = 4 and a few hundred tokens), a pair's h is
n_c(l_c − L) − n_r(l_r − L) (EOS appended to both cancels): positive exactly when the chosen word
is the one the model favours. So FOX is right on every "fox is chosen" pair and wrong on every
"dog is chosen" pair, and DOG the reverse.

Data version 1: 20 test pairs per group (a, b), fox always chosen. Data version 2: 20 per group,
dog chosen in 14, fox in 6. FOX trained "on v1" logs 20/20 = 1.0 per group; DOG on v2 gets
14/20 = 0.7; FOX re-scored on v2 gets 6/20 = 0.3.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from tests.test_tracking import empty_db  # noqa: F401

GROUPS = ("a", "b")
BETA = 0.5


def write_data(path, dog_chosen: int, per_group: int = 20):
    """A test split of ``per_group`` pairs per group, dog chosen in the first ``dog_chosen``."""
    import pandas as pd

    from grpo.data.schema import write_pairs

    rows = []
    for g in GROUPS:
        for i in range(per_group):
            dog = i < dog_chosen
            rows.append({
                "pair_id": f"{g}-{i:02d}", "question_id": f"q{i:02d}", "group": g,
                "prompt": f"Question {i} from {g}: which animal?",
                "chosen": "dog" if dog else "fox", "rejected": "fox" if dog else "dog",
                "split": "test",
            })  # fmt: skip
    return write_pairs(pd.DataFrame(rows), path)


def unigram_model(tok, path, favour: float) -> str:
    """Save a tiny GPT-2 whose logits are +s·favour on fox's tokens and −s·favour on dog's."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(
        n_layer=1, n_head=2, n_embd=8, n_positions=128, vocab_size=len(tok),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte.zero_()
        for word, column in (("fox", 0), ("dog", 1)):
            ids = tok(" " + word, add_special_tokens=False)["input_ids"]
            wte[ids, column] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[:2] = torch.tensor([4.0 * favour, -4.0 * favour])
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, empty_db):  # noqa: F811
    """An MLflow store with model "m": v1 FOX on data v1 without a reference artifact (as
    registered before this change), v2 FOX on data v1, v3 DOG on data v2."""
    import shutil

    from grpo.modeling import train_tokenizer
    from tasks import tracking

    root = tmp_path_factory.mktemp("reevaluate")
    mp = pytest.MonkeyPatch()
    shutil.copyfile(empty_db, root / "mlflow.db")
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    _, experiment = tracking.setup(root, "test")
    texts = [f"Question {i} from {g}: which animal? fox dog" for i in range(20) for g in GROUPS]
    tok = train_tokenizer(texts * 5, vocab_size=300)
    w = {
        "root": root,
        "experiment": experiment,
        "v1": write_data(root / "v1.parquet", dog_chosen=0),
        "v2": write_data(root / "v2.parquet", dog_chosen=14),
        "reference": unigram_model(tok, root / "reference", 0.0),
        "fox": unigram_model(tok, root / "fox", 1.0),
        "dog": unigram_model(tok, root / "dog", -1.0),
        "decisions": [],
    }
    for model, data, with_reference in (("fox", "v1", False), ("fox", "v1", True), ("dog", "v2", True)):  # fmt: skip
        w["decisions"].append(register_version(w, model, data, with_reference))
    yield w
    mp.undo()


def register_config(**kw):
    from tasks.register import RegisterConfig

    return RegisterConfig(model_name="m", min_worst_group_accuracy=0.4, **kw)


def evaluate(w, model: str, data: str, groups=GROUPS, out: str = "eval"):
    from tasks.evaluate import EvaluateConfig
    from tasks.evaluate import evaluate as run_evaluation

    return run_evaluation(
        w[data], w[model], w["reference"], EvaluateConfig(samples=0), w["root"] / out / model / data,
        beta=BETA, method="dpo", groups=groups, confidence=0.95,
    )  # fmt: skip


def register_version(w, model: str, data: str, with_reference: bool) -> dict:
    """What the register stage does: a run with params, data tag, evaluation, model (and
    reference), then the gate with the evaluated pairs as evidence."""
    from tasks import tracking
    from tasks.register import Evidence, register

    evaluation = evaluate(w, model, data)
    run_id = tracking.start_run(w["experiment"], tags={"train.method": "dpo", "data.md5": data})
    tracking.log_params(run_id, {"train": {"beta": BETA, "method": "dpo"},
                                 "model": {"max_prompt_tokens": 64, "max_response_tokens": 8}})  # fmt: skip
    tracking.log_evaluation(run_id, evaluation["metrics"])
    uri = tracking.log_model(run_id, w[model])
    if with_reference:
        tracking.log_reference(run_id, w["reference"])
    evidence = Evidence(w[data], evaluation["per_pair"], "test", groups=GROUPS)
    return register(
        run_id, evaluation["metrics"], register_config(), model_uri=uri, evidence=evidence
    )


def test_evaluations_are_what_the_construction_says(world):
    fox_v1 = evaluate(world, "fox", "v1", out="check")
    dog_v2 = evaluate(world, "dog", "v2", out="check")
    fox_v2 = evaluate(world, "fox", "v2", out="check")
    for g in GROUPS:
        assert fox_v1["metrics"][f"eval/group/{g}/reward_accuracy"] == 1.0
        assert dog_v2["metrics"][f"eval/group/{g}/reward_accuracy"] == pytest.approx(0.7)
        assert fox_v2["metrics"][f"eval/group/{g}/reward_accuracy"] == pytest.approx(0.3)
        assert dog_v2["metrics"][f"eval/group/{g}/pairs"] == 20.0
    # right exactly where dog is chosen: the first 14 pairs of each group
    assert dog_v2["per_pair"]["reward_accuracy"] == ([1] * 14 + [0] * 6) * 2
    assert dog_v2["per_pair"]["pair_id"][:2] == ["a-00", "a-01"]


def test_a_configured_group_without_pairs_fails_the_gate(world):
    evaluation = evaluate(world, "dog", "v2", groups=("a", "b", "c"), out="three")
    assert evaluation["metrics"]["eval/group/c/pairs"] == 0.0
    assert math.isnan(evaluation["metrics"]["eval/worst_group/reward_accuracy"])
    decision = register_config().gate(evaluation["metrics"])
    assert not decision.passed and decision.reason == "no evaluated pairs for group(s) c"
    rows = json.loads((world["root"] / "three/dog/v2/per_group.json").read_text())
    assert [r["group"] for r in rows] == ["a", "b", "c"] and rows[2]["pairs"] == 0


def test_an_old_champion_without_reference_is_judged_on_its_logged_figure(world):
    first, second, _ = world["decisions"]
    assert first["version"] == "1" and first["champion_reason"] == "no champion yet"
    # 20/20 per group: lower bound 1/(1 + z²/20) = 0.838875 >= 0.4
    assert first["bound"] == pytest.approx(1 / (1 + 1.959964**2 / 20), abs=1e-6)
    comparison = second["champion_comparison"]
    assert comparison["reevaluated"] is False and "no reference artifact" in comparison["note"]
    assert comparison["champion_value"] == 1.0  # v1's logged figure
    assert "champion v1's logged figure" in second["champion_reason"]
    from tasks.tracking import client

    tags = client().get_model_version("m", "2").tags
    assert tags["champion.reevaluated"] == "false" and "no reference" in tags["champion.note"]


def test_the_champion_is_re_evaluated_on_the_challengers_pairs(world):
    from tasks.register import version_metrics
    from tasks.tracking import client

    third = world["decisions"][2]
    # the champion (v2, FOX) logged 1.0 on its own data: the old rule would keep it over 0.7
    assert version_metrics("m", "2")["eval/worst_group/reward_accuracy"] == 1.0
    assert third["value"] == pytest.approx(0.7)
    # 14/20: Wilson centre (0.7 + 0.096036)/1.192073 = 0.667775, half 0.186748 → 0.481027
    assert third["bound"] == pytest.approx(0.481027, abs=2e-6)
    comparison = third["champion_comparison"]
    assert comparison["reevaluated"] is True and comparison["champion_version"] == "2"
    assert comparison["champion_value"] == pytest.approx(0.3)  # FOX on data v2: 6/20
    assert comparison["challenger_value"] == pytest.approx(0.7)
    assert comparison["evaluated_on"] == {"md5": "v2", "split": "test", "pairs": 40}
    paired = comparison["paired"]
    assert paired["difference"] == pytest.approx(0.4)
    assert paired["low"] <= 0.4 <= paired["high"]
    # McNemar on the challenger's worst group (a, the first of the tied): DOG alone right on 14
    # pairs, FOX alone on 6: p = 2·Σ_{i≤6} C(20, i)/2²⁰ = 2·60460/1048576
    assert (paired["group"], paired["only_challenger"], paired["only_champion"]) == ("a", 14, 6)
    assert paired["mcnemar_p"] == pytest.approx(2 * 60460 / 1048576)
    assert third["aliases"] == ["challenger", "champion"] and third["champion"] == "3"
    assert "re-evaluated on the challenger's 40 test pairs" in third["champion_reason"]
    tags = client().get_model_version("m", "3").tags
    assert tags["champion.decision"] == "promoted" and tags["champion.reevaluated"] == "true"
    assert tags["champion.champion_value"] == "0.300000"
    assert tags["champion.evaluated_on"] == "40 test pairs, data v2"
    assert "McNemar on a: 14 vs 6 discordant" in tags["champion.paired"]


def test_audit_marks_versions_logged_on_other_data(world):
    from tasks.audit import audit, render

    records = audit("m")
    assert [r["version"] for r in records] == ["3", "2", "1"]
    assert [r["same_data_as_newest"] for r in records] == [True, False, False]
    assert [r["groups"]["a"] for r in records] == pytest.approx([0.7, 1.0, 1.0])
    assert "v1*" in render(records, "table")  # data md5 "v1", marked


def test_audit_reevaluates_every_version_on_the_same_pairs(world, tmp_path):
    from tasks.audit import audit_pairs, log_audit, plot, reevaluate, render
    from tasks.tracking import client

    frame = audit_pairs(world["v2"], "test")
    where = {"md5": "v2", "split": "test", "pairs": len(frame)}
    records = reevaluate("m", frame, where, groups=GROUPS)
    assert [r["version"] for r in records] == ["3", "2", "1"]
    assert all(r["evaluated_on"] == where for r in records) and where["pairs"] == 40
    assert [r["reevaluated"] for r in records] == [True, True, False]
    assert records[0]["groups"] == pytest.approx({"a": 0.7, "b": 0.7})
    assert records[1]["groups"] == pytest.approx({"a": 0.3, "b": 0.3})  # was 1.0 as logged
    assert records[1]["worst_value"] == pytest.approx(0.3) and records[1]["gap"] == 0.0
    assert records[0]["group_pairs"] == {"a": 20, "b": 20}
    # 6/20: centre (0.3 + 0.096036)/1.192073 = 0.332225, half 0.186748 → [0.145477, 0.518973]
    assert records[1]["groups_ci"]["b"] == pytest.approx([0.145477, 0.518973], abs=2e-6)
    assert records[2]["groups"] == {} and "no reference artifact" in records[2]["note"]
    assert records[0]["data_md5"] == "v2" and records[1]["data_md5"] == "v1"  # today's keys
    md = render(records, "markdown")
    assert "a (n=20)" in md and "0.300 [0.15, 0.52]" in md
    assert "every version scored on the same 40 test pairs (data v2)" in md
    assert "version 1: not re-evaluated" in md
    assert plot(records, tmp_path / "audit.png").read_bytes()[:4] == b"\x89PNG"
    run_id = log_audit(world["root"], "m", records)
    run = client().get_run(run_id)
    experiment = client().get_experiment(run.info.experiment_id)
    assert experiment.name == "grpo-audit" and run.data.params["evaluated_on.md5"] == "v2"
    paths = {a.path for a in client().list_artifacts(run_id, "audit")}
    assert {"audit/audit.json", "audit/audit.md", "audit/per_group.png"} <= paths


def test_audit_command_reevaluates_listed_versions(world, tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    md5 = hashlib.md5(world["v2"].read_bytes()).hexdigest()
    argv = ["audit", "--model", "m", "--reevaluate", "--data", str(world["v2"]),
            "--versions", "2,3", "--format", "json", "--plot", str(tmp_path / "a.png")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr()
    rows = json.loads(out.out)
    assert [r["version"] for r in rows] == ["3", "2"]
    assert {json.dumps(r["evaluated_on"]) for r in rows} == {
        json.dumps({"md5": md5, "split": "test", "pairs": 40})
    }
    assert rows[1]["groups"] == pytest.approx({"a": 0.3, "b": 0.3})
    assert "grpo-audit" in out.err and (tmp_path / "a.png").exists()
    assert main(["audit", "--model", "m", "--reevaluate", "--data", str(world["v2"]),
                 "--versions", "9"]) == 1  # fmt: skip
    assert "no version(s) 9" in capsys.readouterr().err
    assert main(["audit", "--model", "m", "--versions", "2"]) == 2  # needs --reevaluate
