"""StreamDiT for ComfyUI: real-time, endless streaming text-to-video.

ComfyUI imports this file (relative imports only: ComfyUI loads the pack under a module name derived from its
path). Importing is cheap: the model and the core library load when a node first runs.

When this file is imported without a parent package (pytest collecting a checkout whose folder name is not a
valid module name, e.g. ``comfyui-streamdit``), it registers nothing instead of failing.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, setup

    setup()
else:  # pragma: no cover - only under test collectors
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
