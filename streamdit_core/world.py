"""A procedural video world with captions, deterministic per seed.

The world is what the bundled StreamDiT model is trained on and what the evaluator measures against: coloured
shapes moving over achromatic backgrounds, described by captions from a small grammar (``docs/WORLD.md``).

* Frames are ``height × width`` RGB (default 64×64) at ``fps`` frames per second (default 16), float in
  ``[0, 1]``. Coordinates are in pixels: pixel column ``j`` covers ``x ∈ [j, j + 1)``, so its centre is
  ``j + 0.5``; ``y`` grows downwards ("up" means decreasing ``y``).
* Objects: ``SHAPES`` × ``COLOURS`` × ``SIZES`` with a motion from ``MOTIONS``. Objects moving left / right /
  up / down live on a torus (they leave one edge and re-enter at the opposite one, so a stream can move left
  forever); bouncing objects move diagonally and reflect off the walls; positions are a closed-form function
  of the frame index (``_fold``), never integrated step by step.
* Backgrounds (``BACKGROUNDS``) are grey levels only (black, grey, vertical stripes, checkerboard) and every
  palette colour is strongly saturated, so ``evaluate.py`` separates objects from backgrounds by chroma.
* Events (``EVENT_KINDS``): colour change, motion change, shape change, a second object appears. The
  caption changes exactly at the event frame. The new motion applies from the event frame on:
  ``position[t + 1] − position[t] = velocity[t]`` (modulo the wrap / reflection) for every frame ``t``.

Randomness: every draw takes an explicit ``torch.Generator``; ``render_stream`` derives its generators from
the seed so that a frame does not depend on how many frames are rendered (rendering ``[s, s + n)`` equals
slicing a render of ``[0, s + n)``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .log import get_logger

__all__ = [
    "COLOURS",
    "PALETTE",
    "SHAPES",
    "SIZES",
    "MOTIONS",
    "MOTION_PHRASES",
    "BACKGROUNDS",
    "EVENT_KINDS",
    "VOCABULARY",
    "HELDOUT_COMBINATIONS",
    "ObjectSpec",
    "SceneSpec",
    "WorldConfig",
    "WorldTruth",
    "WorldBatch",
    "WorldClip",
    "World",
    "parse_caption",
    "parse_schedule_text",
    "heldout_captions",
    "render_stream",
    "render_caption",
    "render_schedule",
    "background_images",
    "render_frames",
    "captions_from_truth",
]

_log = get_logger("world")

# ----------------------------------------------------------------------------------------------- attributes

COLOURS: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "purple")
"""Object colours; hues roughly 0°, 53°, 124°, 180°, 230°, 282° so ``evaluate.py`` can classify by hue."""

PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.95, 0.10, 0.10),  # red
    (1.00, 0.90, 0.10),  # yellow
    (0.15, 0.85, 0.20),  # green
    (0.10, 0.90, 0.90),  # cyan
    (0.15, 0.30, 1.00),  # blue
    (0.75, 0.15, 1.00),  # purple
)
"""RGB of each entry of ``COLOURS`` (chroma ≥ 0.75, so never confused with the grey backgrounds)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
MOTIONS: tuple[str, ...] = ("still", "left", "right", "up", "down", "bouncing")
MOTION_PHRASES: tuple[str, ...] = (
    "standing still",
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "bouncing",
)
"""The caption phrase of each entry of ``MOTIONS``."""

BACKGROUNDS: tuple[str, ...] = ("black", "grey", "striped", "checkered")
BACKGROUND_LEVELS: tuple[tuple[float, float], ...] = ((0.0, 0.0), (0.40, 0.40), (0.12, 0.42), (0.12, 0.42))
"""(dark, light) grey level of each background; plain backgrounds use one level."""

EVENT_KINDS: tuple[str, ...] = ("colour", "motion", "shape", "appear")

_STILL, _LEFT, _RIGHT, _UP, _DOWN, _BOUNCE = range(6)
_REVERSE = torch.tensor([_STILL, _RIGHT, _LEFT, _DOWN, _UP, _BOUNCE])
_N_PARAMS = 16  # uniforms drawn per event (fixed, so draws do not depend on the world's state)

VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "and", "on", "background"]
        + list(SIZES)
        + list(COLOURS)
        + list(SHAPES)
        + [w for phrase in MOTION_PHRASES for w in phrase.split()]
        + list(BACKGROUNDS)
    )
)
"""Every word a caption can contain (in a fixed order; the bundled tokenizer is built from it)."""

HELDOUT_COMBINATIONS: tuple[tuple[str, str, str, str], ...] = (
    # (colour, shape, motion, background): never produced by World.sample_batch with the default config;
    # the evaluator's prompt-adherence set. Every colour, shape, motion and background occurs.
    ("red", "circle", "left", "black"),
    ("yellow", "square", "right", "grey"),
    ("green", "triangle", "up", "striped"),
    ("cyan", "diamond", "down", "checkered"),
    ("blue", "circle", "bouncing", "grey"),
    ("purple", "square", "still", "black"),
    ("red", "triangle", "bouncing", "checkered"),
    ("yellow", "diamond", "still", "striped"),
    ("green", "circle", "right", "checkered"),
    ("cyan", "square", "left", "striped"),
    ("blue", "triangle", "down", "black"),
    ("purple", "diamond", "up", "grey"),
    ("red", "square", "down", "striped"),
    ("yellow", "triangle", "left", "checkered"),
    ("green", "diamond", "bouncing", "black"),
    ("cyan", "circle", "still", "grey"),
    ("blue", "square", "up", "checkered"),
    ("purple", "triangle", "right", "striped"),
    ("red", "diamond", "right", "grey"),
    ("yellow", "circle", "up", "black"),
    ("green", "square", "still", "checkered"),
    ("cyan", "triangle", "bouncing", "striped"),
    ("blue", "diamond", "left", "checkered"),
    ("purple", "circle", "down", "black"),
)


def _index(values: tuple[str, ...], value: str, what: str) -> int:
    try:
        return values.index(value)
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(values)}") from None


# ------------------------------------------------------------------------------------------------ captions


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a caption: size, colour, shape and motion (names from the attribute tuples)."""

    size: str
    colour: str
    shape: str
    motion: str

    def __post_init__(self) -> None:
        _index(SIZES, self.size, "size")
        _index(COLOURS, self.colour, "colour")
        _index(SHAPES, self.shape, "shape")
        _index(MOTIONS, self.motion, "motion")

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {MOTION_PHRASES[MOTIONS.index(self.motion)]}"


@dataclass(frozen=True)
class SceneSpec:
    """What a caption says is on screen: one or two objects (distinct colours) over a background."""

    background: str
    objects: tuple[ObjectSpec, ...]

    def __post_init__(self) -> None:
        _index(BACKGROUNDS, self.background, "background")
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        colours = [o.colour for o in self.objects]
        if len(set(colours)) != len(colours):
            raise ValueError(f"objects of a scene must have distinct colours, got {colours}")

    @property
    def caption(self) -> str:
        """The canonical caption (see ``docs/WORLD.md`` for the grammar)."""
        return " and ".join(o.phrase for o in self.objects) + f" on a {self.background} background"


def _caption_from_indices(background: int, objects: Sequence[tuple[int, int, int, int]]) -> str:
    """Caption from indices ``(size, colour, shape, motion)`` per object."""
    phrases = [
        f"a {SIZES[s]} {COLOURS[c]} {SHAPES[h]} {MOTION_PHRASES[m]}" for s, c, h, m in objects
    ]
    return " and ".join(phrases) + f" on a {BACKGROUNDS[background]} background"


def parse_caption(text: str) -> SceneSpec:
    """Parse a caption of the grammar in ``docs/WORLD.md`` (case-insensitive; a final ``.`` is allowed).

    Raises ``ValueError`` naming the offending word and its 0-based word position for text outside the grammar.
    """
    words = text.strip().lower().rstrip(".").split()
    pos = 0

    def expect(allowed: Sequence[str], what: str) -> str:
        nonlocal pos
        if pos >= len(words):
            raise ValueError(
                f"caption {text!r} ends early at word {pos}: expected {what} ({', '.join(allowed)})"
            )
        word = words[pos]
        if word not in allowed:
            raise ValueError(
                f"caption {text!r}: unexpected word {word!r} at position {pos}; expected {what} "
                f"({', '.join(allowed)})"
            )
        pos += 1
        return word

    objects: list[ObjectSpec] = []
    while True:
        expect(("a",), "an article")
        size = expect(SIZES, "a size")
        colour = expect(COLOURS, "a colour")
        shape = expect(SHAPES, "a shape")
        first = expect(("moving", "standing", "bouncing"), "a motion")
        if first == "moving":
            motion = expect(("left", "right", "up", "down"), "a direction")
        elif first == "standing":
            expect(("still",), "'still'")
            motion = "still"
        else:
            motion = "bouncing"
        objects.append(ObjectSpec(size, colour, shape, motion))
        if len(objects) < 2 and pos < len(words) and words[pos] == "and":
            pos += 1
            continue
        break
    expect(("on",), "'on'" if len(objects) == 2 else "'on' or 'and'")
    expect(("a",), "an article")
    background = expect(BACKGROUNDS, "a background")
    expect(("background",), "'background'")
    if pos != len(words):
        raise ValueError(f"caption {text!r}: unexpected word {words[pos]!r} at position {pos}; expected the end")
    try:
        return SceneSpec(background, tuple(objects))
    except ValueError as err:
        raise ValueError(f"caption {text!r}: {err}") from None


_SCHEDULE_LINE = re.compile(r'^\s*"?(\d+)"?\s*:\s*"?(.*?)"?\s*,?\s*$')


def parse_schedule_text(text: str) -> list[tuple[int, str]]:
    """Parse a prompt schedule into sorted ``(frame, caption)`` pairs.

    Accepts a single caption (scheduled at frame 0), one ``frame: caption`` per line, or the FizzNodes form
    ``"0": "caption A", "48": "caption B"`` (entries separated by newlines or commas between quoted entries).
    The first entry must be at frame 0; frames must be distinct.
    """
    body = text.strip()
    if not body:
        raise ValueError("prompt schedule is empty")
    body = re.sub(r'"\s*,\s*"', '"\n"', body.strip("{}").strip())
    lines = [line for line in body.splitlines() if line.strip()]
    if not _SCHEDULE_LINE.match(lines[0]):
        if len(lines) != 1:
            raise ValueError(f"prompt schedule line {lines[0]!r} is not of the form 'frame: caption'")
        return [(0, lines[0].strip().strip('"'))]
    entries: list[tuple[int, str]] = []
    for line in lines:
        match = _SCHEDULE_LINE.match(line)
        if not match:
            raise ValueError(f"prompt schedule line {line!r} is not of the form 'frame: caption'")
        entries.append((int(match.group(1)), match.group(2).strip()))
    entries.sort(key=lambda e: e[0])
    frames = [f for f, _ in entries]
    if frames[0] != 0 or len(set(frames)) != len(frames):
        raise ValueError(f"prompt schedule frames must start at 0 and be distinct, got {frames}")
    return entries


def heldout_captions(config: WorldConfig | None = None) -> tuple[str, ...]:
    """One single-object caption per held-out combination (sizes alternate small / large)."""
    combos = (config or WorldConfig()).heldout
    return tuple(
        SceneSpec(bg, (ObjectSpec(SIZES[i % 2], c, s, m),)).caption for i, (c, s, m, bg) in enumerate(combos)
    )


# ------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class WorldConfig:
    """Settings of the world.

    Attributes:
        height, width: frame size in pixels (≥ 32).
        fps: the stated frame rate (captions and speeds are per frame; fps only labels time).
        max_objects: 1 or 2 objects per scene.
        two_object_prob: probability that a sampled scene starts with two objects.
        event_prob: probability of an event at each frame after the first (default: a 16-frame clip has
            one or more events about 25 % of the time: ``1 − 0.75^(1/15) ≈ 0.019``).
        event_kinds: which events may happen (subset of ``EVENT_KINDS``).
        small_radius, large_radius: half-extent ranges in pixels of small and large objects.
        speed: speed range in pixels per frame (bouncing: the speed of the diagonal motion).
        bounce_angle_deg: angle range of a bouncing velocity to the x axis (per quadrant).
        heldout: ``(colour, shape, motion, background)`` combinations ``World.sample_batch`` never produces.
        stripe_width, checker_cell: texture periods in pixels (``None``: ``width // 16`` and ``width // 8``).
    """

    height: int = 64
    width: int = 64
    fps: int = 16
    max_objects: int = 2
    two_object_prob: float = 0.3
    event_prob: float = 0.019
    event_kinds: tuple[str, ...] = EVENT_KINDS
    small_radius: tuple[float, float] = (3.5, 5.5)
    large_radius: tuple[float, float] = (8.0, 11.0)
    speed: tuple[float, float] = (1.0, 2.0)
    bounce_angle_deg: tuple[float, float] = (30.0, 60.0)
    heldout: tuple[tuple[str, str, str, str], ...] = HELDOUT_COMBINATIONS
    stripe_width: int | None = None
    checker_cell: int | None = None

    def __post_init__(self) -> None:
        for name in ("height", "width", "fps", "max_objects"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"WorldConfig {name} must be an integer, got {value!r}")
        if self.height < 32 or self.width < 32:
            raise ValueError(f"WorldConfig height/width must be >= 32, got {self.height}x{self.width}")
        if self.fps < 1:
            raise ValueError(f"WorldConfig fps must be >= 1, got {self.fps}")
        if self.max_objects not in (1, 2):
            raise ValueError(f"WorldConfig max_objects must be 1 or 2, got {self.max_objects}")
        if not 0.0 <= self.two_object_prob <= 1.0:
            raise ValueError(f"WorldConfig two_object_prob must be in [0, 1], got {self.two_object_prob}")
        if not 0.0 <= self.event_prob < 1.0:
            raise ValueError(f"WorldConfig event_prob must be in [0, 1), got {self.event_prob}")
        bad = [k for k in self.event_kinds if k not in EVENT_KINDS]
        if bad or not self.event_kinds:
            raise ValueError(f"WorldConfig event_kinds must be a non-empty subset of {EVENT_KINDS}, got {bad}")
        limit = min(self.height, self.width) / 2 - 2
        for name in ("small_radius", "large_radius", "speed", "bounce_angle_deg"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"WorldConfig {name} must satisfy 0 < low <= high, got {(lo, hi)}")
        if self.large_radius[1] > limit:
            raise ValueError(f"WorldConfig large_radius {self.large_radius} exceeds {limit} for this frame size")
        if self.small_radius[1] >= self.large_radius[0]:
            raise ValueError(
                f"WorldConfig small_radius {self.small_radius} must lie below large_radius {self.large_radius}"
            )
        if self.small_radius[0] < 2.0:
            raise ValueError(f"WorldConfig small_radius {self.small_radius} must be >= 2 pixels")
        if self.bounce_angle_deg[1] >= 90.0:
            raise ValueError(f"WorldConfig bounce_angle_deg must be below 90, got {self.bounce_angle_deg}")
        for combo in self.heldout:
            if len(combo) != 4:
                raise ValueError(f"WorldConfig heldout entries are (colour, shape, motion, background), got {combo}")
            for values, value, what in zip((COLOURS, SHAPES, MOTIONS, BACKGROUNDS), combo, "csmb"):
                _index(values, value, {"c": "colour", "s": "shape", "m": "motion", "b": "background"}[what])
        for name in ("stripe_width", "checker_cell"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"WorldConfig {name} must be >= 1 or None, got {value}")

    @property
    def size_threshold(self) -> float:
        """Radius separating small from large (midpoint of the gap between the two ranges)."""
        return (self.small_radius[1] + self.large_radius[0]) / 2

    def heldout_table(self) -> torch.Tensor:
        """Bool ``[colours, shapes, motions, backgrounds]``: True for held-out combinations."""
        table = torch.zeros(len(COLOURS), len(SHAPES), len(MOTIONS), len(BACKGROUNDS), dtype=torch.bool)
        for c, s, m, b in self.heldout:
            table[COLOURS.index(c), SHAPES.index(s), MOTIONS.index(m), BACKGROUNDS.index(b)] = True
        return table


# ------------------------------------------------------------------------------------------------- truth


@dataclass(frozen=True)
class WorldTruth:
    """Ground truth. Leading dims ``L`` are ``[batch, frames]`` (``WorldBatch``) or ``[frames]`` (``WorldClip``);
    ``O = max_objects`` object slots (slot 0 is always present; slot 1 when a second object exists).

    Attributes:
        present: bool ``[*L, O]``.
        colour, shape, size, motion: long ``[*L, O]`` indices into the attribute tuples (meaningless where absent).
        radius: float ``[*L, O]`` half-extent in pixels.
        position: float ``[*L, O, 2]`` centre ``(x, y)`` in pixels (the bounding-box centre).
        velocity: float ``[*L, O, 2]`` pixels per frame from this frame to the next (before wrap/reflection).
        background: long ``[*L]``.
        event: bool ``[*L]``: an event happened at this frame (the caption differs from the previous frame's).
    """

    present: torch.Tensor
    colour: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor
    motion: torch.Tensor
    radius: torch.Tensor
    position: torch.Tensor
    velocity: torch.Tensor
    background: torch.Tensor
    event: torch.Tensor

    def to(self, device: torch.device | str) -> WorldTruth:
        return WorldTruth(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def index(self, item: int | slice | torch.Tensor) -> WorldTruth:
        """Index the leading dimension of every field."""
        return WorldTruth(**{f.name: getattr(self, f.name)[item] for f in fields(self)})


def captions_from_truth(truth: WorldTruth) -> list:
    """Captions of every frame: ``list[str]`` for a clip (``[F]`` truth), ``list[list[str]]`` for a batch."""
    if truth.background.dim() == 2:
        return [captions_from_truth(truth.index(b)) for b in range(truth.background.shape[0])]
    cols = [truth.present, truth.size, truth.colour, truth.shape, truth.motion]
    present, size, colour, shape, motion = (c.cpu().tolist() for c in cols)
    background = truth.background.cpu().tolist()
    out = []
    for f in range(len(background)):
        objs = [
            (size[f][o], colour[f][o], shape[f][o], motion[f][o]) for o in range(len(present[f])) if present[f][o]
        ]
        out.append(_caption_from_indices(background[f], objs))
    return out


@dataclass(frozen=True)
class WorldBatch:
    """A training batch: ``video`` float ``[batch, 3, frames, H, W]`` in [0, 1]; ``captions[b][f]``; ``truth``
    with leading dims ``[batch, frames]`` (on the same device as ``video``)."""

    video: torch.Tensor
    captions: list[list[str]]
    truth: WorldTruth


@dataclass(frozen=True)
class WorldClip:
    """One rendered stream segment: ``frames`` float ``[F, 3, H, W]`` in [0, 1]; ``captions[f]``; ``truth`` with
    leading dim ``[F]``; ``start_frame`` is the stream index of ``frames[0]``."""

    frames: torch.Tensor
    captions: list[str]
    truth: WorldTruth
    start_frame: int = 0


# -------------------------------------------------------------------------------------------- motion maths


def _fold(
    unfolded: torch.Tensor, velocity: torch.Tensor, radius: torch.Tensor, bounce: torch.Tensor, extent: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form positions on the torus (``bounce`` False) or reflected inside ``[r, extent − r]`` (True).

    Args: ``unfolded``, ``velocity`` ``[..., 2]``; ``radius``, ``bounce`` ``[...]``; ``extent`` ``[2]`` = (W, H).
    Returns: position and current velocity ``[..., 2]`` (a reflected axis moving backwards has its sign flipped).
    """
    r = radius.unsqueeze(-1)
    wrapped = torch.remainder(unfolded, extent)
    span = (extent - 2 * r).clamp(min=1e-6)
    phase = torch.remainder(unfolded - r, 2 * span)
    forward = phase < span
    reflected = r + torch.where(forward, phase, 2 * span - phase)
    b = bounce.unsqueeze(-1)
    position = torch.where(b, reflected, wrapped)
    current = torch.where(b & ~forward, -velocity, velocity)
    return position, current


@dataclass
class _State:
    """Mutable per-scene state (internal). Object fields are ``[B, O]`` (anchor/velocity ``[B, O, 2]``).

    The position of an object at frame ``t`` is ``_fold(anchor + velocity·(t − anchor_t))``; an event that
    changes the motion re-anchors at the current position.
    """

    present: torch.Tensor
    colour: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor
    motion: torch.Tensor
    radius: torch.Tensor
    anchor: torch.Tensor
    anchor_t: torch.Tensor
    velocity: torch.Tensor
    background: torch.Tensor

    def clone(self) -> _State:
        return _State(**{f.name: getattr(self, f.name).clone() for f in fields(self)})

    def positions(self, t: torch.Tensor, config: WorldConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and current velocities ``[B, O, 2]`` at frame ``t`` (``[B]`` float)."""
        extent = torch.tensor([float(config.width), float(config.height)])
        unfolded = self.anchor + self.velocity * (t[:, None, None] - self.anchor_t[..., None])
        return _fold(unfolded, self.velocity, self.radius, self.motion == _BOUNCE, extent)


def _choose(allowed: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Pick uniformly among True entries of ``allowed`` ``[B, K]`` using uniforms ``u`` ``[B]`` → long ``[B]``.

    Rows without any True entry return 0."""
    counts = allowed.sum(-1).clamp(min=1)
    k = torch.minimum((u * counts).long(), counts - 1)
    rank = allowed.long().cumsum(-1) - 1
    hit = allowed & (rank == k[:, None])
    return hit.float().argmax(-1)


def _uniform(u: torch.Tensor, lo_hi: tuple[float, float]) -> torch.Tensor:
    return lo_hi[0] + u * (lo_hi[1] - lo_hi[0])


def _velocity_for(motion: torch.Tensor, u_speed: torch.Tensor, u_angle: torch.Tensor, u_sign: torch.Tensor,
                  config: WorldConfig) -> torch.Tensor:
    """Velocity ``[..., 2]`` for motion indices; ``u_sign`` in [0, 1) picks the diagonal quadrant of a bounce."""
    speed = _uniform(u_speed, config.speed)
    angle = torch.deg2rad(_uniform(u_angle, config.bounce_angle_deg))
    quadrant = (u_sign * 4).long().clamp(max=3)
    sx = torch.where(quadrant % 2 == 0, 1.0, -1.0)
    sy = torch.where(quadrant // 2 == 0, 1.0, -1.0)
    zero = torch.zeros_like(speed)
    vx = torch.where(motion == _LEFT, -speed, torch.where(motion == _RIGHT, speed, zero))
    vy = torch.where(motion == _UP, -speed, torch.where(motion == _DOWN, speed, zero))
    vx = torch.where(motion == _BOUNCE, sx * speed * torch.cos(angle), vx)
    vy = torch.where(motion == _BOUNCE, sy * speed * torch.sin(angle), vy)
    return torch.stack([vx, vy], dim=-1)


def _radius_for(size: torch.Tensor, u: torch.Tensor, config: WorldConfig) -> torch.Tensor:
    return torch.where(size == 1, _uniform(u, config.large_radius), _uniform(u, config.small_radius))


def _place(motion: torch.Tensor, radius: torch.Tensor, ux: torch.Tensor, uy: torch.Tensor,
           config: WorldConfig, anywhere: bool) -> torch.Tensor:
    """A centre ``[..., 2]`` inside ``[r, extent − r]``; with ``anywhere``, the moving axis of a left/right/up/down
    object is uniform over the whole torus (a random point of an endless stream)."""
    x = radius + ux * (config.width - 2 * radius)
    y = radius + uy * (config.height - 2 * radius)
    if anywhere:
        x = torch.where((motion == _LEFT) | (motion == _RIGHT), ux * config.width, x)
        y = torch.where((motion == _UP) | (motion == _DOWN), uy * config.height, y)
    return torch.stack([x, y], dim=-1)


def _new_object(u: torch.Tensor, taken_colours: torch.Tensor, config: WorldConfig, anywhere: bool) -> dict:
    """Attributes of a fresh object from uniforms ``u`` ``[B, ≥10]``; colours in ``taken_colours`` ``[B, C]``
    (bool) are avoided."""
    colour = _choose(~taken_colours, u[:, 0])
    shape = (u[:, 1] * len(SHAPES)).long().clamp(max=len(SHAPES) - 1)
    size = (u[:, 2] * 2).long().clamp(max=1)
    radius = _radius_for(size, u[:, 3], config)
    motion = (u[:, 4] * len(MOTIONS)).long().clamp(max=len(MOTIONS) - 1)
    velocity = _velocity_for(motion, u[:, 5], u[:, 6], u[:, 7], config)
    anchor = _place(motion, radius, u[:, 8], u[:, 9], config, anywhere)
    return dict(colour=colour, shape=shape, size=size, radius=radius, motion=motion, velocity=velocity,
                anchor=anchor)


def _sample_initial(batch: int, generator: torch.Generator, config: WorldConfig) -> _State:
    """Random scenes at a random point of their streams: ``batch`` states (draws on the generator's device,
    returned on CPU)."""
    O = config.max_objects
    u = torch.rand(batch, 2 + O * 10, generator=generator, device=generator.device, dtype=torch.float64).cpu()
    u = u.float()
    background = (u[:, 0] * len(BACKGROUNDS)).long().clamp(max=len(BACKGROUNDS) - 1)
    present = torch.zeros(batch, O, dtype=torch.bool)
    present[:, 0] = True
    if O > 1:
        present[:, 1] = u[:, 1] < config.two_object_prob
    taken = torch.zeros(batch, len(COLOURS), dtype=torch.bool)
    per_slot = []
    for o in range(O):
        obj = _new_object(u[:, 2 + 10 * o: 12 + 10 * o], taken, config, anywhere=True)
        taken = taken | (torch.nn.functional.one_hot(obj["colour"], len(COLOURS)).bool() & present[:, o:o + 1])
        per_slot.append(obj)
    stacked = {k: torch.stack([obj[k] for obj in per_slot], dim=1) for k in per_slot[0]}
    return _State(present=present, anchor_t=torch.zeros(batch, O), background=background, **stacked)


def _in_bounds(position: torch.Tensor, radius: torch.Tensor, config: WorldConfig) -> torch.Tensor:
    """True where the whole object is on screen (``[r, extent − r]`` on both axes); ``[B, O]``."""
    r = radius
    x, y = position[..., 0], position[..., 1]
    eps = 1e-4
    return (x >= r - eps) & (x <= config.width - r + eps) & (y >= r - eps) & (y <= config.height - r + eps)


def _apply_events(state: _State, t: torch.Tensor, u: torch.Tensor, active: torch.Tensor,
                  config: WorldConfig) -> _State:
    """Apply one event to every scene where ``active`` ``[B]`` (bool) at frame ``t`` ``[B]`` using uniforms
    ``u`` ``[B, _N_PARAMS]``. Returns a new state; the event kinds are those of ``config.event_kinds``."""
    s = state.clone()
    B, O = s.present.shape
    n_present = s.present.sum(-1)
    kind_allowed = torch.zeros(B, len(EVENT_KINDS), dtype=torch.bool)
    for k, name in enumerate(EVENT_KINDS):
        if name in config.event_kinds:
            kind_allowed[:, k] = True if name != "appear" else n_present < O
    active = active & kind_allowed.any(-1)
    kind = _choose(kind_allowed, u[:, 1])
    appear = active & (kind == EVENT_KINDS.index("appear"))
    target = _choose(s.present, u[:, 2])  # an existing object
    target = torch.where(appear, _choose(~s.present, u[:, 2]), target)
    onehot = torch.nn.functional.one_hot(target, O).bool() & active[:, None]
    rows = torch.arange(B)

    position, _ = s.positions(t, config)
    colour_taken = torch.zeros(B, len(COLOURS), dtype=torch.bool)
    for o in range(O):
        colour_taken |= torch.nn.functional.one_hot(s.colour[:, o], len(COLOURS)).bool() & s.present[:, o:o + 1]

    # colour change: any colour not used by an object of the scene
    is_colour = onehot & (kind == EVENT_KINDS.index("colour"))[:, None]
    new_colour = _choose(~colour_taken, u[:, 3])
    s.colour = torch.where(is_colour, new_colour[:, None], s.colour)

    # shape change: any other shape
    is_shape = onehot & (kind == EVENT_KINDS.index("shape"))[:, None]
    shape_allowed = torch.ones(B, len(SHAPES), dtype=torch.bool)
    shape_allowed[rows, s.shape[rows, target]] = False
    s.shape = torch.where(is_shape, _choose(shape_allowed, u[:, 3])[:, None], s.shape)

    # motion change: any other motion; an object partly off screen (wrapping) may only reverse
    is_motion = onehot & (kind == EVENT_KINDS.index("motion"))[:, None]
    current_motion = s.motion[rows, target]
    motion_allowed = torch.ones(B, len(MOTIONS), dtype=torch.bool)
    motion_allowed[rows, current_motion] = False
    new_motion = _choose(motion_allowed, u[:, 3])
    inside = _in_bounds(position, s.radius, config)[rows, target]
    new_motion = torch.where(inside, new_motion, _REVERSE[current_motion])
    new_velocity = _velocity_for(new_motion, u[:, 5], u[:, 6], u[:, 7], config)
    s.motion = torch.where(is_motion, new_motion[:, None], s.motion)
    s.velocity = torch.where(is_motion[..., None], new_velocity[:, None, :], s.velocity)
    s.anchor = torch.where(is_motion[..., None], position, s.anchor)
    s.anchor_t = torch.where(is_motion, t[:, None], s.anchor_t)

    # appear: a new object in the free slot, fully on screen, in a colour not yet used
    is_appear = onehot & appear[:, None]
    obj = _new_object(u[:, 3:13], colour_taken, config, anywhere=False)
    for name in ("colour", "shape", "size", "radius", "motion"):
        setattr(s, name, torch.where(is_appear, obj[name][:, None], getattr(s, name)))
    s.velocity = torch.where(is_appear[..., None], obj["velocity"][:, None, :], s.velocity)
    s.anchor = torch.where(is_appear[..., None], obj["anchor"][:, None, :], s.anchor)
    s.anchor_t = torch.where(is_appear, t[:, None], s.anchor_t)
    s.present = s.present | is_appear
    return s


def _truth_at(state: _State, t: torch.Tensor, event: torch.Tensor, config: WorldConfig) -> WorldTruth:
    """Ground truth of states ``[N, O]`` at frames ``t`` ``[N]`` (one frame per row)."""
    position, velocity = state.positions(t.float(), config)
    return WorldTruth(
        present=state.present, colour=state.colour, shape=state.shape, size=state.size, motion=state.motion,
        radius=state.radius, position=position, velocity=velocity, background=state.background, event=event,
    )


def _stack_truth(items: Sequence[WorldTruth], dim: int) -> WorldTruth:
    return WorldTruth(**{f.name: torch.stack([getattr(x, f.name) for x in items], dim) for f in fields(WorldTruth)})


def _heldout_hits(truth: WorldTruth, config: WorldConfig) -> torch.Tensor:
    """Bool ``[*L]``: some present object of the frame is a held-out combination on the frame's background."""
    if not config.heldout:
        return torch.zeros(truth.background.shape, dtype=torch.bool)
    table = config.heldout_table()
    bg = truth.background.unsqueeze(-1).expand_as(truth.colour)
    hit = table[truth.colour, truth.shape, truth.motion, bg] & truth.present
    return hit.any(-1)


# --------------------------------------------------------------------------------------------- rendering


def background_images(config: WorldConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Grey level of every background: float ``[len(BACKGROUNDS), H, W]``."""
    H, W = config.height, config.width
    stripe = config.stripe_width or max(2, W // 16)
    cell = config.checker_cell or max(2, W // 8)
    ys = torch.arange(H, device=device)[:, None]
    xs = torch.arange(W, device=device)[None, :]
    stripes = ((xs // stripe) % 2).expand(H, W)
    checker = ((xs // cell) + (ys // cell)) % 2
    pattern = [torch.zeros(H, W, device=device), torch.zeros(H, W, device=device), stripes, checker]
    out = []
    for (dark, light), p in zip(BACKGROUND_LEVELS, pattern):
        out.append(dark + (light - dark) * p.float())
    return torch.stack(out)


def _signed_distance(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Signed distance in pixels (negative inside) of each shape with centre offset ``dx``, ``dy`` and half-extent
    ``r`` (broadcastable tensors). The triangle points up: apex ``(0, −r)``, base corners ``(±r, r)``."""
    adx, ady = dx.abs(), dy.abs()
    circle = torch.sqrt(dx * dx + dy * dy) - r
    square = torch.maximum(adx, ady) - r
    diamond = (adx + ady - r) * (1 / math.sqrt(2.0))
    triangle = torch.maximum(dy - r, (2 * adx - dy - r) * (1 / math.sqrt(5.0)))
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, torch.where(shape == 2, triangle, diamond)))


def render_frames(truth: WorldTruth, config: WorldConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Render frames from ground truth with leading dims ``[N]`` (flatten batches first).

    Objects are drawn in slot order with a one-pixel antialiased edge (coverage ``clamp(0.5 − d, 0, 1)`` of
    the signed distance ``d`` in pixels), on the torus (an object crossing an edge shows on both sides).
    Each object is rasterised in an ``S × S`` window around its centre (``S = 2·max_radius + 4``) and
    blended into the frame by gather / scatter, so the cost is independent of the frame size.
    Returns float ``[N, 3, H, W]`` in [0, 1] on ``device`` (default: truth's device).
    """
    device = torch.device(device) if device is not None else truth.background.device
    truth = truth.to(device)
    H, W = config.height, config.width
    N, O = truth.present.shape
    image = background_images(config, device)[truth.background]  # [N, H, W]
    image = image.unsqueeze(1).expand(N, 3, H, W).reshape(N, 3, H * W).contiguous()
    palette = torch.tensor(PALETTE, device=device)
    S = min(int(math.ceil(2 * config.large_radius[1])) + 4, H, W)
    offsets = torch.arange(S, device=device) - S // 2
    for o in range(O):
        centre = truth.position[:, o].float()  # [N, 2]
        base = centre.floor().long()
        px = torch.remainder(base[:, 0:1] + offsets, W)  # [N, S] pixel columns of the window
        py = torch.remainder(base[:, 1:2] + offsets, H)  # [N, S] pixel rows
        dx = (base[:, 0:1] + offsets).float() + 0.5 - centre[:, 0:1]  # [N, S], no wrap needed: window is local
        dy = (base[:, 1:2] + offsets).float() + 0.5 - centre[:, 1:2]
        r = truth.radius[:, o].float()[:, None, None]
        shape = truth.shape[:, o][:, None, None]
        sd = _signed_distance(dx[:, None, :], dy[:, :, None], r, shape)  # [N, S, S]
        alpha = (0.5 - sd).clamp(0.0, 1.0) * truth.present[:, o].float()[:, None, None]
        flat_index = (py[:, :, None] * W + px[:, None, :]).reshape(N, 1, S * S).expand(N, 3, S * S)
        alpha = alpha.reshape(N, 1, S * S)
        colour = palette[truth.colour[:, o]][:, :, None]  # [N, 3, 1]
        under = image.gather(2, flat_index)
        image.scatter_(2, flat_index, under + (colour - under) * alpha)
    return image.view(N, 3, H, W).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------- streams


def _mix(seed: int, stream: int) -> int:
    """A 63-bit seed derived from ``(seed, stream)`` (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + (stream + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def _generator(seed: int, stream: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_mix(seed, stream))
    return g


_BLOCK = 1024  # frames per block of event draws in render_stream


def _render_segments(states: list[_State], starts: list[int], event_frames: set[int], start_frame: int,
                     num_frames: int, config: WorldConfig) -> WorldClip:
    """Render frames ``[start_frame, start_frame + num_frames)`` of a stream whose state is ``states[k]`` from
    frame ``starts[k]`` on (single-scene states, ``starts`` increasing, ``starts[0] = 0``)."""
    t = torch.arange(start_frame, start_frame + num_frames)
    seg = torch.searchsorted(torch.tensor(starts), t, right=True) - 1
    stacked = _State(**{f.name: torch.cat([getattr(s, f.name) for s in states])[seg] for f in fields(_State)})
    event = torch.tensor([int(f) in event_frames for f in t.tolist()], dtype=torch.bool)
    truth = _truth_at(stacked, t, event, config)
    frames = render_frames(truth, config)
    return WorldClip(frames=frames, captions=captions_from_truth(truth), truth=truth, start_frame=start_frame)


def _check_frames(num_frames: int, start_frame: int) -> None:
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if not isinstance(start_frame, int) or start_frame < 0:
        raise ValueError(f"start_frame must be a non-negative integer, got {start_frame!r}")


def render_stream(seed: int, num_frames: int, config: WorldConfig | None = None, start_frame: int = 0,
                  events: bool = True) -> WorldClip:
    """Frames ``[start_frame, start_frame + num_frames)`` of the endless stream ``seed``.

    The stream's first scene and its events derive from ``seed`` only (not from ``num_frames`` or
    ``start_frame``). Positions are closed-form in the frame index; the cost is one small state update per
    event before the last frame (about ``event_prob`` per frame) plus rendering the requested frames.
    Held-out combinations are *not* excluded here (only ``World.sample_batch`` excludes them).
    Returns a ``WorldClip`` with ``frames`` ``[num_frames, 3, H, W]`` on CPU.
    """
    config = config or WorldConfig()
    _check_frames(num_frames, start_frame)
    state = _sample_initial(1, _generator(seed, 0), config)
    states, starts, event_frames = [state], [0], set()
    end = start_frame + num_frames
    if events and config.event_prob > 0:
        for block in range((end + _BLOCK - 1) // _BLOCK):
            u = torch.rand(_BLOCK, _N_PARAMS, generator=_generator(seed, block + 1), dtype=torch.float64).float()
            hits = (u[:, 0] < config.event_prob).nonzero().flatten().tolist()
            for i in hits:
                frame = block * _BLOCK + i
                if frame == 0 or frame >= end:
                    continue
                new = _apply_events(state, torch.tensor([float(frame)]), u[i:i + 1], torch.ones(1, dtype=torch.bool),
                                    config)
                if not _equal_states(new, state):
                    state = new
                    states.append(state)
                    starts.append(frame)
                    event_frames.add(frame)
    return _render_segments(states, starts, event_frames, start_frame, num_frames, config)


def _equal_states(a: _State, b: _State) -> bool:
    return all(torch.equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(_State))


def _state_from_spec(spec: SceneSpec, generator: torch.Generator, config: WorldConfig) -> _State:
    """A single-scene state showing ``spec``. Placement draws do not depend on colours or shapes, so two
    captions that differ only in colour / shape get identical positions and velocities for the same seed."""
    O = config.max_objects
    if len(spec.objects) > O:
        raise ValueError(f"caption has {len(spec.objects)} objects but config.max_objects={O}")
    u = torch.rand(O, 10, generator=generator, dtype=torch.float64).float()
    present = torch.zeros(1, O, dtype=torch.bool)
    colour, shape, size, motion = (torch.zeros(1, O, dtype=torch.long) for _ in range(4))
    for o, obj in enumerate(spec.objects):
        present[0, o] = True
        colour[0, o] = COLOURS.index(obj.colour)
        shape[0, o] = SHAPES.index(obj.shape)
        size[0, o] = SIZES.index(obj.size)
        motion[0, o] = MOTIONS.index(obj.motion)
    radius = _radius_for(size[0], u[:, 3], config)
    velocity = _velocity_for(motion[0], u[:, 5], u[:, 6], u[:, 7], config)
    anchor = _place(motion[0], radius, u[:, 8], u[:, 9], config, anywhere=False)
    return _State(present=present, colour=colour, shape=shape, size=size, motion=motion, radius=radius[None],
                  anchor=anchor[None], anchor_t=torch.zeros(1, O), velocity=velocity[None],
                  background=torch.tensor([BACKGROUNDS.index(spec.background)]))


def render_caption(caption: str, num_frames: int, seed: int, start_frame: int = 0,
                   config: WorldConfig | None = None) -> WorldClip:
    """Render a video showing ``caption`` (no events) with placement and speeds drawn from ``seed``.

    Objects start fully on screen at frame 0. Returns a ``WorldClip`` (``frames`` ``[num_frames, 3, H, W]``).
    """
    config = config or WorldConfig()
    _check_frames(num_frames, start_frame)
    state = _state_from_spec(parse_caption(caption), _generator(seed, 0), config)
    return _render_segments([state], [0], set(), start_frame, num_frames, config)


def _transition(state: _State, spec: SceneSpec, frame: int, generator: torch.Generator,
                config: WorldConfig) -> _State:
    """The state after switching to ``spec`` at ``frame``.

    Objects keep their slot and position; an unchanged motion keeps its current velocity; a changed motion
    takes the velocity ``render_caption`` would draw; a changed size takes a new radius; an object whose new
    motion is ``still`` / ``bouncing`` (or whose size changed) is clamped fully on screen; objects new in the
    schedule are placed at random; objects dropped by it vanish."""
    fresh = _state_from_spec(spec, generator, config)
    t = torch.tensor([float(frame)])
    position, current = state.positions(t, config)
    s = fresh.clone()
    s.anchor_t = torch.full_like(s.anchor_t, float(frame))
    for o in range(len(spec.objects)):
        if not bool(state.present[0, o]):
            continue
        same_size = bool(state.size[0, o] == s.size[0, o])
        if same_size:
            s.radius[0, o] = state.radius[0, o]
        r = float(s.radius[0, o])
        p = position[0, o].clone()
        if int(s.motion[0, o]) in (_STILL, _BOUNCE) or not same_size:
            p[0] = p[0].clamp(r, config.width - r)
            p[1] = p[1].clamp(r, config.height - r)
        if bool(s.motion[0, o] == state.motion[0, o]):
            s.velocity[0, o] = current[0, o]
        s.anchor[0, o] = p
    return s


def render_schedule(schedule: str | Sequence[tuple[int, str]], num_frames: int, seed: int,
                    config: WorldConfig | None = None) -> WorldClip:
    """Render a world video that follows a prompt schedule (text for ``parse_schedule_text`` or
    ``(frame, caption)`` pairs): continuous motion, attributes switching exactly at the scheduled frames.

    The segment before the first switch equals ``render_caption(first caption, ..., seed)``.
    """
    config = config or WorldConfig()
    _check_frames(num_frames, 0)
    entries = parse_schedule_text(schedule) if isinstance(schedule, str) else sorted(schedule)
    if not entries or entries[0][0] != 0:
        raise ValueError(f"schedule must start at frame 0, got {[f for f, _ in entries]}")
    specs = [(f, parse_caption(c)) for f, c in entries]
    state = _state_from_spec(specs[0][1], _generator(seed, 0), config)
    states, starts, event_frames = [state], [0], set()
    for k, (frame, spec) in enumerate(specs[1:], start=1):
        if frame >= num_frames:
            break
        state = _transition(state, spec, frame, _generator(seed, k), config)
        states.append(state)
        starts.append(frame)
        event_frames.add(frame)
    return _render_segments(states, starts, event_frames, 0, num_frames, config)


# ------------------------------------------------------------------------------------------------- World


class World:
    """Samples training batches from the world described by a ``WorldConfig``."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()

    def sample_truth(self, batch: int, frames: int, generator: torch.Generator) -> WorldTruth:
        """Ground truth ``[batch, frames]`` of random clips (random scenes at a random point of their streams,
        events with ``config.event_prob`` per frame), none showing a held-out combination. CPU tensors."""
        if batch < 1 or frames < 1:
            raise ValueError(f"batch and frames must be >= 1, got batch={batch}, frames={frames}")
        truth = self._sample_truth_once(batch, frames, generator)
        for _attempt in range(100):
            bad = _heldout_hits(truth, self.config).any(-1)
            if not bad.any():
                return truth
            idx = bad.nonzero().flatten()
            redo = self._sample_truth_once(len(idx), frames, generator)
            merged = {}
            for f in fields(WorldTruth):
                value = getattr(truth, f.name).clone()
                value[idx] = getattr(redo, f.name)
                merged[f.name] = value
            truth = WorldTruth(**merged)
        raise RuntimeError("could not avoid held-out combinations in 100 attempts; is config.heldout too large?")

    def _sample_truth_once(self, batch: int, frames: int, generator: torch.Generator) -> WorldTruth:
        config = self.config
        state = _sample_initial(batch, generator, config)
        per_frame = []
        no_event = torch.zeros(batch, dtype=torch.bool)
        for f in range(frames):
            t = torch.full((batch,), float(f))
            event = no_event
            if f > 0 and config.event_prob > 0:
                u = torch.rand(batch, _N_PARAMS, generator=generator, device=generator.device,
                               dtype=torch.float64).cpu().float()
                active = u[:, 0] < config.event_prob
                if active.any():
                    new = _apply_events(state, t, u, active, config)
                    changed = torch.stack(
                        [(getattr(new, n.name) != getattr(state, n.name)).flatten(1).any(-1)
                         for n in fields(_State) if n.name != "background"]
                    ).any(0)
                    event = changed
                    state = new
            per_frame.append(_truth_at(state, t, event, config))
        return _stack_truth(per_frame, dim=1)

    def sample_batch(self, batch: int, frames: int, generator: torch.Generator,
                     device: torch.device | str = "cpu") -> WorldBatch:
        """A batch of random clips: ``video`` float ``[batch, 3, frames, H, W]`` in [0, 1] on ``device``,
        ``captions[b][f]`` and ``truth`` (leading dims ``[batch, frames]``, on ``device``)."""
        truth = self.sample_truth(batch, frames, generator)
        captions = captions_from_truth(truth)
        truth = truth.to(device)
        flat = WorldTruth(**{f.name: getattr(truth, f.name).flatten(0, 1) for f in fields(WorldTruth)})
        video = render_frames(flat, self.config, device)
        H, W = self.config.height, self.config.width
        video = video.view(batch, frames, 3, H, W).permute(0, 2, 1, 3, 4)
        return WorldBatch(video=video, captions=captions, truth=truth)
