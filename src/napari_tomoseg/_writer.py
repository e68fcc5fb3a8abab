"""npe2 writers: Labels -> MRC (uint8/uint16) and Image -> MRC (float32), voxel size kept.

napari asks before it replaces an existing file in its Save dialog, so these writers replace
the target (atomically: a failed write leaves the old file intact).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .data.io import write_labels, write_mrc
from .data.probability import PROBABILITY_DTYPE, PROBABILITY_LABEL


def voxel_size_from_layer(meta: dict[str, Any]) -> tuple[float, float, float] | None:
    """The voxel size (Z, Y, X) in Angstrom from layer metadata, else from its scale."""
    metadata = meta.get("metadata") or {}
    voxel_size = metadata.get("voxel_size")
    if voxel_size is not None:
        return tuple(float(v) for v in voxel_size)[-3:]  # type: ignore[return-value]
    scale = meta.get("scale")
    if scale is None or all(abs(float(s) - 1.0) < 1e-9 for s in scale):
        return None
    values = [float(s) for s in scale][-3:]
    if len(values) == 2:
        values = [values[0], *values]
    return (values[0], values[1], values[2])


def _origin(meta: dict[str, Any]) -> tuple[float, float, float] | None:
    origin = (meta.get("metadata") or {}).get("origin")
    return None if origin is None else tuple(float(v) for v in origin)  # type: ignore[return-value]


def write_labels_layer(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save a Labels layer as an integer MRC (uint8, or uint16 past label 127)."""
    labels = np.asarray(data)
    write_labels(path, labels, voxel_size_from_layer(meta), origin=_origin(meta), overwrite=True)
    return [path]


def write_image_layer(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save an Image layer as a float32 MRC; a probability map from the Apply widget as
    the CLI writes one (percent bytes with their header label, ``docs/formats.md``)."""
    stored = (meta.get("metadata") or {}).get("tomoseg_probability") and (
        np.dtype(getattr(data, "dtype", np.float32)) == PROBABILITY_DTYPE
    )
    write_mrc(
        path,
        data,
        voxel_size_from_layer(meta),
        origin=_origin(meta),
        overwrite=True,
        dtype=PROBABILITY_DTYPE if stored else np.float32,
        header_texts=[PROBABILITY_LABEL] if stored else (),
    )
    return [path]
