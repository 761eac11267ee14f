"""The tools' own conventions: MLflow 3 (experiment kind, run names, dataset inputs, registry
descriptions, the UI hint), Prefect 3 (flow run name, tags, logs, artifacts), DVC (metrics and
plots after `grpo run`, `make dvc-repro` from a shell where nothing is activated)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("Northland", "Southland", "Island")
MD5 = "0123456789abcdef0123456789abcdef.dir"  # a DVC folder md5: 36 characters


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_experiment_run_name_and_dataset_inputs(store):
    import mlflow

    from tasks import dvc_dataset, tracking

    resolved = {"train": {"method": "gr-dpo", "seed": 3}, "evaluate": {"split": "validation"}}
    run = tracking.open_run(store, "exp", resolved, pipeline="prefect")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment(run["experiment_id"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "worst group" in experiment.tags["mlflow.note.content"]
    assert client.get_run(run["run_id"]).info.run_name == "gr-dpo-s3"  # no data version yet
    data = {"md5": MD5, "sha256": "f" * 64, "git_rev": "abc1234", "source": "generated",
            "rows": 10, "groups": list(GROUPS), "path": "data/pairs.parquet",
            "dvc_file": "data.dvc", "split_counts": {"train": 6, "validation": 2, "test": 2}}  # fmt: skip
    tracking.record_data(run["run_id"], data)
    got = client.get_run(run["run_id"])
    assert got.info.run_name == "gr-dpo-01234567-s3"  # method, DVC md5's first 8, seed
    inputs = {i.dataset.name: i for i in got.inputs.dataset_inputs}
    assert set(inputs) == {"pairs-train", "pairs-validation"}
    contexts = {n: {t.key: t.value for t in i.tags} for n, i in inputs.items()}
    assert contexts["pairs-train"] == {"mlflow.data.context": "training", "rows": "6"}
    assert contexts["pairs-validation"] == {"mlflow.data.context": "evaluation", "rows": "2"}
    dataset = inputs["pairs-train"].dataset
    assert dataset.digest == MD5 and dataset.source_type == "dvc"
    assert json.loads(dataset.source) == {
        "path": "data/pairs.parquet", "rev": "abc1234", "dvc_file": "data.dvc", "md5": MD5,
    }  # fmt: skip
    source = mlflow.data.get_source(inputs["pairs-train"])  # registered: it round-trips
    assert isinstance(source, dvc_dataset.DVCDatasetSource) and source.md5 == MD5
    # an experiment made before the convention gets the tag when next used
    client.delete_experiment_tag(run["experiment_id"], "mlflow.experimentKind")
    tracking.setup(store, "exp")
    assert client.get_experiment(run["experiment_id"]).tags["mlflow.experimentKind"]


def test_the_dvc_source_reads_the_file_back_at_its_revision(tmp_path, monkeypatch):
    from dvc.repo import Repo

    from tasks.dvc_dataset import DVCDatasetSource
    from tests.test_data_dvc import git, make_repo

    repo = make_repo(tmp_path / "repo")
    (repo / "data").mkdir()
    (repo / "data" / "pairs.parquet").write_bytes(b"version 1")
    with Repo(str(repo)) as dvc_repo:
        dvc_repo.add([str(repo / "data")])
    git(repo, "add", "data.dvc", ".gitignore")
    git(repo, "commit", "-q", "-m", "data v1")
    rev = git(repo, "rev-parse", "HEAD")
    (repo / "data" / "pairs.parquet").write_bytes(b"version 2")  # the workspace moved on
    monkeypatch.chdir(repo)
    source = DVCDatasetSource("data/pairs.parquet", rev, "data.dvc", None)
    assert Path(source.load(str(tmp_path / "out"))).read_bytes() == b"version 1"


def test_untracked_data_is_named_by_its_sha256():
    from tasks.tracking import data_version, run_name

    assert data_version({"md5": None, "sha256": "abcdef0123" + "0" * 54}) == "abcdef01"
    assert run_name("dpo", {"sha256": "9" * 64}, 0) == "dpo-99999999-s0"
    assert run_name("dpo", None, 1) == "dpo-s1"


def test_version_and_model_descriptions_carry_the_table_and_the_decision(store):
    import mlflow

    from tasks import tracking

    run = tracking.open_run(store, "exp", {"train": {"method": "dpo", "seed": 0}}, "dvc")
    client = mlflow.MlflowClient()
    client.create_registered_model("m")
    version = client.create_model_version("m", "runs:/x/model", run_id=run["run_id"]).version
    metrics = {"eval/group/a/pairs": 20.0, "eval/group/a/reward_accuracy": 0.75,
               "eval/group/b/pairs": 10.0, "eval/group/b/reward_accuracy": 0.5,
               "eval/worst_group/reward_accuracy": 0.5}  # fmt: skip
    decision = {"decision": "registered", "reason": "b decides: 0.5 >= 0.4", "model_name": "m",
                "version": version, "aliases": ["challenger", "champion"],
                "champion_reason": "no champion yet"}  # fmt: skip
    tracking.describe_version(run["run_id"], metrics, decision)
    text = client.get_model_version("m", version).description
    assert text.startswith("Run `dpo-s0`. Gate: **registered**: b decides: 0.5 >= 0.4.")
    assert "Champion: no champion yet." in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| group | pairs | loss | reward_accuracy")
    assert rows[1] == "| a | 20 | – | 0.7500 | – | – |"  # absent metrics are dashes
    assert rows[2] == "| b | 10 | – | 0.5000 | – | – |"
    assert rows[3] == "| **worst group** | – | – | 0.5000 | – | – |"
    model = client.get_registered_model("m").description
    assert "Champion: version 1." in model and rows[1] in model


def test_the_ui_hint_works_for_the_tracking_uri():
    from tasks.tracking import ui_hint, version_url

    local = ui_hint("sqlite:////p/mlruns/mlflow.db", "1", "abc")
    assert local == (
        "mlflow server --backend-store-uri sqlite:////p/mlruns/mlflow.db --port 5000, "
        "then open http://127.0.0.1:5000/#/experiments/1/runs/abc"
    )
    assert (
        ui_hint("http://mlflow:5000/", "2", "r") == "open http://mlflow:5000/#/experiments/2/runs/r"
    )
    assert version_url("https://m.example", "grpo-policy", 3) == (
        "https://m.example/#/models/grpo-policy/versions/3"
    )


def test_make_dvc_repro_puts_the_venv_on_path(tmp_path):
    from tests.test_data_dvc import make_repo

    venv = Path(sys.executable).parent.parent
    if not shutil.which("make") or not (venv / ".installed").exists():
        pytest.skip("needs make and a venv made by `make setup`")
    project = make_repo(tmp_path / "p")
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, project / name)
        os.utime(project / name, (1e9, 1e9))  # older than the venv: `setup` is up to date
    (project / "dvc.yaml").write_text(
        "stages:\n  help:\n    cmd: grpo --help > help.txt\n    outs:\n"
        "      - help.txt:\n          cache: false\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DVC_NO_ANALYTICS": "1"}  # no venv
    bare = subprocess.run([str(venv / "bin/dvc"), "repro"], cwd=project, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert bare.returncode != 0 and "grpo: " in bare.stdout + bare.stderr  # what users hit
    out = subprocess.run(["make", "dvc-repro", f"VENV={venv}"], cwd=project, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "usage: grpo" in (project / "help.txt").read_text()


# --- the flow end to end, against Prefect's test harness ---------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git + DVC repository holding this project's dvc.yaml and .gitignore and a params.yaml
    of tiny settings (DVC-tracked data), run in-process against a Prefect test server."""
    import yaml
    from prefect.testing.utilities import prefect_test_harness

    from grpo.config import apply_overrides, load_yaml
    from tests.test_data_dvc import make_repo
    from tests.test_pipeline_e2e import SMALL

    root = make_repo(tmp_path_factory.mktemp("conventions") / "p")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(ROOT / ".gitignore", root / ".gitignore")
    small = [*SMALL, "data.track=true", "register.min_worst_group_accuracy=0",
             "register.confidence=0", "register.min_group_pairs=1"]  # fmt: skip
    params = apply_overrides(load_yaml(ROOT / "params.yaml"), small)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    mp.setenv("PREFECT_HOME", str(root / ".prefect"))
    mp.chdir(root)
    with prefect_test_harness(server_startup_timeout=120):
        yield root
    mp.undo()


def grpo_run(root: Path, name: str) -> dict:
    from flows.cli import main

    assert main(["run", "--json", str(root / name)]) == 0
    return json.loads((root / name).read_text())


def dvc(root: Path, *args: str) -> dict:
    out = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args, "--json"], cwd=root,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout)


def flow_run_record(flow_run_id: str):
    """(flow run, its artifacts by key, its log messages) through Prefect's client."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs go to the API in batches: send the last ones
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])),
        )
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    return run, {a.key: a for a in artifacts}, [log.message for log in logs]


@pytest.mark.slow
def test_grpo_run_shows_in_prefect_mlflow_and_dvc(project, capsys):
    import mlflow

    summary = grpo_run(project, "s1.json")
    out = capsys.readouterr().out
    # the terminal: one line per stage with its elapsed time, and a UI hint for a local store
    stage_lines = [line for line in out.splitlines() if line.endswith(" s)")]
    assert [line.split()[0] for line in stage_lines] == [
        "ingest", "validate", "train", "evaluate", "tracking", "register",
    ]  # fmt: skip
    assert "split by question" in stage_lines[0] and "trained now" in stage_lines[2]
    assert "MLflow UI       mlflow server --backend-store-uri sqlite:" in out
    # MLflow: the run's name and its data (DVC md5 digest), the version's description
    md5 = summary["data"]["md5"]
    name = f"gr-dpo-{md5[:8]}-s0"
    run = mlflow.MlflowClient().get_run(summary["run_id"])
    assert run.info.run_name == name == summary["run_name"]
    assert {i.dataset.digest for i in run.inputs.dataset_inputs} == {md5}
    version = mlflow.MlflowClient().get_model_version(
        "grpo-policy", summary["registered"]["version"]
    )
    assert "Gate: **registered**" in version.description and "| Island |" in version.description
    # Prefect: the flow run's name, tags, stage logs and artifacts
    flow_run, artifacts, logs = flow_run_record(summary["flow_run_id"])
    assert flow_run.name == name
    assert {"method:gr-dpo", "source:generated", "model:grpo-policy"} <= set(flow_run.tags)
    assert any(m.startswith("ingest ") for m in logs) and any(
        m.startswith("register ") for m in logs
    )
    table = artifacts["grpo-policy-per-group-evaluation"]
    assert sorted(row["group"] for row in json.loads(table.data)) == sorted(GROUPS)
    assert artifacts["grpo-policy-gate-decision"].data.startswith("# Gate: registered")
    assert summary["run_id"] in artifacts["grpo-policy-mlflow-run"].data
    link = artifacts["grpo-policy-model-version"].data  # Prefect keeps a link as [text](url)
    assert link.endswith("(http://127.0.0.1:5000/#/models/grpo-policy/versions/1)")
    # DVC: the latest run's metrics and plots at dvc.yaml's paths, diffed against the last commit
    shown = json.dumps(dvc(project, "metrics", "show"))
    assert all(f"eval/group/{g}/reward_accuracy" in shown for g in GROUPS)
    plots = dvc(project, "plots", "show")["data"]
    assert set(plots) == {"training-curves", "per-group-accuracy"}
    assert all(plot[0]["content"]["data"]["values"] for plot in plots.values())
    diff = dvc(project, "metrics", "diff")  # nothing committed yet: every value is new
    assert all(v["old"] is None for v in diff["outputs/evaluate/metrics.json"].values())
    subprocess.run(["git", "add", "dvc.yaml", "outputs"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", "run 1"], cwd=project, check=True)
    tracked = subprocess.run(["git", "ls-files", "outputs"], cwd=project, capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
    assert "outputs/evaluate/metrics.json" in tracked and "outputs/train/history.csv" in tracked
    assert not any(p.startswith(("outputs/runs/", "outputs/train/policy")) for p in tracked)

    # a rerun whose training finds the finished run folder (Prefect's cache gone, as after a
    # switch to another server): the run still gets every training step's metrics
    from prefect.settings import get_current_settings

    shutil.rmtree(get_current_settings().results.local_storage_path)
    rerun = grpo_run(project, "s2.json")
    assert "reused: its run folder held a finished training" in capsys.readouterr().out
    assert rerun["train"]["cached"] is True
    steps = summary["train"]["steps"]
    history = mlflow.MlflowClient().get_metric_history(rerun["run_id"], "train/loss")
    assert [m.step for m in history] == list(range(1, steps + 1))
    assert dvc(project, "metrics", "diff") == {}  # same data, same model: same numbers
