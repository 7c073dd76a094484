# The Qwen3 dense shape for the Megatron trainer, shared by scripts/models/qwen3-*.sh (source it; do not run it).
# Every Qwen3 dense size has SwiGLU, grouped-query attention with 8 KV heads of 128, rotary base 1e6, RMSNorm 1e-6,
# QK layernorm, no linear biases and a 151936-token vocabulary; the sizes differ in the numbers passed here.
#
# qwen3_model_args LAYERS HIDDEN FFN HEADS TIED  ->  sets MODEL_ARGS (TIED: tied | untied embeddings)
qwen3_model_args() {
  local layers=$1 hidden=$2 ffn=$3 heads=$4 tied=$5
  MODEL_ARGS=(
    --swiglu
    --num-layers "$layers"
    --hidden-size "$hidden"
    --ffn-hidden-size "$ffn"
    --num-attention-heads "$heads"
    --group-query-attention
    --num-query-groups 8
    --kv-channels 128
    --use-rotary-position-embeddings
    --rotary-base 1000000
    --normalization RMSNorm
    --norm-epsilon 1e-6
    --qk-layernorm
    --disable-bias-linear
  )
  case $tied in
    tied) ;;
    untied) MODEL_ARGS+=(--untie-embeddings-and-output-weights) ;;
    *) echo "qwen3_model_args: TIED must be tied or untied, got '$tied'" >&2; return 1 ;;
  esac
  MODEL_ARGS+=(--vocab-size 151936)
}
