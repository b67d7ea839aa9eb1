"""Several rows of one frame per program in the fused LayerNorm kernels (item ``normrows``,
``perf.PerfOptions.norm_rows``, ``triton_util.norm_rows``): the rule choosing the rows per program; the option's
parsing and wiring (flags reaching the operators; the same model output with and without it on the CPU, where the
operators' references run); and under Triton's interpreter (``TRITON_INTERPRET=1`` with triton installed) the
multi-row kernel's outputs equal the one-row kernel's bit for bit in each configuration that reads per-frame rows.
"""

from dataclasses import replace

import pytest
import torch
from test_fused_quant import ADDS, FUSED, INTERPRET, _biased_model, _modulation, _rows

import streamdit_core.model as model_module
from streamdit_core.bench import mode_options
from streamdit_core.perf import PERF_LEVELS, PerfOptions
from streamdit_core.triton_util import (
    NORM_ROWS_MAX_VALUES,
    TUNED_WARPS,
    default_warps,
    norm_rows,
    norm_rows_launch_config,
    row_launch_config,
)

from fused_models import run, tiny_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_norm_rows_rule():
    assert norm_rows(1024, 16384, 3072) == 4  # paper-4b: 16 frames of 32 × 32 tokens
    assert norm_rows(1560, 24960, 1536) == 4  # Wan 1.3B, 4-frame windows: 30 × 52 tokens per frame
    assert norm_rows(1022, 2044, 64) == 2
    assert norm_rows(6, 12, 48) == 2 and norm_rows(4, 12, 48) == 4
    assert norm_rows(15, 60, 64) == 1 and norm_rows(1, 16, 64) == 1  # odd tokens per frame, one token per frame
    assert norm_rows(4, 6, 64) == 2 and norm_rows(4, 5, 64) == 1  # the row count must be divisible too
    # ROWS·BLOCK within NORM_ROWS_MAX_VALUES: 4 × 4,096 at 3,072; wider rows take fewer
    assert norm_rows(1024, 16384, 5120) == 2 and norm_rows(1024, 16384, 16384) == 1
    assert NORM_ROWS_MAX_VALUES == 16384
    assert norm_rows_launch_config(3072, 4) == (4096, 16) and norm_rows_launch_config(1536, 4) == (2048, 16)
    assert norm_rows_launch_config(1536, 2) == (2048, 8) and norm_rows_launch_config(48, 4) == (64, default_warps(256))


def test_norm_rows_tuned_warps():
    """The multi-row kernels' measured warp counts (docs/bench/h100_splitrows/row_kernels.md) replace the tile's
    default rule only with ``tuned``, a ``kind`` and the measured width and rows per program; the one-row entries
    never apply to the tile, nor the tile's to the one-row kernel."""
    assert norm_rows_launch_config(3072, 4, "norm_modulate_quant", True) == (4096, 4)
    assert norm_rows_launch_config(3072, 4, "residual_gate_modulate_quant", True) == (4096, 8)
    assert norm_rows_launch_config(1536, 4, "norm_modulate_quant", True) == (2048, 4)
    assert norm_rows_launch_config(1536, 4, "residual_gate_modulate_quant", True) == (2048, 4)
    for n_cols, rows in ((3072, 4), (1536, 4), (1536, 2), (5120, 2), (48, 4)):
        default = norm_rows_launch_config(n_cols, rows)
        assert default == (row_launch_config(n_cols)[0], default_warps(rows * default[0]))
        for kind in ("norm_modulate_quant", "residual_gate_modulate_quant", "residual_modulate_quant", "nonesuch"):
            assert norm_rows_launch_config(n_cols, rows, kind) == default  # untuned: the default rule
            entry = TUNED_WARPS.get((f"{kind}_rows{rows}", n_cols))
            assert norm_rows_launch_config(n_cols, rows, kind, True) == (default[0], entry or default[1])
        assert norm_rows_launch_config(n_cols, rows, None, True) == default
    # measured only at 4 rows and the two models' widths; the one-row entry (2 warps at 1,536) is not the tile's
    assert norm_rows_launch_config(1536, 2, "norm_modulate_quant", True) == (2048, 8)
    assert norm_rows_launch_config(5120, 2, "norm_modulate_quant", True) == (8192, 16)
    assert norm_rows_launch_config(3072, 4, "residual_modulate_quant", True) == (4096, 16)  # not measured
    assert row_launch_config(3072, "norm_modulate_quant_rows4", False) == (4096, 8)
    assert {width for kind, width in TUNED_WARPS if "_rows" in kind} == {3072, 1536}
    assert all(kind.endswith("_rows4") for kind, _ in TUNED_WARPS if "_rows" in kind)


def test_options_parse_normrows():
    fastest, fast = PERF_LEVELS["fastest"], PERF_LEVELS["fast"]
    assert not any(level.norm_rows for level in PERF_LEVELS.values())  # unmeasured: in no level
    assert PerfOptions.level("fastest,normrows") == replace(fastest, norm_rows=True)
    assert PerfOptions.level("fast,normrows") == replace(fast, norm_rows=True)
    assert mode_options("fast+normrows", "default") == replace(fast, norm_rows=True)
    assert mode_options("fastest+normrows", "max-autotune") == replace(fastest, norm_rows=True, compile="max-autotune")
    assert PerfOptions.level("normfuse,normrows").describe() == "norm_fused,norm_rows"
    assert PerfOptions.level("normrows").norm_rows  # valid alone (the status says it has no effect)
    cpu = torch.device("cpu")
    assert PerfOptions.level("fastest,normrows").for_device(cpu) == PerfOptions(compile="default")
    assert PerfOptions.level("fast,normrows").for_device(cpu) == PerfOptions(compile="default")
    assert PerfOptions.level("fastest,normrows").for_device(torch.device("cuda")).norm_rows
    with pytest.raises(ValueError, match="unknown optimisation 'normrow'.*splitrows, normrows"):
        PerfOptions.level("fastest,normrow")


NAMES = ("norm_modulate_quantize", "residual_norm_quantize", "norm_modulate", "residual_norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_rows_model_equals_one_row_and_reaches_the_operators(dtype, monkeypatch):
    """fast-like (normfuse, crossres) and fastest-like (fp8 items, fp8 emulated) CPU options with and without
    normrows: the same output bit for bit; the flag reaches every fused LayerNorm operator; without a fused norm
    kernel the status says it has no effect."""
    seen: dict[str, list[bool]] = {name: [] for name in NAMES}

    def spy(name, real):
        def call(*args, **kwargs):
            seen[name].append(bool(args[-1]))  # rows: the last positional argument in the model's calls
            return real(*args, **kwargs)
        return call

    for name in NAMES:
        monkeypatch.setattr(model_module, name, spy(name, getattr(model_module, name)))
    model = _biased_model(dtype)
    args = tiny_inputs(model.config, dtype, batch=2)
    fast = PerfOptions(norm_fused=True, cross_residual=True)
    fastest = replace(ADDS, cross_residual=True, fp8_out_fused=True, tuned_warps=True)
    for base, used in ((fast, ("norm_modulate", "residual_norm")),
                       (FUSED, ("norm_modulate_quantize",)),
                       (fastest, ("norm_modulate_quantize", "residual_norm_quantize"))):
        for lst in seen.values():
            lst.clear()
        expected = run(model, base, *args)
        assert all(seen[n] and not any(seen[n]) for n in used), seen
        assert "norm_rows" not in model.perf_status and not any(b.norm_rows for b in model.blocks)
        for lst in seen.values():
            lst.clear()
        out = run(model, replace(base, norm_rows=True), *args)
        assert torch.equal(out, expected), base.describe()
        assert all(seen[n] and all(seen[n]) for n in used), seen
        assert all(b.norm_rows for b in model.blocks)
        assert model.perf_status["norm_rows"].startswith("no effect: the reference"), model.perf_status
    run(model, PerfOptions(norm_rows=True), *args)
    assert model.perf_status["norm_rows"].startswith("no effect: no fused LayerNorm kernel")


def _configs(b, frames, per, width, dtype):
    """The kernel's configurations that read per-frame rows: ``{name: norm_quant_triton kwargs}``."""
    g = torch.Generator().manual_seed(7)
    y = (torch.randn(b * frames * per, width, generator=g)).to(dtype)
    y_bias = torch.randn(width, generator=g).to(dtype)
    gate = torch.randn(b, frames, width, generator=g)
    weight, bias = torch.randn(width, generator=g), torch.randn(width, generator=g)
    shift, scale = _modulation(b, frames, width)
    mod = {"shift": shift, "scale": scale}
    return {
        "norm1": dict(mod),
        "norm2": dict(residual=y, **mod),
        "norm2 fuseadds": dict(residual=y, residual_bias=y_bias, **mod),
        "norm1 crossres": dict(residual=y, gate=gate, **mod),
        "norm3": dict(residual=y, gate=gate, weight=weight.to(dtype), bias=bias.to(dtype)),
        "norm1 bf16 store": dict(quantize=False, **mod),
        "norm2 bf16 store": dict(residual=y, quantize=False, **mod),
        "norm1 crossres bf16 store": dict(residual=y, gate=gate, quantize=False, **mod),
    }


@pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1 on a machine without CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_multi_row_kernel_in_interpreter_equals_one_row(dtype):
    from streamdit_core.fp8_triton import norm_quant_triton

    b, frames, width = 2, 3, 48  # 48 → BLOCK 64: masked lanes
    for per, expect_rows in ((4, 4), (6, 2), (5, 1)):
        tokens = frames * per
        assert norm_rows(per, b * tokens, width) == expect_rows
        x = _rows(b * tokens, width, dtype, seed=per) * 3
        for name, kwargs in _configs(b, frames, per, width, dtype).items():
            if kwargs.get("quantize", True):
                kwargs = dict(kwargs, out_dtype=torch.float32)  # the scaled values before the fp8 cast
            one = norm_quant_triton(x, 1e-6, tokens, frames, **kwargs)
            many = norm_quant_triton(x, 1e-6, tokens, frames, rows=True, **kwargs)
            for a, c in zip(one, many):
                assert (a is None) == (c is None), name
                assert a is None or torch.equal(a, c), (name, per, dtype)


@pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1 on a machine without CUDA")
def test_multi_row_kernel_tuned_warps_in_interpreter_same_values(monkeypatch):
    """At a measured width the multi-row kernel launched with ``tuned`` asks for its measured warps (the kernel's
    configuration name passed on, fp8 and bf16 store alike) and gives the same values as without."""
    import streamdit_core.fp8_triton as fp8_triton

    calls = []

    def spy(*args):
        calls.append(args)
        return norm_rows_launch_config(*args)

    monkeypatch.setattr(fp8_triton, "norm_rows_launch_config", spy)
    b, frames, per, width, dtype = 1, 2, 4, 1536, torch.bfloat16
    tokens = frames * per
    x = _rows(b * tokens, width, dtype, seed=5) * 3
    configs = _configs(b, frames, per, width, dtype)
    expected = {"norm1": ("norm_modulate_quant", 4), "norm1 crossres": ("residual_gate_modulate_quant", 4),
                "norm2 bf16 store": ("residual_modulate", 16)}  # Wan's width; bf16 norm2's tile not measured
    for name, (kind, warps) in expected.items():
        kwargs = configs[name]
        if kwargs.get("quantize", True):
            kwargs = dict(kwargs, out_dtype=torch.float32)  # the scaled values before the fp8 cast
        calls.clear()
        untuned, tuned = (fp8_triton.norm_quant_triton(x, 1e-6, tokens, frames, rows=True, tuned=t, **kwargs)
                          for t in (False, True))
        assert calls == [(width, 4, kind, False), (width, 4, kind, True)], calls
        assert norm_rows_launch_config(*calls[1]) == (2048, warps)
        for a, c in zip(untuned, tuned):
            assert (a is None) == (c is None) and (a is None or torch.equal(a, c)), name
