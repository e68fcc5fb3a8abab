"""Boxes and painting: place positive/negative boxes with a click, paint the feature.

Boxes live in two Shapes layers ("positive boxes", green; "negative boxes", red) and the
painting in a Labels layer, all on the tomogram's exact voxel grid (same scale and
translate), so data coordinates are voxel indices.  Rectangles of any drawn size snap to the
box size around their centre.

The widget follows whether the painting, the boxes and the feature names changed since
they were last saved or loaded (the counts line says "unsaved changes"); before Load
replaces them, or closing the viewer or deleting their layers throws them away, it asks to
save, discard or cancel (:class:`~._common.AnnotationChanges`, shared with the Train
widget's "Copy prediction").  Meanwhile they are autosaved to the cache folder every few
minutes (:class:`~._autosave.Autosaver`); when a tomogram with an autosave from a crashed
session is chosen, the widget offers to restore it, saying when it was saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
)

from .._layers import layer_voxel_size, voxel_metadata
from ..data.annotations import Annotations, load_annotations, save_annotations
from ..data.autosave import AutosaveInfo, discard_autosave, find_autosave, read_autosave
from ..data.boxes import DEFAULT_BOX_SIZE, Box, box_from_shape, crop
from ..errors import TomosegError
from . import _common
from ._autosave import Autosaver, guard_viewer
from ._common import (
    RememberedSettings,
    describe_error,
    follow,
    follow_layers,
    grid_kwargs,
    is_chosen,
    layer_choices,
    layer_volume,
    notify_error,
    notify_info,
    session,
    source_of,
)
from ._gallery import Gallery
from ._suggest import SuggestionPanel

if TYPE_CHECKING:
    import napari

POSITIVE_LAYER = "positive boxes"
NEGATIVE_LAYER = "negative boxes"
PAINT_LAYER = "painting"
POSITIVE_COLOR = "#33dd55"
NEGATIVE_COLOR = "#ee3333"
CLICK_MODES = ("off", "positive box", "negative box")
#: What the counts line shows while the annotations have changes that are not saved.
UNSAVED_MARK = "unsaved changes"


def place_box(centre_zyx: np.ndarray, size: int, volume_shape: tuple[int, ...]) -> Box:
    """A box of ``size`` centred as near ``centre_zyx`` (voxels) as the volume allows."""
    nz, ny, nx = volume_shape[-3:]
    if size > ny or size > nx:
        raise TomosegError(
            f"A {size}-pixel box does not fit in this {ny} x {nx} tomogram; choose a smaller "
            "box size or a less binned tomogram."
        )
    z = int(np.clip(round(float(centre_zyx[0])), 0, nz - 1))
    half = size // 2
    y = int(np.clip(round(float(centre_zyx[1])), half, ny - size + half))
    x = int(np.clip(round(float(centre_zyx[2])), half, nx - size + half))
    return Box(z, y, x, size)


class BoxWidget(Container):
    """Place boxes, paint features, and check every boxed crop in a gallery."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.tomogram = ComboBox(label="tomogram", choices=layer_choices(viewer, "image"))
        self.box_size = SpinBox(
            label="box size (px)", value=DEFAULT_BOX_SIZE, min=8, max=1024, step=2
        )
        self.click_mode = ComboBox(
            label="click adds",
            choices=list(CLICK_MODES),
            value="off",
            tooltip="With this on, a left click in the viewer adds a "
            "box centred on the cursor on the current slice.",
        )
        self.add_positive = PushButton(text="Add positive box at cursor")
        self.add_negative = PushButton(text="Add negative box at cursor")
        self.feature_value = SpinBox(label="feature label", value=1, min=1, max=255)
        self.feature_name = LineEdit(label="feature name", value="feature")
        self.name_button = PushButton(text="Name this feature and paint it")
        self.counts = Label(value="")
        self.refresh_gallery = PushButton(text="Refresh gallery")
        self.folder = FileEdit(
            label="annotations folder",
            mode="d",
            tooltip="Where Save/Load keep the painting and the boxes.",
        )
        self.save_button = PushButton(text="Save annotations")
        self.load_button = PushButton(text="Load annotations")
        self.recovery = Label(value="", visible=False)
        self.restore_button = PushButton(text="Restore autosaved annotations", visible=False)
        self.discard_button = PushButton(text="Discard the autosave", visible=False)
        self.offered: AutosaveInfo | None = None
        self.extend(
            [
                self.recovery,
                self.restore_button,
                self.discard_button,
                self.tomogram,
                self.box_size,
                self.click_mode,
                self.add_positive,
                self.add_negative,
                self.feature_value,
                self.feature_name,
                self.name_button,
                self.counts,
                self.folder,
                self.save_button,
                self.load_button,
                self.refresh_gallery,
            ]
        )
        self.suggestions = SuggestionPanel(self)  # full width: no label column of its own
        self.native.layout().addWidget(self.suggestions.native)
        self.gallery = Gallery()
        self.native.layout().addWidget(self.gallery)
        self.remembered = RememberedSettings(
            "boxes",
            {
                "box_size": self.box_size,
                "feature_name": self.feature_name,
                "folder": self.folder,
            },
        )
        self._snapping = False
        self.changes = session().annotations(viewer)
        self.changes.saver = self.save_before_replacing
        follow(self.changes.unsaved_changed, self, self.update_counts)
        for name in (POSITIVE_LAYER, NEGATIVE_LAYER, PAINT_LAYER):
            self.changes.watch(self._layer(name))
        self.autosaver = Autosaver(self.changes, self.gather_annotations, self.native)
        guard_viewer(viewer, self.changes, self.native)
        self.restore_button.changed.connect(self.restore_autosave)
        self.discard_button.changed.connect(self.discard_offered_autosave)
        self.tomogram.changed.connect(self.update_recovery)
        viewer.layers.events.inserted.connect(self._watch_inserted)
        self.add_positive.changed.connect(lambda: self.add_box_at_cursor(True))
        self.add_negative.changed.connect(lambda: self.add_box_at_cursor(False))
        self.name_button.changed.connect(self.name_feature)
        self.refresh_gallery.changed.connect(self.update_gallery)
        self.save_button.changed.connect(lambda: self.save_annotations(self.folder.value))
        self.load_button.changed.connect(lambda: self.load_annotations(self.folder.value))
        self.box_size.changed.connect(self.snap_all)
        follow_layers(viewer, self.tomogram)
        viewer.mouse_drag_callbacks.append(self._on_click)
        self.update_counts()
        self.update_recovery()

    # -- layers ---------------------------------------------------------------------------
    def _tomogram_layer(self) -> Any:
        layer = self.tomogram.value
        if layer is None:
            raise TomosegError("Open a tomogram first: the boxes are placed on its slices.")
        ndim = layer_volume(layer).ndim
        if ndim != 3:
            raise TomosegError(f"'{layer.name}' is {ndim}D; boxes need a 3D tomogram.")
        return layer

    def _layer(self, name: str) -> Any:
        return self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401

    def _watch_inserted(self, event: Any) -> None:
        layer = event.value
        if layer.name in (POSITIVE_LAYER, NEGATIVE_LAYER, PAINT_LAYER):
            self.changes.watch(layer)

    def box_layer(self, positive: bool) -> Any:
        """The positive or negative Shapes layer, made on the tomogram's grid if missing."""
        name = POSITIVE_LAYER if positive else NEGATIVE_LAYER
        layer = self._layer(name)
        if layer is not None:
            return layer
        tomo = self._tomogram_layer()
        color = POSITIVE_COLOR if positive else NEGATIVE_COLOR
        layer = self.viewer.add_shapes(
            ndim=3,
            name=name,
            edge_color=color,
            face_color="transparent",
            edge_width=2,
            **grid_kwargs(tomo),
        )
        layer.current_edge_color = color
        layer.metadata["tomoseg_boxes"] = "positive" if positive else "negative"
        layer.metadata["box_size"] = int(self.box_size.value)
        layer.events.data.connect(lambda event: self._on_shapes_changed(layer, event))
        self.changes.watch(layer)
        self.viewer.layers.selection.active = tomo
        return layer

    def paint_layer(self) -> Any:
        """The painting Labels layer, aligned with the tomogram (same scale and translate)."""
        layer = self._layer(PAINT_LAYER)
        if layer is not None:
            return layer
        tomo = self._tomogram_layer()
        layer = self.viewer.add_labels(
            np.zeros(layer_volume(tomo).shape, dtype=np.uint8),
            name=PAINT_LAYER,
            opacity=0.6,
            metadata={"class_names": {0: "background"}, **voxel_metadata(layer_voxel_size(tomo))},
            **grid_kwargs(tomo),
        )
        layer.brush_size = 6
        layer.n_edit_dimensions = 2  # paint on the current slice only
        self.changes.watch(layer)
        return layer

    # -- boxes ----------------------------------------------------------------------------
    def boxes(self, positive: bool) -> list[Box]:
        layer = self._layer(POSITIVE_LAYER if positive else NEGATIVE_LAYER)
        if layer is None:
            return []
        return [box_from_shape(s, int(self.box_size.value), i) for i, s in enumerate(layer.data)]

    def add_box(self, centre_zyx: Any, positive: bool) -> Box:
        """Add a box centred (as near as fits) on a voxel position of the tomogram."""
        tomo = self._tomogram_layer()
        box = place_box(
            np.asarray(centre_zyx, float), int(self.box_size.value), layer_volume(tomo).shape
        )
        layer = self.box_layer(positive)
        layer.add_rectangles(box.to_shape(), edge_color=layer.current_edge_color)
        if positive:
            self.paint_layer()
        self.update_counts()
        return box

    def add_box_at_cursor(self, positive: bool) -> Box | None:
        try:
            tomo = self._tomogram_layer()
            centre = tomo.world_to_data(self.viewer.cursor.position)
            return self.add_box(centre, positive)
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None

    def _on_click(self, viewer: Any, event: Any) -> None:
        mode = self.click_mode.value
        if mode == "off" or event.button != 1 or viewer.dims.ndisplay != 2:
            return
        try:
            tomo = self._tomogram_layer()
            self.add_box(tomo.world_to_data(event.position), mode == "positive box")
        except TomosegError as exc:
            notify_error(describe_error(exc))

    def _on_shapes_changed(self, layer: Any, event: Any) -> None:
        action = getattr(event, "action", "changed")
        if action in ("added", "changed", "removed"):
            self.snap(layer)
            self.update_counts()

    def snap(self, layer: Any) -> None:
        """Snap every shape of a box layer to the box size around its centre."""
        if self._snapping or layer is None or len(layer.data) == 0:
            return
        try:
            snapped = [
                b.to_shape()
                for b in (
                    box_from_shape(s, int(self.box_size.value), i)
                    for i, s in enumerate(layer.data)
                )
            ]
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return
        current = [np.asarray(s) for s in layer.data]
        if len(current) == len(snapped) and all(
            c.shape == s.shape and np.allclose(c, s) for c, s in zip(current, snapped)
        ):
            return
        self._snapping = True
        try:
            color = layer.current_edge_color
            layer.data = snapped
            layer.shape_type = ["rectangle"] * len(snapped)
            layer.edge_color = color
        finally:
            self._snapping = False

    def snap_all(self, *_: Any) -> None:
        for name in (POSITIVE_LAYER, NEGATIVE_LAYER):
            layer = self._layer(name)
            if layer is not None:
                layer.metadata["box_size"] = int(self.box_size.value)
            self.snap(layer)
        self.update_counts()

    def update_counts(self) -> None:
        pos = self._layer(POSITIVE_LAYER)
        neg = self._layer(NEGATIVE_LAYER)
        n_pos = 0 if pos is None else len(pos.data)
        n_neg = 0 if neg is None else len(neg.data)
        text = f"{n_pos} positive (aim ~10), {n_neg} negative (aim ~100)"
        if self.changes.unsaved:
            text += f" \N{EM DASH} {UNSAVED_MARK}"
        self.counts.value = text

    # -- painting -------------------------------------------------------------------------
    def name_feature(self, *_: Any) -> None:
        """Give the chosen label value a feature name and select it for painting."""
        try:
            layer = self.paint_layer()
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return
        value = int(self.feature_value.value)
        names = dict(layer.metadata.get("class_names") or {0: "background"})
        names[value] = str(self.feature_name.value).strip() or f"feature {value}"
        if names != layer.metadata.get("class_names"):
            layer.metadata["class_names"] = names
            self.changes.mark_changed()  # feature names are part of the annotations
        layer.selected_label = value
        layer.mode = "paint"
        self.viewer.layers.selection.active = layer

    # -- gallery --------------------------------------------------------------------------
    def update_gallery(self, *_: Any) -> None:
        """Show every box's crop (positives first), click a thumbnail to go to it."""
        try:
            volume = layer_volume(self._tomogram_layer())
            items = []
            for positive in (True, False):
                color = POSITIVE_COLOR if positive else NEGATIVE_COLOR
                for i, box in enumerate(self.boxes(positive)):
                    image = (
                        crop(volume, box)[0]
                        if box.fits(volume.shape)
                        else np.zeros((box.size, box.size), np.float32)
                    )
                    kind = "positive" if positive else "negative"
                    items.append(
                        (
                            image,
                            f"{kind} {i + 1}: {box.describe()}",
                            color,
                            lambda b=box: self.go_to(b),
                        )
                    )
            self.gallery.show_items(items)
        except TomosegError as exc:
            notify_error(describe_error(exc))

    def go_to(self, box: Box) -> None:
        """Show the slice of a box and centre the view on it."""
        tomo = self._tomogram_layer()
        world = tomo.data_to_world((box.z, box.y, box.x))
        self.viewer.dims.set_point(0, world[0])
        self.viewer.camera.center = tuple(world)

    # -- saving and restoring -------------------------------------------------------------
    def gather_annotations(self) -> Annotations | None:
        """The painting (the layer's own array, not a copy), both box sets and the feature
        names of the chosen tomogram; None when nothing is annotated yet."""
        tomo = self._tomogram_layer()
        paint = self._layer(PAINT_LAYER)
        positives, negatives = self.boxes(True), self.boxes(False)
        if paint is None and not positives and not negatives:
            return None
        painting = (
            np.asarray(paint.data) if paint is not None else np.zeros(tomo.data.shape, np.uint8)
        )
        names = (paint.metadata.get("class_names") if paint is not None else None) or {}
        return Annotations(
            painting=painting,
            positives=positives,
            negatives=negatives,
            class_names={int(k): str(v) for k, v in names.items()} or {0: "background"},
            box_size=int(self.box_size.value),
            voxel_size=layer_voxel_size(tomo),
            source=source_of(tomo),
        )

    def save_annotations(self, folder: Any) -> Any:
        """Save the painting and both box sets into ``folder`` (painting.mrc + CSVs); the
        autosave, no longer needed, is deleted."""
        try:
            annotations = self.gather_annotations()
            if annotations is None or self._layer(PAINT_LAYER) is None:
                raise TomosegError("There is nothing to save yet: add boxes and paint first.")
            if not is_chosen(folder):
                raise TomosegError("Choose an annotations folder first.")
            # The user chose this folder and pressed Save: replacing the annotations of the
            # same tomogram there is what they asked for; another tomogram's are refused.
            out = save_annotations(folder, annotations, overwrite=True)
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        self.changes.mark_saved()
        self.autosaver.discard()
        notify_info(
            f"Saved the painting and {len(annotations.positives)} + "
            f"{len(annotations.negatives)} boxes to {out}."
        )
        return out

    def save_before_replacing(self) -> Any:
        """Save the annotations into the annotations folder (asking for one if none is
        set) before an action replaces them; returns the folder, or None if not saved."""
        folder = self.folder.value
        if not is_chosen(folder):
            folder = _common.ask_annotations_folder(self.native)
            if not folder:
                return None
            self.folder.value = folder
        return self.save_annotations(folder)

    def load_annotations(self, folder: Any) -> Any:
        """Restore a saved painting and boxes onto the current tomogram.

        With unsaved changes, asks first (save, discard or cancel); Cancel changes nothing.
        """
        try:
            tomo = self._tomogram_layer()
            if not is_chosen(folder):
                raise TomosegError("Choose the annotations folder to load.")
            if not self.changes.confirm_replace("Loading annotations", self.native):
                return None
            annotations = load_annotations(folder, expected_shape=tomo.data.shape)
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        self.show_annotations(annotations)
        self.changes.mark_saved()
        self.autosaver.discard()  # of the annotations the user just agreed to replace
        self.update_counts()
        return annotations

    def show_annotations(self, annotations: Annotations) -> None:
        """Put saved (or autosaved) annotations into the painting and box layers."""
        self.box_size.value = annotations.box_size
        paint = self.paint_layer()
        paint.data = annotations.painting.astype(np.uint8, copy=False)
        paint.metadata["class_names"] = dict(annotations.class_names)
        for positive, boxes in ((True, annotations.positives), (False, annotations.negatives)):
            layer = self.box_layer(positive)
            self._snapping = True
            try:
                layer.data = [b.to_shape() for b in boxes]
                if boxes:  # napari refuses to set the types of no shapes
                    layer.shape_type = ["rectangle"] * len(boxes)
                    layer.edge_color = POSITIVE_COLOR if positive else NEGATIVE_COLOR
            finally:
                self._snapping = False

    # -- recovery after a crash ------------------------------------------------------------
    def update_recovery(self, *_: Any) -> None:
        """Offer the autosave of the chosen tomogram, if a session that ended without saving
        (a crash, a killed napari) left one."""
        info = None
        tomo = self.tomogram.value
        if tomo is not None and tomo.data.ndim == 3:
            info = find_autosave(source_of(tomo), tomo.data.shape)
        if info is not None and (info.folder in self.autosaver.folders or info.open_elsewhere()):
            info = None  # this session's own, or another viewer's that is still open
        if info is not None and info != self.offered:
            notify_info(
                f"Annotations of '{tomo.name}' were autosaved ({info.describe()}); restore "
                "them in '2. Boxes and painting'."
            )
        self.offered = info
        self.recovery.value = "" if info is None else f"Autosaved annotations: {info.describe()}"
        for widget in (self.recovery, self.restore_button, self.discard_button):
            widget.visible = info is not None

    def restore_autosave(self, *_: Any) -> Annotations | None:
        """Put the offered autosave into the layers (asking first if that replaces unsaved
        annotations); they stay marked unsaved until saved in an annotations folder."""
        info = self.offered
        if info is None:
            return None
        try:
            self._tomogram_layer()
            if not self.changes.confirm_replace("Restoring the autosave", self.native):
                return None
            annotations = read_autosave(info)
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        self.show_annotations(annotations)
        self.changes.mark_changed()
        self.autosaver.adopt(info)
        self.update_recovery()
        notify_info(
            f"Restored the annotations autosaved {info.saved.astimezone():%Y-%m-%d %H:%M}; "
            "save them with 'Save annotations'."
        )
        return annotations

    def discard_offered_autosave(self, *_: Any) -> None:
        """Delete the offered autosave (the user does not want it back)."""
        if self.offered is not None:
            discard_autosave(self.offered.folder)
        self.update_recovery()
