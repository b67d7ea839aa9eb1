"""Command line: ``python -m streamdit_core <command>``.

Commands: ``generate`` (stream a video to MP4 + animated WEBP + PNG contact sheet), ``info`` (describe a
model file). Training, distillation, evaluation and benchmarks register their own sub-commands when their
modules are present.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .log import get_logger, log_to_stderr
from .prompts import PromptSchedule, parse_schedule
from .schedule import Partition

log = get_logger("cli")

DEMO_SCHEDULE = """0: a large red circle bouncing on a black background
48: a large blue square bouncing on a black background
96: a small yellow triangle moving right on a striped background
144: a large green circle moving left and a small purple square standing still on a grey background
"""

Command = Callable[[argparse.Namespace], int]
_EXTRA_COMMANDS: list[tuple[str, Callable[[Any], None]]] = []


def register_command(
    name: str,
) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Decorator for modules that add sub-commands (train, distill, eval, bench)."""

    def wrap(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        _EXTRA_COMMANDS.append((name, fn))
        return fn

    return wrap


class ProgressBar:
    """A one-line text progress bar on stderr (only when stderr is a terminal, else periodic log lines)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.start = max(total, 1), label, time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._last_log = 0.0

    def update(self, done: int, extra: str = "") -> None:
        elapsed = time.perf_counter() - self.start
        frac = min(done / self.total, 1.0)
        if self.tty:
            bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
            sys.stderr.write(f"\r{self.label} [{bar}] {done}/{self.total} {elapsed:6.1f}s {extra}")
            sys.stderr.flush()
        elif elapsed - self._last_log > 5 or done >= self.total:
            self._last_log = elapsed
            log.info("%s %d/%d (%.1fs) %s", self.label, done, self.total, elapsed, extra)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def window_arg(text: str) -> tuple[int, int, int]:
    """``--window F,H,W``: a self-attention window in tokens (token frames, rows, columns)."""
    parts = text.replace("x", ",").split(",")
    try:
        window = tuple(int(p) for p in parts)
    except ValueError:
        window = ()
    if len(window) != 3 or min(window) < 1:
        raise argparse.ArgumentTypeError(
            f"--window must be three positive integers F,H,W (token frames, rows, columns), got {text!r}"
        )
    return (window[0], window[1], window[2])


def _read_schedule(args: argparse.Namespace) -> PromptSchedule:
    """``--schedule`` (text or @FILE), else ``--prompt``, else the demo schedule (``--demo`` forces it)."""
    if args.demo:
        if args.schedule or args.prompt:
            raise ValueError("--demo streams the built-in demo schedule; leave out --schedule/--prompt or --demo")
        log.info("demo: the bundled model streams this schedule:\n%s", DEMO_SCHEDULE.strip())
        return parse_schedule(DEMO_SCHEDULE, transition=args.transition)
    if args.schedule:
        text = Path(args.schedule[1:]).read_text() if args.schedule.startswith("@") else args.schedule
        return parse_schedule(text, transition=args.transition)
    if args.prompt:
        return PromptSchedule.single(args.prompt)
    return parse_schedule(DEMO_SCHEDULE, transition=args.transition)


def _outputs(out: str) -> Path:
    """``--out`` may be a folder (files ``stream.*`` inside) or a file stem/path (``.mp4`` is stripped)."""
    p = Path(out)
    if p.suffix.lower() in (".mp4", ".webp", ".png"):
        p.parent.mkdir(parents=True, exist_ok=True)
        return p.with_suffix("")
    p.mkdir(parents=True, exist_ok=True)
    return p / "stream"


def cmd_generate(args: argparse.Namespace) -> int:
    from .pipeline import load_pipeline
    from .sampler import StreamSampler
    from .stream import load_state, save_state
    from .v2v import StreamEnded, VideoSource
    from .video_io import read_video, write_contact_sheet, write_mp4, write_webp

    pipeline = load_pipeline(args.model, device=args.device, dtype=args.dtype, attention=args.attention, perf=args.perf)
    log.info("inference speed-ups: %s", pipeline.model.perf_status)
    overrides: dict[str, object] = {}
    if args.resume:
        state, meta = load_state(args.resume)
        settings = __import__("streamdit_core.sampler", fromlist=["StreamSettings"]).StreamSettings.from_json(
            meta["settings"]
        )
        schedule = (
            parse_schedule(meta["schedule"], transition=int(meta.get("transition", 0)))
            if not (args.schedule or args.prompt)
            else _read_schedule(args)
        )
    else:
        state = None
        schedule = _read_schedule(args)
        defaults = pipeline.default_settings()
        c = args.chunk_size or defaults.partition.c
        s = args.micro_steps or (
            defaults.partition.s
            if c == defaults.partition.c
            else max(1, defaults.partition.T * c // defaults.partition.B)
        )
        buffer = args.buffer or defaults.partition.B
        overrides["partition"] = Partition.from_buffer(buffer, c, s=s, K=args.reference_frames)
        for name in ("shift", "guidance", "height", "width"):
            if getattr(args, name) is not None:
                overrides[name] = getattr(args, name)
        overrides["warm_start"] = not args.cold_start
        overrides["window"] = args.window
        overrides["model_frames"] = args.model_frames
        overrides["lookahead"] = args.lookahead
        settings = pipeline.default_settings(**overrides)
    sampler = StreamSampler(pipeline, settings)
    video = None
    if args.video:
        frames = torch.from_numpy(read_video(args.video)).permute(0, 3, 1, 2).float() / 255.0
        video = VideoSource(frames, strength=args.strength, on_end=args.on_end)
    fps = args.fps or pipeline.fps
    total_frames = max(1, int(round(args.seconds * fps)))
    chunks = math.ceil(total_frames / settings.partition.c)
    if not pipeline.trained:
        log.warning("running the pipeline on an untrained placeholder model: the video shows noise, not the prompt")
    log.info("model %s | %s | %d frames at %d fps", pipeline.name, settings.partition.describe(), total_frames, fps)

    t0 = time.perf_counter()
    bar = ProgressBar(chunks, "streaming")
    if state is None:
        state = sampler.init_state(args.seed, schedule, video)
    collected: list[torch.Tensor] = []
    first_frame_s = None
    for i in range(chunks):
        try:
            state, frames = sampler.advance(state, schedule, chunks=1, video=video)
        except StreamEnded:
            log.info("input video ended")
            break
        if first_frame_s is None:
            first_frame_s = time.perf_counter() - t0
        collected.append(frames)
        bar.update(i + 1, f"frame {state.frames_emitted}")
    bar.close()
    elapsed = time.perf_counter() - t0
    video_frames = (
        torch.cat(collected)[:total_frames] if collected else torch.zeros(0, 3, settings.height, settings.width)
    )
    stem = _outputs(args.out)
    written = [
        write_mp4(video_frames, stem.with_suffix(".mp4"), fps, layout="FCHW"),
        write_webp(video_frames, stem.with_suffix(".webp"), fps, layout="FCHW"),
        write_contact_sheet(video_frames, stem.with_name(stem.name + "_contact.png"), layout="FCHW"),
    ]
    if args.save_state:
        meta = {
            "settings": settings.to_json(),
            "schedule": schedule.to_text(),
            "transition": str(schedule.transition),
            "model": pipeline.name,
        }
        written.append(save_state(state, args.save_state, meta))
    stats = {
        "frames": int(video_frames.shape[0]),
        "seconds_of_video": video_frames.shape[0] / fps,
        "wall_seconds": elapsed,
        "frames_per_second": video_frames.shape[0] / max(elapsed, 1e-9),
        "time_to_first_frame_s": first_frame_s,
        "model_calls": state.calls,
        "model": pipeline.name,
        "trained": pipeline.trained,
    }
    log.info("stats %s", json.dumps(stats))
    sys.stdout.write(
        f"wrote {video_frames.shape[0]} frames ({stats['seconds_of_video']:.1f} s at {fps} fps) "
        f"in {elapsed:.1f} s ({stats['frames_per_second']:.1f} frames/s):\n"
    )
    for path in written:
        sys.stdout.write(f"  {path}\n")
    if not pipeline.trained:
        sys.stdout.write("note: the bundled weights are not installed, so this ran on an untrained placeholder model\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import read_metadata
    from .pipeline import bundled_model_path

    path = args.model or bundled_model_path()
    if path is None:
        sys.stdout.write("no bundled model installed\n")
        return 1
    meta = read_metadata(path)
    sys.stdout.write(json.dumps({"path": str(path), **meta}, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m streamdit_core", description="StreamDiT streaming text-to-video")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a video to MP4, animated WEBP and a PNG contact sheet")
    g.add_argument("--prompt", help="one prompt for the whole stream")
    g.add_argument("--schedule", help="a prompt schedule ('0: …\\n48: …' or FizzNodes form); @FILE reads a file")
    g.add_argument("--transition", type=int, default=0, help="frames over which a new prompt blends in")
    g.add_argument("--seconds", type=float, default=12.0, help="length of the video")
    g.add_argument("--fps", type=int, default=None, help="output frame rate (default: the model's)")
    g.add_argument("--out", default="outputs/stream", help="output folder or file stem")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--model", default=None, help="a StreamDiT .safetensors file (default: the bundled model)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    g.add_argument("--attention", default="auto", help="auto, sdpa, cudnn, flash_attn or math")
    g.add_argument(
        "--perf",
        default="safe",
        help="inference speed-ups: plain, safe (default: cached text keys/values, RoPE, time embedding; "
        "roll-free windows), fast (+ torch.compile, CUDA graphs), fastest (+ fp8 linears on H100/Ada), or items "
        "like 'kv,layout,gather,compile,graphs,fp8' or 'fastest,fp8fuse' (fused fp8 quantisation kernels; "
        "docs/BENCHMARKS.md)",
    )
    g.add_argument("--chunk-size", type=int, default=None, help="frames per chunk c (default: the model's)")
    g.add_argument("--micro-steps", type=int, default=None, help="micro-steps s per chunk position")
    g.add_argument("--buffer", type=int, default=None, help="frames in the buffer B")
    g.add_argument("--reference-frames", type=int, default=0, help="clean reference frames K")
    g.add_argument("--shift", type=float, default=None)
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (1 = off)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--cold-start", action="store_true", help="start from noise instead of a warm T2V start")
    g.add_argument("--window", type=window_arg, default=None,
                   help="self-attention window in tokens F,H,W (default: the model's; a window the model was not "
                   "trained with changes its output)")
    g.add_argument(
        "--model-frames",
        type=int,
        default=None,
        help="frames per model input (FIFO latent partitioning, for base models); default: the whole buffer",
    )
    g.add_argument("--lookahead", action="store_true", help="with --model-frames: FIFO lookahead denoising")
    g.add_argument("--video", help="input video for video-to-video")
    g.add_argument("--strength", type=float, default=0.7, help="video-to-video noise level of entering frames")
    g.add_argument("--on-end", default="loop", choices=["loop", "hold", "stop"], help="when the input video ends")
    g.add_argument("--resume", help="continue a stream saved with --save-state")
    g.add_argument("--save-state", help="save the stream state here at the end")
    g.add_argument("--demo", action="store_true", help="the quickstart demo: the built-in multi-prompt schedule")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="print a model file's metadata")
    i.add_argument("--model", default=None)
    i.set_defaults(func=cmd_info)

    for _, add in _EXTRA_COMMANDS:
        add(sub)
    return parser


def _load_optional_commands() -> None:
    import importlib

    for module in ("train", "train_bench", "evaluate_cli", "bench"):
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{module}":
                raise


def main(argv: list[str] | None = None) -> int:
    _load_optional_commands()
    args = build_parser().parse_args(argv)
    log_to_stderr(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
