"""Prompt schedule and video-to-video input nodes."""

from __future__ import annotations

from typing import Any

import torch

from ._core import core
from .common import CATEGORY, PROMPTS, VAE, VIDEO, PromptsSpec, VideoSpec, image_to_frames

ON_END = ("loop", "hold", "stop")

DEFAULT_SCHEDULE = (
    '"0": "a large red circle moving right on a black background",\n'
    '"48": "a small yellow square moving left on a grey background"'
)


class StreamDiTPromptSchedule:
    """A prompt schedule: which prompt applies from which output frame on."""

    DESCRIPTION = (
        "Maps output frame indices to prompts. Write one entry per line as '0: a red ball' or FizzNodes style "
        "'\"0\": \"a red ball\", \"48\": \"a blue cube\"'. A single line without an index is a prompt for the "
        "whole stream. Edit it while the stream plays: the change applies to the chunks entering the buffer."
    )
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = (PROMPTS,)
    RETURN_NAMES = ("prompts",)
    OUTPUT_TOOLTIPS = ("The parsed schedule; the sampler encodes each distinct prompt once.",)
    FUNCTION = "parse"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "schedule": (
                    "STRING",
                    {
                        "default": DEFAULT_SCHEDULE,
                        "multiline": True,
                        "dynamicPrompts": False,
                        "tooltip": "Frame index → prompt, one per line ('0: a red ball') or FizzNodes style "
                        "('\"0\": \"a red ball\", \"48\": \"a blue cube\"'). Frame indices count output frames "
                        "from the start of the stream.",
                    },
                ),
                "transition": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 10000,
                        "tooltip": "Frames over which consecutive prompts are blended (0 = hard switch).",
                    },
                ),
            }
        }

    def parse(self, schedule: str, transition: int) -> tuple[PromptsSpec]:
        return (parse_prompts(schedule, transition),)


def parse_prompts(text: str, transition: int = 0) -> PromptsSpec:
    """Parse a schedule text (errors name the ``schedule`` input)."""
    if not str(text).strip():
        raise ValueError("schedule is empty: write at least one prompt, e.g. '0: a red ball on a blue background'")
    try:
        parsed = core("prompts").parse_schedule(str(text), transition=int(transition))
    except ValueError as exc:
        raise ValueError(f"schedule could not be parsed: {exc}") from exc
    return PromptsSpec(text=str(text), transition=int(transition), schedule=parsed)


class StreamDiTVideoInput:
    """Video-to-video: input frames that replace the fresh noise entering the buffer."""

    DESCRIPTION = (
        "Feeds IMAGE frames (e.g. from Load Video → Get Video Components, or a Load Image batch) into the "
        "stream: every chunk entering the buffer is the matching input chunk noised to 'strength' instead of "
        "pure noise, so the output follows the input's layout and motion. Frames are resized to the stream's "
        "resolution. Latent models (Wan 2.1) need the VAE connected: the frames are encoded with it once."
    )
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = (VIDEO,)
    RETURN_NAMES = ("video",)
    OUTPUT_TOOLTIPS = ("Input video for the StreamDiT Sampler's optional 'video' input.",)
    FUNCTION = "prepare"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Input frames, oldest first (a video's frames as an IMAGE batch)."}),
                "strength": (
                    "FLOAT",
                    {
                        "default": 0.7,
                        "min": 0.01,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Noise level the input is pushed to: 1 = ignore the input (pure text-to-video), "
                        "small = stay close to the input. 0.5-0.8 restyles while keeping motion.",
                    },
                ),
                "on_end": (
                    list(ON_END),
                    {
                        "default": "loop",
                        "tooltip": "When the stream runs past the last input frame: loop = start the input again, "
                        "hold = repeat the last frame, stop = end the stream once the last input frame has been "
                        "emitted (reset to start again).",
                    },
                ),
            },
            "optional": {
                "vae": (VAE, {"tooltip": "For latent models (Wan 2.1): the Wan VAE that encodes the input frames "
                              "(every 4 frames become one latent frame). Leave unconnected for the bundled model."}),
            },
        }

    def prepare(self, images: torch.Tensor, strength: float, on_end: str, vae: Any | None = None) -> tuple[VideoSpec]:
        return (make_video(images, strength, on_end, vae),)


def make_video(images: torch.Tensor, strength: float, on_end: str, vae: Any | None = None) -> VideoSpec:
    """Validate and package input frames (with the VAE encoder for latent models)."""
    if on_end not in ON_END:
        raise ValueError(f"on_end {on_end!r} is not one of {list(ON_END)}")
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    frames = image_to_frames(images, "images")
    if vae is None:
        return VideoSpec(frames=frames, strength=float(strength), on_end=on_end)
    from .vae import frame_encoder

    return VideoSpec(frames=frames, strength=float(strength), on_end=on_end, encoder=frame_encoder(vae),
                     temporal_factor=4)
