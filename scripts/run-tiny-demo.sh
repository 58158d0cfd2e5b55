#!/usr/bin/env bash
# The embedded demo: a tiny Qwen3 learns two-digit addition on the CPU.
#   1. write the tiny model and task (python -m furlong.tiny)
#   2. SFT warm-up through train.py (--loss-type sft_loss) until greedy eval accuracy
#      reaches WARMUP_ACCURACY: GRPO learns from groups whose rewards differ, so it
#      starts where some answers are right and most are wrong. Where that happens
#      depends on the seed (SFT accuracy jumps once the model learns the ones digit,
#      between about 100 and 160 steps for seeds 0-3), so the warm-up goes on in steps
#      of 20, each resuming the last checkpoint (--load), not for a fixed count.
#   3. GRPO through train.py, warm-started from the SFT checkpoint (--ref-load), with
#      dynamic sampling of groups whose rewards differ
# Eval runs before and after each stage; a summary table and reward curves end it.
# Usage: scripts/run-tiny-demo.sh [OUT_DIR] (default runs/demo). Environment overrides:
# PYTHON (python), SEED (0), WARMUP_ACCURACY (0.15), SFT_MAX_STEPS (240),
# GRPO_ROLLOUTS (150), GRPO_LR (2e-4).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
PYTHON=${PYTHON:-python}
SEED=${SEED:-0}
rm -rf "$OUT"

source scripts/models/tiny.sh
source scripts/lib/warm_up.sh
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
   --save-interval 20
   # 2e-3 learns the ones digit later and less reliably (seed 3: 6% after 220 steps).
   --optimizer adam --lr 1e-3 --weight-decay 0.0 --seed "$SEED"
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
   --num-rollout ${GRPO_ROLLOUTS:-150}
   --rollout-batch-size 32
   --n-samples-per-prompt 8
   --rollout-max-response-len 8
   --rollout-temperature 1
   # Dynamic sampling (DAPO, as Miles does it): draw up to 64 prompts a rollout and keep
   # the first 32 groups whose rewards differ; an all-right or all-wrong group teaches
   # nothing. Early on about half the groups are all wrong, so this doubles the signal.
   --over-sampling-batch-size 64
   --dynamic-sampling-filter-path furlong.rollout.filters:check_reward_nonzero_std
   --global-batch-size 128
   --micro-batch-size 128
   --advantage-estimator grpo
   --eps-clip 0.2
   # The engine's log-probs equal the trainer's (both float32 on the CPU), so the two
   # optimizer steps per rollout (256 samples / --global-batch-size 128) need no extra forward.
   --use-rollout-logprobs
   # Cosine decay to a tenth: at a constant 2e-4 greedy accuracy swung by 0.1-0.2
   # between evals late in the run; the decay keeps what was learned.
   --optimizer adam --lr ${GRPO_LR:-2e-4} --lr-decay-style cosine --min-lr 2e-5
   --weight-decay 0.0 --seed "$SEED"
)

warm_up "$OUT/sft" eval/addition "${WARMUP_ACCURACY:-0.15}" 100 20 "${SFT_MAX_STEPS:-240}" \
   "${MODEL_ARGS[@]}" "${SFT_ARGS[@]}" "${EVAL_ARGS[@]}"
"$PYTHON" train.py "${MODEL_ARGS[@]}" "${GRPO_ARGS[@]}" "${EVAL_ARGS[@]}"
finish "$OUT/sft" "$OUT/grpo"
