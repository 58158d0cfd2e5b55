# Miles' scripts/fsdp_rl/common.sh (radixark/miles @ 71d77e5a2), the part that makes the
# arguments of its `python3 train.py`: the per-model knobs with their defaults, the flag
# arrays, and their order. Only the paths changed: the models and datasets live under
# $ROOT (MODELS_DIR, DATA_DIR). The per-model scripts set the knobs, then source this.
: "${MODELS_DIR:=${ROOT}/models}"
: "${DATA_DIR:=${ROOT}/datasets}"
: "${NNODES:=1}"
: "${GPUS_PER_NODE:=8}"
: "${CPU_OFFLOAD:=0}"
: "${MAX_TOKENS_PER_GPU:=16384}"
: "${SGLANG_MEM:=0.45}"
: "${SEQ:=8192}"
: "${RUN_ID:=fsdp-rl}"
[ "${#EXTRA_ARGS[@]}" -ge 0 ] 2>/dev/null || EXTRA_ARGS=()

case "$MODEL" in */*) HF="$MODEL" ;; *) HF="$MODELS_DIR/$MODEL" ;; esac
DAPO="$DATA_DIR/dapo-math-17k/dapo-math-17k.jsonl"
GSM8K_TEST="$DATA_DIR/gsm8k/test.parquet"

CKPT_ARGS=( --hf-checkpoint "$HF" )
ROLLOUT_ARGS=(
   --prompt-data "$DAPO" --input-key prompt --label-key label
   --apply-chat-template --rollout-shuffle --rm-type math
   --num-rollout 200 --rollout-batch-size 32 --n-samples-per-prompt 8
   --rollout-max-response-len "$SEQ" --rollout-temperature 1.0 --global-batch-size 256
)
EVAL_ARGS=(
   --eval-interval 10 --eval-prompt-data gsm8k "$GSM8K_TEST" --eval-input-key messages
   --n-samples-per-eval-prompt 1 --eval-max-response-len "$SEQ" --eval-top-k 1
)
GRPO_ARGS=( --advantage-estimator grpo --kl-loss-coef 0.0 --kl-coef 0.0 --entropy-coef 0.0 --eps-clip 0.2 --eps-clip-high 0.28 )
OPTIMIZER_ARGS=( --optimizer adam --lr 1e-6 --lr-decay-style constant --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.98 )
SGLANG_ARGS=( --rollout-num-gpus-per-engine 1 --sglang-mem-fraction-static "$SGLANG_MEM" --sglang-decode-log-interval 1000 --sglang-chunked-prefill-size 4096 --sglang-attention-backend fa3 )
TRAIN_BACKEND_ARGS=(
   --train-backend fsdp --update-weight-buffer-size 536870912
   --gradient-checkpointing --attn-implementation eager
   --train-env-vars '{"PYTORCH_CUDA_ALLOC_CONF":"expandable_segments:True"}'
)
[ "$CPU_OFFLOAD" = "1" ] && TRAIN_BACKEND_ARGS+=( --fsdp-cpu-offload )
PERF_ARGS=( --use-dynamic-batch-size --max-tokens-per-gpu "$MAX_TOKENS_PER_GPU" )
MISC_ARGS=( --actor-num-nodes "$NNODES" --actor-num-gpus-per-node "$GPUS_PER_NODE" --colocate --use-fault-tolerance --ci-test --ci-disable-logprobs-checker )
WANDB_ARGS=()

TRAIN_ARGS=(
   "${CKPT_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${EVAL_ARGS[@]}" "${OPTIMIZER_ARGS[@]}" "${GRPO_ARGS[@]}"
   "${SGLANG_ARGS[@]}" "${TRAIN_BACKEND_ARGS[@]}" "${PERF_ARGS[@]}" "${MISC_ARGS[@]}" "${WANDB_ARGS[@]}" "${EXTRA_ARGS[@]}"
)
