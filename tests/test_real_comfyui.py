"""End-to-end: the pack inside a real ComfyUI server, driven through its HTTP API.

Skipped unless both are set:

* ``STREAMDIT_COMFYUI_DIR``    a ComfyUI source folder (v0.8.0 or newer), e.g. a git checkout;
* ``STREAMDIT_COMFYUI_PYTHON`` the Python that runs it (a venv with ComfyUI's requirements installed).

The ComfyUI folder is not modified: the server runs with ``--base-directory`` pointing at a temporary folder
whose ``custom_nodes/`` holds this repository (a symlink; ``STREAMDIT_COMFYUI_INSTALL=copy`` copies instead),
on 127.0.0.1 on a free port (or ``STREAMDIT_COMFYUI_PORT``), and is stopped by its PID. See docs/NODES.md for a recipe::

    STREAMDIT_COMFYUI_DIR=~/ComfyUI STREAMDIT_COMFYUI_PYTHON=~/ComfyUI/venv/bin/python \\
        python -m pytest tests/test_real_comfyui.py -s -v
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from comfy_executor import (
    REPO,
    find_nodes,
    load_builder,
    load_pack,
    load_workflow,
    specs_from_object_info,
    ui_to_api,
    workflow_files,
)

COMFY_DIR = os.environ.get("STREAMDIT_COMFYUI_DIR")
COMFY_PYTHON = os.environ.get("STREAMDIT_COMFYUI_PYTHON")
pytestmark = pytest.mark.skipif(
    not (COMFY_DIR and COMFY_PYTHON),
    reason="set STREAMDIT_COMFYUI_DIR and STREAMDIT_COMFYUI_PYTHON to run against a real ComfyUI",
)

PACK_FOLDER = "comfyui-streamdit"
RUNS = 3
START_TIMEOUT = float(os.environ.get("STREAMDIT_COMFYUI_START_TIMEOUT", "300"))
PROMPT_TIMEOUT = float(os.environ.get("STREAMDIT_COMFYUI_PROMPT_TIMEOUT", "600"))
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".mypy_cache",
                                     ".ruff_cache", "outputs", "*.egg-info", "build", "dist")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One ComfyUI server process (started and stopped by PID)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = int(os.environ.get("STREAMDIT_COMFYUI_PORT") or _free_port())
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / f"comfyui-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        assert COMFY_DIR and COMFY_PYTHON
        cmd = [COMFY_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:"]
        log = open(self.log_path, "ab")  # appended: a restart keeps the first run's log
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=COMFY_DIR, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        while time.monotonic() - started < START_TIMEOUT:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return time.monotonic() - started
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {START_TIMEOUT} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)  # by PID only
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def _request(self, path: str, body: Any = None, raw: bool = False) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            payload = r.read()
            return (payload, r.headers) if raw else json.loads(payload or b"null")

    def get(self, path: str) -> Any:
        return self._request(path)

    def post(self, path: str, body: Any) -> Any:
        return self._request(path, body)

    def queue(self, prompt: dict[str, Any], workflow: dict[str, Any] | None = None) -> dict[str, Any]:
        """Queue a prompt and wait for it; returns its /history entry."""
        body: dict[str, Any] = {"prompt": prompt, "client_id": "streamdit-test"}
        if workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        try:
            prompt_id = self.post("/prompt", body)["prompt_id"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"/prompt rejected: {exc.read().decode(errors='replace')}") from exc
        deadline = time.monotonic() + PROMPT_TIMEOUT
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                return history[prompt_id]  # type: ignore[no-any-return]
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {PROMPT_TIMEOUT} s")


def _make_example_video(path: Path) -> None:
    load_pack()
    import importlib

    import torch

    video_io = importlib.import_module("streamdit_pack.streamdit_core.video_io")
    clip = torch.zeros(24, 48, 80, 3)
    for i in range(24):  # a yellow square moving right on black
        clip[i, 12:32, 4 + 2 * i : 20 + 2 * i] = torch.tensor([1.0, 0.85, 0.1])
    video_io.write_mp4(clip, path, fps=16)


def _make_checkpoint(path: Path) -> list[Path]:
    """A small sharded StreamDiT checkpoint (bundled layout, random weights) in the models folder."""
    load_pack()
    import importlib

    pipeline = importlib.import_module("streamdit_pack.streamdit_core.pipeline")
    checkpoint = importlib.import_module("streamdit_pack.streamdit_core.checkpoint")
    pipe = pipeline.placeholder_pipeline(seed=7)
    return list(checkpoint.save_checkpoint(path, pipe.model, pipe.text_encoder, max_shard_bytes=4_000_000))


# A tiny Wan 2.1 VAE of ComfyUI's own class (width 8 instead of 96; every other size as the real one), written as
# a state dict that ComfyUI's VAELoader detects as Wan 2.1 by its keys. Runs in ComfyUI's Python.
_TINY_WAN_VAE = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import torch
    from safetensors.torch import save_file
    import comfy.ldm.wan.vae as wan_vae
    vae = wan_vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                         temperal_downsample=[False, True, True])
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, p in vae.state_dict().items():  # ComfyUI's layers skip weight init: set every tensor
        if name.endswith("gamma"):
            t = torch.ones(p.shape)
        elif p.dim() > 1:
            t = torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5)
        else:
            t = torch.randn(p.shape, generator=g) * 0.02
        sd[name] = t.contiguous()
    save_file(sd, sys.argv[2])
""")

# Test-only nodes, installed next to the pack: CONDITIONING without a text encoder (ComfyUI's umT5-XXL has a fixed
# 5.7 B-parameter config, too big for this test), and a check that the streamed frames equal one decode of all
# latents so far by ComfyUI's own VAE.decode (with ComfyUI's own Wan latent statistics).
_HELPERS = textwrap.dedent("""
    import hashlib
    import torch

    class StreamDiTTestTextEncode:
        CATEGORY = "testing"
        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "encode"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"text": ("STRING", {"default": ""}), "width": ("INT", {"default": 32}),
                                 "tokens": ("INT", {"default": 24})}}

        def encode(self, text, width, tokens):
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            g = torch.Generator().manual_seed(seed)
            return ([[torch.randn(1, tokens, width, generator=g), {"pooled_output": None}]],)

    _seen = {}

    class StreamDiTTestDecodeCheck:
        CATEGORY = "testing"
        RETURN_TYPES = ()
        FUNCTION = "check"
        OUTPUT_NODE = True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"frames": ("IMAGE",), "latent": ("STREAMDIT_LATENT",), "vae": ("VAE",)}}

        def check(self, frames, latent, vae):
            import comfy.latent_formats
            runs = _seen.setdefault(latent.stream_id, [])
            if latent.frame_index == 0:
                runs.clear()
            runs.append((latent.latents.detach().cpu(), frames.detach().cpu()))
            latents = torch.cat([r[0] for r in runs], dim=2)
            streamed = torch.cat([r[1] for r in runs])
            raw = comfy.latent_formats.Wan21().process_out(latents)
            full = vae.decode(raw)[0]  # ComfyUI's own one-shot decode: [T, H, W, 3]
            diff = float((full - streamed).abs().max()) if full.shape == streamed.shape else float("inf")
            return {"ui": {"max_diff": [diff], "frames": [int(streamed.shape[0])],
                           "latent_frames": [int(latents.shape[2])], "std": [float(full.std())]}}

    NODE_CLASS_MAPPINGS = {"StreamDiTTestTextEncode": StreamDiTTestTextEncode,
                           "StreamDiTTestDecodeCheck": StreamDiTTestDecodeCheck}
""")


def _make_wan_files(root: Path) -> None:
    """A tiny Wan-layout transformer and a tiny Wan 2.1 VAE under the file names the Wan workflow uses."""
    assert COMFY_DIR and COMFY_PYTHON
    builder = load_builder()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import wan_fakes

    wan_fakes.write_tiny_wan(root / "models" / builder.WAN_MODEL)
    vae_path = root / "models" / "vae" / builder.WAN_VAE
    vae_path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([COMFY_PYTHON, "-c", _TINY_WAN_VAE, COMFY_DIR, str(vae_path)], check=True, timeout=300,
                   capture_output=True)
    helpers = root / "custom_nodes" / "streamdit_test_helpers"
    helpers.mkdir(parents=True, exist_ok=True)
    (helpers / "__init__.py").write_text(_HELPERS, encoding="utf-8")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("comfyui-base")
    (root / "custom_nodes").mkdir()
    (root / "input").mkdir()
    target = root / "custom_nodes" / PACK_FOLDER
    if os.environ.get("STREAMDIT_COMFYUI_INSTALL", "symlink") == "copy":
        shutil.copytree(REPO, target, ignore=COPY_IGNORE)
    else:
        target.symlink_to(REPO, target_is_directory=True)
    _make_example_video(root / "input" / load_builder().EXAMPLE_VIDEO)
    _make_checkpoint(root / "models" / "streamdit" / "test" / "streamdit-test.safetensors")
    _make_wan_files(root)
    return root


@pytest.fixture(scope="module")
def server(base: Path) -> Iterator[Server]:
    srv = Server(base)
    seconds = srv.start()
    print(f"\nComfyUI answered on {srv.url} after {seconds:.1f} s (pid {srv.proc.pid if srv.proc else '?'})")
    try:
        yield srv
    finally:
        srv.stop()
        if srv.proc is not None:
            print(f"ComfyUI stopped (pid {srv.proc.pid}, exit {srv.proc.returncode})")


@pytest.fixture(scope="module")
def object_info(server: Server) -> dict[str, Any]:
    return server.get("/object_info")  # type: ignore[no-any-return]


def _frames_in(history: dict[str, Any], writer_id: str) -> int:
    text = history["outputs"][writer_id]["text"][0]
    return int(text.rsplit(":", 1)[1].split()[0])


def test_pack_loads_and_lists_every_node(server: Server, object_info: dict[str, Any]) -> None:
    version = server.get("/system_stats")["system"]["comfyui_version"]
    log = server.log()
    assert "IMPORT FAILED" not in "\n".join(line for line in log.splitlines() if PACK_FOLDER in line), log[-3000:]
    classes = load_pack().NODE_CLASS_MAPPINGS
    for node_id, cls in classes.items():
        info = object_info.get(node_id)
        assert info is not None, f"{node_id} missing from /object_info"
        assert info["python_module"].endswith(PACK_FOLDER), info["python_module"]
        assert info["category"] == cls.CATEGORY and info["description"] == cls.DESCRIPTION
        assert info["output"] == list(cls.RETURN_TYPES)
        assert info["output_node"] == bool(getattr(cls, "OUTPUT_NODE", False))
    assert "streamdit-bundled (default)" in object_info["StreamDiTModelLoader"]["input"]["required"]["model"][0]
    # the stock nodes the examples use exist, with the inputs the workflow builder assumes
    for name, spec in load_builder().STOCK_NODES.items():
        assert name in object_info, name
        order = object_info[name]["input_order"]
        assert [n for n, _t, _w in spec["inputs"]] == order.get("required", []) + order.get("optional", [])
        assert [t for _n, t in spec["outputs"]] == object_info[name]["output"]
    models = server.get("/models")
    assert "streamdit" in models
    templates = server.get("/workflow_templates")
    assert sorted(templates.get(PACK_FOLDER, [])) == sorted(p.stem for p in workflow_files())
    print(f"ComfyUI {version}: {len(object_info)} node classes, all {len(classes)} StreamDiT nodes listed; "
          f"templates: {sorted(templates[PACK_FOLDER])}")


@pytest.mark.parametrize("name", ["streamdit_text_to_video", "streamdit_prompt_schedule",
                                  "streamdit_video_to_video", "streamdit_save_and_resume"])
def test_workflow_streams_through_the_http_api(server: Server, object_info: dict[str, Any], name: str) -> None:
    workflow = load_workflow(Path(REPO / "workflows" / f"{name}.json"))
    template = server.get(f"/api/workflow_templates/{PACK_FOLDER}/{name}.json")
    assert template == workflow  # served to the template browser as committed
    prompt = ui_to_api(workflow, specs_from_object_info(object_info))
    (writer_id,) = find_nodes(prompt, "StreamDiTWriter")
    (sampler_id,) = find_nodes(prompt, "StreamDiTSampler")
    stream_id = prompt[sampler_id]["inputs"]["stream_id"]
    counts, emitted, seconds = [], [], []
    for _ in range(RUNS):
        start = time.monotonic()
        history = server.queue(prompt, workflow)
        seconds.append(time.monotonic() - start)
        status = history["status"]
        assert status["status_str"] == "success", json.dumps(status["messages"])[-3000:]
        out = history["outputs"][writer_id]
        assert out["animated"] == [True]
        image = out["images"][0]
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        payload, headers = server._request(f"/view?{query}", raw=True)
        assert payload[:4] == b"RIFF" and payload[8:12] == b"WEBP", headers
        counts.append(_frames_in(history, writer_id))
        emitted.append(server.get("/streamdit/streams")[stream_id])
        save_ids = find_nodes(prompt, "StreamDiTSaveState")
        if save_ids:
            assert history["outputs"][save_ids[0]]["frame_index"] == [emitted[-1]]
    per_run = counts[0]
    assert per_run > 0
    assert counts == [per_run * (i + 1) for i in range(RUNS)], counts  # the file grows by one run each time
    assert emitted == counts, (emitted, counts)  # and the stream's frame index advances with it
    print(f"{name}: {RUNS} runs, writer frames {counts}, stream {stream_id!r} at frames {emitted}, "
          f"seconds per run {[round(s, 2) for s in seconds]}")


def test_reset_workflow_restarts_a_stream(server: Server, object_info: dict[str, Any]) -> None:
    specs = specs_from_object_info(object_info)
    t2v = ui_to_api(load_workflow(REPO / "workflows" / "streamdit_text_to_video.json"), specs)
    (writer_id,) = find_nodes(t2v, "StreamDiTWriter")
    (sampler_id,) = find_nodes(t2v, "StreamDiTSampler")
    stream_id = f"reset-{uuid.uuid4().hex[:6]}"
    t2v[sampler_id]["inputs"]["stream_id"] = stream_id
    first = _frames_in(server.queue(t2v), writer_id)
    assert _frames_in(server.queue(t2v), writer_id) == 2 * first
    reset = ui_to_api(load_workflow(REPO / "workflows" / "streamdit_reset_stream.json"), specs)
    (reset_id,) = find_nodes(reset, "StreamDiTReset")
    reset[reset_id]["inputs"]["stream_id"] = stream_id
    history = server.queue(reset)
    assert history["status"]["status_str"] == "success"
    assert "reset" in history["outputs"][reset_id]["text"][0]
    assert _frames_in(server.queue(t2v), writer_id) == first  # the stream and its file started again
    print(f"reset: stream {stream_id!r} went {first} -> {2 * first} frames, reset, then {first} again")


def test_interrupt_leaves_the_stream_where_it_was(server: Server, object_info: dict[str, Any]) -> None:
    specs = specs_from_object_info(object_info)
    prompt = ui_to_api(load_workflow(REPO / "workflows" / "streamdit_text_to_video.json"), specs)
    (sampler_id,) = find_nodes(prompt, "StreamDiTSampler")
    stream_id = f"interrupt-{uuid.uuid4().hex[:6]}"
    prompt[sampler_id]["inputs"]["stream_id"] = stream_id
    server.queue(prompt)
    before = server.get("/streamdit/streams")[stream_id]
    prompt[sampler_id]["inputs"]["chunks_per_run"] = 64  # long enough to be interrupted mid-run
    prompt_id = server.post("/prompt", {"prompt": prompt, "client_id": "streamdit-test"})["prompt_id"]
    deadline = time.monotonic() + PROMPT_TIMEOUT
    while time.monotonic() < deadline:  # wait until it is running, then interrupt it
        if server.get("/queue")["queue_running"]:
            break
        time.sleep(0.05)
    time.sleep(1.0)
    server.post("/interrupt", {"prompt_id": prompt_id})
    while time.monotonic() < deadline:
        history = server.get(f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            break
        time.sleep(0.2)
    status = history[prompt_id]["status"]
    messages = [m[0] for m in status["messages"]]
    assert "execution_interrupted" in messages, messages
    after = server.get("/streamdit/streams")[stream_id]
    assert after == before, (before, after)  # nothing was committed
    print(f"interrupt: stream {stream_id!r} stayed at frame {after} after an interrupted 64-chunk run")


def test_saved_stream_resumes_after_a_server_restart(base: Path, server: Server,
                                                     object_info: dict[str, Any]) -> None:
    specs = specs_from_object_info(object_info)
    workflow = load_workflow(REPO / "workflows" / "streamdit_save_and_resume.json")
    prompt = ui_to_api(workflow, specs)
    (sampler_id,) = find_nodes(prompt, "StreamDiTSampler")
    (save_id,) = find_nodes(prompt, "StreamDiTSaveState")
    (load_id,) = find_nodes(prompt, "StreamDiTLoadState")
    stream_id = f"restart-{uuid.uuid4().hex[:6]}"
    prompt[sampler_id]["inputs"]["stream_id"] = stream_id
    prompt[load_id]["inputs"]["state_file"] = f"streamdit/state_{stream_id}.safetensors"
    indices = [server.queue(prompt)["outputs"][save_id]["frame_index"][0] for _ in range(2)]
    server.stop()  # the module-level registry dies with the process; the state file stays
    seconds = server.start()
    assert stream_id not in server.get("/streamdit/streams")
    history = server.queue(prompt)
    assert history["status"]["status_str"] == "success", history["status"]
    resumed = history["outputs"][save_id]["frame_index"][0]
    per_run = indices[0]
    assert indices == [per_run, 2 * per_run] and resumed == 3 * per_run
    print(f"restart: stream {stream_id!r} saved at frames {indices}, server restarted in {seconds:.1f} s, "
          f"resumed to frame {resumed}")


def test_stream_survives_free_memory_and_resets_over_http(server: Server, object_info: dict[str, Any]) -> None:
    specs = specs_from_object_info(object_info)
    prompt = ui_to_api(load_workflow(REPO / "workflows" / "streamdit_text_to_video.json"), specs)
    (writer_id,) = find_nodes(prompt, "StreamDiTWriter")
    (sampler_id,) = find_nodes(prompt, "StreamDiTSampler")
    stream_id = f"free-{uuid.uuid4().hex[:6]}"
    prompt[sampler_id]["inputs"]["stream_id"] = stream_id
    first = _frames_in(server.queue(prompt), writer_id)
    # unload every model and drop ComfyUI's caches and node objects: the stream lives in the pack's registry,
    # and the model comes back through ComfyUI's memory manager on the next run
    server.post("/free", {"unload_models": True, "free_memory": True})
    time.sleep(1.0)
    history = server.queue(prompt)
    assert history["status"]["status_str"] == "success", history["status"]
    assert _frames_in(history, writer_id) == 2 * first
    assert server.get("/streamdit/streams")[stream_id] == 2 * first
    assert server.post("/streamdit/reset", {"stream_id": stream_id}) == {"stream_id": stream_id, "reset": True}
    assert stream_id not in server.get("/streamdit/streams")
    assert _frames_in(server.queue(prompt), writer_id) == first
    print(f"free: stream {stream_id!r} continued {first} -> {2 * first} frames across /free (models unloaded); "
          f"POST /streamdit/reset restarted it")


def test_a_checkpoint_in_models_streamdit_is_listed_and_streams(server: Server, object_info: dict[str, Any]) -> None:
    choices = object_info["StreamDiTModelLoader"]["input"]["required"]["model"][0]
    listed = [c for c in choices if c.startswith("test/")]
    # a sharded checkpoint is listed once, by its first shard
    assert len(listed) == 1 and listed[0].startswith("test/streamdit-test-00001-of-"), choices
    prompt = ui_to_api(load_workflow(REPO / "workflows" / "streamdit_text_to_video.json"),
                       specs_from_object_info(object_info))
    (loader_id,) = find_nodes(prompt, "StreamDiTModelLoader")
    (sampler_id,) = find_nodes(prompt, "StreamDiTSampler")
    (writer_id,) = find_nodes(prompt, "StreamDiTWriter")
    prompt[loader_id]["inputs"]["model"] = listed[0]
    prompt[sampler_id]["inputs"]["stream_id"] = f"ckpt-{uuid.uuid4().hex[:6]}"
    counts = [_frames_in(server.queue(prompt), writer_id) for _ in range(2)]
    assert counts == [counts[0], 2 * counts[0]] and counts[0] > 0
    prompt[loader_id]["inputs"]["model"] = "test/missing.safetensors"
    try:
        server.post("/prompt", {"prompt": prompt, "client_id": "streamdit-test"})
        raise AssertionError("a model that is not listed must be rejected")
    except urllib.error.HTTPError as exc:
        assert exc.code == 400  # ComfyUI's own combo validation
    print(f"checkpoint: {listed[0]} listed once (sharded) and streamed {counts} frames")


def test_the_bundled_teacher_is_listed_and_streams(server: Server, object_info: dict[str, Any]) -> None:
    """The shipped teacher is a loader choice and streams 2 queue runs in a row (16 calls per chunk)."""
    teacher = "streamdit-bundled-teacher (16 calls per chunk)"
    choices = object_info["StreamDiTModelLoader"]["input"]["required"]["model"][0]
    assert choices[:2] == ["streamdit-bundled (default)", teacher], choices
    prompt = ui_to_api(load_workflow(REPO / "workflows" / "streamdit_text_to_video.json"),
                       specs_from_object_info(object_info))
    (loader_id,) = find_nodes(prompt, "StreamDiTModelLoader")
    (sampler_id,) = find_nodes(prompt, "StreamDiTSampler")
    (writer_id,) = find_nodes(prompt, "StreamDiTWriter")
    prompt[loader_id]["inputs"]["model"] = teacher
    prompt[sampler_id]["inputs"]["stream_id"] = f"teacher-{uuid.uuid4().hex[:6]}"
    counts = [_frames_in(server.queue(prompt), writer_id) for _ in range(2)]
    assert counts == [counts[0], 2 * counts[0]] and counts[0] > 0
    print(f"teacher: listed second, streamed {counts} frames")


def test_wan_workflow_streams_and_decodes_seamlessly(server: Server, object_info: dict[str, Any]) -> None:
    """The Wan 2.1 workflow with a tiny random Wan-layout transformer (in models/diffusion_models, listed by the
    loader) and a tiny Wan 2.1 VAE of ComfyUI's own class loaded by the stock VAELoader. The text encoder is the
    one replacement: CLIPLoader + CLIPTextEncode (umT5-XXL cannot be made small in ComfyUI) become a test node
    with the same CONDITIONING output. Three queue runs: frames advance, and the frames decoded run by run equal
    ComfyUI's own one-shot VAE decode of all latents so far."""
    builder = load_builder()
    assert builder.WAN_MODEL in object_info["StreamDiTModelLoader"]["input"]["required"]["model"][0]
    assert builder.WAN_VAE in object_info["VAELoader"]["input"]["required"]["vae_name"][0]
    workflow = load_workflow(REPO / "workflows" / "streamdit_wan_text_to_video.json")
    prompt = ui_to_api(workflow, specs_from_object_info(object_info))
    for node_id in find_nodes(prompt, "CLIPLoader"):
        del prompt[node_id]
    for node_id in find_nodes(prompt, "CLIPTextEncode"):
        text = prompt[node_id]["inputs"]["text"]
        prompt[node_id] = {"class_type": "StreamDiTTestTextEncode", "inputs": {"text": text, "width": 32,
                                                                              "tokens": 24}}
    (settings_id,) = find_nodes(prompt, "StreamDiTSettings")
    prompt[settings_id]["inputs"].update(height=32, width=32)  # the tiny VAE is as slow per pixel as any
    (sampler_id,) = find_nodes(prompt, "StreamDiTSampler")
    (decode_id,) = find_nodes(prompt, "StreamDiTDecode")
    (vae_id,) = find_nodes(prompt, "VAELoader")
    (writer_id,) = find_nodes(prompt, "StreamDiTWriter")
    stream_id = f"wan-{uuid.uuid4().hex[:6]}"
    prompt[sampler_id]["inputs"]["stream_id"] = stream_id
    prompt["900"] = {"class_type": "StreamDiTTestDecodeCheck",
                     "inputs": {"frames": [decode_id, 0], "latent": [decode_id, 2], "vae": [vae_id, 0]}}
    per_run = prompt[sampler_id]["inputs"]["chunks_per_run"]
    results = []
    for _ in range(RUNS):
        start = time.monotonic()
        history = server.queue(prompt)
        status = history["status"]
        assert status["status_str"] == "success", json.dumps(status["messages"])[-3000:]
        check = history["outputs"]["900"]
        results.append((server.get("/streamdit/streams")[stream_id], check["latent_frames"][0], check["frames"][0],
                        check["max_diff"][0], _frames_in(history, writer_id), time.monotonic() - start,
                        check["std"][0]))
        if len(results) == 1:  # Settings runs once, then its output is cached (and not in later histories)
            assert "base model: OK" in history["outputs"][settings_id]["text"][0]
    latent_counts = [r[0] for r in results]
    assert latent_counts == [per_run * (i + 1) for i in range(RUNS)]
    assert [r[1] for r in results] == latent_counts
    assert [r[2] for r in results] == [1 + 4 * (n - 1) for n in latent_counts]  # 1 frame, then 4 per latent
    assert [r[4] for r in results] == [r[2] for r in results]  # the writer's file holds every decoded frame
    assert all(r[3] <= 1e-5 for r in results), results  # run-by-run decode == ComfyUI's one-shot decode
    assert all(r[6] > 1e-3 for r in results)  # non-trivial frames
    print(f"wan: {RUNS} runs, stream {stream_id!r} at latent frames {latent_counts}, decoded frames "
          f"{[r[2] for r in results]}, max |streamed - one-shot decode| {[r[3] for r in results]}, seconds per run "
          f"{[round(r[5], 2) for r in results]}")


_CHUNKED_DECODE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import torch
    import comfy.sd
    from safetensors.torch import load_file
    from streamdit_core.causal_decode import DecoderState, ModuleStepDecoder, count_causal_convs, decode_chunk
    vae = comfy.sd.VAE(sd=load_file(sys.argv[3]))
    model = vae.first_stage_model
    assert type(model).__module__ == "comfy.ldm.wan.vae", type(model)
    z = torch.randn(1, 16, 8, 4, 6, generator=torch.Generator().manual_seed(0))
    full = vae.decode(z)[0]  # ComfyUI's own one-shot decode, [T, H, W, 3]
    out = {}
    for chunks in ([8], [1] * 8, [1, 2, 3, 2], [3, 5]):
        step = ModuleStepDecoder(model.conv2, model.decoder, count_causal_convs(model.decoder), vae.device,
                                 vae.vae_dtype)
        state, pieces, start = DecoderState.fresh(step.num_slots), [], 0
        for n in chunks:
            state, frames = decode_chunk(step, state, z[:, :, start:start + n])
            pieces.append(frames)
            start += n
        got = torch.cat(pieces).permute(0, 2, 3, 1)
        out[str(chunks)] = [list(got.shape), float((got - full).abs().max())]
    print(json.dumps({"full": list(full.shape), "std": float(full.std()), "chunks": out}))
""")


def test_chunked_decode_equals_comfyui_wan_vae_decode(base: Path) -> None:
    """The core's streaming decode on ComfyUI's own WanVAE class (tiny random weights, as VAELoader builds it)
    against ComfyUI's ``VAE.decode`` of the whole latent video, for several chunkings."""
    assert COMFY_DIR and COMFY_PYTHON
    vae_path = base / "models" / "vae" / load_builder().WAN_VAE
    out = subprocess.run([COMFY_PYTHON, "-c", _CHUNKED_DECODE, COMFY_DIR, str(REPO), str(vae_path)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["full"][0] == 1 + 4 * 7 and result["std"] > 1e-3
    for chunks, (shape, diff) in result["chunks"].items():
        assert shape == result["full"], chunks
        assert diff <= 1e-5, (chunks, diff)
    print(f"ComfyUI WanVAE: one-shot decode {result['full']}, chunked max |diff| "
          f"{ {k: v[1] for k, v in result['chunks'].items()} }")
