"""scripts/motion_probe.py's motion measure on the world's own frames: the best-overlap shift of a moving object
follows its true velocity, and a standing object does not move (CPU, seconds)."""

import importlib.util
import sys
from pathlib import Path

import torch

from streamdit_core.world import render_caption

_SPEC = importlib.util.spec_from_file_location(
    "motion_probe", Path(__file__).resolve().parent.parent / "scripts" / "motion_probe.py"
)
assert _SPEC is not None and _SPEC.loader is not None
probe = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("motion_probe", probe)
_SPEC.loader.exec_module(probe)


def test_shift_follows_the_true_velocity() -> None:
    for caption, direction in (("a large red circle moving right on a black background", (1, 0)),
                               ("a large blue square moving up on a black background", (0, -1))):
        clip = render_caption(caption, 24, seed=3)
        vx, vy = clip.truth.velocity[0, 0].tolist()
        true = vx * direction[0] + vy * direction[1]
        got = probe.summary(clip.frames, direction)
        speeds = got["speed_per_frame"][1:]
        assert abs(sum(speeds) / len(speeds) - true) < 0.15, (caption, speeds, true)
        sideways = probe.along(probe.best_shifts(probe.object_masks(clip.frames)), (direction[1], direction[0]))
        assert max(abs(s) for s in sideways) <= 1.0


def test_standing_object_has_no_shift() -> None:
    clip = render_caption("a large green circle standing still on a black background", 12, seed=1)
    masks = probe.object_masks(clip.frames)
    assert masks.sum() > 0 and probe.best_shifts(masks) == [(0, 0)] * 12
    empty = torch.zeros(3, 8, 8)
    assert probe.best_shifts(empty) == [(0, 0)] * 3  # nothing to overlap: the smallest shift wins
