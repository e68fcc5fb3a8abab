"""``tomoseg demo --viewer``: the demo's run shown in napari, ready to carry on by hand.

The layers are made by the widgets themselves (the box widget's painting and box layers,
the apply widget's probability and mask layers), so they are the layers a user's own run
makes, on the tomogram's grid with its units; the Train widget points at the painting,
never at the ground truth.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._layers import image_layer_kwargs, labels_layer_kwargs, voxel_metadata
from ..data.annotations import Annotations
from ..simulator.synthetic import CLASS_COLORS, CLASS_NAMES
from ._common import session
from ._dock import TomosegDock

#: The name of the dock that holds the six steps.
DOCK_NAME = "TomoSeg"


def demo_painting(labels: np.ndarray, value: int, positives: list[Any]) -> np.ndarray:
    """The painting a user would have made: the feature ``value`` of the ground truth,
    painted (as 1) inside each positive box only."""
    painting = np.zeros(labels.shape, np.uint8)
    for box in positives:
        region = box.slices()
        painting[region] = labels[region] == value
    return painting


def show_demo(viewer: Any, result: Any) -> TomosegDock:
    """Add the demo's tomogram, ground truth (hidden), boxes, painting, probability map
    and mask to ``viewer`` and dock the TomoSeg steps, open on Train."""
    sim = result.simulation
    scale = (float(sim.voxel_size),) * 3
    meta = voxel_metadata(scale)
    tomo = viewer.add_image(
        sim.tomogram,
        **image_layer_kwargs("simulated tomogram", scale, {**meta, "simulated": True}),
    )
    viewer.add_labels(
        sim.labels,
        **labels_layer_kwargs(
            "ground truth", scale, CLASS_NAMES, CLASS_COLORS, meta, visible=False
        ),
    )
    dock = TomosegDock(viewer)
    viewer.window.add_dock_widget(dock, name=DOCK_NAME, area="right")
    boxes = dock.steps["boxes"]
    boxes.tomogram.value = tomo
    value = CLASS_NAMES.index(result.feature)
    boxes.show_annotations(
        Annotations(
            painting=demo_painting(sim.labels, value, result.positives),
            positives=list(result.positives),
            negatives=list(result.negatives),
            class_names={0: "background", 1: result.feature},
            box_size=result.positives[0].size if result.positives else boxes.box_size.value,
            voxel_size=scale,
            source="simulated",
        )
    )
    boxes.changes.mark_saved()  # the demo's own annotations: only the user's edits count
    boxes.update_counts()
    session().set_network(result.network, "trained by the demo")
    dock.steps["apply"].add_result_layers(tomo, result.network, result.applied)
    train = dock.steps["train"]
    train.select_default_layers()
    train.tomogram.value = tomo
    viewer.layers.selection.active = tomo
    dock.show_step("train")
    return dock


def open_demo_viewer(result: Any) -> None:
    """Open napari with the demo's run (:func:`show_demo`) and run its event loop."""
    import napari

    viewer = napari.Viewer(title="napari-tomoseg demo")
    show_demo(viewer, result)
    napari.run()
