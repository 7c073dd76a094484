"""Embedded SGLang-API-compatible inference server (HF transformers model, CPU or one GPU).

``server``: the FastAPI app and CLI; ``engine``: batched KV-cache decoding; ``protocol``: SGLang
request/answer shapes; ``launch``: subprocess launchers (single server, N engines + sglang-router).
"""

from slime.backends.embedded_sglang.launch import (
    EngineGroup,
    ServerHandle,
    find_free_port,
    launch_engine_group,
    launch_router,
    launch_server,
)

__all__ = ["EngineGroup", "ServerHandle", "find_free_port", "launch_engine_group", "launch_router", "launch_server"]
