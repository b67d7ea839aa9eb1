"""What does a bundled model predict from a noisy buffer? One world clip, three noise patterns, a picture.

Usage::

    python scripts/denoise_probe.py [--model FILE] [--caption TEXT] [--seed 3] --out probe.png

Renders ``--caption`` for 16 frames (``world.render_caption``), noises it (one noise draw, seed 1) in three ways
and writes the model's x0 prediction ``x̂0 = x_σ − σ·v_θ(x_σ, σ, caption)`` for each, as rows of one PNG (every
second frame, 0, 2, …, 14):

1. the clean clip;
2. the streaming staircase of ``K=0, N=8, c=2`` at micro-step 0 (σ from 1/8 at the clean end to 1) and its
   prediction: how well the model continues what the cleaner frames show;
3. the whole buffer at σ = 0.9 and its prediction;
4. the whole buffer at σ = 0.98 and its prediction: what the model takes from the caption alone (the start of a
   stream and a prompt switch are decided at such levels).

Prints the x0 mean squared error per frame of each pattern. CPU, float32, a few seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

from streamdit_core.checkpoint import load_checkpoint
from streamdit_core.log import get_logger, log_to_stderr
from streamdit_core.pipeline import WEIGHTS_DIR
from streamdit_core.schedule import Partition, inference_sigmas
from streamdit_core.train import noise_clip
from streamdit_core.world import render_caption

log = get_logger("denoise_probe")


def predictions(model_path: Path, caption: str, seed: int) -> tuple[list[torch.Tensor], dict[str, list[float]]]:
    """Rows ``[1, 3, 16, H, W]`` in [−1, 1] (clean, then noisy and predicted per pattern) and x0 MSE per frame."""
    ckpt = load_checkpoint(model_path)
    if ckpt.text_encoder is None:
        raise ValueError(f"--model {model_path} has no bundled text encoder (a pixel-space bundled model is needed)")
    clip = render_caption(caption, 16, seed=seed)
    x = clip.frames.permute(1, 0, 2, 3)[None] * 2 - 1  # [1, 3, 16, H, W]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    patterns = {
        "staircase": inference_sigmas(Partition(K=0, N=8, c=2, s=1), 0).float()[None],
        "whole buffer 0.9": torch.full((1, 16), 0.9),
        "whole buffer 0.98": torch.full((1, 16), 0.98),
    }
    rows, errors = [x], {}
    with torch.no_grad():
        context = ckpt.text_encoder.encode([caption])
        for name, sigma in patterns.items():
            noisy = noise_clip(x, sigma, noise)
            x0 = noisy - sigma[:, None, :, None, None] * ckpt.model(noisy, sigma, context)
            rows += [noisy, x0]
            errors[name] = [round(float(e), 4) for e in (x0 - x).pow(2).mean(dim=(1, 3, 4))[0]]
    return rows, errors


def save_rows(rows: list[torch.Tensor], out: Path, scale: int = 1) -> None:
    image = torch.cat(
        [torch.cat(list(r[0, :, ::2].permute(1, 0, 2, 3)), dim=2) for r in rows], dim=1
    )  # [3, rows·H, 8·W]
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=WEIGHTS_DIR / "streamdit-bundled-teacher.safetensors")
    p.add_argument("--caption", default="a large yellow square moving right on a grey background")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    log_to_stderr()
    rows, errors = predictions(args.model, args.caption, args.seed)
    save_rows(rows, args.out)
    for name, values in errors.items():
        log.info("%s: x0 MSE per frame %s", name, values)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
