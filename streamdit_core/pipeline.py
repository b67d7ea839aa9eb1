"""A loaded model ready to stream: backbone, text encoder, codec, device, dtype and the prompt cache.

``load_pipeline(None)`` loads the bundled default model shipped in ``streamdit_core/weights/``. If those
weights are not present (a development checkout before training), a small randomly initialised model of
the bundled layout is created instead and a warning says so: the pipeline runs, the frames are noise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import LoadedCheckpoint, load_checkpoint, shard_paths
from .codec import LATENT_CODECS, Codec, LatentCodec, PixelCodec, wan21_codec
from .config import ModelConfig, preset
from .log import get_logger
from .model import StreamDiT
from .perf import PerfOptions
from .schedule import Partition
from .text import TextEncoder, TextEncoderConfig

if TYPE_CHECKING:
    from .sampler import StreamSettings

__all__ = [
    "StreamPipeline",
    "load_pipeline",
    "load_wan_pipeline",
    "bundled_model_path",
    "placeholder_pipeline",
    "BUNDLED_NAME",
    "BUNDLED_TEACHER_NAME",
    "bundled_teacher_path",
    "WAN_BASE_DEFAULTS",
]

log = get_logger("pipeline")

BUNDLED_NAME = "streamdit-bundled"
BUNDLED_TEACHER_NAME = "streamdit-bundled-teacher"  # the bundled student's teacher (s = 8, guidance 3)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# Stream settings the bundled layout runs with when a checkpoint stores none.
_FALLBACK_DEFAULTS: dict[str, Any] = {
    "partition": [0, 8, 2, 1],
    "shift": 1.0,
    "guidance": 1.0,
    "height": 64,
    "width": 64,
    "fps": 16,
}

# Stream settings for a base Wan 2.1 T2V checkpoint (no StreamDiT training): diagonal chunks of one latent frame
# and FIFO-style model inputs of 4 latent frames, so each model call sees a narrow noise spread (0.19 of a
# frame's denoising trajectory; docs/NODES.md "Base models"). 480×832 (Wan's 480p), shift 8 and CFG 5 as for
# Wan 2.1 1.3B text-to-video.
WAN_BASE_DEFAULTS: dict[str, Any] = {
    "partition": [0, 16, 1, 2],
    "shift": 8.0,
    "guidance": 5.0,
    "height": 480,
    "width": 832,
    "fps": 16,
    "model_frames": 4,
}

# contexts remembered by identity (device copies, guided batches): at least the model inputs of one step
# (B / model_frames parts, about twice that with lookahead)
_MEMO_SIZE = 16

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


def bundled_model_path() -> Path | None:
    """The bundled default model's file (first shard), or ``None`` if it is not installed."""
    try:
        return shard_paths(WEIGHTS_DIR / f"{BUNDLED_NAME}.safetensors")[0]
    except FileNotFoundError:
        return None


def bundled_teacher_path() -> Path | None:
    """The bundled model's teacher, shipped beside it, or ``None`` if it is not installed."""
    path = WEIGHTS_DIR / f"{BUNDLED_TEACHER_NAME}.safetensors"
    return path if path.is_file() else None


@dataclass
class StreamPipeline:
    """Attributes:
    model: the backbone (eval mode, on ``device`` in ``dtype``).
    text_encoder: the bundled text encoder, or ``None`` for models conditioned by external embeddings.
    codec: frames ↔ latents.
    device, dtype: where and in what precision the model runs (latents stay float32).
    defaults: stream settings stored with the checkpoint (partition, shift, guidance, size, fps).
    name: a display name; trained: False for a randomly initialised placeholder.
    base_model: True for a video model trained with one noise level per clip (a plain Wan 2.1), not with
        StreamDiT's buffered flow matching: it needs narrow per-input noise spreads (``model_frames``).
    attention: attention backend name passed to the model.
    The model's inference speed-ups are ``model.perf`` (set with :meth:`set_perf`); the pipeline keeps the
    σ and context tensors it passes identity-stable across calls so the model's caches hit.
    """

    model: StreamDiT
    text_encoder: TextEncoder | None
    codec: Codec
    device: torch.device
    dtype: torch.dtype
    defaults: dict[str, Any] = field(default_factory=dict)
    name: str = BUNDLED_NAME
    trained: bool = True
    attention: str = "auto"
    base_model: bool = False
    external_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    _prompt_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _sigma_memo: dict[tuple[float, ...], torch.Tensor] = field(default_factory=dict, repr=False)
    _guided_memo: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    _device_memo: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)

    def set_perf(self, options: PerfOptions) -> dict[str, str]:
        """Switch the model's inference speed-ups (GPU-only parts are dropped on a CPU); returns what is on."""
        return self.model.set_perf(options.for_device(self.device))

    def _device_sigmas(self, sigmas: torch.Tensor) -> torch.Tensor:
        """``[B]`` levels → ``[1, B]`` float32 on the device, the same tensor for the same values."""
        if sigmas.device.type != "cpu":
            return sigmas.to(self.device, torch.float32)[None]
        key = tuple(float(v) for v in sigmas.tolist())
        found = self._sigma_memo.get(key)
        if found is None:
            if len(self._sigma_memo) >= 64:
                self._sigma_memo.clear()
            found = self._sigma_memo[key] = sigmas.to(self.device, torch.float32)[None]
        return found

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the device, the same tensor for the same input tensor (contexts made on the CPU, e.g. from
        ComfyUI CONDITIONING, would otherwise be a new copy every call and miss the model's text K/V cache)."""
        if t.device == self.device:
            return t
        for src, dst in self._device_memo:
            if src is t:
                return dst
        dst = t.to(self.device)
        self._device_memo = [*self._device_memo[-(_MEMO_SIZE - 1) :], (t, dst)]
        return dst

    @property
    def cheap_decode(self) -> bool:
        return isinstance(self.codec, (PixelCodec, LatentCodec))  # a latent codec's decode is a linear preview

    @property
    def fps(self) -> int:
        return int(self.defaults.get("fps", 16))

    def default_settings(self, **overrides: object) -> StreamSettings:
        from .sampler import StreamSettings

        d = dict(_FALLBACK_DEFAULTS)
        d.update(self.defaults)
        K, N, c, s = d["partition"]
        kwargs: dict[str, Any] = {
            "partition": Partition(K=K, N=N, c=c, s=s),
            "shift": float(d["shift"]),
            "guidance": float(d["guidance"]),
            "height": int(d["height"]),
            "width": int(d["width"]),
        }
        if d.get("model_frames") is not None:
            kwargs["model_frames"] = int(d["model_frames"])
            kwargs["lookahead"] = bool(d.get("lookahead", False))
        kwargs.update(overrides)
        return StreamSettings(**kwargs)

    def check_settings(self, settings: StreamSettings) -> None:
        """Raise ``ValueError`` naming the setting if this model cannot run ``settings``."""
        cfg = self.model.config
        factor = self.codec.spatial_factor
        for name in ("height", "width"):
            size = getattr(settings, name)
            step = factor * cfg.patch_size[1 if name == "height" else 2]
            if size % step:
                raise ValueError(f"{name}={size} must be a multiple of {step} for this model (codec ×{factor}, patch)")
        if settings.model_frames is not None and settings.model_frames % (
            2 * cfg.patch_size[0] if settings.lookahead else cfg.patch_size[0]
        ):
            raise ValueError(
                f"model_frames={settings.model_frames} must be a multiple of the temporal patch {cfg.patch_size[0]}"
                + (" (twice that with lookahead)" if settings.lookahead else "")
            )
        pt = cfg.patch_size[0]
        for name, value in (("buffer B", settings.partition.B), ("chunk size c", settings.partition.c),
                            ("reference frames K", settings.partition.K)):
            if value % pt:
                raise ValueError(
                    f"{name}={value} must be a multiple of the model's temporal patch {pt} "
                    "(frames inside one token share a noise level)"
                )

    # -- text ---------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Embeddings ``{prompt: [text_len, text_dim]}`` (float32 on ``device``); each distinct prompt is
        encoded once and cached. External embeddings (e.g. ComfyUI CONDITIONING) take precedence."""
        missing = [
            p for p in dict.fromkeys(prompts) if p not in self._prompt_cache and p not in self.external_embeddings
        ]
        if missing:
            if self.text_encoder is None:
                raise ValueError(
                    f"this model has no built-in text encoder; provide embeddings for the prompts {missing[:3]} "
                    "(e.g. connect CONDITIONING from a text-encoder node)"
                )
            with torch.inference_mode():
                emb = self.text_encoder.encode(missing).float()
            for prompt, e in zip(missing, emb):
                self._prompt_cache[prompt] = e.clone()
        known = {**self._prompt_cache, **self.external_embeddings}
        return {p: known[p] for p in prompts}

    # -- model --------------------------------------------------------------------------------------------

    def velocity(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        context: torch.Tensor,
        window: tuple[int, int, int] | None,
        guidance: float = 1.0,
        uncond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One model call (two batched with guidance). latents ``[1, C, B, h, w]``; sigmas ``[B]``;
        context/uncond ``[1, B, Lt, D]``. Returns the (guided) velocity ``[1, C, B, h, w]`` float32."""
        x = latents.to(self.device, self.dtype)
        sig = self._device_sigmas(sigmas)
        ctx = self._on_device(context)
        if guidance != 1.0:
            if uncond is None:
                raise ValueError("guidance != 1 needs an unconditional context")
            # one entry per context in use: with model_frames the sampler passes one context slice per part
            found = [m[2] for m in self._guided_memo if m[0] is context and m[1] is uncond]
            if found:
                both = found[0]
            else:
                both = torch.cat([ctx, self._on_device(uncond)])
                self._guided_memo = [*self._guided_memo[-(_MEMO_SIZE - 1) :], (context, uncond, both)]
            x, sig, ctx = torch.cat([x, x]), torch.cat([sig, sig]), both
        with torch.inference_mode():
            v = self.model(x, sig, ctx, window=window, attention_backend=self.attention).float()
        if guidance != 1.0:
            cond, unc = v.chunk(2)
            v = unc + guidance * (cond - unc)
        return v.clone()

    # -- frames -------------------------------------------------------------------------------------------

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(frames).to(self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents).cpu()


def _perf_options(perf: PerfOptions | str | None) -> PerfOptions:
    """A level name (``plain``, ``safe``, ``fast``, ``fastest``), an option list, options, or ``None`` (safe)."""
    if perf is None:
        return PerfOptions()
    return PerfOptions.level(perf) if isinstance(perf, str) else perf


def _pipeline_from(
    ckpt: LoadedCheckpoint,
    device: torch.device,
    dtype: torch.dtype,
    attention: str,
    name: str,
    perf: PerfOptions | str | None = None,
) -> StreamPipeline:
    codec: Codec
    if ckpt.codec == "pixel":
        codec = PixelCodec()
    elif ckpt.codec in LATENT_CODECS:
        codec = LATENT_CODECS[ckpt.codec]()  # frames come from the host's VAE (ComfyUI: StreamDiT Decode)
    else:
        raise ValueError(f"{name}: unknown codec {ckpt.codec!r}; known: {['pixel', *LATENT_CODECS]}")
    model = ckpt.model.to(device=device, dtype=dtype)
    model.set_perf(_perf_options(perf).for_device(device))
    return StreamPipeline(
        model=model,
        text_encoder=ckpt.text_encoder,
        codec=codec,
        device=device,
        dtype=dtype,
        defaults=ckpt.defaults,
        name=name,
        trained=True,
        attention=attention,
    )


def placeholder_pipeline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attention: str = "auto",
    seed: int = 0,
    perf: PerfOptions | str | None = None,
) -> StreamPipeline:
    """A randomly initialised model of the bundled layout (for tests and for checkouts without weights)."""
    from .world import VOCABULARY

    torch.manual_seed(seed)  # parameter init only; sampling never uses the global RNG
    cfg: ModelConfig = preset("bundled")
    model = StreamDiT(cfg)
    # a non-zero head so the placeholder's output visibly depends on its inputs
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    text = TextEncoder(TextEncoderConfig(vocabulary=tuple(VOCABULARY), text_len=cfg.text_len, dim=cfg.text_dim))
    dev = torch.device(device)
    model = model.to(dev, dtype).eval()
    model.set_perf(_perf_options(perf).for_device(dev))
    return StreamPipeline(
        model=model,
        text_encoder=text.to(dev).eval(),
        codec=PixelCodec(),
        device=dev,
        dtype=dtype,
        defaults=dict(_FALLBACK_DEFAULTS),
        name=f"{BUNDLED_NAME} (untrained placeholder)",
        trained=False,
        attention=attention,
    )


def load_pipeline(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    attention: str = "auto",
    perf: PerfOptions | str | None = None,
) -> StreamPipeline:
    """Load a StreamDiT checkpoint (``None`` = the bundled default model) into a pipeline.

    ``perf``: inference speed-ups, a :class:`~streamdit_core.perf.PerfOptions` or a level name
    (``plain``, ``safe`` — the default —, ``fast``, ``fastest``); GPU-only parts are dropped on a CPU."""
    options = _perf_options(perf)
    dev, dt = torch.device(device), parse_dtype(dtype)
    if path is None:
        bundled = bundled_model_path()
        if bundled is None:
            log.warning(
                "the bundled model's weights are not installed in %s; using an untrained placeholder "
                "model of the same layout (frames will be noise)",
                WEIGHTS_DIR,
            )
            return placeholder_pipeline(dev, dt, attention, perf=options)
        path, name = bundled, BUNDLED_NAME
    else:
        name = Path(path).name
    ckpt = load_checkpoint(path, device="cpu")
    meta_defaults = ckpt.defaults
    log.info(
        "loaded %s (%s parameters, defaults %s)",
        name,
        f"{ckpt.model.config.num_parameters():,}",
        json.dumps(meta_defaults),
    )
    return _pipeline_from(ckpt, dev, dt, attention, name, options)


def load_wan_pipeline(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    attention: str = "auto",
    perf: PerfOptions | str | None = None,
) -> StreamPipeline:
    """A pipeline around a base Wan 2.1 T2V checkpoint (original key names, see :mod:`streamdit_core.wan`): no
    text encoder (prompts come as embeddings, :class:`~streamdit_core.prompts.ConditionedSchedule`), Wan 2.1's
    latent space (frames through the host's VAE), :data:`WAN_BASE_DEFAULTS`, ``base_model=True``."""
    from .wan import load_wan

    dev, dt = torch.device(device), parse_dtype(dtype)
    loaded = load_wan(path, device="cpu", dtype=dt)
    cfg = loaded.model.config
    if cfg.in_dim != 16:
        raise ValueError(f"{Path(path).name}: {cfg.in_dim} latent channels; only Wan 2.1 (16 channels) is supported")
    codec = wan21_codec()
    model = loaded.model.to(device=dev, dtype=dt)
    model.set_perf(_perf_options(perf).for_device(dev))  # after the move: fp8/CUDA graphs look at the device
    log.info("loaded Wan checkpoint %s (%s parameters, stored as %s)", Path(path).name,
             f"{cfg.num_parameters():,}", "/".join(loaded.stored_dtypes))
    return StreamPipeline(
        model=model,
        text_encoder=None,
        codec=codec,
        device=dev,
        dtype=dt,
        defaults=dict(WAN_BASE_DEFAULTS),
        name=Path(path).name,
        trained=True,
        attention=attention,
        base_model=True,
    )
