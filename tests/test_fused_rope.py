"""Fused q/k RMS norm + RoPE + window gather (streamdit_core.qk_rope, perf option qk_fused, item qkrope).

On the CPU: the reference implementation equals the self-attention's unfused maths (the model's RMSNorm modules,
apply_rope, the window partition by gather and by roll) bit for bit, in bf16 and float32, for one and two batch
elements, shifted and unshifted windows and windows that are the whole grid, with and without the fp8 linears'
pending biases and the q/k norms; a model with the item on gives the unfused output bit for bit (bf16 and fp8
linears included), the operator is skipped under autograd and on the roll path, and switching back restores the
modules.

The Triton kernel is compared with the reference where it can run: with CUDA (``python -m pytest
tests/test_fused_rope.py -q`` on a GPU machine with triton: the model's widths, and a small model compiled with CUDA
graphs), or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1`` with triton installed; small widths, the
interpreter is slow), where it also equals the same maths with the interpreter's truncating bf16 rounding.
"""

import importlib.util
import os
from dataclasses import replace

import pytest
import torch
from torch import nn

import streamdit_core.qk_rope as qk_rope
from streamdit_core.attention import window_index, window_partition, window_partition_indexed
from streamdit_core.bench import mode_options
from streamdit_core.model import RMSNorm, apply_rope, rope_frequencies
from streamdit_core.perf import PERF_LEVELS, Fp8Linear, PerfOptions
from streamdit_core.qk_rope import qk_norm_rope, qk_norm_rope_reference, triton_problem

from fused_models import assert_compiled_and_graphed_equal, run, tiny_inputs, tiny_model, wan_like_cuda

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available() and HAS_TRITON
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
EPS = 1e-6

# (grid, window, shift); window == grid: no gather
LAYOUTS = [((2, 4, 4), (1, 2, 2), False), ((2, 4, 4), (1, 2, 2), True), ((2, 4, 4), (2, 4, 4), False)]


def _case(b, grid, heads, head_dim, dtype, seed=0, device="cpu", weight_dtype=None):
    """Projection outputs ``q, k, v`` ``[b, L, D]`` (offset, spread over a decade, two rows of q + bias zero), their
    biases and RMS norm weights ``[D]`` away from 0 and 1, and the model's RoPE tables of ``grid``."""
    g = torch.Generator().manual_seed(seed)
    length, dim = grid[0] * grid[1] * grid[2], heads * head_dim
    spread = torch.logspace(-1, 0.5, length)[None, :, None]
    q, k, v = ((torch.randn(b, length, dim, generator=g) * spread + 0.3).to(dtype) for _ in range(3))
    biases = tuple((0.3 * torch.randn(dim, generator=g)).to(dtype) for _ in range(3))
    weights = tuple((1 + 0.3 * torch.randn(dim, generator=g)).to(weight_dtype or dtype) for _ in range(2))
    q[0, :2] = -biases[0]  # q + bias = 0: the norm's zero rows
    angles = rope_frequencies(head_dim, grid, 10000.0, torch.device("cpu"))
    rope = (torch.cos(angles).float(), torch.sin(angles).float())
    return tuple(tuple(t.to(device) for t in ts) for ts in ((q, k, v), biases, weights, rope))


def _unfused(q, k, v, biases, weights, rope, heads, grid, window, shift, index):
    """``SelfAttention.forward``'s unfused maths with the model's own modules: bias (an Fp8Linear's output dtype),
    ``RMSNorm``, ``apply_rope``, then ``window_partition_indexed``; the roll path's partition must agree."""
    tokens = window[0] * window[1] * window[2]
    outs = []
    for i, (t, bias) in enumerate(zip((q, k, v), biases or (None,) * 3)):
        t = t if bias is None else t + bias.to(t.dtype)
        if i < 2 and weights is not None:
            norm = RMSNorm(t.shape[-1], EPS).to(t.device, weights[i].dtype)
            norm.weight.data.copy_(weights[i])
            t = norm(t)
        t = t.unflatten(-1, (heads, -1))  # [b, L, h, dh]
        if i < 2:
            t = apply_rope(t, *rope)
        if index is not None:
            gathered = window_partition_indexed(t, index, tokens)  # [b·nw, w, h, dh]
            assert torch.equal(gathered, window_partition(t, grid, window, shift))
            t = gathered
        outs.append(t)
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("grid,window,shift", LAYOUTS)
@pytest.mark.parametrize("biased,normed", [(True, True), (False, True), (False, False)])
def test_reference_equals_unfused_self_attention_maths(dtype, b, grid, window, shift, biased, normed):
    heads, head_dim = 3, 16
    (q, k, v), biases, weights, rope = _case(b, grid, heads, head_dim, dtype)
    gather = window != grid
    index = window_index(grid, window, shift)[0] if gather else None
    tokens = window[0] * window[1] * window[2]
    biases, weights = (biases if biased else None), (weights if normed else None)
    expected = _unfused(q, k, v, biases, weights, rope, heads, grid, window, shift, index)
    ref = qk_norm_rope_reference(q, k, v, *(biases or (None,) * 3), *(weights or (None, None)), *rope, index, EPS)
    for got, want in zip(ref, expected):
        assert got.shape == (q.shape[0] * q.shape[1], q.shape[2]) and got.dtype == want.dtype == dtype
        assert torch.equal(got, want.reshape(got.shape))
    # the registered operator through the wrapper: the attention layout, v through the operator only when it is
    # gathered or has a bias
    outs = qk_norm_rope(q, k, v, rope, weights, EPS, biases, index, tokens if gather else None)
    for got, want in zip(outs, expected):
        assert got.shape == want.shape and torch.equal(got, want)
    assert (outs[2].data_ptr() == v.data_ptr()) is (not gather and not biased)
    if gather:
        assert all(t.shape == (b * 8, tokens, heads, head_dim) and t.is_contiguous() for t in outs)  # 8 windows


def test_reference_norm_product_dtype_and_zero_rows():
    """Weights in float32 with bf16 projections: like ``RMSNorm``, the norm is rounded to bf16 and the product (and
    so RoPE) is float32; rows that are zero after the bias stay zero."""
    (q, k, v), biases, weights, rope = _case(1, (1, 2, 4), 2, 8, torch.bfloat16, weight_dtype=torch.float32)
    expected = _unfused(q, k, v, biases, weights, rope, 2, (1, 2, 4), (1, 2, 4), False, None)
    outs = qk_norm_rope(q, k, v, rope, weights, EPS, biases)
    assert [t.dtype for t in outs] == [torch.float32, torch.float32, torch.bfloat16]
    assert all(torch.equal(got, want) for got, want in zip(outs, expected))
    assert not outs[0][0, :2].any()


def test_qk_norm_rope_checks_its_arguments():
    (q, k, v), biases, weights, rope = _case(2, (2, 4, 4), 2, 8, torch.float32)
    index = window_index((2, 4, 4), (1, 2, 2), False)[0]
    bad = (
        ((q, k[:, :8], v, rope, weights), {}, "q, k, v"),  # k of another length
        ((q, k, v.double(), rope, weights), {}, "one dtype"),
        ((q, k, v, (rope[0][:8], rope[1][:8]), weights), {}, "cos/sin"),  # RoPE of another grid
        ((q, k, v, (rope[0][:, :3], rope[1][:, :3]), weights), {}, "head_dim dividing D"),  # 6 does not divide 16
        ((q, k, v, rope, (weights[0], weights[1].double())), {}, "one dtype"),
        ((q, k, v, rope, (weights[0][:8], weights[1][:8])), {}, r"must be \[16\]"),
        ((q, k, v, rope, weights), {"biases": (biases[0][:8],) * 3}, r"must be \[16\]"),
        ((q, k, v, rope, weights), {"index": index}, "window_tokens"),
        ((q, k, v, rope, weights), {"index": index, "window_tokens": 5}, "window_tokens"),
    )
    for args, kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            qk_norm_rope(*args, EPS, **kwargs)


# -- the model with the fused operator ----------------------------------------------------------------------------


def _count_reference_calls(monkeypatch):
    """Count the reference implementation's RoPE calls (two per fused block: q and k). The unfused path calls the
    model's own ``apply_rope``, not this module attribute."""
    calls = [0]

    def counting(*args):
        calls[0] += 1
        return apply_rope(*args)

    monkeypatch.setattr(qk_rope, "apply_rope", counting)
    return calls


FP8 = PerfOptions(fp8="row")
FUSED_FP8 = replace(FP8, fp8_fused=True, fp8_residual=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base,window,batch,fused_blocks", [
    (PerfOptions(), None, 1, 2),  # safe: windows by gather
    (PerfOptions(), (4, 4, 4), 2, 2),  # the window is the whole grid: no gather
    (FP8, None, 2, 2),  # fp8 linears (emulated): their biases pending, added in the operator
    (FUSED_FP8, None, 1, 2),  # with the fused fp8 quantisation of the self-attention input
    (PerfOptions(window_gather=False), None, 1, 0),  # the roll path stays unfused
    (PerfOptions(window_gather=False), (4, 4, 4), 1, 2),  # ... but a window of the whole grid has no roll
    (replace(FP8, window_gather=False), None, 1, 0),  # the roll path adds the fp8 linears' pending biases itself
], ids=["safe", "full", "fp8-b2", "fastest", "roll", "roll-full", "fp8-roll"])
def test_fused_model_equals_unfused(dtype, base, window, batch, fused_blocks, monkeypatch):
    model = tiny_model(dtype)
    x, sigma, ctx = tiny_inputs(model.config, dtype, batch)
    expected = run(model, base, x, sigma, ctx, window)
    calls = _count_reference_calls(monkeypatch)
    got = run(model, replace(base, qk_fused=True), x, sigma, ctx, window)
    assert calls[0] == 2 * fused_blocks
    assert torch.equal(got, expected)
    assert model.perf_status["qk_fused"].startswith("2 blocks")
    attn = model.blocks[0].self_attn
    assert attn.fused_qk_rope
    if base.fp8 != "off":
        assert all(isinstance(m, Fp8Linear) and m.defer_bias for m in (attn.q, attn.k, attn.v))
        assert not attn.o.defer_bias


def test_fused_model_without_qk_norm_equals_unfused(monkeypatch):
    model = tiny_model(qk_norm=False)
    args = tiny_inputs(model.config)
    expected = run(model, FP8, *args)
    calls = _count_reference_calls(monkeypatch)
    assert torch.equal(run(model, replace(FP8, qk_fused=True), *args), expected)
    assert calls[0] == 4 and all(b.self_attn.fused_qk_rope for b in model.blocks)


def test_fused_operator_stays_out_of_autograd(monkeypatch):
    """Under autograd the unfused path runs (the operator has no backward), and fp8 linears' pending biases are
    added by the self-attention itself."""
    model = tiny_model()
    args = tiny_inputs(model.config)
    for options in (PerfOptions(), FP8):
        expected = run(model, options, *args)
        model.set_perf(replace(options, qk_fused=True))
        calls = _count_reference_calls(monkeypatch)
        out = model(*args)
        assert calls[0] == 0 and torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
        out.square().mean().backward()
        assert model.blocks[0].self_attn.norm_q.weight.grad is not None
        model.zero_grad()
        monkeypatch.undo()


def test_switching_off_restores_modules_and_state_dict():
    model = tiny_model()
    args = tiny_inputs(model.config)
    keys, params = set(model.state_dict()), dict(model.named_parameters())
    plain = run(model, PerfOptions.plain(), *args)
    fused = replace(FUSED_FP8, qk_fused=True)
    for options in (fused, FUSED_FP8, PerfOptions(qk_fused=True), PerfOptions.plain(), fused, FP8):
        model.set_perf(options)
        attn = model.blocks[0].self_attn
        assert attn.fused_qk_rope is options.qk_fused
        assert ("qk_fused" in model.perf_status) is options.qk_fused
        if options.fp8 != "off":
            assert attn.q.defer_bias is options.qk_fused and attn.v.defer_bias is options.qk_fused
        assert set(model.state_dict()) == keys and all(p is params[n] for n, p in model.named_parameters())
    assert torch.equal(run(model, PerfOptions.plain(), *args), plain)
    assert type(model.blocks[0].self_attn.q) is nn.Linear


@pytest.mark.skipif(os.environ.get("STREAMDIT_TEST_COMPILE") != "1", reason="CPU compile takes ~30 s; opt in")
def test_compiled_model_with_fused_operator_equals_eager():
    """The operator inside compiled blocks (its fake implementation, or the triton_op traced): no graph break but
    the intended one around the cached cross-attention, with and without fp8 linears."""
    from torch._dynamo.utils import counters

    model = tiny_model()
    args = tiny_inputs(model.config, batch=2)
    for options in (PerfOptions(), FUSED_FP8):
        expected = run(model, options, *args)
        counters.clear()
        got = run(model, replace(options, compile="default", qk_fused=True), *args)
        assert model.perf_status["compile"] == "default" and model.blocks[0].self_attn.fused_qk_rope
        assert all("attend_runs" in reason for reason in counters["graph_break"]), list(counters["graph_break"])
        assert torch.allclose(got, expected, atol=1e-4)


def test_options_parse_qkrope():
    # in `fast` and `fastest` since the H100 run in docs/bench/h100_fused_rope_norm
    assert [name for name, level in PERF_LEVELS.items() if level.qk_fused] == ["fast", "fastest"]
    compiled = PerfOptions(compile="default", cuda_graphs=True)
    assert PerfOptions.level("safe,qkrope") == PerfOptions(qk_fused=True)
    assert mode_options("safe+qkrope", "default") == PerfOptions(qk_fused=True)
    assert mode_options("fastest+qkrope", "max-autotune") == replace(PERF_LEVELS["fastest"], compile="max-autotune")
    assert PerfOptions.level("kv,layout,gather,qkrope").describe() == (
        "text_kv_cache,layout_cache,window_gather,qk_fused")
    assert PerfOptions.level("fast").for_device(torch.device("cpu")) == replace(compiled, cuda_graphs=False)
    with pytest.raises(ValueError, match="unknown optimisation 'qkrope=1'"):
        PerfOptions.level("fast,qkrope=1")


# -- the Triton kernel ----------------------------------------------------------------------------------------


def _rows_of(table, index, b, length, dim):
    """A ``[L, dh/2]`` RoPE table per output row and column ``[b·L, D]``: the source token's angle of each pair."""
    tokens = torch.arange(length, device=table.device) if index is None else index
    return table[tokens].repeat_interleave(2, dim=-1).repeat(b, dim // (2 * table.shape[1]))


def _assert_rope_close(got, ref, pre, rope, index, b, unit, min_equal=0.0):
    """q or k rows ``[b·L, D]`` from the kernel against the reference: within ``unit·(2·(|x_c·cos| + |x_p·sin|) +
    |ref|)`` (two steps of the rotation's inputs, one of the result; ``pre`` the reference's normalised rows before
    RoPE, ``x_p`` the pair partner), and at least ``min_equal`` of the values identical."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    rows, dim = ref.shape
    c, s = (_rows_of(t, index, b, rows // b, dim).abs().double() for t in rope)
    pre = pre.double()
    partner = pre.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    bound = unit * (2 * (pre.abs() * c + partner.abs() * s) + ref.double().abs())
    assert ((got.double() - ref.double()).abs() <= bound).all()
    assert (got == ref).double().mean().item() >= min_equal


def _check_kernel(launch, b, grid, window, shift, heads, head_dim, dtype, device, biased=True, normed=True,
                  with_v=True, min_equal=0.0, v_exact=True, unit=None):
    """The launcher against the reference on one case (``unit``: of :func:`_assert_rope_close`, by default 2⁻⁷ for
    bf16 and 2⁻²⁰ for float32); returns the kernel's outputs and the reference's."""
    (q, k, v), biases, weights, rope = _case(b, grid, heads, head_dim, dtype, seed=heads, device=device)
    index = window_index(grid, window, shift, device)[0] if window != grid else None
    biases = biases if biased else (None, None, None)
    weights = weights if normed else (None, None)
    v = v if with_v else None
    got = launch(q, k, v, *rope, EPS, biases, None if weights[0] is None else weights, index)
    ref = qk_norm_rope_reference(q, k, v, *biases, *weights, *rope, index, EPS)
    pre = qk_norm_rope_reference(q, k, None, *biases, *weights, torch.ones_like(rope[0]), torch.zeros_like(rope[1]),
                                 index, EPS)
    assert len(got) == len(ref) == (3 if with_v else 2)
    unit = unit or (2.0**-7 if dtype == torch.bfloat16 else 2.0**-20)
    for i in range(2):
        _assert_rope_close(got[i], ref[i], pre[i], rope, index, b, unit, min_equal)
    if with_v:
        step = 0.0 if v_exact or biases[2] is None else unit
        assert got[2].dtype == dtype and ((got[2] - ref[2]).abs() <= step * ref[2].abs()).all()
    return got, ref


def _truncate_bf16(x):
    """float32 → bf16 by dropping the low 16 bits (Triton's interpreter rounds this way), back as float32."""
    return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


def _emulated(q, bias, weight, rope, index, round_bf16):
    """The kernel's maths for one bf16 tensor in float32 with ``round_bf16`` at each rounding: rows ``[b·L, D]``."""
    x = round_bf16(q.float() + bias.float())
    x = round_bf16(round_bf16(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)) * weight.float())
    if index is not None:
        x = x.index_select(1, index)
    b, length, dim = x.shape
    c, s = (_rows_of(t, index, b, length, dim).reshape(b, length, dim) for t in rope)
    partner = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    sign = torch.tensor([-1.0, 1.0]).repeat(dim // 2)
    return round_bf16(x * c + (sign * partner) * s).reshape(-1, dim)


def test_emulated_kernel_maths_with_bf16_rounding_equals_reference():
    """The emulation the interpreter test uses, with round-to-nearest, is the reference bit for bit."""
    (q, k, v), biases, weights, rope = _case(2, (2, 4, 4), 3, 16, torch.bfloat16)
    index = window_index((2, 4, 4), (1, 2, 2), True)[0]
    ref = qk_norm_rope_reference(q, k, None, *biases[:2], None, *weights, *rope, index, EPS)
    assert torch.equal(_emulated(q, biases[0], weights[0], rope, index, lambda x: x.bfloat16().float()),
                       ref[0].float())


@pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1 on a machine without CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_in_interpreter_matches_reference(dtype):
    from streamdit_core.rope_triton import qkv_rows_triton

    # the interpreter truncates float32 → bf16 (the GPU rounds to nearest even): about half of the bf16 values land
    # one step lower at each rounding, and the four roundings (bias, norm, weight, RoPE) err in the same direction,
    # so the tolerance is twice the GPU's here; the truncating emulation below is the exact check
    bf16 = dtype == torch.bfloat16
    unit = 2.0**-6 if bf16 else None
    for b, (grid, window, shift) in zip((2, 1, 2), LAYOUTS):
        for heads, head_dim in ((3, 16), (2, 20)):  # widths 48 and 40 (a masked tail of the power-of-two block)
            _check_kernel(qkv_rows_triton, b, grid, window, shift, heads, head_dim, dtype, "cpu", v_exact=not bf16,
                          unit=unit)
    for biased, normed, with_v in ((False, True, True), (True, False, False), (False, False, False)):
        _check_kernel(qkv_rows_triton, 2, (2, 4, 4), (1, 2, 2), True, 3, 16, dtype, "cpu", biased, normed, with_v,
                      v_exact=not bf16, unit=unit)
    if bf16:
        (q, k, v), biases, weights, rope = _case(2, (2, 4, 4), 3, 16, dtype)
        index = window_index((2, 4, 4), (1, 2, 2), True)[0]
        got = qkv_rows_triton(q, k, None, *rope, EPS, (biases[0], biases[1], None), weights, index)[0].float()
        emulated = _emulated(q, biases[0], weights[0], rope, index, _truncate_bf16)
        assert (got == emulated).double().mean().item() >= 0.99  # the sum of squares in another order
        assert ((got - emulated).abs() <= 2.0**-7 * emulated.abs()).all()


@pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1 on a machine without CUDA")
def test_operator_kernel_branch_in_interpreter(monkeypatch):
    """The registered operator's CUDA branch (argument preparation and launch) on CPU tensors, run by the
    interpreter: the wrapper's layouts and the reference's values within the tolerance."""
    assert triton_problem() is None
    launches = [0]
    launch = qk_rope._launch

    def counting(*args):
        launches[0] += 1
        return launch(*args)

    monkeypatch.setattr(qk_rope, "_kernel_device", lambda t: True)
    monkeypatch.setattr(qk_rope, "_launch", counting)
    (q, k, v), biases, weights, rope = _case(2, (2, 4, 4), 3, 16, torch.float32)
    index = window_index((2, 4, 4), (1, 2, 2), True)[0]
    for args in ((biases, index, 4), (None, index, 4), (biases, None, None), (None, None, None)):
        outs = qk_norm_rope(q, k, v, (rope[0], rope[1]), weights, EPS, *args)
        ref = qk_norm_rope_reference(q, k, v, *(args[0] or (None,) * 3), *weights, *rope, args[1], EPS)
        pre = qk_norm_rope_reference(q, k, None, *(args[0] or (None,) * 3)[:2], None, *weights,
                                     torch.ones_like(rope[0]), torch.zeros_like(rope[1]), args[1], EPS)
        for i in range(2):
            _assert_rope_close(outs[i].reshape(ref[i].shape), ref[i], pre[i], rope, args[1], 2, 2.0**-20)
        assert torch.equal(outs[2].reshape(ref[2].shape), ref[2])
    assert launches[0] == 4


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_kernel_on_cuda_matches_reference(dtype):
    """The model's widths (paper scale 3072 = 24 × 128, Wan 1.3B 1536 = 12 × 128, Wan 14B 5120 = 40 × 128) on
    512 tokens; bf16: ≥ 99 % of the q/k values identical to the reference, v identical."""
    from streamdit_core.rope_triton import qkv_rows_triton

    assert triton_problem() is None
    min_equal = 0.99 if dtype == torch.bfloat16 else 0.0
    grid, window = (4, 8, 16), (2, 4, 8)
    for heads in (24, 12, 40):
        for b, win, shift in ((2, window, True), (1, window, False), (2, grid, False)):
            _check_kernel(qkv_rows_triton, b, grid, win, shift, heads, 128, dtype, "cuda", min_equal=min_equal)
    _check_kernel(qkv_rows_triton, 2, grid, window, True, 24, 128, dtype, "cuda", biased=False, normed=False,
                  min_equal=min_equal)
    # through the registered operator (the CUDA branch of the triton_op) and the wrapper
    (q, k, v), biases, weights, rope = _case(2, grid, 24, 128, dtype, device="cuda")
    index = window_index(grid, window, True, "cuda")[0]
    outs = qk_norm_rope(q, k, v, rope, weights, EPS, biases, index, 64)
    ref = qk_norm_rope_reference(q, k, v, *biases, *weights, *rope, index, EPS)
    pre = qk_norm_rope_reference(q, k, None, *biases[:2], None, *weights, torch.ones_like(rope[0]),
                                 torch.zeros_like(rope[1]), index, EPS)
    assert outs[0].shape == (2 * 8, 64, 24, 128)
    for i in range(2):
        _assert_rope_close(outs[i].reshape(ref[i].shape), ref[i], pre[i], rope, index, 2,
                           2.0**-7 if dtype == torch.bfloat16 else 2.0**-20, min_equal)
    assert torch.equal(outs[2].reshape(ref[2].shape), ref[2])


@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("level", ["fast", "fastest"])
def test_fused_model_compiled_and_graphed_on_cuda_equals_eager(level):
    """``fast``/``fastest`` + qkrope: compiled blocks (no graph break but the intended one around the cached
    cross-attention) and the CUDA graph replay give the eager fused output to bf16 rounding, and the fused output is
    close to the unfused one of the same level."""
    model, args = wan_like_cuda()
    options = replace(PERF_LEVELS[level], qk_fused=True)
    eager_options = replace(options, compile="off", cuda_graphs=False)
    eager = run(model, eager_options, *args).float()
    assert model.perf_status["qk_fused"] == "2 blocks; Triton kernel"
    unfused = run(model, replace(eager_options, qk_fused=False), *args).float()
    assert ((eager - unfused).norm() / unfused.norm()).item() < 0.01
    assert_compiled_and_graphed_equal(model, options, args, eager)
