"""Render the figures in docs/figures/ from the schedule maths itself (no matplotlib; Pillow only).

Run from the repository root (or `make figures`):

    python docs/make_figures.py            # writes docs/figures/*.png

Every number drawn comes from ``streamdit_core.schedule`` (``inference_sigmas``, ``next_inference_sigmas``,
``training_sigmas``, ``time_shift``), so the pictures cannot drift from the code. Frame thumbnails are drawn the
way the model sees them: ``x_σ = (1 − σ)·x + σ·ε`` with a fixed seed, so the output is byte-for-byte repeatable
on one machine (fonts may differ between machines: DejaVu Sans is used where installed).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from streamdit_core.schedule import (  # noqa: E402
    Partition,
    inference_sigmas,
    next_inference_sigmas,
    time_shift,
    training_sigmas,
)

OUT = REPO / "docs" / "figures"

# ---------------------------------------------------------------------------------------------------------------
# Drawing helpers
# ---------------------------------------------------------------------------------------------------------------

_FONT_FILES = {
    False: ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf"],
    True: ["/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "DejaVuSans-Bold.ttf"],
}
_GREEK = True  # set to False when only Pillow's default font (no Greek letters) is available

BG = (255, 255, 255)
INK = (30, 30, 30)
MUTED = (110, 110, 110)
REF = (40, 90, 200)
EMIT = (20, 150, 60)
NEW = (200, 60, 40)
CELL = 46
GAP = 4


def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    global _GREEK
    for name in _FONT_FILES[bold]:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    _GREEK = False
    return ImageFont.load_default(size=size)


def t(text: str) -> str:
    """Spell Greek letters out when the font cannot draw them."""
    if _GREEK:
        return text
    for greek, latin in (("σ", "sigma"), ("ε", "eps"), ("Δ", "d"), ("−", "-"), ("·", "*"), ("→", "->"), ("≤", "<=")):
        text = text.replace(greek, latin)
    return text


def frame_content(frame_id: int, size: int = CELL) -> np.ndarray:
    """A clean toy frame ``[size, size, 3]`` float 0..1: a red ball that moves right as ``frame_id`` grows.

    ``frame_id < 0`` is a reference frame (a blue square), drawn the same for every id.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    sky = np.stack([0.75 + 0.2 * yy, 0.85 + 0.1 * yy, np.full_like(yy, 0.98)], axis=-1)
    ground = yy > 0.72
    sky[ground] = (0.55, 0.75, 0.45)
    if frame_id < 0:
        mask = (np.abs(xx - 0.5) < 0.22) & (np.abs(yy - 0.5) < 0.22)
        sky[mask] = (0.2, 0.35, 0.8)
        return sky
    cx = 0.18 + 0.64 * ((frame_id * 0.11) % 1.0)
    cy = 0.58 - 0.25 * abs(math.sin(frame_id * 0.7))
    mask = (xx - cx) ** 2 + (yy - cy) ** 2 < 0.16**2
    sky[mask] = (0.85, 0.15, 0.12)
    return sky


def noised(frame_id: int, sigma: float, seed: int) -> Image.Image:
    """The toy frame at noise level σ: ``(1 − σ)·x + σ·ε`` with ε ~ N(0.5, 0.3²) clipped (a fixed seed)."""
    clean = frame_content(frame_id)
    eps = np.random.default_rng(seed).normal(0.5, 0.3, clean.shape).clip(0, 1)
    pixels = (1 - sigma) * clean + sigma * eps
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


def centred(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int, fill=INK, bold=False) -> None:
    f = font(size, bold)
    left, top, right, bottom = draw.textbbox((0, 0), t(text), font=f)
    draw.text((xy[0] - (right - left) / 2, xy[1] - (bottom - top) / 2 - top), t(text), font=f, fill=fill)


def text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], value: str, size: int, fill=INK, bold=False) -> None:
    draw.text(xy, t(value), font=font(size, bold), fill=fill)


def draw_buffer(
    image: Image.Image,
    x: int,
    y: int,
    sigmas: Sequence[float],
    frame_ids: Sequence[int],
    partition: Partition,
    bar_height: int = 60,
    seed: int = 0,
    show_values: bool = True,
) -> int:
    """Draw one buffer snapshot: a σ bar per frame, the noised thumbnail, σ under it, and chunk brackets.

    Index 0 (left) is the oldest, cleanest frame; the right end is the newest, noisiest. Returns the bottom y.
    """
    draw = ImageDraw.Draw(image)
    step = CELL + GAP
    for index, (sigma, frame_id) in enumerate(zip(sigmas, frame_ids)):
        cx = x + index * step
        is_ref = index < partition.K
        # bar: height ∝ σ, grey level ∝ σ (white = clean, dark = pure noise)
        grey = int(round(235 - 175 * sigma))
        top = y + bar_height - round(bar_height * sigma)
        draw.rectangle((cx, y, cx + CELL - 1, y + bar_height), outline=(225, 225, 225))
        if sigma > 0:
            draw.rectangle((cx, top, cx + CELL - 1, y + bar_height), fill=(grey, grey, grey))
        thumb_y = y + bar_height + 4
        image.paste(noised(frame_id, float(sigma), seed + 7919 * (frame_id + 3)), (cx, thumb_y))
        if is_ref:
            draw.rectangle((cx - 2, thumb_y - 2, cx + CELL + 1, thumb_y + CELL + 1), outline=REF, width=3)
        if show_values:
            centred(draw, (cx + CELL / 2, thumb_y + CELL + 9), f"{sigma:.2f}", 11, MUTED)
    # chunk brackets under the values
    bracket_y = y + bar_height + 4 + CELL + 20
    if partition.K:
        x0, x1 = x, x + partition.K * step - GAP
        draw.line((x0, bracket_y, x0, bracket_y + 5, x1, bracket_y + 5, x1, bracket_y), fill=REF, width=2)
        centred(draw, ((x0 + x1) / 2, bracket_y + 14), "ref" if partition.K == 1 else f"{partition.K} refs", 11, REF)
    for p in range(partition.N):
        x0 = x + (partition.K + p * partition.c) * step
        x1 = x0 + partition.c * step - GAP
        draw.line((x0, bracket_y, x0, bracket_y + 5, x1, bracket_y + 5, x1, bracket_y), fill=INK, width=2)
        centred(draw, ((x0 + x1) / 2, bracket_y + 14), f"p={p}", 11, INK)
    return bracket_y + 24


def save(image: Image.Image, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    image.save(OUT / name, format="PNG", optimize=True)
    print(f"wrote {OUT / name} ({image.size[0]}x{image.size[1]})")


# ---------------------------------------------------------------------------------------------------------------
# Figure 1: partition schemes as staircases
# ---------------------------------------------------------------------------------------------------------------

SCHEMES: list[tuple[str, Partition, int, str]] = [
    (
        "Uniform T2V (c = B)",
        Partition(K=0, N=1, c=8, s=8),
        4,
        "one chunk = the whole buffer; all frames share σ (shown half-way, m = 4 of s = 8)",
    ),
    (
        "Diagonal / FIFO (c = 1, s = 1)",
        Partition(K=0, N=8, c=1, s=1),
        0,
        "every frame its own level; one frame out per call",
    ),
    ("StreamDiT (K=0, N=8, c=2, s=1)", Partition(K=0, N=8, c=2, s=1), 0, "chunks of 2 frames; 2 frames out per call"),
    (
        "Paper Fig. 2 (K=1, N=3, c=2, s=2)",
        Partition(K=1, N=3, c=2, s=2),
        0,
        "1 clean reference frame; each chunk stays s = 2 calls per position",
    ),
]


def figure_schemes() -> None:
    step = CELL + GAP
    left = 150
    width = left + 16 * step + 130
    row_h = 60 + 4 + CELL + 20 + 24 + 46
    image = Image.new("RGB", (width, 70 + row_h * len(SCHEMES) + 30), BG)
    draw = ImageDraw.Draw(image)
    text(draw, (20, 14), "The buffer: noise level σ of every frame, by buffer index", 20, bold=True)
    text(
        draw,
        (20, 42),
        "bar height and grey = σ (σ = 1 pure noise, σ = 0 clean); thumbnail = (1 − σ)·x + σ·ε",
        13,
        MUTED,
    )
    y = 70
    for title, partition, micro_step, note in SCHEMES:
        sigmas = inference_sigmas(partition, micro_step).tolist()
        ids = [-1] * partition.K + list(range(partition.B - partition.K))
        text(draw, (20, y), title, 15, bold=True)
        text(
            draw,
            (20 + draw.textlength(t(title), font=font(15, True)) + 12, y + 2),
            f"B = {partition.B}, T = {partition.T}, micro-step m = {micro_step}: {note}",
            12,
            MUTED,
        )
        top = y + 24
        if partition.K:
            text(draw, (20, top + 8), "index 0: reference", 12, REF)
            text(draw, (20, top + 24), "σ = 0, never moves;", 11, MUTED)
            text(draw, (20, top + 38), f"index {partition.K}: cleanest,", 11, MUTED)
            text(draw, (20, top + 52), "emitted next", 11, MUTED)
        else:
            text(draw, (20, top + 8), "index 0", 12, INK)
            text(draw, (20, top + 24), "oldest, cleanest,", 11, MUTED)
            text(draw, (20, top + 38), "emitted next", 11, MUTED)
        bottom = draw_buffer(image, left, top, sigmas, ids, partition, seed=partition.B)
        end_x = left + partition.B * step + 4
        text(draw, (end_x, top + 8), f"index {partition.B - 1}", 12, INK)
        text(draw, (end_x, top + 24), "newest, noisiest", 11, MUTED)
        y = bottom + 22
    draw.line((left, y - 8, width - 40, y - 8), fill=(220, 220, 220))
    centred(draw, (width / 2, y + 6), "clean end  ←  buffer index  →  noisy end", 13, MUTED)
    save(image, "buffer_schemes.png")


# ---------------------------------------------------------------------------------------------------------------
# Figure 2: how calls move the buffer (paper Fig. 2 scheme)
# ---------------------------------------------------------------------------------------------------------------


def figure_steps(partition: Partition = Partition(K=1, N=3, c=2, s=2), calls: int = 5) -> None:
    step = CELL + GAP
    out_w = 4 * step + 20  # room for emitted frames on the left
    left = 190 + out_w
    row_h = 60 + 4 + CELL + 20 + 24 + 40
    width = left + partition.B * step + 240
    image = Image.new("RGB", (width, 96 + row_h * calls - 24), BG)
    draw = ImageDraw.Draw(image)
    text(draw, (20, 14), f"One model call per row: {partition.describe()}", 20, bold=True)
    text(
        draw,
        (20, 42),
        "Each call moves every frame one step (Δu = 1/T) closer to clean. Every s calls the cleanest chunk reaches"
        " σ = 0 and is emitted,",
        13,
        MUTED,
    )
    text(draw, (20, 60), "the others move one position left, and c fresh noise frames enter on the right.", 13, MUTED)
    chunks = [list(range(p * partition.c, (p + 1) * partition.c)) for p in range(partition.N)]
    next_id = partition.N * partition.c
    emitted: list[int] = []
    micro_step = 0
    y = 96
    for call in range(1, calls + 1):
        sigmas = inference_sigmas(partition, micro_step).tolist()
        after = next_inference_sigmas(partition, micro_step).tolist()
        ids = [-1] * partition.K + [f for chunk in chunks for f in chunk]
        text(draw, (20, y + 6), f"before call {call}", 15, bold=True)
        text(draw, (20, y + 28), f"micro-step m = {micro_step}", 12, MUTED)
        text(draw, (20, y + 44), f"frames emitted: {len(emitted)}", 12, MUTED)
        # emitted frames so far, newest next to the buffer
        shown = emitted[-4:]
        for slot, frame_id in enumerate(shown):
            ex = left - 20 - (len(shown) - slot) * step
            image.paste(noised(frame_id, 0.0, 0), (ex, y + 64))
            centred(draw, (ex + CELL / 2, y + 64 + CELL + 9), f"f{frame_id}", 11, EMIT)
        if shown:
            centred(draw, (left - 20 - len(shown) * step / 2, y + 40), "output video", 12, EMIT, bold=True)
        bottom = draw_buffer(image, left, y, sigmas, ids, partition, seed=11)
        for index, frame_id in enumerate(ids):
            if frame_id >= 0:
                centred(draw, (left + index * step + CELL / 2, y - 6), f"f{frame_id}", 11, INK)
        # what this call does
        note_x = left + partition.B * step + 12
        deltas = [a - b for a, b in zip(after, sigmas)][partition.K :]
        text(draw, (note_x, y + 6), "this call:", 12, bold=True)
        text(draw, (note_x, y + 24), f"σ of each chunk {deltas[0]:+.3f}", 12, MUTED)
        if micro_step == partition.s - 1:
            leaving = chunks[0]
            entering = list(range(next_id, next_id + partition.c))
            text(draw, (note_x, y + 44), f"f{leaving[0]}–f{leaving[-1]} reach σ = 0:", 12, EMIT)
            text(draw, (note_x, y + 60), "emitted", 12, EMIT)
            text(draw, (note_x, y + 80), f"f{entering[0]}–f{entering[-1]} enter at σ = 1", 12, NEW)
            emitted.extend(leaving)
            chunks = chunks[1:] + [entering]
            next_id += partition.c
            micro_step = 0
        else:
            text(draw, (note_x, y + 44), "no chunk leaves yet", 12, MUTED)
            micro_step += 1
        y = bottom + 16
        draw.line((20, y - 8, width - 20, y - 8), fill=(230, 230, 230))
    save(image, "buffer_steps.png")


# ---------------------------------------------------------------------------------------------------------------
# Figure 3: training levels (jittered bands per chunk) and Figure 4: time shift
# ---------------------------------------------------------------------------------------------------------------


def _plot_frame(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], x_label: str, y_label: str) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(180, 180, 180))
    for value in (0.0, 0.25, 0.5, 0.75, 1.0):
        yy = y1 - value * (y1 - y0)
        draw.line((x0 - 4, yy, x0, yy), fill=INK)
        draw.line((x0, yy, x1, yy), fill=(240, 240, 240))
        centred(draw, (x0 - 22, yy), f"{value:.2f}", 11, MUTED)
    centred(draw, ((x0 + x1) / 2, y1 + 34), x_label, 12, MUTED)
    text(draw, (x0 - 50, y0 - 24), y_label, 12, MUTED)


SAMPLE_COLOURS = [(220, 60, 40), (40, 120, 220), (30, 160, 80), (200, 140, 0)]


def figure_training(partition: Partition = Partition(K=0, N=8, c=2, s=1)) -> None:
    panel_w, panel_h = 520, 300
    image = Image.new("RGB", (2 * panel_w + 160, panel_h + 170), BG)
    draw = ImageDraw.Draw(image)
    text(
        draw,
        (20, 14),
        f"Training levels for {partition.describe()}: one σ per chunk, jittered in its band",
        20,
        bold=True,
    )
    text(
        draw,
        (20, 42),
        "chunk i (from the noisy end) draws u ~ U[i/N, (i+1)/N) and σ = shift(1 − u); grey bands = the allowed"
        " range; dashed = inference levels at m = 0",
        13,
        MUTED,
    )
    for panel, shift in enumerate((1.0, 3.0)):
        x0 = 80 + panel * (panel_w + 60)
        y0 = 100
        box = (x0, y0, x0 + panel_w, y0 + panel_h)
        text(draw, (x0, y0 - 30), f"shift k = {shift:g}", 14, bold=True)
        _plot_frame(draw, box, "buffer index (0 = clean end)", "σ")
        fw = panel_w / partition.B

        def ypos(sigma: float, box: tuple[int, int, int, int] = box) -> float:
            return box[3] - sigma * (box[3] - box[1])

        for i in range(partition.N):  # bands, counted from the noisy end
            p = partition.N - 1 - i  # chunk position from the clean end
            hi = float(time_shift(1.0 - i / partition.N, shift))
            lo = float(time_shift(1.0 - (i + 1) / partition.N, shift))
            bx0 = x0 + (partition.K + p * partition.c) * fw
            draw.rectangle((bx0 + 1, ypos(hi), bx0 + partition.c * fw - 1, ypos(lo)), fill=(225, 225, 225))
        for index in range(partition.B):
            centred(draw, (x0 + (index + 0.5) * fw, y0 + panel_h + 12), str(index), 10, MUTED)
        generator = torch.Generator().manual_seed(1234)
        samples = training_sigmas(partition, generator, shift=shift, batch=len(SAMPLE_COLOURS))
        for colour, sample in zip(SAMPLE_COLOURS, samples.tolist()):
            for index, sigma in enumerate(sample):
                cx = x0 + (index + 0.5) * fw
                draw.ellipse((cx - 4, ypos(sigma) - 4, cx + 4, ypos(sigma) + 4), fill=colour)
            points = [(x0 + (index + 0.5) * fw, ypos(sigma)) for index, sigma in enumerate(sample)]
            draw.line(points, fill=colour, width=1)
        reference = inference_sigmas(partition, 0, shift=shift).tolist()
        for index, sigma in enumerate(reference):
            xa, xb = x0 + index * fw, x0 + (index + 1) * fw
            for xs in np.arange(xa, xb, 6):
                draw.line((xs, ypos(sigma), min(xs + 3, xb), ypos(sigma)), fill=INK, width=2)
    text(
        draw,
        (80, panel_h + 150),
        "coloured dots: 4 training samples drawn with torch.Generator().manual_seed(1234)",
        12,
        MUTED,
    )
    save(image, "training_levels.png")


def figure_time_shift() -> None:
    size = 360
    image = Image.new("RGB", (size + 260, size + 130), BG)
    draw = ImageDraw.Draw(image)
    text(draw, (20, 12), "Time shift σ' = k·σ / (1 + (k − 1)·σ)", 16, bold=True)
    box = (70, 70, 70 + size, 70 + size)
    _plot_frame(draw, box, "σ (before shift)", "σ'")
    colours = [(30, 30, 30), (40, 120, 220), (30, 160, 80), (220, 60, 40)]
    for row, (k, colour) in enumerate(zip((1.0, 2.0, 3.0, 5.0), colours)):
        sigma = torch.linspace(0, 1, 101, dtype=torch.float64)
        shifted = time_shift(sigma, k).tolist()
        points = [(box[0] + s * size, box[3] - v * size) for s, v in zip(sigma.tolist(), shifted)]
        draw.line(points, fill=colour, width=3)
        text(draw, (box[2] + 16, box[1] + 10 + 22 * row), f"k = {k:g}", 13, colour, bold=True)
    for value in (0.0, 0.5, 1.0):
        centred(draw, (box[0] + value * size, box[3] + 12), f"{value:g}", 11, MUTED)
    text(draw, (box[2] + 16, box[1] + 110), "k > 1 keeps more", 12, MUTED)
    text(draw, (box[2] + 16, box[1] + 126), "calls at high noise", 12, MUTED)
    save(image, "time_shift.png")


# ---------------------------------------------------------------------------------------------------------------
# Icon (Comfy Registry [tool.comfy] Icon)
# ---------------------------------------------------------------------------------------------------------------


def figure_icon(size: int = 256) -> None:
    """A staircase of frames going from clean (left) to noise (right) on a dark rounded tile."""
    scale = 4  # draw large, then downsample for smooth edges
    big = size * scale
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((0, 0, big - 1, big - 1), radius=big // 6, fill=(22, 26, 38, 255))
    bars = 6
    margin = big // 8
    bar_w = (big - 2 * margin) // bars
    rng = np.random.default_rng(7)
    for index in range(bars):
        sigma = index / (bars - 1)
        height = int((big - 2 * margin) * (0.3 + 0.7 * (index + 1) / bars))
        x0 = margin + index * bar_w
        y0 = big - margin - height
        w, h = bar_w - scale * 6, height
        clean = np.zeros((h, w, 3), np.float32)
        clean[...] = (0.95, 0.35 + 0.1 * index, 0.25)
        eps = rng.uniform(0, 1, (h // (scale * 6) + 1, w // (scale * 6) + 1, 1)).repeat(3, axis=2)
        eps = eps.repeat(scale * 6, axis=0).repeat(scale * 6, axis=1)[:h, :w]
        pixels = ((1 - sigma) * clean + sigma * eps) * 255
        tile = Image.fromarray(pixels.round().astype(np.uint8))
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).rounded_rectangle((0, 0, w - 1, h - 1), radius=scale * 8, fill=255)
        image.paste(tile, (x0, y0), mask)
    # a "play" triangle over the clean end
    tri = [
        (margin + scale * 8, margin),
        (margin + scale * 8, margin + big // 4),
        (margin + big // 4, margin + big // 8),
    ]
    draw.polygon(tri, fill=(255, 255, 255, 235))
    save(image.resize((size, size), Image.Resampling.LANCZOS), "icon.png")


def main() -> None:
    figure_schemes()
    figure_steps()
    figure_training()
    figure_time_shift()
    figure_icon()


if __name__ == "__main__":
    main()
