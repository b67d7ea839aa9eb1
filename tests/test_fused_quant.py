"""Fused per-row fp8 quantisation (streamdit_core.fp8_quant, perf options fp8_fused / fp8_rows / fp8_residual).

On the CPU: the reference implementations equal the unfused path's quantisation of the model's own LayerNorm +
modulate, GELU and residual add + LayerNorm (affine or not) + modulation (or not), and are within e4m3 rounding of a
float64 computation; a model with fp8 emulated gives the
same output with and without fusion, quantises q/k/v's input once, and switching back restores the modules.

The Triton kernel is compared with the reference implementations on random rows (zero rows included) where it can
run: with CUDA (``python -m pytest tests/test_fused_quant.py -q`` on a GPU machine with triton, which also compiles
a small model with fusion under torch.compile and CUDA graphs), or on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1`` with triton installed; small widths only, the interpreter is slow).
"""

import importlib.util
import itertools
import os
from dataclasses import replace

import pytest
import torch
from torch import nn

from streamdit_core.adaln import gate, modulate
from streamdit_core.bench import mode_options
from streamdit_core.fp8_quant import (
    QuantizedActivation,
    gelu_quant_reference,
    gelu_quantize,
    norm_modulate_quant_reference,
    norm_modulate_quantize,
    quantize_rows,
    residual_norm_quant_reference,
    residual_norm_quantize,
    rows_quant_reference,
    triton_problem,
)
from streamdit_core.model import LayerNorm
from streamdit_core.perf import (
    FP8_MAX,
    PERF_LEVELS,
    Fp8Linear,
    GeluInNextLinear,
    PerfOptions,
    dequantize_fp8,
    quantize_fp8,
)

from fused_models import assert_compiled_and_graphed_equal, run, tiny_inputs, tiny_model, wan_like_cuda

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available() and HAS_TRITON
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
ZERO_SCALE = torch.tensor(1e-12) / FP8_MAX


def _rows(rows, width, dtype=torch.float32, seed=0, device="cpu"):
    """Rows with magnitudes spread over 5 decades, the first two all zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * torch.logspace(-2, 1, rows)[:, None]
    x[:2] = 0
    return x.to(device=device, dtype=dtype)


def _modulation(b, frames, width, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shift, scale = (0.5 * torch.randn(b, frames, width, generator=g) for _ in range(2))
    return shift.to(device), scale.to(device)


def _within_e4m3(x8, scale, exact):
    """Dequantised values within half an e4m3 step of ``exact`` (2⁻⁴ relative for normals, half the smallest
    subnormal step ``scale·2⁻¹⁰`` below), with a margin for the float32 arithmetic."""
    back = dequantize_fp8(x8, scale).double()
    bound = exact.abs() * 2.0**-4 + scale.double() * 2.0**-10
    return bool(((back - exact).abs() <= bound * 1.001 + 1e-30).all())


# -- reference implementations ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_modulate_reference_equals_model_layernorm_modulate_quantised(dtype):
    b, frames, per, width = 2, 3, 5, 48
    x = torch.randn(b, frames * per, width, generator=torch.Generator().manual_seed(0)).to(dtype) * 3 + 1
    x[0, :2] = 0  # zero rows: LayerNorm gives zeros, the modulation leaves the shift
    shift, scale = _modulation(b, frames, width)
    norm = LayerNorm(width, 1e-6, elementwise_affine=False)
    unfused = modulate(norm(x).float(), shift, scale).type_as(x)  # Block's path
    x8, s = norm_modulate_quant_reference(x, shift, scale, 1e-6)
    r8, rs = quantize_fp8(unfused.reshape(-1, width), True)
    assert x8.shape == (b * frames * per, width) and s.shape == (b * frames * per, 1)
    assert torch.equal(x8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(s, rs)
    # independently, in float64; in bf16 the norm's output and the modulated value are rounded to bf16 (2⁻⁸
    # relative each) before the e4m3 rounding
    xd = x.double()
    normed = (xd - xd.mean(-1, keepdim=True)) / (xd.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    scaled = (normed.unflatten(1, (frames, per)) * (1 + scale[:, :, None].double())).reshape(-1, width)
    exact = scaled + shift[:, :, None].double().expand(-1, -1, per, -1).reshape(-1, width)
    if dtype == torch.float32:
        assert _within_e4m3(x8, s, exact)
    else:
        err = (dequantize_fp8(x8, s).double() - exact).abs()
        bound = exact.abs() * (2.0**-4 + 2.0**-8) + scaled.abs() * 2.0**-8 + s.double() * 2.0**-10
        assert (err <= bound * 1.001).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_and_rows_references_equal_unfused_quantisation(dtype):
    h = _rows(40, 72, dtype)
    x8, s = gelu_quant_reference(h)
    r8, rs = quantize_fp8(nn.GELU(approximate="tanh")(h), True)  # the FFN's module, then Fp8Linear's quantisation
    assert torch.equal(x8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(s, rs)
    hd = h.double()
    exact = 0.5 * hd * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (hd + 0.044715 * hd**3)))
    if dtype == torch.float32:
        assert _within_e4m3(x8, s, exact)
    assert torch.equal(s[:2].flatten(), ZERO_SCALE.expand(2)) and not x8[:2].float().any()
    y8, ys = rows_quant_reference(h)
    assert _within_e4m3(y8, ys, h.double()) and torch.equal(ys, quantize_fp8(h, True)[1])
    # with the first FFN linear's bias, added in h's dtype as that linear's output would have it
    bias = torch.linspace(-1, 1, 72, dtype=torch.float32)
    b8, bs = gelu_quant_reference(h, bias)
    u8, us = quantize_fp8(nn.GELU(approximate="tanh")(h + bias.to(dtype)), True)
    assert torch.equal(b8.view(torch.uint8), u8.view(torch.uint8)) and torch.equal(bs, us)


# every combination of (gate, affine LayerNorm, modulation) of the residual kernel
RESIDUAL_CASES = list(itertools.product((False, True), repeat=3))


def _residual_args(b, frames, per, width, dtype, has_gate, affine, modulated, seed=2, device="cpu"):
    """``(x, y, gate, weight, bias, shift, scale)`` of a residual case: x ``[b, L, D]`` with an offset and zero
    rows of x + y, y of the same dtype, per-frame float32 gate/modulation as slices of one ``[b, F, k, D]``
    tensor (non-contiguous, like ``Block.forward``'s ``mod``), affine parameters near 1 and 0 in x's dtype."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, frames * per, width, generator=g) * 3 + 0.3).to(dtype)
    y = torch.randn(b, frames * per, width, generator=g).to(dtype)
    y[0, :2] = -x[0, :2]  # the sum's first rows are zero (no gate) or small
    mod = (0.5 * torch.randn(b, frames, 3, width, generator=g)).unbind(dim=2)  # 3 × [b, F, D], strided
    weight = (1 + 0.2 * torch.randn(width, generator=g)).to(dtype) if affine else None
    bias = (0.2 * torch.randn(width, generator=g)).to(dtype) if affine else None
    return (x.to(device), y.to(device), mod[0].to(device) if has_gate else None,
            None if weight is None else weight.to(device), None if bias is None else bias.to(device),
            mod[1].to(device) if modulated else None, mod[2].to(device) if modulated else None)


def _residual_unfused(x, y, g, weight, bias, shift, scale, eps=1e-6):
    """Block's unfused path: the residual add, ``norm3``/``norm2`` (model.LayerNorm), the modulation, and the
    consuming Fp8Linear's quantisation. Returns ``(sum [b, L, D], x8 [b·L, D], scale [b·L, 1])``."""
    total = x + (y if g is None else gate(y.float(), g).type_as(x))
    norm = LayerNorm(x.shape[-1], eps, elementwise_affine=weight is not None).to(x.device, x.dtype)
    if weight is not None:
        norm.weight.data.copy_(weight)
        norm.bias.data.copy_(bias)
    h = norm(total) if shift is None else modulate(norm(total).float(), shift, scale).type_as(x)
    return (total, *quantize_fp8(h.reshape(-1, x.shape[-1]), True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_gate,affine,modulated", RESIDUAL_CASES)
def test_residual_norm_reference_equals_unfused_residual_norm_quantisation(dtype, has_gate, affine, modulated):
    b, frames, per, width = 2, 3, 4, 40
    args = _residual_args(b, frames, per, width, dtype, has_gate, affine, modulated)
    total, x8, s = residual_norm_quant_reference(*args, 1e-6)
    ref_total, r8, rs = _residual_unfused(*args)
    assert total.shape == x8.shape == (b * frames * per, width) and s.shape == (b * frames * per, 1)
    assert total.dtype == dtype and torch.equal(total, ref_total.reshape(-1, width))
    assert torch.equal(x8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(s, rs)
    # through the registered operator and the wrapper: the sum [b, L, D] and the quantised input [b, L, D]
    got_total, qa = residual_norm_quantize(args[0], args[1], 1e-6, *args[2:])
    assert torch.equal(got_total, ref_total) and qa.dtype == dtype and qa.scale.shape == (b, frames * per, 1)
    assert torch.equal(qa.data.reshape(-1, width).view(torch.uint8), r8.view(torch.uint8))
    assert torch.equal(qa.scale.reshape(-1, 1), rs)
    if dtype == torch.float32 and not has_gate:  # independently, in float64 (one rounding: the sum's)
        td = total.double().reshape(b, -1, width)
        exact = (td - td.mean(-1, keepdim=True)) / (td.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
        if affine:
            exact = exact * args[3].double() + args[4].double()
        if modulated:
            exact = exact.unflatten(1, (frames, per)) * (1 + args[6][:, :, None].double()) + args[5][:, :, None]
        assert _within_e4m3(x8, s, exact.reshape(-1, width))


def test_residual_norm_quantize_checks_its_arguments():
    x, y, g, w, bias, shift, scale = _residual_args(2, 3, 4, 16, torch.float32, True, True, True)
    bad = (
        ((x, y[:, :6]), {}, "F dividing L"),  # y of another shape
        ((x, y.double()), {}, "one dtype"),
        ((x, y), {"gate": g[..., :8]}, "F dividing L"),  # a gate of another width
        ((x, y), {"gate": torch.zeros(2, 5, 16)}, "F dividing L"),  # 5 frames do not divide 12 tokens
        ((x, y), {"gate": g, "shift": shift[:, :1], "scale": scale[:, :1]}, "F dividing L"),  # gate ≠ modulation
        ((x, y), {"shift": shift}, "both or neither"),
        ((x, y), {"weight": w}, "both or neither"),
        ((x, y), {"weight": w[:8], "bias": bias[:8]}, r"must be \[16\]"),
    )
    for (a, kwargs, match) in bad:
        with pytest.raises(ValueError, match=match):
            residual_norm_quantize(*a, 1e-6, **kwargs)


def test_operators_and_wrappers_return_shaped_quantised_activations():
    """The registered operators (Triton-backed or not: on the CPU they run the reference) through the public
    wrappers: data [..., K] fp8 and scale [..., 1] with the leading shape of the input."""
    x = _rows(2 * 12, 32).reshape(2, 12, 32)
    shift, scale = _modulation(2, 4, 32)
    qa = norm_modulate_quantize(x, shift, scale, 1e-6)
    assert isinstance(qa, QuantizedActivation) and qa.data.shape == (2, 12, 32) and qa.scale.shape == (2, 12, 1)
    ref8, refs = norm_modulate_quant_reference(x, shift, scale, 1e-6)
    assert torch.equal(qa.data.reshape(-1, 32).view(torch.uint8), ref8.view(torch.uint8))
    assert torch.equal(qa.scale.reshape(-1, 1), refs) and qa.dtype == torch.float32
    for fn, ref in ((gelu_quantize, gelu_quant_reference), (quantize_rows, rows_quant_reference)):
        got = fn(x)
        r8, rs = ref(x.reshape(-1, 32))
        assert got.data.shape == x.shape
        assert torch.equal(got.data.reshape(-1, 32).view(torch.uint8), r8.view(torch.uint8))
        assert torch.equal(got.scale.reshape(-1, 1), rs)
    for frames, width in ((5, 32), (4, 16)):  # 12 tokens in 5 frames; a modulation of another width
        with pytest.raises(ValueError, match="F dividing L"):
            norm_modulate_quantize(x, *_modulation(2, frames, width), 1e-6)


# -- the model with fusion (fp8 emulated on the CPU) ----------------------------------------------------------


ROW = PerfOptions(fp8="row")
FUSED = replace(ROW, fp8_fused=True)
RESID = replace(FUSED, fp8_residual=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_model_equals_unfused_fp8_and_quantises_qkv_input_once(dtype, monkeypatch):
    """On the CPU the fused operators run the unfused maths, so the output is bit-identical; q, k and v share one
    quantisation of their adaLN input and the FFN's GELU is applied inside the second linear's quantisation; with
    fp8_residual the cross-attention's q input is quantised by the residual kernel too."""
    import streamdit_core.fp8_quant as fq
    import streamdit_core.perf as perf

    model = tiny_model(dtype)
    args = tiny_inputs(model.config, dtype)
    calls = {"linear": 0, "fused": 0}

    def counting(key, real):
        def fn(*a, **k):
            calls[key] += 1
            return real(*a, **k)
        return fn

    expected = {  # per block: 8 fp8 linears
        ROW: (8, 0),
        replace(ROW, fp8_fused=True): (3, 3),  # o, cross q, cross o | adaLN of attention, adaLN of FFN, GELU
        replace(ROW, fp8_fused=True, fp8_rows=True): (0, 6),
        replace(ROW, fp8_rows=True): (0, 8),
        RESID: (2, 4),  # o, cross o | adaLN of attention, residual + norm3, residual + adaLN of FFN, GELU
        replace(RESID, fp8_rows=True): (0, 6),
        replace(RESID, fp8_out_fused=True): (0, 6),  # o (with the window gather) and cross o in the operators
    }
    outs = {}
    for options, (linear, fused) in expected.items():
        model.set_perf(options)
        monkeypatch.setattr(perf, "quantize_fp8", counting("linear", quantize_fp8))
        monkeypatch.setattr(fq, "quantize_fp8", counting("fused", quantize_fp8))
        calls.update(linear=0, fused=0)
        with torch.inference_mode():
            outs[options] = model(*args)
        monkeypatch.undo()
        blocks = len(model.blocks)
        assert (calls["linear"], calls["fused"]) == (linear * blocks, fused * blocks), options.describe()
        assert torch.equal(outs[options], outs[ROW]), options.describe()
    plain = run(model, PerfOptions.plain(), *args)
    rel = ((outs[ROW].float() - plain.float()).norm() / plain.float().norm()).item()
    assert 1e-4 < rel < 0.08  # really quantised (the fused runs equal this one)


def test_fusion_switches_off_and_back_restoring_modules_and_state_dict():
    model = tiny_model()
    args = tiny_inputs(model.config)
    keys, params = set(model.state_dict()), {n: p for n, p in model.named_parameters()}
    plain = run(model, PerfOptions.plain(), *args)
    fused = replace(ROW, fp8_fused=True, fp8_rows=True)
    model.set_perf(fused)
    block = model.blocks[0]
    assert block.fused_fp8_input and isinstance(block.ffn[1], GeluInNextLinear) and block.ffn[2].prologue == "gelu"
    assert block.ffn[0].defer_bias  # its bias is added in the GELU kernel
    assert block.self_attn.o.single_pass and set(model.state_dict()) == keys
    assert "2 adaLN inputs, 2 GELUs" in model.perf_status["fp8_fused"]
    for options in (ROW, PerfOptions.plain(), fused, PerfOptions(fp8="tensor")):
        model.set_perf(options)
        assert block.fused_fp8_input is (options is fused)
        assert isinstance(block.ffn[1], GeluInNextLinear if options is fused else nn.GELU)
        assert set(model.state_dict()) == keys and all(p is params[n] for n, p in model.named_parameters())
    assert block.ffn[1].approximate == "tanh" and isinstance(block.ffn[2], Fp8Linear)
    assert block.ffn[2].prologue == "none" and not block.ffn[2].single_pass and not block.ffn[0].defer_bias
    assert torch.equal(run(model, PerfOptions.plain(), *args), plain)
    assert type(block.ffn[2]) is nn.Linear and type(block.self_attn.q) is nn.Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_fusion_with_uncached_per_frame_context_equals_unfused(dtype):
    """Without the text key/value cache the cross-attention takes its quantised input through
    ``CrossAttention.forward``, per frame for a per-frame context (data and scales reshaped alike)."""
    model = tiny_model(dtype)
    x, sigma, ctx = tiny_inputs(model.config, dtype)
    per_frame = torch.stack([ctx[:, 0], ctx[:, 0], -ctx[:, 0], ctx[:, 0]], dim=1)  # [1, F=4, Lt, text_dim]
    for context in (ctx, per_frame):
        outs = [run(model, replace(o, text_kv_cache=False), x, sigma, context) for o in (ROW, RESID)]
        assert model.blocks[0].fused_fp8_residual and not model.blocks[0].cross_attn.cached
        assert torch.equal(outs[0], outs[1])


def test_residual_fusion_switches_off_and_back_and_needs_the_cross_attention_norm():
    model = tiny_model()
    args = tiny_inputs(model.config)
    keys, params = set(model.state_dict()), {n: p for n, p in model.named_parameters()}
    unfused = run(model, FUSED, *args)
    fused = run(model, RESID, *args)
    assert torch.equal(fused, unfused)
    assert model.perf_status["fp8_residual"].startswith("2 blocks")
    blocks = list(model.blocks)
    assert all(b.fused_fp8_residual and b.fused_fp8_input for b in blocks)
    for options in (FUSED, ROW, PerfOptions.plain(), RESID, PerfOptions(fp8="tensor")):
        model.set_perf(options)
        assert all(b.fused_fp8_residual is (options is RESID) for b in blocks), options.describe()
        assert ("fp8_residual" in model.perf_status) is (options is RESID)
        assert set(model.state_dict()) == keys and all(p is params[n] for n, p in model.named_parameters())
    model.set_perf(PerfOptions.plain())
    assert type(blocks[0].cross_attn.q) is nn.Linear and type(blocks[0].ffn[0]) is nn.Linear
    # without cross_attn_norm (norm3 an nn.Identity) the residual kernel, which normalises, is not used
    bare = tiny_model(cross_attn_norm=False)
    expected = run(bare, FUSED, *args)
    assert torch.equal(run(bare, RESID, *args), expected)
    assert not bare.blocks[0].fused_fp8_residual and bare.perf_status["fp8_residual"].startswith("0 blocks")


def test_options_parse_fp8fuse_and_fp8rows():
    fastest = PERF_LEVELS["fastest"]
    # what the H100 runs measured to help (docs/bench/h100_fp8fuse, h100_fp8resid)
    assert fastest.fp8_fused and fastest.fp8_residual and not fastest.fp8_rows
    assert PerfOptions.level("fastest,fp8rows") == replace(fastest, fp8_rows=True)
    assert PerfOptions.level("fp8,fp8fuse") == PerfOptions(text_kv_cache=False, layout_cache=False,
                                                           window_gather=False, fp8="row", fp8_fused=True)
    assert mode_options("fastest+fp8fuse+fp8rows", "default") == replace(fastest, fp8_fused=True, fp8_rows=True)
    assert PerfOptions.level("kv,fp8,fp8rows").describe() == "text_kv_cache,fp8=row,fp8_rows"
    assert PerfOptions.level("fastest,fp8fuse").for_device(torch.device("cpu")) == PerfOptions(compile="default")
    assert mode_options("fastest+fp8=tensor", "default") == replace(fastest, fp8="tensor", fp8_fused=False,
                                                                    fp8_residual=False, fp8_out_fused=False,
                                                                    fp8_adds_fused=False, fp8_split_rows=False)
    for bad in ("safe,fp8fuse", "fp8=tensor,fp8rows", "fastest,fp8fuse,fp8=tensor"):
        with pytest.raises(ValueError, match="need fp8='row'"):
            PerfOptions.level(bad)
    with pytest.raises(ValueError, match="unknown optimisation 'fp8fuse=1'"):
        PerfOptions.level("fastest,fp8fuse=1")
    with pytest.raises(ValueError, match="need fp8='row'"):
        PerfOptions(fp8_fused=True)


def test_options_parse_fp8resid():
    fastest = PERF_LEVELS["fastest"]
    assert [name for name, level in PERF_LEVELS.items() if level.fp8_residual] == ["fastest"]
    # the level without it and the items that extend it (added later), as the H100 run compared
    before = replace(fastest, fp8_residual=False, fp8_adds_fused=False)
    assert PerfOptions.level("fastest,fp8resid") == fastest == replace(before, fp8_residual=True,
                                                                       fp8_adds_fused=True)
    assert mode_options("fastest+fp8resid", "default") == fastest
    assert PerfOptions.level("fp8,fp8fuse,fp8resid").describe() == "fp8=row,fp8_fused,fp8_residual"
    assert PerfOptions.level("fastest,fp8resid").for_device(torch.device("cpu")) == PerfOptions(compile="default")
    assert PerfOptions.level("fastest,fp8resid,fp8=row") == fastest
    assert PerfOptions.level("fastest,fp8=tensor") == replace(before, fp8="tensor", fp8_fused=False,
                                                              fp8_out_fused=False, fp8_adds_fused=False,
                                                              fp8_split_rows=False)
    for bad in ("safe,fp8resid", "fastest,fp8resid,fp8=tensor"):
        with pytest.raises(ValueError, match="need fp8='row'"):
            PerfOptions.level(bad)
    for bad in ("fp8,fp8resid", "fast,fp8=row,fp8resid"):
        with pytest.raises(ValueError, match="needs fp8_fused"):
            PerfOptions.level(bad)
    with pytest.raises(ValueError, match="needs fp8_fused"):
        PerfOptions(fp8="row", fp8_residual=True)


# -- the Triton kernel ----------------------------------------------------------------------------------------


def _assert_kernel_matches(got, ref, exact_scale=False, min_equal=0.99, scale_rtol=2.0**-7, absolute=0.0):
    """Kernel vs reference: scales within ``scale_rtol`` (2⁻⁷: the row maximum may land on the neighbouring
    bf16 value), every dequantised value within one e4m3 step (2⁻³ relative) plus that, a subnormal step and
    ``absolute``, and nearly all fp8 codes equal."""
    (x8, s), (r8, rs) = got, ref
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == r8.shape and s.shape == rs.shape == (r8.shape[0], 1)
    if exact_scale:
        assert torch.equal(s, rs)
    assert ((s - rs).abs() <= rs * scale_rtol).all()
    back, ref_back = dequantize_fp8(x8, s).double(), dequantize_fp8(r8, rs).double()
    bound = ref_back.abs() * (2.0**-3 + 2 * scale_rtol) + rs.double() * 2.0**-8 + absolute
    assert ((back - ref_back).abs() <= bound).all()
    equal = (x8.view(torch.uint8) == r8.view(torch.uint8)).double().mean().item()
    assert equal >= min_equal, equal
    zero = (r8.float() == 0).all(dim=1)
    assert not x8[zero].float().any()


def _kernels(cast_in_torch):
    """The two launchers; with ``cast_in_torch`` they store float32 values that torch casts to fp8 (the
    interpreter's fp8 cast is wrong for values just below a power of two)."""
    from streamdit_core.fp8_triton import norm_quant_triton, quantize_rows_triton

    def rows_kernel(*args, **kwargs):
        if not cast_in_torch:
            return quantize_rows_triton(*args, **kwargs)
        q, s = quantize_rows_triton(*args, out_dtype=torch.float32, **kwargs)
        return q.to(torch.float8_e4m3fn), s

    def norm_kernel(*args, **kwargs):
        if not cast_in_torch:
            return norm_quant_triton(*args, **kwargs)
        q, s, total = norm_quant_triton(*args, out_dtype=torch.float32, **kwargs)
        return q.to(torch.float8_e4m3fn), s, total

    return rows_kernel, norm_kernel


def _assert_norm_matches(got, ref, shift, tokens, min_equal, scale_rtol):
    """LayerNorm (+ modulation) kernel vs reference: two roundings to x's dtype; the first, of the norm before
    the shift is added, is relative to ``|value - shift| ≤ |value| + |shift|``, which cancellation can make much
    larger than ``|value|``. shift ``[b, F, D]`` or ``None``; ``tokens`` per batch element."""
    shifts = 0.0
    if shift is not None:
        shifts = shift.repeat_interleave(tokens // shift.shape[1], dim=1).reshape(-1, shift.shape[-1]).abs().double()
    _assert_kernel_matches(got, ref, min_equal=min_equal - 0.02, scale_rtol=2 * scale_rtol,
                           absolute=scale_rtol * (dequantize_fp8(*ref).abs().double() + shifts))


def _check_kernel_widths(widths, rows, device, dtype, cast_in_torch=False, min_equal=0.99, scale_rtol=2.0**-7):
    """``cast_in_torch``: see :func:`_kernels`. ``min_equal``: the share of fp8 codes equal to the reference's
    (GELU and LayerNorm + modulation; the plain row quantisation is held to the same)."""
    kernel, norm_kernel = _kernels(cast_in_torch)
    for width in widths:
        h = _rows(rows, width, dtype, seed=width, device=device)
        _assert_kernel_matches(kernel(h, 0), rows_quant_reference(h), exact_scale=True)
        _assert_kernel_matches(kernel(h, 1), gelu_quant_reference(h), min_equal=min_equal, scale_rtol=scale_rtol)
        bias = (torch.linspace(-2, 2, width, device=device) ** 3).to(dtype)  # the FFN's first bias, fused
        _assert_kernel_matches(kernel(h, 1, bias=bias), gelu_quant_reference(h, bias), min_equal=min_equal,
                               scale_rtol=scale_rtol)
        b, frames = 2, 4
        x = (_rows(b * rows, width, dtype, seed=width + 1, device=device) * 5 + 0.3).reshape(b, rows, width)
        x[0, :2] = 0  # zero rows before the norm (the rows themselves have a +0.3 offset elsewhere)
        shift, scale = _modulation(b, frames, width, device=device)
        x8, s, total = norm_kernel(x.reshape(-1, width).contiguous(), 1e-6, rows, frames, shift=shift.contiguous(),
                                   scale=scale.contiguous())
        assert total is None
        _assert_norm_matches((x8, s), norm_modulate_quant_reference(x, shift, scale, 1e-6), shift, rows,
                             min_equal, scale_rtol)


def _check_residual_kernel(widths, tokens, device, dtype, cases=RESIDUAL_CASES, cast_in_torch=False,
                           min_equal=0.99, scale_rtol=2.0**-7):
    """The residual kernel (``norm_quant_triton`` with ``residual``) in each (gate, affine, modulation) case of
    ``cases``, on ``[2, tokens, width]`` in 4 frames: the stored sum within two steps of x's dtype of
    ``|x| + |gate·y|`` (the GPU may fuse the float32 multiply-add; the interpreter truncates ``gate·y`` and the
    sum to bf16 where the GPU rounds both like torch), and the quantised norm against the reference applied to
    the kernel's own sum (as for LayerNorm + modulation)."""
    _, norm_kernel = _kernels(cast_in_torch)
    step = 2.0**-6 if dtype == torch.bfloat16 else 2.0**-22
    for width, (has_gate, affine, modulated) in itertools.product(widths, cases):
        b, frames = 2, 4
        x, y, g, weight, bias, shift, scale = _residual_args(b, frames, tokens // frames, width, dtype, has_gate,
                                                             affine, modulated, seed=width, device=device)
        x8, s, total = norm_kernel(
            x.reshape(-1, width).contiguous(), 1e-6, tokens, frames, residual=y.reshape(-1, width).contiguous(),
            gate=None if g is None else g.contiguous(), weight=weight, bias=bias,
            shift=None if shift is None else shift.contiguous(), scale=None if scale is None else scale.contiguous())
        ref_total, _, _ = residual_norm_quant_reference(x, y, g, weight, bias, shift, scale, 1e-6)
        gy = y.double() if g is None else gate(y.double(), g.double())
        bound = (x.double().abs() + gy.abs()).reshape(-1, width) * step
        assert total.dtype == dtype and ((total.double() - ref_total.double()).abs() <= bound).all()
        own = total.view(b, tokens, width)
        ref = residual_norm_quant_reference(own, torch.zeros_like(own), None, weight, bias, shift, scale, 1e-6)
        _assert_norm_matches((x8, s), ref[1:], shift, tokens, min_equal, scale_rtol)


@pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1 on a machine without CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_in_interpreter_matches_reference(dtype):
    # the interpreter also truncates float32 → bf16 (the GPU rounds to nearest even): in bf16 about half of the
    # GELU/norm values land one bf16 step lower, and a few percent of the fp8 codes change
    bf16 = dtype == torch.bfloat16
    _check_kernel_widths((96, 200), 8, "cpu", dtype, cast_in_torch=True, min_equal=0.9 if bf16 else 0.99,
                         scale_rtol=2.0**-6 if bf16 else 2.0**-7)


@pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1 on a machine without CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_kernel_in_interpreter_matches_reference(dtype):
    bf16 = dtype == torch.bfloat16
    _check_residual_kernel((200,), 8, "cpu", dtype, cast_in_torch=True, min_equal=0.9 if bf16 else 0.99,
                           scale_rtol=2.0**-6 if bf16 else 2.0**-7)
    _check_residual_kernel((96,), 8, "cpu", dtype, cases=[(True, True, False), (False, False, True)],
                           cast_in_torch=True, min_equal=0.9 if bf16 else 0.99, scale_rtol=2.0**-6 if bf16 else 2.0**-7)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_kernel_on_cuda_matches_reference(dtype):
    assert triton_problem() is None
    _check_kernel_widths((3072, 7680, 1536, 8960), 256, "cuda", dtype)
    # through the registered operators (the CUDA branch of the triton_op) and the wrappers
    h = _rows(64, 8960, dtype, device="cuda")
    _assert_kernel_matches(torch.ops.streamdit.gelu_quant(h, None), gelu_quant_reference(h))
    bias = torch.randn(h.shape[1], device="cuda").to(dtype)
    _assert_kernel_matches(torch.ops.streamdit.gelu_quant(h, bias), gelu_quant_reference(h, bias))
    qa = quantize_rows(h.reshape(2, 32, -1))
    _assert_kernel_matches((qa.data.reshape(64, -1), qa.scale.reshape(64, 1)), rows_quant_reference(h), True)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_residual_kernel_on_cuda_matches_reference(dtype):
    assert triton_problem() is None
    _check_residual_kernel((3072, 1536, 5120), 256, "cuda", dtype)
    # through the registered operator (the CUDA branch of the triton_op: strided per-frame tensors made
    # contiguous, the affine parameters in x's dtype) and the wrapper; the cross-attention and FFN cases
    for has_gate, affine, modulated in ((True, True, False), (False, False, True)):
        args = _residual_args(2, 4, 64, 3072, dtype, has_gate, affine, modulated, device="cuda")
        total, qa = residual_norm_quantize(args[0], args[1], 1e-6, *args[2:])
        ref_total, r8, rs = residual_norm_quant_reference(*args, 1e-6)
        gy = args[1].double() if args[2] is None else gate(args[1].double(), args[2].double())
        step = 2.0**-6 if dtype == torch.bfloat16 else 2.0**-22
        assert ((total.double() - ref_total.view(total.shape).double()).abs()
                <= (args[0].double().abs() + gy.abs()) * step).all()
        own = residual_norm_quant_reference(total, torch.zeros_like(total), None, *args[3:], 1e-6)
        _assert_norm_matches((qa.data.reshape(-1, 3072), qa.scale.reshape(-1, 1)), own[1:], args[5], 256, 0.99,
                             2.0**-7)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("residual", [False, True], ids=["fp8fuse", "fp8resid"])
def test_fused_model_compiled_and_graphed_on_cuda_equals_eager(residual):
    """fastest + fp8fuse + fp8rows (+ fp8resid): compiled blocks (no graph break but the intended one around the
    cached cross-attention) and the CUDA graph replay give the eager fused output to bf16 rounding, and the fused
    output is close to the unfused fp8 output. The model has Wan's cross-attention norm (affine)."""
    model, args = wan_like_cuda()
    assert isinstance(model.blocks[0].norm3, LayerNorm)
    fused = PerfOptions(fp8="row", fp8_fused=True, fp8_rows=True, fp8_residual=residual)
    eager = run(model, fused, *args).float()
    assert model.perf_status["fp8"].startswith("row scales") and "Triton kernels" in model.perf_status["fp8_fused"]
    assert all(block.fused_fp8_residual is residual for block in model.blocks)
    unfused = run(model, PerfOptions(fp8="row"), *args).float()
    assert ((eager - unfused).norm() / unfused.norm()).item() < 0.03
    options = replace(PERF_LEVELS["fastest"], fp8_fused=True, fp8_rows=True, fp8_residual=residual)
    assert_compiled_and_graphed_equal(model, options, args, eager)
    assert model.perf_status.get("fp8_residual", "").startswith("2 blocks" if residual else "")


# -- the bias adds of the fp8 linears in the residual kernels (fuseadds) and measured warps (warps) -------------


def _biased_model(dtype=torch.float32, **config):
    """``tiny_model`` with non-zero biases on the linears whose bias ``fuseadds`` moves (the attention output
    projections and the FFN's second linear; Wan's initialisation zeroes them)."""
    model = tiny_model(dtype, **config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in model.blocks:
            for linear in (block.self_attn.o, block.cross_attn.o, block.ffn[2]):
                linear.bias.copy_(0.3 * torch.randn(linear.bias.shape, generator=g))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_gate,affine,modulated", RESIDUAL_CASES)
def test_residual_reference_with_branch_bias_equals_linear_bias_then_residual(dtype, has_gate, affine, modulated):
    """With ``y_bias`` the reference is the unfused maths of ``Fp8Linear``'s ``out + bias`` (in out's dtype) followed
    by the residual kernel's: bit for bit, through the reference, the operator and the wrapper."""
    b, frames, per, width = 2, 3, 4, 40
    x, y, g, weight, bias, shift, scale = _residual_args(b, frames, per, width, dtype, has_gate, affine, modulated)
    y_bias = (0.5 * torch.randn(width, generator=torch.Generator().manual_seed(5))).to(dtype)
    ref_total, r8, rs = _residual_unfused(x, y + y_bias, g, weight, bias, shift, scale)
    total, x8, s = residual_norm_quant_reference(x, y, g, weight, bias, shift, scale, 1e-6, y_bias)
    assert torch.equal(total, ref_total.reshape(-1, width)) and torch.equal(s, rs)
    assert torch.equal(x8.view(torch.uint8), r8.view(torch.uint8))
    got_total, qa = residual_norm_quantize(x, y, 1e-6, g, weight, bias, shift, scale, y_bias=y_bias)
    assert torch.equal(got_total, ref_total) and torch.equal(qa.scale.reshape(-1, 1), rs)
    assert torch.equal(qa.data.reshape(-1, width).view(torch.uint8), r8.view(torch.uint8))
    with pytest.raises(ValueError, match=r"branch's bias must be \[40\]"):
        residual_norm_quantize(x, y, 1e-6, g, weight, bias, shift, scale, y_bias=y_bias[:8])


ADDS = replace(RESID, fp8_adds_fused=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_adds_model_equals_fastest_without_them(dtype, monkeypatch):
    """fastest's fp8 items (fp8 emulated on the CPU, where the kernels' reference runs) with and without fuseadds,
    also with crossres, qkrope, outquant and warps: the same output bit for bit. The attention output projections leave
    their bias to the residual kernels (2 per block), with crossres also the FFN's second linear (to the next
    block's norm1 kernel; the last block's to the model's own add)."""
    import streamdit_core.model as model_module

    model = _biased_model(dtype, num_layers=3)
    args = tiny_inputs(model.config, dtype)
    n = len(model.blocks)
    biased = []
    real = model_module.residual_norm_quantize
    monkeypatch.setattr(model_module, "residual_norm_quantize",
                        lambda *a, **k: biased.append(a[8] is not None) or real(*a, **k))
    for extra, per_block, ffn in (({}, 2, 0), ({"cross_residual": True}, 2, 1), ({"qk_fused": True}, 2, 0),
                                  ({"cross_residual": True, "qk_fused": True, "tuned_warps": True}, 2, 1),
                                  ({"qk_fused": True, "fp8_out_fused": True}, 2, 0),
                                  ({"qk_fused": True, "fp8_out_fused": True, "tuned_warps": True}, 2, 0)):
        base = replace(RESID, **extra)
        expected = run(model, base, *args)
        assert not any(isinstance(m, Fp8Linear) and m.defer_bias for b in model.blocks
                       for m in (b.self_attn.o, b.cross_attn.o, b.ffn[2]))
        biased.clear()
        out = run(model, replace(base, fp8_adds_fused=True), *args)
        assert torch.equal(out, expected), extra
        assert sum(biased) == per_block * n + ffn * (n - 1), extra
        assert all(b.self_attn.o.defer_bias and b.cross_attn.o.defer_bias and b.ffn[2].defer_bias is bool(ffn)
                   for b in model.blocks)
        status = model.perf_status["fp8_adds_fused"]
        assert status.startswith(f"{2 * n} attention output biases") and (f"{n} FFN output" in status) is bool(ffn)
    # off again: every linear adds its own bias
    model.set_perf(RESID)
    assert not any(m.defer_bias for b in model.blocks for m in (b.self_attn.o, b.cross_attn.o, b.ffn[2]))
    assert "fp8_adds_fused" not in model.perf_status


def test_fused_adds_with_uncached_per_frame_context_and_without_residual_kernels():
    """The uncached cross-attention (shared and per-frame context) returns its pending bias reshaped; without
    fp8_residual (no residual kernels) or without the cross-attention norm the biases stay with their linears."""
    model = _biased_model()
    x, sigma, ctx = tiny_inputs(model.config)
    per_frame = torch.stack([ctx[:, 0], ctx[:, 0], -ctx[:, 0], ctx[:, 0]], dim=1)
    for context in (ctx, per_frame):
        options = [replace(o, text_kv_cache=False) for o in (RESID, ADDS)]
        assert torch.equal(run(model, options[0], x, sigma, context), run(model, options[1], x, sigma, context))
        assert model.blocks[0].cross_attn.o.defer_bias and not model.blocks[0].cross_attn.cached
    args = (x, sigma, ctx)
    expected = run(model, FUSED, *args)
    assert torch.equal(run(model, replace(FUSED, fp8_adds_fused=True), *args), expected)
    assert not model.blocks[0].self_attn.o.defer_bias
    assert model.perf_status["fp8_adds_fused"].startswith("0 attention output biases")
    bare = _biased_model(cross_attn_norm=False)
    assert torch.equal(run(bare, ADDS, *args), run(bare, RESID, *args))
    assert not bare.blocks[0].cross_attn.o.defer_bias


def test_options_parse_fuseadds_and_warps():
    fastest = PERF_LEVELS["fastest"]
    # in `fastest` since the H100 run in docs/bench/h100_outquant_fuseadds
    assert [name for name, level in PERF_LEVELS.items() if level.fp8_adds_fused or level.tuned_warps] == ["fastest"]
    assert fastest.fp8_adds_fused and fastest.tuned_warps
    before = replace(fastest, fp8_adds_fused=False, tuned_warps=False)
    assert PerfOptions.level("fastest,fuseadds") == fastest == replace(before, fp8_adds_fused=True, tuned_warps=True)
    assert mode_options("fastest+fuseadds", "default") == fastest
    assert mode_options("fastest+fuseadds+warps", "default") == fastest
    assert PerfOptions.level("fast,warps") == replace(PERF_LEVELS["fast"], tuned_warps=True)
    assert PerfOptions.level("fp8,fp8fuse,fuseadds").describe() == "fp8=row,fp8_fused,fp8_adds_fused"
    cpu = torch.device("cpu")
    assert PerfOptions.level("fastest,fuseadds,warps").for_device(cpu) == PerfOptions(compile="default")
    assert PerfOptions.level("fastest,fp8=tensor").fp8_adds_fused is False
    for bad in ("fp8,fuseadds", "safe,fuseadds", "fast,fuseadds", "fastest,fuseadds,fp8=tensor"):
        with pytest.raises(ValueError, match="fp8_adds_fused extends the fused kernels of fp8_fused"):
            PerfOptions.level(bad)
    with pytest.raises(ValueError, match="needs fp8_fused"):
        PerfOptions(fp8="row", fp8_adds_fused=True)
    with pytest.raises(ValueError, match="unknown optimisation 'fuseadd'"):
        PerfOptions.level("fastest,fuseadd")


def test_tuned_warps_table_and_model_flags():
    """The measured warp counts (docs/bench/h100_row_kernels/row_kernels.md) replace the default only with
    ``tuned`` and only at the measured widths; the item sets every fused kernel's flag and changes no value (the
    CPU runs the references)."""
    from streamdit_core.triton_util import TUNED_WARPS, norm_kind, row_launch_config

    assert row_launch_config(3072) == row_launch_config(3072, "norm_modulate_quant") == (4096, 8)
    assert row_launch_config(3072, "norm_modulate_quant", True) == (4096, 4)
    assert row_launch_config(1536, "norm_modulate_quant", True) == (2048, 2)
    assert row_launch_config(3072, "residual_gate_affine_quant", True)[1] == 4
    assert row_launch_config(3072, "qkv_rope", True)[1] == 4
    assert row_launch_config(3072, "residual_gate_modulate_quant", True)[1] == 2  # norm1 with crossres
    assert row_launch_config(7680, "gelu_quant", True) == (8192, 4)
    assert row_launch_config(8960, "gelu_quant", True) == (16384, 8)
    assert row_launch_config(3072, "residual_modulate_quant", True) == (4096, 8)  # the default was best
    assert row_launch_config(5120, "norm_modulate_quant", True) == row_launch_config(5120)  # not measured
    assert row_launch_config(3072, None, True) == row_launch_config(3072)
    assert norm_kind(False, False, False, True, True) == "norm_modulate_quant"
    assert norm_kind(True, True, True, False, True) == "residual_gate_affine_quant"
    assert norm_kind(True, False, False, True, True) == "residual_modulate_quant"
    assert norm_kind(True, False, False, True, False) == "residual_modulate"
    assert norm_kind(True, True, False, True, True) == "residual_gate_modulate_quant"
    kinds = {"norm_modulate_quant", "residual_gate_affine_quant", "residual_modulate_quant", "residual_modulate",
             "gelu_quant", "qkv_rope", "residual_gate_modulate_quant", "gelu_quant_split",
             "norm_modulate_quant_rows4", "residual_gate_modulate_quant_rows4"}
    assert {kind for kind, _ in TUNED_WARPS} == kinds and all(w in (1, 2, 4, 8, 16) for w in TUNED_WARPS.values())
    model = _biased_model()
    args = tiny_inputs(model.config)
    for base in (RESID, replace(RESID, qk_fused=True), PERF_LEVELS["fast"].for_device(torch.device("cpu"))):
        expected = run(model, base, *args)
        assert torch.equal(run(model, replace(base, tuned_warps=True), *args), expected)
        assert all(b.tuned_warps and b.self_attn.tuned_warps for b in model.blocks)
        assert all(m.tuned_warps for m in model.modules() if isinstance(m, Fp8Linear))
        assert "measured warp counts" in model.perf_status["tuned_warps"]
    model.set_perf(RESID)
    assert not any(b.tuned_warps or b.self_attn.tuned_warps for b in model.blocks)
    assert not any(m.tuned_warps for m in model.modules() if isinstance(m, Fp8Linear))


def _check_residual_bias_kernel(width, tokens, device, dtype, cast_in_torch=False, min_equal=0.99,
                                scale_rtol=2.0**-7):
    """The residual kernel with the branch's bias (``residual_bias``) against the reference with ``y_bias``: the
    sum within two steps of x's dtype of ``|x| + 2·|gate·(y + bias)|`` (one more rounding than without the bias:
    ``y + bias``'s, which the interpreter truncates), the quantised norm as in :func:`_check_residual_kernel`."""
    _, norm_kernel = _kernels(cast_in_torch)
    step = 2.0**-6 if dtype == torch.bfloat16 else 2.0**-22
    for has_gate, affine, modulated in ((True, True, False), (False, False, True), (True, False, True)):
        b, frames = 2, 4
        x, y, g, weight, bias, shift, scale = _residual_args(b, frames, tokens // frames, width, dtype, has_gate,
                                                             affine, modulated, seed=width, device=device)
        y_bias = (torch.linspace(-2, 2, width) ** 3).to(device=device, dtype=dtype)
        x8, s, total = norm_kernel(
            x.reshape(-1, width).contiguous(), 1e-6, tokens, frames, residual=y.reshape(-1, width).contiguous(),
            gate=None if g is None else g.contiguous(), weight=weight, bias=bias,
            shift=None if shift is None else shift.contiguous(), scale=None if scale is None else scale.contiguous(),
            residual_bias=y_bias)
        ref_total, _, _ = residual_norm_quant_reference(x, y, g, weight, bias, shift, scale, 1e-6, y_bias)
        yb = y.double() + y_bias.double()
        gy = yb if g is None else gate(yb, g.double())
        bound = (x.double().abs() + 2 * gy.abs()).reshape(-1, width) * step
        assert total.dtype == dtype and ((total.double() - ref_total.double()).abs() <= bound).all()
        own = total.view(b, tokens, width)
        ref = residual_norm_quant_reference(own, torch.zeros_like(own), None, weight, bias, shift, scale, 1e-6)
        _assert_norm_matches((x8, s), ref[1:], shift, tokens, min_equal, scale_rtol)
    with pytest.raises(ValueError, match="needs residual"):
        norm_kernel(x.reshape(-1, width).contiguous(), 1e-6, tokens, frames, residual_bias=y_bias)


def _check_tuned_warps_same_values(device, dtype, widths, tokens, exact):
    """Each tuned kernel at widths where ``TUNED_WARPS`` has another warp count: the values with ``tuned`` equal
    the default launch's (``exact``), or are within float32 rounding of them (the reductions' order may change on
    a GPU)."""
    from streamdit_core.fp8_triton import norm_quant_triton, quantize_rows_triton
    from streamdit_core.rope_triton import qkv_rows_triton

    def same(a, b):
        for t, u in zip(a, b):
            if t is None:
                assert u is None
            elif exact:
                assert torch.equal(t, u)
            else:
                assert torch.allclose(t.float(), u.float(), rtol=2.0**-7, atol=2.0**-7 * t.float().abs().max())

    for width in widths:
        x, y = (_rows(2 * tokens, width, dtype, seed=s, device=device) for s in (width, width + 1))
        shift, scale = _modulation(2, 4, width, device=device)
        w = torch.linspace(0.5, 1.5, width, device=device).to(dtype)
        for kwargs in ({"shift": shift, "scale": scale}, {"residual": y, "gate": shift, "weight": w, "bias": w},
                       {"residual": y, "shift": shift, "scale": scale},
                       {"residual": y, "gate": shift, "shift": shift, "scale": scale},
                       {"residual": y, "shift": shift, "scale": scale, "quantize": False}):
            launch = [norm_quant_triton(x, 1e-6, tokens, 4, out_dtype=torch.float32, tuned=t, **kwargs)
                      for t in (False, True)]
            same(*launch)
        h = _rows(8, 2 * width, dtype, seed=3, device=device)
        same(*(quantize_rows_triton(h, 1, torch.float32, tuned=t) for t in (False, True)))
        cos, sin = (torch.rand(tokens, 8, device=device) for _ in range(2))
        q, k, v = (x.view(2, tokens, width) for _ in range(3))
        same(*(qkv_rows_triton(q, k, v, cos, sin, 1e-6, weights=(w, w), tuned=t) for t in (False, True)))


@pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1 on a machine without CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_bias_kernel_in_interpreter_matches_reference(dtype):
    bf16 = dtype == torch.bfloat16
    _check_residual_bias_kernel(96, 8, "cpu", dtype, cast_in_torch=True, min_equal=0.9 if bf16 else 0.99,
                                scale_rtol=2.0**-6 if bf16 else 2.0**-7)


@pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1 on a machine without CUDA")
def test_tuned_warps_in_interpreter_give_the_same_values():
    _check_tuned_warps_same_values("cpu", torch.bfloat16, (32,), 8, exact=True)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_residual_bias_kernel_on_cuda_matches_reference(dtype):
    for width in (3072, 1536):
        _check_residual_bias_kernel(width, 256, "cuda", dtype)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
def test_tuned_warps_on_cuda_give_the_same_values():
    _check_tuned_warps_same_values("cuda", torch.bfloat16, (3072, 1536), 64, exact=False)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("crossres", [False, True], ids=["fuseadds", "fuseadds+crossres"])
def test_fused_adds_model_compiled_and_graphed_on_cuda_equals_eager(crossres):
    """fastest + fuseadds + warps (+ crossres): compiled and graphed like the other fused items, close to eager."""
    model, args = wan_like_cuda()
    with torch.no_grad():
        for block in model.blocks:
            for linear in (block.self_attn.o, block.cross_attn.o, block.ffn[2]):
                linear.bias.normal_(0.0, 0.3)
    options = replace(PERF_LEVELS["fastest"], fp8_adds_fused=True, tuned_warps=True, cross_residual=crossres)
    eager = run(model, replace(options, compile="off", cuda_graphs=False), *args).float()
    plain = run(model, replace(PERF_LEVELS["fastest"], compile="off", cuda_graphs=False), *args).float()
    assert ((eager - plain).norm() / plain.norm()).item() < 0.01
    assert_compiled_and_graphed_equal(model, options, args, eager)


# -- the GELU row held as two power-of-two pieces (splitrows) ---------------------------------------------------


def test_split_blocks_rule_and_launch_config():
    """The row splits into the largest power of two ≤ its width and the next one ≥ the rest only where the two are
    smaller together than the whole row's block; the split layout's warps follow the default rule for its lanes and
    never take the whole row's measured entry."""
    from streamdit_core.triton_util import (
        TUNED_WARPS,
        default_warps,
        row_launch_config,
        split_blocks,
        split_launch_config,
    )

    assert split_blocks(8960) == (8192, 1024)  # Wan 1.3B's FFN: 9,216 lanes instead of 16,384
    assert split_blocks(7680) == (8192, 0)  # the paper's: 4,096 + 4,096 is no smaller
    assert split_blocks(3072) == (2048, 1024)
    assert split_blocks(1536) == (1024, 512)
    assert split_blocks(5120) == (4096, 1024)
    assert split_blocks(13824) == (16384, 0)  # Wan 14B's FFN: 8,192 + 8,192
    assert split_blocks(1000) == (1024, 0) and split_blocks(96) == (64, 32) and split_blocks(112) == (128, 0)
    for k in range(15):
        assert split_blocks(1 << k) == (1 << k, 0)
    for n in range(1, 3000):
        block, block2 = split_blocks(n)
        whole = row_launch_config(n)[0]
        assert (block, block2) == (whole, 0) or (block < n <= block + block2 < whole and block2 < 2 * (n - block))
    assert [default_warps(1 << k) for k in range(8, 16)] == [min(16, max(4, (1 << k) // 512)) for k in range(8, 16)]
    assert default_warps(9216) == 16 and default_warps(3072) == 4 and default_warps(5120) == 8
    # the split layout has its own measured entries (the whole row's 8 warps at 8,960 do not apply to it)
    assert TUNED_WARPS[("gelu_quant", 8960)] == 8 and TUNED_WARPS[("gelu_quant_split", 8960)] == 4
    assert split_launch_config(8960) == split_launch_config(8960, "gelu_quant") == (8192, 1024, 16)
    assert split_launch_config(8960, "gelu_quant", True) == (8192, 1024, 4)
    assert split_launch_config(3072, "gelu_quant", True) == (2048, 1024, 4)
    # without a split: the whole row's configuration, its measured warps included
    assert split_launch_config(7680, "gelu_quant", True) == (8192, 0, TUNED_WARPS[("gelu_quant", 7680)])
    assert split_launch_config(7680) == (8192, 0, row_launch_config(7680)[1])


def test_options_parse_splitrows():
    fastest = PERF_LEVELS["fastest"]
    # in `fastest` since the H100 run in docs/bench/h100_splitrows
    assert [name for name, level in PERF_LEVELS.items() if level.fp8_split_rows] == ["fastest"]
    before = replace(fastest, fp8_split_rows=False)
    assert PerfOptions.level("fastest,splitrows") == fastest
    # the level before, spelled as items (docs/bench/h100_splitrows_confirm timed it against the level)
    old = "safe,compile,graphs,fp8,fp8fuse,fp8resid,qkrope,outquant,fuseadds,crossres,warps"
    assert PerfOptions.level(old) == before
    assert mode_options("fastest+splitrows", "max-autotune") == replace(fastest, compile="max-autotune")
    assert PerfOptions.level("fp8,fp8fuse,splitrows").describe() == "fp8=row,fp8_fused,fp8_split_rows"
    cpu = torch.device("cpu")
    assert PerfOptions.level("fastest,splitrows").for_device(cpu) == PerfOptions(compile="default")
    assert PerfOptions.level("fastest,splitrows").for_device(torch.device("cuda")).fp8_split_rows
    for bad in ("fp8,splitrows", "safe,splitrows", "fast,splitrows", "fastest,splitrows,fp8=tensor"):
        with pytest.raises(ValueError, match="fp8_split_rows extends the fused kernels of fp8_fused"):
            PerfOptions.level(bad)
    assert PerfOptions.level("fastest,fp8=tensor").fp8_split_rows is False
    with pytest.raises(ValueError, match="needs fp8_fused"):
        PerfOptions(fp8="row", fp8_split_rows=True)
    with pytest.raises(ValueError, match="unknown optimisation 'splitrow'.*splitrows"):
        PerfOptions.level("fastest,splitrow")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_rows_model_equals_whole_rows_and_sets_the_flag(dtype, monkeypatch):
    """fastest's fp8 items (fp8 emulated on the CPU, where the kernels' reference runs) with and without splitrows:
    the same output bit for bit; the item sets the FFN's second linear's flag, which reaches the GELU operator, and
    the status says how the rows split (FFN 96 → 64 + 32), or that a width gains nothing (64, a power of two; 112,
    whose 64 + 64 is its whole block)."""
    import streamdit_core.perf as perf

    seen = []
    real = perf.gelu_quantize
    monkeypatch.setattr(perf, "gelu_quantize",
                        lambda h, b, tuned, split: seen.append(split) or real(h, b, tuned, split))
    for ffn_dim, status in ((96, "2 GELU rows of 96 split into blocks of 64 + 32 (instead of 128)"),
                            (64, "no effect: rows of 64 stay whole"), (112, "no effect: rows of 112 stay whole")):
        model = _biased_model(dtype, ffn_dim=ffn_dim)
        args = tiny_inputs(model.config, dtype)
        for base in (FUSED, replace(ADDS, cross_residual=True, qk_fused=True, fp8_out_fused=True, tuned_warps=True)):
            seen.clear()
            expected = run(model, base, *args)
            assert seen == [False] * 2 and not any(b.ffn[2].split_rows for b in model.blocks)
            assert "fp8_split_rows" not in model.perf_status
            seen.clear()
            out = run(model, replace(base, fp8_split_rows=True), *args)
            assert torch.equal(out, expected), (ffn_dim, base)
            assert seen == [True] * 2 and all(b.ffn[2].split_rows and b.ffn[2].prologue == "gelu" for b in model.blocks)
            assert model.perf_status["fp8_split_rows"].startswith(status), model.perf_status["fp8_split_rows"]
            assert "split_rows" in repr(model.blocks[0].ffn[2])
        model.set_perf(base)
        assert not any(b.ffn[2].split_rows for b in model.blocks)


def _check_split_rows_same_values(device, widths, rows):
    """The split row kernel (``quantize_rows_triton(..., split=True)``) stores the same float32 scaled values and
    scales as the whole row in one block (the same maths per element, amax over both pieces), GELU with and without
    bias and the plain quantisation, in bf16 and float32; zero rows included."""
    from streamdit_core.fp8_triton import quantize_rows_triton

    for dtype in (torch.bfloat16, torch.float32):
        for width in widths:
            h = _rows(rows, width, dtype, seed=width, device=device) * 4
            bias = torch.randn(width, generator=torch.Generator().manual_seed(width)).to(dtype).to(device)
            for prologue, b in ((1, None), (1, bias), (0, None)):
                whole = quantize_rows_triton(h, prologue, torch.float32, bias=b)
                split = quantize_rows_triton(h, prologue, torch.float32, bias=b, split=True)
                assert torch.equal(whole[0], split[0]) and torch.equal(whole[1], split[1]), (dtype, width, prologue)
                assert b is not None or not split[0][:2].any()  # zero rows (without a bias) stay zero


@pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1 on a machine without CUDA")
def test_split_rows_kernel_in_interpreter_equals_whole_row():
    g = torch.Generator().manual_seed(7)
    random_widths = torch.randint(17, 2500, (4,), generator=g).tolist()
    _check_split_rows_same_values("cpu", (8960, 3072, 1000, 96, 3, *random_widths), 4)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
def test_split_rows_kernel_on_cuda_equals_whole_row():
    _check_split_rows_same_values("cuda", (8960, 3072, 1536, 5120, 7680, 1000, 96), 64)
