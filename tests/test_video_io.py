"""Tests for streamdit_core.video_io: conversion, atomic writers, reading back, and the append-only stream writer.

Every expectation is independent of the code under test: pixel values are computed by hand, files are read back
with PyAV / Pillow directly, and crashes are injected at the exact points the module documents.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from streamdit_core import video_io
from streamdit_core.video_io import (
    StreamVideoWriter,
    pad_to_even,
    probe_video,
    read_video,
    sample_indices,
    to_uint8_frames,
    write_contact_sheet,
    write_gif,
    write_mp4,
    write_webp,
)

REPO = Path(__file__).resolve().parents[1]


def ramp_clip(frames: int, height: int = 32, width: int = 48, start: int = 0) -> np.ndarray:
    """Float ``[F, H, W, 3]`` clip whose frame k has mean brightness rising with ``start + k`` (order is visible)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width, yy / height, np.full_like(xx, 0.5)], axis=-1) * 0.3  # [H, W, 3] in 0..0.3
    levels = (np.arange(start, start + frames, dtype=np.float32) % 40) / 40 * 0.6  # [F] in 0..0.6
    return (base[None] + levels[:, None, None, None]).astype(np.float32)  # [F, H, W, 3]


def decode_all(path: Path) -> np.ndarray:
    """Decode every frame with PyAV directly (independent of read_video): uint8 ``[F, H, W, 3]``."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def leftovers(folder: Path) -> list[str]:
    """Hidden temp files left in a folder."""
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# ---------------------------------------------------------------------------------------------------------------
# to_uint8_frames / pad_to_even
# ---------------------------------------------------------------------------------------------------------------


def test_float_values_are_clamped_and_rounded_to_nearest_level() -> None:
    values = torch.tensor([-0.5, 0.0, 0.5, 1 / 255 * 0.49, 1 / 255 * 0.51, 1.0, 7.0])
    frames = values.view(1, 1, 7, 1).expand(1, 1, 7, 3)  # FHWC
    out = to_uint8_frames(frames, layout="FHWC")
    assert out.dtype == np.uint8 and out.shape == (1, 1, 7, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 0, 1, 255, 255]


def test_fchw_layout_is_the_transpose_of_fhwc() -> None:
    fhwc = torch.rand(3, 5, 7, 3, generator=torch.Generator().manual_seed(0))
    fchw = fhwc.permute(0, 3, 1, 2).contiguous()
    np.testing.assert_array_equal(to_uint8_frames(fchw, layout="FCHW"), to_uint8_frames(fhwc, layout="FHWC"))
    assert to_uint8_frames(fchw, layout="FCHW").shape == (3, 5, 7, 3)


def test_uint8_numpy_passes_through_and_grey_and_rgba_become_rgb() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8_frames(rgb), rgb)
    rgba = np.concatenate([rgb, np.full((2, 4, 6, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(to_uint8_frames(rgba), rgb)
    grey = rgb[..., :1]
    np.testing.assert_array_equal(to_uint8_frames(grey), np.repeat(grey, 3, axis=-1))


def test_bfloat16_tensor_is_accepted() -> None:
    frames = torch.full((1, 2, 2, 3), 0.5, dtype=torch.bfloat16)
    assert to_uint8_frames(frames).flatten().tolist() == [128] * 12


@pytest.mark.parametrize(
    ("shape", "layout", "message"),
    [
        ((4, 4, 3), "FHWC", "4-D"),
        ((2, 3, 8, 8), "FHWC", "looks like layout='FCHW'"),
        ((2, 8, 8, 3), "FCHW", "looks like layout='FHWC'"),
        ((0, 8, 8, 3), "FHWC", "at least one"),
        ((2, 8, 8, 3), "NCHW", "layout must be"),
    ],
)
def test_bad_frames_get_a_clear_error(shape: tuple[int, ...], layout: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        to_uint8_frames(np.zeros(shape, np.float32), layout=layout)  # type: ignore[arg-type]


def test_integer_frames_other_than_uint8_are_rejected() -> None:
    with pytest.raises(ValueError, match="float .0..1. or uint8"):
        to_uint8_frames(np.zeros((1, 2, 2, 3), np.int32))


def test_pad_to_even_repeats_the_last_row_and_column() -> None:
    frames = np.arange(1 * 3 * 5 * 3, dtype=np.uint8).reshape(1, 3, 5, 3)
    padded = pad_to_even(frames)
    assert padded.shape == (1, 4, 6, 3)
    np.testing.assert_array_equal(padded[:, :3, :5], frames)
    np.testing.assert_array_equal(padded[:, 3, :5], frames[:, 2])
    np.testing.assert_array_equal(padded[:, :3, 5], frames[:, :, 4])
    even = np.zeros((1, 4, 6, 3), np.uint8)
    assert pad_to_even(even) is even


# ---------------------------------------------------------------------------------------------------------------
# write_mp4 / read_video / probe_video
# ---------------------------------------------------------------------------------------------------------------


def test_mp4_round_trip_keeps_frame_count_order_and_fps(tmp_path: Path) -> None:
    clip = ramp_clip(12)
    path = write_mp4(torch.from_numpy(clip), tmp_path / "a.mp4", fps=16)
    decoded = decode_all(path)
    assert decoded.shape == (12, 32, 48, 3)
    expected = to_uint8_frames(clip).astype(np.float32)
    assert np.abs(decoded.astype(np.float32) - expected).mean() < 3.0  # crf 18: visually lossless
    means = decoded.reshape(12, -1).mean(axis=1)
    assert np.all(np.diff(means) > 0), "frames came back out of order"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 16
    assert leftovers(tmp_path) == []


def test_mp4_odd_size_is_padded_to_even_without_cropping(tmp_path: Path) -> None:
    clip = ramp_clip(3, height=31, width=45)
    decoded = read_video(write_mp4(clip, tmp_path / "odd.mp4", fps=8))
    assert decoded.shape == (3, 32, 46, 3)
    assert np.abs(decoded[:, :31, :45].astype(float) - to_uint8_frames(clip)).mean() < 3.0


def test_mp4_accepts_fchw_and_fractional_fps(tmp_path: Path) -> None:
    clip = torch.from_numpy(ramp_clip(4)).permute(0, 3, 1, 2)  # FCHW
    path = write_mp4(clip, tmp_path / "ntsc.mp4", fps=Fraction(30000, 1001), layout="FCHW")
    info = probe_video(path)
    assert (info.frames, info.width, info.height) == (4, 48, 32)
    assert info.fps == Fraction(30000, 1001)


def test_mp4_failure_keeps_the_previous_file_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    path = write_mp4(ramp_clip(5), tmp_path / "keep.mp4", fps=16)
    before = path.read_bytes()

    def broken_encoder(frames, out, fps, crf, faststart=True):  # writes half a file, then fails
        out.write_bytes(before[: len(before) // 2])
        raise RuntimeError("encoder died")

    monkeypatch.setattr(video_io, "_encode_h264", broken_encoder)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_mp4(ramp_clip(9), path, fps=16)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_files_get_the_usual_permissions_not_0600(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    clip = ramp_clip(2)
    for path in (
        write_mp4(clip, tmp_path / "a.mp4", fps=8),
        write_webp(clip, tmp_path / "a.webp", fps=8),
        write_contact_sheet(clip, tmp_path / "a.png"),
    ):
        assert path.stat().st_mode & 0o777 == expected, path.name
    writer = StreamVideoWriter(tmp_path / "s.mp4", fps=8)
    writer.append(clip)
    assert writer.path.stat().st_mode & 0o777 == expected


@pytest.mark.parametrize("crf", [-1, 52, 1.5, True])
def test_mp4_rejects_bad_crf(tmp_path: Path, crf: object) -> None:
    with pytest.raises(ValueError, match="crf"):
        write_mp4(ramp_clip(2), tmp_path / "x.mp4", fps=8, crf=crf)  # type: ignore[arg-type]


@pytest.mark.parametrize("fps", [0, -3, float("nan"), "16"])
def test_mp4_rejects_bad_fps(tmp_path: Path, fps: object) -> None:
    with pytest.raises(ValueError, match="fps"):
        write_mp4(ramp_clip(2), tmp_path / "x.mp4", fps=fps)  # type: ignore[arg-type]


def test_read_video_max_frames_and_errors(tmp_path: Path) -> None:
    path = write_mp4(ramp_clip(10), tmp_path / "r.mp4", fps=16)
    assert read_video(path, max_frames=4).shape == (4, 32, 48, 3)
    np.testing.assert_array_equal(read_video(path, max_frames=4), read_video(path)[:4])
    with pytest.raises(ValueError, match="max_frames"):
        read_video(path, max_frames=0)
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="junk.mp4"):
        read_video(junk)


# ---------------------------------------------------------------------------------------------------------------
# WEBP / GIF / contact sheet
# ---------------------------------------------------------------------------------------------------------------


def test_webp_is_animated_with_the_right_frame_count_size_and_timing(tmp_path: Path) -> None:
    path = write_webp(ramp_clip(6, height=20, width=30), tmp_path / "a.webp", fps=10)
    with Image.open(path) as image:
        assert image.format == "WEBP"
        assert image.n_frames == 6 and image.size == (30, 20)
        image.load()
        assert image.info["duration"] == 100  # ms per frame at 10 fps
        assert image.info.get("loop") == 0
    assert leftovers(tmp_path) == []


def test_webp_lossless_round_trips_exact_pixels(tmp_path: Path) -> None:
    clip = np.random.default_rng(1).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    path = write_webp(clip, tmp_path / "l.webp", fps=5, lossless=True)
    with Image.open(path) as image:
        for k in range(3):
            image.seek(k)
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), clip[k])


def test_gif_is_animated(tmp_path: Path) -> None:
    path = write_gif(ramp_clip(4, height=10, width=12), tmp_path / "a.gif", fps=10)
    with Image.open(path) as image:
        assert image.format == "GIF" and image.n_frames == 4 and image.size == (12, 10)


@pytest.mark.parametrize(
    ("num_frames", "max_frames", "expected"),
    [(1, 32, [0]), (5, 32, [0, 1, 2, 3, 4]), (9, 3, [0, 4, 8]), (100, 4, [0, 33, 66, 99]), (10, 1, [0])],
)
def test_sample_indices_are_even_and_include_both_ends(num_frames: int, max_frames: int, expected: list[int]) -> None:
    assert sample_indices(num_frames, max_frames) == expected


def test_contact_sheet_grid_holds_the_sampled_frames_in_order(tmp_path: Path) -> None:
    frames = 20
    colours = np.linspace(0, 250, frames).round().astype(np.uint8)  # frame k is solid grey level colours[k]
    clip = np.broadcast_to(colours[:, None, None, None], (frames, 16, 24, 3)).copy()
    path = write_contact_sheet(clip, tmp_path / "sheet.png", columns=3, max_frames=5, label=False)
    sheet = np.asarray(Image.open(path).convert("RGB"))
    gap = 2
    assert sheet.shape == (2 * 16 + 3 * gap, 3 * 24 + 4 * gap, 3)  # 5 tiles in 3 columns -> 2 rows
    for slot, index in enumerate([0, 5, 10, 14, 19]):
        y = gap + (slot // 3) * (16 + gap) + 8
        x = gap + (slot % 3) * (24 + gap) + 12
        assert sheet[y, x, 0] == colours[index], f"tile {slot} should show frame {index}"


def test_contact_sheet_labels_draw_text_and_respect_max_width(tmp_path: Path) -> None:
    clip = np.zeros((4, 64, 64, 3), np.uint8)
    plain = np.asarray(Image.open(write_contact_sheet(clip, tmp_path / "p.png", label=False)))
    labelled = np.asarray(Image.open(write_contact_sheet(clip, tmp_path / "l.png", label=True, index_offset=100)))
    assert plain.max() == 24  # background and black tiles only
    assert labelled.max() > 200  # white (anti-aliased) label text
    small = Image.open(write_contact_sheet(np.zeros((8, 100, 400, 3), np.uint8), tmp_path / "s.png", max_width=800))
    assert small.size[0] <= 800


# ---------------------------------------------------------------------------------------------------------------
# StreamVideoWriter
# ---------------------------------------------------------------------------------------------------------------


def test_stream_appends_from_fresh_writers_and_is_playable_after_each(tmp_path: Path) -> None:
    path = tmp_path / "stream.mp4"
    total = 0
    pieces = []
    for run, count in enumerate([5, 8, 3]):
        clip = ramp_clip(count, start=total)
        pieces.append(clip)
        writer = StreamVideoWriter(path, fps=16)  # a new object per "queue run": state must come from disk
        assert writer.frame_count() == total
        total = writer.append(torch.from_numpy(clip))
        assert total == sum(len(p) for p in pieces)
        decoded = decode_all(path)
        assert decoded.shape[0] == total, f"after append {run + 1} the file holds {decoded.shape[0]} frames"
        assert StreamVideoWriter(path, fps=16).frame_count() == total
    expected = to_uint8_frames(np.concatenate(pieces)).astype(np.float32)
    assert np.abs(decoded.astype(np.float32) - expected).mean() < 3.0  # the same frames, in order
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts = [frame.pts for frame in container.decode(stream)]
        assert pts == sorted(pts) and len(set(pts)) == total
        assert float(stream.duration * stream.time_base) == pytest.approx(total / 16)
    assert leftovers(tmp_path) == [] and leftovers(writer.parts_dir) == []


def test_stream_crash_while_encoding_a_segment_keeps_the_previous_video(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "s.mp4"
    writer = StreamVideoWriter(path, fps=16)
    writer.append(ramp_clip(6))
    real_encode = video_io._encode_h264

    def crash_mid_segment(frames, out, fps, crf, faststart=True):
        real_encode(frames, out, fps, crf, faststart)
        with open(out, "r+b") as handle:  # leave a partially written segment behind, then die
            handle.truncate(os.path.getsize(out) // 2)
        raise RuntimeError("killed mid-append")

    monkeypatch.setattr(video_io, "_encode_h264", crash_mid_segment)
    with pytest.raises(RuntimeError, match="killed mid-append"):
        StreamVideoWriter(path, fps=16).append(ramp_clip(4, start=6))
    assert decode_all(path).shape[0] == 6
    assert StreamVideoWriter(path, fps=16).frame_count() == 6

    monkeypatch.setattr(video_io, "_encode_h264", real_encode)
    assert StreamVideoWriter(path, fps=16).append(ramp_clip(4, start=6)) == 10
    assert decode_all(path).shape[0] == 10


def test_stream_crash_while_remuxing_keeps_the_previous_video_and_rebuild_recovers(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "s.mp4"
    StreamVideoWriter(path, fps=12).append(ramp_clip(5))
    before = path.read_bytes()

    def crash_in_remux(segments, out, fps):
        out.write_bytes(b"\x00" * 100)
        raise RuntimeError("killed while remuxing")

    monkeypatch.setattr(video_io, "_remux_segments", crash_in_remux)
    with pytest.raises(RuntimeError, match="remuxing"):
        StreamVideoWriter(path, fps=12).append(ramp_clip(3, start=5))
    assert path.read_bytes() == before  # still the old, playable file
    assert decode_all(path).shape[0] == 5
    monkeypatch.undo()
    # The 3 frames were committed before the remux; rebuild (or the next append) brings the video up to date.
    writer = StreamVideoWriter(path, fps=12)
    assert writer.frame_count() == 8
    writer.rebuild()
    assert decode_all(path).shape[0] == 8
    assert leftovers(tmp_path) == []


def test_stream_survives_a_process_killed_mid_append(tmp_path: Path) -> None:
    path = tmp_path / "killed.mp4"
    StreamVideoWriter(path, fps=16).append(ramp_clip(7))
    script = textwrap.dedent(
        f"""
        import os, sys
        import numpy as np
        sys.path.insert(0, {str(REPO)!r})
        from streamdit_core import video_io

        real = video_io._encode_h264
        def die_half_way(frames, out, fps, crf, faststart=True):
            real(frames[: len(frames) // 2], out, fps, crf, faststart)  # half a segment on disk
            os._exit(9)  # the process dies: no exception handlers, no cleanup
        video_io._encode_h264 = die_half_way
        video_io.StreamVideoWriter({str(path)!r}, fps=16).append(np.zeros((6, 32, 48, 3), np.uint8))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    assert decode_all(path).shape[0] == 7
    writer = StreamVideoWriter(path, fps=16)
    assert writer.frame_count() == 7
    assert writer.append(ramp_clip(2, start=7)) == 9
    assert decode_all(path).shape[0] == 9
    assert leftovers(writer.parts_dir) == []  # the dead process's temp segment was cleaned up


def test_stream_rejects_size_and_fps_changes_without_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.mp4"
    StreamVideoWriter(path, fps=16).append(ramp_clip(3))
    before = path.read_bytes()
    with pytest.raises(ValueError, match="48x32"):
        StreamVideoWriter(path, fps=16).append(ramp_clip(3, height=64, width=64))
    with pytest.raises(ValueError, match="fps"):
        StreamVideoWriter(path, fps=24).append(ramp_clip(3))
    assert path.read_bytes() == before
    assert StreamVideoWriter(path, fps=16).frame_count() == 3


def test_stream_odd_size_is_padded_consistently(tmp_path: Path) -> None:
    path = tmp_path / "odd.mp4"
    writer = StreamVideoWriter(path, fps=8)
    writer.append(ramp_clip(2, height=31, width=47))
    writer.append(ramp_clip(2, height=31, width=47, start=2))
    assert decode_all(path).shape == (4, 32, 48, 3)


def test_stream_compacts_segments_without_losing_or_reordering_frames(tmp_path: Path) -> None:
    path = tmp_path / "long.mp4"
    pieces = []
    for run in range(7):
        clip = ramp_clip(3, start=3 * run)
        pieces.append(clip)
        writer = StreamVideoWriter(path, fps=16, compact_after=3)
        assert writer.append(clip) == 3 * (run + 1)
        assert decode_all(path).shape[0] == 3 * (run + 1)
        segments = [p for p in writer.parts_dir.iterdir() if p.suffix == ".mp4"]
        assert 1 <= len(segments) < 3, sorted(p.name for p in segments)
    expected = to_uint8_frames(np.concatenate(pieces)).astype(np.float32)
    decoded = decode_all(path).astype(np.float32)
    assert np.abs(decoded - expected).mean() < 3.0
    assert np.all(np.diff(decoded.reshape(21, -1).mean(axis=1)) > 0), "frames came back out of order"


def test_stream_reset_deletes_file_and_parts(tmp_path: Path) -> None:
    path = tmp_path / "s.mp4"
    writer = StreamVideoWriter(path, fps=16)
    writer.append(ramp_clip(3))
    writer.reset()
    assert not path.exists() and not writer.parts_dir.exists()
    assert writer.frame_count() == 0
    writer.reset()  # resetting an empty stream is fine
    assert StreamVideoWriter(path, fps=24).append(ramp_clip(2, height=16, width=16)) == 2  # new size and fps OK
    assert decode_all(path).shape == (2, 16, 16, 3)


# ---------------------------------------------------------------------------------------------------------------
# Packaging facts the writers rely on
# ---------------------------------------------------------------------------------------------------------------


def test_requirements_txt_matches_pyproject_and_never_lists_torch() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
    requirements = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert requirements == project["dependencies"]
    assert not any(req.lower().startswith("torch") for req in requirements)
    assert "av" in {req.split(">")[0].split("=")[0] for req in requirements}


def test_images_work_without_pyav_and_mp4_names_the_missing_package(tmp_path):
    """A training machine may lack PyAV: contact sheets and WEBP still work, MP4 says what to install."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['av'] = None\n"
        "import numpy as np\n"
        "from streamdit_core import video_io\n"
        "frames = np.zeros((4, 16, 16, 3), dtype=np.uint8)\n"
        f"video_io.write_contact_sheet(frames, r'{tmp_path}/sheet.png')\n"
        f"video_io.write_webp(frames, r'{tmp_path}/clip.webp', fps=8)\n"
        "try:\n"
        f"    video_io.write_mp4(frames, r'{tmp_path}/clip.mp4', fps=8)\n"
        "except ImportError as error:\n"
        "    print('IMPORT-ERROR', error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "IMPORT-ERROR MP4 reading and writing need PyAV: pip install av" in done.stdout
    assert (tmp_path / "sheet.png").stat().st_size > 0 and (tmp_path / "clip.webp").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.webp", "sheet.png"]  # no partial MP4 left
