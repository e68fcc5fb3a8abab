"""How the steps are docked: each in a scroll area, all six as tabs of one dock.

The step widgets are taller than a laptop screen (the Train widget alone holds two dozen
fields and a plot); docked as they are, napari's window could not be made smaller than
them.  In a :class:`Scrolled` area a step asks for little height and scrolls instead, and
:class:`TomosegDock` shows the six steps as tabs of one dock, so the canvas keeps most of
the window (``Plugins > TomoSeg > TomoSeg (all steps)``; ``tomoseg demo --viewer`` opens it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QSize
from qtpy.QtWidgets import QFrame, QScrollArea, QTabWidget

from ._apply import ApplyWidget
from ._boxes import BoxWidget
from ._common import fit_narrow
from ._copick import CopickWidget
from ._import import ImportWidget
from ._merge import MergeWidget
from ._pick import PickWidget
from ._train import TrainWidget

if TYPE_CHECKING:
    import napari

#: Width the TomoSeg dock asks for: room for the fields, the rest goes to the canvas.
DOCK_WIDTH = 320
#: Height a scrolled step asks for at least (it scrolls below that).
MIN_STEP_HEIGHT = 60

#: (key, tab title, widget class, menu title) of the six steps, in order.
STEPS = (
    ("import", "Import", ImportWidget, "1. Import tomogram (bin, filter)"),
    ("boxes", "Boxes", BoxWidget, "2. Boxes and painting"),
    ("train", "Train", TrainWidget, "3. Train network"),
    ("apply", "Apply", ApplyWidget, "4. Apply network"),
    ("merge", "Merge", MergeWidget, "5. Merge features"),
    ("pick", "Pick", PickWidget, "6. Render and pick"),
)


class Scrolled(QScrollArea):
    """A step widget (``step``) in a vertical scroll area: it asks for little height and
    scrolls when the window is shorter than the step."""

    def __init__(self, step: Any):
        super().__init__()
        self.step = step
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setWidget(step.native)
        self.setMinimumHeight(MIN_STEP_HEIGHT)
        fit_narrow(step.native)
        step.native.layout().addStretch(1)  # the fields stay together at the top

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        inner = self.widget().sizeHint()
        return QSize(min(inner.width() + 20, DOCK_WIDTH), inner.height())

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(min(self.widget().minimumSizeHint().width() + 20, DOCK_WIDTH), 0)

    def reset_choices(self, *args: Any) -> None:
        """napari calls this when layers change (as it would on the step itself)."""
        self.step.reset_choices(*args)


class TomosegDock(QTabWidget):
    """The six TomoSeg steps as tabs of one dock widget; ``steps[key]`` is each step
    widget (keys: import, boxes, train, apply, merge, pick)."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.steps: dict[str, Any] = {}
        self.setUsesScrollButtons(True)
        for key, title, cls, menu_title in STEPS:
            step = cls(viewer)
            self.steps[key] = step
            index = self.addTab(Scrolled(step), title)
            self.setTabToolTip(index, menu_title)

    def show_step(self, key: str) -> Any:
        """Bring one step's tab to the front; returns the step widget."""
        keys = [k for k, *_ in STEPS]
        self.setCurrentIndex(keys.index(key))
        return self.steps[key]

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(DOCK_WIDTH, super().sizeHint().height())

    def reset_choices(self, *args: Any) -> None:
        for step in self.steps.values():
            step.reset_choices(*args)


def _step_dock(cls: type) -> type:
    """A :class:`Scrolled` class that makes its own ``cls`` step (a menu entry of one
    step: napari gives the viewer to a dock widget class through its ``__init__``)."""

    def __init__(self: Scrolled, viewer: napari.viewer.Viewer) -> None:
        Scrolled.__init__(self, cls(viewer))

    doc = f"The {cls.__name__} in a scroll area, docked on its own."
    return type(f"{cls.__name__}Dock", (Scrolled,), {"__init__": __init__, "__doc__": doc})


ImportDock = _step_dock(ImportWidget)
BoxDock = _step_dock(BoxWidget)
TrainDock = _step_dock(TrainWidget)
ApplyDock = _step_dock(ApplyWidget)
MergeDock = _step_dock(MergeWidget)
PickDock = _step_dock(PickWidget)
CopickDock = _step_dock(CopickWidget)
