"""The self-attention's query/key maths (RMS norm over the width, 3-D RoPE on channel pairs) and one fused operator
that applies them together with the window partition gather (``perf.PerfOptions.qk_fused``, item ``qkrope``).

:func:`rms_norm` and :func:`apply_rope` are the maths of ``model.RMSNorm`` and of the model's RoPE (the model uses
them). The operator ``torch.ops.streamdit.qk_norm_rope`` computes, for the q and k projections' outputs ``[b, L, D]``
(and optionally v's), in one pass per row::

    q' = window_partition_indexed(apply_rope(rms_norm(q + q_bias, w_q).unflatten(-1, (h, dh)), cos, sin), index)
    k' = the same with k's bias and weight;   v' = window_partition_indexed(v + v_bias, index)

with the biases (the fp8 linears' pending biases, ``Fp8Linear.defer_bias``), the norms (``qk_norm=False``) and the
gather (window = the whole grid) each optional. It writes the rows straight into the attention layout
``[b·n_windows, window_tokens, h, dh]`` (``[b, L, h, dh]`` without a gather). On CUDA with Triton it runs one
Triton program per output row and tensor with the whole row in registers (``rope_triton.py``): each projection is
read once and written once, where the unfused path reads and writes it for the bias, the norm, RoPE and the gather.
Elsewhere (CPU, no Triton) the reference implementation runs, which is the unfused path's exact maths (so the model
with the operator is bit-identical to the one without there). It is registered with ``torch.library.triton_op`` so
``torch.compile`` sees the kernel without a graph break and CUDA graph capture works; without Triton it is an
opaque ``custom_op`` with a fake implementation. Triton is imported lazily, on the first :func:`ensure_ops` call.

Tolerance of the Triton kernel against the reference (``tests/test_fused_rope.py``): the values before each
rounding agree to float32 rounding (the sum of squares in another order, ``rsqrt``, fused multiply-adds), so a
rounded value can land on the neighbouring number of the output dtype: a normalised value one bf16 step off moves
the rotated values by up to two steps of their inputs. Asserted for bf16: each q/k value within ``2⁻⁷·(2·(|x_c·cos|
+ |x_partner·sin|) + |value|)`` of the reference (two steps of the rotation's inputs, one of the result; ``x`` the
normalised row), and on CUDA ≥ 99 % of them identical; float32 the same with 2⁻²⁰; v (a copy plus the bias)
identical on CUDA. Under Triton's interpreter, which rounds float32 → bf16 by truncation, the kernel equals the
same maths with truncation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .attention import window_partition_indexed
from .log import get_logger
from .triton_util import import_launchers, not_loaded

__all__ = [
    "apply_rope",
    "ensure_ops",
    "qk_norm_rope",
    "qk_norm_rope_reference",
    "rms_norm",
    "triton_problem",
]

log = get_logger("qk_rope")


# ----------------------------------------------------------------------------------------------------------
# reference maths
# ----------------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Wan's RMS norm over the last dimension: ``(x·rsqrt(mean(x²) + eps))`` in float32, rounded to x's dtype, then
    ``· weight`` (``[D]``) in the product's dtype (x's when the weight has it). x ``[..., D]`` → ``[..., D]``."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x) * weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs ``(x[2i], x[2i+1])`` (Wan's complex layout) in float32, rounded to x's dtype.

    Args:
        x: ``[batch, L, heads, head_dim]``; cos, sin: ``[L, head_dim // 2]`` float32.
    """
    xf = x.float().unflatten(-1, (-1, 2))  # [b, L, h, d/2, 2]
    re, im = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([re * c - im * s, re * s + im * c], dim=-1).flatten(-2)
    return out.type_as(x)


def qk_norm_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    v_bias: torch.Tensor | None,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    index: torch.Tensor | None,
    eps: float,
    tuned: bool = False,
) -> list[torch.Tensor]:
    """The unfused maths of ``SelfAttention.forward`` up to the attention: ``out + bias`` in the projection's dtype,
    :func:`rms_norm`, :func:`apply_rope` per head and ``window_partition_indexed``.

    Args:
        q, k: ``[b, L, D]`` the projections' outputs (without their biases when biases are given); v: the same or
            ``None``.
        q_bias, k_bias, v_bias: ``[D]`` or ``None`` (added in q's dtype).
        q_weight, k_weight: ``[D]`` RMS norm weights, or ``None`` (no norm; both or neither).
        cos, sin: ``[L, head_dim // 2]`` float32; ``D`` is a multiple of ``head_dim``.
        index: ``[L]`` int64 token order (``attention.window_index``) or ``None`` (no gather).
        eps: the RMS norms' epsilon.
        tuned: the kernel's launch option (``triton_util.TUNED_WARPS``); unused here.
    Returns:
        ``[q', k']`` (``+ [v']`` with v), each ``[b·L, D]``: the rows in the gathered order.
    """
    head_dim = 2 * cos.shape[-1]

    def prepare(x: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor | None, rope: bool) -> torch.Tensor:
        if bias is not None:
            x = x + bias.to(x.dtype)
        if weight is not None:
            x = rms_norm(x, weight, eps)
        if rope:
            x = apply_rope(x.unflatten(-1, (-1, head_dim)), cos, sin).flatten(2)
        if index is not None:
            x = window_partition_indexed(x, index, x.shape[1])  # [b, L, D] in the gathered order
        return x.reshape(-1, x.shape[-1])

    outs = [prepare(q, q_bias, q_weight, True), prepare(k, k_bias, k_weight, True)]
    return outs if v is None else [*outs, prepare(v, v_bias, None, False)]


# ----------------------------------------------------------------------------------------------------------
# operator
# ----------------------------------------------------------------------------------------------------------


_state: dict[str, Any] = {"defined": False, "triton": None}

# The Triton launcher (``rope_triton.qkv_rows_triton`` once loaded). A module-level name on purpose: ``triton_op``
# finds the kernels an operator launches by following the names its body calls.
_launch: Callable[..., list[torch.Tensor]] = not_loaded


def _kernel_device(t: torch.Tensor) -> bool:
    """Whether the Triton kernel runs for tensors on ``t``'s device (CUDA; the interpreter tests add the CPU)."""
    return t.device.type == "cuda"


def triton_problem() -> str | None:
    """Why the operator runs its reference implementation on CUDA (no Triton, no ``triton_op``), or ``None`` when the
    Triton kernel is used. Defines the operator first."""
    ensure_ops()
    return _state["triton"]


def ensure_ops() -> None:
    """Define ``streamdit::qk_norm_rope`` once (importing Triton if it is there). Call outside ``torch.compile``
    (``perf`` does when it switches the operator on); later calls only read a flag."""
    if _state["defined"]:
        return
    launch, _state["triton"] = import_launchers("rope_triton", ("qkv_rows_triton",))
    if launch is None:
        log.info("fused q/k norm + RoPE without Triton (%s): the reference implementation runs", _state["triton"])
    _define(None if launch is None else launch[0])
    _state["defined"] = True


def _define(launch: Callable[..., list[torch.Tensor]] | None) -> None:
    """Register the operator: Triton-backed (``triton_op``, reference off CUDA) with the launcher
    ``qkv_rows_triton``, else an opaque ``custom_op`` running the reference, with a fake (shape-only)
    implementation."""
    if launch is not None:
        global _launch
        _launch = launch  # a module-level name: triton_op finds the kernel through it

        def qk_norm_rope_op(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, q_bias: torch.Tensor | None,
            k_bias: torch.Tensor | None, v_bias: torch.Tensor | None, q_weight: torch.Tensor | None,
            k_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, index: torch.Tensor | None,
            eps: float, tuned: bool = False,
        ) -> list[torch.Tensor]:
            if not _kernel_device(q):
                return qk_norm_rope_reference(q, k, v, q_bias, k_bias, v_bias, q_weight, k_weight, cos, sin, index,
                                              eps)
            biases = tuple(None if b is None else b.to(q.dtype).contiguous() for b in (q_bias, k_bias, v_bias))
            weights = None if q_weight is None or k_weight is None else (q_weight.contiguous(), k_weight.contiguous())
            return _launch(q.contiguous(), k.contiguous(), None if v is None else v.contiguous(),
                           cos.float().contiguous(), sin.float().contiguous(), eps, biases, weights,
                           None if index is None else index.contiguous(), tuned)

        torch.library.triton_op("streamdit::qk_norm_rope", qk_norm_rope_op, mutates_args=())
        return

    def fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, q_bias: torch.Tensor | None,
             k_bias: torch.Tensor | None, v_bias: torch.Tensor | None, q_weight: torch.Tensor | None,
             *args: Any) -> list[torch.Tensor]:
        rows, dim = q.shape[0] * q.shape[1], q.shape[-1]
        dtype = q.dtype if q_weight is None else torch.promote_types(q.dtype, q_weight.dtype)
        outs = [q.new_empty((rows, dim), dtype=dtype) for _ in range(2)]
        return outs if v is None else [*outs, v.new_empty((rows, dim))]

    op = torch.library.custom_op("streamdit::qk_norm_rope", qk_norm_rope_reference, mutates_args=())
    op.register_fake(fake)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    norms: tuple[torch.Tensor, torch.Tensor] | None,
    eps: float,
    biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    index: torch.Tensor | None = None,
    window_tokens: int | None = None,
    tuned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The self-attention's q, k and v in the attention layout, q/k normalised and rotated, in one pass.

    v goes through the operator only when it is gathered or has a pending bias; otherwise it is returned as a view.

    Args:
        q, k, v: ``[b, L, D]`` the projections' outputs in one dtype (without their biases when ``biases`` is given).
        rope: ``(cos, sin)`` ``[L, head_dim // 2]`` float32.
        norms: the RMS norm weights ``[D]`` of q and k (one dtype), or ``None`` (the model has no q/k norm).
        eps: the RMS norms' epsilon.
        biases: ``[D]`` the biases of q, k and v, added in their dtype first, or ``None``.
        index: ``[L]`` int64 window token order (``attention.window_index``), or ``None``: no gather.
        window_tokens: tokens per window, with ``index``.
        tuned: the kernel's measured warp count (``triton_util.TUNED_WARPS``; same values).
    Returns:
        q, k, v ``[b·n_windows, window_tokens, h, dh]`` with ``index`` (contiguous), else ``[b, L, h, dh]``; q and k
        in the dtype of ``norm·weight``.
    """
    cos, sin = rope
    b, length, dim = q.shape
    head_dim = 2 * cos.shape[-1]
    if (k.shape != q.shape or v.shape != q.shape or len({q.dtype, k.dtype, v.dtype}) > 1
            or cos.shape != sin.shape or cos.shape[0] != length or dim % head_dim):
        raise ValueError(f"qk_norm_rope needs q, k, v [b, L, D] of one dtype and cos/sin [L, head_dim/2] with "
                         f"head_dim dividing D, got {list(q.shape)} {q.dtype}, {list(k.shape)} {k.dtype}, "
                         f"{list(v.shape)} {v.dtype}, {list(cos.shape)}, {list(sin.shape)}")
    if norms is not None and (norms[0].dtype != norms[1].dtype or any(w.shape != (dim,) for w in norms)):
        raise ValueError(f"the RMS norm weights of q and k must be [{dim}] of one dtype")
    if biases is not None and any(t.shape != (dim,) for t in biases):
        raise ValueError(f"the biases of q, k and v must be [{dim}]")
    if index is not None and (index.shape != (length,) or window_tokens is None or length % window_tokens):
        raise ValueError(f"a window gather needs index [{length}] and window_tokens dividing {length}")
    ensure_ops()
    with_v = index is not None or biases is not None
    q_bias, k_bias, v_bias = biases if biases is not None else (None, None, None)
    q_weight, k_weight = norms if norms is not None else (None, None)
    outs = torch.ops.streamdit.qk_norm_rope(q, k, v if with_v else None, q_bias, k_bias, v_bias, q_weight, k_weight,
                                            cos, sin, index, eps, tuned)
    heads = dim // head_dim
    shape = (b, length, heads, head_dim) if window_tokens is None or index is None else (
        -1, window_tokens, heads, head_dim)
    vw = outs[2] if with_v else v
    return outs[0].view(shape), outs[1].view(shape), vw.reshape(shape)
