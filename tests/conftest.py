"""Test-wide settings: offline, quiet, and deterministic."""

from __future__ import annotations

import os

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
