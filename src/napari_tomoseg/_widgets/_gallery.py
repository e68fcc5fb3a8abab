"""A grid of thumbnails (the EMAN2 "particles" window): each boxed crop, click to go there."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import QGridLayout, QLabel, QScrollArea, QWidget

THUMB_PIXELS = 72


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Contrast-stretch a 2D image to uint8 between its 1st and 99th percentiles."""
    image = np.asarray(image, dtype=np.float32)
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros(image.shape, np.uint8)
    low, high = np.percentile(finite, (1, 99))
    scaled = (np.nan_to_num(image, nan=low) - low) / max(float(high - low), 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def gray_qimage(data: np.ndarray) -> QImage:
    """A QImage (its own copy of the pixels) of a 2D uint8 array."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    height, width = data.shape
    return QImage(data.data, width, height, width, QImage.Format_Grayscale8).copy()


class _Thumb(QLabel):
    def __init__(self, image: np.ndarray, caption: str, color: str, on_click: Callable[[], None]):
        super().__init__()
        qimage = gray_qimage(to_uint8(image))
        self.setPixmap(
            QPixmap.fromImage(qimage).scaled(
                THUMB_PIXELS, THUMB_PIXELS, Qt.KeepAspectRatio, Qt.SmoothTransformation
            )
        )
        self.setFixedSize(THUMB_PIXELS + 4, THUMB_PIXELS + 4)
        self.setAlignment(Qt.AlignCenter)
        self.setToolTip(caption)
        self.setStyleSheet(f"border: 2px solid {color};")
        self._on_click = on_click

    def mousePressEvent(self, event):  # noqa: N802 (Qt naming)
        self._on_click()
        super().mousePressEvent(event)


class Gallery(QScrollArea):
    """Thumbnails in rows; ``show_items`` replaces them."""

    def __init__(self, columns: int = 4):
        super().__init__()
        self.columns = columns
        self.setWidgetResizable(True)
        self.setMinimumHeight(THUMB_PIXELS + 16)
        self._inner = QWidget()
        self._grid = QGridLayout(self._inner)
        self._grid.setSpacing(2)
        self.setWidget(self._inner)
        self.count = 0

    def show_items(
        self,
        items: Sequence[tuple[np.ndarray, str, str, Callable[[], None]]],
    ) -> None:
        """``items``: (image, caption, border colour, click action) for each thumbnail."""
        while self._grid.count():
            child = self._grid.takeAt(0).widget()
            if child is not None:
                child.deleteLater()
        for i, (image, caption, color, action) in enumerate(items):
            self._grid.addWidget(
                _Thumb(image, caption, color, action), i // self.columns, i % self.columns
            )
        self.count = len(items)
