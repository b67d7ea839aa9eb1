"""The moving-buffer sampler and the stream state, on the placeholder model of the bundled layout."""

import subprocess
import sys

import pytest
import torch

from streamdit_core.pipeline import placeholder_pipeline
from streamdit_core.prompts import PromptSchedule, parse_schedule
from streamdit_core.sampler import StreamSampler, StreamSettings
from streamdit_core.schedule import Partition
from streamdit_core.stream import StateError, load_state, save_state
from streamdit_core.v2v import StreamEnded, VideoSource

SCHEDULE = parse_schedule(
    "0: a large red circle moving left on a black background\n6: a small blue square bouncing on a striped background"
)


@pytest.fixture(scope="module")
def pipe(one_thread):
    return placeholder_pipeline()


def _sampler(pipe, **kw):
    kw.setdefault("height", 32)
    kw.setdefault("width", 32)
    return StreamSampler(pipe, pipe.default_settings(**kw))


def test_ten_chunks_equal_five_save_load_in_fresh_process_five(pipe, tmp_path):
    sampler = _sampler(pipe)
    state = sampler.init_state(7, SCHEDULE)
    _, ten = sampler.advance(state, SCHEDULE, chunks=10)
    half, first = sampler.advance(state, SCHEDULE, chunks=5)
    path = save_state(
        half, tmp_path / "s.safetensors", {"settings": sampler.settings.to_json(), "schedule": SCHEDULE.to_text()}
    )
    script = f"""
import sys, torch
torch.set_num_threads(1)
from streamdit_core.pipeline import placeholder_pipeline
from streamdit_core.prompts import parse_schedule
from streamdit_core.sampler import StreamSampler, StreamSettings
from streamdit_core.stream import load_state
state, meta = load_state({str(path)!r})
pipe = placeholder_pipeline()
sampler = StreamSampler(pipe, StreamSettings.from_json(meta["settings"]))
_, frames = sampler.advance(state, parse_schedule(meta["schedule"]), chunks=5)
torch.save(frames, {str(tmp_path / "rest.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    rest = torch.load(tmp_path / "rest.pt", weights_only=True)
    assert torch.equal(torch.cat([first, rest]), ten)
    assert ten.shape == (20, 3, 32, 32)


def test_same_seed_same_frames_other_seed_other_frames(pipe):
    sampler = _sampler(pipe)
    a = sampler.advance(sampler.init_state(3, SCHEDULE), SCHEDULE, chunks=2)[1]
    b = sampler.advance(sampler.init_state(3, SCHEDULE), SCHEDULE, chunks=2)[1]
    c = sampler.advance(sampler.init_state(4, SCHEDULE), SCHEDULE, chunks=2)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("c,s,warm", [(8, 1, True), (2, 1, True), (2, 2, False), (16, 2, True), (4, 1, False)])
def test_chunk_sizes_run_and_count_calls(pipe, c, s, warm):
    p = Partition.from_buffer(16, c, s=s)
    sampler = _sampler(pipe, partition=p, warm_start=warm)
    state = sampler.init_state(0, SCHEDULE)
    start_calls = state.calls
    state2, frames = sampler.advance(state, SCHEDULE, chunks=2)
    assert frames.shape == (2 * c, 3, 32, 32)
    assert state2.frames_emitted == 2 * c
    if warm:  # the warm start costs (N−1)·s uniform calls; afterwards s calls per chunk
        assert start_calls == (p.N - 1) * s and state2.calls == start_calls + 2 * s
    else:  # the cold start flushes N−1 chunks first
        assert start_calls == 0 and state2.calls == (p.N - 1 + 2) * s


def test_odd_chunk_size_is_rejected_for_a_temporal_patch_of_two(pipe):
    assert pipe.model.config.patch_size[0] == 2
    with pytest.raises(ValueError, match="chunk size c=1 must be a multiple of the model's temporal patch 2"):
        _sampler(pipe, partition=Partition.from_buffer(16, 1))


def test_reference_frames_stay_clean_and_fixed_within_a_chunk(pipe):
    p = Partition(K=2, N=3, c=2, s=2)
    sampler = _sampler(pipe, partition=p)
    state = sampler.init_state(0, SCHEDULE)
    assert torch.all(state.sigmas[:2] == 0)
    nxt, emitted = sampler.step(state, SCHEDULE)
    assert emitted is None and torch.equal(nxt.latents[:, :, :2], state.latents[:, :, :2])
    after, emitted = sampler.step(nxt, SCHEDULE)
    assert emitted is not None
    # the new reference frames are the last K clean frames of (old references + the emitted chunk)
    expected = torch.cat([nxt.latents[:, :, :2], emitted], dim=2)[:, :, -2:]
    assert torch.equal(after.latents[:, :, :2].cpu(), expected.cpu())


def test_advance_does_not_mutate_and_errors_leave_state_unchanged(pipe):
    sampler = _sampler(pipe)
    state = sampler.init_state(1, SCHEDULE)
    before = state.latents.clone()
    calls = []

    def boom(i, total, preview):
        calls.append(i)
        if i == 1:
            raise KeyboardInterrupt("simulated interrupt")

    with pytest.raises(KeyboardInterrupt):
        sampler.advance(state, SCHEDULE, chunks=2, callback=boom)
    assert torch.equal(state.latents, before) and state.frames_emitted == 0
    _, a = sampler.advance(state, SCHEDULE, chunks=1)
    _, b = sampler.advance(sampler.init_state(1, SCHEDULE), SCHEDULE, chunks=1)
    assert torch.equal(a, b)


def test_guidance_uses_two_passes_and_changes_output(pipe):
    plain = _sampler(pipe)
    guided = _sampler(pipe, guidance=3.0)
    a = plain.advance(plain.init_state(0, SCHEDULE), SCHEDULE)[1]
    b = guided.advance(guided.init_state(0, SCHEDULE), SCHEDULE)[1]
    assert not torch.equal(a, b)


def test_prompt_conditioning_is_per_frame(pipe):
    sampler = _sampler(pipe)
    one = PromptSchedule.single("a large red circle moving left on a black background")
    state = sampler.init_state(0, one)
    same_until_switch = parse_schedule(
        "0: a large red circle moving left on a black background\n"
        "40: a small blue square bouncing on a striped background"
    )
    # frames 0..15 are in the buffer; a switch at frame 40 affects nothing yet
    assert torch.equal(sampler.step(state, one)[0].latents, sampler.step(state, same_until_switch)[0].latents)
    switch_at_10 = parse_schedule(
        "0: a large red circle moving left on a black background\n"
        "10: a small blue square bouncing on a striped background"
    )
    moved = sampler.step(state, switch_at_10)[0].latents
    base = sampler.step(state, one)[0].latents
    assert not torch.equal(moved, base)
    # each frame's context is its own frame's prompt: frames 10… of the switched schedule see the new prompt
    emb = sampler.pipeline.encode_prompts(list(switch_at_10.prompts))
    from streamdit_core.prompts import per_frame_context

    ctx = per_frame_context(switch_at_10, list(range(16)), emb)
    assert torch.equal(ctx[0, 9], emb[switch_at_10.keyframes[0][1]]) and torch.equal(
        ctx[0, 10], emb[switch_at_10.keyframes[1][1]]
    )


def test_state_validation_and_errors(pipe, tmp_path):
    sampler = _sampler(pipe)
    state = sampler.init_state(0, SCHEDULE)
    other = _sampler(pipe, partition=Partition(K=0, N=4, c=4, s=1))
    with pytest.raises(ValueError, match="partition"):
        other.step(state, SCHEDULE)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a state")
    with pytest.raises(Exception, match="(?i)header|safetensor|deserializ"):
        load_state(bad)
    d = state.state_dict()
    d["micro_step"] = 5
    with pytest.raises(StateError, match="micro_step"):
        type(state).from_state_dict(d)
    with pytest.raises(ValueError, match="seed"):
        sampler.init_state(-1, SCHEDULE)
    with pytest.raises(ValueError, match="chunks"):
        sampler.advance(state, SCHEDULE, chunks=0)


def test_settings_validation_and_json():
    with pytest.raises(ValueError, match="guidance"):
        StreamSettings(guidance=0.5)
    with pytest.raises(ValueError, match="height"):
        StreamSettings(height=4)
    s = StreamSettings(partition=Partition(K=1, N=3, c=2, s=2), window=(4, 8, 8), shift=2.0)
    assert StreamSettings.from_json(s.to_json()) == s


# -- video-to-video -------------------------------------------------------------------------------------------


def _video(frames=12):
    g = torch.Generator().manual_seed(0)
    return torch.rand(frames, 3, 40, 40, generator=g)


def test_strength_one_equals_text_to_video(pipe):
    sampler = _sampler(pipe)
    t2v = sampler.advance(sampler.init_state(5, SCHEDULE), SCHEDULE, chunks=3)[1]
    video = VideoSource(_video(), strength=1.0)
    v2v = sampler.advance(sampler.init_state(5, SCHEDULE, video), SCHEDULE, chunks=3, video=video)[1]
    assert torch.equal(t2v, v2v)


def test_low_strength_stays_close_to_input(pipe):
    sampler = _sampler(pipe)
    frames = _video()
    video = VideoSource(frames, strength=0.05)
    out = sampler.advance(sampler.init_state(5, SCHEDULE, video), SCHEDULE, chunks=3, video=video)[1]
    target = torch.nn.functional.interpolate(frames[:6], size=(32, 32), mode="bilinear", antialias=True).clamp(0, 1)
    assert (out - target).abs().mean() < 0.06
    strong = VideoSource(frames, strength=0.9)
    out2 = sampler.advance(sampler.init_state(5, SCHEDULE, strong), SCHEDULE, chunks=3, video=strong)[1]
    assert (out2 - target).abs().mean() > (out - target).abs().mean()


def test_short_input_loops_holds_or_stops(pipe):
    sampler = _sampler(pipe)
    frames = _video(5)
    assert VideoSource(frames, on_end="loop").source_indices([4, 5, 11]) == [4, 0, 1]
    assert VideoSource(frames, on_end="hold").source_indices([4, 5, 11]) == [4, 4, 4]
    stop = VideoSource(frames, strength=0.5, on_end="stop")
    state = sampler.init_state(0, SCHEDULE, stop)
    state, a = sampler.advance(state, SCHEDULE, chunks=2, video=stop)
    state, b = sampler.advance(state, SCHEDULE, chunks=2, video=stop)
    assert a.shape[0] == 4 and b.shape[0] == 1  # 5 input frames → 5 output frames, then the end
    with pytest.raises(StreamEnded):
        sampler.advance(state, SCHEDULE, chunks=1, video=stop)
    loop = VideoSource(frames, strength=0.5, on_end="loop")
    _, long = sampler.advance(sampler.init_state(0, SCHEDULE, loop), SCHEDULE, chunks=6, video=loop)
    assert long.shape[0] == 12
    with pytest.raises(ValueError, match="strength"):
        VideoSource(frames, strength=0.0)
    with pytest.raises(ValueError, match="on_end"):
        VideoSource(frames, on_end="rewind")


def test_advance_latents_decode_to_advance_frames(pipe):
    sampler = _sampler(pipe)
    state = sampler.init_state(2, SCHEDULE)
    s1, latents = sampler.advance_latents(state, SCHEDULE, chunks=2)
    s2, frames = sampler.advance(state, SCHEDULE, chunks=2)
    assert latents.shape == (1, 3, 4, 32, 32)
    assert torch.equal(pipe.decode(latents), frames) and torch.equal(s1.latents, s2.latents)


def test_base_model_schedules_split_the_model_calls(pipe):
    calls = []
    original = pipe.velocity

    def counting(latents, *args, **kwargs):
        calls.append(latents.shape[2])
        return original(latents, *args, **kwargs)

    full = _sampler(pipe)
    state = full.init_state(0, SCHEDULE)
    pipe.velocity = counting
    try:
        split = _sampler(pipe, model_frames=4)
        ahead = _sampler(pipe, model_frames=4, lookahead=True)
        a = split.step(state, SCHEDULE)[0]
        assert calls == [4, 4, 4, 4]
        calls.clear()
        b = ahead.step(state, SCHEDULE)[0]
        assert calls == [2, 4, 4, 4, 4, 4, 4, 4]
        calls.clear()
        whole = _sampler(pipe, model_frames=16).step(state, SCHEDULE)[0]
        assert calls == [16]
    finally:
        pipe.velocity = original
    assert torch.equal(whole.latents, full.step(state, SCHEDULE)[0].latents)
    assert not torch.equal(a.latents, whole.latents) and not torch.equal(a.latents, b.latents)
    with pytest.raises(ValueError, match="lookahead"):
        StreamSettings(model_frames=3, lookahead=True)
