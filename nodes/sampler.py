"""The stream sampler node: advances a persistent stream by whole chunks on every queue run."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import torch

from . import host
from ._core import core
from .common import (
    CATEGORY,
    LATENT,
    MODEL,
    PROMPTS,
    SETTINGS,
    STATE,
    STREAMS,
    VIDEO,
    ModelHandle,
    PromptsSpec,
    StateHandle,
    StreamOutput,
    VideoSpec,
    check_stream_id,
    frames_to_image,
    to_pil,
)

logger = logging.getLogger("StreamDiT.nodes")

MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF


def settings_json(settings: Any) -> str:
    """A stable text form of stream settings (stored in saved states, compared on resume)."""
    to_json = getattr(settings, "to_json", None)
    if callable(to_json):
        return str(to_json())
    try:
        data = dataclasses.asdict(settings)
    except TypeError:
        return repr(settings)
    return json.dumps(data, sort_keys=True, default=str)


def _check_resume_compatible(handle: StateHandle, settings: Any, model: ModelHandle) -> None:
    saved = handle.metadata.get("settings")
    if saved and saved != settings_json(settings):
        raise ValueError(
            f"initial_state from {handle.path} was saved with settings {saved}, but this sampler runs with "
            f"{settings_json(settings)}; connect StreamDiT Settings with the same values to resume it"
        )
    saved_model = handle.metadata.get("model")
    if saved_model and saved_model != model.name:
        logger.warning("resuming a state saved with model %r on model %r", saved_model, model.name)


def _check_prompts(model: ModelHandle, settings: Any, prompts: PromptsSpec) -> None:
    """Conditioning that the model cannot use is an error naming the input, before any model call."""
    pipeline = model.pipeline
    conditioned = isinstance(prompts.schedule, core("prompts").ConditionedSchedule)
    if conditioned:
        text_dim = int(pipeline.model.config.text_dim)
        if prompts.schedule.width != text_dim:
            raise ValueError(
                f"prompts: the conditioning is {prompts.schedule.width} wide but {model.name!r} expects {text_dim} "
                "(Wan 2.1: umT5-XXL, CLIPLoader type 'wan')"
            )
        if settings.guidance != 1.0 and prompts.schedule.negative is None and pipeline.text_encoder is None:
            raise ValueError(
                f"guidance {settings.guidance} needs a negative prompt: connect 'negative' on StreamDiT Conditioning "
                "Schedule (e.g. CLIPTextEncode of what to avoid), or set guidance to 1"
            )
    elif pipeline.text_encoder is None:
        raise ValueError(
            f"prompts: {model.name!r} has no text encoder of its own; build the schedule with StreamDiT Conditioning "
            "Schedule from CLIPTextEncode (CLIPLoader type 'wan' for Wan 2.1)"
        )


def _callback_factory(node_id: str | None) -> Any:
    progress: list[host.Progress] = []

    def callback(step: int, total: int, preview: torch.Tensor | None = None) -> None:
        # Called by the core after every model call: the place where Cancel takes effect. Raising here aborts
        # the step; the core's advance() is pure, so nothing has been committed.
        host.check_interrupt()
        if not progress:
            progress.append(host.Progress(total, node_id))
        image = None
        if isinstance(preview, torch.Tensor) and preview.ndim == 4 and preview.shape[0] > 0:
            image = to_pil(preview[-1])
        progress[0].update(step, image, total=total)

    return callback


def advance_stream(
    model: ModelHandle,
    settings: Any,
    prompts: PromptsSpec,
    stream_id: str,
    seed: int,
    chunks_per_run: int = 1,
    reset: bool = False,
    video: VideoSpec | None = None,
    initial_state: StateHandle | None = None,
    node_id: str | None = None,
) -> tuple[torch.Tensor, int, StreamOutput]:
    """Advance ``stream_id`` by ``chunks_per_run`` chunks and commit; see :class:`StreamDiTSampler`."""
    stream_id = check_stream_id(stream_id)
    if chunks_per_run < 1:
        raise ValueError(f"chunks_per_run must be >= 1, got {chunks_per_run}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    entry = STREAMS.entry(stream_id)
    with entry.lock:
        prompt_id = host.current_prompt_id()
        if prompt_id is not None and entry.last_prompt_id == prompt_id and entry.last_result is not None:
            # At most one advance per prompt (list inputs, or two samplers on one stream): same frames again.
            logger.debug("stream %s already advanced in prompt %s; returning that result", stream_id, prompt_id)
            return entry.last_result

        start: tuple[Any, ...] = ("state",) if initial_state is not None else ("seed", int(seed))
        config_key = (model.key, settings, start)
        sampler_key = (model.key, settings)
        sampler = entry.sampler
        if sampler is None or entry.sampler_key != sampler_key:
            sampler = core("sampler").StreamSampler(model.pipeline, settings)
        source = None if video is None else video.source()
        callback = _callback_factory(node_id)

        restart = reset or entry.state is None or entry.config_key != config_key
        _check_prompts(model, settings, prompts)
        host.check_interrupt()
        host.prepare_model(model.pipeline)
        if restart:
            why = (
                "reset requested"
                if reset
                else "new stream"
                if entry.state is None
                else "model, settings or seed changed"
            )
            if initial_state is not None:
                _check_resume_compatible(initial_state, settings, model)
                state = initial_state.state
                logger.info("stream %s: starting from %s at frame %d (%s)", stream_id, initial_state.path,
                            int(state.frames_emitted), why)
            else:
                state = sampler.init_state(int(seed), prompts.schedule, video=source, callback=callback)
                logger.info("stream %s: starting from seed %d (%s)", stream_id, int(seed), why)
        else:
            state = entry.state

        frame_index = int(state.frames_emitted)
        new_state, latents = sampler.advance_latents(
            state,
            prompts.schedule,
            chunks=int(chunks_per_run),
            video=source,
            callback=callback,
        )
        image = frames_to_image(model.pipeline.decode(latents))
        latents = latents.detach()
        output = StreamOutput(
            stream_id=stream_id,
            frame_index=frame_index,
            frame_count=int(image.shape[0]),
            latents=latents,
            state=new_state,
            settings=settings,
            model=model,
            restarted=restart,
            resume_decoder=initial_state.decoder_state if restart and initial_state is not None else None,
        )
        result = (image, frame_index, output)
        # Commit only now: an interrupt or error above leaves the stream exactly where it was.
        entry.state = new_state
        entry.config_key = config_key
        entry.sampler = sampler
        entry.sampler_key = sampler_key
        entry.last_prompt_id = prompt_id
        entry.last_result = result
        entry.runs += 1
    logger.debug("stream %s: frames %d..%d", stream_id, frame_index, frame_index + output.frame_count - 1)
    host.node_text(
        f"{stream_id}: frames {frame_index}-{frame_index + output.frame_count - 1}"
        + (" (restarted)" if restart else ""),
        node_id,
    )
    host.send_event(
        "streamdit.stream",
        {"stream_id": stream_id, "frame_index": frame_index, "frames": output.frame_count, "restarted": restart},
    )
    return result


class StreamDiTSampler:
    """Advances a stream by whole chunks each queue run; the stream lives on between runs."""

    DESCRIPTION = (
        "The streaming sampler. Each queue run advances the stream named stream_id by chunks_per_run chunks and "
        "outputs only the new frames, so Queue (Instant) / auto-queue plays an endless video. The stream's state "
        "is kept between runs (keyed by stream_id); it restarts when reset is on, or when the model, settings, "
        "seed or the start state change. Cancel stops between model calls and leaves the stream unchanged."
    )
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("IMAGE", "INT", LATENT)
    RETURN_NAMES = ("frames", "frame_index", "latent")
    OUTPUT_TOOLTIPS = (
        "The frames emitted by this run, oldest first.",
        "Index of the first of these frames since the stream started.",
        "This run's latents, frame index and the stream state right after it (for the writer and Save State).",
    )
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The StreamDiT model (StreamDiT Model Loader)."}),
                "settings": (SETTINGS, {"tooltip": "Partition, windows, guidance, shift, resolution (StreamDiT "
                                        "Settings). Changing them restarts the stream."}),
                "prompts": (PROMPTS, {"tooltip": "The prompt schedule (StreamDiT Prompt Schedule). Edits apply to "
                                      "chunks entering the buffer without restarting."}),
                "stream_id": (
                    "STRING",
                    {"default": "stream-1", "tooltip": "Name of the stream. Runs with the same id continue one "
                     "stream; different ids are independent streams. Letters, digits, '.', '_' and '-'."},
                ),
                "seed": (
                    "INT",
                    # No 'control after generate' widget: its default ('randomize') would restart the stream on
                    # every queue run.
                    {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": False,
                     "tooltip": "Seed of the stream's noise. Changing it restarts the stream."},
                ),
                "chunks_per_run": (
                    "INT",
                    {"default": 1, "min": 1, "max": 256, "tooltip": "Chunks emitted per queue run (each chunk is "
                     "chunk_size frames)."},
                ),
                "reset": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Restart the stream on this run (from initial_state if connected, "
                     "else from the seed). Turn it off again to keep streaming."},
                ),
            },
            "optional": {
                "video": (VIDEO, {"tooltip": "Video-to-video input (StreamDiT Video Input); leave unconnected for "
                                  "text-to-video."}),
                "initial_state": (STATE, {"tooltip": "Start the stream from a saved state (StreamDiT Load State) "
                                          "instead of the seed; used when the stream starts or is reset."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> float:
        # A fresh NaN object on every call: never equal to the cached key, so every queue run executes
        # (math.nan is a singleton and would be served from cache; see docs/NODES.md).
        return float("nan")

    def sample(
        self,
        model: ModelHandle,
        settings: Any,
        prompts: PromptsSpec,
        stream_id: str,
        seed: int,
        chunks_per_run: int,
        reset: bool,
        video: VideoSpec | None = None,
        initial_state: StateHandle | None = None,
        unique_id: str | None = None,
    ) -> tuple[torch.Tensor, int, StreamOutput]:
        return advance_stream(
            model,
            settings,
            prompts,
            stream_id,
            seed,
            chunks_per_run=chunks_per_run,
            reset=reset,
            video=video,
            initial_state=initial_state,
            node_id=unique_id if unique_id is not None else host.current_node_id(),
        )
