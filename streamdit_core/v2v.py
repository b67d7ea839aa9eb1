"""Video-to-video input: frames that enter the buffer noised to ``σ = strength`` instead of pure noise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

__all__ = ["VideoSource", "OnEnd", "StreamEnded", "resize_frames"]

OnEnd = Literal["loop", "hold", "stop"]


class StreamEnded(RuntimeError):
    """The video driving a stream with ``on_end='stop'`` has been used up."""


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[F, 3, h, w]`` → ``[F, 3, height, width]`` (bilinear with antialiasing; unchanged if already that size)."""
    if frames.shape[-2:] == (height, width):
        return frames.float()
    return F.interpolate(
        frames.float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False
    ).clamp(0, 1)


@dataclass(frozen=True)
class VideoSource:
    """A video that drives the stream.

    Attributes:
        frames: ``[F, 3, H, W]`` float in [0, 1] (any size; resized to the stream's).
        strength: noise level the input enters at; 1 = pure noise (text-to-video), small = close to the input.
        on_end: when the stream needs frames past the end: ``loop`` from the start, ``hold`` the last frame,
            or ``stop`` the stream once the last input frame has been emitted.
        encoder: frames ``[F, 3, H, W]`` (already at the stream's size) → the raw latents ``[1, C, F', h, w]``
            of a VAE outside the pipeline (Wan's, from the host; the sampler maps them into the model's space
            with the codec's ``normalise``); ``None`` = the pipeline's own codec.
        temporal_factor: input frames per latent frame of ``encoder`` after the first (causal VAEs: ``F' =
            (F − 1) // t + 1``); 1 for frame-wise codecs.
    """

    frames: torch.Tensor
    strength: float = 0.7
    on_end: OnEnd = "loop"
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None
    temporal_factor: int = 1

    def __post_init__(self) -> None:
        if self.frames.dim() != 4 or self.frames.shape[1] != 3 or self.frames.shape[0] < 1:
            raise ValueError(f"video frames must be [F>=1, 3, H, W], got {list(self.frames.shape)}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.on_end not in get_args(OnEnd):
            raise ValueError(f"on_end must be one of {list(get_args(OnEnd))}, got {self.on_end!r}")
        if not isinstance(self.temporal_factor, int) or self.temporal_factor < 1:
            raise ValueError(f"temporal_factor must be an integer >= 1, got {self.temporal_factor!r}")

    @property
    def num_frames(self) -> int:
        """Stream frames the input provides (latent frames for a causal VAE)."""
        return (int(self.frames.shape[0]) - 1) // self.temporal_factor + 1

    @property
    def end_index(self) -> int:
        """First output index past the end for ``stop``; −1 (endless) otherwise."""
        return self.num_frames if self.on_end == "stop" else -1

    def source_indices(self, indices: list[int]) -> list[int]:
        """Input frame used for each output-frame index (negative indices use frame 0)."""
        n = self.num_frames
        if self.on_end == "loop":
            return [max(i, 0) % n for i in indices]
        return [min(max(i, 0), n - 1) for i in indices]
