# MODEL_ARGS of the embedded tiny MoE (python -m furlong.tiny OUT --moe): Qwen3-MoE, 8 experts
# of width 128, 2 routed per token, every layer MoE.
MODEL_ARGS=(
   --swiglu
   --num-layers 2
   --hidden-size 128
   --ffn-hidden-size 512
   --num-attention-heads 4
   --group-query-attention
   --num-query-groups 2
   --use-rotary-position-embeddings
   --disable-bias-linear
   --normalization "RMSNorm"
   --norm-epsilon 1e-6
   --rotary-base 10000
   --vocab-size 22
   --kv-channels 32
   --qk-layernorm
   # moe
   --num-experts 8
   --moe-router-topk 2
   --moe-ffn-hidden-size 128
   --moe-router-score-function softmax
   --moe-layer-freq "[1]*2"
   --moe-token-dispatcher-type alltoall
   --moe-grouped-gemm
   --moe-aux-loss-coeff 0.01
)
