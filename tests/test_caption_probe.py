"""scripts/caption_probe.py on a tiny random model: its losses are the trainer's flow-matching loss, its x0
errors follow from them, its attribute swaps change exactly one attribute, and its events section (clips whose
caption changes; true vs held captions) splits that loss at the first change (CPU, seconds)."""

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from streamdit_core.checkpoint import save_checkpoint
from streamdit_core.config import preset
from streamdit_core.model import StreamDiT
from streamdit_core.text import TextEncoder, TextEncoderConfig
from streamdit_core.train import TrainConfig, flow_matching_loss
from streamdit_core.world import VOCABULARY, parse_caption

pytestmark = pytest.mark.usefixtures("one_thread")

_SPEC = importlib.util.spec_from_file_location(
    "caption_probe", Path(__file__).resolve().parent.parent / "scripts" / "caption_probe.py"
)
assert _SPEC is not None and _SPEC.loader is not None
probe_mod = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("caption_probe", probe_mod)  # dataclasses look their module up there
_SPEC.loader.exec_module(probe_mod)

SIGMAS = (0.4, 0.8)
CLIPS = 5  # σ groups of 3 and 2 clips


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)  # parameter initialisation only
    mcfg = dataclasses.replace(preset("test-tiny"), text_len=24)
    model = StreamDiT(mcfg).eval()
    torch.nn.init.normal_(model.head.head.weight, std=0.05)  # the zero-initialised head would ignore the inputs
    text = TextEncoder(TextEncoderConfig(vocabulary=VOCABULARY, text_len=24, dim=mcfg.text_dim, num_layers=1,
                                         num_heads=2)).eval()
    cfg = TrainConfig(model="test-tiny", buffer=4, world={"height": 32, "width": 32})
    draw = probe_mod.draw_clips(cfg, CLIPS, seed=3)
    result = probe_mod.probe(model, text, draw, SIGMAS, batch=2)
    return model, text, cfg, draw, result


def _per_frame_context(text, captions):
    """``[n, F, Lt, D]``: every frame's caption encoded on its own (not the probe's shared_context path)."""
    with torch.no_grad():
        return torch.stack([text.encode(row) for row in captions])


def test_true_caption_losses_are_the_flow_matching_loss(setup):
    model, text, _, draw, result = setup
    ctx = _per_frame_context(text, draw.captions)
    with torch.no_grad():
        expected = flow_matching_loss(model, draw.x, draw.train_sigma, draw.noise, ctx)
        assert result["loss"]["true"]["training"] == pytest.approx(float(expected), rel=1e-5)
        for k, s in enumerate(SIGMAS):
            clips = [i for i in range(CLIPS) if i % len(SIGMAS) == k]
            sigma = torch.full((len(clips), draw.x.shape[2]), s)
            loss = flow_matching_loss(model, draw.x[clips], sigma, draw.noise[clips], ctx[clips])
            assert result["loss"]["true"][f"{s:g}"] == pytest.approx(float(loss), rel=1e-5)
        empty = _per_frame_context(text, [[""] * draw.x.shape[2]] * CLIPS)
        loss = flow_matching_loss(model, draw.x, draw.train_sigma, draw.noise, empty)
        assert result["loss"]["empty"]["training"] == pytest.approx(float(loss), rel=1e-5)
    mean = sum(result["loss"]["true"][f"{s:g}"] for s in SIGMAS) / len(SIGMAS)
    assert result["loss"]["true"]["mean"] == pytest.approx(mean)
    assert result["clips_per_sigma"] == {"0.4": 3, "0.8": 2}
    # the random model does read its captions, so the conditions differ
    assert result["loss"]["shuffled"]["training"] != result["loss"]["true"]["training"]


def test_x0_error_over_all_pixels_is_sigma_squared_times_the_loss(setup):
    *_, result = setup
    for s in SIGMAS:
        key = f"{s:g}"
        assert result["x0_error"]["all"][key] == pytest.approx(s * s * result["loss"]["true"][key], rel=1e-4)
        assert result["x0_error"]["object"][key] > 0


def test_swaps_change_exactly_one_attribute(setup):
    *_, draw, result = setup
    assert set(result["attributes"]) == {"colour", "shape", "motion", "size", "background"}
    for attribute, rows in draw.swaps.items():
        entry = result["attributes"][attribute]
        assert all(math.isfinite(entry[region][k]) for region in ("object", "all") for k in [*entry[region]])
        for old_row, new_row in zip(draw.captions, rows):
            new_values = set()
            for old, new in zip(old_row, new_row):
                a, b = parse_caption(old), parse_caption(new)
                if attribute == "background":
                    assert a.background != b.background and a.objects == b.objects
                    new_values.add(b.background)
                else:
                    assert getattr(a.objects[0], attribute) != getattr(b.objects[0], attribute)
                    assert dataclasses.replace(b.objects[0], **{attribute: getattr(a.objects[0], attribute)}) == (
                        a.objects[0]
                    )
                    assert a.objects[1:] == b.objects[1:] and a.background == b.background
                    new_values.add(getattr(b.objects[0], attribute))
            assert len(new_values) == 1  # one replacement per clip


def test_draws_are_deterministic_and_masks_cover_the_first_object(setup):
    _, _, cfg, draw, _ = setup
    again = probe_mod.draw_clips(cfg, CLIPS, seed=3)
    assert torch.equal(draw.x, again.x) and torch.equal(draw.noise, again.noise)
    assert torch.equal(draw.train_sigma, again.train_sigma) and draw.swaps == again.swaps
    assert draw.captions == again.captions
    # masked pixels are saturated object colours, never the achromatic background
    pixels = (draw.x.permute(0, 2, 3, 4, 1)[draw.object_mask[:, 0]] + 1) / 2  # [m, 3]
    assert pixels.shape[0] > 0
    assert float((pixels.amax(-1) - pixels.amin(-1)).median()) > 0.5
    assert not torch.equal(draw.x, probe_mod.draw_clips(cfg, CLIPS, seed=4).x)


# ---------------------------------------------------------------------------------------------------- events

EVENT_CLIPS = 3
_RED = "a small red circle moving left on a black background"


def test_first_change_and_caption_changes():
    assert probe_mod.first_change(["a", "a", "b", "a"]) == 2
    assert probe_mod.first_change(["a", "b"]) == 1
    assert probe_mod.first_change(["a", "a", "a"]) is None
    assert probe_mod.caption_changes(["a", "a", "b", "a"]) == 2
    assert probe_mod.caption_changes(["a", "a"]) == 0
    assert probe_mod.frames_from([2, 1], 4).tolist() == [[False, False, True, True], [False, True, True, True]]


@pytest.mark.parametrize(
    ("after", "kind"),
    [
        ("a small blue circle moving left on a black background", "colour"),
        ("a small red square moving left on a black background", "shape"),
        ("a small red circle bouncing on a black background", "motion"),
        ("a small red circle standing still on a black background", "motion"),
        ("a small red circle moving left and a large green diamond moving up on a black background", "appear"),
        ("a large red circle moving left on a black background", "size"),
        ("a small red circle moving left on a grey background", "background"),
        ("a small blue square moving left on a black background", "colour+shape"),
    ],
)
def test_event_kind_from_captions(after, kind):
    assert probe_mod.event_kind(_RED, after) == kind


def test_event_kind_of_the_second_object_and_of_equal_captions():
    two = "a small red circle moving left and a large green diamond moving up on a black background"
    assert probe_mod.event_kind(two, two.replace("green diamond", "green square")) == "shape"
    assert probe_mod.event_kind(two, two.replace("moving up", "moving down")) == "motion"
    assert probe_mod.event_kind(two, _RED) == "disappear"
    with pytest.raises(ValueError, match="same scene"):
        probe_mod.event_kind(_RED, _RED + ".")


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert probe_mod.masked_mean(values, mask) == pytest.approx((1 + 3 + 6) / 3)
    counts = torch.tensor([[1.0, 9.0, 2.0], [9.0, 9.0, 3.0]])
    assert probe_mod.masked_mean(values, mask, counts) == pytest.approx((1 + 3 + 6) / (1 + 2 + 3))
    assert math.isnan(probe_mod.masked_mean(values, torch.zeros_like(mask)))
    assert math.isnan(probe_mod.masked_mean(values, mask, torch.zeros_like(counts)))
    assert probe_mod.relative_change(3.0, 2.0) == pytest.approx(0.5)
    assert math.isnan(probe_mod.relative_change(1.0, 0.0))


@pytest.fixture(scope="module")
def events(setup):
    model, text, cfg, _, _ = setup
    draw = probe_mod.draw_event_clips(cfg, EVENT_CLIPS, seed=3)
    return draw, probe_mod.probe_events(model, text, draw, SIGMAS, batch=2)


def test_event_clips_change_their_caption_at_first_change(setup, events):
    *_, cfg, _, _ = setup
    draw, result = events
    B = cfg.buffer
    assert draw.x.shape[:3] == (EVENT_CLIPS, 3, B) and draw.staircase_sigma.shape == (EVENT_CLIPS, B)
    for row, e, kind in zip(draw.captions, draw.first_change, draw.kinds):
        assert 1 <= e < B and all(c == row[0] for c in row[:e]) and row[e] != row[0]
        assert kind in ("colour", "motion", "shape", "appear") and kind == probe_mod.event_kind(row[0], row[e])
    # the staircase: chunks of 2 frames, σ non-decreasing from the clean end
    sigma = draw.staircase_sigma
    assert torch.equal(sigma[:, 0::2], sigma[:, 1::2]) and bool((sigma[:, 1:] >= sigma[:, :-1]).all())
    # the event object's pixels after the first event: some in every clip
    after = probe_mod.frames_from(draw.first_change, B)
    assert all(bool(draw.event_mask[i, 0][after[i]].any()) for i in range(EVENT_CLIPS))
    assert result["clips"] == EVENT_CLIPS and result["drawn"] >= EVENT_CLIPS
    assert [c["first_change"] for c in result["per_clip"]] == draw.first_change


def test_event_groups_per_kind_and_overall(events):
    draw, result = events
    groups = result["groups"]
    assert list(groups)[-1] == "all" and set(groups) == set(draw.kinds) | {"all"}
    assert groups["all"]["clips"] == EVENT_CLIPS
    assert sum(g["clips"] for k, g in groups.items() if k != "all") == EVENT_CLIPS
    columns = {*(f"{s:g}" for s in SIGMAS), "mean", "staircase"}
    for region in ("after", "before", "object_after"):
        entry = groups["all"][region]
        assert set(entry) == {"true", "held", "change"} and set(entry["true"]) == columns
        for key in ("mean", "staircase"):
            assert math.isfinite(entry["true"][key]) and entry["true"][key] > 0
            assert entry["change"][key] == pytest.approx(entry["held"][key] / entry["true"][key] - 1)
    json.dumps(result)  # JSON-ready


def test_event_losses_split_the_flow_matching_loss(setup, events):
    """Frames < e and ≥ e together: the trainer's loss on the staircase with the true per-frame captions."""
    model, text, cfg, _, _ = setup
    draw, result = events
    after = probe_mod.frames_from(draw.first_change, cfg.buffer)
    n_after, n_before = int(after.sum()), int((~after).sum())
    with torch.no_grad():
        ctx = _per_frame_context(text, draw.captions)
        loss = flow_matching_loss(model, draw.x, draw.staircase_sigma, draw.noise, ctx)
    entry = result["groups"]["all"]
    split = (entry["after"]["true"]["staircase"] * n_after + entry["before"]["true"]["staircase"] * n_before) / (
        n_after + n_before
    )
    assert split == pytest.approx(float(loss), rel=1e-5)


def test_held_equal_to_true_captions_gives_exactly_no_change(setup, events):
    model, text, _, _, _ = setup
    draw, _ = events
    B = draw.x.shape[2]
    held = dataclasses.replace(draw, captions=[[row[0]] * B for row in draw.captions])
    result = probe_mod.probe_events(model, text, held, SIGMAS, batch=2)
    for entry in result["groups"].values():
        for region in ("after", "before", "object_after"):
            assert json.dumps(entry[region]["true"]) == json.dumps(entry[region]["held"])  # NaN: no frames
            assert all(v == 0.0 for v in entry[region]["change"].values() if math.isfinite(v))


def test_event_draws_and_results_are_deterministic(setup, events):
    model, text, cfg, _, _ = setup
    draw, result = events
    again = probe_mod.draw_event_clips(cfg, EVENT_CLIPS, seed=3)
    assert torch.equal(draw.x, again.x) and torch.equal(draw.noise, again.noise)
    assert torch.equal(draw.event_mask, again.event_mask)
    assert torch.equal(draw.staircase_sigma, again.staircase_sigma)
    assert (draw.captions, draw.first_change, draw.kinds) == (again.captions, again.first_change, again.kinds)
    assert json.dumps(probe_mod.probe_events(model, text, again, SIGMAS, batch=2)) == json.dumps(result)
    assert probe_mod.draw_event_clips(cfg, EVENT_CLIPS, seed=4).captions != draw.captions


def test_main_with_events_writes_the_events_section(setup, tmp_path):
    """The command line on a tiny checkpoint: ``--events 2`` adds the "events" key and table; same seed, same
    numbers; without ``--events`` neither appears."""
    model, text, _, _, _ = setup
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(ckpt, model, text)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model": "test-tiny", "buffer": 4, "world": {"height": 32, "width": 32}}))
    common = ["--model", str(ckpt), "--config", str(config), "--clips", "2", "--sigmas", "0.4", "0.8",
              "--batch", "2"]
    runs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.json"
        assert probe_mod.main([*common, "--events", "2", "--out", str(out)]) == 0
        runs.append(json.loads(out.read_text()))
        assert "**Events**" in out.with_suffix(".md").read_text()
    assert json.dumps(runs[0]["events"]) == json.dumps(runs[1]["events"]) and runs[0]["loss"] == runs[1]["loss"]
    assert runs[0]["events"]["clips"] == 2 and "all" in runs[0]["events"]["groups"]
    out = tmp_path / "off.json"
    assert probe_mod.main([*common, "--out", str(out)]) == 0
    assert "events" not in json.loads(out.read_text()) and "Events" not in out.with_suffix(".md").read_text()
