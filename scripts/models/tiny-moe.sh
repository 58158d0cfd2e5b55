# MODEL_ARGS of the embedded tiny MoE (python -m furlong.tiny OUT --moe): the tiny model's
# (tiny.sh) plus its experts: Qwen3-MoE, 8 experts of width 128, 2 routed per token, every
# layer MoE.
source "$(dirname "${BASH_SOURCE[0]}")/tiny.sh"
MODEL_ARGS+=(
   --num-experts 8
   --moe-router-topk 2
   --moe-ffn-hidden-size 128
   --moe-router-score-function softmax
   --moe-layer-freq "[1]*2"
   --moe-token-dispatcher-type alltoall
   --moe-grouped-gemm
   --moe-aux-loss-coeff 0.01
)
