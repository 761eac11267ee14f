"""Faults a scheduled pipeline meets (issue 12): two ``grpo run`` at once in one checkout, a run
SIGKILLed mid-training, a tracking server that goes away after training, and the locks behind
them. Each scenario runs on the local stores (SQLite MLflow, Prefect's temporary server; marked
slow where it starts ``grpo run`` processes) and, marked ``services``, against the servers of
``make services`` (MLflow on PostgreSQL, a shared Prefect server: ``make test-services``).

The ``grpo run`` processes run ``tests/pipeline_faults.py``, which injects the fault at a fixed
point (a SIGKILL when training reports a step; a pause after training while the test takes the
tracking server away), so each scenario happens the same way every time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.test_pipeline_e2e import SMALL
from tests.test_tracking import empty_db, fake_metrics, logged_run, tiny_model_dir  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ROOT / "tests" / "pipeline_faults.py"
RUN = [*SMALL, "register.min_worst_group_accuracy=0", "train.checkpoint_every=2"]


# --------------------------------------------------------------------------- helpers


class Stores:
    """Where runs are recorded: the local stores of a project, or the servers of make services
    (then with an experiment and model of this test's own)."""

    def __init__(self, project: Path, live=None) -> None:
        self.project, self.live = project, live
        tag = uuid.uuid4().hex[:8]
        self.experiment = f"reliability-{tag}" if live else "grpo"
        self.model = f"reliability-{tag}" if live else "grpo-policy"
        self.uri = live.mlflow_uri if live else f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"

    def env(self, uri: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
        if self.live:
            env["PREFECT_API_URL"] = self.live.prefect_api_url
        return env | {
            "MLFLOW_TRACKING_URI": uri or self.uri,
            "PREFECT_HOME": str(self.project / ".prefect"),
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",  # as in this process: the bitwise comparisons need it
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # a server that is gone fails at once
        }

    def settings(self, *extra: str) -> list[str]:
        names = [f"register.experiment={self.experiment}", f"register.model_name={self.model}"]
        return [a for o in (*RUN, *names, *extra) for a in ("--set", o)]

    def client(self):
        import mlflow

        return mlflow.MlflowClient(self.uri, self.uri)

    def runs(self):
        c = self.client()
        return c.search_runs([c.get_experiment_by_name(self.experiment).experiment_id])

    def champion(self) -> str:
        return str(self.client().get_registered_model(self.model).aliases["champion"])

    def clean_up(self) -> None:
        """On the shared servers: this test's registered model and experiment deleted."""
        if self.live:
            c = self.client()
            c.delete_registered_model(self.model)
            c.delete_experiment(c.get_experiment_by_name(self.experiment).experiment_id)


def start(stores: Stores, name: str, *extra: str, fault: str = "none", uri: str | None = None):
    """A ``grpo run`` process (its own session: a kill takes nothing else), output to files."""
    p = stores.project
    argv = [sys.executable, str(FAULTS), fault, *stores.settings(*extra), "--json", f"{name}.json"]
    with (p / f"{name}.out").open("w") as out, (p / f"{name}.err").open("w") as err:
        return subprocess.Popen(
            argv, cwd=p, env=stores.env(uri), stdout=out, stderr=err, start_new_session=True
        )


def finish(stores: Stores, name: str, proc, timeout: float = 900) -> tuple[int, dict | None, str]:
    """(exit status, the --json summary or None, stderr)."""
    code = proc.wait(timeout=timeout)
    summary = stores.project / f"{name}.json"
    err = (stores.project / f"{name}.err").read_text()
    return code, json.loads(summary.read_text()) if summary.exists() else None, err


def dvc_project(path: Path) -> Path:
    from tests.test_data_dvc import make_repo

    return make_repo(path)


def live_or_skip(request, where: str):
    return request.getfixturevalue("live_services") if where == "services" else None


LOCAL_OR_SERVICES = [
    pytest.param("local", marks=pytest.mark.slow),
    pytest.param("services", marks=pytest.mark.services),
]


# --------------------------------------------------------------------------- file locks


def test_a_file_lock_waits_times_out_and_dies_with_its_holder(tmp_path):
    from tasks.locks import LockTimeout, file_lock, try_lock

    path = tmp_path / "locks" / "x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tasks.locks import file_lock\n"
         f"with file_lock({str(path)!r}):\n    print('held', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert try_lock(path) is None
        started = time.monotonic()
        held = pytest.raises(LockTimeout, match=r"x\.lock: still held by another process")
        with held, file_lock(path, timeout=0.3):
            pass
        assert time.monotonic() - started >= 0.3
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel drops the lock
        holder.wait(timeout=30)
        with file_lock(path, timeout=10):
            assert try_lock(path) is None  # held by this block now
    finally:
        holder.kill()
    handle = try_lock(path)
    assert handle is not None
    handle.close()


@pytest.mark.slow
def test_a_fresh_sqlite_store_opened_by_three_processes_at_once(tmp_path):
    # MLflow creates a fresh database's tables on first use; three processes doing it at once
    # failed (5 of 8 processes in pairs: duplicate column, alembic version) before the lock
    go = tmp_path / "go"
    code = (
        "import os, sys, time\n"
        "import mlflow, sqlalchemy, alembic\n"
        "from tasks.tracking import setup\n"
        "print('ready', flush=True)\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.005)\n"
        "print(setup(sys.argv[1], 'grpo')[1])\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    argv = [sys.executable, "-c", code, str(tmp_path)]
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, **pipes) for _ in range(3)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 3
    go.touch()  # all three open the fresh store at the same moment
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert len({out.strip() for out, _ in outs}) == 1  # one experiment, the same id for all


def test_an_identical_ingest_keeps_the_data_folder(tmp_path):
    from tasks.ingest import ingest

    cfg = {"generated": {"n_pairs": 120}, "track": False}
    first = ingest(cfg, root=tmp_path)
    folder = Path(first["dir"])
    inode = folder.stat().st_ino
    second = ingest(cfg, root=tmp_path)
    assert second["sha256"] == first["sha256"]
    assert folder.stat().st_ino == inode  # not swapped: a reader never finds it missing
    changed = ingest({**cfg, "generated": {"n_pairs": 150}}, root=tmp_path)
    assert changed["sha256"] != first["sha256"] and folder.stat().st_ino != inode
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".data")] == []


def test_two_trainings_of_one_run_folder_take_turns(tmp_path):
    """Two runs of the same settings share a content-keyed run folder: one trains, the other
    waits for it, then reads the finished training back instead of training into it again."""
    from flows import stages
    from grpo.config import from_dict
    from grpo.data import write_pairs
    from grpo.trainer import TrainConfig
    from tests.trainer_helpers import small_pairs, tiny_model_cfg

    pairs = write_pairs(small_pairs(60, seed=2), tmp_path / "pairs.parquet")
    cfg = from_dict(TrainConfig, {"batch_size": 8, "epochs": 0, "max_steps": 3, "progress": False})
    out, streamed, results = tmp_path / "runs" / "key" / "train", {}, {}

    def work(name: str) -> None:
        streamed[name] = []
        results[name] = stages.train(
            pairs, tiny_model_cfg(), cfg, out, tmp_path,
            log_fn=lambda metrics, step: streamed[name].append(step), resume=True,
        )  # fmt: skip

    threads = [threading.Thread(target=work, args=(n,)) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    trainer, reader = sorted(streamed, key=lambda n: len(streamed[n]), reverse=True)
    assert (streamed[trainer], streamed[reader]) == ([1, 2, 3], [])
    assert (
        results[reader]["resumed_from_step"] == 3 and results[trainer]["resumed_from_step"] is None
    )
    untimed = [[{k: v for k, v in h.items() if k != "train/step_time_s"} for h in r["history"]]
               for r in (results[trainer], results[reader])]  # fmt: skip
    assert untimed[0] == untimed[1]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000003"]


# --------------------------------------------------------------------------- the registry


@pytest.mark.parametrize("where", LOCAL_OR_SERVICES)
def test_registrations_at_once_are_serialised_and_decided_on_fresh_reads(
    where,
    request,
    tmp_path,
    monkeypatch,
    tiny_model_dir,  # noqa: F811
):
    """Two challengers register at once; the worse one reads "no champion" first and is slow to
    act on it. Serialised, the better one ends as champion either way; unserialised, the worse
    one's stale decision would move ``champion`` last (checked: it does without the lock)."""
    import tasks.register
    from flows import stages
    from flows.params import load_configs
    from tasks import tracking

    live = live_or_skip(request, where)
    stores = Stores(tmp_path, live)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stores.uri)
    if live:
        monkeypatch.setenv("PREFECT_API_URL", live.prefect_api_url)
    else:
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
    settings = [f"register.model_name={stores.model}", "register.min_worst_group_accuracy=0",
                "register.min_group_pairs=1"]  # fmt: skip
    cfgs = load_configs(tmp_path / "params.yaml", settings)
    uri, experiment = tracking.setup(tmp_path, stores.experiment)
    good = logged_run(experiment, tiny_model_dir, {"a": 0.9, "b": 0.8})
    bad = logged_run(experiment, tiny_model_dir, {"a": 0.5, "b": 0.9})

    real, bad_has_read = tasks.register.compare_with_champion, threading.Event()

    def compare(run_id, champion, value, cfg, evidence):
        decided = real(run_id, champion, value, cfg, evidence)
        if run_id == bad[0]:
            bad_has_read.set()
            time.sleep(1.0)  # slow to act on what it read
        else:
            bad_has_read.wait(timeout=5)
        return decided

    monkeypatch.setattr(tasks.register, "compare_with_champion", compare)
    decisions = {}

    def register(name, run):
        run_id, model_uri = run
        evaluation = {"metrics": fake_metrics(dict(zip("ab", ACCS[name], strict=True))),
                      "split": "test", "per_pair": {}}  # fmt: skip
        # registry_guard: the file lock, and the Prefect limit first with a server
        assert bool(stages.prefect_api_url()) == (live is not None)
        decisions[name] = stages.register(
            {"run_id": run_id, "tracking_uri": uri}, evaluation, cfgs, model_uri, tmp_path
        )

    threads = [threading.Thread(target=register, args=("bad", bad))]
    threads.append(threading.Thread(target=register, args=("good", good)))
    threads[0].start()
    time.sleep(0.3)
    threads[1].start()
    for t in threads:
        t.join(timeout=120)
    assert {d["decision"] for d in decisions.values()} == {"registered"}
    assert stores.champion() == decisions["good"]["version"]
    stores.clean_up()


ACCS = {"good": (0.9, 0.8), "bad": (0.5, 0.9)}  # worst groups 0.8 and 0.5


# --------------------------------------------------------------------------- two runs at once


@pytest.mark.parametrize("where", LOCAL_OR_SERVICES)
def test_two_runs_at_once_in_one_checkout(where, request, tmp_path):
    from grpo.metric_names import worst_group

    stores = Stores(dvc_project(tmp_path / "project"), live_or_skip(request, where))
    extra = ("data.track=true",)  # ingest, dvc add and dvc push of one folder from both
    runs = {
        "a": start(stores, "a", *extra),
        "b": start(stores, "b", *extra, "train.lr=1e-9"),  # barely moves: a worse worst group
    }
    done = {name: finish(stores, name, proc) for name, proc in runs.items()}
    for name, (code, summary, err) in done.items():
        assert code == 0 and summary is not None, f"{name}: {err[-3000:]}"
    a, b = done["a"][1], done["b"][1]
    assert a["evaluation"]["worst_group"]["value"] > b["evaluation"]["worst_group"]["value"]
    assert {a["registered"]["version"], b["registered"]["version"]} == {"1", "2"}
    assert stores.champion() == a["registered"]["version"]  # whichever registered first
    runs_recorded = {r.info.run_id: r for r in stores.runs()}
    assert set(runs_recorded) == {a["run_id"], b["run_id"]}
    assert {r.info.status for r in runs_recorded.values()} == {"FINISHED"}
    for s in (a, b):
        logged = runs_recorded[s["run_id"]].data.metrics[worst_group("reward_accuracy")]
        assert logged == s["evaluation"]["worst_group"]["value"]

    # one data version, tracked and pushed; no half-written folder or file left behind
    project = stores.project
    assert a["data"]["md5"] == b["data"]["md5"] is not None
    from tasks.ingest import dvc_md5

    md5 = dvc_md5(project / "data.dvc")
    assert md5 == a["data"]["md5"]
    assert (project / ".dvc" / "storage" / "files" / "md5" / md5[:2] / md5[2:]).exists()
    assert sorted(p.name for p in project.glob(".data*")) == []
    # the published metrics are one run's, whole
    metrics = json.loads((project / "outputs" / "evaluate" / "metrics.json").read_text())
    logged = [runs_recorded[s["run_id"]].data.metrics for s in (a, b)]
    assert any(all(m.get(k) == v for k, v in metrics.items()) for m in logged)
    assert not list((project / "outputs").rglob(".*.tmp"))
    stores.clean_up()


# --------------------------------------------------------------------------- killed mid-training


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_to_the_same_model(tmp_path):
    import torch
    from safetensors.torch import load_file

    from flows.params import load_configs
    from tasks.train import train

    stores = Stores(tmp_path / "project")
    stores.project.mkdir()
    # killed when training reports step 3: the checkpoint of step 2 is on disk, step 3's not
    code, summary, _ = finish(stores, "killed", start(stores, "killed", fault="kill-at-step:3"))
    assert code == -signal.SIGKILL and summary is None
    [checkpoint] = stores.project.glob("outputs/runs/*/train/checkpoints/step-*")
    assert checkpoint.name == "step-0000002"
    [killed] = stores.runs()
    assert killed.info.status == "RUNNING"  # nobody could close it

    code, summary, err = finish(stores, "again", start(stores, "again"))
    assert code == 0, err[-3000:]
    assert summary["train"]["resumed_from_step"] == 2 and summary["train"]["steps"] == 4
    assert not summary["train"]["cached"]  # steps 3 and 4 trained in this run

    # the same parameters and group weights as a run that was never interrupted
    cfgs = load_configs(stores.project / "params.yaml", [*RUN])
    straight = train(stores.project / "data" / "pairs.parquet", cfgs.model, cfgs.train,
                     tmp_path / "straight", resume=False)  # fmt: skip
    resumed = load_file(str(Path(summary["train"]["model_dir"]) / "model.safetensors"))
    reference = load_file(str(Path(straight["model_dir"]) / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    weights = summary["train"]["final_group_weights"]
    assert [weights[g] for g in straight["groups"]] == straight["weights"]

    # the killed run is closed, superseded by the one that finished its training
    runs = {r.info.run_id: r for r in stores.runs()}
    assert {r.info.status for r in runs.values()} == {"FINISHED", "KILLED"}
    tags = runs[killed.info.run_id].data.tags
    assert runs[killed.info.run_id].info.status == "KILLED"
    assert tags["pipeline.superseded_by"] == summary["run_id"]
    # the new run carries the whole history: steps 1-2 copied, 3-4 streamed
    history = stores.client().get_metric_history(summary["run_id"], "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]


# --------------------------------------------------------------------------- tracking outage


class Proxy:
    """A TCP forwarder to ``target`` on a fixed local port: what the runs see as the tracking
    server. :meth:`stop` takes it away (no listener, every connection cut) as a dead server."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target, self.conns = target, []
        self.sock = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        with contextlib.suppress(OSError):  # wakes the blocked accept(); close alone does not
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


@pytest.fixture
def mlflow_server(request, tmp_path):
    """(host, port) of an MLflow server: a local one on SQLite, or make services' one."""
    if request.node.callspec.params["where"] == "services":
        live = request.getfixturevalue("live_services")
        host, port = live.mlflow_uri.removeprefix("http://").split(":")
        yield host, int(port)
        return
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tmp_path / "server"
    log = (tmp_path / "mlflow-server.log").open("w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "no MLflow server"
                time.sleep(0.5)
        yield "127.0.0.1", port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


@pytest.mark.parametrize("where", LOCAL_OR_SERVICES)
def test_a_tracking_outage_after_training_keeps_the_model(where, request, tmp_path, mlflow_server):
    stores = Stores(tmp_path / "project", live_or_skip(request, where))
    stores.project.mkdir()
    proxy = Proxy(mlflow_server)
    stores.uri = proxy.uri
    flags = tmp_path / "flags"
    flags.mkdir()
    first = start(stores, "first", fault=f"pause-after-train:{flags}")
    deadline = time.monotonic() + 600
    while not (flags / "trained").exists():
        assert first.poll() is None and time.monotonic() < deadline, "training did not finish"
        time.sleep(0.1)
    proxy.stop()  # the tracking server goes away between training and registration
    (flags / "go").touch()
    code, summary, err = finish(stores, "first", first)
    assert code == 1 and summary is None
    [line] = [x for x in err.splitlines() if x.startswith("grpo run: error:")]
    assert f"MLflow tracking server {proxy.uri} does not answer" in line
    assert "the trained model is kept in outputs/runs/" in line and "Traceback" not in err
    [result] = stores.project.glob("outputs/runs/*/train/result.json")
    trained_at = result.stat().st_mtime_ns
    assert (result.parent / "policy" / "model.safetensors").exists()

    proxy = Proxy(mlflow_server, port=proxy.port)  # back, at the same address
    try:
        code, summary, err = finish(stores, "second", start(stores, "second"))
    finally:
        proxy.stop()
    assert code == 0, err[-3000:]
    assert summary["train"]["cached"] and summary["train"]["steps"] == 4  # not trained again
    assert result.stat().st_mtime_ns == trained_at
    assert summary["registered"]["version"] == "1"
    stores.uri = f"http://{mlflow_server[0]}:{mlflow_server[1]}"
    history = stores.client().get_metric_history(summary["run_id"], "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # the full history, copied
    runs = {r.info.run_id: r for r in stores.runs()}
    assert len(runs) == 2 and runs[summary["run_id"]].info.status == "FINISHED"
    [gone] = [r for r in runs.values() if r.info.run_id != summary["run_id"]]
    assert gone.info.status == "KILLED"  # found by the second run: its process was gone
    assert gone.data.tags["pipeline.superseded_by"] == summary["run_id"]
    stores.clean_up()
