"""Fused LayerNorm kernels of the bf16 path (streamdit_core.fp8_quant.norm_modulate / residual_norm, perf options
norm_fused / cross_residual): the fp8 row kernel without its quantisation.

On the CPU: the reference implementations equal the unfused maths of ``Block`` bit for bit (LayerNorm with and
without affine, with and without modulation, residual add with and without gate, float32 and bfloat16); a tiny
model gives the same output bit for bit with ``normfuse`` and/or ``crossres`` (also with the fp8 items, fp8
emulated, and with the fused q/k norm + RoPE, ``qkrope``), calls the fused operators where expected, and does not
defer residuals under autograd.

The Triton kernel without quantisation is compared with the reference where it can run: with CUDA (widths of the
paper-scale and Wan models, the operators, and a small model compiled with CUDA graphs against eager), or on the CPU
under Triton's interpreter (``TRITON_INTERPRET=1`` with triton installed; small widths only).
"""

import itertools
import os
from dataclasses import replace

import pytest
import torch
from test_fused_quant import CUDA, INTERPRET, RESIDUAL_CASES, _modulation, _residual_args, _rows

import streamdit_core.model as model_module
from streamdit_core.adaln import gate, modulate
from streamdit_core.bench import mode_options
from streamdit_core.fp8_quant import (
    norm_modulate,
    norm_modulate_quant_reference,
    norm_modulate_reference,
    quantize_fp8,
    residual_norm,
    residual_norm_quant_reference,
    residual_norm_reference,
    triton_problem,
)
from streamdit_core.model import LayerNorm, PendingResidual
from streamdit_core.perf import PERF_LEVELS, PerfOptions

from fused_models import assert_compiled_and_graphed_equal, run, tiny_inputs, tiny_model, wan_like_cuda

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 1e-6


def _layer_norm(width, affine, weight=None, bias=None, like=None):
    """``model.LayerNorm`` (affine parameters copied from ``weight``/``bias``) on ``like``'s device and dtype."""
    norm = LayerNorm(width, EPS, elementwise_affine=affine)
    if like is not None:
        norm = norm.to(like.device, like.dtype)
    if affine:
        norm.weight.data.copy_(weight)
        norm.bias.data.copy_(bias)
    return norm


def _unfused(x, y, g, weight, bias, shift, scale):
    """Block's unfused maths (``residual_input`` / ``adaln_input``): the sum (``None`` without ``y``) and the
    normalised, modulated input, both ``[b, L, D]``."""
    total = x if y is None else x + (y if g is None else gate(y.float(), g).type_as(x))
    norm = _layer_norm(x.shape[-1], weight is not None, weight, bias, like=x)
    h = norm(total) if shift is None else modulate(norm(total).float(), shift, scale).type_as(x)
    return (None if y is None else total), h


# -- reference implementations --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_modulate_reference_and_operator_equal_block_maths(dtype):
    b, frames, per, width = 2, 3, 5, 48
    x = (torch.randn(b, frames * per, width, generator=torch.Generator().manual_seed(0)) * 3 + 1).to(dtype)
    x[0, :2] = 0  # zero rows: LayerNorm gives zeros, the modulation leaves the shift
    shift, scale = _modulation(b, frames, width)
    _, expected = _unfused(x, None, None, None, None, shift, scale)
    ref = norm_modulate_reference(x, shift, scale, EPS)
    assert ref.shape == x.shape and ref.dtype == dtype and torch.equal(ref, expected)
    got = norm_modulate(x, shift, scale, EPS)  # the registered operator (the reference on the CPU)
    assert got.shape == x.shape and torch.equal(got, expected)
    # the quantising reference is this one quantised
    r8, rs = norm_modulate_quant_reference(x, shift, scale, EPS)
    q8, qs = quantize_fp8(expected.reshape(-1, width), True)
    assert torch.equal(r8.view(torch.uint8), q8.view(torch.uint8)) and torch.equal(rs, qs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_gate,affine,modulated", RESIDUAL_CASES)
def test_residual_norm_reference_and_operator_equal_block_maths(dtype, has_gate, affine, modulated):
    b, frames, per, width = 2, 3, 4, 40
    args = _residual_args(b, frames, per, width, dtype, has_gate, affine, modulated)
    expected_total, expected = _unfused(*args)
    total, h = residual_norm_reference(*args, EPS)
    assert total.shape == h.shape == (b, frames * per, width) and total.dtype == h.dtype == dtype
    assert torch.equal(total, expected_total) and torch.equal(h, expected)
    got_total, got = residual_norm(args[0], args[1], EPS, *args[2:])  # the registered operator
    assert torch.equal(got_total, expected_total) and torch.equal(got, expected)
    q_total, q8, qs = residual_norm_quant_reference(*args, EPS)
    r8, rs = quantize_fp8(expected.reshape(-1, width), True)
    assert torch.equal(q_total, expected_total.reshape(-1, width)) and torch.equal(qs, rs)
    assert torch.equal(q8.view(torch.uint8), r8.view(torch.uint8))


def test_norm_operators_check_their_arguments():
    x, y, g, w, bias, shift, scale = _residual_args(2, 3, 4, 16, torch.float32, True, True, True)
    with pytest.raises(ValueError, match="norm_modulate needs .* F dividing L"):
        norm_modulate(x, *_modulation(2, 5, 16), EPS)  # 5 frames do not divide 12 tokens
    with pytest.raises(ValueError, match="residual_norm needs .* one dtype"):
        residual_norm(x, y.double(), EPS)
    with pytest.raises(ValueError, match="both or neither"):
        residual_norm(x, y, EPS, shift=shift)
    with pytest.raises(ValueError, match=r"must be \[16\]"):
        residual_norm(x, y, EPS, weight=w[:8], bias=bias[:8])


# -- the model with fused norms (CPU: the reference implementations) ------------------------------------------


def _count_calls(monkeypatch, names):
    """Count calls of the fused operators' wrappers ``names`` as ``model`` calls them."""
    calls = dict.fromkeys(names, 0)

    def counting(name, real):
        def fn(*a, **k):
            calls[name] += 1
            return real(*a, **k)
        return fn

    for name in names:
        monkeypatch.setattr(model_module, name, counting(name, getattr(model_module, name)))
    return calls


SAFE = PerfOptions()
NORM = replace(SAFE, norm_fused=True)
CROSS = replace(SAFE, cross_residual=True)
BOTH = replace(NORM, cross_residual=True)
FP8_NAMES = ("norm_modulate_quantize", "residual_norm_quantize")
NAMES = ("norm_modulate", "residual_norm", *FP8_NAMES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_model_equals_unfused_and_calls_the_operators(dtype, monkeypatch):
    """Bit-identical on the CPU; per block of n: LayerNorm + modulation of the self-attention input (or, from the
    second block on with crossres, the previous FFN residual + it), residual + norm3, residual + norm2 +
    modulation; with the fp8 items the fp8 operators win where their consumers are fp8 linears."""
    model = tiny_model(dtype, num_layers=3)
    args = tiny_inputs(model.config, dtype)
    n = len(model.blocks)
    row = PerfOptions(fp8="row")
    fused = replace(row, fp8_fused=True)
    resid = replace(fused, fp8_residual=True)
    expected = {  # options: (reference options, calls of norm_modulate, residual_norm, and the fp8 ones)
        NORM: (SAFE, (n, 2 * n, 0, 0)),
        CROSS: (SAFE, (0, 0, 0, 0)),
        BOTH: (SAFE, (1, 3 * n - 1, 0, 0)),
        replace(row, norm_fused=True): (row, (n, 2 * n, 0, 0)),  # the fp8 linears quantise their bf16 input
        # residual + norm3 in bf16; the FFN's adaLN input quantised by its fp8 kernel after an unfused add
        replace(fused, norm_fused=True): (fused, (0, n, 2 * n, 0)),
        replace(fused, cross_residual=True): (fused, (0, 0, n + 1, n - 1)),
        replace(fused, norm_fused=True, cross_residual=True): (fused, (0, n, n + 1, n - 1)),
        replace(resid, norm_fused=True): (resid, (0, 0, n, 2 * n)),
        replace(resid, cross_residual=True): (resid, (0, 0, 1, 3 * n - 1)),
    }
    outs = {}
    for options, (reference, counts) in expected.items():
        if reference not in outs:
            outs[reference] = run(model, reference, *args)
        model.set_perf(options)
        calls = _count_calls(monkeypatch, NAMES)
        with torch.inference_mode():
            out = model(*args)
        monkeypatch.undo()
        assert tuple(calls.values()) == counts, options.describe()
        assert torch.equal(out, outs[reference]), options.describe()
        assert all(b.fused_norm is options.norm_fused for b in model.blocks)
        assert ("cross_residual" in model.perf_status) is options.cross_residual
        assert model.perf_status.get("norm_fused", "").startswith(f"{n} blocks" if options.norm_fused else "")
    model.set_perf(SAFE)
    assert not any(b.fused_norm for b in model.blocks) and "norm_fused" not in model.perf_status
    assert torch.equal(run(model, SAFE, *args), outs[SAFE])


def test_fused_norm_without_cross_attention_norm_and_with_uncached_context(monkeypatch):
    """norm3 an nn.Identity (no cross_attn_norm): its residual add stays unfused; without the text key/value
    cache and with a per-frame context the fused path gives the same output."""
    model = tiny_model(cross_attn_norm=False)
    x, sigma, ctx = tiny_inputs(model.config)
    expected = run(model, SAFE, x, sigma, ctx)
    model.set_perf(BOTH)
    calls = _count_calls(monkeypatch, NAMES)
    with torch.inference_mode():
        assert torch.equal(model(x, sigma, ctx), expected)
    monkeypatch.undo()
    assert tuple(calls.values()) == (1, 3, 0, 0)  # norm1 of block 0; norm2 of both blocks, FFN residual + norm1
    per_frame = torch.stack([ctx[:, 0], ctx[:, 0], -ctx[:, 0], ctx[:, 0]], dim=1)  # [1, F=4, Lt, text_dim]
    model = tiny_model()
    for context in (ctx, per_frame):
        outs = [run(model, replace(o, text_kv_cache=False), x, sigma, context) for o in (SAFE, BOTH)]
        assert model.blocks[0].fused_norm and not model.blocks[0].cross_attn.cached
        assert torch.equal(outs[0], outs[1])


def test_cross_residual_is_inference_only(monkeypatch):
    """Under autograd (training) the blocks add their FFN residual themselves: no PendingResidual, same output and
    gradients as without the item."""
    model = tiny_model()
    args = tiny_inputs(model.config)
    resolved = []
    real = PendingResidual.resolve
    monkeypatch.setattr(PendingResidual, "resolve", lambda self: resolved.append(1) or real(self))
    outs, grads = [], []
    for options in (SAFE, CROSS):
        model.set_perf(options)
        model.zero_grad()
        out = model(*args)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(model.blocks[0].ffn[0].weight.grad.clone())
    assert not resolved and torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    with torch.no_grad():
        assert torch.equal(model(*args), outs[0]) and resolved == [1]  # the last block's, in the model


# The bf16 path's items and the fp8 ones (fp8 emulated) with the fused q/k norm + RoPE + window gather (qkrope):
# items → (the same options without the fused items, calls of norm_modulate, residual_norm, the two fp8 operators
# as in the test above, and qk_norm_rope in a model of 3 blocks)
WITH_QKROPE = {
    "fast,normfuse,crossres,qkrope": ("fast", (1, 8, 0, 0, 3)),
    "safe,fp8,fp8fuse,fp8resid,crossres,qkrope": ("safe,fp8", (0, 0, 1, 8, 3)),
    "safe,fp8,fp8fuse,normfuse,crossres,qkrope": ("safe,fp8", (0, 3, 4, 2, 3)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("items", list(WITH_QKROPE))
def test_fused_norm_and_cross_residual_with_qkrope_equal_unfused(items, dtype, monkeypatch):
    """Bit-identical on the CPU with every block's norms, the residual adds across blocks and the q/k norms + RoPE +
    window gather in the fused operators (the fp8 linears' q/k/v biases pending into the latter), for two batch
    elements and shifted and unshifted windows; compile off (the opt-in test below compiles them)."""
    model = tiny_model(dtype, num_layers=3)
    args = tiny_inputs(model.config, dtype, batch=2)
    reference, counts = WITH_QKROPE[items]
    options, reference = (replace(PerfOptions.level(name), compile="off") for name in (items, reference))
    expected = run(model, reference, *args)
    model.set_perf(options)
    calls = _count_calls(monkeypatch, (*NAMES, "qk_norm_rope"))
    with torch.inference_mode():
        out = model(*args)
    monkeypatch.undo()
    assert torch.equal(out, expected)
    assert tuple(calls.values()) == counts
    assert model.perf_status["qk_fused"].startswith("3 blocks")
    assert all(b.self_attn.fused_qk_rope and b.fused_norm is options.norm_fused for b in model.blocks)


def test_options_parse_normfuse_and_crossres():
    # normfuse in `fast` since the H100 run in docs/bench/h100_fused_rope_norm; crossres in `fast` since then and
    # in `fastest` since the one in docs/bench/h100_outquant_fuseadds (with fuseadds: before it cost 1-2 ms there)
    assert [name for name, level in PERF_LEVELS.items() if level.norm_fused] == ["fast"]
    assert [name for name, level in PERF_LEVELS.items() if level.cross_residual] == ["fast", "fastest"]
    fast = PERF_LEVELS["fast"]
    assert fast.norm_fused and fast.cross_residual
    compiled = PerfOptions(compile="default", cuda_graphs=True, qk_fused=True)
    assert PerfOptions.level("fast") == replace(compiled, norm_fused=True, cross_residual=True)
    assert mode_options("fastest+crossres", "default") == PERF_LEVELS["fastest"]
    assert mode_options("safe+normfuse+crossres", "default") == PerfOptions(norm_fused=True, cross_residual=True)
    assert PerfOptions.level("kv,normfuse,crossres").describe() == "text_kv_cache,norm_fused,cross_residual"
    # off CUDA the kernels' reference would only hide the unfused maths from the compiler, and the deferred add
    # alone gains nothing: the CPU keeps the compiled blocks as they were
    assert PerfOptions.level("fast").for_device(torch.device("cpu")) == PerfOptions(compile="default")
    with pytest.raises(ValueError, match="unknown optimisation 'normfuse=1'.*normfuse, crossres"):
        PerfOptions.level("fast,normfuse=1")


@pytest.mark.skipif(os.environ.get("STREAMDIT_TEST_COMPILE") != "1", reason="CPU compile takes ~30 s; opt in")
def test_compiled_fused_norm_blocks_equal_eager():
    """torch.compile traces the operators (custom ops with fake implementations without Triton; the triton_op's
    reference branch with it) and the pending residual between blocks: no graph break but the cached
    cross-attention's, and at most one graph more than without the items (the first block takes a tensor, the
    others a PendingResidual), not one per block."""
    from torch._dynamo.utils import counters

    model = tiny_model(num_layers=4)
    args = tiny_inputs(model.config)
    ref = run(model, SAFE, *args)
    graphs = {}
    for options in (SAFE, NORM, CROSS, BOTH):
        torch._dynamo.reset()
        counters.clear()
        out = run(model, replace(options, compile="default"), *args)
        assert model.perf_status.get("compile") == "default", model.perf_status
        assert torch.allclose(out, ref, atol=1e-4), options.describe()
        assert all("attend_runs" in reason for reason in counters["graph_break"]), list(counters["graph_break"])
        graphs[options] = counters["stats"]["unique_graphs"]
    assert all(count <= graphs[SAFE] + 1 for count in graphs.values()), graphs


@pytest.mark.skipif(os.environ.get("STREAMDIT_TEST_COMPILE") != "1", reason="CPU compile takes ~30 s; opt in")
@pytest.mark.parametrize("items", ["fast,normfuse,crossres,qkrope", "fastest,crossres,qkrope"])
def test_compiled_fused_norm_and_qkrope_blocks_equal_eager(items):
    """The bf16 items (or fastest's fp8 ones, emulated) with crossres and qkrope in compiled blocks: the eager output
    without the items to float rounding, no graph break but the cached cross-attention's."""
    from torch._dynamo.utils import counters

    model = tiny_model(num_layers=3)
    args = tiny_inputs(model.config, batch=2)
    options = PerfOptions.level(items)
    base = PerfOptions.level(items.split(",")[0])
    ref = run(model, replace(base, compile="off"), *args)
    torch._dynamo.reset()
    counters.clear()
    out = run(model, options, *args)
    assert model.perf_status.get("compile") == "default", model.perf_status
    assert model.perf_status["qk_fused"].startswith("3 blocks")
    assert torch.allclose(out, ref, atol=1e-4)
    assert all("attend_runs" in reason for reason in counters["graph_break"]), list(counters["graph_break"])


# -- the Triton kernel without quantisation -------------------------------------------------------------------


def _assert_normed_close(out, own, weight, bias, shift, scale, dtype, min_equal, steps=1):
    """Kernel output ``out`` ``[rows, D]`` against the reference applied to the kernel's own sum (or input)
    ``own`` ``[b, L, D]``: within ``steps`` steps of x's dtype (2⁻⁷ relative in bf16) of ``|value|`` plus as many
    of the unmodulated norm times ``|1 + scale|`` (the norm is rounded before the modulation), and an absolute 1e-5
    for float32 arithmetic (rsqrt, summation order, fused multiply-adds); ``min_equal`` of the values
    identical."""
    zeros = torch.zeros_like(own)
    ref = residual_norm_reference(own, zeros, None, weight, bias, shift, scale, EPS)[1].double()
    normed = residual_norm_reference(own, zeros, None, weight, bias, None, None, EPS)[1].double()
    if scale is not None:
        per = own.shape[1] // scale.shape[1]
        normed = normed * (1 + scale.double()).repeat_interleave(per, dim=1).abs()
    step = steps * (2.0**-7 if dtype == torch.bfloat16 else 2.0**-16)
    got = out.double().view(own.shape)
    assert out.dtype == dtype
    assert ((got - ref).abs() <= step * (ref.abs() + normed.abs()) + 1e-5).all()
    equal = (got == ref).double().mean().item()
    assert equal >= min_equal, equal


def _check_norm_kernel(widths, tokens, device, dtype, cases=RESIDUAL_CASES, min_equal=0.0, steps=1):
    """``norm_quant_triton(quantize=False)`` on ``[2, tokens, width]`` in 4 frames: LayerNorm + modulation alone,
    and each (gate, affine, modulation) case of the residual prologue (the sum as in the fp8 kernel's tests);
    ``min_equal`` and ``steps`` as in :func:`_assert_normed_close`."""
    from streamdit_core.fp8_triton import norm_quant_triton

    b, frames = 2, 4
    step = 2.0**-6 if dtype == torch.bfloat16 else 2.0**-22
    for width in widths:
        x = (_rows(b * tokens, width, dtype, seed=width + 1, device=device) * 5 + 0.3).reshape(b, tokens, width)
        x[0, :2] = 0
        shift, scale = _modulation(b, frames, width, device=device)
        out, s, total = norm_quant_triton(x.reshape(-1, width).contiguous(), EPS, tokens, frames,
                                          shift=shift.contiguous(), scale=scale.contiguous(), quantize=False)
        assert s is None and total is None
        _assert_normed_close(out, x, None, None, shift, scale, dtype, min_equal, steps)
    for width, (has_gate, affine, modulated) in itertools.product(widths, cases):
        x, y, g, weight, bias, shift, scale = _residual_args(b, frames, tokens // frames, width, dtype, has_gate,
                                                             affine, modulated, seed=width, device=device)
        out, s, total = norm_quant_triton(
            x.reshape(-1, width).contiguous(), EPS, tokens, frames, residual=y.reshape(-1, width).contiguous(),
            gate=None if g is None else g.contiguous(), weight=weight, bias=bias,
            shift=None if shift is None else shift.contiguous(), scale=None if scale is None else scale.contiguous(),
            quantize=False)
        assert s is None and total is not None and total.dtype == dtype
        ref_total, _ = residual_norm_reference(x, y, g, weight, bias, shift, scale, EPS)
        gy = y.double() if g is None else gate(y.double(), g.double())
        assert ((total.double() - ref_total.double().reshape(-1, width)).abs()
                <= (x.double().abs() + gy.abs()).reshape(-1, width) * step).all()
        _assert_normed_close(out, total.view(b, tokens, width), weight, bias, shift, scale, dtype, min_equal, steps)


@pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1 on a machine without CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_kernel_without_quantisation_in_interpreter_matches_reference(dtype):
    # the interpreter truncates float32 → bf16 (the GPU rounds to nearest): about half the bf16 values land one
    # step lower, twice in a row with the modulation, hence two steps and no share of identical values
    _check_norm_kernel((96, 200), 8, "cpu", dtype, steps=2 if dtype == torch.bfloat16 else 1)


@pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1 on a machine without CUDA")
def test_operators_launch_helper_in_interpreter_matches_reference():
    """The CUDA branch's launch helper (``fp8_quant._norm_rows``) on the layouts Block passes: the first block's
    transposed input and strided per-frame slices of one modulation tensor."""
    from streamdit_core import fp8_quant

    assert fp8_quant.triton_problem() is None  # defines the operators, loading the launcher _norm_rows calls
    b, frames, per, width = 2, 4, 2, 96
    x, y, g, weight, bias, shift, scale = _residual_args(b, frames, per, width, torch.float32, True, True, True)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # [b, L, D] with strides (L·D, 1, L)
    out, s, total = fp8_quant._norm_rows(xt, None, None, None, None, shift, scale, EPS, False)
    assert s is None and total is None and out.shape == (b * frames * per, width)
    _assert_normed_close(out, x, None, None, shift, scale, torch.float32, 0.0)
    out, s, total = fp8_quant._norm_rows(xt, y, g, weight, bias, shift, scale, EPS, False)
    ref_total, _ = residual_norm_reference(x, y, g, weight, bias, shift, scale, EPS)
    gy = gate(y.double(), g.double())
    assert ((total.double() - ref_total.double().reshape(-1, width)).abs()
            <= (x.double().abs() + gy.abs()).reshape(-1, width) * 2.0**-22).all()
    _assert_normed_close(out, total.view(x.shape), weight, bias, shift, scale, torch.float32, 0.0)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_kernel_without_quantisation_on_cuda_matches_reference(dtype):
    assert triton_problem() is None
    bf16 = dtype == torch.bfloat16
    _check_norm_kernel((3072, 1536, 5120), 256, "cuda", dtype, min_equal=0.98 if bf16 else 0.0)
    # through the registered operators (the CUDA branch of the triton_op: strided per-frame tensors made contiguous)
    x, y, g, weight, bias, shift, scale = _residual_args(2, 4, 64, 3072, dtype, True, True, True, device="cuda")
    got = norm_modulate(x, shift, scale, EPS)
    assert got.shape == x.shape
    _assert_normed_close(got.reshape(-1, 3072), x, None, None, shift, scale, dtype, 0.98 if bf16 else 0.0)
    for has_gate, affine, modulated in ((True, True, False), (False, False, True), (True, False, True)):
        args = _residual_args(2, 4, 64, 3072, dtype, has_gate, affine, modulated, device="cuda")
        total, h = residual_norm(args[0], args[1], EPS, *args[2:])
        ref_total, _ = residual_norm_reference(*args, EPS)
        assert total.shape == h.shape == args[0].shape
        gy = args[1].double() if args[2] is None else gate(args[1].double(), args[2].double())
        step = 2.0**-6 if bf16 else 2.0**-22
        assert ((total.double() - ref_total.double()).abs() <= (args[0].double().abs() + gy.abs()) * step).all()
        _assert_normed_close(h.reshape(-1, 3072), total, *args[3:], dtype, 0.98 if bf16 else 0.0)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("items", ["normfuse", "normfuse+crossres", "fastest+crossres", "normfuse+crossres+qkrope",
                                   "fastest+crossres+qkrope"])
def test_fused_norm_model_compiled_and_graphed_on_cuda_equals_eager(items):
    """fast + the items (or fastest + crossres, with or without qkrope): compiled blocks (no graph break but the
    intended one around the cached cross-attention) and the CUDA graph replay give the eager output of the same items
    to bf16 rounding, and that is close to the unfused output. The model has Wan's cross-attention norm (affine)."""
    model, args = wan_like_cuda()  # 2 blocks: the second takes the first's pending FFN residual with crossres
    base = "fastest" if items.startswith("fastest") else "fast"
    options = mode_options(items if base == "fastest" else f"fast+{items}", "default")
    eager_options = replace(options, compile="off", cuda_graphs=False)
    eager = run(model, eager_options, *args).float()
    if options.norm_fused:
        assert "Triton kernels" in model.perf_status["norm_fused"] and all(b.fused_norm for b in model.blocks)
    if options.qk_fused:
        assert model.perf_status["qk_fused"] == "2 blocks; Triton kernel"
    unfused = run(model, replace(PERF_LEVELS[base], compile="off", cuda_graphs=False), *args).float()
    assert ((eager - unfused).norm() / unfused.norm()).item() < 0.03
    assert_compiled_and_graphed_equal(model, options, args, eager)
