#!/usr/bin/env bash
# README command 1: set up the virtual environment, then the main job — a real Flower federation of
# the three hospital sites, registration of accepted rounds, and the service answering real images.
#   scripts/demo.sh                     serve in the foreground afterwards (Ctrl-C stops)
#   scripts/demo.sh --exit-after-demo   stop after the demo (for scripts)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${WBC_VENV:-.venv}/bin/wbc" demo "$@"
