# Miles' scripts/fsdp_rl/deepseek-v3.sh (radixark/miles @ 71d77e5a2): its knobs, then the
# shared arrays. DeepSeek-V3 (MoE), 8 nodes x 8 GPUs, colocated, engines of 1 GPU, FSDP.
export RUN_ID=deepseek-v3
export MODEL=DeepSeek-V3
export NNODES=8 GPUS_PER_NODE=8 CPU_OFFLOAD=1 MAX_TOKENS_PER_GPU=8192 SGLANG_MEM=0.4
source "${SCRIPTS}/fsdp_rl/common.sh"
