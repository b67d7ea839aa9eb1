"""Wan 2.1 in the nodes: the loader lists Wan files from models/diffusion_models, CONDITIONING schedules,
the streaming decode (chunk by chunk across queue runs = one decode of the whole video; reset, save and load
carry the decoder cache), VAE-encoded video-to-video, the base-model noise-spread warning, and the Wan workflow
run for several queue runs. Tiny random models of the real layouts (tests/wan_fakes.py); no ComfyUI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from comfy_executor import ExecutionError, Executor, find_nodes, load_pack, load_workflow, pack_module

pytest.importorskip("diffusers")
import wan_fakes  # noqa: E402  (needs diffusers)

pytestmark = pytest.mark.usefixtures("one_thread")

pack = load_pack()
CLASSES = pack.NODE_CLASS_MAPPINGS
host = pack_module("nodes.host")
common = pack_module("nodes.common")
model_nodes = pack_module("nodes.model")
WAN = "diffusion_models/wan/tiny_wan.safetensors"
WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "streamdit_wan_text_to_video.json"


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[Path]:
    host.set_base_dir(tmp_path)
    common.STREAMS.clear()
    wan_fakes.write_tiny_wan(tmp_path / "models" / "diffusion_models" / "wan" / "tiny_wan.safetensors")
    yield tmp_path
    common.STREAMS.clear()
    host.set_base_dir(None)


@pytest.fixture(scope="module")
def vae() -> wan_fakes.FakeWanVAE:
    return wan_fakes.FakeWanVAE()


def _cond(text: str) -> list[list[Any]]:
    return wan_fakes.FakeCLIP().encode(text)


def _wan(settings: dict[str, Any] | None = None) -> tuple[Any, Any]:
    (handle,) = CLASSES["StreamDiTModelLoader"]().load(WAN, "auto", "auto")
    values = {"chunk_size": 0, "chunks": 0, "micro_steps": 0, "reference_frames": -1, "shift": 0.0, "guidance": 0.0,
              "height": 32, "width": 32, "window_frames": 0, "window_height": 0, "window_width": 0,
              "warm_start": True, "negative_prompt": ""}
    values.update(settings or {})
    out = CLASSES["StreamDiTSettings"]().build(handle, **values)
    return handle, out["result"][0]


def _prompts(negative: bool = True) -> Any:
    node = CLASSES["StreamDiTConditioningSchedule"]()
    (spec,) = node.build(_cond("a red fox"), "0, 3", 1, conditioning_2=_cond("a blue bird over the sea"),
                         negative=_cond("blurry") if negative else None)
    return spec


def _run(handle: Any, settings: Any, prompts: Any, vae: Any, stream: str, runs: int, start: int = 0,
         video: Any = None, initial_state: Any = None) -> list[tuple[Any, ...]]:
    out = []
    for r in range(runs):
        with host.executing(f"{stream}-{start + r}", "1"):
            sampled = CLASSES["StreamDiTSampler"]().sample(handle, settings, prompts, stream, 0, 2, False,
                                                           video=video, initial_state=initial_state)
            decoded = CLASSES["StreamDiTDecode"]().decode(sampled[2], vae) if vae is not None else None
        out.append((sampled, decoded))
    return out


# ----------------------------------------------------------------------------------------------------------
# Loader


def test_loader_lists_wan_files_from_diffusion_models(env: Path) -> None:
    folder = env / "models" / "diffusion_models"
    (folder / "not_wan.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # other models: hidden
    (folder / "pickle.ckpt").write_bytes(b"x")
    options = CLASSES["StreamDiTModelLoader"].INPUT_TYPES()["required"]["model"][0]
    assert options == ["streamdit-bundled (default)", "streamdit-bundled-teacher (16 calls per chunk)", WAN]
    (handle,) = CLASSES["StreamDiTModelLoader"]().load(WAN, "auto", "auto")
    pipe = handle.pipeline
    assert pipe.base_model and pipe.text_encoder is None and pipe.codec.name == "wan2.1"
    assert pipe.model.config.to_json() == wan_fakes.tiny_wan_config().with_(text_len=512).to_json()  # inferred
    assert handle.path == str(folder / "wan" / "tiny_wan.safetensors")
    # a plain Wan file copied into models/streamdit loads the same way
    wan_fakes.write_tiny_wan(env / "models" / "streamdit" / "copied.safetensors")
    (copied,) = CLASSES["StreamDiTModelLoader"]().load("copied.safetensors", "auto", "auto")
    assert copied.pipeline.base_model
    with pytest.raises(FileNotFoundError, match="diffusion_models"):
        CLASSES["StreamDiTModelLoader"]().load("diffusion_models/missing.safetensors", "auto", "auto")


def test_settings_warn_when_a_base_model_sees_a_wide_noise_spread(env: Path) -> None:
    (handle,) = CLASSES["StreamDiTModelLoader"]().load(WAN, "auto", "auto")
    base = dict(chunk_size=0, chunks=0, micro_steps=0, reference_frames=-1, shift=0.0, guidance=0.0, height=32,
                width=32, window_frames=0, window_height=0, window_width=0, warm_start=True, negative_prompt="")
    node = CLASSES["StreamDiTSettings"]()
    default = node.build(handle, **base)
    settings = default["result"][0]
    assert settings.model_frames == 4 and settings.partition.c == 1  # the base-Wan defaults (FIFO-style)
    assert default["ui"]["text"][0].startswith("noise spread per model input 0.19 (base model: OK")
    whole = node.build(handle, **base, model_frames=0)
    assert whole["result"][0].model_frames is None
    text = whole["ui"]["text"][0]
    assert text.startswith("WARNING:") and "0.94" in text and "model_frames" in text
    assert any(t == text for _, t in host.node_text_log)  # also shown under the node
    lookahead = node.build(handle, **base, model_frames=4, lookahead=True)["result"][0]
    assert lookahead.lookahead and lookahead.model_frames == 4
    # a StreamDiT-trained model is never warned about
    bundled = model_nodes.load_model(model_nodes.BUNDLED)
    assert "any spread is fine" in node.build(bundled, **{**base, "height": 0, "width": 0})["ui"]["text"][0]


# ----------------------------------------------------------------------------------------------------------
# Conditioning


def test_conditioning_schedule_equals_the_text_schedule_it_encodes(env: Path) -> None:
    """Independent expectation: CONDITIONING made of the bundled encoder's own embeddings streams exactly the
    frames the text schedule does (same per-frame keyframes and blends)."""
    bundled = model_nodes.load_model(model_nodes.BUNDLED)
    settings = model_nodes.build_settings(bundled, chunks=4, height=32, width=32)
    texts = ["a large red circle moving right on a black background",
             "a small yellow square moving left on a grey background"]
    emb = bundled.pipeline.encode_prompts(texts)
    text_spec = pack_module("nodes.inputs").parse_prompts(f"0: {texts[0]}\n5: {texts[1]}", transition=3)
    (cond_spec,) = CLASSES["StreamDiTConditioningSchedule"]().build(
        [[emb[texts[0]][None], {}]], "0, 5", 3, conditioning_2=[[emb[texts[1]][None], {}]])
    sampler = CLASSES["StreamDiTSampler"]()
    frames = []
    for stream, spec in (("text", text_spec), ("cond", cond_spec)):
        runs = []
        for r in range(3):
            with host.executing(f"{stream}-{r}", "1"):
                runs.append(sampler.sample(bundled, settings, spec, stream, 3, 2, False)[0])
        frames.append(torch.cat(runs))
    assert torch.equal(frames[0], frames[1])


def test_conditioning_inputs_are_checked(env: Path) -> None:
    build = CLASSES["StreamDiTConditioningSchedule"]().build
    one = _cond("a fox")
    with pytest.raises(ValueError, match="keyframes has 2 entries .* 1 conditioning"):
        build(one, "0, 8", 0, conditioning_2=None)
    with pytest.raises(ValueError, match="keyframes has 1 entries .* 2 conditioning"):
        build(one, "0", 0, conditioning_2=one)
    with pytest.raises(ValueError, match="conditioning_2 not connected but conditioning_3"):
        build(one, "0, 4", 0, conditioning_3=one)
    with pytest.raises(ValueError, match="start at 0"):
        build(one, "4", 0)
    with pytest.raises(ValueError, match="strictly increasing"):
        build(one, "0, 0", 0, conditioning_2=one)
    with pytest.raises(ValueError, match="whole numbers"):
        build(one, "zero", 0)
    with pytest.raises(ValueError, match="Conditioning Combine"):
        build(one + one, "0", 0)
    with pytest.raises(ValueError, match="batch of 2"):
        build([[torch.zeros(2, 4, 32), {}]], "0", 0)
    with pytest.raises(ValueError, match="negative"):
        build(one, "0", 0, negative="text")
    with pytest.raises(ValueError, match="different widths"):
        build(one, "0", 0, negative=[[torch.zeros(1, 4, 8), {}]])
    # prompts of different lengths are zero-padded to one length (umT5 pads with zero rows too)
    (spec,) = build(one, "0, 2", 0, conditioning_2=[[torch.ones(1, 40, 32), {}]])
    emb = spec.schedule.embeddings
    assert emb["conditioning_1"].shape == emb["conditioning_2"].shape == (40, 32)
    assert torch.equal(emb["conditioning_1"][:24], one[0][0][0]) and not emb["conditioning_1"][24:].any()


def test_sampler_names_conditioning_the_model_cannot_use(env: Path) -> None:
    handle, settings = _wan()
    sampler = CLASSES["StreamDiTSampler"]()
    text = pack_module("nodes.inputs").parse_prompts("0: a red fox")
    with pytest.raises(ValueError, match="no text encoder of its own.*Conditioning Schedule"):
        sampler.sample(handle, settings, text, "s", 0, 1, False)
    with pytest.raises(ValueError, match="needs a negative prompt: connect 'negative'"):
        sampler.sample(handle, settings, _prompts(negative=False), "s", 0, 1, False)
    (wide,) = CLASSES["StreamDiTConditioningSchedule"]().build([[torch.zeros(1, 8, 4096), {}]], "0", 0)
    with pytest.raises(ValueError, match="4096 wide but .* expects 32"):
        sampler.sample(handle, settings, wide, "s", 0, 1, False)
    assert common.STREAMS.get("s") is None or common.STREAMS.get("s").state is None  # nothing was committed


# ----------------------------------------------------------------------------------------------------------
# Streaming decode


def _full_decode(vae: wan_fakes.FakeWanVAE, handle: Any, runs: list[tuple[Any, ...]]) -> torch.Tensor:
    latents = torch.cat([sampled[2].latents for sampled, _ in runs], dim=2)
    return vae.decode(handle.pipeline.codec.denormalise(latents))[0]


def test_decoding_run_by_run_equals_one_decode_of_the_whole_video(env: Path, vae: wan_fakes.FakeWanVAE) -> None:
    handle, settings = _wan()
    runs = _run(handle, settings, _prompts(), vae, "wan", 3)
    frames = torch.cat([decoded[0] for _, decoded in runs])
    expected = _full_decode(vae, handle, runs)
    assert frames.shape == expected.shape == (1 + 4 * 5, 32, 32, 3)  # 6 latent frames
    torch.testing.assert_close(frames, expected, atol=1e-5, rtol=0)
    assert frames.std() > 0.01
    # frame indices count decoded frames; the latent output carries the decoder cache
    assert [decoded[1] for _, decoded in runs] == [0, 5, 13]
    assert [decoded[2].frame_index for _, decoded in runs] == [0, 5, 13]
    assert runs[-1][1][2].decoder_state.latent_index == 6
    # the sampler's own frames for a latent model are a cheap preview, one per latent frame
    assert runs[0][0][0].shape == (2, 32, 32, 3)
    # the same run decoded again (a re-executed node) gives the same frames without advancing the cache
    again = CLASSES["StreamDiTDecode"]().decode(runs[-1][0][2], vae)
    assert again is runs[-1][1]


def test_reset_save_and_load_carry_the_decoder_cache(env: Path, vae: wan_fakes.FakeWanVAE) -> None:
    handle, settings = _wan()
    prompts = _prompts()
    direct = _run(handle, settings, prompts, vae, "direct", 4)
    expected = torch.cat([decoded[0] for _, decoded in direct])

    runs = _run(handle, settings, prompts, vae, "saved", 2)
    state_nodes = pack_module("nodes.state")
    path, _ = state_nodes.save_stream_state(runs[-1][1][2], "streamdit/state")  # the Decode node's latent
    handle_file = state_nodes.load_stream_state(Path(path).relative_to(env / "output").as_posix())
    assert handle_file.decoder_state is not None and handle_file.decoder_state.latent_index == 4
    common.STREAMS.clear()  # "restart ComfyUI": the registry is gone, the file stays
    resumed = _run(handle, settings, prompts, vae, "saved", 2, start=2, initial_state=handle_file)
    frames = torch.cat([decoded[0] for _, decoded in runs + resumed])
    torch.testing.assert_close(frames, expected, atol=1e-6, rtol=0)  # no seam at the resume
    assert resumed[0][1][1] == 13

    # reset: the stream and its decoder start again (the first latent frame decodes to 1 frame again)
    common.STREAMS.reset("saved")
    again = _run(handle, settings, prompts, vae, "saved", 1, start=9)
    torch.testing.assert_close(again[0][1][0], direct[0][1][0], atol=1e-6, rtol=0)


def test_decode_starting_mid_stream_warns_and_goes_on(env: Path, vae: wan_fakes.FakeWanVAE) -> None:
    handle, settings = _wan()
    prompts = _prompts()
    _run(handle, settings, prompts, None, "late", 1)  # decoded by nobody
    late = _run(handle, settings, prompts, vae, "late", 1, start=1)
    assert late[0][1][1] == 5  # decoded-frame index as if decoded from the start
    assert any("one seam here" in text for _, text in host.node_text_log)


def test_decode_refuses_what_it_cannot_decode(env: Path, vae: wan_fakes.FakeWanVAE) -> None:
    bundled = model_nodes.load_model(model_nodes.BUNDLED)
    settings = model_nodes.build_settings(bundled, chunks=4, height=32, width=32)
    spec = pack_module("nodes.inputs").parse_prompts("0: a red circle")
    with host.executing("b", "1"):
        _, _, latent = CLASSES["StreamDiTSampler"]().sample(bundled, settings, spec, "b", 0, 1, False)
    with pytest.raises(ValueError, match="pixel space"):
        CLASSES["StreamDiTDecode"]().decode(latent, vae)
    handle, wan_settings = _wan()
    (run,) = _run(handle, wan_settings, _prompts(), vae, "w", 1)
    with pytest.raises(ValueError, match="already decoded"):
        CLASSES["StreamDiTDecode"]().decode(run[1][2], vae)

    class NotWan:
        first_stage_model = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="not a Wan 2.1 VAE"):
        CLASSES["StreamDiTDecode"]().decode(run[0][2], NotWan())


# ----------------------------------------------------------------------------------------------------------
# Video-to-video through the VAE


def test_video_to_video_encodes_the_input_with_the_vae(env: Path, vae: wan_fakes.FakeWanVAE) -> None:
    handle, settings = _wan()
    prompts = _prompts()
    clip = torch.rand(17, 40, 48, 3, generator=torch.Generator().manual_seed(0))
    (video,) = CLASSES["StreamDiTVideoInput"]().prepare(clip, 0.6, "loop", vae=vae)
    source = video.source()
    assert source.num_frames == 5  # 17 frames → 5 latent frames (causal ×4)
    before = vae.encoded
    runs = _run(handle, settings, prompts, vae, "v2v", 2, video=video)
    assert vae.encoded == before + 1  # encoded once, at the stream's size, then reused
    (t2v_video,) = CLASSES["StreamDiTVideoInput"]().prepare(clip, 1.0, "loop", vae=vae)
    t2v = _run(handle, settings, prompts, vae, "v2v-strength-1", 1, video=t2v_video)
    plain = _run(handle, settings, prompts, vae, "t2v", 1)
    assert torch.equal(t2v[0][0][2].latents, plain[0][0][2].latents)  # strength 1 = text-to-video
    assert not torch.equal(runs[0][0][2].latents, plain[0][0][2].latents)  # the input matters below 1
    with pytest.raises(ValueError, match="external VAE"):  # a latent model without the VAE connected
        (no_vae,) = CLASSES["StreamDiTVideoInput"]().prepare(clip, 0.6, "loop")
        _run(handle, settings, prompts, vae, "no-vae", 1, video=no_vae)


# ----------------------------------------------------------------------------------------------------------
# The workflow, as shipped (stock loaders replaced by stand-ins with the same sockets)


def test_wan_workflow_streams_across_queue_runs(env: Path) -> None:
    builder_names = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    loader_entry = next(n for n in builder_names["nodes"] if n["type"] == "StreamDiTModelLoader")
    model_name = loader_entry["widgets_values"][0]
    assert model_name == "diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"
    wan_fakes.write_tiny_wan(env / "models" / model_name)
    ex = Executor()
    ex.classes.update(wan_fakes.STOCK)
    prompt = ex.convert(load_workflow(WORKFLOW))
    for node_id in find_nodes(prompt, "StreamDiTSettings"):
        prompt[node_id]["inputs"].update(height=32, width=32)
    (sampler_id,) = find_nodes(prompt, "StreamDiTSampler")
    (decode_id,) = find_nodes(prompt, "StreamDiTDecode")
    (writer_id,) = find_nodes(prompt, "StreamDiTWriter")
    (settings_id,) = find_nodes(prompt, "StreamDiTSettings")
    results = [ex.run(prompt) for _ in range(3)]
    per_run = prompt[sampler_id]["inputs"]["chunks_per_run"]
    assert [r.results[sampler_id][1] for r in results] == [0, per_run, 2 * per_run]
    decoded = [r.results[decode_id] for r in results]
    assert [d[1] for d in decoded] == [0, 1 + 4 * (per_run - 1), 1 + 4 * (2 * per_run - 1)]
    frames = torch.cat([d[0] for d in decoded])
    latents = torch.cat([r.results[sampler_id][2].latents for r in results], dim=2)
    handle = results[0].results[sampler_id][2].model
    expected = wan_fakes.VAELoader.vae.decode(handle.pipeline.codec.denormalise(latents))[0]
    torch.testing.assert_close(frames, expected, atol=1e-5, rtol=0)
    assert results[-1].results[writer_id][1] == frames.shape[0]  # the file holds every decoded frame
    assert "base model: OK" in results[0].outputs[settings_id]["text"][0]
    with pytest.raises(ExecutionError, match="negative"):  # guidance without the negative input
        edited = json.loads(json.dumps(prompt))
        (schedule_id,) = find_nodes(edited, "StreamDiTConditioningSchedule")
        del edited[schedule_id]["inputs"]["negative"]
        edited[sampler_id]["inputs"]["stream_id"] = "no-negative"
        ex.run(edited)
