#!/usr/bin/env bash
# The embedded multi-turn demo: a tiny Qwen3 learns to call a tool on the CPU (docs/agents.md).
# The prompt is a key ("4821"); the answer is the secret number the tool lookup(key)
# returns, which the model cannot know without calling it: a sample is two model turns
# (the call, then \boxed{answer}) around a tool reply the model did not sample.
#   1. write the tiny model and the task (python -m furlong.tiny --tools)
#   2. SFT warm-up on whole conversations (call, tool reply, answer) through train.py,
#      until the held-out reward, sampled at temperature 1 with the real tool, reaches
#      WARMUP_REWARD: the model learns to copy the key and the reply between 40 and 70
#      steps, so the warm-up goes on in steps of 10, each resuming the last checkpoint
#   3. GRPO through train.py with the built-in multi-turn generate function
#      (furlong.rollout.multi_turn): sampled tokens train, the tool reply's tokens do not
# Eval (the 500 held-out keys, sampled at temperature 1) runs before and after each
# stage; a summary table and reward curves end it.
# With AGENT=1, GRPO runs the OpenAI-client agent scripts/tiny_tools_agent.py through the
# engine server's sessions instead (furlong.rollout.agentic; needs the `openai` package).
# Usage: scripts/run-tiny-tools.sh [OUT_DIR] (default runs/tools). Environment overrides:
# PYTHON (python), SEED (0), WARMUP_REWARD (0.2), SFT_MAX_STEPS (100),
# GRPO_ROLLOUTS (60), GRPO_LR (1e-3), AGENT (0).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/tools}
PYTHON=${PYTHON:-python}
SEED=${SEED:-0}
rm -rf "$OUT"

source scripts/models/tiny-tools.sh
source scripts/lib/warm_up.sh
"$PYTHON" -m furlong.tiny "$OUT/tiny" --seed "$SEED" --tools
DATA=$OUT/tiny/data

# Miles' multi-turn flags, read by the generate function from its args; a
# --custom-config-path key that names a flag sets it, as on the command line.
cat > "$OUT/multi_turn.yaml" <<EOF
generate_max_turns: 2
generate_tool_call_parser: qwen25
generate_execute_tool_function_path: furlong.tiny:execute_tool
EOF
MULTI_TURN=(
   --custom-generate-function-path furlong.rollout.multi_turn:generate
   --custom-config-path "$OUT/multi_turn.yaml"
)

EVAL_ARGS=(
   --eval-interval 10
   --eval-prompt-data lookup "$DATA/eval.jsonl"
   --eval-input-key prompt
   --eval-label-key label
   --eval-temperature 1
   --eval-max-response-len 40
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
   --save-interval 10
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
   --rollout-shuffle
   --rollout-seed "$SEED"
   --num-rollout "${GRPO_ROLLOUTS:-60}"
   # 16 samples of 8 prompts a rollout: the group baseline of 16 samples keeps the
   # update steadier than 8 of 16 prompts (same cost).
   --rollout-batch-size 8
   --n-samples-per-prompt 16
   # Each model turn may take 40 tokens (a right one takes 9, then 6).
   --rollout-max-response-len 40
   --rollout-temperature 1
   # Dynamic sampling: draw up to 16 prompts a rollout, keep the first 8 groups whose
   # rewards differ (an all-right or all-wrong group teaches nothing).
   --over-sampling-batch-size 16
   --dynamic-sampling-filter-path furlong.rollout.filters:check_reward_nonzero_std
   --global-batch-size 128
   --micro-batch-size 128
   --advantage-estimator grpo
   --eps-clip 0.2
   # One optimizer step per rollout, on the engine's own log-probs (float32 on the CPU).
   --use-rollout-logprobs
   --optimizer adam --lr "${GRPO_LR:-1e-3}" --lr-decay-style cosine --min-lr 1e-4
   --weight-decay 0.0 --seed "$SEED"
)
if [[ ${AGENT:-0} == 1 ]]; then
   # The agent is given the prompt as the data holds it ("4821", no chat template) and
   # calls the server's chat route; the session keeps the tokens it sampled.
   echo "custom_agent_function_path: tiny_tools_agent:agent" > "$OUT/agent.yaml"
   export PYTHONPATH="scripts${PYTHONPATH:+:$PYTHONPATH}"
   GRPO_ARGS+=(--custom-generate-function-path furlong.rollout.agentic:generate
               --custom-config-path "$OUT/agent.yaml")
else
   GRPO_ARGS+=(--apply-chat-template "${MULTI_TURN[@]}")
fi

# The warm-up's evals run the multi-turn generate function too: they score the model
# with the tool, as GRPO will use it.
warm_up "$OUT/sft" eval/lookup "${WARMUP_REWARD:-0.2}" 40 10 "${SFT_MAX_STEPS:-100}" \
   "${MODEL_ARGS[@]}" "${SFT_ARGS[@]}" "${EVAL_ARGS[@]}" "${MULTI_TURN[@]}"
"$PYTHON" train.py "${MODEL_ARGS[@]}" "${GRPO_ARGS[@]}" "${EVAL_ARGS[@]}"
finish "$OUT/sft" "$OUT/grpo"
