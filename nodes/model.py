"""Model loader and stream settings nodes."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from collections import OrderedDict
from typing import Any

from . import host
from ._core import core
from .common import CATEGORY, MODEL, SETTINGS, ModelHandle

logger = logging.getLogger("StreamDiT.nodes")

BUNDLED = "streamdit-bundled (default)"
"""Combo entry for the model shipped inside the pack; always listed, needs no download."""
BUNDLED_TEACHER = "streamdit-bundled-teacher (16 calls per chunk)"
"""Combo entry for the bundled model's teacher, shipped beside it (listed when its file is installed)."""

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION = ("auto", "sdpa", "math", "flash_attn", "cudnn")
SPEED = ("safe", "plain", "fast", "fastest")
"""Inference speed-up levels (streamdit_core.perf.PERF_LEVELS)."""

DIFFUSION_PREFIX = f"{host.DIFFUSION_FOLDER}/"
"""Combo entries for Wan files in ComfyUI's ``models/diffusion_models`` start with this."""

_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.safetensors$", re.IGNORECASE)

_CACHE_SIZE = 2
_cache: OrderedDict[tuple[Any, ...], ModelHandle] = OrderedDict()
_cache_lock = threading.Lock()

_wan_check: dict[str, tuple[tuple[int, int], bool]] = {}
_wan_check_lock = threading.Lock()


def _is_wan_file(path: str) -> bool:
    """Whether a file's keys are Wan 2.1's (header only; cached by path, mtime and size so listing stays cheap)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    stamp = (st.st_mtime_ns, st.st_size)
    with _wan_check_lock:
        found = _wan_check.get(path)
        if found is not None and found[0] == stamp:
            return found[1]
    try:
        result = bool(core("wan").is_wan_checkpoint(path))
    except Exception:  # an unreadable file is simply not listed
        result = False
    with _wan_check_lock:
        _wan_check[path] = (stamp, result)
    return result


def list_wan_models() -> list[str]:
    """Wan 2.1 checkpoints in ComfyUI's diffusion-model folders, as ``diffusion_models/<name>``."""
    out = []
    for name in host.list_diffusion_model_files():
        path = host.diffusion_model_path(name)
        if path is not None and _is_wan_file(path):
            out.append(DIFFUSION_PREFIX + name)
    return out


def list_models() -> list[str]:
    """The loader's choices: the bundled model, then StreamDiT checkpoint files (a sharded checkpoint is listed
    once, by its first shard, which loads all of them), then Wan 2.1 files from ``models/diffusion_models``."""
    files = []
    for name in host.list_model_files():
        match = _SHARD.search(name)
        if match is None or int(match.group(1)) == 1:
            files.append(name)
    try:
        wan = list_wan_models()
    except Exception:  # listing must never break the loader
        logger.warning("could not list Wan models in %s", host.DIFFUSION_FOLDER, exc_info=True)
        wan = []
    teacher = [BUNDLED_TEACHER] if core("pipeline").bundled_teacher_path() is not None else []
    return [BUNDLED, *teacher, *files, *wan]


def _model_help() -> str:
    dirs = host.model_search_dirs()
    where = dirs[0] if dirs else os.path.join("ComfyUI", "models", host.MODEL_FOLDER)
    wan_dirs = host.diffusion_model_dirs()
    wan_where = wan_dirs[0] if wan_dirs else os.path.join("ComfyUI", "models", host.DIFFUSION_FOLDER)
    return (
        f"StreamDiT checkpoints (.safetensors) go in {where} (or a 'streamdit:' entry of extra_model_paths.yaml), "
        f"Wan 2.1 text-to-video files in {wan_where}; restart or refresh ComfyUI after copying, or pick "
        f"{BUNDLED!r}, which is always available"
    )


def _resolve_dtype(name: str, device: Any) -> Any:
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {list(DTYPES)}")
    if name == "auto":
        if getattr(device, "type", str(device)) == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def load_model(model: str, dtype: str = "auto", attention: str = "auto", speed: str = "safe") -> ModelHandle:
    """Load (or reuse) a pipeline. ``model`` is :data:`BUNDLED` or a file name from the StreamDiT model folder;
    ``speed`` is an inference speed-up level (:data:`SPEED`)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention {attention!r} is not one of {list(ATTENTION)}")
    if speed not in SPEED:
        raise ValueError(f"speed {speed!r} is not one of {list(SPEED)}")
    device = host.torch_device()
    torch_dtype = _resolve_dtype(dtype, device)
    wan = False
    if model == BUNDLED:
        path = None
        stamp: tuple[Any, ...] = ()
    elif model == BUNDLED_TEACHER:
        path = core("pipeline").bundled_teacher_path()
        if path is None:
            raise FileNotFoundError(f"model {model!r}: the teacher file is not installed in streamdit_core/weights. "
                                    f"{_model_help()}")
        stamp = ()
    else:
        if model.startswith(DIFFUSION_PREFIX):
            name = model[len(DIFFUSION_PREFIX) :]
            if not name.lower().endswith(tuple(host.DIFFUSION_EXTENSIONS)):
                raise ValueError(f"model {model!r} is not a safetensors file. {_model_help()}")
            path = host.diffusion_model_path(name)
            wan = True
        else:
            if not model.lower().endswith(tuple(host.MODEL_EXTENSIONS)):
                raise ValueError(f"model {model!r} is not a .safetensors file. {_model_help()}")
            path = host.model_file_path(model)
        if path is None:
            raise FileNotFoundError(f"model {model!r} was not found. {_model_help()}")
        if not wan:  # a plain Wan file copied into models/streamdit loads too
            wan = "streamdit.format" not in _metadata(path) and _is_wan_file(path)
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
    key = (model, path, stamp, str(torch_dtype), str(device), attention, speed)
    with _cache_lock:
        found = _cache.get(key)
        if found is not None:
            _cache.move_to_end(key)
            return found
    pipeline_mod = core("pipeline")
    try:
        if wan:
            assert path is not None
            pipeline = pipeline_mod.load_wan_pipeline(path, device=device, dtype=torch_dtype, attention=attention)
        else:
            pipeline = pipeline_mod.load_pipeline(path, device=device, dtype=torch_dtype, attention=attention)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}. {_model_help()}") from exc
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        if path is None:
            raise
        kind = "Wan 2.1 text-to-video" if wan else "StreamDiT"
        raise ValueError(f"{model!r} is not a usable {kind} checkpoint ({type(exc).__name__}: {exc}). "
                         f"{_model_help()}") from exc
    _use_host_preview(pipeline)
    status = pipeline.set_perf(core("perf").PerfOptions.level(speed))
    logger.info("StreamDiT speed-ups for %s: %s", model, status)
    handle = ModelHandle(
        pipeline=pipeline,
        name=model,
        path=path,
        dtype=str(torch_dtype).removeprefix("torch."),
        attention=attention,
        device=str(device),
        key=key,
    )
    logger.info("loaded StreamDiT model %s (%s, %s, attention=%s)", model, handle.dtype, handle.device, attention)
    with _cache_lock:
        _cache[key] = handle
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return handle


def _metadata(path: str) -> dict[str, str]:
    try:
        return dict(core("checkpoint").read_metadata(path))
    except Exception:  # unreadable: the loader reports it when it tries to load
        return {}


def _use_host_preview(pipeline: Any) -> None:
    """Give a Wan latent codec ComfyUI's own latent → RGB preview factors when they are available."""
    codec = pipeline.codec
    if getattr(codec, "name", None) != "wan2.1":
        return
    factors = host.wan_preview_factors()
    if factors is not None:
        pipeline.codec = core("codec").wan21_codec(*factors)


class StreamDiTModelLoader:
    """Loads a StreamDiT model; the bundled default needs no download."""

    DESCRIPTION = (
        "Loads a StreamDiT video model. 'streamdit-bundled (default)' is the small model shipped with the pack "
        "and always works; 'streamdit-bundled-teacher' is its teacher (the same size, 8 guided micro-steps per "
        "chunk: 16 model calls where the default makes 1); other checkpoints (.safetensors) are read from "
        "ComfyUI/models/streamdit, and Wan 2.1 "
        "text-to-video files (e.g. wan2.1_t2v_1.3B_fp16.safetensors) from ComfyUI/models/diffusion_models, listed "
        "as 'diffusion_models/<file>'. Wan models take prompts as CONDITIONING (StreamDiT Conditioning Schedule) "
        "and need a Wan VAE for frames (StreamDiT Decode)."
    )
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded StreamDiT model (denoiser, text encoder and frame codec).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        try:
            choices = list_models()
        except Exception:  # listing must never break /object_info
            logger.warning("could not list StreamDiT model files", exc_info=True)
            choices = [BUNDLED]
        return {
            "required": {
                "model": (
                    choices,
                    {
                        "default": BUNDLED,
                        "tooltip": "Which model to load: the bundled default (or its teacher), a .safetensors "
                        "file from ComfyUI/models/streamdit, or a Wan 2.1 text-to-video file from "
                        "ComfyUI/models/diffusion_models ('diffusion_models/...').",
                    },
                ),
                "dtype": (
                    list(DTYPES),
                    {
                        "default": "auto",
                        "tooltip": "Weight and compute precision. auto = float32 on CPU, bfloat16 (or float16) "
                        "on CUDA.",
                    },
                ),
                "attention": (
                    list(ATTENTION),
                    {
                        "default": "auto",
                        "tooltip": "Attention kernel. auto = cuDNN attention on GPUs that support it (fastest on "
                        "H100), else flash_attn if installed, else PyTorch SDPA; math = slow reference. A backend "
                        "that is not available is an error.",
                    },
                ),
            },
            "optional": {
                "speed": (
                    list(SPEED),
                    {
                        "default": "safe",
                        "tooltip": "Inference speed-ups. safe = text keys/values, RoPE and time embedding computed "
                        "once and reused, windows formed without roll copies (same results). plain = none (the "
                        "reference). fast = + torch.compile, CUDA graphs and fused Triton norm/RoPE kernels (GPU; "
                        "the first run compiles for up to a minute or two; same results up to rounding). "
                        "fastest = + fp8 linear layers on H100/Ada "
                        "GPUs, their inputs quantised in fused Triton kernels (a few % change of the model output). "
                        "On a CPU, fast/fastest keep only what helps "
                        "there.",
                    },
                ),
            },
        }

    def load(self, model: str, dtype: str, attention: str, speed: str | None = None) -> tuple[ModelHandle]:
        return (load_model(model, dtype, attention, speed or "safe"),)


class StreamDiTSettings:
    """Stream settings: partition scheme, windows, guidance, shift and resolution."""

    DESCRIPTION = (
        "How the stream runs. The buffer holds chunks × chunk_size frames (+ reference frames) at staggered "
        "noise levels; every micro_steps model calls the cleanest chunk of chunk_size frames is emitted. "
        "Changing these settings restarts the stream. 0 means 'the model's default' where noted."
    )
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = (SETTINGS,)
    RETURN_NAMES = ("settings",)
    OUTPUT_TOOLTIPS = ("Validated stream settings for the StreamDiT Sampler.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model whose defaults fill the values left at 0."}),
                "chunk_size": (
                    "INT",
                    {"default": 0, "min": 0, "max": 64, "tooltip": "c: frames per chunk, emitted together. "
                     "0 = model default."},
                ),
                "chunks": (
                    "INT",
                    {"default": 0, "min": 0, "max": 64, "tooltip": "N: chunks in flight in the buffer. "
                     "0 = model default."},
                ),
                "micro_steps": (
                    "INT",
                    {"default": 0, "min": 0, "max": 16, "tooltip": "s: model calls per chunk position; a frame "
                     "is denoised in chunks × micro_steps calls. 0 = model default."},
                ),
                "reference_frames": (
                    "INT",
                    {"default": -1, "min": -1, "max": 16, "tooltip": "K: clean frames kept at the clean end of "
                     "the buffer as context. -1 = model default."},
                ),
                "shift": (
                    "FLOAT",
                    {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.05, "tooltip": "Time shift k of the noise "
                     "schedule (1 = uniform; larger spends more calls at high noise). 0 = model default."},
                ),
                "guidance": (
                    "FLOAT",
                    {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip": "Classifier-free guidance "
                     "scale; 1 disables guidance (one model call per step instead of two). 0 = model default."},
                ),
                "height": (
                    "INT",
                    {"default": 0, "min": 0, "max": 4096, "step": 8, "tooltip": "Frame height in pixels. "
                     "0 = model default."},
                ),
                "width": (
                    "INT",
                    {"default": 0, "min": 0, "max": 4096, "step": 8, "tooltip": "Frame width in pixels. "
                     "0 = model default."},
                ),
                "window_frames": (
                    "INT",
                    {"default": 0, "min": 0, "max": 256, "tooltip": "Self-attention window length in token "
                     "frames (a token spans the model's temporal patch: 2 frames for the bundled model, 1 latent "
                     "frame for Wan). 0 = model default (the whole buffer when the model has no window)."},
                ),
                "window_height": (
                    "INT",
                    {"default": 0, "min": 0, "max": 512, "tooltip": "Self-attention window height in latent "
                     "patches. 0 = model default."},
                ),
                "window_width": (
                    "INT",
                    {"default": 0, "min": 0, "max": 512, "tooltip": "Self-attention window width in latent "
                     "patches. 0 = model default."},
                ),
                "warm_start": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Start a stream from one uniform text-to-video pass (as in the "
                     "paper) instead of pure noise: the first frames come out clean at once."},
                ),
                "negative_prompt": (
                    "STRING",
                    {"default": "", "multiline": False, "tooltip": "What guidance steers away from (used only when "
                     "guidance > 1)."},
                ),
            },
            "optional": {
                "model_frames": (
                    "INT",
                    {"default": -1, "min": -1, "max": 256, "tooltip": "Frames per model input (FIFO-Diffusion's "
                     "latent partitioning, for base models such as a plain Wan 2.1): each step is computed with "
                     "several model calls over parts of the buffer, narrowing the noise spread each call sees. "
                     "0 = the whole buffer in one call (StreamDiT-trained models); -1 = model default (base Wan: "
                     "4)."},
                ),
                "lookahead": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "With model_frames: FIFO-Diffusion's lookahead denoising (calls "
                     "with a stride of model_frames/2 that keep only the noisier half; about twice the calls). "
                     "model_frames must be even."},
                ),
            },
        }

    def build(
        self,
        model: ModelHandle,
        chunk_size: int,
        chunks: int,
        micro_steps: int,
        reference_frames: int,
        shift: float,
        guidance: float,
        height: int,
        width: int,
        window_frames: int,
        window_height: int,
        window_width: int,
        warm_start: bool,
        negative_prompt: str = "",
        model_frames: int | None = None,
        lookahead: bool | None = None,
    ) -> dict[str, Any]:
        settings = build_settings(
            model,
            chunk_size=chunk_size,
            chunks=chunks,
            micro_steps=micro_steps,
            reference_frames=reference_frames,
            shift=shift,
            guidance=guidance,
            height=height,
            width=width,
            window=(window_frames, window_height, window_width),
            warm_start=warm_start,
            negative_prompt=negative_prompt,
            model_frames=-1 if model_frames is None else int(model_frames),
            lookahead=bool(lookahead),
        )
        text = spread_report(model, settings)
        host.node_text(text)
        return {"ui": {"text": [text]}, "result": (settings,)}


def spread_report(model: ModelHandle, settings: Any) -> str:
    """One line on the noise spread per model input; for a base model above the threshold, a warning (also
    logged) that says which settings to use instead."""
    schedule = core("schedule")
    spread = float(schedule.noise_spread(settings.partition, settings.model_frames, settings.lookahead))
    limit = float(schedule.BASE_MODEL_MAX_SPREAD)
    if not getattr(model.pipeline, "base_model", False):
        return f"noise spread per model input {spread:.2f} (StreamDiT-trained model: any spread is fine)"
    if spread <= limit:
        return f"noise spread per model input {spread:.2f} (base model: OK, <= {limit:.2f})"
    text = (
        f"WARNING: {model.name} is a base model (trained with one noise level per clip) but each model input "
        f"spans {spread:.2f} of the denoising trajectory (> {limit:.2f}): expect blurry or broken frames. Set "
        "model_frames (e.g. 4, or -1 for the model default) or use more chunks so each input sees a narrow "
        "spread; see docs/NODES.md 'Base models'."
    )
    logger.warning(text)
    return text


_WHOLE_AXIS = 4096
"""A window size larger than any token grid: the core clamps it to the grid, i.e. the whole axis."""


def _model_window(pipeline: Any) -> tuple[int, int, int] | None:
    config = getattr(getattr(pipeline, "model", None), "config", None)
    window = getattr(config, "window", None)
    return None if window is None else (int(window[0]), int(window[1]), int(window[2]))


def build_settings(
    model: ModelHandle,
    *,
    chunk_size: int = 0,
    chunks: int = 0,
    micro_steps: int = 0,
    reference_frames: int = -1,
    shift: float = 0.0,
    guidance: float = 0.0,
    height: int = 0,
    width: int = 0,
    window: tuple[int, int, int] = (0, 0, 0),
    warm_start: bool = True,
    negative_prompt: str = "",
    model_frames: int = -1,
    lookahead: bool = False,
) -> Any:
    """The model's default settings with the non-default values replaced; the core validates them.
    ``model_frames``: −1 = the model's default, 0 = the whole buffer, else frames per model input."""
    defaults = model.pipeline.default_settings()
    part = defaults.partition
    Partition = core("schedule").Partition
    try:
        partition = Partition(
            K=part.K if reference_frames < 0 else int(reference_frames),
            N=part.N if chunks <= 0 else int(chunks),
            c=part.c if chunk_size <= 0 else int(chunk_size),
            s=part.s if micro_steps <= 0 else int(micro_steps),
        )
    except ValueError as exc:
        raise ValueError(f"StreamDiT Settings: invalid partition (chunk_size, chunks, micro_steps, "
                         f"reference_frames): {exc}") from exc
    changes: dict[str, Any] = {"partition": partition, "warm_start": bool(warm_start)}
    if negative_prompt:
        changes["negative_prompt"] = str(negative_prompt)
    if shift > 0:
        changes["shift"] = float(shift)
    if guidance > 0:
        changes["guidance"] = float(guidance)
    if height > 0:
        changes["height"] = int(height)
    if width > 0:
        changes["width"] = int(width)
    if model_frames == 0:
        changes["model_frames"], changes["lookahead"] = None, False
    elif model_frames > 0:
        changes["model_frames"], changes["lookahead"] = int(model_frames), bool(lookahead)
    elif lookahead and defaults.model_frames is not None:
        changes["lookahead"] = True
    if any(w > 0 for w in window):
        base = defaults.window or _model_window(model.pipeline) or (_WHOLE_AXIS,) * 3
        changes["window"] = tuple(int(w) if w > 0 else int(base[i]) for i, w in enumerate(window))
    try:
        settings = dataclasses.replace(defaults, **changes)
        check = getattr(model.pipeline, "check_settings", None)
        if check is not None:
            check(settings)  # model-specific limits (sizes must tile into patches, ...)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"StreamDiT Settings: {exc}") from exc
    return settings
