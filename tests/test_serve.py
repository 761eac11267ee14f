"""Scheduled retraining: a real local Prefect server, `grpo serve --cron`, one run triggered.

Bounded and cleaned up: the server and the serving process run in their own process groups and
are stopped at the end whatever happens; every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_pipeline_e2e import SMALL

BIN = Path(sys.executable).parent
CRON = "0 3 * * 1"

TRIGGER = """
import asyncio, json, sys, time
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

async def deployment():
    async with get_client() as client:
        for _ in range(120):
            try:
                return await client.read_deployment_by_name("retrain/grpo-retrain")
            except Exception:
                await asyncio.sleep(0.5)
    sys.exit("deployment never appeared")

dep = asyncio.run(deployment())
run = run_deployment("retrain/grpo-retrain", timeout=300)
print(json.dumps({"crons": [s.schedule.cron for s in dep.schedules], "state": run.state.type.value,
                  "parameters": run.parameters}))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout}s")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.slow
def test_serve_schedules_and_runs_one_retrain(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    project = tmp_path / "project"
    project.mkdir()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        "GRPO_SERVE_LOG_LEVEL": "WARNING",
    }
    env.pop("PREFECT_PROFILES_PATH", None)
    server = serving = None
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env={k: v for k, v in env.items() if k != "PREFECT_API_URL"},
            stdout=(logs / "server.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_healthy(api, server)
        overrides = [
            a for o in (*SMALL, "register.min_worst_group_accuracy=0") for a in ("--set", o)
        ]
        serving = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--cron", CRON, *overrides],
            cwd=project,
            env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            stdout=(logs / "serve.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out = subprocess.run(
            [sys.executable, "-c", TRIGGER], env=env, capture_output=True, text=True, timeout=400
        )
        assert out.returncode == 0, out.stderr[-3000:] + (logs / "serve.log").read_text()[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["crons"] == [CRON]
        assert result["state"] == "COMPLETED", (logs / "serve.log").read_text()[-3000:]
        assert "register.min_worst_group_accuracy=0" in result["parameters"]["overrides"]
    finally:
        stop(serving)
        stop(server)

    # the scheduled run went through the whole pipeline: a finished MLflow run, a champion
    import mlflow

    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["gate.decision"] == "passed"
    assert "eval/worst_group/reward_accuracy" in runs[0].data.metrics
    assert client.get_registered_model("grpo-policy").aliases == {"challenger": 1, "champion": 1}


def test_prefect_yaml_deployment_points_at_the_flow():
    import yaml
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    root = Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((root / "prefect.yaml").read_text())
    (deployment,) = spec["deployments"]
    flow = load_flow_from_entrypoint(str(root / deployment["entrypoint"]))
    assert flow.name == "retrain"
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)
    for schedule in deployment["schedules"]:
        CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises when invalid
