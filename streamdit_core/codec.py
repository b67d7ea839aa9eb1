"""Codecs turn frames into model latents and back. The bundled model works in pixel space.

Frames are ``[F, 3, H, W]`` float in [0, 1]; latents are ``[1, C, F', H', W']`` (batch of one stream).
A latent codec (e.g. the Wan VAE, through ComfyUI) implements the same protocol.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

__all__ = ["Codec", "PixelCodec", "LatentCodec", "LATENT_CODECS", "wan21_codec"]


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


class LatentCodec:
    """The latent space of a VAE that lives outside the pipeline (Wan 2.1's, provided by the host, e.g.
    ComfyUI's ``VAE``). ``encode`` needs that VAE and raises; ``decode`` is only a cheap linear RGB preview —
    one frame per latent frame, upsampled ×``spatial_factor`` (nearest) — for progress previews and for the
    sampler's ``frames`` output; real frames come from the host's VAE (the streaming decode).

    Attributes:
        name: the latent space (``wan2.1``).
        rgb_factors: ``[C, 3]`` latent → RGB projection (the host may supply its own); ``None`` = a rough default
            (the first three channels).
        rgb_bias: ``[3]``.
        mean, std: ``[C]`` per-channel statistics of the VAE's raw latents; the model works on
            ``(raw − mean) / std`` (:meth:`normalise`), the VAE decodes ``x·std + mean`` (:meth:`denormalise`).
    """

    def __init__(
        self,
        name: str = "wan2.1",
        latent_channels: int = 16,
        spatial_factor: int = 8,
        temporal_factor: int = 4,
        rgb_factors: torch.Tensor | None = None,
        rgb_bias: torch.Tensor | None = None,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> None:
        self.name = name
        self.mean = torch.zeros(latent_channels) if mean is None else mean.float().reshape(latent_channels)
        self.std = torch.ones(latent_channels) if std is None else std.float().reshape(latent_channels)
        self.latent_channels = latent_channels
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        if rgb_factors is None:
            rgb_factors = torch.zeros(latent_channels, 3)
            rgb_factors[: min(3, latent_channels), : min(3, latent_channels)] = 0.5 * torch.eye(min(3, latent_channels))
        if tuple(rgb_factors.shape) != (latent_channels, 3):
            raise ValueError(f"rgb_factors must be [{latent_channels}, 3], got {list(rgb_factors.shape)}")
        self.rgb_factors = rgb_factors.float()
        self.rgb_bias = torch.zeros(3) if rgb_bias is None else rgb_bias.float().reshape(3)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """The VAE's raw latents ``[1, C, F, h, w]`` → the model's space."""
        shape = (1, -1, 1, 1, 1)
        return (raw.float() - self.mean.to(raw.device).view(shape)) / self.std.to(raw.device).view(shape)

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """The model's latents → the VAE's raw latents (inverse of :meth:`normalise`)."""
        shape = (1, -1, 1, 1, 1)
        return latents.float() * self.std.to(latents.device).view(shape) + self.mean.to(latents.device).view(shape)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            f"this model works in the latent space of an external VAE ({self.name}); frames must be encoded with "
            "that VAE (in ComfyUI: connect a VAE to StreamDiT Video Input)"
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[1, C, F, h, w]`` → preview ``[F, 3, h·sf, w·sf]`` in [0, 1] (float32, CPU)."""
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [1, {self.latent_channels}, F, h, w], got {list(latents.shape)}")
        x = latents[0].float().cpu().permute(1, 2, 3, 0)  # [F, h, w, C]
        rgb = (x @ self.rgb_factors + self.rgb_bias).permute(0, 3, 1, 2)  # [F, 3, h, w], roughly [-1, 1]
        if rgb.shape[0] and self.spatial_factor > 1:
            rgb = F.interpolate(rgb, scale_factor=self.spatial_factor, mode="nearest")
        return ((rgb + 1.0) * 0.5).clamp(0.0, 1.0)


# Wan 2.1 VAE latent statistics (the published per-channel mean and std of its 16 latent channels, as in Wan
# 2.1's own code and diffusers' AutoencoderKLWan config).
WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)  # fmt: skip
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)  # fmt: skip


def wan21_codec(rgb_factors: torch.Tensor | None = None, rgb_bias: torch.Tensor | None = None) -> LatentCodec:
    """Wan 2.1's latent space: 16 channels, ×8 spatial, ×4 temporal (causal), with its latent statistics."""
    return LatentCodec("wan2.1", 16, 8, 4, rgb_factors, rgb_bias, torch.tensor(WAN21_MEAN), torch.tensor(WAN21_STD))


LATENT_CODECS = {"wan2.1": wan21_codec}
"""Codec names a checkpoint's ``streamdit.codec`` may give besides ``pixel``."""
