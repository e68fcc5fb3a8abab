"""A small live line plot (loss and validation Dice) drawn with QPainter: no extra packages."""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

SERIES_COLORS = ("#4da6ff", "#ffb347", "#77dd77", "#ff6961", "#c39bd3")


class LinePlot(QWidget):
    """Lines of (step, value) points, each scaled to its own range, with a legend."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.setMinimumHeight(120)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)

    def clear(self) -> None:
        self.series.clear()
        self.update()

    def add_point(self, name: str, step: float, value: float) -> None:
        if value is None or not math.isfinite(float(value)):
            return
        self.series.setdefault(name, []).append((float(step), float(value)))
        self.update()

    def paintEvent(self, _event):  # noqa: N802 (Qt naming)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        painter.fillRect(self.rect(), QColor("#262930"))
        width, height, margin = self.width(), self.height(), 6
        steps = [s for points in self.series.values() for s, _ in points]
        if not steps:
            painter.setPen(QColor("#aaaaaa"))
            painter.drawText(self.rect(), Qt.AlignCenter, "loss and validation Dice appear here")
            return
        s_min, s_max = min(steps), max(steps)
        s_span = max(s_max - s_min, 1e-9)
        for i, (name, points) in enumerate(self.series.items()):
            values = [v for _, v in points]
            v_min, v_max = min(values), max(values)
            v_span = max(v_max - v_min, 1e-9)
            color = QColor(SERIES_COLORS[i % len(SERIES_COLORS)])
            painter.setPen(QPen(color, 1.5))
            polygon = QPolygonF(
                [
                    QPointF(
                        margin + (s - s_min) / s_span * (width - 2 * margin),
                        height - margin - (v - v_min) / v_span * (height - 2 * margin - 14),
                    )
                    for s, v in points
                ]
            )
            painter.drawPolyline(polygon)
            painter.drawText(margin + 150 * i, 12, f"{name}: {values[-1]:.3g}")
