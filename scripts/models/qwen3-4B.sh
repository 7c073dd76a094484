# Qwen3-4B shape for the Megatron trainer (scale-out only; source it; do not run it).
# Numbers from the model's config.json: 36 layers, hidden 2560, FFN 9728, 32 query / 8 KV heads of 128, tied embeddings.
source "$(dirname "${BASH_SOURCE[0]}")/qwen3_shape.bash"
qwen3_model_args 36 2560 9728 32 tied
