"""Fine-tuning Wan 2.1 into StreamDiT on captioned videos, end to end on CPU with tiny random models of the real
layouts: a Wan-layout DiT file, a Wan 2.1 VAE in the original key layout (as ComfyUI ships it), a umT5 encoder
folder with an offline-built tokenizer, and a few generated videos."""

import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

from streamdit_core.checkpoint import load_checkpoint  # noqa: E402
from streamdit_core.cli import main  # noqa: E402
from streamdit_core.codec import LATENT_CODECS, WAN21_MEAN, WAN21_STD  # noqa: E402
from streamdit_core.config import ModelConfig  # noqa: E402
from streamdit_core.encoders import Lazy, WanVAECodec, load_umt5, load_wan_vae  # noqa: E402
from streamdit_core.model import StreamDiT  # noqa: E402
from streamdit_core.pipeline import load_pipeline  # noqa: E402
from streamdit_core.train import (  # noqa: E402
    DistillConfig,
    Distiller,
    TrainConfig,
    Trainer,
    flow_matching_loss,
    load_config,
)
from streamdit_core.video_data import (  # noqa: E402
    VideoDataConfig,
    find_captioned_videos,
    prepare_video_data,
    read_clip,
    video_config,
)
from streamdit_core.video_io import write_mp4  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "a red ball blue cube green moving left right up down on black white background".split()
VIDEO = {"fps": 15, "height": 48, "width": 64, "max_frames": 9, "cache_dtype": "float32"}
# Wan's layout in miniature: head size 128 (what infer_wan_config assumes), 16 latent channels, patch 1x2x2
DIT = ModelConfig(
    in_dim=16, out_dim=16, dim=128, ffn_dim=64, num_heads=1, num_layers=2, patch_size=(1, 2, 2),
    text_dim=16, text_len=512, freq_dim=32,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Tiny models in the users' file layouts
# ----------------------------------------------------------------------------------------------------------


def to_original_wan_vae_keys(state):
    """diffusers AutoencoderKLWan keys → the original Wan 2.1 VAE keys (ComfyUI's wan_2.1_vae.safetensors)."""
    res = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
           "conv2": "residual.6", "conv_shortcut": "shortcut"}  # fmt: skip

    def resnet(rest):
        for new, old in res.items():
            if rest == new or rest.startswith(new + "."):
                return old + rest[len(new) :]
        raise KeyError(rest)

    out = {}
    for key, value in state.items():
        k = key
        if m := re.match(r"(encoder|decoder)\.conv_in\.(.*)", k):
            k = f"{m[1]}.conv1.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", k):
            k = f"{m[1]}.middle.{2 * int(m[2])}.{resnet(m[3])}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", k):
            k = f"{m[1]}.middle.1.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.norm_out\.(.*)", k):
            k = f"{m[1]}.head.0.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.conv_out\.(.*)", k):
            k = f"{m[1]}.head.2.{m[2]}"
        elif m := re.match(r"(post_)?quant_conv\.(.*)", k):
            k = f"conv{2 if m[1] else 1}.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", k):
            rest = m[2] if m[2].startswith(("resample", "time_conv")) else resnet(m[2])
            k = f"encoder.downsamples.{m[1]}.{rest}"
        elif m := re.match(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(.*)", k):
            k = f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{resnet(m[3])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.(.*)", k):
            k = f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
        out[k] = value
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Files: a tiny Wan-layout DiT (ComfyUI's prefix), a tiny Wan VAE (original keys) and a tiny umT5 folder."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    dit = StreamDiT(DIT)
    torch.nn.init.normal_(dit.head.head.weight, std=0.02)
    comfy_layout = {"model.diffusion_model." + k: v.contiguous() for k, v in dit.state_dict().items()}
    save_file(comfy_layout, root / "wan.safetensors")

    vae = AutoencoderKLWan(base_dim=4, z_dim=16).eval()
    original = to_original_wan_vae_keys(vae.state_dict())
    converted = convert_wan_vae_to_diffusers(dict(original))
    assert converted.keys() == vae.state_dict().keys()  # the test's inverse is exact
    save_file({k: v.contiguous() for k, v in original.items()}, root / "wan_2.1_vae.safetensors")

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0 - i) for i, w in enumerate(WORDS)]
    vocab += [(c, -30.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = tokenizers.Tokenizer(tokenizers.models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = tokenizers.decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    text_dir = root / "umt5"
    text_dir.mkdir()
    tok.save(str(text_dir / "tokenizer.json"))
    tok_cfg = {"tokenizer_class": "T5Tokenizer", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
               "extra_ids": 0, "model_max_length": 512}  # fmt: skip
    (text_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    cfg = transformers.UMT5Config(
        vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
    )  # fmt: skip
    torch.manual_seed(1)
    umt5 = transformers.UMT5EncoderModel(cfg).eval()
    umt5.save_pretrained(str(text_dir), safe_serialization=True)
    return {"root": root, "dit": dit, "vae": vae, "umt5": umt5, "text_dir": text_dir}


def _video(seed, frames=25, fps=30):
    """uint8 [F, 64, 96, 3]: a bright square moving right on a dark background; frame i has brightness 8·i in
    its top-left pixel block (so resampling is visible)."""
    g = np.random.default_rng(seed)
    colour = g.integers(80, 255, size=3)
    out = np.zeros((frames, 64, 96, 3), np.uint8)
    for i in range(frames):
        x = 10 + 2 * i
        out[i, 20:40, x : x + 20] = colour
    return out


@pytest.fixture()
def data(tmp_path):
    root = tmp_path / "videos"
    for i, caption in enumerate(["a red ball moving left", "a blue cube moving right", "a green ball moving up"]):
        sub = root / ("more" if i == 2 else "")
        write_mp4(_video(i), sub / f"clip{i}.mp4", fps=30, crf=0)
        (sub / f"clip{i}.txt").write_text(f"  {caption}\n")
    return root


def _lazy(models, counter, vae_fp="vae-1", text_fp="text-1"):
    def vae():
        counter["vae"] = counter.get("vae", 0) + 1
        return load_wan_vae(models["root"] / "wan_2.1_vae.safetensors")

    def text():
        counter["text"] = counter.get("text", 0) + 1
        return load_umt5(models["text_dir"], text_len=512)

    return Lazy(vae_fp, vae), Lazy(text_fp, text)


# ----------------------------------------------------------------------------------------------------------
# Reading, finding, loading
# ----------------------------------------------------------------------------------------------------------


def test_read_clip_resamples_resizes_and_crops(tmp_path):
    frames = np.zeros((30, 40, 80, 3), np.uint8)
    for i in range(30):
        frames[i, :, :, 0] = 8 * i  # red encodes the frame index
        frames[i, :, :20, 1] = 255  # a green band on the left quarter: cropped away by a square crop
    write_mp4(frames, tmp_path / "v.mp4", fps=30, crf=0)
    clip = read_clip(tmp_path / "v.mp4", fps=10, height=32, width=32, max_frames=100)
    assert clip.shape == (10, 32, 32, 3)  # 30 frames at 30 fps = 1 s = 10 frames at 10 fps
    red = clip[:, 16, 16, 0].astype(int)
    assert np.abs(red - 8 * np.arange(0, 30, 3)).max() <= 6  # frame k shows source frame 3k (codec rounding)
    assert clip[:, :, :, 1].max() < 40  # the left band (outside the centred 40x40 crop) is gone
    # 75 fps from 30: output k at k/75 s takes the nearest source frame (no ties at these rates)
    fast = read_clip(tmp_path / "v.mp4", fps=75, height=32, width=32, max_frames=7)
    assert fast.shape[0] == 7
    assert np.abs(fast[:, 16, 16, 0].astype(int) - 8 * np.array([0, 0, 1, 1, 2, 2, 2])).max() <= 6


def test_find_captioned_videos_lists_problems(tmp_path):
    with pytest.raises(FileNotFoundError):
        find_captioned_videos(tmp_path / "nope")
    with pytest.raises(ValueError, match="no videos"):
        find_captioned_videos(tmp_path)
    write_mp4(_video(0, frames=3), tmp_path / "a.mp4", fps=30)
    write_mp4(_video(1, frames=3), tmp_path / "b.mp4", fps=30)
    (tmp_path / "b.txt").write_text("   \n")
    with pytest.raises(ValueError, match=r"1 video\(s\) without a caption file.*a\.mp4.*1 empty caption file.*b\.txt"):
        find_captioned_videos(tmp_path)
    (tmp_path / "a.txt").write_text("a  red\nball")
    (tmp_path / "b.txt").write_text("b")
    assert [(p.name, c) for p, c in find_captioned_videos(tmp_path)] == [("a.mp4", "a red ball"), ("b.mp4", "b")]


def test_video_settings_are_validated():
    with pytest.raises(ValueError, match="video.height must be a positive multiple of 16"):
        VideoDataConfig(height=40)
    with pytest.raises(ValueError, match="video.fps"):
        VideoDataConfig(fps=0)
    with pytest.raises(ValueError, match=r"unknown video settings \['size'\]"):
        video_config({"size": 3})
    assert VideoDataConfig(max_frames=83).usable_frames(4) == 81


def test_vae_from_the_original_layout_encodes_like_diffusers(models):
    codec = load_wan_vae(models["root"] / "wan_2.1_vae.safetensors")
    frames = torch.rand(5, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    z = codec.encode(frames)
    assert z.shape == (1, 16, 2, 4, 6)
    with torch.no_grad():
        raw = models["vae"].encode(frames.permute(1, 0, 2, 3)[None] * 2 - 1).latent_dist.mode()
    mean = torch.tensor(WAN21_MEAN).view(1, -1, 1, 1, 1)  # the published Wan 2.1 statistics (= diffusers' config)
    std = torch.tensor(WAN21_STD).view(1, -1, 1, 1, 1)
    assert models["vae"].config.latents_mean == pytest.approx(WAN21_MEAN)
    torch.testing.assert_close(z, (raw - mean) / std)
    assert codec.decode(z).shape == (5, 3, 32, 48)
    with pytest.raises(ValueError, match="1 \\+ 4·k frames"):
        codec.encode(frames[:4])
    with pytest.raises(ValueError, match="not a Wan 2.1 VAE"):
        load_wan_vae(models["root"] / "wan.safetensors")
    other = AutoencoderKLWan(base_dim=4, z_dim=16, latents_mean=[0.0] * 16)  # not Wan 2.1's latent space
    with pytest.raises(ValueError, match="latents_mean .* differs from Wan 2.1's"):
        WanVAECodec(other, "x")


def test_umt5_from_a_folder_and_from_a_single_file(models, tmp_path):
    emb = load_umt5(models["text_dir"], text_len=512)
    out = emb.embed(["a red  ball", ""])
    assert [tuple(e.shape) for e in out] == [(4, 16), (1, 16)]  # 3 words + </s>; the empty prompt is just </s>
    ids = torch.tensor([[3 + WORDS.index("a"), 3 + WORDS.index("red"), 3 + WORDS.index("ball"), 1]])
    with torch.no_grad():
        expected = models["umt5"](input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(out[0], expected)
    # ComfyUI's single-file layout (transformers key names, fp16 here) with the tokenizer given separately
    state = {k: v.to(torch.float16).contiguous() for k, v in models["umt5"].state_dict().items()}
    state.pop("encoder.embed_tokens.weight")
    save_file(state, tmp_path / "umt5_xxl_fp16.safetensors")
    single = load_umt5(tmp_path / "umt5_xxl_fp16.safetensors", tokenizer=models["text_dir"])
    torch.testing.assert_close(single.embed(["a red ball"])[0], expected, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="no tokenizer"):
        load_umt5(tmp_path / "umt5_xxl_fp16.safetensors")


def test_umt5_single_file_with_its_own_sentencepiece_tokenizer_and_scaled_fp8(models, tmp_path):
    """ComfyUI's umT5 files carry the SentencePiece model as a uint8 tensor ``spiece_model``; its fp8 "scaled"
    files store ``W = W_fp8 · scale_weight``."""
    spm = pytest.importorskip("sentencepiece")
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 5
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=proto, vocab_size=40, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, hard_vocab_limit=False,
    )  # fmt: skip
    ids = spm.SentencePieceProcessor(model_proto=proto.getvalue()).encode("a red ball") + [1]
    state = {k: v.contiguous() for k, v in models["umt5"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    scales = {}
    for k in [k for k in state if k.endswith(("q.weight", "wo.weight"))]:
        scales[k[: -len("weight")] + "scale_weight"] = torch.tensor(0.5)
        state[k] = (state[k] / 0.5).to(torch.float8_e4m3fn)
    spiece = torch.frombuffer(bytearray(proto.getvalue()), dtype=torch.uint8)
    save_file({**state, **scales, "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn), "spiece_model": spiece},
              tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")  # fmt: skip
    loaded = load_umt5(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    for k, v in loaded.model.state_dict().items():
        stored = state.get(k, state["shared.weight"] if k == "encoder.embed_tokens.weight" else None)
        scale = scales.get(k[: -len("weight")] + "scale_weight", torch.tensor(1.0))
        assert torch.equal(v, stored.float() * scale), k
    with torch.no_grad():
        expected = loaded.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    torch.testing.assert_close(loaded.embed(["a  red ball "])[0], expected)


def test_committed_wan_configs_are_valid():
    root = Path(__file__).resolve().parents[1] / "configs"
    for name, cls in (("wan_1.3b_finetune.json", TrainConfig), ("wan_1.3b_distill.json", DistillConfig)):
        cfg = load_config(root / name, cls)
        video = video_config(dict(cfg.video))
        assert cfg.buffer == 16 and cfg.batch == 1
        assert (video.height, video.width) == (480, 832) and cfg.activation_checkpointing  # fits 80 GB (estimated)


# ----------------------------------------------------------------------------------------------------------
# Caches, training, resume, distillation, export
# ----------------------------------------------------------------------------------------------------------


def _train_cfg(cls=TrainConfig, **kw):
    base = dict(buffer=2, batch=4, lr=3e-3, warmup=2, steps=12, log_every=6, ckpt_every=6, sample_every=0,
                caption_dropout=0.1, bf16=False, video=VIDEO)  # fmt: skip
    return cls(**{**base, **kw})


def test_caches_are_written_once_and_reused(models, data, tmp_path):
    cache, calls = tmp_path / "cache", {}
    cfg = video_config(VIDEO)
    first = prepare_video_data(data, cache, cfg, *_lazy(models, calls), min_latent_frames=2, text_len=512)
    assert (first.stats.videos_encoded, first.stats.captions_encoded) == (3, 4)  # 3 captions + the empty one
    assert calls == {"vae": 1, "text": 1}  # each encoder loaded once, then released
    latents = sorted((cache / "latents").glob("*.safetensors"))
    assert len(latents) == 3 and len(list((cache / "text").glob("*.safetensors"))) == 4
    stamps = {p: p.stat().st_mtime_ns for p in latents}
    x, captions = first.clips(4, 2, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16, 2, 6, 8) and all(len(set(row)) == 1 and len(row) == 2 for row in captions)
    assert first.embed(["", "a red ball moving left"]).shape == (2, 512, 16)

    # unchanged data, settings and encoders: nothing is encoded, no encoder is loaded
    calls.clear()
    again = prepare_video_data(data, cache, cfg, *_lazy(models, calls), min_latent_frames=2, text_len=512)
    assert calls == {} and (again.stats.videos_cached, again.stats.captions_cached) == (3, 4)
    assert {p: p.stat().st_mtime_ns for p in latents} == stamps
    # a changed video is re-encoded (only it); a changed setting or VAE re-encodes all videos
    write_mp4(_video(7), data / "clip0.mp4", fps=30, crf=0)
    changed = prepare_video_data(data, cache, cfg, *_lazy(models, calls), min_latent_frames=2, text_len=512)
    assert (changed.stats.videos_encoded, changed.stats.videos_cached, changed.stats.captions_encoded) == (1, 2, 0)
    other = video_config({**VIDEO, "fps": 10})
    assert prepare_video_data(data, cache, other, *_lazy(models, {}), 2, 512).stats.videos_encoded == 3
    new_vae = prepare_video_data(data, cache, cfg, *_lazy(models, {}, vae_fp="vae-2"), 2, 512)
    assert new_vae.stats.videos_encoded == 3 and new_vae.stats.captions_encoded == 0
    # clips shorter than the buffer are left out; none left is an error that says what to change
    with pytest.raises(ValueError, match="buffer of 4 latent frames needs clips of at least 13 frames"):
        prepare_video_data(data, cache, cfg, *_lazy(models, {}), min_latent_frames=4)


def test_finetune_wan_trains_resumes_distils_and_exports(models, data, tmp_path):
    calls = {}
    clips = prepare_video_data(data, tmp_path / "cache", video_config(VIDEO), *_lazy(models, calls), 2, 512)
    wan = str(models["root"] / "wan.safetensors")
    tr = Trainer(_train_cfg(), tmp_path / "teacher", "cpu", init=wan, source=clips)
    assert tr.text is None and tr.model.config == DIT
    start, _ = tr.gather("live")  # the FSDP-sharded model, gathered
    for k, v in models["dit"].state_dict().items():
        assert torch.equal(start.state_dict()[k], v), k

    g = torch.Generator().manual_seed(5)
    x, captions = clips.clips(4, 2, g)
    sigma = torch.rand(4, 2, generator=g) * 0.9 + 0.05
    noise = torch.randn(x.shape, generator=g)
    ctx = clips.embed([row[0] for row in captions])

    def fixed_loss(model):
        with torch.no_grad():
            return float(flow_matching_loss(model, x, sigma, noise, ctx))

    before = fixed_loss(tr.model)
    tr.run()
    assert fixed_loss(tr.model) < 0.8 * before
    meta = load_checkpoint(tmp_path / "teacher" / "ema.safetensors").metadata
    assert meta["streamdit.codec"] == "wan2.1" and "streamdit.text_encoder_config" not in meta
    defaults = json.loads(meta["streamdit.defaults"])
    assert (defaults["height"], defaults["width"], defaults["fps"], defaults["partition"]) == (48, 64, 15, [0, 1, 2, 1])

    again = Trainer(_train_cfg(steps=18), tmp_path / "teacher", "cpu", init=wan, source=clips)
    assert again.resume() and again.step == 12
    (a, _), (b, _) = again.gather("live"), tr.gather("live")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    again.run()
    assert again.step == 18

    d = Distiller(
        _train_cfg(DistillConfig, chunk=1, teacher_steps=2, steps=4, lr=1e-3),
        tmp_path / "student",
        "cpu",
        teacher=str(tmp_path / "teacher" / "ema.safetensors"),
        source=clips,
    )
    d.run()
    assert d.step == 4 and d.defaults()["partition"] == [0, 2, 1, 1] and d.defaults()["guidance"] == 1.0
    assert calls == {"vae": 1, "text": 1}

    student = str(tmp_path / "student" / "ema.safetensors")
    assert main(["export", "--ckpt", student, "--out", str(tmp_path / "x.safetensors")]) == 0
    exported = load_checkpoint(tmp_path / "x.safetensors")
    assert exported.text_encoder is None and exported.codec == "wan2.1"
    ema, _ = d.gather("ema")
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(exported.model.state_dict()[k], v.to(torch.float16).float())


def test_command_line_finetune_from_wan_files(models, data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="StreamDiT")
    config = tmp_path / "wan.json"
    config.write_text(json.dumps({**_train_cfg().__dict__, "chunk_sizes": [1, 2], "steps": 3, "ckpt_every": 3}))
    root = models["root"]
    args = ["train", "--config", str(config), "--out", str(tmp_path / "run"), "--init", str(root / "wan.safetensors"),
            "--data", str(data), "--vae", str(root / "wan_2.1_vae.safetensors"),
            "--text-encoder", str(models["text_dir"])]  # fmt: skip
    assert main(args) == 0
    assert len(list((data / ".streamdit-cache" / "latents").glob("*.safetensors"))) == 3
    caplog.clear()
    assert main([*args, "--resume", "--steps", "5"]) == 0
    assert "frames -> latents" not in caplog.text and "(0 encoded now, 3 cached)" in caplog.text
    assert json.loads(Path(tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])["step"] == 5
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "bad"), "--data", str(data)]) == 2
    assert "--data needs --vae" in caplog.text


def test_clip_draws_follow_the_micro_batch_seeds(models, data, tmp_path):
    """Micro-batch ``j`` of a step draws its windows from ``seed_for(seed, step, j, ·)``: the same index gives the
    same clips, another index (another rank or accumulated micro-batch) or another step different ones."""
    clips = prepare_video_data(data, tmp_path / "cache", video_config(VIDEO), *_lazy(models, {}), 2, 512)
    tr = Trainer(_train_cfg(batch=6), tmp_path / "run", "cpu", init=str(models["root"] / "wan.safetensors"),
                 source=clips)
    x0, c0 = tr.clips(tr.draws(0))
    x0b, c0b = tr.clips(tr.draws(0))
    x1, _ = tr.clips(tr.draws(1))
    assert torch.equal(x0, x0b) and c0 == c0b and not torch.equal(x0, x1)
    tr.step = 1
    assert not torch.equal(tr.clips(tr.draws(0))[0], x0)
    x, ctx = tr.batch(tr.draws(0))
    assert ctx.shape == (6, 512, 16)  # one caption per clip: one shared context per clip, not per frame


def test_finetuned_checkpoint_streams_in_wan_latent_space(models, data, tmp_path):
    """A fine-tuned tiny Wan loads through load_pipeline as a StreamDiT-trained model in Wan 2.1's latent space
    (codec ``wan2.1``, the one ComfyUI's StreamDiT Decode node reads), and its training latents are that space:
    denormalising a cached latent with the pipeline's codec gives the VAE's raw latents of the video."""
    from streamdit_core.prompts import ConditionedSchedule, parse_schedule
    from streamdit_core.sampler import StreamSampler

    clips = prepare_video_data(data, tmp_path / "cache", video_config(VIDEO), *_lazy(models, {}), 2, 512)
    tr = Trainer(_train_cfg(steps=2, ckpt_every=2), tmp_path / "run", "cpu",
                 init=str(models["root"] / "wan.safetensors"), source=clips)
    tr.run()
    pipe = load_pipeline(tmp_path / "run" / "ema.safetensors")
    assert "wan2.1" in LATENT_CODECS and pipe.codec.name == "wan2.1"
    assert pipe.text_encoder is None and not pipe.base_model
    settings = pipe.default_settings()
    assert (settings.height, settings.width, settings.model_frames) == (48, 64, None)  # whole buffer per call
    assert (settings.partition.N, settings.partition.c, settings.guidance) == (1, 2, 5.0)

    # the cached latents of clip0 = (raw VAE latents − WAN21_MEAN) / WAN21_STD
    item = next(c for c in clips.items if c.caption == "a red ball moving left")
    with safe_open(str(item.latents), framework="pt") as f:
        cached = f.get_tensor("latents")[None]  # [1, 16, F', 6, 8]
    frames = read_clip(data / "clip0.mp4", VIDEO["fps"], VIDEO["height"], VIDEO["width"], VIDEO["max_frames"])
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 255.0 * 2 - 1
    with torch.no_grad():
        raw = models["vae"].encode(x).latent_dist.mode()
    torch.testing.assert_close(pipe.codec.denormalise(cached), raw, atol=1e-5, rtol=1e-5)

    # it streams: prompt embeddings as ComfyUI's CONDITIONING would bring them (the cached umT5 output)
    emb = clips.embed(["a red ball moving left", ""])
    schedule = ConditionedSchedule(parse_schedule("0: ball"), {"ball": emb[0]}, negative=emb[1])
    sampler = StreamSampler(pipe, settings)
    state = sampler.init_state(0, schedule)
    state, latents = sampler.advance_latents(state, schedule, chunks=2)
    assert latents.shape == (1, 16, 4, 6, 8) and torch.isfinite(latents).all()  # 2 chunks of 2 latent frames


@pytest.mark.slow
def test_two_ranks_fine_tune_like_one_process_accumulating(models, data, tmp_path):
    """``train --data`` on a 2-process gloo group (rank 0 encodes the videos, rank 1 waits and reads the cache;
    one micro-batch per rank) ends with the weights of one process accumulating both micro-batches."""
    import torch.multiprocessing as mp
    from dist_worker import cli_worker

    root = models["root"]

    def argv(name, grad_accum):
        config = tmp_path / f"{name}.json"
        cfg = {**_train_cfg().__dict__, "steps": 3, "ckpt_every": 3, "log_every": 1, "batch": 2,
               "grad_accum": grad_accum}  # fmt: skip
        config.write_text(json.dumps(cfg))
        return ["train", "--config", str(config), "--out", str(tmp_path / name),
                "--init", str(root / "wan.safetensors"), "--data", str(data),
                "--cache", str(tmp_path / f"cache_{name}"), "--device", "cpu",
                "--vae", str(root / "wan_2.1_vae.safetensors"), "--text-encoder", str(models["text_dir"])]  # fmt: skip

    assert main(argv("one", 2)) == 0
    mp.spawn(cli_worker, args=(str(tmp_path), argv("two", 1)), nprocs=2, join=True)
    assert len(list((tmp_path / "cache_two" / "latents").glob("*.safetensors"))) == 3
    one, two = (load_checkpoint(tmp_path / n / "live.safetensors") for n in ("one", "two"))
    assert two.codec == "wan2.1"
    a, b = one.model.state_dict(), two.model.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 2e-5
    start = models["dit"].state_dict()
    assert max(float((start[k] - a[k]).abs().max()) for k in start) > 1e-4  # training moved the weights

    def losses(n):
        return [json.loads(line)["loss"] for line in (tmp_path / n / "log.jsonl").read_text().splitlines()]

    assert losses("two") == pytest.approx(losses("one"), rel=1e-5)
