"""Pieces every widget shares: layer lookup, the worker + progress + error pattern,
remembered settings, the per-user folders, the session (:func:`session`) that hands a
trained network from Train to Apply, and the record of unsaved annotations that is checked
before an action replaces them.

The session and the records of unsaved annotations are evented: they tell the widgets of a
change through psygnal signals (``Session.network_changed``,
``AnnotationChanges.unsaved_changed``), which hold a widget's methods weakly, and
:func:`follow` drops a widget's connection when its Qt widget is destroyed, so a closed
widget is never called back."""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets.bases import ValueWidget
from psygnal import Signal, SignalInstance

from ..errors import TomosegError
from ..folders import config_dir
from ..progress import Progress

if TYPE_CHECKING:
    import napari


def source_of(layer: Any) -> str:
    """What names a tomogram layer's data: the file it was read from, else its name."""
    return str((layer.metadata or {}).get("source_path") or layer.name)


class RememberedSettings:
    """Remember the values of a widget's fields between sessions (one JSON file per widget)."""

    def __init__(self, key: str, fields: dict[str, ValueWidget]):
        self.path = config_dir() / f"{key}.json"
        self.fields = fields
        self._restore()
        for widget in fields.values():
            widget.changed.connect(self.save)

    def _restore(self) -> None:
        try:
            stored = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        for name, value in stored.items():
            widget = self.fields.get(name)
            if widget is None:
                continue
            try:
                widget.value = value
            except (ValueError, TypeError):
                continue  # a stale value that no longer fits: keep the default

    def save(self, *_: Any) -> None:
        values = {}
        for name, widget in self.fields.items():
            value = widget.value
            if isinstance(value, Path):
                if value == Path("."):
                    continue  # no file chosen: restoring "." would choose the working folder
                value = str(value)
            if isinstance(value, (str, int, float, bool)) or value is None:
                values[name] = value
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(values, indent=1))
        except OSError:
            pass  # remembering settings is a convenience; never fail the user's work for it


def layers_of_type(viewer: napari.Viewer, kind: str) -> list[Any]:
    """The viewer's layers of one type ('image', 'labels', 'shapes', 'points')."""
    return [layer for layer in viewer.layers if layer._type_string == kind]


def layer_choices(viewer: napari.Viewer, kind: str) -> Callable[[Any], list[tuple[str, Any]]]:
    """A magicgui ``choices`` callable listing the viewer's layers of one type."""

    def choices(_widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in layers_of_type(viewer, kind)]

    return choices


def follow_layers(viewer: napari.Viewer, *widgets: Any) -> None:
    """Refresh the layer choices of ``widgets`` whenever a layer is added or removed."""
    for widget in widgets:
        viewer.layers.events.inserted.connect(widget.reset_choices)
        viewer.layers.events.removed.connect(widget.reset_choices)


def is_chosen(path: Any) -> bool:
    """Whether a file or folder field holds a chosen path (an empty one holds "" or ".")."""
    return bool(path) and str(path) not in ("", ".")


def layer_volume(layer: Any) -> Any:
    """The array a widget computes on: the layer's data, or a multiscale layer's finest
    level.  It is passed on as it is (memory-mapped, dask, Zarr), never read whole here:
    the core reads it a block of slices at a time."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def grid_kwargs(layer: Any) -> dict[str, Any]:
    """scale/translate/units so a new layer lies exactly on another layer's voxel grid."""
    kwargs: dict[str, Any] = {
        "scale": tuple(layer.scale),
        "translate": tuple(layer.translate),
    }
    units = getattr(layer, "units", None)
    if units is not None:
        kwargs["units"] = tuple(str(u) for u in units)
    return kwargs


#: The answers to :func:`ask_unsaved_changes`.
SAVE, DISCARD, CANCEL = "save", "discard", "cancel"


def ask_unsaved_changes(action: str, parent: Any = None, *, effect: str = "replace") -> str:
    """Ask whether to save the annotations before ``action`` replaces them (``effect``
    "replace") or throws them away ("discard"): returns ``"save"``, ``"discard"`` or
    ``"cancel"``.

    A modal message box.  Every such question goes through this one function, so a test (or
    an embedding application) can answer it by replacing it on this module.
    """
    from qtpy.QtWidgets import QMessageBox

    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Warning)
    box.setWindowTitle("Unsaved annotations")
    box.setText("The painting or the boxes have changes that are not saved.")
    box.setInformativeText(f"{action} will {effect} them. Save them first?")
    buttons = QMessageBox.StandardButton
    box.setStandardButtons(buttons.Save | buttons.Discard | buttons.Cancel)
    box.setDefaultButton(buttons.Save)
    box.exec()
    clicked = box.standardButton(box.clickedButton())
    if clicked == buttons.Save:
        return SAVE
    if clicked == buttons.Discard:
        return DISCARD
    return CANCEL


def ask_annotations_folder(parent: Any = None) -> str | None:
    """Ask for the folder to save annotations in; None when the user cancels."""
    from qtpy.QtWidgets import QFileDialog

    chosen = QFileDialog.getExistingDirectory(parent, "Folder for the annotations")
    return chosen or None


class AnnotationChanges:
    """Whether a viewer's annotations (the painting, both box layers and the feature
    names) changed since they were last saved or loaded, and the question asked before an
    action replaces or discards them.

    Layers are followed through their events (Labels ``paint``, ``labels_update`` and
    ``data``, Shapes ``data``) and through Labels ``undo`` / ``redo``, which in napari 0.9
    change the data without an event of their own (``Labels._load_history`` only
    refreshes the view); code that edits a layer's array in place calls
    :meth:`mark_changed`.  ``generation`` counts the changes, so an autosave can tell
    whether it is still current.  ``saver`` (set by the box widget) saves the annotations
    and returns where, or None; ``autosaver`` (also set there) writes the autosave.
    ``unsaved_changed`` is emitted with the new value of ``unsaved`` when it turns.
    """

    unsaved_changed = Signal(bool)

    def __init__(self) -> None:
        self.unsaved = False
        self.generation = 0
        self.saver: Callable[[], Any] | None = None
        self.autosaver: Any = None
        # closing the viewer / deleting layers asks (see _autosave.guard_viewer)
        self.guarded = False
        self.closing_from_code = False
        self._close_guard_window: Callable[[], Any] = lambda: None
        self._watched: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def close_guard_window(self) -> Any:
        """The main window whose closing asks first (held weakly), or None."""
        return self._close_guard_window()

    @close_guard_window.setter
    def close_guard_window(self, window: Any) -> None:
        self._close_guard_window = weakref.ref(window)

    def watch(self, layer: Any) -> None:
        """Follow the edits of an annotation layer (once per layer)."""
        layer = _unproxied(layer)
        if layer is None or layer in self._watched:
            return
        self._watched.add(layer)
        layer.events.data.connect(self.mark_changed)
        for name in ("paint", "labels_update"):
            emitter = getattr(layer.events, name, None)
            if emitter is not None:
                emitter.connect(self.mark_changed)
        for name in ("undo", "redo"):
            method = getattr(layer, name, None)
            if callable(method):
                setattr(layer, name, self._counted(method))

    def watches(self, layer: Any) -> bool:
        return _unproxied(layer) in self._watched

    def _counted(self, method: Callable[[], Any]) -> Callable[[], Any]:
        def edit(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            self.mark_changed()
            return result

        return edit

    def mark_changed(self, *_: Any) -> None:
        self.generation += 1
        self._set(True)

    def mark_saved(self, *_: Any) -> None:
        """The annotations are as saved (just saved, or just loaded)."""
        self._set(False)

    def _set(self, unsaved: bool) -> None:
        changed = unsaved != self.unsaved
        self.unsaved = unsaved
        if changed:
            self.unsaved_changed.emit(unsaved)

    def settle(self, action: str, parent: Any = None, *, effect: str = "replace") -> str:
        """Before ``action`` replaces or discards (``effect``) unsaved annotations, ask:
        returns SAVE (they were saved), DISCARD, CANCEL (the action must leave everything
        as it is; also when saving failed), or "" when nothing was unsaved."""
        if not self.unsaved:
            return ""
        answer = ask_unsaved_changes(action, parent, effect=effect)
        if answer != SAVE:
            return answer
        if self.saver is None:
            notify_error(
                "Open '2. Boxes and painting' to save the annotations, or choose Discard."
            )
            return CANCEL
        return SAVE if self.saver() is not None else CANCEL

    def confirm_replace(self, action: str, parent: Any = None) -> bool:
        """May ``action`` replace the annotations now?  Without unsaved changes, yes;
        otherwise the user is asked: Save (then yes if saving worked), Discard (yes) or
        Cancel (no: the action must leave everything as it is)."""
        return self.settle(action, parent) != CANCEL

    def autosave_now(self) -> None:
        """Write the autosave now if the annotations changed since the last one."""
        if self.autosaver is not None:
            self.autosaver.save_now()


def _unproxied(obj: Any) -> Any:
    """The napari object itself behind the proxy napari hands to plugin widgets (a new
    proxy at each access, so proxies cannot be kept in a weak set)."""
    return getattr(obj, "__wrapped__", obj)


class Session:
    """What one widget hands to another in this napari process: the network trained last
    (from Train or the demo, to Apply and to Train's "continue" and "Save"), and each
    viewer's :class:`AnnotationChanges`.  One for the process: reach it with
    :func:`session`.  ``network_changed`` is emitted with the network and where it came
    from whenever :meth:`set_network` hands one on."""

    network_changed = Signal(object, str)

    def __init__(self) -> None:
        self.network: Any = None  # the network trained last (model_file.Network)
        self.network_source = ""
        self._changes: weakref.WeakKeyDictionary[Any, AnnotationChanges] = (
            weakref.WeakKeyDictionary()
        )

    def set_network(self, network: Any, source: str) -> None:
        self.network = network
        self.network_source = source
        self.network_changed.emit(network, source)

    def annotations(self, viewer: Any) -> AnnotationChanges:
        """The record of unsaved annotations of one viewer (shared by its widgets)."""
        changes = self._changes.get(viewer)
        if changes is None:
            changes = self._changes[viewer] = AnnotationChanges()
        return changes


_SESSION = Session()


def session() -> Session:
    """The session of this napari process, shared by the widgets of all its viewers."""
    return _SESSION


def follow(signal: SignalInstance, widget: Any, method: Callable[..., Any]) -> None:
    """Call ``method`` (of the magicgui ``widget``) on each emission of ``signal`` while the
    widget's Qt widget exists: psygnal holds the method weakly (a widget that is garbage
    collected drops out), and the connection goes when the Qt widget is destroyed (a closed
    widget whose Python object lives on is not called on its deleted parts)."""
    signal.connect(method)
    weak = weakref.WeakMethod(method)

    def disconnect(*_: Any) -> None:
        bound = weak()
        if bound is not None:
            signal.disconnect(bound, missing_ok=True)

    widget.native.destroyed.connect(disconnect)


def notify_error(message: str) -> None:
    """Show an error as a napari notification (never swallowed, never a crash)."""
    from napari.utils.notifications import show_error

    show_error(message)


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def describe_error(exc: BaseException) -> str:
    """A user-facing sentence for an exception: TomosegErrors speak for themselves."""
    if isinstance(exc, TomosegError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class TaskRunner:
    """Runs one core generator at a time in a napari worker thread.

    Each yielded :class:`Progress` updates a napari progress bar and calls ``on_progress``
    in the GUI thread; the result goes to ``on_done``; an error becomes a notification and
    ``on_error``.  ``stop()`` asks the core to finish cleanly (it checks ``should_stop``).
    """

    def __init__(self, title: str):
        self.title = title
        self.worker: Any = None
        self._stop = False
        self._pbar: Any = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def should_stop(self) -> bool:
        return self._stop

    def start(
        self,
        make_task: Callable[[Callable[[], bool]], Generator[Progress, None, Any]],
        *,
        on_done: Callable[[Any], None],
        on_progress: Callable[[Progress], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_finish: Callable[[], None] | None = None,
    ) -> Any:
        """Start ``make_task(should_stop)`` in a thread; returns the napari worker."""
        from napari.qt.threading import create_worker
        from napari.utils import progress

        if self.running:
            raise TomosegError(f"{self.title} is already running; wait or press Stop.")
        self._stop = False
        self._pbar = progress(total=0, desc=self.title)

        def yielded(event: Progress) -> None:
            pbar = self._pbar
            if pbar is not None and event.total > 0:
                if pbar.total != event.total:
                    pbar.total = event.total
                pbar.n = min(event.step, event.total)
                pbar.set_description(f"{self.title}: {event.message or event.stage}")
            if on_progress is not None:
                on_progress(event)

        def errored(exc: BaseException) -> None:
            notify_error(f"{self.title} failed: {describe_error(exc)}")
            if on_error is not None:
                on_error(exc)

        def finished() -> None:
            if self._pbar is not None:
                self._pbar.close()
                self._pbar = None
            self.worker = None
            if on_finish is not None:
                on_finish()

        def task(should_stop: Callable[[], bool]) -> Generator[Progress, None, Any]:
            # A generator function, so napari makes a GeneratorWorker that forwards yields.
            return (yield from make_task(should_stop))

        # Our own `errored` handler replaces napari's default of re-raising in the GUI thread:
        # the user gets a notification, and the viewer carries on.
        worker = create_worker(
            task, self.should_stop, _start_thread=False, _connect={"errored": errored}
        )
        worker.yielded.connect(yielded)
        worker.returned.connect(on_done)
        worker.finished.connect(finished)
        self.worker = worker
        worker.start()
        return worker

    def stop(self) -> None:
        """Ask the running task to finish cleanly at its next step."""
        self._stop = True


#: Characters of a layer name a drop-down list shows at least.
COMBO_CHARACTERS = 8


def fit_narrow(widget: Any) -> None:
    """Let a (Qt) widget be narrower than its longest message and layer name: messages
    wrap, drop-down lists show the start of long names (the open list shows them whole),
    so a step fits a narrow dock."""
    from qtpy.QtWidgets import QComboBox, QLabel, QSizePolicy

    for label in widget.findChildren(QLabel):
        label.setWordWrap(True)
        label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
    for combo in widget.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(COMBO_CHARACTERS)


def first_or_none(items: Iterable[Any]) -> Any:
    for item in items:
        return item
    return None
