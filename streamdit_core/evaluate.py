"""Measure generated videos against the world's ground truth (``world.py``; methods in ``docs/WORLD.md``).

The evaluator knows nothing about the model: it calls a ``GenerateFn`` with a ``GenerateRequest`` (a caption
or prompt schedule, a frame count, a seed, optionally a video to restyle) and analyses the returned frames:

* **segmentation**: a pixel belongs to an object when its chroma ``max(rgb) − min(rgb)`` exceeds
  ``chroma_min`` (every world background is grey); its colour is the palette entry whose chroma direction
  ``(rgb − min(rgb)) / ‖·‖`` is closest (a hue classifier that ignores mixing with grey at antialiased
  edges). Isolated pixels (fewer than 4 object pixels of that colour in their 3×3 neighbourhood) are dropped.
* **objects**: per palette colour, area, centroid (circular mean, so objects wrapping across an edge are
  tracked), bounding box (of the profiles rolled so the object is centred), fill ratio
  ``area / box area`` and vertical centroid offset → shape (square ≈ 1.0, circle ≈ 0.79, triangle and
  diamond ≈ 0.5, triangle's centroid 1/6 of its height below the box centre), size from the box extent.
* **background** (pixels away from objects): fraction of horizontal / vertical neighbour pairs that differ by
  more than ``edge_step`` (stripes: horizontal only, checkerboard: both, plain: neither) and the median grey
  level (black vs grey).
* **motion**: per window of frames, the displacements of the tracked centroid (wrapped to the torus): an axis
  moves when its median ``|d|`` reaches ``still_speed`` px/frame and either its mean displacement does too or
  its steps reverse sign at most ``max_reversals`` times (a wall reflection) — centroid jitter of a blob that
  stays put does neither; still if no axis moves, bouncing if both move, else the moving axis' sign.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .log import get_logger
from .world import (
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    PALETTE,
    SHAPES,
    SIZES,
    ObjectSpec,
    SceneSpec,
    WorldConfig,
    heldout_captions,
    parse_caption,
    parse_schedule_text,
    render_caption,
    render_schedule,
)

__all__ = [
    "AnalysisConfig",
    "FrameAnalysis",
    "analyze_frames",
    "classify_motion",
    "score_frames",
    "GenerateRequest",
    "GenerateFn",
    "EvalConfig",
    "EvalReport",
    "evaluate",
    "write_report",
    "TARGETS",
    "REFERENCE_GENERATORS",
    "ground_truth_video",
    "random_caption_video",
    "time_shuffled_video",
]

_log = get_logger("evaluate")

TARGETS: dict[str, tuple[str, float]] = {
    "colour": (">=", 0.95),
    "shape": (">=", 0.90),
    "direction": (">=", 0.90),
    "background": (">=", 0.95),
    "switch_chunks": ("<=", 2.0),
    "seam_ratio": ("<=", 1.3),
    "drift_points": ("<=", 5.0),
    "v2v_direction": (">=", 0.85),
    "cpu_fps": (">=", 8.0),
}
"""Targets for the shipped model (issue 3): attribute → (comparison, value)."""

# ------------------------------------------------------------------------------------------------ analysis


@dataclass(frozen=True)
class AnalysisConfig:
    """Thresholds of the frame analysis (pixels and grey levels refer to frames in [0, 1])."""

    chroma_min: float = 0.3
    min_area: int = 8
    square_fill: float = 0.94
    circle_fill: float = 0.645
    triangle_offset: float = 0.075
    edge_step: float = 0.1
    plain_edges: float = 0.03
    stripe_ratio: float = 2.0
    black_level: float = 0.2
    still_speed: float = 0.25
    max_speed: float = 5.0
    bounce_ratio: float = 0.3
    max_reversals: int = 1
    chunk_frames: int = 256

    def __post_init__(self) -> None:
        if not 0 < self.chroma_min < 1:
            raise ValueError(f"AnalysisConfig chroma_min must be in (0, 1), got {self.chroma_min}")
        if self.min_area < 1:
            raise ValueError(f"AnalysisConfig min_area must be >= 1, got {self.min_area}")
        if not 0 < self.circle_fill < self.square_fill <= 1:
            raise ValueError(
                f"AnalysisConfig needs 0 < circle_fill < square_fill <= 1, got {self.circle_fill}, {self.square_fill}"
            )
        if self.chunk_frames < 1:
            raise ValueError(f"AnalysisConfig chunk_frames must be >= 1, got {self.chunk_frames}")
        if self.max_reversals < 0:
            raise ValueError(f"AnalysisConfig max_reversals must be >= 0, got {self.max_reversals}")


@dataclass(frozen=True)
class FrameAnalysis:
    """Per-frame analysis of ``F`` frames; ``C = len(COLOURS)`` palette colours.

    Attributes:
        area: long ``[F, C]`` object pixels of each colour (after dropping isolated pixels).
        centroid: float ``[F, C, 2]`` circular-mean centre of mass ``(x, y)`` in pixels (NaN where absent).
        box_centre: float ``[F, C, 2]`` bounding-box centre (NaN where absent).
        fill: float ``[F, C]`` area / bounding-box area.
        offset: float ``[F, C]`` (centroid y − box centre y) / box height (triangle ≈ 1/6, others ≈ 0).
        shape: long ``[F, C]`` index into ``SHAPES`` (−1 where absent).
        size: long ``[F, C]`` index into ``SIZES`` (−1 where absent).
        background: long ``[F]`` index into ``BACKGROUNDS``.
        background_level: float ``[F]`` median grey level of background pixels.
        background_edges: float ``[F, 2]`` fraction of horizontal / vertical background neighbour pairs that
            differ by more than ``edge_step``.
        width, height: frame size; min_area: the presence threshold used.
    """

    area: torch.Tensor
    centroid: torch.Tensor
    box_centre: torch.Tensor
    fill: torch.Tensor
    offset: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor
    background: torch.Tensor
    background_level: torch.Tensor
    background_edges: torch.Tensor
    width: int
    height: int
    min_area: int

    @property
    def present(self) -> torch.Tensor:
        """Bool ``[F, C]``: the colour covers at least ``min_area`` pixels."""
        return self.area >= self.min_area

    @property
    def dominant_colour(self) -> torch.Tensor:
        """Long ``[F]``: the colour with the largest area, −1 where no colour is present."""
        best = self.area.argmax(-1)
        return torch.where(self.present.any(-1), best, torch.full_like(best, -1))

    def colours(self, frame: int) -> list[str]:
        """Names of the colours present in ``frame``, largest first."""
        order = self.area[frame].argsort(descending=True).tolist()
        return [COLOURS[c] for c in order if bool(self.present[frame, c])]

    def __len__(self) -> int:
        return int(self.area.shape[0])


def _palette_directions(device: torch.device) -> torch.Tensor:
    p = torch.tensor(PALETTE, device=device)
    d = p - p.min(-1, keepdim=True).values
    return d / d.norm(dim=-1, keepdim=True)  # [C, 3]


def _neighbour_count(mask: torch.Tensor) -> torch.Tensor:
    """3×3 neighbourhood count (self included, torus padding) of a bool ``[N, H, W]`` mask → float."""
    x = mask.float().unsqueeze(1)
    x = F.pad(x, (1, 1, 1, 1), mode="circular")
    return F.avg_pool2d(x, 3, stride=1).squeeze(1) * 9


def _circular_mean(profile: torch.Tensor) -> torch.Tensor:
    """Circular centre of mass (in pixels, pixel j centred at j + 0.5) of profiles ``[..., L]``."""
    L = profile.shape[-1]
    angle = (torch.arange(L, device=profile.device, dtype=torch.float32) + 0.5) * (2 * math.pi / L)
    c = (profile * torch.cos(angle)).sum(-1)
    s = (profile * torch.sin(angle)).sum(-1)
    return torch.remainder(torch.atan2(s, c) * (L / (2 * math.pi)), L)


def _roll_profiles(profile: torch.Tensor, centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Roll each profile ``[..., L]`` so its ``centre`` lands near ``L / 2``; returns rolled profiles and the
    shift ``k`` (rolled index ``j`` is original index ``(j + k) mod L``)."""
    L = profile.shape[-1]
    k = torch.round(centre - L / 2).long()
    idx = torch.remainder(torch.arange(L, device=profile.device) + k.unsqueeze(-1), L)
    return profile.gather(-1, idx), k


def _extent(profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index with a non-zero entry of profiles ``[..., L]`` (0 and −1 where empty)."""
    L = profile.shape[-1]
    on = profile > 0
    idx = torch.arange(L, device=profile.device)
    first = torch.where(on, idx, torch.full_like(idx, L)).min(-1).values
    last = torch.where(on, idx, torch.full_like(idx, -1)).max(-1).values
    first = torch.where(last >= 0, first, torch.zeros_like(first))
    return first, last


def _shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Torus shift of ``[N, H, W]``: ``out[y, x] = x[y + dy, x + dx]``."""
    return torch.roll(x, shifts=(-dy, -dx), dims=(1, 2))


def _profiles(label: torch.Tensor, weight: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-colour column and row sums of ``weight`` ``[N, H, W]`` where ``label`` (``[N, H, W]``, ``C`` = none)
    names the colour: ``[N, C, W]`` and ``[N, C, H]``."""
    N, H, W = label.shape
    n = torch.arange(N, device=label.device)[:, None, None]
    base = n * (C + 1) + label.long()  # [N, H, W]
    xs = torch.arange(W, device=label.device)[None, None, :]
    ys = torch.arange(H, device=label.device)[None, :, None]
    cols = torch.zeros(N * (C + 1) * W, device=label.device).index_add_(0, (base * W + xs).flatten(), weight.flatten())
    rows = torch.zeros(N * (C + 1) * H, device=label.device).index_add_(0, (base * H + ys).flatten(), weight.flatten())
    return cols.view(N, C + 1, W)[:, :C], rows.view(N, C + 1, H)[:, :C]


def _analyze_chunk(frames: torch.Tensor, world: WorldConfig, cfg: AnalysisConfig) -> dict[str, torch.Tensor]:
    N, _, H, W = frames.shape
    C = len(COLOURS)
    x = frames.float().clamp(0, 1)
    lo = x.min(1).values
    chroma = x.max(1).values - lo  # [N, H, W]
    # nearest chroma direction: argmax of the dot product (the pixel's own norm does not change the argmax)
    label = torch.einsum("nchw,kc->nkhw", x - lo.unsqueeze(1), _palette_directions(frames.device)).argmax(1)
    objects = chroma > cfg.chroma_min
    label = torch.where(objects, label, C).to(torch.uint8)
    # drop isolated pixels: fewer than 4 pixels of the same colour in the 3x3 neighbourhood (self included)
    same = torch.zeros_like(chroma)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same += (_shifted(label, dy, dx) == label).float()
    kept = objects & (same >= 4)
    label = torch.where(kept, label, C)
    cols, rows = _profiles(label, kept.float(), C)  # binary profiles: area and box
    # soft weights (coverage estimate from chroma) on kept pixels and their 1-pixel fringe, for centroids
    fringe = torch.zeros_like(kept)
    fringe_label = label.clone()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            nb = _shifted(label, dy, dx)
            take = (nb < C) & ~fringe & ~kept
            fringe_label = torch.where(take, nb, fringe_label)
            fringe = fringe | take
    soft_label = torch.where(kept | fringe, fringe_label, C)
    soft = (chroma / 0.8).clamp(0, 1)
    soft_cols, soft_rows = _profiles(soft_label, soft, C)

    area = cols.sum(-1)
    cx, cy = _circular_mean(soft_cols), _circular_mean(soft_rows)
    rc, kx = _roll_profiles(cols, cx)
    rr, ky = _roll_profiles(rows, cy)
    x0, x1 = _extent(rc)
    y0, y1 = _extent(rr)
    w = (x1 - x0 + 1).clamp(min=1).float()
    h = (y1 - y0 + 1).clamp(min=1).float()
    fill = area / (w * h)
    ys = torch.arange(H, device=frames.device, dtype=torch.float32) + 0.5
    mean_y = (rr * ys).sum(-1) / area.clamp(min=1)
    box_y = (y0 + y1 + 1).float() / 2
    offset = (mean_y - box_y) / h
    shape = torch.where(
        fill >= cfg.square_fill,
        1,
        torch.where(offset > cfg.triangle_offset, 2, torch.where(fill >= cfg.circle_fill, 0, 3)),
    )
    radius = (w + h) / 4
    size = (radius > world.size_threshold).long()
    present = area >= cfg.min_area
    nan = torch.full_like(cx, float("nan"))
    centroid = torch.stack([torch.where(present, cx, nan), torch.where(present, cy, nan)], -1)
    bx = torch.remainder((x0 + x1 + 1).float() / 2 + kx, W)
    by = torch.remainder(box_y + ky, H)
    box_centre = torch.stack([torch.where(present, bx, nan), torch.where(present, by, nan)], -1)
    absent = torch.full_like(shape, -1)

    # background: grey pixels at least two pixels away from any object pixel
    near = F.max_pool2d(F.pad(objects.float().unsqueeze(1), (2, 2, 2, 2), mode="circular"), 5, stride=1)
    bg = near.squeeze(1) == 0
    grey = x.mean(1)
    dx_pair = bg[:, :, 1:] & bg[:, :, :-1]
    dy_pair = bg[:, 1:, :] & bg[:, :-1, :]
    step_x = ((grey[:, :, 1:] - grey[:, :, :-1]).abs() > cfg.edge_step) & dx_pair
    step_y = ((grey[:, 1:, :] - grey[:, :-1, :]).abs() > cfg.edge_step) & dy_pair
    ex = step_x.flatten(1).sum(-1) / dx_pair.flatten(1).sum(-1).clamp(min=1)
    ey = step_y.flatten(1).sum(-1) / dy_pair.flatten(1).sum(-1).clamp(min=1)
    has_bg = bg.flatten(1).any(-1)
    level = torch.where(
        has_bg,
        grey.masked_fill(~bg, float("nan")).flatten(1).nanmedian(-1).values,
        grey.flatten(1).median(-1).values,
    )
    plain = (ex + ey) < cfg.plain_edges
    background = torch.where(
        plain,
        torch.where(level < cfg.black_level, 0, 1),
        torch.where(ex > cfg.stripe_ratio * ey, 2, 3),
    )
    return dict(
        area=area.round().long(), centroid=centroid, box_centre=box_centre, fill=fill, offset=offset,
        shape=torch.where(present, shape, absent), size=torch.where(present, size, absent),
        background=background.long(), background_level=level, background_edges=torch.stack([ex, ey], -1),
    )


def analyze_frames(frames: torch.Tensor, world: WorldConfig | None = None,
                   config: AnalysisConfig | None = None) -> FrameAnalysis:
    """Analyse frames ``[F, 3, H, W]`` in [0, 1] (any device; results on CPU). See the module docstring."""
    world = world or WorldConfig()
    config = config or AnalysisConfig()
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [F, 3, H, W], got shape {tuple(frames.shape)}")
    parts = [
        _analyze_chunk(frames[i:i + config.chunk_frames], world, config)
        for i in range(0, frames.shape[0], config.chunk_frames)
    ]
    merged = {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}
    return FrameAnalysis(width=int(frames.shape[-1]), height=int(frames.shape[-2]), min_area=config.min_area,
                         **merged)


def classify_motion(track: torch.Tensor, width: int, height: int, config: AnalysisConfig | None = None) -> int:
    """Motion index (into ``MOTIONS``) of a centroid track ``[K, 2]`` (``K ≥ 2``, NaN rows = lost).

    Displacements are wrapped to ``[−W/2, W/2)``. An axis *moves* when its median ``|d|`` reaches
    ``still_speed`` and it goes somewhere: its mean displacement reaches ``still_speed`` too, or its steps
    change sign at most ``max_reversals`` times (a world object reverses an axis only when it reflects off a
    wall, which can cancel the mean). A generated blob that stays in place while its centroid jitters by a
    pixel has a large median ``|d|`` but neither, and counts as still on that axis. No moving axis: still; both moving
    with the smaller median ≥ ``bounce_ratio`` × the larger: bouncing; else the sign of the mean displacement of
    the moving (or, with two, the dominant) axis. Returns −1 when fewer than one valid displacement exists, or
    when the median step exceeds ``max_speed`` (erratic motion, e.g. frames out of order)."""
    config = config or AnalysisConfig()
    d = track[1:] - track[:-1]
    d = d[~torch.isnan(d).any(-1)]
    if d.shape[0] == 0:
        return -1
    extent = torch.tensor([float(width), float(height)])
    d = torch.remainder(d + extent / 2, extent) - extent / 2
    if float(d.norm(dim=-1).median()) > config.max_speed:
        return -1  # erratic: the world never moves faster than a few pixels per frame
    speed = d.abs().median(0).values  # [2]
    sign = torch.sign(d)
    reversals = ((sign[1:] * sign[:-1]) < 0).sum(0)  # [2]
    net = d.mean(0)  # [2]
    steady = (net.abs() >= config.still_speed) | (reversals <= config.max_reversals)
    moving = (speed >= config.still_speed) & steady
    ax, ay = (float(speed[a]) if bool(moving[a]) else 0.0 for a in (0, 1))
    mx, my = net.tolist()
    big, small = max(ax, ay), min(ax, ay)
    if big == 0.0:
        return MOTIONS.index("still")
    if small > 0.0 and small >= config.bounce_ratio * big:
        return MOTIONS.index("bouncing")
    if ax >= ay:
        return MOTIONS.index("right" if mx > 0 else "left")
    return MOTIONS.index("down" if my > 0 else "up")


@dataclass(frozen=True)
class FrameScores:
    """Per-frame correctness of a clip against the specs it should show.

    ``colour``, ``shape``, ``size``, ``background``: bool ``[F]``; ``direction``: float ``[F]`` (1/0 for the
    window starting at that frame, NaN where no full window fits)."""

    colour: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor
    background: torch.Tensor
    direction: torch.Tensor

    def accuracy(self, start: int = 0, stop: int | None = None, window: int = 8) -> dict[str, float]:
        """Mean accuracy over frames ``[start, stop)``; direction over non-overlapping windows of ``window``."""
        sl = slice(start, stop)
        d = self.direction[sl][::window]
        d = d[~torch.isnan(d)]
        out = {k: float(getattr(self, k)[sl].float().mean()) for k in ("colour", "shape", "size", "background")}
        out["direction"] = float(d.mean()) if d.numel() else float("nan")
        out["mean"] = sum(out[k] for k in ("colour", "shape", "direction", "background")) / 4
        return out


def _matched(analysis: FrameAnalysis, frame: int, spec: SceneSpec) -> list[int]:
    """Detected colour index standing for each expected object: its own colour when present, otherwise the
    largest present colour not expected (−1 when none)."""
    expected = [COLOURS.index(o.colour) for o in spec.objects]
    present = analysis.present[frame]
    order = analysis.area[frame].argsort(descending=True).tolist()
    spare = [c for c in order if bool(present[c]) and c not in expected]
    out = []
    for c in expected:
        if bool(present[c]):
            out.append(c)
        elif spare:
            out.append(spare.pop(0))
        else:
            out.append(-1)
    return out


def score_frames(analysis: FrameAnalysis, specs: Sequence[SceneSpec], window: int = 8,
                 config: AnalysisConfig | None = None) -> FrameScores:
    """Score each frame of ``analysis`` against ``specs[f]`` (what frame ``f`` should show).

    colour: the set of present colours equals the expected set. shape / size: every expected object's matched
    detection (see ``_matched``) has the expected shape / size. background: classified background equals the
    expected one. direction at ``f``: every expected object's matched track over frames ``[f, f + window]``
    is classified as its motion in ``specs[f]``."""
    n = len(analysis)
    if len(specs) != n:
        raise ValueError(f"got {len(specs)} specs for {n} frames")
    colour = torch.zeros(n, dtype=torch.bool)
    shape = torch.zeros(n, dtype=torch.bool)
    size = torch.zeros(n, dtype=torch.bool)
    background = torch.zeros(n, dtype=torch.bool)
    direction = torch.full((n,), float("nan"))
    matches = [_matched(analysis, f, specs[f]) for f in range(n)]
    for f, spec in enumerate(specs):
        expected = {COLOURS.index(o.colour) for o in spec.objects}
        found = set(analysis.present[f].nonzero().flatten().tolist())
        colour[f] = expected == found
        m = matches[f]
        shape[f] = all(c >= 0 and int(analysis.shape[f, c]) == SHAPES.index(o.shape) for c, o in zip(m, spec.objects))
        size[f] = all(c >= 0 and int(analysis.size[f, c]) == SIZES.index(o.size) for c, o in zip(m, spec.objects))
        background[f] = int(analysis.background[f]) == BACKGROUNDS.index(spec.background)
        if f + window < n:
            ok = True
            for j, o in enumerate(spec.objects):
                c = m[j]
                if c < 0:
                    ok = False
                    break
                track = analysis.centroid[f:f + window + 1, c]
                got = classify_motion(track, analysis.width, analysis.height, config)
                ok = ok and got == MOTIONS.index(o.motion)
            direction[f] = float(ok)
    return FrameScores(colour=colour, shape=shape, size=size, background=background, direction=direction)


# ------------------------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class GenerateRequest:
    """What the evaluator asks a generator for.

    Attributes:
        schedule_text: one caption, or a prompt schedule (``0: caption A\\n48: caption B``).
        num_frames: frames to return.
        seed: the seed for the generator's ``torch.Generator``.
        video: optional float ``[num_frames, 3, H, W]`` in [0, 1] to restyle (video-to-video).
        strength: video-to-video noise level (1.0 = ignore the input video entirely).
    """

    schedule_text: str
    num_frames: int
    seed: int
    video: torch.Tensor | None = None
    strength: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ValueError(f"GenerateRequest num_frames must be a positive integer, got {self.num_frames!r}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"GenerateRequest strength must be in [0, 1], got {self.strength}")
        if self.video is not None and (self.video.dim() != 4 or self.video.shape[1] != 3):
            raise ValueError(f"GenerateRequest video must be [F, 3, H, W], got {tuple(self.video.shape)}")

    @property
    def schedule(self) -> list[tuple[int, str]]:
        return parse_schedule_text(self.schedule_text)


GenerateFn = Callable[[GenerateRequest], torch.Tensor]
"""A generator: request → frames float ``[num_frames, 3, H, W]`` in [0, 1]."""


# --------------------------------------------------------------------------------------------------- config


def _change(obj: ObjectSpec, kind: str) -> ObjectSpec:
    """The object with one attribute changed deterministically (next value in the attribute tuple)."""
    if kind == "colour":
        return replace(obj, colour=COLOURS[(COLOURS.index(obj.colour) + 1) % len(COLOURS)])
    if kind == "shape":
        return replace(obj, shape=SHAPES[(SHAPES.index(obj.shape) + 1) % len(SHAPES)])
    if kind == "motion":
        return replace(obj, motion=MOTIONS[(MOTIONS.index(obj.motion) + 2) % len(MOTIONS)])
    raise ValueError(f"unknown change kind {kind!r}; allowed: colour, shape, motion")


@dataclass(frozen=True)
class EvalConfig:
    """What ``evaluate`` measures and how much.

    Attributes:
        world: the world the generator was trained on (frame size, held-out set, size threshold).
        analysis: thresholds of the frame analysis.
        prompts: adherence prompts (empty: ``heldout_captions(world)``, never seen in training).
        seeds: seeds per adherence prompt.
        adherence_frames: frames per adherence clip.
        direction_window: frames per motion window (adherence, drift, video-to-video).
        chunk_size: the generator's emission chunk (frames); seams are at multiples of it, switch latency is
            also reported in chunks.
        switch_cases: number of prompt-switch cases (cycling colour / shape / motion changes).
        switch_frame, switch_after: switch frame and frames generated after it.
        switch_hold, switch_window: the new attributes must hold ``switch_hold`` consecutive frames (motion
            judged over ``switch_window``-frame windows).
        drift_prompts: long-stream captions (empty: the first moving held-out caption).
        drift_frames, drift_window: long-stream length and the first / last window compared.
        v2v_cases, v2v_frames, v2v_strength: video-to-video cases, their length and strength.
    """

    world: WorldConfig = field(default_factory=WorldConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0, 1)
    adherence_frames: int = 48
    direction_window: int = 8
    chunk_size: int = 4
    switch_cases: int = 12
    switch_frame: int = 48
    switch_after: int = 48
    switch_hold: int = 4
    switch_window: int = 4
    drift_prompts: tuple[str, ...] = ()
    drift_frames: int = 3000
    drift_window: int = 300
    v2v_cases: int = 6
    v2v_frames: int = 48
    v2v_strength: float = 0.8

    def __post_init__(self) -> None:
        for name in ("adherence_frames", "direction_window", "chunk_size", "switch_cases", "switch_frame",
                     "switch_after", "switch_hold", "switch_window", "drift_frames", "drift_window", "v2v_cases",
                     "v2v_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"EvalConfig {name} must be a non-negative integer, got {value!r}")
        if not self.seeds:
            raise ValueError("EvalConfig seeds must not be empty")
        if self.direction_window < 2 or self.switch_window < 2:
            raise ValueError(
                f"EvalConfig windows must be >= 2, got direction_window={self.direction_window}, "
                f"switch_window={self.switch_window}"
            )
        if self.chunk_size < 1:
            raise ValueError(f"EvalConfig chunk_size must be >= 1, got {self.chunk_size}")
        if self.adherence_frames <= self.direction_window:
            raise ValueError(
                f"EvalConfig adherence_frames={self.adherence_frames} must exceed direction_window="
                f"{self.direction_window}"
            )
        if self.switch_after < self.switch_window + self.switch_hold:
            raise ValueError(
                f"EvalConfig switch_after={self.switch_after} must be >= switch_window + switch_hold = "
                f"{self.switch_window + self.switch_hold}"
            )
        if self.switch_frame <= self.direction_window:
            raise ValueError(f"EvalConfig switch_frame={self.switch_frame} must exceed direction_window")
        if 2 * self.drift_window > self.drift_frames or self.drift_window <= self.direction_window:
            raise ValueError(
                f"EvalConfig needs direction_window < drift_window <= drift_frames / 2, got drift_window="
                f"{self.drift_window}, drift_frames={self.drift_frames}"
            )
        if self.v2v_cases and self.v2v_frames <= self.direction_window:
            raise ValueError(f"EvalConfig v2v_frames={self.v2v_frames} must exceed direction_window")
        if not 0.0 <= self.v2v_strength <= 1.0:
            raise ValueError(f"EvalConfig v2v_strength must be in [0, 1], got {self.v2v_strength}")
        for caption in self.prompts + self.drift_prompts:
            parse_caption(caption)

    @classmethod
    def quick(cls, world: WorldConfig | None = None, **overrides: Any) -> EvalConfig:
        """A small configuration for tests and smoke runs (seconds with a fast generator)."""
        world = world or WorldConfig()
        base: dict[str, Any] = dict(
            world=world, prompts=heldout_captions(world)[:8], seeds=(0,), adherence_frames=24, switch_cases=3,
            switch_frame=16, switch_after=16, drift_frames=400, drift_window=100, v2v_cases=3, v2v_frames=24,
        )
        base.update(overrides)
        return cls(**base)

    @property
    def adherence_prompts(self) -> tuple[str, ...]:
        return self.prompts or heldout_captions(self.world)

    @property
    def drift_captions(self) -> tuple[str, ...]:
        if self.drift_prompts:
            return self.drift_prompts
        moving = [c for c in heldout_captions(self.world) if "moving" in c or "bouncing" in c]
        return tuple(moving or list(heldout_captions(self.world)))[:1]

    def switch_schedules(self) -> list[tuple[str, str, str]]:
        """``(kind, caption before, caption after)`` per switch case: held-out captions with one attribute
        changed (cycling colour, shape, motion)."""
        base = self.adherence_prompts
        out = []
        for i in range(self.switch_cases):
            kind = ("colour", "shape", "motion")[i % 3]
            spec = parse_caption(base[i % len(base)])
            new = SceneSpec(spec.background, (_change(spec.objects[0], kind),) + spec.objects[1:])
            out.append((kind, spec.caption, new.caption))
        return out

    def v2v_pairs(self) -> list[tuple[str, str]]:
        """``(source caption, restyle caption)``: same size, motion and background; new colour and shape."""
        base = [c for c in self.adherence_prompts if "still" not in c] or list(self.adherence_prompts)
        out = []
        for i in range(self.v2v_cases):
            spec = parse_caption(base[i % len(base)])
            obj = _change(_change(spec.objects[0], "colour"), "shape")
            out.append((spec.caption, SceneSpec(spec.background, (obj,)).caption))
        return out


# --------------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class EvalReport:
    """Everything ``evaluate`` measured. Accuracies are fractions in [0, 1]; ``speed`` is filled by the caller
    (e.g. ``{"cpu_fps": 9.1, "gpu_fps": 240.0}``) with ``dataclasses.replace`` or ``with_speed``."""

    adherence: dict[str, float]
    adherence_per_prompt: list[dict]
    switch: dict[str, float]
    switch_cases: list[dict]
    seams: dict[str, float]
    seam_profile: list[float]
    drift: dict[str, float]
    drift_curve: list[dict]
    v2v: dict[str, float]
    generation: dict[str, float]
    speed: dict[str, float] = field(default_factory=dict)
    name: str = "eval"
    notes: str = ""

    def with_speed(self, **fps: float) -> EvalReport:
        return replace(self, speed={**self.speed, **fps})

    def to_dict(self) -> dict:
        return asdict(self)

    def targets(self) -> dict[str, tuple[float, str, float, bool]]:
        """Measured value vs target per ``TARGETS`` key: ``(value, op, target, met)`` (NaN = not measured)."""
        values = {
            "colour": self.adherence.get("colour", math.nan),
            "shape": self.adherence.get("shape", math.nan),
            "direction": self.adherence.get("direction", math.nan),
            "background": self.adherence.get("background", math.nan),
            "switch_chunks": self.switch.get("mean_chunks", math.nan),
            "seam_ratio": self.seams.get("ratio", math.nan),
            "drift_points": abs(self.drift.get("mean_diff_points", math.nan)),
            "v2v_direction": self.v2v.get("direction", math.nan),
            "cpu_fps": self.speed.get("cpu_fps", math.nan),
        }
        out = {}
        for key, (op, target) in TARGETS.items():
            v = values[key]
            met = (not math.isnan(v)) and (v >= target if op == ">=" else v <= target)
            out[key] = (v, op, target, met)
        return out

    def to_markdown(self, images: dict[str, str] | None = None) -> str:
        """The report as markdown; ``images`` maps plot names to relative paths to embed."""
        images = images or {}
        def missing(v: float | None) -> bool:
            return v is None or (isinstance(v, float) and math.isnan(v))

        def pct(v: float | None) -> str:
            return "n/a" if v is None or missing(v) else f"{100 * v:.1f} %"

        def num(v: float | None, d: int = 2) -> str:
            return "n/a" if v is None or missing(v) else f"{v:.{d}f}"
        lines = [f"# Evaluation: {self.name}", ""]
        if self.notes:
            lines += [self.notes, ""]
        lines += ["## Summary against targets", "", "| metric | measured | target | met |", "|---|---|---|---|"]
        for key, (v, op, target, met) in self.targets().items():
            shown = pct(v) if key in ("colour", "shape", "direction", "background", "v2v_direction") else num(v)
            tshown = f"{op} {pct(target)}" if target <= 1 and key not in ("switch_chunks",) else f"{op} {target:g}"
            lines.append(f"| {key} | {shown} | {tshown} | {'yes' if met else 'no'} |")
        lines += ["", "## Prompt adherence (held-out prompts)", ""]
        lines += ["| attribute | accuracy |", "|---|---|"]
        lines += [f"| {k} | {pct(v)} |" for k, v in self.adherence.items()]
        if "adherence" in images:
            lines += ["", f"![adherence]({images['adherence']})"]
        lines += ["", "<details><summary>per prompt</summary>", "",
                  "| prompt | seed | colour | shape | size | direction | background |", "|---|---|---|---|---|---|---|"]
        for row in self.adherence_per_prompt:
            lines.append(
                f"| {row['prompt']} | {row['seed']} | {pct(row['colour'])} | {pct(row['shape'])} | "
                f"{pct(row['size'])} | {pct(row['direction'])} | {pct(row['background'])} |"
            )
        lines += ["", "</details>", "", "## Prompt-switch response", ""]
        lines += ["| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {num(v)} |" for k, v in self.switch.items()]
        if "switch" in images:
            lines += ["", f"![switch]({images['switch']})"]
        lines += ["", "## Seams", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {num(v, 4)} |" for k, v in self.seams.items()]
        if "seams" in images:
            lines += ["", f"![seams]({images['seams']})"]
        lines += ["", "## Drift", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {num(v, 3)} |" for k, v in self.drift.items()]
        if "drift" in images:
            lines += ["", f"![drift]({images['drift']})"]
        lines += ["", "## Video-to-video", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {num(v, 3)} |" for k, v in self.v2v.items()]
        lines += ["", "## Speed", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {num(v)} |" for k, v in {**self.speed, **self.generation}.items()]
        lines.append("")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ evaluate


class _Timer:
    def __init__(self, generate: GenerateFn, world: WorldConfig) -> None:
        self.generate, self.world = generate, world
        self.seconds, self.frames = 0.0, 0

    def __call__(self, request: GenerateRequest) -> torch.Tensor:
        start = time.perf_counter()
        out = self.generate(request)
        self.seconds += time.perf_counter() - start
        expected = (request.num_frames, 3, self.world.height, self.world.width)
        if tuple(out.shape) != expected:
            raise ValueError(f"generator returned shape {tuple(out.shape)}, expected {expected}")
        self.frames += request.num_frames
        return out.detach().float().cpu()


def _specs_for(schedule: Sequence[tuple[int, str]], num_frames: int) -> list[SceneSpec]:
    specs, k = [], 0
    parsed = [(f, parse_caption(c)) for f, c in schedule]
    for frame in range(num_frames):
        while k + 1 < len(parsed) and parsed[k + 1][0] <= frame:
            k += 1
        specs.append(parsed[k][1])
    return specs


def _frame_diffs(frames: torch.Tensor) -> torch.Tensor:
    """Mean absolute change between consecutive frames: ``[F − 1]``."""
    return (frames[1:] - frames[:-1]).abs().flatten(1).mean(-1)


def _nanmean(values: Sequence[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


def _adherence(gen: _Timer, config: EvalConfig, seam_diffs: list[torch.Tensor]) -> tuple[dict, list[dict]]:
    rows: list[dict[str, Any]] = []
    for prompt in config.adherence_prompts:
        for seed in config.seeds:
            frames = gen(GenerateRequest(prompt, config.adherence_frames, seed))
            seam_diffs.append(_frame_diffs(frames))
            analysis = analyze_frames(frames, config.world, config.analysis)
            scores = score_frames(analysis, [parse_caption(prompt)] * len(analysis), config.direction_window,
                                  config.analysis)
            rows.append({"prompt": prompt, "seed": seed, **scores.accuracy(window=config.direction_window)})
    keys = ("colour", "shape", "size", "direction", "background")
    summary = {k: _nanmean([r[k] for r in rows]) for k in keys}
    summary["mean"] = sum(summary[k] for k in ("colour", "shape", "direction", "background")) / 4
    return summary, rows


def _switch(gen: _Timer, config: EvalConfig) -> tuple[dict, list[dict]]:
    cases: list[dict[str, Any]] = []
    total = config.switch_frame + config.switch_after
    for i, (kind, before, after) in enumerate(config.switch_schedules()):
        schedule = [(0, before), (config.switch_frame, after)]
        text = f"0: {before}\n{config.switch_frame}: {after}"
        frames = gen(GenerateRequest(text, total, config.seeds[i % len(config.seeds)]))
        analysis = analyze_frames(frames, config.world, config.analysis)
        scores = score_frames(analysis, _specs_for(schedule, total), config.switch_window, config.analysis)
        ok = scores.colour & scores.shape & (scores.direction == 1)
        latency, responded = config.switch_after, False
        last_start = total - config.switch_window - config.switch_hold
        for f in range(config.switch_frame, last_start + 1):
            if bool(ok[f:f + config.switch_hold].all()):
                latency, responded = f - config.switch_frame, True
                break
        cases.append({"kind": kind, "before": before, "after": after, "latency_frames": float(latency),
                      "responded": float(responded)})
    if not cases:
        return {}, []
    lat = [c["latency_frames"] for c in cases]
    summary = {
        "mean_frames": sum(lat) / len(lat),
        "mean_chunks": sum(lat) / len(lat) / config.chunk_size,
        "median_frames": float(torch.tensor(lat).median()),
        "responded": sum(c["responded"] for c in cases) / len(cases),
    }
    for kind in ("colour", "shape", "motion"):
        sub = [c["latency_frames"] for c in cases if c["kind"] == kind]
        if sub:
            summary[f"{kind}_mean_frames"] = sum(sub) / len(sub)
    return summary, cases


def _seams(diffs: list[torch.Tensor], chunk: int) -> tuple[dict, list[float]]:
    """Boundary pairs are ``(t, t + 1)`` with ``(t + 1) % chunk == 0``; ``profile[k]`` is the mean change into
    frames with ``(t + 1) % chunk == k``."""
    sums = torch.zeros(chunk, dtype=torch.float64)
    counts = torch.zeros(chunk, dtype=torch.float64)
    for d in diffs:
        phase = (torch.arange(1, d.numel() + 1)) % chunk
        sums.index_add_(0, phase, d.double())
        counts.index_add_(0, phase, torch.ones_like(d, dtype=torch.float64))
    profile = (sums / counts.clamp(min=1)).tolist()
    if chunk == 1:
        return {"ratio": math.nan, "boundary": profile[0], "within": math.nan}, profile
    boundary = float(sums[0] / counts[0].clamp(min=1))
    within = float(sums[1:].sum() / counts[1:].sum().clamp(min=1))
    ratio = boundary / within if within > 0 else math.nan
    return {"ratio": ratio, "boundary": boundary, "within": within}, profile


def _drift(gen: _Timer, config: EvalConfig, seam_diffs: list[torch.Tensor]) -> tuple[dict, list[dict]]:
    W = config.drift_window
    first, last, curve = [], [], []
    for i, caption in enumerate(config.drift_captions):
        frames = gen(GenerateRequest(caption, config.drift_frames, config.seeds[i % len(config.seeds)]))
        seam_diffs.append(_frame_diffs(frames))
        analysis = analyze_frames(frames, config.world, config.analysis)
        scores = score_frames(analysis, [parse_caption(caption)] * len(analysis), config.direction_window,
                              config.analysis)
        n = len(analysis)
        stats = []
        for start, stop in ((0, W), (n - W, n)):
            acc = scores.accuracy(start, stop, config.direction_window)
            acc["background_level"] = float(analysis.background_level[start:stop].mean())
            acc["background_edges"] = float(analysis.background_edges[start:stop].sum(-1).mean())
            stats.append(acc)
        first.append(stats[0])
        last.append(stats[1])
        for start in range(0, n - W + 1, W):
            acc = scores.accuracy(start, start + W, config.direction_window)
            curve.append({"prompt": i, "frame": start, **acc})
    keys = ("colour", "shape", "direction", "background", "mean", "background_level", "background_edges")
    out: dict[str, float] = {}
    for k in keys:
        a, b = _nanmean([s[k] for s in first]), _nanmean([s[k] for s in last])
        out[f"first_{k}"], out[f"last_{k}"] = a, b
    for k in ("colour", "shape", "direction", "background", "mean"):
        out[f"{k}_diff_points"] = 100 * (out[f"last_{k}"] - out[f"first_{k}"])
    return out, curve


def _wrapped_distance(a: torch.Tensor, b: torch.Tensor, width: int, height: int) -> torch.Tensor:
    extent = torch.tensor([float(width), float(height)])
    d = torch.remainder(a - b + extent / 2, extent) - extent / 2
    return d.norm(dim=-1)


def _v2v(gen: _Timer, config: EvalConfig) -> dict:
    rows: list[dict[str, Any]] = []
    for i, (source, target) in enumerate(config.v2v_pairs()):
        seed = config.seeds[i % len(config.seeds)]
        clip = render_caption(source, config.v2v_frames, seed, config=config.world)
        frames = gen(GenerateRequest(target, config.v2v_frames, seed, video=clip.frames,
                                     strength=config.v2v_strength))
        analysis = analyze_frames(frames, config.world, config.analysis)
        spec = parse_caption(target)
        scores = score_frames(analysis, [spec] * len(analysis), config.direction_window, config.analysis)
        acc = scores.accuracy(window=config.direction_window)
        c = COLOURS.index(spec.objects[0].colour)
        found = analysis.present[:, c]
        err = _wrapped_distance(analysis.box_centre[:, c], clip.truth.position[:, 0].float(), analysis.width,
                                analysis.height)
        old = COLOURS.index(parse_caption(source).objects[0].colour)
        rows.append({**acc, "position_error_px": float(err[found].mean()) if found.any() else math.nan,
                     "source_colour_left": float(analysis.present[:, old].float().mean())})
    if not rows:
        return {}
    keys = ("direction", "colour", "shape", "background", "position_error_px", "source_colour_left")
    out = {k: _nanmean([r[k] for r in rows]) for k in keys}
    out["strength"] = config.v2v_strength
    return out


# ------------------------------------------------------------------------------------------------ references
# Generators with known scores, to validate the evaluator (tests/test_evaluate.py, ``eval --reference``).


def ground_truth_video(request: GenerateRequest) -> torch.Tensor:
    """The ideal generator: the world's own video ``[F, H, W, 3]`` for the requested schedule (video-to-video
    included: the same seed places a restyled caption exactly where the source caption was)."""
    return render_schedule(request.schedule_text, request.num_frames, request.seed).frames


def random_caption_video(request: GenerateRequest) -> torch.Tensor:
    """Ignores the prompt: renders a caption drawn at random (seeded by the request), ``[F, H, W, 3]``."""
    key = zlib.crc32(f"{request.schedule_text}|{request.seed}".encode())
    g = torch.Generator().manual_seed(key)

    def pick(values: tuple[str, ...]) -> str:
        return values[int(torch.randint(len(values), (), generator=g))]

    spec = SceneSpec(pick(BACKGROUNDS), (ObjectSpec(pick(SIZES), pick(COLOURS), pick(SHAPES), pick(MOTIONS)),))
    return render_caption(spec.caption, request.num_frames, request.seed).frames


def time_shuffled_video(request: GenerateRequest) -> torch.Tensor:
    """The ground truth with its frames in a random (seeded) order: right content, no motion."""
    frames = ground_truth_video(request)
    g = torch.Generator().manual_seed(request.seed)
    return frames[torch.randperm(frames.shape[0], generator=g)]


REFERENCE_GENERATORS: dict[str, GenerateFn] = {
    "ground-truth": ground_truth_video,
    "random-caption": random_caption_video,
    "time-shuffled": time_shuffled_video,
}
"""``eval --reference NAME``: generators whose scores are known (≈100 %, ≈chance, no motion)."""


def evaluate(generate: GenerateFn, config: EvalConfig | None = None, name: str = "eval") -> EvalReport:
    """Run every measurement of ``config`` against ``generate`` (see ``docs/WORLD.md``)."""
    config = config or EvalConfig()
    gen = _Timer(generate, config.world)
    seam_diffs: list[torch.Tensor] = []
    _log.info("adherence: %d prompts x %d seeds", len(config.adherence_prompts), len(config.seeds))
    adherence, per_prompt = _adherence(gen, config, seam_diffs)
    _log.info("prompt switch: %d cases", config.switch_cases)
    switch, switch_cases = _switch(gen, config)
    _log.info("drift: %d frames x %d prompts", config.drift_frames, len(config.drift_captions))
    drift, curve = _drift(gen, config, seam_diffs)
    seams, profile = _seams(seam_diffs, config.chunk_size)
    _log.info("video-to-video: %d cases", config.v2v_cases)
    v2v = _v2v(gen, config)
    generation = {"generated_frames": float(gen.frames), "generate_seconds": gen.seconds,
                  "generate_fps": gen.frames / gen.seconds if gen.seconds > 0 else math.nan}
    drift["mean_diff_points"] = drift.get("mean_diff_points", math.nan)
    return EvalReport(adherence=adherence, adherence_per_prompt=per_prompt, switch=switch,
                      switch_cases=switch_cases, seams=seams, seam_profile=profile, drift=drift, drift_curve=curve,
                      v2v=v2v, generation=generation, name=name)


# ---------------------------------------------------------------------------------------------------- plots


def _font() -> Any:
    from PIL import ImageFont

    return ImageFont.load_default()


def _bar_chart(labels: Sequence[str], values: Sequence[float], title: str, path: Path, ymax: float = 1.0,
               target: float | None = None) -> None:
    """A simple PIL bar chart (NaN bars are drawn empty)."""
    from PIL import Image, ImageDraw

    w, h, left, bottom, top = 80 + 90 * len(labels), 320, 50, 40, 30
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = _font()
    d.text((left, 8), title, fill="black", font=font)
    plot_h = h - top - bottom
    d.line([(left, top), (left, h - bottom), (w - 10, h - bottom)], fill="black")
    for frac in (0.0, 0.5, 1.0):
        y = h - bottom - frac * plot_h
        d.text((5, y - 6), f"{frac * ymax:.3g}", fill="black", font=font)
    for i, (label, v) in enumerate(zip(labels, values)):
        x0 = left + 15 + 90 * i
        if not math.isnan(v):
            y = h - bottom - min(max(v / ymax, 0.0), 1.0) * plot_h
            d.rectangle([x0, y, x0 + 60, h - bottom], fill=(70, 110, 200))
            d.text((x0, y - 14), f"{v:.3g}", fill="black", font=font)
        d.text((x0, h - bottom + 6), label[:14], fill="black", font=font)
    if target is not None:
        y = h - bottom - min(target / ymax, 1.0) * plot_h
        d.line([(left, y), (w - 10, y)], fill=(220, 40, 40))
    img.save(path)


def _line_chart(xs: Sequence[float], series: Mapping[str, Sequence[float]], title: str, path: Path,
                ymax: float = 1.0) -> None:
    """A simple PIL line chart of several series over shared ``xs``."""
    from PIL import Image, ImageDraw

    w, h, left, bottom, top = 640, 320, 50, 40, 30
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = _font()
    d.text((left, 8), title, fill="black", font=font)
    plot_w, plot_h = w - left - 20, h - top - bottom
    d.line([(left, top), (left, h - bottom), (w - 10, h - bottom)], fill="black")
    for frac in (0.0, 0.5, 1.0):
        d.text((5, h - bottom - frac * plot_h - 6), f"{frac * ymax:.3g}", fill="black", font=font)
    colours = [(70, 110, 200), (220, 60, 60), (40, 160, 80), (200, 140, 20), (140, 60, 180)]
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0, 1)
    span = (x_hi - x_lo) or 1
    if xs:
        d.text((left, h - bottom + 6), f"{x_lo:g}", fill="black", font=font)
        d.text((w - 60, h - bottom + 6), f"{x_hi:g}", fill="black", font=font)
    for k, (name, ys) in enumerate(series.items()):
        colour = colours[k % len(colours)]
        pts = [
            (left + (x - x_lo) / span * plot_w, h - bottom - min(max(y / ymax, 0.0), 1.0) * plot_h)
            for x, y in zip(xs, ys) if not math.isnan(y)
        ]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for p in pts:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
        d.text((w - 150, top + 14 * k), name, fill=colour, font=font)
    img.save(path)


def write_report(report: EvalReport, out_dir: str | Path, name: str | None = None) -> Path:
    """Write ``<name>.md``, ``<name>.json`` and PNG plots (``<name>_adherence.png``, ``_switch``, ``_seams``,
    ``_drift``) into ``out_dir``; returns the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or report.name
    images: dict[str, str] = {}
    keys = ["colour", "shape", "size", "direction", "background"]
    _bar_chart(keys, [report.adherence.get(k, math.nan) for k in keys], "prompt adherence (held-out prompts)",
               out / f"{name}_adherence.png")
    images["adherence"] = f"{name}_adherence.png"
    if report.switch_cases:
        kinds = ("colour", "shape", "motion")
        vals = [report.switch.get(f"{k}_mean_frames", math.nan) for k in kinds]
        ymax = max([v for v in vals if not math.isnan(v)] + [1.0])
        _bar_chart(list(kinds), vals, "prompt-switch latency (frames)", out / f"{name}_switch.png", ymax=ymax)
        images["switch"] = f"{name}_switch.png"
    if report.seam_profile:
        ymax = max(report.seam_profile + [1e-6]) * 1.2
        labels = [f"t%c={k}" + (" (seam)" if k == 0 else "") for k in range(len(report.seam_profile))]
        _bar_chart(labels, report.seam_profile, "mean |frame change| into frame t", out / f"{name}_seams.png",
                   ymax=ymax)
        images["seams"] = f"{name}_seams.png"
    if report.drift_curve:
        first_prompt = [r for r in report.drift_curve if r["prompt"] == 0]
        xs = [r["frame"] for r in first_prompt]
        series = {k: [r[k] for r in first_prompt] for k in ("colour", "shape", "direction", "background")}
        _line_chart(xs, series, "long-stream adherence per window (start frame)", out / f"{name}_drift.png")
        images["drift"] = f"{name}_drift.png"
    md = out / f"{name}.md"
    md.write_text(report.to_markdown(images))
    (out / f"{name}.json").write_text(json.dumps(report.to_dict(), indent=2, default=float))
    return md
