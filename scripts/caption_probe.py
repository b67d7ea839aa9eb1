"""How much does a bundled model's prediction depend on its caption, and on which caption words?

Usage::

    python scripts/caption_probe.py [--model FILE] [--clips 16] [--seed 0] [--sigmas 0.3 0.5 0.7 0.9]
                                    [--every-sigma] [--config configs/bundled_teacher.json] [--out probe.json]

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

Prints a markdown table; ``--out FILE.json`` also writes the numbers as JSON and ``FILE.md`` beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
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
_MASK_LEVEL = 0.05  # a pixel belongs to the object when removing it changes some channel by more than this

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


def draw_clips(cfg: TrainConfig, clips: int, seed: int) -> ProbeDraw:
    """Clips, masks, noise, training σ and attribute swaps, all from generators seeded by ``seed``."""
    if clips < 2:
        raise ValueError(f"clips must be >= 2 (the shuffled condition borrows another clip's captions), got {clips}")
    world = World(WorldConfig(**cfg.world))  # type: ignore[arg-type]
    g_truth, g_small, g_noise, g_swap = (torch.Generator().manual_seed(seed_for(seed, 0, 0, s)) for s in range(4))
    truth = world.sample_truth(clips, cfg.buffer, g_truth)
    captions = [list(row) for row in captions_from_truth(truth)]
    flat = WorldTruth(**{f.name: getattr(truth, f.name).flatten(0, 1) for f in dataclasses.fields(WorldTruth)})
    without = dataclasses.replace(flat, present=flat.present.clone())
    without.present[:, 0] = False
    H, W, B = world.config.height, world.config.width, cfg.buffer
    frames = render_frames(flat, world.config, "cpu")  # [n·B, 3, H, W] in [0, 1]
    mask = (frames - render_frames(without, world.config, "cpu")).abs().amax(1) > _MASK_LEVEL  # [n·B, H, W]
    x = frames.view(clips, B, 3, H, W).permute(0, 2, 1, 3, 4) * 2.0 - 1.0
    object_mask = mask.view(clips, B, 1, H, W).permute(0, 2, 1, 3, 4)
    rows = []
    frames_free = cfg.buffer - cfg.reference_frames
    for _ in range(clips):  # as Trainer.sigmas
        c = sample_chunk_size(frames_free, cfg.chunk_sizes, cfg.t2v_share, g_small)
        partition = Partition(K=cfg.reference_frames, N=frames_free // c, c=c, s=1)
        rows.append(training_sigmas(partition, g_small, cfg.shift))
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


def _sums(
    model: VelocityModel, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, ctx: torch.Tensor,
    mask: torch.Tensor, batch: int,
) -> dict[str, torch.Tensor]:
    """Per clip: the velocity error summed over each frame (``v [n, F]``, the loss's numerator per frame), and the
    x0 error summed over object pixels and over all pixels (``x0_object``, ``x0_all`` ``[n]``). Runs the model on
    ``batch`` clips at a time."""
    out: dict[str, list[torch.Tensor]] = {"v": [], "x0_object": [], "x0_all": []}
    for s in range(0, x.shape[0], batch):
        xb, sb, nb, mb = x[s : s + batch], sigma[s : s + batch], noise[s : s + batch], mask[s : s + batch]
        xt = noise_clip(xb, sb, nb)
        v = model(xt, sb, ctx[s : s + batch]).float()
        sq_v = (v - (nb - xb)).pow(2)
        sq_x0 = (xt - sb[:, None, :, None, None] * v - xb).pow(2)
        out["v"].append(sq_v.mean(dim=(1, 3, 4)))
        out["x0_object"].append((sq_x0 * mb).sum(dim=(1, 2, 3, 4)))
        out["x0_all"].append(sq_x0.sum(dim=(1, 2, 3, 4)))
    return {k: torch.cat(v) for k, v in out.items()}


def _mean_loss(v_err: torch.Tensor, sigma: torch.Tensor) -> float:
    """``flow_matching_loss``'s reduction: the mean per-frame error over frames with σ > 0."""
    weight = (sigma > 0).float()
    return float((v_err * weight).sum() / weight.sum().clamp(min=1.0))


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
    if not sigmas or any(not 0.0 < s <= 1.0 for s in sigmas):
        raise ValueError(f"sigmas must be a non-empty list of values in (0, 1], got {list(sigmas)}")
    n, B = draw.x.shape[0], draw.x.shape[2]
    K = len(sigmas)
    if every_sigma:
        index = torch.arange(n).repeat(K)
        level = torch.arange(K).repeat_interleave(n)
    else:
        index = torch.arange(n)
        level = torch.arange(n) % K
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
            sums = _sums(model, x, fixed, noise, ctx[index], mask, batch)
            v_per_clip = sums["v"].mean(dim=1)  # every frame has σ > 0 here
            loss = per_sigma(v_per_clip, torch.ones(len(index)))
            loss["mean"] = sum(loss[k] for k in keys) / K
            train = _sums(model, draw.x, draw.train_sigma, draw.noise, ctx, draw.object_mask, batch)
            loss["training"] = _mean_loss(train["v"], draw.train_sigma)
            result["loss"][name] = loss
            if name == "true":
                fixed_true = sums
        counts = {"object": mask.sum(dim=(1, 2, 3, 4)).float() * 3, "all": torch.full((len(index),), float(pixels))}
        for region in ("object", "all"):
            err = per_sigma(fixed_true[f"x0_{region}"], counts[region])
            err["mean"] = sum(err[k] for k in keys) / K
            result["x0_error"][region] = err
        for attribute, captions in draw.swaps.items():
            sums = _sums(model, x, fixed, noise, _context(text, captions)[index], mask, batch)
            entry: dict[str, Any] = {"example": draw.swap_examples[attribute]}
            for region in ("object", "all"):
                swapped = per_sigma(sums[f"x0_{region}"], counts[region])
                true = result["x0_error"][region]
                rel = {k: swapped[k] / true[k] - 1.0 if true[k] > 0 else float("nan") for k in keys}
                rel["mean"] = sum(rel[k] for k in keys) / K
                entry[region] = rel
            result["attributes"][attribute] = entry
    result["clips_per_sigma"] = {key: int((level == k).sum()) for k, key in enumerate(keys)}
    result["object_pixel_share"] = float(draw.object_mask.float().mean())
    return result


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
    args = ap.parse_args(argv)
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
