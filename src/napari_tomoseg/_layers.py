"""Layer keyword arguments shared by the reader, sample data and widgets, and the voxel
size of a layer.

Plain dictionaries (no napari import), so every layer napari-tomoseg makes carries the same
facts: scale in Angstrom, ``units``, the voxel size in ``metadata``, class names and colours.
The voxel size goes into a layer's metadata with :func:`voxel_metadata` and comes back out
with :func:`layer_voxel_size`, both a :class:`~napari_tomoseg.data.voxels.VoxelSize`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .data.voxels import UNIT, VoxelSize, voxel_metadata

__all__ = [
    "UNIT",
    "image_layer_kwargs",
    "labels_layer_kwargs",
    "layer_voxel_size",
    "voxel_metadata",
]


def layer_voxel_size(layer: Any) -> VoxelSize | None:
    """The voxel size (Z, Y, X, Angstrom) a layer carries: its ``metadata["voxel_size"]``
    (the last three values), else its ``scale`` (the last three; an image's (Y, X) as
    :meth:`VoxelSize.parse` reads it), ``None`` when that is napari's default of 1.0.

    ``layer`` is a napari layer or the attributes npe2 hands a writer (a dict with
    ``metadata`` and ``scale``).  A recorded value that is no voxel size raises
    :class:`~napari_tomoseg.errors.TomosegError`.
    """
    if isinstance(layer, Mapping):
        metadata, scale = layer.get("metadata"), layer.get("scale")
    else:
        metadata, scale = getattr(layer, "metadata", None), getattr(layer, "scale", None)
    recorded = (metadata or {}).get("voxel_size")
    if recorded is not None:
        if isinstance(recorded, np.ndarray):
            recorded = recorded.tolist()
        if isinstance(recorded, Sequence) and not isinstance(recorded, str):
            recorded = tuple(recorded)[-3:]
        return VoxelSize.parse(recorded)
    if scale is None:
        return None
    values = [float(s) for s in scale][-3:]
    if all(abs(s - 1.0) < 1e-9 for s in values):
        return None
    return VoxelSize.parse(values)


def image_layer_kwargs(
    name: str, scale: Sequence[float], metadata: Mapping[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """Keyword arguments for an Image layer on a tomogram's grid."""
    kwargs: dict[str, Any] = {
        "name": name,
        "scale": tuple(float(s) for s in scale),
        "units": UNIT,
        "metadata": dict(metadata or {}),
        "colormap": "gray",
    }
    kwargs.update(extra)
    return kwargs


def labels_layer_kwargs(
    name: str,
    scale: Sequence[float],
    class_names: Sequence[str] | Mapping[int, str],
    class_colors: Mapping[int, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Keyword arguments for a Labels layer with named, coloured classes on a tomogram's grid."""
    meta = dict(metadata or {})
    if isinstance(class_names, Mapping):
        meta["class_names"] = {int(k): str(v) for k, v in class_names.items()}
    else:
        meta["class_names"] = {i: str(n) for i, n in enumerate(class_names)}
    kwargs: dict[str, Any] = {
        "name": name,
        "scale": tuple(float(s) for s in scale),
        "units": UNIT,
        "metadata": meta,
        "opacity": 0.5,
    }
    if class_colors:
        colors: dict[int | None, str] = {int(k): v for k, v in class_colors.items()}
        colors.setdefault(0, "#00000000")
        colors[None] = "#ff00ffff"  # any label without a named colour
        kwargs["colormap"] = colors
    kwargs.update(extra)
    return kwargs
