"""StreamDiT node classes (classic V1 API) and their registration tables.

One module per node family; every call into ComfyUI goes through :mod:`.host`.
"""

from __future__ import annotations

import logging
from typing import Any

from . import host
from .conditioning import StreamDiTConditioningSchedule
from .inputs import StreamDiTPromptSchedule, StreamDiTVideoInput
from .model import StreamDiTModelLoader, StreamDiTSettings
from .sampler import StreamDiTSampler
from .state import StreamDiTLoadState, StreamDiTReset, StreamDiTSaveState, streams_json
from .vae import StreamDiTDecode
from .writer import StreamDiTWriter

logger = logging.getLogger("StreamDiT.nodes")

# Node ids are permanent: saved workflows refer to them.
NODE_CLASS_MAPPINGS: dict[str, type] = {
    "StreamDiTModelLoader": StreamDiTModelLoader,
    "StreamDiTSettings": StreamDiTSettings,
    "StreamDiTPromptSchedule": StreamDiTPromptSchedule,
    "StreamDiTVideoInput": StreamDiTVideoInput,
    "StreamDiTSampler": StreamDiTSampler,
    "StreamDiTWriter": StreamDiTWriter,
    "StreamDiTSaveState": StreamDiTSaveState,
    "StreamDiTLoadState": StreamDiTLoadState,
    "StreamDiTReset": StreamDiTReset,
    "StreamDiTConditioningSchedule": StreamDiTConditioningSchedule,
    "StreamDiTDecode": StreamDiTDecode,
}

NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "StreamDiTModelLoader": "StreamDiT Model Loader",
    "StreamDiTSettings": "StreamDiT Settings",
    "StreamDiTPromptSchedule": "StreamDiT Prompt Schedule",
    "StreamDiTVideoInput": "StreamDiT Video Input",
    "StreamDiTSampler": "StreamDiT Sampler",
    "StreamDiTWriter": "StreamDiT Writer",
    "StreamDiTSaveState": "StreamDiT Save State",
    "StreamDiTLoadState": "StreamDiT Load State",
    "StreamDiTReset": "StreamDiT Reset",
    "StreamDiTConditioningSchedule": "StreamDiT Conditioning Schedule",
    "StreamDiTDecode": "StreamDiT Decode",
}


def _register_routes(routes: Any) -> None:
    from aiohttp import web

    from .common import STREAMS, check_stream_id

    @routes.get("/streamdit/streams")  # type: ignore[untyped-decorator]
    async def list_streams(request: web.Request) -> web.Response:
        return web.Response(text=streams_json(), content_type="application/json")

    @routes.post("/streamdit/reset")  # type: ignore[untyped-decorator]
    async def reset_stream(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            sid = check_stream_id(str(body.get("stream_id", "")))
        except Exception as exc:  # bad JSON or a bad id: a client error, never a server crash
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"stream_id": sid, "reset": STREAMS.reset(sid)})


def setup() -> None:
    """Host set-up at import time, cheap and failure-tolerant: model folder and HTTP routes."""
    try:
        host.register_model_folder()
        host.add_routes(_register_routes)
    except Exception:  # never make the pack fail to import because of an optional extra
        logger.warning("StreamDiT: host set-up failed", exc_info=True)
