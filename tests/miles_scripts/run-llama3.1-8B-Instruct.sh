# Miles' scripts/run-llama3.1-8B-Instruct.sh (radixark/miles @ fd7c64e84): its flag arrays
# and the arguments of its `python3 train.py`, in order. Only paths changed:
# /root -> $ROOT, and --ref-load names the HF directory (furlong reads no
# Megatron torch_dist checkpoint).
# Llama-3.1-8B-Instruct, 8 GPUs, colocated, SGLang engines of 2 GPUs, tp 2.
source "${SCRIPTS}/models/llama3.1-8B-Instruct.sh"
CKPT_ARGS=(
   --hf-checkpoint ${ROOT}/Llama-3.1-8B-Instruct
   --ref-load ${ROOT}/Llama-3.1-8B-Instruct
   --load ${ROOT}/Llama-3.1-8B-Instruct_slime/
   --save ${ROOT}/Llama-3.1-8B-Instruct_slime/
   --save-interval 20
)

ROLLOUT_ARGS=(
   --prompt-data ${ROOT}/dapo-math-17k/dapo-math-17k.jsonl
   --input-key prompt
   --label-key label
   --apply-chat-template
   --rollout-shuffle
   --rm-type math
   --num-epoch 1
   --rollout-batch-size 32
   --n-samples-per-prompt 8
   --rollout-max-response-len 16384
   --rollout-temperature 0.8
   --global-batch-size 256
   --balance-data
)

EVAL_ARGS=(
   --eval-interval 10
   --eval-prompt-data aime ${ROOT}/aime-2024/aime-2024.jsonl
   --n-samples-per-eval-prompt 8
   --eval-max-response-len 16384
   --eval-top-p 0.7
)

PERF_ARGS=(
   --tensor-model-parallel-size 2
   --sequence-parallel
   --pipeline-model-parallel-size 1
   --context-parallel-size 1
   --expert-model-parallel-size 1
   --expert-tensor-parallel-size 1
   --recompute-granularity full
   --recompute-method uniform
   --recompute-num-layers 1
   --use-dynamic-batch-size
   --max-tokens-per-gpu 9216
)

GRPO_ARGS=(
   --advantage-estimator grpo
   --use-kl-loss
   --kl-loss-coef 0.00
   --kl-loss-type low_var_kl
   --entropy-coef 0.00
   --eps-clip 0.2
   --eps-clip-high 0.28
)

OPTIMIZER_ARGS=(
   --optimizer adam
   --lr 1e-6
   --lr-decay-style constant
   --weight-decay 0.1
   --adam-beta1 0.9
   --adam-beta2 0.98
)

WANDB_ARGS=(
)

SGLANG_ARGS=(
   --rollout-num-gpus-per-engine 2
   --sglang-mem-fraction-static 0.8
)

MISC_ARGS=(
   --attention-dropout 0.0
   --hidden-dropout 0.0
   --accumulate-allreduce-grads-in-fp32
   --attention-softmax-in-fp32
   --attention-backend flash
)
TRAIN_ARGS=(
   --actor-num-nodes 1
   --actor-num-gpus-per-node 8
   --colocate
   ${MODEL_ARGS[@]}
   ${CKPT_ARGS[@]}
   ${ROLLOUT_ARGS[@]}
   ${OPTIMIZER_ARGS[@]}
   ${GRPO_ARGS[@]}
   ${WANDB_ARGS[@]}
   ${PERF_ARGS[@]}
   ${EVAL_ARGS[@]}
   ${SGLANG_ARGS[@]}
   ${MISC_ARGS[@]}
)
