#!/usr/bin/env bash
# Device check, for a session that is lent a GPU (docs/scaling.md): a few QLoRA steps on a random 7B-shaped
# model through `python -m qlora_ui train`, peak GPU memory vs the planner; FSDP-QLoRA too on >= 2 GPUs.
# Exit 3 (with a message) where there is no CUDA GPU. Budget: about 5-8 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PY" bench/gpu_check.py "$@"
