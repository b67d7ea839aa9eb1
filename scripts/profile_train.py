"""Profile training steps of the bundled model: where does a step's time go (data, text, model)?

Usage: python scripts/profile_train.py [--batch 256] [--steps 30] [--compile]
Prints per-phase wall times and the top operators by self CPU and by device time.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from streamdit_core.train import TrainConfig, Trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default="/tmp/profile_run")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TrainConfig(batch=args.batch, steps=10**6, sample_every=0, ckpt_every=10**6, compile=args.compile, warmup=10)
    tr = Trainer(cfg, args.out, device)
    for _ in range(5):
        tr.train_step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    phases = {"data+render+text": 0.0, "sigmas": 0.0, "step": 0.0}
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        tr.batch(tr.draws(0))
        sync()
        phases["data+render+text"] += time.perf_counter() - t
        t = time.perf_counter()
        tr.sigmas(tr.draws(0))
        phases["sigmas"] += time.perf_counter() - t
        t = time.perf_counter()
        tr.train_step()
        sync()
        phases["step"] += time.perf_counter() - t
    for k, v in phases.items():
        sys.stdout.write(f"{k:>18}: {1000 * v / args.steps:8.1f} ms/step\n")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            tr.train_step()
        sync()
    sys.stdout.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15) + "\n")
    if device == "cuda":
        sys.stdout.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15) + "\n")


if __name__ == "__main__":
    main()
