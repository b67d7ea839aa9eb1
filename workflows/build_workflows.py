"""Builds the example workflows in this folder (ComfyUI UI/graph format, version 0.4).

The JSON files are committed; this script is how they are made, so widget values always follow the nodes'
``INPUT_TYPES`` order. Re-run after changing a node's inputs::

    python workflows/build_workflows.py          # rewrites workflows/*.json
    python workflows/build_workflows.py --check  # exit 1 if a file would change (tests do this)

Needs only the pack's node classes (no ComfyUI, no model). ComfyUI lists this folder as templates.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# Stock ComfyUI v0.8.0 nodes used by the examples: (inputs in order as (name, type, is_widget), outputs).
# Checked against a real ComfyUI's /object_info by tests/test_real_comfyui.py.
STOCK_NODES: dict[str, dict[str, Any]] = {
    "LoadVideo": {
        "inputs": [("file", "COMBO", True)],
        "outputs": [("VIDEO", "VIDEO")],
        "extra_widgets": ["image"],  # the upload button's widget value, saved after 'file' by the frontend
    },
    "GetVideoComponents": {
        "inputs": [("video", "VIDEO", False)],
        "outputs": [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")],
    },
    "PreviewImage": {"inputs": [("images", "IMAGE", False)], "outputs": []},
    "CLIPLoader": {
        "inputs": [("clip_name", "COMBO", True), ("type", "COMBO", True), ("device", "COMBO", True)],
        "outputs": [("CLIP", "CLIP")],
    },
    "CLIPTextEncode": {
        "inputs": [("text", "STRING", True), ("clip", "CLIP", False)],
        "outputs": [("CONDITIONING", "CONDITIONING")],
    },
    "VAELoader": {"inputs": [("vae_name", "COMBO", True)], "outputs": [("VAE", "VAE")]},
}
FRONTEND_ONLY = {"Note", "MarkdownNote"}

EXAMPLE_VIDEO = "streamdit_example.mp4"

# The file names of Comfy-Org's repackaged Wan 2.1 files (as in ComfyUI's own Wan text-to-video template).
WAN_MODEL = "diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"
WAN_TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN_VAE = "wan_2.1_vae.safetensors"
WAN_NEGATIVE = (  # Wan 2.1's recommended negative prompt (as in its own code and ComfyUI's template)
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，"
    "多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
"""The file name the video-to-video example's Load Video node points at (any video in ComfyUI/input works)."""


def load_pack(name: str = "streamdit_pack") -> ModuleType:
    """Import the repository as a ComfyUI pack would be imported (a package from its ``__init__.py``)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _input_type(spec: tuple[Any, ...]) -> str:
    kind = spec[0]
    return "COMBO" if isinstance(kind, (list, tuple)) else str(kind)


def pack_node_spec(cls: type) -> dict[str, Any]:
    """The same facts as for STOCK_NODES, read from a V1 node class."""
    types = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            kind = _input_type(spec)
            options = spec[1] if len(spec) > 1 else {}
            widget = kind in WIDGET_TYPES and not options.get("forceInput", False)
            inputs.append((name, kind, widget))
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return {"inputs": inputs, "outputs": list(zip(names, cls.RETURN_TYPES)), "class": cls}


def control_after_generate(cls: type | None, name: str) -> bool:
    """Whether the frontend adds a 'control after generate' value after this widget (see docs/NODES.md)."""
    if cls is None:
        return False
    types = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        spec = types.get(section, {}).get(name)
        if spec is not None:
            options = spec[1] if len(spec) > 1 else {}
            if "control_after_generate" in options:
                return bool(options["control_after_generate"])
            return _input_type(spec) == "INT" and name in ("seed", "noise_seed")
    return False


def default_widgets(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    types = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            if isinstance(spec[0], (list, tuple)):
                out[name] = options.get("default", spec[0][0] if spec[0] else None)
            elif "default" in options:
                out[name] = options["default"]
    return out


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    widgets: dict[str, Any]
    title: str | None = None
    size: tuple[float, float] | None = None
    color: str | None = None
    bgcolor: str | None = None
    links_in: dict[str, int] = field(default_factory=dict)
    links_out: dict[int, list[int]] = field(default_factory=dict)


class Workflow:
    def __init__(self, pack: ModuleType) -> None:
        self.classes: dict[str, type] = pack.NODE_CLASS_MAPPINGS
        self.nodes: list[Node] = []
        self.links: list[list[Any]] = []

    def spec(self, node_type: str) -> dict[str, Any]:
        if node_type in self.classes:
            return pack_node_spec(self.classes[node_type])
        if node_type in STOCK_NODES:
            return STOCK_NODES[node_type]
        raise KeyError(node_type)

    def add(self, node_type: str, pos: tuple[float, float], title: str | None = None, **widgets: Any) -> Node:
        if node_type in self.classes:
            values = default_widgets(self.classes[node_type])
            unknown = set(widgets) - set(values) - {n for n, _, w in self.spec(node_type)["inputs"] if w}
            if unknown:
                raise KeyError(f"{node_type} has no widgets {sorted(unknown)}")
            values.update(widgets)
        else:
            values = dict(widgets)
        node = Node(id=len(self.nodes) + 1, type=node_type, pos=pos, widgets=values, title=title)
        self.nodes.append(node)
        return node

    def note(self, pos: tuple[float, float], text: str, size: tuple[float, float] = (420, 220)) -> Node:
        node = Node(id=len(self.nodes) + 1, type="Note", pos=pos, widgets={"text": text}, size=size,
                    color="#432", bgcolor="#653")
        self.nodes.append(node)
        return node

    def link(self, src: Node, output: str, dst: Node, input_name: str) -> None:
        outputs = self.spec(src.type)["outputs"]
        slot = [n for n, _ in outputs].index(output)
        kind = outputs[slot][1]
        dst_inputs = {n: t for n, t, _ in self.spec(dst.type)["inputs"]}
        if dst_inputs[input_name] != kind:
            raise TypeError(f"{src.type}.{output} ({kind}) -> {dst.type}.{input_name} ({dst_inputs[input_name]})")
        link_id = len(self.links) + 1
        self.links.append([link_id, src.id, slot, dst.id, input_name, kind])
        dst.links_in[input_name] = link_id
        src.links_out.setdefault(slot, []).append(link_id)

    # -- serialisation -------------------------------------------------------------------------------------

    def _order(self) -> dict[int, int]:
        deps = {n.id: {lk[1] for lk in self.links if lk[3] == n.id} for n in self.nodes}
        order: dict[int, int] = {}
        while len(order) < len(self.nodes):
            for n in self.nodes:
                if n.id not in order and deps[n.id] <= set(order):
                    order[n.id] = len(order)
        return order

    def to_json(self) -> dict[str, Any]:
        order = self._order()
        nodes_json = []
        for n in self.nodes:
            if n.type in FRONTEND_ONLY:
                nodes_json.append({
                    "id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size or (400, 200)),
                    "flags": {}, "order": order[n.id], "mode": 0, "inputs": [], "outputs": [],
                    "properties": {}, "widgets_values": [n.widgets["text"]],
                    **({"color": n.color, "bgcolor": n.bgcolor} if n.color else {}),
                })
                continue
            spec = self.spec(n.type)
            cls = self.classes.get(n.type)
            inputs = []
            for name, kind, widget in spec["inputs"]:
                if widget and name not in n.links_in:
                    continue
                entry: dict[str, Any] = {"name": name, "type": kind, "link": n.links_in.get(name)}
                if widget:
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            outputs = []
            for slot, (name, kind) in enumerate(spec["outputs"]):
                outputs.append({"name": name, "type": kind, "links": n.links_out.get(slot, []), "slot_index": slot})
            widgets: list[Any] = []
            for name, _kind, widget in spec["inputs"]:
                if not widget:
                    continue
                widgets.append(n.widgets[name])
                if control_after_generate(cls, name):
                    widgets.append("fixed")
            widgets.extend(spec.get("extra_widgets", []))
            n_sockets = max(len(inputs), len(outputs))
            n_widgets = sum(1 for _, _, w in spec["inputs"] if w)
            height = 46 + 22 * n_sockets + 26 * n_widgets
            if n.type == "StreamDiTPromptSchedule":
                height += 110
            if n.type == "StreamDiTWriter":
                height += 340
            size = n.size or (340, height)
            node_json: dict[str, Any] = {
                "id": n.id, "type": n.type, "pos": list(n.pos), "size": list(size), "flags": {},
                "order": order[n.id], "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": n.type}, "widgets_values": widgets,
            }
            if n.title:
                node_json["title"] = n.title
            nodes_json.append(node_json)
        links_json = []
        for link_id, src, slot, dst, input_name, kind in self.links:
            dst_node = next(n for n in self.nodes if n.id == dst)
            dst_slot = next(
                i for i, entry in enumerate(self._socket_inputs(dst_node)) if entry == input_name
            )
            links_json.append([link_id, src, slot, dst, dst_slot, kind])
        return {
            "id": "00000000-0000-4000-8000-000000000000",
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes_json,
            "links": links_json,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.9, "offset": [40, 90]}, "frontendVersion": "1.35.9"},
            "version": 0.4,
        }

    def _socket_inputs(self, n: Node) -> list[str]:
        return [name for name, _kind, widget in self.spec(n.type)["inputs"] if not widget or name in n.links_in]


# ----------------------------------------------------------------------------------------------------------
# The examples

BUNDLED = "streamdit-bundled (default)"
COL = (40, 420, 800, 1180, 1560)


def _core_chain(wf: Workflow, schedule: str, *, stream_id: str, transition: int = 0, chunks_per_run: int = 1,
                y: float = 60) -> tuple[Node, Node, Node, Node]:
    loader = wf.add("StreamDiTModelLoader", (COL[0], y), model=BUNDLED)
    settings = wf.add("StreamDiTSettings", (COL[1], y))
    prompts = wf.add("StreamDiTPromptSchedule", (COL[0], y + 190), schedule=schedule, transition=transition)
    sampler = wf.add("StreamDiTSampler", (COL[2], y), stream_id=stream_id, seed=42, chunks_per_run=chunks_per_run)
    wf.link(loader, "model", settings, "model")
    wf.link(loader, "model", sampler, "model")
    wf.link(settings, "settings", sampler, "settings")
    wf.link(prompts, "prompts", sampler, "prompts")
    return loader, settings, prompts, sampler


def text_to_video(pack: ModuleType) -> dict[str, Any]:
    wf = Workflow(pack)
    _, _, _, sampler = _core_chain(wf, "a large red circle moving right on a black background", stream_id="t2v-1",
                                   chunks_per_run=2)
    writer = wf.add("StreamDiTWriter", (COL[3], 60), filename_prefix="streamdit/t2v")
    wf.link(sampler, "frames", writer, "images")
    wf.link(sampler, "latent", writer, "latent")
    wf.note((COL[0], 600), (
        "StreamDiT text-to-video stream\n\n"
        "Press Queue (or Queue (Instant) / auto-queue for a live stream). Every run continues the stream "
        "'t2v-1' by chunks_per_run chunks and appends the new frames to output/streamdit/t2v_t2v-1.mp4.\n\n"
        "A new seed starts a new stream. Set reset = true for one run to restart (then false again)."
    ), size=(740, 170))
    return wf.to_json()


def prompt_schedule(pack: ModuleType) -> dict[str, Any]:
    wf = Workflow(pack)
    schedule = (
        '"0": "a large red circle moving right on a black background",\n'
        '"32": "a small yellow square moving left on a grey background",\n'
        '"64": "a large purple triangle bouncing on a checkered background"'
    )
    _, _, _, sampler = _core_chain(wf, schedule, stream_id="schedule-1", transition=8)
    writer = wf.add("StreamDiTWriter", (COL[3], 60), filename_prefix="streamdit/schedule")
    wf.link(sampler, "frames", writer, "images")
    wf.link(sampler, "latent", writer, "latent")
    wf.note((COL[0], 600), (
        "Interactive prompt schedule\n\n"
        "The schedule maps output frame indices to prompts (FizzNodes style, or one '<frame>: <prompt>' per line); "
        "'transition' blends consecutive prompts over that many frames.\n\n"
        "While the stream plays (auto-queue), edit the schedule: add a keyframe a little ahead of the current "
        "frame (shown on the writer) and the new prompt takes over there, without restarting the stream."
    ), size=(740, 190))
    return wf.to_json()


def video_to_video(pack: ModuleType) -> dict[str, Any]:
    wf = Workflow(pack)
    _, _, _, sampler = _core_chain(wf, "a large cyan diamond moving right on a striped background",
                                   stream_id="v2v-1", y=60)
    load = wf.add("LoadVideo", (COL[0], 600), file=EXAMPLE_VIDEO)
    components = wf.add("GetVideoComponents", (COL[1], 600))
    video = wf.add("StreamDiTVideoInput", (COL[2], 600), strength=0.7, on_end="loop")
    wf.link(load, "VIDEO", components, "video")
    wf.link(components, "images", video, "images")
    wf.link(video, "video", sampler, "video")
    writer = wf.add("StreamDiTWriter", (COL[3], 60), filename_prefix="streamdit/v2v")
    wf.link(sampler, "frames", writer, "images")
    wf.link(sampler, "latent", writer, "latent")
    wf.note((COL[0], 900), (
        "Video-to-video stream\n\n"
        f"Load Video reads a video from ComfyUI/input (upload yours, or put one named {EXAMPLE_VIDEO} there). "
        "Each chunk entering the stream is the matching input chunk noised to 'strength'; the output follows "
        "the input's layout and motion, restyled by the prompt. on_end decides what happens after the last "
        "input frame (loop / hold / stop)."
    ), size=(740, 170))
    return wf.to_json()


def save_and_resume(pack: ModuleType) -> dict[str, Any]:
    wf = Workflow(pack)
    _, _, _, sampler = _core_chain(wf, "a small green circle bouncing on a grey background", stream_id="saved-1")
    load = wf.add("StreamDiTLoadState", (COL[1], 520), state_file="streamdit/state_saved-1.safetensors",
                  if_missing="start fresh")
    wf.link(load, "state", sampler, "initial_state")
    save = wf.add("StreamDiTSaveState", (COL[3], 560), filename_prefix="streamdit/state")
    wf.link(sampler, "latent", save, "latent")
    writer = wf.add("StreamDiTWriter", (COL[3], 60), filename_prefix="streamdit/saved")
    wf.link(sampler, "frames", writer, "images")
    wf.link(sampler, "latent", writer, "latent")
    wf.note((COL[0], 700), (
        "Save and resume a stream\n\n"
        "Save State writes the stream's state after every run to output/streamdit/state_saved-1.safetensors. "
        "Load State feeds it to the sampler's initial_state: when the stream is new (e.g. after restarting "
        "ComfyUI) or reset, it continues exactly from the saved frame instead of starting over. On the very "
        "first run the file does not exist yet and the stream starts from its seed ('start fresh')."
    ), size=(740, 190))
    return wf.to_json()


def reset_stream(pack: ModuleType) -> dict[str, Any]:
    wf = Workflow(pack)
    wf.add("StreamDiTReset", (COL[0], 60), stream_id="t2v-1")
    wf.note((COL[0], 200), (
        "Reset a stream\n\n"
        "Queue this on its own to make the named stream start fresh on its next run (the writer restarts "
        "its file too). Do not put it in the graph that streams."
    ), size=(400, 150))
    return wf.to_json()


def wan_text_to_video(pack: ModuleType) -> dict[str, Any]:
    wf = Workflow(pack)
    loader = wf.add("StreamDiTModelLoader", (COL[0], 60), model=WAN_MODEL)
    settings = wf.add("StreamDiTSettings", (COL[1], 60))
    wf.link(loader, "model", settings, "model")
    clip = wf.add("CLIPLoader", (COL[0], 330), clip_name=WAN_TEXT_ENCODER, type="wan", device="default")
    first = wf.add("CLIPTextEncode", (COL[1], 700), title="Prompt from frame 0",
                   text="a fox running through a snowy forest, tracking shot, daytime")
    second = wf.add("CLIPTextEncode", (COL[1], 900), title="Prompt from frame 12",
                    text="a fox running across a frozen lake at sunset, tracking shot")
    negative = wf.add("CLIPTextEncode", (COL[1], 1100), title="Negative prompt", text=WAN_NEGATIVE)
    for encode in (first, second, negative):
        wf.link(clip, "CLIP", encode, "clip")
    schedule = wf.add("StreamDiTConditioningSchedule", (COL[2], 700), keyframes="0, 12", transition=2)
    wf.link(first, "CONDITIONING", schedule, "conditioning_1")
    wf.link(second, "CONDITIONING", schedule, "conditioning_2")
    wf.link(negative, "CONDITIONING", schedule, "negative")
    sampler = wf.add("StreamDiTSampler", (COL[2], 60), stream_id="wan-1", seed=42, chunks_per_run=4)
    wf.link(loader, "model", sampler, "model")
    wf.link(settings, "settings", sampler, "settings")
    wf.link(schedule, "prompts", sampler, "prompts")
    vae = wf.add("VAELoader", (COL[2], 480), vae_name=WAN_VAE)
    decode = wf.add("StreamDiTDecode", (COL[3], 60))
    wf.link(sampler, "latent", decode, "latent")
    wf.link(vae, "VAE", decode, "vae")
    writer = wf.add("StreamDiTWriter", (COL[4], 60), filename_prefix="streamdit/wan", fps=16.0)
    wf.link(decode, "frames", writer, "images")
    wf.link(decode, "latent", writer, "latent")
    wf.note((COL[3], 700), (
        "Wan 2.1 1.3B streaming (training-free, base model)\n\n"
        "Files (Comfy-Org's repackaged Wan 2.1): models/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors "
        "(listed by the StreamDiT loader as diffusion_models/...), models/text_encoders/"
        "umt5_xxl_fp8_e4m3fn_scaled.safetensors, models/vae/wan_2.1_vae.safetensors.\n\n"
        "Settings left at 0 use the base-Wan defaults: one latent frame per chunk, 16 in flight, 2 calls per "
        "position, model inputs of 4 latent frames (FIFO-style: a base model needs a narrow noise spread per "
        "call; Settings warns otherwise), 480x832, shift 8, CFG 5. Every run emits chunks_per_run latent frames "
        "= 4 video frames each; StreamDiT Decode keeps the VAE cache between runs, so there are no seams.\n\n"
        "Keyframes count latent frames: the second prompt takes over at latent frame 12 (video frame 45)."
    ), size=(760, 300))
    return wf.to_json()


EXAMPLES = {
    "streamdit_text_to_video": text_to_video,
    "streamdit_prompt_schedule": prompt_schedule,
    "streamdit_video_to_video": video_to_video,
    "streamdit_save_and_resume": save_and_resume,
    "streamdit_reset_stream": reset_stream,
    "streamdit_wan_text_to_video": wan_text_to_video,
}


def render_all() -> dict[str, str]:
    pack = load_pack()
    return {f"{name}.json": json.dumps(build(pack), indent=2) + "\n" for name, build in EXAMPLES.items()}


def main(argv: list[str]) -> int:
    rendered = render_all()
    if "--check" in argv:
        stale = [name for name, text in rendered.items()
                 if not (HERE / name).is_file() or (HERE / name).read_text(encoding="utf-8") != text]
        if stale:
            sys.stderr.write(f"out of date: {', '.join(stale)} (run python workflows/build_workflows.py)\n")
            return 1
        return 0
    for name, text in rendered.items():
        (HERE / name).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
