#!/usr/bin/env bash
# Device calls for issue 17's one-GPU figures (bench/one_gpu_grpo.py), by parts:
#   bash bench/device_one_gpu.sh tests lora8b     # GPU tests of LoRA + the 8B LoRA run
#   bash bench/device_one_gpu.sh full8b full4b    # full fine-tuning for comparison
#   bash bench/device_one_gpu.sh full17b         # the largest Qwen3 whose full fine-tuning fits
# Carries .wheels/ (peft, accelerate, psutil; math-verify, which train.py imports):
# bash bench/fetch_wheels.sh
set -uo pipefail
export PYTHONPATH=$PWD OUT=${OUT:-bench-out} TOKENIZERS_PARALLELISM=false BENCH_TMP=/tmp
mkdir -p "$OUT"
python3 -m pip install --quiet --no-deps --no-index .wheels/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.txt"
bench() { local name=$1 limit=$2; shift 2
  timeout "$limit" python3 bench/one_gpu_grpo.py "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name rc=$?"; pkill -f bench/capped.py  # timeout ends the bench, not its train.py
  grep -v Warn "$OUT/$name.txt" | tail -25; }
for part in "$@"; do case $part in
  tests) timeout 240 python3 -u -m pytest -v -p no:cacheprovider -m gpu --timeout 200 tests/test_phase_memory.py \
           tests/test_lora.py tests/test_lora_engine.py tests/test_lora_sglang.py 2>&1 \
           | grep -v Warn | tail -30 | tee "$OUT/gpu_tests.txt";;
  lora8b) bench lora8b 420 --model qwen3-8b --lora-rank 32;;
  full8b) bench full8b 330 --model qwen3-8b --flags=--optimizer-cpu-offload;;
  full4b) bench full4b 240 --model qwen3-4b;;
  full17b) bench full17b 330 --model qwen3-1.7b;;
esac; done
