"""Safetensors checkpoints: bit-exact round trip, clear key errors, never unpickling."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from streamdit_core.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from streamdit_core.config import preset
from streamdit_core.model import StreamDiT
from streamdit_core.text import TextEncoder, TextEncoderConfig


def _pair():
    torch.manual_seed(0)
    cfg = preset("test-tiny")
    model = StreamDiT(cfg)
    torch.nn.init.normal_(model.head.head.weight)
    text = TextEncoder(
        TextEncoderConfig(vocabulary=("red", "circle"), text_len=cfg.text_len, dim=cfg.text_dim, num_heads=2)
    )
    return model, text


def test_round_trip_is_bit_exact(tmp_path):
    model, text = _pair()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, text, metadata={"streamdit.defaults": '{"fps": 12}'})
    loaded = load_checkpoint(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    for a, b in zip(text.state_dict().values(), loaded.text_encoder.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.defaults == {"fps": 12}
    x = torch.randn(1, 3, 2, 4, 4)
    ctx = torch.randn(1, 8, 16)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, torch.tensor([0.5]), ctx), loaded.model(x, torch.tensor([0.5]), ctx))


def test_sharded_round_trip(tmp_path):
    model, text = _pair()
    files = save_checkpoint(tmp_path / "m.safetensors", model, text, max_shard_bytes=40_000)
    assert len(files) > 1 and all(f.name.startswith("m-0000") for f in files)
    loaded = load_checkpoint(tmp_path / "m.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()))


def test_wrong_and_missing_keys_are_listed(tmp_path):
    model, text = _pair()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, text)
    meta = read_metadata(path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd.pop("blocks.0.ffn.0.weight")
    sd["blocks.0.extra"] = torch.zeros(1)
    sd["head.head.bias"] = torch.zeros(5)
    sd.update({"text_encoder." + k: v.contiguous() for k, v in text.state_dict().items()})
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad), metadata=meta)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    msg = str(err.value)
    assert "missing keys ['blocks.0.ffn.0.weight']" in msg
    assert "unexpected keys ['blocks.0.extra']" in msg
    assert "head.head.bias: file [5]" in msg


def test_not_a_checkpoint_and_pickles_are_rejected(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not a StreamDiT checkpoint"):
        load_checkpoint(plain)
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(Exception) as err:
        load_checkpoint(evil)
    assert not isinstance(err.value, CheckpointError) or "pickle" not in str(err.value)
