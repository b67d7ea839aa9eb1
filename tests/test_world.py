"""The procedural world: determinism, ground truth vs pixels, closed-form motion, events, captions."""

from __future__ import annotations

import colorsys

import pytest
import torch

from streamdit_core.world import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_COMBINATIONS,
    MOTIONS,
    PALETTE,
    SHAPES,
    VOCABULARY,
    ObjectSpec,
    SceneSpec,
    World,
    WorldConfig,
    background_images,
    heldout_captions,
    parse_caption,
    parse_schedule_text,
    render_caption,
    render_schedule,
    render_stream,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def batch():
    return World().sample_batch(48, 16, _gen(0))


@pytest.fixture(scope="module")
def long_stream():
    return render_stream(7, 3000)


def _wrap(d: torch.Tensor, extent: float) -> torch.Tensor:
    return torch.remainder(d + extent / 2, extent) - extent / 2


def test_batch_shapes_and_range(batch):
    assert batch.video.shape == (48, 3, 16, 64, 64)
    assert batch.video.dtype == torch.float32
    assert 0.0 <= float(batch.video.min()) and float(batch.video.max()) <= 1.0
    assert len(batch.captions) == 48 and all(len(c) == 16 for c in batch.captions)
    assert batch.truth.position.shape == (48, 16, 2, 2)
    assert batch.truth.background.shape == (48, 16)


def test_deterministic_per_seed():
    a = World().sample_batch(8, 16, _gen(3))
    b = World().sample_batch(8, 16, _gen(3))
    c = World().sample_batch(8, 16, _gen(4))
    assert torch.equal(a.video, b.video) and a.captions == b.captions
    assert not torch.equal(a.video, c.video)
    s1, s2 = render_stream(11, 40), render_stream(11, 40)
    assert torch.equal(s1.frames, s2.frames) and s1.captions == s2.captions


def test_stream_prefix_consistent_and_start_frame():
    full = render_stream(5, 1200)
    part = render_stream(5, 100, start_frame=1100)
    assert torch.equal(full.frames[1100:], part.frames)
    assert full.captions[1100:] == part.captions
    assert torch.equal(render_stream(5, 50).frames, full.frames[:50])


def test_truth_matches_pixels(batch):
    """The pixel under each object's centre has its colour (unless the other object covers it); pixels far
    from every object show the background."""
    truth = batch.truth
    B, Fr = truth.background.shape
    video = batch.video.permute(0, 2, 3, 4, 1).reshape(B * Fr, 64, 64, 3)
    flat = truth.index(slice(None))
    present = flat.present.reshape(B * Fr, 2)
    position = flat.position.reshape(B * Fr, 2, 2)
    radius = flat.radius.reshape(B * Fr, 2)
    colour = flat.colour.reshape(B * Fr, 2)
    background = flat.background.reshape(B * Fr)
    palette = torch.tensor(PALETTE)
    rows = torch.arange(B * Fr)
    for o in range(2):
        ok = present[:, o].clone()
        if o == 0:  # skip centres the second object may cover
            gap = _wrap(position[:, 0] - position[:, 1], 64.0).abs().max(-1).values
            ok &= ~(present[:, 1] & (gap < radius[:, 1] + 2))
        xy = position[:, o].floor().long() % 64
        pixel = video[rows, xy[:, 1], xy[:, 0]]
        assert torch.allclose(pixel[ok], palette[colour[ok, o]], atol=1e-5)
        assert int(ok.sum()) > 50
    ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    far = torch.ones(B * Fr, 64, 64, dtype=torch.bool)
    for o in range(2):
        cx, cy = position[:, o, 0, None, None], position[:, o, 1, None, None]
        dist = torch.maximum(_wrap(xs - cx, 64.0).abs(), _wrap(ys - cy, 64.0).abs())
        far &= ~present[:, o, None, None] | (dist > radius[:, o, None, None] + 1.5)
    expected = background_images(WorldConfig())[background]  # [N, H, W]
    assert bool(far.float().mean() > 0.5)
    assert torch.allclose(video[far], expected[far][:, None].expand(-1, 3), atol=1e-6)


def test_motion_closed_form_over_thousands_of_frames(long_stream):
    truth = long_stream.truth
    config = WorldConfig()
    extent = torch.tensor([64.0, 64.0])
    pos, vel, present = truth.position, truth.velocity, truth.present
    step = _wrap(pos[1:] - pos[:-1], 64.0)
    both = present[1:] & present[:-1]
    bounce = truth.motion[:-1] == MOTIONS.index("bouncing")
    new_object = ~present[:-1] & present[1:]
    # moving on the torus: position[t+1] - position[t] == velocity[t] exactly (mod the frame size)
    torus = both & ~bounce & ~new_object
    assert torch.allclose(step[torus], vel[:-1][torus], atol=1e-3)
    # bouncing: every step has the speed of the velocity at most, and equals it when no wall is hit
    r = truth.radius[..., None]
    inside = (pos >= r - 1e-3) & (pos <= extent - r + 1e-3)
    assert bool(inside[truth.motion == MOTIONS.index("bouncing")].all())
    bb = both & bounce
    assert bool((step[bb].abs() <= vel[:-1][bb].abs() + 1e-3).all())
    no_hit = bb[..., None] & ((pos[:-1] + vel[:-1] - r[:-1] > 0) & (pos[:-1] + vel[:-1] < extent - r[:-1]))
    assert torch.allclose(step[no_hit], vel[:-1][no_hit], atol=1e-3)
    # speeds within the configured range; still objects do not move
    speed = vel.norm(dim=-1)[present]
    moving = truth.motion[present] != MOTIONS.index("still")
    assert bool((speed[moving] >= config.speed[0] - 1e-4).all())
    assert bool((speed[moving] <= config.speed[1] + 1e-4).all())
    assert bool((speed[~moving] == 0).all())
    assert bool(present[:, 0].all())


def test_events_change_captions_exactly(long_stream, batch):
    captions, event = long_stream.captions, long_stream.truth.event.tolist()
    assert 20 < sum(event) < 120  # event_prob 0.019 per frame over 3000 frames
    for t in range(1, len(captions)):
        assert (captions[t] != captions[t - 1]) == event[t], t
    for b in range(len(batch.captions)):
        for t in range(1, 16):
            assert (batch.captions[b][t] != batch.captions[b][t - 1]) == bool(batch.truth.event[b, t])


def test_event_rate_and_kinds(long_stream):
    truth = World().sample_truth(400, 16, _gen(1))
    with_event = truth.event.any(-1).float().mean().item()
    assert 0.12 < with_event < 0.4
    truth = long_stream.truth
    ev = truth.event.nonzero().flatten()
    kinds = set()
    for t in ev.tolist():
        a, b = truth.index(t - 1), truth.index(t)
        if not torch.equal(a.present, b.present):
            kinds.add("appear")
        elif not torch.equal(a.colour, b.colour):
            kinds.add("colour")
        elif not torch.equal(a.shape, b.shape):
            kinds.add("shape")
        elif not torch.equal(a.motion, b.motion):
            kinds.add("motion")
    assert kinds == {"appear", "colour", "shape", "motion"}


def test_vocabulary_covers_captions_and_parse_round_trips(batch, long_stream):
    words = set(VOCABULARY)
    captions = {c for clip in batch.captions for c in clip} | set(long_stream.captions)
    for caption in captions:
        assert set(caption.split()) <= words
        spec = parse_caption(caption)
        assert spec.caption == caption
    two = [c for c in captions if " and " in c]
    assert two, "expected two-object captions"


def test_parse_caption_examples_and_errors():
    spec = parse_caption(
        "a large blue square bouncing and a small yellow triangle standing still on a striped background"
    )
    assert spec == SceneSpec(
        "striped",
        (ObjectSpec("large", "blue", "square", "bouncing"), ObjectSpec("small", "yellow", "triangle", "still")),
    )
    assert parse_caption("A small red circle moving left on a black background.").objects[0].motion == "left"
    with pytest.raises(ValueError, match=r"'pink' at position 2"):
        parse_caption("a small pink circle moving left on a black background")
    with pytest.raises(ValueError, match=r"'sideways' at position 5"):
        parse_caption("a small red circle moving sideways on a black background")
    with pytest.raises(ValueError, match="ends early"):
        parse_caption("a small red circle moving left on a black")
    with pytest.raises(ValueError, match=r"'please' at position 10"):
        parse_caption("a small red circle moving left on a black background please")
    with pytest.raises(ValueError, match="distinct colours"):
        parse_caption("a small red circle bouncing and a large red square bouncing on a grey background")


def test_heldout_never_sampled_and_covers_attributes():
    config = WorldConfig()
    table = config.heldout_table()
    assert int(table.sum()) == len(HELDOUT_COMBINATIONS) == len(set(HELDOUT_COMBINATIONS))
    for values, k in ((COLOURS, 0), (SHAPES, 1), (MOTIONS, 2), (BACKGROUNDS, 3)):
        assert {c[k] for c in HELDOUT_COMBINATIONS} == set(values)
    truth = World(config).sample_truth(512, 16, _gen(2))
    bg = truth.background.unsqueeze(-1).expand_as(truth.colour)
    assert not bool((table[truth.colour, truth.shape, truth.motion, bg] & truth.present).any())
    # with the exclusion switched off the same combinations do occur
    free = World(WorldConfig(heldout=())).sample_truth(512, 16, _gen(2))
    bg = free.background.unsqueeze(-1).expand_as(free.colour)
    assert bool((table[free.colour, free.shape, free.motion, bg] & free.present).any())
    assert len(heldout_captions(config)) == len(HELDOUT_COMBINATIONS)


def test_palette_hues_well_separated():
    hues = sorted(colorsys.rgb_to_hsv(*rgb)[0] * 360 for rgb in PALETTE)
    gaps = [b - a for a, b in zip(hues, hues[1:])] + [hues[0] + 360 - hues[-1]]
    assert min(gaps) > 40
    assert all(max(rgb) - min(rgb) > 0.5 for rgb in PALETTE)


def test_render_caption_and_schedule():
    caption = "a small red circle moving left on a black background"
    clip = render_caption(caption, 20, seed=4)
    assert clip.frames.shape == (20, 3, 64, 64) and set(clip.captions) == {caption}
    assert torch.allclose(clip.truth.velocity[:, 0, 1], torch.zeros(20))
    assert bool((clip.truth.velocity[:, 0, 0] < 0).all())
    # same seed, other colour / shape: identical placement (used for video-to-video ground truth)
    other = render_caption("a small blue diamond moving left on a black background", 20, seed=4)
    assert torch.equal(other.truth.position, clip.truth.position)
    text = f"0: {caption}\n10: a small red circle moving up on a black background"
    sched = render_schedule(text, 20, seed=4)
    assert torch.equal(sched.frames[:10], clip.frames[:10])
    assert sched.captions[9] == caption and sched.captions[10].endswith("moving up on a black background")
    assert torch.allclose(sched.truth.position[10, 0], clip.truth.position[10, 0])  # continuous at the switch
    assert parse_schedule_text('"0": "a", "48": "b"') == [(0, "a"), (48, "b")]
    assert parse_schedule_text("just one caption") == [(0, "just one caption")]
    with pytest.raises(ValueError, match="start at 0"):
        parse_schedule_text("5: a\n10: b")


def test_config_validation_names_values():
    with pytest.raises(ValueError, match="max_objects"):
        WorldConfig(max_objects=3)
    with pytest.raises(ValueError, match="large_radius"):
        WorldConfig(large_radius=(8.0, 40.0))
    with pytest.raises(ValueError, match="'pink'"):
        WorldConfig(heldout=(("pink", "circle", "left", "black"),))
    with pytest.raises(ValueError, match="event_prob"):
        WorldConfig(event_prob=1.5)


def test_other_resolution_and_single_object():
    config = WorldConfig(height=48, width=96, max_objects=1, large_radius=(8.0, 10.0))
    batch = World(config).sample_batch(4, 8, _gen(0))
    assert batch.video.shape == (4, 3, 8, 48, 96)
    assert all(" and " not in c for clip in batch.captions for c in clip)
