"""Regenerate the screenshots of the README and the user guide from a real napari window.

Run on a machine with a display, or headless under Xvfb:

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py

It opens the simulated sample, docks the TomoSeg steps, drives each step the way a user
would (boxes chosen from the simulator's ground truth, a short training run) and saves one
PNG per step into ``docs/images/``.  ``--quick`` does the same on a small tomogram with a
few training steps (seconds, not minutes): the tests run it to check that every
screenshot shows the data filling the canvas and nothing cut off.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication, QDockWidget, QLabel

from napari_tomoseg._widgets._dock import Scrolled, TomosegDock
from napari_tomoseg._widgets._preview import PREVIEW_DOCK, PreviewPanel
from napari_tomoseg.folders import CACHE_ENV, CONFIG_ENV
from napari_tomoseg.simulator.demo import boxes_from_ground_truth
from napari_tomoseg.simulator.synthetic import CLASS_NAMES, SimulationSettings, simulate_tomogram

OUT = Path(__file__).parent / "images"
#: The window of the screenshots (a laptop-sized one: the layout must fit it).
WINDOW = (1366, 768)


@dataclass
class Mode:
    """How much work the screenshots take: the full sample, or a quick small run."""

    quick: bool = False
    shape: tuple[int, int, int] = (96, 256, 256)
    n_positive: int = 10
    n_negative: int = 40
    iterations: int = 300


QUICK = Mode(quick=True, shape=(32, 128, 128), n_positive=4, n_negative=8, iterations=4)


@dataclass
class Shot:
    """One screenshot: its file, where the canvas lies in it (x, y, width, height, in
    the image's pixels), and what in the layout did not fit (empty when all fits)."""

    name: str
    path: Path
    canvas: tuple[int, int, int, int]
    problems: list[str] = field(default_factory=list)


def settle(seconds: float = 0.3) -> None:
    """Let Qt draw (and workers deliver their results)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def wait_for(condition: Callable[[], bool], timeout: float = 900.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("a widget task did not finish in time")
        settle(0.1)


def layout_problems(viewer: napari.Viewer) -> list[str]:
    """What in the window does not fit: a dock smaller than it asks to be, a step wider
    than its scroll area (it would be cut off at the side), a message shorter than its
    lines."""
    window = viewer.window._qt_window
    problems = []
    ours = [*window.findChildren(Scrolled), *window.findChildren(PreviewPanel)]
    for label in (label for widget in ours for label in widget.findChildren(QLabel)):
        if label.isVisible() and label.wordWrap() and label.text():
            needed = label.heightForWidth(label.width())
            if needed > label.height():
                problems.append(
                    f"message {label.text()!r} needs {needed} px, has {label.height()}"
                )
    for dock in window.findChildren(QDockWidget):
        hint = dock.minimumSizeHint()
        if dock.isVisible() and (hint.height() > dock.height() or hint.width() > dock.width()):
            problems.append(f"dock '{dock.objectName()}' needs {hint}, has {dock.size()}")
    for area in window.findChildren(Scrolled):
        inner = area.widget().minimumSizeHint().width()
        if area.isVisible() and inner > area.viewport().width():
            problems.append(f"{type(area.step).__name__} is {inner} px wide, cut off")
    return problems


def shot(viewer: napari.Viewer, name: str, out: Path) -> Shot:
    """Save the window as ``out/name.png`` (256 colours: small files) and say where the
    canvas is in it."""
    from PIL import Image

    settle()
    end = time.monotonic() + 3.0  # a message that changed may wrap a moment later
    while layout_problems(viewer) and time.monotonic() < end:
        settle(0.1)
    path = out / f"{name}.png"
    image = viewer.screenshot(canvas_only=False, flash=False)
    Image.fromarray(image[..., :3]).quantize(256).save(path, optimize=True)
    window = viewer.window._qt_window
    canvas = viewer.window._qt_viewer.canvas.native
    corner = canvas.mapTo(window, canvas.rect().topLeft())
    sx, sy = image.shape[1] / window.width(), image.shape[0] / window.height()
    rect = (
        int(corner.x() * sx),
        int(corner.y() * sy),
        int(canvas.width() * sx),
        int(canvas.height() * sy),
    )
    print(f"wrote {path}")
    return Shot(name, path, rect, layout_problems(viewer))


def open_tomogram(viewer: napari.Viewer, mode: Mode) -> tuple:
    """The sample (full mode) or a small simulated tomogram with its truth (quick)."""
    if not mode.quick:
        return tuple(viewer.open_sample("napari-tomoseg", "simulated_cell"))
    from napari_tomoseg._layers import image_layer_kwargs, labels_layer_kwargs, voxel_metadata
    from napari_tomoseg.simulator.synthetic import CLASS_COLORS

    sim = simulate_tomogram(SimulationSettings(shape=mode.shape, seed=0))
    scale = (float(sim.voxel_size),) * 3
    meta = voxel_metadata(scale)
    image = viewer.add_image(sim.tomogram, **image_layer_kwargs("simulated tomogram", scale, meta))
    truth = viewer.add_labels(
        sim.labels, **labels_layer_kwargs("ground truth", scale, CLASS_NAMES, CLASS_COLORS, meta)
    )
    return image, truth


def paint_boxes(viewer: napari.Viewer, boxes, labels: np.ndarray, mode: Mode) -> None:
    """Boxes and painting of single membranes, chosen from the ground truth."""
    membrane = CLASS_NAMES.index("single_membrane")
    positives, negatives = boxes_from_ground_truth(
        labels, membrane, n_positive=mode.n_positive, n_negative=mode.n_negative
    )
    for box in positives:
        boxes.add_box((box.z, box.y, box.x), positive=True)
    for box in negatives:
        boxes.add_box((box.z, box.y, box.x), positive=False)
    boxes.feature_value.value = 1
    boxes.feature_name.value = "single membrane"
    boxes.name_feature()
    paint = viewer.layers["painting"]
    inside = np.zeros(labels.shape, bool)
    for box in positives:
        inside[box.slices()] = True
    paint.data = ((labels == membrane) & inside).astype(np.uint8)
    boxes.update_gallery()
    boxes.go_to(positives[0])
    viewer.reset_view()  # the slice of the first box, the whole slice in view


def make_screenshots(
    out: Path = OUT, mode: Mode | None = None, viewer: napari.Viewer | None = None
) -> list[Shot]:
    """Drive every step in a real viewer and save a screenshot of each into ``out``.

    ``viewer``: a shown viewer to use (a test's); by default a new one, closed at the end.
    Remembered settings and autosaves go to a temporary folder (unless the environment
    names one), so the user's own never show in the pictures."""
    mode = mode or Mode()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        os.environ.setdefault(CONFIG_ENV, str(Path(scratch) / "config"))
        os.environ.setdefault(CACHE_ENV, str(Path(scratch) / "cache"))
        if viewer is not None:
            return _drive(viewer, out, mode)
        viewer = napari.Viewer(title="napari-tomoseg")
        try:
            return _drive(viewer, out, mode)
        finally:
            viewer.close()


def _drive(viewer: napari.Viewer, out: Path, mode: Mode) -> list[Shot]:
    viewer.window._qt_window.resize(*WINDOW)
    dock = TomosegDock(viewer)
    dock_widget = viewer.window.add_dock_widget(dock, name="TomoSeg", area="right")
    settle()
    image, truth = open_tomogram(viewer, mode)
    viewer.dims.set_point(0, mode.shape[0] // 2 * image.scale[0])
    viewer.reset_view()
    shots = [shot(viewer, "sample", out)]

    truth.visible = False
    dock.show_step("import")
    shots.append(shot(viewer, "step1-import", out))

    boxes = dock.show_step("boxes")
    boxes.tomogram.value = image
    paint_boxes(viewer, boxes, np.asarray(truth.data), mode)
    settle()
    dock.currentWidget().ensureWidgetVisible(boxes.gallery)  # scrolled down to the crops
    shots.append(shot(viewer, "step2-boxes", out))

    train = dock.show_step("train")
    train.select_default_layers()
    train.tomogram.value = image
    train.iterations.value = mode.iterations
    train.start_training()
    wait_for(lambda: train.result is not None and not train.runner.running)
    viewer.window.dock_widgets[PREVIEW_DOCK].parentWidget().raise_()
    shots.append(shot(viewer, "step3-preview", out))
    dock_widget.raise_()
    shots.append(shot(viewer, "step3-train", out))

    apply = dock.show_step("apply")
    apply.tomogram.value = image
    apply.run()
    wait_for(lambda: len(apply.layers_added) >= 2)
    viewer.layers["painting"].visible = False
    shots.append(shot(viewer, "step4-apply", out))

    merge = dock.show_step("merge")
    merged = merge.merge()
    for layer in apply.layers_added:
        layer.visible = False
    shots.append(shot(viewer, "step5-merge", out))

    pick = dock.show_step("pick")
    pick.segmentation.value = merged
    pick.tomogram.value = image
    pick.render_3d()
    wait_for(lambda: pick.scene is not None and not pick.renderer.running)
    shots.append(shot(viewer, "step6-render", out))
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small tomogram, few steps")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNG files")
    args = parser.parse_args(argv)
    shots = make_screenshots(args.out, QUICK if args.quick else Mode())
    problems = [f"{s.name}: {p}" for s in shots for p in s.problems]
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
