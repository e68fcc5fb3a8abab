"""copick project: open a run's tomogram or segmentation as layers, and write a Labels
layer (with its surface meshes) or picked Points into the project.  The work is done by
:mod:`napari_tomoseg.applying.copick_io` (needs ``pip install napari-tomoseg[copick]``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, LineEdit, PushButton

from .._layers import image_layer_kwargs, labels_layer_kwargs, layer_voxel_size, voxel_metadata
from ..applying import copick_io
from ..data.io import mrc_stem
from ..errors import TomosegError
from ._common import (
    RememberedSettings,
    describe_error,
    follow_layers,
    is_chosen,
    layer_choices,
    notify_error,
    notify_info,
)

if TYPE_CHECKING:
    import napari


def run_of(layer: Any) -> str:
    """The copick run a layer belongs to: the one it was read from, else its file's name,
    else the layer's name."""
    meta = layer.metadata or {}
    if "copick" in meta:
        return str(meta["copick"]["run"])
    source = meta.get("source_path")
    return mrc_stem(source) if source else str(layer.name)


class CopickWidget(Container):
    """Exchange layers with a copick project (config JSON) run by run."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.config = FileEdit(label="copick config", mode="w", filter="*.json")
        self.run = LineEdit(label="run", tooltip="empty: the layer's tomogram name")
        self.user = LineEdit(label="user", value=copick_io.DEFAULT_USER)
        self.session = LineEdit(label="session", value=copick_io.DEFAULT_SESSION)
        self.tomo_type = LineEdit(label="tomogram type", tooltip="empty: the run's only one")
        self.open_tomogram = PushButton(text="Open tomogram")
        self.seg_name = LineEdit(label="segmentation", tooltip="empty: the run's only one")
        self.open_segmentation = PushButton(text="Open segmentation")
        self.labels = ComboBox(label="labels layer", choices=layer_choices(viewer, "labels"))
        self.meshes = CheckBox(text="with surface meshes", value=True)
        self.export_labels = PushButton(text="Write segmentation to copick")
        self.points = ComboBox(label="picks layer", choices=layer_choices(viewer, "points"))
        self.export_points = PushButton(text="Write picks to copick")
        self.overwrite = CheckBox(text="replace existing data", value=False)
        self.status = Label(value="")
        self.extend(
            [
                self.config,
                self.run,
                self.user,
                self.session,
                self.tomo_type,
                self.open_tomogram,
                self.seg_name,
                self.open_segmentation,
                self.labels,
                self.meshes,
                self.export_labels,
                self.points,
                self.export_points,
                self.overwrite,
                self.status,
            ]
        )
        self.remembered = RememberedSettings(
            "copick", {"config": self.config, "user": self.user, "session": self.session}
        )
        self.open_tomogram.changed.connect(self.read_tomogram)
        self.open_segmentation.changed.connect(self.read_segmentation)
        self.export_labels.changed.connect(self.write_segmentation)
        self.export_points.changed.connect(self.write_picks)
        follow_layers(viewer, self.labels, self.points)

    def _config(self) -> Path:
        path = self.config.value
        if not is_chosen(path):
            raise TomosegError("Choose the copick project's config file (a .json).")
        return Path(path)

    def _run(self, layer: Any = None) -> str:
        text = str(self.run.value).strip()
        if text:
            return text
        if layer is None:
            raise TomosegError("Type the name of the run to open.")
        return run_of(layer)

    def _who(self) -> dict[str, Any]:
        return {
            "user": str(self.user.value),
            "session": str(self.session.value),
            "overwrite": bool(self.overwrite.value),
        }

    def read_tomogram(self, *_: Any) -> Any:
        """Open the run's tomogram as an Image layer at its voxel size."""
        try:
            run = self._run()
            tomo = copick_io.read_copick_tomogram(
                self._config(), run, tomo_type=str(self.tomo_type.value).strip() or None
            )
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        meta = {**voxel_metadata(tomo.voxel_size), **tomo.extra}
        kwargs = image_layer_kwargs(f"{run} ({tomo.extra['copick']['tomo_type']})", tomo.scale)
        kwargs["metadata"] = meta
        self.status.value = f"{run}: {tomo.data.shape} at {tomo.voxel_size.describe()}"
        return self.viewer.add_image(tomo.data, **kwargs)

    def read_segmentation(self, *_: Any) -> Any:
        """Open a segmentation of the run as a Labels layer with its object names."""
        try:
            run = self._run()
            labels, names = copick_io.read_copick_segmentation(
                self._config(), run, str(self.seg_name.value).strip() or None
            )
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        meta = {**voxel_metadata(labels.voxel_size), **labels.extra}
        name = labels.extra["copick"]["segmentation"]
        kwargs = labels_layer_kwargs(f"{run} {name}", labels.scale, {0: "background", **names})
        kwargs["metadata"].update(meta)
        self.status.value = f"{run}: segmentation {name}"
        return self.viewer.add_labels(np.asarray(labels.data), **kwargs)

    def write_segmentation(self, *_: Any) -> str | None:
        """Write the chosen Labels layer (and its meshes) into the project."""
        layer = self.labels.value
        try:
            if layer is None:
                raise TomosegError("Choose a Labels layer (a mask) to write.")
            config, run, mask = self._config(), self._run(layer), np.asarray(layer.data)
            names = (layer.metadata or {}).get("class_names")
            vs = layer_voxel_size(layer)
            name = copick_io.export_segmentation(
                config, run, mask, vs, names, multilabel_name=layer.name, **self._who()
            )
            if self.meshes.value:
                copick_io.export_meshes(config, run, mask, vs, names, **self._who())
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        notify_info(f"Wrote segmentation {name} to run {run} of {config}.")
        return name

    def write_picks(self, *_: Any) -> dict[str, int] | None:
        """Write the chosen Points layer (from Render and pick) into the project."""
        layer = self.points.value
        try:
            if layer is None:
                raise TomosegError("Choose a Points layer of picked particles.")
            particles = copick_io.particles_from_points(
                layer.data, {k: list(v) for k, v in layer.features.items()}
            )
            counts = copick_io.export_picks(
                self._config(), self._run(layer), particles, layer_voxel_size(layer), **self._who()
            )
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        listed = ", ".join(f"{n} ({c})" for n, c in counts.items())
        notify_info(f"Wrote picks {listed} to run {self._run(layer)}.")
        return counts
