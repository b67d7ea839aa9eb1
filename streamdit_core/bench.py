"""``python -m streamdit_core bench``: speed of one model call over the full buffer, per preset.

For each preset it times, after warm-up, the model call of the streaming scheme (CUDA events on a GPU,
``perf_counter`` on a CPU) and, in the same process, a plain baseline (the same model, eager, full
attention through plain SDPA, same dtype), and reports the speed-up, frames per second
(``c`` frames per ``s`` calls), peak GPU memory and achieved TFLOP/s from the analytic count of
:func:`model_flops`. Results go to ``<out>/bench.json`` and ``<out>/bench.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .attention import effective_window
from .cli import register_command
from .config import ModelConfig, preset
from .log import get_logger
from .model import StreamDiT
from .schedule import Partition

log = get_logger("bench")


@dataclass(frozen=True)
class BenchCase:
    """A preset at a latent size with a streaming scheme. ``latent``: (channels, frames, height, width)."""

    name: str
    model: str
    latent: tuple[int, int, int, int]
    partition: Partition
    window: tuple[int, int, int] | None


CASES: dict[str, BenchCase] = {
    "bundled": BenchCase("bundled", "bundled", (3, 16, 64, 64), Partition(K=0, N=8, c=2, s=1), (8, 8, 8)),
    "paper-4b": BenchCase("paper-4b", "paper-4b", (8, 16, 64, 64), Partition(K=0, N=8, c=2, s=1), (16, 16, 16)),
    "wan2.1-1.3b": BenchCase("wan2.1-1.3b", "wan2.1-1.3b", (16, 16, 60, 104), Partition(K=0, N=8, c=2, s=1), None),
}


def model_flops(cfg: ModelConfig, latent: tuple[int, int, int, int], window: tuple[int, int, int] | None) -> float:
    """Multiply-adds × 2 of one forward pass (batch 1, per-frame text context of ``text_len`` tokens).

    Per block, with ``L`` tokens, ``Lt`` text tokens per frame, ``F'`` token frames, ``w`` tokens per window:
    ``2·L·(4d² + 2d² + 2·d·ffn)`` for the self-attention, cross-attention q/o and FFN projections,
    ``2·F'·Lt·2d²`` for the cross-attention k/v, ``4·L·w·d`` for windowed self-attention and ``4·L·Lt·d`` for
    cross-attention; plus the patch embedding and the head, ``2·L·d·C·prod(patch)`` each.
    """
    c, f, h, w = latent
    pf, ph, pw = cfg.patch_size
    grid = (f // pf, h // ph, w // pw)
    L = grid[0] * grid[1] * grid[2]
    win = effective_window(grid, window)
    wt = win[0] * win[1] * win[2]
    d, lt = cfg.dim, cfg.text_len
    block = 2 * L * (6 * d * d + 2 * d * cfg.ffn_dim) + 2 * grid[0] * lt * 2 * d * d + 4 * L * wt * d + 4 * L * lt * d
    edges = 2 * L * d * c * pf * ph * pw * 2
    return float(cfg.num_layers * block + edges)


def _time_calls(fn: Any, device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs (after two warm-up calls)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return sorted(times)[len(times) // 2]


def run_case(case: BenchCase, device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    cfg = preset(case.model)
    with torch.device(device):
        model = StreamDiT(cfg).to(dtype).eval()
    c, f, h, w = case.latent
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, c, f, h, w, generator=g, device=device, dtype=dtype)
    sigma = torch.rand(1, f, generator=g, device=device)
    ctx = torch.randn(1, f, cfg.text_len, cfg.text_dim, generator=g, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        ms = _time_calls(lambda: model(x, sigma, ctx, window=case.window), device, repeats)
        full = (f, h, w)  # baseline: the same eager model with full attention through plain SDPA
        base_ms = _time_calls(lambda: model(x, sigma, ctx, window=full, attention_backend="sdpa"), device, repeats)
    flops = model_flops(cfg, case.latent, case.window)
    p = case.partition
    return {
        "case": case.name,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": cfg.num_parameters(),
        "latent": list(case.latent),
        "partition": p.describe(),
        "window": list(case.window) if case.window else None,
        "ms_per_call": ms,
        "frames_per_second": 1000 * p.c / (p.s * ms),
        "baseline_ms_per_call": base_ms,
        "speedup": base_ms / ms,
        "tflops_per_call": flops / 1e12,
        "achieved_tflops_per_s": flops / (ms / 1000) / 1e12,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }


def to_markdown(rows: list[dict[str, Any]]) -> str:
    head = "| case | device | dtype | ms/call | frames/s | baseline ms | speed-up | TFLOP/call | TFLOP/s | peak GiB |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        mem = f"{r['peak_gpu_memory_gib']:.1f}" if r["peak_gpu_memory_gib"] is not None else "–"
        lines.append(
            f"| {r['case']} | {r['device']} | {r['dtype']} | {r['ms_per_call']:.1f} | {r['frames_per_second']:.1f}"
            f" | {r['baseline_ms_per_call']:.1f} | {r['speedup']:.2f} | {r['tflops_per_call']:.3f}"
            f" | {r['achieved_tflops_per_s']:.2f} | {mem} |"
        )
    return "\n".join(lines) + "\n"


def cmd_bench(args: argparse.Namespace) -> int:
    from .pipeline import parse_dtype

    device = torch.device(args.device)
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown bench cases {unknown}; choose from {sorted(CASES)}")
    rows = []
    for name in names:
        log.info("benchmarking %s on %s", name, device)
        rows.append(run_case(CASES[name], device, parse_dtype(args.dtype), args.repeats))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "command": " ".join(sys.argv),
    }
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = to_markdown(rows)
    (out / "bench.md").write_text(f"{json.dumps(meta)}\n\n{table}")
    sys.stdout.write(table)
    return 0


@register_command("bench")
def _add_bench(sub: Any) -> None:
    b = sub.add_parser("bench", help="time one model call over the full buffer per preset")
    b.add_argument("--cases", default="bundled", help=f"comma-separated, from {sorted(CASES)}")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--dtype", default="float32")
    b.add_argument("--repeats", type=int, default=10)
    b.add_argument("--out", default="outputs/bench")
    b.set_defaults(func=cmd_bench)


__all__ = ["BenchCase", "CASES", "model_flops", "run_case", "to_markdown"]
