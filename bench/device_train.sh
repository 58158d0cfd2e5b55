#!/usr/bin/env bash
# One device call for the trainer's figures: GPU tests of the trainer, then train_mfu for
# Qwen3-1.7B (8k and 16k tokens, with the plain-HF and HF + Liger baselines), the
# end-to-end comparison with TRL, 4B (8k), 1.7B at 32k tokens with full recomputation,
# 0.6B (8k) and the profile by operator. Each part has a time limit, and the parts come
# in order of importance, so that the call returns what it measured within the device's
# 10 minutes. Carries .wheels/ (liger_kernel, trl, datasets ...): bash bench/fetch_wheels.sh
set -uo pipefail
export PYTHONPATH=$PWD OUT=${OUT:-bench-out} TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
python3 -m pip install --quiet --no-deps --no-index .wheels/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_log_prob_head.py \
  tests/test_gpu_train.py tests/test_parallel.py tests/test_train.py 2>&1 \
  | grep -v "Backend impl" | tail -40 | tee "$OUT/gpu_tests.txt"
mfu() { timeout "$1" python3 bench/train_mfu.py "${@:2}" 2>&1 | grep -v Warn \
  | tee -a "$OUT/train_mfu.txt" | grep "^{" | cut -c1-330; }
mfu 170 --model qwen3-1.7b --tokens 8192 16384
timeout 200 python3 bench/e2e.py --steps 6 > "$OUT/e2e.txt" 2>&1; tail -12 "$OUT/e2e.txt"
mfu 150 --model qwen3-4b --tokens 8192 --baselines hf_liger
mfu 60 --model qwen3-1.7b --tokens 32768 --baselines --furlong-flags \
  "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1"
mfu 40 --model qwen3-0.6b --tokens 8192 --baselines
timeout 45 python3 bench/profile_train.py --tokens 8192 2>&1 | grep -v Warn \
  | tee "$OUT/profile.txt" | tail -45
