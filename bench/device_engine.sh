#!/usr/bin/env bash
# One device call: environment facts, GPU tests of the engine and trainer, decode profile,
# rollout bench. Usage on the GPU machine, from the repository root:
#   bash bench/device_engine.sh [rollout.py flags]
set -uo pipefail
export PYTHONPATH=$PWD OUT=${OUT:-bench-out}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_engine.py tests/test_gpu_train.py \
  2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
python3 bench/profile_decode.py 2>&1 | tee "$OUT/profile.txt" | tail -40
python3 bench/rollout.py "$@" 2>&1 | tee "$OUT/rollout.txt" | tail -25
