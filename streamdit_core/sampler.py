"""The moving-buffer sampler.

One model call per :meth:`StreamSampler.step`: every non-reference frame moves one step of ``1/T`` further
along its trajectory (Euler, ``x ← x + (σ_next − σ)·v``). After ``s`` calls the cleanest chunk has reached
σ = 0 and leaves the buffer, the chunks move one position towards the clean end, and ``c`` fresh frames
enter at the noisy end: pure noise for text-to-video, or the input video noised to ``σ = strength``.

Start-up:
* warm start (default, the paper's): generate one uniform text-to-video buffer and keep its intermediate
  latents; chunk position ``p`` is filled from the uniform step ``(N − 1 − p)·s``, so the first chunk
  leaves after ``T`` model calls in all and is a proper sample;
* cold start: every slot starts as pure noise; the ``N − 1`` chunks that never saw a full trajectory are
  discarded, so the first frame also leaves after ``T`` calls, but the early context is noise.

Video-to-video uses the same start-up with the uniform schedule starting at ``σ = strength`` from the
noised input; at ``strength = 1`` it is exactly text-to-video (same noise draws, same levels).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from .log import get_logger
from .prompts import AnySchedule, ConditionedSchedule, PromptSchedule, frame_weights, per_frame_context
from .schedule import Partition, frame_blocks, inference_sigmas, next_inference_sigmas, uniform_sigmas
from .stream import StreamState
from .v2v import StreamEnded, VideoSource, resize_frames

__all__ = ["StreamSettings", "StreamSampler", "StepCallback", "StreamEnded"]

if TYPE_CHECKING:
    from .pipeline import StreamPipeline

log = get_logger("sampler")

# callback(call_index, total_calls, preview) after each model call; preview = current estimate of the
# cleanest chunk as frames [c, 3, H, W] in [0, 1] (None where decoding is costly). Raise to abort.
StepCallback = Callable[[int, int, "torch.Tensor | None"], None]


@dataclass(frozen=True)
class StreamSettings:
    """How a stream runs.

    Attributes:
        partition: ``(K, N, c, s)``; ``partition.B`` must be a multiple of the model's temporal patch.
        shift: time shift ``k`` of the noise levels (1 = the paper's uniform levels).
        guidance: classifier-free guidance scale; 1 = off (one model call per step; distilled models).
        height, width: output frame size in pixels (multiples of the codec's and the patch's factor).
        window: self-attention window in tokens ``(frames, height, width)``; ``None`` = the model's default.
        warm_start: fill the buffer from a uniform T2V generation (else cold start from noise).
        negative_prompt: the unconditional prompt for guidance.
        model_frames: frames per model input (``None`` = the whole buffer). Smaller inputs narrow the noise
            spread each call sees — for base models trained with one noise level per clip (FIFO-Diffusion's
            latent partitioning); see :func:`~streamdit_core.schedule.frame_blocks`.
        lookahead: with ``model_frames``, FIFO-Diffusion's lookahead denoising (about twice the calls).
    """

    partition: Partition = field(default_factory=Partition)
    shift: float = 1.0
    guidance: float = 1.0
    height: int = 64
    width: int = 64
    window: tuple[int, int, int] | None = None
    warm_start: bool = True
    negative_prompt: str = ""
    model_frames: int | None = None
    lookahead: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.partition, Partition):
            raise ValueError(f"partition must be a Partition, got {self.partition!r}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not self.guidance >= 1.0:
            raise ValueError(f"guidance must be >= 1 (1 = off), got {self.guidance}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 8:
                raise ValueError(f"{name} must be an integer >= 8 pixels, got {value!r}")
        if self.model_frames is not None and (not isinstance(self.model_frames, int) or self.model_frames < 1):
            raise ValueError(f"model_frames must be an integer >= 1 or None, got {self.model_frames!r}")
        if self.lookahead and (self.model_frames is None or self.model_frames < 2 or self.model_frames % 2):
            raise ValueError(f"lookahead needs an even model_frames >= 2, got model_frames={self.model_frames}")
        if self.window is not None:
            if len(self.window) != 3 or any((not isinstance(w, int)) or w < 1 for w in self.window):
                raise ValueError(f"window must be three integers >= 1 (frames, height, width), got {self.window!r}")
            object.__setattr__(self, "window", tuple(self.window))

    def to_json(self) -> str:
        d = asdict(self)
        d["partition"] = [self.partition.K, self.partition.N, self.partition.c, self.partition.s]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StreamSettings:
        d = json.loads(text)
        K, N, c, s = d.pop("partition")
        if d.get("window") is not None:
            d["window"] = tuple(d["window"])
        return cls(partition=Partition(K=K, N=N, c=c, s=s), **d)


class StreamSampler:
    """Runs streams of one pipeline with one set of settings. Holds no stream state of its own."""

    def __init__(self, pipeline: StreamPipeline, settings: StreamSettings) -> None:  # noqa: F821
        self.pipeline = pipeline
        self.settings = settings
        pipeline.check_settings(settings)
        self._video_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # the last per-frame context and its slices: the same prompts give the same tensor object, so the
        # model's text key/value cache (keyed by tensor identity) hits on every call of a steady stream
        self._context_memo: tuple[object, torch.Tensor, dict[str, torch.Tensor]] | None = None
        self._slice_memo: dict[tuple[int, int, int], torch.Tensor] = {}

    def _context(
        self, schedule: PromptSchedule, indices: list[int], embeddings: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """:func:`per_frame_context`, reusing the previous tensor when every frame's prompt mix is unchanged."""
        key = (
            tuple(tuple(frame_weights(schedule, max(i, 0)).items()) for i in indices),
            tuple((p, id(e)) for p, e in embeddings.items()),
        )
        memo = self._context_memo
        if memo is not None and memo[0] == key:
            return memo[1]
        context = per_frame_context(schedule, indices, embeddings)
        self._context_memo, self._slice_memo = (key, context, embeddings), {}
        return context

    def _uncond(self, negative: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The negative prompt's embedding expanded to ``context``'s shape (one tensor per context)."""
        key = (id(context), -1, id(negative))
        if key not in self._slice_memo:
            self._slice_memo[key] = negative[None, None].expand_as(context)
        return self._slice_memo[key]

    def _slice(self, context: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
        key = (id(context), i0, i1)
        if key not in self._slice_memo:
            self._slice_memo[key] = context[:, i0:i1]
        return self._slice_memo[key]


    # -- levels -------------------------------------------------------------------------------------------

    def levels(self, micro_step: int, strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """σ of every buffer frame before and after the call at ``micro_step`` (float64 ``[B]`` each)."""
        p, k = self.settings.partition, self.settings.shift
        return inference_sigmas(p, micro_step, k) * strength, next_inference_sigmas(p, micro_step, k) * strength

    def _frame_indices(self, first_index: int) -> list[int]:
        """Output-frame index of every buffer slot (reference frames get the indices before ``first_index``)."""
        K, B = self.settings.partition.K, self.settings.partition.B
        return [first_index - K + j for j in range(B)]

    def _latent_shape(self, frames: int) -> tuple[int, int, int, int, int]:
        codec = self.pipeline.codec
        f = self.settings
        return (1, codec.latent_channels, frames, f.height // codec.spatial_factor, f.width // codec.spatial_factor)

    def _video_latents(self, video: VideoSource, indices: list[int]) -> torch.Tensor:
        """Encoded input frames for output indices, ``[1, C, len(indices), h, w]`` (input encoded once)."""
        key = (id(video.frames), id(video.encoder))
        if key not in self._video_cache or self._video_cache[key][0] is not video.frames:
            frames = resize_frames(video.frames, self.settings.height, self.settings.width)
            if video.encoder is not None:  # an external VAE: raw latents → the model's space
                encoded = video.encoder(frames).float()
                normalise = getattr(self.pipeline.codec, "normalise", None)
                if normalise is not None:
                    encoded = normalise(encoded)
            else:
                encoded = self.pipeline.encode_frames(frames)
            encoded = encoded.float().to(self.pipeline.device)
            want = self._latent_shape(video.num_frames)
            if tuple(encoded.shape) != want:
                raise ValueError(f"the encoded input video is {list(encoded.shape)}, the stream needs {list(want)} "
                                 "(latent channels, frames and size must match the model)")
            self._video_cache = {key: (video.frames, encoded)}
        latents = self._video_cache[key][1]
        return latents[:, :, video.source_indices(indices)]

    def _entering(self, indices: list[int], generator: torch.Generator, video: VideoSource | None) -> torch.Tensor:
        """Fresh frames at the noisy end: noise, or input noised to σ = strength. ``[1, C, c, h, w]``."""
        device = self.pipeline.device
        noise = torch.randn(self._latent_shape(len(indices)), generator=generator, dtype=torch.float32).to(device)
        if video is None:
            return noise
        x = self._video_latents(video, indices).to(device)
        return (1.0 - video.strength) * x + video.strength * noise

    def _velocity(
        self, latents: torch.Tensor, sigmas: torch.Tensor, indices: list[int], schedule: AnySchedule
    ) -> torch.Tensor:
        negative = None
        if isinstance(schedule, ConditionedSchedule):  # embeddings made outside the pipeline
            embeddings = dict(schedule.embeddings)
            negative = schedule.negative
            schedule = schedule.schedule
        else:
            embeddings = self.pipeline.encode_prompts(list(schedule.prompts))
        context = self._context(schedule, indices, embeddings)
        uncond = None
        if self.settings.guidance != 1.0:
            if negative is None:
                negative = self.pipeline.encode_prompts([self.settings.negative_prompt])[self.settings.negative_prompt]
            uncond = self._uncond(negative.to(context.device), context)
        blocks = frame_blocks(latents.shape[2], self.settings.model_frames, self.settings.lookahead)
        if len(blocks) == 1:
            return self.pipeline.velocity(
                latents, sigmas, context, self.settings.window, self.settings.guidance, uncond
            )
        v = torch.empty_like(latents, dtype=torch.float32)
        for i0, i1, w0, w1 in blocks:  # several model calls over parts of the buffer (base-model schedules)
            part = self.pipeline.velocity(
                latents[:, :, i0:i1],
                sigmas[i0:i1],
                self._slice(context, i0, i1),
                self.settings.window,
                self.settings.guidance,
                None if uncond is None else self._slice(uncond, i0, i1),
            )
            v[:, :, w0:w1] = part[:, :, w0 - i0 : w1 - i0].to(v.device)
        return v

    # -- start-up -----------------------------------------------------------------------------------------

    def init_state(
        self,
        seed: int,
        schedule: AnySchedule,
        video: VideoSource | None = None,
        callback: StepCallback | None = None,
    ) -> StreamState:
        """A new stream: warm start (uniform T2V, the paper's) or cold start, per ``settings.warm_start``."""
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        strength = video.strength if video is not None else 1.0
        end_index = video.end_index if video is not None else -1
        if not self.settings.warm_start:
            return self._cold_state(seed, video, generator, strength, end_index)
        return self._warm_state(seed, schedule, video, generator, strength, end_index, callback)

    def _cold_state(
        self, seed: int, video: VideoSource | None, generator: torch.Generator, strength: float, end_index: int
    ) -> StreamState:
        """Cold start. Text-to-video: pure noise in every slot; the ``N − 1`` chunks that did not start from
        σ = 1 are flushed (``first_index < 0``). Video-to-video: each slot is its input frame noised to the
        slot's level (the paper's V2V fill), all valid from the start."""
        p = self.settings.partition
        sigmas = self.levels(0, strength)[0]
        if video is None:
            first = -(p.N - 1) * p.c
            latents = self._entering(self._frame_indices(first), generator, None)
        else:
            first = 0
            x = self._video_latents(video, self._frame_indices(first)).to(self.pipeline.device)
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
            level = sigmas.float().view(1, 1, -1, 1, 1).to(x.device)
            latents = (1.0 - level) * x + level * noise
        return StreamState(latents, sigmas, 0, first, end_index, generator.get_state(), seed, 0, p)

    def _warm_state(
        self,
        seed: int,
        schedule: AnySchedule,
        video: VideoSource | None,
        generator: torch.Generator,
        strength: float,
        end_index: int,
        callback: StepCallback | None,
    ) -> StreamState:
        p = self.settings.partition
        indices = self._frame_indices(0)  # reference frames are context before output frame 0
        x = self._entering(indices, generator, video)  # [1, C, B, h, w] at σ = strength
        levels = uniform_sigmas(p.T, self.settings.shift) * strength
        wanted = {(p.N - 1 - pos) * p.s: pos for pos in range(p.N)}
        last = p.T if p.K > 0 else max(wanted)
        cached: dict[int, torch.Tensor] = {}
        calls = 0
        for j in range(last + 1):
            if j in wanted:
                cached[j] = x
            if j == last:
                break
            sig = levels[j].expand(p.B)
            v = self._velocity(x, sig, indices, schedule)
            x = x + float(levels[j + 1] - levels[j]) * v
            calls += 1
            if callback is not None:
                callback(calls, last, None)
        chunks = [cached[(p.N - 1 - pos) * p.s][:, :, p.K + pos * p.c : p.K + (pos + 1) * p.c] for pos in range(p.N)]
        refs = [x[:, :, : p.K]] if p.K else []
        latents = torch.cat(refs + chunks, dim=2)
        sigmas = self.levels(0, strength)[0]
        return StreamState(latents.contiguous(), sigmas, 0, 0, end_index, generator.get_state(), seed, calls, p)

    # -- stepping -----------------------------------------------------------------------------------------

    def step(
        self, state: StreamState, schedule: AnySchedule, video: VideoSource | None = None
    ) -> tuple[StreamState, torch.Tensor | None]:
        """One model call. Returns the new state and the emitted chunk's latents ``[1, C, c, h, w]`` when a
        chunk left the buffer on this call (``None`` otherwise). ``state`` is not modified."""
        p = self.settings.partition
        if state.partition != p:
            raise ValueError(
                f"stream was started with partition {state.partition.describe()}, settings have {p.describe()}"
            )
        strength = video.strength if video is not None else 1.0
        sigma, sigma_next = self.levels(state.micro_step, strength)
        indices = self._frame_indices(state.first_index)
        current = state.latents.to(self.pipeline.device)
        v = self._velocity(current, sigma, indices, schedule)
        dt = (sigma_next - sigma).float().view(1, 1, -1, 1, 1).to(current.device)
        latents = current + dt * v  # reference frames have dt = 0
        micro = state.micro_step + 1
        if micro < p.s:
            return state.evolve(latents=latents, sigmas=sigma_next, micro_step=micro, calls=state.calls + 1), None
        # the cleanest chunk reached σ = 0: emit it, move every chunk one position, let c frames enter
        emitted = latents[:, :, p.K : p.K + p.c]
        refs = torch.cat([latents[:, :, : p.K], emitted], dim=2)[:, :, p.c :] if p.K else latents[:, :, :0]
        generator = state.generator()
        entering_indices = [state.first_index + p.N * p.c + j for j in range(p.c)]
        fresh = self._entering(entering_indices, generator, video)
        latents = torch.cat([refs, latents[:, :, p.K + p.c :], fresh], dim=2)
        new_state = state.evolve(
            latents=latents.contiguous(),
            sigmas=self.levels(0, strength)[0],
            micro_step=0,
            first_index=state.first_index + p.c,
            generator_state=generator.get_state(),
            calls=state.calls + 1,
        )
        return new_state, emitted

    def advance(
        self,
        state: StreamState,
        schedule: AnySchedule,
        chunks: int = 1,
        video: VideoSource | None = None,
        callback: StepCallback | None = None,
    ) -> tuple[StreamState, torch.Tensor]:
        """Run until ``chunks`` chunks of valid output frames have been emitted (a cold start first flushes
        its partial chunks; a stopping video ends early).

        Returns:
            the new state and the new frames ``[F, 3, H, W]`` in [0, 1] (``F = chunks·c`` unless the
            video ended). ``state`` is not modified, so an exception leaves the caller's stream unchanged.
        Raises:
            StreamEnded: the stream's input video has been used up (``on_end='stop'``).
        """
        state, latents = self.advance_latents(state, schedule, chunks, video, callback)
        return state, self.pipeline.decode(latents)

    def advance_latents(
        self,
        state: StreamState,
        schedule: AnySchedule,
        chunks: int = 1,
        video: VideoSource | None = None,
        callback: StepCallback | None = None,
    ) -> tuple[StreamState, torch.Tensor]:
        """:meth:`advance` without decoding: the emitted latents ``[1, C, F, h, w]`` (float32, on the device)."""
        if not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be an integer >= 1, got {chunks!r}")
        if state.ended:
            raise StreamEnded(f"the input video ended at frame {state.end_index}; reset the stream to start again")
        p = self.settings.partition
        flush = max(0, -state.first_index) // p.c
        total = ((chunks + flush) * p.s) - state.micro_step
        out: list[torch.Tensor] = []
        call = 0
        while len(out) < chunks:
            first = state.first_index
            state, emitted = self.step(state, schedule, video)
            call += 1
            if callback is not None:
                preview = None
                if self.pipeline.cheap_decode:
                    preview = self.pipeline.decode(
                        emitted if emitted is not None else state.latents[:, :, p.K : p.K + p.c]
                    )
                callback(call, total, preview)
            if emitted is None or first < 0:
                continue
            out.append(emitted)
            if state.end_index >= 0 and state.first_index >= state.end_index:
                break
        latents = torch.cat(out, dim=2)
        first_emitted = state.first_index - len(out) * p.c
        if state.end_index >= 0:
            latents = latents[:, :, : max(0, state.end_index - first_emitted)]
        return state, latents
