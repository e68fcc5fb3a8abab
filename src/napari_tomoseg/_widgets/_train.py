"""Training: build the training set from the boxes and train, in a worker thread.

Progress bar, a live loss / validation Dice plot, a Stop button that keeps the best network
so far, errors as notifications.  Each run keeps a checkpoint per tomogram in the user's
cache folder (``~/.cache/napari-tomoseg/checkpoints``) until it finishes; when one exists
(a run stopped, or napari closed or crashed), "resume interrupted training" continues it.
When done the training preview (box, manual label, network output for each sample) opens
in a dock widget of its own (not a layer, so the view does not move) and the network can
be saved.  "Copy prediction" puts the network's answer
into the painting inside the boxes (or on the current slice) for the user to correct before
retraining.
"""

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

from .._layers import layer_voxel_size
from ..data.boxes import box_from_shape
from ..errors import TomosegError
from ..learning.checkpoint import default_checkpoint_path, read_checkpoint_meta
from ..learning.model_file import load_network, read_network_meta, save_network
from ..learning.models import DEFAULT_ARCHITECTURE, available
from ..learning.pretrained import AUTO, SCRATCH, match, shipped_file
from ..learning.pretrained import available as shipped_networks
from ..learning.training import (
    FINE_TUNE_CHOICES,
    MAX_REPLAY,
    TrainSettings,
    auto_keeps_encoder,
    fine_tune_described,
    iter_train,
    kept_described,
)
from ..learning.trainset import TrainsetSettings, build_training_set
from ..progress import Progress
from ..simulator.replay import SimulatedReplay
from ..simulator.replay import described as replay_described
from ._boxes import NEGATIVE_LAYER, PAINT_LAYER, POSITIVE_LAYER
from ._common import (
    RememberedSettings,
    TaskRunner,
    describe_error,
    follow_layers,
    is_chosen,
    layer_choices,
    layer_volume,
    notify_error,
    notify_info,
    session,
    source_of,
)
from ._plot import LinePlot
from ._preview import PREVIEW_DOCK, PreviewPanel

if TYPE_CHECKING:
    import napari

RESUME_TEXT = "resume interrupted training"


def class_names_from_layer(labels_layer: Any, labels: np.ndarray) -> tuple[str, ...]:
    """Class names 0..K for the painted values, from the layer's metadata where named."""
    named = {int(k): str(v) for k, v in (labels_layer.metadata.get("class_names") or {}).items()}
    top = max([int(labels.max())] + [k for k in named if k > 0])
    if top < 1:
        raise TomosegError(
            f"Nothing is painted in '{labels_layer.name}': paint the feature inside the "
            "positive boxes first."
        )
    return tuple(named.get(v, "background" if v == 0 else f"feature {v}") for v in range(top + 1))


def preview_mosaic(stack: np.ndarray, per_row: int = 4, gap: int = 4) -> np.ndarray:
    """(N*3, H, W) box/label/output panels -> one 2D image: ``per_row`` samples a row, each
    sample as box | manual label | network output (EMAN2's trainout, laid out flat)."""
    n3, h, w = stack.shape
    n = n3 // 3
    rows = max(1, -(-n // per_row))
    sample_w = 3 * w + 2 * gap
    mosaic = np.full((rows * (h + 2 * gap), per_row * (sample_w + 3 * gap)), 0.5, np.float32)
    for i in range(n):
        y0 = (i // per_row) * (h + 2 * gap)
        x0 = (i % per_row) * (sample_w + 3 * gap)
        for panel in range(3):
            x = x0 + panel * (w + gap)
            mosaic[y0 : y0 + h, x : x + w] = stack[3 * i + panel]
    return mosaic


class TrainWidget(Container):
    """Build the training set and train a network from the boxes and the painting."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self._make_layer_choices(viewer)
        self._make_trainset_fields()
        self._make_training_fields()
        self._make_result_fields(viewer)
        self._lay_out()
        self.remembered = RememberedSettings(
            "train",
            {
                "ncopy": self.ncopy,
                "normalisation": self.normalisation,
                "context": self.context,
                "architecture": self.architecture,
                "iterations": self.iterations,
                "learning_rate": self.learning_rate,
                "batch_size": self.batch_size,
                "start_from": self.start_from,
                "replay": self.replay,
                "fine_tune": self.fine_tune,
            },
        )
        self.runner = TaskRunner("Training")
        self.result: Any = None
        self.preview: PreviewPanel | None = None
        self._resuming = False
        self.events_seen = 0
        # (painting, region, what the copy replaced, what it wrote) per region
        self._undo: list[tuple[Any, tuple[Any, ...], np.ndarray, np.ndarray]] = []
        self.changes = session().annotations(viewer)
        self._connect(viewer)
        self.select_default_layers()
        self.update_resume()
        self.update_start_info()

    # -- fields ---------------------------------------------------------------------------
    def _make_layer_choices(self, viewer: napari.viewer.Viewer) -> None:
        """The layers training reads: the tomogram, the painting and the boxes."""
        self.tomogram = ComboBox(label="tomogram", choices=layer_choices(viewer, "image"))
        self.painting = ComboBox(label="painting", choices=layer_choices(viewer, "labels"))
        self.positive = ComboBox(label="positive boxes", choices=layer_choices(viewer, "shapes"))
        self.negative = ComboBox(
            label="negative boxes", choices=layer_choices(viewer, "shapes"), nullable=True
        )

    def _make_trainset_fields(self) -> None:
        """How the training set is built from the boxes (``TrainsetSettings``)."""
        self.ncopy = SpinBox(
            label="ncopy",
            value=TrainsetSettings.ncopy,
            min=1,
            max=100,
            tooltip="Rotated/flipped copies per negative box; positives are "
            "copied to balance them.",
        )
        self.normalisation = ComboBox(
            label="normalise per",
            choices=["tomogram", "box"],
            value=TrainsetSettings.normalisation,
        )
        self.context = SpinBox(
            label="context slices",
            value=TrainsetSettings.context_slices,
            min=0,
            max=5,
            tooltip="Neighbouring slices on each side used as extra input channels "
            "(2.5D; 2 as the shipped networks); 0 = single slices, as EMAN2.",
        )

    def _make_training_fields(self) -> None:
        """The network and how it is trained (``TrainSettings``), where it starts from, and
        the Train and Stop buttons."""
        self.architecture = ComboBox(
            label="network", choices=available(), value=DEFAULT_ARCHITECTURE
        )
        self.iterations = SpinBox(
            label="iterations", value=TrainSettings.iterations, min=1, max=1_000_000
        )
        self.learning_rate = FloatSpinBox(
            label="learning rate", value=TrainSettings.learning_rate, min=1e-6, max=1.0, step=1e-4
        )
        self.learning_rate.native.setDecimals(6)
        self.batch_size = SpinBox(
            label="batch size", value=TrainSettings.batch_size, min=1, max=1024
        )
        self.continue_from = FileEdit(
            label="continue from",
            mode="r",
            filter="*.tsnet",
            nullable=True,
            value=None,
            tooltip="Continue training a saved network (use a smaller learning rate, e.g. 1e-4).",
        )
        self.start_from = ComboBox(
            label="start from",
            choices=[AUTO, SCRATCH, *shipped_networks()],
            value=TrainSettings.start_from,
            tooltip="auto: a network shipped with napari-tomoseg (trained on simulated "
            "tomograms) when one knows the painted features by name; scratch: random weights",
        )
        self.start_info = Label(value="")
        self.replay = FloatSpinBox(
            label="replay",
            value=TrainSettings.replay,
            min=0.0,
            max=MAX_REPLAY,
            step=0.25,
            tooltip="From a shipped network: also train on boxes of tomograms simulated as "
            "its pretraining drew them, this many times your samples (0.5: half as many). "
            "Helps where you paint as the simulator labels; off (0) by default.",
        )
        self.fine_tune = ComboBox(
            label="fine-tune",
            choices=list(FINE_TUNE_CHOICES),
            value=TrainSettings.fine_tune,
            tooltip="From a shipped network: all trains every layer; decoder keeps the "
            "network's encoder (what it learnt to see in many simulated tomograms) as shipped "
            "and trains the rest; auto: decoder when the network takes the context slices "
            "chosen here as they are, all otherwise.",
        )
        self.continue_current = CheckBox(label="continue the current network", value=False)
        self.resume = CheckBox(
            label=RESUME_TEXT,
            value=False,
            enabled=False,
            tooltip="Continue the interrupted run of this tomogram from its last checkpoint "
            "(same boxes, painting and settings). Untick to start afresh.",
        )
        self.train_button = PushButton(text="Train")
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.status = Label(value="")

    def _make_result_fields(self, viewer: napari.viewer.Viewer) -> None:
        """What is done with the result: save it, copy its prediction into the painting."""
        self.save_path = FileEdit(label="save network as", mode="w", filter="*.tsnet")
        self.save_button = PushButton(text="Save network", enabled=False)
        self.copy_scope = ComboBox(
            label="copy prediction", choices=["positive boxes", "current slice"]
        )
        self.copy_from = ComboBox(
            label="from mask", choices=layer_choices(viewer, "labels"), nullable=True
        )
        self.copy_button = PushButton(text="Copy prediction into painting")
        self.undo_copy_button = PushButton(text="Undo the copy", enabled=False)

    def _lay_out(self) -> None:
        """The fields in order, with the loss plot between training and its result."""
        self.extend(
            [
                self.tomogram,
                self.painting,
                self.positive,
                self.negative,
                self.ncopy,
                self.normalisation,
                self.context,
                self.architecture,
                self.iterations,
                self.learning_rate,
                self.batch_size,
                self.start_from,
                self.start_info,
                self.replay,
                self.fine_tune,
                self.continue_from,
                self.continue_current,
                self.resume,
                self.train_button,
                self.stop_button,
                self.status,
            ]
        )
        self.plot = LinePlot()
        self.native.layout().addWidget(self.plot)
        self.extend(
            [
                self.save_path,
                self.save_button,
                self.copy_scope,
                self.copy_from,
                self.copy_button,
                self.undo_copy_button,
            ]
        )

    def _connect(self, viewer: napari.viewer.Viewer) -> None:
        """The buttons to what they do; the fields that say things to what they follow."""
        self.tomogram.changed.connect(self.update_resume)
        self.painting.changed.connect(self.update_start_info)
        self.start_from.changed.connect(self.update_start_info)
        self.replay.changed.connect(self.update_start_info)
        self.fine_tune.changed.connect(self.update_start_info)
        self.context.changed.connect(self.update_start_info)
        self.train_button.changed.connect(self.start_training)
        self.stop_button.changed.connect(self.runner.stop)
        self.save_button.changed.connect(lambda: self.save_network(self.save_path.value))
        self.copy_button.changed.connect(self.copy_prediction)
        self.undo_copy_button.changed.connect(self.undo_copy)
        follow_layers(
            viewer, self.tomogram, self.painting, self.positive, self.negative, self.copy_from
        )

    def select_default_layers(self, *_: Any) -> None:
        """Pick the layers the box widget made, by their names, when present."""
        self.reset_choices()
        for combo, name in (
            (self.painting, PAINT_LAYER),
            (self.positive, POSITIVE_LAYER),
            (self.negative, NEGATIVE_LAYER),
        ):
            if name in self.viewer.layers:
                combo.value = self.viewer.layers[name]

    # -- settings -------------------------------------------------------------------------
    def trainset_settings(self, box_size: int) -> TrainsetSettings:
        return TrainsetSettings(
            box_size=box_size,
            ncopy=int(self.ncopy.value),
            normalisation=str(self.normalisation.value),
            context_slices=int(self.context.value),
        )

    def train_settings(self, init: Any = None) -> TrainSettings:
        """The settings of the fields, for a new network or to continue ``init`` (then its
        own architecture, seed and validation split: ``TrainSettings.for_run``)."""
        return TrainSettings.for_run(
            init,
            architecture=str(self.architecture.value),
            iterations=int(self.iterations.value),
            learning_rate=float(self.learning_rate.value),
            batch_size=int(self.batch_size.value),
            start_from=str(self.start_from.value),
            replay=float(self.replay.value),
            fine_tune=str(self.fine_tune.value),
        )

    def update_start_info(self, *_: Any) -> None:
        """Say which shipped network training will start from, for the painted features,
        and what of it the run keeps."""
        shipped = self._shipped_start()
        if shipped is None:
            text = self._no_shipped_start()
            if self.fine_tune.value == "decoder":
                text += "; fine-tune 'decoder' needs a start"
        else:
            text = f"the shipped network '{shipped}'"
            if TrainSettings.keep_start > 0:
                text += f", keeps up to {TrainSettings.keep_start:.0%} of its weights"
            if self.replay.value > 0:
                text += ", trains on simulated boxes too"
            if self._keeps_encoder(shipped):
                text += ", keeps its encoder"
        self.start_info.value = f"starts from: {text}"

    def _painted_features(self) -> list[str]:
        paint = self.painting.value
        names = dict((paint.metadata.get("class_names") or {}) if paint is not None else {})
        ordered = sorted(names.items(), key=lambda kv: int(kv[0]))
        return [str(v) for k, v in ordered if int(k) > 0]

    def _shipped_start(self) -> str | None:
        """The shipped network training will start from, or None."""
        choice = str(self.start_from.value)
        if choice == SCRATCH:
            return None
        if choice != AUTO:
            return choice
        features = self._painted_features()
        return match(["background", *features]) if features else None

    def _no_shipped_start(self) -> str:
        if str(self.start_from.value) == SCRATCH:
            return "random weights"
        if not self._painted_features():
            return "name the features to start from a shipped network"
        return "random weights (no match)"

    def _keeps_encoder(self, shipped: str) -> bool:
        """Whether training from the shipped network ``shipped`` keeps its encoder (the
        fine-tune choice; "auto": when it takes the context slices chosen as they are)."""
        if self.fine_tune.value != "auto":
            return self.fine_tune.value == "decoder"
        channels = read_network_meta(shipped_file(shipped)).in_channels
        return auto_keeps_encoder(channels, 2 * int(self.context.value) + 1)

    def _initial_network(self) -> Any:
        if self.continue_current.value:
            if session().network is None:
                raise TomosegError("There is no current network to continue; train one first.")
            return session().network
        path = self.continue_from.value
        if is_chosen(path) and Path(path).is_file():
            return load_network(path)
        return None

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint_path(self) -> Path | None:
        """Where the training run of the chosen tomogram keeps its checkpoint."""
        tomo = self.tomogram.value
        if tomo is None:
            return None
        return default_checkpoint_path(source=source_of(tomo))

    def update_resume(self, *_: Any) -> None:
        """Offer to resume (ticked) when the chosen tomogram has an interrupted run."""
        path = self.checkpoint_path()
        if path is None or not path.is_file():
            self.resume.text, self.resume.value, self.resume.enabled = RESUME_TEXT, False, False
            return
        try:
            meta = read_checkpoint_meta(path)
            total = meta["fingerprint"]["settings"]["iterations"]
            where = f"mini-batch {int(meta['step'])} of {int(total)}"
        except (TomosegError, KeyError, TypeError, ValueError):
            self.resume.text = f"{RESUME_TEXT} (its checkpoint is unreadable)"
            self.resume.value, self.resume.enabled = False, False
            return
        self.resume.text = f"{RESUME_TEXT} (stopped at {where})"
        self.resume.enabled, self.resume.value = True, True

    # -- training -------------------------------------------------------------------------
    def start_training(self, *_: Any) -> Any:
        """Gather the layers and train in a worker thread (autosaving the annotations
        first if they changed)."""
        try:
            task, box_size = self._prepare()
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        self.changes.autosave_now()
        self.update_start_info()
        self.plot.clear()
        self.events_seen = 0
        self.train_button.enabled = False
        self.stop_button.enabled = True
        self.status.value = "building the training set..."
        return self.runner.start(
            task,
            on_done=self._done,
            on_progress=self._progress,
            on_error=self._failed,
            on_finish=self._finished,
        )

    def _prepare(self) -> tuple[Any, int]:
        tomo = self.tomogram.value
        paint = self.painting.value
        pos_layer = self.positive.value
        if tomo is None or paint is None or pos_layer is None:
            raise TomosegError(
                "Choose the tomogram, the painting and the positive boxes "
                "(the box widget makes them)."
            )
        volume = layer_volume(tomo)
        labels = np.asarray(paint.data)
        box_size = _box_size(pos_layer)
        positives = [box_from_shape(s, box_size, i) for i, s in enumerate(pos_layer.data)]
        neg_layer = self.negative.value
        negatives = (
            []
            if neg_layer is None
            else [box_from_shape(s, box_size, i) for i, s in enumerate(neg_layer.data)]
        )
        class_names = class_names_from_layer(paint, labels)
        voxel_size = layer_voxel_size(tomo)
        ts_settings = self.trainset_settings(box_size)
        init = self._initial_network()
        settings = self.train_settings(init)
        source = source_of(tomo)
        checkpoint = self.checkpoint_path()
        resume = bool(self.resume.enabled and self.resume.value)
        if checkpoint is not None:
            try:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                settings.checkpoint = str(checkpoint)
            except OSError:
                resume = False  # no cache folder: train without a checkpoint
        self._resuming = resume

        def task(should_stop: Any) -> Any:
            yield Progress("trainset", 0, 1, message="building the training set")
            trainset = build_training_set(
                volume,
                labels,
                positives,
                negatives,
                ts_settings,
                class_names=class_names,
                voxel_size=voxel_size,
                source=source,
            )
            yield Progress("trainset", 1, 1, message=f"{len(trainset)} samples")
            return (
                yield from iter_train(
                    trainset,
                    settings,
                    init=init,
                    should_stop=should_stop,
                    resume=resume,
                    replay_from=SimulatedReplay(),
                )
            )

        return task, box_size

    def _progress(self, event: Progress) -> None:
        self.events_seen += 1
        if event.stage != "train":
            self.status.value = event.message
            return
        loss = event.metrics.get("loss")
        if loss is not None:
            self.plot.add_point("loss", event.step, loss)
        dice = event.metrics.get("val_mean_dice", event.metrics.get("val_mean_foreground_f1"))
        if dice is not None:
            self.plot.add_point("val Dice", event.step, dice)
        self.status.value = f"step {event.step}/{event.total}" + (
            f", loss {loss:.4f}" if loss is not None else ""
        )

    def _done(self, result: Any) -> None:
        self.result = result
        session().set_network(result.network, "just trained")
        mean_f1 = result.metrics.get("mean_foreground_f1")
        state = "stopped" if result.stopped else "finished"
        text = f"Training {state} in {result.seconds:.0f} s on {result.device}"
        if mean_f1 is not None:
            text += f"; validation Dice {mean_f1:.3f}"
        text += f"; started from {result.metadata.get('started_from', 'random weights')}"
        text += f"; threshold {result.network.meta.threshold:.2f}"
        replayed = replay_described(result.metadata.get("replay"))
        text += f"; {replayed}" if replayed else ""
        for said in (kept_described(result.metadata), fine_tune_described(result.metadata)):
            text += f"; {said}" if said else ""
        self.status.value = text
        self.save_button.enabled = True
        self.show_preview(result)
        notify_info(text)

    def _failed(self, exc: BaseException) -> None:
        if self._resuming and "Cannot resume training" in str(exc):
            self.status.value = f"Could not resume; untick '{RESUME_TEXT}' to start afresh."
        else:
            self.status.value = "Training failed (see the message)."

    def _finished(self) -> None:
        self.train_button.enabled = True
        self.stop_button.enabled = False
        self.update_resume()

    def show_preview(self, result: Any) -> PreviewPanel | None:
        """Show the training preview (box | label | output per sample) in its own dock
        widget: no layer is added, so the scene, the camera and the dims stay as they are."""
        stack = result.preview.as_stack()
        if stack.shape[0] == 0:
            return None
        samples = int(stack.shape[0] // 3)
        panel = self._preview_panel()
        panel.show_image(
            preview_mosaic(stack, per_row=2),
            f"{samples} held-out samples, each as box | your label | network output",
        )
        dock = panel.parentWidget()
        if dock is not None:
            dock.show()
            dock.raise_()
        return panel

    def _preview_panel(self) -> PreviewPanel:
        """The preview dock's panel, docked beside the widgets the first time (or again
        after the user closed it)."""
        window = getattr(self.viewer, "window", None)
        docked = getattr(window, "dock_widgets", {}) if window is not None else {}
        if PREVIEW_DOCK in docked:
            self.preview = docked[PREVIEW_DOCK]
            return self.preview
        self.preview = PreviewPanel()
        if window is not None:
            window.add_dock_widget(self.preview, name=PREVIEW_DOCK, area="right", tabify=True)
        return self.preview

    def undo_copy(self, *_: Any) -> int:
        """Put back the painting that the last "Copy prediction" replaced.

        If the painting was corrected there since (and not saved), asks first: the undo
        would replace the corrections.  Returns the number of voxels put back."""
        edited = any(
            not np.array_equal(np.asarray(paint.data[region]), written)
            for paint, region, _, written in self._undo
        )
        if edited and not self.changes.confirm_replace("Undoing the copy", self.native):
            return 0
        restored = 0
        for paint, region, previous, _ in reversed(self._undo):
            paint.data[region] = previous
            restored += previous.size
            paint.refresh()
        if self._undo:
            self.changes.mark_changed()  # an in-place edit: no layer event
        self._undo = []
        self.undo_copy_button.enabled = False
        return restored

    def save_network(self, path: Any) -> Path | None:
        """Save the network trained last (refuses to overwrite an existing file)."""
        if session().network is None:
            notify_error("Train a network before saving it.")
            return None
        if not is_chosen(path):
            notify_error("Choose a file name for the network (e.g. membrane.tsnet).")
            return None
        path = Path(path)
        if path.suffix != ".tsnet":
            path = (
                path.with_suffix(path.suffix + ".tsnet")
                if path.suffix
                else path.with_suffix(".tsnet")
            )
        try:
            saved = save_network(session().network, path, overwrite=False)
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return None
        notify_info(f"Network saved to {saved}.")
        return saved

    # -- correct and retrain --------------------------------------------------------------
    def copy_prediction(self, *_: Any) -> int:
        """Copy a predicted mask into the painting (inside the positive boxes or on the
        current slice) so the user only corrects it; returns the number of voxels set."""
        try:
            mask_layer = self.copy_from.value
            paint = self.painting.value
            if mask_layer is None or paint is None:
                raise TomosegError(
                    "Choose the predicted mask (apply a network first) and the painting layer."
                )
            if mask_layer.data.shape != paint.data.shape:
                raise TomosegError(f"'{mask_layer.name}' and '{paint.name}' differ in shape.")
            regions: list[tuple[Any, ...]] = []
            if self.copy_scope.value == "current slice":
                z = int(round(paint.world_to_data(self.viewer.dims.point)[0]))
                regions.append((z, slice(None), slice(None)))
            else:
                pos_layer = self.positive.value
                if pos_layer is None or len(pos_layer.data) == 0:
                    raise TomosegError("There are no positive boxes to copy into.")
                size = _box_size(pos_layer)
                regions.extend(
                    box_from_shape(s, size, i).slices() for i, s in enumerate(pos_layer.data)
                )
            if not self.changes.confirm_replace(
                "Copying the prediction into the painting", self.native
            ):
                return 0
            count = 0
            # Keep what the copy replaces, so painted work is never lost ("Undo the copy").
            self._undo = []
            for region in regions:
                previous = np.array(paint.data[region])
                predicted = np.asarray(mask_layer.data[region]).astype(paint.data.dtype)
                paint.data[region] = predicted
                self._undo.append((paint, region, previous, np.array(paint.data[region])))
                count += int(np.count_nonzero(predicted))
            self.undo_copy_button.enabled = True
            self.changes.mark_changed()  # an in-place edit: no layer event
            names = dict(paint.metadata.get("class_names") or {0: "background"})
            for value, name in (mask_layer.metadata.get("class_names") or {}).items():
                names.setdefault(int(value), str(name))
            paint.metadata["class_names"] = names
            paint.refresh()
            notify_info(
                f"Copied {count} predicted voxels into '{paint.name}'; correct them "
                "with the brush, then train again."
            )
            return count
        except TomosegError as exc:
            notify_error(describe_error(exc))
            return 0


def _box_size(layer: Any) -> int:
    """The box size of a box layer: the side of its (snapped) rectangles."""
    if len(layer.data) == 0:
        raise TomosegError(f"'{layer.name}' has no boxes; place some positive boxes first.")
    if layer.metadata.get("box_size"):
        return int(layer.metadata["box_size"])
    first = np.asarray(layer.data[0])
    return int(round(float(first[:, -1].max() - first[:, -1].min())))
