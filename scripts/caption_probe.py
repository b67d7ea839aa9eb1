"""How much does a bundled model's prediction depend on its caption, and on which caption words?

Usage::

    python scripts/caption_probe.py [--model FILE] [--clips 16] [--seed 0] [--sigmas 0.3 0.5 0.7 0.9]
                                    [--every-sigma] [--config configs/bundled_teacher.json] [--out probe.json]
                                    [--events 0] [--event-prob 0.2]

``--model`` defaults to the shipped student ``streamdit_core/weights/streamdit-bundled.safetensors``; the
teacher ``streamdit-bundled-teacher.safetensors`` (or any pixel-space checkpoint with the bundled text encoder)
works the same way. Runs on the CPU in float32; with the defaults it makes 11 model calls of 16 clips.

Clips come from the procedural world as training draws them (``World.sample_truth`` + ``render_frames``, pixels
in [−1, 1], per-frame captions, the world and chunk-size mix of ``--config``), from generators seeded with
``seed_for(seed, 0, 0, stream)`` like a trainer's first micro-batch. One noise tensor is drawn per clip and
shared by every condition, so each comparison below is paired (same clip, same noise, only the caption differs).

1. Flow-matching loss ``mean ‖v_θ(x_σ) − (ε − x)‖²`` with the true captions, empty captions and the captions of
   another clip (clip ``i`` gets clip ``i + 1``'s), at each σ of ``--sigmas`` (the whole clip at one σ), their
   mean, and at σ drawn as in training (mixed partitions, ``training_sigmas``).
2. Attribute swaps: in every frame's caption one attribute of the first object (colour, shape, motion, size) or
   the background is replaced by another valid value (drawn per clip; never a value that object has in any frame
   of the clip, and for colour never the other object's colour). Reported: the relative change
   ``E_swap / E_true − 1`` of the model's x0 error ``‖x̂0 − x‖²`` with ``x̂0 = x_σ − σ·v_θ(x_σ)``, on the pixels
   of the first object (ground truth: the pixels whose value changes when the world renders the frame without
   that object) and on all pixels. At one σ the x0 error is σ² times the velocity error pixel by pixel, so the
   relative changes of the two are the same.

σ assignment: by default clip ``i`` is noised at ``sigmas[i mod len(sigmas)]`` (each σ sees ``clips / len``
clips; the "mean" column weights every σ equally). ``--every-sigma`` noises every clip at every σ (``len(sigmas)``
times the model calls).

3. Events (only with ``--events N``, N > 0; off by default, and then the run and its output are unchanged): N
   further clips, each with at least one caption change, drawn from the world of ``--config`` with
   ``event_prob`` set to ``--event-prob`` (default 0.2 per frame; training uses 0.019, the v9 part 0.06) from
   generators seeded ``seed_for(seed, 0, 0, 4…6)``, batches of N clips until N clips with a change are found.
   ``e`` is a clip's first frame whose caption differs from frame 0's; the first event's kind (colour, motion,
   shape, appear) is read off the captions of frames 0 and ``e``. Paired conditions: the **true** per-frame
   captions, and **held**: frame 0's caption in every frame (as if the prompt had not switched). Reported per
   kind and over all clips: the flow-matching loss on the frames ``≥ e`` and on the frames ``< e`` with each
   condition, and ``held / true − 1`` (a model that reads the caption after a switch: large and positive; one
   that copies the clip's cleaner frames: about 0); also the change of the x0 error on the pixels of the object
   the first event changes (or adds; found as in 2, by rendering without it), frames ``≥ e``. The σ columns
   follow the σ assignment above (the whole clip at one σ); the staircase column noises each clip as streaming
   inference does: chunk size 2 (``Partition(K, (B − K)/2, 2, 1)``), σ per chunk drawn by ``training_sigmas``.
   Costs 4 more model calls of N clips (two conditions, each at its σ and on the staircase;
   ``2·(len(sigmas) + 1)`` with ``--every-sigma``): about 27 s on one CPU thread for N = 16 with the bundled
   models. With event_prob 0.2 a clip changes its caption about 3 times, so a row's kind is that of the first
   change only.

Prints markdown tables; ``--out FILE.json`` also writes the numbers as JSON and ``FILE.md`` beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamdit_core.checkpoint import shard_paths
from streamdit_core.codec import PixelCodec
from streamdit_core.distributed import seed_for
from streamdit_core.log import get_logger, log_to_stderr
from streamdit_core.pipeline import WEIGHTS_DIR, load_pipeline
from streamdit_core.schedule import Partition, sample_chunk_size, training_sigmas
from streamdit_core.text import TextEncoder
from streamdit_core.train import TrainConfig, load_config, noise_clip, shared_context
from streamdit_core.world import (
    BACKGROUNDS,
    COLOURS,
    EVENT_KINDS,
    MOTIONS,
    SHAPES,
    SIZES,
    World,
    WorldConfig,
    WorldTruth,
    captions_from_truth,
    parse_caption,
    render_frames,
)

log = get_logger("caption_probe")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = WEIGHTS_DIR / "streamdit-bundled.safetensors"
DEFAULT_CONFIG = REPO / "configs" / "bundled_teacher.json"
DEFAULT_SIGMAS: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "shape": SHAPES,
    "motion": MOTIONS,
    "size": SIZES,
    "background": BACKGROUNDS,
}
"""The swapped attributes and their allowed values (colour … size of the first object; the scene's background)."""

# generator streams of seed_for(seed, 0, 0, stream); 0-2 as train.py's clips / small draws / noise
_TRUTH, _SMALL, _NOISE, _SWAP = 0, 1, 2, 3
X0_KEYS = {"object": "x0", "all": "x0_all"}  # region → the x0 error of _frame_errors summed over it
_MASK_LEVEL = 0.05  # a pixel belongs to the object when removing it changes some channel by more than this
# event clips: streams 4-6 of seed_for(seed, 0, 0, ·) (truth, noise, staircase σ); give up after this many batches
_EVENT_TRUTH, _EVENT_NOISE, _EVENT_STAIR = 4, 5, 6
_EVENT_MAX_BATCHES = 100
EVENT_PROB = 0.2
"""Default per-frame event probability of the world the event clips come from (training 0.019, the v9 part 0.06)."""
STAIRCASE_CHUNK = 2
"""Chunk size of the events section's streaming staircase (the inference partition)."""

VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ProbeDraw:
    """The clips of one probe run (CPU, float32).

    Attributes:
        x: clean clips ``[n, 3, B, H, W]`` in [−1, 1].
        captions: ``captions[i][f]``, the world's caption of frame ``f`` of clip ``i``.
        object_mask: bool ``[n, 1, B, H, W]``, pixels of the first object (slot 0).
        noise: ``[n, 3, B, H, W]`` standard normal, shared by every condition.
        train_sigma: ``[n, B]`` σ drawn as in training (mixed partitions).
        swaps: ``swaps[attribute][i]``, clip ``i``'s captions with that attribute replaced.
        swap_examples: ``{attribute: "old → new"}`` of clip 0 (for the table).
    """

    x: torch.Tensor
    captions: list[list[str]]
    object_mask: torch.Tensor
    noise: torch.Tensor
    train_sigma: torch.Tensor
    swaps: dict[str, list[list[str]]]
    swap_examples: dict[str, str]


def _attribute_values(caption: str, attribute: str) -> tuple[str, set[str]]:
    """``(value of the first object or the background, colours of the other objects)`` in ``caption``."""
    spec = parse_caption(caption)
    if attribute == "background":
        return spec.background, set()
    return getattr(spec.objects[0], attribute), {o.colour for o in spec.objects[1:]}


def _replace(caption: str, attribute: str, value: str) -> str:
    """``caption`` with the first object's ``attribute`` (or the background) set to ``value`` (canonical form)."""
    spec = parse_caption(caption)
    if attribute == "background":
        return dataclasses.replace(spec, background=value).caption
    first = dataclasses.replace(spec.objects[0], **{attribute: value})
    return dataclasses.replace(spec, objects=(first, *spec.objects[1:])).caption


def swap_attribute(captions: list[str], attribute: str, generator: torch.Generator) -> tuple[list[str], str, str]:
    """One clip's per-frame captions with ``attribute`` replaced in every frame by one new value, drawn uniformly
    among the values the first object (or the background) has in no frame of the clip; a new colour also avoids
    every other object's colour. Returns ``(captions, old value of frame 0, new value)``."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; allowed: {', '.join(ATTRIBUTES)}")
    used: set[str] = set()
    for caption in captions:
        value, others = _attribute_values(caption, attribute)
        used |= {value} | (others if attribute == "colour" else set())
    free = [v for v in ATTRIBUTES[attribute] if v not in used]
    if not free:
        raise ValueError(f"no {attribute} is left to swap in for captions {sorted(set(captions))}")
    new = free[int(torch.randint(len(free), (), generator=generator))]
    return [_replace(c, attribute, new) for c in captions], _attribute_values(captions[0], attribute)[0], new


def _render_clips(truth: WorldTruth, config: WorldConfig, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Render clips of ``truth`` (leading dims ``[n, B]``): pixels ``x`` ``[n, 3, B, H, W]`` in [−1, 1] and the
    bool mask ``[n, 1, B, H, W]`` of object ``slot[i]`` ``[n]`` of clip ``i`` (the pixels whose value changes by
    more than ``_MASK_LEVEL`` in some channel when the frame is rendered without that object)."""
    n, B = truth.background.shape
    flat = WorldTruth(**{f.name: getattr(truth, f.name).flatten(0, 1) for f in dataclasses.fields(WorldTruth)})
    without = dataclasses.replace(flat, present=flat.present.clone())
    without.present[torch.arange(n * B), slot.repeat_interleave(B)] = False
    H, W = config.height, config.width
    frames = render_frames(flat, config, "cpu")  # [n·B, 3, H, W] in [0, 1]
    mask = (frames - render_frames(without, config, "cpu")).abs().amax(1) > _MASK_LEVEL  # [n·B, H, W]
    x = frames.view(n, B, 3, H, W).permute(0, 2, 1, 3, 4) * 2.0 - 1.0
    return x, mask.view(n, B, 1, H, W).permute(0, 2, 1, 3, 4)


def draw_clips(cfg: TrainConfig, clips: int, seed: int) -> ProbeDraw:
    """Clips, masks, noise, training σ and attribute swaps, all from generators seeded by ``seed``."""
    if clips < 2:
        raise ValueError(f"clips must be >= 2 (the shuffled condition borrows another clip's captions), got {clips}")
    world = World(WorldConfig(**cfg.world))  # type: ignore[arg-type]
    g_truth, g_small, g_noise, g_swap = (torch.Generator().manual_seed(seed_for(seed, 0, 0, s)) for s in range(4))
    truth = world.sample_truth(clips, cfg.buffer, g_truth)
    captions = [list(row) for row in captions_from_truth(truth)]
    x, object_mask = _render_clips(truth, world.config, torch.zeros(clips, dtype=torch.long))
    rows = []
    frames_free = cfg.buffer - cfg.reference_frames
    for _ in range(clips):  # as Trainer.sigmas
        c = sample_chunk_size(frames_free, cfg.chunk_sizes, cfg.t2v_share, g_small)
        partition = Partition(K=cfg.reference_frames, N=frames_free // c, c=c, s=1)
        shift = cfg.t2v_shift if c == frames_free and cfg.t2v_shift is not None else cfg.shift
        rows.append(training_sigmas(partition, g_small, shift))
    noise = torch.randn(x.shape, generator=g_noise)
    swaps: dict[str, list[list[str]]] = {}
    examples: dict[str, str] = {}
    for attribute in ATTRIBUTES:
        swapped = [swap_attribute(row, attribute, g_swap) for row in captions]
        swaps[attribute] = [s[0] for s in swapped]
        examples[attribute] = f"{swapped[0][1]} → {swapped[0][2]}"
    return ProbeDraw(x.contiguous(), captions, object_mask.contiguous(), noise, torch.cat(rows), swaps, examples)


def _context(text: TextEncoder, captions: list[list[str]]) -> torch.Tensor:
    """Text context as the trainer builds it (:func:`~streamdit_core.train.shared_context`)."""
    unique = sorted({c for row in captions for c in row})
    index = {c: i for i, c in enumerate(unique)}
    ids = torch.tensor([[index[c] for c in row] for row in captions])
    return shared_context(text.encode(unique), ids)


def _frame_errors(
    model: VelocityModel, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, ctx: torch.Tensor,
    mask: torch.Tensor, batch: int,
) -> dict[str, torch.Tensor]:
    """Per clip and frame, all ``[n, F]``: the velocity MSE ``v`` (the loss's term per frame), the x0 squared
    error summed over the pixels of ``mask`` ``[n, 1, F, H, W]`` (``x0``) and how many values it sums
    (``count``: masked pixels × 3 channels), and the x0 squared error summed over all pixels (``x0_all``).
    ``batch`` clips per model call."""
    out: dict[str, list[torch.Tensor]] = {"v": [], "x0": [], "count": [], "x0_all": []}
    for s in range(0, x.shape[0], batch):
        xb, sb, nb, mb = x[s : s + batch], sigma[s : s + batch], noise[s : s + batch], mask[s : s + batch]
        xt = noise_clip(xb, sb, nb)
        v = model(xt, sb, ctx[s : s + batch]).float()  # [b, 3, F, H, W]
        sq_x0 = (xt - sb[:, None, :, None, None] * v - xb).pow(2)  # [b, 3, F, H, W]
        out["v"].append((v - (nb - xb)).pow(2).mean(dim=(1, 3, 4)))
        out["x0"].append((sq_x0 * mb).sum(dim=(1, 3, 4)))
        out["count"].append(mb.sum(dim=(1, 3, 4)).float() * 3)
        out["x0_all"].append(sq_x0.sum(dim=(1, 3, 4)))
    return {k: torch.cat(v) for k, v in out.items()}


def _mean_loss(v_err: torch.Tensor, sigma: torch.Tensor) -> float:
    """``flow_matching_loss``'s reduction: the mean per-frame error over frames with σ > 0."""
    weight = (sigma > 0).float()
    return float((v_err * weight).sum() / weight.sum().clamp(min=1.0))


def _check_sigmas(sigmas: Sequence[float]) -> None:
    if not sigmas or any(not 0.0 < s <= 1.0 for s in sigmas):
        raise ValueError(f"sigmas must be a non-empty list of values in (0, 1], got {list(sigmas)}")


def sigma_assignment(n: int, levels: int, every_sigma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Which clip is noised at which σ: ``(index, level)``, both ``[rows]`` (long): row ``r`` noises clip
    ``index[r]`` at ``sigmas[level[r]]``. By default one row per clip, clip ``i`` at level ``i mod levels``;
    ``every_sigma``: ``levels·n`` rows, every clip at every level (level-major)."""
    if every_sigma:
        return torch.arange(n).repeat(levels), torch.arange(levels).repeat_interleave(n)
    return torch.arange(n), torch.arange(n) % levels


def probe(
    model: VelocityModel,
    text: TextEncoder,
    draw: ProbeDraw,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    every_sigma: bool = False,
    batch: int = 16,
) -> dict[str, Any]:
    """Run the probe on ``draw``; returns the JSON-ready results (see the module docstring).

    ``loss[condition][key]`` with condition ``true`` / ``empty`` / ``shuffled`` and key ``σ`` (e.g. ``"0.5"``),
    ``"mean"`` (over the σ keys) and ``"training"`` (σ drawn as in training). ``x0_error[region][key]`` with the
    true captions, region ``object`` / ``all``. ``attributes[name]`` holds ``example`` and ``object`` /
    ``all`` → key → relative change of the x0 error.
    """
    _check_sigmas(sigmas)
    n, B = draw.x.shape[0], draw.x.shape[2]
    K = len(sigmas)
    index, level = sigma_assignment(n, K, every_sigma)
    keys = [f"{s:g}" for s in sigmas]
    fixed = torch.tensor(sigmas, dtype=torch.float32)[level][:, None].expand(len(index), B).contiguous()
    x, noise, mask = draw.x[index], draw.noise[index], draw.object_mask[index]
    H, W = x.shape[3], x.shape[4]
    pixels = 3 * B * H * W
    conditions = {
        "true": draw.captions,
        "empty": [[""] * B for _ in range(n)],
        "shuffled": draw.captions[1:] + draw.captions[:1],
    }
    result: dict[str, Any] = {"loss": {}, "x0_error": {}, "attributes": {}}
    fixed_true: dict[str, torch.Tensor] = {}

    def per_sigma(values: torch.Tensor, count: torch.Tensor) -> dict[str, float]:
        out = {}
        for k, key in enumerate(keys):
            sel = level == k
            out[key] = float(values[sel].sum() / count[sel].sum().clamp(min=1))
        return out

    with torch.inference_mode():
        for name, captions in conditions.items():
            ctx = _context(text, captions)
            sums = _frame_errors(model, x, fixed, noise, ctx[index], mask, batch)
            v_per_clip = sums["v"].mean(dim=1)  # every frame has σ > 0 here
            loss = per_sigma(v_per_clip, torch.ones(len(index)))
            loss["mean"] = sum(loss[k] for k in keys) / K
            train = _frame_errors(model, draw.x, draw.train_sigma, draw.noise, ctx, draw.object_mask, batch)
            loss["training"] = _mean_loss(train["v"], draw.train_sigma)
            result["loss"][name] = loss
            if name == "true":
                fixed_true = sums
        counts = {"object": mask.sum(dim=(1, 2, 3, 4)).float() * 3, "all": torch.full((len(index),), float(pixels))}
        for region in ("object", "all"):
            err = per_sigma(fixed_true[X0_KEYS[region]].sum(dim=1), counts[region])
            err["mean"] = sum(err[k] for k in keys) / K
            result["x0_error"][region] = err
        for attribute, captions in draw.swaps.items():
            sums = _frame_errors(model, x, fixed, noise, _context(text, captions)[index], mask, batch)
            entry: dict[str, Any] = {"example": draw.swap_examples[attribute]}
            for region in ("object", "all"):
                swapped = per_sigma(sums[X0_KEYS[region]].sum(dim=1), counts[region])
                true = result["x0_error"][region]
                rel = {k: swapped[k] / true[k] - 1.0 if true[k] > 0 else float("nan") for k in keys}
                rel["mean"] = sum(rel[k] for k in keys) / K
                entry[region] = rel
            result["attributes"][attribute] = entry
    result["clips_per_sigma"] = {key: int((level == k).sum()) for k, key in enumerate(keys)}
    result["object_pixel_share"] = float(draw.object_mask.float().mean())
    return result


# ------------------------------------------------------------------------------------------------- events


def first_change(captions: Sequence[str]) -> int | None:
    """The first frame whose caption differs from frame 0's (``e``), or None when every frame has frame 0's."""
    return next((f for f, caption in enumerate(captions) if caption != captions[0]), None)


def caption_changes(captions: Sequence[str]) -> int:
    """How many times the caption changes from one frame to the next."""
    return sum(a != b for a, b in zip(captions, captions[1:]))


def event_kind(before: str, after: str) -> str:
    """The kind of change from caption ``before`` to ``after``: ``"appear"`` when ``after`` has more objects
    (``"disappear"`` when fewer), else the changed attributes among colour, shape, motion, size (of any object)
    and background, joined by ``+`` in that order; one world event gives one of ``EVENT_KINDS``. Raises
    ``ValueError`` when both describe the same scene."""
    a, b = parse_caption(before), parse_caption(after)
    if len(b.objects) != len(a.objects):
        return "appear" if len(b.objects) > len(a.objects) else "disappear"
    changed = [
        name for name in ("colour", "shape", "motion", "size")
        if any(getattr(x, name) != getattr(y, name) for x, y in zip(a.objects, b.objects))
    ]
    changed += ["background"] if a.background != b.background else []
    if not changed:
        raise ValueError(f"captions {before!r} and {after!r} describe the same scene")
    return "+".join(changed)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor | None = None) -> float:
    """``Σ values[mask] / Σ counts[mask]``: the mean of the selected entries (``counts`` None: one each), or, with
    ``counts`` (e.g. the pixels summed into each value), the mean per counted item. ``values``, ``mask`` (bool)
    and ``counts`` share one shape (e.g. ``[n, F]``). NaN when nothing (or a zero count) is selected."""
    weight = mask.to(values.dtype)
    total = weight.sum() if counts is None else (counts.to(values.dtype) * weight).sum()
    return float((values * weight).sum() / total) if float(total) > 0 else float("nan")


def relative_change(new: float, reference: float) -> float:
    """``new / reference − 1``; NaN unless ``reference > 0``."""
    return new / reference - 1.0 if reference > 0 else float("nan")


def frames_from(first: Sequence[int], frames: int) -> torch.Tensor:
    """Bool ``[n, frames]``: frame ``f`` of clip ``i`` is at or after ``first[i]``."""
    return torch.arange(frames)[None, :] >= torch.tensor(list(first), dtype=torch.long)[:, None]


@dataclass(frozen=True)
class EventDraw:
    """The event clips of one probe run (CPU, float32); every clip's caption changes at least once.

    Attributes:
        x: clean clips ``[n, 3, B, H, W]`` in [−1, 1].
        captions: ``captions[i][f]``, the world's caption of frame ``f`` of clip ``i``.
        first_change: ``e`` per clip, the first frame whose caption differs from frame 0's (``1 ≤ e < B``).
        kinds: the first event's kind per clip (:func:`event_kind` of frames 0 and ``e``).
        event_mask: bool ``[n, 1, B, H, W]``, pixels of the object the first event changes or adds.
        noise: ``[n, 3, B, H, W]`` standard normal, shared by both conditions.
        staircase_sigma: ``[n, B]`` σ of the streaming partition (chunk size 2), cleanest frame first.
        event_prob: the world's per-frame event probability they were drawn with.
        drawn: clips drawn to find them.
    """

    x: torch.Tensor
    captions: list[list[str]]
    first_change: list[int]
    kinds: list[str]
    event_mask: torch.Tensor
    noise: torch.Tensor
    staircase_sigma: torch.Tensor
    event_prob: float
    drawn: int


def _event_slot(truth: WorldTruth, first: Sequence[int]) -> torch.Tensor:
    """Per clip ``[n]`` (long): the object slot whose attributes (or presence) change at frame ``first[i]``;
    ``truth`` has leading dims ``[n, B]``."""
    rows, e = torch.arange(len(first)), torch.tensor(list(first), dtype=torch.long)
    changed = torch.zeros(truth.present.shape[0], truth.present.shape[2], dtype=torch.bool)  # [n, O]
    for name in ("present", "colour", "shape", "size", "motion"):
        value = getattr(truth, name)  # [n, B, O]
        changed |= value[rows, e] != value[rows, e - 1]
    return changed.int().argmax(-1)


def draw_event_clips(cfg: TrainConfig, clips: int, seed: int, event_prob: float = EVENT_PROB) -> EventDraw:
    """``clips`` world clips with a caption change, from generators seeded by ``seed`` (see the docstring)."""
    if clips < 1:
        raise ValueError(f"event clips must be >= 1, got {clips}")
    frames_free = cfg.buffer - cfg.reference_frames
    if frames_free % STAIRCASE_CHUNK:
        raise ValueError(f"buffer − reference_frames = {frames_free} is not a multiple of {STAIRCASE_CHUNK}")
    world = World(WorldConfig(**{**cfg.world, "event_prob": event_prob}))  # type: ignore[arg-type]
    g_truth, g_noise, g_stair = (
        torch.Generator().manual_seed(seed_for(seed, 0, 0, s)) for s in (_EVENT_TRUTH, _EVENT_NOISE, _EVENT_STAIR)
    )
    batches: list[WorldTruth] = []
    keep: list[int] = []
    while len(keep) < clips:
        if len(batches) >= _EVENT_MAX_BATCHES:
            raise RuntimeError(f"found {len(keep)} of {clips} clips with a caption change in "
                               f"{len(batches) * clips} draws; is event_prob {event_prob} too small?")
        batches.append(world.sample_truth(clips, cfg.buffer, g_truth))
        found = [i for i, row in enumerate(captions_from_truth(batches[-1])) if first_change(row) is not None]
        keep += [(len(batches) - 1) * clips + i for i in found]
    every = WorldTruth(**{
        f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(WorldTruth)
    })
    truth = every.index(torch.tensor(keep[:clips]))
    captions = [list(row) for row in captions_from_truth(truth)]
    first = [first_change(row) or 0 for row in captions]  # never 0: every kept clip changes
    kinds = [event_kind(row[0], row[e]) for row, e in zip(captions, first)]
    x, mask = _render_clips(truth, world.config, _event_slot(truth, first))
    noise = torch.randn(x.shape, generator=g_noise)
    stair = Partition(K=cfg.reference_frames, N=frames_free // STAIRCASE_CHUNK, c=STAIRCASE_CHUNK, s=1)
    sigma = training_sigmas(stair, g_stair, cfg.shift, batch=clips)  # [n, B]
    return EventDraw(x.contiguous(), captions, first, kinds, mask.contiguous(), noise, sigma, event_prob,
                     len(batches) * clips)


Column = tuple[str, torch.Tensor]
"""A report column: (``"sigma"`` or ``"staircase"``, bool ``[rows, B]`` selecting the frames it averages)."""


def _columns(clips: torch.Tensor, frames: torch.Tensor, index: torch.Tensor, level: torch.Tensor,
             keys: Sequence[str], staircase_sigma: torch.Tensor) -> dict[str, Column]:
    """Columns of one group of clips (bool ``clips [n]``) and frames (bool ``frames [n, B]``): one per σ key over
    the rows ``(index, level)`` of :func:`sigma_assignment`, and the staircase (frames with σ > 0)."""
    columns = {key: ("sigma", (clips[index] & (level == k))[:, None] & frames[index]) for k, key in enumerate(keys)}
    columns["staircase"] = ("staircase", clips[:, None] & frames & (staircase_sigma > 0))
    return columns


def _region(errors: dict[str, dict[str, dict[str, torch.Tensor]]], columns: dict[str, Column], keys: Sequence[str],
            quantity: str) -> dict[str, dict[str, float]]:
    """``{condition: {column: mean}, "change": {column: held / true − 1}}`` of ``quantity`` (``"v"``: per-frame
    loss; ``"x0"``: per masked value); ``"mean"`` averages the σ columns that have frames."""
    out: dict[str, dict[str, float]] = {}
    for condition, by_setting in errors.items():
        row = {}
        for key, (setting, mask) in columns.items():
            counts = by_setting[setting]["count"] if quantity == "x0" else None
            row[key] = masked_mean(by_setting[setting][quantity], mask, counts)
        finite = [row[k] for k in keys if math.isfinite(row[k])]
        row["mean"] = sum(finite) / len(finite) if finite else float("nan")
        out[condition] = row
    out["change"] = {k: relative_change(out["held"][k], out["true"][k]) for k in out["true"]}
    return out


def probe_events(
    model: VelocityModel,
    text: TextEncoder,
    draw: EventDraw,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    every_sigma: bool = False,
    batch: int = 16,
) -> dict[str, Any]:
    """The events section on ``draw`` (see the module docstring); JSON-ready.

    ``groups[kind]`` (the first events' kinds present, then ``"all"``) holds ``clips`` and, for the regions
    ``after`` (loss on frames ≥ e), ``before`` (loss on frames < e) and ``object_after`` (x0 error on the event
    object's pixels, frames ≥ e): ``true`` / ``held`` / ``change`` → column (σ key, ``"mean"``,
    ``"staircase"``) → value. ``per_clip`` lists each clip's ``e``, kind, captions at 0 and e, and σ key.
    """
    _check_sigmas(sigmas)
    n, B = draw.x.shape[0], draw.x.shape[2]
    index, level = sigma_assignment(n, len(sigmas), every_sigma)
    keys = [f"{s:g}" for s in sigmas]
    fixed = torch.tensor(sigmas, dtype=torch.float32)[level][:, None].expand(len(index), B).contiguous()
    conditions = {"true": draw.captions, "held": [[row[0]] * B for row in draw.captions]}
    errors: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    with torch.inference_mode():
        for name, captions in conditions.items():
            ctx = _context(text, captions)
            errors[name] = {
                "sigma": _frame_errors(model, draw.x[index], fixed, draw.noise[index], ctx[index],
                                       draw.event_mask[index], batch),
                "staircase": _frame_errors(model, draw.x, draw.staircase_sigma, draw.noise, ctx, draw.event_mask,
                                           batch),
            }
    after = frames_from(draw.first_change, B)  # [n, B]
    kinds = [k for k in EVENT_KINDS if k in draw.kinds] + sorted(set(draw.kinds) - set(EVENT_KINDS))
    members = {kind: torch.tensor([k == kind for k in draw.kinds]) for kind in kinds}
    members["all"] = torch.ones(n, dtype=torch.bool)
    groups: dict[str, Any] = {}
    for kind, clips in members.items():
        entry: dict[str, Any] = {"clips": int(clips.sum())}
        for region, frames, quantity in (("after", after, "v"), ("before", ~after, "v"), ("object_after", after, "x0")):
            columns = _columns(clips, frames, index, level, keys, draw.staircase_sigma)
            entry[region] = _region(errors, columns, keys, quantity)
        groups[kind] = entry
    return {
        "event_prob": draw.event_prob,
        "clips": n,
        "drawn": draw.drawn,
        "staircase_chunk": STAIRCASE_CHUNK,
        "clips_per_sigma": {key: int((level == k).sum()) for k, key in enumerate(keys)},
        "mean_first_change": sum(draw.first_change) / n,
        "mean_changes": sum(caption_changes(row) for row in draw.captions) / n,
        "groups": groups,
        "per_clip": [
            {"first_change": e, "kind": kind, "changes": caption_changes(row), "before": row[0], "after": row[e],
             "sigma": keys[i % len(keys)] if not every_sigma else "all"}
            for i, (row, e, kind) in enumerate(zip(draw.captions, draw.first_change, draw.kinds))
        ],
    }


def _sha256(paths: Sequence[Path]) -> str:
    """SHA-256 of the files' bytes, concatenated in order (one file: its usual checksum)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def markdown(result: dict[str, Any]) -> str:
    """The tables of a :func:`probe` result (plus the run's settings when present)."""
    keys = list(result["clips_per_sigma"])
    head = [f"σ={k} (n={result['clips_per_sigma'][k]})" for k in keys]
    lines = []
    if "model" in result:
        lines += [
            f"Caption probe of `{result['model']}` (sha256 {result['model_sha256'][:12]}…): "
            f"{result['clips']} world clips of {result['frames']} frames, "
            f"seed {result['seed']}, config `{result['config']}`, "
            f"{'every clip at every σ' if result['every_sigma'] else 'clip i at σ[i mod len(σ)]'}; "
            f"{result['seconds']:.0f} s on CPU. Command: `{result['command']}`",
            "",
        ]
    lines += [
        "**Flow-matching loss** (velocity MSE; the same noise for every row)",
        "",
        "| captions | " + " | ".join(head) + " | mean over σ | σ as in training |",
        "|---|" + "---:|" * (len(keys) + 2),
    ]
    names = {"true": "true", "empty": "empty", "shuffled": "another clip's"}
    for cond, label in names.items():
        row = result["loss"][cond]
        lines.append(f"| {label} | " + " | ".join(f"{row[k]:.4f}" for k in [*keys, "mean", "training"]) + " |")
    lines += [
        "",
        "**Attribute swaps**: relative change of the x0 error ‖x̂0 − x‖² when one word of every frame's caption is "
        "swapped (first object; background: the scene's)",
        "",
        "| swapped | example (clip 0) | " + " | ".join(f"object px {h}" for h in head)
        + " | object px, mean | all px, mean |",
        "|---|---|" + "---:|" * (len(keys) + 2),
    ]
    for attribute, entry in result["attributes"].items():
        cells = [f"{entry['object'][k]:+.1%}" for k in [*keys, "mean"]] + [f"{entry['all']['mean']:+.1%}"]
        lines.append(f"| {attribute} | {entry['example']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "x0 error with the true captions (MSE per pixel value): object px "
        + ", ".join(f"σ={k}: {result['x0_error']['object'][k]:.4f}" for k in keys)
        + "; all px "
        + ", ".join(f"σ={k}: {result['x0_error']['all'][k]:.4f}" for k in keys)
        + f". Object pixels are {result['object_pixel_share']:.1%} of all pixels.",
    ]
    text = "\n".join(lines) + "\n"
    return text + "\n" + events_markdown(result["events"]) if "events" in result else text


def _cell(region: dict[str, dict[str, float]], key: str) -> str:
    """``"true → held (change)"`` of one column, ``—`` where it has no frames."""
    true, held, change = region["true"][key], region["held"][key], region["change"][key]
    if not (math.isfinite(true) and math.isfinite(held)):
        return "—"
    return f"{true:.4f} → {held:.4f} ({change:+.1%})"


def _change(region: dict[str, dict[str, float]], key: str) -> str:
    value = region["change"][key]
    return f"{value:+.1%}" if math.isfinite(value) else "—"


def events_markdown(events: dict[str, Any]) -> str:
    """The "Events" tables of a :func:`probe_events` result."""
    keys = list(events["clips_per_sigma"])
    head = [f"σ={k} (n={events['clips_per_sigma'][k]})" for k in keys]
    columns = [*keys, "mean", "staircase"]
    lines = [
        f"**Events**: {events['clips']} clips whose caption changes (world event_prob {events['event_prob']:g}; "
        f"found in {events['drawn']} drawn clips; first change at frame e = {events['mean_first_change']:.1f} and "
        f"{events['mean_changes']:.1f} caption changes per clip on average). Flow-matching loss on the frames from "
        "e on with the true per-frame captions → with frame 0's caption held in every frame (same clip, same "
        "noise), and the change held / true − 1: large and positive where the model reads the caption after a "
        "switch, about 0 where it copies the clip's cleaner frames. Rows: the kind of the first event. Staircase: "
        f"streaming σ with chunk size {events['staircase_chunk']} (cleanest frames first).",
        "",
        "| first event | clips | " + " | ".join(head) + " | mean over σ | staircase |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for kind, entry in events["groups"].items():
        cells = [_cell(entry["after"], k) for k in columns]
        lines.append(f"| {kind} | {entry['clips']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Control and pixels: the loss change held / true − 1 on the frames before e (same captions there), and the "
        "change of the x0 error ‖x̂0 − x‖² on the pixels of the object the first event changes or adds, frames "
        "from e on (x0 error true → held).",
        "",
        "| first event | frames < e, mean over σ | frames < e, staircase | event object px ≥ e, mean over σ "
        "| event object px ≥ e, staircase |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, entry in events["groups"].items():
        cells = [_change(entry["before"], "mean"), _change(entry["before"], "staircase"),
                 _cell(entry["object_after"], "mean"), _cell(entry["object_after"], "staircase")]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="StreamDiT checkpoint (pixel codec, bundled text)")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config: world, buffer, chunk mix")
    ap.add_argument("--clips", type=int, default=16, help="world clips (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS))
    ap.add_argument("--every-sigma", action="store_true", help="noise every clip at every σ (len(σ)× the cost)")
    ap.add_argument("--batch", type=int, default=16, help="clips per model call")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--out", default=None, help="write JSON here and the markdown beside it (.md)")
    ap.add_argument("--events", type=int, default=0, help="clips with a caption change for the events section "
                    "(default 0: off)")
    ap.add_argument("--event-prob", type=float, default=EVENT_PROB, help="per-frame event probability of the world "
                    f"the event clips come from (default {EVENT_PROB})")
    args = ap.parse_args(argv)
    if args.events < 0 or not 0.0 < args.event_prob < 1.0:
        ap.error(f"--events must be >= 0 and --event-prob in (0, 1), got {args.events} and {args.event_prob}")
    log_to_stderr()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pipe = load_pipeline(args.model, device="cpu", dtype=torch.float32, perf="plain")
    if pipe.text_encoder is None or not isinstance(pipe.codec, PixelCodec):
        raise SystemExit(f"--model {args.model}: the probe needs a pixel-space model with the bundled text encoder")
    cfg = load_config(args.config)
    draw = draw_clips(cfg, args.clips, args.seed)
    log.info("drew %d clips of %d frames; probing", args.clips, cfg.buffer)
    result = probe(pipe.model, pipe.text_encoder, draw, args.sigmas, args.every_sigma, args.batch)
    if args.events > 0:
        events = draw_event_clips(cfg, args.events, args.seed, args.event_prob)
        log.info("drew %d clips with a caption change (of %d); probing events", args.events, events.drawn)
        result["events"] = probe_events(pipe.model, pipe.text_encoder, events, args.sigmas, args.every_sigma,
                                        args.batch)
    model_path = Path(args.model).resolve()
    config_path = Path(args.config).resolve()
    result = {
        "model": str(model_path.relative_to(REPO)) if model_path.is_relative_to(REPO) else str(model_path),
        "model_sha256": _sha256(shard_paths(model_path)),
        "config": str(config_path.relative_to(REPO)) if config_path.is_relative_to(REPO) else str(config_path),
        "clips": args.clips,
        "frames": cfg.buffer,
        "seed": args.seed,
        "sigmas": list(args.sigmas),
        "every_sigma": args.every_sigma,
        "seconds": time.perf_counter() - started,
        "command": "python scripts/caption_probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
        **result,
    }
    text = markdown(result)
    sys.stdout.write(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)
        log.info("wrote %s and %s", out, out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
