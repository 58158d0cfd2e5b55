# MODEL_ARGS of the embedded tiny model (python -m furlong.tiny OUT): Qwen3, 0.49M parameters.
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
)
