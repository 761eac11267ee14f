#!/usr/bin/env bash
# GPU benchmark: check the CUDA path against the CPU path on a small batch, then time bf16 training
# of our GR-DPO vs DPO on a ~124M-parameter GPT-2 built from a config (nothing is downloaded), at
# sequence length 512 with precomputed reference log-probs. Finishes in under 8 minutes on an
# H100/H200. Writes JSON to the path given as the first argument.
#
#   benchmarks/gpu.sh outputs/bench/gpu.json
#   benchmarks/gpu.sh /tmp/gpu.json --batch-size 64          # extra arguments go to gpu_check
#   PYTHON=python3 benchmarks/gpu.sh /tmp/gpu.json
#   benchmarks/gpu.sh /tmp/gpu-tiny.json --device cpu --tiny  # the same script on a CPU (~1 min)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/bench/gpu.json}
[ $# -gt 0 ] && shift

# The interpreter that sees a GPU: $PYTHON, else python3 when its torch has CUDA, else the venv.
if [ -z "${PYTHON:-}" ]; then
  if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    PYTHON=python3
  elif [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
  else
    PYTHON=python3
  fi
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no GPU)")'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
mkdir -p "$(dirname "$out")"
# 450 s for the Python part (its own budget stops new timed windows at 420 s): < 8 minutes in all.
timeout 450 "$PYTHON" -m benchmarks.gpu_check --json "$out" --compile "$@"
