"""The node classes follow ComfyUI's V1 contract, and the host adapter degrades gracefully without ComfyUI."""

from __future__ import annotations

import ast
import inspect
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfy_executor import REPO, load_pack, pack_module

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SOCKET_TYPES = {"IMAGE", "STREAMDIT_MODEL", "STREAMDIT_SETTINGS", "STREAMDIT_PROMPTS", "STREAMDIT_VIDEO",
                "STREAMDIT_LATENT", "STREAMDIT_STATE", "CONDITIONING", "VAE"}
EXPECTED_IDS = {"StreamDiTModelLoader", "StreamDiTSettings", "StreamDiTPromptSchedule", "StreamDiTVideoInput",
                "StreamDiTSampler", "StreamDiTWriter", "StreamDiTSaveState", "StreamDiTLoadState", "StreamDiTReset",
                "StreamDiTConditioningSchedule", "StreamDiTDecode"}

pack = load_pack()
CLASSES = pack.NODE_CLASS_MAPPINGS


def test_node_ids_are_the_permanent_ones() -> None:
    assert set(CLASSES) == EXPECTED_IDS
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == EXPECTED_IDS
    for name in pack.NODE_DISPLAY_NAME_MAPPINGS.values():
        assert name.startswith("StreamDiT "), name


@pytest.mark.parametrize("node_id", sorted(EXPECTED_IDS))
def test_node_class_is_well_formed(node_id: str) -> None:
    cls = CLASSES[node_id]
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
    assert cls.CATEGORY.startswith("StreamDiT/")
    assert callable(getattr(cls, cls.FUNCTION))
    assert isinstance(cls.RETURN_TYPES, tuple)
    for name in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
        if cls.RETURN_TYPES:
            assert len(getattr(cls, name)) == len(cls.RETURN_TYPES), name
    for kind in cls.RETURN_TYPES:
        assert kind in SOCKET_TYPES | {"INT", "STRING"}, kind
    if not cls.RETURN_TYPES:
        assert getattr(cls, "OUTPUT_NODE", False), "a node without outputs must be an output node"

    types = cls.INPUT_TYPES()
    assert set(types) <= {"required", "optional", "hidden"}
    assert types["required"], "every node has required inputs"
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (name, spec)
            options = spec[1] if len(spec) == 2 else {}
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            kind = spec[0]
            if isinstance(kind, list):
                assert kind and all(isinstance(v, str) for v in kind), name
                assert options.get("default", kind[0]) in kind, f"{node_id}.{name}: default not among options"
            else:
                assert kind in WIDGET_TYPES | SOCKET_TYPES, (name, kind)
                if kind in ("INT", "FLOAT"):
                    assert options["min"] <= options["default"] <= options["max"], name
                if kind in WIDGET_TYPES:
                    assert "default" in options, name
            assert name in params, f"{node_id}.{cls.FUNCTION} does not accept {name}"
            if section == "optional":
                assert params[name].default is None, f"optional input {name} needs a None default"
    for name in types.get("hidden", {}):
        assert name in params


def test_input_types_are_cheap_and_stable() -> None:
    # /object_info calls INPUT_TYPES for every node: it must not load models.
    start = time.perf_counter()
    for cls in CLASSES.values():
        assert cls.INPUT_TYPES() == cls.INPUT_TYPES()
    assert time.perf_counter() - start < 5.0  # generous: no model loading or file scans over big trees


def test_sampler_is_never_cached() -> None:
    sampler = CLASSES["StreamDiTSampler"]
    assert isinstance(inspect.getattr_static(sampler, "IS_CHANGED"), classmethod)
    a, b = sampler.IS_CHANGED(stream_id="x"), sampler.IS_CHANGED(stream_id="x")
    assert isinstance(a, float) and math.isnan(a)
    # Fresh NaN objects: tuples holding them never compare equal, so ComfyUI's cache key never matches.
    # (math.nan is one singleton object and would compare equal by identity.)
    assert a is not b and a is not math.nan
    assert (a,) != (b,) and (math.nan,) == (math.nan,)
    # ComfyUI's frontend would add a 'control after generate' widget (default: randomize) to an INT named
    # seed, restarting the stream on every run; the sampler opts out explicitly.
    assert sampler.INPUT_TYPES()["required"]["seed"][1]["control_after_generate"] is False
    reset = CLASSES["StreamDiTReset"]
    assert math.isnan(reset.IS_CHANGED(stream_id="x"))


def test_loader_always_lists_the_bundled_model(tmp_path: Path) -> None:
    host = pack_module("nodes.host")
    host.set_base_dir(tmp_path)
    try:
        models = tmp_path / "models" / "streamdit"
        (models / "sub").mkdir(parents=True)
        (models / "a.safetensors").write_bytes(b"x")
        (models / "sub" / "b.safetensors").write_bytes(b"x")
        (models / "c.ckpt").write_bytes(b"x")  # pickles are never listed
        for i in (1, 2):  # a sharded checkpoint is listed once, by its first shard
            (models / f"big-{i:05d}-of-00002.safetensors").write_bytes(b"x")
        options = CLASSES["StreamDiTModelLoader"].INPUT_TYPES()["required"]["model"][0]
        assert options == ["streamdit-bundled (default)", "streamdit-bundled-teacher (16 calls per chunk)",
                           "a.safetensors", "big-00001-of-00002.safetensors", "sub/b.safetensors"]
    finally:
        host.set_base_dir(None)


def test_missing_model_says_where_models_go(tmp_path: Path) -> None:
    host = pack_module("nodes.host")
    host.set_base_dir(tmp_path)
    try:
        with pytest.raises(FileNotFoundError, match=r"models[/\\]streamdit"):
            CLASSES["StreamDiTModelLoader"]().load("nope.safetensors", "auto", "auto")
        with pytest.raises(ValueError, match="safetensors"):
            CLASSES["StreamDiTModelLoader"]().load("model.ckpt", "auto", "auto")
        bad = tmp_path / "models" / "streamdit" / "bad.safetensors"
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"not a safetensors file")
        with pytest.raises(Exception, match=r"models[/\\]streamdit"):
            CLASSES["StreamDiTModelLoader"]().load("bad.safetensors", "auto", "auto")
    finally:
        host.set_base_dir(None)


def test_init_uses_relative_imports_only() -> None:
    tree = ast.parse((REPO / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        assert not isinstance(node, ast.Import), "absolute import in __init__.py"
        if isinstance(node, ast.ImportFrom):
            assert node.level >= 1, f"absolute import from {node.module}"


def test_nodes_never_call_comfyui_outside_the_host_adapter() -> None:
    comfy_modules = {"folder_paths", "comfy", "comfy_execution", "server", "execution", "latent_preview"}
    for path in sorted((REPO / "nodes").glob("*.py")):
        if path.name == "host.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in comfy_modules, f"{path.name} imports {name}"
        assert "print(" not in path.read_text(encoding="utf-8"), f"{path.name} prints; use the logger"


def test_importing_the_pack_is_cheap_and_loads_no_model() -> None:
    code = (
        "import importlib.util, sys, time\n"
        "t = time.perf_counter()\n"
        f"spec = importlib.util.spec_from_file_location('p', {str(REPO / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(REPO)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['p'] = m; spec.loader.exec_module(m)\n"
        "assert len(m.NODE_CLASS_MAPPINGS) == 11\n"
        "heavy = [k for k in sys.modules if k.startswith('p.streamdit_core.') and k.split('.')[-1] in "
        "('model', 'pipeline', 'sampler', 'video_io')]\n"
        "assert not heavy, heavy\n"
        "print(time.perf_counter() - t)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "STREAMDIT_NO_COMFY": "1"})
    assert out.returncode == 0, out.stderr


def test_host_without_comfyui(tmp_path: Path) -> None:
    host = pack_module("nodes.host")
    assert not host.in_comfyui()
    host.set_base_dir(tmp_path)
    try:
        assert Path(host.output_directory()) == tmp_path / "output"
        assert Path(host.temp_directory()).is_dir()
        assert host.current_prompt_id() is None
        with host.executing("p1", "7"):
            assert host.current_prompt_id() == "p1" and host.current_node_id() == "7"
        host.progress_log.clear()
        bar = host.Progress(4, "7")
        bar.update(1)
        bar.update(9)
        assert list(host.progress_log) == [("7", 1, 4, False), ("7", 4, 4, False)]
        calls = iter([False, True])
        host.set_interrupt_hook(lambda: next(calls))
        host.check_interrupt()
        with pytest.raises(host.StreamInterrupted):
            host.check_interrupt()
        assert host.is_interrupt(host.StreamInterrupted())
        host.send_event("x", {})  # no server: a no-op
    finally:
        host.set_interrupt_hook(None)
        host.set_base_dir(None)


def test_bad_inputs_name_the_input() -> None:
    common = pack_module("nodes.common")
    with pytest.raises(ValueError, match="stream_id"):
        common.check_stream_id("../etc")
    with pytest.raises(ValueError, match="schedule"):
        CLASSES["StreamDiTPromptSchedule"]().parse("   ", 0)
    with pytest.raises(ValueError, match="strength"):
        import torch

        CLASSES["StreamDiTVideoInput"]().prepare(torch.zeros(2, 8, 8, 3), 0.0, "loop")
    with pytest.raises(ValueError, match="images"):
        CLASSES["StreamDiTVideoInput"]().prepare(torch.zeros(2, 8, 8, 5), 0.5, "loop")
    writer = pack_module("nodes.writer")
    with pytest.raises(ValueError, match="filename_prefix"):
        writer.stream_file_path("../outside", "s")
    state = pack_module("nodes.state")
    with pytest.raises(ValueError, match="state_file"):
        state.load_stream_state("/etc/passwd")


def test_settings_node_fills_model_defaults_and_validates() -> None:
    model = pack_module("nodes.model")
    handle = model.load_model(model.BUNDLED)
    defaults = handle.pipeline.default_settings()
    settings = model.build_settings(handle)
    assert settings.partition == defaults.partition and settings.height == defaults.height
    custom = model.build_settings(handle, chunk_size=2, chunks=4, micro_steps=2, reference_frames=2, shift=3.0,
                                  guidance=2.0, window=(2, 0, 0), warm_start=False, negative_prompt="blurry")
    p = custom.partition
    assert (p.K, p.N, p.c, p.s) == (2, 4, 2, 2)
    assert custom.shift == 3.0 and custom.guidance == 2.0 and not custom.warm_start
    assert custom.window is not None and custom.window[0] == 2
    with pytest.raises(ValueError, match="StreamDiT Settings"):
        model.build_settings(handle, guidance=0.5)
    with pytest.raises(ValueError, match="height"):
        model.build_settings(handle, height=10)  # not a multiple of the model's patch (4)
    with pytest.raises(ValueError, match="temporal patch 2"):
        model.build_settings(handle, chunk_size=1)  # the bundled model's tokens span 2 frames


def test_loader_offers_the_bundled_teacher_with_its_own_scheme() -> None:
    """The shipped teacher is listed after the default and streams with its stored teacher scheme (s = 8,
    guidance 3), while the default student makes one unguided call per chunk."""
    model = pack_module("nodes.model")
    choices = model.list_models()
    assert choices[:2] == [model.BUNDLED, model.BUNDLED_TEACHER]
    teacher = model.build_settings(model.load_model(model.BUNDLED_TEACHER))
    student = model.build_settings(model.load_model(model.BUNDLED))
    assert (teacher.partition.s, teacher.guidance) == (8, 3.0)
    assert (student.partition.s, student.guidance) == (1, 1.0)
    assert teacher.partition.c == student.partition.c == 2


def test_every_node_and_input_is_documented() -> None:
    doc = (REPO / "docs" / "NODES.md").read_text(encoding="utf-8")
    for node_id, cls in CLASSES.items():
        assert f"`{node_id}`" in doc, node_id
        section = doc.split(f"`{node_id}`", 1)[1].split("\n### ", 1)[0]
        types = cls.INPUT_TYPES()
        for name in [*types.get("required", {}), *types.get("optional", {})]:
            assert f"| `{name}`" in section, f"{node_id}.{name} is not in docs/NODES.md"
        for name in getattr(cls, "RETURN_NAMES", ()):
            assert f"| `{name}`" in section, f"{node_id} output {name} is not in docs/NODES.md"
