"""The command line writes a playable MP4, an animated WEBP and a contact sheet, and resumes a saved stream."""

import subprocess
import sys

from streamdit_core.video_io import probe_video


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "streamdit_core", *args],
        capture_output=True,
        text=True,
        check=False,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )


def test_generate_writes_files_and_resumes(tmp_path):
    out = tmp_path / "a"
    res = _run(
        "generate",
        "--schedule",
        "0: a large red circle moving right on a black background\n"
        "8: a small blue square bouncing on a grey background",
        "--seconds",
        "0.5",
        "--out",
        str(out),
        "--save-state",
        str(tmp_path / "s.safetensors"),
    )
    assert res.returncode == 0, res.stderr
    assert probe_video(out / "stream.mp4").frames == 8
    assert (out / "stream.webp").stat().st_size > 0 and (out / "stream_contact.png").stat().st_size > 0
    res2 = _run(
        "generate", "--resume", str(tmp_path / "s.safetensors"), "--seconds", "0.25", "--out", str(tmp_path / "b.mp4")
    )
    assert res2.returncode == 0, res2.stderr
    assert probe_video(tmp_path / "b.mp4").frames == 4


def test_bad_input_is_a_clear_error(tmp_path):
    res = _run("generate", "--schedule", "0: a\nx: b", "--out", str(tmp_path / "c"))
    assert res.returncode == 2 and "line 2, column 1" in res.stderr
    res = _run("generate", "--prompt", "a red circle", "--chunk-size", "3", "--out", str(tmp_path / "d"))
    assert res.returncode == 2 and "chunk size c=3" in res.stderr


def test_window_option_is_parsed_and_checked(tmp_path):
    import streamdit_core.evaluate_cli  # noqa: F401  (registers the eval command)
    from streamdit_core.cli import build_parser

    args = build_parser().parse_args(["generate", "--window", "8,8,8"])
    assert args.window == (8, 8, 8) and build_parser().parse_args(["generate"]).window is None
    assert build_parser().parse_args(["eval", "--window", "4x16x16"]).window == (4, 16, 16)
    res = _run("generate", "--prompt", "a red circle", "--window", "4,8", "--out", str(tmp_path / "w"))
    assert res.returncode == 2 and "--window must be three positive integers F,H,W" in res.stderr
    assert not (tmp_path / "w").exists()


def test_eval_generate_fn_wraps_the_sampler(one_thread):
    import torch

    from streamdit_core.evaluate import GenerateRequest
    from streamdit_core.evaluate_cli import sampler_generate_fn
    from streamdit_core.pipeline import placeholder_pipeline
    from streamdit_core.sampler import StreamSampler

    pipe = placeholder_pipeline()
    sampler = StreamSampler(pipe, pipe.default_settings(height=32, width=32))
    generate = sampler_generate_fn(sampler)
    frames = generate(GenerateRequest("0: a red circle\n2: a blue square", num_frames=5, seed=0))
    assert frames.shape == (5, 3, 32, 32)
    video = torch.rand(5, 3, 32, 32)
    near = generate(GenerateRequest("a red circle", num_frames=4, seed=0, video=video, strength=0.05))
    assert (near - video[:4]).abs().mean() < 0.06


def test_demo_schedule_uses_only_the_world_vocabulary():
    from streamdit_core.cli import DEMO_SCHEDULE
    from streamdit_core.prompts import parse_schedule
    from streamdit_core.world import parse_caption

    keyframes = parse_schedule(DEMO_SCHEDULE).keyframes
    assert len(keyframes) >= 3
    for _, prompt in keyframes:
        parse_caption(prompt)  # raises on a word outside the caption grammar
