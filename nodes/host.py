"""The one adapter between the StreamDiT nodes and the ComfyUI host.

Every call into ComfyUI (``folder_paths``, ``comfy.utils.ProgressBar``, ``comfy.model_management``,
``comfy_execution.utils.get_executing_context``, ``server.PromptServer``) lives here and nowhere else, so the
node classes run unchanged without ComfyUI (tests, scripts). Without ComfyUI:

* folders (models, output, temp, input) live under one configurable base directory (:func:`set_base_dir`,
  default ``$STREAMDIT_NODES_DIR`` or ``<tmp>/streamdit-nodes``);
* progress updates are recorded in :data:`progress_log` (newest last, bounded) instead of being sent;
* interrupts come from a test hook (:func:`set_interrupt_hook`) and raise :class:`StreamInterrupted`;
* the executing prompt id comes from :func:`executing` (a context manager the test executor uses).

Under ComfyUI the same functions call the host: interrupts raise ComfyUI's own
``InterruptProcessingException`` so the executor reports ``execution_interrupted``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

logger = logging.getLogger("StreamDiT.nodes")

MODEL_FOLDER = "streamdit"
"""ComfyUI model folder key; files live in ``<ComfyUI>/models/streamdit`` (and extra_model_paths.yaml)."""
MODEL_EXTENSIONS: frozenset[str] = frozenset({".safetensors"})
"""The only extension listed and loaded: safetensors never executes code (no pickles)."""
DIFFUSION_FOLDER = "diffusion_models"
"""ComfyUI's folder for diffusion models (``models/diffusion_models`` and ``models/unet``): Wan files live there."""
DIFFUSION_EXTENSIONS: frozenset[str] = frozenset({".safetensors", ".sft"})
"""Safetensors under both names ComfyUI uses; pickles are never listed."""


class StreamInterrupted(Exception):
    """Raised at an interrupt check when ComfyUI is absent and the test hook asked to interrupt."""


# --------------------------------------------------------------------------------------------------------------
# Host detection


def _try_import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a half-broken host module: behave as if ComfyUI were absent
        return None


_host_lock = threading.Lock()
_host_checked = False
_folder_paths: ModuleType | None = None
_comfy_utils: ModuleType | None = None
_model_management: ModuleType | None = None
_exec_utils: ModuleType | None = None


def _load_host() -> None:
    """Import the ComfyUI modules once. Only modules ComfyUI has already imported count as a host: a stray
    ``folder_paths`` module elsewhere on ``sys.path`` must not make tests talk to a half-present ComfyUI."""
    global _host_checked, _folder_paths, _comfy_utils, _model_management, _exec_utils
    if _host_checked:
        return
    with _host_lock:
        if _host_checked:
            return
        import sys

        if os.environ.get("STREAMDIT_NO_COMFY") != "1" and "folder_paths" in sys.modules:
            _folder_paths = _try_import("folder_paths")
            _comfy_utils = _try_import("comfy.utils")
            _model_management = _try_import("comfy.model_management")
            _exec_utils = _try_import("comfy_execution.utils")
        _host_checked = True


def in_comfyui() -> bool:
    """True when running inside a ComfyUI process."""
    _load_host()
    return _folder_paths is not None


# --------------------------------------------------------------------------------------------------------------
# Folders

_base_dir: str | None = None


def set_base_dir(path: str | os.PathLike[str] | None) -> None:
    """Without ComfyUI: the folder under which ``models/``, ``output/``, ``temp/`` and ``input/`` live.
    ``None`` restores the default. Ignored inside ComfyUI."""
    global _base_dir
    _base_dir = None if path is None else os.fspath(path)


def _fallback_base() -> str:
    base = _base_dir or os.environ.get("STREAMDIT_NODES_DIR") or os.path.join(tempfile.gettempdir(), "streamdit-nodes")
    return os.path.abspath(base)


def _fallback_dir(name: str) -> str:
    path = os.path.join(_fallback_base(), name)
    os.makedirs(path, exist_ok=True)
    return path


def output_directory() -> str:
    """ComfyUI's output folder (files the user keeps: stream videos, saved states)."""
    _load_host()
    if _folder_paths is not None:
        return str(_folder_paths.get_output_directory())
    return _fallback_dir("output")


def temp_directory() -> str:
    """ComfyUI's temp folder (UI previews; emptied at server start)."""
    _load_host()
    if _folder_paths is not None:
        path = str(_folder_paths.get_temp_directory())
        os.makedirs(path, exist_ok=True)
        return path
    return _fallback_dir("temp")


def input_directory() -> str:
    """ComfyUI's input folder."""
    _load_host()
    if _folder_paths is not None:
        return str(_folder_paths.get_input_directory())
    return _fallback_dir("input")


def models_directory() -> str:
    """ComfyUI's ``models`` root folder."""
    _load_host()
    if _folder_paths is not None:
        return str(_folder_paths.models_dir)
    return _fallback_dir("models")


def default_model_dir() -> str:
    """``<models>/streamdit``: where StreamDiT checkpoints go."""
    return os.path.join(models_directory(), MODEL_FOLDER)


def register_model_folder() -> None:
    """Register ``models/streamdit`` with ComfyUI (keeping folders added by extra_model_paths.yaml) and pin the
    extension set to ``.safetensors`` (``add_model_folder_path`` alone would list every file type). Cheap and
    idempotent; a no-op without ComfyUI."""
    _load_host()
    fp = _folder_paths
    if fp is None:
        return
    path = default_model_dir()
    fp.add_model_folder_path(MODEL_FOLDER, path)
    paths, _ = fp.folder_names_and_paths[MODEL_FOLDER]
    fp.folder_names_and_paths[MODEL_FOLDER] = (paths, set(MODEL_EXTENSIONS))


def model_search_dirs() -> list[str]:
    """Every folder searched for StreamDiT checkpoints."""
    _load_host()
    if _folder_paths is not None:
        register_model_folder()
        return [str(p) for p in _folder_paths.get_folder_paths(MODEL_FOLDER)]
    return [default_model_dir()]


def list_model_files() -> list[str]:
    """Checkpoint names (relative paths, sorted) in the StreamDiT model folders."""
    _load_host()
    if _folder_paths is not None:
        register_model_folder()
        return [str(n) for n in _folder_paths.get_filename_list(MODEL_FOLDER)]
    names: set[str] = set()
    for root_dir in model_search_dirs():
        if not os.path.isdir(root_dir):
            continue
        for dirpath, _dirs, files in os.walk(root_dir, followlinks=True):
            for f in files:
                if os.path.splitext(f)[1].lower() in MODEL_EXTENSIONS:
                    rel = os.path.relpath(os.path.join(dirpath, f), root_dir)
                    names.add(rel.replace(os.sep, "/"))
    return sorted(names)


def model_file_path(name: str) -> str | None:
    """Absolute path of a checkpoint listed by :func:`list_model_files`, or ``None`` if it is not there."""
    _load_host()
    if _folder_paths is not None:
        register_model_folder()
        found = _folder_paths.get_full_path(MODEL_FOLDER, name)
        return None if found is None else str(found)
    for root_dir in model_search_dirs():
        candidate = os.path.abspath(os.path.join(root_dir, name))
        if os.path.commonpath([candidate, os.path.abspath(root_dir)]) == os.path.abspath(root_dir) and os.path.isfile(
            candidate
        ):
            return candidate
    return None


def _walk(root_dir: str, extensions: frozenset[str]) -> list[str]:
    names: list[str] = []
    if not os.path.isdir(root_dir):
        return names
    for dirpath, _dirs, files in os.walk(root_dir, followlinks=True):
        for f in files:
            if os.path.splitext(f)[1].lower() in extensions:
                names.append(os.path.relpath(os.path.join(dirpath, f), root_dir).replace(os.sep, "/"))
    return names


def _inside(root_dir: str, name: str) -> str | None:
    candidate = os.path.abspath(os.path.join(root_dir, name))
    root = os.path.abspath(root_dir)
    if os.path.commonpath([candidate, root]) == root and os.path.isfile(candidate):
        return candidate
    return None


def diffusion_model_dirs() -> list[str]:
    """ComfyUI's diffusion-model folders (``models/diffusion_models``, ``models/unet``, extra paths)."""
    _load_host()
    if _folder_paths is not None:
        return [str(p) for p in _folder_paths.get_folder_paths(DIFFUSION_FOLDER)]
    return [os.path.join(models_directory(), DIFFUSION_FOLDER)]


def list_diffusion_model_files() -> list[str]:
    """Safetensors files (relative paths, sorted) in ComfyUI's diffusion-model folders."""
    _load_host()
    if _folder_paths is not None:
        names = _folder_paths.get_filename_list(DIFFUSION_FOLDER)
        return sorted(str(n) for n in names if os.path.splitext(str(n))[1].lower() in DIFFUSION_EXTENSIONS)
    found: set[str] = set()
    for root_dir in diffusion_model_dirs():
        found.update(_walk(root_dir, DIFFUSION_EXTENSIONS))
    return sorted(found)


def diffusion_model_path(name: str) -> str | None:
    """Absolute path of a file listed by :func:`list_diffusion_model_files`, or ``None``."""
    _load_host()
    if _folder_paths is not None:
        found = _folder_paths.get_full_path(DIFFUSION_FOLDER, name)
        return None if found is None else str(found)
    for root_dir in diffusion_model_dirs():
        path = _inside(root_dir, name)
        if path is not None:
            return path
    return None


def wan_preview_factors() -> tuple[Any, Any] | None:
    """ComfyUI's latent → RGB preview factors for Wan 2.1 (``[16, 3]``, ``[3]`` tensors), or ``None``."""
    _load_host()
    if _folder_paths is None:
        return None
    formats = _try_import("comfy.latent_formats")
    fmt = getattr(formats, "Wan21", None)
    if fmt is None:
        return None
    import torch

    try:
        return torch.tensor(fmt.latent_rgb_factors), torch.tensor(fmt.latent_rgb_factors_bias)
    except Exception:  # an older/newer ComfyUI without these attributes: the core's rough default is used
        return None


def prepare_vae(vae: Any) -> None:
    """Let ComfyUI load a ``VAE``'s weights onto its device before we drive its modules directly (no-op
    without ComfyUI or for objects without a ``patcher``)."""
    _load_host()
    patcher = getattr(vae, "patcher", None)
    if _model_management is None or patcher is None:
        return
    _model_management.load_models_gpu([patcher])


# --------------------------------------------------------------------------------------------------------------
# Device


def torch_device() -> Any:
    """The compute device: ComfyUI's choice (``--cpu`` gives CPU), or CPU without ComfyUI."""
    _load_host()
    import torch

    if _model_management is not None:
        return _model_management.get_torch_device()
    forced = os.environ.get("STREAMDIT_DEVICE")
    return torch.device(forced) if forced else torch.device("cpu")


_patchers: OrderedDict[int, tuple[Any, Any]] = OrderedDict()
_MAX_PATCHERS = 2  # as many as the loader keeps loaded; older pipelines are released
_patchers_lock = threading.Lock()
_patcher_failed = False


def prepare_model(pipeline: Any) -> None:
    """Hand the pipeline's modules to ComfyUI's memory manager before a run (no-op without ComfyUI).

    The backbone and text encoder are wrapped once in a ``comfy.model_patcher.ModelPatcher`` (through a
    container module, so the core's classes are not touched) and ``load_models_gpu`` is called on every run:
    ComfyUI then loads them onto its device, frees room by offloading other models, and may offload these when
    another model needs the memory (``/free`` included). If the patcher cannot be built, the pipeline simply
    stays where it is (logged once).
    """
    global _patcher_failed
    _load_host()
    if _model_management is None or _patcher_failed:
        return
    import torch

    with _patchers_lock:
        found = _patchers.get(id(pipeline))
        if found is None or found[0] is not pipeline:
            try:
                model_patcher = importlib.import_module("comfy.model_patcher")
                modules = {"model": pipeline.model}
                if getattr(pipeline, "text_encoder", None) is not None:
                    modules["text_encoder"] = pipeline.text_encoder
                container = torch.nn.ModuleDict(modules)
                patcher = model_patcher.ModelPatcher(
                    container,
                    load_device=_model_management.get_torch_device(),
                    offload_device=_model_management.unet_offload_device(),
                )
            except Exception:
                _patcher_failed = True
                logger.warning("StreamDiT: could not register the model with ComfyUI's memory manager; it stays on "
                               "its device", exc_info=True)
                return
            found = _patchers[id(pipeline)] = (pipeline, patcher)
            while len(_patchers) > _MAX_PATCHERS:
                _patchers.popitem(last=False)
        _patchers.move_to_end(id(pipeline))
    _model_management.load_models_gpu([found[1]])


# --------------------------------------------------------------------------------------------------------------
# Execution context (which prompt is running)

_test_context: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "streamdit_test_context", default=None
)


@contextlib.contextmanager
def executing(prompt_id: str, node_id: str) -> Iterator[None]:
    """Without ComfyUI: mark the code inside as running for ``prompt_id``/``node_id`` (the test executor)."""
    token = _test_context.set((prompt_id, node_id))
    try:
        yield
    finally:
        _test_context.reset(token)


def current_prompt_id() -> str | None:
    """The id of the prompt being executed, or ``None`` outside an execution."""
    ctx = _test_context.get()
    if ctx is not None:
        return ctx[0]
    _load_host()
    if _exec_utils is not None:
        comfy_ctx = _exec_utils.get_executing_context()
        if comfy_ctx is not None:
            return str(comfy_ctx.prompt_id)
    return None


def current_node_id() -> str | None:
    """The id of the node being executed, or ``None``."""
    ctx = _test_context.get()
    if ctx is not None:
        return ctx[1]
    _load_host()
    if _exec_utils is not None:
        comfy_ctx = _exec_utils.get_executing_context()
        if comfy_ctx is not None:
            return str(comfy_ctx.node_id)
    return None


# --------------------------------------------------------------------------------------------------------------
# Interrupts

_interrupt_hook: Callable[[], bool] | None = None


def set_interrupt_hook(hook: Callable[[], bool] | None) -> None:
    """Without ComfyUI: ``hook()`` is called at every interrupt check; returning True interrupts."""
    global _interrupt_hook
    _interrupt_hook = hook


def check_interrupt() -> None:
    """Raise if the user pressed Cancel (ComfyUI) or the test hook says so. Call between model calls."""
    hook = _interrupt_hook
    if hook is not None and hook():
        raise StreamInterrupted("interrupted by the test hook")
    _load_host()
    if _model_management is not None:
        _model_management.throw_exception_if_processing_interrupted()


def is_interrupt(exc: BaseException) -> bool:
    """True for the exceptions that mean "the user interrupted" (ours and ComfyUI's)."""
    if isinstance(exc, StreamInterrupted):
        return True
    _load_host()
    if _model_management is not None:
        return isinstance(exc, _model_management.InterruptProcessingException)
    return False


# --------------------------------------------------------------------------------------------------------------
# Progress and previews

progress_log: deque[tuple[str | None, int, int, bool]] = deque(maxlen=1000)
"""Without ComfyUI: ``(node_id, value, total, has_preview)`` for every progress update, newest last."""


class Progress:
    """A progress bar for one node execution. Inside ComfyUI it drives ``comfy.utils.ProgressBar`` (whose hook
    also checks for interrupts and sends the preview image to the UI); outside it records to :data:`progress_log`."""

    def __init__(self, total: int, node_id: str | None = None) -> None:
        _load_host()
        self.total = max(int(total), 1)
        self.node_id = node_id
        self._bar: Any = None
        if _comfy_utils is not None:
            self._bar = _comfy_utils.ProgressBar(self.total, node_id=node_id)

    def update(self, value: int, preview: Any | None = None, max_size: int = 512, total: int | None = None) -> None:
        """Set the bar to ``value`` of ``total``; ``preview`` is an optional PIL image shown on the node."""
        if total is not None:
            self.total = max(int(total), 1)
        value = min(int(value), self.total)
        if self._bar is not None:
            self._bar.update_absolute(value, self.total, None if preview is None else ("JPEG", preview, max_size))
        else:
            progress_log.append((self.node_id, value, self.total, preview is not None))


def send_event(event: str, data: dict[str, Any]) -> None:
    """Send a JSON event on the websocket to the client that queued the prompt (no-op without ComfyUI)."""
    _load_host()
    if _folder_paths is None:
        return
    server = _try_import("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return
    try:
        instance.send_sync(event, data, getattr(instance, "client_id", None))
    except Exception:  # a UI event must never break a generation
        logger.debug("could not send %s", event, exc_info=True)


node_text_log: deque[tuple[str | None, str]] = deque(maxlen=1000)
"""Without ComfyUI: ``(node_id, text)`` for every :func:`node_text` call, newest last."""


def node_text(text: str, node_id: str | None = None) -> None:
    """Show a line of text under the executing node in the UI (ComfyUI's progress text)."""
    node_id = node_id if node_id is not None else current_node_id()
    _load_host()
    if _folder_paths is None:
        node_text_log.append((node_id, text))
        return
    if node_id is None:
        return
    server = _try_import("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or not hasattr(instance, "send_progress_text"):
        return
    try:
        instance.send_progress_text(text, node_id, getattr(instance, "client_id", None))
    except Exception:  # a UI nicety must never break a generation
        logger.debug("could not send node text", exc_info=True)


def add_routes(register: Callable[[Any], None]) -> None:
    """Call ``register(routes)`` with ComfyUI's aiohttp route table (no-op without a running server)."""
    _load_host()
    if _folder_paths is None:
        return
    server = _try_import("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return
    register(instance.routes)
