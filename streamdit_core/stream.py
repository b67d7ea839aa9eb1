"""The stream state: everything needed to continue a stream bit-exactly, and its file format.

A state is immutable: the sampler's ``step``/``advance`` return a new state and never modify the old one,
so a caller (e.g. a ComfyUI node) commits the new state only after a step succeeded.

Invariants (checked by :meth:`StreamState.validate`):

* ``latents`` is ``[1, C, B, h, w]`` float32 with ``B = K + N·c`` of ``partition``; ``sigmas`` is ``[B]``.
* Buffer slot ``K + j`` holds output frame ``first_index + j``; slots ``0 … K−1`` are reference frames.
  ``first_index`` is negative while a cold start is still flushing chunks that never saw a full trajectory.
* ``0 <= micro_step < s``; every model call advances ``micro_step``; a chunk leaves when it wraps to 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .schedule import Partition

__all__ = ["StreamState", "save_state", "load_state", "load_state_extras", "StateError"]

STATE_FORMAT = "streamdit-state-1"


class StateError(ValueError):
    """A state file or state dict that cannot be used."""


@dataclass(frozen=True)
class StreamState:
    """Attributes:
    latents: ``[1, C, B, h, w]`` float32 buffer (index 0 = oldest, cleanest).
    sigmas: ``[B]`` float64 noise level of each buffer frame.
    micro_step: micro-step within the current chunk position, ``0 … s−1``.
    first_index: output-frame index of buffer slot ``K``.
    end_index: first output-frame index past the end of a finite (video-driven) stream; −1 = endless.
    generator_state: the CPU ``torch.Generator`` state all future noise is drawn from.
    seed: the seed the stream started from.
    calls: model calls made so far (start-up included).
    partition: the partition the buffer is laid out for.
    """

    latents: torch.Tensor
    sigmas: torch.Tensor
    micro_step: int
    first_index: int
    end_index: int
    generator_state: torch.Tensor
    seed: int
    calls: int
    partition: Partition

    @property
    def frames_emitted(self) -> int:
        """Output frames emitted so far (= the output index of the next frame to be emitted)."""
        return max(self.first_index, 0)

    @property
    def ended(self) -> bool:
        return self.end_index >= 0 and self.first_index >= self.end_index

    def generator(self) -> torch.Generator:
        """A fresh CPU generator positioned where this state's randomness continues."""
        g = torch.Generator(device="cpu")
        g.set_state(self.generator_state.clone())
        return g

    def evolve(self, **changes: object) -> StreamState:
        return replace(self, **changes)  # type: ignore[arg-type]

    def validate(self) -> None:
        p = self.partition
        if self.latents.dim() != 5 or self.latents.shape[0] != 1 or self.latents.shape[2] != p.B:
            raise StateError(f"latents must be [1, C, B={p.B}, h, w], got {list(self.latents.shape)}")
        if tuple(self.sigmas.shape) != (p.B,):
            raise StateError(f"sigmas must be [B={p.B}], got {list(self.sigmas.shape)}")
        if not 0 <= self.micro_step < p.s:
            raise StateError(f"micro_step must be in [0, s={p.s}), got {self.micro_step}")

    # -- serialisation ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor | int | list[int]]:
        p = self.partition
        return {
            "latents": self.latents.detach().cpu().clone(),
            "sigmas": self.sigmas.detach().cpu().clone(),
            "generator_state": self.generator_state.clone(),
            "micro_step": self.micro_step,
            "first_index": self.first_index,
            "end_index": self.end_index,
            "seed": self.seed,
            "calls": self.calls,
            "partition": [p.K, p.N, p.c, p.s],
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> StreamState:
        try:
            K, N, c, s = (int(v) for v in d["partition"])
            state = cls(
                latents=torch.as_tensor(d["latents"]).float(),
                sigmas=torch.as_tensor(d["sigmas"]).double(),
                micro_step=int(d["micro_step"]),
                first_index=int(d["first_index"]),
                end_index=int(d["end_index"]),
                generator_state=torch.as_tensor(d["generator_state"]).to(torch.uint8),
                seed=int(d["seed"]),
                calls=int(d["calls"]),
                partition=Partition(K=K, N=N, c=c, s=s),
            )
        except KeyError as exc:
            raise StateError(f"stream state is missing {exc.args[0]!r}") from None
        state.validate()
        return state

    def load_state_dict(self, d: dict[str, object]) -> StreamState:
        """Return the state described by ``d`` (states are immutable; this does not modify ``self``)."""
        return StreamState.from_state_dict(d)


_INT_FIELDS = ("micro_step", "first_index", "end_index", "seed", "calls")


_EXTRA = "extra."


def save_state(
    state: StreamState,
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
    extras: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a state as safetensors (atomically: temp file, then rename). ``metadata`` is stored alongside
    (e.g. the settings and schedule as JSON) and returned by :func:`load_state`; ``extras`` are tensors that
    travel with the stream (e.g. a streaming decoder's cache), returned by :func:`load_state_extras`."""
    d = state.state_dict()
    tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
    for key, value in (extras or {}).items():
        tensors[_EXTRA + key] = value.detach().to("cpu")
    meta = {"streamdit.format": STATE_FORMAT}
    meta.update({f"state.{k}": str(d[k]) for k in _INT_FIELDS})
    meta["state.partition"] = json.dumps(d["partition"])
    meta.update(metadata or {})
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, p)
    return p


def load_state(path: str | os.PathLike[str]) -> tuple[StreamState, dict[str, str]]:
    """Read a state file written by :func:`save_state`; returns the state and the stored metadata."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"stream state file not found: {p}")
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if meta.get("streamdit.format") != STATE_FORMAT:
            raise StateError(f"{p} is not a StreamDiT stream state (format {meta.get('streamdit.format')!r})")
        d: dict[str, Any] = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(_EXTRA)}
    d.update({k: int(meta[f"state.{k}"]) for k in _INT_FIELDS})
    d["partition"] = json.loads(meta["state.partition"])
    return StreamState.from_state_dict(d), meta


def load_state_extras(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The ``extras`` tensors saved with a state by :func:`save_state` (``{}`` if there are none)."""
    with safe_open(str(path), framework="pt") as f:
        return {k[len(_EXTRA) :]: f.get_tensor(k) for k in f.keys() if k.startswith(_EXTRA)}
