#!/usr/bin/env bash
# The GPU check for the inference service: one script, run once on a machine with an NVIDIA GPU.
#
#   PYTHON=/path/to/venv/bin/python benchmarks/gpu_check.sh [OUT_DIR]
#
# Needs an environment with the project's service dependencies and the gpu extra (onnxruntime-gpu, never
# beside onnxruntime), and var/bench/registry from benchmarks/serve_model.py (copy it along: ~20 MB).
# It checks the device policy (cuda must give CUDA or TensorRT, never a silent CPU; auto picks TensorRT
# where present), then measures the in-process ceiling and the service at 1 / 8 / 32 clients on the GPU.
# Everything goes to OUT_DIR (default $OUT, else var/gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT_DIR=${1:-${OUT:-var/gpu-check}}
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu-check.log") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi: not available"
"$PY" - <<'PY'
import onnxruntime as ort
print("onnxruntime", ort.__version__, "providers:", ort.get_available_providers())
PY

for device in cuda auto; do
  echo "== WBC_DEVICE=$device: provider granted"
  WBC_DEVICE=$device WBC_MAX_BATCH_SIZE=32 WBC_REGISTRY=var/bench/registry WBC_MODEL_NAME=wbc-bench WBC_VERSION=1 "$PY" - <<'PY'
import json
from fastapi.testclient import TestClient
from service.main import create_app
with TestClient(create_app()) as client:
    ready = client.get("/v2/health/ready").json()
    print(json.dumps({k: ready.get(k) for k in ("provider", "precision", "session")}, indent=1))
    assert ready["provider"] in ("CUDAExecutionProvider", "TensorrtExecutionProvider"), ready
PY
done

echo "== serving benchmark on the GPU (WBC_DEVICE=cuda)"
WBC_DEVICE=cuda WBC_MAX_BATCH_SIZE=32 timeout 420 "$PY" benchmarks/serve.py --targets inprocess,ours,ours-v2 --seconds 8 --warmup 3 \
  | tee "$OUT_DIR/serve-gpu.txt"
cp var/bench/serve-*.json "$OUT_DIR/" 2>/dev/null || true
