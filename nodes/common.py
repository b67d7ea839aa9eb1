"""Values passed between StreamDiT nodes, the stream registry, and small conversions.

Socket types (custom type strings; ComfyUI matches them by string equality):

* ``STREAMDIT_MODEL``    :class:`ModelHandle` — a loaded pipeline and where it came from.
* ``STREAMDIT_SETTINGS`` the core's ``StreamSettings`` (frozen, validated).
* ``STREAMDIT_PROMPTS``  :class:`PromptsSpec` — a parsed prompt schedule.
* ``STREAMDIT_VIDEO``    :class:`VideoSpec` — input frames for video-to-video.
* ``STREAMDIT_LATENT``   :class:`StreamOutput` — what one sampler run produced (latents, frame index, and the
  committed stream state right after the run, which the save node writes).
* ``STREAMDIT_STATE``    :class:`StateHandle` — a stream state loaded from a file, to resume from.

ComfyUI's own types used as inputs: ``CONDITIONING`` (a list of ``[tensor [B, L, D], dict]``), ``VAE``
(``comfy.sd.VAE``), ``IMAGE``.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

MODEL = "STREAMDIT_MODEL"
SETTINGS = "STREAMDIT_SETTINGS"
PROMPTS = "STREAMDIT_PROMPTS"
VIDEO = "STREAMDIT_VIDEO"
LATENT = "STREAMDIT_LATENT"
STATE = "STREAMDIT_STATE"
CONDITIONING = "CONDITIONING"
VAE = "VAE"

CATEGORY = "StreamDiT"

_STREAM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_stream_id(stream_id: str, input_name: str = "stream_id") -> str:
    """Validate a user-visible stream id (it names files, so: letters, digits, ``. _ -``, at most 64)."""
    value = str(stream_id).strip()
    if not _STREAM_ID.match(value):
        raise ValueError(
            f"{input_name} {stream_id!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it is also used in file names)"
        )
    return value


# --------------------------------------------------------------------------------------------------------------
# Values on the sockets


@dataclass(frozen=True, eq=False)
class ModelHandle:
    """``STREAMDIT_MODEL``: a loaded ``StreamPipeline`` plus the facts that identify it."""

    pipeline: Any
    name: str
    path: str | None
    dtype: str
    attention: str
    device: str
    key: tuple[Any, ...]


@dataclass(frozen=True, eq=False)
class PromptsSpec:
    """``STREAMDIT_PROMPTS``: the schedule text and its parsed form."""

    text: str
    transition: int
    schedule: Any


@dataclass(frozen=True, eq=False)
class VideoSpec:
    """``STREAMDIT_VIDEO``: frames ``[F, 3, H, W]`` in 0..1 (CPU, float32) and how to use them."""

    frames: torch.Tensor
    strength: float
    on_end: str
    encoder: Any = None  # frames → raw VAE latents (latent models); None = the model's own codec
    temporal_factor: int = 1

    def source(self) -> Any:
        """The core ``VideoSource`` (the core resizes to the stream's resolution and caches the encoding by
        frames tensor and encoder, so the same objects are passed on every run)."""
        from ._core import core

        return core("v2v").VideoSource(self.frames, strength=self.strength, on_end=self.on_end, encoder=self.encoder,
                                       temporal_factor=self.temporal_factor)


@dataclass(frozen=True, eq=False)
class StreamOutput:
    """``STREAMDIT_LATENT``: one sampler run's result.

    Attributes:
        stream_id: the stream that advanced.
        frame_index: index of the first frame emitted by this run.
        frame_count: frames emitted by this run.
        latents: the run's latents ``[1, C, F, h, w]`` (the codec's encoding of the emitted frames).
        state: the committed stream state right after this run (immutable; the save node writes it).
        settings: the stream's settings.
        model: the model handle.
        restarted: the stream (re)started on this run (a streaming decoder must start again too).
        resume_decoder: on a restart from a saved state, the decoder state saved with it (``DecoderState``).
        decoder_state: after StreamDiT Decode, the decoder's state right after decoding this run (Save State
            writes it). Its outputs count decoded frames in ``frame_index``/``frame_count``.
    """

    stream_id: str
    frame_index: int
    frame_count: int
    latents: torch.Tensor | None
    state: Any
    settings: Any
    model: ModelHandle
    restarted: bool = False
    resume_decoder: Any = None
    decoder_state: Any = None


@dataclass(frozen=True, eq=False)
class StateHandle:
    """``STREAMDIT_STATE``: a saved stream state to start a stream from."""

    state: Any
    metadata: dict[str, str]
    path: str
    origin: tuple[Any, ...]
    decoder_state: Any = None


# --------------------------------------------------------------------------------------------------------------
# The stream registry (module level: ComfyUI discards node instances between prompts)


@dataclass
class StreamEntry:
    """One live stream. ``lock`` serialises advances; fields change only under it."""

    stream_id: str
    lock: threading.RLock = field(default_factory=threading.RLock)
    state: Any = None
    config_key: tuple[Any, ...] | None = None
    sampler: Any = None
    sampler_key: tuple[Any, ...] | None = None
    last_prompt_id: str | None = None
    last_result: tuple[Any, ...] | None = None
    runs: int = 0
    decoder: Any = None  # nodes.vae.DecoderRecord: the streaming decoder's state, kept across queue runs


class StreamRegistry:
    """Thread-safe ``stream_id → StreamEntry`` map (node code runs on ComfyUI's worker thread, HTTP routes on
    the event-loop thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, StreamEntry] = {}

    def entry(self, stream_id: str) -> StreamEntry:
        """The entry for ``stream_id``, created empty if new."""
        with self._lock:
            found = self._streams.get(stream_id)
            if found is None:
                found = self._streams[stream_id] = StreamEntry(stream_id)
            return found

    def get(self, stream_id: str) -> StreamEntry | None:
        with self._lock:
            return self._streams.get(stream_id)

    def reset(self, stream_id: str) -> bool:
        """Forget a stream (its next run starts fresh). Returns whether it existed."""
        with self._lock:
            found = self._streams.pop(stream_id, None)
        if found is None:
            return False
        with found.lock:  # wait for a running advance on it to finish
            found.state = None
            found.last_prompt_id = None
            found.last_result = None
            found.decoder = None
        return True

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._streams)

    def clear(self) -> None:
        with self._lock:
            self._streams.clear()

    def snapshot(self) -> dict[str, int]:
        """``stream_id → frames emitted`` for every stream that has a state."""
        with self._lock:
            entries = list(self._streams.values())
        return {e.stream_id: int(e.state.frames_emitted) for e in entries if e.state is not None}


STREAMS = StreamRegistry()


# --------------------------------------------------------------------------------------------------------------
# Conversions


def frames_to_image(frames: torch.Tensor) -> torch.Tensor:
    """Core frames ``[F, 3, H, W]`` in 0..1 → ComfyUI ``IMAGE`` ``[F, H, W, 3]`` float32 on CPU."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected frames [F, 3, H, W], got {tuple(frames.shape)}")
    return frames.detach().to(device="cpu", dtype=torch.float32).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()


def image_to_frames(image: torch.Tensor, input_name: str = "images") -> torch.Tensor:
    """ComfyUI ``IMAGE`` ``[F, H, W, C]`` → ``[F, 3, H, W]`` float32 0..1 on CPU (alpha dropped, gray expanded)."""
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{input_name} must be an IMAGE batch [frames, H, W, 3], got {shape}")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    channels = image.shape[-1]
    if channels == 1:
        image = image.expand(*image.shape[:-1], 3)
    elif channels == 4:
        image = image[..., :3]
    elif channels != 3:
        raise ValueError(f"{input_name} must have 1, 3 or 4 channels, got {channels}")
    if image.shape[0] == 0:
        raise ValueError(f"{input_name} has no frames")
    return image.detach().to(device="cpu", dtype=torch.float32).clamp(0.0, 1.0).permute(0, 3, 1, 2).contiguous()


def to_pil(frame: torch.Tensor) -> Any:
    """One frame ``[3, H, W]`` or ``[H, W, 3]`` in 0..1 → ``PIL.Image`` (RGB)."""
    import numpy as np
    from PIL import Image

    if frame.ndim != 3:
        raise ValueError(f"expected one frame, got {tuple(frame.shape)}")
    if frame.shape[0] == 3 and frame.shape[-1] != 3:
        frame = frame.permute(1, 2, 0)
    array = (frame.detach().float().cpu().clamp(0.0, 1.0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))
