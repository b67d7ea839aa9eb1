"""scripts/caption_probe.py on a tiny random model: its losses are the trainer's flow-matching loss, its x0
errors follow from them, and its attribute swaps change exactly one attribute (CPU, seconds)."""

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

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
