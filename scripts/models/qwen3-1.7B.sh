# Qwen3-1.7B shape for the Megatron trainer (scale-out only; source it; do not run it).
# Numbers from the model's config.json: 28 layers, hidden 2048, FFN 6144, 16 query / 8 KV heads of 128, tied embeddings.
source "$(dirname "${BASH_SOURCE[0]}")/qwen3_shape.bash"
qwen3_model_args 28 2048 6144 16 tied
