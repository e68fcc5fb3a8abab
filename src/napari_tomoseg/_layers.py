"""Layer keyword arguments shared by the reader, sample data and widgets.

Plain dictionaries (no napari import), so every layer napari-tomoseg makes carries the same
facts: scale in Angstrom, ``units``, the voxel size in ``metadata``, class names and colours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: The length unit of every layer scale (see docs/architecture.md).
UNIT = "angstrom"


def voxel_metadata(voxel_size: Sequence[float] | float | None) -> dict[str, Any]:
    """Metadata entries that record the voxel size (Z, Y, X) in Angstrom."""
    if voxel_size is not None and not isinstance(voxel_size, Sequence):
        voxel_size = (float(voxel_size),) * 3
    vs = None if voxel_size is None else tuple(float(v) for v in voxel_size)
    return {"voxel_size": vs, "voxel_size_unit": UNIT}


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
