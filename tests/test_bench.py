"""The benchmark's analytic FLOP count and its report (speed itself is never asserted)."""

import torch

from streamdit_core.bench import CASES, model_flops, run_case, to_markdown
from streamdit_core.config import preset


def test_flops_match_the_dense_estimate_and_shrink_with_windows():
    cfg = preset("paper-4b")
    latent = (8, 16, 64, 64)
    tokens = 16 * 32 * 32
    full = model_flops(cfg, latent, None)
    windowed = model_flops(cfg, latent, (16, 16, 16))
    # projections dominate: about 2 · parameters · tokens, plus attention
    assert 2 * cfg.num_parameters() * tokens * 0.9 < windowed < full
    attention_full = cfg.num_layers * 4 * tokens * tokens * cfg.dim
    assert abs((full - windowed) - attention_full * (1 - 16 * 16 * 16 / tokens)) / full < 1e-9


def test_bundled_case_runs_and_reports(one_thread):
    row = run_case(CASES["bundled"], torch.device("cpu"), torch.float32, repeats=1)
    assert row["frames_per_second"] > 0 and row["speedup"] > 0 and row["peak_gpu_memory_gib"] is None
    assert "| bundled | cpu | float32 |" in to_markdown([row])
