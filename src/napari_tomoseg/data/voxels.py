"""The voxel size: one value type, (Z, Y, X) in Angstrom, from the reader to every output.

:class:`VoxelSize` is a named tuple, so it equals the plain tuple of its three numbers,
indexes and unpacks like one, and is written to JSON as a list of three.  Every module
turns what it is given (one value for cubic voxels, (Y, X) of an image, (Z, Y, X)) into
one with :meth:`VoxelSize.parse`; ``None`` (unknown) stays ``None``.  Layer metadata
records it with :func:`voxel_metadata` (re-exported by :mod:`napari_tomoseg._layers`,
which also reads it back from a layer).  No torch, no napari.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ..errors import TomosegError

#: The length unit of every voxel size and layer scale (see docs/architecture.md).
UNIT = "angstrom"

#: What a function taking a voxel size accepts: one value, (Y, X) or (Z, Y, X), Angstrom.
VoxelSizeLike = float | Sequence[float]


class VoxelSize(NamedTuple):
    """A voxel size in Angstrom per axis, (Z, Y, X) as every array in napari-tomoseg."""

    z: float
    y: float
    x: float

    @classmethod
    def parse(cls, value: Any) -> VoxelSize | None:
        """(Z, Y, X) from one value (cubic voxels), (Y, X) of a 2D image (Z takes Y) or
        (Z, Y, X); ``None`` stays ``None``.  Anything else, or a value that is not a finite
        positive number, raises :class:`TomosegError`."""
        if value is None:
            return None
        try:
            values = np.atleast_1d(np.asarray(value, dtype=float))
        except (TypeError, ValueError):
            values = np.array([np.nan])
        if values.size == 1:
            values = np.repeat(values, 3)
        if values.size == 2:  # (Y, X) of a 2D image
            values = np.array([values[0], values[0], values[1]])
        if values.size != 3 or not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise TomosegError(
                f"Invalid voxel size {value!r}: give one or three positive Angstrom values."
            )
        return cls(float(values[0]), float(values[1]), float(values[2]))

    @classmethod
    def parse_or_none(cls, value: Any) -> VoxelSize | None:
        """:meth:`parse` for a record that may hold an unusable value (a file made by
        another tool, hand-written metadata): ``None`` (unknown) instead of an error."""
        try:
            return cls.parse(value)
        except TomosegError:
            return None

    @property
    def inplane(self) -> float:
        """The in-plane (X) size: what a 2D network was trained at and rescales to."""
        return self.x

    @property
    def xyz(self) -> tuple[float, float, float]:
        """(X, Y, Z), the order of an MRC header."""
        return (self.x, self.y, self.z)

    def scaled(self, factor: float) -> VoxelSize:
        """The voxel size after binning by ``factor`` on every axis."""
        return VoxelSize(self.z * factor, self.y * factor, self.x * factor)

    def describe(self) -> str:
        """``"10 A"`` for cubic voxels, else ``"20 x 10 x 10 A"`` (Z x Y x X)."""
        if self.z == self.y == self.x:
            return f"{self.x:g} A"
        return f"{self.z:g} x {self.y:g} x {self.x:g} A"


def voxel_metadata(voxel_size: Any) -> dict[str, Any]:
    """The entries a layer's (or a tomogram's) metadata records the voxel size in:
    ``voxel_size`` (a :class:`VoxelSize`, or ``None`` when unknown) and its unit."""
    return {"voxel_size": VoxelSize.parse(voxel_size), "voxel_size_unit": UNIT}
