"""The training preview in a dock widget of its own, as a plain Qt image.

A 2D image layer would join the scene: it widens the scene's extent (the tomogram shrinks
into a corner) and adds its own axis range to the dims (the Z slider starts below 0).
Shown as a picture beside the canvas, the preview leaves the layers, the camera and the
dims exactly as the user left them.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QPixmap
from qtpy.QtWidgets import QLabel, QScrollArea, QVBoxLayout, QWidget

from ._gallery import gray_qimage

#: The dock's name in napari's Window menu.
PREVIEW_DOCK = "training preview"


class PreviewPanel(QWidget):
    """A caption and the preview mosaic, scaled to the panel's width (it scrolls)."""

    def __init__(self) -> None:
        super().__init__()
        self.caption = QLabel("")
        self.caption.setWordWrap(True)
        self.picture = QLabel()
        self.picture.setAlignment(Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop)
        self.area = QScrollArea()
        self.area.setWidgetResizable(True)
        self.area.setWidget(self.picture)
        layout = QVBoxLayout(self)
        layout.addWidget(self.caption)
        layout.addWidget(self.area)
        self.setMinimumHeight(120)
        self.image: np.ndarray | None = None
        self._pixmap: QPixmap | None = None

    def show_image(self, image: np.ndarray, caption: str) -> None:
        """Show a 2D image with values in [0, 1] (the mosaic of ``preview_mosaic``)."""
        self.image = np.asarray(image, np.float32)
        data = (np.clip(np.nan_to_num(self.image), 0.0, 1.0) * 255).astype(np.uint8)
        self._pixmap = QPixmap.fromImage(gray_qimage(data))
        self.caption.setText(caption)
        self._fit()

    def _fit(self) -> None:
        if self._pixmap is None:
            return
        width = max(self.area.viewport().width() - 4, 64)
        if width < self._pixmap.width():
            self.picture.setPixmap(
                self._pixmap.scaledToWidth(width, Qt.TransformationMode.SmoothTransformation)
            )
        else:
            self.picture.setPixmap(self._pixmap)

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().resizeEvent(event)
        self._fit()
