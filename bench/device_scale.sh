#!/usr/bin/env bash
# One 2-GPU device call (kind nvidia-h100-x2) for the scale-out and async figures:
# GRPO of the Qwen3-1.7B architecture colocated, disaggregated and async (bench/scale.py),
# then the 1-GPU training throughput. Needs `bash bench/fetch_wheels.sh --ray` first;
# carry .wheels (about 48 MiB).
set -uo pipefail
export PYTHONPATH=$PWD OUT=${OUT:-bench-out} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$OUT"
python3 -m pip install --quiet --no-deps --no-index .wheels/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 bench/scale.py --steps 5 "$@" 2>&1 | tee "$OUT/scale.txt" | tail -60
python3 bench/train_mfu.py --tokens 8192 2>&1 | tee "$OUT/train_mfu.txt" | tail -30
