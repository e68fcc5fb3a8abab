"""From a segmentation to numbers: components, counts, volumes, particle coordinates, meshes.

* **Components**: for each feature (label value) the connected regions of the mask
  (6-connectivity: voxels touching by a face), smaller than ``min_size`` voxels dropped.
* **Counts and volumes** per feature: components, particles, voxels and cubic nanometres
  (voxel volume = product of the (Z, Y, X) voxel size in Angstrom / 1000).
* **Coordinates** (Z, Y, X in voxels; voxel ``i`` has its centre at ``i``, so Angstrom =
  voxels * voxel size): ``method="centroid"``: one particle per component at its centre
  of mass; ``method="peak"``: local maxima of a map inside each component, at least
  ``min_distance`` voxels apart (greedy, strongest first; a plateau gives one peak at its
  centre).  The map is the class's probability map when given (smoothed with a Gaussian
  of 1 voxel), else the Euclidean distance to the component's boundary, whose maxima are
  the centres of touching blobs.
* **Export**: CSV (``label,class,z,y,x,z_A,y_A,x_A,size,component,score``) and a STAR file
  for RELION, read back with :func:`read_csv` / :func:`read_star`.
* **Memory**: the mask (memory-mapped, dask or Zarr) is read a block of slices at a time;
  each block is labelled on its own and components touching across the face to the next
  block are joined (a graph of the touching pieces), so no whole-volume label map is
  made.  Sums per component give sizes, centroids and scores; ``"peak"`` picking reads and
  labels each kept component's bounding box again.
* **Meshes**: :func:`surface_mesh` extracts a closed, consistently oriented triangle
  surface (scikit-image's marching cubes) for napari's Surface layer and copick.

STAR convention (one decision, written in every file's comments).  A ``data_general``
block holds ``_rlnTomoName``, ``_rlnImagePixelSize`` (Angstrom) and ``_rlnTomoSizeX/Y/Z``;
the ``data_particles`` loop holds ``_rlnTomoName``, ``_rlnCoordinateX/Y/Z`` **in voxels** of
the picked tomogram (as RELION 4 imports coordinates for a tomogram of that pixel size),
``_rlnCenteredCoordinateX/Y/ZAngst`` **in Angstrom from the tomogram centre** (RELION 5:
``(coordinate - size / 2) * voxel size``; written when the voxel size and the tomogram shape
are known), ``_rlnClassNumber`` (the label value) and ``_rlnAutopickFigureOfMerit`` (the
score), plus ``_tomosegClassName``, ``_tomosegComponent`` and ``_tomosegSize`` (RELION keeps
labels it does not know).  Numbers are written with full precision, so a file reads back
exactly.
"""

from __future__ import annotations

import csv
import io as _io
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .. import __version__
from ..data.io import atomic_path, read_slabs, release_pages
from ..data.probability import probabilities_as_float
from ..data.voxels import VoxelSize
from ..errors import MissingVoxelSizeWarning, TomosegError, TomosegIOError

PICK_METHODS = ("centroid", "peak")
CSV_COLUMNS = ("label", "class", "z", "y", "x", "z_A", "y_A", "x_A", "size", "component", "score")


# -- settings and results -----------------------------------------------------------------------
@dataclass
class PickSettings:
    """How particles are found in a mask.

    ``min_size``: components with fewer voxels are ignored.  ``method``: ``"centroid"``
    (one particle per component) or ``"peak"`` (maxima of the probability or distance map,
    ``min_distance`` voxels apart).  ``classes``: the label values to pick (``None``: every
    non-zero label in the mask).
    """

    min_size: int = 50
    method: str = "centroid"
    min_distance: int = 10
    classes: Sequence[int] | None = None

    def validate(self) -> None:
        """Raise :class:`TomosegError` for settings that cannot work."""
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, (int, np.integer)):
            raise TomosegError(f"min_size must be an integer, got {self.min_size!r}.")
        if self.min_size < 1:
            raise TomosegError(f"min_size must be at least 1 voxel, got {self.min_size}.")
        if self.method not in PICK_METHODS:
            raise TomosegError(f"method must be one of {PICK_METHODS}, got {self.method!r}.")
        if (
            isinstance(self.min_distance, bool)
            or not isinstance(self.min_distance, (int, np.integer))
            or self.min_distance < 1
        ):
            raise TomosegError(f"min_distance must be >= 1 voxel, got {self.min_distance!r}.")
        if self.classes is not None:
            for c in self.classes:
                if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
                    raise TomosegError(
                        f"classes must list label values >= 1 (0 is background), got {c!r}."
                    )


@dataclass
class Particle:
    """One picked particle: its feature (``label`` value and ``class_name``), position
    (Z, Y, X in voxels), the ``size`` (voxels) of its component, the component's number
    within its feature and a ``score`` (peak value, or the component's mean probability)."""

    label: int
    class_name: str
    z: float
    y: float
    x: float
    size: int
    component: int = 0
    score: float = 1.0

    def position(self) -> tuple[float, float, float]:
        return (self.z, self.y, self.x)


@dataclass
class FeatureStats:
    """Counts and volumes of one feature (label value)."""

    label: int
    name: str
    components: int
    particles: int
    voxels: int
    volume_nm3: float | None

    @property
    def mean_component_voxels(self) -> float:
        return self.voxels / self.components if self.components else 0.0


@dataclass
class PickResult:
    """Particles and per-feature statistics of one mask."""

    particles: list[Particle]
    stats: dict[int, FeatureStats]
    voxel_size: VoxelSize | None
    shape: tuple[int, int, int]
    settings: PickSettings = field(default_factory=PickSettings)

    def coordinates(self) -> np.ndarray:
        """(N, 3) Z, Y, X positions in voxels."""
        return np.array([p.position() for p in self.particles], dtype=np.float64).reshape(-1, 3)

    def coordinates_angstrom(self) -> np.ndarray:
        """(N, 3) Z, Y, X positions in Angstrom (needs the voxel size)."""
        if self.voxel_size is None:
            raise TomosegError("The voxel size is unknown, so positions cannot be in Angstrom.")
        return self.coordinates() * np.asarray(self.voxel_size)

    @property
    def counts(self) -> dict[str, int]:
        """Particles per feature name."""
        return {s.name: s.particles for s in self.stats.values()}

    @property
    def volumes_nm3(self) -> dict[str, float | None]:
        """Volume (nm^3) of the kept components per feature name."""
        return {s.name: s.volume_nm3 for s in self.stats.values()}

    def summary(self) -> str:
        """One line per feature, for a log or a notification."""
        lines = []
        for s in self.stats.values():
            vol = f", {s.volume_nm3:.4g} nm^3" if s.volume_nm3 is not None else ""
            lines.append(
                f"{s.name}: {s.particles} particles in {s.components} components, "
                f"{s.voxels} voxels{vol}"
            )
        return "\n".join(lines)


@dataclass
class ParticleTable:
    """What :func:`read_csv` / :func:`read_star` return."""

    particles: list[Particle]
    voxel_size: VoxelSize | None = None
    tomo_name: str | None = None
    shape: tuple[int, int, int] | None = None


# -- helpers --------------------------------------------------------------------------------------


def _class_name(class_names: Any, label: int) -> str:
    if class_names is None:
        return f"feature {label}"
    if isinstance(class_names, Mapping):
        return str(class_names.get(label, f"feature {label}"))
    names = list(class_names)
    return str(names[label]) if 0 <= label < len(names) else f"feature {label}"


def _probability_for(probabilities: Any, label: int, n_picked: int) -> np.ndarray | None:
    if probabilities is None:
        return None
    if isinstance(probabilities, Mapping):
        return probabilities.get(label)
    if hasattr(probabilities, "ndim") and probabilities.ndim == 3:
        if n_picked != 1:
            raise TomosegError(
                "One probability map was given for several features; give a list (one map "
                "per foreground class) or a dict label -> map."
            )
        return probabilities
    maps = list(probabilities)
    return maps[label - 1] if 1 <= label <= len(maps) else None


# -- picking --------------------------------------------------------------------------------------
def _check_labels(block: np.ndarray) -> None:
    if block.dtype.kind == "i" and block.size and int(block.min()) < 0:
        raise TomosegError("The mask has negative labels; labels are 0 (background) or more.")


def _bincount(labels: np.ndarray, minlength: int) -> np.ndarray:
    """Voxels per value of a non-negative integer volume, a block of slices at a time (so
    no full-size int64 copy is made, and a lazy volume is never read whole)."""
    counts = np.zeros(max(1, minlength), dtype=np.int64)
    for _, block in read_slabs(labels):
        _check_labels(block)
        part = np.bincount(block.ravel())
        if part.size > counts.size:
            counts = np.concatenate([counts, np.zeros(part.size - counts.size, np.int64)])
        counts[: part.size] += part
    return counts


def feature_mask(mask: Any, label: int) -> np.ndarray:
    """The boolean (Z, Y, X) mask of one label of ``mask``, built a block of slices at a
    time: ``mask`` (memory-mapped, dask, Zarr) is never read whole into memory."""
    out = np.zeros(tuple(int(n) for n in mask.shape), dtype=bool)
    for z0, block in read_slabs(mask):
        np.equal(block, label, out=out[z0 : z0 + block.shape[0]])
    return out


def _peaks(
    value: np.ndarray, region: np.ndarray, min_distance: int
) -> list[tuple[np.ndarray, float]]:
    """Greedy non-maximum suppression of the local maxima of ``value`` inside ``region``.

    Returns ``(position (3,), value)`` per peak; a peak's position is the mean of the
    equally high candidates it suppressed (the centre of a plateau).
    """
    footprint = 2 * min_distance + 1
    filled = np.where(region, value, -np.inf)
    local_max = ndimage.maximum_filter(filled, size=footprint, mode="constant", cval=-np.inf)
    cand = np.argwhere(region & (filled >= local_max))
    if cand.size == 0:
        return []
    vals = filled[tuple(cand.T)]
    order = np.lexsort((cand[:, 2], cand[:, 1], cand[:, 0], -vals))
    cand = cand[order].astype(np.float64)
    vals = vals[order]
    owner = np.full(len(cand), -1)
    peaks: list[int] = []
    for i in range(len(cand)):
        if owner[i] >= 0:
            continue
        owner[i] = i
        peaks.append(i)
        d = np.sqrt(((cand - cand[i]) ** 2).sum(axis=1))
        near = (d < min_distance) & (owner < 0)
        owner[near] = i
    out = []
    scale = max(1.0, float(np.max(np.abs(vals))))
    for i in peaks:
        same = (owner == i) & (vals >= vals[i] - 1e-6 * scale)
        out.append((cand[same].mean(axis=0), float(vals[i])))
    return out


@dataclass
class _Regions:
    """Connected regions of one feature, one row each: voxel count, sums of the voxels'
    (Z, Y, X) and of their probabilities, bounding box (``lo`` inclusive, ``hi``
    exclusive) and the raster index of the first voxel (which orders regions as scipy's
    labelling of the whole volume does).  All of these add up when regions join."""

    size: np.ndarray
    sums: np.ndarray
    score: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    first: np.ndarray

    @classmethod
    def empty(cls) -> _Regions:
        return cls._of_size(0)

    @classmethod
    def _of_size(cls, n: int) -> _Regions:
        big = np.iinfo(np.int64).max
        return cls(
            size=np.zeros(n, np.int64),
            sums=np.zeros((n, 3)),
            score=np.zeros(n),
            lo=np.full((n, 3), big, np.int64),
            hi=np.zeros((n, 3), np.int64),
            first=np.full(n, big, np.int64),
        )

    def __len__(self) -> int:
        return len(self.size)

    def take(self, index: np.ndarray) -> _Regions:
        return _Regions(*(getattr(self, f.name)[index] for f in fields(self)))

    @classmethod
    def concat(cls, parts: Sequence[_Regions]) -> _Regions:
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def merged(self, group: np.ndarray, n: int) -> _Regions:
        """Rows with the same ``group`` value joined into one row each (``n`` groups)."""
        out = _Regions._of_size(n)
        np.add.at(out.size, group, self.size)
        np.add.at(out.sums, group, self.sums)
        np.add.at(out.score, group, self.score)
        np.minimum.at(out.lo, group, self.lo)
        np.maximum.at(out.hi, group, self.hi)
        np.minimum.at(out.first, group, self.first)
        return out


def _slab_regions(
    labels: np.ndarray, n: int, z0: int, plane: int, prob: np.ndarray | None
) -> _Regions:
    """The regions of one slab's labels (1..n), in whole-volume coordinates."""
    out = _Regions._of_size(n)
    flat = labels.ravel()
    where = np.flatnonzero(flat)
    ids = flat[where].astype(np.intp) - 1
    coords = list(np.unravel_index(where, labels.shape))
    coords[0] = coords[0] + z0
    out.size[:] = np.bincount(ids, minlength=n)
    for axis, c in enumerate(coords):
        out.sums[:, axis] = np.bincount(ids, weights=c, minlength=n)
        np.minimum.at(out.lo[:, axis], ids, c)
        np.maximum.at(out.hi[:, axis], ids, c + 1)
    if prob is not None:
        out.score[:] = np.bincount(ids, weights=prob.ravel()[where], minlength=n)
    np.minimum.at(out.first, ids, where + z0 * plane)
    return out


def _joined(
    open_regions: _Regions, open_face: np.ndarray | None, pieces: _Regions, first: np.ndarray
) -> tuple[int, np.ndarray]:
    """Groups of the regions still open at the previous slab's last slice (labelled
    1..k in ``open_face``) and of a new slab's pieces (labelled 1..n in ``first``, the
    slab's first slice) that touch across the face between them."""
    k, total = len(open_regions), len(open_regions) + len(pieces)
    if open_face is None or k == 0 or len(pieces) == 0:
        return total, np.arange(total)
    a, b = open_face.ravel(), first.ravel()
    both = (a > 0) & (b > 0)
    pairs = np.unique((a[both].astype(np.int64) - 1) * total + k + b[both] - 1)
    rows, cols = np.divmod(pairs, total)
    graph = coo_matrix((np.ones(len(pairs), bool), (rows, cols)), shape=(total, total))
    return connected_components(graph, directed=False)


def _components(mask: Any, label: int, prob: Any, min_size: int) -> _Regions:
    """The connected regions (6-connectivity) of ``mask == label`` with at least
    ``min_size`` voxels, in raster order of their first voxel.

    Streamed: ``mask`` (and ``prob``) are read a slab of slices at a time; a region that
    reaches a slab's last slice stays open and joins the regions of the next slab that
    touch it, so memory holds one slab and the regions crossing its face, never a
    whole-volume label map."""
    shape = tuple(int(n) for n in mask.shape)
    plane = shape[1] * shape[2]
    kept: list[_Regions] = []
    open_regions, open_face = _Regions.empty(), None
    for z0, block in read_slabs(mask):
        z1 = z0 + block.shape[0]
        _check_labels(block)
        labels, n = ndimage.label(block == label)
        p = None if prob is None else probabilities_as_float(np.asarray(prob[z0:z1]))
        pieces = _slab_regions(labels, n, z0, plane, p)
        groups, group = _joined(open_regions, open_face, pieces, labels[0])
        merged = _Regions.concat([open_regions, pieces]).merged(group, groups)
        face = labels[-1] if z1 < shape[0] else np.zeros_like(labels[-1])
        face_group = group[len(open_regions) + face[face > 0].astype(np.intp) - 1]
        still = np.zeros(groups, bool)
        still[face_group] = True
        closed = merged.take(~still)
        kept.append(closed.take(closed.size >= min_size))
        open_regions = merged.take(still)
        open_face = np.zeros(face.shape, np.int64)
        open_face[face > 0] = np.cumsum(still)[face_group]
        release_pages(prob)
    regions = _Regions.concat(kept)
    return regions.take(np.argsort(regions.first, kind="stable"))


def _region_in_box(
    mask: Any, label: int, regions: _Regions, i: int, margin: int
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Region ``i``'s bounding box (grown by ``margin`` voxels, inside the volume) and its
    voxels there: the box of ``mask`` is read and labelled, and the region is the piece
    holding its first voxel (a region lies whole inside its bounding box)."""
    shape = tuple(int(n) for n in mask.shape)
    box = tuple(
        slice(max(0, int(lo) - margin), min(n, int(hi) + margin))
        for lo, hi, n in zip(regions.lo[i], regions.hi[i], shape)
    )
    labels, _ = ndimage.label(np.asarray(mask[box]) == label)
    seed = np.unravel_index(int(regions.first[i]), shape)
    local = tuple(int(s) - b.start for s, b in zip(seed, box))
    return box, labels == labels[local]


def _region_particles(
    mask: Any, label: int, prob: Any, regions: _Regions, i: int, settings: PickSettings
) -> list[tuple[np.ndarray, float]]:
    """``(position, score)`` of the particles of region ``i``."""
    size = int(regions.size[i])
    if settings.method == "centroid":
        score = float(regions.score[i] / size) if prob is not None else 1.0
        return [(regions.sums[i] / size, score)]
    box, region = _region_in_box(mask, label, regions, i, margin=1)
    if prob is not None:
        value = ndimage.gaussian_filter(probabilities_as_float(np.asarray(prob[box])), 1.0)
    else:
        value = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1, 1:-1]
    offset = np.array([s.start for s in box], dtype=np.float64)
    return [(pos + offset, score) for pos, score in _peaks(value, region, settings.min_distance)]


def pick(
    mask: np.ndarray,
    *,
    probabilities: Any = None,
    voxel_size: Any = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    settings: PickSettings | None = None,
) -> PickResult:
    """Find the components of each feature of ``mask`` and their particles.

    ``mask`` and the maps may be lazy (memory-mapped, dask, Zarr): they are streamed.

    Parameters
    ----------
    mask
        The (Z, Y, X) integer label volume (0 is background).
    probabilities
        A (Z, Y, X) map when one feature is picked, a list with one map per foreground
        class (label ``k`` uses entry ``k - 1``, as :mod:`napari_tomoseg.applying.inference`
        returns them) or a dict label -> map; float or stored bytes (:mod:`.probability`).
        They place ``"peak"`` particles and give centroids a score; None: peaks of the
        distance to the component's edge, and centroids score 1.
    voxel_size
        (Z, Y, X) or one value in Angstrom; gives volumes in nm^3 and is kept for
        Angstrom coordinates.  None: volumes are None.
    class_names
        The feature names: index (or dict key) = label value; None: ``"feature N"``.
    settings
        Minimum size, method, classes (:class:`PickSettings`; the defaults when None).

    Returns
    -------
    PickResult
        The particles (positions in voxels) and per-feature counts and volumes.
    """
    settings = settings or PickSettings()
    settings.validate()
    if not hasattr(mask, "ndim") or mask.ndim != 3:
        raise TomosegError(
            f"Picking needs a 3D (Z, Y, X) mask, got shape {getattr(mask, 'shape', None)}."
        )
    if np.dtype(mask.dtype).kind not in "biu":
        raise TomosegError(f"The mask must hold integer labels, got dtype {mask.dtype}.")
    vs = VoxelSize.parse(voxel_size)
    shape = tuple(int(n) for n in mask.shape)
    if settings.classes is None:  # one more pass over the mask, only when needed
        present = _bincount(mask, 1)
        classes = [v for v in range(1, len(present)) if present[v] > 0]
    else:
        classes = sorted({int(c) for c in settings.classes})
    voxel_nm3 = None if vs is None else vs[0] * vs[1] * vs[2] / 1000.0
    particles: list[Particle] = []
    stats: dict[int, FeatureStats] = {}
    for label in classes:
        name = _class_name(class_names, label)
        prob = _probability_for(probabilities, label, len(classes))
        if prob is not None and tuple(prob.shape) != shape:
            raise TomosegError(
                f"The probability map for {name!r} has shape {tuple(prob.shape)}, the mask "
                f"{shape}."
            )
        centroid_prob = prob if settings.method == "centroid" else None  # peaks read boxes
        regions = _components(mask, label, centroid_prob, settings.min_size)
        before = len(particles)
        for i in range(len(regions)):
            for pos, score in _region_particles(mask, label, prob, regions, i, settings):
                z, y, x = (float(v) for v in pos)
                particles.append(
                    Particle(label, name, z, y, x, int(regions.size[i]), i + 1, float(score))
                )
        voxels = int(regions.size.sum())
        stats[label] = FeatureStats(
            label=label,
            name=name,
            components=len(regions),
            particles=len(particles) - before,
            voxels=voxels,
            volume_nm3=None if voxel_nm3 is None else voxels * voxel_nm3,
        )
    return PickResult(
        particles=particles,
        stats=stats,
        voxel_size=vs,
        shape=shape,  # type: ignore[arg-type]
        settings=settings,
    )


# -- CSV ------------------------------------------------------------------------------------------
def _particles_of(particles: Sequence[Particle] | PickResult) -> list[Particle]:
    if isinstance(particles, PickResult):
        return list(particles.particles)
    out = list(particles)
    for p in out:
        if not isinstance(p, Particle):
            raise TomosegError(f"Expected Particle objects, got {type(p).__name__}.")
    return out


def _num(value: float) -> str:
    """A float that reads back exactly (shortest round-trip form)."""
    return repr(float(value))


def write_csv(
    path: str | os.PathLike,
    particles: Sequence[Particle] | PickResult,
    voxel_size: Any = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write particles as CSV (header ``label,class,z,y,x,z_A,y_A,x_A,size,component,score``).

    Positions in voxels and in Angstrom (empty when the voxel size is unknown, with a
    warning).  Written atomically.

    Parameters
    ----------
    path
        The CSV file.
    particles
        A :class:`PickResult` or a list of :class:`Particle`.
    voxel_size
        (Z, Y, X) or one value in Angstrom; None: a :class:`PickResult`'s own.
    overwrite
        Replace an existing file (else :class:`~napari_tomoseg.errors.OutputExistsError`).
    """
    items = _particles_of(particles)
    if voxel_size is None and isinstance(particles, PickResult):
        voxel_size = particles.voxel_size
    vs = VoxelSize.parse(voxel_size)
    if vs is None:
        warnings.warn(
            "No voxel size: the Angstrom columns of the CSV are left empty.",
            MissingVoxelSizeWarning,
            stacklevel=2,
        )
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in items:
        ang = ["", "", ""] if vs is None else [_num(v * s) for v, s in zip(p.position(), vs)]
        writer.writerow(
            [
                p.label,
                p.class_name,
                _num(p.z),
                _num(p.y),
                _num(p.x),
                *ang,
                p.size,
                p.component,
                _num(p.score),
            ]
        )
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return path


def read_csv(path: str | os.PathLike) -> ParticleTable:
    """Read a CSV written by :func:`write_csv` (the voxel size comes from the Angstrom columns).

    Parameters
    ----------
    path
        The CSV file; it needs the columns ``label``, ``class``, ``z``, ``y``, ``x``.

    Returns
    -------
    ParticleTable
        The particles (positions in voxels) and the voxel size (None when the Angstrom
        columns are empty).
    """
    path = Path(path)
    if not path.is_file():
        raise TomosegIOError(f"Cannot read {path}: the file does not exist.")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [
            c for c in ("label", "class", "z", "y", "x") if c not in (reader.fieldnames or [])
        ]
        if missing:
            raise TomosegIOError(
                f"Cannot read {path}: the columns {missing} are missing; expected a header row "
                f"{','.join(CSV_COLUMNS)}."
            )
        particles = []
        ratios: list[list[float]] = [[], [], []]
        try:
            for row in reader:
                p = Particle(
                    label=int(row["label"]),
                    class_name=row["class"],
                    z=float(row["z"]),
                    y=float(row["y"]),
                    x=float(row["x"]),
                    size=int(row.get("size") or 0),
                    component=int(row.get("component") or 0),
                    score=float(row.get("score") or 1.0),
                )
                particles.append(p)
                for k, (axis, col) in enumerate((("z", "z_A"), ("y", "y_A"), ("x", "x_A"))):
                    if row.get(col) and float(row[axis]) != 0.0:
                        ratios[k].append(float(row[col]) / float(row[axis]))
        except (TypeError, ValueError) as exc:
            raise TomosegIOError(f"Cannot read {path}: a row is malformed ({exc}).") from None
    vs = None
    if all(ratios):  # a ratio that is no voxel size (0 A columns) leaves it unknown
        vs = VoxelSize.parse_or_none([float(np.median(r)) for r in ratios])
    return ParticleTable(particles=particles, voxel_size=vs)


# -- STAR -----------------------------------------------------------------------------------------
#: Columns (and simple-block labels) read as text, never as numbers: "001" stays "001".
_STAR_TEXT = ["rlnTomoName", "tomosegClassName", "tomosegVoxelSizeZYX"]


def _star_text(text: str) -> str:
    """A text value for starfile, quoted where a bare word would be read as STAR syntax
    (starfile itself quotes only values that are empty or hold a space)."""
    text = str(text)
    if any(ch in text for ch in "\"'\t\r\n"):
        raise TomosegError(
            f"Cannot write {text!r} to a STAR file (it holds a quote, tab or line break)."
        )
    syntax = text.startswith(("_", "#", "data_", "loop_"))
    return f'"{text}"' if syntax and " " not in text else text


def _star_general(tomo_name: str, vs: Any, size: Any) -> dict[str, Any]:
    """The ``data_general`` block: tomogram name, pixel size and size (module notes)."""
    general: dict[str, Any] = {"rlnTomoName": _star_text(tomo_name)}
    if vs is not None:
        general["rlnImagePixelSize"] = float(vs[2])
        if not (vs[0] == vs[1] == vs[2]):
            general["tomosegVoxelSizeZYX"] = ",".join(repr(float(v)) for v in vs)
    if size is not None:
        general.update(rlnTomoSizeX=size[2], rlnTomoSizeY=size[1], rlnTomoSizeZ=size[0])
    return general


def _star_particles(items: list[Particle], tomo_name: str, vs: Any, size: Any) -> Any:
    """The ``data_particles`` loop as a DataFrame (RELION 4 voxels, RELION 5 centred
    Angstrom when the voxel size and the shape are known)."""
    import pandas as pd

    xyz = np.array([(p.x, p.y, p.z) for p in items], dtype=np.float64).reshape(-1, 3)
    columns: dict[str, Any] = {
        "rlnTomoName": [_star_text(tomo_name)] * len(items),
        "rlnCoordinateX": xyz[:, 0],
        "rlnCoordinateY": xyz[:, 1],
        "rlnCoordinateZ": xyz[:, 2],
    }
    if vs is not None and size is not None:
        centred = (xyz - np.array(size[::-1]) / 2) * np.array(vs[::-1])
        for k, axis in enumerate("XYZ"):
            columns[f"rlnCenteredCoordinate{axis}Angst"] = centred[:, k]
    columns.update(
        rlnClassNumber=np.array([p.label for p in items], dtype=np.int64),
        rlnAutopickFigureOfMerit=np.array([p.score for p in items], dtype=np.float64),
        tomosegClassName=[_star_text(p.class_name) for p in items],
        tomosegComponent=np.array([p.component for p in items], dtype=np.int64),
        tomosegSize=np.array([p.size for p in items], dtype=np.int64),
    )
    return pd.DataFrame(columns)


def write_star(
    path: str | os.PathLike,
    particles: Sequence[Particle] | PickResult,
    voxel_size: Any = None,
    *,
    tomo_name: str = "tomogram",
    shape: Sequence[int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write particles as a RELION STAR file (convention in the module notes), with the
    ``starfile`` library.

    Parameters
    ----------
    path
        The STAR file.
    particles
        A :class:`PickResult` or a list of :class:`Particle`.
    voxel_size
        (Z, Y, X) or one value in Angstrom; None: a :class:`PickResult`'s own (else voxel
        coordinates only, with a warning).
    tomo_name
        Fills ``_rlnTomoName`` (RELION matches it to its tomogram set).
    shape
        The tomogram's (Z, Y, X) in voxels (a :class:`PickResult`'s own when None); with a
        voxel size it enables the RELION 5 centred Angstrom columns.
    overwrite
        Replace an existing file (else :class:`~napari_tomoseg.errors.OutputExistsError`).
    """
    from starfile.writer import StarWriter

    items = _particles_of(particles)
    if isinstance(particles, PickResult):
        voxel_size = particles.voxel_size if voxel_size is None else voxel_size
        shape = particles.shape if shape is None else shape
    vs = VoxelSize.parse(voxel_size)
    if vs is None:
        warnings.warn(
            "No voxel size: the STAR file has coordinates in voxels only.",
            MissingVoxelSizeWarning,
            stacklevel=2,
        )
    size = None if shape is None else tuple(int(s) for s in shape)
    if size is not None and len(size) != 3:
        raise TomosegError(f"shape must be the tomogram's (Z, Y, X), got {shape!r}.")
    blocks = {
        "general": _star_general(tomo_name, vs, size),
        "particles": _star_particles(items, tomo_name, vs, size),
    }
    # float_format=None: pandas writes the shortest text that reads back exactly
    body = StarWriter(blocks, float_format=None).to_string()
    body = re.sub(r"^(_\S+)\t+", r"\1 ", body, flags=re.MULTILINE)  # "_label value"
    header = (
        f"# written by napari-tomoseg {__version__}\n"
        "# _rlnCoordinateX/Y/Z: voxels of the picked tomogram (voxel i has its centre at i)\n"
        "# _rlnCenteredCoordinate*Angst: (coordinate - size / 2) * voxel size (RELION 5)\n"
    )
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(header + body, encoding="utf-8")
    return path


def _star_blocks(path: Path) -> tuple[dict[str, Any], Any]:
    """The ``data_general`` pairs and the particle table (a DataFrame) of a STAR file."""
    import pandas as pd
    import starfile

    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=_STAR_TEXT)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise TomosegIOError(f"Cannot read {path}: not a valid STAR file ({exc}).") from None
    coords = ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")
    tables = [b for b in blocks.values() if isinstance(b, pd.DataFrame)]
    table = blocks.get("particles")
    if not isinstance(table, pd.DataFrame):
        table = next((t for t in tables if "rlnCoordinateX" in t.columns), None)
    if table is None or not all(c in table.columns for c in coords):
        raise TomosegIOError(
            f"Cannot read {path}: no particle table with _rlnCoordinateX/Y/Z was found."
        )
    general = blocks.get("general")
    return (general if isinstance(general, dict) else {}), table


def read_star(path: str | os.PathLike) -> ParticleTable:
    """Read a STAR file written by :func:`write_star` (or any with ``data_particles`` and
    ``_rlnCoordinateX/Y/Z``) with the ``starfile`` library.

    Parameters
    ----------
    path
        The STAR file.

    Returns
    -------
    ParticleTable
        The particles (positions in voxels), voxel size, tomogram name and shape where the
        file gives them.
    """
    path = Path(path)
    if not path.is_file():
        raise TomosegIOError(f"Cannot read {path}: the file does not exist.")
    general, table = _star_blocks(path)
    n = len(table)

    def column(name: str, default: Any) -> list[Any]:
        return table[name].tolist() if name in table.columns else [default] * n

    try:
        labels = [int(float(v)) for v in column("rlnClassNumber", 1)]
        particles = [
            Particle(
                label=label,
                class_name=str(name) if name is not None else f"feature {label}",
                z=float(z),
                y=float(y),
                x=float(x),
                size=int(size),
                component=int(component),
                score=float(score),
            )
            for label, name, z, y, x, size, component, score in zip(
                labels,
                column("tomosegClassName", None),
                column("rlnCoordinateZ", None),
                column("rlnCoordinateY", None),
                column("rlnCoordinateX", None),
                column("tomosegSize", 0),
                column("tomosegComponent", 0),
                column("rlnAutopickFigureOfMerit", 1.0),
            )
        ]
        vs = None  # a pixel size that is no voxel size (RELION's 0: unknown) stays unknown
        if "tomosegVoxelSizeZYX" in general:
            zyx = [float(v) for v in str(general["tomosegVoxelSizeZYX"]).split(",")]
            vs = VoxelSize.parse_or_none(zyx) if len(zyx) == 3 else None
        elif "rlnImagePixelSize" in general:
            vs = VoxelSize.parse_or_none(float(general["rlnImagePixelSize"]))
        shape = None
        if all(f"rlnTomoSize{a}" in general for a in "XYZ"):
            shape = tuple(int(general[f"rlnTomoSize{a}"]) for a in "ZYX")
    except (TypeError, ValueError) as exc:
        raise TomosegIOError(f"Cannot read {path}: a value is malformed ({exc}).") from None
    tomo = general.get("rlnTomoName")
    if tomo is None and n and "rlnTomoName" in table.columns:
        tomo = table["rlnTomoName"].iloc[0]
    return ParticleTable(
        particles=particles,
        voxel_size=vs,
        tomo_name=None if tomo is None else str(tomo),
        shape=shape,  # type: ignore[arg-type]
    )


# -- surface meshes ---------------------------------------------------------------------------
#: Gaussian (voxels) that smooths a binary mask before its surface is extracted.
BINARY_MESH_SIGMA = 0.5


def _block_mean(volume: np.ndarray, step: int) -> np.ndarray:
    """Mean over ``step``-sided blocks (zero-padded to a multiple of ``step``)."""
    if step == 1:
        return volume
    pad = [(0, (-n) % step) for n in volume.shape]
    v = np.pad(volume, pad)
    nz, ny, nx = (n // step for n in v.shape)
    return v.reshape(nz, step, ny, step, nx, step).mean(axis=(1, 3, 5), dtype=np.float32)


def surface_mesh(
    mask: np.ndarray,
    level: float = 0.5,
    step: int = 1,
    *,
    label: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A closed triangle mesh of the ``level`` surface of ``mask``: ``(vertices, faces)``.

    ``vertices`` (N, 3) are Z, Y, X in voxels of ``mask`` (scale by the voxel size for
    Angstrom, or give napari's Surface layer the image's scale); ``faces`` (M, 3) index them,
    wound so that normals point outwards (from values above ``level`` to values below).
    Integer masks are binarised (``mask == label``, or ``mask > 0`` without a label); float
    maps (e.g. probabilities) are used as they are.  ``step`` > 1 averages ``step``-sided
    blocks first (coarser, faster).  The volume is padded with background, so surfaces are
    closed at the volume's faces too.  The surface is scikit-image's marching cubes
    (Lewiner et al. 2003, whose ambiguity rules keep it a closed manifold).  A binary mask
    is smoothed first by a Gaussian of :data:`BINARY_MESH_SIGMA` voxels: the staircase
    surface of its voxels is about 8% larger than the shape it samples (a sphere), the
    smoothed one about 4%; a one-voxel sheet still peaks at 0.79, so it keeps its surface.

    Parameters
    ----------
    mask
        The (Z, Y, X) label mask or float map (read into memory).
    level
        The value the surface passes through.
    step
        Block size in voxels to average first, >= 1.
    label
        The label value to mesh in an integer mask; None: every non-zero label.
    """
    from skimage.measure import marching_cubes

    if not hasattr(mask, "ndim") or mask.ndim != 3:
        raise TomosegError("A surface mesh needs a 3D (Z, Y, X) volume.")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise TomosegError(f"step must be a positive integer, got {step!r}.")
    a = np.asarray(mask)
    binary = label is not None or a.dtype == np.bool_ or a.dtype.kind in "iu"
    if binary:
        f = (a == label) if label is not None else (a > 0)
        f = np.pad(f.astype(np.float32), 1)
        f = ndimage.gaussian_filter(f, BINARY_MESH_SIGMA, mode="constant")[1:-1, 1:-1, 1:-1]
    else:
        f = a.astype(np.float32)
    outside = 0.0 if level > 0 else level - 1.0
    f = np.pad(_block_mean(f, int(step)), 1, mode="constant", constant_values=outside)
    if not (f > level).any():
        return np.zeros((0, 3), dtype=np.float64), np.zeros((0, 3), dtype=np.int64)
    vertices, faces, _, _ = marching_cubes(f, level=level, allow_degenerate=False)
    vertices = (vertices.astype(np.float64) - 1.0) * step + (step - 1) / 2.0
    # scikit-image winds faces clockwise seen from outside; ours are anticlockwise
    return vertices, faces[:, ::-1].astype(np.int64)


def mesh_area(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Total area of a triangle mesh (in the units of ``vertices``)."""
    if len(faces) == 0:
        return 0.0
    v = np.asarray(vertices, dtype=np.float64)
    tri = v[np.asarray(faces)]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    return float(0.5 * np.sqrt((cross**2).sum(axis=1)).sum())


def mesh_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Signed volume enclosed by a closed mesh (positive when the normals point outwards)."""
    if len(faces) == 0:
        return 0.0
    v = np.asarray(vertices, dtype=np.float64)
    tri = v[np.asarray(faces)]
    return float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0)


__all__ = [
    "CSV_COLUMNS",
    "PICK_METHODS",
    "FeatureStats",
    "Particle",
    "ParticleTable",
    "PickResult",
    "PickSettings",
    "mesh_area",
    "mesh_volume",
    "pick",
    "read_csv",
    "read_star",
    "surface_mesh",
    "write_csv",
    "write_star",
]
