#!/usr/bin/env bash
# GPU smoke test of configs/a10g-full.toml on the 43k pool: measured train steps/s, passages/s encoded, GPU flat
# index search and rerank ms/query, with the full-scale times extrapolated (hybrid/gpu_smoke.py; --help for options).
# At most 8 minutes on one GPU (it plans for ~6; `timeout` stops it at 8). Refuses to start without a CUDA GPU.
#   scripts/gpu_smoke.sh [--data-dir DIR] [--config FILE] [--out DIR]      (or: make gpu-smoke FAISS=gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 "${PYTHON:-.venv/bin/python}" -m hybrid.gpu_smoke "$@"
