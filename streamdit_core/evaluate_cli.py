"""``python -m streamdit_core eval``: score a model against the procedural world's ground truth.

The sampler is wrapped as the evaluator's :data:`~streamdit_core.evaluate.GenerateFn`; the report
(markdown, JSON and PNG plots) is written with :func:`~streamdit_core.evaluate.write_report`.
Speed is measured separately: frames emitted per wall-clock second of steady streaming (after start-up).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from .cli import register_command, window_arg
from .evaluate import REFERENCE_GENERATORS, EvalConfig, GenerateRequest, evaluate, write_report
from .log import get_logger
from .pipeline import StreamPipeline, load_pipeline
from .prompts import PromptSchedule, parse_schedule
from .sampler import StreamSampler
from .schedule import Partition
from .v2v import VideoSource

log = get_logger("eval")


def sampler_generate_fn(sampler: StreamSampler) -> Callable[[GenerateRequest], torch.Tensor]:
    """The evaluator's generate function for a sampler: a fresh stream per request."""

    def generate(request: GenerateRequest) -> torch.Tensor:
        schedule = parse_schedule(request.schedule_text)
        video = (
            VideoSource(request.video, strength=request.strength)
            if request.video is not None and request.strength < 1
            else None
        )
        state = sampler.init_state(request.seed, schedule, video)
        chunks = math.ceil(request.num_frames / sampler.settings.partition.c)
        _, frames = sampler.advance(state, schedule, chunks=chunks, video=video)
        return frames[: request.num_frames]

    return generate


def streaming_fps(sampler: StreamSampler, chunks: int = 16, seed: int = 0) -> float:
    """Frames per second of steady streaming (start-up excluded)."""
    schedule = PromptSchedule.single("a large red circle moving right on a black background")
    state = sampler.init_state(seed, schedule)
    state, _ = sampler.advance(state, schedule, chunks=1)
    if sampler.pipeline.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    _, frames = sampler.advance(state, schedule, chunks=chunks)
    if sampler.pipeline.device.type == "cuda":
        torch.cuda.synchronize()
    return frames.shape[0] / (time.perf_counter() - start)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.reference:
        return _eval_reference(args)
    pipeline: StreamPipeline = load_pipeline(args.model, device=args.device, dtype=args.dtype, perf=args.perf)
    defaults = pipeline.default_settings()
    partition = defaults.partition
    if args.chunk_size or args.micro_steps:
        partition = Partition.from_buffer(
            partition.B, args.chunk_size or partition.c, s=args.micro_steps or partition.s
        )
    overrides: dict[str, object] = {"partition": partition}
    if args.guidance is not None:
        overrides["guidance"] = args.guidance
    if args.window is not None:
        overrides["window"] = args.window
    settings = pipeline.default_settings(**overrides)
    sampler = StreamSampler(pipeline, settings)
    config = EvalConfig.quick(chunk_size=partition.c) if args.quick else EvalConfig(chunk_size=partition.c)
    size, perf = ("quick" if args.quick else "full"), args.perf or "safe"
    log.info("evaluating %s with %s (%s, speed-ups %s)", pipeline.name, partition.describe(), size, perf)
    report = evaluate(sampler_generate_fn(sampler), config, name=args.name)
    fps = streaming_fps(sampler)
    report = report.with_speed(**{f"{pipeline.device.type}_fps": fps, "threads": float(torch.get_num_threads())})
    window = settings.window or pipeline.model.config.window
    report = replace(report, notes=(
        f"Model `{pipeline.name}`, scheme {partition.describe()}, guidance {settings.guidance:g}, shift "
        f"{settings.shift:g}, window {list(window) if window else 'full'}, speed-ups `{perf}`, "
        f"{pipeline.device.type} {str(pipeline.dtype).removeprefix('torch.')}, {size} configuration."
    ))
    path = write_report(report, args.out, args.name)
    sys.stdout.write(report.to_markdown() + f"\n\nreport: {path}\n")
    return 0


def _eval_reference(args: argparse.Namespace) -> int:
    """Score a reference generator (no model): validates the evaluator with known answers."""
    if args.model or args.chunk_size or args.micro_steps or args.guidance is not None or args.perf or args.window:
        raise ValueError("eval --reference scores a generator without a model: leave out --model, --chunk-size, "
                         "--micro-steps, --guidance, --perf and --window")
    config = EvalConfig.quick() if args.quick else EvalConfig()
    log.info("evaluating the reference generator %r (%s)", args.reference, "quick" if args.quick else "full")
    start = time.perf_counter()
    report = evaluate(REFERENCE_GENERATORS[args.reference], config, name=args.name)
    log.info("evaluated in %.1f s", time.perf_counter() - start)
    path = write_report(report, args.out, args.name)
    sys.stdout.write(report.to_markdown() + f"\n\nreport: {path}\n")
    return 0


@register_command("eval")
def _add_eval(sub: Any) -> None:
    e = sub.add_parser("eval", help="score a model against the procedural world's ground truth")
    e.add_argument("--model", default=None, help="a StreamDiT checkpoint (default: the bundled model)")
    e.add_argument("--reference", choices=sorted(REFERENCE_GENERATORS), default=None,
                   help="score a reference generator instead of a model (validates the evaluator: ground-truth "
                   "scores ~100 %%, random-caption ~chance, time-shuffled keeps colour but not motion)")
    e.add_argument("--out", default="docs/eval")
    e.add_argument("--name", default="eval")
    e.add_argument("--quick", action="store_true", help="the small configuration (minutes on a CPU)")
    e.add_argument("--chunk-size", type=int, default=None)
    e.add_argument("--micro-steps", type=int, default=None)
    e.add_argument("--guidance", type=float, default=None)
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--dtype", default="float32")
    e.add_argument("--window", type=window_arg, default=None,
                   help="self-attention window in tokens F,H,W (default: the model's)")
    e.add_argument("--perf", default=None,
                   help="inference speed-ups as in generate --perf (default: safe); 'fast' makes GPU evaluations of "
                   "many-call teachers several times faster (the fps in the report is measured with it)")
    e.set_defaults(func=cmd_eval)
