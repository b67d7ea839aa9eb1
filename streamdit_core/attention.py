"""The one attention dispatcher, and window partitioning for 3-D window self-attention.

Backends:
* ``sdpa``   — ``torch.nn.functional.scaled_dot_product_attention`` (picks cuDNN/flash kernels on GPUs).
* ``flash_attn`` — the ``flash_attn`` package (``pip install flash-attn``); CUDA, fp16/bf16 only.
* ``math``   — plain matmul + softmax in float32; the reference.
* ``auto``   — ``flash_attn`` when installed and usable for the inputs, else ``sdpa``.

An unknown backend, or a requested backend that is not available, raises; there is no silent fallback.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Literal, get_args

import torch
import torch.nn.functional as F

__all__ = [
    "Backend",
    "BACKENDS",
    "attention",
    "resolve_backend",
    "flash_attn_available",
    "effective_window",
    "window_partition",
    "window_reverse",
]

Backend = Literal["auto", "sdpa", "flash_attn", "math"]
BACKENDS: tuple[str, ...] = get_args(Backend)


@lru_cache(maxsize=1)
def _flash_attn_module() -> object | None:
    try:
        return importlib.import_module("flash_attn")
    except (ImportError, OSError, RuntimeError):
        return None


def flash_attn_available() -> bool:
    return _flash_attn_module() is not None


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn a backend name into a concrete backend for tensors on ``device`` with ``dtype``.

    Raises:
        ValueError: unknown name.
        RuntimeError: ``flash_attn`` requested but not installed or not usable for these tensors.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {list(BACKENDS)}")
    flash_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        return "flash_attn" if flash_ok and flash_attn_available() else "sdpa"
    if name == "flash_attn":
        if not flash_attn_available():
            raise RuntimeError(
                "attention backend 'flash_attn' is not installed: pip install flash-attn "
                "(or install this pack with the 'flash' extra), or choose 'sdpa'"
            )
        if not flash_ok:
            raise RuntimeError(
                f"attention backend 'flash_attn' needs CUDA tensors in float16/bfloat16, got {device.type} {dtype}; "
                "choose 'sdpa' or 'math'"
            )
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Dense attention.

    Args:
        q: ``[batch, Lq, heads, head_dim]``.
        k, v: ``[batch, Lk, heads, head_dim]``.
        backend: a concrete backend (see :func:`resolve_backend`); ``auto`` is resolved here.
    Returns:
        ``[batch, Lq, heads, head_dim]`` in q's dtype.
    """
    if backend == "auto":
        backend = resolve_backend("auto", q.device, q.dtype)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "math":
        scale = q.shape[-1] ** -0.5
        scores = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) * scale
        return torch.einsum("bhlm,bmhd->blhd", scores.softmax(dim=-1), v.float()).to(q.dtype)
    if backend == "flash_attn":
        module = _flash_attn_module()
        if module is None:
            resolve_backend("flash_attn", q.device, q.dtype)  # raises the install message
        return module.flash_attn_func(q, k, v)  # type: ignore[attr-defined]
    resolve_backend(backend, q.device, q.dtype)  # raises for unknown names
    raise AssertionError("unreachable")


def effective_window(grid: tuple[int, int, int], window: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """The window actually used on a token grid: per axis, the largest divisor of the grid size that is
    ``<=`` the requested size (so windows tile the grid exactly); ``None`` means the whole grid."""
    if window is None:
        return grid
    out = []
    for size, want in zip(grid, window):
        w = max(1, min(size, want))
        while size % w:
            w -= 1
        out.append(w)
    return (out[0], out[1], out[2])


def window_partition(
    x: torch.Tensor, grid: tuple[int, int, int], window: tuple[int, int, int], shift: bool
) -> torch.Tensor:
    """Group tokens into windows.

    Args:
        x: ``[batch, F·H·W, ...]`` tokens in (frame, row, column) order.
        grid: ``(F, H, W)`` token grid; ``window`` must tile it.
        shift: roll the grid by minus half a window on every axis first (cyclic, Swin style).
    Returns:
        ``[batch · n_windows, wf·wh·ww, ...]``.
    """
    b, tail = x.shape[0], x.shape[2:]
    f, h, w = grid
    wf, wh, ww = window
    x = x.reshape(b, f, h, w, *tail)
    if shift:
        x = torch.roll(x, shifts=(-(wf // 2), -(wh // 2), -(ww // 2)), dims=(1, 2, 3))
    x = x.reshape(b, f // wf, wf, h // wh, wh, w // ww, ww, *tail)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, *range(7, 7 + len(tail)))
    return x.reshape(-1, wf * wh * ww, *tail)


def window_reverse(
    x: torch.Tensor, batch: int, grid: tuple[int, int, int], window: tuple[int, int, int], shift: bool
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[batch · n_windows, wf·wh·ww, ...]`` → ``[batch, F·H·W, ...]``."""
    tail = x.shape[2:]
    f, h, w = grid
    wf, wh, ww = window
    x = x.reshape(batch, f // wf, h // wh, w // ww, wf, wh, ww, *tail)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, *range(7, 7 + len(tail)))
    x = x.reshape(batch, f, h, w, *tail)
    if shift:
        x = torch.roll(x, shifts=(wf // 2, wh // 2, ww // 2), dims=(1, 2, 3))
    return x.reshape(batch, f * h * w, *tail)
