#!/usr/bin/env bash
# One device call for the MoE figures of issue 13 (Qwen3-30B-A3B's layer shape, bf16), in
# order of importance: GPU tests of the log-prob head's kernels; the training step of 4
# layers with 4 micro-batches of 8k tokens per optimizer step (furlong alone, with its
# kernel profile); Qwen3-0.6B's step for comparison with the dense figures;
# train/train_rollout_logprob_abs_diff with and without routing replay (4 layers). Each
# part has a time limit, together under the device's 10 minutes. Models are saved to
# /dev/shm (the disk is slower). Writes under $OUT.
set -uo pipefail
export PYTHONPATH=$PWD OUT=${OUT:-bench-out} TOKENIZERS_PARALLELISM=false TMPDIR=/dev/shm
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.txt"
timeout 120 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_log_prob_head.py \
  2>&1 | tail -8 | tee "$OUT/gpu_tests.txt"
timeout 300 python3 bench/train_mfu.py --model qwen3-30b-a3b --layers 4 --tokens 8192 \
  --micro-batches 4 --baselines 2>&1 | grep -v Warn | tee "$OUT/train_mfu_moe.txt" \
  | grep "^{" | cut -c1-400
timeout 100 python3 bench/train_mfu.py --model qwen3-0.6b --tokens 8192 --baselines 2>&1 \
  | grep -v Warn | tee "$OUT/train_mfu_0.6b.txt" | grep "^{" | cut -c1-400
timeout 150 python3 bench/routing_replay.py > "$OUT/routing_replay.txt" 2>&1
tail -3 "$OUT/routing_replay.txt"
