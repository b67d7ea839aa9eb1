"""The package's named logger. Library code logs through children of ``StreamDiT``; never print."""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "StreamDiT"


def get_logger(name: str | None = None) -> logging.Logger:
    """Return ``StreamDiT`` or a child logger ``StreamDiT.<name>``. No handlers are configured here."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


def log_to_stderr(level: int = logging.INFO) -> None:
    """For command-line entry points: show the package's records on stderr (``HH:MM:SS name LEVEL: message``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger(LOGGER_NAME)
    root.addHandler(handler)
    root.setLevel(level)
