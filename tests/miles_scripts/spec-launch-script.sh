# The launch script of /work/shared/SPEC.md section 2 (the seed's family of scripts, which
# must parse), with MODEL_ARGS of Qwen3-4B and paths under $ROOT for H, R, S, P and E.
# Qwen3-4B, 8 GPUs, colocated, SGLang engines of 2 GPUs, trainer tp 2.
source "${SCRIPTS}/models/qwen3-4B.sh"
TRAIN_ARGS=(
   ${MODEL_ARGS[@]}
   --hf-checkpoint ${ROOT}/Qwen3-4B --ref-load ${ROOT}/Qwen3-4B
   --load ${ROOT}/Qwen3-4B_miles --save ${ROOT}/Qwen3-4B_miles --save-interval 20
   --prompt-data ${ROOT}/dapo-math-17k/dapo-math-17k.jsonl --input-key prompt
   --label-key label --apply-chat-template
   --rollout-shuffle --rm-type deepscaler --num-rollout 3000 --rollout-batch-size 32
   --n-samples-per-prompt 8 --rollout-max-response-len 8192 --rollout-temperature 1
   --global-batch-size 256 --balance-data
   --eval-interval 20 --eval-prompt-data aime ${ROOT}/aime-2024/aime-2024.jsonl
   --n-samples-per-eval-prompt 16
   --eval-max-response-len 16384 --eval-top-p 1
   --tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 1
   --context-parallel-size 1 --expert-model-parallel-size 1
   --expert-tensor-parallel-size 1 --recompute-granularity full
   --recompute-method uniform --recompute-num-layers 1 --use-dynamic-batch-size
   --max-tokens-per-gpu 9216
   --advantage-estimator grpo --use-kl-loss --kl-loss-coef 0.00
   --kl-loss-type low_var_kl --entropy-coef 0.00 --eps-clip 0.2 --eps-clip-high 0.28
   --optimizer adam --lr 1e-6 --lr-decay-style constant --weight-decay 0.1
   --adam-beta1 0.9 --adam-beta2 0.98
   --rollout-num-gpus-per-engine 2 --sglang-mem-fraction-static 0.7
   --attention-dropout 0.0 --hidden-dropout 0.0 --accumulate-allreduce-grads-in-fp32
   --attention-softmax-in-fp32 --attention-backend flash
   --actor-num-nodes 1 --actor-num-gpus-per-node 8 --colocate
)
