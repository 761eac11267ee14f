"""Ingestion with DVC, in throwaway git+DVC repositories (never the project's own .dvc/)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.ingest import DvcError, ingest
from tasks.validate import validate

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared/data/globalopinionqa"
SMALL = {"source": "generated", "generated": {"n_pairs": 240}}


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def make_repo(path: Path) -> Path:
    """git init + dvc init + a local default remote in .dvc/storage, like the project's."""
    from dvc.repo import Repo

    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q")
    git(path, "config", "user.email", "test@example.com")
    git(path, "config", "user.name", "test")
    Repo.init(str(path)).close()
    (path / ".dvc" / "config").write_text(
        "[core]\n    analytics = false\n    remote = local\n"
        "['remote \"local\"']\n    url = storage\n"
    )
    with (path / ".dvc" / ".gitignore").open("a") as fh:
        fh.write("/storage\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "init")
    return path


def md5_in(dvc_file: Path) -> str:
    return yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]


def test_same_source_twice_gives_the_same_dvc_md5(tmp_path):
    repo = make_repo(tmp_path / "repo")
    first = ingest(SMALL, root=repo)
    assert first["md5"].endswith(".dir") and first["changed"] and first["previous_md5"] is None
    assert first["md5"] == md5_in(repo / "data.dvc")
    assert first["rows"] == 240 and first["groups"] == ["Northland", "Southland", "Island"]
    assert first["git_rev"] == git(repo, "rev-parse", "HEAD")
    assert first["pushed"] and any((repo / ".dvc" / "storage").rglob("*"))
    assert sorted(p.name for p in (repo / "data").iterdir()) == ["pairs.parquet"]

    second = ingest(SMALL, root=repo)
    assert second["md5"] == first["md5"] and second["changed"] is False
    assert second["sha256"] == first["sha256"]

    other = ingest({**SMALL, "generated": {"n_pairs": 240, "seed": 1}}, root=repo)
    assert other["md5"] != first["md5"] and other["changed"] is True
    assert other["previous_md5"] == first["md5"]


def test_a_fresh_clone_recreates_and_pulls_the_same_data(tmp_path):
    repo = make_repo(tmp_path / "repo")
    original = ingest(SMALL, root=repo)
    git(repo, "add", "data.dvc", ".gitignore")
    git(repo, "commit", "-q", "-m", "data")
    original_bytes = (repo / "data" / "pairs.parquet").read_bytes()

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    assert not (clone / "data").exists()  # no data, no cache, no remote contents
    again = ingest(SMALL, root=clone)
    assert again["md5"] == original["md5"] and again["changed"] is False
    assert git(clone, "status", "--porcelain") == ""  # data.dvc untouched

    # the data can also come back from the original's remote
    from dvc.repo import Repo

    puller = tmp_path / "puller"
    git(tmp_path, "clone", "-q", str(repo), str(puller))
    (puller / ".dvc" / "config.local").write_text(
        f"['remote \"local\"']\n    url = {repo / '.dvc' / 'storage'}\n"
    )
    with Repo(str(puller)) as r:
        r.pull()
    assert (puller / "data" / "pairs.parquet").read_bytes() == original_bytes


def test_untracked_ingest_and_outside_a_dvc_project(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(DvcError, match="not inside a DVC project"):
        ingest(SMALL, root=plain)
    result = ingest({**SMALL, "track": False}, root=plain)
    assert result["md5"] is None and result["git_rev"] is None
    data = (plain / "data" / "pairs.parquet").read_bytes()
    assert result["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"GlobalOpinionQA subset not found at {SHARED}")
def test_real_globalopinionqa_subset_ingests_and_validates(tmp_path):
    repo = make_repo(tmp_path / "repo")
    cfg = {
        "source": "globalopinionqa",
        "globalopinionqa": {"path": str(SHARED / "goqa_subset.json")},
    }
    result = ingest(cfg, root=repo)
    assert result["rows"] == 385
    assert result["groups"] == [
        "Nigeria",
        "Egypt",
        "India (Current national sample)",
        "China",
        "Japan",
    ]
    assert Path(result["source_path"]).name == "pairs.source.parquet"
    report = validate(result["path"], {"report_dir": str(tmp_path / "reports")}, result["groups"])
    assert report["success"] and report["expectations"] == 33  # 27 + 6 on the shares
    assert ingest(cfg, root=repo)["md5"] == result["md5"]


@pytest.mark.slow
def test_dvc_repro_on_a_fresh_clone_runs_the_data_stages(tmp_path):
    """`dvc repro --force validate` in a clone of HEAD re-creates data.dvc's data and checks it.

    `--force`: dvc.lock and outputs/data/validation.json are committed, so without it DVC would
    (rightly) skip validate once ingest reproduces the committed data; the test wants it to run.
    """
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "grpo").exists() or not (bin_dir / "dvc").exists():
        pytest.skip("the grpo and dvc commands are not installed beside this Python")
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--no-hardlinks", str(ROOT), str(clone))
    if not (clone / "data.dvc").exists():
        pytest.skip("data.dvc is not committed at HEAD")
    committed = md5_in(clone / "data.dvc")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(clone),
    }
    run = subprocess.run(
        [str(bin_dir / "dvc"), "repro", "--force", "validate"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "validation PASSED" in run.stdout
    assert md5_in(clone / "data.dvc") == committed, (
        "the committed data.dvc does not match what the code at HEAD ingests: "
        "run `grpo ingest` and commit data.dvc"
    )
    assert (clone / "outputs" / "data" / "ingest.json").exists()
    shutil.rmtree(clone, ignore_errors=True)


def test_ingest_cli_writes_the_stable_record_and_reports_errors(tmp_path, capsys, monkeypatch):
    from flows.cli import main as cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("data:\n  generated:\n    n_pairs: 120\n")
    code = cli(["ingest", "--no-dvc", "--json", "out/ingest.json"])
    assert code == 0
    assert "ingested 120 pairs from generated" in capsys.readouterr().out
    record = yaml.safe_load((tmp_path / "out" / "ingest.json").read_text())
    assert record["rows"] == 120 and record["path"] == "data/pairs.parquet"
    assert "git_rev" not in record  # run-specific fields stay out of the DVC stage output
    assert record["group_counts"] == {"Island": 18, "Northland": 54, "Southland": 48}

    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"pair_id": "p1"}\n{"pair_id": \n')
    args = ["ingest", "--no-dvc", "--set", "data.source=file", "--set", f"data.path={bad}"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert f"{bad}: line 2" in err and "Traceback" not in err
    assert cli(["ingest", "--set", "data.source=nope"]) == 2
    assert "source: must be one of" in capsys.readouterr().err
    assert cli(["ingest", "--set", "data.generated.typo=1"]) == 2
    assert (
        "--set data.generated.typo=1: unknown key 'typo' in data.generated"
        in capsys.readouterr().err
    )
