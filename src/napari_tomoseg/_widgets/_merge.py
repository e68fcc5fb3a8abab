"""Merge: several probability layers -> one multi-level Labels layer (EMAN2 competition rule).

Each voxel takes the feature whose weighted probability is highest among those above their
own threshold; a voxel no map claims stays 0.  Feature names and distinct colours go into the
Labels layer, which can be saved as MRC.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, PushButton

from .._layers import labels_layer_kwargs, layer_voxel_size, voxel_metadata
from ..applying.merge import MergeInput, merge_probability_maps
from ..data.io import write_labels
from ..data.probability import scale_of
from ..errors import TomosegError
from ._common import (
    describe_error,
    fit_narrow,
    follow_layers,
    grid_kwargs,
    is_chosen,
    layer_choices,
    layer_volume,
    notify_error,
    notify_info,
)

if TYPE_CHECKING:
    import napari

MERGED_LAYER = "merged features"


def probability_of(layer: Any) -> Any:
    """A probability layer's data as the merge reads it, not read into memory: stored maps
    (bytes, see ``probability``) as they are; a layer whose ``scale_max`` metadata says
    otherwise, lazily divided to [0, 1]."""
    data = layer_volume(layer)
    scale_max = float((layer.metadata or {}).get("scale_max", scale_of(data.dtype)))
    if scale_max == scale_of(data.dtype):
        return data
    import dask.array as da

    return da.asarray(data).astype(np.float32) / np.float32(scale_max)


class MergeRow(Container):
    """One probability map with its threshold and weight (one field a line, so a row
    fits a narrow dock)."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.layer = ComboBox(label="map", choices=layer_choices(viewer, "image"))
        self.threshold = FloatSpinBox(label="threshold", value=0.5, min=0.0, max=1.0, step=0.05)
        self.weight = FloatSpinBox(label="weight", value=1.0, min=0.0, max=100.0, step=0.1)
        self.margins = (0, 4, 0, 4)
        self.extend([self.layer, self.threshold, self.weight])
        fit_narrow(self.native)  # rows come and go: each fits the dock on its own


class MergeWidget(Container):
    """Pick probability layers, set each threshold/weight, merge into one Labels layer."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=False)
        self.viewer = viewer
        self.help = Label(value="Each probability map with its threshold and weight:")
        self.rows = Container(labels=False)
        self.rows.margins = (0, 0, 0, 0)
        self.add_button = PushButton(text="Add probability map")
        self.merge_button = PushButton(text="Merge")
        self.save_path = FileEdit(label="save as", mode="w", filter="*.mrc")
        self.save_button = PushButton(text="Save merged mask as MRC")
        self.status = Label(value="")
        self.extend(
            [
                self.help,
                self.rows,
                self.add_button,
                self.merge_button,
                self.save_path,
                self.save_button,
                self.status,
            ]
        )
        self.add_button.changed.connect(lambda: self.add_row())
        self.merge_button.changed.connect(self.merge)
        self.save_button.changed.connect(lambda: self.save(self.save_path.value))
        follow_layers(viewer, self)
        viewer.layers.events.inserted.connect(lambda event: self.add_map(event.value))
        for layer in viewer.layers:
            self.add_map(layer)

    def add_map(self, layer: Any) -> MergeRow | None:
        """A row for a probability map the Apply widget made, with the threshold of its
        mask, unless one shows it already (so the maps applied after this widget opened
        are listed too)."""
        if not (layer.metadata or {}).get("tomoseg_probability"):
            return None
        if any(getattr(row.layer.value, "name", None) == layer.name for row in self.rows):
            return None
        # the threshold its mask was cut at (the network's own, unless the user chose one)
        threshold = float(layer.metadata.get("threshold") or 0.5)
        return self.add_row(layer, threshold=threshold)

    def add_row(self, layer: Any = None, threshold: float = 0.5, weight: float = 1.0) -> MergeRow:
        row = MergeRow(self.viewer)
        row.reset_choices()
        if layer is not None:
            row.layer.value = layer
        row.threshold.value = threshold
        row.weight.value = weight
        self.rows.append(row)
        return row

    def merge(self, *_: Any) -> Any:
        try:
            rows = [r for r in self.rows if r.layer.value is not None]
            if len(rows) < 1:
                raise TomosegError("Add at least one probability map (apply a network first).")
            inputs = [
                MergeInput(
                    probabilities=probability_of(r.layer.value),
                    name=str((r.layer.value.metadata or {}).get("feature", r.layer.value.name)),
                    threshold=float(r.threshold.value),
                    weight=float(r.weight.value),
                )
                for r in rows
            ]
            result = merge_probability_maps(inputs)
            first = rows[0].layer.value
            meta = {**voxel_metadata(layer_voxel_size(first)), **result.layer_metadata()}
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        kwargs = labels_layer_kwargs(MERGED_LAYER, first.scale, result.names, result.colors, meta)
        kwargs.update(grid_kwargs(first))
        if MERGED_LAYER in self.viewer.layers:
            self.viewer.layers.remove(MERGED_LAYER)
        layer = self.viewer.add_labels(result.mask, **kwargs)
        self.status.value = ", ".join(
            f"{name}: {result.voxels.get(v, 0)} voxels"
            for v, name in enumerate(result.names)
            if v > 0
        )
        return layer

    def save(self, path: Any) -> Path | None:
        """Save the merged mask as an MRC (uint8/uint16) with the voxel size."""
        if MERGED_LAYER not in self.viewer.layers:
            notify_error("Merge first, then save.")
            return None
        if not is_chosen(path):
            notify_error("Choose a file name for the merged mask (e.g. merged.mrc).")
            return None
        layer = self.viewer.layers[MERGED_LAYER]
        try:
            out = write_labels(path, np.asarray(layer.data), layer_voxel_size(layer))
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        notify_info(f"Saved the merged mask to {out}.")
        return out
