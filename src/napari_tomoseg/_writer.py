"""npe2 writers: Labels -> MRC (uint8/uint16) and Image -> MRC (float32), voxel size kept.

napari asks before it replaces an existing file in its Save dialog, so these writers replace
the target (atomically: a failed write leaves the old file intact).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._layers import layer_voxel_size
from .data.io import threshold_label, write_labels, write_mrc
from .data.probability import PROBABILITY_DTYPE, PROBABILITY_LABEL


def _origin(meta: dict[str, Any]) -> tuple[float, float, float] | None:
    origin = (meta.get("metadata") or {}).get("origin")
    return None if origin is None else tuple(float(v) for v in origin)  # type: ignore[return-value]


def _threshold(meta: dict[str, Any]) -> float | None:
    value = (meta.get("metadata") or {}).get("threshold")
    return None if value is None else float(value)


def write_labels_layer(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save a Labels layer as an integer MRC (uint8, or uint16 past label 127)."""
    labels = np.asarray(data)
    write_labels(path, labels, layer_voxel_size(meta), origin=_origin(meta), overwrite=True)
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
        layer_voxel_size(meta),
        origin=_origin(meta),
        overwrite=True,
        dtype=PROBABILITY_DTYPE if stored else np.float32,
        header_texts=[PROBABILITY_LABEL, *threshold_label(_threshold(meta))] if stored else (),
    )
    return [path]
