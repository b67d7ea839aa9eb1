"""Inference speed-ups (streamdit_core.perf) against the plain path, on the CPU.

Each optimisation is compared with an independent reference: window attention by partition against dense
attention with a window mask; cached text keys/values and cached RoPE/time embeddings against recomputing
them (plain path); fp8 linears against the float32 matmul, within the bound that e4m3 rounding implies.
torch.compile is compared only with STREAMDIT_TEST_COMPILE=1 (a CPU compile takes ~20 s). CUDA graphs and
the cuDNN kernel need a GPU: `python -m streamdit_core bench` checks them (relative error column). Window
partitioning by gather (in every level but ``plain``) is compared bit for bit with the roll path.
"""

import os
import sys
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
from torch import nn

from streamdit_core import bench, gpu_clocks
from streamdit_core.attention import (
    attention,
    window_index,
    window_partition,
    window_partition_indexed,
    window_reverse,
    window_reverse_indexed,
)
from streamdit_core.bench import (
    CASES,
    BenchCase,
    floors,
    median_ms,
    mode_options,
    model_flops,
    round_order,
    run_case,
    to_markdown,
)
from streamdit_core.config import preset
from streamdit_core.gpu_clocks import (
    ClockSample,
    ClockSampler,
    nvidia_smi_command,
    parse_clock_samples,
    summarize_clocks,
)
from streamdit_core.model import StreamDiT
from streamdit_core.perf import (
    FP8_MAX,
    PERF_LEVELS,
    Fp8Linear,
    PerfOptions,
    dequantize_fp8,
    quantize_fp8,
)
from streamdit_core.pipeline import placeholder_pipeline
from streamdit_core.prompts import parse_schedule
from streamdit_core.sampler import StreamSampler
from streamdit_core.schedule import Partition

pytestmark = pytest.mark.usefixtures("one_thread")

PLAIN = PerfOptions.plain()


def _model(window=(2, 2, 2), seed=0):
    torch.manual_seed(seed)
    model = StreamDiT(preset("test-tiny").with_(window=window)).eval()
    nn.init.normal_(model.head.head.weight, std=0.1)  # the zero head would make every output 0
    return model


def _inputs(cfg, frames=4, size=8, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_dim, frames, size, size, generator=g)
    sigma = torch.rand(batch, frames, generator=g)
    prompts = torch.randn(3, cfg.text_len, cfg.text_dim, generator=g)
    return x, sigma, prompts


def _run(model, options, *args, **kwargs):
    model.set_perf(options)
    with torch.inference_mode():
        return model(*args, **kwargs)


# -- window attention by partition ------------------------------------------------------------------------


def _masked_reference(q, k, v, grid, window, shift):
    """Dense attention where a token sees only the tokens of its (cyclically shifted) window."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1).reshape(-1, 3)
    ids = []
    for axis in range(3):
        s = window[axis] // 2 if shift else 0
        ids.append(((coords[:, axis] - s) % grid[axis]) // window[axis])
    win = torch.stack(ids, -1)
    mask = (win[:, None, :] == win[None, :, :]).all(-1)  # [L, L]
    scores = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v.double())


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("grid,window", [((4, 4, 6), (2, 2, 3)), ((3, 6, 4), (3, 2, 4)), ((4, 2, 2), (4, 2, 2))])
def test_window_partition_attention_equals_masked_dense_attention(grid, window, shift):
    g = torch.Generator().manual_seed(0)
    L = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(2, L, 2, 8, generator=g) for _ in range(3))
    parts = [window_partition(t, grid, window, shift) for t in (q, k, v)]
    for backend in ("sdpa", "math"):
        out = window_reverse(attention(*parts, backend), 2, grid, window, shift)
        ref = _masked_reference(q, k, v, grid, window, shift)
        assert torch.allclose(out.double(), ref, atol=1e-5), backend


WINDOW_CASES = [
    ((4, 4, 6), (2, 2, 3)), ((3, 6, 4), (3, 2, 4)), ((4, 2, 2), (4, 2, 2)), ((8, 8, 16), (4, 8, 8)),
    ((5, 3, 7), (5, 1, 7)), ((6, 4, 4), (3, 4, 1)),
]


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("grid,window", WINDOW_CASES)
def test_window_gather_equals_roll_path_exactly(grid, window, shift):
    """The gather formulation moves the same values to the same places as roll + reshape + permute."""
    g = torch.Generator().manual_seed(0)
    L = grid[0] * grid[1] * grid[2]
    tokens = window[0] * window[1] * window[2]
    x = torch.randn(2, L, 3, 4, generator=g)
    index, inverse = window_index(grid, window, shift)
    assert sorted(index.tolist()) == list(range(L)) and torch.equal(index[inverse], torch.arange(L))
    parts = window_partition_indexed(x, index, tokens)
    assert torch.equal(parts, window_partition(x, grid, window, shift)) and parts.is_contiguous()
    y = torch.randn(parts.shape, generator=g)
    assert torch.equal(window_reverse_indexed(y, 2, inverse), window_reverse(y, 2, grid, window, shift))
    assert torch.equal(window_reverse_indexed(parts, 2, inverse), x)
    # and against the independent masked reference, like the roll path
    q, k, v = (torch.randn(1, L, 2, 8, generator=g) for _ in range(3))
    out = window_reverse_indexed(attention(*(window_partition_indexed(t, index, tokens) for t in (q, k, v)),
                                           "math"), 1, inverse)
    assert torch.allclose(out.double(), _masked_reference(q, k, v, grid, window, shift), atol=1e-5)


def test_window_index_rejects_a_window_that_does_not_tile():
    with pytest.raises(ValueError, match="does not tile"):
        window_index((4, 4, 6), (3, 2, 3), False)


def _wan_like(window=(2, 4, 4)):
    """A small layout with Wan 2.1's structure (16-channel latents, patch 1×2×2, q/k norms, cross-attention
    norm, head size 64)."""
    return preset("wan2.1-1.3b").with_(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=32, text_len=8,
                                       freq_dim=32, window=window)


def _layout_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = StreamDiT(cfg).eval()
    nn.init.normal_(model.head.head.weight, std=0.1)
    return model


def _layout_inputs(cfg, latent, seed=1):
    c, f, h, w = latent
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c, f, h, w, generator=g)
    sigma = torch.rand(1, f, generator=g)
    a, b = (torch.randn(cfg.text_len, cfg.text_dim, generator=g) for _ in range(2))
    ctx = torch.stack([a] * (f // 2) + [b] * (f - f // 2))[None]  # a prompt switch: two runs of frames
    return x, sigma, ctx


LAYOUTS = {  # (config, latent [C, F, H, W]): both with windows that need partitioning and shifting
    "bundled": (preset("bundled"), (3, 16, 32, 64)),  # token grid 8 × 8 × 16, windows 4 × 8 × 8
    "wan-like": (_wan_like(), (16, 4, 16, 16)),  # token grid 4 × 8 × 8, windows 2 × 4 × 4
}


ROLL = PerfOptions(window_gather=False)  # the safe level's caches with the roll window path


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_window_gather_model_is_bit_identical(layout):
    """The default (safe) level partitions windows by gather; its output equals the roll path bit for bit,
    with and without the caches."""
    cfg, latent = LAYOUTS[layout]
    model = _layout_model(cfg)
    x, sigma, ctx = _layout_inputs(cfg, latent)
    assert PERF_LEVELS["safe"].window_gather and not PLAIN.window_gather
    for roll in (PLAIN, ROLL):
        ref = _run(model, roll, x, sigma, ctx)
        assert not model._window_cache  # the roll path: no token orders built
        out = _run(model, replace(roll, window_gather=True), x, sigma, ctx)
        assert torch.equal(out, ref), roll.describe()
    assert len(model._window_cache) == 1  # safe: cached per grid and window, like RoPE
    assert torch.equal(_run(model, PERF_LEVELS["safe"], x, sigma, ctx), _run(model, ROLL, x, sigma, ctx))


def test_window_gather_with_full_attention_and_under_autograd(monkeypatch):
    """Windows as large as the grid are full attention: no token order is built and the output equals the
    plain path. Under autograd (training) the roll path runs: no orders, same gradients."""
    import streamdit_core.model as model_mod

    built: list[tuple[int, int, int]] = []
    real = model_mod.window_index
    monkeypatch.setattr(model_mod, "window_index", lambda grid, *a, **k: built.append(grid) or real(grid, *a, **k))
    cfg, latent = LAYOUTS["wan-like"]
    model = _layout_model(cfg)
    x, sigma, ctx = _layout_inputs(cfg, latent)
    grid = (latent[1], latent[2] // 2, latent[3] // 2)  # the token grid (patch 1 × 2 × 2)
    for window in (grid, (64, 64, 64)):  # the grid itself, and a larger window (clamped to the grid)
        ref = _run(model, PLAIN, x, sigma, ctx, window=window)
        assert torch.equal(_run(model, PerfOptions(text_kv_cache=False), x, sigma, ctx, window=window), ref)
    assert built == [] and not model._window_cache
    grads = []
    for options in (PerfOptions(), ROLL):
        model.zero_grad()
        model.set_perf(options)
        model(x, sigma, ctx).square().mean().backward()
        grads.append(model.blocks[1].self_attn.q.weight.grad.clone())
    assert built == [] and torch.equal(grads[0], grads[1])
    _run(model, PerfOptions(), x, sigma, ctx)
    assert built == [grid, grid]  # inference, windows (2, 4, 4): unshifted and shifted orders, once


# -- caches -----------------------------------------------------------------------------------------------


def _contexts(prompts, frames):
    a, b, c = prompts
    shared = a[None]  # [1, Lt, D]
    same = a[None, None].expand(1, frames, -1, -1).contiguous()
    switch = torch.stack([a] * (frames // 2) + [b] * (frames - frames // 2))[None]  # two runs of frames
    mixed = torch.stack([a, b, a, c][:frames])[None]  # runs of length 1, a repeated prompt not adjacent
    return {"shared": shared, "same": same, "switch": switch, "mixed": mixed}


@pytest.mark.parametrize("kind", ["shared", "same", "switch", "mixed"])
def test_text_kv_cache_equals_recompute(kind):
    model = _model()
    x, sigma, prompts = _inputs(model.config)
    ctx = _contexts(prompts, 4)[kind]
    ref = _run(model, PLAIN, x, sigma, ctx)
    options = PerfOptions(text_kv_cache=True, layout_cache=False)
    first = _run(model, options, x, sigma, ctx)
    with torch.inference_mode():
        again = model(x, sigma, ctx)  # served from the cache
    assert len(model._kv_cache) == 1
    runs = model._kv_cache[0][2][0]
    assert len(runs) == {"shared": 1, "same": 1, "switch": 2, "mixed": 4}[kind]
    assert torch.allclose(first, ref, atol=1e-5) and torch.equal(first, again)


def test_text_kv_cache_follows_new_contexts_in_place_edits_and_weight_updates():
    model = _model()
    x, sigma, prompts = _inputs(model.config)
    ctx = _contexts(prompts, 4)["switch"]
    options = PerfOptions(text_kv_cache=True, layout_cache=True)
    model.set_perf(options)
    with torch.no_grad():
        model(x, sigma, ctx)
        other = _contexts(prompts, 4)["mixed"]
        assert torch.allclose(model(x, sigma, other), _run_plain_copy(model, x, sigma, other), atol=1e-5)
        ctx[:, 1] = prompts[2]  # in place: the version counter changes, the cache must not answer
        assert torch.allclose(model(x, sigma, ctx), _run_plain_copy(model, x, sigma, ctx), atol=1e-5)
        model.blocks[0].cross_attn.k.weight.mul_(1.5)  # weights changed in place (an optimiser step)
        model.time_projection[1].weight.mul_(0.5)
        assert torch.allclose(model(x, sigma, ctx), _run_plain_copy(model, x, sigma, ctx), atol=1e-5)


def _run_plain_copy(model, x, sigma, ctx):
    saved = model.perf
    model.set_perf(PLAIN)
    try:
        with torch.no_grad():
            return model(x, sigma, ctx)
    finally:
        model.set_perf(saved)


def test_layout_cache_is_bit_identical_and_keyed_by_grid():
    model = _model()
    x, sigma, prompts = _inputs(model.config)
    ctx = prompts[0][None]
    ref = _run(model, PLAIN, x, sigma, ctx)
    options = PerfOptions(text_kv_cache=False, layout_cache=True)
    assert torch.equal(_run(model, options, x, sigma, ctx), ref)
    with torch.inference_mode():
        assert torch.equal(model(x, sigma, ctx), ref)  # cached RoPE and time embedding
        x2 = torch.randn(1, model.config.in_dim, 2, 12, 8)
        sig2 = torch.rand(1, 2)
        cached = model(x2, sig2, ctx)  # another grid and σ: new entries, not the old ones
    assert len(model._rope_cache) == 2 and len(model._time_cache) == 2
    assert torch.equal(cached, _run(model, PLAIN, x2, sig2, ctx))


def test_caches_work_with_inference_mode_weights_and_inputs():
    """ComfyUI creates weights and inputs under torch.inference_mode (no version counters)."""
    with torch.inference_mode():
        model = _model()
        x, sigma, prompts = _inputs(model.config)
        ctx = _contexts(prompts, 4)["switch"]
        ref = _run(model, PLAIN, x, sigma, ctx)
        assert torch.allclose(_run(model, PerfOptions(), x, sigma, ctx), ref, atol=1e-5)
        assert torch.allclose(model(x, sigma, ctx), ref, atol=1e-5) and len(model._kv_cache) == 1


def test_caches_stay_out_of_autograd():
    model = _model().train()
    x, sigma, prompts = _inputs(model.config)
    model.set_perf(PerfOptions())
    out = model(x, sigma, prompts[0][None])
    out.square().mean().backward()
    assert model.blocks[0].cross_attn.k.weight.grad is not None
    assert not model._kv_cache and not model._time_cache and not model._rope_cache and not model._window_cache


def test_guided_batch_and_stream_equal_plain_path():
    """The sampler with the default speed-ups (memoised contexts, caches) streams the same frames as the plain
    path, through a prompt switch with a transition and with guidance (a batch of two contexts)."""
    schedule = parse_schedule("0: a large red circle on a black background\n4: a small blue square", transition=3)
    outs = []
    for options in (PLAIN, PerfOptions()):
        pipe = placeholder_pipeline(perf=options)
        sampler = StreamSampler(pipe, pipe.default_settings(height=16, width=16, guidance=2.0,
                                                            partition=Partition(K=0, N=4, c=2, s=1)))
        state = sampler.init_state(3, schedule)
        _, frames = sampler.advance(state, schedule, chunks=4)
        outs.append(frames)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_guided_model_frames_stream_reuses_text_keys_values():
    """Guidance with several model inputs per step (a base Wan's defaults: model_frames, CFG) keeps one guided
    context per part, so a steady one-prompt stream computes no text keys/values after the start; the frames
    equal the plain path's."""
    schedule = parse_schedule("0: a large red circle on a black background")
    outs = []
    for options in (PLAIN, PerfOptions()):
        pipe = placeholder_pipeline(perf=options)
        sampler = StreamSampler(pipe, pipe.default_settings(height=16, width=16, guidance=2.0, model_frames=4,
                                                            partition=Partition(K=0, N=4, c=2, s=1)))
        state = sampler.init_state(3, schedule)
        computed: list[int] = []
        hook = pipe.model.text_embedding.register_forward_hook(lambda *_, n=computed: n.append(1))
        _, frames = sampler.advance(state, schedule, chunks=3)  # 3 steps of 2 model inputs each
        hook.remove()
        outs.append(frames)
    assert len(computed) == 0  # was 6 (every call) when only the last guided context was remembered
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


# -- fp8 --------------------------------------------------------------------------------------------------


def test_fp8_quantisation_error_is_within_e4m3_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.logspace(-3, 2, 96)  # a wide range of magnitudes per row
    for rowwise in (True, False):
        x8, scale = quantize_fp8(x, rowwise)
        assert x8.dtype == torch.float8_e4m3fn and x8.float().abs().max() <= FP8_MAX
        back = dequantize_fp8(x8, scale)
        # half an ulp (3 mantissa bits → 2^-4 relative) for normal numbers, half the smallest subnormal below
        bound = x.abs() * 2.0**-4 + scale * 2.0**-10
        assert ((back - x).abs() <= bound * 1.0001).all()


def test_fp8_linear_matches_float_matmul_within_tolerance_and_keeps_state_dict():
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(128, 64)
    x = torch.randn(3, 40, 128, generator=g)
    ref = layer(x)
    for rowwise in (True, False):
        fp8 = Fp8Linear(layer, rowwise, use_scaled_mm=False)
        out = fp8(x)
        rel = ((out - ref).norm() / ref.norm()).item()
        assert 1e-4 < rel < 0.05, rel  # really quantised, and close
        assert fp8.weight is layer.weight and set(fp8.state_dict()) == {"weight", "bias"}


def test_fp8_scaled_mm_on_cpu_equals_emulation_when_available():
    layer = nn.Linear(64, 32)
    x = torch.randn(16, 64)
    x8, sx = quantize_fp8(x, False)
    w8, sw = quantize_fp8(layer.weight.detach(), False)
    try:
        out = torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch._scaled_mm has no CPU kernel here: {str(exc)[:80]}")
    emulated = dequantize_fp8(x8, sx) @ dequantize_fp8(w8, sw).t()
    assert torch.allclose(out, emulated, rtol=1e-4, atol=1e-5)


def test_fp8_model_output_close_to_plain_and_switches_back():
    model = _model()
    keys = set(model.state_dict())
    x, sigma, prompts = _inputs(model.config)
    ctx = prompts[0][None]
    ref = _run(model, PLAIN, x, sigma, ctx)
    for mode in ("row", "tensor"):
        out = _run(model, PerfOptions(fp8=mode), x, sigma, ctx)
        rel = ((out - ref).norm() / ref.norm()).item()
        assert 1e-4 < rel < 0.06, (mode, rel)
        assert isinstance(model.blocks[0].ffn[0], Fp8Linear) and set(model.state_dict()) == keys
    assert torch.allclose(_run(model, PLAIN, x, sigma, ctx), ref, atol=0)
    assert type(model.blocks[0].ffn[0]) is nn.Linear and type(model.blocks[1].self_attn.q) is nn.Linear


# -- options ----------------------------------------------------------------------------------------------


def test_options_levels_parsing_and_validation():
    assert PerfOptions.level("safe") == PerfOptions() and PERF_LEVELS["plain"] == PLAIN
    assert PerfOptions.level("kv,compile,fp8") == PerfOptions(True, False, "default", False, "row", False)
    assert PerfOptions.level("plain,layout").describe() == "layout_cache"
    # roll-free windows are in every level but plain (measured on an H100: docs/bench/h100_qkv_gather/)
    assert [name for name, o in PERF_LEVELS.items() if not o.window_gather] == ["plain"]
    assert PerfOptions.level("kv,layout,gather") == PerfOptions() == PERF_LEVELS["safe"]
    assert PerfOptions.level("kv,layout") == replace(PerfOptions(), window_gather=False)
    assert mode_options("plain+gather", "default") == replace(PLAIN, window_gather=True)
    assert PerfOptions().describe() == "text_kv_cache,layout_cache,window_gather"
    with pytest.raises(ValueError, match="unknown optimisation 'qkv'"):  # the fused projection was removed
        PerfOptions.level("fast,qkv")
    assert PERF_LEVELS["fastest"].for_device(torch.device("cpu")) == PerfOptions(compile="default")
    with pytest.raises(ValueError, match="unknown optimisation 'turbo'"):
        PerfOptions.level("turbo")
    with pytest.raises(ValueError, match="compile must be one of"):
        PerfOptions(compile="fastest")
    with pytest.raises(ValueError, match="cuda_graphs needs"):
        PerfOptions(text_kv_cache=False, cuda_graphs=True)


@pytest.mark.skipif(os.environ.get("STREAMDIT_TEST_COMPILE") != "1", reason="CPU compile takes ~20 s; opt in")
def test_compiled_blocks_equal_eager():
    model = _model()
    x, sigma, prompts = _inputs(model.config)
    ctx = prompts[0][None]
    ref = _run(model, PerfOptions(), x, sigma, ctx)
    out = _run(model, PerfOptions(compile="default"), x, sigma, ctx)
    assert model.perf_status.get("compile") == "default"
    assert torch.allclose(out, ref, atol=1e-4)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    for kind, per_frame in _contexts(prompts, 4).items():  # prompt runs change: no recompilation
        with torch.inference_mode():
            got = model(x, sigma, per_frame)
        assert torch.allclose(got, _run_plain_copy(model, x, sigma, per_frame), atol=1e-4), kind
    assert counters["stats"]["unique_graphs"] == graphs
    rolled = _run(model, PerfOptions(compile="default", window_gather=False), x, sigma, ctx)
    assert model.perf_status.get("compile") == "default" and torch.allclose(rolled, ref, atol=1e-4)


# -- bench ------------------------------------------------------------------------------------------------


def test_flops_match_the_dense_estimate_and_floors_are_consistent():
    cfg = preset("paper-4b")
    latent = (8, 16, 64, 64)
    tokens = 16 * 32 * 32
    full = model_flops(cfg, latent, None)
    windowed = model_flops(cfg, latent, (16, 16, 16))
    assert 2 * cfg.num_parameters() * tokens * 0.9 < windowed < full  # about 2 · parameters · tokens
    attention_full = cfg.num_layers * 4 * tokens * tokens * cfg.dim
    assert abs((full - windowed) - attention_full * (1 - 16 * 16 * 16 / tokens)) / full < 1e-9
    fl = floors(cfg, latent, (16, 16, 16))
    hand = (fl["matmul_tflop"] / 790 + fl["attention_tflop"] / 680) * 1e3
    assert abs(fl["compute_floor_ms_bf16"] - hand) < 1e-6 and fl["compute_floor_ms_fp8"] < hand
    assert 100 < fl["compute_floor_ms_bf16"] < 200 and fl["memory_floor_ms"] < fl["compute_floor_ms_bf16"] / 3


def test_bench_case_runs_and_reports_every_mode():
    case = BenchCase("tiny", "test-tiny", (3, 4, 8, 8), Partition(K=0, N=2, c=2, s=1), (2, 2, 2))
    modes = ("plain", "safe", "kv+fp8", "kv+layout", "plain+gather")
    row = run_case(case, torch.device("cpu"), torch.float32, repeats=1, modes=modes)
    assert tuple(m["mode"] for m in row["modes"]) == modes
    plain, safe, fp8, roll, gather = row["modes"]
    assert plain["relative_error"] == 0 and gather["relative_error"] == 0  # gather: bit-identical
    assert safe["relative_error"] < 1e-5 and roll["relative_error"] < 1e-5
    assert safe["status"]["window_gather"] == "on" and "window_gather" not in roll["status"]
    assert fp8["status"]["requested"] == "text_kv_cache"  # fp8 would only be emulated on a CPU: dropped
    assert row["time_to_first_frame"]["warm_start_calls"] == 2 and row["baseline"]["ms_per_call"] > 0
    assert all("round_ms" not in m and "round_errors" not in m for m in row["modes"])  # one round: as before
    table = to_markdown([row])
    assert "| tiny | safe |" in table and "| tiny | baseline (eager, full attention) |" in table
    assert CASES["paper-4b"].temporal_factor == 4 and CASES["wan2.1-1.3b-w8"].window == (8, 30, 52)


_TINY = BenchCase("tiny", "test-tiny", (3, 4, 8, 8), Partition(K=0, N=2, c=2, s=1), (2, 2, 2))


def _scripted_times(monkeypatch, times):
    """Make ``bench._time_calls`` return ``times`` in call order (an exception in the list is raised);
    returns the list of calls made (their scripted values)."""
    calls = []

    def fake(fn, device, repeats, warmup=2, timed=None):
        value = times[len(calls)]
        calls.append(value)
        with timed if timed is not None else nullcontext():
            if isinstance(value, Exception):
                raise value
        return value, 0.5

    monkeypatch.setattr(bench, "_time_calls", fake)
    return calls


def test_median_ms_of_odd_and_even_counts():
    assert median_ms([3.0]) == 3.0
    assert median_ms([5.0, 1.0, 3.0]) == 3.0
    assert median_ms([4.0, 1.0, 3.0, 2.0]) == 2.5  # the mean of the two middle values
    assert median_ms((163.5, 161.3)) == pytest.approx(162.4)
    with pytest.raises(ValueError, match="at least one"):
        median_ms([])


def test_round_order_alternates_and_is_a_permutation():
    assert round_order(3, 0) == [0, 1, 2] and round_order(3, 1) == [2, 1, 0] and round_order(3, 2) == [0, 1, 2]
    for n in range(5):
        for r in range(4):
            assert sorted(round_order(n, r)) == list(range(n))
            assert round_order(n, r + 1) == round_order(n, r)[::-1]
    with pytest.raises(ValueError):
        round_order(2, -1)


def test_bench_rounds_report_the_median_and_its_range(monkeypatch):
    # baseline; round 1 plain, safe; round 2 reversed: safe, plain; round 3: plain, safe
    calls = _scripted_times(monkeypatch, [100.0, 10.0, 20.0, 21.0, 30.0, 31.0, 22.0])
    row = run_case(_TINY, torch.device("cpu"), torch.float32, repeats=1, modes=("plain", "safe"), rounds=3)
    assert len(calls) == 7 and row["baseline"]["ms_per_call"] == 100.0  # the baseline is timed once
    plain, safe = row["modes"]
    assert plain["round_ms"] == [10.0, 30.0, 31.0] and safe["round_ms"] == [20.0, 21.0, 22.0]
    flops = model_flops(preset("test-tiny"), _TINY.latent, _TINY.window)
    for m, median in ((plain, 30.0), (safe, 21.0)):
        assert m["ms_per_call"] == median
        assert m["video_fps"] == pytest.approx(1000 * 2 / median)  # c = 2 frames per call, s = 1
        assert m["latent_fps"] == pytest.approx(1000 * 2 / median)
        assert m["speedup"] == pytest.approx(100.0 / median)
        assert m["achieved_tflops"] == pytest.approx(flops / median / 1e9)
        assert m["first_call_s"] == 0.5 and "round_errors" not in m
    assert plain["relative_error"] == 0 and safe["relative_error"] < 1e-5  # round 1's
    # round 1 alone would pick plain (10 ms); the medians pick safe
    safe_options = mode_options("safe", "default").for_device(torch.device("cpu"))
    assert row["time_to_first_frame"]["mode"] == safe_options.describe()
    table = to_markdown([row])
    assert "| tiny | plain | 30.0 (10.0–31.0) | 66.7 |" in table and "| tiny | safe | 21.0 (20.0–22.0) |" in table
    assert "| tiny | baseline (eager, full attention) | 100.0 |" in table


def test_bench_rounds_skip_failed_modes_and_keep_going(monkeypatch):
    # baseline; round 1 plain, safe (the bad mode fails before timing); round 2 reversed: safe fails, plain
    calls = _scripted_times(monkeypatch, [100.0, 10.0, 20.0, RuntimeError("graph capture failed"), 13.0])
    row = run_case(_TINY, torch.device("cpu"), torch.float32, repeats=1, modes=("plain", "no-such-item", "safe"),
                   ttff=False, rounds=2)
    assert len(calls) == 5
    plain, bad, safe = row["modes"]
    assert "error" in bad and "round_ms" not in bad
    assert plain["round_ms"] == [10.0, 13.0] and plain["ms_per_call"] == 11.5
    assert safe["round_ms"] == [20.0, None] and safe["ms_per_call"] == 20.0
    assert safe["round_errors"] == [{"round": 2, "error": "RuntimeError: graph capture failed"}]
    assert safe["speedup"] == pytest.approx(5.0) and "error" not in safe
    table = to_markdown([row])
    assert "| tiny | plain | 11.5 (10.0–13.0) |" in table and "| tiny | safe | 20.0 |" in table


def test_bench_command_records_rounds_and_rejects_zero(monkeypatch, tmp_path, capsys):
    import json

    from streamdit_core.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--rounds", "0"])
    assert exit_info.value.code == 2 and "--rounds must be a positive integer" in capsys.readouterr().err
    monkeypatch.setitem(CASES, "tiny", _TINY)
    args = ["bench", "--device", "cpu", "--cases", "tiny", "--modes", "plain,safe", "--repeats", "1", "--no-ttff"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "bench.json").read_text())
    assert "rounds" not in one["runs"][-1] and all("round_ms" not in m for m in one["rows"][0]["modes"])
    assert main([*args, "--rounds", "2", "--out", str(tmp_path / "two")]) == 0
    two = json.loads((tmp_path / "two" / "bench.json").read_text())
    assert two["runs"][-1]["rounds"] == 2 and all(len(m["round_ms"]) == 2 for m in two["rows"][0]["modes"])
    assert "–" in (tmp_path / "two" / "bench.md").read_text().split("| tiny | safe | ")[1].split(" |")[0]


_SMI_TEXT = "1980, 2619, 512.34, 61\n\n1755, 2619, 699.80, 63\r\n[N/A], 2619, [N/A], 62\n" \
    "No devices were found\n1700, 2619, 690.00, 64\n1690, 26"  # a blank line, N/A, a message, a cut-off line


def test_parse_clock_samples_of_nvidia_smi_text():
    assert parse_clock_samples(_SMI_TEXT) == [
        ClockSample(1980.0, 2619.0, 512.34, 61.0),
        ClockSample(1755.0, 2619.0, 699.8, 63.0),
        ClockSample(None, 2619.0, None, 62.0),
        ClockSample(1700.0, 2619.0, 690.0, 64.0),
    ]
    assert parse_clock_samples("") == [] and parse_clock_samples("1980, 2619, 512.34, 61") == []  # unterminated
    assert parse_clock_samples("[N/A], [N/A], [N/A], [N/A]\n1, 2, 3\n") == []
    command = nvidia_smi_command(3, 50)
    assert command[0] == "nvidia-smi" and command[-4:] == ["-lms", "50", "-i", "3"]
    assert "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu" in command


def test_summarize_clocks_against_hand_computed_values():
    summary = summarize_clocks(parse_clock_samples(_SMI_TEXT))
    assert summary == {
        "samples": 4,
        "sm_mhz_median": 1755.0,  # of 1700, 1755, 1980 (the N/A sample has none)
        "sm_mhz_min": 1700.0,
        "sm_mhz_max": 1980.0,
        "mem_mhz_median": 2619.0,
        "power_w_median": pytest.approx(690.0),  # of 512.34, 690.0, 699.8
        "power_w_max": pytest.approx(699.8),
        "temp_c_max": 64.0,
    }
    two = summarize_clocks([ClockSample(1980.0, 2619.0, 500.0, 60.0), ClockSample(1700.0, 2619.0, 690.0, 62.0)])
    assert two["sm_mhz_median"] == 1840.0 and two["power_w_median"] == 595.0  # even count: mean of the middle two
    empty = summarize_clocks([])
    assert empty["samples"] == 0 and all(v is None for k, v in empty.items() if k != "samples")


def _python(code):
    return [sys.executable, "-c", code]


def test_clock_sampler_reads_a_command_and_never_raises(caplog, monkeypatch):
    monkeypatch.setattr(gpu_clocks, "_WARNED", set())
    with ClockSampler(command=_python("print('1980, 2619, 500.0, 60'); print('1700, 2619, 690.0, 62')")) as s:
        pass
    assert s.samples == [ClockSample(1980.0, 2619.0, 500.0, 60.0), ClockSample(1700.0, 2619.0, 690.0, 62.0)]
    assert s.error is None and s.summary()["samples"] == 2 and s.summary()["sm_mhz_max"] == 1980.0
    # a command that runs until stopped, as `nvidia-smi -lms` does: entering waits for the first sample
    loop = "import time\nwhile True:\n    print('1800, 2619, 600.0, 61', flush=True)\n    time.sleep(0.02)"
    with ClockSampler(command=_python(loop), startup_s=60.0) as s:  # returns at the first line
        pass
    assert s.error is None and len(s.samples) >= 1 and s.summary()["sm_mhz_median"] == 1800.0
    with caplog.at_level("WARNING", logger="StreamDiT"):
        with ClockSampler(command=["/nonexistent/nvidia-smi-for-tests"]) as s:
            pass
        with ClockSampler(command=["/nonexistent/nvidia-smi-for-tests"]) as s:
            pass
    assert s.samples == [] and s.summary() == {"error": s.error} and "could not start" in str(s.error)
    assert len([r for r in caplog.records if "GPU clocks not recorded" in r.message]) == 1  # one warning
    with ClockSampler(command=_python("import sys; sys.exit('No devices were found')")) as s:
        pass
    assert "exited with 1" in str(s.error) and "No devices were found" in str(s.error)


def test_clock_sampler_follows_the_torch_device():
    assert bench.clock_sampler(True, torch.device("cpu")) is None
    assert bench.clock_sampler(False, torch.device("cuda")) is None
    sampler = bench.clock_sampler(True, torch.device("cuda"))  # index None: GPU 0
    assert sampler is not None and sampler.command[-2:] == ["-i", "0"]
    sampler = bench.clock_sampler(True, torch.device("cuda", 1))
    assert sampler is not None and sampler.command[-2:] == ["-i", "1"]


def test_bench_gpu_clocks_on_cpu_changes_nothing(monkeypatch, tmp_path, caplog):
    from streamdit_core.cli import main

    _scripted_times(monkeypatch, [100.0, 10.0, 20.0] * 3)
    rows = [run_case(_TINY, torch.device("cpu"), torch.float32, repeats=1, modes=("plain", "safe"), ttff=False,
                     gpu_clocks=flag) for flag in (False, True)]
    assert all("gpu_clocks" not in e for e in [rows[1]["baseline"], *rows[1]["modes"]])
    assert to_markdown([rows[1]]) == to_markdown([rows[0]]) and "SM MHz" not in to_markdown([rows[1]])
    monkeypatch.setitem(CASES, "tiny", _TINY)
    with caplog.at_level("INFO", logger="StreamDiT"):
        assert main(["bench", "--device", "cpu", "--cases", "tiny", "--modes", "plain,safe", "--repeats", "1",
                     "--no-ttff", "--gpu-clocks", "--out", str(tmp_path)]) == 0
    assert any("--gpu-clocks needs a CUDA device" in r.message for r in caplog.records)
    assert "SM MHz" not in (tmp_path / "bench.md").read_text()


def test_bench_gpu_clocks_are_recorded_per_mode_and_round(monkeypatch):
    """The wiring, on the CPU: a sampler running a fake command stands in for nvidia-smi on a GPU."""
    fake = ClockSampler(command=_python("print('1980, 2619, 500.0, 60'); print('1700, 2619, 690.0, 62')"))
    monkeypatch.setattr(bench, "clock_sampler", lambda enabled, device: fake if enabled else None)
    # baseline; round 1 plain, safe; round 2 reversed: safe fails, plain
    _scripted_times(monkeypatch, [100.0, 10.0, 20.0, RuntimeError("graph capture failed"), 13.0])
    row = run_case(_TINY, torch.device("cpu"), torch.float32, repeats=1, modes=("plain", "safe"), ttff=False,
                   rounds=2, gpu_clocks=True)
    expected = summarize_clocks(parse_clock_samples("1980, 2619, 500.0, 60\n1700, 2619, 690.0, 62\n"))
    plain, safe = row["modes"]
    assert row["baseline"]["gpu_clocks"] == expected and "round_gpu_clocks" not in row["baseline"]
    assert plain["gpu_clocks"] == expected and plain["round_gpu_clocks"] == [expected, expected]
    assert safe["round_ms"] == [20.0, None] and safe["round_gpu_clocks"] == [expected, None]
    table = to_markdown([row])
    assert "| case | mode | SM MHz median (min–max) | power W median (max) | temp °C max |" in table
    assert "| tiny | baseline | 1840 (1700–1980) | 595 (690) | 62 |" in table
    assert "| tiny | safe | 1840 (1700–1980) | 595 (690) | 62 |" in table
    row["modes"][1]["gpu_clocks"] = {"error": "could not start nvidia-smi"}
    assert "| tiny | safe | failed: could not start nvidia-smi | | |" in to_markdown([row])


def test_cudnn_backend_trains_through_plain_sdpa():
    """The cuDNN custom op is forward-only: with inputs that need gradients, ``attention(backend="cudnn")``
    differentiates plain SDPA instead (the first H100 training run after 'auto' began choosing cuDNN failed
    with 'no autograd formula' in backward). Gradients equal those of the math backend."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 3, 8, generator=gen, requires_grad=True) for _ in range(3))
    attention(q, k, v, backend="cudnn").square().sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]  # type: ignore[union-attr]
    for t in (q, k, v):
        t.grad = None
    attention(q, k, v, backend="math").square().sum().backward()
    for g, t in zip(got, (q, k, v)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-5)
