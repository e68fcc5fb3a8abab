"""Nothing lost in the viewer: every change counts, leaving asks, autosave and recovery.

Real napari viewers (Qt; under Xvfb in CI).  The Save / Discard / Cancel question is
answered by the ``answers`` fixture of ``test_widgets`` (an unexpected question fails).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari.layers.labels import _labels_key_bindings  # noqa: E402
from napari.utils._test_utils import read_only_mouse_event  # noqa: E402
from napari.utils.interactions import (  # noqa: E402
    mouse_move_callbacks,
    mouse_press_callbacks,
    mouse_release_callbacks,
)

from napari_tomoseg._widgets import BoxWidget, TrainWidget  # noqa: E402
from napari_tomoseg._widgets._boxes import NEGATIVE_LAYER, PAINT_LAYER, POSITIVE_LAYER  # noqa: E402
from napari_tomoseg.data import autosave  # noqa: E402
from napari_tomoseg.data.annotations import load_annotations  # noqa: E402
from napari_tomoseg.data.io import write_mrc  # noqa: E402
from test_widgets import (  # noqa: E402, F401  (fixtures)
    _no_modal_questions,
    _settings_dir,
    answers,
)

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (12, 64, 64)
VOXEL = 8.0


def _tomogram_file(folder: Path) -> Path:
    rng = np.random.default_rng(1)
    return write_mrc(folder / "cell.mrc", rng.normal(size=SHAPE).astype(np.float32), VOXEL)


def _open(viewer, path: Path):
    [layer] = viewer.open(str(path), plugin="napari-tomoseg")
    return layer


def _boxes_widget(viewer, tomo) -> BoxWidget:
    widget = BoxWidget(viewer)
    viewer.window.add_dock_widget(widget, name="boxes")
    widget.tomogram.value = tomo
    widget.box_size.value = 16
    return widget


def _saved(widget, folder: Path) -> None:
    assert widget.save_annotations(folder) is not None
    assert not widget.changes.unsaved


def _drag_shape(layer, start, end) -> None:
    """Select the shape under ``start`` and drag it to ``end`` (world coordinates, Z Y X)
    with napari's own mouse bindings, as a user does in select mode."""
    layer.mode = "select"
    for kind, position, dragging in (
        ("mouse_press", start, False),
        ("mouse_release", start, False),
        ("mouse_press", start, True),
        ("mouse_move", start, True),
        ("mouse_move", end, True),
        ("mouse_release", end, True),
    ):
        event = read_only_mouse_event(
            type=kind, position=tuple(position), is_dragging=dragging, dims_displayed=[1, 2]
        )
        callback = {
            "mouse_press": mouse_press_callbacks,
            "mouse_move": mouse_move_callbacks,
            "mouse_release": mouse_release_callbacks,
        }[kind]
        callback(layer, event)


# -- every change counts --------------------------------------------------------------------------
def test_every_kind_of_edit_marks_the_annotations_unsaved(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    tomo = _open(viewer, _tomogram_file(tmp_path))
    widget = _boxes_widget(viewer, tomo)
    folder = tmp_path / "annotations"
    widget.add_box((5, 32, 32), positive=True)
    paint = viewer.layers[PAINT_LAYER]
    paint.brush_size = 5
    _saved(widget, folder)

    def after(edit) -> bool:
        """Whether ``edit`` marks the annotations unsaved (saved again afterwards)."""
        edit()
        marked = widget.changes.unsaved
        _saved(widget, folder)
        return marked

    def noop() -> None:
        pass

    assert not after(noop)
    assert after(lambda: paint.paint((5, 32, 32), 1))  # a brush dab
    assert paint.data[5, 32, 32] == 1
    assert after(lambda: paint.paint((5, 32, 32), 0))  # erasing
    assert paint.data[5, 32, 32] == 0
    assert after(lambda: paint.fill((5, 10, 10), 2))  # the fill bucket
    assert (paint.data[5] == 2).all()
    # napari's undo and redo (Ctrl-Z / Ctrl-Shift-Z call these key bindings)
    assert after(lambda: _labels_key_bindings.undo(paint))
    assert not (paint.data[5] == 2).any()
    assert after(lambda: _labels_key_bindings.redo(paint))
    assert (paint.data[5] == 2).all()
    assert after(paint.undo)
    # boxes: add, move (dragged with the mouse), delete
    shapes = viewer.layers[POSITIVE_LAYER]
    assert after(lambda: widget.add_box((7, 40, 20), positive=True))
    viewer.dims.set_point(0, 7 * VOXEL)  # the box's slice is shown
    start = np.asarray(shapes.data_to_world((7, 40, 20)))
    _drag_shape(shapes, start, start + np.array([0.0, 8 * VOXEL, 4 * VOXEL]))
    moved = [b for b in widget.boxes(True) if b.z == 7]
    assert [(b.y, b.x) for b in moved] == [(48, 24)]
    assert widget.changes.unsaved
    _saved(widget, folder)
    assert load_annotations(folder).positives[-1].y == 48  # the move was saved

    def delete_box() -> None:
        shapes.selected_data = {1}
        shapes.remove_selected()  # the Delete key in select mode

    assert after(delete_box)
    assert len(widget.boxes(True)) == 1
    assert after(lambda: widget.add_box((3, 20, 20), positive=False))
    # a feature name
    widget.feature_value.value = 3
    widget.feature_name.value = "ribosome"
    assert after(widget.name_feature)
    assert load_annotations(folder).class_names[3] == "ribosome"
    assert not after(widget.name_feature)  # the same name again changes nothing


# -- leaving asks ---------------------------------------------------------------------------------
def _close_event(window) -> bool:
    """Send the main window the close event its close button (or File > Close Window)
    sends; returns whether it was accepted, i.e. whether Qt would now close the window.
    (Sent directly, so an accepted event does not also delete the window under the test.)"""
    from qtpy.QtGui import QCloseEvent
    from qtpy.QtWidgets import QApplication

    event = QCloseEvent()
    with patch.object(window, "_save_current_window_settings"):  # not the user's settings
        QApplication.sendEvent(window, event)
    return event.isAccepted()


def test_closing_the_viewer_with_unsaved_annotations_asks(make_napari_viewer, tmp_path, answers):
    viewer = make_napari_viewer(show=True)
    tomo = _open(viewer, _tomogram_file(tmp_path))
    widget = _boxes_widget(viewer, tomo)
    window = widget.changes.close_guard_window
    assert window is not None and window.isVisible()
    widget.add_box((5, 32, 32), positive=True)
    viewer.layers[PAINT_LAYER].paint((5, 32, 32), 1)

    answers.reply = "cancel"
    window.close()  # the whole way of a close: Cancel keeps the window open
    assert answers.asked == ["Closing the viewer"] and answers.effects == ["discard"]
    assert window.isVisible() and widget.changes.unsaved and len(viewer.layers) == 3
    assert not _close_event(window)

    folder = tmp_path / "saved"
    answers.reply, answers.folder = "save", str(folder)
    assert _close_event(window)  # saved, then closed
    assert answers.folder_asked == 1  # no folder chosen yet: asked for one
    saved = load_annotations(folder)
    assert saved.painting[5, 32, 32] == 1 and len(saved.positives) == 1
    assert not widget.changes.unsaved
    assert _close_event(window) and len(answers.asked) == 3  # saved: no question


def test_discarding_on_close_closes_and_drops_the_autosave(
    make_napari_viewer, qtbot, tmp_path, answers
):
    viewer = make_napari_viewer(show=True)
    tomo = _open(viewer, _tomogram_file(tmp_path))
    widget = _boxes_widget(viewer, tomo)
    widget.add_box((5, 32, 32), positive=True)
    worker = widget.autosaver.save_now()
    with qtbot.waitSignal(worker.finished, timeout=30_000):
        pass
    [folder] = widget.autosaver.folders
    assert folder.is_dir()
    answers.reply = "discard"
    assert _close_event(widget.changes.close_guard_window)
    assert answers.asked == ["Closing the viewer"]
    assert not folder.exists() and not widget.changes.unsaved


def test_closing_from_code_does_not_ask(make_napari_viewer, tmp_path):
    """(an unexpected question fails the test: ``_no_modal_questions``)"""
    viewer = make_napari_viewer(show=True)
    widget = _boxes_widget(viewer, _open(viewer, _tomogram_file(tmp_path)))
    widget.add_box((5, 32, 32), positive=True)
    assert widget.changes.unsaved and widget.changes.close_guard_window is not None
    viewer.close()  # a script closing its viewer is not asked (as napari does not ask)


def test_deleting_an_annotation_layer_with_unsaved_changes_asks(
    make_napari_viewer, tmp_path, answers
):
    viewer = make_napari_viewer(show=True)
    tomo = _open(viewer, _tomogram_file(tmp_path))
    widget = _boxes_widget(viewer, tomo)
    widget.add_box((5, 32, 32), positive=True)
    delete_button = viewer.window._qt_viewer.layerButtons.deleteButton
    viewer.layers.selection = {viewer.layers[PAINT_LAYER]}
    answers.reply = "cancel"
    delete_button.click()
    assert answers.asked == ["Deleting 'painting'"] and answers.effects == ["discard"]
    assert PAINT_LAYER in viewer.layers
    viewer.layers.selection = {tomo}  # not an annotation layer: no question
    delete_button.click()
    assert tomo not in viewer.layers and len(answers.asked) == 1
    viewer.layers.selection = {viewer.layers[POSITIVE_LAYER], viewer.layers[PAINT_LAYER]}
    answers.reply = "discard"
    delete_button.click()
    assert answers.asked[-1] == "Deleting 'positive boxes', 'painting'"  # in layer order
    assert POSITIVE_LAYER not in viewer.layers and PAINT_LAYER not in viewer.layers


# -- autosave -------------------------------------------------------------------------------------
def test_autosave_runs_while_unsaved_on_its_timer_and_when_training_starts(
    make_napari_viewer, qtbot, tmp_path, one_torch_thread
):
    viewer = make_napari_viewer()
    tomo = _open(viewer, _tomogram_file(tmp_path))
    widget = _boxes_widget(viewer, tomo)
    saver = widget.autosaver
    assert saver.timer.isActive()
    assert saver.timer.interval() == int(autosave.AUTOSAVE_INTERVAL_S * 1000)
    assert saver.save_now() is None  # nothing to keep yet
    source = str(tomo.metadata["source_path"])

    widget.add_box((5, 32, 32), positive=True)
    widget.add_box((6, 20, 40), positive=False)
    paint = viewer.layers[PAINT_LAYER]
    paint.paint((5, 32, 32), 1)
    saver.timer.setInterval(20)  # the timer writes it (every 3 minutes by default)
    qtbot.waitUntil(lambda: saver.last is not None and saver.worker is None, timeout=30_000)
    info = autosave.find_autosave(source, SHAPE)
    assert info is not None and info.n_positive == 1 and info.n_negative == 1
    kept = autosave.read_autosave(info)
    assert np.array_equal(kept.painting, paint.data)
    first = info.saved
    saver.timer.stop()
    assert saver.save_now() is None  # nothing changed since

    # Train: the annotations changed since the last autosave, so training starts with one
    paint.paint((5, 30, 30), 1)
    train = TrainWidget(viewer)
    train.select_default_layers()
    train.tomogram.value = tomo
    train.iterations.value = 1
    train.batch_size.value = 2
    before = saver.last
    worker = train.start_training()
    # the autosave started with the training (under load it may even be done already)
    assert worker is not None and (saver.worker is not None or saver.last is not before)
    qtbot.waitUntil(lambda: saver.worker is None and train.runner.worker is None, timeout=60_000)
    info = autosave.find_autosave(source, SHAPE)
    assert info.saved > first
    assert np.array_equal(autosave.read_autosave(info).painting, paint.data)

    # saving the annotations makes the autosave unneeded: it is deleted
    widget.save_annotations(tmp_path / "annotations")
    assert autosave.find_autosave(source, SHAPE) is None


_CRASHING_SESSION = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import numpy as np
    import napari
    from qtpy.QtWidgets import QApplication
    from napari_tomoseg._widgets import BoxWidget

    tomogram, out = sys.argv[1], Path(sys.argv[2])
    viewer = napari.Viewer(show=False)
    [tomo] = viewer.open(tomogram, plugin="napari-tomoseg")
    widget = BoxWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.tomogram.value = tomo
    widget.box_size.value = 16
    for centre, positive in (((5, 32, 32), True), ((7, 20, 44), True), ((2, 48, 12), False)):
        widget.add_box(centre, positive)
    widget.feature_value.value = 2
    widget.feature_name.value = "membrane"
    widget.name_feature()
    paint = viewer.layers["painting"]
    paint.brush_size = 7
    paint.paint((5, 32, 32), 2)
    paint.paint((7, 20, 44), 1)
    paint.fill((9, 0, 0), 3)
    widget.autosaver.save_now()
    app = QApplication.instance()
    while widget.autosaver.worker is not None or widget.autosaver.last is None:
        app.processEvents()
        time.sleep(0.01)
    np.save(out / "painting.npy", paint.data)
    boxes = {k: [list(map(int, (b.z, b.y, b.x, b.size))) for b in widget.boxes(k == "pos")]
             for k in ("pos", "neg")}
    (out / "boxes.json").write_text(json.dumps(boxes))
    (out / "autosaved").write_text("yes")
    while True:  # still painting when the machine dies
        app.processEvents()
        time.sleep(0.05)
    """
)


def test_after_a_crash_the_autosave_is_offered_and_restores_exactly(
    make_napari_viewer, qtbot, tmp_path, answers
):
    """A real napari session paints, autosaves and is SIGKILLed; the next one that opens
    the same tomogram offers the autosave, saying when it was saved, and restores the
    painting, the boxes and the feature names exactly."""
    path = _tomogram_file(tmp_path)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    log = tmp_path / "session.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CRASHING_SESSION, str(path), str(tmp_path)],
            env=env,
            stdout=stderr,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 180
            while not (tmp_path / "autosaved").exists() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.1)
            assert (tmp_path / "autosaved").exists(), log.read_text()
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    expected = np.load(tmp_path / "painting.npy")
    boxes = json.loads((tmp_path / "boxes.json").read_text())

    viewer = make_napari_viewer(show=True)
    widget = _boxes_widget(viewer, _open(viewer, path))
    qtbot.waitUntil(lambda: widget.restore_button.visible, timeout=10_000)  # shown docked
    assert widget.discard_button.visible and widget.recovery.visible
    info = widget.offered
    assert info is not None and info.writer.pid == proc.pid
    when = info.saved.astimezone().strftime("%Y-%m-%d %H:%M")
    assert f"saved {when}" in widget.recovery.value
    assert "2 positive, 1 negative boxes" in widget.recovery.value
    assert widget.restore_autosave() is not None
    assert np.array_equal(viewer.layers[PAINT_LAYER].data, expected)
    for key, positive in (("pos", True), ("neg", False)):
        got = [[b.z, b.y, b.x, b.size] for b in widget.boxes(positive)]
        assert got == boxes[key]
    assert viewer.layers[PAINT_LAYER].metadata["class_names"][2] == "membrane"
    assert widget.changes.unsaved  # restored, but not saved in an annotations folder yet
    assert not widget.restore_button.visible
    assert widget.autosaver.save_now() is None  # the autosave is current
    assert len(viewer.layers[NEGATIVE_LAYER].data) == 1
