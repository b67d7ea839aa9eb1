"""The example workflows are well-formed, and they stream when run through the real node classes.

The executor (tests/comfy_executor.py) converts each UI workflow to an API prompt and runs it with ComfyUI's
classic caching rules, several "queue runs" in a row, with the bundled model on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from comfy_executor import (
    FRONTEND_ONLY,
    REPO,
    ExecutionError,
    Executor,
    find_nodes,
    load_builder,
    load_pack,
    load_workflow,
    pack_module,
    specs_from_classes,
    stock_specs,
    ui_to_api,
    workflow_files,
)

WORKFLOWS = {p.stem: p for p in workflow_files()}
REQUIRED = {
    "streamdit_text_to_video",
    "streamdit_prompt_schedule",
    "streamdit_video_to_video",
    "streamdit_save_and_resume",
}

pack = load_pack()
host = pack_module("nodes.host")
common = pack_module("nodes.common")


# ----------------------------------------------------------------------------------------------------------
# Structure


def test_required_workflows_exist() -> None:
    assert REQUIRED <= set(WORKFLOWS)


def test_workflow_files_are_up_to_date_with_the_nodes() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "workflows" / "build_workflows.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_graph_is_consistent(name: str) -> None:
    wf = load_workflow(WORKFLOWS[name])
    assert wf["version"] == 0.4
    specs = stock_specs()
    specs.update(specs_from_classes(pack.NODE_CLASS_MAPPINGS))
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes)
    for n in wf["nodes"]:
        assert n["type"] in specs or n["type"] in FRONTEND_ONLY, f"unknown node type {n['type']}"
        if n["type"] in FRONTEND_ONLY:
            continue
        # widget values: one per widget input in order, plus 'control after generate' values, plus
        # frontend-only extras (e.g. Load Video's upload button)
        spec = specs[n["type"]]
        extras = len(load_builder().STOCK_NODES.get(n["type"], {}).get("extra_widgets", []))
        expected = sum(1 + int(s.control) for s in spec if s.widget) + extras
        assert len(n["widgets_values"]) == expected, (n["type"], n["widgets_values"])
        if n["type"] in pack.NODE_CLASS_MAPPINGS:
            _check_widget_values(pack.NODE_CLASS_MAPPINGS[n["type"]], n["widgets_values"], spec)
        socket_names = {s.name for s in spec}
        for entry in n["inputs"]:
            assert entry["name"] in socket_names
    link_ids = set()
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert link_id not in link_ids
        link_ids.add(link_id)
        out = nodes[src]["outputs"][src_slot]
        assert out["type"] == kind and link_id in out["links"]
        inp = nodes[dst]["inputs"][dst_slot]
        assert inp["link"] == link_id
        declared = {s.name: s.type for s in specs[nodes[dst]["type"]]}
        assert declared[inp["name"]] == kind == inp["type"]
    assert wf["last_link_id"] >= max(link_ids, default=0)
    for n in wf["nodes"]:
        for entry in n["inputs"]:
            assert entry["link"] is None or entry["link"] in link_ids
        for out in n["outputs"]:
            assert set(out["links"] or []) <= link_ids


def _check_widget_values(cls: type, values: list[Any], spec: list[Any]) -> None:
    types = {**cls.INPUT_TYPES().get("required", {}), **cls.INPUT_TYPES().get("optional", {})}
    pos = 0
    for s in spec:
        if not s.widget:
            continue
        value = values[pos]
        kind, options = types[s.name][0], types[s.name][1]
        if isinstance(kind, list):
            # the loader's file list depends on the user's models folder (the Wan example names Comfy-Org's file)
            is_file = cls.__name__ == "StreamDiTModelLoader" and s.name == "model" and value.endswith(".safetensors")
            assert value in kind or is_file, (s.name, value)
        elif kind == "INT":
            assert isinstance(value, int) and options["min"] <= value <= options["max"], (s.name, value)
        elif kind == "FLOAT":
            assert isinstance(value, (int, float)) and options["min"] <= value <= options["max"], (s.name, value)
        elif kind == "BOOLEAN":
            assert isinstance(value, bool), (s.name, value)
        elif kind == "STRING":
            assert isinstance(value, str), (s.name, value)
        pos += 1
        if s.control:
            assert values[pos] in ("fixed", "increment", "decrement", "randomize")
            pos += 1


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_converts_to_a_complete_api_prompt(name: str) -> None:
    specs = stock_specs()
    specs.update(specs_from_classes(pack.NODE_CLASS_MAPPINGS))
    prompt = ui_to_api(load_workflow(WORKFLOWS[name]), specs)
    assert prompt
    classes = {**pack.NODE_CLASS_MAPPINGS}
    for node_id, node in prompt.items():
        if node["class_type"] not in classes:
            continue
        required = classes[node["class_type"]].INPUT_TYPES()["required"]
        assert set(required) <= set(node["inputs"]), (node_id, node)
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in prompt
    assert any(getattr(classes.get(n["class_type"]), "OUTPUT_NODE", False) for n in prompt.values())
    json.dumps(prompt)  # what would be POSTed


# ----------------------------------------------------------------------------------------------------------
# Execution


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[Path]:
    host.set_base_dir(tmp_path)
    common.STREAMS.clear()
    host.set_interrupt_hook(None)
    yield tmp_path
    host.set_interrupt_hook(None)
    common.STREAMS.clear()
    host.set_base_dir(None)


def _sampler(result: Any, prompt: dict[str, Any]) -> tuple[torch.Tensor, int, Any]:
    (node_id,) = find_nodes(prompt, "StreamDiTSampler")
    return result.results[node_id]


def _set(prompt: dict[str, Any], class_type: str, **inputs: Any) -> None:
    for node_id in find_nodes(prompt, class_type):
        prompt[node_id]["inputs"].update(inputs)


def _fast(prompt: dict[str, Any]) -> dict[str, Any]:
    """Smaller stream settings (fewer chunks in flight, 32×32 frames): same code paths, ~8× less compute."""
    _set(prompt, "StreamDiTSettings", chunks=4, height=32, width=32)
    return prompt


def _convert(executor: Executor, name: str) -> dict[str, Any]:
    return _fast(executor.convert(load_workflow(WORKFLOWS[name])))


def _run(executor: Executor, prompt: dict[str, Any], runs: int = 1) -> list[tuple[torch.Tensor, int, Any]]:
    return [_sampler(executor.run(prompt), prompt) for _ in range(runs)]


def test_text_to_video_streams_across_queue_runs(env: Path) -> None:
    ex = Executor()
    prompt = ex.convert(load_workflow(WORKFLOWS["streamdit_text_to_video"]))  # exactly as shipped
    results = [ex.run(prompt) for _ in range(3)]
    (sampler_id,) = find_nodes(prompt, "StreamDiTSampler")
    (loader_id,) = find_nodes(prompt, "StreamDiTModelLoader")
    (writer_id,) = find_nodes(prompt, "StreamDiTWriter")
    frames = [r.results[sampler_id][0] for r in results]
    indices = [r.results[sampler_id][1] for r in results]
    per_run = frames[0].shape[0]
    assert per_run > 0 and frames[0].ndim == 4 and frames[0].shape[-1] == 3
    assert frames[0].dtype == torch.float32 and 0.0 <= frames[0].min() and frames[0].max() <= 1.0
    assert indices == [0, per_run, 2 * per_run]
    assert not torch.equal(frames[0], frames[1]) and not torch.equal(frames[1], frames[2])
    # the sampler ran every time (IS_CHANGED = NaN); the loader was served from cache after the first run
    assert all(sampler_id in r.executed for r in results)
    assert loader_id in results[0].executed and loader_id not in results[1].executed
    # the writer appended every run to one file and returned an animated preview
    last = results[-1]
    path, count = last.results[writer_id]
    assert count == 3 * per_run and Path(path).is_file() and Path(path).suffix == ".mp4"
    ui = last.outputs[writer_id]
    assert ui["animated"] == (True,) and ui["images"][0]["type"] == "temp"
    preview = Path(host.temp_directory()) / ui["images"][0]["subfolder"] / ui["images"][0]["filename"]
    assert preview.is_file() and preview.suffix == ".webp"
    video_io = pack_module("streamdit_core.video_io")
    assert video_io.read_video(path).shape[0] == 3 * per_run
    # a status line under the nodes (ComfyUI's progress text)
    texts = [text for node, text in host.node_text_log if node in (sampler_id, writer_id)]
    assert f"t2v-1: frames {2 * per_run}-{3 * per_run - 1}" in texts
    assert texts[-1].endswith(f": {3 * per_run} frames")


def test_stream_ids_are_independent(env: Path) -> None:
    ex = Executor()
    base = _convert(ex, "streamdit_text_to_video")
    a = json.loads(json.dumps(base))
    b = json.loads(json.dumps(base))
    _set(a, "StreamDiTSampler", stream_id="a")
    _set(b, "StreamDiTSampler", stream_id="b")
    a_runs = _run(ex, a, 2)
    b_first = _run(ex, b, 1)[0]
    a_third = _run(ex, a, 1)[0]
    # b started fresh (same seed → same first frames as a's first run); a continued where it was
    assert b_first[1] == 0 and torch.equal(b_first[0], a_runs[0][0])
    assert a_third[1] == 2 * a_runs[0][0].shape[0]
    # a's third run equals an undisturbed stream's third run
    c = json.loads(json.dumps(base))
    _set(c, "StreamDiTSampler", stream_id="c")
    c_runs = _run(ex, c, 3)
    assert torch.equal(a_third[0], c_runs[2][0])
    assert set(common.STREAMS.snapshot()) == {"a", "b", "c"}


def test_reset_restarts_the_stream_and_the_file(env: Path) -> None:
    ex = Executor()
    prompt = _convert(ex, "streamdit_text_to_video")
    (writer_id,) = find_nodes(prompt, "StreamDiTWriter")
    first = _run(ex, prompt, 2)
    _set(prompt, "StreamDiTSampler", reset=True)
    result = ex.run(prompt)
    frames, index, _ = _sampler(result, prompt)
    assert index == 0 and torch.equal(frames, first[0][0])
    assert result.results[writer_id][1] == frames.shape[0]  # the file started again
    _set(prompt, "StreamDiTSampler", reset=False)
    assert _run(ex, prompt)[0][1] == frames.shape[0]
    # the Reset node (its own workflow) makes the next run start at frame 0 again
    reset_prompt = ex.convert(load_workflow(WORKFLOWS["streamdit_reset_stream"]))
    _set(reset_prompt, "StreamDiTReset", stream_id=_stream_id(prompt))
    out = ex.run(reset_prompt)
    assert "reset" in next(iter(out.outputs.values()))["text"][0]
    again = _run(ex, prompt)[0]
    assert again[1] == 0 and torch.equal(again[0], first[0][0])


def test_interrupt_mid_run_leaves_the_stream_unchanged(env: Path) -> None:
    ex = Executor()
    prompt = _convert(ex, "streamdit_text_to_video")
    (sampler_id,) = find_nodes(prompt, "StreamDiTSampler")
    (writer_id,) = find_nodes(prompt, "StreamDiTWriter")
    reference = json.loads(json.dumps(prompt))
    _set(reference, "StreamDiTSampler", stream_id="reference")
    expected = _run(ex, reference, 3)

    first = ex.run(prompt)
    checks = {"n": 0}

    def hook() -> bool:  # interrupt at the second check inside the sampler: after its first model call
        if host.current_node_id() == sampler_id:
            checks["n"] += 1
            return checks["n"] == 2
        return False

    host.set_interrupt_hook(hook)
    with pytest.raises(ExecutionError) as info:
        ex.run(prompt)
    assert host.is_interrupt(info.value.error) and info.value.node_id == sampler_id
    assert checks["n"] == 2
    host.set_interrupt_hook(None)
    entry = common.STREAMS.get(_stream_id(prompt))
    assert entry is not None and entry.state.frames_emitted == first.results[sampler_id][0].shape[0]
    second, third = ex.run(prompt), ex.run(prompt)
    for got, want in zip((first, second, third), expected):
        assert got.results[sampler_id][1] == want[1]
        assert torch.equal(got.results[sampler_id][0], want[0])
    assert third.results[writer_id][1] == 3 * expected[0][0].shape[0]


def _stream_id(prompt: dict[str, Any]) -> str:
    return str(prompt[find_nodes(prompt, "StreamDiTSampler")[0]]["inputs"]["stream_id"])


def test_save_load_continue_equals_continuing_directly(env: Path) -> None:
    ex = Executor()
    prompt = _convert(ex, "streamdit_save_and_resume")
    (save_id,) = find_nodes(prompt, "StreamDiTSaveState")
    direct = json.loads(json.dumps(prompt))
    _set(direct, "StreamDiTSampler", stream_id="direct")
    _set(direct, "StreamDiTSaveState", filename_prefix="streamdit/direct")
    expected = _run(ex, direct, 4)

    runs = [ex.run(prompt) for _ in range(2)]  # run 1: no state file yet -> starts from the seed
    saved_path = Path(runs[-1].results[save_id][0])
    assert saved_path.is_file() and saved_path.suffix == ".safetensors"
    assert runs[-1].outputs[save_id]["frame_index"] == [2 * expected[0][0].shape[0]]
    # "restart ComfyUI": the registry and the caches are gone, the file stays
    common.STREAMS.clear()
    ex = Executor()
    resumed = [_sampler(ex.run(prompt), prompt) for _ in range(2)]
    for got, want in zip(resumed, expected[2:]):
        assert got[1] == want[1]
        assert torch.equal(got[0], want[0])


def test_resume_with_different_settings_is_refused(env: Path) -> None:
    ex = Executor()
    prompt = _convert(ex, "streamdit_save_and_resume")
    _run(ex, prompt, 2)
    common.STREAMS.clear()
    _set(prompt, "StreamDiTSettings", chunk_size=4)
    with pytest.raises(ExecutionError, match="settings"):
        ex.run(prompt)


def test_prompt_edits_apply_without_restarting(env: Path) -> None:
    ex = Executor()
    prompt = _convert(ex, "streamdit_prompt_schedule")
    runs = _run(ex, prompt, 2)
    _set(prompt, "StreamDiTPromptSchedule", schedule="0: a large purple triangle bouncing on a checkered background")
    edited = _run(ex, prompt)[0]
    assert edited[1] == runs[1][1] + runs[1][0].shape[0]  # continued, not restarted
    # changing the settings does restart
    _set(prompt, "StreamDiTSettings", warm_start=False)
    assert _run(ex, prompt)[0][1] == 0


def test_video_to_video_streams_from_a_loaded_video(env: Path) -> None:
    builder = load_builder()
    video_io = pack_module("streamdit_core.video_io")
    t = torch.linspace(0, 1, 24)
    clip = torch.zeros(24, 48, 80, 3)
    for i in range(24):  # a bright square moving right
        x = int(4 + 2 * i)
        clip[i, 10:30, x : x + 16, :] = torch.tensor([1.0, 0.8, 0.1]) * (0.5 + 0.5 * t[i])
    video_io.write_mp4(clip, Path(host.input_directory()) / builder.EXAMPLE_VIDEO, fps=16)
    ex = Executor()
    prompt = _convert(ex, "streamdit_video_to_video")
    runs = _run(ex, prompt, 3)
    per_run = runs[0][0].shape[0]
    assert [r[1] for r in runs] == [0, per_run, 2 * per_run]
    assert not torch.equal(runs[0][0], runs[1][0])
    # strength matters: the same stream at strength 1.0 (= text-to-video) gives other frames
    t2v = json.loads(json.dumps(prompt))
    _set(t2v, "StreamDiTSampler", stream_id="v2v-strength-1")
    _set(t2v, "StreamDiTVideoInput", strength=1.0)
    assert not torch.equal(_run(ex, t2v)[0][0], runs[0][0])


def test_at_most_one_advance_per_prompt(env: Path) -> None:
    model_mod = pack_module("nodes.model")
    handle = model_mod.load_model(model_mod.BUNDLED)
    settings = model_mod.build_settings(handle, chunks=4, height=32, width=32)
    prompts = pack_module("nodes.inputs").parse_prompts("0: a red circle")
    sampler = pack.NODE_CLASS_MAPPINGS["StreamDiTSampler"]()
    with host.executing("prompt-1", "3"):
        one = sampler.sample(handle, settings, prompts, "once", 0, 1, False)
        two = sampler.sample(handle, settings, prompts, "once", 0, 1, False)  # e.g. a list input re-calls it
    assert one is two and common.STREAMS.get("once").runs == 1
    with host.executing("prompt-2", "3"):
        three = sampler.sample(handle, settings, prompts, "once", 0, 1, False)
    assert three[1] == one[0].shape[0]


def test_progress_is_reported_per_model_call(env: Path) -> None:
    ex = Executor()
    prompt = _convert(ex, "streamdit_text_to_video")
    ex.run(prompt)
    host.progress_log.clear()
    ex.run(prompt)
    (sampler_id,) = find_nodes(prompt, "StreamDiTSampler")
    log = [e for e in host.progress_log if e[0] == sampler_id]
    assert log and log[-1][1] == log[-1][2]  # reached the end
    assert any(has_preview for *_, has_preview in log)  # the bundled model previews cheaply


def _save_test_checkpoint(path: Path, max_shard_bytes: int | None = None) -> list[Path]:
    """A small StreamDiT checkpoint (the bundled layout, random weights) written by the core's own writer."""
    pipeline = pack_module("streamdit_core.pipeline")
    checkpoint = pack_module("streamdit_core.checkpoint")
    pipe = pipeline.placeholder_pipeline(seed=7)
    return list(checkpoint.save_checkpoint(path, pipe.model, pipe.text_encoder, max_shard_bytes=max_shard_bytes))


def test_a_checkpoint_from_the_models_folder_streams(env: Path) -> None:
    folder = env / "models" / "streamdit" / "mine"
    files = _save_test_checkpoint(folder / "test-model.safetensors", max_shard_bytes=4_000_000)
    assert len(files) > 1  # sharded: listed once, by its first shard
    options = pack.NODE_CLASS_MAPPINGS["StreamDiTModelLoader"].INPUT_TYPES()["required"]["model"][0]
    first = f"mine/{files[0].name}"
    assert [o for o in options if o.startswith("mine/")] == [first]
    ex = Executor()
    prompt = _convert(ex, "streamdit_text_to_video")
    _set(prompt, "StreamDiTModelLoader", model=first)
    runs = _run(ex, prompt, 2)
    assert [r[1] for r in runs] == [0, runs[0][0].shape[0]]
    assert runs[0][2].model.path == str(files[0])
