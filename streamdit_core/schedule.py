"""Schedule maths for the moving buffer: small pure functions, no state.

Conventions (DESIGN.md §3, binding everywhere in this package):

* Noise level ``σ ∈ [0, 1]``; ``σ = 1`` is pure noise. Noising: ``x_σ = (1 − σ)·x + σ·ε``. The model predicts
  the velocity ``v = ε − x``; an Euler step is ``x ← x + (σ_next − σ)·v``.
* Buffer orientation: index 0 of the frame axis is the oldest, cleanest frame (the next to be emitted); the
  last index is the newest, noisiest frame.
* Partition ``(K, N, c, s)``: ``K`` clean reference frames at the clean end, ``N`` chunks of ``c`` frames,
  ``s`` micro-steps per chunk position. ``B = K + N·c`` frames, ``T = s·N`` model calls in a frame's life.
* Inference level of chunk position ``p`` (0 = cleanest chunk) at micro-step ``m``:
  ``u = ((N − 1 − p)·s + m) / T`` and ``σ = shift(1 − u)``. Reference frames sit at ``σ = 0``.
* Training level of chunk ``i`` counted from the noisy end: ``u ~ U[i/N, (i+1)/N)``, ``σ = shift(1 − u)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Partition",
    "time_shift",
    "chunk_progress",
    "inference_sigmas",
    "next_inference_sigmas",
    "uniform_sigmas",
    "training_sigmas",
    "default_chunk_sizes",
    "sample_chunk_size",
    "warm_start_steps",
    "frame_blocks",
]


@dataclass(frozen=True)
class Partition:
    """A partition scheme of the buffer.

    Attributes:
        K: clean reference frames kept at the clean end (attended to, never updated).
        N: number of chunks in flight.
        c: frames per chunk (the number of frames emitted at once).
        s: micro-steps a chunk spends at each chunk position.
    """

    K: int = 0
    N: int = 8
    c: int = 2
    s: int = 1

    def __post_init__(self) -> None:
        for name in ("K", "N", "c", "s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"Partition {name} must be an integer, got {value!r}")
        if self.K < 0:
            raise ValueError(f"Partition K (reference frames) must be >= 0, got K={self.K}")
        if self.N < 1:
            raise ValueError(f"Partition N (chunks) must be >= 1, got N={self.N}")
        if self.c < 1:
            raise ValueError(f"Partition c (chunk size) must be >= 1, got c={self.c}")
        if self.s < 1:
            raise ValueError(f"Partition s (micro-steps) must be >= 1, got s={self.s}")

    @property
    def B(self) -> int:
        """Frames in the buffer: ``K + N·c``."""
        return self.K + self.N * self.c

    @property
    def T(self) -> int:
        """Model calls in the life of one frame: ``s·N``."""
        return self.s * self.N

    @classmethod
    def from_buffer(cls, B: int, c: int, s: int = 1, K: int = 0) -> Partition:
        """Build a partition from the buffer length ``B`` and chunk size ``c``; ``B − K`` must divide by ``c``."""
        if B - K < 1 or (B - K) % c != 0:
            raise ValueError(
                f"buffer B={B} minus reference frames K={K} must be a positive multiple of chunk size c={c}"
            )
        return cls(K=K, N=(B - K) // c, c=c, s=s)

    def describe(self) -> str:
        return f"K={self.K} N={self.N} c={self.c} s={self.s} (B={self.B}, T={self.T})"


def time_shift(sigma: torch.Tensor | float, k: float) -> torch.Tensor:
    """The time shift ``σ' = k·σ / (1 + (k − 1)·σ)``; ``k = 1`` is the identity, ``k > 1`` spends more steps at
    high noise. Maps 0 → 0 and 1 → 1 and is monotone for ``k > 0``."""
    if not k > 0:
        raise ValueError(f"shift must be > 0, got {k}")
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return k * s / (1.0 + (k - 1.0) * s)


def chunk_progress(partition: Partition, micro_step: int) -> torch.Tensor:
    """Progress ``u ∈ [0, 1)`` of each chunk position ``p = 0 … N−1`` (0 = cleanest) at ``micro_step``.

    Returns: float64 tensor ``[N]``, decreasing along p (the clean end is furthest along).
    """
    if not 0 <= micro_step < partition.s:
        raise ValueError(f"micro_step must be in [0, s={partition.s}), got {micro_step}")
    p = torch.arange(partition.N, dtype=torch.float64)
    return ((partition.N - 1 - p) * partition.s + micro_step) / partition.T


def _frames_from_chunks(partition: Partition, chunk_sigma: torch.Tensor) -> torch.Tensor:
    """Expand per-chunk σ ``[N]`` to per-frame σ ``[B]`` with σ = 0 for the K reference frames."""
    refs = torch.zeros(partition.K, dtype=chunk_sigma.dtype)
    return torch.cat([refs, chunk_sigma.repeat_interleave(partition.c)])


def inference_sigmas(partition: Partition, micro_step: int, shift: float = 1.0) -> torch.Tensor:
    """σ of every buffer frame at ``micro_step``: float64 ``[B]``, non-decreasing from index 0 to B−1."""
    u = chunk_progress(partition, micro_step)
    return _frames_from_chunks(partition, time_shift(1.0 - u, shift))


def next_inference_sigmas(partition: Partition, micro_step: int, shift: float = 1.0) -> torch.Tensor:
    """σ each frame reaches after the model call at ``micro_step`` (one step of ``1/T`` further along).

    The cleanest chunk reaches σ = 0 after the call at ``micro_step = s − 1`` and is then emitted.
    Returns float64 ``[B]``; reference frames stay at 0.
    """
    u = chunk_progress(partition, micro_step) + 1.0 / partition.T
    return _frames_from_chunks(partition, time_shift((1.0 - u).clamp(min=0.0), shift))


def uniform_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """The uniform (T2V) schedule: ``steps + 1`` levels from σ = 1 down to σ = 0 (float64)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return time_shift(1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps, shift)


def training_sigmas(
    partition: Partition, generator: torch.Generator, shift: float = 1.0, batch: int = 1
) -> torch.Tensor:
    """Training σ per frame: chunk i from the noisy end draws ``u ~ U[i/N, (i+1)/N)``; σ = shift(1 − u).

    Returns float32 ``[batch, B]``, reference frames at 0, non-decreasing along the buffer.
    """
    N = partition.N
    i_from_noisy = torch.arange(N, dtype=torch.float64)
    jitter = torch.rand(batch, N, generator=generator, dtype=torch.float64)
    u = (i_from_noisy + jitter) / N  # [batch, N], chunk i counted from the noisy end
    sigma_from_noisy = time_shift(1.0 - u, shift)
    sigma_from_clean = sigma_from_noisy.flip(-1)  # [batch, N], index 0 = cleanest chunk
    frames = sigma_from_clean.repeat_interleave(partition.c, dim=-1)
    refs = torch.zeros(batch, partition.K, dtype=torch.float64)
    return torch.cat([refs, frames], dim=-1).float()


def default_chunk_sizes(frames: int) -> tuple[int, ...]:
    """The paper's mix ``{1, 2, 4, …, B}``: powers of two that divide ``frames``, plus ``frames`` itself."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    sizes = [c for c in (2**i for i in range(frames.bit_length())) if frames % c == 0]
    if frames not in sizes:
        sizes.append(frames)
    return tuple(sizes)


def sample_chunk_size(frames: int, chunk_sizes: Sequence[int], t2v_share: float, generator: torch.Generator) -> int:
    """Draw a training chunk size: the full buffer (T2V) with probability ``t2v_share``, otherwise uniformly
    among the other sizes in ``chunk_sizes``. ``frames`` is the number of non-reference frames."""
    if not 0.0 <= t2v_share <= 1.0:
        raise ValueError(f"t2v_share must be in [0, 1], got {t2v_share}")
    bad = [c for c in chunk_sizes if c < 1 or frames % c != 0]
    if not chunk_sizes or bad:
        raise ValueError(f"chunk_sizes must be non-empty divisors of {frames}, got {list(chunk_sizes)}")
    others = sorted({c for c in chunk_sizes if c != frames})
    draw = torch.rand((), generator=generator, dtype=torch.float64).item()
    if not others or draw < t2v_share:
        return frames
    index = int(torch.randint(len(others), (), generator=generator).item())
    return others[index]


def warm_start_steps(partition: Partition) -> list[int]:
    """For the warm start: the uniform-schedule step index (of ``T`` steps) whose latent fills each chunk
    position ``p = 0 … N−1`` at micro-step 0, i.e. ``(N − 1 − p)·s``."""
    return [(partition.N - 1 - p) * partition.s for p in range(partition.N)]


def frame_blocks(frames: int, model_frames: int | None, lookahead: bool = False) -> list[tuple[int, int, int, int]]:
    """How one step's velocity is computed with several model calls over parts of the buffer (FIFO-Diffusion's
    latent partitioning and lookahead denoising, for base models trained with one noise level per clip).

    Returns ``(input_start, input_end, write_start, write_end)`` per model call, in frames of the buffer:
    * ``model_frames=None`` (or ``>= frames``): one call over the whole buffer.
    * partitioning: consecutive blocks of ``model_frames`` frames, each written back whole; the noise spread
      inside one model input shrinks by the number of blocks.
    * lookahead: calls over ``model_frames`` frames with a stride of half that; only the noisier half is
      written back, so every written frame (after the first half-block) sees ``model_frames/2`` cleaner frames
      before it in the same input. About twice the calls of partitioning.
    The write ranges cover ``[0, frames)`` exactly once, in order.
    """
    if model_frames is None or model_frames >= frames:
        return [(0, frames, 0, frames)]
    if model_frames < 1:
        raise ValueError(f"model_frames must be >= 1, got {model_frames}")
    if not lookahead:
        return [
            (a, min(a + model_frames, frames), a, min(a + model_frames, frames)) for a in range(0, frames, model_frames)
        ]
    if model_frames < 2 or model_frames % 2:
        raise ValueError(f"lookahead needs an even model_frames >= 2, got {model_frames}")
    half = model_frames // 2
    return [(max(0, a - half), min(a + half, frames), a, min(a + half, frames)) for a in range(0, frames, half)]


BASE_MODEL_MAX_SPREAD = 0.3
"""Above this :func:`noise_spread`, a base model (one noise level per training clip) is warned about: FIFO-Diffusion
runs base models at about 0.25 (4 partitions); StreamDiT's whole staircase in one input is ``1 − 1/N``."""


def noise_spread(
    partition: Partition, model_frames: int | None = None, lookahead: bool = False
) -> float:
    """The widest spread of denoising progress inside one model input, as a fraction of a frame's trajectory
    (0 = every frame of every input at the same level, 1 = pure noise next to clean frames), over every
    micro-step of the schedule. Measured on the unshifted levels (progress ``u``), so it does not depend on the
    time shift. Reference frames (clean) count as part of the inputs they are in.

    A base model trained with one noise level per clip needs this small: FIFO-Diffusion's 4 partitions give
    about 0.25; the whole StreamDiT staircase in one input is ``1 − 1/N``.
    """
    widest = 0.0
    for m in range(partition.s):
        levels = inference_sigmas(partition, m, 1.0)
        for i0, i1, _w0, _w1 in frame_blocks(partition.B, model_frames, lookahead):
            part = levels[i0:i1]
            widest = max(widest, float(part.max() - part.min()))
    return widest
