"""Plumbing shared by the package's Triton-backed operators (``fp8_quant``, ``qk_rope``): the lazy import of a
kernel module, with the reason recorded where Triton cannot be used, and the launch configuration of the
one-program-per-row kernels. Importing this module never imports Triton."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["ROW_CHUNK", "import_launchers", "not_loaded", "row_chunk", "row_launch_config"]


def import_launchers(module: str, names: Sequence[str]) -> tuple[tuple[Callable[..., Any], ...] | None, str | None]:
    """Import the launchers ``names`` of the kernel module ``streamdit_core.<module>`` (which imports Triton).

    Returns:
        ``(launchers, None)``, or ``(None, why)`` when Triton is missing or unusable or this torch has no
        ``torch.library.triton_op`` (the operators then run their reference implementations).
    """
    try:
        kernels = importlib.import_module(f"{__package__}.{module}")
        if not hasattr(torch.library, "triton_op"):
            raise RuntimeError(f"torch {torch.__version__} has no torch.library.triton_op")
        return tuple(getattr(kernels, name) for name in names), None
    except (ImportError, OSError, RuntimeError) as exc:
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def not_loaded(*args: Any, **kwargs: Any) -> Any:
    """Stands in for a launcher until its kernel module is imported."""
    raise RuntimeError("the Triton kernels are not loaded")


def row_launch_config(n_cols: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of a kernel that holds a row of ``n_cols`` values in registers: BLOCK the next power
    of two ≥ ``n_cols``, 16-32 float32 values per thread at the model's widths."""
    block = 1 << max(0, n_cols - 1).bit_length()
    return block, min(16, max(4, block // 512))


# The chunk of the two-pass row kernel (``fp8_triton.quantize_rows_triton(..., chunk=)``) and the padding from which
# a row uses it.
ROW_CHUNK = 2048
CHUNK_PADDING = 1.5


def row_chunk(n_cols: int, chunk: int) -> int:
    """``chunk`` where rows of ``n_cols`` would be mostly padding in a whole-row block (the next power of two at least
    ``CHUNK_PADDING`` times wider, and wider than one chunk: Wan 1.3B's FFN hidden, 8,960 in a 16,384 block), else 0
    (the whole row in registers)."""
    block = row_launch_config(n_cols)[0]
    return chunk if chunk > 0 and n_cols > chunk and block >= CHUNK_PADDING * n_cols else 0
