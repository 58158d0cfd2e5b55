#!/usr/bin/env bash
# One device call for the end-to-end numbers: train.py vs TRL (bench/device_train.sh has
# the training-step figures). Carries .wheels/ (trl, datasets, dill, multiprocess,
# math-verify and its parsers, liger_kernel), installed without dependencies.
set -uo pipefail
export PYTHONPATH=$PWD OUT=${OUT:-bench-out} TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
python3 -m pip install --quiet --no-deps --no-index .wheels/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 bench/e2e.py --steps 6 "$@" > "$OUT/e2e.txt" 2>&1; tail -40 "$OUT/e2e.txt"
