"""``python -m streamdit_core train-bench``: training throughput, scaling and memory per GPU.

Launched by ``torchrun`` (any number of ranks; see ``scripts/bench_multigpu.sh``), it builds the trainer of a
case, runs ``warmup`` steps (compilation, allocator, data workers), then times ``steps`` optimiser steps and
writes ``<out>/<case>-w<world>.json`` from rank 0: samples/s of the global batch, step time, and the peak
GPU memory of every rank during the timed steps. ``train-bench --summarize <out>`` reads those files and writes
``summary.json``/``summary.md`` with the scaling efficiency ``samples/s(N) / (N · samples/s(1))`` (weak
scaling: the per-rank batch is fixed, the global batch grows with N).

Cases:

* ``bundled``: the bundled teacher's configuration (``configs/bundled_teacher.json``: procedural world,
  pixels 3×16×64×64, batch 256 per GPU, compiled, bf16).
* ``wan2.1-1.3b``: the Wan 2.1 1.3B layout (random weights, no text encoder) on the paper's buffer at 480p:
  latents 16 ch × 16 frames × 60 × 104 (832×480), random umT5-sized context (512 × 4096), batch 1 per GPU,
  bf16, activation checkpointing, full attention.
* ``tiny``: the ``test-tiny`` layout on 32×32 pixels, for smoke tests on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .cli import register_command
from .config import preset
from .distributed import DistContext, init_distributed, shutdown_distributed
from .log import get_logger
from .model import StreamDiT
from .text import TextEncoder
from .train import Draws, TrainConfig, Trainer, load_config

__all__ = ["TrainBenchCase", "TRAIN_CASES", "SyntheticLatentTrainer", "measure", "summarize"]

log = get_logger("train_bench")

_REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class TrainBenchCase:
    """A training configuration to time. ``latent`` ``(C, F, H, W)``: random latents of that size and random
    text embeddings (:class:`SyntheticLatentTrainer`); ``None``: the procedural world and the bundled text
    encoder (the real :class:`~streamdit_core.train.Trainer`). ``config_file``: read instead of ``config``."""

    name: str
    config: TrainConfig
    latent: tuple[int, int, int, int] | None = None
    config_file: str | None = None

    def train_config(self) -> TrainConfig:
        return load_config(_REPO / self.config_file) if self.config_file else self.config


TRAIN_CASES: dict[str, TrainBenchCase] = {
    "bundled": TrainBenchCase("bundled", TrainConfig(), config_file="configs/bundled_teacher.json"),
    "wan2.1-1.3b": TrainBenchCase(
        "wan2.1-1.3b",
        TrainConfig(model="wan2.1-1.3b", buffer=16, batch=1, bf16=True, activation_checkpointing=True),
        latent=(16, 16, 60, 104),
    ),
    "tiny": TrainBenchCase(
        "tiny",
        TrainConfig(
            model="test-tiny", text_heads=2, text_layers=1, buffer=4, batch=4, world={"height": 32, "width": 32}
        ),
    ),
}


class SyntheticLatentTrainer(Trainer):
    """Trains a backbone on random latents ``[b, C, F, H, W]`` and random per-clip text embeddings
    ``[b, text_len, text_dim]`` (no text encoder): the step cost of a latent model without its data pipeline."""

    def __init__(
        self, cfg: TrainConfig, out: str | Path, latent: tuple[int, int, int, int], dist_ctx: DistContext
    ) -> None:
        if latent[1] != cfg.buffer:
            raise ValueError(f"latent frames {latent[1]} must equal the config's buffer {cfg.buffer}")
        self.latent = latent
        super().__init__(cfg, out, dist_ctx=dist_ctx)

    def build_modules(self, init: str | None) -> tuple[StreamDiT, TextEncoder | None]:
        torch.manual_seed(self.cfg.seed)
        with torch.device(self.dist.device):  # every rank builds the same weights; FSDP keeps its shard
            return StreamDiT(preset(self.cfg.model)), None

    def batch(self, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        b, (c, f, h, w), mc = self.cfg.batch, self.latent, self.model.config
        x = torch.randn(b, c, f, h, w, generator=draws.noise, device=self.device)
        ctx = torch.randn(b, mc.text_len, mc.text_dim, generator=draws.noise, device=self.device)
        return x, ctx


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer: Trainer, warmup: int, steps: int) -> dict[str, Any]:
    """Time ``steps`` optimiser steps after ``warmup`` ones; a collective. Returns rank 0's view: step times
    (the slowest rank's wall time sets the throughput) and every rank's peak memory during the timed steps."""
    device = trainer.device
    for _ in range(warmup):
        trainer.train_step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if dist.get_world_size() > 1:
        dist.barrier()
    times, start = [], time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        trainer.train_step()  # ends with a host sync (the loss value)
        _sync(device)
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    mine = {
        "wall_s": wall,
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
    }
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    slowest = max(r["wall_s"] for r in ranks)
    return {
        "steps": steps,
        "warmup": warmup,
        "step_ms_median": 1000 * statistics.median(times),
        "step_ms_mean": 1000 * slowest / steps,
        "samples_per_s": steps * trainer.global_batch / slowest,
        "samples_per_s_per_gpu": steps * trainer.global_batch / slowest / dist.get_world_size(),
        "peak_allocated_gib": [r["peak_allocated_gib"] for r in ranks],
        "peak_reserved_gib": [r["peak_reserved_gib"] for r in ranks],
    }


def run_case(case: TrainBenchCase, args: argparse.Namespace, ctx: DistContext) -> dict[str, Any]:
    cfg = case.train_config()
    changes: dict[str, Any] = {"log_every": 10**9, "ckpt_every": 10**9, "sample_every": 0}
    if args.batch:
        changes["batch"] = args.batch
    if args.activation_checkpointing is not None:
        changes["activation_checkpointing"] = args.activation_checkpointing
    if args.compile is not None:
        changes["compile"] = args.compile
    cfg = replace(cfg, **changes)
    scratch = Path(args.out) / "scratch" / f"{case.name}-w{ctx.world_size}"
    trainer: Trainer
    if case.latent is not None:
        trainer = SyntheticLatentTrainer(cfg, scratch, case.latent, ctx)
    else:
        trainer = Trainer(cfg, scratch, dist_ctx=ctx)
    result = measure(trainer, args.warmup, args.steps)
    cuda = ctx.device.type == "cuda"
    return {
        "case": case.name,
        "world_size": ctx.world_size,
        "device": torch.cuda.get_device_name(ctx.device) if cuda else "cpu",
        "torch": torch.__version__,
        "parameters": preset(cfg.model).num_parameters(),
        "per_rank_batch": cfg.batch,
        "grad_accum": cfg.grad_accum,
        "global_batch": trainer.global_batch,
        "latent": list(case.latent) if case.latent else None,
        "bf16": cfg.bf16 and cuda,
        "compile": cfg.compile,
        "activation_checkpointing": cfg.activation_checkpointing,
        "config": asdict(cfg),
        "command": " ".join(sys.argv),
        **result,
    }


def summarize(out: Path) -> dict[str, Any]:
    """Group ``<case>-w<N>.json`` results by case; scaling efficiency against the 1-rank run of the case."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*-w*.json"))]
    cases: dict[str, Any] = {}
    for row in sorted(rows, key=lambda r: (r["case"], r["world_size"])):
        cases.setdefault(row["case"], []).append(row)
    summary: dict[str, Any] = {}
    for name, runs in cases.items():
        base = next((r["samples_per_s"] for r in runs if r["world_size"] == 1), None)
        summary[name] = [
            {
                "world_size": r["world_size"],
                "device": r["device"],
                "global_batch": r["global_batch"],
                "samples_per_s": r["samples_per_s"],
                "step_ms": r["step_ms_mean"],
                "scaling_efficiency": r["samples_per_s"] / (r["world_size"] * base) if base else None,
                "peak_allocated_gib_max": max((m for m in r["peak_allocated_gib"] if m is not None), default=None),
                "peak_reserved_gib_max": max((m for m in r["peak_reserved_gib"] if m is not None), default=None),
                "activation_checkpointing": r["activation_checkpointing"],
            }
            for r in runs
        ]
    return summary


def to_markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| case | GPUs | device | global batch | samples/s | step ms | scaling | peak alloc GiB | peak resv. GiB |",
        "|" + "---|" * 9,
    ]

    def num(v: float | None, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    for name, runs in summary.items():
        for r in runs:
            lines.append(
                f"| {name} | {r['world_size']} | {r['device']} | {r['global_batch']} | {r['samples_per_s']:.1f}"
                f" | {r['step_ms']:.0f} | {num(r['scaling_efficiency'], '.2f')}"
                f" | {num(r['peak_allocated_gib_max'], '.1f')} | {num(r['peak_reserved_gib_max'], '.1f')} |"
            )
    return "\n".join(lines) + "\n"


def cmd_train_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.summarize:
        summary = summarize(out)
        if not summary:
            raise ValueError(f"no train-bench results (<case>-w<N>.json) in {out}")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        table = to_markdown(summary)
        (out / "summary.md").write_text(table)
        sys.stdout.write(table)
        return 0
    if args.case not in TRAIN_CASES:
        raise ValueError(f"unknown train-bench case {args.case!r}; choose from {sorted(TRAIN_CASES)}")
    ctx = init_distributed(args.device)
    try:
        row = run_case(TRAIN_CASES[args.case], args, ctx)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"{args.case}-w{ctx.world_size}.json"
            path.write_text(json.dumps(row, indent=2))
            log.info(
                "%s on %d rank(s): %.1f samples/s, %.0f ms/step, peak %s GiB -> %s",
                args.case,
                ctx.world_size,
                row["samples_per_s"],
                row["step_ms_mean"],
                row["peak_allocated_gib"],
                path,
            )
    finally:
        shutdown_distributed()
    return 0


@register_command("train-bench")
def _add_train_bench(sub: Any) -> None:
    b = sub.add_parser("train-bench", help="time training steps (launch with torchrun for several GPUs)")
    b.add_argument("--case", default="bundled", help=f"one of {sorted(TRAIN_CASES)}")
    b.add_argument("--out", required=True, help="results folder")
    b.add_argument("--device", default=None)
    b.add_argument("--steps", type=int, default=20, help="timed steps")
    b.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator, workers)")
    b.add_argument("--batch", type=int, default=None, help="per-rank batch (overrides the case)")
    b.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    b.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    b.add_argument("--summarize", action="store_true", help="only summarise the results already in --out")
    b.set_defaults(func=cmd_train_bench)
