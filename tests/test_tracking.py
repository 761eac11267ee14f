"""MLflow tracking and gated registration on hand-made evaluation numbers (no training, no Prefect).

Each "run" logs made-up per-group accuracies and a tiny saved GPT-2, so the registry decisions
can be checked against numbers worked out by hand.
"""

from __future__ import annotations

import math

import pytest

GROUPS = ("a", "b", "c")


def fake_metrics(
    accs: dict[str, float], metric: str = "reward_accuracy", pairs: int = 100
) -> dict[str, float]:
    """Flat evaluation metrics as grpo.evaluation.flatten_metrics names them, worked out by hand
    (``pairs`` evaluated pairs in every group)."""
    out = {f"eval/group/{g}/{metric}": v for g, v in accs.items()}
    out |= {f"eval/group/{g}/pairs": float(pairs) for g in accs}
    out[f"eval/worst_group/{metric}"] = min(accs.values())
    out[f"eval/group_gap/{metric}"] = max(accs.values()) - min(accs.values())
    out[f"eval/overall/{metric}"] = sum(accs.values()) / len(accs)
    return out


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, GPT2Config

    from grpo.modeling import train_tokenizer

    path = tmp_path_factory.mktemp("tiny") / "model"
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    config = GPT2Config(
        n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=len(tok),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory):
    """An MLflow SQLite database with its tables created (the migrations take seconds: once)."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, empty_db):
    """A fresh SQLite MLflow store (a copy of the empty one); returns the experiment id."""
    import shutil

    from tasks import tracking

    shutil.copyfile(empty_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    uri, experiment_id = tracking.setup(tmp_path, "test")
    assert uri.endswith("mlflow.db")
    return experiment_id


def logged_run(experiment_id: str, model_dir, accs: dict[str, float], **tags) -> tuple[str, str]:
    """(run_id, model_uri) of a run holding ``accs`` as its evaluation and the tiny model."""
    from tasks import tracking

    run_id = tracking.start_run(experiment_id, tags={"train.method": "gr-dpo", **tags})
    tracking.log_evaluation(run_id, fake_metrics(accs))
    return run_id, tracking.log_model(run_id, model_dir)


def aliases(name: str = "m") -> dict[str, str]:
    from tasks.tracking import client

    return {k: str(v) for k, v in client().get_registered_model(name).aliases.items()}


def test_flatten_params_and_metric_names():
    from tasks.tracking import flatten, metric_name

    flat = flatten(
        {"train": {"lr": 0.001, "method": "gr-dpo"}, "data": {"generated": {"groups": ["x", "y"]}}}
    )
    assert flat == {"train.lr": "0.001", "train.method": "gr-dpo", "data.generated.groups": "x,y"}
    assert metric_name("eval/group/India (Current national sample)/loss") == (
        "eval/group/India _Current national sample_/loss"
    )


def test_per_group_table_from_flat_names():
    from tasks.tracking import per_group_table

    table = per_group_table(
        {**fake_metrics({"a": 0.5, "b": 0.25}), "eval/group/a/loss": 0.7, "train/loss": 1.0}
    )
    assert list(table["group"]) == ["a", "b"]
    assert table.set_index("group").loc["b", "reward_accuracy"] == 0.25
    assert table.set_index("group").loc["a", "loss"] == 0.7
    assert math.isnan(table.set_index("group").loc["b", "loss"])


def test_worst_group_loss_history_takes_the_max_per_step():
    from tasks.tracking import worst_group_loss_history

    history = [
        {"step": 1, "train/group_loss/a": 0.7, "train/group_loss/b": 0.9},
        {"step": 2, "train/group_loss/a": 0.8, "val/worst_group_loss": 0.85},
        {"step": 3, "train/loss": 0.5},
    ]
    assert worst_group_loss_history(history) == [
        {"step": 1, "worst/train": 0.9},
        {"step": 2, "worst/train": 0.8, "worst/validation": 0.85},
    ]


def test_run_logs_params_history_table_and_plots(store):
    from tasks import tracking

    run_id = tracking.start_run(store)
    tracking.log_params(run_id, {"train": {"method": "gr-dpo", "beta": 0.1}})
    log_fn = tracking.metric_logger(run_id)
    history = [
        {
            "step": s,
            "train/loss": 1.0 / s,
            "train/group_loss/a": 0.5 + s,
            "train/group_weight/a": 0.1 * s,
        }
        for s in (1, 2, 3)
    ]
    for record in history:
        log_fn({k: v for k, v in record.items() if k != "step"}, record["step"])
    evaluation = {
        "metrics": fake_metrics({"a": 0.75, "b": 0.5}),
        "samples": [
            {"pair_id": "p1", "group": "a", "prompt": "p", "chosen_rank": 1, "ranks_chosen_first": True,
             "options": [{"response": "A", "text": "yes", "mark": "chosen", "reward": 0.1},
                         {"response": "B", "text": "no", "mark": "rejected", "reward": -0.1}]}
        ],
    }  # fmt: skip
    table = tracking.log_results(
        run_id, history, evaluation, "reward_accuracy", skip_steps=(1, 2, 3)
    )
    tracking.end_run(run_id)
    client = tracking.client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.method": "gr-dpo", "train.beta": "0.1"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/group_weight/a")] == [
        (1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3)),
    ]  # fmt: skip
    assert run.data.metrics["eval/worst_group/reward_accuracy"] == 0.5
    assert list(table["group"]) == ["a", "b"]
    paths = {a.path for a in client.list_artifacts(run_id, "plots")} | {
        a.path for a in client.list_artifacts(run_id, "eval")
    }
    assert paths == {
        "plots/group_accuracy.png", "plots/group_weights.png", "plots/worst_group_loss.png",
        "eval/per_group.json", "eval/samples.json",
    }  # fmt: skip


def test_gate_and_champion_in_the_registry(store, tiny_model_dir):
    from tasks.register import RegisterConfig, register
    from tasks.tracking import client

    # the point-estimate gate (confidence 0): the registry mechanics on hand-made numbers
    cfg = RegisterConfig(model_name="m", min_worst_group_accuracy=0.5, confidence=0.0)

    # worst group 0.4 < 0.5: rejected, nothing registered even though the average is 0.7
    run0, uri0 = logged_run(store, tiny_model_dir, {"a": 0.9, "b": 0.8, "c": 0.4})
    out = register(run0, fake_metrics({"a": 0.9, "b": 0.8, "c": 0.4}), cfg, model_uri=uri0)
    assert out["decision"] == "rejected" and out["version"] is None
    assert client().search_registered_models() == []
    tags = client().get_run(run0).data.tags
    assert tags["gate.decision"] == "rejected"
    assert tags["gate.reason"] == (
        "c decides: reward_accuracy 0.4000 on 100 pairs (point estimate) < threshold 0.5000 "
        "(margin -0.1000)"
    )
    assert (out["group"], out["group_pairs"], out["confidence"]) == ("c", 100, 0.0)

    # first passing model (worst 0.6): version 1, champion
    accs1 = {"a": 0.7, "b": 0.6, "c": 0.9}
    run1, uri1 = logged_run(store, tiny_model_dir, accs1)
    out = register(run1, fake_metrics(accs1), cfg, model_uri=uri1)
    assert (out["decision"], out["version"], out["aliases"]) == (
        "registered",
        "1",
        ["challenger", "champion"],
    )
    assert out["champion_reason"] == "no champion yet"

    # passes the gate but worse than the champion (0.55 < 0.6): challenger only
    accs2 = {"a": 0.55, "b": 0.95, "c": 0.95}
    run2, uri2 = logged_run(store, tiny_model_dir, accs2)
    out = register(run2, fake_metrics(accs2), cfg, model_uri=uri2)
    assert out["version"] == "2" and out["aliases"] == ["challenger"] and out["champion"] == "1"
    assert aliases() == {"champion": "1", "challenger": "2"}
    mv2 = client().get_model_version("m", "2")
    assert mv2.tags["champion.decision"] == "kept" and mv2.tags["gate.decision"] == "passed"
    assert mv2.run_id == run2
    # no evaluated pairs were given: the champion's logged figure, and the tags say so
    assert mv2.tags["champion.reevaluated"] == "false" and mv2.tags["champion.previous"] == "1"
    assert mv2.tags["champion.champion_value"] == "0.600000"
    assert "logged figure" in mv2.tags["champion.reason"]
    assert out["champion_comparison"]["reevaluated"] is False

    # better worst group (0.65 >= 0.6): takes champion
    accs3 = {"a": 0.65, "b": 0.7, "c": 0.8}
    run3, uri3 = logged_run(store, tiny_model_dir, accs3)
    out = register(run3, fake_metrics(accs3), cfg, model_uri=uri3)
    assert out["version"] == "3" and aliases() == {"champion": "3", "challenger": "3"}
    assert client().get_run(run3).data.tags["registered.version"] == "3"

    # the champion loads with the transformers flavor and generates text
    import mlflow

    pipe = mlflow.transformers.load_model("models:/m@champion")
    text = pipe("the quick", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert text.startswith("the quick") and len(text) > len("the quick")


def test_promote_rechecks_the_gate(store, tiny_model_dir):
    from tasks.register import GateRejected, RegisterConfig, promote, register
    from tasks.tracking import client

    cfg = RegisterConfig(model_name="m", min_worst_group_accuracy=0.5, confidence=0.0)
    for accs in ({"a": 0.6, "b": 0.7}, {"a": 0.8, "b": 0.9}):
        run_id, uri = logged_run(store, tiny_model_dir, accs)
        register(run_id, fake_metrics(accs), cfg, model_uri=uri)
    assert aliases()["champion"] == "2"
    strict = RegisterConfig(model_name="m", min_worst_group_accuracy=0.65, confidence=0.0)
    with pytest.raises(GateRejected, match=r"a decides: reward_accuracy 0\.6000 on 100 pairs"):
        promote("m", "1", strict)
    # the interval gate on the logged figures: 80/100 has 95% lower bound 0.7112 < 0.75
    # (centre (0.8 + 0.019207)/1.038415 = 0.788906, half 1.959964·0.041183/1.038415 = 0.077731)
    with pytest.raises(GateRejected, match=r"95% lower bound 0\.7112 < threshold 0\.7500"):
        promote("m", "2", RegisterConfig(model_name="m", min_worst_group_accuracy=0.75))
    with pytest.raises(GateRejected, match=r"too few evaluated pairs: a 100, b 100 < "):
        promote("m", "2", RegisterConfig(model_name="m", min_group_pairs=101))
    assert aliases()["champion"] == "2"
    out = promote("m", "1", strict, force=True)
    assert out["previous_champion"] == "2" and "--force" in out["reason"]
    assert aliases()["champion"] == "1"
    # the registered model's description names the new champion (it named none or 2 before)
    description = client().get_registered_model("m").description
    assert "Champion: version 1 (promoted by hand from version 2" in description
    assert promote("m", "2", cfg)["gate"] == "passed" and aliases()["champion"] == "2"


def test_run_record_params_data_tags_and_failure(store, tmp_path):
    """open_run / record_data / close_run: what both pipelines write, checked tag by tag."""
    from tasks import tracking

    resolved = {"train": {"method": "gr-ipo", "beta": 0.01}, "data": {"source": "generated"}}
    run = tracking.open_run(tmp_path, "test", resolved, pipeline="dvc")
    assert run["experiment_id"] == store
    data = {"md5": "abc.dir", "sha256": "f" * 64, "git_rev": None, "source": "generated",
            "rows": 360, "groups": ["Northland", "Island"], "path": "/elsewhere"}  # fmt: skip
    tracking.record_data(run["run_id"], data)
    report = tmp_path / "report.json"
    report.write_text("{}")
    failure = {"stage": "validate", "error": "2 expectations failed", "report_path": str(report)}
    tracking.close_run(run["run_id"], "FAILED", failure)

    got = tracking.client().get_run(run["run_id"])
    assert got.info.status == "FAILED"
    assert got.data.params == {
        "train.method": "gr-ipo",
        "train.beta": "0.01",
        "data.source": "generated",
    }
    tags = {k: v for k, v in got.data.tags.items() if not k.startswith("mlflow.")}
    # data.git_rev was None (not a git work tree): no tag
    assert tags == {
        "train.method": "gr-ipo",
        "pipeline": "dvc",
        "data.md5": "abc.dir",
        "data.sha256": "f" * 64,
        "data.source": "generated",
        "data.rows": "360",
        "data.groups": "Northland,Island",
        "pipeline.failed_stage": "validate",
        "pipeline.error": "2 expectations failed",
    }
    artifacts = [a.path for a in tracking.client().list_artifacts(run["run_id"], "validation")]
    assert artifacts == ["validation/report.json"]
