"""The training benchmark: one timed run on CPU, and the scaling summary's arithmetic."""

import json

import pytest

from streamdit_core.distributed import init_distributed
from streamdit_core.train import TrainConfig
from streamdit_core.train_bench import TRAIN_CASES, SyntheticLatentTrainer, measure, summarize, to_markdown

pytestmark = pytest.mark.usefixtures("one_thread")


def test_synthetic_latent_trainer_runs_timed_steps(tmp_path):
    cfg = TrainConfig(model="test-tiny", buffer=4, batch=2, lr=3e-3, warmup=1, log_every=100, sample_every=0)
    tr = SyntheticLatentTrainer(cfg, tmp_path, (3, 4, 8, 8), init_distributed("cpu"))
    assert tr.text is None and list(tr.live) == ["model"]
    row = measure(tr, warmup=1, steps=2)
    assert tr.step == 3 and row["steps"] == 2 and row["samples_per_s"] > 0
    assert row["samples_per_s"] == pytest.approx(2 * 2 / (row["step_ms_mean"] * 2 / 1000))
    assert row["peak_allocated_gib"] == [None]  # CPU: no GPU memory to report
    with pytest.raises(ValueError, match="latent frames"):
        SyntheticLatentTrainer(cfg, tmp_path, (3, 8, 8, 8), init_distributed("cpu"))


def test_summary_reports_weak_scaling_efficiency(tmp_path):
    def row(world, sps, mem):
        return {
            "case": "bundled", "world_size": world, "device": "GPU", "global_batch": 256 * world,
            "samples_per_s": sps, "step_ms_mean": 1000 * 256 * world / sps, "peak_allocated_gib": mem,
            "peak_reserved_gib": [m + 1 for m in mem], "activation_checkpointing": False,
        }

    (tmp_path / "bundled-w1.json").write_text(json.dumps(row(1, 1000.0, [10.0])))
    (tmp_path / "bundled-w4.json").write_text(json.dumps(row(4, 3000.0, [6.0, 7.5, 6.0, 6.0])))
    runs = summarize(tmp_path)["bundled"]
    assert [r["scaling_efficiency"] for r in runs] == [1.0, 0.75]
    assert runs[1]["peak_allocated_gib_max"] == 7.5 and runs[1]["peak_reserved_gib_max"] == 8.5
    assert "| bundled | 4 | GPU | 1024 | 3000.0 |" in to_markdown(summarize(tmp_path))
    assert TRAIN_CASES["wan2.1-1.3b"].latent == (16, 16, 60, 104)  # 832x480 through the Wan VAE (8x, 4x+1)
