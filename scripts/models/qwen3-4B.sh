# Qwen3-4B shape for the Megatron trainer (scale-out only; source it; do not run it).
# Numbers from the model's config.json: 36 layers, hidden 2560, FFN 9728, 32 query / 8 KV heads of 128, tied embeddings.
MODEL_ARGS=(
  --swiglu
  --num-layers 36
  --hidden-size 2560
  --ffn-hidden-size 9728
  --num-attention-heads 32
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
