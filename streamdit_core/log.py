"""The package's named logger. Library code logs through children of ``StreamDiT``; never print."""

from __future__ import annotations

import logging

LOGGER_NAME = "StreamDiT"


def get_logger(name: str | None = None) -> logging.Logger:
    """Return ``StreamDiT`` or a child logger ``StreamDiT.<name>``. No handlers are configured here."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")
