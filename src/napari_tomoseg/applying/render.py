"""A segmentation made ready for a 3D view: specks removed, one smooth surface per feature.

A network's mask, shown voxel by voxel in 3D, is a blocky cloud with many stray specks
(a few voxels the network fired on by mistake).  :func:`render_scene` removes the
connected pieces smaller than ``min_size`` voxels from each feature, smooths each
feature's mask with a light Gaussian and takes its iso-surface (naive surface nets,
:func:`napari_tomoseg.applying.picking.surface_mesh`), so membranes show as smooth sheets.  The
result says where the kept features lie, so a viewer can frame them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..errors import TomosegError
from .picking import surface_mesh

#: Connected pieces are found with 26-connectivity, so a thin, slanted membrane whose
#: voxels touch only at their edges or corners stays one piece.
CONNECTIVITY = ndimage.generate_binary_structure(3, 3)


@dataclass
class RenderSettings:
    """How a segmentation is turned into surfaces (defaults suit a binned tomogram at
    10-20 A per voxel)."""

    #: pieces of a feature smaller than this many voxels are specks and are not shown
    #: (a 200-voxel piece is a ball about 7 voxels across; a ribosome at 10 A is ~8000)
    min_size: int = 200
    #: Gaussian smoothing of each feature's mask before the surface is taken (voxels);
    #: 0 shows the voxels' own staircase
    sigma: float = 1.5
    #: the surface is drawn where the smoothed mask crosses this value; below 0.5 keeps
    #: membranes one or two voxels thin from breaking up after smoothing
    level: float = 0.35
    #: above this many voxels, blocks of voxels are averaged first (a coarser, lighter mesh)
    max_voxels: int = 32_000_000

    def check(self) -> None:
        if isinstance(self.min_size, bool) or int(self.min_size) != self.min_size:
            raise TomosegError(f"min_size must be a whole number of voxels, got {self.min_size}.")
        if self.min_size < 1:
            raise TomosegError(f"min_size must be at least 1 voxel, got {self.min_size}.")
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise TomosegError(f"sigma must be 0 or more voxels, got {self.sigma}.")
        if not 0.0 < self.level < 1.0:
            raise TomosegError(f"level must lie between 0 and 1, got {self.level}.")
        if self.max_voxels < 1:
            raise TomosegError(f"max_voxels must be positive, got {self.max_voxels}.")


@dataclass
class FeatureSurface:
    """The surface of one feature: ``vertices`` (N, 3) Z, Y, X in voxels of the
    segmentation, ``faces`` (M, 3); ``voxels`` kept and ``specks`` removed; ``lower`` and
    ``upper``: the first and last voxel (Z, Y, X) the kept feature fills."""

    value: int
    vertices: np.ndarray
    faces: np.ndarray
    voxels: int
    specks: int
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None


@dataclass
class Scene:
    """The surfaces of a segmentation and the box the kept features fill: ``lower`` and
    ``upper``, its first and last voxel (Z, Y, X), ``None`` when nothing is left."""

    surfaces: list[FeatureSurface] = field(default_factory=list)
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None

    @property
    def centre(self) -> np.ndarray | None:
        """The centre of the kept features' box (voxels), or ``None``."""
        if self.lower is None or self.upper is None:
            return None
        return (self.lower + self.upper) / 2.0


def remove_specks(mask: np.ndarray, min_size: int) -> tuple[np.ndarray, int]:
    """``mask`` (bool) without its connected pieces smaller than ``min_size`` voxels
    (26-connectivity); returns the cleaned mask and how many pieces were removed."""
    pieces, n = ndimage.label(np.asarray(mask, bool), structure=CONNECTIVITY)
    if n == 0:
        return np.zeros(pieces.shape, bool), 0
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    keep = sizes >= int(min_size)
    keep[0] = False
    return keep[pieces], int(n - np.count_nonzero(keep[1:]))


def _extent(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first and last index along each axis where ``mask`` (not empty) is set."""
    lower, upper = [], []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        where = np.flatnonzero(mask.any(axis=others))
        lower.append(where[0])
        upper.append(where[-1])
    return np.array(lower, float), np.array(upper, float)


def _block_step(shape: Sequence[int], max_voxels: int) -> int:
    """The block size that brings a volume of ``shape`` down to ``max_voxels`` or fewer."""
    voxels = float(np.prod(shape))
    return max(1, math.ceil((voxels / max_voxels) ** (1.0 / 3.0) - 1e-9))


def feature_surface(mask: np.ndarray, value: int, settings: RenderSettings) -> FeatureSurface:
    """The smoothed surface of one feature's mask, specks removed (see the module)."""
    kept, specks = remove_specks(mask, settings.min_size)
    voxels = int(np.count_nonzero(kept))
    if voxels == 0:
        empty = np.zeros((0, 3))
        return FeatureSurface(value, empty, np.zeros((0, 3), np.int64), 0, specks)
    field_ = kept.astype(np.float32)
    if settings.sigma > 0:
        field_ = ndimage.gaussian_filter(field_, settings.sigma, mode="constant")
    step = _block_step(field_.shape, settings.max_voxels)
    vertices, faces = surface_mesh(field_, settings.level, step)
    return FeatureSurface(value, vertices, faces, voxels, specks, *_extent(kept))


def render_scene(
    labels: np.ndarray,
    values: Sequence[int] | None = None,
    settings: RenderSettings | None = None,
) -> Scene:
    """One smooth surface per feature of a (Z, Y, X) label volume (``values``: the
    features to show, default every non-zero label), specks removed, and the box the
    kept features fill (for framing a view)."""
    s = settings or RenderSettings()
    s.check()
    volume = np.asarray(labels)
    if volume.ndim != 3:
        raise TomosegError(f"A 3D view needs a (Z, Y, X) segmentation, not {volume.ndim}D.")
    if values is None:
        values = [int(v) for v in np.unique(volume) if v != 0]
    scene = Scene()
    for value in values:
        surface = feature_surface(volume == value, int(value), s)
        if surface.voxels == 0:
            continue
        scene.surfaces.append(surface)
    if scene.surfaces:
        scene.lower = np.min([f.lower for f in scene.surfaces], axis=0)
        scene.upper = np.max([f.upper for f in scene.surfaces], axis=0)
    return scene
