"""A small stand-in for ComfyUI's executor, for tests without ComfyUI.

It does what matters for a stateful streaming pack, the way ComfyUI v0.8.0 does it (see
shared/research/comfyui-host.md §1.5, §2): converts UI-format workflows to API prompts, validates them, and
runs them through the real node classes with the *classic* output cache (a node re-runs when its signature
— class, ``IS_CHANGED`` value, constant inputs and all ancestors' signatures — has no cache entry; only the
latest prompt's entries survive), injects hidden inputs, handles ``{"ui", "result"}`` returns, and marks the
executing prompt for :func:`nodes.host.current_prompt_id`. Stock nodes used by the examples (Load Video, Get
Video Components, Preview Image) have minimal stand-ins.

Also used by ``tests/test_real_comfyui.py`` for the UI → API conversion, with the real server's /object_info.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
PACK_NAME = "streamdit_pack"
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def load_builder() -> ModuleType:
    """``workflows/build_workflows.py`` as a module."""
    name = "streamdit_build_workflows"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, WORKFLOWS / "build_workflows.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_pack() -> ModuleType:
    """The repository imported as a ComfyUI pack (package ``streamdit_pack``)."""
    return load_builder().load_pack(PACK_NAME)


def pack_module(name: str) -> ModuleType:
    """A submodule of the loaded pack, e.g. ``pack_module("nodes.host")``."""
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.{name}")


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.json"))


# ----------------------------------------------------------------------------------------------------------
# Input specs: (name, is_widget, has_control_after_generate) in ComfyUI's input order


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str
    widget: bool
    control: bool
    optional: bool


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _specs_from_input_types(types: dict[str, Any]) -> list[InputSpec]:
    out = []
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            kind = "COMBO" if isinstance(spec[0], (list, tuple)) else str(spec[0])
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            widget = kind in WIDGET_TYPES and not options.get("forceInput", False)
            if "control_after_generate" in options:
                control = bool(options["control_after_generate"])
            else:  # the frontend's rule (useIntWidget): INT inputs named seed / noise_seed get one
                control = kind == "INT" and name in ("seed", "noise_seed")
            out.append(InputSpec(name, kind, widget, control, section == "optional"))
    return out


def specs_from_classes(classes: dict[str, type]) -> dict[str, list[InputSpec]]:
    return {name: _specs_from_input_types(cls.INPUT_TYPES()) for name, cls in classes.items()}


def specs_from_object_info(object_info: dict[str, Any]) -> dict[str, list[InputSpec]]:
    """Input specs from a real server's ``/object_info`` (``input_order`` gives the order)."""
    out = {}
    for name, info in object_info.items():
        ordered: dict[str, Any] = {"required": {}, "optional": {}}
        for section in ("required", "optional"):
            for input_name in info.get("input_order", {}).get(section, []):
                ordered[section][input_name] = info["input"][section][input_name]
        out[name] = _specs_from_input_types(ordered)
    return out


def stock_specs() -> dict[str, list[InputSpec]]:
    """Specs of the stock nodes the examples use (as in ComfyUI v0.8.0's /object_info)."""
    out = {}
    for name, info in load_builder().STOCK_NODES.items():
        out[name] = [InputSpec(n, t, w, False, False) for n, t, w in info["inputs"]]
    return out


# ----------------------------------------------------------------------------------------------------------
# UI (graph) format → API (prompt) format


class ConversionError(ValueError):
    pass


def ui_to_api(workflow: dict[str, Any], specs: dict[str, list[InputSpec]]) -> dict[str, dict[str, Any]]:
    """Convert a UI-format workflow to an API prompt, as the frontend's "Export (API)" does."""
    links = {lk[0]: lk for lk in workflow.get("links", [])}
    prompt: dict[str, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        node_type = node["type"]
        if node_type in FRONTEND_ONLY or node.get("mode", 0) == 2:  # notes, muted nodes
            continue
        if node.get("mode", 0) == 4:
            raise ConversionError(f"node {node['id']} ({node_type}) is bypassed; not supported here")
        if node_type not in specs:
            raise ConversionError(f"node {node['id']}: unknown node type {node_type!r}")
        linked = {}
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                link = links.get(entry["link"])
                if link is None:
                    raise ConversionError(f"node {node['id']} input {entry['name']} refers to missing link "
                                          f"{entry['link']}")
                linked[entry["name"]] = [str(link[1]), int(link[2])]
        values = list(node.get("widgets_values") or [])
        pos = 0
        inputs: dict[str, Any] = {}
        for spec in specs[node_type]:
            if spec.widget:
                if pos >= len(values):
                    raise ConversionError(f"node {node['id']} ({node_type}): no widget value for {spec.name!r}")
                inputs[spec.name] = values[pos]
                pos += 1 + (1 if spec.control else 0)
            if spec.name in linked:
                inputs[spec.name] = linked[spec.name]
        prompt[str(node["id"])] = {"class_type": node_type, "inputs": inputs,
                                   "_meta": {"title": node.get("title", node_type)}}
    return prompt


def load_workflow(path: Path | str) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------
# Stand-ins for the stock nodes


class _LoadVideo:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"file": ("STRING", {})}}

    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "load"

    def load(self, file: str) -> tuple[dict[str, str]]:
        host = pack_module("nodes.host")
        path = Path(host.input_directory()) / file
        if not path.is_file():
            raise FileNotFoundError(f"Invalid video file: {file}")
        return ({"path": str(path)},)


class _GetVideoComponents:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"video": ("VIDEO",)}}

    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT")
    FUNCTION = "get"

    def get(self, video: dict[str, str]) -> tuple[torch.Tensor, None, float]:
        load_pack()
        video_io = importlib.import_module(f"{PACK_NAME}.streamdit_core.video_io")
        frames = video_io.read_video(video["path"])
        return (torch.from_numpy(frames).float() / 255.0, None, 16.0)


class _PreviewImage:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"images": ("IMAGE",)}}

    RETURN_TYPES = ()
    FUNCTION = "show"
    OUTPUT_NODE = True

    def show(self, images: torch.Tensor) -> dict[str, Any]:
        return {"ui": {"images": [{"shape": list(images.shape)}]}}


STOCK_CLASSES: dict[str, type] = {
    "LoadVideo": _LoadVideo,
    "GetVideoComponents": _GetVideoComponents,
    "PreviewImage": _PreviewImage,
}


# ----------------------------------------------------------------------------------------------------------
# The executor


class ExecutionError(RuntimeError):
    def __init__(self, node_id: str, class_type: str, error: BaseException) -> None:
        super().__init__(f"node {node_id} ({class_type}) failed: {type(error).__name__}: {error}")
        self.node_id, self.class_type, self.error = node_id, class_type, error


@dataclass
class RunResult:
    prompt_id: str
    outputs: dict[str, dict[str, Any]]  # node id -> ui dict (what /history shows)
    results: dict[str, tuple[Any, ...]]  # node id -> output values
    executed: list[str]  # node ids that ran (not served from cache)


def _to_hashable(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool, bytes, type(None))):
        return value
    if isinstance(value, dict):
        return frozenset((k, _to_hashable(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_to_hashable(v) for v in value)
    return object()  # unhashable: never equal, like ComfyUI's Unhashable()


class Executor:
    """Runs API prompts through node classes with ComfyUI's classic caching."""

    _ids = itertools.count(1)

    def __init__(self, classes: dict[str, type] | None = None) -> None:
        pack = load_pack()
        self.classes: dict[str, type] = dict(STOCK_CLASSES)
        self.classes.update(classes or pack.NODE_CLASS_MAPPINGS)
        self.host = pack_module("nodes.host")
        self._cache: dict[Any, tuple[tuple[Any, ...], dict[str, Any] | None]] = {}

    def specs(self) -> dict[str, list[InputSpec]]:
        specs = stock_specs()
        specs.update(specs_from_classes({k: v for k, v in self.classes.items() if k not in STOCK_CLASSES}))
        return specs

    def convert(self, workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return ui_to_api(workflow, self.specs())

    def validate(self, prompt: dict[str, dict[str, Any]]) -> None:
        for node_id, node in prompt.items():
            cls = self.classes.get(node["class_type"])
            if cls is None:
                raise ExecutionError(node_id, node["class_type"], KeyError("node does not exist"))
            types = cls.INPUT_TYPES()
            for name, spec in types.get("required", {}).items():
                if name not in node["inputs"]:
                    raise ExecutionError(node_id, node["class_type"], KeyError(f"required input {name} missing"))
                value = node["inputs"][name]
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                    if value[0] not in prompt:
                        raise ExecutionError(node_id, node["class_type"], KeyError(f"{name} links to missing node"))
                    continue
                options = spec[1] if len(spec) > 1 else {}
                if isinstance(spec[0], (list, tuple)) and value not in spec[0]:
                    raise ExecutionError(node_id, node["class_type"], ValueError(f"{name}: {value!r} not in list"))
                if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
                    raise ExecutionError(node_id, node["class_type"], ValueError(f"{name}: {value!r} out of range"))

    def run(self, prompt: dict[str, dict[str, Any]], prompt_id: str | None = None) -> RunResult:
        """Execute one prompt (one "queue run")."""
        self.validate(prompt)
        prompt_id = prompt_id or f"test-prompt-{next(self._ids)}"
        outputs_wanted = [
            nid for nid, n in prompt.items() if getattr(self.classes[n["class_type"]], "OUTPUT_NODE", False)
        ]
        if not outputs_wanted:
            raise ValueError("prompt has no output node")
        keys: dict[str, Any] = {}

        def key_of(node_id: str) -> Any:
            if node_id in keys:
                return keys[node_id]
            node = prompt[node_id]
            cls = self.classes[node["class_type"]]
            const = {k: v for k, v in node["inputs"].items() if not (isinstance(v, list) and len(v) == 2)}
            is_changed: Any = False
            if hasattr(cls, "IS_CHANGED"):
                try:
                    args = {k: (None if isinstance(v, list) and len(v) == 2 else v) for k, v in node["inputs"].items()}
                    is_changed = cls.IS_CHANGED(**args)
                except Exception:
                    is_changed = float("nan")
            ancestors = tuple(
                (k, key_of(v[0]), v[1])
                for k, v in sorted(node["inputs"].items())
                if isinstance(v, list) and len(v) == 2
            )
            hidden = cls.INPUT_TYPES().get("hidden", {})
            own_id = node_id if "UNIQUE_ID" in hidden.values() or getattr(cls, "NOT_IDEMPOTENT", False) else None
            keys[node_id] = (node["class_type"], _to_hashable([is_changed]), own_id,
                             _to_hashable(sorted(const.items())), ancestors)
            return keys[node_id]

        for nid in prompt:
            key_of(nid)
        results: dict[str, tuple[Any, ...]] = {}
        ui: dict[str, dict[str, Any]] = {}
        executed: list[str] = []
        new_cache: dict[Any, tuple[tuple[Any, ...], dict[str, Any] | None]] = {}

        def run_node(node_id: str) -> tuple[Any, ...]:
            if node_id in results:
                return results[node_id]
            key = keys[node_id]
            if key in self._cache:
                value, node_ui = self._cache[key]
                new_cache[key] = (value, node_ui)
                results[node_id] = value
                if node_ui is not None:
                    ui[node_id] = node_ui
                return value
            node = prompt[node_id]
            cls = self.classes[node["class_type"]]
            kwargs: dict[str, Any] = {}
            for name, value in node["inputs"].items():
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                    kwargs[name] = run_node(value[0])[value[1]]
                else:
                    kwargs[name] = value
            for name, kind in cls.INPUT_TYPES().get("hidden", {}).items():
                if kind == "UNIQUE_ID":
                    kwargs[name] = node_id
                elif kind == "PROMPT":
                    kwargs[name] = prompt
            self.host.check_interrupt()  # ComfyUI checks before every node
            try:
                with self.host.executing(prompt_id, node_id):
                    returned = getattr(cls(), cls.FUNCTION)(**kwargs)
            except Exception as exc:
                raise ExecutionError(node_id, node["class_type"], exc) from exc
            executed.append(node_id)
            node_ui = None
            if isinstance(returned, dict):
                node_ui = returned.get("ui")
                value = tuple(returned.get("result", ()))
            else:
                value = tuple(returned)
            if node_ui is not None:
                for k, v in node_ui.items():
                    if not isinstance(v, (list, tuple)):
                        raise TypeError(f"node {node_id}: ui[{k!r}] must be a list or tuple (ComfyUI concatenates)")
                ui[node_id] = node_ui
            results[node_id] = value
            new_cache[key] = (value, node_ui)
            return value

        try:
            for nid in outputs_wanted:
                run_node(nid)
        finally:
            # classic cache: keep exactly the entries this prompt produced or used
            self._cache = new_cache
        return RunResult(prompt_id, ui, results, executed)


def run_workflow(executor: Executor, path: Path | str, edit: Callable[[dict[str, Any]], None] | None = None,
                 runs: int = 1) -> list[RunResult]:
    """Convert a workflow file, optionally edit the API prompt, and queue it ``runs`` times."""
    prompt = executor.convert(load_workflow(path))
    if edit is not None:
        edit(prompt)
    return [executor.run(prompt) for _ in range(runs)]


def find_nodes(prompt: dict[str, dict[str, Any]], class_type: str) -> list[str]:
    return [nid for nid, n in prompt.items() if n["class_type"] == class_type]
