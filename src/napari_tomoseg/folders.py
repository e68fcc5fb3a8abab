"""The per-user folders (cache and settings) and the names of what the cache keeps.

The cache holds training checkpoints (``checkpoints/``) and autosaved annotations
(``autosave/``), one of each per tomogram; :func:`cache_name` names them after the tomogram.
The config folder holds the widgets' remembered settings.  Where they are is the platform's
convention, as ``platformdirs`` knows it (on Linux ``$XDG_CACHE_HOME`` / ``$XDG_CONFIG_HOME``,
by default ``~/.cache`` / ``~/.config``); an environment variable overrides each.  Core code
(no Qt, no napari), shared by the widgets and the command line.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

import platformdirs

APP_NAME = "napari-tomoseg"
#: TOMOSEG_CACHE_DIR overrides the cache folder (tests use that).
CACHE_ENV = "TOMOSEG_CACHE_DIR"
#: TOMOSEG_CONFIG_DIR overrides the folder of remembered widget settings (tests use that).
CONFIG_ENV = "TOMOSEG_CONFIG_DIR"


def cache_dir() -> Path:
    """The per-user folder for files that may be lost without harm (on Linux
    ``$XDG_CACHE_HOME/napari-tomoseg``, by default ``~/.cache/napari-tomoseg``)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def config_dir() -> Path:
    """The per-user folder for remembered widget settings (on Linux
    ``$XDG_CONFIG_HOME/napari-tomoseg``, by default ``~/.config/napari-tomoseg``)."""
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override)
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def cache_name(source: str, identity: str | None = None) -> str:
    """``<name>-<CRC-32>``: a file name for what the cache keeps of one tomogram, readable
    from the file name of ``source`` (a path or a layer name) and told apart from others
    by the CRC-32 of ``identity`` (``source`` itself by default)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).name or "tomogram")[:60]
    crc = zlib.crc32((source if identity is None else identity).encode("utf-8", "surrogateescape"))
    return f"{name}-{crc:08x}"
