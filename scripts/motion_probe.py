"""Does a bundled model's stream keep an object moving? From its own start, and from a moving ground truth?

Usage::

    python scripts/motion_probe.py [--model FILE] [--frames 48] [--out probe.json]

For each case (a caption with one moving object on black, and a seed): the world renders the clip
(``world.render_caption``); its first ``B`` frames, noised to the staircase levels of micro-step 0 (σ from 1/N at
the clean end to 1, one noise draw per case), replace the buffer of a fresh cold-start stream state, and the
stream advances ``--frames`` frames (**injected**). The same caption and seed also stream normally, from the warm
start (**warm**). Per emitted frame: the object's area (pixels with chroma ``max(rgb) − min(rgb) > 0.2``) and the
**shift**, the displacement in whole pixels (within ±6) that best overlaps the previous frame's object mask with
this frame's (robust to blobs that change shape, unlike a centroid). Reported: the true speed along the caption's
direction, the mean shift along it over the first and the last 16 frames of each stream (positive = the
caption's direction), and the mean area over the same frames.

The injected stream's first frames come from the noised ground truth; if the model continues what its buffer
shows, the shift stays at the true speed after the ground truth has left the buffer. CPU, float32, about a
minute for the student with the defaults (the teacher, with 16 calls per chunk, takes about 15 times longer).

Prints a markdown table; ``--out FILE.json`` also writes the numbers (per-frame shifts and areas included) as JSON
and ``FILE.md`` beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from streamdit_core.log import get_logger, log_to_stderr
from streamdit_core.pipeline import WEIGHTS_DIR, load_pipeline
from streamdit_core.prompts import PromptSchedule
from streamdit_core.sampler import StreamSampler
from streamdit_core.world import parse_caption, render_caption

log = get_logger("motion_probe")

CASES: tuple[tuple[str, int], ...] = (
    ("a large red circle moving right on a black background", 0),
    ("a large red circle moving right on a black background", 1),
    ("a large red circle moving right on a black background", 2),
    ("a large blue square moving left on a black background", 0),
    ("a small red circle moving right on a black background", 1),
    ("a large green square moving down on a black background", 3),
    ("a large yellow circle moving up on a black background", 4),
    ("a small blue square moving left on a black background", 5),
    ("a large red square moving up on a black background", 6),
    ("a large cyan circle moving down on a black background", 7),
)
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}  # unit (dx, dy); y grows downwards
CHROMA = 0.2
MAX_SHIFT = 6
WINDOW = 16


def object_masks(frames: torch.Tensor) -> torch.Tensor:
    """frames ``[F, 3, H, W]`` in [0, 1] → object masks ``[F, H, W]`` float (chroma above :data:`CHROMA`)."""
    return ((frames.max(dim=1).values - frames.min(dim=1).values) > CHROMA).float()


def best_shifts(masks: torch.Tensor, radius: int = MAX_SHIFT) -> list[tuple[int, int]]:
    """Per frame the ``(dx, dy)`` (wrapping, within ``radius``) that best overlaps the previous frame's mask with
    this one's; ties go to the smaller shift; ``(0, 0)`` for frame 0."""
    shifts = [(0, 0)]
    candidates = sorted(((dx, dy) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)),
                        key=lambda d: abs(d[0]) + abs(d[1]))
    for prev, cur in zip(masks[:-1], masks[1:]):
        overlaps = [float((torch.roll(prev, shifts=(dy, dx), dims=(0, 1)) * cur).sum()) for dx, dy in candidates]
        shifts.append(candidates[max(range(len(candidates)), key=lambda i: (overlaps[i], -i))])
    return shifts


def along(shifts: Sequence[tuple[int, int]], direction: tuple[int, int]) -> list[float]:
    """Signed displacement per frame along ``direction`` (positive = that direction)."""
    return [float(dx * direction[0] + dy * direction[1]) for dx, dy in shifts]


def summary(frames: torch.Tensor, direction: tuple[int, int]) -> dict[str, object]:
    """Shift along the direction and area, per frame and as means over the first and last :data:`WINDOW` frames."""
    masks = object_masks(frames)
    speed = along(best_shifts(masks), direction)
    area = masks.sum(dim=(1, 2)).tolist()

    def mean(xs: Sequence[float]) -> float:
        return sum(xs) / max(1, len(xs))

    return {"speed_first": mean(speed[1:WINDOW]), "speed_last": mean(speed[-WINDOW:]),
            "area_first": mean(area[:WINDOW]), "area_last": mean(area[-WINDOW:]),
            "speed_per_frame": speed, "area_per_frame": [round(a) for a in area]}


def probe(model: Path, frames: int) -> list[dict[str, object]]:
    pipe = load_pipeline(model)
    warm = pipe.default_settings()
    cold_sampler = StreamSampler(pipe, dataclasses.replace(warm, warm_start=False))
    warm_sampler = StreamSampler(pipe, warm)
    partition = warm.partition
    rows = []
    for caption, seed in CASES:
        motion = parse_caption(caption).objects[0].motion
        direction = DIRECTIONS[motion]
        clip = render_caption(caption, frames, seed=seed)
        vx, vy = clip.truth.velocity[0, 0].tolist()
        schedule = PromptSchedule.single(caption)
        state = cold_sampler.init_state(seed, schedule)
        x = pipe.encode_frames(clip.frames[: partition.B])  # [1, 3, B, H, W]
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 + seed))
        sigma = state.sigmas.float().view(1, 1, -1, 1, 1)  # micro-step 0 of a fresh stream: the staircase
        # the cold start flushes its first N − 1 chunks (first_index < 0); these hold ground truth: emit them all
        state = dataclasses.replace(state, latents=((1 - sigma) * x + sigma * noise).contiguous(), first_index=0)
        state.validate()
        with torch.no_grad():
            _, injected = cold_sampler.advance(state, schedule, chunks=frames // partition.c)
            _, warm_frames = warm_sampler.advance(warm_sampler.init_state(seed, schedule), schedule,
                                                  chunks=frames // partition.c)
        row = {"caption": caption, "seed": seed, "true_speed": vx * direction[0] + vy * direction[1],
               "ground_truth": summary(clip.frames, direction), "injected": summary(injected, direction),
               "warm": summary(warm_frames, direction)}
        log.info("%s, seed %d: true %.2f px/frame; injected %.2f → %.2f; warm %.2f → %.2f", caption, seed,
                 row["true_speed"], row["injected"]["speed_first"], row["injected"]["speed_last"],
                 row["warm"]["speed_first"], row["warm"]["speed_last"])
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, object]], model: Path, frames: int) -> str:
    lines = [f"Motion probe of `{model.name}`: {len(rows)} cases, {frames} frames per stream (`python "
             f"scripts/motion_probe.py --model {model} --frames {frames}`). Speeds in px/frame along the caption's "
             f"direction (best-overlap shift), means over the first / last {WINDOW} frames; area in pixels.", "",
             "| caption | seed | true speed | injected: first / last | injected area | warm start: first / last "
             "| warm area |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        inj, warm = r["injected"], r["warm"]
        assert isinstance(inj, dict) and isinstance(warm, dict)
        lines.append(f"| {r['caption']} | {r['seed']} | {r['true_speed']:.2f} | {inj['speed_first']:.1f} / "
                     f"{inj['speed_last']:.1f} | {inj['area_first']:.0f} → {inj['area_last']:.0f} | "
                     f"{warm['speed_first']:.1f} / {warm['speed_last']:.1f} | "
                     f"{warm['area_first']:.0f} → {warm['area_last']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=WEIGHTS_DIR / "streamdit-bundled.safetensors")
    ap.add_argument("--frames", type=int, default=48, help="frames per stream (a multiple of the chunk size, > 32)")
    ap.add_argument("--out", type=Path, default=None, help="write JSON here and the markdown beside it (.md)")
    args = ap.parse_args(argv)
    log_to_stderr()
    if args.frames <= 2 * WINDOW:
        ap.error(f"--frames must be more than {2 * WINDOW}, got {args.frames}")
    rows = probe(args.model, args.frames)
    text = markdown(rows, args.model, args.frames)
    sys.stdout.write(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text)
        log.info("wrote %s and %s", args.out, args.out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
