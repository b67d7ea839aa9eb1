"""The stream writer node: appends every run's frames to one playable MP4 per stream."""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from typing import Any

import torch

from . import host
from ._core import core
from .common import CATEGORY, LATENT, StreamOutput

logger = logging.getLogger("StreamDiT.nodes")

_KEEP_PREVIEWS = 3


class _WriterSlot:
    """One output file: its writer, the latest frames (for the preview) and the preview files written."""

    def __init__(self, writer: Any, preview_len: int) -> None:
        self.writer = writer
        self.recent: deque[torch.Tensor] = deque(maxlen=max(preview_len, 1))
        self.previews: deque[str] = deque()
        self.counter = 0
        self.lock = threading.Lock()


_slots: dict[tuple[str, float], _WriterSlot] = {}
_slots_lock = threading.Lock()


def _slot(path: str, fps: float, preview_len: int) -> _WriterSlot:
    with _slots_lock:
        slot = _slots.get((path, fps))
        if slot is None:
            writer = core("video_io").StreamVideoWriter(path, fps)
            slot = _slots[(path, fps)] = _WriterSlot(writer, preview_len)
        if slot.recent.maxlen != max(preview_len, 1):
            slot.recent = deque(slot.recent, maxlen=max(preview_len, 1))
        return slot


def stream_file_path(filename_prefix: str, stream_id: str | None) -> tuple[str, str]:
    """``(absolute path, path relative to the output folder)`` of a stream's video; refuses to leave the output
    folder."""
    prefix = str(filename_prefix).strip().replace("\\", "/") or "streamdit/stream"
    if os.path.isabs(prefix) or any(part == ".." for part in prefix.split("/")):
        raise ValueError(f"filename_prefix {filename_prefix!r} must be a relative path inside the output folder")
    name = f"{prefix}_{stream_id}.mp4" if stream_id else f"{prefix}.mp4"
    out_dir = os.path.abspath(host.output_directory())
    path = os.path.abspath(os.path.join(out_dir, name))
    if os.path.commonpath([path, out_dir]) != out_dir:
        raise ValueError(f"filename_prefix {filename_prefix!r} must stay inside the output folder")
    return path, os.path.relpath(path, out_dir).replace(os.sep, "/")


def write_frames(
    images: torch.Tensor,
    filename_prefix: str,
    fps: float,
    preview_frames: int,
    latent: StreamOutput | None = None,
) -> dict[str, Any]:
    """Append ``images`` to the stream's file and write the preview; returns the node's ``{"ui", "result"}``."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty IMAGE batch [frames, H, W, 3]")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    stream_id = latent.stream_id if latent is not None else None
    path, rel = stream_file_path(filename_prefix, stream_id)
    slot = _slot(path, float(fps), int(preview_frames))
    with slot.lock:
        existing = slot.writer.frame_count()
        if latent is not None and latent.frame_index < existing:
            # The stream went back (reset, or resumed from an earlier state): start the file again.
            logger.info("stream %s restarted at frame %d; restarting %s (had %d frames)", stream_id,
                        latent.frame_index, rel, existing)
            slot.writer.reset()
            slot.recent.clear()
        elif latent is not None and latent.frame_index > existing:
            logger.info("stream %s is at frame %d but %s has %d frames; appending", stream_id,
                        latent.frame_index, rel, existing)
        total = int(slot.writer.append(images.detach().cpu(), layout="FHWC"))
        for frame in images.detach().cpu():
            slot.recent.append(frame)
        preview = _write_preview(slot, path, float(fps))
    text = f"{rel}: {total} frames"
    host.node_text(text)
    return {
        "ui": {"images": [preview], "animated": (True,), "text": [text]},
        "result": (path, total),
    }


def _write_preview(slot: _WriterSlot, path: str, fps: float) -> dict[str, str]:
    subfolder = "streamdit"
    folder = os.path.join(host.temp_directory(), subfolder)
    os.makedirs(folder, exist_ok=True)
    slot.counter += 1
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"{stem}_preview_{os.getpid()}_{slot.counter:06d}.webp"
    frames = torch.stack(list(slot.recent))
    core("video_io").write_webp(frames, os.path.join(folder, name), fps, quality=85, layout="FHWC")
    slot.previews.append(name)
    while len(slot.previews) > _KEEP_PREVIEWS:
        old = slot.previews.popleft()
        try:
            os.remove(os.path.join(folder, old))
        except OSError:
            pass
    return {"filename": name, "subfolder": subfolder, "type": "temp"}


class StreamDiTWriter:
    """Appends each run's frames to one growing MP4 per stream and previews the latest frames."""

    DESCRIPTION = (
        "Appends the frames of every queue run to one MP4 per stream in the output folder "
        "(<filename_prefix>_<stream_id>.mp4), playable after every run, also if ComfyUI stops mid-run. When "
        "the stream restarts the file starts again. Shows an animated preview of the latest frames."
    )
    CATEGORY = f"{CATEGORY}/output"
    RETURN_TYPES = ("STRING", "INT")
    RETURN_NAMES = ("path", "frame_count")
    OUTPUT_TOOLTIPS = ("Absolute path of the stream's MP4.", "Frames in the file after this run.")
    FUNCTION = "write"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The new frames (the StreamDiT Sampler's 'frames' output)."}),
                "filename_prefix": (
                    "STRING",
                    {"default": "streamdit/stream", "tooltip": "File name inside the output folder, without "
                     "extension; '_<stream_id>.mp4' is added when 'latent' is connected."},
                ),
                "fps": ("FLOAT", {"default": 16.0, "min": 1.0, "max": 120.0, "step": 1.0,
                                  "tooltip": "Frame rate of the video file and the preview."}),
                "preview_frames": ("INT", {"default": 32, "min": 1, "max": 512,
                                           "tooltip": "How many of the latest frames the animated preview shows."}),
            },
            "optional": {
                "latent": (LATENT, {"tooltip": "The sampler's 'latent' output: names the file after the stream and "
                                    "restarts the file when the stream restarts."}),
            },
        }

    def write(
        self,
        images: torch.Tensor,
        filename_prefix: str,
        fps: float,
        preview_frames: int,
        latent: StreamOutput | None = None,
    ) -> dict[str, Any]:
        return write_frames(images, filename_prefix, fps, preview_frames, latent)
