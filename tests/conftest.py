"""Test-wide settings: offline, quiet, and deterministic."""

from __future__ import annotations

import dataclasses
import os
import urllib.request

import pytest

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

# One thread: tiny-model work is dominated by per-op overhead, and on a shared 2-core machine
# two threads per test process oversubscribe the cores (measured ~20x slower under load).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts with one torch thread, whatever the test before it set."""
    torch.set_num_threads(1)
    yield


# --------------------------------------------------------------------------- make services


@dataclasses.dataclass(frozen=True)
class LiveServices:
    mlflow_uri: str  # http://host:port of the MLflow tracking server
    prefect_api_url: str  # http://host:port/api of the Prefect server


def _answers(url: str) -> str | None:
    """None when ``url`` answers 200, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except OSError as exc:
        return str(exc)


@pytest.fixture(scope="session")
def live_services() -> LiveServices:
    """The servers of ``make services``, where MLFLOW_TRACKING_URI and PREFECT_API_URL say
    (``make test-services`` exports them). Skips unless both answer their health checks; with
    GRPO_REQUIRE_SERVICES=1 (``make test-services``, CI) fails instead, so CI cannot go green
    on skipped tests."""
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    prefect_api = os.environ.get("PREFECT_API_URL", "")
    problems = []
    if not mlflow_uri.startswith(("http://", "https://")):
        problems.append(f"MLFLOW_TRACKING_URI is not a server URL ({mlflow_uri!r})")
    elif reason := _answers(f"{mlflow_uri.rstrip('/')}/health"):
        problems.append(f"MLflow at {mlflow_uri}: {reason}")
    if not prefect_api.startswith(("http://", "https://")):
        problems.append(f"PREFECT_API_URL is not a server URL ({prefect_api!r})")
    elif reason := _answers(f"{prefect_api.rstrip('/')}/health"):
        problems.append(f"Prefect at {prefect_api}: {reason}")
    if problems:
        message = "services not available (start them with `make services`): " + "; ".join(problems)
        if os.environ.get("GRPO_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return LiveServices(mlflow_uri.rstrip("/"), prefect_api.rstrip("/"))
