# Model shape of the embedded defaults (source it; do not run it).
#
# The embedded torch trainer reads the architecture from the HF checkpoint's config.json
# (slime.embedded.models: tiny Qwen3 models), so no shape flags are needed. The file exists so that
# every launcher sources a shape file the same way: MODEL_SHAPE=embedded (the default).
MODEL_ARGS=()
