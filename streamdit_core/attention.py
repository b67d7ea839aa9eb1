"""The one attention dispatcher, and window partitioning for 3-D window self-attention.

Backends:
* ``sdpa``   — ``torch.nn.functional.scaled_dot_product_attention`` with PyTorch's own kernel choice.
* ``cudnn``  — SDPA restricted to the cuDNN kernel (``SDPBackend.CUDNN_ATTENTION``); CUDA, fp16/bf16 only.
  On an H100 it runs about twice as fast as SDPA's default (flash) kernel at this model's shapes.
* ``flash_attn`` — the ``flash_attn`` package (``pip install flash-attn``); CUDA, fp16/bf16 only.
* ``math``   — plain matmul + softmax in float32; the reference.
* ``auto``   — ``cudnn`` where a probe shows it works for the device and dtype, else ``flash_attn`` when
  installed and usable, else ``sdpa``.

An unknown backend, or a requested backend that is not available, raises; there is no silent fallback.
(One exception, logged: if the cuDNN kernel rejects a particular shape at run time, that call goes through
plain SDPA with a warning, since cuDNN's shape limits are not queryable up front.)
"""

from __future__ import annotations

import importlib
from functools import cache, lru_cache
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from .log import get_logger

log = get_logger("attention")

__all__ = [
    "Backend",
    "BACKENDS",
    "attention",
    "resolve_backend",
    "flash_attn_available",
    "cudnn_attention_available",
    "effective_window",
    "window_partition",
    "window_reverse",
    "window_index",
    "window_partition_indexed",
    "window_reverse_indexed",
]

Backend = Literal["auto", "sdpa", "cudnn", "flash_attn", "math"]
BACKENDS: tuple[str, ...] = get_args(Backend)


@lru_cache(maxsize=1)
def _flash_attn_module() -> object | None:
    try:
        return importlib.import_module("flash_attn")
    except (ImportError, OSError, RuntimeError):
        return None


def flash_attn_available() -> bool:
    return _flash_attn_module() is not None


def _sdpa_cudnn_raw(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA through the cuDNN kernel only. ``[b, L, h, d]`` in and out (output contiguous)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


_cudnn_failed_shapes: set[tuple[object, ...]] = set()


def _sdpa_cudnn_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device)
    if key not in _cudnn_failed_shapes:
        try:
            return _sdpa_cudnn_raw(q, k, v)
        except RuntimeError as exc:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise  # a CUDA-graph capture must fail as a whole; its caller falls back
            _cudnn_failed_shapes.add(key)
            log.warning("cuDNN attention rejected q%s k%s (%s); using plain SDPA for this shape",
                        list(q.shape), list(k.shape), str(exc).splitlines()[0][:200])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


# An opaque custom op, so torch.compile neither traces into the sdpa_kernel context nor breaks its graph.
_sdpa_cudnn = _sdpa_cudnn_impl
try:
    _op = torch.library.custom_op("streamdit::sdpa_cudnn", mutates_args=())(_sdpa_cudnn_impl)

    @_op.register_fake
    def _sdpa_cudnn_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    _sdpa_cudnn = _op
except (AttributeError, RuntimeError, TypeError):  # very old torch: no custom_op; eager use still works
    pass


@cache
def _cudnn_probe(device: str, dtype: torch.dtype) -> bool:
    """Whether the cuDNN attention kernel runs on this device and dtype (a tiny real call, cached)."""
    try:
        q = torch.randn(1, 128, 2, 64, device=device, dtype=dtype)
        _sdpa_cudnn_raw(q, q, q)
        torch.cuda.synchronize(device)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        log.info("cuDNN attention is not usable on %s %s: %s", device, dtype, str(exc).splitlines()[0][:200])
        return False


def cudnn_attention_available(device: torch.device, dtype: torch.dtype) -> bool:
    """cuDNN attention needs CUDA, fp16/bf16 and a cuDNN build that supports this GPU (probed once)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if not torch.backends.cudnn.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cudnn_probe(f"cuda:{index}", dtype)


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
        if cudnn_attention_available(device, dtype):
            return "cudnn"
        return "flash_attn" if flash_ok and flash_attn_available() else "sdpa"
    if name == "cudnn" and not cudnn_attention_available(device, dtype):
        raise RuntimeError(
            f"attention backend 'cudnn' needs CUDA tensors in float16/bfloat16 and a cuDNN that supports this GPU, "
            f"got {device.type} {dtype}; choose 'auto', 'sdpa' or 'math'"
        )
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
    if backend == "cudnn" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        backend = "sdpa"  # the cuDNN custom op is forward-only (inference); training differentiates plain SDPA
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "cudnn":
        return _sdpa_cudnn(q, k, v)
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


def window_index(
    grid: tuple[int, int, int], window: tuple[int, int, int], shift: bool, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token order of :func:`window_partition` as an index, for :func:`window_partition_indexed`.

    Position ``p`` of the partitioned sequence (window-major: window ``(i, j, k)`` in (frame, row, column)
    order, then the offset ``(a, b, c)`` inside it) holds the token at grid position
    ``((i·wf + a + sf) mod F, (j·wh + b + sh) mod H, (k·ww + c + sw) mod W)``, with ``s = ⌊window/2⌋`` on every
    axis when ``shift`` (the cyclic roll by minus half a window) and 0 otherwise.

    Returns:
        ``(index, inverse)``, both ``[F·H·W]`` int64 on ``device``: ``partitioned = x[:, index]`` and
        ``x = partitioned[:, inverse]``.
    """
    f, h, w = grid
    wf, wh, ww = window
    if f % wf or h % wh or w % ww:
        raise ValueError(f"window {window} does not tile the token grid {grid}")
    axes = []
    for size, win in zip(grid, window):
        start = (torch.arange(size // win) * win)[:, None]  # [n, 1] first position of each window
        offset = torch.arange(win)[None, :]  # [1, win]
        axes.append((start + offset + (win // 2 if shift else 0)) % size)  # [n, win] grid coordinate
    cf, ch, cw = axes
    # [nf, nh, nw, wf, wh, ww]: window indices first, then offsets, like window_partition's permute
    flat = (cf[:, None, None, :, None, None] * (h * w) + ch[None, :, None, None, :, None] * w
            + cw[None, None, :, None, None, :])
    index = flat.reshape(-1)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.numel())
    return index.to(device), inverse.to(device)


def window_partition_indexed(x: torch.Tensor, index: torch.Tensor, window_tokens: int) -> torch.Tensor:
    """:func:`window_partition` as one gather: ``x`` ``[batch, L, ...]``, ``index`` ``[L]`` from
    :func:`window_index` → ``[batch · n_windows, window_tokens, ...]`` (contiguous; no roll, no permute)."""
    return x.index_select(1, index).reshape(-1, window_tokens, *x.shape[2:])


def window_reverse_indexed(x: torch.Tensor, batch: int, inverse: torch.Tensor) -> torch.Tensor:
    """:func:`window_reverse` as one gather: ``x`` ``[batch · n_windows, w, ...]``, ``inverse`` ``[L]`` from
    :func:`window_index` → ``[batch, L, ...]``."""
    return x.reshape(batch, -1, *x.shape[2:]).index_select(1, inverse)
