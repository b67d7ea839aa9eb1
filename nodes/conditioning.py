"""Prompt schedules from ComfyUI ``CONDITIONING`` (e.g. CLIPTextEncode with umT5 for Wan 2.1).

The conversion from ComfyUI's conditioning (a list of ``[tensor [B, L, D], dict]``) to plain tensors happens
here; the core gets a host-agnostic ``ConditionedSchedule`` (keyframes + ``{key: [L, D]}`` embeddings).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ._core import core
from .common import CATEGORY, CONDITIONING, PROMPTS, PromptsSpec

SLOTS = 8
"""``conditioning_1`` … ``conditioning_8``: the prompts of one schedule (edit inputs and keyframes while the stream
plays to go on past eight)."""


def conditioning_tensor(value: Any, input_name: str) -> torch.Tensor:
    """One ComfyUI ``CONDITIONING`` → its embedding ``[L, D]`` (float32, CPU).

    Raises ``ValueError`` naming ``input_name`` for anything but one text encoding of one prompt."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{input_name} must be CONDITIONING from a text encoder (e.g. CLIPTextEncode), got "
                         f"{type(value).__name__}")
    if len(value) != 1:
        raise ValueError(f"{input_name} holds {len(value)} conditionings (e.g. from Conditioning Combine); connect "
                         "one text encoding per keyframe (Conditioning Concat joins prompts into one)")
    entry = value[0]
    tensor = entry[0] if isinstance(entry, (list, tuple)) and entry else None
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
        shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{input_name} must hold a [batch, tokens, width] tensor, got {shape}")
    if tensor.shape[0] != 1:
        raise ValueError(f"{input_name} has a batch of {tensor.shape[0]} prompts; connect one prompt per input")
    return tensor[0].detach().to(device="cpu", dtype=torch.float32)


_NUMBER = re.compile(r"^\d+$")


def parse_keyframes(text: str, count: int) -> list[int]:
    """``"0, 48, 96"`` → ``[0, 48, 96]``; exactly ``count`` strictly increasing whole numbers starting at 0."""
    parts = [p.strip() for p in re.split(r"[,\s]+", str(text).strip()) if p.strip()]
    bad = [p for p in parts if not _NUMBER.match(p)]
    if bad:
        raise ValueError(f"keyframes must be whole numbers >= 0 separated by commas, got {bad}")
    frames = [int(p) for p in parts]
    if len(frames) != count:
        raise ValueError(f"keyframes has {len(frames)} entries ({text!r}) but {count} conditioning inputs are "
                         f"connected: give one start frame per connected conditioning_<i>, e.g. "
                         f"{', '.join(str(48 * i) for i in range(count))!r}")
    if frames and frames[0] != 0:
        raise ValueError(f"keyframes must start at 0 (the first prompt applies from the stream's start), got {frames}")
    if any(b <= a for a, b in zip(frames, frames[1:])):
        raise ValueError(f"keyframes must be strictly increasing, got {frames}")
    return frames


def build_conditioning_schedule(
    conditionings: list[Any | None], keyframes: str, transition: int = 0, negative: Any | None = None
) -> PromptsSpec:
    """``conditionings[i]`` is ``conditioning_<i+1>`` (``None`` = not connected)."""
    last = max((i for i, c in enumerate(conditionings) if c is not None), default=-1)
    if last < 0:
        raise ValueError("conditioning_1 is not connected: connect a text encoder's CONDITIONING")
    gaps = [f"conditioning_{i + 1}" for i in range(last) if conditionings[i] is None]
    if gaps:
        raise ValueError(f"{', '.join(gaps)} not connected but conditioning_{last + 1} is: connect the inputs in "
                         "order, one per keyframe")
    if int(transition) < 0:
        raise ValueError(f"transition must be >= 0 frames, got {transition}")
    frames = parse_keyframes(keyframes, last + 1)
    embeddings = {f"conditioning_{i + 1}": conditioning_tensor(c, f"conditioning_{i + 1}")
                  for i, c in enumerate(conditionings[: last + 1])}
    neg = None if negative is None else conditioning_tensor(negative, "negative")
    prompts = core("prompts")
    schedule = prompts.PromptSchedule(
        keyframes=tuple((f, f"conditioning_{i + 1}") for i, f in enumerate(frames)), transition=int(transition)
    )
    try:
        conditioned = prompts.ConditionedSchedule(schedule, embeddings, neg)
    except ValueError as exc:
        raise ValueError(f"StreamDiT Conditioning Schedule: {exc}") from exc
    text = ", ".join(f"{f}: conditioning_{i + 1}" for i, f in enumerate(frames))
    return PromptsSpec(text=text, transition=int(transition), schedule=conditioned)


class StreamDiTConditioningSchedule:
    """A prompt schedule made of CONDITIONING from ComfyUI's text encoders (umT5 for Wan 2.1)."""

    DESCRIPTION = (
        "A prompt schedule from ComfyUI's own text encoders: connect CLIPTextEncode outputs (CLIPLoader type "
        "'wan' with umt5_xxl for Wan 2.1) to conditioning_1, conditioning_2, … in order and give each one's start "
        "frame in 'keyframes' (e.g. '0, 48'). Each chunk in the buffer is conditioned on the prompt scheduled for "
        "its own frames, blended over 'transition' frames. Edit it while the stream plays: the change applies to "
        "the chunks entering the buffer. For Wan models a stream frame is a latent frame (4 video frames)."
    )
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = (PROMPTS,)
    RETURN_NAMES = ("prompts",)
    OUTPUT_TOOLTIPS = ("The schedule with its embeddings, for the StreamDiT Sampler's 'prompts' input.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        optional: dict[str, Any] = {
            f"conditioning_{i}": (CONDITIONING, {"tooltip": f"The prompt that starts at keyframe {i}."})
            for i in range(2, SLOTS + 1)
        }
        optional["negative"] = (
            CONDITIONING,
            {"tooltip": "What guidance steers away from (used when guidance > 1; required then for models "
             "without their own text encoder, e.g. Wan)."},
        )
        return {
            "required": {
                "conditioning_1": (CONDITIONING, {"tooltip": "The first prompt (from frame 0), e.g. CLIPTextEncode."}),
                "keyframes": (
                    "STRING",
                    {"default": "0", "multiline": False, "tooltip": "Start frame of each connected "
                     "conditioning_<i>, in order, comma-separated, starting at 0 (e.g. '0, 48, 96'). Frames count "
                     "the stream's frames (latent frames for Wan: 4 video frames each)."},
                ),
                "transition": (
                    "INT",
                    {"default": 0, "min": 0, "max": 10000, "tooltip": "Frames over which consecutive prompts are "
                     "blended (0 = hard switch)."},
                ),
            },
            "optional": optional,
        }

    def build(
        self,
        conditioning_1: Any,
        keyframes: str,
        transition: int,
        conditioning_2: Any | None = None,
        conditioning_3: Any | None = None,
        conditioning_4: Any | None = None,
        conditioning_5: Any | None = None,
        conditioning_6: Any | None = None,
        conditioning_7: Any | None = None,
        conditioning_8: Any | None = None,
        negative: Any | None = None,
    ) -> tuple[PromptsSpec]:
        slots = [conditioning_1, conditioning_2, conditioning_3, conditioning_4, conditioning_5, conditioning_6,
                 conditioning_7, conditioning_8]
        return (build_conditioning_schedule(slots, keyframes, transition, negative),)
