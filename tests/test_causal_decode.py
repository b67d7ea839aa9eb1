"""Streaming decode with a causal VAE equals one decode of the whole latent video.

The reference is diffusers' ``AutoencoderKLWan`` (a test dependency; the same causal-cache design as Wan 2.1's
own VAE and ComfyUI's ``WanVAE``) on tiny random weights: its ``decode`` of all latent frames at once against
:func:`streamdit_core.causal_decode.decode_chunk` fed the same frames in chunks of varying sizes, with the
cache carried between chunks — also through ``state_dict`` and a file, as a stream-state save does.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from streamdit_core.causal_decode import (
    REP,
    DecoderState,
    ModuleStepDecoder,
    count_causal_convs,
    decode_chunk,
    decoded_length,
)
from streamdit_core.schedule import Partition
from streamdit_core.stream import StreamState, load_state, load_state_extras, save_state

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_wan_vae(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # parameter init only
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
    return vae.eval()


def step_decoder(vae: torch.nn.Module) -> ModuleStepDecoder:
    return ModuleStepDecoder.from_diffusers(vae)


def full_decode(vae: torch.nn.Module, raw: torch.Tensor) -> torch.Tensor:
    """diffusers' own decode, as ``[T, 3, H, W]`` in [0, 1]."""
    with torch.no_grad():
        video = vae.decode(raw).sample  # [1, 3, T, H, W], clamped to [-1, 1]
    return ((video[0] + 1) * 0.5).clamp(0, 1).permute(1, 0, 2, 3)


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    return tiny_wan_vae()


@pytest.fixture(scope="module")
def raw() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 16, 7, 4, 6, generator=g)


def test_cache_length_matches_diffusers(vae: torch.nn.Module) -> None:
    vae.clear_cache()
    assert count_causal_convs(vae.decoder) == len(vae._feat_map)


@pytest.mark.parametrize("chunks", [[7], [1, 1, 1, 1, 1, 1, 1], [1, 2, 4], [3, 4], [2, 2, 2, 1]])
def test_chunked_decode_equals_full_decode(vae: torch.nn.Module, raw: torch.Tensor, chunks: list[int]) -> None:
    expected = full_decode(vae, raw)
    assert expected.shape[0] == decoded_length(raw.shape[2], 4) == 25
    decoder = step_decoder(vae)
    state = DecoderState.fresh(decoder.num_slots)
    pieces, start = [], 0
    for n in chunks:
        state, frames = decode_chunk(decoder, state, raw[:, :, start : start + n])
        assert frames.shape[0] == decoded_length(start + n, 4) - decoded_length(start, 4)
        pieces.append(frames)
        start += n
    got = torch.cat(pieces)
    assert state.latent_index == 7 and state.frame_index == 25
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert got.std() > 0.05  # the frames are not flat: the test could see a seam


def test_without_the_cache_there_is_a_seam(vae: torch.nn.Module, raw: torch.Tensor) -> None:
    """The independent check that the cache matters: restarting it mid-stream changes the frames."""
    decoder = step_decoder(vae)
    state, first = decode_chunk(decoder, DecoderState.fresh(decoder.num_slots), raw[:, :, :3])
    _, restarted = decode_chunk(decoder, DecoderState.fresh(decoder.num_slots), raw[:, :, 3:])
    _, continued = decode_chunk(decoder, state, raw[:, :, 3:])
    assert restarted.shape[0] == 13 and continued.shape[0] == 16  # a fresh cache even emits 1 frame, not 4
    expected = full_decode(vae, raw)[9:]
    torch.testing.assert_close(continued, expected, atol=1e-5, rtol=0)


def test_normalised_latents_are_mapped_back(vae: torch.nn.Module, raw: torch.Tensor) -> None:
    mean = torch.linspace(-1, 1, 16)
    std = torch.linspace(0.5, 2, 16)
    normalised = (raw - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    decoder = step_decoder(vae)
    _, frames = decode_chunk(decoder, DecoderState.fresh(decoder.num_slots), normalised, mean=mean, std=std)
    torch.testing.assert_close(frames, full_decode(vae, raw), atol=1e-5, rtol=0)


def test_state_survives_a_stream_state_file(vae: torch.nn.Module, raw: torch.Tensor, tmp_path: Path) -> None:
    decoder = step_decoder(vae)
    state, first = decode_chunk(decoder, DecoderState.fresh(decoder.num_slots), raw[:, :, :1])
    kinds = {type(e) for e in state.cache}
    assert any(isinstance(e, str) and e == REP for e in state.cache) and torch.Tensor in kinds  # all slot kinds
    stream = StreamState(latents=torch.zeros(1, 16, 4, 4, 6), sigmas=torch.zeros(4, dtype=torch.float64),
                         micro_step=0, first_index=2, end_index=-1,
                         generator_state=torch.Generator().manual_seed(0).get_state(), seed=0, calls=3,
                         partition=Partition(K=0, N=4, c=1, s=1))
    path = save_state(stream, tmp_path / "s.safetensors",
                      extras={f"decoder.{k}": v for k, v in state.state_dict().items()})
    loaded_stream, _ = load_state(path)
    assert loaded_stream.first_index == 2
    extras = load_state_extras(path)
    restored = DecoderState.from_state_dict({k.removeprefix("decoder."): v for k, v in extras.items()})
    assert (restored.latent_index, restored.frame_index) == (1, 1)
    _, rest = decode_chunk(decoder, restored, raw[:, :, 1:])
    torch.testing.assert_close(torch.cat([first, rest]), full_decode(vae, raw), atol=1e-5, rtol=0)


def test_a_failed_chunk_leaves_the_state_unchanged(vae: torch.nn.Module, raw: torch.Tensor) -> None:
    decoder = step_decoder(vae)
    state, _ = decode_chunk(decoder, DecoderState.fresh(decoder.num_slots), raw[:, :, :2])
    calls = {"n": 0}

    def check() -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("interrupt")

    before = [e.clone() if isinstance(e, torch.Tensor) else e for e in state.cache]
    with pytest.raises(KeyboardInterrupt):
        decode_chunk(decoder, state, raw[:, :, 2:5], check=check)
    for a, b in zip(state.cache, before):
        assert (a is b) if not isinstance(a, torch.Tensor) else torch.equal(a, b)
    _, rest = decode_chunk(decoder, state, raw[:, :, 2:])
    torch.testing.assert_close(rest, full_decode(vae, raw)[5:], atol=1e-5, rtol=0)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="cache slot"):
        DecoderState.fresh(0)
    with pytest.raises(ValueError, match="missing 'kinds'"):
        DecoderState.from_state_dict({"index": torch.tensor([0, 0])})

    class One:
        num_slots = 3

        def __call__(self, z: torch.Tensor, cache: list, first: bool) -> torch.Tensor:
            return torch.zeros(1, 3, 1, 8, 8)

    with pytest.raises(ValueError, match="another VAE"):
        decode_chunk(One(), DecoderState.fresh(2), torch.zeros(1, 16, 1, 1, 1))
    with pytest.raises(ValueError, match=r"\[1, C, F, h, w\]"):
        decode_chunk(One(), DecoderState.fresh(3), torch.zeros(16, 1, 1, 1))


def test_bench_times_the_decoder_standalone_and_streaming() -> None:
    """The bench's decoder timing decodes one chunk on its own (a stream's first chunk: 1 + 4·(c − 1) frames)
    and one chunk in the middle of a stream through the causal cache (4·c frames)."""
    from streamdit_core.bench import BenchCase, time_decoder

    case = BenchCase("tiny-vae", "test-tiny", (16, 8, 4, 6), Partition(K=0, N=4, c=2, s=1), None,
                     temporal_factor=4, spatial_factor=8, decoder="wan-vae")
    row = time_decoder(case, torch.device("cpu"), torch.float32, repeats=1, make_vae=tiny_wan_vae)
    assert row["decoder"] == "Wan 2.1 VAE", row
    assert row["frames_out_standalone"] == 5 and row["stream_frames_per_chunk"] == 8
    assert row["ms_per_chunk"] > 0 and row["stream_ms_per_chunk"] > 0
    assert time_decoder(replace(case, decoder=None), torch.device("cpu"), torch.float32)["decoder"].startswith("none")
