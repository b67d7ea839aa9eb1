"""Model configuration: a frozen, validated dataclass and the named presets.

The parameter layout is Wan 2.1's text-to-video DiT (so Wan checkpoints load by their original key names);
StreamDiT adds per-frame timesteps and window self-attention, which need no extra parameters.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = ["ModelConfig", "PRESETS", "preset"]


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 3 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be three integers (frames, height, width), got {value!r}")
    if any(v < 1 for v in value):
        raise ValueError(f"{name} entries must be >= 1, got {tuple(value)}")
    return (int(value[0]), int(value[1]), int(value[2]))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a StreamDiT backbone (Wan 2.1 layout).

    Attributes:
        in_dim: latent channels entering the patch embedding (3 for the bundled pixel-space model, 16 for Wan).
        out_dim: latent channels predicted (the velocity has the latent's channels).
        dim: transformer width.
        ffn_dim: hidden width of the feed-forward network.
        num_heads: attention heads; ``dim`` must divide by it and the head size must be even (RoPE).
        num_layers: transformer blocks.
        patch_size: (frames, height, width) of one token in latent units.
        text_dim: width of the text embeddings fed to cross-attention.
        text_len: number of text tokens per prompt (padded).
        freq_dim: width of the sinusoidal timestep embedding.
        window: default self-attention window in tokens (frames, height, width); ``None`` = full attention.
            Odd-numbered blocks shift the windows by half a window (cyclic).
        eps: norm epsilon.
        qk_norm: RMS-normalise queries and keys.
        cross_attn_norm: LayerNorm (with affine) before cross-attention.
        rope_theta: RoPE base.
    """

    in_dim: int = 3
    out_dim: int = 3
    dim: int = 256
    ffn_dim: int = 1024
    num_heads: int = 4
    num_layers: int = 6
    patch_size: tuple[int, int, int] = (1, 4, 4)
    text_dim: int = 128
    text_len: int = 24
    freq_dim: int = 256
    window: tuple[int, int, int] | None = None
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", _triple(self.patch_size, "patch_size"))
        if self.window is not None:
            object.__setattr__(self, "window", _triple(self.window, "window"))
        for name in ("in_dim", "out_dim", "dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "text_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.num_heads != 0:
            raise ValueError(f"ModelConfig.dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 != 0 or self.head_dim < 6:
            raise ValueError(f"head size dim/num_heads={self.head_dim} must be even and >= 6 for 3-D RoPE")
        if self.freq_dim < 2 or self.freq_dim % 2 != 0:
            raise ValueError(f"ModelConfig.freq_dim must be an even integer >= 2, got {self.freq_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def num_parameters(self) -> int:
        """Analytic parameter count (matches the module's, tested)."""
        d, f, t = self.dim, self.ffn_dim, self.text_dim
        attn = 4 * (d * d + d) + (2 * d if self.qk_norm else 0)
        block = 2 * attn + (2 * d if self.cross_attn_norm else 0) + (d * f + f + f * d + d) + 6 * d
        patch = self.in_dim * d * int(self.patch_size[0] * self.patch_size[1] * self.patch_size[2]) + d
        text = t * d + d + d * d + d
        time = self.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d
        head = d * self.out_dim * self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        head += self.out_dim * self.patch_size[0] * self.patch_size[1] * self.patch_size[2] + 2 * d
        return self.num_layers * block + patch + text + time + head

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields in checkpoint metadata: {unknown}")
        for key in ("patch_size", "window"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # The bundled default model: pixel space (3 channels), 64x64 frames, tokens of 2 frames x 4x4 pixels
    # (16x16 tokens per frame pair: small objects of 7 px stay resolvable), windows of 4 token frames
    # (8 frames) x 8x8 tokens, shifted every other block; fast enough for real time on a 2-core CPU.
    # A temporal patch of 2 means chunk sizes, buffer and reference frames must be even.
    "bundled": ModelConfig(
        dim=192, ffn_dim=768, num_heads=6, patch_size=(2, 4, 4), num_layers=8, window=(4, 8, 8)
    ),
    # A very small layout for unit tests.
    "test-tiny": ModelConfig(
        dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, text_len=8, freq_dim=32, patch_size=(1, 2, 2)
    ),
    # Wan 2.1 text-to-video layouts (16-channel latents from the Wan VAE, umT5-XXL text embeddings).
    "wan2.1-1.3b": ModelConfig(
        in_dim=16,
        out_dim=16,
        dim=1536,
        ffn_dim=8960,
        num_heads=12,
        num_layers=30,
        patch_size=(1, 2, 2),
        text_dim=4096,
        text_len=512,
        freq_dim=256,
    ),
    "wan2.1-14b": ModelConfig(
        in_dim=16,
        out_dim=16,
        dim=5120,
        ffn_dim=13824,
        num_heads=40,
        num_layers=40,
        patch_size=(1, 2, 2),
        text_dim=4096,
        text_len=512,
        freq_dim=256,
    ),
    # Paper-scale benchmark layout: about 4.0 B parameters, 8 latent channels (the paper's TAE).
    "paper-4b": ModelConfig(
        in_dim=8,
        out_dim=8,
        dim=3072,
        ffn_dim=7680,
        num_heads=24,
        num_layers=32,
        patch_size=(1, 2, 2),
        text_dim=4096,
        text_len=256,
        freq_dim=256,
    ),
}


def preset(name: str) -> ModelConfig:
    """Look up a named preset; unknown names list the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}") from None
