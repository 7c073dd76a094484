# Qwen3-1.7B shape for the Megatron trainer (scale-out only; source it; do not run it).
# Numbers from the model's config.json: 28 layers, hidden 2048, FFN 6144, 16 query / 8 KV heads of 128, tied embeddings.
MODEL_ARGS=(
  --swiglu
  --num-layers 28
  --hidden-size 2048
  --ffn-hidden-size 6144
  --num-attention-heads 16
  --group-query-attention
  --num-query-groups 8
  --kv-channels 128
  --use-rotary-position-embeddings
  --rotary-base 1000000
  --normalization RMSNorm
  --norm-epsilon 1e-6
  --qk-layernorm
  --disable-bias-linear
  --vocab-size 151936
)
