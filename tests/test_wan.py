"""Wan 2.1 checkpoints: key layout, prefixes, stored dtypes, config inference, clear key errors."""

import pytest
import torch
from safetensors.torch import save_file

from streamdit_core.checkpoint import CheckpointError
from streamdit_core.config import ModelConfig, preset
from streamdit_core.model import StreamDiT
from streamdit_core.wan import infer_wan_config, is_wan_checkpoint, load_wan

# a small model of Wan's layout: head size 128 (Wan's), 16 latent channels, patch 1x2x2
SMALL = ModelConfig(
    in_dim=16,
    out_dim=16,
    dim=256,
    ffn_dim=512,
    num_heads=2,
    num_layers=2,
    patch_size=(1, 2, 2),
    text_dim=64,
    text_len=512,
    freq_dim=256,
)


def _random_wan(seed=0):
    torch.manual_seed(seed)
    model = StreamDiT(SMALL)
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    return model


def test_the_real_layouts_by_shape():
    for name, tensors, params in (("wan2.1-1.3b", 825, 1.42e9), ("wan2.1-14b", 1095, 14.3e9)):
        with torch.device("meta"):
            model = StreamDiT(preset(name))
        sd = model.state_dict()
        assert len(sd) == tensors
        total = sum(v.numel() for v in sd.values())
        assert abs(total - params) / params < 0.01, total
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        assert infer_wan_config(shapes) == preset(name)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_load_with_prefix_and_stored_dtype(tmp_path, prefix, dtype):
    model = _random_wan()
    path = tmp_path / "wan.safetensors"
    save_file({prefix + k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(path))
    assert is_wan_checkpoint(path)
    loaded = load_wan(path)
    assert loaded.model.config == SMALL and loaded.prefix == prefix
    for k, v in model.state_dict().items():
        expected = v.to(dtype).to(torch.float32)
        assert torch.equal(loaded.model.state_dict()[k], expected), k


def test_unknown_and_missing_keys_are_listed(tmp_path):
    sd = {k: v.contiguous() for k, v in _random_wan().state_dict().items()}
    sd["img_emb.proj.0.weight"] = torch.zeros(4)
    del sd["blocks.1.cross_attn.o.bias"]
    path = tmp_path / "i2v.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as err:
        load_wan(path)
    assert "unexpected keys ['img_emb.proj.0.weight']" in str(err.value)
    assert "missing keys ['blocks.1.cross_attn.o.bias']" in str(err.value)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    assert not is_wan_checkpoint(other)
    with pytest.raises(CheckpointError, match="not a Wan 2.1"):
        load_wan(other)


def test_wan_pipeline_applies_speed_ups_after_the_move(tmp_path, monkeypatch):
    """Speed-ups are installed on the model in its final device and dtype (fp8 quantises the weights it finds,
    CUDA graphs need the model on CUDA), as load_pipeline does."""
    import streamdit_core.model as model_mod
    from streamdit_core.pipeline import load_wan_pipeline

    path = tmp_path / "wan.safetensors"
    save_file({k: v.contiguous() for k, v in _random_wan().state_dict().items()}, str(path))
    seen = []
    real = model_mod.apply_perf

    def spy(model, options):
        seen.append(model.patch_embedding.weight.device.type)
        return real(model, options)

    monkeypatch.setattr(model_mod, "apply_perf", spy)
    pipe = load_wan_pipeline(path, device="meta", perf="safe")  # a device other than the loading CPU
    assert seen == ["meta"] and pipe.model.perf_status["requested"] == "text_kv_cache,layout_cache,window_gather"
