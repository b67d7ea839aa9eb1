"""StreamDiT for ComfyUI: real-time, endless streaming text-to-video.

ComfyUI imports this file (relative imports only: ComfyUI loads the pack under a module name derived from its
path). Importing is cheap: the model and the core library load when a node first runs.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, setup

setup()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
