"""The viewer a new user meets: the demo's layers and docks on a laptop screen, a training
preview that leaves the view alone, a framed 3D view, one unit across all layers."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari.utils.notifications import notification_manager  # noqa: E402
from qtpy.QtWidgets import QApplication, QDockWidget  # noqa: E402

from napari_tomoseg._widgets import PickWidget  # noqa: E402
from napari_tomoseg._widgets._boxes import NEGATIVE_LAYER, PAINT_LAYER, POSITIVE_LAYER  # noqa: E402
from napari_tomoseg._widgets._demo import show_demo  # noqa: E402
from napari_tomoseg._widgets._dock import STEPS, Scrolled  # noqa: E402
from napari_tomoseg._widgets._preview import PREVIEW_DOCK  # noqa: E402
from napari_tomoseg.simulator.demo import DemoSettings, run_demo  # noqa: E402
from napari_tomoseg.simulator.synthetic import CLASS_NAMES  # noqa: E402
from test_widgets import (  # noqa: E402, F401  (fixtures)
    _no_modal_questions,
    _one_box_training,
    _settings_dir,
)

#: A laptop screen, and the most height one dock widget may ask for on it.
LAPTOP = (1366, 768)
MAX_DOCK_HEIGHT = 600


@pytest.fixture
def warnings_shown():
    """The warning notifications napari shows (e.g. 'Inconsistent units across layers')."""
    seen: list[str] = []

    def record(notification):
        if "warning" in str(notification.severity).lower():
            seen.append(str(notification.message))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


@pytest.fixture(scope="module")
def demo_result():
    """A small, quick run of the demo job (what ``tomoseg demo`` computes)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_demo(
            None, DemoSettings(shape=(32, 128, 128), n_positive=4, n_negative=8, iterations=4)
        )
    finally:
        torch.set_num_threads(before)


def settle(qtbot, ms: int = 150) -> None:
    """Let Qt lay out and draw (napari checks the layers' units when it draws)."""
    qtbot.wait(ms)
    QApplication.processEvents()


def assert_fits_the_window(viewer) -> None:
    """No dock asks for more than it has or for more than MAX_DOCK_HEIGHT, the window
    can be as small as a laptop screen, and no scrolled step is cut off at the side."""
    window = viewer.window._qt_window
    assert window.minimumSizeHint().width() <= LAPTOP[0], window.minimumSizeHint()
    assert window.minimumSizeHint().height() <= LAPTOP[1], window.minimumSizeHint()
    docks = [d for d in window.findChildren(QDockWidget) if d.isVisible()]
    assert docks
    for dock in docks:
        hint = dock.minimumSizeHint()
        assert hint.height() <= MAX_DOCK_HEIGHT, (dock.objectName(), hint)
        assert hint.height() <= dock.height() and hint.width() <= dock.width(), (
            dock.objectName(),
            hint,
            dock.size(),
        )
    for area in window.findChildren(Scrolled):
        if area.isVisible():
            inner = area.widget().minimumSizeHint().width()
            assert inner <= area.viewport().width(), (type(area.step).__name__, inner)


def assert_canvas_is_most_of_the_window(viewer) -> None:
    window = viewer.window._qt_window
    canvas = viewer.window._qt_viewer.canvas.native
    assert canvas.width() >= window.width() / 2, (canvas.size(), window.size())
    assert canvas.height() >= window.height() / 2, (canvas.size(), window.size())


def test_demo_viewer_shows_what_the_readme_says_on_a_laptop_screen(
    make_napari_viewer, qtbot, demo_result, warnings_shown
):
    viewer = make_napari_viewer(show=True)
    dock = show_demo(viewer, demo_result)
    viewer.window._qt_window.resize(*LAPTOP)
    settle(qtbot)

    names = [layer.name for layer in viewer.layers]
    assert names[:5] == [
        "simulated tomogram",
        "ground truth",
        PAINT_LAYER,
        POSITIVE_LAYER,
        NEGATIVE_LAYER,
    ]
    assert names[5:] == [
        "single_membrane probability (simulated tomogram)",
        "single_membrane mask (simulated tomogram)",
    ]
    assert not viewer.layers["ground truth"].visible
    # the painting: the membrane of the truth inside each positive box, nothing elsewhere
    paint = np.asarray(viewer.layers[PAINT_LAYER].data)
    truth = demo_result.simulation.labels == CLASS_NAMES.index("single_membrane")
    inside = np.zeros(paint.shape, bool)
    for box in demo_result.positives:
        inside[box.slices()] = True
    np.testing.assert_array_equal(paint, (truth & inside).astype(np.uint8))
    assert paint.any()
    assert len(viewer.layers[POSITIVE_LAYER].data) == len(demo_result.positives)
    assert len(viewer.layers[NEGATIVE_LAYER].data) == len(demo_result.negatives)

    # the Train step is in front and points at the painting, never at the truth
    train = dock.steps["train"]
    assert dock.currentWidget().step is train
    assert train.painting.value.name == PAINT_LAYER
    assert train.positive.value.name == POSITIVE_LAYER
    assert train.negative.value.name == NEGATIVE_LAYER
    assert train.tomogram.value.name == "simulated tomogram"
    [row] = dock.steps["merge"].rows  # the map is listed, at the threshold of its mask
    assert row.layer.value.name == names[5]
    threshold = viewer.layers[names[5]].metadata["threshold"]
    assert row.threshold.value == pytest.approx(threshold, abs=0.01)

    assert_fits_the_window(viewer)
    assert_canvas_is_most_of_the_window(viewer)
    for index in range(dock.count()):  # every step fits, not only the one in front
        dock.setCurrentIndex(index)
        settle(qtbot, 50)
        assert_fits_the_window(viewer)

    # one unit for every layer: napari has no reason to warn
    assert viewer.layers.extent.units is not None
    assert {str(u) for layer in viewer.layers for u in layer.units} == {"angstrom"}
    assert not [m for m in warnings_shown if "units" in m.lower()], warnings_shown


def test_each_step_docked_alone_still_fits_a_laptop_screen(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(*LAPTOP)
    for title in [*(title for *_, title in STEPS), "7. copick project"]:
        viewer.window.add_plugin_dock_widget("napari-tomoseg", title)
    settle(qtbot)
    assert_fits_the_window(viewer)
    assert_canvas_is_most_of_the_window(viewer)


def test_training_preview_leaves_the_view_and_the_dims_alone(
    make_napari_viewer, qtbot, one_torch_thread, warnings_shown
):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(*LAPTOP)
    train = _one_box_training(viewer)
    viewer.window.add_dock_widget(Scrolled(train), name="train", area="right")
    train.iterations.value = 3
    train.ncopy.value = 2
    viewer.dims.set_point(0, viewer.layers["tomo"].data_to_world((9, 0, 0))[0])
    viewer.camera.center = (0.0, 300.0, 400.0)
    viewer.camera.zoom = 2.5
    settle(qtbot)

    def view() -> tuple:
        """What the user sees: camera, dims and layers."""
        return (
            tuple(viewer.camera.center),
            viewer.camera.zoom,
            tuple(viewer.dims.range),
            tuple(viewer.dims.current_step),
            [layer.name for layer in viewer.layers],
        )

    before = view()
    train.start_training()
    qtbot.waitUntil(lambda: train.result is not None and not train.runner.running, timeout=120_000)
    settle(qtbot)
    after = view()
    assert after == before
    # the preview is shown, in its own dock widget
    assert train.preview is not None and train.preview.image is not None
    assert viewer.window.dock_widgets[PREVIEW_DOCK] is train.preview
    assert (
        train.preview.picture.pixmap() is not None and not train.preview.picture.pixmap().isNull()
    )
    samples = train.result.preview.as_stack().shape[0] // 3
    assert str(samples) in train.preview.caption.text()
    assert_fits_the_window(viewer)
    assert not [m for m in warnings_shown if "units" in m.lower()], warnings_shown


def test_show_in_3d_frames_the_features_without_specks(make_napari_viewer, qtbot, warnings_shown):
    viewer = make_napari_viewer(show=True)
    labels = np.zeros((24, 64, 80), np.uint8)
    zz, yy, xx = np.indices(labels.shape)
    labels[(zz - 12) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 36] = 1
    labels[(zz - 12) ** 2 + (yy - 40) ** 2 + (xx - 56) ** 2 <= 25] = 2
    labels[1, 60, 76] = 1  # a speck, far from the features: not shown, not framed
    scale = (12.0, 10.0, 10.0)
    viewer.add_image(np.random.default_rng(0).random(labels.shape), name="tomo", scale=scale)
    seg = viewer.add_labels(labels, name="seg", scale=scale, translate=(0.0, 100.0, -50.0))
    for layer in viewer.layers:
        assert str(layer.units[0]) == "pixel"  # the same units for all, whatever they are
    pick = PickWidget(viewer)
    pick.segmentation.value = seg
    pick.speck_size.value = 20
    pick.render_3d()
    qtbot.waitUntil(lambda: not pick.renderer.running and pick.scene is not None, timeout=60_000)
    settle(qtbot)
    assert viewer.dims.ndisplay == 3
    assert [s.metadata["feature"] for s in pick.surfaces] == [1, 2]
    for surface, value in zip(pick.surfaces, (1, 2)):  # in the colour of the label
        np.testing.assert_allclose(surface.vertex_colors[0], seg.get_color(value), atol=1e-6)
    assert sum(s.specks for s in pick.scene.surfaces) == 1
    # the box of the two balls (not of the speck), in world coordinates
    lower, upper = np.array([6, 14, 14]), np.array([18, 45, 61])
    centre = seg.data_to_world((lower + upper) / 2)
    np.testing.assert_allclose(viewer.camera.center, centre, atol=1e-6)
    assert not seg.visible and not viewer.layers["tomo"].visible
    assert not [m for m in warnings_shown if "units" in m.lower()], warnings_shown
    # shown again (other settings): the old surfaces are replaced, not added to
    pick.speck_size.value = 1
    pick.render_3d()
    qtbot.waitUntil(lambda: not pick.renderer.running, timeout=60_000)
    qtbot.waitUntil(lambda: len([s for s in viewer.layers if "3D" in s.name]) == 2, timeout=5000)


def test_the_all_steps_dock_opens_from_the_plugin_menu(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(*LAPTOP)
    _, dock = viewer.window.add_plugin_dock_widget("napari-tomoseg", "TomoSeg (all steps)")
    settle(qtbot)
    assert [dock.tabText(i) for i in range(dock.count())] == [title for _, title, *_ in STEPS]
    assert [type(dock.steps[key]) for key, *_ in STEPS] == [cls for _, _, cls, _ in STEPS]
    assert_fits_the_window(viewer)
    assert_canvas_is_most_of_the_window(viewer)
