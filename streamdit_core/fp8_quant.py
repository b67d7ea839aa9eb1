"""Float8 e4m3 quantisation of activations, and single-pass fused row operators with and without it.

:func:`quantize_fp8` is the quantisation every fp8 linear uses (``x ≈ x8·scale``, one scale per row or per
tensor). The fused operators below quantise per row *in the kernel that produces the activation*, so the
activation is read once and written once as fp8 (``perf.PerfOptions.fp8_fused`` / ``fp8_rows``):

=====================================  ===========================================================================
operator (``torch.ops.streamdit.*``)    computes, then quantises per row
=====================================  ===========================================================================
``gelu_quant(h, b)``                   ``GELU_tanh(h + b)`` rounded to h's dtype (the FFN hidden ``[M, ffn]`` before
                                       the first linear's bias ``b`` ``[ffn]`` or ``None``; launch options
                                       ``tuned``, ``split``)
``norm_modulate_quant(x, sh, sc, e)``  ``LayerNorm(x)·(1 + sc) + sh`` with per-frame ``sh``/``sc`` ``[b, F, D]`` over
                                       ``x`` ``[b, L, D]`` (fp32 statistics, no affine; rounded to x's dtype twice,
                                       like ``model.LayerNorm`` + ``model.modulate``)
``rows_quant(x)``                      nothing: ``x`` ``[M, K]`` as it is
``window_rows_quant(x, inv)``           the attention output ``x`` ``[b·nw, w, h, dh]`` (any strides) back in token
                                       order, ``window_reverse_indexed(x, b, inv).flatten(2)`` (``inv`` ``[L]``, or
                                       ``None``: ``x`` is ``[b, L, h, dh]``), ``M = b·L``, ``K = h·dh``
``residual_norm_quant(x, y, g, w, b,   the residual sum ``s = x + g·y`` (per-frame gate ``g`` ``[b, F, D]``) or
sh, sc, eps, yb)``                     ``x + y`` (``g`` ``None``) over ``x``, ``y`` ``[b, L, D]`` (``y`` plus its
                                       pending bias ``yb`` ``[D]`` first, rounded, when given), rounded to x's dtype
                                       and *returned too*; then ``LayerNorm(s)`` with affine ``w``/``b`` ``[D]`` or
                                       none, and modulated with ``sh``/``sc`` ``[b, F, D]`` or not (rounded like
                                       ``model.gate``, ``model.LayerNorm`` and ``model.modulate``)
=====================================  ===========================================================================

Each returns ``(x8 [M, K] float8_e4m3fn, scale [M, 1] float32)``; ``residual_norm_quant`` returns
``(sum [M, D] x's dtype, x8, scale)`` with ``M = b·L`` (the cross-attention and FFN inputs of a block with the
residual add in the same pass, ``perf.PerfOptions.fp8_residual``). ``window_rows_quant`` is the self-attention
output projection's input (``perf.PerfOptions.fp8_out_fused``): its one pass replaces the compiler's window gather
and its two-pass quantisation.

The same LayerNorm kernel without the quantisation serves the bf16 linears (``perf.PerfOptions.norm_fused``):
``norm_modulate(x, sh, sc, eps)`` and ``residual_norm(x, y, g, w, b, sh, sc, eps)`` compute what their ``_quant``
namesakes compute before the quantisation and return it in x's dtype, ``[b, L, D]`` (``residual_norm``:
``(sum, normalised)``, both ``[b, L, D]``).

On CUDA with Triton they run one Triton program per row with the whole row in registers (``fp8_triton.py``);
elsewhere (CPU, no Triton) the reference implementations run, which are the unfused path's exact maths (so the
fused model is bit-identical to the unfused one there). They are registered with ``torch.library.triton_op`` so
``torch.compile`` sees the kernels without a graph break and CUDA graph capture works; without Triton they are
opaque ``custom_op`` s with a fake implementation. Triton is imported lazily, on the first :func:`ensure_ops` call.

Tolerance of the Triton kernels against the reference (``tests/test_fused_quant.py``, ``tests/test_fused_norm.py``):
the values before each rounding to bf16 agree to float32 rounding (``exp``/``rsqrt`` approximations, fused
multiply-adds), so a value can land on the neighbouring bf16 number. Asserted: scales within 2⁻⁷ relative (2⁻⁶ for
LayerNorm + modulation, which rounds twice); each dequantised value within one e4m3 step (2⁻³ relative) plus 2⁻⁶
relative and a subnormal step of the reference's, and for LayerNorm + modulation also one bf16 step of
``|value| + |shift|`` (the norm is rounded before the shift is added, so cancellation can make that step large next
to the value); ≥ 97-99 % of the fp8 codes identical; zero rows give zeros. The plain row quantisation and the
window gather + quantisation have identical scales (under the interpreter also identical scaled values). Without
quantisation: each value within one step of x's dtype of ``|value|`` plus one of the unmodulated norm times
``|1 + scale|``, and in bf16 on CUDA ≥ 98 % of the values identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .adaln import add_residual, modulate
from .attention import window_reverse_indexed
from .log import get_logger
from .triton_util import import_launchers, not_loaded

__all__ = [
    "FP8_MAX",
    "BiasPending",
    "QuantizedActivation",
    "dequantize_fp8",
    "ensure_ops",
    "gelu_quant_reference",
    "gelu_quantize",
    "norm_modulate",
    "norm_modulate_quant_reference",
    "norm_modulate_quantize",
    "norm_modulate_reference",
    "quantize_fp8",
    "quantize_rows",
    "residual_norm",
    "residual_norm_quant_reference",
    "residual_norm_quantize",
    "residual_norm_reference",
    "rows_quant_reference",
    "triton_problem",
    "window_rows_quant_reference",
    "window_rows_quantize",
]

log = get_logger("fp8")

FP8_MAX = 448.0  # largest finite float8 e4m3fn


# ----------------------------------------------------------------------------------------------------------
# reference maths
# ----------------------------------------------------------------------------------------------------------


def quantize_fp8(x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``x`` ``[M, K]`` into float8 e4m3 range. Returns ``(x8 [M, K] float8_e4m3fn, scale)`` with
    ``x ≈ x8·scale``; ``scale`` is ``[M, 1]`` (rowwise) or ``[]`` float32. Zero rows get scale ``1e-12/448``."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if rowwise else xf.abs().amax()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def dequantize_fp8(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x8.float() * scale.float()


def gelu_quant_reference(
    h: torch.Tensor, bias: torch.Tensor | None = None, tuned: bool = False, split: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8(GELU_tanh(h + bias), rowwise=True)`` for ``h`` ``[M, N]`` and ``bias`` ``[N]`` (or ``None``);
    the sum and GELU in h's dtype, like the first FFN linear's output and ``nn.GELU``. ``tuned`` and ``split``: the
    Triton kernel's launch options (``triton_util.TUNED_WARPS``, ``triton_util.split_blocks``), which do not change
    the values; unused here."""
    if bias is not None:
        h = h + bias.to(h.dtype)
    return quantize_fp8(F.gelu(h, approximate="tanh"), True)


def _norm_modulate(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``LayerNorm(x)`` (fp32 statistics, affine ``weight``/``bias`` ``[D]`` read as float32, or none) rounded to
    x's dtype, then ``·(1 + scale) + shift`` per frame (``[b, F, D]`` float32, or ``None``) rounded again: the
    maths of ``model.LayerNorm`` and ``modulate(….float(), shift, scale).type_as(x)``. x ``[b, L, D]`` →
    ``[b, L, D]``."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    normed = F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).type_as(x)  # [b, L, D]
    if shift is None or scale is None:
        return normed
    return modulate(normed.float(), shift, scale).type_as(x)  # [b, L, D]


def norm_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, tuned: bool = False, rows: bool = False
) -> torch.Tensor:
    """adaLN input: ``modulate(LayerNorm(x).float(), shift, scale).type_as(x)``, ``Block.adaln_input``'s maths.

    Args:
        x: ``[b, L, D]`` tokens, ``L = F·(tokens per frame)``.
        shift, scale: ``[b, F, D]`` float32 per-frame modulation.
        eps: the LayerNorm's epsilon (no affine parameters; statistics in float32).
        tuned, rows: the kernel's launch options (``triton_util.TUNED_WARPS``, ``triton_util.norm_rows``); unused
            here.
    Returns:
        ``[b, L, D]`` in x's dtype, contiguous (like the kernel's output, whatever x's strides).
    """
    return _norm_modulate(x, None, None, shift, scale, eps).contiguous()


def norm_modulate_quant_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, tuned: bool = False, rows: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`norm_modulate_reference` quantised per row (``x`` ``[b, L, D]``, ``shift``/``scale`` ``[b, F, D]``;
    ``tuned``, ``rows`` unused here).

    Returns:
        ``(x8 [b·L, D] float8_e4m3fn, scale [b·L, 1] float32)``.
    """
    return quantize_fp8(norm_modulate_reference(x, shift, scale, eps).reshape(-1, x.shape[-1]), True)


def residual_norm_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float,
    tuned: bool = False,
    rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add, then the next layer's normalised input: the maths of ``s = x + gate(y.float(), g).type_as(x)``
    (or ``x + y``) and ``modulate(LayerNorm(s).float(), …).type_as(x)`` (or ``LayerNorm(s)``).

    Args:
        x: ``[b, L, D]`` the residual stream, ``L = F·(tokens per frame)``.
        y: ``[b, L, D]`` in x's dtype: the branch output (attention or FFN output).
        gate: ``[b, F, D]`` float32 per-frame gate, or ``None`` (``x + y``).
        weight, bias: ``[D]`` LayerNorm affine parameters (both or neither), read as float32.
        shift, scale: ``[b, F, D]`` float32 per-frame modulation, or ``None`` (both or neither).
        eps: the LayerNorm's epsilon (statistics in float32).
        tuned, rows: the kernel's launch options (``triton_util.TUNED_WARPS``, ``triton_util.norm_rows``); unused
            here.
    Returns:
        ``(sum [b, L, D], normalised [b, L, D])`` in x's dtype, contiguous (like the kernel's outputs, whatever the
        inputs' strides: the first block's input is a transposed view).
    """
    total = add_residual(x, y, gate).contiguous()  # [b, L, D]
    return total, _norm_modulate(total, weight, bias, shift, scale, eps).contiguous()


def residual_norm_quant_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float,
    y_bias: torch.Tensor | None = None,
    tuned: bool = False,
    rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`residual_norm_reference` with the normalised input quantised per row (arguments as there). ``y_bias``
    ``[D]`` or ``None``: ``y`` is a linear's output before its bias, added first in y's dtype (the maths of
    ``perf.Fp8Linear``'s ``out + bias``; ``perf.PerfOptions.fp8_adds_fused``).

    Returns:
        ``(sum [b·L, D] x's dtype, x8 [b·L, D] float8_e4m3fn, scale [b·L, 1] float32)``.
    """
    if y_bias is not None:
        y = y + y_bias.to(y.dtype)
    total, normed = residual_norm_reference(x, y, gate, weight, bias, shift, scale, eps)
    dim = x.shape[-1]
    x8, s = quantize_fp8(normed.reshape(-1, dim), True)
    return total.reshape(-1, dim), x8, s


def rows_quant_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8(x, rowwise=True)`` for ``x`` ``[M, K]``."""
    return quantize_fp8(x, True)


def window_rows_quant_reference(x: torch.Tensor, inverse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The self-attention output projection's unfused input, quantised as its ``Fp8Linear`` does:
    ``quantize_fp8(window_reverse_indexed(x, b, inverse).flatten(2).reshape(-1, h·dh), rowwise=True)``.

    Args:
        x: ``[b·n_windows, window_tokens, h, dh]`` the attention output, any strides.
        inverse: ``[L]`` int64 (``attention.window_index``'s inverse, ``L = n_windows·window_tokens``), or ``None``:
            the window is the grid, ``x`` is ``[b, L, h, dh]`` and no gather happens.
    Returns:
        ``(x8 [b·L, h·dh] float8_e4m3fn, scale [b·L, 1] float32)``, rows in token order.
    """
    windows, window_tokens, heads, head_dim = x.shape
    if inverse is not None:
        x = window_reverse_indexed(x, windows * window_tokens // inverse.shape[0], inverse)  # [b, L, h, dh]
    return quantize_fp8(x.flatten(2).reshape(-1, heads * head_dim), True)


# ----------------------------------------------------------------------------------------------------------
# operators
# ----------------------------------------------------------------------------------------------------------


class BiasPending(NamedTuple):
    """A linear layer's output without its bias, which the consumer adds inside its fused kernel (the FFN's
    first linear → GELU + quantisation of the second, ``fp8_fused``): ``value + bias`` is the activation."""

    value: torch.Tensor
    """``[..., N]`` the matmul's output."""
    bias: torch.Tensor | None
    """``[N]`` or ``None``."""


class QuantizedActivation(NamedTuple):
    """An activation already quantised per row: ``value ≈ data·scale``. :class:`~streamdit_core.perf.Fp8Linear`
    takes it in place of a tensor and skips its own quantisation."""

    data: torch.Tensor
    """``[..., K]`` float8_e4m3fn."""
    scale: torch.Tensor
    """``[..., 1]`` float32."""
    dtype: torch.dtype
    """The dtype of the activation it stands for (the matmul's output dtype)."""


_state: dict[str, Any] = {"defined": False, "triton": None}

# Prologue codes of the Triton row kernel (``fp8_triton.quantize_rows_triton``).
_NONE, _GELU = 0, 1


# The Triton launchers (``fp8_triton.quantize_rows_triton`` and ``norm_quant_triton`` once loaded). Module-level
# names on purpose: ``triton_op`` finds the kernels an operator launches by following the names its body calls.
_launch: Callable[..., tuple[torch.Tensor, torch.Tensor]] = not_loaded
_launch_norm: Callable[..., tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = not_loaded
_launch_window: Callable[..., tuple[torch.Tensor, torch.Tensor]] = not_loaded


def _kernel_device(t: torch.Tensor) -> bool:
    """Whether ``window_rows_quant``'s Triton kernel runs for tensors on ``t``'s device (CUDA; the interpreter tests
    add the CPU)."""
    return t.device.type == "cuda"


def triton_problem() -> str | None:
    """Why the fused operators run their reference implementation on CUDA (no Triton, no ``triton_op``), or
    ``None`` when the Triton kernels are used. Defines the operators first."""
    ensure_ops()
    return _state["triton"]


def ensure_ops() -> None:
    """Define the ``streamdit::*`` operators once (importing Triton if it is there). Call outside ``torch.compile``
    (``perf`` does when it installs fused kernels); later calls only read a flag."""
    if _state["defined"]:
        return
    launch, _state["triton"] = import_launchers(
        "fp8_triton", ("quantize_rows_triton", "norm_quant_triton", "window_rows_quant_triton"))
    if launch is None:
        log.info("fused row operators without Triton (%s): the reference implementations run", _state["triton"])
    _define(launch)
    _state["defined"] = True


def _define(launch: tuple[Callable[..., Any], ...] | None) -> None:
    """Register the operators: Triton-backed (``triton_op``, reference off CUDA) if the launchers
    ``(quantize_rows_triton, norm_quant_triton, window_rows_quant_triton)`` are given, else opaque ``custom_op`` s
    running the reference, with fake (shape-only) implementations."""
    if launch is not None:
        global _launch, _launch_norm, _launch_window
        _launch, _launch_norm, _launch_window = launch  # module-level names: triton_op finds the kernels through them

        def gelu_quant(
            h: torch.Tensor, bias: torch.Tensor | None, tuned: bool = False, split: bool = False
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if h.device.type != "cuda":
                return gelu_quant_reference(h, bias)
            return _launch(h.contiguous(), _GELU, bias=None if bias is None else bias.to(h.dtype).contiguous(),
                           tuned=tuned, split=split)

        def norm_modulate_quant(
            x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, tuned: bool = False,
            rows: bool = False,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if x.device.type != "cuda":
                return norm_modulate_quant_reference(x, shift, scale, eps)
            x8, s, _ = _norm_rows(x, None, None, None, None, shift, scale, eps, True, tuned=tuned, rows=rows)
            assert s is not None
            return x8, s

        def norm_modulate(
            x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, tuned: bool = False,
            rows: bool = False,
        ) -> torch.Tensor:
            if x.device.type != "cuda":
                return norm_modulate_reference(x, shift, scale, eps)
            return _norm_rows(x, None, None, None, None, shift, scale, eps, False, tuned=tuned,
                              rows=rows)[0].view(x.shape)

        def rows_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if x.device.type != "cuda":
                return rows_quant_reference(x)
            return _launch(x.contiguous(), _NONE)

        def window_rows_quant(x: torch.Tensor, inverse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            if not _kernel_device(x):
                return window_rows_quant_reference(x, inverse)
            return _launch_window(x, None if inverse is None else inverse.contiguous())  # x in its own strides

        def residual_norm_quant(
            x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None,
            bias: torch.Tensor | None, shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float,
            y_bias: torch.Tensor | None = None, tuned: bool = False, rows: bool = False,
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if x.device.type != "cuda":
                return residual_norm_quant_reference(x, y, gate, weight, bias, shift, scale, eps, y_bias)
            x8, s, total = _norm_rows(x, y, gate, weight, bias, shift, scale, eps, True, y_bias, tuned, rows)
            assert s is not None and total is not None
            return total, x8, s

        def residual_norm(
            x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None,
            bias: torch.Tensor | None, shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float,
            tuned: bool = False, rows: bool = False,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if x.device.type != "cuda":
                return residual_norm_reference(x, y, gate, weight, bias, shift, scale, eps)
            normed, _, total = _norm_rows(x, y, gate, weight, bias, shift, scale, eps, False, tuned=tuned,
                                          rows=rows)
            assert total is not None
            return total.view(x.shape), normed.view(x.shape)

        for name, fn in (("gelu_quant", gelu_quant), ("norm_modulate_quant", norm_modulate_quant),
                         ("rows_quant", rows_quant), ("window_rows_quant", window_rows_quant),
                         ("residual_norm_quant", residual_norm_quant),
                         ("norm_modulate", norm_modulate), ("residual_norm", residual_norm)):
            torch.library.triton_op(f"streamdit::{name}", fn, mutates_args=())
        return

    def fake(rows: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x.new_empty((rows, x.shape[-1]), dtype=torch.float8_e4m3fn),
                x.new_empty((rows, 1), dtype=torch.float32))

    def fake_residual(x: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = x.shape[0] * x.shape[1]
        return (x.new_empty((rows, x.shape[-1])), *fake(rows, x))

    ops = (
        ("gelu_quant", gelu_quant_reference, lambda h, bias, tuned=False, split=False: fake(h.shape[0], h)),
        ("norm_modulate_quant", norm_modulate_quant_reference,
         lambda x, shift, scale, eps, tuned=False, rows=False: fake(x.shape[0] * x.shape[1], x)),
        ("rows_quant", rows_quant_reference, lambda x: fake(x.shape[0], x)),
        ("window_rows_quant", window_rows_quant_reference,
         lambda x, inverse: (x.new_empty((x.shape[0] * x.shape[1], x.shape[2] * x.shape[3]), dtype=torch.float8_e4m3fn),
                             x.new_empty((x.shape[0] * x.shape[1], 1), dtype=torch.float32))),
        ("residual_norm_quant", residual_norm_quant_reference, fake_residual),
        ("norm_modulate", norm_modulate_reference, lambda x, *args: x.new_empty(x.shape)),
        ("residual_norm", residual_norm_reference, lambda x, *args: (x.new_empty(x.shape), x.new_empty(x.shape))),
    )
    for name, reference, shapes in ops:
        op = torch.library.custom_op(f"streamdit::{name}", reference, mutates_args=())
        op.register_fake(shapes)


def _norm_rows(
    x: torch.Tensor,
    y: torch.Tensor | None,
    gate: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float,
    quantize: bool,
    y_bias: torch.Tensor | None = None,
    tuned: bool = False,
    rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The LayerNorm row kernel on CUDA tensors (``fp8_triton.norm_quant_triton``): x, y ``[b, L, D]`` (y, the
    residual branch, or ``None``), the per-frame ``[b, F, D]`` and affine ``[D]`` arguments or ``None``, as the
    kernel reads them (rows contiguous, per-frame tensors float32); y's pending bias ``[D]`` (in y's dtype) or
    ``None``; ``tuned``: the measured warp count (``triton_util.TUNED_WARPS``); ``rows``: several rows of one frame
    per program where per-frame rows are read (``triton_util.norm_rows``, item ``normrows``). Returns ``(out [b·L, D]
    float8_e4m3fn or x's dtype, scale [b·L, 1] float32 or None, sum [b·L, D] or None)``."""
    per_frame = next((t for t in (gate, shift) if t is not None), None)
    return _launch_norm(
        x.reshape(-1, x.shape[-1]).contiguous(), eps, x.shape[1], 1 if per_frame is None else per_frame.shape[1],
        residual=None if y is None else y.reshape(-1, y.shape[-1]).contiguous(), gate=_f32(gate),
        weight=_contiguous(weight), bias=_contiguous(bias), shift=_f32(shift), scale=_f32(scale), quantize=quantize,
        residual_bias=None if y_bias is None else y_bias.to(x.dtype).contiguous(), tuned=tuned, rows=rows)


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-frame ``[b, F, D]`` gate or modulation as the kernel reads it: float32, contiguous."""
    return None if t is None else t.float().contiguous()


def _check_norm_args(name: str, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> None:
    """x ``[b, L, D]`` and shift/scale ``[b, F, D]`` with ``F`` dividing ``L``, else ``ValueError``."""
    if x.dim() != 3 or shift.shape != scale.shape or shift.shape[::2] != x.shape[::2] or x.shape[1] % shift.shape[1]:
        raise ValueError(f"{name} needs x [b, L, D] and shift/scale [b, F, D] with F dividing L, "
                         f"got {list(x.shape)}, {list(shift.shape)}, {list(scale.shape)}")


def _check_residual_args(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
) -> None:
    """x, y ``[b, L, D]`` of one dtype; gate/shift/scale ``[b, F, D]`` (one ``F`` dividing ``L``) or ``None``;
    shift with scale and weight with bias, ``[D]``; else ``ValueError``."""
    per_frame = [t for t in (gate, shift, scale) if t is not None]
    if (x.dim() != 3 or y.shape != x.shape or y.dtype != x.dtype
            or any(t.shape != per_frame[0].shape or t.shape[::2] != x.shape[::2] or x.shape[1] % t.shape[1]
                   for t in per_frame)):
        raise ValueError(f"{name} needs x and y [b, L, D] of one dtype and gate/shift/scale "
                         f"[b, F, D] with F dividing L, got {list(x.shape)} {x.dtype}, {list(y.shape)} {y.dtype}, "
                         f"{[list(t.shape) for t in per_frame]}")
    if (shift is None) != (scale is None) or (weight is None) != (bias is None):
        raise ValueError(f"{name} takes shift with scale and weight with bias (both or neither)")
    if weight is not None and weight.shape != x.shape[-1:] or bias is not None and bias.shape != x.shape[-1:]:
        raise ValueError(f"LayerNorm weight and bias must be [{x.shape[-1]}]")


def gelu_quantize(
    h: torch.Tensor, bias: torch.Tensor | None = None, tuned: bool = False, split: bool = False
) -> QuantizedActivation:
    """``GELU_tanh(h + bias)`` quantised per row in one pass. h ``[..., N]``, bias ``[N]`` or ``None`` → data
    ``[..., N]``, scale ``[..., 1]``. ``tuned``: the kernel's measured warp count
    (``triton_util.TUNED_WARPS``; same values). ``split``: the row held in registers as two power-of-two pieces
    where they are smaller than its whole block (``triton_util.split_blocks``, ``perf.PerfOptions.
    fp8_split_rows``; same values)."""
    ensure_ops()
    x8, scale = torch.ops.streamdit.gelu_quant(h.reshape(-1, h.shape[-1]), bias, tuned, split)
    return QuantizedActivation(x8.view(h.shape), scale.view(*h.shape[:-1], 1), h.dtype)


def norm_modulate_quantize(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, tuned: bool = False, rows: bool = False
) -> QuantizedActivation:
    """``modulate(LayerNorm(x), shift, scale)`` quantised per row in one pass.

    Args:
        x: ``[b, L, D]``; shift, scale: ``[b, F, D]`` float32 with ``L`` a multiple of ``F``; eps: LayerNorm's.
        tuned: the kernel's measured warp count (``triton_util.TUNED_WARPS``; same values).
        rows: several rows of one frame per Triton program, the per-frame rows loaded once
            (``triton_util.norm_rows``, ``perf.PerfOptions.norm_rows``; same values).
    Returns:
        data ``[b, L, D]`` float8_e4m3fn, scale ``[b, L, 1]`` float32, dtype x's.
    """
    _check_norm_args("norm_modulate_quantize", x, shift, scale)
    ensure_ops()
    x8, s = torch.ops.streamdit.norm_modulate_quant(x, shift, scale, eps, tuned, rows)
    return QuantizedActivation(x8.view(x.shape), s.view(*x.shape[:-1], 1), x.dtype)


def quantize_rows(x: torch.Tensor) -> QuantizedActivation:
    """``quantize_fp8(x, rowwise=True)`` in one pass. x ``[..., K]`` → data ``[..., K]``, scale ``[..., 1]``."""
    ensure_ops()
    x8, scale = torch.ops.streamdit.rows_quant(x.reshape(-1, x.shape[-1]))
    return QuantizedActivation(x8.view(x.shape), scale.view(*x.shape[:-1], 1), x.dtype)


def window_rows_quantize(x: torch.Tensor, inverse: torch.Tensor | None) -> QuantizedActivation:
    """The attention output back in token order (the inverse window partition) and quantised per row, in one pass:
    what the self-attention's fp8 output projection quantises (:func:`window_rows_quant_reference`).

    Args:
        x: ``[b·n_windows, window_tokens, h, dh]`` the attention output in any strides (``[b, L, h, dh]`` with
            ``inverse`` ``None``).
        inverse: ``[L]`` int64 from ``attention.window_index`` (``L`` a multiple of ``window_tokens`` dividing
            ``b·n_windows·window_tokens``), or ``None``: no gather.
    Returns:
        data ``[b, L, h·dh]`` float8_e4m3fn, scale ``[b, L, 1]`` float32, dtype x's.
    """
    if x.dim() != 4 or inverse is not None and (
            inverse.dim() != 1 or inverse.shape[0] % x.shape[1] or (x.shape[0] * x.shape[1]) % inverse.shape[0]):
        raise ValueError(f"window_rows_quantize needs x [b·n_windows, window_tokens, h, dh] and inverse [L] with "
                         f"window_tokens dividing L and L dividing the rows, got {list(x.shape)}, "
                         f"{None if inverse is None else list(inverse.shape)}")
    ensure_ops()
    x8, scale = torch.ops.streamdit.window_rows_quant(x, inverse)
    tokens = x.shape[1] if inverse is None else inverse.shape[0]
    shape = (-1, tokens, x.shape[2] * x.shape[3])
    return QuantizedActivation(x8.view(shape), scale.view(*shape[:2], 1), x.dtype)


def residual_norm_quantize(
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    gate: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    y_bias: torch.Tensor | None = None,
    tuned: bool = False,
    rows: bool = False,
) -> tuple[torch.Tensor, QuantizedActivation]:
    """The residual sum ``s = x + gate(y, g)`` (``x + y`` without ``gate``) and ``LayerNorm(s)`` (affine with
    ``weight``/``bias``, modulated with ``shift``/``scale`` when given) quantised per row, in one pass.

    Args:
        x, y: ``[b, L, D]`` in one dtype; gate, shift, scale: ``[b, F, D]`` float32 or ``None`` with ``F``
            dividing ``L`` (shift and scale together); weight, bias: ``[D]`` or ``None`` (together); eps: the
            LayerNorm's.
        y_bias: ``[D]`` or ``None``: ``y`` is a linear's output before its bias, which is added to it first, in
            y's dtype, like the linear would (``perf.PerfOptions.fp8_adds_fused``).
        tuned: the kernel's measured warp count (``triton_util.TUNED_WARPS``; same values).
        rows: several rows of one frame per Triton program, the per-frame rows loaded once
            (``triton_util.norm_rows``, ``perf.PerfOptions.norm_rows``; same values).
    Returns:
        ``s`` ``[b, L, D]`` in x's dtype, and data ``[b, L, D]`` float8_e4m3fn, scale ``[b, L, 1]`` float32.
    """
    _check_residual_args("residual_norm_quantize", x, y, gate, weight, bias, shift, scale)
    if y_bias is not None and y_bias.shape != x.shape[-1:]:
        raise ValueError(f"the residual branch's bias must be [{x.shape[-1]}], got {list(y_bias.shape)}")
    ensure_ops()
    total, x8, s = torch.ops.streamdit.residual_norm_quant(x, y, gate, weight, bias, shift, scale, eps, y_bias, tuned,
                                                           rows)
    return total.view(x.shape), QuantizedActivation(x8.view(x.shape), s.view(*x.shape[:-1], 1), x.dtype)


def norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, tuned: bool = False, rows: bool = False
) -> torch.Tensor:
    """``modulate(LayerNorm(x), shift, scale)`` in x's dtype in one pass (no quantisation: the bf16 path).

    Args:
        x: ``[b, L, D]``; shift, scale: ``[b, F, D]`` float32 with ``L`` a multiple of ``F``; eps: LayerNorm's.
        tuned: the kernel's measured warp count (``triton_util.TUNED_WARPS``; same values).
        rows: several rows of one frame per Triton program, the per-frame rows loaded once
            (``triton_util.norm_rows``, ``perf.PerfOptions.norm_rows``; same values).
    Returns:
        ``[b, L, D]`` in x's dtype, equal to :func:`norm_modulate_reference` (bit-identical off CUDA).
    """
    _check_norm_args("norm_modulate", x, shift, scale)
    ensure_ops()
    return torch.ops.streamdit.norm_modulate(x, shift, scale, eps, tuned, rows)


def residual_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    gate: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    tuned: bool = False,
    rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum ``s = x + gate(y, g)`` (``x + y`` without ``gate``) and ``LayerNorm(s)`` (affine with
    ``weight``/``bias``, modulated with ``shift``/``scale`` when given) in x's dtype, in one pass (no
    quantisation: the bf16 path). Arguments as in :func:`residual_norm_quantize` (no ``y_bias``: the bf16 linears
    add their bias in the matmul).

    Returns:
        ``(s [b, L, D], normalised [b, L, D])`` in x's dtype, equal to :func:`residual_norm_reference`.
    """
    _check_residual_args("residual_norm", x, y, gate, weight, bias, shift, scale)
    ensure_ops()
    total, normed = torch.ops.streamdit.residual_norm(x, y, gate, weight, bias, shift, scale, eps, tuned, rows)
    return total, normed
