#!/usr/bin/env bash
# GPU smoke test of configs/a10g-full.toml on the 43k pool: measured train steps/s, passages/s encoded, GPU flat
# index search and rerank ms/query, LLM passages/s generated, with the full-scale times extrapolated
# (hybrid/gpu_smoke.py; --help for options). At most 10 minutes on one GPU (it plans for 7-8, the last 1-2 of them
# downloading the generation model and generating; `timeout` stops it at 10). Refuses to start without a CUDA GPU.
#   scripts/gpu_smoke.sh [--data-dir DIR] [--config FILE] [--out DIR]      (or: make gpu-smoke FAISS=gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 600 "${PYTHON:-.venv/bin/python}" -m hybrid.gpu_smoke "$@"
