"""Keeping annotations safe in the viewer: autosave, and asking before they are lost.

:class:`Autosaver` (one per viewer, made by the Boxes widget) writes the annotations to the
cache folder every few minutes, and when training starts, while they have unsaved changes.
It gathers them in the GUI thread (boxes and feature names, and a reference to the painting:
no copy) and calls :func:`napari_tomoseg.data.autosave.write_autosave` in a worker thread, which
copies the painting there and writes the copy; the viewer does not wait for either.  An
autosave made while the user went on painting is not current, and the next one follows.

:func:`guard_viewer` asks Save / Discard / Cancel before the viewer is closed, or an
annotation layer deleted, while the annotations have unsaved changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..data.annotations import Annotations
from ..data.autosave import AUTOSAVE_INTERVAL_S, AutosaveInfo, discard_autosave, write_autosave
from ..errors import TomosegError
from ._common import CANCEL, DISCARD, AnnotationChanges, describe_error, notify_error


class Autosaver:
    """Writes a viewer's annotations to their autosave folder when they changed.

    ``gather`` returns the annotations to keep (with the live painting), or None when
    there are none.  ``saved_generation`` is the change count the last autosave holds.
    """

    def __init__(
        self,
        changes: AnnotationChanges,
        gather: Callable[[], Annotations | None],
        parent: Any = None,
        interval_s: float = AUTOSAVE_INTERVAL_S,
    ) -> None:
        from qtpy.QtCore import QTimer

        self.changes = changes
        self.gather = gather
        self.saved_generation = -1
        self.last: AutosaveInfo | None = None
        #: autosave folders of this session's annotations (written, or restored from)
        self.folders: set[Path] = set()
        self.worker: Any = None
        self._again = False
        self._discard_when_done = False
        self._last_error = ""
        self.timer = QTimer(parent)
        self.timer.setInterval(int(interval_s * 1000))
        self.timer.timeout.connect(self.save_now)
        self.timer.start()
        changes.autosaver = self

    def due(self) -> bool:
        """Unsaved changes that the last autosave does not hold."""
        return self.changes.unsaved and self.changes.generation != self.saved_generation

    def save_now(self, *_: Any) -> Any:
        """Start writing the autosave in a worker thread if one is due; returns the worker."""
        from napari.qt.threading import create_worker

        if self.worker is not None:  # one at a time: the next follows if still due
            self._again = True
            return None
        if not self.due():
            return None
        try:
            annotations = self.gather()
        except TomosegError:
            return None
        if annotations is None:
            return None
        generation = self.changes.generation
        worker = create_worker(
            write_autosave,
            annotations,
            _start_thread=False,
            _connect={"errored": self._failed},
        )
        worker.returned.connect(lambda info: self._saved(info, generation))
        worker.finished.connect(self._finished)
        self.worker = worker
        worker.start()
        return worker

    def _saved(self, info: AutosaveInfo, generation: int) -> None:
        self.last = info
        self.folders.add(info.folder)
        self.saved_generation = generation
        self._last_error = ""

    def _failed(self, exc: BaseException) -> None:
        message = f"Autosave of the annotations failed: {describe_error(exc)}"
        if message != self._last_error:  # once, not every few minutes
            notify_error(message)
        self._last_error = message

    def _finished(self) -> None:
        self.worker = None
        if self._discard_when_done or not self.changes.unsaved:
            self.discard()  # saved or discarded while the autosave was written
        elif self._again:
            self._again = False
            self.save_now()

    def adopt(self, info: AutosaveInfo) -> None:
        """The annotations were just restored from ``info``: it is theirs and current."""
        self.folders.add(info.folder)
        self.last = info
        self.saved_generation = self.changes.generation

    def discard(self) -> None:
        """Delete this session's autosaves: the annotations were saved, or thrown away."""
        if self.worker is not None:
            self._discard_when_done = True
            return
        self._discard_when_done = self._again = False
        for folder in self.folders:
            try:
                discard_autosave(folder)
            except (TomosegError, OSError) as exc:
                notify_error(describe_error(exc))
        self.folders.clear()
        self.last = None
        self.saved_generation = -1


def guard_viewer(viewer: Any, changes: AnnotationChanges, widget: Any) -> None:
    """Ask before unsaved annotations are lost by closing the viewer or deleting one of
    their layers.  ``widget`` is the Qt widget of a dock widget of the viewer: the main
    window it is docked in (found through Qt, when it is docked) gets the close guard."""
    if not changes.guarded:
        changes.guarded = True
        _guard_layer_deletion(viewer, changes)
        _mark_closing_from_code(viewer, changes)
    _watch_docking(changes, widget)


def _leave(changes: AnnotationChanges, action: str, parent: Any) -> bool:
    """Save / Discard / Cancel before ``action`` throws the annotations away."""
    answer = changes.settle(action, parent, effect="discard")
    if answer == DISCARD:
        if changes.autosaver is not None:
            changes.autosaver.discard()
        changes.mark_saved()
    return answer != CANCEL


def _guard_layer_deletion(viewer: Any, changes: AnnotationChanges) -> None:
    """Every way napari offers to delete layers (the delete button, the Delete key in the
    layer list, the keybinding) calls ``viewer.layers.remove_selected``; code that
    removes a layer (``layers.remove``) is not asked, as napari does not ask either."""
    layers = viewer.layers
    remove_selected = layers.remove_selected

    def asking_remove_selected(*args: Any, **kwargs: Any) -> Any:
        doomed = [
            layer for layer in layers if layer in layers.selection and changes.watches(layer)
        ]
        if doomed and changes.unsaved:
            names = ", ".join(f"'{layer.name}'" for layer in doomed)
            if not _leave(changes, f"Deleting {names}", changes.close_guard_window):
                return None
        return remove_selected(*args, **kwargs)

    layers.remove_selected = asking_remove_selected


def _mark_closing_from_code(viewer: Any, changes: AnnotationChanges) -> None:
    """``Viewer.close()`` from code does not ask (as napari's own confirmation does not):
    it goes through ``viewer.window.close``, which says so while it runs."""
    window = getattr(viewer, "window", None)
    if window is None:
        return
    close = window.close

    def close_from_code(*args: Any, **kwargs: Any) -> Any:
        changes.closing_from_code = True
        try:
            return close(*args, **kwargs)
        finally:
            changes.closing_from_code = False

    window.close = close_from_code


def _ancestors(widget: Any) -> list[Any]:
    """The widget and its parents, up to the top (a floating dock's parent is still the
    main window)."""
    chain = []
    while widget is not None:
        chain.append(widget)
        widget = widget.parentWidget()
    return chain


def _close_filter(changes: AnnotationChanges) -> Any:
    """An event filter for the main window: its close button, File > Close Window, File >
    Exit and their keys all send it a close event, which the filter sees before napari;
    on Cancel it ignores the event, so the window stays open."""
    from qtpy.QtCore import QEvent, QObject

    class CloseFilter(QObject):
        def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt's name)
            if event.type() != QEvent.Type.Close or changes.closing_from_code:
                return False
            if _leave(changes, "Closing the viewer", obj):
                return False
            event.ignore()
            return True

    return CloseFilter()


def _watch_docking(changes: AnnotationChanges, widget: Any) -> None:
    """Install the close filter on the main window once ``widget`` is docked in it: each
    widget of the chain from ``widget`` to the top is watched until the top is a main
    window (napari puts a dock widget's contents in a dock before it docks that)."""
    from qtpy.QtCore import QEvent, QObject
    from qtpy.QtWidgets import QMainWindow

    watched: set[int] = set()

    def look() -> None:
        chain = _ancestors(widget)
        top = chain[-1]
        if not isinstance(top, QMainWindow):
            if id(top) not in watched:
                watched.add(id(top))
                top.installEventFilter(Watcher(top))
            return
        if changes.close_guard_window is not top:
            guard = _close_filter(changes)
            guard.setParent(top)
            top.installEventFilter(guard)
            changes.close_guard_window = top

    class Watcher(QObject):
        def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt's name)
            if event.type() == QEvent.Type.ParentChange:
                look()
            return False

    look()
