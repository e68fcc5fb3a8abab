"""The per-user folder of files that may be lost without harm, and their names.

The cache holds training checkpoints (``checkpoints/``) and autosaved annotations
(``autosave/``), one of each per tomogram; :func:`cache_name` names them after the tomogram.
Core code (no Qt, no napari), shared by the widgets and the command line.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

#: TOMOSEG_CACHE_DIR overrides the cache folder (tests use that).
CACHE_ENV = "TOMOSEG_CACHE_DIR"


def cache_dir() -> Path:
    """The per-user folder for files that may be lost without harm
    (``$XDG_CACHE_HOME/napari-tomoseg``, by default ``~/.cache/napari-tomoseg``)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "napari-tomoseg"


def cache_name(source: str, identity: str | None = None) -> str:
    """``<name>-<CRC-32>``: a file name for what the cache keeps of one tomogram, readable
    from the file name of ``source`` (a path or a layer name) and told apart from others
    by the CRC-32 of ``identity`` (``source`` itself by default)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).name or "tomogram")[:60]
    crc = zlib.crc32((source if identity is None else identity).encode("utf-8", "surrogateescape"))
    return f"{name}-{crc:08x}"
