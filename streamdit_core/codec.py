"""Codecs turn frames into model latents and back. The bundled model works in pixel space.

Frames are ``[F, 3, H, W]`` float in [0, 1]; latents are ``[1, C, F', H', W']`` (batch of one stream).
A latent codec (e.g. the Wan VAE, through ComfyUI) implements the same protocol.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["Codec", "PixelCodec"]


class Codec(Protocol):
    latent_channels: int
    spatial_factor: int
    temporal_factor: int

    def encode(self, frames: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class PixelCodec:
    """Identity codec in pixel space: latents are frames mapped from [0, 1] to [−1, 1]."""

    latent_channels = 3
    spatial_factor = 1
    temporal_factor = 1

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """``[F, 3, H, W]`` in [0, 1] → ``[1, 3, F, H, W]`` in [−1, 1] (float32)."""
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be [F, 3, H, W], got {list(frames.shape)}")
        return (frames.float() * 2.0 - 1.0).permute(1, 0, 2, 3).unsqueeze(0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[1, 3, F, H, W]`` → ``[F, 3, H, W]`` in [0, 1] (clamped, float32)."""
        return ((latents[0].float().permute(1, 0, 2, 3) + 1.0) * 0.5).clamp(0.0, 1.0)
