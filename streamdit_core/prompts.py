"""Prompt schedules: which prompt conditions which output frame.

Two text forms are accepted (see ``docs/PROMPTS.md``):

* FizzNodes style — comma-separated ``"frame": "prompt"`` pairs, optionally on several lines::

      "0": "a red circle moving left on a black background",
      "48": "a blue square moving left on a black background"

* one keyframe per line — ``frame: prompt`` (lines starting with ``#`` are comments)::

      0: a red circle moving left on a black background
      48: a blue square moving left on a black background

Text with no keyframe at all is one prompt for every frame. Frame indices count output frames of the
stream from 0. With ``transition = L > 0`` the frames ``k … k+L−1`` after keyframe ``k`` blend the
previous prompt's embedding into the new one linearly (weight of the new prompt ``(j+1)/(L+1)`` at frame
``k+j``). Frames before the first keyframe use the first prompt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "ScheduleError",
    "PromptSchedule",
    "ConditionedSchedule",
    "AnySchedule",
    "parse_schedule",
    "frame_weights",
    "per_frame_context",
    "pad_tokens",
]


class ScheduleError(ValueError):
    """A malformed schedule; the message names the line and column."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"prompt schedule line {line}, column {column}: {message}")
        self.line, self.column = line, column


@dataclass(frozen=True)
class PromptSchedule:
    """Keyframes ``((frame, prompt), …)`` sorted by frame, frames unique, first frame 0 after normalising.

    Attributes:
        keyframes: sorted ``(frame, prompt)`` pairs.
        transition: frames over which a new prompt is blended in (0 = hard switch).
    """

    keyframes: tuple[tuple[int, str], ...]
    transition: int = 0

    def __post_init__(self) -> None:
        if not self.keyframes:
            raise ValueError("a prompt schedule needs at least one prompt")
        frames = [f for f, _ in self.keyframes]
        if any(f < 0 for f in frames):
            raise ValueError(f"keyframe indices must be >= 0, got {frames}")
        if frames != sorted(set(frames)):
            raise ValueError(f"keyframe indices must be strictly increasing, got {frames}")
        if self.transition < 0:
            raise ValueError(f"transition must be >= 0 frames, got {self.transition}")

    @classmethod
    def single(cls, prompt: str) -> PromptSchedule:
        return cls(((0, prompt),))

    @property
    def prompts(self) -> tuple[str, ...]:
        """Distinct prompts in order of first appearance."""
        return tuple(dict.fromkeys(p for _, p in self.keyframes))

    def weights(self, frame: int) -> dict[str, float]:
        """The prompt mixture for one output frame: ``{prompt: weight}`` summing to 1."""
        return frame_weights(self, frame)

    def to_text(self) -> str:
        """The per-line form; ``parse_schedule(to_text())`` gives the same keyframes."""
        return "\n".join(f"{f}: {p}" for f, p in self.keyframes)


def frame_weights(schedule: PromptSchedule, frame: int) -> dict[str, float]:
    """Pure function behind :meth:`PromptSchedule.weights`."""
    keys = schedule.keyframes
    index = 0
    for i, (start, _) in enumerate(keys):
        if start <= frame:
            index = i
    start, prompt = keys[index]
    L = schedule.transition
    if index == 0 or L == 0 or frame >= start + L:
        return {prompt: 1.0}
    alpha = (frame - start + 1) / (L + 1)
    previous = keys[index - 1][1]
    if previous == prompt:
        return {prompt: 1.0}
    return {previous: 1.0 - alpha, prompt: alpha}


_FIZZ_PAIR = re.compile(r'\s*"(?P<frame>[^"]*)"\s*:\s*"(?P<prompt>(?:[^"\\]|\\.)*)"\s*(?P<sep>,?)')
_LINE = re.compile(r"^(?P<frame>[^:]*):(?P<prompt>.*)$")


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, column


def _frame_number(raw: str, text: str, offset: int) -> int:
    value = raw.strip()
    if not re.fullmatch(r"\d+", value):
        raise ScheduleError(f"frame index must be a whole number >= 0, got {value!r}", *_position(text, offset))
    return int(value)


def _parse_fizz(text: str) -> list[tuple[int, str, int]]:
    out, pos = [], 0
    body = text.strip().removeprefix("{").removesuffix("}") if text.strip().startswith("{") else text
    base = text.find(body) if body is not text else 0
    while pos < len(body):
        if not body[pos:].strip():
            break
        match = _FIZZ_PAIR.match(body, pos)
        if not match:
            skip = len(body[pos:]) - len(body[pos:].lstrip())
            raise ScheduleError('expected "frame": "prompt"', *_position(text, base + pos + skip))
        frame = _frame_number(match["frame"], text, base + match.start("frame"))
        prompt = bytes(match["prompt"], "utf-8").decode("unicode_escape").strip()
        out.append((frame, prompt, base + match.start("frame")))
        pos = match.end()
        if not match["sep"] and body[pos:].strip():
            raise ScheduleError("expected ',' between keyframes", *_position(text, base + pos))
    return out


def _parse_lines(text: str) -> list[tuple[int, str, int]]:
    out, offset = [], 0
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            match = _LINE.match(line.rstrip("\r\n"))
            if not match:
                raise ScheduleError("expected 'frame: prompt'", *_position(text, offset + line.find(stripped)))
            frame = _frame_number(match["frame"], text, offset)
            out.append((frame, match["prompt"].strip(), offset))
        offset += len(line)
    return out


def parse_schedule(text: str, transition: int = 0) -> PromptSchedule:
    """Parse a schedule in either form (or a plain prompt). Errors name the line and column.

    Raises:
        ScheduleError: malformed text, an empty prompt, or a frame index given twice.
    """
    if not isinstance(text, str) or not text.strip():
        raise ScheduleError("the schedule is empty; write a prompt or 'frame: prompt' lines", 1, 1)
    stripped = text.strip()
    if stripped.startswith('"') or stripped.startswith("{"):
        entries = _parse_fizz(text)
    elif any(_LINE.match(l) and re.fullmatch(r"\s*\d+\s*", l.split(":", 1)[0]) for l in text.splitlines()):
        entries = _parse_lines(text)
    else:
        entries = [(0, " ".join(stripped.split()), 0)]
    seen: dict[int, int] = {}
    for frame, prompt, offset in entries:
        if not prompt:
            raise ScheduleError(f"the prompt for frame {frame} is empty", *_position(text, offset))
        if frame in seen:
            raise ScheduleError(f"frame {frame} is given twice", *_position(text, offset))
        seen[frame] = offset
    keyframes = tuple(sorted((f, p) for f, p, _ in entries))
    return PromptSchedule(keyframes=keyframes, transition=transition)


def per_frame_context(
    schedule: PromptSchedule, frame_indices: list[int], embeddings: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Blend cached prompt embeddings for each frame.

    Args:
        frame_indices: output-frame index of each buffer frame (negative indices use the first prompt).
        embeddings: ``{prompt: [text_len, text_dim]}`` for every prompt of the schedule.
    Returns:
        ``[1, len(frame_indices), text_len, text_dim]``.
    """
    rows = []
    for index in frame_indices:
        mix = frame_weights(schedule, max(index, 0))
        items = list(mix.items())
        row = items[0][1] * embeddings[items[0][0]]
        for p, w in items[1:]:
            row = row + w * embeddings[p]
        rows.append(row)
    return torch.stack(rows).unsqueeze(0)


def pad_tokens(embedding: torch.Tensor, length: int) -> torch.Tensor:
    """``[L, D]`` → ``[length, D]`` with zero rows appended (``length >= L``). Zero rows are what umT5-style
    encoders put at padded positions, so padding does not change a prompt's meaning."""
    if embedding.shape[0] > length:
        raise ValueError(f"cannot pad {embedding.shape[0]} tokens to {length}")
    if embedding.shape[0] == length:
        return embedding
    pad = embedding.new_zeros(length - embedding.shape[0], embedding.shape[1])
    return torch.cat([embedding, pad])


@dataclass(frozen=True, eq=False)
class ConditionedSchedule:
    """A prompt schedule whose prompts come as embeddings made outside the pipeline (e.g. ComfyUI
    ``CONDITIONING`` from the user's umT5). The sampler uses ``embeddings`` instead of encoding text, frame by
    frame exactly as for a text schedule (:func:`per_frame_context`, blends included).

    Attributes:
        schedule: keyframes whose "prompts" are keys into ``embeddings``.
        embeddings: ``{key: [L, D]}`` float tensors for every prompt of ``schedule``; different token counts are
            zero-padded to the longest (also ``negative``).
        negative: ``[L, D]``, what guidance steers away from; ``None`` = the model's own negative prompt.
    """

    schedule: PromptSchedule
    embeddings: Mapping[str, torch.Tensor]
    negative: torch.Tensor | None = None

    def __post_init__(self) -> None:
        missing = [p for p in self.schedule.prompts if p not in self.embeddings]
        if missing:
            raise ValueError(f"no embeddings for the scheduled prompts {missing}")
        tensors = {k: self.embeddings[k] for k in self.schedule.prompts}
        everything = list(tensors.values()) + ([self.negative] if self.negative is not None else [])
        for name, t in [*tensors.items(), *([("negative", self.negative)] if self.negative is not None else [])]:
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < 1:
                raise ValueError(f"embedding {name!r} must be a [tokens, width] tensor, got {_shape(t)}")
        widths = {int(t.shape[1]) for t in everything}
        if len(widths) != 1:
            raise ValueError(f"embeddings have different widths {sorted(widths)}; use one text encoder")
        length = max(int(t.shape[0]) for t in everything)
        object.__setattr__(self, "embeddings", {k: pad_tokens(v.float(), length) for k, v in tensors.items()})
        if self.negative is not None:
            object.__setattr__(self, "negative", pad_tokens(self.negative.float(), length))

    @property
    def width(self) -> int:
        """The embedding width ``D`` (the model's ``text_dim`` must equal it)."""
        return int(next(iter(self.embeddings.values())).shape[1])

    @property
    def prompts(self) -> tuple[str, ...]:
        return self.schedule.prompts


def _shape(t: object) -> object:
    return list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


AnySchedule = PromptSchedule | ConditionedSchedule
"""What the sampler accepts: text prompts (encoded by the pipeline) or ready embeddings."""
