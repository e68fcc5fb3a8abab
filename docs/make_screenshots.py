"""Regenerate the screenshots of the README and the user guide from a real napari window.

Run on a machine with a display, or headless under Xvfb:

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py

It opens the simulated sample, drives each TomoSeg widget the way a user would (boxes chosen
from the simulator's ground truth, a short training run) and saves one PNG per step into
``docs/images/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from napari_tomoseg.demo import boxes_from_ground_truth
from napari_tomoseg.synthetic import CLASS_NAMES

OUT = Path(__file__).parent / "images"
WIDGETS = {
    "import": "1. Import tomogram (bin, filter)",
    "boxes": "2. Boxes and painting",
    "train": "3. Train network",
    "apply": "4. Apply network",
    "merge": "5. Merge features",
    "pick": "6. Render and pick",
}


def settle(seconds: float = 0.3) -> None:
    """Let Qt draw (and workers deliver their results)."""
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def wait_for(condition, timeout: float = 900.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("a widget task did not finish in time")
        settle(0.1)


def shot(viewer: napari.Viewer, name: str) -> None:
    settle()
    path = OUT / f"{name}.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print(f"wrote {path}")


def dock(viewer: napari.Viewer, key: str):
    viewer.window.remove_dock_widget("all")
    _, widget = viewer.window.add_plugin_dock_widget("napari-tomoseg", WIDGETS[key])
    return widget


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(title="napari-tomoseg")
    viewer.window._qt_window.resize(1500, 950)
    settle()
    image, truth = viewer.open_sample("napari-tomoseg", "simulated_cell")
    viewer.dims.set_point(0, 48 * image.scale[0])
    settle()
    viewer.reset_view()
    shot(viewer, "sample")

    truth.visible = False
    dock(viewer, "import")
    shot(viewer, "step1-import")

    boxes = dock(viewer, "boxes")
    boxes.tomogram.value = image
    labels = np.asarray(truth.data)
    membrane = CLASS_NAMES.index("single_membrane")
    positives, negatives = boxes_from_ground_truth(labels, membrane, n_positive=10, n_negative=40)
    for box in positives:
        boxes.add_box((box.z, box.y, box.x), positive=True)
    for box in negatives:
        boxes.add_box((box.z, box.y, box.x), positive=False)
    boxes.feature_value.value = 1
    boxes.feature_name.value = "single membrane"
    boxes.name_feature()
    paint = viewer.layers["painting"]
    paint.data = (labels == membrane).astype(np.uint8)
    boxes.update_gallery()
    viewer.dims.set_point(0, positives[0].z * image.scale[0])
    shot(viewer, "step2-boxes")

    train = dock(viewer, "train")
    train.select_default_layers()
    train.tomogram.value = image
    train.iterations.value = 300
    train.start_training()
    wait_for(lambda: train.result is not None and not train.runner.running)
    viewer.layers["training preview"].visible = True
    viewer.reset_view()
    shot(viewer, "step3-train")
    viewer.layers["training preview"].visible = False

    apply = dock(viewer, "apply")
    apply.tomogram.value = image
    apply.run()
    wait_for(lambda: len(apply.layers_added) >= 2)
    viewer.reset_view()
    shot(viewer, "step4-apply")

    merge = dock(viewer, "merge")
    merged = merge.merge()
    for layer in apply.layers_added:
        layer.visible = False
    shot(viewer, "step5-merge")

    pick = dock(viewer, "pick")
    pick.segmentation.value = merged
    pick.feature.value = 1
    pick.add_mesh()
    pick.render_3d()
    viewer.camera.angles = (-20, 30, 60)
    shot(viewer, "step6-render")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
