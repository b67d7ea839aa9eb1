"""Triton kernel of the fused self-attention input (``qk_rope``): one program per output row and tensor, the whole
row of ``dim`` values in registers, so the q and k projections are read once and written once in the attention's
(window-partitioned) layout, and v once if it is gathered too.

* ``_qkv_rows_kernel``: for output row ``r`` the source row ``index[r mod L]`` of the same batch element (the window
  gather; ``r`` itself without one); q and k: a pending bias, the RMS norm, RoPE; v: the pending bias only.

Imported only by :func:`streamdit_core.qk_rope.ensure_ops`, through ``triton_util.import_launchers``, which catches
the ``ImportError`` this module raises where Triton is not installed (the CPU wheel of torch, CI).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .triton_util import row_launch_config

__all__ = ["qkv_rows_triton"]


@triton.jit
def _biased(x_ptr, bias_ptr, src, cols, mask, n_cols, HAS_BIAS: tl.constexpr):
    """Float32 values of the source row ``src`` of ``x`` at ``cols``, plus the bias rounded to x's dtype (the
    projection's ``out + bias`` in its own dtype)."""
    x = tl.load(x_ptr + src * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + bias).to(x_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _pair_partners(x, BLOCK: tl.constexpr):
    """``x[c ^ 1]`` for every column ``c`` of ``x`` ``[BLOCK]``: each value's RoPE partner, swapped within registers."""
    even, odd = tl.split(tl.reshape(x, (BLOCK // 2, 2)))
    return tl.reshape(tl.join(odd, even), (BLOCK,))


@triton.jit
def _repeat_pairs(a, BLOCK: tl.constexpr):
    """``a`` ``[BLOCK / 2]`` (one value per pair) → ``[BLOCK]`` with each value at columns ``2i`` and ``2i + 1``."""
    return tl.reshape(tl.join(a, a), (BLOCK,))


@triton.jit
def _norm_rope_row(
    x_ptr, bias_ptr, weight_ptr, out_ptr, cos_ptr, sin_ptr, src, row, token, cols, mask, n_cols, eps,
    HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, HALF_HEAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row of q or k: ``rope(norm(x + bias))`` with the roundings of ``qk_rope.rms_norm`` and ``apply_rope``.

    RoPE rotates the pairs ``(2i, 2i + 1)``: output column ``c`` takes its own value and its partner's (column
    ``c ^ 1``), ``y_c = x_c·cos − x_(c+1)·sin`` for even ``c`` and ``x_c·cos + x_(c−1)·sin`` for odd ``c``, with the
    angle of pair ``(c mod head_dim) // 2`` of the source token. Both products are rounded to float32 before the sum,
    like ``apply_rope``'s (unless the GPU compiler fuses them into one multiply-add).
    """
    x = _biased(x_ptr, bias_ptr, src, cols, mask, n_cols, HAS_BIAS)
    if HAS_NORM:  # (x·rsqrt(mean(x²) + eps)).type_as(x) * weight, in the product's dtype (the output's)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = ((x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32) * weight).to(out_ptr.dtype.element_ty)
        x = x.to(tl.float32)
    # the angles of the row's pairs [BLOCK / 2] (one load per pair), each repeated for both columns of its pair
    pairs = tl.arange(0, BLOCK // 2)
    angle = token * HALF_HEAD + pairs % HALF_HEAD
    cos = _repeat_pairs(tl.load(cos_ptr + angle, mask=2 * pairs < n_cols, other=0.0), BLOCK)
    sin = _repeat_pairs(tl.load(sin_ptr + angle, mask=2 * pairs < n_cols, other=0.0), BLOCK)
    partner = _pair_partners(x, BLOCK)
    y = x * cos + tl.where(cols % 2 == 0, -partner, partner) * sin
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_rows_kernel(
    q_ptr,  # [rows, n_cols] row-major, rows = batch·tokens: the q projection's output (before its bias: HAS_BIAS)
    k_ptr,  # [rows, n_cols] in q's dtype
    v_ptr,  # [rows, n_cols] in q's dtype (grid axis 1 of size 3 only)
    q_bias_ptr,  # [n_cols] in q's dtype (HAS_BIAS)
    k_bias_ptr,
    v_bias_ptr,
    q_weight_ptr,  # [n_cols] RMS norm weight, any float dtype (HAS_NORM)
    k_weight_ptr,
    cos_ptr,  # [tokens, half_head] float32
    sin_ptr,  # [tokens, half_head] float32
    index_ptr,  # [tokens] int64 source token of each output position (GATHER)
    q_out_ptr,  # [rows, n_cols] in the norm's output dtype
    k_out_ptr,
    v_out_ptr,  # [rows, n_cols] in q's dtype
    n_cols,
    tokens,  # tokens per batch element
    eps,
    HAS_BIAS: tl.constexpr,  # add the projections' biases first (rounded to q's dtype)
    HAS_NORM: tl.constexpr,  # RMS norm of q and k with their weights
    GATHER: tl.constexpr,  # read the rows in the order of index (per batch element)
    HALF_HEAD: tl.constexpr,  # head_dim // 2 (a model constant: the column → RoPE pair map needs no division)
    BLOCK: tl.constexpr,  # next power of two ≥ n_cols
):
    row = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)  # 0: q, 1: k, 2: v
    token = row % tokens
    if GATHER:
        token = tl.load(index_ptr + token)
    src = row - row % tokens + token  # the source row, same batch element
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if which == 0:
        _norm_rope_row(q_ptr, q_bias_ptr, q_weight_ptr, q_out_ptr, cos_ptr, sin_ptr, src, row, token, cols, mask,
                       n_cols, eps, HAS_BIAS, HAS_NORM, HALF_HEAD, BLOCK)
    elif which == 1:
        _norm_rope_row(k_ptr, k_bias_ptr, k_weight_ptr, k_out_ptr, cos_ptr, sin_ptr, src, row, token, cols, mask,
                       n_cols, eps, HAS_BIAS, HAS_NORM, HALF_HEAD, BLOCK)
    else:
        v = _biased(v_ptr, v_bias_ptr, src, cols, mask, n_cols, HAS_BIAS)
        tl.store(v_out_ptr + row * n_cols + cols, v.to(v_out_ptr.dtype.element_ty), mask=mask)


def qkv_rows_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None),
    weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    index: torch.Tensor | None = None,
    tuned: bool = False,
) -> list[torch.Tensor]:
    """Launch ``_qkv_rows_kernel`` on ``q``, ``k`` (and ``v``) ``[batch, tokens, n_cols]`` (contiguous, one dtype).

    Args:
        cos, sin: ``[tokens, head_dim // 2]`` float32 contiguous.
        eps: the RMS norms' epsilon.
        biases: ``[n_cols]`` in q's dtype, all three (two without ``v``) or none.
        weights: the RMS norms' ``[n_cols]`` weights of q and k (one dtype), or ``None`` (no norm).
        index: ``[tokens]`` int64 source token of each output position, or ``None`` (the rows in their order).
        tuned: the measured warp count where ``triton_util.TUNED_WARPS`` has one (``warps``; same values).
    Returns:
        ``[q_out, k_out]`` (``+ [v_out]`` with ``v``), each ``[batch·tokens, n_cols]``: q and k in the dtype of
        ``norm·weight`` (q's without weights), v in its own.
    """
    batch, tokens, n_cols = q.shape
    rows = batch * tokens
    out_dtype = q.dtype if weights is None else torch.promote_types(q.dtype, weights[0].dtype)
    outs = [torch.empty((rows, n_cols), dtype=out_dtype, device=q.device) for _ in range(2)]
    if v is not None:
        outs.append(torch.empty((rows, n_cols), dtype=v.dtype, device=q.device))
    block, warps = row_launch_config(n_cols, "qkv_rope", tuned)

    def read(t: torch.Tensor | None) -> torch.Tensor:
        """An unread placeholder for what is absent: the input q (never an output, so that the compiler's mutation
        analysis sees no aliasing of what the kernel writes)."""
        return q if t is None else t

    q_weight, k_weight = weights if weights is not None else (None, None)
    # without v, k's output stands in for v's (never written: the grid's second axis stops at k)
    wrap_triton(_qkv_rows_kernel)[(rows, len(outs))](
        q, k, read(v), *(read(b) for b in biases), read(q_weight), read(k_weight), cos, sin, read(index), outs[0],
        outs[1], outs[-1], n_cols, tokens, eps, HAS_BIAS=biases[0] is not None, HAS_NORM=weights is not None,
        GATHER=index is not None, HALF_HEAD=cos.shape[1], BLOCK=block, num_warps=warps,
    )
    return outs
