"""Suggested boxes in the Boxes widget: where the network fires far from every positive box.

After a first training and apply, "Suggest boxes" asks :func:`napari_tomoseg.applying.suggest.
suggest_boxes` for the strongest such places in the chosen probability map and shows them
in a Shapes layer.  The panel goes to each in turn; one click accepts it as a negative box
(the network is wrong there), as a positive box (the feature is there: paint it), or
rejects it.  Accepted boxes go into the Boxes widget's layers like any other box.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Container, Label, PushButton, SpinBox

from ..applying.inference import network_threshold
from ..applying.suggest import Suggestion, suggest_boxes
from ..data.probability import probabilities_as_float
from ..progress import Progress
from ._common import (
    TaskRunner,
    describe_error,
    follow_layers,
    grid_kwargs,
    notify_error,
    notify_info,
)

if TYPE_CHECKING:
    from ._boxes import BoxWidget

SUGGESTION_LAYER = "suggested boxes"
SUGGESTION_COLOR = "#ffd700"


class SuggestionPanel(Container):
    """Ask for suggested boxes, go through them, accept or reject each with one click."""

    def __init__(self, boxes: BoxWidget):
        super().__init__(labels=True)
        self.boxes = boxes
        self.viewer = boxes.viewer
        self.probability = ComboBox(
            label="probability map", choices=lambda _: self._map_layers(), nullable=True
        )
        self.number = SpinBox(label="suggestions", value=20, min=1, max=500)
        self.suggest_button = PushButton(
            text="Suggest boxes",
            tooltip="Boxes where the network fires far from every positive box",
        )
        self.status = Label(value="")
        self.accept_negative = PushButton(text="Negative box", enabled=False)
        self.accept_positive = PushButton(text="Positive box (paint it)", enabled=False)
        self.reject = PushButton(text="Reject", enabled=False)
        self.extend(
            [
                self.probability,
                self.number,
                self.suggest_button,
                self.status,
                self.accept_negative,
                self.accept_positive,
                self.reject,
            ]
        )
        self.pending: list[Suggestion] = []
        self.runner = TaskRunner("Suggest boxes")
        self.suggest_button.changed.connect(self.start)
        self.accept_negative.changed.connect(lambda: self.decide("negative"))
        self.accept_positive.changed.connect(lambda: self.decide("positive"))
        self.reject.changed.connect(lambda: self.decide("reject"))
        follow_layers(self.viewer, self.probability)

    def _map_layers(self) -> list[Any]:
        return [
            layer
            for layer in self.viewer.layers
            if layer.__class__.__name__ == "Image" and layer.metadata.get("tomoseg_probability")
        ]

    def start(self, *_: Any) -> Any:
        """Score the probability map in a worker; then show the suggestions."""
        layer = self.probability.value
        if layer is None:
            notify_error("Apply a network first: suggestions come from its probability map.")
            return None
        size = int(self.boxes.box_size.value)
        positives, negatives = self.boxes.boxes(True), self.boxes.boxes(False)
        threshold = float(layer.metadata.get("threshold") or network_threshold(None))
        data, n = layer.data, int(self.number.value)
        to_float = probabilities_as_float if data.dtype.kind in "iu" else None

        def task(should_stop: Any) -> Any:
            yield Progress("suggest", 0, 1, message="scoring box positions")
            return suggest_boxes(
                data,
                positives,
                negatives,
                threshold=threshold,
                n=n,
                box_size=size,
                to_float=to_float,
                should_stop=should_stop,
            )

        self.status.value = "looking for places where the network fires..."
        return self.runner.start(task, on_done=self.show)

    def _layer(self) -> Any:
        if SUGGESTION_LAYER in self.viewer.layers:
            return self.viewer.layers[SUGGESTION_LAYER]
        tomo = self.boxes._tomogram_layer()
        return self.viewer.add_shapes(
            ndim=3,
            name=SUGGESTION_LAYER,
            edge_color=SUGGESTION_COLOR,
            face_color="transparent",
            edge_width=2,
            **grid_kwargs(tomo),
        )

    def show(self, found: list[Suggestion]) -> None:
        """Put the suggestions in their layer and go to the first."""
        self.pending = list(found)
        layer = self._layer()
        layer.data = [s.box.to_shape() for s in self.pending]
        if not self.pending:
            self.status.value = "no place where the network fires far from the positive boxes"
            notify_info(self.status.value)
        self._show_current()

    def _show_current(self) -> None:
        has = bool(self.pending)
        for button in (self.accept_negative, self.accept_positive, self.reject):
            button.enabled = has
        if not has:
            return
        current = self.pending[0]
        self.boxes.go_to(current.box)
        self.status.value = (
            f"{len(self.pending)} left; this one: score {current.score:.2f}, "
            f"{100 * current.fired:.0f}% of the box marked"
        )

    def decide(self, choice: str) -> None:
        """Accept the current suggestion as a negative or positive box, or reject it."""
        if not self.pending:
            return
        current = self.pending.pop(0)
        try:
            if choice in ("negative", "positive"):
                box = current.box
                self.boxes.add_box((box.z, box.y, box.x), choice == "positive")
        except Exception as exc:  # a removed tomogram: say so, keep the suggestion list
            notify_error(describe_error(exc))
        layer = self._layer()
        layer.data = [s.box.to_shape() for s in self.pending]
        self._show_current()
        if not self.pending:
            self.status.value = "all suggestions decided: train again"
