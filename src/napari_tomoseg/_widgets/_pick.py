"""Render and extract: show a segmentation in 3D (one smooth surface per feature, specks
removed, framed; optionally with the tomogram as a slicing plane), pick particles into a
Points layer and export their coordinates (CSV or RELION .star, Angstrom)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    PushButton,
    SpinBox,
)

from .._layers import layer_voxel_size, voxel_metadata
from ..applying.picking import (
    PickSettings,
    feature_mask,
    pick,
    surface_mesh,
    write_csv,
    write_star,
)
from ..applying.render import RenderSettings, render_scene
from ..errors import TomosegError
from ..progress import Progress
from ._common import (
    TaskRunner,
    describe_error,
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

#: Metadata of the segmentation that its Points layer keeps (besides its voxel size).
_KEPT_METADATA = ("source_path", "copick")
#: The camera's angles in the 3D view: from above and to the side, so depth shows.
VIEW_ANGLES = (-20.0, 30.0, 60.0)


class PickWidget(Container):
    """3D view, surface mesh, particle picking and coordinate export."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.segmentation = ComboBox(label="segmentation", choices=layer_choices(viewer, "labels"))
        self.speck_size = SpinBox(
            label="specks under (voxels)",
            value=RenderSettings.min_size,
            min=1,
            max=10_000_000,
            tooltip="Pieces of a feature smaller than this are not shown in 3D.",
        )
        self.smoothing = FloatSpinBox(
            label="smoothing (voxels)",
            value=RenderSettings.sigma,
            min=0.0,
            max=5.0,
            step=0.25,
            tooltip="Gaussian smoothing of each feature before its surface is drawn.",
        )
        self.plane = CheckBox(label="tomogram as a slicing plane", value=True)
        self.tomogram = ComboBox(
            label="tomogram", choices=layer_choices(viewer, "image"), nullable=True
        )
        self.show_3d = PushButton(text="Show in 3D")
        self.feature = SpinBox(label="feature label", value=1, min=1, max=65535)
        self.mesh_button = PushButton(text="Add surface mesh of this feature")
        self.min_size = SpinBox(
            label="min size (voxels)", value=PickSettings.min_size, min=1, max=10_000_000
        )
        self.method = ComboBox(
            label="method", choices=["centroid", "peak"], value=PickSettings.method
        )
        self.min_distance = SpinBox(
            label="min distance (px)", value=PickSettings.min_distance, min=1, max=1000
        )
        self.pick_button = PushButton(text="Pick particles")
        self.export_path = FileEdit(label="export to", mode="w", filter="*.star *.csv")
        self.export_button = PushButton(text="Export coordinates")
        self.status = Label(value="")
        self.extend(
            [
                self.segmentation,
                self.speck_size,
                self.smoothing,
                self.plane,
                self.tomogram,
                self.show_3d,
                self.feature,
                self.mesh_button,
                self.min_size,
                self.method,
                self.min_distance,
                self.pick_button,
                self.export_path,
                self.export_button,
                self.status,
            ]
        )
        self.result: Any = None
        self.renderer = TaskRunner("3D view")
        self.surfaces: list[Any] = []
        self.scene: Any = None
        self.show_3d.changed.connect(self.render_3d)
        self.mesh_button.changed.connect(self.add_mesh)
        self.pick_button.changed.connect(self.pick)
        self.export_button.changed.connect(lambda: self.export(self.export_path.value))
        follow_layers(viewer, self.segmentation, self.tomogram)

    def _layer(self) -> Any:
        layer = self.segmentation.value
        if layer is None:
            raise TomosegError("Choose a segmentation (a Labels layer) first.")
        return layer

    def render_3d(self, *_: Any) -> Any:
        """Show the segmentation in 3D: one smooth surface per feature in its colour,
        specks removed (computed in a worker), the view framed on what is left."""
        try:
            layer = self._layer()
            settings = RenderSettings(
                min_size=int(self.speck_size.value), sigma=float(self.smoothing.value)
            )
            settings.check()
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        labels = np.asarray(layer.data)

        def task(_stop: Any) -> Any:
            yield Progress("render", 0, 1, message="smoothing the features' surfaces")
            return render_scene(labels, settings=settings)

        self.status.value = "computing the surfaces..."
        return self.renderer.start(task, on_done=lambda scene: self.show_scene(layer, scene))

    def show_scene(self, layer: Any, scene: Any) -> list[Any]:
        """Replace the 3D surfaces by those of ``scene``, hide what would hide them, and
        frame them (camera centred on the kept features, zoomed to fit)."""
        self.scene = scene
        for old in self.surfaces:
            if old in self.viewer.layers:
                self.viewer.layers.remove(old)
        if not scene.surfaces:
            self.status.value = "nothing to show: every piece is smaller than the speck size"
            notify_error(f"Nothing of '{layer.name}' is left to show in 3D; lower the speck size.")
            self.surfaces = []
            return []
        for other in self.viewer.layers:
            if other._type_string in ("image", "shapes", "labels", "surface"):
                other.visible = False
        names = layer.metadata.get("class_names") or {}
        self.surfaces = [
            self.viewer.add_surface(
                (surface.vertices, surface.faces),
                name=f"{names.get(surface.value, f'feature {surface.value}')} 3D",
                vertex_colors=np.tile(
                    np.asarray(layer.get_color(surface.value)), (len(surface.vertices), 1)
                ),
                shading="smooth",
                metadata={"tomoseg_render": layer.name, "feature": surface.value},
                **grid_kwargs(layer),
            )
            for surface in scene.surfaces
        ]
        self._show_plane(layer)
        self.viewer.dims.ndisplay = 3
        camera = getattr(self.viewer, "scene", self.viewer).camera  # napari 0.9: scene
        if hasattr(self.viewer, "fit_to_view"):  # newer napari
            camera.angles = VIEW_ANGLES
            self.viewer.fit_to_view(layers=self.surfaces)
        else:
            self.viewer.reset_view()
            camera.angles = VIEW_ANGLES
        camera.center = tuple(layer.data_to_world(scene.centre))
        specks = sum(s.specks for s in scene.surfaces)
        self.status.value = (
            f"3D view: {len(scene.surfaces)} feature(s), {specks} specks under "
            f"{int(self.speck_size.value)} voxels left out"
        )
        return self.surfaces

    def _show_plane(self, layer: Any) -> None:
        """The chosen tomogram as one slice (the current Z) in the 3D view."""
        tomo = self.tomogram.value
        if not self.plane.value or tomo is None or tomo.data.shape != layer.data.shape:
            return
        z = float(tomo.world_to_data(self.viewer.dims.point)[0])
        tomo.depiction = "plane"
        tomo.plane.normal = (1.0, 0.0, 0.0)
        tomo.plane.position = (z, tomo.data.shape[1] / 2, tomo.data.shape[2] / 2)
        tomo.visible = True

    def add_mesh(self, *_: Any) -> Any:
        """A Surface layer of one feature's boundary, on the segmentation's grid."""
        try:
            layer = self._layer()
            value = int(self.feature.value)
            mask = feature_mask(layer_volume(layer), value)
            if not mask.any():
                raise TomosegError(f"Label {value} does not occur in '{layer.name}'.")
            vertices, faces = surface_mesh(mask)
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        names = layer.metadata.get("class_names") or {}
        name = names.get(value, f"feature {value}")
        return self.viewer.add_surface(
            (vertices, faces), name=f"{name} surface", colormap="cyan", **grid_kwargs(layer)
        )

    def pick(self, *_: Any) -> Any:
        """Pick particles of the chosen feature into a Points layer."""
        try:
            layer = self._layer()
            settings = PickSettings(
                min_size=int(self.min_size.value),
                method=str(self.method.value),
                min_distance=int(self.min_distance.value),
                classes=[int(self.feature.value)],
            )
            names = layer.metadata.get("class_names") or {}
            top = max([int(k) for k in names] + [int(self.feature.value)])
            class_names = [names.get(i, names.get(str(i), f"feature {i}")) for i in range(top + 1)]
            self.result = pick(
                layer_volume(layer),
                voxel_size=layer_voxel_size(layer),
                class_names=class_names,
                settings=settings,
            )
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        particles = list(self.result.particles)
        coords = np.array([[p.z, p.y, p.x] for p in particles], dtype=float).reshape(-1, 3)
        name = f"{layer.name} particles"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        points = self.viewer.add_points(
            coords,
            name=name,
            size=8,
            face_color="yellow",
            border_color="black",
            features={
                "class": [p.class_name for p in particles],
                "label": [p.label for p in particles],
                "size": [p.size for p in particles],
                "component": [p.component for p in particles],
                "score": [p.score for p in particles],
            },
            metadata={  # what the points belong to, for exports
                **{k: v for k, v in (layer.metadata or {}).items() if k in _KEPT_METADATA},
                **voxel_metadata(self.result.voxel_size),  # the segmentation's
            },
            **grid_kwargs(layer),
        )
        self.status.value = f"{len(particles)} particles"
        return points

    def export(self, path: Any) -> Path | None:
        """Write the picked coordinates to .star (RELION) or .csv, in Angstrom."""
        if self.result is None:
            notify_error("Pick particles first.")
            return None
        if not is_chosen(path):
            notify_error("Choose a file name ending in .star or .csv.")
            return None
        path = Path(path)
        try:  # the result carries the voxel size and shape it was picked at
            writer = write_csv if path.suffix.lower() == ".csv" else write_star
            out = writer(path, self.result)
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        notify_info(f"Wrote {len(self.result.particles)} coordinates to {out}.")
        return out
