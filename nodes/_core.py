"""Lazy access to ``streamdit_core``, imported relative to the pack.

ComfyUI imports the pack from ``<pack>/__init__.py`` under a module name derived from its path, so the core
library is reached as ``<that name>.streamdit_core``; when ``nodes`` is imported as a top-level package (a
script with the repository root on ``sys.path``) it is plain ``streamdit_core``. Importing lazily keeps
``import`` of the pack cheap and lets the nodes register even if a core dependency is missing (the error then
appears when a node runs, not as "IMPORT FAILED").
"""

from __future__ import annotations

import importlib
from types import ModuleType


def _root() -> str:
    pkg = __package__ or ""
    return pkg.rpartition(".")[0]


def core(module: str) -> ModuleType:
    """``streamdit_core.<module>``, imported from this pack's own copy."""
    root = _root()
    name = f"{root}.streamdit_core.{module}" if root else f"streamdit_core.{module}"
    return importlib.import_module(name)
