# Qwen3-8B shape for the Megatron trainer (scale-out only; source it; do not run it).
# Numbers from the model's config.json: 36 layers, hidden 4096, FFN 12288, 32 query / 8 KV heads of 128, untied embeddings.
source "$(dirname "${BASH_SOURCE[0]}")/qwen3_shape.bash"
qwen3_model_args 36 4096 12288 32 untied
