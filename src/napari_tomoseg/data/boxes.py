"""Training boxes: fixed-size square 2D regions on one Z slice of a tomogram.

A :class:`Box` is what the user places in a napari Shapes layer to mark a positive example
(the feature, painted in a Labels layer) or a negative example (no feature), as in the
EMAN2 TomoSeg protocol (Chen et al., Nat. Methods 2017): square boxes, 64 pixels by default,
on any Z slice.

Geometry (axes Z, Y, X; voxel indices):

* A box of ``size`` pixels centred at ``(z, y, x)`` covers the pixels
  ``y - size // 2 <= j < y - size // 2 + size`` (the same along X) on slice ``z``.
* napari draws pixel ``j`` over the interval ``[j - 0.5, j + 0.5]`` in data coordinates, so
  the rectangle of a box runs from ``y0 - 0.5`` to ``y0 + size - 0.5``; drawn that way it
  outlines exactly the pixels the box uses.
* Shapes arrive in *data coordinates* of a layer that shares the tomogram's scale.  A drawn
  rectangle of any size is snapped to ``box_size`` around its centre, rounded to whole
  pixels.

Messages number boxes from 1 in the order of the Shapes layer.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import TomosegError

#: Side of a training box in pixels (EMAN2 TomoSeg uses 64).
DEFAULT_BOX_SIZE = 64

#: Largest deviation of Z between a shape's vertices that still counts as "one slice".
_Z_TOLERANCE = 1e-3


def _as_int(value: object, name: str) -> int:
    """An integer from a Python or numpy integer (or an integral float); else an error."""
    if isinstance(value, (bool, np.bool_)):
        raise TomosegError(f"Box {name} must be an integer voxel index, got {value!r}.")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise TomosegError(f"Box {name} must be an integer voxel index, got {value!r}.")


@dataclass(frozen=True)
class Box:
    """A square box of ``size`` pixels on slice ``z``, centred at voxel ``(y, x)``."""

    z: int
    y: int
    x: int
    size: int = DEFAULT_BOX_SIZE

    def __post_init__(self) -> None:
        for name in ("z", "y", "x", "size"):
            object.__setattr__(self, name, _as_int(getattr(self, name), name))
        if self.size < 2:
            raise TomosegError(f"Box size must be at least 2 pixels, got {self.size}.")

    # -- pixel extent -------------------------------------------------------------------
    @property
    def y0(self) -> int:
        """First row covered (inclusive)."""
        return self.y - self.size // 2

    @property
    def x0(self) -> int:
        """First column covered (inclusive)."""
        return self.x - self.size // 2

    @property
    def y1(self) -> int:
        """Row just past the box (exclusive)."""
        return self.y0 + self.size

    @property
    def x1(self) -> int:
        """Column just past the box (exclusive)."""
        return self.x0 + self.size

    def slices(self) -> tuple[int, slice, slice]:
        """Index of the box in a (Z, Y, X) volume: ``volume[box.slices()]`` is (size, size)."""
        return (self.z, slice(self.y0, self.y1), slice(self.x0, self.x1))

    @property
    def corners(self) -> np.ndarray:
        """The rectangle's four (y, x) vertices in napari data coordinates (pixel edges)."""
        top, left = self.y0 - 0.5, self.x0 - 0.5
        bottom, right = self.y1 - 0.5, self.x1 - 0.5
        return np.array(
            [[top, left], [top, right], [bottom, right], [bottom, left]], dtype=np.float64
        )

    def to_shape(self) -> np.ndarray:
        """The box as a napari Shapes rectangle: (4, 3) float vertices (z, y, x)."""
        z = np.full((4, 1), float(self.z))
        return np.hstack([z, self.corners])

    def fits(self, volume_shape: Sequence[int]) -> bool:
        """True if the box lies fully inside a (Z, Y, X) volume."""
        nz, ny, nx = (int(s) for s in volume_shape[-3:])
        return (
            0 <= self.z < nz and self.y0 >= 0 and self.x0 >= 0 and self.y1 <= ny and self.x1 <= nx
        )

    def as_list(self) -> list[int]:
        """``[z, y, x, size]`` (JSON-friendly, e.g. for training-set metadata)."""
        return [self.z, self.y, self.x, self.size]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> Box:
        """Inverse of :meth:`as_list`."""
        if len(values) != 4:
            raise TomosegError(f"A box is [z, y, x, size]; got {list(values)!r}.")
        return cls(*values)

    def describe(self) -> str:
        """``z=.., y=.., x=..`` for messages."""
        return f"z={self.z}, y={self.y}, x={self.x}"


def _round_half_up(value: float) -> int:
    """Round to the nearest integer, halves upward (no banker's rounding surprises)."""
    return int(math.floor(value + 0.5))


def box_from_shape(shape: np.ndarray, box_size: int = DEFAULT_BOX_SIZE, index: int = 0) -> Box:
    """Snap one napari shape (vertices (N, 3), all on one Z slice) to a ``box_size`` box.

    The box is centred on the centre of the shape's bounding rectangle, so rectangles,
    ellipses and rotated rectangles all work.

    Parameters
    ----------
    shape
        The shape's vertices, (N, 3) in the layer's data coordinates (voxels, Z Y X).
    box_size
        The box side in pixels.
    index
        The shape's 0-based position in its layer, for messages (numbered from 1 there).
    """
    number = index + 1
    vertices = np.asarray(shape, dtype=np.float64)
    if vertices.ndim != 2 or vertices.shape[0] == 0:
        raise TomosegError(
            f"Shape {number} is not a list of vertices (got an array of shape "
            f"{vertices.shape}); draw rectangles in a Shapes layer."
        )
    if vertices.shape[1] != 3:
        raise TomosegError(
            f"Shape {number} has {vertices.shape[1]}D vertices, but boxes need 3D (Z, Y, X) "
            "shapes: add the Shapes layer while the tomogram is shown in 3 dimensions "
            "(e.g. with the box widget) so each rectangle records its Z slice."
        )
    if not np.all(np.isfinite(vertices)):
        raise TomosegError(f"Shape {number} has non-finite vertex coordinates.")
    zs = vertices[:, 0]
    if float(zs.max() - zs.min()) > _Z_TOLERANCE:
        raise TomosegError(
            f"Shape {number} spans Z {zs.min():g} to {zs.max():g}; a box must lie on one Z "
            "slice. Draw it in the 2D view on a single slice."
        )
    z = _round_half_up(float(zs.mean()))
    box_size = _as_int(box_size, "size")
    centre_y = 0.5 * (vertices[:, 1].min() + vertices[:, 1].max())
    centre_x = 0.5 * (vertices[:, 2].min() + vertices[:, 2].max())
    # The rectangle of a box with first pixel y0 spans [y0 - 0.5, y0 + size - 0.5], centre
    # y0 + size/2 - 0.5: invert that, rounding to a whole pixel.
    y0 = _round_half_up(centre_y + 0.5 - box_size / 2)
    x0 = _round_half_up(centre_x + 0.5 - box_size / 2)
    return Box(z, y0 + box_size // 2, x0 + box_size // 2, box_size)


def boxes_from_shapes(shapes: Sequence[np.ndarray], box_size: int = DEFAULT_BOX_SIZE) -> list[Box]:
    """Boxes from napari Shapes layer data (data coordinates, tomogram's scale).

    Each shape (usually a rectangle: (4, 3) vertices with the same Z) becomes a box of
    ``box_size`` around its rounded centre.  2D shapes and shapes spanning several Z slices
    raise :class:`TomosegError`.

    Parameters
    ----------
    shapes
        A Shapes layer's ``data``: one (N, 3) vertex array per shape, voxels (Z, Y, X).
    box_size
        The side of every box in pixels.
    """
    return [box_from_shape(shape, box_size, i) for i, shape in enumerate(shapes)]


def boxes_to_shapes(boxes: Sequence[Box]) -> list[np.ndarray]:
    """napari Shapes data (list of (4, 3) float rectangles) for ``boxes``."""
    return [box.to_shape() for box in boxes]


def validate_boxes(
    boxes: Sequence[Box],
    volume_shape: Sequence[int],
    *,
    kind: str = "positive",
    allow_empty: bool | None = None,
) -> None:
    """Check that ``boxes`` can be cut from a volume of ``volume_shape`` (Z, Y, X).

    Raises :class:`TomosegError` naming the first offending box (number from 1 and centre):
    a box off the volume (each box must lie fully inside Y/X, its Z inside 0..Z-1), boxes of
    different sizes, a box larger than the volume, a volume that is not 3D, or no boxes at
    all (allowed by default only for ``kind="negative"``).

    Parameters
    ----------
    boxes
        The boxes to check; all must have one size.
    volume_shape
        The tomogram's (Z, Y, X) shape in voxels.
    kind
        ``"positive"`` or ``"negative"``: named in the messages; decides ``allow_empty``.
    allow_empty
        Accept an empty ``boxes``; None: only when ``kind`` is not ``"positive"``.
    """
    if allow_empty is None:
        allow_empty = kind != "positive"
    shape = tuple(int(s) for s in volume_shape)
    if len(shape) != 3:
        raise TomosegError(
            f"Boxes need a 3D (Z, Y, X) tomogram; the volume has shape {shape} ({len(shape)}D)."
        )
    if len(boxes) == 0:
        if allow_empty:
            return
        raise TomosegError(
            f"No {kind} boxes: place at least one {kind} box on the tomogram "
            f"(about 10 are recommended for positives)."
        )
    nz, ny, nx = shape
    size = boxes[0].size
    for i, box in enumerate(boxes):
        if not isinstance(box, Box):
            raise TomosegError(f"{kind.capitalize()} box {i + 1} is not a Box ({box!r}).")
        if box.size != size:
            raise TomosegError(
                f"{kind.capitalize()} box {i + 1} at {box.describe()} is {box.size} px, but "
                f"box 1 is {size} px; all boxes of a training set must have one size."
            )
        if box.size > ny or box.size > nx:
            raise TomosegError(
                f"The volume ({ny} x {nx} pixels per slice) is smaller than a {box.size} px "
                "box; use a smaller box size or a less binned tomogram."
            )
        if not box.fits(shape):
            if not 0 <= box.z < nz:
                where = f"slice z={box.z} is outside 0..{nz - 1}"
            else:
                where = (
                    f"it covers y {box.y0}..{box.y1 - 1}, x {box.x0}..{box.x1 - 1}, but the "
                    f"slice is y 0..{ny - 1}, x 0..{nx - 1}"
                )
            raise TomosegError(
                f"{kind.capitalize()} box {i + 1} at {box.describe()} is off the volume: "
                f"{where}. Move it fully inside the tomogram or delete it."
            )


def crop(volume: np.ndarray, box: Box, context_slices: int = 0) -> np.ndarray:
    """The box's pixels as (C, size, size), C = 2 * context_slices + 1 (2.5D input).

    Channel ``context_slices`` is the box's own slice; the others are the neighbouring
    slices below and above it.  Beyond the Z ends the edge slice is repeated.  Only the box
    region is read, so ``volume`` may be a memory map.  The dtype of ``volume`` is kept.

    Parameters
    ----------
    volume
        The (Z, Y, X) tomogram (numpy or memory map); the box must lie inside it.
    box
        The box to cut out.
    context_slices
        Neighbouring slices on each side of the box's slice, taken as extra channels.
    """
    if volume.ndim != 3:
        raise TomosegError(f"Cropping needs a 3D (Z, Y, X) volume, got shape {volume.shape}.")
    context_slices = _as_int(context_slices, "context_slices")
    if context_slices < 0:
        raise TomosegError(f"context_slices must be >= 0, got {context_slices}.")
    if not box.fits(volume.shape):
        raise TomosegError(
            f"Box at {box.describe()} ({box.size} px) is off the volume of shape "
            f"{tuple(volume.shape)}."
        )
    nz = volume.shape[0]
    zs = np.clip(np.arange(box.z - context_slices, box.z + context_slices + 1), 0, nz - 1)
    _, ys, xs = box.slices()
    return np.stack([np.asarray(volume[int(z), ys, xs]) for z in zs])


# -- box files ----------------------------------------------------------------------------------
#: Header of a napari-tomoseg box file: one box per row, centre in voxels (Z, Y, X).
BOX_FILE_COLUMNS = ("z", "y", "x", "size")


def write_boxes_csv(path: str | os.PathLike, boxes: Sequence[Box], *, overwrite: bool = False):
    """Save boxes as CSV (``z,y,x,size``: centres in voxel indices), atomically.

    Parameters
    ----------
    path
        The CSV file (written with a header row, one box per row).
    boxes
        The boxes to save.
    overwrite
        Replace an existing file (else :class:`~napari_tomoseg.errors.OutputExistsError`).

    Returns
    -------
    Path
        ``path``.
    """
    from .io import atomic_path

    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(BOX_FILE_COLUMNS)
        for box in boxes:
            writer.writerow(box.as_list())
    return Path(path)


def read_boxes_csv(path: str | os.PathLike, box_size: int | None = None) -> list[Box]:
    """Read boxes from a CSV: napari-tomoseg's ``z,y,x[,size]`` or a napari Shapes export.

    The header row of a ``z,y,x[,size]`` file is optional.  Its size column gives each box's
    size unless ``box_size`` is given; without either a box is 64 pixels.  A napari Shapes
    CSV (``index,shape-type,vertex-index,axis-0,axis-1,axis-2``) is snapped to ``box_size``
    (default 64) like drawn rectangles.  A row that is not a box is an error naming its line.

    Parameters
    ----------
    path
        The CSV file.
    box_size
        The side of every box in pixels; replaces the file's size column when given.

    Returns
    -------
    list of Box
        The boxes in file order; empty for an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise TomosegError(f"Cannot read boxes from {path}: the file does not exist.")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [(n, row) for n, row in enumerate(csv.reader(handle), 1) if any(row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TomosegError(f"Cannot read boxes from {path}: {exc}.") from None
    if not rows:
        return []
    header = [cell.strip() for cell in rows[0][1]]
    if _is_number(header[0]):  # no header row: z,y,x[,size]
        header, body = list(BOX_FILE_COLUMNS), rows
    else:
        body = rows[1:]
    if {"z", "y", "x"} <= set(header):
        return [_box_from_row(path, n, dict(zip(header, row)), box_size) for n, row in body]
    if {"index", "axis-0", "axis-1", "axis-2"} <= set(header):
        return _boxes_from_shapes_rows(path, header, body, box_size or DEFAULT_BOX_SIZE)
    raise TomosegError(
        f"Cannot read boxes from {path}: expected columns z,y,x[,size] (box centres in voxels, "
        "with or without a header row) or a napari Shapes CSV export (index, axis-0, axis-1, "
        f"axis-2); line 1 is {','.join(rows[0][1])!r}."
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _row_error(path: Path, line: int, row: dict[str, str], problem: str) -> TomosegError:
    text = ",".join(v for v in row.values() if v is not None)
    return TomosegError(f"Cannot read boxes from {path}: line {line} ({text!r}) {problem}.")


def _box_from_row(path: Path, line: int, row: dict[str, str], box_size: int | None) -> Box:
    """One box of a ``z,y,x[,size]`` file (``box_size`` replaces the file's size)."""
    if any(row.get(k) in (None, "") for k in ("z", "y", "x")):
        raise _row_error(path, line, row, "lacks a z, y or x value")
    try:
        z, y, x = (int(float(row[k])) for k in ("z", "y", "x"))
        size = box_size or int(float(row.get("size") or DEFAULT_BOX_SIZE))
        return Box(z, y, x, size)
    except (TypeError, ValueError) as exc:
        raise _row_error(path, line, row, f"has a value that is not a number ({exc})") from None
    except TomosegError as exc:
        raise _row_error(path, line, row, f"is not a box: {exc}") from None


def _boxes_from_shapes_rows(
    path: Path, header: list[str], body: list[tuple[int, list[str]]], box_size: int
) -> list[Box]:
    """Boxes from the rows of a napari Shapes CSV export (vertices grouped by shape)."""
    shapes: dict[int, list[list[float]]] = {}
    for n, values in body:
        row = dict(zip(header, values))
        try:
            vertex = [float(row[a]) for a in ("axis-0", "axis-1", "axis-2")]
            shapes.setdefault(int(float(row["index"])), []).append(vertex)
        except (KeyError, TypeError, ValueError) as exc:
            raise _row_error(path, n, row, f"is not a shape vertex ({exc})") from None
    return boxes_from_shapes([np.array(v) for _, v in sorted(shapes.items())], box_size)


def grid_box_sums(plane: np.ndarray, size: int, step: int) -> tuple[np.ndarray, ...]:
    """Sum of ``plane`` inside every ``size`` x ``size`` box whose corner lies on a
    ``step`` grid, from one integral image; also the corners' (Y, X) grids."""
    ny, nx = plane.shape
    integral = np.zeros((ny + 1, nx + 1), np.float64)
    integral[1:, 1:] = plane.cumsum(0, dtype=np.float64).cumsum(1)
    y0 = np.arange(0, ny - size + 1, step)
    x0 = np.arange(0, nx - size + 1, step)
    yy, xx = np.meshgrid(y0, x0, indexing="ij")
    sums = (
        integral[yy + size, xx + size]
        - integral[yy, xx + size]
        - integral[yy + size, xx]
        + integral[yy, xx]
    )
    return sums, yy, xx
