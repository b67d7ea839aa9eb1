"""Per-frame adaLN maths shared by the model (``model.Block``) and the reference implementations of the fused
row kernels (``fp8_quant``): modulation and gating with one ``[b, F, D]`` vector per token-grid frame."""

from __future__ import annotations

import torch

__all__ = ["add_residual", "gate", "modulate", "per_frame"]


def per_frame(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``[b, L, D]`` → ``[b, frames, L/frames, D]`` (a view)."""
    return x.unflatten(1, (frames, -1))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x·(1 + scale) + shift`` with per-frame ``shift``/``scale`` ``[b, F, D]`` over ``x`` ``[b, L, D]``."""
    frames = shift.shape[1]
    out = per_frame(x, frames) * (1 + scale[:, :, None]) + shift[:, :, None]
    return out.flatten(1, 2)


def gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``x·g`` with per-frame gate ``g`` ``[b, F, D]`` over ``x`` ``[b, L, D]``."""
    return (per_frame(x, g.shape[1]) * g[:, :, None]).flatten(1, 2)


def add_residual(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """The residual stream after a branch: ``x + gate(y.float(), g)`` rounded to x's dtype before the add (or
    ``x + y`` without ``g``), as ``model.Block`` adds it. x, y ``[b, L, D]``; g ``[b, F, D]`` float32 or ``None``."""
    return x + (y if g is None else gate(y.float(), g).type_as(x))
