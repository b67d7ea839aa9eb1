"""Save, load and reset stream state."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from . import host
from ._core import core
from .common import CATEGORY, LATENT, STATE, STREAMS, StateHandle, StreamOutput, check_stream_id
from .sampler import settings_json

logger = logging.getLogger("StreamDiT.nodes")

IF_MISSING = ("start fresh", "error")
DECODER_PREFIX = "decoder."
"""Extra tensors of a state file that hold the streaming decoder's cache (StreamDiT Decode)."""


def _output_path(name: str, input_name: str) -> tuple[str, str]:
    """Resolve ``name`` (relative, inside the output folder; ``.safetensors`` added) → ``(absolute, relative)``."""
    rel = str(name).strip().replace("\\", "/")
    if not rel:
        raise ValueError(f"{input_name} is empty")
    if not rel.endswith(".safetensors"):
        rel += ".safetensors"
    if os.path.isabs(rel) or any(part == ".." for part in rel.split("/")):
        raise ValueError(f"{input_name} {name!r} must be a relative path inside ComfyUI's output folder")
    out_dir = os.path.abspath(host.output_directory())
    path = os.path.abspath(os.path.join(out_dir, rel))
    if os.path.commonpath([path, out_dir]) != out_dir:
        raise ValueError(f"{input_name} {name!r} must stay inside ComfyUI's output folder")
    return path, os.path.relpath(path, out_dir).replace(os.sep, "/")


def save_stream_state(latent: StreamOutput, filename_prefix: str) -> tuple[str, str]:
    """Write the state committed by the run that produced ``latent``; returns ``(absolute, relative)`` path."""
    if not isinstance(latent, StreamOutput):
        raise ValueError("latent must be the StreamDiT Sampler's 'latent' output")
    path, rel = _output_path(f"{str(filename_prefix).strip()}_{latent.stream_id}", "filename_prefix")
    metadata = {
        "stream_id": latent.stream_id,
        "model": latent.model.name,
        "settings": settings_json(latent.settings),
        "frames_emitted": str(int(latent.state.frames_emitted)),
    }
    extras = None
    if latent.decoder_state is not None:  # from StreamDiT Decode: the causal VAE cache continues with the stream
        extras = {DECODER_PREFIX + k: v for k, v in latent.decoder_state.state_dict().items()}
        metadata["decoder_frame_index"] = str(int(latent.decoder_state.frame_index))
    core("stream").save_state(latent.state, path, metadata=metadata, extras=extras)  # atomic (temp + rename)
    logger.info("saved stream %s at frame %d to %s", latent.stream_id, int(latent.state.frames_emitted), path)
    return path, rel


def load_stream_state(state_file: str, if_missing: str = "error") -> StateHandle | None:
    """Read a state file from the output folder; ``None`` if it is missing and ``if_missing`` says start fresh."""
    if if_missing not in IF_MISSING:
        raise ValueError(f"if_missing {if_missing!r} is not one of {list(IF_MISSING)}")
    path, rel = _output_path(state_file, "state_file")
    if not os.path.isfile(path):
        if if_missing == "start fresh":
            logger.info("state file %s does not exist yet; the stream starts from its seed", rel)
            return None
        raise FileNotFoundError(
            f"state_file {rel!r} not found in ComfyUI's output folder ({host.output_directory()}); StreamDiT Save "
            "State writes '<filename_prefix>_<stream_id>.safetensors' there"
        )
    stream_mod = core("stream")
    try:
        state, metadata = stream_mod.load_state(path)
        extras = stream_mod.load_state_extras(path)
        decoder = None
        if any(k.startswith(DECODER_PREFIX) for k in extras):
            decoder = core("causal_decode").DecoderState.from_state_dict(
                {k[len(DECODER_PREFIX) :]: v for k, v in extras.items() if k.startswith(DECODER_PREFIX)}
            )
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"state_file {rel!r} is not a StreamDiT stream state: {exc}") from exc
    st = os.stat(path)
    return StateHandle(state=state, metadata=dict(metadata), path=path, origin=(path, st.st_mtime_ns, st.st_size),
                       decoder_state=decoder)


class StreamDiTSaveState:
    """Saves the stream state after this run to the output folder (overwritten every run)."""

    DESCRIPTION = (
        "Saves the stream's state right after this run to ComfyUI's output folder as "
        "<filename_prefix>_<stream_id>.safetensors (replaced atomically every run). Load it with StreamDiT Load "
        "State to resume the stream exactly where it was, also after a restart."
    )
    CATEGORY = f"{CATEGORY}/state"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Absolute path of the saved state file.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "latent": (LATENT, {"tooltip": "The StreamDiT Sampler's 'latent' output (carries the state), or "
                           "StreamDiT Decode's (also saves the decoder cache, for seamless resumes of Wan streams)."}),
                "filename_prefix": (
                    "STRING",
                    {"default": "streamdit/state", "tooltip": "File name inside the output folder; "
                     "'_<stream_id>.safetensors' is added."},
                ),
            }
        }

    def save(self, latent: StreamOutput, filename_prefix: str) -> dict[str, Any]:
        path, rel = save_stream_state(latent, filename_prefix)
        frames = int(latent.state.frames_emitted)
        host.node_text(f"{rel} (frame {frames})")
        return {"ui": {"text": [f"{rel} (frame {frames})"], "frame_index": [frames]}, "result": (path,)}


class StreamDiTLoadState:
    """Loads a saved stream state to resume from (connect to the sampler's initial_state)."""

    DESCRIPTION = (
        "Loads a stream state saved by StreamDiT Save State (a path inside ComfyUI's output folder). Connect it to "
        "the sampler's 'initial_state': the stream starts from it when the stream is new (e.g. after a restart) "
        "or reset, and continues bit-exactly."
    )
    CATEGORY = f"{CATEGORY}/state"
    RETURN_TYPES = (STATE,)
    RETURN_NAMES = ("state",)
    OUTPUT_TOOLTIPS = ("The saved stream state (or nothing if the file is missing and if_missing = start fresh).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "state_file": (
                    "STRING",
                    {"default": "streamdit/state_stream-1.safetensors", "tooltip": "Path inside ComfyUI's output "
                     "folder, as written by StreamDiT Save State."},
                ),
                "if_missing": (
                    list(IF_MISSING),
                    {"default": "start fresh", "tooltip": "If the file does not exist: start fresh = the sampler "
                     "starts from its seed; error = stop with a message."},
                ),
            }
        }

    @classmethod
    def IS_CHANGED(cls, state_file: str, if_missing: str) -> str:
        try:
            path, _ = _output_path(state_file, "state_file")
            st = os.stat(path)
            return f"{path}:{st.st_mtime_ns}:{st.st_size}"
        except (OSError, ValueError):
            return f"missing:{state_file}"

    def load(self, state_file: str, if_missing: str) -> tuple[StateHandle | None]:
        return (load_stream_state(state_file, if_missing),)


class StreamDiTReset:
    """Forgets a stream so that its next run starts fresh."""

    DESCRIPTION = (
        "Resets the stream named stream_id: its next sampler run starts from the seed (or the connected initial "
        "state), and the writer starts its file again. Run it on its own (e.g. 'Queue selected output nodes'), "
        "not in the graph that streams, or the stream resets on every run."
    )
    CATEGORY = f"{CATEGORY}/state"
    RETURN_TYPES = ()
    FUNCTION = "reset"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "stream_id": ("STRING", {"default": "stream-1", "tooltip": "Name of the stream to reset."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> float:
        return float("nan")  # a reset must run every time it is queued

    def reset(self, stream_id: str) -> dict[str, Any]:
        sid = check_stream_id(stream_id)
        entry = STREAMS.get(sid)
        at = int(entry.state.frames_emitted) if entry is not None and entry.state is not None else None
        existed = STREAMS.reset(sid)
        if existed and at is not None:
            text = f"stream {sid} reset (was at frame {at})"
        else:
            text = f"stream {sid} was not running"
        logger.info(text)
        host.node_text(text)
        host.send_event("streamdit.reset", {"stream_id": sid})
        return {"ui": {"text": [text]}}


def streams_json() -> str:
    """``{stream_id: frames_emitted}`` of the live streams as JSON (used by the HTTP route)."""
    return json.dumps(STREAMS.snapshot(), sort_keys=True)
