#!/usr/bin/env bash
# The embedded demo: a tiny Qwen3 learns two-digit addition on the CPU.
#   1. write the tiny model and task (python -m furlong.tiny)
#   2. SFT warm-up through train.py (--loss-type sft_loss)
#   3. GRPO through train.py, warm-started from the SFT checkpoint (--ref-load)
# Eval runs before and after each stage; a summary table and reward curves end it.
# Usage: scripts/run-tiny-demo.sh [OUT_DIR] (default runs/demo). Environment overrides:
# PYTHON (python), SEED (0), SFT_STEPS (120), GRPO_ROLLOUTS (80), GRPO_LR (2e-4).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
PYTHON=${PYTHON:-python}
SEED=${SEED:-0}
rm -rf "$OUT"

source scripts/models/tiny.sh
"$PYTHON" -m furlong.tiny "$OUT/tiny" --seed "$SEED"
DATA=$OUT/tiny/data

EVAL_ARGS=(
   --eval-interval 20
   --eval-prompt-data addition "$DATA/eval.jsonl"
   --eval-input-key prompt
   --eval-label-key label
   --eval-temperature 0
   --eval-max-response-len 8
   --rm-type math
)

SFT_ARGS=(
   --hf-checkpoint "$OUT/tiny/model"
   --save "$OUT/sft"
   --prompt-data "$DATA/sft.jsonl"
   --input-key messages
   --apply-chat-template
   --loss-type sft_loss
   --rollout-batch-size 128
   --micro-batch-size 128
   --num-rollout ${SFT_STEPS:-120}
   --optimizer adam --lr 2e-3 --weight-decay 0.0 --seed "$SEED"
)

GRPO_ARGS=(
   --hf-checkpoint "$OUT/tiny/model"
   --ref-load "$OUT/sft"
   --save "$OUT/grpo"
   --save-interval 20
   --prompt-data "$DATA/train.jsonl"
   --input-key prompt
   --label-key label
   --apply-chat-template
   --rollout-shuffle
   --rollout-seed "$SEED"
   --num-rollout ${GRPO_ROLLOUTS:-80}
   --rollout-batch-size 32
   --n-samples-per-prompt 8
   --rollout-max-response-len 8
   --rollout-temperature 1
   --global-batch-size 128
   --micro-batch-size 64
   --advantage-estimator grpo
   --eps-clip 0.2
   # The engine's log-probs equal the trainer's (both float32 on the CPU), so the two
   # optimizer steps per rollout (256 samples / --global-batch-size 128) need no extra forward.
   --use-rollout-logprobs
   --optimizer adam --lr ${GRPO_LR:-2e-4} --weight-decay 0.0 --seed "$SEED"
)

"$PYTHON" train.py "${MODEL_ARGS[@]}" "${SFT_ARGS[@]}" "${EVAL_ARGS[@]}"
"$PYTHON" train.py "${MODEL_ARGS[@]}" "${GRPO_ARGS[@]}" "${EVAL_ARGS[@]}"

echo
"$PYTHON" -m furlong.summary "$OUT/sft" "$OUT/grpo"
echo "reward curves: $OUT/sft/reward_curve.png $OUT/grpo/reward_curve.png"
