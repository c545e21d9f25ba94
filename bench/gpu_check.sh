#!/usr/bin/env bash
# One GPU check (< 8 minutes on one GPU): the six experts at full size with random weights, Prismer's
# settings (fp16, Prismer's batch sizes) next to ours (bf16, channels_last, batching, torch.compile
# where it helps), then the whole pipeline with all six sharing the card through fractional num_gpus.
# Writes OUT/gpu_check.json and OUT/gpu_check.md (OUT: --out, default gpu_check/).
#
#   bench/gpu_check.sh                      # on the GPU machine
#   bench/gpu_check.sh --dry-run --out /tmp/gpu_check    # same code path, CPU, tiny networks
#   label-pipeline plan cc12m --gpus 8 --stats gpu_check/gpu_check.json   # hours for CC12M on 8 GPUs
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
# The check budgets itself well inside 8 minutes; the limit only stops a hung run.
exec timeout --signal=INT 480 "$PYTHON" bench/gpu_check.py "$@"
