"""The backbone: window attention, per-frame time embedding, shapes and errors."""

import pytest
import torch

from streamdit_core.attention import attention, effective_window, resolve_backend, window_partition, window_reverse
from streamdit_core.config import PRESETS, ModelConfig, preset
from streamdit_core.model import StreamDiT

TINY = preset("test-tiny")


def _model(config=TINY, seed=0):
    torch.manual_seed(seed)
    m = StreamDiT(config).eval()
    torch.nn.init.normal_(m.head.head.weight, std=0.1)  # non-zero output
    return m


def _inputs(frames=4, h=8, w=8, config=TINY, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, config.in_dim, frames, h, w, generator=g)
    ctx = torch.randn(1, config.text_len, config.text_dim, generator=g)
    return x, ctx


def test_parameter_count_matches_config():
    for name in ("test-tiny", "bundled"):
        cfg = preset(name)
        assert sum(p.numel() for p in StreamDiT(cfg).parameters()) == cfg.num_parameters()
    # Wan 2.1 1.3B: about 1.42 B parameters (counted analytically, the model is not built)
    assert 1.40e9 < PRESETS["wan2.1-1.3b"].num_parameters() < 1.44e9
    assert 3.9e9 < PRESETS["paper-4b"].num_parameters() < 4.1e9


def test_one_window_equals_full_attention():
    m = _model()
    x, ctx = _inputs()
    sigma = torch.rand(1, 4)
    with torch.no_grad():
        full = m(x, sigma, ctx, window=None)
        one = m(x, sigma, ctx, window=(4, 4, 4))  # grid is 4×4×4 tokens: one window
        split = m(x, sigma, ctx, window=(2, 2, 2))
    assert torch.allclose(full, one, atol=1e-6)
    assert not torch.allclose(full, split, atol=1e-4)


@pytest.mark.parametrize("shift", [False, True])
def test_windows_cover_every_token_once(shift):
    grid, window = (4, 6, 8), (2, 3, 4)
    tokens = torch.arange(4 * 6 * 8).reshape(1, -1, 1).float()
    parts = window_partition(tokens, grid, window, shift)
    assert parts.shape == (4 * 6 * 8 // 24, 24, 1)
    assert sorted(parts.flatten().long().tolist()) == list(range(4 * 6 * 8))
    assert torch.equal(window_reverse(parts, 1, grid, window, shift), tokens)
    if shift:  # the first window of a shifted partition starts half a window in
        assert parts[0, 0, 0] == 1 * 48 + 1 * 8 + 2


def test_effective_window_divides_grid():
    assert effective_window((16, 8, 8), (8, 8, 8)) == (8, 8, 8)
    assert effective_window((6, 5, 7), (4, 4, 4)) == (3, 1, 1)
    assert effective_window((6, 5, 7), None) == (6, 5, 7)


def test_per_frame_time_equal_frames_equals_scalar_timestep():
    m = _model()
    x, ctx = _inputs()
    with torch.no_grad():
        a = m(x, torch.tensor([0.3]), ctx)
        b = m(x, torch.full((1, 4), 0.3), ctx)
        c = m(x, torch.tensor([[0.3, 0.3, 0.9, 0.3]]), ctx)
    assert torch.equal(a, b)
    assert not torch.allclose(a[:, :, 2], c[:, :, 2])


def test_per_frame_context_equal_frames_equals_shared_context():
    m = _model()
    x, ctx = _inputs()
    with torch.no_grad():
        a = m(x, torch.rand(1, 4), ctx)
        b = m(x, torch.rand(1, 4) * 0 + 0.5, ctx)
        per_frame = ctx[:, None].expand(1, 4, -1, -1)
        a2 = m(x, torch.full((1, 4), 0.5), per_frame)
    assert torch.allclose(b, a2, atol=1e-6)
    assert a.shape == b.shape


def test_odd_sizes_and_clear_errors():
    m = _model()
    x, ctx = _inputs(frames=5, h=6, w=10)
    with torch.no_grad():
        out = m(x, torch.rand(1, 5), ctx, window=(2, 2, 2))
    assert out.shape == x.shape
    x_bad, _ = _inputs(frames=4, h=7, w=8)
    with pytest.raises(ValueError, match="height=7 is not divisible by the model's patch size 2"):
        m(x_bad, torch.rand(1, 4), ctx)
    with pytest.raises(ValueError, match="sigma must be"):
        m(x, torch.rand(1, 3), ctx)


def test_attention_backends_agree_and_errors():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 10, 2, 8, generator=g) for _ in range(3))
    assert torch.allclose(attention(q, k, v, "sdpa"), attention(q, k, v, "math"), atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        resolve_backend("xformers", torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="flash"):
        resolve_backend("flash_attn", torch.device("cpu"), torch.float32)
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"


def test_config_validation_and_json():
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        ModelConfig(patch_size=(1, 2))
    cfg = preset("bundled")
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        preset("nope")


def test_half_precision_model_runs_with_float32_norms():
    m = _model().to(torch.bfloat16)
    x, ctx = _inputs()
    with torch.no_grad():
        out = m(x.to(torch.bfloat16), torch.rand(1, 4), ctx.to(torch.bfloat16))
        ref = _model()(x, torch.rand(1, 4) * 0 + 0.5, ctx)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape and torch.isfinite(out.float()).all()
