"""npe2 reader: MRC-family files open as Image layers at their true voxel size (Angstrom)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._layers import image_layer_kwargs
from .io import is_mrc_path, mrc_stem, read_tomogram

LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Return the reader when every path is an MRC-family file, else ``None``."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or not all(is_mrc_path(p) for p in paths):
        return None
    return read_mrc_layers


def tomogram_layer_data(path: str | Path) -> LayerData:
    """Layer data for one file: memory-mapped array, scale in Angstrom, header in metadata."""
    tomo = read_tomogram(path)
    name = mrc_stem(path)
    return (tomo.data, image_layer_kwargs(name, tomo.scale, tomo.metadata()), "image")


def read_mrc_layers(path: str | list[str]) -> list[LayerData]:
    """Read one or several MRC files (errors name the file and the problem)."""
    paths = [path] if isinstance(path, str) else list(path)
    return [tomogram_layer_data(p) for p in paths]
