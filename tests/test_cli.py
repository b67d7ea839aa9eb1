"""The command line writes a playable MP4, an animated WEBP and a contact sheet, and resumes a saved stream."""

import subprocess
import sys

from streamdit_core.video_io import probe_video


def _run(*args):
    return subprocess.run([sys.executable, "-m", "streamdit_core", *args], capture_output=True, text=True, check=False,
                          env={"OMP_NUM_THREADS": "1", "PATH": ""})


def test_generate_writes_files_and_resumes(tmp_path):
    out = tmp_path / "a"
    res = _run("generate", "--schedule", "0: a large red circle moving right on a black background\n8: a small blue square bouncing on a grey background",
               "--seconds", "0.5", "--out", str(out), "--save-state", str(tmp_path / "s.safetensors"))
    assert res.returncode == 0, res.stderr
    assert probe_video(out / "stream.mp4").frames == 8
    assert (out / "stream.webp").stat().st_size > 0 and (out / "stream_contact.png").stat().st_size > 0
    res2 = _run("generate", "--resume", str(tmp_path / "s.safetensors"), "--seconds", "0.25", "--out", str(tmp_path / "b.mp4"))
    assert res2.returncode == 0, res2.stderr
    assert probe_video(tmp_path / "b.mp4").frames == 4


def test_bad_input_is_a_clear_error(tmp_path):
    res = _run("generate", "--schedule", "0: a\nx: b", "--out", str(tmp_path / "c"))
    assert res.returncode == 2 and "line 2, column 1" in res.stderr
    res = _run("generate", "--prompt", "a red circle", "--chunk-size", "3", "--out", str(tmp_path / "d"))
    assert res.returncode == 2 and "chunk size c=3" in res.stderr
