"""Training on a folder of captioned videos: read, resize, encode once, cache, then draw latent windows.

Data layout (any depth of sub-folders; hidden folders are skipped)::

    my_videos/
        beach.mp4        a video (.mp4 .mov .mkv .webm .avi .gif: anything FFmpeg reads)
        beach.txt        its caption: UTF-8 text, one caption for the whole clip
        city/dusk.webm
        city/dusk.txt

Preparation (:func:`prepare_video_data`, run by ``python -m streamdit_core train --data …`` before training):

1. every video is decoded, resampled to ``fps`` (each output time takes the nearest source frame), scaled to
   cover ``height × width`` and centre-cropped, and cut to at most ``max_frames`` frames (then to ``1 + 4k``
   frames, what the causal Wan VAE encodes);
2. it is encoded once with the VAE and the normalised latents ``[C, F', h, w]`` are written to
   ``<cache>/latents/<key>.safetensors``; the key hashes the video file's bytes, the settings above, the
   cache dtype and the VAE's fingerprint, so a changed video, setting or VAE is re-encoded, anything else is
   reused (file hashes are remembered in ``<cache>/files.json`` by path, size and modification time, so an
   unchanged data set is not re-read either);
3. every distinct caption (and the empty caption, for caption dropout) is embedded once with the text encoder
   and written to ``<cache>/text/<key>.safetensors`` (``[L, D]``, the real tokens only).

The encoders are loaded only if something has to be encoded, and released before training starts.

Training (:class:`VideoClips`, a :class:`ClipSource`): each sample is a window of ``B`` consecutive latent frames
at a random start in a random clip, conditioned on the clip's caption; the windows cover the whole latent
stream of each clip, as a streaming buffer does.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .encoders import LatentEncoder, Lazy, TextEmbedder, clean_caption, pad_embeddings
from .log import get_logger
from .video_io import require_av

__all__ = [
    "VIDEO_EXTENSIONS",
    "ClipSource",
    "VideoDataConfig",
    "find_captioned_videos",
    "read_clip",
    "prepare_video_data",
    "PrepareStats",
    "VideoClips",
    "video_source",
]

log = get_logger("video_data")

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif", ".m4v")
CACHE_VERSION = 1
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ClipSource(Protocol):
    """Training clips for :class:`~streamdit_core.train.Trainer` in place of the procedural world.

    ``clips`` returns clean clips in the model's input space ``[b, C, frames, H, W]`` (float32, CPU) and one
    caption per frame; ``embed`` maps captions to frozen text embeddings ``[n, text_len, D]`` (float32, CPU);
    ``defaults`` gives the stream settings a model trained on these clips runs with (``height``, ``width`` in
    pixels, ``fps``); ``codec`` names the latent space in checkpoint metadata (``streamdit.codec``: ``pixel`` or
    a key of :data:`~streamdit_core.codec.LATENT_CODECS`).
    """

    codec: str

    def clips(self, batch: int, frames: int, generator: torch.Generator) -> tuple[torch.Tensor, list[list[str]]]: ...

    def embed(self, texts: list[str]) -> torch.Tensor: ...

    def defaults(self) -> dict[str, object]: ...


@dataclass(frozen=True)
class VideoDataConfig:
    """How videos become training latents (the ``video`` section of a training config).

    Attributes:
        fps: frame rate the videos are resampled to (Wan 2.1 was trained at 16).
        height, width: frame size after scaling to cover and centre-cropping; multiples of 16 (the VAE's 8×
            and the DiT's 2×2 patch). Wan 2.1 1.3B's native size is 480×832.
        max_frames: frames read per video at ``fps`` (then cut to ``1 + 4k``); the rest of a longer video is not
            used (cut long videos into several files to use all of them).
        cache_dtype: dtype of cached latents and text embeddings (bfloat16 halves the disk of float32).
    """

    fps: float = 16.0
    height: int = 480
    width: int = 832
    max_frames: int = 81
    cache_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"

    def __post_init__(self) -> None:
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not 0 < self.fps <= 120:
            raise ValueError(f"video.fps must be a number in (0, 120], got {self.fps!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value % 16:
                raise ValueError(f"video.{name} must be a positive multiple of 16 (VAE 8× · patch 2), got {value!r}")
        if isinstance(self.max_frames, bool) or not isinstance(self.max_frames, int) or self.max_frames < 1:
            raise ValueError(f"video.max_frames must be a positive integer, got {self.max_frames!r}")
        if self.cache_dtype not in _DTYPES:
            raise ValueError(f"video.cache_dtype must be one of {sorted(_DTYPES)}, got {self.cache_dtype!r}")

    def usable_frames(self, temporal_factor: int) -> int:
        """Frames actually encoded from a long enough video: ``max_frames`` cut to ``1 + temporal_factor·k``."""
        return 1 + (self.max_frames - 1) // temporal_factor * temporal_factor


# ----------------------------------------------------------------------------------------------------------
# Finding and reading videos
# ----------------------------------------------------------------------------------------------------------


def find_captioned_videos(data_dir: str | os.PathLike[str]) -> list[tuple[Path, str]]:
    """``(video, caption)`` pairs under ``data_dir``, sorted by path (see the module docstring for the layout).

    Raises:
        FileNotFoundError: the folder does not exist. ValueError: no videos, or videos without a caption file
        or with an empty one (all listed).
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    videos = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in VIDEO_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not videos:
        raise ValueError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) found under {root}")
    pairs, missing, empty = [], [], []
    for video in videos:
        caption_file = video.with_suffix(".txt")
        if not caption_file.is_file():
            missing.append(str(video.relative_to(root)))
            continue
        caption = clean_caption(caption_file.read_text(encoding="utf-8"))
        if not caption:
            empty.append(str(caption_file.relative_to(root)))
            continue
        pairs.append((video, caption))
    if missing or empty:
        parts = []
        if missing:
            parts.append(f"{len(missing)} video(s) without a caption file (name.txt beside name.mp4): {missing[:10]}")
        if empty:
            parts.append(f"{len(empty)} empty caption file(s): {empty[:10]}")
        raise ValueError(f"{root}: " + "; ".join(parts))
    return pairs


def _resize_crop(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale ``uint8 [h, w, 3]`` to cover ``height × width`` (aspect kept) and centre-crop to it."""
    h, w = rgb.shape[:2]
    scale = max(height / h, width / w)
    crop_w, crop_h = width / scale, height / scale  # the source region that maps onto the output
    left, top = (w - crop_w) / 2, (h - crop_h) / 2
    image = Image.fromarray(rgb).resize(
        (width, height), Image.Resampling.LANCZOS, box=(left, top, left + crop_w, top + crop_h), reducing_gap=3.0
    )
    return np.asarray(image)


def read_clip(path: str | os.PathLike[str], fps: float, height: int, width: int, max_frames: int) -> np.ndarray:
    """Decode up to ``max_frames`` frames of ``path`` resampled to ``fps``, resized and centre-cropped.

    Output frame ``k`` shows the source frame whose timestamp is nearest to ``t₀ + k / fps`` (``t₀``: the first
    frame's time), so a 30 fps video read at 16 fps skips frames and an 8 fps one repeats them.

    Returns:
        ``np.ndarray`` ``uint8 [F, height, width, 3]``, ``1 <= F <= max_frames``.
    Raises:
        FileNotFoundError, ValueError: a missing or unreadable file, or one with no video frames.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    step = 1.0 / fps
    out: list[np.ndarray] = []
    av = require_av()
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as error:
        raise ValueError(f"cannot read {path} as a video: {error}") from error
    with container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        source_rate = float(stream.average_rate or stream.guessed_rate or fps)
        prev: tuple[float, int, Any] | None = None  # (time, index, frame)
        t0 = 0.0
        converted: dict[int, np.ndarray] = {}

        def rgb(item: tuple[float, int, Any]) -> np.ndarray:
            if item[1] not in converted:
                converted.clear()  # only the latest source frame can be used again
                converted[item[1]] = _resize_crop(item[2].to_ndarray(format="rgb24"), height, width)
            return converted[item[1]]

        for index, frame in enumerate(container.decode(stream)):
            t = float(frame.time) if frame.time is not None else index / source_rate
            if prev is None:
                t0 = t
            cur = (t, index, frame)
            while prev is not None and len(out) < max_frames and t0 + len(out) * step < t - 1e-6:
                target = t0 + len(out) * step
                out.append(rgb(prev if target - prev[0] <= t - target else cur))
            prev = cur
            if len(out) >= max_frames:
                break
        while prev is not None and len(out) < max_frames and t0 + len(out) * step <= prev[0] + 1e-6:
            out.append(rgb(prev))
    if not out:
        raise ValueError(f"no decodable video frames in {path}")
    return np.stack(out)


# ----------------------------------------------------------------------------------------------------------
# Caches
# ----------------------------------------------------------------------------------------------------------


def _digest(data: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class _FileHashes:
    """sha256 of files, remembered by (path, size, mtime) in ``<cache>/files.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.known: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}

    def __call__(self, file: Path) -> str:
        st = file.stat()
        key = str(file.resolve())
        entry = self.known.get(key)
        if entry and entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns:
            return str(entry["sha256"])
        digest = _sha256_file(file)
        self.known[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        return digest

    def save(self) -> None:
        _atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(self.known, indent=1)))


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_tensor(path: Path, name: str, tensor: torch.Tensor, meta: dict[str, str]) -> None:
    _atomic_write(path, lambda tmp: save_file({name: tensor.contiguous()}, str(tmp), metadata=meta))


@dataclass
class PrepareStats:
    """What :func:`prepare_video_data` did: files encoded now vs found in the cache, and clips left out."""

    videos_encoded: int = 0
    videos_cached: int = 0
    captions_encoded: int = 0
    captions_cached: int = 0
    too_short: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Clip:
    latents: Path
    frames: int
    caption: str


def prepare_video_data(
    data_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    config: VideoDataConfig,
    encoder: Lazy[LatentEncoder],
    embedder: Lazy[TextEmbedder],
    min_latent_frames: int,
    text_len: int | None = None,
) -> VideoClips:
    """Encode what is not cached yet (see the module docstring) and return the training clips.

    Args:
        encoder, embedder: the VAE and the text encoder, loaded only if something must be encoded; released at
            the end. Their fingerprints are part of every cache key.
        min_latent_frames: the training buffer ``B``; clips with fewer latent frames are left out (listed in
            a warning); none left is an error.
        text_len: the DiT's text length: :meth:`VideoClips.embed` zero-pads embeddings to it.
    """
    pairs = find_captioned_videos(data_dir)
    cache = Path(cache_dir)
    hashes = _FileHashes(cache / "files.json")
    dtype = _DTYPES[config.cache_dtype]
    stats = PrepareStats()
    settings = {k: v for k, v in asdict(config).items()}
    clips: list[_Clip] = []
    meta_shape: tuple[int, ...] | None = None
    try:
        for video, caption in pairs:
            key = _digest(
                {"v": CACHE_VERSION, "video": hashes(video), "settings": settings, "encoder": encoder.fingerprint}
            )
            path = cache / "latents" / f"{key}.safetensors"
            if path.exists():
                stats.videos_cached += 1
            else:
                codec = encoder.get()
                frames = read_clip(video, config.fps, config.height, config.width, config.max_frames)
                usable = 1 + (len(frames) - 1) // codec.temporal_factor * codec.temporal_factor
                x = torch.from_numpy(frames[:usable]).permute(0, 3, 1, 2).float() / 255.0  # [F, 3, H, W]
                latents = codec.encode(x)[0].to(dtype)  # [C, F', h, w]
                meta = {"source": str(video), "caption": caption, "settings": json.dumps(settings)}
                _save_tensor(path, "latents", latents, meta)
                stats.videos_encoded += 1
                log.info("encoded %s: %d frames -> latents %s", video, usable, list(latents.shape))
            with safe_open(str(path), framework="pt") as f:
                shape = tuple(f.get_slice("latents").get_shape())
            meta_shape = meta_shape or shape
            if shape[-2:] != meta_shape[-2:] or shape[0] != meta_shape[0]:
                raise ValueError(f"cached latents of {video} are {list(shape)}, others {list(meta_shape)}")
            if shape[1] < min_latent_frames:
                stats.too_short.append(str(video))
                continue
            clips.append(_Clip(path, shape[1], caption))
        text_files = _prepare_captions(cache, {c for _, c in pairs} | {""}, embedder, config, stats)
    finally:
        hashes.save()
        encoder.release()
        embedder.release()
    if stats.too_short:
        log.warning(
            "%d video(s) give fewer than %d latent frames (the training buffer) and are left out: %s",
            len(stats.too_short),
            min_latent_frames,
            stats.too_short[:10],
        )
    if not clips:
        raise ValueError(
            f"no video under {data_dir} is long enough: the buffer of {min_latent_frames} latent frames needs "
            f"clips of at least {1 + 4 * (min_latent_frames - 1)} frames at {config.fps} fps (video.max_frames="
            f"{config.max_frames}); use longer videos, a higher max_frames or a smaller buffer"
        )
    log.info(
        "video data: %d clips (%d encoded now, %d cached), %d captions (%d encoded now, %d cached)",
        len(clips),
        stats.videos_encoded,
        stats.videos_cached,
        len(text_files),
        stats.captions_encoded,
        stats.captions_cached,
    )
    return VideoClips(clips, text_files, config, stats, text_len=text_len)


def _prepare_captions(
    cache: Path, captions: set[str], embedder: Lazy[TextEmbedder], config: VideoDataConfig, stats: PrepareStats
) -> dict[str, Path]:
    dtype = _DTYPES[config.cache_dtype]

    def key(caption: str) -> str:
        fields = {"v": CACHE_VERSION, "text": caption, "dtype": config.cache_dtype, "encoder": embedder.fingerprint}
        return _digest(fields)

    files = {c: cache / "text" / f"{key(c)}.safetensors" for c in sorted(captions)}
    todo = [c for c, p in files.items() if not p.exists()]
    stats.captions_cached = len(files) - len(todo)
    for i in range(0, len(todo), 64):
        batch = todo[i : i + 64]
        for caption, emb in zip(batch, embedder.get().embed(batch)):
            _save_tensor(files[caption], "embedding", emb.to(dtype), {"caption": caption})
        stats.captions_encoded += len(batch)
    return files


# ----------------------------------------------------------------------------------------------------------
# Training clips
# ----------------------------------------------------------------------------------------------------------


class VideoClips:
    """Cached latent clips and caption embeddings as a :class:`ClipSource` (windows read from disk per draw)."""

    codec = "wan2.1"
    """``streamdit.codec`` of models trained on these latents: Wan 2.1's normalised latent space
    (:func:`~streamdit_core.codec.wan21_codec`, listed in :data:`~streamdit_core.codec.LATENT_CODECS`), the name
    :func:`~streamdit_core.pipeline.load_pipeline` and ComfyUI's StreamDiT Decode node understand."""

    def __init__(
        self,
        clips: list[_Clip],
        text_files: dict[str, Path],
        config: VideoDataConfig,
        stats: PrepareStats | None = None,
        text_len: int | None = None,
        memory_items: int = 1024,
    ) -> None:
        self.items, self.text_files, self.config = clips, text_files, config
        self.stats = stats or PrepareStats()
        self.text_len = text_len
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._memory_items = memory_items

    def __len__(self) -> int:
        return len(self.items)

    def clips(self, batch: int, frames: int, generator: torch.Generator) -> tuple[torch.Tensor, list[list[str]]]:
        """``batch`` windows of ``frames`` latent frames ``[b, C, frames, h, w]`` (float32) and their captions."""
        picks = torch.randint(len(self.items), (batch,), generator=generator).tolist()
        out, captions = [], []
        for i in picks:
            clip = self.items[i]
            if clip.frames < frames:
                raise ValueError(f"{clip.latents} has {clip.frames} latent frames, fewer than the buffer {frames}")
            start = int(torch.randint(clip.frames - frames + 1, (1,), generator=generator))
            with safe_open(str(clip.latents), framework="pt") as f:
                out.append(f.get_slice("latents")[:, start : start + frames].float())
            captions.append([clip.caption] * frames)
        return torch.stack(out), captions

    def _embedding(self, text: str) -> torch.Tensor:
        if text not in self._memory:
            if text not in self.text_files:
                raise KeyError(f"caption {text!r} has no cached text embedding (it is not in the data set)")
            with safe_open(str(self.text_files[text]), framework="pt") as f:
                self._memory[text] = f.get_tensor("embedding").float()
            if len(self._memory) > self._memory_items:
                self._memory.popitem(last=False)
        self._memory.move_to_end(text)
        return self._memory[text]

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Cached embeddings zero-padded to ``[n, text_len, D]`` (float32, CPU)."""
        embs = [self._embedding(t) for t in texts]
        return pad_embeddings(embs, self.text_len or max(e.shape[0] for e in embs))

    def defaults(self) -> dict[str, object]:
        return {"height": self.config.height, "width": self.config.width, "fps": _fps_number(self.config.fps)}


def _fps_number(fps: float) -> float | int:
    f = Fraction(fps).limit_denominator(1001)
    return int(f) if f.denominator == 1 else float(f)


# ----------------------------------------------------------------------------------------------------------
# Command line glue (train / distill --data)
# ----------------------------------------------------------------------------------------------------------


def _model_config(init: str | None, preset_name: str) -> ModelConfig:
    """The config of the model training will start from, read without loading its weights."""
    from .checkpoint import read_metadata
    from .config import preset
    from .wan import _shapes, infer_wan_config, strip_prefix

    if init is None:
        return preset(preset_name)
    meta = read_metadata(init)
    if "streamdit.model_config" in meta:
        return ModelConfig.from_json(meta["streamdit.model_config"])
    shapes = _shapes(init)
    _, keys = strip_prefix(list(shapes))
    return infer_wan_config({k: shapes[v] for k, v in keys.items()})


def video_config(overrides: dict[str, object]) -> VideoDataConfig:
    known = {f.name for f in fields(VideoDataConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown video settings {unknown}; known: {sorted(known)}")
    return VideoDataConfig(**overrides)  # type: ignore[arg-type]


def video_source(args: Any, cfg: Any, init: str | None, device: str | torch.device) -> VideoClips:
    """Prepare ``--data`` with ``--vae`` / ``--text-encoder`` (/ ``--tokenizer``, ``--cache``) for ``cfg``
    (a ``TrainConfig``) and check that the latents and embeddings fit the model that ``init`` holds."""
    from .encoders import load_umt5, load_wan_vae, umt5_fingerprint, wan_vae_fingerprint

    if not args.vae or not args.text_encoder:
        raise ValueError("--data needs --vae (the Wan 2.1 VAE) and --text-encoder (umT5); see docs/FINETUNE_WAN.md")
    vcfg = video_config(dict(cfg.video))
    mcfg = _model_config(init, cfg.model)
    dev = torch.device(device)
    text_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    encoder: Lazy[LatentEncoder] = Lazy(wan_vae_fingerprint(args.vae), lambda: load_wan_vae(args.vae, dev))
    embedder: Lazy[TextEmbedder] = Lazy(
        umt5_fingerprint(args.text_encoder, args.tokenizer, mcfg.text_len),
        lambda: load_umt5(args.text_encoder, args.tokenizer, dev, text_dtype, mcfg.text_len),
    )
    cache = Path(args.cache) if args.cache else Path(args.data) / ".streamdit-cache"
    clips = prepare_video_data(args.data, cache, vcfg, encoder, embedder, cfg.buffer, text_len=mcfg.text_len)
    check_fits(clips, mcfg)
    return clips


def check_fits(clips: VideoClips, mcfg: ModelConfig) -> None:
    """Raise ``ValueError`` if the cached latents or text embeddings do not fit the model's layout."""
    with safe_open(str(clips.items[0].latents), framework="pt") as f:
        channels, _, h, w = f.get_slice("latents").get_shape()
    text_dim = clips.embed([""]).shape[-1]
    problems = []
    if channels != mcfg.in_dim:
        problems.append(f"latents have {channels} channels, the model takes in_dim={mcfg.in_dim}")
    if text_dim != mcfg.text_dim:
        problems.append(f"text embeddings are {text_dim} wide, the model takes text_dim={mcfg.text_dim}")
    if h % mcfg.patch_size[1] or w % mcfg.patch_size[2]:
        problems.append(f"latent size {h}x{w} is not a multiple of the patch {mcfg.patch_size[1:]}")
    if problems:
        raise ValueError("the video data does not fit the model: " + "; ".join(problems))
