"""Streaming decode of a latent stream with a ComfyUI ``VAE`` (Wan 2.1), and VAE encoding for video-to-video.

ComfyUI's ``VAE.decode`` starts a fresh causal cache on every call, so decoding each queue run's latents with it
would put a seam (and a missing-frames jump: the first latent frame decodes to 1 frame, later ones to 4) at every
chunk boundary. :class:`StreamDiTDecode` drives the VAE's decoder modules itself through the core's
``causal_decode`` and keeps the decoder's feature cache in the stream registry between queue runs, so the frames
of run after run equal one decode of the whole latent video. The cache travels with the stream: a reset or
restart starts it again, Save State (connected after this node) writes it, Load State brings it back.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

from . import host
from ._core import core
from .common import CATEGORY, LATENT, STREAMS, VAE, StreamOutput, frames_to_image

logger = logging.getLogger("StreamDiT.nodes")


# --------------------------------------------------------------------------------------------------------------
# Adapters for ComfyUI's VAE object (comfy.sd.VAE wrapping comfy.ldm.wan.vae.WanVAE)


def _wan_modules(vae: Any, input_name: str = "vae") -> Any:
    model = getattr(vae, "first_stage_model", None)
    if model is None or not hasattr(model, "decoder") or not hasattr(model, "conv2"):
        raise ValueError(f"{input_name} is not a Wan 2.1 VAE (expected ComfyUI's VAE with a causal Wan decoder); "
                         "load wan_2.1_vae.safetensors with Load VAE")
    channels = getattr(vae, "latent_channels", None)
    if channels is not None and int(channels) != 16:
        raise ValueError(f"{input_name} has {channels} latent channels; Wan 2.1 models need the Wan 2.1 VAE (16 "
                         "channels; the Wan 2.2 VAE has 48)")
    return model


def step_decoder(vae: Any) -> Any:
    """The core's one-latent-frame decoder over a ComfyUI Wan VAE's modules (on the VAE's device and dtype)."""
    model = _wan_modules(vae)
    causal = core("causal_decode")
    try:
        first_chunk = "first_chunk" in inspect.signature(model.decoder.forward).parameters
    except (TypeError, ValueError):
        first_chunk = False
    return causal.ModuleStepDecoder(
        pre=model.conv2,
        decoder=model.decoder,
        num_slots=causal.count_causal_convs(model.decoder),
        device=getattr(vae, "device", "cpu"),
        dtype=getattr(vae, "vae_dtype", torch.float32),
        first_chunk_arg=first_chunk,
    )


def frame_encoder(vae: Any) -> Any:
    """``frames [F, 3, H, W]`` in 0..1 → the VAE's raw latents ``[1, C, (F−1)//4+1, H/8, W/8]`` (ComfyUI's
    ``VAE.encode``, which treats the frames as one clip)."""
    _wan_modules(vae)

    def encode(frames: torch.Tensor) -> torch.Tensor:
        image = frames.permute(0, 2, 3, 1).contiguous()  # IMAGE [F, H, W, 3]
        latents = vae.encode(image)
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            raise ValueError(f"the VAE returned {type(latents).__name__}, not video latents [1, C, F, h, w]")
        return latents.float()

    return encode


# --------------------------------------------------------------------------------------------------------------
# The streaming decode


@dataclass(frozen=True, eq=False)
class DecoderRecord:
    """A stream's decoder between queue runs: its state, and the last run it decoded (to answer a re-run of the
    same sampler output without decoding twice)."""

    state: Any
    last_output: StreamOutput | None = None
    last_result: tuple[Any, ...] | None = None


def _codec_of(latent: StreamOutput) -> Any:
    codec = latent.model.pipeline.codec
    if not hasattr(codec, "denormalise"):
        raise ValueError(
            f"latent: the model {latent.model.name!r} works in pixel space, its sampler 'frames' are final; "
            "StreamDiT Decode is for latent models (Wan 2.1)"
        )
    return codec


def _start_state(latent: StreamOutput, record: DecoderRecord | None, slots: int, temporal: int) -> tuple[Any, str]:
    """The decoder state this run's latents continue, and a note when the cache had to start mid-stream."""
    causal = core("causal_decode")
    start = int(latent.frame_index)
    if latent.restarted:
        resume = latent.resume_decoder
        if resume is not None and int(resume.latent_index) == start and resume.num_slots == slots:
            return resume, ""
        if start == 0:
            return causal.DecoderState.fresh(slots), ""
        note = (f"stream {latent.stream_id} resumed at latent frame {start} from a state saved without the "
                "decoder cache (connect Save State after StreamDiT Decode): one seam here")
    elif record is None:
        if start == 0:
            return causal.DecoderState.fresh(slots), ""
        note = (f"decoding of stream {latent.stream_id} starts at latent frame {start} (the decoder was not "
                "connected before): one seam here")
    elif int(record.state.latent_index) == start and record.state.num_slots == slots:
        return record.state, ""
    else:
        note = (f"stream {latent.stream_id} is at latent frame {start} but its decoder at "
                f"{int(record.state.latent_index)} (runs were not decoded): one seam here")
    fresh = causal.DecoderState.fresh(slots)
    offset = dataclasses.replace(fresh, latent_index=start, frame_index=causal.decoded_length(start, temporal))
    return offset, note


def decode_stream(latent: StreamOutput, vae: Any, node_id: str | None = None) -> tuple[torch.Tensor, int, StreamOutput]:
    """Decode one sampler run's latents, continuing the stream's decoder; see :class:`StreamDiTDecode`."""
    if not isinstance(latent, StreamOutput):
        raise ValueError("latent must be the StreamDiT Sampler's 'latent' output")
    if latent.decoder_state is not None:
        raise ValueError("latent was already decoded (it comes from a StreamDiT Decode); connect the sampler's "
                         "'latent' output instead")
    if latent.latents is None:
        raise ValueError("latent carries no latents")
    codec = _codec_of(latent)
    decoder = step_decoder(vae)
    entry = STREAMS.entry(latent.stream_id)
    with entry.lock:
        record: DecoderRecord | None = entry.decoder
        if record is not None and record.last_output is latent and record.last_result is not None:
            return record.last_result  # the same run again: never decode twice (the cache would run ahead)
        state, note = _start_state(latent, record, decoder.num_slots, int(codec.temporal_factor))
        if note:
            logger.warning(note)
        host.check_interrupt()
        host.prepare_vae(vae)
        state = state.to(decoder.device, decoder.dtype)
        raw = codec.denormalise(latent.latents)
        new_state, frames = core("causal_decode").decode_chunk(decoder, state, raw, check=host.check_interrupt)
        image = frames_to_image(frames)
        output = dataclasses.replace(
            latent,
            frame_index=int(state.frame_index),
            frame_count=int(image.shape[0]),
            decoder_state=new_state,
        )
        result = (image, int(state.frame_index), output)
        entry.decoder = DecoderRecord(new_state, latent, result)  # commit only after success
    text = f"{latent.stream_id}: decoded frames {state.frame_index}-{state.frame_index + image.shape[0] - 1}"
    host.node_text(text + (f" ({note})" if note else ""), node_id)
    return result


class StreamDiTDecode:
    """Decodes each run's latents with a Wan VAE, keeping the causal decoder's cache between runs (no seams)."""

    DESCRIPTION = (
        "Streaming VAE decode for latent models (Wan 2.1): decodes the latents of every sampler run with a Wan "
        "2.1 VAE (Load VAE) while keeping the causal decoder's cache between queue runs, so the frames of run "
        "after run are exactly those of one decode of the whole video (no seams; the stream's first latent frame "
        "gives 1 frame, every later one 4). The cache lives with the stream: reset/restart start it again; "
        "connect Save State to this node's 'latent' output to save it with the stream."
    )
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("IMAGE", "INT", LATENT)
    RETURN_NAMES = ("frames", "frame_index", "latent")
    OUTPUT_TOOLTIPS = (
        "The decoded frames of this run, oldest first.",
        "Index of the first of these frames in the decoded video since the stream started.",
        "The sampler's run plus the decoder cache after it (for the writer and Save State).",
    )
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "latent": (LATENT, {"tooltip": "The StreamDiT Sampler's 'latent' output."}),
                "vae": (VAE, {"tooltip": "The Wan 2.1 VAE (Load VAE: wan_2.1_vae.safetensors)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def decode(self, latent: StreamOutput, vae: Any, unique_id: str | None = None) -> tuple[torch.Tensor, int, Any]:
        return decode_stream(latent, vae, unique_id if unique_id is not None else host.current_node_id())
