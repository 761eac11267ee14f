"""`grpo run` end to end on the embedded defaults (sizes turned down), checking MLflow's contents.

One Prefect test server for the module; MLflow in a SQLite file under tmp; the project root is
an empty tmp folder (embedded defaults, no params.yaml), data not DVC-tracked (the data tests
cover DVC). The first run trains; later runs reuse the cached training (same data, same
config), so the gate and champion rules are exercised on known, identical numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

GROUPS = ("Northland", "Southland", "Island")
SMALL = [
    "data.track=false",
    "data.generated.n_pairs=360",
    "model.config={model_type: gpt2, n_layer: 1, n_head: 2, n_embd: 32, n_positions: 256}",
    "model.tokenizer_vocab_size=320",
    "train.epochs=0",
    "train.max_steps=4",
    "train.batch_size=8",
    "train.eval_every=2",
    "train.progress=false",
    "evaluate.samples=1",
    "evaluate.max_new_tokens=4",
    "register.min_group_pairs=5",  # 360 pairs: about 10 test pairs in the smallest group
]
METRICS = ("loss", "reward_accuracy", "logprob_accuracy")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("project")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    mp.setenv("PREFECT_HOME", str(root / ".prefect"))
    mp.chdir(root)
    with prefect_test_harness(server_startup_timeout=120):
        yield root
    mp.undo()


def grpo(*argv: str) -> int:
    from flows.cli import main

    return main(list(argv))


def run(*overrides: str, json_path: Path | None = None) -> tuple[int, dict | None]:
    argv = ["run", *[a for o in (*SMALL, *overrides) for a in ("--set", o)]]
    if json_path is not None:
        argv += ["--json", str(json_path)]
    code = grpo(*argv)
    summary = (
        json.loads(json_path.read_text()) if json_path is not None and json_path.exists() else None
    )
    return code, summary


def client():
    import mlflow

    return mlflow.MlflowClient()


def aliases(name="grpo-policy") -> dict[str, str]:
    return {k: str(v) for k, v in client().get_registered_model(name).aliases.items()}


def versions(name="grpo-policy") -> list[str]:
    return sorted(str(v.version) for v in client().search_model_versions(f"name = '{name}'"))


def test_pipeline_tracks_gates_and_promotes(project, capsys):
    # 1. threshold 0: registered as version 1, champion (no champion before)
    code, first = run("register.min_worst_group_accuracy=0", json_path=project / "s1.json")
    assert code == 0
    out = capsys.readouterr().out
    assert "per-group evaluation" in out and "mlflow server --backend-store-uri sqlite:" in out
    assert first["gate"]["decision"] == "registered"
    assert first["registered"]["version"] == "1"
    assert first["registered"]["aliases"] == ["challenger", "champion"]
    assert not first["train"]["cached"]
    assert aliases() == {"champion": "1", "challenger": "1"}

    run_data = client().get_run(first["run_id"]).data
    metrics, tags, params = run_data.metrics, run_data.tags, run_data.params
    for metric in METRICS:
        for group in GROUPS:
            assert f"eval/group/{group}/{metric}" in metrics
        for kind in ("worst_group", "overall", "group_gap"):
            assert f"eval/{kind}/{metric}" in metrics
    # the worst group's accuracy is the minimum of the groups', the gap max − min
    accs = [metrics[f"eval/group/{g}/reward_accuracy"] for g in GROUPS]
    assert metrics["eval/worst_group/reward_accuracy"] == pytest.approx(min(accs))
    assert metrics["eval/group_gap/reward_accuracy"] == pytest.approx(max(accs) - min(accs))
    assert first["evaluation"]["worst_group"]["value"] == pytest.approx(min(accs))
    # every group with its pairs and the interval of each accuracy; the gate on the lower bounds
    for row in first["evaluation"]["per_group"]:
        g, n = row["group"], row["pairs"]
        assert n >= 5 and n == metrics[f"eval/group/{g}/pairs"]
        assert row["reward_accuracy_ci_low"] <= row["reward_accuracy"]
        assert row["reward_accuracy"] <= row["reward_accuracy_ci_high"]
        assert metrics[f"eval/group/{g}/reward_accuracy_ci_low"] == row["reward_accuracy_ci_low"]
    assert sum(r["pairs"] for r in first["evaluation"]["per_group"]) == first["evaluation"]["pairs"]
    gate = first["gate"]
    assert (gate["confidence"], gate["min_group_pairs"], gate["threshold"]) == (0.95, 5, 0.0)
    lows = {r["group"]: r["reward_accuracy_ci_low"] for r in first["evaluation"]["per_group"]}
    assert gate["bound"] == pytest.approx(min(lows.values())) and gate["group"] in GROUPS
    assert "95% CI" in out
    # the reference is logged beside the policy: the version can be re-scored from the registry
    ref = {a.path for a in client().list_artifacts(first["run_id"], "reference")}
    assert "reference/config.json" in ref
    # per-step training metrics, every group's loss and weight, one value per step
    for group in GROUPS:
        weights = client().get_metric_history(first["run_id"], f"train/group_weight/{group}")
        assert [m.step for m in weights] == [1, 2, 3, 4]
    total = sum(
        client().get_metric_history(first["run_id"], f"train/group_weight/{g}")[-1].value
        for g in GROUPS
    )
    assert total == pytest.approx(1.0, abs=1e-5)  # group weights stay on the simplex
    assert client().get_metric_history(first["run_id"], "train/group_loss/Northland")
    # resolved config as params, data version and decision as tags
    assert params["train.method"] == "gr-dpo" and params["train.max_steps"] == "4"
    assert params["register.min_worst_group_accuracy"] == "0.0"
    assert len(tags["data.sha256"]) == 64 and tags["data.source"] == "generated"
    assert tags["gate.decision"] == "passed" and "threshold 0.0000" in tags["gate.reason"]
    # per-group table and plots
    import mlflow

    mlflow.set_experiment("grpo")  # load_table searches the current experiment
    table = mlflow.load_table("eval/per_group.json", run_ids=[first["run_id"]])
    assert sorted(table["group"]) == sorted(GROUPS)
    assert table.set_index("group").loc["Island", "reward_accuracy"] == pytest.approx(
        metrics["eval/group/Island/reward_accuracy"]
    )
    plots = {a.path for a in client().list_artifacts(first["run_id"], "plots")}
    assert plots == {
        "plots/group_accuracy.png",
        "plots/group_weights.png",
        "plots/worst_group_loss.png",
    }
    # the champion loads as a transformers pipeline and generates text
    pipe = mlflow.transformers.load_model("models:/grpo-policy@champion")
    generated = pipe("Question: which way?", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert generated.startswith("Question: which way?") and len(generated) > len(
        "Question: which way?"
    )
    mv = client().get_model_version("grpo-policy", "1")
    assert mv.run_id == first["run_id"] and mv.tags["gate.decision"] == "passed"

    # 2. threshold 1.01: nothing registered; the run says why (training is cached)
    code, second = run("register.min_worst_group_accuracy=1.01", json_path=project / "s2.json")
    assert code == 0
    assert second["train"]["cached"]
    assert second["evaluation"]["worst_group"]["value"] == pytest.approx(min(accs))
    assert second["gate"]["decision"] == "rejected" and second["registered"]["version"] is None
    assert versions() == ["1"] and aliases() == {"champion": "1", "challenger": "1"}
    tags2 = client().get_run(second["run_id"]).data.tags
    assert tags2["gate.decision"] == "rejected" and "< threshold 1.0100" in tags2["gate.reason"]
    # the cached run still carries the per-step history
    assert len(client().get_metric_history(second["run_id"], "train/loss")) == 4

    # 3. an equally good model with a margin of 0.01: registered, challenger, champion stays
    code, third = run(
        "register.min_worst_group_accuracy=0",
        "register.champion_margin=0.01",
        json_path=project / "s3.json",
    )
    assert code == 0 and third["registered"]["version"] == "2"
    assert aliases() == {"champion": "1", "challenger": "2"}
    assert client().get_model_version("grpo-policy", "2").tags["champion.decision"] == "kept"
    # the champion was re-scored on the challenger's pairs: the same model, so the same outcomes
    comparison = third["registered"]["champion_comparison"]
    assert comparison["reevaluated"] and comparison["champion_version"] == "1"
    assert comparison["evaluated_on"]["pairs"] == third["evaluation"]["pairs"]
    assert comparison["champion_value"] == pytest.approx(min(accs))
    paired = comparison["paired"]
    assert (paired["difference"], paired["low"], paired["high"], paired["mcnemar_p"]) == (
        0.0, 0.0, 0.0, 1.0,
    )  # fmt: skip

    # 4. equally good, no margin: "at least as good" takes champion
    code, fourth = run("register.min_worst_group_accuracy=0", json_path=project / "s4.json")
    assert code == 0 and fourth["registered"]["version"] == "3"
    assert aliases() == {"champion": "3", "challenger": "3"}

    # 5. `grpo audit` lists them, newest first, with the logged per-group accuracies
    capsys.readouterr()
    assert grpo("audit", "--format", "json", "--plot", str(project / "audit.png")) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in records] == ["3", "2", "1"]
    assert records[0]["aliases"] == ["challenger", "champion"] and records[2]["aliases"] == []
    assert records[2]["groups"]["Island"] == pytest.approx(
        metrics["eval/group/Island/reward_accuracy"]
    )
    assert records[2]["worst_value"] == pytest.approx(min(accs))
    assert records[2]["method"] == "gr-dpo" and records[2]["data_md5"] is None  # not DVC-tracked
    assert (project / "audit.png").stat().st_size > 0

    # 6. promote by hand: the gate is re-checked unless --force
    assert grpo("promote", "grpo-policy", "1", "--threshold", "1.01") == 1
    assert aliases()["champion"] == "3"
    assert grpo("promote", "grpo-policy", "1", "--threshold", "1.01", "--force") == 0
    assert aliases()["champion"] == "1"


def test_failed_validation_stops_before_training(project, capsys):
    before = {
        r.info.run_id
        for r in client().search_runs([e.experiment_id for e in client().search_experiments()])
    }
    registered = versions() if client().search_registered_models() else []
    code, summary = run(
        "validate.min_pairs_per_split=100000", "train.seed=123", json_path=project / "bad.json"
    )
    assert code == 1 and summary is None
    err = capsys.readouterr().err
    assert "stage validate failed" in err and "report kept at" in err
    assert (project / "reports" / "validation" / "report.json").exists()
    # nothing trained (train.seed=123 is a config no run used), nothing registered
    trained = [p for p in (project / "outputs" / "runs").glob("*/train/result.json")]
    assert all(json.loads(p.read_text())["steps"] == 4 for p in trained)
    assert len(trained) <= 1
    assert (versions() if client().search_registered_models() else []) == registered
    new = [
        r
        for r in client().search_runs([e.experiment_id for e in client().search_experiments()])
        if r.info.run_id not in before
    ]
    assert len(new) == 1 and new[0].info.status == "FAILED"
    assert new[0].data.tags["pipeline.failed_stage"] == "validate"
    assert not any(k.startswith("eval/") for k in new[0].data.metrics)


def test_bad_config_is_a_clear_error(project, capsys):
    assert grpo("run", "--set", "train.method=grpo-fancy") == 2
    err = capsys.readouterr().err
    assert err.startswith("grpo run: error:") and "grpo-fancy" in err and "Traceback" not in err


def test_failed_training_is_one_line_and_registers_nothing(project, capsys):
    registered = versions() if client().search_registered_models() else []
    code, summary = run("train.batch_size=4096", json_path=project / "bad-train.json")
    assert code == 1 and summary is None
    err = capsys.readouterr().err
    assert "stage train failed" in err and "batch_size 4096" in err and "Traceback" not in err
    assert (versions() if client().search_registered_models() else []) == registered
    experiments = [e.experiment_id for e in client().search_experiments()]
    latest = client().search_runs(experiments, order_by=["start_time DESC"], max_results=1)[0]
    assert latest.info.status == "FAILED" and latest.data.tags["pipeline.failed_stage"] == "train"


# --- one stage path: `dvc repro` and `grpo run` give the same outputs and the same record ----

RUN_SPECIFIC_TAGS = {"pipeline", "registered.version", "champion.reason", "pipeline.run_folder"}


def _project_with_dvc(path: Path) -> Path:
    """This working tree's code, dvc.yaml and a params.yaml of the SMALL settings (DVC-tracked
    data), in a fresh git + DVC repository with a local remote."""
    import shutil

    import yaml

    from grpo.config import apply_overrides, load_yaml
    from tests.test_data_dvc import make_repo

    here = Path(__file__).resolve().parents[1]
    path.mkdir()
    for name in ("grpo", "tasks", "flows"):
        shutil.copytree(here / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(here / "dvc.yaml", path / "dvc.yaml")
    small = [*SMALL, "data.track=true", "register.min_worst_group_accuracy=0"]
    params = apply_overrides(load_yaml(here / "params.yaml"), small)  # DVC wants every section
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    return make_repo(path)


def _latest_run(uri: str):
    import mlflow

    c = mlflow.MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(experiments, order_by=["start_time DESC"], max_results=1)[0]


def test_dvc_repro_and_grpo_run_write_the_same_outputs_and_record(tmp_path):
    import csv
    import os
    import subprocess
    import sys

    from grpo.metric_names import TRAIN_STEP_TIME

    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "grpo").exists() or not (bin_dir / "dvc").exists():
        pytest.skip("the grpo and dvc commands are not installed beside this Python")
    project = _project_with_dvc(tmp_path / "project")
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "PYTHONPATH": str(project),
            "MLFLOW_TRACKING_URI": uri, "PREFECT_HOME": str(project / ".prefect")}  # fmt: skip

    def sh(*cmd: str) -> str:
        out = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    def outputs() -> dict[str, object]:
        files = ("evaluate/metrics.json", "evaluate/per_group.json", "data/ingest.json",
                 "data/validation.json", "evaluate/evaluation.json",
                 "evaluate/per_pair.json")  # fmt: skip
        found = {f: json.loads((project / "outputs" / f).read_text()) for f in files}
        with (project / "outputs/train/history.csv").open() as fh:  # all but the timings
            found["train/history.csv"] = [
                {k: v for k, v in row.items() if k != TRAIN_STEP_TIME} for row in csv.DictReader(fh)
            ]
        return found

    sh("dvc", "repro")
    by_dvc, dvc_run = outputs(), _latest_run(uri)
    sh("grpo", "run", "--json", str(tmp_path / "summary.json"))
    by_flow, flow_run = outputs(), _latest_run(uri)

    # the same numbers at the paths dvc.yaml declares, refreshed by the flow
    assert by_flow == by_dvc
    groups = [row["group"] for row in by_dvc["evaluate/per_group.json"]]
    assert sorted(groups) == sorted(GROUPS)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["evaluation"]["per_group"] == by_dvc["evaluate/per_group.json"]
    shown = json.loads(sh("dvc", "metrics", "show", "--json"))
    assert "eval/group/Island/reward_accuracy" in json.dumps(shown)

    # the same MLflow record: params, tags (but which path ran), metric names, evaluation
    assert flow_run.info.run_id != dvc_run.info.run_id
    assert flow_run.data.params == dvc_run.data.params
    tags = [{k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")}
            for r in (dvc_run, flow_run)]  # fmt: skip
    assert set(tags[0]) == set(tags[1])
    assert {k for k in tags[0] if tags[0][k] != tags[1][k]} <= RUN_SPECIFIC_TAGS
    assert (tags[0]["pipeline"], tags[1]["pipeline"]) == ("dvc", "prefect")
    assert tags[0]["data.md5"].endswith(".dir") and tags[0]["data.groups"] == ",".join(GROUPS)
    assert tags[0]["eval.split"] == "test" and tags[0]["train.steps"] == "4"
    assert set(flow_run.data.metrics) == set(dvc_run.data.metrics)
    evaluation = {k: v for k, v in dvc_run.data.metrics.items() if k.startswith("eval/")}
    assert {k: flow_run.data.metrics[k] for k in evaluation} == evaluation
    assert evaluation == by_dvc["evaluate/metrics.json"]
