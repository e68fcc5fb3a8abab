"""npe2 reader: MRC-family files and OME-Zarr tomograms open as Image layers at their true
voxel size (Angstrom); an OME-Zarr pyramid opens as a multiscale layer, read lazily."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._layers import image_layer_kwargs
from .data.io import is_tomogram_path, mrc_stem, read_tomogram, threshold_of
from .data.probability import PROBABILITY_LABEL, scale_of

LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Return the reader when every path is an MRC-family file or a ``.zarr``, else ``None``."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or not all(is_tomogram_path(p) for p in paths):
        return None
    return read_mrc_layers


def tomogram_layer_data(path: str | Path) -> LayerData:
    """Layer data for one file: memory-mapped or lazy array (every level of an OME-Zarr
    pyramid, finest first, as a multiscale layer), scale in Angstrom, header in metadata."""
    tomo = read_tomogram(path)
    name = mrc_stem(path)
    kwargs = image_layer_kwargs(name, tomo.scale, {**tomo.metadata(), **_probability_facts(tomo)})
    if len(tomo.levels) > 1:
        return (list(tomo.levels), {**kwargs, "multiscale": True}, "image")
    return (tomo.data, kwargs, "image")


def _probability_facts(tomo: Any) -> dict[str, Any]:
    """For a probability map ``tomoseg apply`` wrote (its header says so): the metadata the
    Merge and Suggest widgets read, the threshold its mask was cut at among them."""
    if PROBABILITY_LABEL not in tomo.extra.get("header_labels", ()):
        return {}
    facts = {"tomoseg_probability": True, "scale_max": scale_of(tomo.data.dtype)}
    threshold = threshold_of(tomo)
    return facts if threshold is None else {**facts, "threshold": threshold}


def read_mrc_layers(path: str | list[str]) -> list[LayerData]:
    """Read one or several tomogram files (errors name the file and the problem)."""
    paths = [path] if isinstance(path, str) else list(path)
    return [tomogram_layer_data(p) for p in paths]
