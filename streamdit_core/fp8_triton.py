"""Triton kernel of the fused per-row fp8 quantisation (``fp8_quant``): one program per row, the whole row in
registers, so each activation is read once and written once as float8 e4m3 (plus one float32 scale per row).

Imported only by :func:`streamdit_core.fp8_quant.ensure_ops`, inside ``try``: importing this module raises
``ImportError`` where Triton is not installed (the CPU wheel of torch, CI).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

__all__ = ["quantize_rows_triton"]


@triton.jit
def _quant_rows_kernel(
    x_ptr,  # [rows, n_cols], row-major
    shift_ptr,  # [batch, frames, n_cols] float32 (PROLOGUE 2 only)
    scale_ptr,  # [batch, frames, n_cols] float32 (PROLOGUE 2 only)
    bias_ptr,  # [n_cols] in x's dtype (PROLOGUE 1 with HAS_BIAS only)
    out_ptr,  # [rows, n_cols] float8_e4m3fn
    out_scale_ptr,  # [rows] float32
    n_cols,
    tokens,  # tokens per batch element (PROLOGUE 2)
    tokens_per_frame,
    frames,
    eps,
    PROLOGUE: tl.constexpr,  # 0: none, 1: GELU(tanh), 2: LayerNorm + per-frame modulation
    HAS_BIAS: tl.constexpr,  # PROLOGUE 1: add the producing linear's bias first (rounded to x's dtype)
    BLOCK: tl.constexpr,  # next power of two ≥ n_cols
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if PROLOGUE == 1:
        if HAS_BIAS:  # the producing matmul's `out + bias` in x's dtype
            x = (x + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
            x = x.to(tl.float32)
        # ½x(1 + tanh u) = x·sigmoid(2u), u = √(2/π)(x + 0.044715x³); rounded to x's dtype like nn.GELU's output
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x / (1.0 + tl.exp(-2.0 * u))
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
    elif PROLOGUE == 2:
        mean = tl.sum(x, axis=0) / n_cols
        centred = tl.where(mask, x - mean, 0.0)
        var = tl.sum(centred * centred, axis=0) / n_cols  # biased, like F.layer_norm
        y = (centred * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)  # LayerNorm(x).type_as(x)
        frame = (row % tokens) // tokens_per_frame
        mod = ((row // tokens) * frames + frame) * n_cols
        shift = tl.load(shift_ptr + mod + cols, mask=mask, other=0.0)
        scale = tl.load(scale_ptr + mod + cols, mask=mask, other=0.0)
        y = (y * (1.0 + scale) + shift).to(x_ptr.dtype.element_ty).to(tl.float32)  # modulate(...).type_as(x)
    else:
        y = x
    amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0)
    s = tl.maximum(amax, 1e-12) / 448.0
    q = tl.minimum(tl.maximum(y / s, -448.0), 448.0)
    tl.store(out_ptr + row * n_cols + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_scale_ptr + row, s)


def quantize_rows_triton(
    x: torch.Tensor,
    prologue: int,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    eps: float = 0.0,
    tokens: int = 1,
    tokens_per_frame: int = 1,
    frames: int = 1,
    out_dtype: torch.dtype = torch.float8_e4m3fn,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on ``x`` ``[rows, n_cols]`` (contiguous). ``prologue``: 0 none, 1 GELU(tanh) of
    ``x + bias`` (``bias`` ``[n_cols]`` in x's dtype or ``None``), 2 LayerNorm + modulation with
    ``shift``/``scale`` ``[batch, frames, n_cols]`` float32 contiguous, where ``rows = batch·tokens`` and
    ``tokens = frames·tokens_per_frame``. ``out_dtype=torch.float32`` stores the scaled values before their
    cast to fp8 (a test of the maths where the fp8 cast is not trusted: Triton's interpreter rounds values just
    below a power of two to the lower one, e.g. 124.3 → 64).

    Returns:
        ``(x8 [rows, n_cols] out_dtype, scale [rows, 1] float32)``.
    """
    rows, n_cols = x.shape
    out = torch.empty((rows, n_cols), dtype=out_dtype, device=x.device)
    out_scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n_cols)
    warps = min(16, max(4, block // 512))  # 16-32 fp32 values per thread at the model's widths
    # unread placeholders when there is no modulation: the input (read-only), never an output, so that the
    # compiler's mutation analysis sees no aliasing of what the kernel writes
    shift_arg = x if shift is None else shift
    scale_arg = x if scale is None else scale
    bias_arg = x if bias is None else bias
    wrap_triton(_quant_rows_kernel)[(rows,)](
        x, shift_arg, scale_arg, bias_arg, out, out_scale, n_cols, tokens, tokens_per_frame, frames, eps,
        PROLOGUE=prologue, HAS_BIAS=bias is not None, BLOCK=block, num_warps=warps,
    )
    return out, out_scale
