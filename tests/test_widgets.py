"""The in-viewer workflow in a real napari viewer (Qt; draws under Xvfb in CI)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari.utils.notifications import notification_manager  # noqa: E402

from napari_tomoseg._widgets import (  # noqa: E402
    ApplyWidget,
    BoxWidget,
    ImportWidget,
    MergeWidget,
    PickWidget,
    TrainWidget,
    _common,  # noqa: E402
)
from napari_tomoseg._widgets._boxes import (  # noqa: E402
    NEGATIVE_LAYER,
    PAINT_LAYER,
    POSITIVE_LAYER,
    UNSAVED_MARK,
)
from napari_tomoseg.applying.inference import ApplySettings, apply_network  # noqa: E402
from napari_tomoseg.data.annotations import PAINTING_FILE  # noqa: E402
from napari_tomoseg.data.io import read_tomogram  # noqa: E402
from napari_tomoseg.learning.pretrained import load_pretrained  # noqa: E402
from napari_tomoseg.simulator.demo import boxes_from_ground_truth, central_slices, dice_scores  # noqa: E402
from napari_tomoseg.simulator.synthetic import CLASS_NAMES, SimulationSettings, simulate_tomogram  # noqa: E402


@pytest.fixture(autouse=True)
def _settings_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TOMOSEG_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("TOMOSEG_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _no_modal_questions(monkeypatch):
    """A modal dialog would block the test: every question must be answered by the test
    (the ``answers`` fixture); an unexpected one fails it."""

    def unexpected(*args, **kwargs):
        raise AssertionError(f"unexpected question to the user: {args}")

    monkeypatch.setattr(_common, "ask_unsaved_changes", unexpected)
    monkeypatch.setattr(_common, "ask_annotations_folder", unexpected)


class Answers:
    """Answers the unsaved-annotations question (and the folder question) like a user."""

    def __init__(self) -> None:
        self.reply = "cancel"
        self.folder: str | None = None
        self.asked: list[str] = []
        self.effects: list[str] = []
        self.folder_asked = 0

    def question(self, action: str, parent=None, effect: str = "replace") -> str:
        self.asked.append(action)
        self.effects.append(effect)
        return self.reply

    def choose_folder(self, parent=None) -> str | None:
        self.folder_asked += 1
        return self.folder


@pytest.fixture
def answers(monkeypatch) -> Answers:
    given = Answers()
    monkeypatch.setattr(_common, "ask_unsaved_changes", given.question)
    monkeypatch.setattr(_common, "ask_annotations_folder", given.choose_folder)
    return given


@pytest.fixture
def errors_shown():
    """Collect the error notifications napari shows."""
    seen: list[str] = []

    def record(notification):
        if (
            str(notification.severity) in ("error", "ERROR")
            or "error" in str(notification.severity).lower()
        ):
            seen.append(str(notification.message))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


def _small_tomogram(viewer, shape=(24, 96, 96), seed=3):
    sim = simulate_tomogram(SimulationSettings(shape=shape, seed=seed))
    scale = (sim.voxel_size,) * 3
    layer = viewer.add_image(
        sim.tomogram, name="tomo", scale=scale, metadata={"voxel_size": scale}
    )
    return sim, layer


def test_new_layers_take_the_tomogram_grid(make_napari_viewer):
    viewer = make_napari_viewer()
    _, tomo = _small_tomogram(viewer)
    tomo.translate = (0.0, 50.0, -30.0)
    widget = BoxWidget(viewer)
    widget.tomogram.value = tomo
    box = widget.add_box((12, 40, 50), positive=True)
    paint = viewer.layers[PAINT_LAYER]
    shapes = viewer.layers[POSITIVE_LAYER]
    for layer in (paint, shapes):
        np.testing.assert_allclose(layer.scale, tomo.scale)
        np.testing.assert_allclose(layer.translate, tomo.translate)
    assert paint.data.shape == tomo.data.shape and paint.data.dtype == np.uint8
    assert (box.z, box.y, box.x) == (12, 40, 50)


def test_drawn_rectangles_snap_to_box_size_and_count(make_napari_viewer):
    viewer = make_napari_viewer()
    _, tomo = _small_tomogram(viewer)
    widget = BoxWidget(viewer)
    widget.tomogram.value = tomo
    widget.box_size.value = 32
    layer = widget.box_layer(positive=False)
    layer.add_rectangles(np.array([[5, 10, 10], [5, 10, 70], [5, 60, 70], [5, 60, 10]], float))
    [box] = widget.boxes(positive=False)
    rect = np.asarray(layer.data[0])
    assert rect[:, 1].max() - rect[:, 1].min() == pytest.approx(32)
    assert rect[:, 2].max() - rect[:, 2].min() == pytest.approx(32)
    # drawn centre (35, 40); the 32-px box nearest to it covers pixels 20..51 x 25..56
    assert (box.y0, box.x0, box.y1, box.x1) == (20, 25, 52, 57)
    assert abs(rect[:, 1].mean() - 35) <= 0.5 and abs(rect[:, 2].mean() - 40) <= 0.5
    assert "1 negative" in widget.counts.value
    widget.update_gallery()
    assert widget.gallery.count == 1


def test_click_places_box_on_current_slice(make_napari_viewer):
    viewer = make_napari_viewer()
    _, tomo = _small_tomogram(viewer)
    widget = BoxWidget(viewer)
    widget.tomogram.value = tomo
    widget.click_mode.value = "positive box"

    class Click:
        button = 1
        position = tomo.data_to_world((7, 48, 50))

    widget._on_click(viewer, Click())
    [box] = widget.boxes(positive=True)
    assert (box.z, box.y, box.x) == (7, 48, 50)


def test_import_bins_and_keeps_voxel_size(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _, tomo = _small_tomogram(viewer)
    widget = ImportWidget(viewer)
    widget.source.value = tomo
    widget.shrink.value = 2
    widget.lowpass.value = 40.0
    assert widget.run() is not None
    # (waiting for the worker's finished signal would miss it when the worker is done first)
    qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=60_000)
    binned = viewer.layers[-1]
    assert binned.data.shape == (12, 48, 48)
    np.testing.assert_allclose(binned.scale, np.asarray(tomo.scale) * 2)
    assert binned.metadata["voxel_size"] == pytest.approx(tuple(np.asarray(tomo.scale) * 2))


def test_failing_training_shows_an_error_notification(make_napari_viewer, qtbot, errors_shown):
    viewer = make_napari_viewer()
    _, tomo = _small_tomogram(viewer)
    boxes = BoxWidget(viewer)
    boxes.tomogram.value = tomo
    boxes.box_size.value = 32
    boxes.add_box((12, 48, 48), positive=True)  # a positive box with nothing painted
    train = TrainWidget(viewer)
    train.select_default_layers()
    train.tomogram.value = tomo
    viewer.layers[PAINT_LAYER].data[3, 5, 5] = 1  # painted, but outside every box
    worker = train.start_training()
    assert worker is not None
    qtbot.waitUntil(lambda: not train.runner.running, timeout=60_000)
    assert any("no painted voxels" in m for m in errors_shown), errors_shown
    assert train.train_button.enabled


def test_settings_are_remembered(make_napari_viewer):
    viewer = make_napari_viewer()
    first = TrainWidget(viewer)
    first.iterations.value = 123
    first.learning_rate.value = 0.0005
    second = TrainWidget(viewer)
    assert second.iterations.value == 123
    assert second.learning_rate.value == pytest.approx(0.0005)


def test_the_train_widget_says_which_network_it_starts_from(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 16, 16), np.float32), name="tomo")
    paint = viewer.add_labels(np.zeros((4, 16, 16), np.uint8), name="painting")
    paint.metadata["class_names"] = {0: "background", 1: "membrane"}
    train = TrainWidget(viewer)
    train.painting.value = paint
    train.update_start_info()
    assert train.start_info.value == (
        "starts from: the shipped network 'single_membrane', keeps up to 50% of its weights, "
        "keeps its encoder"  # fine-tune auto: it takes the five slices chosen as they are
    )
    assert train.train_settings().replay == 0.0  # off unless asked
    train.replay.value = 0.5
    assert train.train_settings().replay == 0.5
    assert train.start_info.value.endswith("simulated boxes too, keeps its encoder")
    train.context.value = 0  # one slice: its input layer is fitted, so every layer trains
    assert train.start_info.value.endswith("of its weights, trains on simulated boxes too")
    train.context.value = 2
    assert train.train_settings().fine_tune == "auto"
    train.fine_tune.value = "all"
    assert train.train_settings().fine_tune == "all"
    assert train.start_info.value.endswith("of its weights, trains on simulated boxes too")
    train.fine_tune.value = "auto"
    paint.metadata["class_names"] = {0: "background", 1: "my particle"}
    train.update_start_info()
    assert train.start_info.value == "starts from: random weights (no match)"
    train.start_from.value = "scratch"
    assert train.start_info.value == "starts from: random weights"
    train.fine_tune.value = "decoder"  # nothing to keep: said before training refuses it
    assert train.start_info.value == (
        "starts from: random weights; fine-tune 'decoder' needs a start"
    )


def _network_trained_with(seed: int, validation_fraction: float):
    """A stand-in for a network: what ``TrainSettings.continuing`` reads of one."""
    training = {"seed": seed, "validation_fraction": validation_fraction}
    meta = SimpleNamespace(
        architecture="unet", model_params={"w": 8}, metrics={"training": training}
    )
    return SimpleNamespace(meta=meta)


def test_continuing_the_current_network_keeps_what_it_was_trained_with(
    make_napari_viewer, monkeypatch
):
    current = _common.Session()
    monkeypatch.setattr(_common, "_SESSION", current)
    assert _common.session() is current
    current.set_network(_network_trained_with(5, 0.25), "just trained")
    train = TrainWidget(make_napari_viewer())
    train.continue_current.value = True
    train.architecture.value = "unet-lite"
    train.iterations.value = 7
    settings = train.train_settings(train._initial_network())
    assert (settings.architecture, settings.model_params, settings.iterations) == (
        "unet",
        {"w": 8},
        7,
    )
    assert (settings.seed, settings.validation_fraction) == (5, 0.25)  # same boxes held out


def test_the_session_says_when_it_hands_on_a_network():
    current, seen = _common.Session(), []
    current.network_changed.connect(lambda network, source: seen.append((network, source)))
    network = _network_trained_with(0, 0.2)
    current.set_network(network, "just trained")
    assert seen == [(network, "just trained")] and current.network is network


def test_the_apply_widget_says_when_a_network_of_this_session_is_ready(
    make_napari_viewer, monkeypatch
):
    current = _common.Session()
    monkeypatch.setattr(_common, "_SESSION", current)
    apply = ApplyWidget(make_napari_viewer())
    network = SimpleNamespace(meta=SimpleNamespace(class_names=("background", "membrane")))
    current.set_network(network, "just trained")
    assert apply.status.value == "Ready: the network just trained (membrane)."
    apply.source.value = "network file"  # another source chosen: the status stays as it is
    apply.status.value = ""
    current.set_network(network, "trained by the demo")
    assert apply.status.value == ""


def test_the_apply_widget_applies_in_the_slice_planes_chosen(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    sim, tomo = _small_tomogram(viewer)
    apply = ApplyWidget(viewer)
    apply.source.value = "shipped network"
    apply.shipped.value = "single_membrane"
    apply.tomogram.value = tomo
    network = load_pretrained("single_membrane")
    for choice, planes in (("XY", 1), ("XY + XZ + YZ", 3)):
        apply.planes.value = choice
        apply.layers_added = []
        assert apply.run() is not None
        # The layers arrive with the worker's result, a moment before it finishes.
        qtbot.waitUntil(
            lambda: len(apply.layers_added) == 2 and not apply.runner.running, timeout=120_000
        )
        direct = apply_network(
            network, sim.tomogram, voxel_size=sim.voxel_size, settings=ApplySettings(planes=planes)
        )
        assert np.array_equal(apply.layers_added[-1].data, direct.mask), choice


def test_a_destroyed_box_widget_no_longer_follows_the_annotations(make_napari_viewer, qtbot):
    boxes = BoxWidget(make_napari_viewer())
    changes = boxes.changes
    changes.mark_changed()
    assert UNSAVED_MARK in boxes.counts.value  # the counts follow the unsaved state
    changes.mark_saved()
    assert UNSAVED_MARK not in boxes.counts.value
    with qtbot.waitSignal(boxes.native.destroyed):
        boxes.native.deleteLater()
    assert len(changes.unsaved_changed) == 0
    changes.mark_changed()  # would write into the deleted counts label
    assert changes.unsaved


def test_widgets_dock_side_by_side_without_overlap(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    docks = []
    for title in (
        "1. Import tomogram (bin, filter)",
        "2. Boxes and painting",
        "3. Train network",
        "4. Apply network",
        "5. Merge features",
        "6. Render and pick",
    ):
        dock, _ = viewer.window.add_plugin_dock_widget("napari-tomoseg", title)
        docks.append(dock)
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()
    visible = [d for d in docks if d.isVisible() and not d.visibleRegion().isEmpty()]
    assert len(visible) == len(docks), [d.name for d in docks if d not in visible]
    rects = [d.geometry() for d in visible]
    for i in range(len(rects)):
        for j in range(i + 1, len(rects)):
            assert not rects[i].intersects(rects[j]), (docks[i].name, docks[j].name)


@pytest.mark.slow
def test_end_to_end_in_the_viewer(make_napari_viewer, qtbot, tmp_path):
    """Sample -> boxes -> paint -> train (worker) -> apply -> merge two features -> pick."""
    viewer = make_napari_viewer()
    image, truth = viewer.open_sample("napari-tomoseg", "simulated_cell")
    assert image.metadata["voxel_size"] == pytest.approx((10.0, 10.0, 10.0))
    labels = np.asarray(truth.data)
    membrane = CLASS_NAMES.index("single_membrane")
    ribosome = CLASS_NAMES.index("ribosome")

    # Boxes through the widget: the cursor goes where a user would click.
    boxes = BoxWidget(viewer)
    boxes.tomogram.value = image
    pos_mem, negatives = boxes_from_ground_truth(labels, membrane, n_positive=6, n_negative=16)
    pos_rib, _ = boxes_from_ground_truth(labels, ribosome, n_positive=6, n_negative=0, seed=1)
    for box in pos_mem + pos_rib:
        viewer.cursor.position = image.data_to_world((box.z, box.y, box.x))
        boxes.add_box_at_cursor(positive=True)
    for box in negatives:
        boxes.add_box((box.z, box.y, box.x), positive=False)
    assert len(viewer.layers[POSITIVE_LAYER].data) == 12
    assert len(viewer.layers[NEGATIVE_LAYER].data) == 16

    # Paint both features from the ground truth, named like a user would.
    paint = viewer.layers[PAINT_LAYER]
    for value, name in ((1, "single membrane"), (2, "ribosome")):
        boxes.feature_value.value = value
        boxes.feature_name.value = name
        boxes.name_feature()
    painted = np.zeros_like(paint.data)
    painted[labels == membrane] = 1
    painted[labels == ribosome] = 2
    paint.data = painted

    # Train in a worker; the event loop must keep running meanwhile.
    train = TrainWidget(viewer)
    train.select_default_layers()
    train.tomogram.value = image
    train.iterations.value = 250
    train.ncopy.value = 4
    ticks = []
    from qtpy.QtCore import QTimer

    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(train.runner.running))
    timer.start(50)
    worker = train.start_training()
    assert worker is not None
    qtbot.waitUntil(lambda: train.result is not None, timeout=600_000)
    qtbot.waitUntil(lambda: not train.runner.running, timeout=10_000)
    timer.stop()
    assert sum(ticks) > 20, "the event loop stalled while training"
    assert train.events_seen > 100
    assert train.preview is not None and train.preview.image is not None
    assert "training preview" not in viewer.layers  # a dock widget, not a layer
    assert train.result.network.meta.class_names == ("background", "single membrane", "ribosome")
    saved = train.save_network(tmp_path / "net.tsnet")
    assert saved is not None and saved.is_file()

    # Apply: two probability maps and a mask on the tomogram's grid.
    apply = ApplyWidget(viewer)
    apply.tomogram.value = image
    worker = apply.run()
    assert worker is not None
    qtbot.waitUntil(lambda: len(apply.layers_added) == 3, timeout=600_000)
    prob_mem, prob_rib, mask_layer = apply.layers_added
    np.testing.assert_allclose(mask_layer.scale, image.scale)
    assert mask_layer.metadata["class_names"][2] == "ribosome"

    # Merge the two features.
    merge = MergeWidget(viewer)
    assert len(merge.rows) == 2
    merged = merge.merge()
    assert merged is not None
    # Scored over the slices the boxes come from (the top and bottom of a tomogram are the
    # worst reconstructed and hold no box).
    z0, z1 = central_slices(painted.shape[0])
    mask, truth_painted = np.asarray(merged.data)[z0:z1], painted[z0:z1]
    dice = dice_scores(mask, truth_painted, [1, 2])
    # Chance: the Dice of calling every voxel the feature, 2p / (1 + p).
    chance = {
        v: 2 * (truth_painted == v).mean() / (1 + (truth_painted == v).mean()) for v in (1, 2)
    }
    assert dice[1] > max(0.3, 3 * chance[1]), (dice, chance)
    assert dice[2] > max(0.3, 3 * chance[2]), (dice, chance)
    out = merge.save(tmp_path / "merged.mrc")
    assert out is not None and out.is_file()

    # Pick ribosomes into a Points layer and export them.
    pick = PickWidget(viewer)
    pick.segmentation.value = merged
    pick.feature.value = 2
    points = pick.pick()
    assert points is not None and len(points.data) > 0
    star = pick.export(tmp_path / "ribosomes.star")
    assert star is not None and star.is_file()


def test_annotations_save_and_restore(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    _, tomo = _small_tomogram(viewer)
    widget = BoxWidget(viewer)
    widget.tomogram.value = tomo
    widget.box_size.value = 32
    widget.add_box((10, 40, 40), positive=True)
    widget.add_box((12, 60, 60), positive=False)
    widget.feature_name.value = "vesicle"
    widget.name_feature()
    viewer.layers[PAINT_LAYER].data[10, 35:45, 35:45] = 1
    folder = widget.save_annotations(tmp_path / "session")
    assert folder is not None

    fresh = make_napari_viewer()
    _, tomo2 = _small_tomogram(fresh)
    restored = BoxWidget(fresh)
    restored.tomogram.value = tomo2
    assert restored.load_annotations(tmp_path / "session") is not None
    paint = fresh.layers[PAINT_LAYER]
    np.testing.assert_array_equal(paint.data, viewer.layers[PAINT_LAYER].data)
    assert paint.metadata["class_names"][1] == "vesicle"
    assert restored.boxes(True) == widget.boxes(True)
    assert restored.boxes(False) == widget.boxes(False)


def test_copy_prediction_can_be_undone(make_napari_viewer, answers):
    answers.reply = "discard"  # the new box is not saved: the copy asks first
    viewer = make_napari_viewer()
    _, tomo = _small_tomogram(viewer)
    boxes = BoxWidget(viewer)
    boxes.tomogram.value = tomo
    boxes.box_size.value = 32
    boxes.add_box((10, 40, 40), positive=True)
    paint = viewer.layers[PAINT_LAYER]
    paint.data[10, 30:50, 30:50] = 1  # the user's work
    before = np.array(paint.data)
    predicted = np.zeros(tomo.data.shape, np.uint8)
    predicted[10, 24:40, 24:40] = 2
    mask = viewer.add_labels(predicted, name="prediction", scale=tomo.scale)
    train = TrainWidget(viewer)
    train.select_default_layers()
    train.copy_from.value = mask
    assert train.copy_prediction() == 16 * 16
    assert answers.asked == ["Copying the prediction into the painting"]
    assert (paint.data[10, 24:40, 24:40] == 2).all()
    train.undo_copy()
    np.testing.assert_array_equal(paint.data, before)
    assert len(answers.asked) == 1  # nothing corrected since the copy: the undo just undoes


def test_preview_mosaic_lays_out_box_label_output():
    from napari_tomoseg._widgets._train import preview_mosaic

    n, h, w = 5, 8, 8
    stack = np.zeros((3 * n, h, w), np.float32)
    stack[0::3], stack[1::3], stack[2::3] = 0.1, 0.6, 0.9  # box, label, output
    mosaic = preview_mosaic(stack, per_row=4, gap=2)
    assert mosaic.ndim == 2
    assert mosaic.shape[0] == 2 * (h + 4)  # 5 samples, 4 a row: 2 rows
    first_row = mosaic[:h]
    assert np.isclose(first_row[:, :w], 0.1).all()
    assert np.isclose(first_row[:, w + 2 : 2 * w + 2], 0.6).all()
    assert np.isclose(first_row[:, 2 * w + 4 : 3 * w + 4], 0.9).all()


def _one_box_training(viewer):
    """A small tomogram with one positive and one negative box and a painted stroke, and a
    train widget set up on it (unet-lite)."""
    _, tomo = _small_tomogram(viewer, shape=(24, 96, 96), seed=3)
    boxes = BoxWidget(viewer)
    boxes.tomogram.value = tomo
    boxes.box_size.value = 32
    boxes.add_box((12, 48, 48), positive=True)
    boxes.add_box((12, 20, 20), positive=False)
    viewer.layers[PAINT_LAYER].data[12, 40:56, 46:50] = 1
    train = TrainWidget(viewer)
    train.select_default_layers()
    train.tomogram.value = tomo
    train.architecture.value = "unet-lite"
    return train


def test_stop_button_stops_training_and_keeps_the_network(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    train = _one_box_training(viewer)
    train.iterations.value = 100_000  # far more than the test will wait for
    train.ncopy.value = 2
    train.start_training()
    qtbot.waitUntil(lambda: train.events_seen > 5, timeout=120_000)
    train.stop_button.changed.emit(True)  # what a click on Stop does
    qtbot.waitUntil(lambda: not train.runner.running, timeout=120_000)
    assert train.result is not None and train.result.stopped
    assert len(train.result.history) < 1000
    assert train.train_button.enabled and not train.stop_button.enabled


def test_stopped_training_is_offered_for_resuming_and_finishes(
    make_napari_viewer, qtbot, tmp_path, one_torch_thread
):
    viewer = make_napari_viewer()
    train = _one_box_training(viewer)
    train.iterations.value = 40
    train.batch_size.value = 4
    train.ncopy.value = 2
    path = train.checkpoint_path()
    assert path.parent == tmp_path / "cache" / "checkpoints" and path.name.startswith("tomo-")
    assert not train.resume.enabled and not train.resume.value

    train.start_training()
    qtbot.waitUntil(lambda: train.events_seen > 4, timeout=120_000)
    train.stop_button.changed.emit(True)
    qtbot.waitUntil(lambda: not train.runner.running, timeout=120_000)
    stopped_at = len(train.result.history)
    assert train.result.stopped and 0 < stopped_at < 40 and path.is_file()
    # the interrupted run is offered, ticked, with where it stopped
    assert train.resume.enabled and train.resume.value
    assert f"mini-batch {stopped_at} of 40" in train.resume.text

    train.start_training()
    qtbot.waitUntil(lambda: not train.runner.running, timeout=120_000)
    qtbot.waitUntil(lambda: train.result is not None and not train.result.stopped, timeout=10_000)
    assert train.result.metadata["resumed_from_step"] == stopped_at
    assert [h["step"] for h in train.result.history] == list(range(1, 41))
    assert not path.exists()  # finished: the checkpoint is gone, nothing to resume
    assert not train.resume.enabled and train.resume.text == "resume interrupted training"


def _boxes_with_painting(viewer, tmp_path):
    """A box widget with one positive box and some painting, saved in tmp_path/'saved'."""
    _, tomo = _small_tomogram(viewer)
    widget = BoxWidget(viewer)
    widget.tomogram.value = tomo
    widget.box_size.value = 32
    widget.add_box((10, 40, 40), positive=True)
    paint = viewer.layers[PAINT_LAYER]
    paint.paint((10, 40, 40), 1)  # a brush stroke, as the user paints
    assert UNSAVED_MARK in widget.counts.value
    assert widget.save_annotations(tmp_path / "saved") is not None
    assert UNSAVED_MARK not in widget.counts.value
    return widget, paint


def test_load_asks_before_replacing_unsaved_annotations(make_napari_viewer, tmp_path, answers):
    viewer = make_napari_viewer()
    widget, paint = _boxes_with_painting(viewer, tmp_path)
    saved = np.array(paint.data)
    saved_file = (tmp_path / "saved" / PAINTING_FILE).read_bytes()

    # Nothing changed since the save: Load just loads.
    assert widget.load_annotations(tmp_path / "saved") is not None
    assert answers.asked == []

    # Paint more: the counts line says so, and Load asks first.
    paint.paint((10, 50, 50), 2)
    assert widget.counts.value.endswith(UNSAVED_MARK)
    edited = np.array(paint.data)
    assert not np.array_equal(edited, saved)

    answers.reply = "cancel"  # nothing changes
    assert widget.load_annotations(tmp_path / "saved") is None
    assert answers.asked == ["Loading annotations"]
    np.testing.assert_array_equal(paint.data, edited)
    assert len(viewer.layers[POSITIVE_LAYER].data) == 1
    assert UNSAVED_MARK in widget.counts.value

    answers.reply = "discard"  # loads without saving anything
    assert widget.load_annotations(tmp_path / "saved") is not None
    np.testing.assert_array_equal(paint.data, saved)
    assert (tmp_path / "saved" / PAINTING_FILE).read_bytes() == saved_file
    assert UNSAVED_MARK not in widget.counts.value

    paint.paint((10, 50, 50), 2)
    widget.add_box((12, 60, 60), positive=False)
    edited = np.array(paint.data)
    widget.folder.value = tmp_path / "work"  # the annotations folder Save writes to
    answers.reply = "save"  # saves into the annotations folder, then loads
    assert widget.load_annotations(tmp_path / "saved") is not None
    assert answers.asked == ["Loading annotations"] * 3
    kept = read_tomogram(tmp_path / "work" / PAINTING_FILE).data
    np.testing.assert_array_equal(kept, edited)
    assert (tmp_path / "work" / "negative_boxes.csv").read_text().count("\n") == 2
    np.testing.assert_array_equal(paint.data, saved)
    assert len(viewer.layers[NEGATIVE_LAYER].data) == 0
    assert UNSAVED_MARK not in widget.counts.value


def test_copy_prediction_asks_and_save_asks_for_a_folder(make_napari_viewer, tmp_path, answers):
    viewer = make_napari_viewer()
    boxes, paint = _boxes_with_painting(viewer, tmp_path)
    predicted = np.zeros(paint.data.shape, np.uint8)
    predicted[10, 24:56, 24:56] = 3
    mask = viewer.add_labels(predicted, name="prediction", scale=paint.scale)
    train = TrainWidget(viewer)
    train.select_default_layers()
    train.copy_from.value = mask

    # Saved just now: the copy does not ask.
    assert train.copy_prediction() == 32 * 32 and answers.asked == []
    assert UNSAVED_MARK in boxes.counts.value  # the copy is an unsaved change
    paint.paint((10, 30, 30), 1)  # a correction of the copied prediction
    corrected = np.array(paint.data)

    answers.reply = "cancel"  # undoing would replace the correction: asked, and cancelled
    assert train.undo_copy() == 0
    assert answers.asked == ["Undoing the copy"]
    np.testing.assert_array_equal(paint.data, corrected)
    assert train.undo_copy_button.enabled

    answers.reply = "cancel"
    assert train.copy_prediction() == 0
    np.testing.assert_array_equal(paint.data, corrected)

    # Save with no annotations folder chosen: the user is asked for one.
    assert str(boxes.folder.value) == "."  # none chosen yet
    answers.reply, answers.folder = "save", None  # ... and cancels it: nothing happens
    assert train.copy_prediction() == 0
    assert answers.folder_asked == 1 and str(boxes.folder.value) == "."
    np.testing.assert_array_equal(paint.data, corrected)
    answers.folder = str(tmp_path / "chosen")  # ... and chooses one: saved, then copied
    assert train.copy_prediction() == 32 * 32
    assert answers.folder_asked == 2 and str(boxes.folder.value) == answers.folder
    np.testing.assert_array_equal(
        read_tomogram(tmp_path / "chosen" / PAINTING_FILE).data, corrected
    )
    assert (paint.data[10, 24:56, 24:56] == 3).all()


def test_an_unchosen_annotations_folder_is_not_remembered_as_one(make_napari_viewer):
    viewer = make_napari_viewer()
    first = BoxWidget(viewer)
    first.box_size.value = 48  # remembered settings are written
    assert str(first.folder.value) == "."
    second = BoxWidget(viewer)
    assert second.box_size.value == 48
    assert str(second.folder.value) == "."  # not the working folder: Save will ask


def test_suggested_boxes_are_shown_and_accepted_with_one_click(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _, tomo = _small_tomogram(viewer)
    boxes = BoxWidget(viewer)
    boxes.tomogram.value = tomo
    boxes.box_size.value = 32
    boxes.add_box((12, 24, 24), positive=True)
    boxes.add_box((4, 70, 70), positive=False)
    prob = np.zeros(tomo.data.shape, np.uint8)
    prob[12, 60:90, 10:40] = 230  # fires strongly far from the positive box
    prob[18, 10:40, 60:90] = 150  # and more weakly elsewhere
    prob[12, 10:40, 10:40] = 255  # on the positive box itself: the feature, no suggestion
    viewer.add_image(
        prob, name="p", scale=tomo.scale, metadata={"tomoseg_probability": True, "threshold": 0.4}
    )
    panel = boxes.suggestions
    panel.probability.reset_choices()
    panel.probability.value = viewer.layers["p"]
    panel.number.value = 5
    assert panel.start() is not None
    qtbot.waitUntil(lambda: not panel.runner.running, timeout=60_000)
    first, second = panel.pending[:2]
    assert (first.box.z, second.box.z) == (12, 18)
    assert len(viewer.layers["suggested boxes"].data) == len(panel.pending)
    assert viewer.dims.point[0] == pytest.approx(tomo.data_to_world((12, 0, 0))[0])
    panel.decide("negative")
    negatives = boxes.boxes(positive=False)
    assert any((b.z, b.y, b.x) == (12, first.box.y, first.box.x) for b in negatives)
    panel.decide("positive")
    assert any(b.z == 18 for b in boxes.boxes(positive=True))
    while panel.pending:
        panel.decide("reject")
    assert len(viewer.layers["suggested boxes"].data) == 0
    assert not panel.reject.enabled
