"""The colours classes are shown in when none are recorded (torch-free, so that the
command line and the copick export can use them without loading torch)."""

from __future__ import annotations

#: Colours (RGBA in [0, 1]) given to classes when none are recorded: transparent
#: background, then distinct hues (napari-friendly).
PALETTE: tuple[tuple[float, float, float, float], ...] = (
    (0.0, 0.0, 0.0, 0.0),
    (1.0, 0.85, 0.1, 1.0),
    (0.2, 0.7, 1.0, 1.0),
    (1.0, 0.3, 0.3, 1.0),
    (0.4, 0.9, 0.4, 1.0),
    (0.85, 0.45, 1.0, 1.0),
    (1.0, 0.6, 0.2, 1.0),
    (0.3, 1.0, 0.9, 1.0),
)


def default_class_colors(n_classes: int) -> tuple[tuple[float, float, float, float], ...]:
    """RGBA colours for ``n_classes`` classes (background transparent, palette repeats)."""
    colours = [PALETTE[0]]
    for i in range(1, n_classes):
        colours.append(PALETTE[1 + (i - 1) % (len(PALETTE) - 1)])
    return tuple(colours)
