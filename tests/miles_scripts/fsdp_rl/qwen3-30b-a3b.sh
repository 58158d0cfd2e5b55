# Miles' scripts/fsdp_rl/qwen3-30b-a3b.sh (radixark/miles @ 71d77e5a2): its knobs, then the
# shared arrays. Qwen3-30B-A3B (MoE), 8 GPUs, colocated, engines of 1 GPU, FSDP.
export RUN_ID=qwen3-30b-a3b
export MODEL=Qwen3-30B-A3B
export NNODES=1 GPUS_PER_NODE=8 CPU_OFFLOAD=1 MAX_TOKENS_PER_GPU=10240 SGLANG_MEM=0.5
source "${SCRIPTS}/fsdp_rl/common.sh"
