"""Streaming decode with a causal video VAE: chunk-by-chunk decoding that equals decoding the whole video.

Wan 2.1's VAE decoder (and others of its family: ComfyUI's ``comfy.ldm.wan.vae.WanVAE``, diffusers'
``AutoencoderKLWan``) is causal in time: it decodes one latent frame at a time and every causal 3-D
convolution keeps the last input frames of the previous call in a *feature cache*, a list with one slot per
convolution (``None`` before the first frame, a tensor, or the marker ``"Rep"`` that the temporal upsampler
leaves after the first frame). The first latent frame gives 1 output frame, every later one
``temporal_factor`` (4 for Wan). Keeping that list alive between calls makes decoding latent frames in any
grouping — one chunk per queue run, across server restarts when the cache is saved — produce exactly the
frames of one decode of the whole latent video, with no seam.

This module is host-agnostic: a :class:`CausalStepDecoder` decodes one latent frame with a given cache (the
adapter :class:`ModuleStepDecoder` drives any Wan-style decoder module), and :class:`DecoderState` is the
immutable stream of decoding — cache, latent frames consumed, output frames produced — with a
tensor-only ``state_dict`` for the stream-state file. :func:`decode_chunk` is pure: it returns a new state
and never modifies the old one, so an error (or an interrupt) leaves the caller's state as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .log import get_logger

__all__ = [
    "REP",
    "CacheEntry",
    "CausalStepDecoder",
    "ModuleStepDecoder",
    "DecoderState",
    "decode_chunk",
    "decoded_length",
    "count_causal_convs",
]

log = get_logger("causal_decode")

REP = "Rep"
"""The marker Wan's temporal upsampler leaves in its cache slot after the first latent frame."""

CacheEntry = torch.Tensor | str | None

_NONE, _TENSOR, _REP = 0, 1, 2


class CausalStepDecoder(Protocol):
    """Decodes one latent frame with a feature cache.

    Attributes:
        num_slots: length of the feature cache (one slot per causal convolution of the decoder).
    """

    num_slots: int

    def __call__(self, z: torch.Tensor, cache: list[CacheEntry], first: bool) -> torch.Tensor:
        """``z`` ``[1, C, 1, h, w]`` (raw VAE latents) → frames ``[1, 3, T, H, W]`` in [−1, 1] (roughly);
        ``cache`` is updated in place (entries replaced, never modified); ``first`` marks the stream's first
        latent frame."""
        ...


def count_causal_convs(
    module: torch.nn.Module, class_names: Sequence[str] = ("CausalConv3d", "WanCausalConv3d")
) -> int:
    """Number of causal convolutions in a decoder (the length of its feature cache), found by class name so
    no host class has to be imported."""
    return sum(1 for m in module.modules() if type(m).__name__ in class_names)


@dataclass
class ModuleStepDecoder:
    """Adapter for Wan-style VAEs: ``pre`` is the 1×1×1 convolution applied to latents before the decoder
    (``conv2`` in ComfyUI/Wan, ``post_quant_conv`` in diffusers; it has no temporal extent, so applying it per
    frame equals applying it to the whole video), ``decoder`` is called as
    ``decoder(x, feat_cache=cache, feat_idx=[0])`` (plus ``first_chunk=first`` when ``first_chunk_arg``,
    diffusers' signature). Inputs are moved to ``device``/``dtype`` (the VAE's)."""

    pre: Callable[[torch.Tensor], torch.Tensor]
    decoder: Callable[..., torch.Tensor]
    num_slots: int
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    first_chunk_arg: bool = False

    @classmethod
    def from_diffusers(
        cls, vae: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> ModuleStepDecoder:
        """The adapter for diffusers' ``AutoencoderKLWan``: ``post_quant_conv``, then its decoder with
        ``first_chunk``."""
        return cls(pre=vae.post_quant_conv, decoder=vae.decoder, num_slots=count_causal_convs(vae.decoder),
                   device=device, dtype=dtype, first_chunk_arg=True)

    def __call__(self, z: torch.Tensor, cache: list[CacheEntry], first: bool) -> torch.Tensor:
        x = self.pre(z.to(device=self.device, dtype=self.dtype))
        kwargs = {"first_chunk": first} if self.first_chunk_arg else {}
        return self.decoder(x, feat_cache=cache, feat_idx=[0], **kwargs)


def decoded_length(latent_frames: int, temporal_factor: int) -> int:
    """Output frames of ``latent_frames`` latent frames from the start: ``1 + t·(n − 1)`` (0 for none)."""
    return 0 if latent_frames <= 0 else 1 + temporal_factor * (latent_frames - 1)


@dataclass(frozen=True)
class DecoderState:
    """Where a streaming decode stands.

    Attributes:
        cache: the decoder's feature cache, one entry per slot (``None``, a tensor, or :data:`REP`).
        latent_index: latent frames decoded so far (the stream's latent index of the next frame to decode).
        frame_index: output frames produced so far (the index of the next decoded frame).
    """

    cache: tuple[CacheEntry, ...]
    latent_index: int = 0
    frame_index: int = 0

    @classmethod
    def fresh(cls, num_slots: int) -> DecoderState:
        """A decoder that has not seen any frame."""
        if num_slots < 1:
            raise ValueError(f"a causal decoder needs at least one cache slot, got {num_slots}")
        return cls(cache=(None,) * num_slots)

    @property
    def num_slots(self) -> int:
        return len(self.cache)

    # -- serialisation (tensors only, so it fits in a safetensors stream-state file) ------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``kinds`` (int8 per slot: 0 empty, 1 tensor, 2 Rep), ``index`` ``[latent_index, frame_index]``, and
        ``cache.<i>`` for every tensor slot (CPU copies)."""
        kinds = []
        out: dict[str, torch.Tensor] = {}
        for i, entry in enumerate(self.cache):
            if entry is None:
                kinds.append(_NONE)
            elif isinstance(entry, str):
                if entry != REP:
                    raise ValueError(f"unknown decoder cache marker {entry!r} in slot {i}")
                kinds.append(_REP)
            else:
                kinds.append(_TENSOR)
                out[f"cache.{i}"] = entry.detach().to("cpu").contiguous().clone()
        out["kinds"] = torch.tensor(kinds, dtype=torch.int8)
        out["index"] = torch.tensor([self.latent_index, self.frame_index], dtype=torch.int64)
        return out

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> DecoderState:
        """Inverse of :meth:`state_dict`. Raises ``ValueError`` naming what is missing or malformed."""
        try:
            kinds = [int(k) for k in d["kinds"].tolist()]
            latent_index, frame_index = (int(v) for v in d["index"].tolist())
        except KeyError as exc:
            raise ValueError(f"decoder state is missing {exc.args[0]!r}") from None
        cache: list[CacheEntry] = []
        for i, kind in enumerate(kinds):
            if kind == _NONE:
                cache.append(None)
            elif kind == _REP:
                cache.append(REP)
            elif kind == _TENSOR:
                if f"cache.{i}" not in d:
                    raise ValueError(f"decoder state has no tensor for cache slot {i}")
                cache.append(d[f"cache.{i}"])
            else:
                raise ValueError(f"decoder state slot {i} has unknown kind {kind}")
        if latent_index < 0 or frame_index < 0:
            raise ValueError(f"decoder state indices must be >= 0, got {latent_index}, {frame_index}")
        return cls(cache=tuple(cache), latent_index=latent_index, frame_index=frame_index)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DecoderState:
        """The same state with the cached tensors on ``device`` (and in ``dtype``)."""
        cache = tuple(e.to(device=device, dtype=dtype or e.dtype) if isinstance(e, torch.Tensor) else e
                      for e in self.cache)
        return DecoderState(cache, self.latent_index, self.frame_index)


def decode_chunk(
    decoder: CausalStepDecoder,
    state: DecoderState,
    latents: torch.Tensor,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    check: Callable[[], None] | None = None,
) -> tuple[DecoderState, torch.Tensor]:
    """Decode the next latent frames of a stream, continuing ``state``'s cache.

    Args:
        decoder: one-latent-frame decoder.
        state: where decoding stands (not modified).
        latents: ``[1, C, F, h, w]``, the ``F`` latent frames that follow ``state.latent_index``. In the
            model's normalised space when ``mean``/``std`` are given: raw = ``latents·std + mean`` (per channel,
            shapes broadcastable to ``[1, C, 1, 1, 1]``), else already raw VAE latents.
        check: called before every latent frame (interrupts); raising aborts without changing ``state``.
    Returns:
        the new state and the frames ``[T, 3, H, W]`` float32 in [0, 1] on the CPU.
    """
    if latents.dim() != 5 or latents.shape[0] != 1:
        raise ValueError(f"latents must be [1, C, F, h, w], got {list(latents.shape)}")
    if state.num_slots != decoder.num_slots:
        raise ValueError(
            f"decoder state has {state.num_slots} cache slots, the VAE's decoder has {decoder.num_slots}: it was "
            "made with another VAE"
        )
    z = latents.float()
    if mean is not None or std is not None:
        s = std.float().to(z.device).view(1, -1, 1, 1, 1) if std is not None else 1.0
        m = mean.float().to(z.device).view(1, -1, 1, 1, 1) if mean is not None else 0.0
        z = z * s + m
    cache = list(state.cache)  # entries are replaced by the decoder, never modified in place
    outputs = []
    with torch.inference_mode():
        for i in range(z.shape[2]):
            if check is not None:
                check()
            first = state.latent_index + i == 0
            out = decoder(z[:, :, i : i + 1], cache, first)
            outputs.append(out.float().to("cpu"))
    if not outputs:
        return state, torch.zeros(0, 3, 0, 0)
    video = torch.cat(outputs, dim=2)[0]  # [3, T, H, W]
    frames = ((video + 1.0) * 0.5).clamp(0.0, 1.0).permute(1, 0, 2, 3).contiguous()
    new_state = DecoderState(
        cache=tuple(cache),
        latent_index=state.latent_index + int(z.shape[2]),
        frame_index=state.frame_index + int(frames.shape[0]),
    )
    return new_state, frames
