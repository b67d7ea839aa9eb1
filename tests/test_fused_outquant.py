"""Fused inverse window gather + per-row fp8 quantisation of the attention outputs (streamdit_core.fp8_quant
``window_rows_quant``, perf option fp8_out_fused, item outquant).

On the CPU: the reference implementation equals the self-attention's unfused maths (``window_reverse_indexed``, the
roll path's ``window_reverse``, ``flatten`` and the output projection's per-row ``quantize_fp8``) bit for bit, in
bf16 and float32, for random token grids, windows, shifts, odd head counts and head sizes that are not powers of
two, and attention outputs in any memory layout (contiguous, heads-major as SDPA's math kernel leaves them, and
permuted); a model with the item on gives the output of the same items without it bit for bit, with the
self-attention output quantised by the operator and the cross-attention output by the row operator; it is skipped
under autograd and on the roll path, and switching back restores the modules.

The Triton kernel is compared with the reference where it can run: with CUDA (``python -m pytest
tests/test_fused_outquant.py -q`` on a GPU machine with triton: the model's widths), or on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1`` with triton installed), where it stores the reference's float32 scaled values
and scales exactly (stored as float32 and cast to fp8 by torch: the interpreter's own fp8 cast is wrong for values
just below a power of two).
"""

import importlib.util
import os
from dataclasses import replace

import pytest
import torch

import streamdit_core.fp8_quant as fq
import streamdit_core.perf as perf
from streamdit_core.attention import window_index, window_reverse, window_reverse_indexed
from streamdit_core.bench import mode_options
from streamdit_core.fp8_quant import (
    QuantizedActivation,
    triton_problem,
    window_rows_quant_reference,
    window_rows_quantize,
)
from streamdit_core.perf import FP8_MAX, PERF_LEVELS, Fp8Linear, PerfOptions, dequantize_fp8, quantize_fp8

from fused_models import run, tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available() and HAS_TRITON
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()

# memory layouts of the attention output [n, w, h, dh]: the dimension order in memory, outermost first
LAYOUTS = {
    "contiguous": (0, 1, 2, 3),  # cuDNN through streamdit::sdpa_cudnn, flash_attn
    "heads-major": (0, 2, 1, 3),  # [n, h, w, dh] memory seen as [n, w, h, dh] (SDPA's out.transpose(1, 2))
    "permuted": (2, 3, 0, 1),  # no dimension contiguous in the row
}
# (grid, window, shift); window == grid: no gather
WINDOWS = [((2, 4, 4), (1, 2, 2), False), ((2, 4, 4), (1, 2, 2), True), ((2, 4, 6), (2, 2, 3), True),
           ((2, 4, 4), (2, 4, 4), False)]


def _case(b, grid, window, shift, heads, head_dim, dtype, layout, seed=0, device="cpu"):
    """A random attention output ``[b·n_windows, window_tokens, heads, head_dim]`` in the memory ``layout`` (a name
    of ``LAYOUTS`` or a dimension order) and the inverse token order of its windows (``None`` when the window is
    the grid). In token order its rows are spread over three decades, and tokens 0 and L-1 of the first batch
    element are all zero."""
    g = torch.Generator().manual_seed(seed)
    length = grid[0] * grid[1] * grid[2]
    tokens = window[0] * window[1] * window[2]
    rows = torch.randn(b, length, heads, head_dim, generator=g) * torch.logspace(-2, 1, length)[None, :, None, None]
    rows[0, [0, length - 1]] = 0
    index, inverse = window_index(grid, window, shift) if window != grid else (None, None)
    partitioned = rows if index is None else rows.index_select(1, index)  # [b, L, h, dh] in window order
    x = partitioned.reshape(-1, tokens, heads, head_dim).to(dtype)
    order = LAYOUTS[layout] if isinstance(layout, str) else layout
    stored = x.permute(*order).contiguous().to(device)  # the same values in another memory order
    x = stored.permute(*[order.index(i) for i in range(4)])
    assert x.shape == (b * length // tokens, tokens, heads, head_dim)
    assert not isinstance(layout, str) or (layout == "contiguous") == x.is_contiguous()
    return x, None if inverse is None else inverse.to(device)


def _unfused(out, b, grid, window, shift, inverse):
    """``SelfAttention.forward``'s unfused path from the attention output: ``window_reverse_indexed`` (checked
    against the roll path's ``window_reverse``), ``flatten(2)``, then the output projection's ``fp8_linear``
    quantisation. Returns ``(x8 [b·L, D], scale [b·L, 1])``."""
    if inverse is not None:
        gathered = window_reverse_indexed(out, b, inverse)
        assert torch.equal(gathered, window_reverse(out, b, grid, window, shift))
        out = gathered
    x = out.flatten(2)  # [b, L, D]
    return quantize_fp8(x.reshape(-1, x.shape[-1]), True)


def _assert_same(got, want):
    (x8, s), (r8, rs) = got, want
    assert x8.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert x8.shape == r8.shape and s.shape == rs.shape == (r8.shape[0], 1)
    assert torch.equal(x8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(s, rs)


# -- the reference ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("grid,window,shift", WINDOWS)
@pytest.mark.parametrize("b,heads,head_dim", [(1, 3, 16), (2, 5, 8), (2, 2, 20)])
def test_reference_equals_unfused_output_projection_input(dtype, layout, grid, window, shift, b, heads, head_dim):
    out, inverse = _case(b, grid, window, shift, heads, head_dim, dtype, layout, seed=heads)
    expected = _unfused(out, b, grid, window, shift, inverse)
    _assert_same(window_rows_quant_reference(out, inverse), expected)
    # the registered operator through the wrapper: data [b, L, D] and scales [b, L, 1] in token order
    qa = window_rows_quantize(out, inverse)
    length, dim = grid[0] * grid[1] * grid[2], heads * head_dim
    assert isinstance(qa, QuantizedActivation) and qa.dtype == dtype
    assert qa.data.shape == (b, length, dim) and qa.scale.shape == (b, length, 1)
    _assert_same((qa.data.reshape(-1, dim), qa.scale.reshape(-1, 1)), expected)
    zero = torch.tensor(1e-12) / FP8_MAX  # the zero tokens (0 and L-1 of the first batch element)
    assert torch.equal(qa.scale[0, [0, length - 1], 0], zero.expand(2)) and not qa.data[0, 0].float().any()


@pytest.mark.parametrize("seed", range(6))
def test_reference_on_random_shapes_and_strides(seed):
    """Random grids, windows (``effective_window``-style divisors), shifts, batch sizes, head counts and sizes, and
    a random memory order of the attention output."""
    g = torch.Generator().manual_seed(100 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    grid = (pick([1, 2, 3]), pick([2, 4, 6]), pick([2, 3, 4, 6]))
    window = tuple(pick([d for d in range(1, size + 1) if size % d == 0]) for size in grid)
    shift, b = bool(seed % 2), pick([1, 2, 3])
    heads, head_dim = pick([1, 3, 5, 7]), pick([4, 6, 8, 12])
    order = tuple(torch.randperm(4, generator=g).tolist())
    out, inverse = _case(b, grid, window, shift, heads, head_dim, torch.bfloat16, order, seed=seed)
    expected = _unfused(out, b, grid, window, shift, inverse)
    _assert_same(window_rows_quant_reference(out, inverse), expected)
    qa = window_rows_quantize(out, inverse)
    _assert_same((qa.data.reshape(-1, heads * head_dim), qa.scale.reshape(-1, 1)), expected)


def test_window_rows_quantize_checks_its_arguments():
    out, inverse = _case(2, (2, 4, 4), (1, 2, 2), True, 3, 16, torch.float32, "contiguous")
    assert inverse is not None
    for bad in ((out.flatten(2), inverse), (out, inverse[:6]), (out, inverse[:, None]), (out[:3], inverse)):
        with pytest.raises(ValueError, match="window_rows_quantize needs"):
            window_rows_quantize(*bad)


# -- the model with the fused operators ---------------------------------------------------------------------------


FUSED = PerfOptions(fp8="row", fp8_fused=True)
# `fastest` without compile and CUDA graphs (which the CPU does not run): the same items, eager
FASTEST = replace(PERF_LEVELS["fastest"], compile="off", cuda_graphs=False)


def _counting(monkeypatch):
    """Count the fp8 quantisations of the unfused linears (``perf.quantize_fp8``, in ``fp8_linear``) and of the
    fused operators' references (``fp8_quant.quantize_fp8``), and the reference's inverse window gathers."""
    calls = {"linear": 0, "fused": 0, "gather": 0}

    def counting(key, real):
        def fn(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)
        return fn

    monkeypatch.setattr(perf, "quantize_fp8", counting("linear", quantize_fp8))
    monkeypatch.setattr(fq, "quantize_fp8", counting("fused", quantize_fp8))
    monkeypatch.setattr(fq, "window_reverse_indexed", counting("gather", window_reverse_indexed))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base,window,batch,kv,fused", [
    (FASTEST, None, 1, True, (2, 1)),  # windows by gather, q/k/v fused (qkrope), cached cross-attention
    (FASTEST, (4, 4, 4), 2, True, (2, 0)),  # the window is the whole grid: no gather
    (FUSED, None, 2, True, (2, 1)),  # fp8_fused alone
    (FUSED, None, 1, False, (2, 1)),  # uncached cross-attention (CrossAttention.forward)
    (replace(FASTEST, window_gather=False, qk_fused=False), None, 1, True, (1, 0)),  # the roll path: only cross o
], ids=["fastest", "full", "fp8fuse-b2", "uncached", "roll"])
def test_fused_model_equals_unfused(dtype, base, window, batch, kv, fused, monkeypatch):
    """``fused``: per block, the output quantisations that move from the linears to the operators, and the
    inverse gathers in the window operator's reference."""
    model = tiny_model(dtype)
    x, sigma, ctx = tiny_inputs(model.config, dtype, batch)
    base = replace(base, text_kv_cache=kv)
    blocks = len(model.blocks)
    totals = {}
    outs = {}
    for on in (False, True):
        options = replace(base, fp8_out_fused=on)
        model.set_perf(options)
        calls = _counting(monkeypatch)
        with torch.inference_mode():
            outs[on] = model(x, sigma, ctx, window)
        monkeypatch.undo()
        totals[on] = calls
    assert torch.equal(outs[True], outs[False])
    moved, gathers = fused
    assert totals[False]["linear"] - totals[True]["linear"] == moved * blocks
    assert totals[True]["fused"] - totals[False]["fused"] == moved * blocks
    assert totals[True]["gather"] == gathers * blocks
    status = model.perf_status["fp8_out_fused"]
    assert status.startswith(f"{blocks} self-attention outputs") and ("roll path" in status) is (moved == 1)
    block = model.blocks[0]
    assert block.self_attn.fused_out_quant and block.cross_attn.o.single_pass
    assert isinstance(block.self_attn.o, Fp8Linear) and not block.self_attn.o.single_pass


def test_fused_operator_stays_out_of_autograd(monkeypatch):
    """Under autograd the self-attention's output projection quantises its input itself (the operator has no
    backward); the result is the same."""
    model = tiny_model()
    args = tiny_inputs(model.config)
    expected = run(model, FUSED, *args)
    model.set_perf(replace(FUSED, fp8_out_fused=True))
    calls = _counting(monkeypatch)
    out = model(*args)
    assert calls["gather"] == 0 and torch.allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_switching_off_restores_modules_and_state_dict():
    model = tiny_model()
    args = tiny_inputs(model.config)
    keys, params = set(model.state_dict()), dict(model.named_parameters())
    plain = run(model, PerfOptions.plain(), *args)
    on = replace(FASTEST, fp8_out_fused=True)
    for options in (on, FASTEST, PerfOptions.plain(), on, PerfOptions(fp8="tensor"), FUSED):
        model.set_perf(options)
        block = model.blocks[0]
        assert block.self_attn.fused_out_quant is options.fp8_out_fused
        assert ("fp8_out_fused" in model.perf_status) is options.fp8_out_fused
        if isinstance(block.cross_attn.o, Fp8Linear):
            assert block.cross_attn.o.single_pass is options.fp8_out_fused
        assert set(model.state_dict()) == keys and all(p is params[n] for n, p in model.named_parameters())
    model.set_perf(PerfOptions.plain())
    assert not model.blocks[0].self_attn.fused_out_quant
    assert torch.equal(run(model, PerfOptions.plain(), *args), plain)


def test_options_parse_outquant():
    fastest = PERF_LEVELS["fastest"]
    # in `fastest` since the H100 run in docs/bench/h100_outquant_fuseadds
    assert [name for name, level in PERF_LEVELS.items() if level.fp8_out_fused] == ["fastest"]
    before = replace(fastest, fp8_out_fused=False)
    assert PerfOptions.level("fastest,outquant") == fastest == replace(before, fp8_out_fused=True)
    assert mode_options("fastest+outquant", "default") == fastest
    assert mode_options("fastest+outquant", "max-autotune") == replace(fastest, compile="max-autotune")
    assert PerfOptions.level("fp8,fp8fuse,outquant").describe() == "fp8=row,fp8_fused,fp8_out_fused"
    assert PerfOptions.level("fastest,outquant").for_device(torch.device("cpu")) == PerfOptions(compile="default")
    assert PerfOptions.level("fastest,outquant").for_device(torch.device("cuda")) == fastest
    for bad in ("fp8,outquant", "safe,fp8=row,outquant", "fast,outquant", "fastest,outquant,fp8=tensor"):
        with pytest.raises(ValueError, match="fp8_out_fused extends the fused kernels of fp8_fused"):
            PerfOptions.level(bad)
    with pytest.raises(ValueError, match="fp8_out_fused extends"):
        PerfOptions(fp8="row", fp8_out_fused=True)
    with pytest.raises(ValueError, match="unknown optimisation 'outquant=1'"):
        PerfOptions.level("fastest,outquant=1")


# -- the Triton kernel --------------------------------------------------------------------------------------------


def _scaled_reference(out, inverse):
    """The reference's float32 values before the fp8 cast, ``(y [b·L, D], scale [b·L, 1])``."""
    windows, tokens, heads, head_dim = out.shape
    rows = out if inverse is None else window_reverse_indexed(out, windows * tokens // inverse.shape[0], inverse)
    xf = rows.flatten(2).reshape(-1, heads * head_dim).float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX), scale


def test_scaled_reference_is_the_reference_before_its_cast():
    out, inverse = _case(2, (2, 4, 4), (1, 2, 2), True, 3, 16, torch.bfloat16, "heads-major")
    y, s = _scaled_reference(out, inverse)
    _assert_same((y.to(torch.float8_e4m3fn), s), window_rows_quant_reference(out, inverse))


@pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1 on a machine without CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_in_interpreter_matches_reference(dtype):
    from streamdit_core.fp8_triton import window_rows_quant_triton

    cases = [(2, *WINDOWS[1], 3, 16, "contiguous"), (1, *WINDOWS[0], 5, 8, "heads-major"),
             (2, *WINDOWS[2], 2, 20, "permuted"), (2, *WINDOWS[3], 3, 16, "heads-major"),
             (1, *WINDOWS[2], 7, 12, "contiguous")]
    for b, grid, window, shift, heads, head_dim, layout in cases:
        out, inverse = _case(b, grid, window, shift, heads, head_dim, dtype, layout, seed=heads)
        y, s = window_rows_quant_triton(out, inverse, out_dtype=torch.float32)
        ry, rs = _scaled_reference(out, inverse)
        assert y.shape == ry.shape and s.shape == rs.shape
        assert torch.equal(s, rs) and torch.equal(y, ry), (grid, window, heads, head_dim, layout)
        _assert_same((y.to(torch.float8_e4m3fn), s), window_rows_quant_reference(out, inverse))


@pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1 on a machine without CUDA")
def test_operator_kernel_branch_in_interpreter(monkeypatch):
    """The registered operator's CUDA branch (argument preparation and launch, the input in its own strides) on CPU
    tensors, run by the interpreter (float32 stores cast to fp8 by torch): the reference bit for bit."""
    assert triton_problem() is None
    launches = [0]
    launch = fq._launch_window

    def float32_stores(x, inverse):
        launches[0] += 1
        y, s = launch(x, inverse, out_dtype=torch.float32)
        return y.to(torch.float8_e4m3fn), s

    monkeypatch.setattr(fq, "_kernel_device", lambda t: True)
    monkeypatch.setattr(fq, "_launch_window", float32_stores)
    for grid, window, shift in WINDOWS[1:]:
        for layout in ("contiguous", "permuted"):
            out, inverse = _case(2, grid, window, shift, 3, 16, torch.bfloat16, layout)
            qa = window_rows_quantize(out, inverse)
            expected = _unfused(out, 2, grid, window, shift, inverse)
            _assert_same((qa.data.reshape(-1, 48), qa.scale.reshape(-1, 1)), expected)
    assert launches[0] == 6


def _assert_kernel_close(got, ref, min_equal=0.99):
    """On the GPU Triton's float32 division may round differently from torch's: scales within 2⁻²² relative,
    dequantised values within one e4m3 step, nearly all fp8 codes equal."""
    (x8, s), (r8, rs) = got, ref
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == r8.shape and s.shape == rs.shape
    assert ((s - rs).abs() <= rs * 2.0**-22).all()
    back, ref_back = dequantize_fp8(x8, s).double(), dequantize_fp8(r8, rs).double()
    assert ((back - ref_back).abs() <= ref_back.abs() * 2.0**-3 + rs.double() * 2.0**-8).all()
    assert (x8.view(torch.uint8) == r8.view(torch.uint8)).double().mean().item() >= min_equal


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_kernel_on_cuda_matches_reference(dtype):
    """The model's widths (paper scale 24 × 128, Wan 1.3B 12 × 128, Wan 14B 40 × 128) on 512 tokens, in each memory
    layout, shifted windows and the whole grid; through the launcher and the registered operator."""
    from streamdit_core.fp8_triton import window_rows_quant_triton

    assert triton_problem() is None
    grid, window = (4, 8, 16), (2, 4, 8)
    for heads in (24, 12, 40):
        for layout in LAYOUTS:
            for b, win, shift in ((2, window, True), (1, grid, False)):
                out, inverse = _case(b, grid, win, shift, heads, 128, dtype, layout, device="cuda")
                ref = window_rows_quant_reference(out, inverse)
                _assert_kernel_close(window_rows_quant_triton(out, inverse), ref)
                qa = window_rows_quantize(out, inverse)
                _assert_kernel_close((qa.data.reshape(ref[0].shape), qa.scale.reshape(-1, 1)), ref)
