"""Triton row kernels of the fused operators in ``fp8_quant``: one program per row, the whole row in registers,
so each activation is read once and written once (as float8 e4m3 plus one float32 scale per row, or in its own
dtype).

* ``_quant_rows_kernel``: an element-wise prologue (none, or bias + GELU) and the quantisation; the row in one
  block, or as two power-of-two pieces where they are smaller (``split``, item ``splitrows``).
* ``_window_rows_quant_kernel``: the attention output read in its window layout (any strides), each token's row
  gathered across heads in token order (the inverse of the window partition), and the quantisation.
* ``_norm_quant_kernel``: an optional residual prologue (``x + y`` or ``x + gate·y``, the sum stored in x's dtype;
  ``y`` optionally a linear's output whose bias is added here first),
  LayerNorm (optionally with affine weight and bias), optional per-frame modulation, and then either the
  quantisation (``QUANT``, the fp8 linears' inputs) or a store in x's dtype (the bf16 path, ``norm_fused``); one
  row per program, or with ``ROWS`` > 1 (item ``normrows``) that many rows of one frame as a ``[ROWS, BLOCK]``
  tile, which reads the per-frame gate/shift/scale rows once per program (``_norm_quant_rows``).

Imported only by :func:`streamdit_core.fp8_quant.ensure_ops`, through ``triton_util.import_launchers``, which
catches the ``ImportError`` this module raises where Triton is not installed (the CPU wheel of torch, CI).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .triton_util import norm_kind, norm_rows, norm_rows_launch_config, row_launch_config, split_launch_config

__all__ = ["norm_quant_triton", "quantize_rows_triton", "window_rows_quant_triton"]


@triton.jit
def _quantise_store(y, cols, mask, out_ptr, out_scale_ptr, row, n_cols):
    """Per-row amax of ``y`` ``[BLOCK]`` float32 (``cols``/``mask`` as in the kernels), scale = amax/448; store
    ``y/scale`` (clamped to ±448, cast to the output's dtype) and the scale."""
    amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0)
    s = tl.maximum(amax, 1e-12) / 448.0
    q = tl.minimum(tl.maximum(y / s, -448.0), 448.0)
    tl.store(out_ptr + row * n_cols + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_scale_ptr + row, s)


@triton.jit
def _prologue_values(x, b, x_ptr, PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The element-wise prologue on loaded float32 values ``x`` (``b``: the bias at the same columns, read with
    ``HAS_BIAS`` only); float32 values rounded to x's dtype as the unfused maths."""
    if PROLOGUE == 1:
        if HAS_BIAS:  # the producing matmul's `out + bias` in x's dtype
            x = (x + b).to(x_ptr.dtype.element_ty).to(tl.float32)
        # ½x(1 + tanh u) = x·sigmoid(2u), u = √(2/π)(x + 0.044715x³); rounded to x's dtype like nn.GELU's output
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = (x / (1.0 + tl.exp(-2.0 * u))).to(x_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _prologue(x_ptr, bias_ptr, row, cols, mask, n_cols, PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Load ``x[row, cols]`` and apply the element-wise prologue; float32 values rounded as the unfused maths."""
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    b = x
    if PROLOGUE == 1 and HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return _prologue_values(x, b, x_ptr, PROLOGUE, HAS_BIAS)


@triton.jit
def _quant_rows_kernel(
    x_ptr,  # [rows, n_cols], row-major
    bias_ptr,  # [n_cols] in x's dtype (PROLOGUE 1 with HAS_BIAS only)
    out_ptr,  # [rows, n_cols] float8_e4m3fn
    out_scale_ptr,  # [rows] float32
    n_cols,
    PROLOGUE: tl.constexpr,  # 0: none, 1: GELU(tanh)
    HAS_BIAS: tl.constexpr,  # PROLOGUE 1: add the producing linear's bias first (rounded to x's dtype)
    BLOCK: tl.constexpr,  # next power of two ≥ n_cols (whole row), or the largest ≤ n_cols (split row, BLOCK2 > 0)
    BLOCK2: tl.constexpr,  # 0: the whole row in one block; else the split row's second piece, columns
    # [BLOCK, BLOCK + BLOCK2), BLOCK2 the next power of two ≥ n_cols - BLOCK (triton_util.split_blocks)
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if BLOCK2 == 0:
        mask = cols < n_cols
        y = _prologue(x_ptr, bias_ptr, row, cols, mask, n_cols, PROLOGUE, HAS_BIAS)
        _quantise_store(y, cols, mask, out_ptr, out_scale_ptr, row, n_cols)
    else:
        # the row as two pieces in registers: the first all in the row (unmasked), the second masked; every load
        # issued before the maths and the reductions; the same values, amax and scale as the whole row
        cols2 = BLOCK + tl.arange(0, BLOCK2)
        mask2 = cols2 < n_cols
        x = tl.load(x_ptr + row * n_cols + cols).to(tl.float32)
        x2 = tl.load(x_ptr + row * n_cols + cols2, mask=mask2, other=0.0).to(tl.float32)
        b = x
        b2 = x2
        if PROLOGUE == 1 and HAS_BIAS:
            b = tl.load(bias_ptr + cols).to(tl.float32)
            b2 = tl.load(bias_ptr + cols2, mask=mask2, other=0.0).to(tl.float32)
        y = _prologue_values(x, b, x_ptr, PROLOGUE, HAS_BIAS)
        y2 = _prologue_values(x2, b2, x_ptr, PROLOGUE, HAS_BIAS)
        amax = tl.maximum(tl.max(tl.abs(y), axis=0), tl.max(tl.where(mask2, tl.abs(y2), 0.0), axis=0))
        s = tl.maximum(amax, 1e-12) / 448.0
        q = tl.minimum(tl.maximum(y / s, -448.0), 448.0)
        q2 = tl.minimum(tl.maximum(y2 / s, -448.0), 448.0)
        tl.store(out_ptr + row * n_cols + cols, q.to(out_ptr.dtype.element_ty))
        tl.store(out_ptr + row * n_cols + cols2, q2.to(out_ptr.dtype.element_ty), mask=mask2)
        tl.store(out_scale_ptr + row, s)


@triton.jit
def _window_rows_quant_kernel(
    x_ptr,  # [windows, window_tokens, heads, HEAD_DIM], any strides: the attention output
    inverse_ptr,  # [tokens] int64: the partitioned position of each token (GATHER)
    out_ptr,  # [rows, heads·HEAD_DIM] float8_e4m3fn (or float32), rows = batch·tokens in token order
    out_scale_ptr,  # [rows] float32
    tokens,  # tokens per batch element
    window_tokens,
    heads,
    stride_window,
    stride_token,
    stride_head,
    stride_dim,
    GATHER: tl.constexpr,  # read the rows in the order of inverse (per batch element); else output row = input row
    HEAD_DIM: tl.constexpr,
    HEADS_BLOCK: tl.constexpr,  # next power of two ≥ heads
    DIM_BLOCK: tl.constexpr,  # next power of two ≥ HEAD_DIM
):
    row = tl.program_id(0).to(tl.int64)
    token = row % tokens
    position = token
    if GATHER:
        position = tl.load(inverse_ptr + token)
    src = row - token + position  # the row in the partitioned sequence [batch·tokens] (same batch element)
    window = src // window_tokens
    offset = src % window_tokens
    head = tl.arange(0, HEADS_BLOCK)[:, None]
    dim = tl.arange(0, DIM_BLOCK)[None, :]
    mask = (head < heads) & (dim < HEAD_DIM)
    x = tl.load(x_ptr + window * stride_window + offset * stride_token + head * stride_head + dim * stride_dim,
                mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1), axis=0)
    s = tl.maximum(amax, 1e-12) / 448.0
    q = tl.minimum(tl.maximum(x / s, -448.0), 448.0)
    tl.store(out_ptr + row * (heads * HEAD_DIM) + head * HEAD_DIM + dim, q.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_scale_ptr + row, s)


@triton.jit
def _norm_quant_rows(
    x_ptr, y_ptr, y_bias_ptr, gate_ptr, weight_ptr, norm_bias_ptr, shift_ptr, scale_ptr, sum_ptr, out_ptr,
    out_scale_ptr, n_cols, tokens, tokens_per_frame, frames, eps,
    RESIDUAL: tl.constexpr, HAS_Y_BIAS: tl.constexpr, HAS_AFFINE: tl.constexpr, HAS_MODULATION: tl.constexpr,
    QUANT: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    """``_norm_quant_kernel`` on ``ROWS`` consecutive rows of one frame as a ``[ROWS, BLOCK]`` tile (item
    ``normrows``): the per-frame gate, shift and scale rows ``[BLOCK]`` (and the biases and affine parameters)
    loaded once per program; per row the same float32 statistics, rounding points and stores as one row per
    program. ``ROWS`` divides ``tokens_per_frame`` (so all the rows share one frame) and the row count."""
    first = tl.program_id(0).to(tl.int64) * ROWS
    rows = first + tl.arange(0, ROWS).to(tl.int64)  # [ROWS]
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols  # [BLOCK]
    mask = tl.broadcast_to(col_mask[None, :], (ROWS, BLOCK))
    offsets = rows[:, None] * n_cols + cols[None, :]  # [ROWS, BLOCK]
    dtype = x_ptr.dtype.element_ty
    per_frame = ((first // tokens) * frames + (first % tokens) // tokens_per_frame) * n_cols  # the rows' frame
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL > 0:
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_Y_BIAS:
            y_bias = tl.load(y_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            y = (y + y_bias[None, :]).to(dtype).to(tl.float32)
        if RESIDUAL == 2:
            gate = tl.load(gate_ptr + per_frame + cols, mask=col_mask, other=0.0)
            y = (y * gate[None, :]).to(dtype).to(tl.float32)
        x = (x + y).to(dtype)
        tl.store(sum_ptr + offsets, x, mask=mask)
        x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols  # [ROWS]
    centred = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / n_cols
    y = centred * tl.rsqrt(var + eps)[:, None]
    if HAS_AFFINE:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        norm_bias = tl.load(norm_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * weight[None, :] + norm_bias[None, :]
    y = y.to(dtype).to(tl.float32)
    if HAS_MODULATION:
        shift = tl.load(shift_ptr + per_frame + cols, mask=col_mask, other=0.0)
        scale = tl.load(scale_ptr + per_frame + cols, mask=col_mask, other=0.0)
        y = (y * (1.0 + scale)[None, :] + shift[None, :]).to(dtype).to(tl.float32)
    if QUANT:
        amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1)  # [ROWS]
        s = tl.maximum(amax, 1e-12) / 448.0
        q = tl.minimum(tl.maximum(y / s[:, None], -448.0), 448.0)
        tl.store(out_ptr + offsets, q.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_scale_ptr + rows, s)
    else:
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_quant_kernel(
    x_ptr,  # [rows, n_cols], row-major: the residual stream (RESIDUAL ≥ 1) or the LayerNorm's input
    y_ptr,  # [rows, n_cols] in x's dtype: the branch output added to x (RESIDUAL ≥ 1)
    y_bias_ptr,  # [n_cols] in x's dtype: the branch's pending bias, added to y first (HAS_Y_BIAS)
    gate_ptr,  # [batch, frames, n_cols] float32 (RESIDUAL 2)
    weight_ptr,  # [n_cols] LayerNorm weight, any float dtype (HAS_AFFINE)
    norm_bias_ptr,  # [n_cols] LayerNorm bias, any float dtype (HAS_AFFINE)
    shift_ptr,  # [batch, frames, n_cols] float32 (HAS_MODULATION)
    scale_ptr,  # [batch, frames, n_cols] float32 (HAS_MODULATION)
    sum_ptr,  # [rows, n_cols] in x's dtype: the residual sum (RESIDUAL ≥ 1)
    out_ptr,  # [rows, n_cols] float8_e4m3fn (QUANT) or x's dtype
    out_scale_ptr,  # [rows] float32 (QUANT)
    n_cols,
    tokens,  # tokens per batch element (per-frame gate and modulation)
    tokens_per_frame,
    frames,
    eps,
    RESIDUAL: tl.constexpr,  # 0: LayerNorm(x); 1: of x + y; 2: of x + gate·y (the sum is stored)
    HAS_Y_BIAS: tl.constexpr,  # RESIDUAL ≥ 1: y is a linear's output before its bias (rounded like `y + bias`)
    HAS_AFFINE: tl.constexpr,  # LayerNorm with weight and bias
    HAS_MODULATION: tl.constexpr,  # then ·(1 + scale) + shift per frame
    QUANT: tl.constexpr,  # quantise per row to out_ptr's dtype (and store the scale); else store in x's dtype
    BLOCK: tl.constexpr,  # next power of two ≥ n_cols
    ROWS: tl.constexpr = 1,  # rows per program (item normrows); > 1 only where it divides tokens_per_frame
):
    if ROWS > 1:  # ROWS consecutive rows of one frame: the per-frame rows loaded once, the rest per row as below
        _norm_quant_rows(x_ptr, y_ptr, y_bias_ptr, gate_ptr, weight_ptr, norm_bias_ptr, shift_ptr, scale_ptr,
                         sum_ptr, out_ptr, out_scale_ptr, n_cols, tokens, tokens_per_frame, frames, eps,
                         RESIDUAL, HAS_Y_BIAS, HAS_AFFINE, HAS_MODULATION, QUANT, BLOCK, ROWS)
    else:  # one row per program
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dtype = x_ptr.dtype.element_ty
        per_frame = ((row // tokens) * frames + (row % tokens) // tokens_per_frame) * n_cols  # [b, F, D] row offset
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL > 0:
            y = tl.load(y_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_Y_BIAS:  # the producing linear's `out + bias` in x's dtype (fp8_adds_fused)
                y = (y + tl.load(y_bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
            if RESIDUAL == 2:  # gate(y.float(), g).type_as(x)
                y = (y * tl.load(gate_ptr + per_frame + cols, mask=mask, other=0.0)).to(dtype).to(tl.float32)
            x = (x + y).to(dtype)  # the residual stream, rounded like `x + ...` in x's dtype
            tl.store(sum_ptr + row * n_cols + cols, x, mask=mask)
            x = x.to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        centred = tl.where(mask, x - mean, 0.0)
        var = tl.sum(centred * centred, axis=0) / n_cols  # biased, like F.layer_norm
        y = centred * tl.rsqrt(var + eps)
        if HAS_AFFINE:
            weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            y = y * weight + tl.load(norm_bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = y.to(dtype).to(tl.float32)  # LayerNorm(x).type_as(x)
        if HAS_MODULATION:
            shift = tl.load(shift_ptr + per_frame + cols, mask=mask, other=0.0)
            scale = tl.load(scale_ptr + per_frame + cols, mask=mask, other=0.0)
            y = (y * (1.0 + scale) + shift).to(dtype).to(tl.float32)  # modulate(...).type_as(x)
        if QUANT:
            _quantise_store(y, cols, mask, out_ptr, out_scale_ptr, row, n_cols)
        else:  # already rounded to x's dtype: stored as it is
            tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def quantize_rows_triton(
    x: torch.Tensor,
    prologue: int,
    out_dtype: torch.dtype = torch.float8_e4m3fn,
    bias: torch.Tensor | None = None,
    tuned: bool = False,
    split: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch ``_quant_rows_kernel`` on ``x`` ``[rows, n_cols]`` (contiguous). ``prologue``: 0 none, 1 GELU(tanh)
    of ``x + bias`` (``bias`` ``[n_cols]`` in x's dtype or ``None``). ``out_dtype=torch.float32`` stores the
    scaled values before their cast to fp8 (a test of the maths where the fp8 cast is not trusted: Triton's
    interpreter rounds values just below a power of two to the lower one, e.g. 124.3 → 64). The whole row is held
    in registers: in one block of the next power of two ≥ ``n_cols``, or with ``split`` (item ``splitrows``) in
    two power-of-two pieces where they are smaller together (``triton_util.split_blocks``: 8,960 → 8,192 +
    1,024; same values and scales). ``tuned``: the measured warp count of the GELU row where
    ``triton_util.TUNED_WARPS`` has one for the layout (``warps``; same values).

    Returns:
        ``(x8 [rows, n_cols] out_dtype, scale [rows, 1] float32)``.
    """
    rows, n_cols = x.shape
    out = torch.empty((rows, n_cols), dtype=out_dtype, device=x.device)
    out_scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    kind = "gelu_quant" if prologue == 1 else None
    if split:
        block, block2, warps = split_launch_config(n_cols, kind, tuned)
    else:
        (block, warps), block2 = row_launch_config(n_cols, kind, tuned), 0
    # an unread placeholder without a bias: the input (read-only), never an output, so that the compiler's
    # mutation analysis sees no aliasing of what the kernel writes
    wrap_triton(_quant_rows_kernel)[(rows,)](
        x, x if bias is None else bias, out, out_scale, n_cols,
        PROLOGUE=prologue, HAS_BIAS=bias is not None, BLOCK=block, BLOCK2=block2, num_warps=warps,
    )
    return out, out_scale


def norm_quant_triton(
    x: torch.Tensor,
    eps: float,
    tokens: int = 1,
    frames: int = 1,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float8_e4m3fn,
    quantize: bool = True,
    residual_bias: torch.Tensor | None = None,
    tuned: bool = False,
    rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch ``_norm_quant_kernel`` on ``x`` ``[rows, n_cols]`` (contiguous), ``rows = batch·tokens`` with
    ``tokens = frames·(tokens per frame)``.

    Args:
        residual: ``[rows, n_cols]`` contiguous in x's dtype, added to x first (the sum is returned), or ``None``.
        gate: ``[batch, frames, n_cols]`` float32 contiguous: the residual is ``x + gate·residual``; needs
            ``residual``.
        weight, bias: ``[n_cols]`` LayerNorm affine parameters (both or neither).
        shift, scale: ``[batch, frames, n_cols]`` float32 contiguous modulation (both or neither).
        out_dtype: as in :func:`quantize_rows_triton` (with ``quantize`` only).
        quantize: quantise the normalised rows per row; ``False`` stores them in x's dtype (no scales).
        residual_bias: ``[n_cols]`` in x's dtype: ``residual`` is a linear's output before its bias, added to it
            first (rounded to x's dtype, like the linear's ``out + bias``), or ``None``; needs ``residual``.
        tuned: the measured warp count of this configuration where ``triton_util.TUNED_WARPS`` has one
            (``warps``; same values).
        rows: where the kernel reads per-frame rows (gate or modulation), process ``triton_util.norm_rows``
            consecutive rows per program, loading those once per program (item ``normrows``; the same values: per
            row the same statistics, rounding and stores); its warp count is the default rule's for the
            ``[ROWS, BLOCK]`` tile, or with ``tuned`` the one measured for the multi-row kernel of this
            configuration where ``triton_util.TUNED_WARPS`` has one (``triton_util.norm_rows_launch_config``;
            the one-row entries are not used there).
    Returns:
        ``(out [rows, n_cols], scale [rows, 1] float32 or None, sum [rows, n_cols] x's dtype or None)``: ``out``
        in ``out_dtype`` and ``scale`` with ``quantize``, else ``out`` in x's dtype and no scale.
    """
    n_rows, n_cols = x.shape
    out = torch.empty((n_rows, n_cols), dtype=out_dtype if quantize else x.dtype, device=x.device)
    out_scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device) if quantize else None
    total = None if residual is None else torch.empty_like(x)
    if residual_bias is not None and residual is None:
        raise ValueError("residual_bias is the residual branch's bias: it needs residual")
    kind = norm_kind(residual is not None, gate is not None, weight is not None, shift is not None, quantize)
    block, warps = row_launch_config(n_cols, kind, tuned)
    per_row = 1
    if rows and (gate is not None or shift is not None):  # only where per-frame rows are read
        per_row = norm_rows(tokens // frames, n_rows, n_cols)
        if per_row > 1:
            block, warps = norm_rows_launch_config(n_cols, per_row, kind, tuned)
    # unread placeholders: the input for what is read (never an output, so that the compiler's mutation analysis
    # sees no aliasing of what the kernel writes), the normalised output for the sum without a residual and for
    # the scales without quantisation (never written)
    wrap_triton(_norm_quant_kernel)[(n_rows // per_row,)](
        x, *(x if t is None else t for t in (residual, residual_bias, gate, weight, bias, shift, scale)),
        out if total is None else total, out, out if out_scale is None else out_scale, n_cols, tokens,
        tokens // frames, frames, eps, RESIDUAL=0 if residual is None else (1 if gate is None else 2),
        HAS_Y_BIAS=residual_bias is not None,
        HAS_AFFINE=weight is not None, HAS_MODULATION=shift is not None, QUANT=quantize, BLOCK=block, ROWS=per_row,
        num_warps=warps,
    )
    return out, out_scale, total


def window_rows_quant_triton(
    x: torch.Tensor,
    inverse: torch.Tensor | None,
    out_dtype: torch.dtype = torch.float8_e4m3fn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch ``_window_rows_quant_kernel``: the attention output ``x`` ``[windows, window_tokens, heads, head_dim]``
    (any strides; ``windows = batch·n_windows``) back in token order and quantised per row, one program per row.

    Args:
        inverse: ``[tokens]`` int64 contiguous, ``attention.window_index``'s inverse: token ``t`` of batch element
            ``i`` is row ``i·tokens + inverse[t]`` of ``x.reshape(-1, heads, head_dim)``; ``None``: no gather (the
            window is the grid, ``x`` is ``[batch, tokens, heads, head_dim]``).
        out_dtype: as in :func:`quantize_rows_triton`.
    Returns:
        ``(x8 [batch·tokens, heads·head_dim] out_dtype, scale [batch·tokens, 1] float32)``.
    """
    windows, window_tokens, heads, head_dim = x.shape
    rows = windows * window_tokens
    tokens = window_tokens if inverse is None else inverse.shape[0]
    out = torch.empty((rows, heads * head_dim), dtype=out_dtype, device=x.device)
    out_scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    warps = row_launch_config(heads * head_dim)[1]
    # without a gather the input (read-only, never an output) stands in for the unread index
    wrap_triton(_window_rows_quant_kernel)[(rows,)](
        x, x if inverse is None else inverse, out, out_scale, tokens, window_tokens, heads, *x.stride(),
        GATHER=inverse is not None, HEAD_DIM=head_dim, HEADS_BLOCK=triton.next_power_of_2(heads),
        DIM_BLOCK=triton.next_power_of_2(head_dim), num_warps=warps,
    )
    return out, out_scale
