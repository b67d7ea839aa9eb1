"""Training on several ranks (FSDP2, gloo on CPU) equals training on one with the same global batch.

Two processes with one micro-batch each and one process accumulating two micro-batches see the same clips,
partitions and noise (micro-batch ``j`` is seeded by ``(seed, step, j)``), average the loss the same way
(FSDP reduces gradients as a mean), so the weights, the EMA and the logged losses agree to float rounding.
Checkpoints written on 2 ranks resume on 1 and vice versa, continuing the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch.multiprocessing as mp
from dist_worker import WORLD, distill_config, train_config, two_rank_worker

from streamdit_core.checkpoint import load_checkpoint
from streamdit_core.distributed import seed_for
from streamdit_core.train import Distiller, Trainer, _TruthStream
from streamdit_core.world import WorldConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(path):
    ck = load_checkpoint(path)
    return {**ck.model.state_dict(), **{f"text.{k}": v for k, v in ck.text_encoder.state_dict().items()}}


def _assert_close(a, b, what):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 2e-5, f"{what}: largest difference {worst}"


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_seeds_and_truth_stream_split_the_global_batch_by_index_not_by_rank():
    assert len({seed_for(0, s, j, k) for s in range(3) for j in range(4) for k in range(3)}) == 36
    assert seed_for(7, 3, 1, 2) == seed_for(7, 3, 1, 2) < 2**63
    world = WorldConfig(**WORLD)

    def items(rank, accum, n):
        stream = iter(_TruthStream(world, 2, 4, seed=5, start=3, rank=rank, accum=accum))
        return [next(stream)[1] for _ in range(n)]  # captions [2][4] identify the clips

    one = items(0, 2, 4)  # steps 3, 3, 4, 4 with micro-batches 0, 1, 0, 1
    assert items(1, 1, 2) == [one[1], one[3]] and items(0, 1, 2) == [one[0], one[2]]
    assert one[0] != one[1]


@pytest.mark.slow
def test_two_ranks_match_one_process_and_checkpoints_reshard(tmp_path):
    # one process, two accumulated micro-batches per step: 0 → 2 (copy) → 4, then distil its teacher
    one = Trainer(train_config(2), tmp_path / "one", "cpu")
    one.run(until=2)
    shutil.copytree(tmp_path / "one", tmp_path / "one_to_two")
    one.run()
    assert one.step == 4 and (tmp_path / "one" / "checkpoint" / "latest").read_text().strip() == "step-00000004"
    teacher = str(tmp_path / "one" / "ema.safetensors")
    Distiller(distill_config(2), tmp_path / "distill_one", "cpu", teacher=teacher).run()

    mp.spawn(two_rank_worker, args=(str(tmp_path),), nprocs=2, join=True)

    # the 2-rank checkpoint of step 2 continues on 1 rank
    shutil.copytree(tmp_path / "two_at2", tmp_path / "two_to_one")
    back = Trainer(train_config(2), tmp_path / "two_to_one", "cpu")
    assert back.resume() and back.step == 2
    back.run()

    reference = _weights(tmp_path / "one" / "live.safetensors")
    for run in ("two", "one_to_two", "two_to_one"):
        _assert_close(_weights(tmp_path / run / "live.safetensors"), reference, f"{run} live")
        _assert_close(_weights(tmp_path / run / "ema.safetensors"), _weights(tmp_path / "one" / "ema.safetensors"),
                      f"{run} ema")
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    _assert_close(_weights(tmp_path / "distill_two" / "live.safetensors"),
                  _weights(tmp_path / "distill_one" / "live.safetensors"), "distillation")
    # training moved the weights (the comparison is not between two untouched initialisations)
    init = Trainer(train_config(2), tmp_path / "fresh", "cpu").gather("live")
    assert max(float((init[0].state_dict()[k] - reference[k]).abs().max()) for k in init[0].state_dict()) > 1e-3
