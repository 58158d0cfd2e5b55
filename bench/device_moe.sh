#!/usr/bin/env bash
# One device call for the MoE figures of issue 13 (Qwen3-30B-A3B's layer shape, bf16), in
# order of importance: GPU tests of the fused-MoE engine, MoE training and the fused
# optimizer; train/train_rollout_logprob_abs_diff with and without routing replay (4
# layers, never measured); the training step of 4 layers (furlong alone); fast-engine
# decode vs HF generate and the roofline (8 layers). Each part has a time limit, together
# under the device's 10 minutes. Carries .wheels/ (bash bench/fetch_wheels.sh); writes
# under $OUT.
set -uo pipefail
export PYTHONPATH=$PWD OUT=${OUT:-bench-out} TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
python3 -m pip install --quiet --no-deps --no-index .wheels/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.txt"
timeout 90 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_fast_moe.py \
  tests/test_moe.py tests/test_fused_adamw.py 2>&1 | grep -v "Backend impl" | tail -30 \
  | tee "$OUT/gpu_tests.txt"
timeout 180 python3 bench/routing_replay.py > "$OUT/routing_replay.txt" 2>&1
tail -3 "$OUT/routing_replay.txt"
timeout 150 python3 bench/train_mfu.py --model qwen3-30b-a3b --layers 4 --tokens 8192 \
  --baselines 2>&1 | grep -v Warn | tee "$OUT/train_mfu.txt" | grep "^{" | cut -c1-330
timeout 120 python3 bench/rollout.py --models --moe-models qwen3-30b-a3b --moe-hf-batches 64 \
  > "$OUT/rollout.txt" 2>&1; tail -6 "$OUT/rollout.txt"
