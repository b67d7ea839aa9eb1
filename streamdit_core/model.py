"""The StreamDiT backbone: Wan 2.1's text-to-video DiT with per-frame timesteps and 3-D window attention.

Parameter names follow Wan 2.1 (``patch_embedding``, ``text_embedding``, ``time_embedding``,
``time_projection``, ``blocks.{i}.self_attn.q`` …, ``head.head``), so Wan checkpoints load unchanged.
StreamDiT's changes need no new parameters:

* the timestep is ``[batch, frames]`` (a ``[batch]`` timestep is broadcast); each latent frame's adaLN
  shift/scale/gate is broadcast over that frame's tokens;
* self-attention runs inside 3-D windows of tokens, shifted by half a window on odd blocks;
* RoPE positions are relative to the buffer (frame 0 = the buffer's oldest frame);
* cross-attention context may be per frame (``[batch, frames, text_len, text_dim]``): each frame's tokens
  attend to the prompt scheduled for that frame.

Tensor shapes: latents ``[batch, channels, frames, height, width]``; tokens ``[batch, L, dim]`` with
``L = F·H·W`` on the patch grid in (frame, row, column) order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from .adaln import add_residual, modulate, per_frame
from .attention import (
    attention,
    effective_window,
    resolve_backend,
    window_index,
    window_partition,
    window_partition_indexed,
    window_reverse,
    window_reverse_indexed,
)
from .config import ModelConfig
from .fp8_quant import (
    BiasPending,
    QuantizedActivation,
    norm_modulate,
    norm_modulate_quantize,
    residual_norm,
    residual_norm_quantize,
    window_rows_quantize,
)
from .perf import GraphRunner, PerfOptions, apply_perf, disable_compile
from .qk_rope import apply_rope, qk_norm_rope, rms_norm

# Cross-attention keys/values of one context, per block: runs ``(first_frame, end_frame, k, v)`` of token-grid
# frames that share a prompt, k/v ``[b, Lt, heads, head_dim]``.
CrossKV = tuple[tuple[int, int, torch.Tensor, torch.Tensor], ...]
# Window token orders of one grid and window (``window_index``): ``(index, inverse)`` for unshifted and shifted.
WindowIndex = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

__all__ = ["PendingResidual", "StreamDiT", "sinusoidal_embedding", "rope_frequencies", "apply_rope"]


# ----------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------


def sinusoidal_embedding(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding: ``[cos(p·ω), sin(p·ω)]`` with ``ω_i = 10000^(−i/half)``.

    Args:
        position: ``[n]`` timesteps (σ·1000). Returns ``[n, dim]`` float32 (computed in float64).
    """
    half = dim // 2
    pos = position.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    sinusoid = torch.outer(pos, freqs)
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1).float()


def rope_frequencies(head_dim: int, grid: tuple[int, int, int], theta: float, device: torch.device) -> torch.Tensor:
    """Rotation angles of 3-D RoPE for a token grid, Wan's split of the head: frames get
    ``d − 4·(d//6)`` channels, rows and columns ``2·(d//6)`` each (``d`` = head size).

    Returns ``[F·H·W, head_dim // 2]`` float64 angles; positions start at 0 on every axis.
    """
    d = head_dim
    splits = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    angles = []
    for axis_len, axis_dim in zip(grid, splits):
        inv = 1.0 / torch.pow(theta, torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim)
        angles.append(torch.outer(torch.arange(axis_len, dtype=torch.float64, device=device), inv))
    f, h, w = grid
    a_f = angles[0][:, None, None, :].expand(f, h, w, -1)
    a_h = angles[1][None, :, None, :].expand(f, h, w, -1)
    a_w = angles[2][None, None, :, :].expand(f, h, w, -1)
    return torch.cat([a_f, a_h, a_w], dim=-1).reshape(f * h * w, d // 2)


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (Wan's ``WanLayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def _token_view(
    x: torch.Tensor | QuantizedActivation, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor | QuantizedActivation:
    """``fn`` (a reshape of the leading token dimensions of ``[b, L, …]``) applied to a tensor, or to both the
    data ``[b, L, dim]`` and the per-row scales ``[b, L, 1]`` of a quantised activation."""
    if isinstance(x, QuantizedActivation):
        return x._replace(data=fn(x.data), scale=fn(x.scale))
    return fn(x)


class _Projections(nn.Module):
    """Wan's attention parameters: q, k, v, o projections and RMS norms of queries and keys."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.dim
        self.num_heads = config.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = RMSNorm(d, config.eps) if config.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(d, config.eps) if config.qk_norm else nn.Identity()


def _with_bias(out: torch.Tensor | BiasPending) -> torch.Tensor:
    """A projection's output: a tensor, or one whose bias is pending (``Fp8Linear.defer_bias``), added here in the
    output's dtype like ``Fp8Linear`` would."""
    if not isinstance(out, BiasPending):
        return out
    return out.value if out.bias is None else out.value + out.bias.to(out.value.dtype)


def _split_biases(
    outs: tuple[torch.Tensor | BiasPending, torch.Tensor | BiasPending, torch.Tensor | BiasPending],
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """The q/k/v projections' outputs ``[b, L, dim]`` and, when all three have their biases pending, the biases
    ``[dim]`` (for the fused operator to add); otherwise the outputs with their biases added and ``None``."""
    q, k, v = outs
    if (isinstance(q, BiasPending) and isinstance(k, BiasPending) and isinstance(v, BiasPending)
            and q.bias is not None and k.bias is not None and v.bias is not None):
        return (q.value, k.value, v.value), (q.bias, k.bias, v.bias)
    return (_with_bias(q), _with_bias(k), _with_bias(v)), None


class SelfAttention(_Projections):

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        # set by perf (qk_fused): without autograd, the q/k norms, RoPE and the window gather of q, k, v run as one
        # operator (qk_rope.qk_norm_rope) when the windows are the whole grid or partitioned by a token order
        self.fused_qk_rope = False
        # set by perf (fp8_out_fused): without autograd, the attention output goes back into token order and is
        # quantised per row for the fp8 output projection in one operator (fp8_quant.window_rows_quantize), under the
        # same condition on the windows
        self.fused_out_quant = False
        # set by perf (tuned_warps): that operator's kernel launched with its measured warp count
        self.tuned_warps = False

    def fusable_qk(self) -> bool:
        """Whether the fused operator computes this layer's q/k maths: both norms RMS norms with one epsilon, or
        neither."""
        norms = (self.norm_q, self.norm_k)
        if all(isinstance(n, nn.Identity) for n in norms):
            return True
        return all(isinstance(n, RMSNorm) for n in norms) and self.norm_q.eps == self.norm_k.eps

    def _norm_weights(self) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, float]:
        """The q/k RMS norms' weights ``[dim]`` and epsilon, or ``(None, 0)`` without norms (see :meth:`fusable_qk`)."""
        norm_q, norm_k = self.norm_q, self.norm_k
        if isinstance(norm_q, RMSNorm) and isinstance(norm_k, RMSNorm):
            return (norm_q.weight, norm_k.weight), norm_q.eps
        return None, 0.0

    def forward(
        self,
        x: torch.Tensor | QuantizedActivation,
        rope: tuple[torch.Tensor, torch.Tensor],
        grid: tuple[int, int, int],
        window: tuple[int, int, int],
        shift: bool,
        backend: str,
        order: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | BiasPending:
        """x: ``[b, L, dim]`` (quantised once for q, k and v when they are fp8 with fused quantisation); windows tile
        ``grid``; returns ``[b, L, dim]`` (without the output projection's bias, as ``BiasPending``, when that is an
        fp8 linear that leaves it to the next residual kernel, ``perf.PerfOptions.fp8_adds_fused``). ``order``:
        ``(index, inverse)`` of :func:`~streamdit_core.attention.window_index` for this grid, window and shift:
        partition by one gather instead of roll + reshape (same values). With ``fused_qk_rope`` (inference only) the
        q/k norms, RoPE and that gather are one operator; with ``fused_out_quant`` (inference only) the inverse
        gather of the attention output and its quantisation for the output projection are one more."""
        b = (x.data if isinstance(x, QuantizedActivation) else x).shape[0]
        tokens = window[0] * window[1] * window[2]
        outs = (self.q(x), self.k(x), self.v(x))  # [b, L, dim] each (or with the bias pending)
        indexed = window == grid or order is not None  # no roll path: the fused operators apply
        if self.fused_qk_rope and not torch.is_grad_enabled() and indexed:
            values, biases = _split_biases(outs)
            norms, eps = self._norm_weights()
            index = None if window == grid else cast(tuple[torch.Tensor, torch.Tensor], order)[0]
            # [b·nw, w, h, dh] (or [b, L, h, dh] when the window is the grid)
            qw, kw, vw = qk_norm_rope(*values, rope, norms, eps, biases, index, tokens, self.tuned_warps)
        else:
            q, k, v = (_with_bias(out) for out in outs)
            q = apply_rope(self.norm_q(q).unflatten(-1, (self.num_heads, -1)), *rope)  # [b, L, h, dh]
            k = apply_rope(self.norm_k(k).unflatten(-1, (self.num_heads, -1)), *rope)
            v = v.unflatten(-1, (self.num_heads, -1))
            if window == grid:
                qw, kw, vw = q, k, v
            elif order is not None:
                qw, kw, vw = (window_partition_indexed(t, order[0], tokens) for t in (q, k, v))  # [b·nw, w, h, dh]
            else:
                qw, kw, vw = (window_partition(t, grid, window, shift) for t in (q, k, v))  # [b·nw, w, h, dh]
        out = attention(qw, kw, vw, backend)  # [b·nw, w, h, dh] (or [b, L, h, dh]), in the backend's strides
        if self.fused_out_quant and not torch.is_grad_enabled() and indexed:
            inverse = None if window == grid else cast(tuple[torch.Tensor, torch.Tensor], order)[1]
            return self.o(window_rows_quantize(out, inverse))  # data [b, L, dim] fp8 in token order
        if window != grid:
            out = window_reverse_indexed(out, b, order[1]) if order is not None else window_reverse(
                out, b, grid, window, shift)  # [b, L, h, dh]
        return self.o(out.flatten(2))


class CrossAttention(_Projections):
    # Cached keys/values of this call's context (set by StreamDiT before each call). They are read only inside
    # the compiler-disabled attend_runs, so torch.compile never specialises on the run layout, which changes
    # while a prompt transition moves through the buffer; ``cached`` is the only flag the compiled code sees.
    runs: CrossKV | None = None
    cached: bool = False

    def forward(
        self, x: torch.Tensor | QuantizedActivation, context: torch.Tensor, backend: str
    ) -> torch.Tensor | BiasPending:
        """x: ``[b, L, dim]`` (or quantised for an fp8 q projection, ``fp8_residual``); context: ``[b, Lt, dim]``
        (shared) or ``[b, F, Lt, dim]`` (per frame). Returns ``[b, L, dim]`` (as ``BiasPending`` when the output
        projection leaves its bias to the next residual kernel, ``perf.PerfOptions.fp8_adds_fused``)."""
        b = (x.data if isinstance(x, QuantizedActivation) else x).shape[0]
        if context.dim() == 4:  # each frame's tokens attend to that frame's prompt
            frames = context.shape[1]
            xq = _token_view(x, lambda t: per_frame(t, frames).flatten(0, 1))  # [b·F, hw, dim]
            ctx = context.flatten(0, 1)  # [b·F, Lt, dim]
        else:
            xq, ctx = x, context
        q = self.norm_q(self.q(xq)).unflatten(-1, (self.num_heads, -1))
        k, v = self.project_context(ctx)
        out = self.o(attention(q, k, v, backend).flatten(2))
        if isinstance(out, BiasPending):
            return out._replace(value=out.value.reshape(b, -1, out.value.shape[-1]))
        return out.reshape(b, -1, out.shape[-1])

    def project_context(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx ``[n, Lt, dim]`` → keys and values ``[n, Lt, heads, head_dim]``."""
        k = self.norm_k(self.k(ctx)).unflatten(-1, (self.num_heads, -1))
        return k, self.v(ctx).unflatten(-1, (self.num_heads, -1))

    def forward_cached(
        self, x: torch.Tensor | QuantizedActivation, frames: int, backend: str
    ) -> torch.Tensor | BiasPending:
        """Cross-attention with the precomputed keys/values in ``self.runs``: the tokens of each run of frames
        (contiguous in ``x`` ``[b, L, dim]``, ``frames`` token-grid frames; quantised for an fp8 q projection with
        ``fp8_residual``) attend to that run's keys/values.

        Only the attention over the runs is hidden from ``torch.compile`` (:meth:`attend_runs`); the query and
        output projections (fp8 quantisation included) and the query norm compile with the rest of the block.
        Returns ``[b, L, dim]`` (or ``BiasPending``, as :meth:`forward`)."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))  # [b, L, h, dh]
        return self.o(self.attend_runs(q, frames, backend).flatten(2))

    @torch.compiler.disable  # the run layout varies; never specialise on it
    def attend_runs(self, q: torch.Tensor, frames: int, backend: str) -> torch.Tensor:
        """q ``[b, L, h, dh]`` → attention output ``[b, L, h, dh]`` against each run's cached keys/values."""
        runs = self.runs
        if runs is None:
            raise RuntimeError("forward_cached needs the context's keys/values in CrossAttention.runs")
        per = q.shape[1] // frames
        outs = [attention(q[:, f0 * per : f1 * per], k, v, backend) for f0, f1, k, v in runs]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class PendingResidual(NamedTuple):
    """A residual stream whose last add is not done yet: ``stream + gate(branch, gate)``
    (:func:`~streamdit_core.adaln.add_residual`). A block returns its FFN residual this way when the next block adds
    it inside the kernel of its first norm (``perf.PerfOptions.cross_residual``)."""

    stream: torch.Tensor
    """``[b, L, dim]`` the stream before the add."""
    branch: torch.Tensor | BiasPending
    """``[b, L, dim]`` in the stream's dtype: the FFN output (without its bias, which the next block's norm1 kernel
    adds, when the FFN's second linear is an fp8 linear that leaves it there: ``perf.PerfOptions.fp8_adds_fused``)."""
    gate: torch.Tensor
    """``[b, F, dim]`` float32 per-frame gate."""

    def resolve(self) -> torch.Tensor:
        """The stream after the add, ``[b, L, dim]``."""
        return add_residual(self.stream, _with_bias(self.branch), self.gate)


class Block(nn.Module):
    """One Wan attention block: adaLN → window self-attention → gate; cross-attention; adaLN → FFN → gate."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.dim
        self.norm1 = LayerNorm(d, config.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(config)
        self.norm3 = LayerNorm(d, config.eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(config)
        self.norm2 = LayerNorm(d, config.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(d, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, d)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)
        # set by perf (fp8_fused): the self-attention's q/k/v and the FFN's first linear are per-row fp8 linears
        # that take their adaLN input quantised by one fused kernel
        self.fused_fp8_input = False
        # set by perf (fp8_residual): the cross-attention's q and the FFN's first linear are per-row fp8 linears
        # that take their input quantised by the kernel that also adds the residual before their norm
        self.fused_fp8_residual = False
        # set by perf (norm_fused): the LayerNorms (+ modulation, + the residual add before them) of the bf16 path in
        # single-pass row kernels (``fp8_quant.norm_modulate`` / ``residual_norm``); the fp8 flags above win
        self.fused_norm = False
        # set by perf (tuned_warps): those row kernels launched with their measured warp counts
        self.tuned_warps = False
        # set by perf (norm_rows): the LayerNorm kernels with per-frame rows process several rows of a frame per
        # program (``triton_util.norm_rows``)
        self.norm_rows = False

    def adaln_input(
        self, norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor | QuantizedActivation:
        """``modulate(norm(x), shift, scale)`` in x's dtype: the input of the self-attention or the FFN. With
        ``fused_fp8_input`` the same values quantised to fp8 per row in one kernel (norm, modulation and
        quantisation fused), which the consuming fp8 linears take as they are; else with ``fused_norm`` the same
        values from one kernel in x's dtype.

        Args:
            norm: ``norm1`` or ``norm2`` (LayerNorm without affine parameters).
            x: ``[b, L, dim]``; shift, scale: ``[b, F, dim]`` float32 per-frame modulation.
        """
        if self.fused_fp8_input:
            return norm_modulate_quantize(x, shift, scale, cast(LayerNorm, norm).eps, self.tuned_warps,
                                          self.norm_rows)  # fp8 data
        if self.fused_norm:
            return norm_modulate(x, shift, scale, cast(LayerNorm, norm).eps, self.tuned_warps,
                                 self.norm_rows)  # [b, L, dim]
        return modulate(norm(x).float(), shift, scale).type_as(x)  # [b, L, dim]

    def residual_input(
        self,
        norm: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor | BiasPending,
        g: torch.Tensor | None,
        shift: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        quantize: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | QuantizedActivation]:
        """The residual stream ``x + gate(y, g)`` (``x + y`` without ``g``) and the next layer's input from it:
        ``norm(·)`` or, with ``shift``/``scale``, its adaLN input (:meth:`adaln_input`). With ``quantize`` (by
        default ``fused_fp8_residual``) the sum and the input quantised to fp8 per row come from one kernel; else
        with ``fused_norm`` (and a LayerNorm ``norm``) the sum and the input in x's dtype, unless the input is an
        adaLN input that ``fused_fp8_input`` quantises in its own kernel (the fp8 fusion wins).

        Args:
            norm: ``norm3`` (LayerNorm with affine parameters, or ``nn.Identity``), ``norm2`` or ``norm1``.
            x, y: ``[b, L, dim]`` the stream and the branch output (an attention or FFN output) in x's dtype; y may
                be a linear's output whose bias is pending (``BiasPending``, ``perf.PerfOptions.fp8_adds_fused``):
                added in the fused kernel with ``quantize``, else here first.
            g, shift, scale: ``[b, F, dim]`` float32 per-frame gate and modulation, or ``None``.
            quantize: whether the consumers are per-row fp8 linears that take their input from the fused kernel
                (``fused_fp8_input`` for ``norm1``'s, see :meth:`forward`).
        Returns:
            the new stream ``[b, L, dim]`` and the input ``[b, L, dim]`` (or its quantised form).
        """
        if self.fused_fp8_residual if quantize is None else quantize:
            ln = cast(LayerNorm, norm)
            value, y_bias = (y.value, y.bias) if isinstance(y, BiasPending) else (y, None)
            return residual_norm_quantize(x, value, ln.eps, g, ln.weight, ln.bias, shift, scale, y_bias,
                                          self.tuned_warps, self.norm_rows)
        y = _with_bias(y)
        adaln = shift is not None and scale is not None
        # norm3 may be an nn.Identity (no cross_attn_norm)
        if self.fused_norm and isinstance(norm, LayerNorm) and not (adaln and self.fused_fp8_input):
            return residual_norm(x, y, norm.eps, g, norm.weight, norm.bias, shift, scale, self.tuned_warps,
                                 self.norm_rows)
        x = add_residual(x, y, g)  # [b, L, dim]
        return x, norm(x) if shift is None or scale is None else self.adaln_input(norm, x, shift, scale)

    def forward(
        self,
        x: torch.Tensor | PendingResidual,
        e: torch.Tensor,
        context: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        grid: tuple[int, int, int],
        window: tuple[int, int, int],
        shift: bool,
        backend: str,
        order: tuple[torch.Tensor, torch.Tensor] | None = None,
        defer_residual: bool = False,
    ) -> torch.Tensor | PendingResidual:
        """x ``[b, L, dim]`` (or the previous block's stream with its FFN residual still to add, which this block
        adds in the kernel of ``norm1``); e ``[b, F, 6, dim]`` float32 per-frame modulation; context as in
        CrossAttention (ignored when ``cross_attn.cached``: the context's keys/values were precomputed); ``order``
        as in :meth:`SelfAttention.forward`. Returns the stream ``[b, L, dim]``, or with ``defer_residual`` the
        stream before the FFN's gated residual add (``perf.PerfOptions.cross_residual``; with ``fp8_adds_fused`` also
        before the FFN output's bias)."""
        mod = (self.modulation.float()[:, None] + e).unbind(dim=2)  # 6 × [b, F, dim]
        if isinstance(x, PendingResidual):  # the add and norm1 + modulation in one kernel
            x, h = self.residual_input(self.norm1, *x, mod[0], mod[1], quantize=self.fused_fp8_input)
        else:
            h = self.adaln_input(self.norm1, x, mod[0], mod[1])
        y = self.self_attn(h, rope, grid, window, shift, backend, order)
        x, h = self.residual_input(self.norm3, x, y, mod[2])  # x + gate(y), norm3 of it: [b, L, dim]
        if self.cross_attn.cached:
            y = self.cross_attn.forward_cached(h, e.shape[1], backend)
        else:
            y = self.cross_attn(h, context, backend)
        x, h = self.residual_input(self.norm2, x, y, None, mod[3], mod[4])  # x + y, its adaLN input
        y = self.ffn(h)
        if defer_residual:
            return PendingResidual(x, y, mod[5])
        return add_residual(x, _with_bias(y), mod[5])


class Head(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.dim
        out = config.out_dim * math.prod(config.patch_size)
        self.norm = LayerNorm(d, config.eps, elementwise_affine=False)
        self.head = nn.Linear(d, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, d) / d**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x ``[b, L, dim]``; e ``[b, F, dim]`` float32 time embedding → ``[b, L, out_dim·prod(patch)]``."""
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(dim=2)
        return self.head(modulate(self.norm(x).float(), shift, scale).type_as(x))


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


class StreamDiT(nn.Module):
    """Wan 2.1 T2V DiT with StreamDiT's per-frame time embedding and 3-D window self-attention."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.head = Head(config)
        self.attention_backend = "auto"
        self.perf = PerfOptions()
        self.perf_status: dict[str, str] = {}
        self._graphs = GraphRunner()
        self.clear_caches()
        self.initialize_weights()

    # -- inference speed-ups (streamdit_core.perf) ---------------------------------------------------------

    def set_perf(self, options: PerfOptions) -> dict[str, str]:
        """Switch inference speed-ups (after the model is on its device and dtype); returns what is active."""
        return apply_perf(self, options)

    def clear_caches(self) -> None:
        """Forget cached RoPE tables, time embeddings, text keys/values and the CUDA graph."""
        self._rope_cache: dict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._time_cache: list[tuple[tuple[object, ...], torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []
        self._kv_cache: list[tuple[tuple[object, ...], torch.Tensor, list[CrossKV]]] = []
        self._window_cache: dict[tuple[object, ...], WindowIndex] = {}
        if hasattr(self, "_graphs"):
            self._graphs.reset()

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.clear_caches()  # .to()/.cuda()/.half() move or copy the weights the caches were built from
        return super()._apply(fn, *args, **kwargs)

    def _layout_cached(self, cache: dict[tuple[object, ...], Any], key: tuple[object, ...],
                       make: Callable[[], Any]) -> Any:
        """``make()`` cached in ``cache`` under ``key`` while ``layout_cache`` is on (at most 4 layouts kept)."""
        if not self._caching(self.perf.layout_cache):
            return make()
        found = cache.get(key)
        if found is None:
            if len(cache) >= 4:
                cache.clear()
            found = cache[key] = make()
        return found

    def _window_orders(self, grid: tuple[int, int, int], window: tuple[int, int, int],
                       device: torch.device) -> WindowIndex:
        """``window_index`` of the grid and window, unshifted and shifted (cached like RoPE)."""
        return cast(WindowIndex, self._layout_cached(
            self._window_cache, (grid, window, str(device)),
            lambda: (window_index(grid, window, False, device), window_index(grid, window, True, device)),
        ))

    def _rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the RoPE angles ``2 × [L, dh/2]`` float32 for ``grid`` (cached per layout)."""

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            angles = rope_frequencies(self.config.head_dim, grid, self.config.rope_theta, device)
            return (torch.cos(angles).float(), torch.sin(angles).float())

        return cast(tuple[torch.Tensor, torch.Tensor], self._layout_cached(self._rope_cache, (grid, str(device)), make))

    @staticmethod
    def _caching(option: bool) -> bool:
        """Caches serve inference only (under autograd the cached tensors would share one graph)."""
        return option and not torch.is_grad_enabled()

    @staticmethod
    def _tensor_key(t: torch.Tensor, params: Sequence[torch.Tensor]) -> tuple[object, ...]:
        """Identity of an input tensor (and of the weights a cached value came from). Inference tensors (ComfyUI
        loads and runs everything in inference mode) have no version counter: for them only the address counts;
        this package never modifies them in place."""

        def version(x: torch.Tensor) -> int:
            return -1 if x.is_inference() else x._version

        weights = tuple((p.data_ptr(), version(p)) for p in params)
        return (id(t), t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, str(t.device), version(t), weights)

    def _time_cached(self, sigma: torch.Tensor, batch: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._caching(self.perf.layout_cache):
            return self._time(sigma, batch, frames)
        params = [p for m in (self.time_embedding, self.time_projection) for p in m.parameters()]
        key = (*self._tensor_key(sigma, params), batch, frames)
        for k, ref, value in self._time_cache:
            if k == key and ref is sigma:
                return value
        value = self._time(sigma, batch, frames)
        self._time_cache = [*self._time_cache[-3:], (key, sigma, value)]
        return value

    def _cross_kv(self, context: torch.Tensor, dtype: torch.dtype, grid_frames: int) -> list[CrossKV]:
        """Keys/values of every block for ``context`` (``[b, Lt, D]`` or per frame ``[b, F, Lt, D]``, before the
        temporal-patch subsampling), cached by the context tensor's identity. Consecutive frames with equal
        context rows form one run: their keys/values are computed once and their tokens attend in one call."""
        params: list[torch.Tensor] = list(self.text_embedding.parameters())
        blocks = [cast(Block, b) for b in self.blocks]
        for block in blocks:
            params += [block.cross_attn.k.weight, block.cross_attn.v.weight]
            if isinstance(block.cross_attn.norm_k, RMSNorm):
                params.append(block.cross_attn.norm_k.weight)
        key = (*self._tensor_key(context, params), dtype, grid_frames)
        for cached_key, ref, found in self._kv_cache:
            if cached_key == key and ref is context:
                return found
        if context.dim() == 4:
            ctx = context[:, :: self.config.patch_size[0]]
            starts = [0] + [i for i in range(1, ctx.shape[1]) if not torch.equal(ctx[:, i], ctx[:, i - 1])]
            bounds = list(zip(starts, starts[1:] + [ctx.shape[1]]))
            rows = ctx[:, starts]  # [b, runs, Lt, D]
        else:
            bounds, rows = [(0, grid_frames)], context[:, None]
        emb = self.text_embedding(rows.to(dtype))  # [b, runs, Lt, dim]
        value: list[CrossKV] = []
        for block in blocks:
            k, v = block.cross_attn.project_context(emb.flatten(0, 1))  # [b·runs, Lt, h, dh]
            k, v = k.unflatten(0, (emb.shape[0], -1)), v.unflatten(0, (emb.shape[0], -1))
            value.append(tuple((f0, f1, k[:, i], v[:, i]) for i, (f0, f1) in enumerate(bounds)))
        self._kv_cache = [*self._kv_cache[-3:], (key, context, value)]  # guidance and model_frames use several
        return value

    def initialize_weights(self) -> None:
        """Wan's initialisation: Xavier-uniform linears and patch embedding, N(0, 0.02) for the text and time
        embeddings, and a zero output head so an untrained model predicts zero velocity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        if self.patch_embedding.bias is not None:
            nn.init.zeros_(self.patch_embedding.bias)
        for module in list(self.text_embedding) + list(self.time_embedding):
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        nn.init.zeros_(self.head.head.bias)

    def patch_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Token grid for a latent of ``frames × height × width``; raises if a size is not a multiple of the patch."""
        pf, ph, pw = self.config.patch_size
        for name, size, p in (("frames", frames, pf), ("height", height, ph), ("width", width, pw)):
            if size % p != 0:
                raise ValueError(
                    f"latent {name}={size} is not divisible by the model's patch size {p} "
                    f"(patch_size={self.config.patch_size}); choose a {name} that is a multiple of {p}"
                )
        return (frames // pf, height // ph, width // pw)

    def _time(self, sigma: torch.Tensor, batch: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """σ ``[b]`` or ``[b, F]`` → time embedding ``[b, Fg, dim]`` and modulation ``[b, Fg, 6, dim]`` (float32),
        one per token-grid frame (the first latent frame of each temporal patch sets its level)."""
        if sigma.dim() == 1:
            sigma = sigma[:, None].expand(batch, frames)
        if sigma.shape != (batch, frames):
            raise ValueError(f"sigma must be [batch] or [batch, frames]=[{batch}, {frames}], got {list(sigma.shape)}")
        sigma = sigma[:, :: self.config.patch_size[0]]
        t = sigma.float().reshape(-1) * 1000.0
        with torch.autocast(device_type=t.device.type, enabled=False):
            e = self.time_embedding(
                sinusoidal_embedding(self.config.freq_dim, t).to(next(self.time_embedding.parameters()).dtype)
            ).float()
            e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float()
        return e.unflatten(0, (batch, -1)), e0.unflatten(0, (batch, -1)).unflatten(-1, (6, -1))

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        context: torch.Tensor,
        window: tuple[int, int, int] | None = None,
        attention_backend: str | None = None,
    ) -> torch.Tensor:
        """Predict the velocity ``v = ε − x₀``.

        Args:
            x: latents ``[b, C, F, H, W]``.
            sigma: noise levels ``[b]`` (uniform) or ``[b, F]`` (per frame), in [0, 1].
            context: text embeddings ``[b, Lt, text_dim]`` for all frames, or ``[b, F, Lt, text_dim]`` per frame.
            window: self-attention window in tokens; ``None`` uses ``config.window`` (``None`` there = full).
            attention_backend: overrides ``self.attention_backend``.
        Returns:
            ``[b, C_out, F, H, W]`` in x's dtype.
        """
        b, _, frames, height, width = x.shape
        grid = self.patch_grid(frames, height, width)
        win = effective_window(grid, window if window is not None else self.config.window)
        backend = resolve_backend(attention_backend or self.attention_backend, x.device, x.dtype)

        e, e0 = self._time_cached(sigma, b, frames)  # [b, Fg, dim], [b, Fg, 6, dim]
        if context.dim() == 4 and context.shape[1] != frames:
            raise ValueError(f"per-frame context has {context.shape[1]} frames, latents have {frames}")
        rope = self._rope(grid, x.device)
        # roll-free windows: inference only, like the caches (training keeps the roll path)
        gather = self.perf.window_gather and win != grid and not torch.is_grad_enabled()
        orders = self._window_orders(grid, win, x.device) if gather else None
        cross: list[CrossKV] | None = None
        ctx = context
        if self._caching(self.perf.text_kv_cache):
            cross = self._cross_kv(context, x.dtype, grid[0])
        else:
            if context.dim() == 4:
                context = context[:, :: self.config.patch_size[0]]
            ctx = self.text_embedding(context.to(x.dtype))  # [b, (Fg,) Lt, dim]

        # each block's FFN residual added in the next block's first norm kernel: inference only, like the caches
        # (training checkpoints and shards blocks one by one)
        defer = self.perf.cross_residual and not torch.is_grad_enabled()

        def core(x: torch.Tensor, e: torch.Tensor, e0: torch.Tensor) -> torch.Tensor:
            tokens: torch.Tensor | PendingResidual = self.patch_embedding(x).flatten(2).transpose(1, 2)  # [b, L, dim]
            try:
                for i, block in enumerate(self.blocks):
                    attn = cast(Block, block).cross_attn
                    attn.runs, attn.cached = (None, False) if cross is None else (cross[i], True)
                    shift = i % 2 == 1
                    order = None if orders is None else orders[shift]
                    tokens = block(tokens, e0, ctx, rope, grid, win, shift=shift, backend=backend, order=order,
                                   defer_residual=defer)
            finally:
                for block in self.blocks:
                    cast(Block, block).cross_attn.runs = None  # hold no references between calls
                    cast(Block, block).cross_attn.cached = False
            if isinstance(tokens, PendingResidual):  # the last block's FFN residual
                tokens = tokens.resolve()
            out = self.head(tokens, e)  # [b, L, C_out·pf·ph·pw]
            return self.unpatchify(out, grid)

        def run() -> torch.Tensor:
            if self.perf.cuda_graphs and x.is_cuda and self._caching(True) and cross is not None:
                key = (tuple(x.shape), x.dtype, tuple(e0.shape), id(cross), id(rope), id(orders), grid, win, backend)
                return self._graphs(core, key, (x, e, e0), keep=(cross, rope, orders))
            return core(x, e, e0)

        if self.perf.compile == "off" or self.perf_status.get("compile", "").startswith("off"):
            return run()
        try:
            return run()
        except Exception as exc:  # a compiler failure (no Triton, no C compiler, …) must not stop the stream
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            disable_compile(self, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            self._graphs.reset()
            return run()

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[b, L, C·pf·ph·pw]`` → ``[b, C, F·pf, H·ph, W·pw]``."""
        f, h, w = grid
        pf, ph, pw = self.config.patch_size
        x = x.reshape(x.shape[0], f, h, w, pf, ph, pw, self.config.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.shape[0], self.config.out_dim, f * pf, h * ph, w * pw)
