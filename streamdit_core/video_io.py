"""Video files in and out: MP4 (H.264), animated WEBP/GIF, PNG contact sheets, and an append-only stream writer.

Pure library code: PyAV, Pillow and NumPy only (torch tensors are accepted duck-typed; torch is never imported
here, and nothing here imports ComfyUI).

Frames
    Every writer takes ``frames`` in one of two layouts, named explicitly by ``layout``:

    * ``"FHWC"`` (default): ``[F, H, W, C]`` — ComfyUI ``IMAGE`` (float 0..1 on CPU) and NumPy ``uint8`` video.
    * ``"FCHW"``: ``[F, C, H, W]`` — a PyTorch-style tensor, e.g. a decoded latent chunk.

    ``C`` is 3 (RGB); 1 (grey, repeated to RGB) and 4 (RGBA, alpha dropped) are also accepted. Floating point
    input is read as 0..1 (clamped, then rounded to the nearest of 256 levels); ``uint8`` input is used as is.
    :func:`to_uint8_frames` does this conversion and returns NumPy ``uint8 [F, H, W, 3]``.

Atomic files
    Every function that writes a file writes a hidden temporary file in the same folder and moves it over the
    destination with :func:`os.replace` only when it is complete, so a crash or an exception never leaves a
    truncated file behind: the destination is either the previous file or the new one.

Odd sizes
    H.264 in ``yuv420p`` (the pixel format every player and browser decodes) needs an even width and height.
    :func:`write_mp4` and :class:`StreamVideoWriter` pad an odd height or width by one row or column that repeats
    the last one (edge padding), so no content is cropped; the video is then at most one pixel larger.

Streams
    :class:`StreamVideoWriter` appends frames to one MP4 across many calls, processes and server restarts. Its
    state lives on disk, in a hidden sidecar folder ``<file>.parts/`` beside the video::

        outputs/stream.mp4                  the playable video (rebuilt after every append)
        outputs/stream.mp4.parts/
            manifest.json                   fps, size, codec settings and the committed segments
            000001.mp4, 000002.mp4, ...     one H.264 segment per append (encoded once, never re-encoded)

    An append (1) encodes the new frames into a temporary segment and renames it into place, (2) commits it by
    rewriting ``manifest.json`` atomically, and (3) remuxes all committed segments (packet copy, no re-encoding)
    into a temporary MP4 that replaces the video. A crash before (2) leaves the previous video and frame count
    untouched (the orphan segment is deleted on the next append); a crash between (2) and (3) leaves the previous
    video playable, and the next append (or :meth:`StreamVideoWriter.rebuild`) brings it up to date. Every
    ``compact_after`` appends the rebuilt video itself becomes the only segment (a file copy), so the folder stays
    small; each append costs one encode of the new frames plus a packet copy of the whole video.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .log import get_logger


def require_av() -> Any:
    """PyAV, imported on first use: PNG, WEBP and GIF output work without it (a training machine may lack it)."""
    try:
        import av
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("MP4 reading and writing need PyAV: pip install av") from error
    return av

__all__ = [
    "Layout",
    "VideoInfo",
    "to_uint8_frames",
    "pad_to_even",
    "write_mp4",
    "write_webp",
    "write_gif",
    "write_contact_sheet",
    "read_video",
    "sample_indices",
    "probe_video",
    "StreamVideoWriter",
    "require_av",
]

log = get_logger("video_io")

Layout = Literal["FHWC", "FCHW"]
PathLike = str | os.PathLike[str]

_MANIFEST_VERSION = 1
_H264_CODECS = ("libx264", "libopenh264")


# ------------------------------------------------------------------------------------------------------------
# Frame conversion
# ------------------------------------------------------------------------------------------------------------


def to_uint8_frames(frames: Any, layout: Layout = "FHWC") -> np.ndarray:
    """Convert a clip to NumPy ``uint8 [F, H, W, 3]``.

    Args:
        frames: a torch tensor or NumPy array, ``[F, H, W, C]`` for ``layout="FHWC"`` or ``[F, C, H, W]`` for
            ``layout="FCHW"``, with ``C`` in {1, 3, 4}. Floating point values are 0..1 (clamped); ``uint8``
            values are used unchanged. Any device and dtype (bfloat16 included) is accepted.
        layout: which axis holds the channels (see the module docstring).

    Returns:
        ``np.ndarray`` of dtype ``uint8`` and shape ``[F, H, W, 3]``, C-contiguous.

    Raises:
        ValueError: for a wrong rank, an unknown layout, an unsupported channel count, an empty clip or an
            unsupported dtype; the message names the shape and suggests the other layout when it would fit.
    """
    if layout not in ("FHWC", "FCHW"):
        raise ValueError(f"layout must be 'FHWC' or 'FCHW', got {layout!r}")
    array = _as_numpy(frames)
    if array.ndim != 4:
        raise ValueError(
            f"frames must be 4-D ([F, H, W, C] for layout='FHWC', [F, C, H, W] for 'FCHW'), got shape {array.shape}"
        )
    channel_axis = 3 if layout == "FHWC" else 1
    channels = array.shape[channel_axis]
    if channels not in (1, 3, 4):
        other: Layout = "FCHW" if layout == "FHWC" else "FHWC"
        hint = ""
        if array.shape[3 if other == "FHWC" else 1] in (1, 3, 4):
            hint = f"; shape {array.shape} looks like layout={other!r}"
        raise ValueError(
            f"frames with layout={layout!r} need 1, 3 or 4 channels on axis {channel_axis}, got {channels}{hint}"
        )
    if layout == "FCHW":
        array = array.transpose(0, 2, 3, 1)  # [F, H, W, C]
    if array.shape[0] == 0 or array.shape[1] == 0 or array.shape[2] == 0:
        raise ValueError(f"frames must hold at least one non-empty frame, got shape {array.shape} (as FHWC)")
    if array.dtype == np.uint8:
        out = array
    elif np.issubdtype(array.dtype, np.floating):
        out = np.rint(np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    elif array.dtype == np.bool_:
        out = array.astype(np.uint8) * 255
    else:
        raise ValueError(f"frames must be float (0..1) or uint8, got dtype {array.dtype}")
    if out.shape[3] == 1:
        out = np.repeat(out, 3, axis=3)  # grey -> RGB
    elif out.shape[3] == 4:
        out = out[..., :3]  # drop alpha
    return np.ascontiguousarray(out)


def _as_numpy(frames: Any) -> np.ndarray:
    """A torch tensor (any device/dtype) or array-like as a NumPy array, without importing torch."""
    if hasattr(frames, "detach") and hasattr(frames, "cpu"):  # torch.Tensor, duck-typed
        tensor = frames.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # bfloat16/float16 have no NumPy equivalent (bf16) or lose nothing here
        return np.asarray(tensor.numpy())
    return np.asarray(frames)


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad ``uint8 [F, H, W, 3]`` to even ``H`` and ``W`` by repeating the last row/column (no-op if even)."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _fps_fraction(fps: float | Fraction) -> Fraction:
    """Frame rate as an exact fraction (29.97 → 2997/100; use ``Fraction(30000, 1001)`` for NTSC exactly)."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if not (math.isfinite(float(fps)) and 0 < float(fps) <= 1000):
        raise ValueError(f"fps must be in (0, 1000], got {fps!r}")
    return Fraction(fps).limit_denominator(1001)


# ------------------------------------------------------------------------------------------------------------
# Atomic file helpers
# ------------------------------------------------------------------------------------------------------------


@contextmanager
def _atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it over ``path``, on error delete it.

    The temporary name is hidden (``.<name>.tmp<random><suffix>``) and keeps the suffix, so tools that guess the
    format from the extension still work.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp_beside(final)
    try:
        yield tmp
        _replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_temp_beside(final: Path) -> Path:
    """Create an empty, uniquely named hidden file beside ``final``.

    Unlike :func:`tempfile.mkstemp` (mode 0600), the file gets the usual permissions (0666 minus the umask), so
    the finished file is as readable as any other file the process writes.
    """
    for _ in range(100):
        tmp = final.with_name(f".{final.stem}.tmp{secrets.token_hex(4)}{final.suffix}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {final}")


def _replace(src: Path, dst: Path, attempts: int = 5) -> None:
    """``os.replace`` with a few retries: on Windows the destination may be briefly open in a player."""
    for attempt in range(attempts):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if attempt == attempts - 1:
                raise
            threading.Event().wait(0.1 * (attempt + 1))


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with _atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")


# ------------------------------------------------------------------------------------------------------------
# MP4 (H.264)
# ------------------------------------------------------------------------------------------------------------


def _h264_codec() -> str:
    for name in _H264_CODECS:
        if name in require_av().codecs_available:
            return name
    raise RuntimeError(
        f"this PyAV build has no H.264 encoder (looked for {', '.join(_H264_CODECS)}); "
        "install the PyAV wheel from PyPI: pip install --force-reinstall av"
    )


def _encode_h264(frames: np.ndarray, path: Path, fps: Fraction, crf: int, faststart: bool = True) -> None:
    """Encode ``uint8 [F, H, W, 3]`` (even H and W) into an MP4 file at ``path`` (not atomic by itself)."""
    codec = _h264_codec()
    options = {"crf": str(crf), "preset": "medium"} if codec == "libx264" else {}
    container_options = {"movflags": "+faststart"} if faststart else {}
    av = require_av()
    with av.open(str(path), mode="w", format="mp4", options=container_options) as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            frame.time_base = 1 / fps
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush delayed frames


def write_mp4(frames: Any, path: PathLike, fps: float | Fraction, crf: int = 18, layout: Layout = "FHWC") -> Path:
    """Write an H.264 (``yuv420p``) MP4, atomically.

    Args:
        frames: the clip, ``[F, H, W, C]`` or ``[F, C, H, W]`` per ``layout`` (see :func:`to_uint8_frames`).
        path: destination file; its folder is created. An existing file is replaced only on success.
        fps: frames per second (float or :class:`fractions.Fraction`).
        crf: x264 constant rate factor, 0 (lossless) … 51; 18 is visually lossless for most content.
        layout: ``"FHWC"`` (ComfyUI ``IMAGE``) or ``"FCHW"``.

    Returns:
        The destination path. An odd height or width is padded by one repeated row/column (module docstring).
    """
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an integer in [0, 51], got {crf!r}")
    rate = _fps_fraction(fps)
    rgb = pad_to_even(to_uint8_frames(frames, layout))
    with _atomic_path(path) as tmp:
        _encode_h264(rgb, tmp, rate, crf)
    return Path(path)


# ------------------------------------------------------------------------------------------------------------
# Animated WEBP / GIF
# ------------------------------------------------------------------------------------------------------------


def _frame_duration_ms(fps: float | Fraction) -> int:
    return max(1, round(1000 / float(_fps_fraction(fps))))


def write_webp(
    frames: Any,
    path: PathLike,
    fps: float | Fraction,
    quality: int = 90,
    lossless: bool = False,
    layout: Layout = "FHWC",
) -> Path:
    """Write an animated WEBP that loops forever, atomically.

    Args:
        frames: ``[F, H, W, C]`` or ``[F, C, H, W]`` per ``layout``; any size (no padding).
        path: destination file. fps: frames per second (WEBP stores whole milliseconds per frame).
        quality: 0..100 for lossy WEBP. lossless: store exact pixels (larger files).

    Returns:
        The destination path.
    """
    if not 0 <= quality <= 100:
        raise ValueError(f"quality must be in [0, 100], got {quality}")
    images = [Image.fromarray(rgb) for rgb in to_uint8_frames(frames, layout)]
    with _atomic_path(path) as tmp:
        images[0].save(
            tmp,
            format="WEBP",
            save_all=True,
            append_images=images[1:],
            duration=_frame_duration_ms(fps),
            loop=0,
            quality=quality,
            lossless=lossless,
            method=4,
        )
    return Path(path)


def write_gif(frames: Any, path: PathLike, fps: float | Fraction, layout: Layout = "FHWC") -> Path:
    """Write an animated GIF (256-colour palette per frame, loops forever), atomically.

    GIF stores delays in 10 ms units, so the frame rate is approximate. Prefer MP4 or WEBP where possible.
    """
    images = [
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE) for rgb in to_uint8_frames(frames, layout)
    ]
    with _atomic_path(path) as tmp:
        images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=_frame_duration_ms(fps), loop=0
        )
    return Path(path)


# ------------------------------------------------------------------------------------------------------------
# Contact sheet
# ------------------------------------------------------------------------------------------------------------


def sample_indices(num_frames: int, max_frames: int) -> list[int]:
    """``min(num_frames, max_frames)`` frame indices spread evenly over ``[0, num_frames)``, first and last included."""
    if num_frames < 1 or max_frames < 1:
        raise ValueError(f"num_frames and max_frames must be >= 1, got {num_frames} and {max_frames}")
    count = min(num_frames, max_frames)
    if count == 1:
        return [0]
    return sorted({round(i * (num_frames - 1) / (count - 1)) for i in range(count)})


def write_contact_sheet(
    frames: Any,
    path: PathLike,
    columns: int = 8,
    max_frames: int = 32,
    label: bool = True,
    index_offset: int = 0,
    max_width: int = 2048,
    layout: Layout = "FHWC",
) -> Path:
    """Write a PNG grid of up to ``max_frames`` evenly sampled frames, each labelled with its frame index.

    Args:
        frames: ``[F, H, W, C]`` or ``[F, C, H, W]`` per ``layout``.
        path: destination PNG. columns: tiles per row (fewer if there are fewer frames).
        max_frames: how many frames to sample (first and last always included).
        label: draw ``#<index>`` in the top-left corner of each tile.
        index_offset: added to the printed index (e.g. the stream's frame counter at the clip's first frame).
        max_width: tiles are scaled down (never up) so the sheet is at most this wide; 0 keeps native size.

    Returns:
        The destination path.
    """
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    rgb = to_uint8_frames(frames, layout)
    indices = sample_indices(rgb.shape[0], max_frames)
    cols = min(columns, len(indices))
    rows = math.ceil(len(indices) / cols)
    height, width = rgb.shape[1:3]
    gap = 2
    scale = 1.0 if not max_width else min(1.0, (max_width - gap * (cols + 1)) / (cols * width))
    tile_w, tile_h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    sheet = Image.new("RGB", (cols * tile_w + gap * (cols + 1), rows * tile_h + gap * (rows + 1)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = _label_font(max(10, min(tile_h // 8, 24)))
    for slot, index in enumerate(indices):
        x = gap + (slot % cols) * (tile_w + gap)
        y = gap + (slot // cols) * (tile_h + gap)
        tile = Image.fromarray(rgb[index])
        if (tile_w, tile_h) != (width, height):
            tile = tile.resize((tile_w, tile_h), Image.Resampling.LANCZOS)
        sheet.paste(tile, (x, y))
        if label:
            text = f"#{index + index_offset}"
            left, top, right, bottom = draw.textbbox((x + 3, y + 2), text, font=font)
            draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(0, 0, 0))
            draw.text((x + 3, y + 2), text, fill=(255, 255, 255), font=font)
    with _atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)


def _label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 ships a scalable default font
    except TypeError:  # pragma: no cover - older Pillow
        return ImageFont.load_default()


# ------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` reads from a file's first video stream."""

    frames: int
    """Number of frames (from the container, or counted by decoding when the container does not say)."""
    fps: Fraction
    width: int
    height: int


def probe_video(path: PathLike) -> VideoInfo:
    """Frame count, frame rate and size of the first video stream in ``path``."""
    with _open_for_reading(path) as container:
        stream = _first_video_stream(container, path)
        frames = int(stream.frames or 0)
        if frames <= 0:
            frames = sum(1 for _ in container.decode(stream))
        rate = stream.average_rate or stream.guessed_rate or Fraction(0)
        return VideoInfo(frames=frames, fps=Fraction(rate), width=stream.width, height=stream.height)


def read_video(path: PathLike, max_frames: int | None = None) -> np.ndarray:
    """Decode a video file (anything FFmpeg reads: MP4, WEBM, MOV, GIF, …) to RGB frames.

    Args:
        path: the video file.
        max_frames: stop after this many frames (``None``: all).

    Returns:
        ``np.ndarray`` ``uint8 [F, H, W, 3]``.

    Raises:
        FileNotFoundError: the file does not exist. ValueError: no video stream, no decodable frame, or a bad
        ``max_frames``.
    """
    if max_frames is not None and (isinstance(max_frames, bool) or max_frames < 1):
        raise ValueError(f"max_frames must be None or >= 1, got {max_frames!r}")
    out: list[np.ndarray] = []
    with _open_for_reading(path) as container:
        stream = _first_video_stream(container, path)
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            out.append(frame.to_ndarray(format="rgb24"))  # [H, W, 3]
            if max_frames is not None and len(out) >= max_frames:
                break
    if not out:
        raise ValueError(f"no decodable video frames in {path}")
    return np.stack(out)  # [F, H, W, 3]


@contextmanager
def _open_for_reading(path: PathLike) -> Iterator[Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    av = require_av()
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as error:
        raise ValueError(f"cannot read {path} as a video: {error}") from error
    try:
        yield container
    finally:
        container.close()


def _first_video_stream(container: Any, path: PathLike) -> Any:
    if not container.streams.video:
        raise ValueError(f"{path} has no video stream")
    return container.streams.video[0]


# ------------------------------------------------------------------------------------------------------------
# Stream writer: one MP4 that grows by one segment per append
# ------------------------------------------------------------------------------------------------------------

_PATH_LOCKS: dict[str, threading.Lock] = {}
_PATH_LOCKS_GUARD = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    key = os.path.realpath(path)
    with _PATH_LOCKS_GUARD:
        return _PATH_LOCKS.setdefault(key, threading.Lock())


class StreamVideoWriter:
    """Append frames to one MP4 across many calls, processes and restarts; playable after every append.

    The state lives on disk (see the module docstring), so a fresh writer for the same ``path`` (e.g. in the
    next ComfyUI queue run) continues where the last one stopped. Appends to the same path are serialised within
    a process; do not append to one path from two processes at once.

    Args:
        path: the MP4 to grow. Its sidecar folder is ``<path>.parts/``.
        fps: frames per second. Must match the fps the file was started with (else ``ValueError``).
        crf: x264 quality for new segments (0 … 51).
        compact_after: once the stream has this many segments, the freshly rebuilt video becomes the single
            segment (a file copy, no re-encoding), so the sidecar folder never holds more than this many files.

    Example::

        writer = StreamVideoWriter("outputs/stream.mp4", fps=16)
        writer.append(images)           # ComfyUI IMAGE [F, H, W, 3], float 0..1
        writer.frame_count()            # total frames in outputs/stream.mp4
    """

    def __init__(self, path: PathLike, fps: float | Fraction, crf: int = 18, compact_after: int = 32) -> None:
        if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
            raise ValueError(f"crf must be an integer in [0, 51], got {crf!r}")
        self.path = Path(path)
        self.fps = _fps_fraction(fps)
        self.crf = crf
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self._manifest_path = self.parts_dir / "manifest.json"
        if compact_after < 2:
            raise ValueError(f"compact_after must be >= 2, got {compact_after}")
        self.compact_after = compact_after
        self._lock = _lock_for(self.path)

    # -- public API ------------------------------------------------------------------------------------------

    def frame_count(self) -> int:
        """Frames committed to this stream, read from the manifest on disk (0 for a new stream)."""
        manifest = self._read_manifest()
        return int(manifest["frames"]) if manifest else 0

    def append(self, frames: Any, layout: Layout = "FHWC") -> int:
        """Encode ``frames`` as a new segment, commit it and rebuild the video.

        Args:
            frames: ``[F, H, W, C]`` or ``[F, C, H, W]`` per ``layout`` (see :func:`to_uint8_frames`). Their size
                must equal the stream's size (the first append fixes it; odd sizes are padded to even).

        Returns:
            The total number of frames in the stream after this append.

        Raises:
            ValueError: the size or fps differs from the stream's. Any exception leaves the video and the frame
            count as they were before the call.
        """
        rgb = pad_to_even(to_uint8_frames(frames, layout))
        height, width = rgb.shape[1:3]
        with self._lock:
            manifest = self._read_manifest() or self._new_manifest(width, height)
            self._check_compatible(manifest, width, height)
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            self._remove_orphans(manifest)
            name = self._next_segment_name(manifest)
            with _atomic_path(self.parts_dir / name) as tmp:
                _encode_h264(rgb, tmp, self.fps, self.crf, faststart=False)
            manifest["segments"].append({"file": name, "frames": int(rgb.shape[0])})
            manifest["frames"] = int(manifest["frames"]) + int(rgb.shape[0])
            _write_json_atomic(self._manifest_path, manifest)  # the commit point
            self._rebuild_locked(manifest)
            return int(manifest["frames"])

    def rebuild(self) -> None:
        """Rewrite the video from the committed segments (after a crash between commit and rebuild)."""
        with self._lock:
            manifest = self._read_manifest()
            if manifest and manifest["segments"]:
                self._rebuild_locked(manifest)

    def reset(self) -> None:
        """Delete the video and its ``.parts`` folder; the next append starts a new stream."""
        with self._lock:
            self.path.unlink(missing_ok=True)
            if self.parts_dir.is_dir():
                for child in self.parts_dir.iterdir():
                    child.unlink(missing_ok=True)
                self.parts_dir.rmdir()

    # -- internals -------------------------------------------------------------------------------------------

    def _new_manifest(self, width: int, height: int) -> dict[str, Any]:
        return {
            "version": _MANIFEST_VERSION,
            "fps": f"{self.fps.numerator}/{self.fps.denominator}",
            "width": width,
            "height": height,
            "crf": self.crf,
            "frames": 0,
            "segments": [],
            "next_segment": 1,
        }

    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            text = self._manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        manifest: dict[str, Any] = json.loads(text)
        if manifest.get("version") != _MANIFEST_VERSION:
            raise ValueError(f"{self._manifest_path} has unsupported version {manifest.get('version')!r}")
        return manifest

    def _check_compatible(self, manifest: dict[str, Any], width: int, height: int) -> None:
        if (manifest["width"], manifest["height"]) != (width, height):
            raise ValueError(
                f"frames are {width}x{height} (after even padding) but stream {self.path} is "
                f"{manifest['width']}x{manifest['height']}; reset the stream or write to a new file"
            )
        if Fraction(manifest["fps"]) != self.fps:
            raise ValueError(
                f"fps {self.fps} differs from stream {self.path}'s fps {Fraction(manifest['fps'])}; "
                "reset the stream or write to a new file"
            )

    def _remove_orphans(self, manifest: dict[str, Any]) -> None:
        """Delete segments and temp files that no committed manifest refers to (left by a crash)."""
        keep = {segment["file"] for segment in manifest["segments"]} | {self._manifest_path.name}
        for child in self.parts_dir.iterdir():
            if child.name not in keep and child.is_file():
                log.info("removing uncommitted stream segment %s", child)
                child.unlink(missing_ok=True)

    @staticmethod
    def _next_segment_name(manifest: dict[str, Any]) -> str:
        """A segment name never used before in this stream (so a crash can never leave a stale file under it)."""
        number = int(manifest.get("next_segment", len(manifest["segments"]) + 1))
        manifest["next_segment"] = number + 1
        return f"{number:06d}.mp4"

    def _rebuild_locked(self, manifest: dict[str, Any]) -> None:
        segments = [(self.parts_dir / segment["file"], int(segment["frames"])) for segment in manifest["segments"]]
        try:
            with _atomic_path(self.path) as tmp:
                _remux_segments(segments, tmp, self.fps)
        except PermissionError:
            # Windows: a player holds the file open. The frames are committed; the next append rebuilds.
            log.warning(
                "could not replace %s (is it open in a player?); it will be updated on the next append", self.path
            )
            return
        if len(manifest["segments"]) >= self.compact_after:
            self._compact_locked(manifest)

    def _compact_locked(self, manifest: dict[str, Any]) -> None:
        """Replace all segments by one copy of the just-rebuilt video (which holds exactly the committed frames).

        Crash-safe in the same way as an append: the copy is written atomically under a new name, the manifest
        that lists only it is the commit point, and the old segments become orphans that the next append deletes.
        """
        name = self._next_segment_name(manifest)
        with _atomic_path(self.parts_dir / name) as tmp:
            shutil.copyfile(self.path, tmp)
        old = [segment["file"] for segment in manifest["segments"]]
        manifest["segments"] = [{"file": name, "frames": int(manifest["frames"])}]
        _write_json_atomic(self._manifest_path, manifest)
        for file in old:
            (self.parts_dir / file).unlink(missing_ok=True)


def _remux_segments(segments: Sequence[tuple[Path, int]], out_path: Path, fps: Fraction) -> None:
    """Concatenate H.264 MP4 segments into one MP4 by packet copy (no re-encoding), with continuous timestamps.

    Args:
        segments: ``(file, frame count)`` pairs in stream order.
        out_path: the MP4 to write (not atomic by itself). fps: the stream's frame rate.

    Segment ``i`` starts at ``(frames before it) / fps`` seconds; within a segment the packets keep their own
    spacing, shifted so the first presented frame starts at that time (B-frame decode delays stay intact).
    All segments must share the codec parameters (size, pixel format, SPS/PPS); the writer guarantees that by
    encoding every segment with the same settings, and a mismatch raises ``ValueError``.
    """
    av = require_av()
    with av.open(str(out_path), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
        out_stream: Any = None
        extradata: bytes | None = None
        frames_before = 0
        for segment, frame_count in segments:
            with av.open(str(segment), mode="r") as source:
                in_stream = source.streams.video[0]
                if out_stream is None:
                    out_stream = out.add_stream_from_template(in_stream)
                    extradata = in_stream.codec_context.extradata
                elif in_stream.codec_context.extradata != extradata:
                    raise ValueError(f"segment {segment} was encoded with different codec parameters")
                time_base = Fraction(in_stream.time_base)
                start = round(Fraction(frames_before) / fps / time_base)  # segment start in its own ticks
                first_pts: int | None = None
                for packet in source.demux(in_stream):
                    if packet.dts is None or packet.pts is None:  # demuxer flush packet
                        continue
                    if first_pts is None:
                        first_pts = int(packet.pts)  # the first packet is the IDR frame: smallest pts
                    shift = start - first_pts
                    packet.pts = int(packet.pts) + shift
                    packet.dts = int(packet.dts) + shift
                    packet.stream = out_stream
                    out.mux(packet)
            frames_before += frame_count
