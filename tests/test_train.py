"""A few training and distillation steps on a tiny config reduce the loss (CPU, seconds)."""

from dataclasses import replace

import pytest
import torch

from streamdit_core.checkpoint import save_checkpoint
from streamdit_core.schedule import Partition, inference_sigmas, next_inference_sigmas, training_sigmas
from streamdit_core.train import (
    DistillConfig,
    Distiller,
    TrainConfig,
    Trainer,
    distill_levels,
    distillation_loss,
    flow_matching_loss,
    noise_clip,
)
from streamdit_core.world import World, WorldConfig

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = {"height": 32, "width": 32}


def _fixed_batch(trainer, seed=123):
    g = torch.Generator().manual_seed(seed)
    wb = World(WorldConfig(**WORLD)).sample_batch(4, trainer.cfg.buffer, g)
    x = wb.video * 2 - 1
    unique = sorted({c for row in wb.captions for c in row})
    ids = torch.tensor([[unique.index(c) for c in row] for row in wb.captions])
    p = Partition(K=0, N=2, c=2, s=1)
    sigma = training_sigmas(p, g, batch=4)
    noise = torch.randn(x.shape, generator=g)
    return x, unique, ids, sigma, noise


def _tiny(tmp_path, **kw):
    cfg = TrainConfig(
        model="test-tiny",
        text_heads=2,
        text_layers=1,
        buffer=4,
        batch=8,
        lr=3e-3,
        warmup=2,
        steps=40,
        log_every=20,
        sample_every=0,
        ckpt_every=40,
        world=WORLD,
        **kw,
    )
    return Trainer(cfg, tmp_path / "teacher", "cpu")


def test_training_steps_reduce_the_loss_and_resume(tmp_path):
    tr = _tiny(tmp_path)
    x, unique, ids, sigma, noise = _fixed_batch(tr)

    def fixed_loss():
        with torch.no_grad():
            return float(flow_matching_loss(tr.model, x, sigma, noise, tr.text.encode(unique)[ids]))

    before = fixed_loss()
    tr.run()
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)
    assert (tmp_path / "teacher" / "ema.safetensors").exists() and (tmp_path / "teacher" / "log.jsonl").exists()
    again = _tiny(tmp_path)
    assert again.resume() and again.step == 40
    (a, _), (b, _) = again.gather("live"), tr.gather("live")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_distillation_steps_reduce_the_loss(tmp_path):
    tr = _tiny(tmp_path, caption_dropout=0.3)
    tr.run()
    teacher = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher, *tr.gather("ema"))
    cfg = DistillConfig(
        model="test-tiny",
        text_heads=2,
        text_layers=1,
        buffer=4,
        chunk=2,
        teacher_steps=2,
        batch=8,
        lr=2e-3,
        warmup=2,
        steps=30,
        log_every=10,
        sample_every=0,
        ckpt_every=30,
        world=WORLD,
    )
    d = Distiller(cfg, tmp_path / "student", "cpu", teacher=str(teacher))
    x, unique, ids, _, noise = _fixed_batch(d)
    sp = d.student_partition
    sigma = inference_sigmas(sp, 0).float()[None].expand(4, -1)
    nxt = next_inference_sigmas(sp, 0).float()[None].expand(4, -1)
    x_sigma = noise_clip(x, sigma, noise)
    x_teacher = d._teacher_move(
        x_sigma, ids, unique, distill_levels(d.teacher_partition, 1.0)[:, None].expand(-1, 4, -1)
    )

    def fixed_loss():
        with torch.no_grad():
            return float(distillation_loss(d.model, x_sigma, sigma, nxt, x_teacher, d.text.encode(unique)[ids]))

    before = fixed_loss()
    d.run()
    assert fixed_loss() < before
    assert d.defaults()["partition"] == [0, 2, 2, 1] and d.defaults()["guidance"] == 1.0  # one step, unguided


def test_default_chunk_mix_follows_the_presets_temporal_patch():
    """Without ``chunk_sizes`` the mix is the paper's powers of two in units of the model's temporal patch, so
    the default config trains the default model (tokens of 2 frames) and a patch-1 model gets {1, 2, 4, …}."""
    assert TrainConfig().chunk_sizes == (2, 4, 8, 16)  # bundled, buffer 16
    assert TrainConfig(model="test-tiny", buffer=8).chunk_sizes == (1, 2, 4, 8)
    assert TrainConfig(buffer=16, reference_frames=4).chunk_sizes == (2, 4, 12)
    with pytest.raises(ValueError, match="frames"):
        TrainConfig(buffer=4, reference_frames=4)


def test_a_config_window_trains_and_is_stored(tmp_path):
    """``TrainConfig.window`` replaces the preset's window (and an ``--init`` checkpoint's, whose weights it keeps):
    the trained model uses it and its checkpoints store it, so inference uses it by default."""
    from streamdit_core.checkpoint import load_checkpoint

    with pytest.raises(ValueError, match="window must be three positive integers"):
        TrainConfig(window=[4, 8])
    tr = _tiny(tmp_path, window=[2, 2, 2])
    assert tr.cfg.window == (2, 2, 2) and tr.model.config.window == (2, 2, 2)
    tr.run()
    saved = tmp_path / "teacher" / "ema.safetensors"
    assert load_checkpoint(saved).model.config.window == (2, 2, 2)
    cfg = replace(tr.cfg, window=(4, 4, 4))
    again = Trainer(cfg, tmp_path / "again", "cpu", init=str(saved))
    assert again.model.config.window == (4, 4, 4)
    (a, _), (b, _) = again.gather("live"), tr.gather("ema")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_teacher_checkpoints_default_to_the_teacher_scheme(tmp_path):
    """A world-trained teacher streams with s = 8 micro-steps per chunk and, if captions were dropped in
    training (so it has an unconditional branch), guidance 3; without caption dropout, no guidance."""
    guided = _tiny(tmp_path, caption_dropout=0.1).defaults()
    assert guided["partition"] == [0, 2, 2, 8] and guided["guidance"] == 3.0
    plain = _tiny(tmp_path / "plain", caption_dropout=0.0).defaults()
    assert plain["partition"] == [0, 2, 2, 8] and plain["guidance"] == 1.0


def test_resume_reads_the_single_file_layout_of_earlier_versions(tmp_path):
    """live/ema.safetensors + optimizer.safetensors keyed ``{index}.{state}`` (what earlier versions wrote)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    tr = _tiny(tmp_path)
    model, text = tr.gather("live")
    params = list(model.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(3)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    run = tmp_path / "old"
    save_checkpoint(run / "live.safetensors", model, text)
    with torch.no_grad():
        ema = [p.clone() for p in params]
        for p in params:
            p.mul_(0.5)
    save_checkpoint(run / "ema.safetensors", model, text)
    tensors = {f"{i}.{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items()}
    save_file(tensors, str(run / "optimizer.safetensors"), metadata={"step": "7", "generator": "[]"})

    again = Trainer(tr.cfg, run, "cpu")
    assert again.resume() and again.step == 7
    live, _ = again.gather("live")
    assert all(torch.equal(a, b) for a, b in zip(live.parameters(), ema))  # live = the weights before halving
    ema_model, _ = again.gather("ema")
    assert torch.equal(ema_model.blocks[0].ffn[0].weight, model.blocks[0].ffn[0].weight)
    state = get_optimizer_state_dict(again.live, again.opt, options=StateDictOptions(full_state_dict=True))
    i = [n for n, _ in model.named_parameters()].index("blocks.1.self_attn.q.weight")
    assert torch.equal(state["state"]["model.blocks.1.self_attn.q.weight"]["exp_avg"], opt.state[params[i]]["exp_avg"])


def test_activation_checkpointing_changes_memory_not_results(tmp_path):
    plain = _tiny(tmp_path / "a")
    checkpointed = _tiny(tmp_path / "b", activation_checkpointing=True)
    saved = []

    def count(t):
        saved[-1] += t.numel()
        return t

    for tr in (plain, checkpointed):
        saved.append(0)
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            tr.train_step()
        tr.train_step()
    assert saved[1] < 0.5 * saved[0], saved  # the blocks' activations are not kept for backward
    (a, _), (b, _) = plain.gather("live"), checkpointed.gather("live")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_t2v_shift_moves_only_the_whole_buffer_samples_to_high_noise(tmp_path):
    """``t2v_shift`` applies the time shift to the ``c = B`` samples' levels (same draws, shifted) and leaves the
    staircase samples alone."""
    from streamdit_core.schedule import time_shift

    plain = _tiny(tmp_path / "a", t2v_share=1.0).sigmas(_tiny(tmp_path / "a2", t2v_share=1.0).draws(0))
    shifted_tr = _tiny(tmp_path / "b", t2v_share=1.0, t2v_shift=4.0)
    shifted = shifted_tr.sigmas(shifted_tr.draws(0))
    assert torch.allclose(shifted.double(), time_shift(plain.double(), 4.0), atol=1e-6)
    assert float(shifted.mean()) > float(plain.mean()) + 0.1
    assert all(len(set(row.tolist())) == 1 for row in shifted)  # one level per whole-buffer sample
    stair_a = _tiny(tmp_path / "c", t2v_share=0.0)
    stair_b = _tiny(tmp_path / "d", t2v_share=0.0, t2v_shift=4.0)
    assert torch.equal(stair_a.sigmas(stair_a.draws(0)), stair_b.sigmas(stair_b.draws(0)))
    for bad in ({"t2v_shift": 0.0}, {"shift": -2.0}):
        with pytest.raises(ValueError, match="must be"):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="warm_share"):
        DistillConfig(warm_share=1.5)


def test_distill_levels_follow_the_staircase_and_the_warm_start():
    from streamdit_core.schedule import uniform_sigmas

    tp = Partition(K=0, N=4, c=2, s=3)
    stair = distill_levels(tp, 2.0)
    assert stair.shape == (4, 8)
    for m in range(3):
        assert torch.allclose(stair[m], inference_sigmas(tp, m, 2.0))
        assert torch.allclose(stair[m + 1], next_inference_sigmas(tp, m, 2.0))
    student = uniform_sigmas(4, 2.0)  # the student's warm start levels (T = N for s = 1)
    for j in range(3):
        warm = distill_levels(tp, 2.0, j)
        assert warm.shape == (4, 8) and bool((warm == warm[:, :1]).all())  # the whole buffer at one level
        assert torch.isclose(warm[0, 0], student[j]) and torch.isclose(warm[-1, 0], student[j + 1])
        assert bool((warm[1:, 0] < warm[:-1, 0]).all())
    with pytest.raises(ValueError, match="warm_step"):
        distill_levels(tp, 2.0, 3)


def test_warm_share_distils_warm_start_steps(tmp_path):
    """With ``warm_share = 1`` every sample is a whole-buffer warm-start step (one level per sample, a level of the
    student's warm start), and distillation runs on them; with 0 every sample is the staircase."""
    from streamdit_core.schedule import uniform_sigmas

    tr = _tiny(tmp_path, caption_dropout=0.3)  # untrained weights suffice here
    teacher = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher, *tr.gather("ema"))
    base = {
        "model": "test-tiny",
        "text_heads": 2,
        "text_layers": 1,
        "buffer": 8,
        "chunk": 2,
        "teacher_steps": 2,
        "batch": 6,
        "warmup": 1,
        "steps": 3,
        "log_every": 1,
        "sample_every": 0,
        "ckpt_every": 3,
        "world": WORLD,
    }
    d = Distiller(DistillConfig(warm_share=1.0, **base), tmp_path / "warm", "cpu", teacher=str(teacher))
    levels = d.levels(d.draws(0))
    assert levels.shape == (3, 6, 8)
    student = uniform_sigmas(4, 1.0)
    for b in range(6):
        assert bool((levels[:, b] == levels[:, b, :1]).all())
        assert any(torch.isclose(levels[0, b, 0].double(), student[j]) for j in range(3))
    d.run()
    assert d.step == 3
    stair = Distiller(DistillConfig(warm_share=0.0, **base), tmp_path / "stair", "cpu", teacher=str(teacher))
    expected = torch.stack(
        [inference_sigmas(stair.teacher_partition, 0), next_inference_sigmas(stair.teacher_partition, 1)]
    )
    got = stair.levels(stair.draws(0))
    assert torch.allclose(got[[0, -1]], expected[:, None].expand(-1, 6, -1))
