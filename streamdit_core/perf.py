"""Inference speed-ups of the backbone, each switchable and each checked against the plain path.

:class:`PerfOptions` says which are on; :func:`apply_perf` (called by ``StreamDiT.set_perf``) installs them.
Tolerances (what "equivalent to the plain path" means, tested on CPU in ``tests/test_perf.py``):

=================  ========================================================================  ==================
option             what it does                                                              result vs plain
=================  ========================================================================  ==================
``text_kv_cache``  cross-attention keys/values computed once per context tensor, and once     same up to float
                   per run of frames with the same prompt (per-frame attention → one call)   rounding (≤ 1e-5)
``layout_cache``   RoPE angles once per token grid, time embedding once per σ tensor          bit-identical
``compile``        ``torch.compile`` of each block (fused adaLN/norm/gate/RoPE kernels;       float rounding
                   one compiled block serves all blocks)                                     (bf16: ~1e-2)
``cuda_graphs``    the fixed-shape model call replayed as one CUDA graph                     bit-identical
``fp8``            block linears in float8 e4m3 (``torch._scaled_mm``), weights quantised    ~2-4 % relative
                   once, activations per call; ``row`` = per-row scales, ``tensor`` = one     (measured by
                   scale per tensor                                                          ``bench``)
``window_gather``  shifted and unshifted window partitioning as one ``index_select`` with a   bit-identical
                   precomputed token order per grid/window/shift (no ``torch.roll`` copies);
                   inference only (under autograd the roll path runs)
``fp8_fused``      with ``fp8=row``: LayerNorm + adaLN modulation + per-row fp8 quantisation  vs ``fp8=row``: an
                   of the self-attention and FFN inputs in one Triton kernel (quantised once  fp8 value may move
                   for q, k and v), and the FFN's GELU + quantisation in another             one e4m3 step (a
                   (``fp8_quant``; item ``fp8fuse``)                                         bf16 step before
``fp8_rows``       with ``fp8=row``: the other fp8 linears' inputs quantised by a single-     it); CPU: bit-
                   pass row kernel instead of the compiler's (item ``fp8rows``)              identical
``fp8_residual``   with ``fp8_fused``: the residual adds before the cross-attention (gated    as ``fp8_fused``;
                   self-attention output + ``norm3``) and before the FFN (cross-attention    the residual stream
                   output + ``norm2`` + modulation) in the kernel that normalises and        itself bit-
                   quantises the next input (item ``fp8resid``)                              identical
``fp8_out_fused`` with ``fp8_fused``, without autograd: the self-attention output's window      vs ``fp8_fused``:
                   reverse gather (tokens back in order, across heads, from the attention's   the same scale
                   layout in any strides) and its per-row quantisation for the output         formula; CUDA: a
                   projection in one Triton kernel, and the cross-attention output            value may move
                   quantised by the single-pass row kernel (``fp8_quant.window_rows_quant``,  one e4m3 step;
                   ``rows_quant``; item ``outquant``)                                         CPU: bit-identical
``norm_fused``     the bf16 path's LayerNorms in the same Triton kernel without the           within one bf16
                   quantisation: LayerNorm + modulation of the self-attention and FFN         step; CPU: bit-
                   inputs, residual add + ``norm3`` and residual add + ``norm2`` +            identical
                   modulation (``fp8_quant.norm_modulate``/``residual_norm``; the fp8 flags
                   win where both apply; item ``normfuse``)
``cross_residual`` each block's gated FFN residual add done in the next block's first norm   vs the same
                   (with ``norm_fused`` or ``fp8_fused``: in its kernel; else left to the     items without it:
                   compiler, now in one graph with that norm); inference only (item           as that kernel;
                   ``crossres``; one more compiled graph: the first block's)                 CPU: bit-identical
``qk_fused``       without autograd: the self-attention's q/k RMS norms, RoPE and the        bf16: a q/k value
                   window gather of q, k and v (with fp8 linears also their biases) in one   may move by a bf16
                   Triton kernel (``qk_rope``; item ``qkrope``)                              step or two of its
                                                                                             inputs; CPU: bit-
                                                                                             identical
``fp8_adds_fused``  with ``fp8_fused``: the bias adds of fp8 linears whose output goes        as ``fp8_residual``
                   straight into a residual kernel, in that kernel: the self-attention's     (the bias add is
                   and the cross-attention's output projections (with ``fp8_residual``),     rounded like the
                   and with ``cross_residual`` the FFN's second linear (in the next          linear's); CPU:
                   block's norm1 kernel); removes one full-size read + write each (item      bit-identical
                   ``fuseadds``)
``fp8_split_rows`` with ``fp8_fused``: the GELU kernel holds each FFN hidden row in two      same values and
                   power-of-two pieces where they are smaller than its whole block (Wan      scales as the
                   1.3B's 8,960: 8,192 + 1,024 lanes, not 16,384; ``triton_util.``           whole-row kernel
                   ``split_blocks``; item ``splitrows``; in ``fastest``)
``tuned_warps``    the Triton row kernels launched with the warp counts measured best on     same values (the
                   an H100 (``triton_util.TUNED_WARPS``, from ``docs/bench/h100_row_``       kernels' maths do
                   ``kernels/``) instead of the default rule (item ``warps``)                not change)
``norm_rows``      with ``norm_fused`` or ``fp8_fused``: the LayerNorm kernels that read     same values (per
                   per-frame rows (modulation, gate) process 4 or 2 rows of one frame per    row the same
                   program and load those rows once (``triton_util.norm_rows``; item         maths and
                   ``normrows``; measured, in no level)                                      rounding)
=================  ========================================================================  ==================

Levels (:data:`PERF_LEVELS`): ``plain`` (all off, the eager reference), ``safe`` (the default: both caches
and ``window_gather``), ``fast`` (+ ``compile``, ``cuda_graphs``, ``norm_fused``, ``cross_residual`` and
``qk_fused``), ``fastest`` (+ ``compile``, ``cuda_graphs``, ``fp8=row``, ``fp8_fused``, ``fp8_residual``,
``qk_fused``, ``fp8_out_fused``, ``fp8_adds_fused``, ``cross_residual``, ``tuned_warps`` and ``fp8_split_rows``).
``fp8_fused`` is in
``fastest`` since the H100 run in ``docs/bench/h100_fp8fuse/`` (−4.7 % per call at paper scale, −6.7 % for Wan
1.3B with 4-frame windows, same error against ``plain``), ``fp8_residual`` since the one in
``docs/bench/h100_fp8resid/`` (a further −9.6 % and −7.6 %), ``qk_fused`` (both levels), ``norm_fused`` and
``cross_residual`` (``fast``) since the one in ``docs/bench/h100_fused_rope_norm/`` (``fastest`` −4.2 % and
−4.0 %; ``fast`` −7.1 % and −6.2 %, same or lower error), ``fp8_out_fused``, ``fp8_adds_fused``, ``cross_residual``
and ``tuned_warps`` (``fastest``) since the one in ``docs/bench/h100_outquant_fuseadds/`` (together −3.7 % and
−4.5 %: 168.6 → 162.3 ms and 145.9 → 139.3 ms; alone ``fp8_out_fused`` −1.9 % / −1.6 %, ``fp8_adds_fused``
−2.1 % / −2.0 %; ``cross_residual`` had cost ``fastest`` 0.8–1.9 % before ``fp8_adds_fused``, because the FFN's
fp8 output then needed its bias added in a pass of its own, and now saves 0.2–0.4 %), ``fp8_split_rows``
(``fastest``) since the one in ``docs/bench/h100_splitrows/`` (Wan 1.3B w4 139.1 → 134.0 ms, −3.7 %; confirmed
in ``docs/bench/h100_splitrows_confirm/``, 139.8/140.4 → 135.2/134.0 ms; at the paper's width the row stays whole,
no change). On CUDA without Triton the
Triton items stay off (the status says why); off CUDA they are dropped (their kernels' reference is the unfused
maths, better left to the compiler there), ``cross_residual`` with them.
``fp8_rows`` gained nothing and is in no level (``fastest,fp8rows``; in ``bench --modes``: ``fastest+fp8rows``);
``norm_rows`` is in no level (``fastest,normrows``, ``fast,normrows``; ``fastest+normrows``): in
``docs/bench/h100_splitrows/`` it made ``fastest`` 3.1 % / 1.6 % slower and ``fast`` 3.2 % faster at paper scale
but 1.3 % slower for Wan (its kernels ran at the default 16 warps, the sweep's worst but one; with
``tuned_warps`` the fp8 norm1 kernels now use the counts measured for them, not yet timed in the model).
A GELU row kernel in two passes over chunks of the row was measured (Wan's ``fastest`` 3.5 % slower, see
``docs/BENCHMARKS.md``) and removed.
``fp8_out_fused`` needs ``window_gather`` for windows smaller than the grid, like ``qk_fused``.
``qk_fused`` needs ``window_gather`` for windows smaller than the grid (the roll path stays unfused).
``window_gather`` is in every level but ``plain`` since the H100 run in ``docs/bench/h100_qkv_gather/``
(eager: −8.8 % per call at paper scale, −5.9 % for Wan 1.3B with 4-frame windows; compiled: within ±2 %);
the item ``gather`` switches it on in an option list (``"kv,layout,gather"``), and ``kv,layout`` is ``safe``
with the roll path. A fused q/k/v projection was measured in the same run, gained nothing in any level, and
was removed.

The attention kernel is chosen by the attention backend (``auto`` picks cuDNN on GPUs that support it), not
here. Everything fails soft: an optimisation that cannot run on this machine (no CUDA, no fp8 matmul, a
failed compile or graph capture) is switched off with a logged warning and recorded in
``model.perf_status``; results never depend on whether it was on beyond the tolerance above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from .fp8_quant import (
    FP8_MAX,
    BiasPending,
    QuantizedActivation,
    dequantize_fp8,
    gelu_quantize,
    quantize_fp8,
    quantize_rows,
    triton_problem,
)
from .log import get_logger
from .qk_rope import triton_problem as qk_rope_problem
from .triton_util import TUNED_WARPS, row_launch_config, split_blocks

if TYPE_CHECKING:
    from .model import StreamDiT

__all__ = [
    "PerfOptions",
    "PERF_LEVELS",
    "COMPILE_MODES",
    "FP8_MODES",
    "FP8_MAX",
    "Fp8Linear",
    "GeluInNextLinear",
    "GraphRunner",
    "apply_perf",
    "fp8_linear",
    "fp8_matmul",
    "quantize_fp8",
    "dequantize_fp8",
    "fp8_supported",
]

log = get_logger("perf")

COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs", "max-autotune")
FP8_MODES = ("off", "row", "tensor")


@dataclass(frozen=True)
class PerfOptions:
    """Which inference speed-ups are on (see the module docstring for what each does and its tolerance).

    Attributes:
        text_kv_cache: cache cross-attention keys/values per context tensor; group frames with one prompt.
        layout_cache: cache RoPE per token grid and the time embedding per σ tensor.
        compile: ``torch.compile`` mode of the blocks, or ``"off"``.
        cuda_graphs: replay the model call as a CUDA graph (CUDA only; needs both caches).
        fp8: ``"off"``, ``"row"`` (per-row scales) or ``"tensor"`` (per-tensor scales) float8 block linears.
        window_gather: window partitioning by a cached token permutation instead of ``torch.roll`` + reshape
            (inference only; bit-identical).
        fp8_fused: quantise the fp8 linears' adaLN inputs (LayerNorm + modulation; once for q, k and v) and the
            FFN's GELU output in single-pass fused kernels (``fp8_quant``); needs ``fp8="row"``.
        fp8_rows: quantise the other fp8 linears' inputs (self-attention output, cross-attention query and
            output) with a single-pass kernel instead of the compiler's; needs ``fp8="row"``.
        fp8_residual: also fuse the residual adds before the cross-attention and the FFN into the kernels that
            normalise and quantise their inputs (the cross-attention query's input too); needs ``fp8_fused``.
        fp8_out_fused: the self-attention output's inverse window gather and per-row quantisation in one operator
            (``fp8_quant.window_rows_quantize``), the cross-attention output quantised by the single-pass row
            kernel; inference only, needs ``fp8_fused``.
        norm_fused: the same LayerNorm kernels without quantisation for the bf16 (non-fp8) block inputs.
        cross_residual: add each block's FFN residual in the next block's first norm (inference only).
        qk_fused: the self-attention's q/k RMS norms, RoPE and window gather (q, k and v; with fp8 linears their
            biases too) in one operator, ``qk_rope.qk_norm_rope`` (inference only; CUDA with Triton).
        fp8_adds_fused: add the biases of the fp8 linears that feed a residual kernel (the attention output
            projections with ``fp8_residual``, the FFN's second linear with ``cross_residual``) in that kernel
            instead of a pass of their own; needs ``fp8_fused``.
        fp8_split_rows: the GELU + quantisation kernel holds each row of the FFN hidden as two power-of-two pieces
            where they are smaller together than the row's whole block (``triton_util.split_blocks``); needs
            ``fp8_fused``.
        tuned_warps: launch the Triton row kernels with their measured warp counts (``triton_util.TUNED_WARPS``).
        norm_rows: the fused LayerNorm kernels that read per-frame rows (modulation, gate) process several rows of
            one frame per program (``triton_util.norm_rows``); acts with ``norm_fused`` or ``fp8_fused``.
    """

    text_kv_cache: bool = True
    layout_cache: bool = True
    compile: str = "off"
    cuda_graphs: bool = False
    fp8: str = "off"
    window_gather: bool = True
    fp8_fused: bool = False
    fp8_rows: bool = False
    fp8_residual: bool = False
    fp8_out_fused: bool = False
    norm_fused: bool = False
    cross_residual: bool = False
    qk_fused: bool = False
    fp8_adds_fused: bool = False
    tuned_warps: bool = False
    fp8_split_rows: bool = False
    norm_rows: bool = False

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {list(COMPILE_MODES)}, got {self.compile!r}")
        if self.fp8 not in FP8_MODES:
            raise ValueError(f"fp8 must be one of {list(FP8_MODES)}, got {self.fp8!r}")
        if (self.fp8_fused or self.fp8_rows or self.fp8_residual) and self.fp8 != "row":
            raise ValueError(f"fp8_fused, fp8_rows and fp8_residual quantise per row: they need fp8='row' (the items "
                             f"fp8 or fp8=row), got fp8={self.fp8!r}")
        for name in ("fp8_residual", "fp8_out_fused", "fp8_adds_fused", "fp8_split_rows"):
            if getattr(self, name) and not self.fp8_fused:
                raise ValueError(f"{name} extends the fused kernels of fp8_fused: it needs fp8_fused (the item "
                                 "fp8fuse, part of the level 'fastest')")
        if self.cuda_graphs and not (self.text_kv_cache and self.layout_cache):
            raise ValueError("cuda_graphs needs text_kv_cache and layout_cache (graph inputs must keep their address)")

    @classmethod
    def plain(cls) -> PerfOptions:
        """Everything off: the eager reference path."""
        return cls(text_kv_cache=False, layout_cache=False, window_gather=False)

    @classmethod
    def level(cls, name: str) -> PerfOptions:
        """A named level (:data:`PERF_LEVELS`) or a comma list such as ``"kv,layout,compile=default,graphs,fp8=row"``
        (``kv``/``layout``/``graphs``/``gather``/``fp8fuse``/``fp8rows``/``fp8resid``/``outquant``/``normfuse``/
        ``crossres``/``qkrope``/``fuseadds``/``warps``/``splitrows``/``normrows`` switch on; ``compile`` alone means
        ``compile=default``; ``fp8`` alone means ``fp8=row``; a level name as an item, e.g. ``"safe,compile"``, sets
        every option to that level's at that point of the list; a list starts from everything off, like ``plain``).
        ``fp8=tensor`` after a level turns off that level's per-row items (``"fastest,fp8=tensor"``); listed together
        with ``fp8fuse``, ``fp8rows``, ``fp8resid``, ``outquant``, ``fuseadds`` or ``splitrows`` it is an error."""
        if name in PERF_LEVELS:
            return PERF_LEVELS[name]
        opts: dict[str, Any] = {f.name: getattr(PERF_LEVELS["plain"], f.name) for f in fields(PERF_LEVELS["plain"])}
        switches = {"kv": "text_kv_cache", "layout": "layout_cache", "graphs": "cuda_graphs", "gather": "window_gather",
                    "fp8fuse": "fp8_fused", "fp8rows": "fp8_rows", "fp8resid": "fp8_residual",
                    "outquant": "fp8_out_fused", "normfuse": "norm_fused", "crossres": "cross_residual",
                    "qkrope": "qk_fused", "fuseadds": "fp8_adds_fused", "warps": "tuned_warps",
                    "splitrows": "fp8_split_rows", "normrows": "norm_rows"}
        listed: set[str] = set()  # the per-row items named in the list (not inherited from a level)
        for raw in filter(None, (p.strip() for p in name.split(","))):
            key, _, value = raw.partition("=")
            if key in PERF_LEVELS and not value:
                opts = {f.name: getattr(PERF_LEVELS[key], f.name) for f in fields(PERF_LEVELS[key])}
            elif key in switches and not value:
                opts[switches[key]] = True
                listed.add(switches[key])
            elif key == "compile":
                opts["compile"] = value or "default"
            elif key == "fp8":
                opts["fp8"] = value or "row"
                if opts["fp8"] != "row":
                    opts.update({k: False for k in ("fp8_fused", "fp8_rows", "fp8_residual", "fp8_out_fused",
                                                    "fp8_adds_fused", "fp8_split_rows") if k not in listed})
            else:
                raise ValueError(
                    f"unknown optimisation {raw!r} in {name!r}; use a level {sorted(PERF_LEVELS)} or items "
                    "kv, layout, compile[=MODE], graphs, fp8[=row|tensor], gather, fp8fuse, fp8rows, fp8resid, "
                    "outquant, normfuse, crossres, qkrope, fuseadds, warps, splitrows, normrows (a level name may "
                    "start the list)"
                )
        return cls(**opts)

    def for_device(self, device: torch.device) -> PerfOptions:
        """Drop what cannot help on ``device``: CUDA graphs, fp8, the fused norm kernels and the fused q/k kernel
        need CUDA (fp8 would only be emulated, the fused operators' reference hides the unfused maths from the
        compiler), and so do the fused bias adds, the kernels' warp counts, the split GELU rows and the multi-row
        LayerNorm programs."""
        if device.type == "cuda":
            return self
        return replace(self, cuda_graphs=False, fp8="off", fp8_fused=False, fp8_rows=False, fp8_residual=False,
                       fp8_out_fused=False, norm_fused=False, cross_residual=False, qk_fused=False,
                       fp8_adds_fused=False, tuned_warps=False, fp8_split_rows=False, norm_rows=False)

    def describe(self) -> str:
        on = [f.name if isinstance(getattr(self, f.name), bool) else f"{f.name}={getattr(self, f.name)}"
              for f in fields(self) if getattr(self, f.name) not in (False, "off")]
        return ",".join(on) or "plain"


PERF_LEVELS: dict[str, PerfOptions] = {
    # the eager reference: no caches, no compile, windows partitioned by roll + reshape
    "plain": PerfOptions(text_kv_cache=False, layout_cache=False, window_gather=False),
    # the default: exact caches and roll-free windows only (plus the attention backend's fastest kernel)
    "safe": PerfOptions(),
    # + fused kernels and CUDA graphs: first call compiles (tens of seconds), same results to bf16 rounding
    "fast": PerfOptions(compile="default", cuda_graphs=True, norm_fused=True, cross_residual=True, qk_fused=True),
    # + float8 linears (H100/Ada) with fused quantisation kernels: a few % relative change of the model output,
    # measured by `bench`
    "fastest": PerfOptions(
        compile="default", cuda_graphs=True, fp8="row", fp8_fused=True, fp8_residual=True, qk_fused=True,
        fp8_out_fused=True, fp8_adds_fused=True, cross_residual=True, tuned_warps=True, fp8_split_rows=True,
    ),
}


# ----------------------------------------------------------------------------------------------------------
# fp8
# ----------------------------------------------------------------------------------------------------------


_FP8_PROBE: dict[tuple[str, str], str | None] = {}


def fp8_supported(device: torch.device, rowwise: bool) -> str | None:
    """Probe ``torch._scaled_mm`` on ``device`` once. Returns ``None`` if it works, else the error text."""
    if device.type != "cuda":
        return "fp8 matmul needs CUDA"
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (f"cuda:{index}", "row" if rowwise else "tensor")
    if key not in _FP8_PROBE:
        try:
            a = torch.randn(32, 64, device=key[0], dtype=torch.bfloat16)
            w = torch.randn(48, 64, device=key[0], dtype=torch.bfloat16)
            b = torch.randn(48, device=key[0], dtype=torch.bfloat16)
            a8, sa = quantize_fp8(a, rowwise)
            w8, sw = quantize_fp8(w, rowwise)
            out = _scaled_mm(a8, w8, sa, sw.reshape(1, -1) if rowwise else sw, b, torch.bfloat16)
            ref = F.linear(a.float(), w.float(), b.float())
            err = ((out.float() - ref).norm() / ref.norm()).item()
            _FP8_PROBE[key] = None if err < 0.1 else f"fp8 probe error {err:.3f} too large"
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
            _FP8_PROBE[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return _FP8_PROBE[key]


def _scaled_mm(
    a8: torch.Tensor,
    w8: torch.Tensor,
    scale_a: torch.Tensor,
    scale_w: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``a8 [M, K] @ w8[N, K]ᵀ`` on the fp8 tensor cores, bias added in ``out_dtype``."""
    out = torch._scaled_mm(a8, w8.t(), scale_a=scale_a, scale_b=scale_w, out_dtype=out_dtype, use_fast_accum=True)
    if isinstance(out, tuple):  # torch < 2.5 returned (out, amax)
        out = out[0]
    return out if bias is None else out + bias.to(out_dtype)


def fp8_linear(
    x: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    rowwise: bool,
    use_scaled_mm: bool,
) -> torch.Tensor:
    """``x @ Wᵀ + b`` with ``x`` quantised to float8 e4m3 here and ``W`` quantised once.

    Args:
        x: ``[..., in]``.
        weight_fp8: ``[out, in]`` e4m3 values stored as ``uint8`` (:func:`quantize_fp8`, then ``.view(uint8)``).
        weight_scale: ``[1, out]`` (rowwise) or ``[]``; read as float32.
        bias: ``[out]`` or ``None``.
        rowwise: per-row scales for ``x`` (and ``W``); else one scale per tensor.
        use_scaled_mm: the fp8 tensor-core matmul; else the same quantisation emulated in float32.
    Returns:
        ``[..., out]`` in x's dtype.
    """
    x8, sx = quantize_fp8(x.reshape(-1, x.shape[-1]), rowwise)
    out = fp8_matmul(x8, sx, weight_fp8, weight_scale, bias, rowwise, use_scaled_mm, x.dtype)  # [M, out]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def fp8_matmul(
    x8: torch.Tensor,
    scale_x: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    rowwise: bool,
    use_scaled_mm: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(x8·scale_x) @ Wᵀ + b`` for an already quantised ``x8`` ``[M, in]`` float8_e4m3fn with ``scale_x``
    ``[M, 1]`` (rowwise) or ``[]``; the weight arguments as in :func:`fp8_linear`. Returns ``[M, out]``."""
    w8 = weight_fp8.view(torch.float8_e4m3fn)
    sw = weight_scale.float()
    if use_scaled_mm:
        return _scaled_mm(x8, w8, scale_x, sw, bias, out_dtype)
    out = F.linear(dequantize_fp8(x8, scale_x), dequantize_fp8(w8, sw.reshape(-1, 1) if rowwise else sw))
    # the bias added in out_dtype after the matmul's rounding, like _scaled_mm above
    return out.to(out_dtype) if bias is None else out.to(out_dtype) + bias.to(out_dtype)


class Fp8Linear(nn.Module):
    """A ``nn.Linear`` whose matmul runs in float8 e4m3. Shares the original ``weight``/``bias`` parameters
    (state dict unchanged); the quantised weight and its scale are non-persistent buffers (the weight stored
    as ``uint8`` so ``model.to(dtype)`` leaves it alone). Off CUDA, or where ``torch._scaled_mm`` is missing,
    the same quantisation is emulated in float32 (for tests).

    The input is a tensor, quantised here, or a :class:`~streamdit_core.fp8_quant.QuantizedActivation` that its
    producer quantised already (``fp8_fused``). ``prologue="gelu"``: the input is the pre-GELU FFN hidden and
    GELU(tanh) is applied in the quantisation kernel (the FFN's ``nn.GELU`` is then a :class:`GeluInNextLinear`);
    ``defer_bias``: the output is a :class:`~streamdit_core.fp8_quant.BiasPending` whose bias that kernel adds
    (the FFN's first linear, so its bias costs no pass over the hidden of its own). ``single_pass``: tensor
    inputs are quantised by the single-pass row kernel (``fp8_rows``)."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, linear: nn.Linear, rowwise: bool, use_scaled_mm: bool, single_pass: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = cast(nn.Parameter, linear.weight)
        self.bias = cast("nn.Parameter | None", linear.bias)
        self.rowwise = rowwise
        self.use_scaled_mm = use_scaled_mm
        self.single_pass = single_pass and rowwise
        self.prologue: Literal["none", "gelu"] = "none"
        self.defer_bias = False
        self.tuned_warps = False  # the GELU prologue's kernel with its measured warp count (tuned_warps)
        self.split_rows = False  # the GELU prologue's kernel with rows in two pieces where smaller (fp8_split_rows)
        with torch.no_grad():
            w8, scale = quantize_fp8(linear.weight.detach(), rowwise)
        self.register_buffer("weight_fp8", w8.view(torch.uint8), persistent=False)
        self.register_buffer("weight_scale", scale.reshape(1, -1) if rowwise else scale, persistent=False)

    @classmethod
    def eligible(cls, linear: nn.Module) -> bool:
        """fp8 tensor cores need both matrix sizes to be multiples of 16."""
        return isinstance(linear, nn.Linear) and linear.in_features % 16 == 0 and linear.out_features % 16 == 0

    def forward(self, x: torch.Tensor | QuantizedActivation | BiasPending) -> torch.Tensor | BiasPending:
        """x ``[..., in]`` (or its quantised form; with the GELU prologue also the pre-GELU hidden without its
        bias) → ``[..., out]`` in x's dtype (without the bias, as :class:`BiasPending`, when ``defer_bias``)."""
        if self.prologue == "gelu":
            if isinstance(x, QuantizedActivation):
                raise TypeError("an Fp8Linear with a GELU prologue takes the pre-GELU tensor")
            h, b = x if isinstance(x, BiasPending) else (x, None)
            x = gelu_quantize(h, b, self.tuned_warps, self.split_rows)
        elif isinstance(x, BiasPending):
            raise TypeError("only an Fp8Linear with a GELU prologue takes an output whose bias is pending")
        elif self.single_pass and not isinstance(x, QuantizedActivation):
            x = quantize_rows(x)
        bias = None if self.defer_bias else self.bias
        if not isinstance(x, QuantizedActivation):
            out = fp8_linear(x, self.weight_fp8, self.weight_scale, bias, self.rowwise, self.use_scaled_mm)
        elif not self.rowwise:
            raise TypeError("a quantised activation has per-row scales; this Fp8Linear uses per-tensor scales")
        else:
            out = fp8_matmul(x.data.reshape(-1, self.in_features), x.scale.reshape(-1, 1), self.weight_fp8,
                             self.weight_scale, bias, True, self.use_scaled_mm, x.dtype)  # [M, out]
            out = out.reshape(*x.data.shape[:-1], self.out_features)
        return BiasPending(out, self.bias) if self.defer_bias else out

    def extra_repr(self) -> str:
        extra = ((", single_pass" if self.single_pass else "") + (", prologue=gelu" if self.prologue == "gelu" else "")
                 + (", split_rows" if self.split_rows else "") + (", defer_bias" if self.defer_bias else ""))
        return (f"{self.in_features}, {self.out_features}, rowwise={self.rowwise}, scaled_mm={self.use_scaled_mm}"
                + extra)


class GeluInNextLinear(nn.Identity):
    """Stands in for the FFN's ``nn.GELU`` while the next :class:`Fp8Linear` applies it inside its quantisation
    kernel (``fp8_fused``); ``approximate`` restores the original module."""

    def __init__(self, approximate: str) -> None:
        super().__init__()
        self.approximate = approximate

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


def _block_linears(model: StreamDiT) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every linear layer applied to the video tokens inside the blocks (the
    cross-attention key/value projections of the text are cached, so they stay in the model dtype)."""
    out: list[tuple[nn.Module, str]] = []
    block: Any
    for block in model.blocks:
        sa, ca = block.self_attn, block.cross_attn
        out += [(sa, "q"), (sa, "k"), (sa, "v"), (sa, "o"), (ca, "q"), (ca, "o"), (block.ffn, "0"), (block.ffn, "2")]
    return out


def _undo_fp8(model: StreamDiT) -> None:
    """Put back the ``nn.Linear`` s (the same Parameter objects: nothing is copied), the FFN's GELU and the
    blocks' plain adaLN inputs."""
    for parent, name in _block_linears(model):
        layer = getattr(parent, name)
        if isinstance(layer, Fp8Linear):
            restored = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                 device="meta")
            restored.weight = layer.weight
            restored.bias = cast(nn.Parameter, layer.bias)
            setattr(parent, name, restored)
    block: Any
    for block in model.blocks:
        block.fused_fp8_input = block.fused_fp8_residual = block.self_attn.fused_out_quant = False
        if isinstance(block.ffn[1], GeluInNextLinear):
            block.ffn[1] = nn.GELU(approximate=block.ffn[1].approximate)


def _fused_kernels(
    model: StreamDiT,
    problem: str | None,
    option: str,
    what: str,
    status: dict[str, str],
    kernels: str = "Triton kernels",
) -> str | None:
    """How the fused operators of ``option`` run on the model's device, for its status: ``kernels`` when their
    module loaded Triton (``problem`` ``None``), ``"reference implementation (problem)"`` off CUDA (the unfused maths,
    bit-identical), or ``None`` on CUDA without Triton, where the reference would run as an opaque operator, slower
    than the compiler's fusion: the option then stays off, ``status[option]`` says why and a warning names
    ``what``."""
    if problem is None:
        return kernels
    if model.patch_embedding.weight.device.type != "cuda":
        return f"reference implementation ({problem})"
    status[option] = f"off: no {kernels} ({problem})"
    log.warning("%s: off on CUDA without Triton (%s)", what, problem)
    return None


def _fuse_fp8(
    model: StreamDiT,
    status: dict[str, str],
    residual: bool = False,
    outputs: bool = False,
    adds: bool = False,
    cross_residual: bool = False,
    split: bool = False,
) -> None:
    """Quantise per row inside the producers' kernels (``fp8_fused``): each block's adaLN inputs of q/k/v and of
    the FFN (all ``Fp8Linear`` with per-row scales) once, and the FFN's GELU output in the second linear. With
    ``residual`` (``fp8_residual``) the cross-attention's q input and the FFN input come from the kernels that
    also add the residual before their norm. With ``outputs`` (``fp8_out_fused``) the attention outputs too
    (:func:`_fuse_fp8_outputs`). With ``adds`` (``fp8_adds_fused``) the fp8 linears whose output goes into a
    residual kernel leave their bias to it (``Fp8Linear.defer_bias``): the attention output projections of the
    blocks with ``residual``, and with ``cross_residual`` the FFN's second linear (added in the next block's norm1
    kernel). With ``split`` (``fp8_split_rows``) the GELU kernel holds the FFN hidden's rows as two power-of-two
    pieces where they are smaller than the whole row's block (``triton_util.split_blocks``)."""
    kernels = _fused_kernels(model, triton_problem(), "fp8_fused", "fused fp8 quantisation", status)
    if kernels is None:
        for flag, name in ((residual, "fp8_residual"), (outputs, "fp8_out_fused"), (adds, "fp8_adds_fused"),
                           (split, "fp8_split_rows")):
            if flag:
                status[name] = "off: no Triton kernels"
        return
    adaln = gelu = resid = out_biases = ffn_outputs = 0
    block: Any
    for block in model.blocks:
        sa, ffn = block.self_attn, block.ffn
        consumers = (sa.q, sa.k, sa.v, ffn[0])
        plain_norms = block.norm1.weight is None and block.norm2.weight is None  # the kernel has no affine
        if all(isinstance(m, Fp8Linear) and m.rowwise for m in consumers) and plain_norms:
            block.fused_fp8_input = True
            adaln += 1
        if (isinstance(ffn[2], Fp8Linear) and ffn[2].rowwise and isinstance(ffn[1], nn.GELU)
                and ffn[1].approximate == "tanh"):
            ffn[1] = GeluInNextLinear(ffn[1].approximate)
            ffn[2].prologue = "gelu"
            ffn[2].split_rows = split
            if isinstance(ffn[0], Fp8Linear):  # its bias is added in the GELU kernel
                ffn[0].defer_bias = True
            gelu += 1
        # the residual kernel normalises with or without affine parameters, but does normalise (norm3 is an
        # nn.Identity in models without cross_attn_norm)
        if residual and all(isinstance(m, Fp8Linear) and m.rowwise for m in (block.cross_attn.q, ffn[0])) and all(
                isinstance(n, nn.LayerNorm) for n in (block.norm2, block.norm3)):
            block.fused_fp8_residual = True
            resid += 1
            if adds:  # both attention outputs go straight into this block's residual kernels
                for linear in (block.self_attn.o, block.cross_attn.o):
                    if isinstance(linear, Fp8Linear):
                        linear.defer_bias = True
                        out_biases += 1
        if adds and cross_residual and isinstance(ffn[2], Fp8Linear):  # into the next block's norm1 (or the head's add)
            ffn[2].defer_bias = True
            ffn_outputs += 1
    status["fp8_fused"] = f"{adaln} adaLN inputs, {gelu} GELUs; {kernels}"
    if residual:
        status["fp8_residual"] = f"{resid} blocks (cross-attention and FFN inputs with their residual add)"
    if adds:
        status["fp8_adds_fused"] = (f"{out_biases} attention output biases in the residual kernels"
                                    + (f", {ffn_outputs} FFN output biases in the next norm1 kernel" if cross_residual
                                       else " (FFN output biases: only with cross_residual)"))
    if split:
        width = model.config.ffn_dim
        block, block2 = split_blocks(width)
        status["fp8_split_rows"] = (f"{gelu} GELU rows of {width} split into blocks of {block} + {block2} (instead of "
                                    f"{row_launch_config(width)[0]}); {kernels}" if block2
                                    else f"no effect: rows of {width} stay whole (a split gains nothing)")
    if outputs:
        _fuse_fp8_outputs(model, status)


def _fuse_fp8_outputs(model: StreamDiT, status: dict[str, str]) -> None:
    """``fp8_out_fused``: the self-attention hands its output projection (a per-row ``Fp8Linear``) the attention
    output gathered back into token order and quantised by one kernel (``SelfAttention.fused_out_quant``;
    inference only, and with windows smaller than the grid only where ``window_gather`` partitions them), and the
    cross-attention's output projection quantises its (contiguous) input with the single-pass row kernel
    (``Fp8Linear.single_pass``)."""
    self_out = cross_out = 0
    block: Any
    for block in model.blocks:
        sa_o, ca_o = block.self_attn.o, block.cross_attn.o
        if isinstance(sa_o, Fp8Linear) and sa_o.rowwise:
            block.self_attn.fused_out_quant = True
            self_out += 1
        if isinstance(ca_o, Fp8Linear) and ca_o.rowwise:
            ca_o.single_pass = True
            cross_out += 1
    status["fp8_out_fused"] = (f"{self_out} self-attention outputs (window gather + quantisation), {cross_out} "
                               "cross-attention outputs (row kernel)")


def _set_fp8(model: StreamDiT, options: PerfOptions, status: dict[str, str]) -> None:
    """Install (or, for ``fp8="off"``, remove) the fp8 linears and their fused quantisation."""
    _undo_fp8(model)  # always undo first (mode switches, or off)
    if options.fp8 == "off":
        return
    device = model.patch_embedding.weight.device
    rowwise = options.fp8 == "row"
    problem = fp8_supported(device, rowwise)
    if problem is not None and device.type == "cuda" and rowwise and fp8_supported(device, False) is None:
        log.warning("fp8 with per-row scales is not available (%s); using per-tensor scales", problem)
        rowwise, problem = False, None
    use_scaled_mm = problem is None
    if not use_scaled_mm and device.type == "cuda":
        status["fp8"] = f"off: {problem}"
        log.warning("fp8 linears are not available on %s (%s); staying in %s", device, problem,
                    model.patch_embedding.weight.dtype)
        return
    count = 0
    single_pass = options.fp8_rows and rowwise
    for parent, name in _block_linears(model):
        layer = getattr(parent, name)
        if Fp8Linear.eligible(layer):
            setattr(parent, name, Fp8Linear(layer, rowwise, use_scaled_mm, single_pass))
            count += 1
    status["fp8"] = f"{'row' if rowwise else 'tensor'} scales, {count} linears" + (
        "" if use_scaled_mm else " (emulated in float32: no fp8 matmul here)")
    if (options.fp8_fused or options.fp8_rows) and not rowwise:
        status["fp8_fused"] = "off: needs per-row scales"
        return
    if single_pass:
        status["fp8_rows"] = "on" if triton_problem() is None else f"reference implementation ({triton_problem()})"
    if options.fp8_fused:
        _fuse_fp8(model, status, options.fp8_residual, options.fp8_out_fused,
                  options.fp8_adds_fused, options.cross_residual, options.fp8_split_rows)
        if options.fp8_out_fused and not options.window_gather and not status["fp8_out_fused"].startswith("off"):
            status["fp8_out_fused"] += "; windows smaller than the grid stay unfused (roll path: no gather)"


# ----------------------------------------------------------------------------------------------------------
# fused LayerNorm kernels for bf16, the FFN residual across blocks
# ----------------------------------------------------------------------------------------------------------


def _set_norm_fused(model: StreamDiT, options: PerfOptions, status: dict[str, str]) -> None:
    """Install (or remove) the bf16 path's fused LayerNorm kernels (``norm_fused``) and report
    ``cross_residual``. Blocks whose ``norm1``/``norm2`` have affine parameters keep the unfused path (the adaLN
    kernel has none)."""
    block: Any
    for block in model.blocks:
        block.fused_norm = False
    if options.cross_residual:
        status["cross_residual"] = "on (inference without autograd)"
    if not options.norm_fused:
        return
    kernels = _fused_kernels(model, triton_problem(), "norm_fused", "fused LayerNorm kernels", status)
    if kernels is None:
        return
    count = 0
    for block in model.blocks:
        norms = (block.norm1, block.norm2)
        if all(isinstance(n, nn.LayerNorm) and n.weight is None for n in norms):
            block.fused_norm = True
            count += 1
    status["norm_fused"] = f"{count} blocks; {kernels}"


# ----------------------------------------------------------------------------------------------------------
# fused q/k norm + RoPE + window gather
# ----------------------------------------------------------------------------------------------------------


def _set_qk_fused(model: StreamDiT, options: PerfOptions, status: dict[str, str]) -> None:
    """Switch the self-attention's fused q/k operator (``qk_fused``) on or off in every block whose q/k norms it
    computes (``SelfAttention.fusable_qk``). The q/k/v projections that are fp8 linears leave their bias to it
    (``Fp8Linear.defer_bias``; fresh ``Fp8Linear`` s from :func:`_set_fp8` start without). Call after
    :func:`_set_fp8`."""
    attns: list[Any] = [block.self_attn for block in model.blocks]
    for attn in attns:
        attn.fused_qk_rope = False
    if not options.qk_fused:
        return
    kernel = _fused_kernels(model, qk_rope_problem(), "qk_fused", "fused q/k norm + RoPE kernel", status,
                            "Triton kernel")
    if kernel is None:
        return
    count = 0
    for attn in attns:
        if attn.fusable_qk():
            attn.fused_qk_rope = True
            for linear in (attn.q, attn.k, attn.v):
                if isinstance(linear, Fp8Linear):
                    linear.defer_bias = True
            count += 1
    rolled = "" if options.window_gather else "; windows smaller than the grid stay unfused (roll path: no gather)"
    status["qk_fused"] = f"{count} blocks; {kernel}{rolled}"


# ----------------------------------------------------------------------------------------------------------
# measured warp counts of the row kernels
# ----------------------------------------------------------------------------------------------------------


def _set_tuned_warps(model: StreamDiT, options: PerfOptions, status: dict[str, str]) -> None:
    """Launch the Triton row kernels (LayerNorm, GELU and q/k kernels) with the warp counts measured on an H100
    (``tuned_warps``; ``triton_util.TUNED_WARPS``), or with the default rule. Call after :func:`_set_fp8` (it
    makes new ``Fp8Linear`` s)."""
    on = options.tuned_warps
    block: Any
    for block in model.blocks:
        block.tuned_warps = block.self_attn.tuned_warps = on
        for module in block.modules():
            if isinstance(module, Fp8Linear):
                module.tuned_warps = on
    if on:
        widths = sorted({model.config.dim, model.config.ffn_dim})
        tuned = sorted({kind for kind, width in TUNED_WARPS if width in widths})
        runs = "Triton kernels" if triton_problem() is None and qk_rope_problem() is None else (
            "no effect: the reference implementations run")
        status["tuned_warps"] = (f"measured warp counts at widths {widths} for {', '.join(tuned) or 'no kernel'} "
                                 f"(triton_util.TUNED_WARPS); {runs}")


def _set_norm_rows(model: StreamDiT, options: PerfOptions, status: dict[str, str]) -> None:
    """Let the fused LayerNorm kernels that read per-frame rows (modulation, gate) process several rows of one frame
    per program (``norm_rows``; ``triton_util.norm_rows``), or one. Call after :func:`_set_fp8` and
    :func:`_set_norm_fused` (it reports whether a fused norm kernel runs)."""
    block: Any
    for block in model.blocks:
        block.norm_rows = options.norm_rows
    if not options.norm_rows:
        return
    if not any(block.fused_fp8_input or block.fused_fp8_residual or block.fused_norm for block in model.blocks):
        status["norm_rows"] = "no effect: no fused LayerNorm kernel (needs norm_fused or fp8_fused)"
    elif triton_problem() is not None or model.patch_embedding.weight.device.type != "cuda":
        status["norm_rows"] = "no effect: the reference implementations run (no Triton, or not on CUDA)"
    else:
        status["norm_rows"] = ("modulated/gated LayerNorm kernels: 4 or 2 rows of one frame per program where they "
                               "divide the tokens per frame (triton_util.norm_rows), else one")


# ----------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------


def _set_compile(model: StreamDiT, mode: str, status: dict[str, str]) -> None:
    for block in model.blocks:
        if getattr(block, "_compiled_call_impl", None) is not None:
            block._compiled_call_impl = None
    if mode == "off":
        return
    try:
        import torch._dynamo as dynamo

        # 2 graphs (shifted windows or not) per shape and precision; blocks share them (parameters are graph
        # inputs), but a generous limit keeps a surprise recompile per block from silently falling back to eager
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, name) and getattr(dynamo.config, name) < 256:
                setattr(dynamo.config, name, 256)
        kwargs: dict[str, Any] = {"dynamic": False}
        if mode != "default":
            kwargs["mode"] = mode
        for block in model.blocks:
            block.compile(**kwargs)  # same code for every block: compiled once, reused (regional compilation)
        status["compile"] = mode
    except Exception as exc:  # noqa: BLE001
        for block in model.blocks:
            block._compiled_call_impl = None
        status["compile"] = f"off: {type(exc).__name__}: {exc}"
        log.warning("torch.compile is not available (%s); running eager", exc)


def disable_compile(model: StreamDiT, reason: str) -> None:
    """Fall back to eager blocks after a compile failure at call time."""
    for block in model.blocks:
        block._compiled_call_impl = None
    model.perf_status["compile"] = f"off: {reason}"
    log.warning("torch.compile failed (%s); running eager from now on", reason)


# ----------------------------------------------------------------------------------------------------------
# CUDA graphs
# ----------------------------------------------------------------------------------------------------------


class GraphRunner:
    """Replays ``fn(*inputs)`` as a CUDA graph while ``key`` stays the same.

    The first call with a new key runs ``fn`` directly (it doubles as the warm-up); the second call with the
    same key captures a graph; later calls copy the inputs into the graph's static tensors and replay it.
    Everything ``fn`` reads besides ``inputs`` (weights, cached keys/values, RoPE tables) must keep its
    address while the key is unchanged — the caller puts their identities in the key. One graph is kept.
    A capture failure switches graphs off for this runner (recorded in ``error``) and runs ``fn`` directly.
    """

    def __init__(self) -> None:
        self.key: Any = None
        self.pending: Any = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: list[torch.Tensor] = []
        self.static_out: torch.Tensor | None = None
        self.error: str | None = None
        self.kept: Any = None
        self.captures = 0

    def reset(self) -> None:
        self.key = self.pending = self.graph = self.static_out = self.kept = None
        self.static_in = []

    def __call__(
        self, fn: Callable[..., torch.Tensor], key: Any, inputs: tuple[torch.Tensor, ...], keep: Any = None
    ) -> torch.Tensor:
        """``keep``: objects whose ``id`` is part of ``key``; held while the graph lives so ids are not reused."""
        if self.error is not None:
            return fn(*inputs)
        if self.graph is not None and key == self.key:
            for static, value in zip(self.static_in, inputs):
                static.copy_(value)
            self.graph.replay()
            assert self.static_out is not None
            return self.static_out.clone()
        if key != self.pending:
            self.pending = key
            return fn(*inputs)
        self.reset()
        try:
            static_in = [t.clone() for t in inputs]
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                static_out = fn(*static_in)
        except Exception as exc:  # noqa: BLE001 - fall back to direct calls
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            log.warning("CUDA graph capture failed (%s); running without graphs", self.error)
            self.reset()
            torch.cuda.synchronize()
            return fn(*inputs)
        self.graph, self.static_in, self.static_out, self.key, self.kept = graph, static_in, static_out, key, keep
        self.captures += 1
        for static, value in zip(self.static_in, inputs):
            static.copy_(value)
        graph.replay()
        return static_out.clone()


# ----------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------


def apply_perf(model: StreamDiT, options: PerfOptions) -> dict[str, str]:
    """Install ``options`` on ``model`` (undoing the previous ones). Call after moving the model to its device
    and dtype. Returns (and stores in ``model.perf_status``) what is actually active."""
    device = model.patch_embedding.weight.device
    status: dict[str, str] = {"requested": options.describe()}
    _set_fp8(model, options, status)
    _set_norm_fused(model, options, status)
    _set_qk_fused(model, options, status)
    _set_tuned_warps(model, options, status)
    _set_norm_rows(model, options, status)
    if options.window_gather:
        status["window_gather"] = "on"
    _set_compile(model, options.compile, status)
    graphs = options.cuda_graphs
    if graphs and device.type != "cuda":
        status["cuda_graphs"] = "off: needs CUDA"
        graphs = False
    elif graphs:
        status["cuda_graphs"] = "on"
    model.perf = replace(options, cuda_graphs=graphs)
    model._graphs = GraphRunner()  # a new runner: a capture failure under other options is forgotten
    model.clear_caches()
    model.perf_status = status
    return status
