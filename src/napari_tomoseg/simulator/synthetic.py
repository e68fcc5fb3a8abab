"""Simulated cryo-electron tomograms of a crowded cell, with six-class ground truth.

The simulator builds a clean 3D scattering-potential map of a piece of cytoplasm (microtubules,
ribosomes, a mitochondrion, vesicles, ER, a cell membrane, a carbon film edge, and unlabelled
distractors: gold fiducials, actin filaments, dense vesicle contents, crowded cytoplasm) and
then images it the way a microscope does: a tilt series about the Y axis (+-60 degrees by
default), a contrast transfer function with an envelope, shot noise, and weighted (ramp
filtered) back-projection.  The reconstruction therefore carries the real artefacts that
segmentation has to cope with: the missing wedge smears features along Z, membranes whose
normal points along Z fade away, gold beads throw streaks, and the CTF adds fringes.

Conventions: axes (Z, Y, X), voxel size in Angstrom, lengths inside the scene in voxels.
Density is positive for matter (protein, lipid, carbon, gold) relative to the surrounding
vitreous ice, so in the reconstruction matter appears **dark** (negative), as in real
cryo-ET.  The tomogram is returned with zero mean and unit standard deviation.

Physics, parameters and references: ``docs/simulator.md``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage, sparse
from scipy.spatial.transform import Rotation

from ..errors import TomosegError
from ..progress import Progress, drive, never_stop

CLASS_NAMES: tuple[str, ...] = (
    "background",
    "microtubule",
    "ribosome",
    "double_membrane",
    "single_membrane",
    "carbon_edge",
)
BACKGROUND, MICROTUBULE, RIBOSOME, DOUBLE_MEMBRANE, SINGLE_MEMBRANE, CARBON_EDGE = range(6)

#: Label value -> colour (RGBA hex); background fully transparent.
CLASS_COLORS: dict[int, str] = {
    BACKGROUND: "#00000000",
    MICROTUBULE: "#e6194bff",
    RIBOSOME: "#ffe119ff",
    DOUBLE_MEMBRANE: "#4363d8ff",
    SINGLE_MEMBRANE: "#3cb44bff",
    CARBON_EDGE: "#f58231ff",
}

#: Where classes claim the same voxel, the one listed first wins.  Thin structures that an
#: annotator traces with care (carbon edge, membranes) beat bulky ones.
LABEL_PRIORITY: tuple[int, ...] = (
    CARBON_EDGE,
    DOUBLE_MEMBRANE,
    SINGLE_MEMBRANE,
    MICROTUBULE,
    RIBOSOME,
)
_RANK = np.zeros(len(CLASS_NAMES), dtype=np.int8)  # label value -> rank (higher wins)
_RANK[list(LABEL_PRIORITY)] = np.arange(len(LABEL_PRIORITY), 0, -1)

#: Number of objects per cubic micrometre of volume used when a count is ``None`` (gold:
#: per square micrometre of the XY field, since fiducials sit on the ice surfaces).  Chosen
#: so the default 96x256x256 volume at 10 A holds about 3 microtubules, 30 ribosomes, 5
#: vesicles, 1 mitochondrion, 1 ER tube, 16 actin filaments and 4 gold beads.
DEFAULT_DENSITIES: dict[str, float] = {
    "microtubules": 480.0,
    "ribosomes": 4800.0,
    "vesicles": 800.0,
    "mitochondria": 100.0,
    "er_tubes": 160.0,
    "actin": 2500.0,
    "gold_per_um2": 60.0,
}

# Sizes in nanometres (references in docs/simulator.md).
_MT_OUTER_R = 12.5  # microtubule outer diameter 25 nm
_MT_INNER_R = 7.5  # lumen ~15 nm, wall ~5 nm
_ACTIN_R = 3.5  # actin filament diameter ~7 nm
_ACTIN_CROSSOVER = 36.0  # half-pitch of the two-start helix
_MEMBRANE_HALF = 2.5  # a bilayer is ~4-5 nm thick (label half-width)
_HEADGROUP_OFFSET = 1.9  # headgroup peaks ~3.8 nm apart
_RIBOSOME_BOUND = 17.5  # radius of the sphere that holds a ~28 nm ribosome
_GAP = 1.0  # minimum distance between objects
_CROWD_SIGMA = 1.5  # macromolecular crowders: Gaussian blobs ~5 nm across

# Contrast of each material relative to vitreous ice, in units of protein (see docs).
_PROTEIN = 1.0
_RNA_RICH = 1.3
_HEADGROUP = 1.0
_TAILS = -0.25
_CARBON = 2.0
_GOLD = 10.0


@dataclass
class SimulationSettings:
    """Everything that decides a simulated tomogram; the same settings and seed give the
    same arrays.

    Lengths: ``voxel_size`` in Angstrom, film sizes in nm, ``defocus_um`` in micrometres
    (underfocus positive), ``bfactor`` in square Angstrom.  Counts set to ``None`` scale
    with the volume (``DEFAULT_DENSITIES``); an integer asks for that many (fewer are
    placed when the volume is too crowded).  ``snr`` is the per-pixel signal-to-noise ratio
    of the untilted image: the variance of the CTF-filtered projection (measured robustly,
    so gold beads do not count) over the variance of the noise; ``math.inf`` means no
    noise.  ``phase_flip`` corrects the CTF sign before reconstruction, as IMOD's
    ctfphaseflip does.  ``total_dose`` (electrons per square Angstrom over the tilt series,
    0: none) damages the specimen as the images are taken, in dose-symmetric order;
    ``alignment_error_px`` is the r.m.s. in-plane shift (pixels) left in each image after
    tilt-series alignment.  See ``docs/simulator.md``.
    """

    shape: tuple[int, int, int] = (96, 256, 256)
    voxel_size: float = 10.0
    seed: int = 0
    # imaging
    tilt_max: float = 60.0
    tilt_step: float = 3.0
    defocus_um: float = 4.0
    voltage_kv: float = 300.0
    spherical_aberration_mm: float = 2.7
    amplitude_contrast: float = 0.07
    bfactor: float = 150.0
    phase_flip: bool = True
    snr: float = 0.8
    # imperfections of real tilt series (both off by default)
    total_dose: float = 0.0
    alignment_error_px: float = 0.0
    # scene
    n_microtubules: int | None = None
    n_ribosomes: int | None = None
    n_vesicles: int | None = None
    n_mitochondria: int | None = None
    n_er_tubes: int | None = None
    n_actin: int | None = None
    n_gold: int | None = None
    er_ribosome_fraction: float = 0.4
    dense_vesicle_fraction: float = 0.35
    cell_membrane: bool = True
    carbon_edge: bool = True
    carbon_thickness_nm: float = 20.0
    carbon_edge_width_nm: float = 8.0
    # feature sizes and the cytoplasm (for tomograms unlike the default one)
    membrane_thickness_nm: float = 5.0
    # density of a bilayer's hydrocarbon core, in units of protein over ice (-0.25: lipid
    # tails alone, lighter than ice; up to 1: a core packed with membrane proteins, so the
    # bilayer reads as one dense band rather than two thin headgroup lines)
    membrane_core_density: float = _TAILS
    microtubule_diameter_nm: float = 25.0
    # how far (degrees) a microtubule may run out of the XY plane, and how strongly its
    # wall is modulated along the axis by the 4 nm tubulin repeat (0: a smooth wall)
    microtubule_elevation_deg: float = 4.0
    microtubule_lattice: float = 0.12
    vesicle_radius_nm: tuple[float, float] = (15.0, 60.0)
    # how far vesicles depart from spheres: the largest ratio of a vesicle's longest axis to
    # its shortest (1: every vesicle a sphere; above 1, randomly oriented ellipsoids)
    vesicle_aspect: float = 1.0
    # large complexes other than ribosomes (proteasome-like barrels, chaperonin-like hollow
    # double rings, lobed assemblies), unlabelled, as many as this times the ribosomes: a
    # ribosome network must tell a ribosome by its shape, not by its size and density
    complexes: float = 0.0
    crowding: float = 1.0
    # reconstruction and display
    lowpass: float = 1.0
    invert_contrast: bool = False
    keep_density: bool = True


@dataclass
class SimulatedTomogram:
    """A simulated reconstruction with the ground truth it was made from."""

    tomogram: np.ndarray
    labels: np.ndarray
    voxel_size: float
    class_names: tuple[str, ...]
    ribosome_centres: np.ndarray
    density: np.ndarray | None
    settings: SimulationSettings
    tilt_angles: np.ndarray = field(default_factory=lambda: np.zeros(0))


# --------------------------------------------------------------------------- validation


def _check_settings(s: SimulationSettings) -> None:
    """Refuse settings that cannot make a tomogram, saying which and what to use."""
    shape = tuple(s.shape)
    if len(shape) != 3 or not all(isinstance(n, (int, np.integer)) for n in shape):
        raise TomosegError(f"shape must be three integers (Z, Y, X); got {s.shape!r}.")
    if shape[0] < 8 or shape[1] < 16 or shape[2] < 16:
        raise TomosegError(
            f"shape {shape} is too small to simulate; use at least (8, 16, 16) voxels."
        )
    checks = [
        (s.voxel_size > 0 and math.isfinite(s.voxel_size), "voxel_size must be > 0 Angstrom"),
        (0 < s.tilt_max < 90, "tilt_max must be between 0 and 90 degrees"),
        (0 < s.tilt_step <= s.tilt_max, "tilt_step must be > 0 and <= tilt_max"),
        (s.defocus_um > 0, "defocus_um must be > 0 (underfocus, in micrometres)"),
        (s.voltage_kv > 0, "voltage_kv must be > 0"),
        (s.spherical_aberration_mm >= 0, "spherical_aberration_mm must be >= 0"),
        (0 <= s.amplitude_contrast < 1, "amplitude_contrast must be in [0, 1)"),
        (s.bfactor >= 0, "bfactor must be >= 0 (square Angstrom)"),
        (s.snr > 0, "snr must be > 0 (use math.inf for no noise)"),
        (0 <= s.total_dose < 1e4, "total_dose must be >= 0 electrons per square Angstrom"),
        (
            0 <= s.alignment_error_px <= 20,
            "alignment_error_px must be 0-20 pixels (r.m.s. shift per image)",
        ),
        (0 <= s.er_ribosome_fraction <= 1, "er_ribosome_fraction must be in [0, 1]"),
        (0 <= s.dense_vesicle_fraction <= 1, "dense_vesicle_fraction must be in [0, 1]"),
        (s.carbon_thickness_nm > 0, "carbon_thickness_nm must be > 0"),
        (s.carbon_edge_width_nm > 0, "carbon_edge_width_nm must be > 0"),
        (2.0 <= s.membrane_thickness_nm <= 12.0, "membrane_thickness_nm must be 2-12 nm"),
        (-0.5 <= s.membrane_core_density <= 1.0, "membrane_core_density must be -0.5-1"),
        (0.0 <= s.complexes <= 5.0, "complexes must be 0-5 (complexes per ribosome)"),
        (12.0 <= s.microtubule_diameter_nm <= 40.0, "microtubule_diameter_nm must be 12-40 nm"),
        (0.0 <= s.microtubule_elevation_deg <= 90.0, "microtubule_elevation_deg must be 0-90"),
        (0.0 <= s.microtubule_lattice <= 0.8, "microtubule_lattice must be 0-0.8"),
        (
            len(s.vesicle_radius_nm) == 2
            and 5.0 <= s.vesicle_radius_nm[0] <= s.vesicle_radius_nm[1],
            "vesicle_radius_nm must be (smallest, largest) with 5 <= smallest <= largest",
        ),
        (1.0 <= s.vesicle_aspect <= 4.0, "vesicle_aspect must be 1-4 (1: spheres)"),
        (0.0 <= s.crowding <= 4.0, "crowding must be 0-4 (1: ~25% protein in the cytoplasm)"),
        (0.05 <= s.lowpass <= 1.0, "lowpass must be in [0.05, 1] (1: no low-pass filter)"),
    ]
    for ok, message in checks:
        if not ok:
            raise TomosegError(f"Invalid simulation settings: {message}.")
    for name in (
        "n_microtubules",
        "n_ribosomes",
        "n_vesicles",
        "n_mitochondria",
        "n_er_tubes",
        "n_actin",
        "n_gold",
    ):
        value = getattr(s, name)
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
            raise TomosegError(
                f"Invalid simulation settings: {name} must be a count >= 0 or None "
                f"(None scales it with the volume); got {value!r}."
            )


# --------------------------------------------------------------------------- geometry helpers


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _perpendicular_frame(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors perpendicular to ``t`` and to each other."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(t[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = _unit(np.cross(t, helper))
    return e1, np.cross(t, e1)


def _direction(rng: np.random.Generator, max_elevation_deg: float) -> np.ndarray:
    """A random unit vector (z, y, x) at most ``max_elevation_deg`` out of the XY plane."""
    azimuth = rng.uniform(0.0, 2.0 * math.pi)
    elevation = math.radians(rng.uniform(-max_elevation_deg, max_elevation_deg))
    return np.array(
        [
            math.sin(elevation),
            math.cos(elevation) * math.sin(azimuth),
            math.cos(elevation) * math.cos(azimuth),
        ]
    )


def _occupancy(sd: np.ndarray) -> np.ndarray:
    """Fraction of a voxel inside a surface at signed distance ``sd`` (voxels, < 0 inside)."""
    return np.clip(0.5 - sd, 0.0, 1.0)


def _segment_distance(points: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance from each of ``points`` (N, 3) to each segment (p0[k], p1[k]) -> (N, K)."""
    d = p1 - p0
    length2 = np.maximum((d * d).sum(axis=1), 1e-12)
    rel = points[:, None, :] - p0[None, :, :]
    t = np.clip((rel * d[None]).sum(axis=2) / length2[None], 0.0, 1.0)
    closest = p0[None] + t[..., None] * d[None]
    return np.sqrt(((points[:, None, :] - closest) ** 2).sum(axis=2))


def _ellipsoid_sd(local: tuple[np.ndarray, ...], axes: np.ndarray) -> np.ndarray:
    """Approximate signed distance to an ellipsoid surface (first order, exact on the axes)."""
    q2 = sum((c / a) ** 2 for c, a in zip(local, axes))
    g2 = sum((c / (a * a)) ** 2 for c, a in zip(local, axes))
    qn = np.sqrt(q2)
    return (qn - 1.0) * qn / np.maximum(np.sqrt(g2), 1e-6)


class _Obstacles:
    """Regions already taken, as analytic shapes, to keep new objects from overlapping."""

    def __init__(self) -> None:
        self.spheres: list[tuple[np.ndarray, float]] = []
        self.capsules: list[tuple[np.ndarray, np.ndarray, float]] = []
        self.ellipsoids: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.cell: tuple[np.ndarray, float] | None = None
        self.carbon: Callable[[np.ndarray], np.ndarray] | None = None

    def clearance(
        self, points: np.ndarray, solid_only: bool = False, skip_capsule: int | None = None
    ) -> np.ndarray:
        """Distance from each point (N, 3) to the nearest taken region (< 0 inside one).

        ``solid_only`` ignores the cell exterior; ``skip_capsule`` ignores one capsule (the
        ER tube a ribosome is being docked on)."""
        points = np.atleast_2d(np.asarray(points, dtype=np.float64))
        best = np.full(len(points), np.inf)
        if self.spheres:
            centres = np.array([c for c, _ in self.spheres])
            radii = np.array([r for _, r in self.spheres])
            dist = np.sqrt(((points[:, None, :] - centres[None]) ** 2).sum(axis=2)) - radii
            best = np.minimum(best, dist.min(axis=1))
        caps = [c for i, c in enumerate(self.capsules) if i != skip_capsule]
        if caps:
            p0 = np.array([c[0] for c in caps])
            p1 = np.array([c[1] for c in caps])
            radii = np.array([c[2] for c in caps])
            best = np.minimum(best, (_segment_distance(points, p0, p1) - radii).min(axis=1))
        for centre, rot, axes in self.ellipsoids:
            local = (points - centre) @ rot
            best = np.minimum(best, _ellipsoid_sd(tuple(local.T), axes))
        if self.carbon is not None:
            best = np.minimum(best, self.carbon(points))
        if self.cell is not None and not solid_only:
            centre, radius = self.cell
            best = np.minimum(best, radius - np.linalg.norm(points - centre, axis=1))
        return best


# --------------------------------------------------------------------------- the scene


class _Scene:
    """The clean density, the labels and the bookkeeping needed to place objects."""

    def __init__(self, settings: SimulationSettings, rng: np.random.Generator) -> None:
        self.settings = settings
        self.rng = rng
        self.shape = tuple(int(n) for n in settings.shape)
        self.nm = settings.voxel_size / 10.0  # nanometres per voxel
        self.density = np.zeros(self.shape, dtype=np.float32)
        self.labels = np.zeros(self.shape, dtype=np.uint8)
        self.free = np.ones(self.shape, dtype=bool)  # no object here: cytoplasm fills it
        self.outside = np.zeros(self.shape, dtype=bool)  # extracellular side of the cell
        self.obstacles = _Obstacles()
        self.ribosome_centres: list[np.ndarray] = []
        thickness = float(settings.membrane_thickness_nm)
        self.half = max(thickness / 2 / self.nm, 0.6)
        self.bilayer_scale = thickness / (2 * _MEMBRANE_HALF)  # headgroup spacing and tails
        sigma = max(1.2 / self.nm, 0.7)
        noise = rng.standard_normal(self.shape, dtype=np.float32)
        texture = ndimage.gaussian_filter(noise, sigma, mode="wrap", truncate=3.0)
        texture /= max(float(texture.std()), 1e-6)
        self.texture = texture  # smooth unit-variance field that roughens every object
        self.size = np.array(self.shape, dtype=np.float64)
        self.volume_um3 = float(np.prod(self.size)) * (self.nm * 1e-3) ** 3
        self.area_um2 = float(self.size[1] * self.size[2]) * (self.nm * 1e-3) ** 2

    # -- conversions and random helpers
    def px(self, nm: float) -> float:
        """Nanometres to voxels."""
        return nm / self.nm

    def count(self, value: int | None, key: str, minimum: int) -> int:
        """The number of objects asked for, or the default density times the volume."""
        if value is not None:
            return int(value)
        if key == "gold_per_um2":
            return int(round(DEFAULT_DENSITIES[key] * self.area_um2))
        return max(minimum, int(round(DEFAULT_DENSITIES[key] * self.volume_um3)))

    def random_point(self, margin: float = 0.0) -> np.ndarray:
        lo = np.full(3, margin)
        hi = np.maximum(self.size - 1 - margin, lo + 1e-3)
        return self.rng.uniform(lo, hi)

    # -- boxes
    def box(
        self, lo: np.ndarray, hi: np.ndarray
    ) -> tuple[tuple[slice, ...], tuple[np.ndarray, ...]] | None:
        """Slices and open coordinate grids of the voxels in [lo, hi], clipped to the volume."""
        a = np.maximum(np.floor(lo).astype(int), 0)
        b = np.minimum(np.ceil(hi).astype(int) + 1, self.shape)
        if np.any(b <= a):
            return None
        sl = tuple(slice(int(i), int(j)) for i, j in zip(a, b))
        grids = np.ogrid[sl]
        return sl, tuple(g.astype(np.float32) for g in grids)

    def chunks(
        self, lo: np.ndarray, hi: np.ndarray, max_voxels: int = 1_500_000
    ) -> Iterator[tuple[tuple[slice, ...], tuple[np.ndarray, ...]]]:
        """``box`` split into Z slabs so big objects never build huge temporaries."""
        found = self.box(lo, hi)
        if found is None:
            return
        sl, _ = found
        plane = (sl[1].stop - sl[1].start) * (sl[2].stop - sl[2].start)
        step = max(1, max_voxels // max(plane, 1))
        for z0 in range(sl[0].start, sl[0].stop, step):
            sub = (slice(z0, min(z0 + step, sl[0].stop)), sl[1], sl[2])
            grids = np.ogrid[sub]
            yield sub, tuple(g.astype(np.float32) for g in grids)

    # -- writing
    def paint(self, sl: tuple[slice, ...], mask: np.ndarray, cls: int) -> None:
        """Give ``cls`` to the voxels of ``mask`` unless a higher-priority class holds them."""
        lab = self.labels[sl]
        mask = np.broadcast_to(mask, lab.shape)
        lab[mask & (_RANK[lab] < _RANK[cls])] = cls

    def claim(self, sl: tuple[slice, ...], mask: np.ndarray) -> None:
        """Mark voxels as taken by an object (no crowding texture there)."""
        free = self.free[sl]
        free &= ~np.broadcast_to(mask, free.shape)

    def bilayer(self, sd: np.ndarray) -> np.ndarray:
        """Density across a lipid bilayer whose mid-plane is at signed distance ``sd``.

        Two headgroup layers ~3.8 nm apart and the core between them (``membrane_core_density``:
        lipid tails lighter than ice by default, denser with membrane proteins), each a Gaussian
        widened by the voxel (a box of one voxel has variance voxel^2 / 12) so the profile
        is sampled without aliasing.  Zero beyond a few voxels from the mid-plane."""
        sd = np.asarray(sd, dtype=np.float32)
        out = np.zeros(sd.shape, dtype=np.float32)
        near = np.abs(sd) < self.half + 3
        if not near.any():
            return out
        d = sd[near] * np.float32(self.nm)
        s0, t0 = 0.45 * self.bilayer_scale, 0.8 * self.bilayer_scale
        offset = _HEADGROUP_OFFSET * self.bilayer_scale
        s_head = math.sqrt(s0 * s0 + self.nm * self.nm / 12.0)
        s_tail = math.sqrt(t0 * t0 + self.nm * self.nm / 12.0)
        head = _HEADGROUP * (s0 / s_head)
        tail = self.settings.membrane_core_density * (t0 / s_tail)
        values = head * (
            np.exp(-((d - offset) ** 2) / (2 * s_head**2))
            + np.exp(-((d + offset) ** 2) / (2 * s_head**2))
        )
        values += tail * np.exp(-(d * d) / (2 * s_tail**2))
        out[near] = values
        return out

    # -- line placement
    def fit_line(
        self,
        centre: np.ndarray,
        direction: np.ndarray,
        radius: float,
        max_length: float,
        min_length: float,
        solid_only: bool = False,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The longest free stretch (<= max_length) of a line through ``centre``, or None."""
        reach = float(np.linalg.norm(self.size)) + 2 * radius
        steps = np.arange(-reach, reach + 1e-6, 1.0)
        points = centre[None] + steps[:, None] * direction[None]
        inside = np.all((points >= -radius) & (points <= self.size - 1 + radius), axis=1)
        ok = inside & (self.obstacles.clearance(points, solid_only) >= radius + self.px(_GAP))
        best_len, best = 0, None
        start = None
        for i, flag in enumerate(np.append(ok, False)):
            if flag and start is None:
                start = i
            elif not flag and start is not None:
                if i - start > best_len:
                    best_len, best = i - start, (start, i - 1)
                start = None
        if best is None or best_len < min_length:
            return None
        i0, i1 = best
        if best_len > max_length:
            shift = int(self.rng.integers(0, int(best_len - max_length) + 1))
            i0 += shift
            i1 = i0 + int(max_length)
        return points[i0].copy(), points[i1].copy()

    def segment_chunks(
        self, p0: np.ndarray, p1: np.ndarray, reach: float, chunk: float = 32.0
    ) -> Iterator[tuple[tuple[slice, ...], np.ndarray, np.ndarray, np.ndarray, tuple]]:
        """Walk a segment in pieces; yield each piece's box with, per voxel, the position ``s``
        along the axis, the distance ``rho`` from the axis line and the offset from ``p0``.

        Pieces partition the axis coordinate, so every voxel is visited once; the first and
        last pieces extend ``reach`` beyond the ends."""
        axis = p1 - p0
        length = float(np.linalg.norm(axis))
        t = axis / max(length, 1e-9)
        n = max(1, int(math.ceil(length / chunk)))
        for k in range(n):
            s0 = -reach if k == 0 else k * length / n
            s1 = length + reach if k == n - 1 else (k + 1) * length / n
            a, b = p0 + t * s0, p0 + t * s1
            found = self.box(np.minimum(a, b) - reach, np.maximum(a, b) + reach)
            if found is None:
                continue
            sl, (zz, yy, xx) = found
            rel = (zz - p0[0], yy - p0[1], xx - p0[2])
            s = rel[0] * t[0] + rel[1] * t[1] + rel[2] * t[2]
            rho2 = rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2 - s * s
            rho = np.sqrt(np.maximum(rho2, 0.0))
            piece = (s >= s0) & ((s < s1) if k < n - 1 else (s <= s1))
            yield sl, s, rho, piece, rel


# --------------------------------------------------------------------------- objects


def _add_carbon(scene: _Scene) -> None:
    """A carbon film slab lying in the XY plane that ends along a gently curved hole edge."""
    rng, s = scene.rng, scene.settings
    nz, ny, nx = scene.size
    thick = scene.px(s.carbon_thickness_nm)
    z_lo = 0.08 * nz + thick / 2
    z_hi = max(z_lo, 0.4 * nz - thick / 2) if nz > 3 * thick else z_lo
    z_mid = rng.uniform(z_lo, z_hi) if z_hi > z_lo else nz / 2
    slope = np.tan(np.radians(rng.uniform(-2.0, 2.0, size=2)))  # film slightly tilted
    angle = rng.uniform(0, 2 * math.pi)
    e = np.array([math.sin(angle), math.cos(angle)])
    field_half = 0.5 * min(ny, nx)
    centre_yx = np.array([ny - 1, nx - 1]) / 2
    edge_point = centre_yx + e * rng.uniform(0.2, 0.4) * field_half * 2
    hole_r = scene.px(rng.uniform(600.0, 1200.0))  # holey carbon: ~1-2 um holes
    hole_c = edge_point - e * hole_r
    # a ragged edge: random harmonics whose amplitude falls with frequency (a few nm)
    wiggle_k = np.arange(8, 400, 7)
    wiggle_amp = scene.px(40.0) / wiggle_k * rng.uniform(0.3, 1.0, size=wiggle_k.size)
    wiggle_phase = rng.uniform(0, 2 * math.pi, size=wiggle_k.size)
    psi_table = np.linspace(-math.pi, math.pi, 8193)
    edge_table = hole_r + (
        wiggle_amp[:, None] * np.sin(wiggle_k[:, None] * psi_table[None] + wiggle_phase[:, None])
    ).sum(axis=0)
    width = max(scene.px(s.carbon_edge_width_nm), 1.0)

    def radial(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        dy, dx = y - hole_c[0], x - hole_c[1]
        r_edge = np.interp(np.arctan2(dy, dx), psi_table, edge_table)
        return np.sqrt(dy * dy + dx * dx) - r_edge  # > 0 inside the carbon

    def mid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return z_mid + slope[0] * (y - centre_yx[0]) + slope[1] * (x - centre_yx[1])

    def carbon_sd(points: np.ndarray) -> np.ndarray:
        slab = np.abs(points[:, 0] - mid(points[:, 1], points[:, 2])) - thick / 2
        return np.maximum(slab, -radial(points[:, 1], points[:, 2]))

    lo = np.array([z_mid - thick / 2 - 8, 0, 0])
    hi = np.array([z_mid + thick / 2 + 8, ny, nx])
    for sl, (zz, yy, xx) in scene.chunks(lo, hi):
        r = radial(yy, xx)
        slab = np.abs(zz - mid(yy, xx)) - thick / 2
        sd = np.maximum(slab, -r)
        occ = _occupancy(sd)
        if not occ.any():
            continue
        grain = 1.0 + 0.12 * scene.texture[sl]
        scene.density[sl] += (_CARBON * occ * grain).astype(np.float32)
        scene.paint(sl, (sd <= 0) & (r <= width), CARBON_EDGE)
        scene.claim(sl, sd <= 0.5)
    scene.obstacles.carbon = carbon_sd


def _add_cell_membrane(scene: _Scene) -> None:
    """The plasma membrane: a large sphere whose surface crosses the field near one side."""
    rng = scene.rng
    nz, ny, nx = scene.size
    radius = scene.px(rng.uniform(500.0, 1500.0))
    angle = rng.uniform(0, 2 * math.pi)
    e = np.array([0.0, math.sin(angle), math.cos(angle)])
    centre = (scene.size - 1) / 2
    edge = centre + e * rng.uniform(0.28, 0.42) * min(ny, nx)
    cell_c = edge - e * radius
    cell_c[0] += rng.uniform(-0.3, 0.3) * radius  # membrane normal tilted out of XY
    cell_c = edge + _unit(cell_c - edge) * radius
    half = scene.half
    for sl, (zz, yy, xx) in scene.chunks(np.zeros(3), scene.size):
        sd = np.sqrt((zz - cell_c[0]) ** 2 + (yy - cell_c[1]) ** 2 + (xx - cell_c[2]) ** 2)
        sd -= radius
        band = np.abs(sd) < half + 4
        if band.any():
            scene.density[sl] += scene.bilayer(sd)
            scene.paint(sl, np.abs(sd) <= half, SINGLE_MEMBRANE)
            scene.claim(sl, np.abs(sd) <= half + 0.5)
        scene.outside[sl] = sd > half
    scene.obstacles.cell = (cell_c, radius - half)


def _add_mitochondrion(scene: _Scene) -> bool:
    """A mitochondrion: two bilayers (outer, inner) around a dense matrix, with cristae."""
    rng = scene.rng
    field_nm = min(scene.size[1], scene.size[2]) * scene.nm
    attempts = 120
    # try the most open places first (largest distance to anything already placed)
    candidates = rng.uniform(0.0, 1.0, size=(4 * attempts, 3)) * (scene.size - 1)
    candidates[:, 0] = rng.uniform(0.3, 0.7, size=len(candidates)) * scene.size[0]
    order = np.argsort(-scene.obstacles.clearance(candidates), kind="stable")
    for attempt in range(attempts):
        a_long = rng.uniform(70.0, 120.0)
        a_short = rng.uniform(45.0, 70.0)
        a_z = rng.uniform(35.0, 55.0)
        cap = 0.3 * field_nm + 10.0  # small fields get small mitochondria
        shrink = 1.0 - 0.5 * attempt / attempts  # crowded volumes get smaller ones
        axes_nm = np.minimum(np.array([a_z, a_short, a_long]), cap) * shrink
        axes = axes_nm / scene.nm
        yaw = rng.uniform(0, 2 * math.pi)
        tilt = math.radians(rng.uniform(-15, 15))
        cy, sy, ct, st = math.cos(yaw), math.sin(yaw), math.cos(tilt), math.sin(tilt)
        rot_yaw = np.array([[1, 0, 0], [0, cy, -sy], [0, sy, cy]])
        rot_tilt = np.array([[ct, 0, -st], [0, 1, 0], [st, 0, ct]])
        rot = rot_yaw @ rot_tilt  # columns: local z, short, long axes in (z, y, x)
        centre = candidates[order[attempt % 24]]  # among the 24 most open places
        # the outer surface must be clear of what is already there
        u = _fibonacci_sphere(200)
        surface = centre + (u * (axes + scene.half + scene.px(_GAP))) @ rot.T
        if np.all(scene.obstacles.clearance(surface) >= 0):
            break
    else:
        return False
    # outer to inner bilayer, centre to centre (narrower in a small mitochondrion)
    spacing = scene.px(min(rng.uniform(14.0, 24.0), 0.4 * float(axes_nm[1:].min())))
    half = scene.half
    n_cristae = int(rng.integers(1, 4))
    cristae = []
    for _ in range(n_cristae):
        # a lamella across the short axis, entering from one side of the inner membrane
        normal = rot @ _unit(np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.3, 0.3), 1.0]))
        point = centre + rot[:, 2] * rng.uniform(-0.6, 0.6) * axes[2]
        side = rot[:, 1] * (1 if rng.random() < 0.5 else -1)
        side = _unit(side - normal * float(side @ normal))
        tip = -rng.uniform(-0.3, 0.5) * axes[1]  # how far across the matrix it reaches
        lumen_half = scene.px(rng.uniform(5.0, 9.0))
        cristae.append((normal, point, side, tip, lumen_half))
    reach = float(axes.max()) + half + 3
    for sl, (zz, yy, xx) in scene.chunks(centre - reach, centre + reach):
        dz, dy, dx = zz - centre[0], yy - centre[1], xx - centre[2]
        local = tuple(dz * rot[0, k] + dy * rot[1, k] + dx * rot[2, k] for k in range(3))
        sd_out = _ellipsoid_sd(local, axes)
        if not (sd_out < half + 2).any():
            continue
        sd_in = sd_out + spacing
        texture = scene.texture[sl]
        dens = scene.bilayer(sd_out) + scene.bilayer(sd_in)
        ims = _occupancy(sd_out + half) * (1 - _occupancy(sd_in - half))
        dens += 0.1 * ims
        matrix = _occupancy(sd_in + half)
        membrane = (np.abs(sd_out) <= half) | (np.abs(sd_in) <= half)
        for normal, point, side, tip, lumen_half in cristae:
            h = (zz - point[0]) * normal[0] + (yy - point[1]) * normal[1]
            h = h + (xx - point[2]) * normal[2]
            g = (dz * side[0] + dy * side[1] + dx * side[2]).astype(np.float32)
            dg = np.maximum(tip - g, 0.0)
            sd_c = np.sqrt(h * h + dg * dg) - lumen_half
            in_matrix = sd_in < -half
            dens += np.where(in_matrix, scene.bilayer(sd_c), 0.0)
            matrix = matrix * (1 - _occupancy(sd_c + half))
            membrane |= in_matrix & (np.abs(sd_c) <= half)
        dens += 0.38 * matrix * (1 + 0.6 * texture)
        scene.density[sl] += dens.astype(np.float32)
        scene.paint(sl, membrane, DOUBLE_MEMBRANE)
        scene.claim(sl, sd_out <= half + 0.5)
    scene.obstacles.ellipsoids.append((centre, rot, axes + half))
    return True


def _fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` nearly evenly spread unit vectors."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(phi), np.sin(phi) * np.sin(theta), np.sin(phi) * np.cos(theta)], 1)


def _add_er_tube(scene: _Scene) -> int | None:
    """A tube of endoplasmic reticulum (single membrane); returns its obstacle index."""
    rng = scene.rng
    radius = scene.px(rng.uniform(22.0, 38.0))
    diag = float(np.linalg.norm(scene.size[1:]))
    for _attempt in range(30):
        direction = _direction(rng, 12.0)
        centre = scene.random_point()
        centre[0] = rng.uniform(0.3, 0.7) * scene.size[0]
        ends = scene.fit_line(
            centre, direction, radius + scene.half, diag * rng.uniform(0.6, 1.2), 0.35 * diag
        )
        if ends is not None:
            break
    else:
        return None
    p0, p1 = ends
    half = scene.half
    for sl, s, rho, piece, _rel in scene.segment_chunks(p0, p1, radius + half + 3):
        length = float(np.linalg.norm(p1 - p0))
        sc = np.clip(s, 0, length)
        dist = np.sqrt(np.maximum(rho * rho + (s - sc) ** 2, 0.0))
        sd = dist - radius
        near = piece & (sd < half + 3)
        if not near.any():
            continue
        lumen = 0.12 * _occupancy(sd + half) * (1 + 0.4 * scene.texture[sl])
        dens = np.where(near, scene.bilayer(sd) + lumen, 0.0)
        scene.density[sl] += dens.astype(np.float32)
        scene.paint(sl, piece & (np.abs(sd) <= half), SINGLE_MEMBRANE)
        scene.claim(sl, piece & (sd <= half + 0.5))
    index = len(scene.obstacles.capsules)
    scene.obstacles.capsules.append((p0, p1, radius + half))
    return index


def _add_microtubule(scene: _Scene) -> bool:
    """A straight 13-protofilament microtubule lying roughly in the XY plane."""
    rng = scene.rng
    outer_nm = scene.settings.microtubule_diameter_nm / 2
    r_out, r_in = scene.px(outer_nm), scene.px(outer_nm * _MT_INNER_R / _MT_OUTER_R)
    diag = float(np.linalg.norm(scene.size[1:]))
    attempts = 60
    for attempt in range(attempts):
        # thin cells: microtubules run nearly in XY (by default)
        direction = _direction(rng, scene.settings.microtubule_elevation_deg)
        centre = scene.random_point(margin=0)
        min_length = max(scene.px(60.0 * (1 - 0.5 * attempt / attempts)), 8)
        ends = scene.fit_line(centre, direction, r_out, diag * rng.uniform(0.5, 1.3), min_length)
        if ends is not None:
            break
    else:
        return False
    p0, p1 = ends
    axis = _unit(p1 - p0)
    e1, e2 = _perpendicular_frame(axis)
    length = float(np.linalg.norm(p1 - p0))
    phase = rng.uniform(0, 2 * math.pi)
    for sl, s, rho, piece, rel in scene.segment_chunks(p0, p1, r_out + 2):
        near = piece & (rho < r_out + 2)
        if not near.any():
            continue
        ends_occ = np.clip(0.5 + s, 0, 1) * np.clip(0.5 + length - s, 0, 1)
        wall = _occupancy(rho - r_out) * (1 - _occupancy(rho - r_in)) * ends_occ
        a = rel[0] * e1[0] + rel[1] * e1[1] + rel[2] * e1[2]
        b = rel[0] * e2[0] + rel[1] * e2[1] + rel[2] * e2[2]
        phi = np.arctan2(b, a)
        s_nm = s * scene.nm
        lattice = (
            1
            + 0.2 * np.cos(13 * phi + phase)
            + scene.settings.microtubule_lattice * np.cos(2 * math.pi * s_nm / 4.0 + 3 * phi)
        )
        lumen = 0.05 * _occupancy(rho - r_in) * ends_occ
        dens = _PROTEIN * wall * lattice * (1 + 0.2 * scene.texture[sl]) + lumen
        scene.density[sl] += np.where(near, dens, 0.0).astype(np.float32)
        inside = near & (rho <= r_out) & (s >= 0) & (s <= length)
        scene.paint(sl, inside, MICROTUBULE)
        scene.claim(sl, near & (rho <= r_out + 0.5))
    scene.obstacles.capsules.append((p0, p1, r_out))
    return True


def _add_actin(scene: _Scene) -> int:
    """A straight actin filament, or a small bundle of parallel ones; returns how many."""
    rng = scene.rng
    r = scene.px(_ACTIN_R)
    diag = float(np.linalg.norm(scene.size[1:]))
    direction = _direction(rng, 25.0)
    e1, e2 = _perpendicular_frame(direction)
    n_bundle = int(rng.integers(2, 6)) if rng.random() < 0.3 else 1
    spacing = scene.px(rng.uniform(10.0, 13.0))
    centre = scene.random_point()
    offsets = [np.zeros(3)]
    for _ in range(n_bundle - 1):
        base = offsets[int(rng.integers(0, len(offsets)))]
        ang = rng.uniform(0, 2 * math.pi)
        offsets.append(base + spacing * (math.cos(ang) * e1 + math.sin(ang) * e2))
    placed = 0
    max_len = diag * rng.uniform(0.3, 0.9)
    for off in offsets:
        ends = scene.fit_line(centre + off, direction, r, max_len, max(scene.px(50.0), 6))
        if ends is None:
            continue
        p0, p1 = ends
        length = float(np.linalg.norm(p1 - p0))
        phase = rng.uniform(0, 2 * math.pi)
        for sl, s, rho, piece, _rel in scene.segment_chunks(p0, p1, 2 * r + 2):
            near = piece & (rho < 2 * r + 2)
            if not near.any():
                continue
            radius = r * (1 + 0.2 * np.cos(2 * math.pi * s * scene.nm / _ACTIN_CROSSOVER + phase))
            ends_occ = np.clip(0.5 + s, 0, 1) * np.clip(0.5 + length - s, 0, 1)
            dens = 0.9 * _occupancy(rho - radius) * ends_occ * (1 + 0.2 * scene.texture[sl])
            scene.density[sl] += np.where(near, dens, 0.0).astype(np.float32)
            scene.claim(sl, near & (rho <= radius + 0.5))
        scene.obstacles.capsules.append((p0, p1, r * 1.2))
        placed += 1
    return placed


def _vesicle_shape(scene: _Scene, radius: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Semi-axes (voxels) and rotation of a vesicle of largest radius ``radius``: a sphere
    (rotation None, nothing drawn) unless ``vesicle_aspect`` > 1, then an ellipsoid whose
    other two axes are up to ``vesicle_aspect`` times shorter, randomly oriented."""
    aspect = float(scene.settings.vesicle_aspect)
    if aspect <= 1.0:
        return np.full(3, radius), None
    shrink = np.exp(-scene.rng.uniform(0.0, math.log(aspect), size=2))
    axes = radius * np.array([1.0, *shrink])
    axes = np.maximum(axes, scene.half + 2.0)  # a lumen stays between the leaflets
    rot = Rotation.random(random_state=scene.rng).as_matrix()
    return axes, rot


def _add_vesicle(scene: _Scene, dense: bool) -> bool:
    """A vesicle (single membrane), a sphere or an ellipsoid (``vesicle_aspect``), its
    lumen clear or filled with dense content."""
    rng = scene.rng
    smallest, largest = scene.settings.vesicle_radius_nm
    radius_nm = math.exp(rng.uniform(math.log(smallest), math.log(largest)))
    radius_nm = min(radius_nm, 0.4 * min(scene.size[1:]) * scene.nm)
    radius = scene.px(radius_nm)
    axes, rot = _vesicle_shape(scene, radius)
    half = scene.half
    for _attempt in range(60):
        centre = scene.random_point(margin=0)
        if scene.obstacles.clearance(centre[None])[0] >= radius + half + scene.px(_GAP):
            break
    else:
        return False
    reach = radius + half + 3
    found = scene.box(centre - reach, centre + reach)
    if found is not None:
        sl, (zz, yy, xx) = found
        dz, dy, dx = zz - centre[0], yy - centre[1], xx - centre[2]
        if rot is None:
            sd = np.sqrt(dz**2 + dy**2 + dx**2) - radius
        else:
            local = tuple(dz * rot[0, k] + dy * rot[1, k] + dx * rot[2, k] for k in range(3))
            sd = _ellipsoid_sd(local, axes)
        dens = scene.bilayer(sd)
        if dense:
            level = rng.uniform(0.5, 0.9)
            dens += level * _occupancy(sd + half) * (1 + 0.5 * scene.texture[sl])
        else:
            dens += 0.04 * _occupancy(sd + half)
        dens = np.where(sd < half + 3, dens, 0.0)
        scene.density[sl] += dens.astype(np.float32)
        scene.paint(sl, np.abs(sd) <= half, SINGLE_MEMBRANE)
        scene.claim(sl, sd <= half + 0.5)
    if rot is None:
        scene.obstacles.spheres.append((centre, radius + half))
    else:
        scene.obstacles.ellipsoids.append((centre, rot, axes + half))
    return True


def _ribosome_shape(
    scene: _Scene, centre: np.ndarray, up: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Ellipsoids (centre, rotation, semi-axes in voxels) that make one ribosome.

    ``centre`` is the particle centre; ``up`` points from the large to the small subunit."""
    rng = scene.rng
    e1, e2 = _perpendicular_frame(up)
    ang = rng.uniform(0, 2 * math.pi)
    a = math.cos(ang) * e1 + math.sin(ang) * e2
    b = np.cross(up, a)
    frame = np.stack([up, a, b], axis=1)
    scale = rng.uniform(0.93, 1.07)
    lsu_c = centre - up * scene.px(4.0 * scale)
    parts = [
        (lsu_c, frame, np.array([10.5, 12.5, 11.5]) * scale),  # large subunit
        (lsu_c + up * scene.px(12.0 * scale), frame, np.array([5.5, 10.5, 7.5]) * scale),
        # central protuberance and a stalk on the large subunit
        (lsu_c + scene.px(8.5 * scale) * _unit(up + 0.6 * a), frame, np.array([4.0] * 3)),
        (lsu_c + scene.px(9.5 * scale) * _unit(0.3 * up - b), frame, np.array([3.5] * 3)),
    ]
    return [(c, rot, axes / scene.nm) for c, rot, axes in parts]


def _parts_sd(parts: list, zz: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Signed distance (voxels) of the union of ellipsoids (centre, rotation, semi-axes)."""
    sd = None
    for c, rot, axes in parts:
        dz, dy, dx = zz - c[0], yy - c[1], xx - c[2]
        local = tuple(dz * rot[0, k] + dy * rot[1, k] + dx * rot[2, k] for k in range(3))
        part = _ellipsoid_sd(local, axes)
        sd = part if sd is None else np.minimum(sd, part)
    return sd


def _render_ribosome(scene: _Scene, centre: np.ndarray, up: np.ndarray) -> None:
    parts = _ribosome_shape(scene, centre, up)
    reach = scene.px(_RIBOSOME_BOUND) + 2
    found = scene.box(centre - reach, centre + reach)
    if found is None:
        return
    sl, (zz, yy, xx) = found
    sd = _parts_sd(parts, zz, yy, xx)
    lumps = 1 + 0.35 * scene.texture[sl]
    scene.density[sl] += (_RNA_RICH * _occupancy(sd) * lumps).astype(np.float32)
    scene.paint(sl, sd <= 0, RIBOSOME)
    scene.claim(sl, sd <= 0.5)


def _add_ribosome(scene: _Scene, er: int | None) -> bool:
    """A ribosome, free in the cytoplasm or bound to the ER tube ``er`` (rough ER)."""
    rng = scene.rng
    bound = scene.px(_RIBOSOME_BOUND)
    gap = scene.px(_GAP)
    for _attempt in range(100):
        if er is not None:
            p0, p1, r_er = scene.obstacles.capsules[er]
            axis = p1 - p0
            t = _unit(axis)
            e1, e2 = _perpendicular_frame(t)
            ang = rng.uniform(0, 2 * math.pi)
            up = math.cos(ang) * e1 + math.sin(ang) * e2  # away from the membrane
            base = p0 + axis * rng.uniform(0.05, 0.95)
            # large subunit against the membrane (r_er includes the bilayer half-width)
            centre = base + up * (r_er + gap + scene.px(12.5 + 4.0))
            if np.any(centre < 0) or np.any(centre > scene.size - 1):
                continue  # keep bound ribosomes inside the volume
            clear = scene.obstacles.clearance(centre[None], skip_capsule=er)[0]
            if clear < bound + gap:
                continue
        else:
            centre = scene.random_point()
            up = _unit(rng.standard_normal(3))
            if scene.obstacles.clearance(centre[None])[0] < bound + gap:
                continue
        _render_ribosome(scene, centre, up)
        scene.obstacles.spheres.append((centre, bound))
        if np.all(np.round(centre) >= 0) and np.all(np.round(centre) <= scene.size - 1):
            scene.ribosome_centres.append(centre)
        return True
    return False


def _complex_shape(rng: np.random.Generator, axis: np.ndarray) -> tuple[list, list, float]:
    """One large complex other than a ribosome, in nm about its centre: the ellipsoids of
    its matter, those of its cavities, and the radius that holds it.  Sizes after the
    proteasome (its 20S core a 15 x 11 nm barrel of four rings, a 19S cap on one or both
    ends), chaperonins (two stacked rings, about 16 x 15 nm, hollow) and lobed assemblies
    of 4-7 subunits such as fatty acid synthase (docs/simulator.md); ``axis`` is the
    barrel's or the rings' axis."""
    kind = int(rng.integers(3))
    if kind == 0:  # proteasome-like barrel with caps
        parts = [(axis * z, np.array([1.9, 5.5, 5.5])) for z in (-5.7, -1.9, 1.9, 5.7)]
        ends = [-1, 1] if rng.random() < 0.5 else [int(rng.choice([-1, 1]))]
        parts += [(axis * e * 11.5, np.array([4.5, 8.5, 7.0])) for e in ends]
        return parts, [], 17.0 if len(ends) == 2 else 14.0
    if kind == 1:  # chaperonin-like hollow double ring
        parts = [(axis * z, np.array([4.2, 7.5, 7.5])) for z in (-4.0, 4.0)]
        cavities = [(axis * z, np.array([3.0, 3.8, 3.8])) for z in (-4.0, 4.0)]
        return parts, cavities, 10.0
    n = int(rng.integers(4, 8))  # a lobed assembly
    parts = [
        (_unit(rng.standard_normal(3)) * rng.uniform(3.0, 8.0), rng.uniform(3.5, 6.5, 3))
        for _ in range(n)
    ]
    return parts, [], 15.0


def _add_complex(scene: _Scene) -> bool:
    """A large unlabelled complex (:func:`_complex_shape`) free in the cytoplasm."""
    rng = scene.rng
    axis = _unit(rng.standard_normal(3))
    frame = np.stack([axis, *_perpendicular_frame(axis)], axis=1)
    matter, holes, bound_nm = _complex_shape(rng, axis)
    bound, gap = scene.px(bound_nm), scene.px(_GAP)
    for _attempt in range(50):
        centre = scene.random_point()
        if scene.obstacles.clearance(centre[None])[0] >= bound + gap:
            break
    else:
        return False
    found = scene.box(centre - bound - 2, centre + bound + 2)
    if found is None:
        return False
    sl, (zz, yy, xx) = found
    placed = [
        [(centre + scene.px(1.0) * c, frame, axes / scene.nm) for c, axes in items]
        for items in (matter, holes)
    ]
    sd = _parts_sd(placed[0], zz, yy, xx)
    if holes:
        sd = np.maximum(sd, -_parts_sd(placed[1], zz, yy, xx))
    weight = rng.uniform(_PROTEIN, _RNA_RICH)
    lumps = 1 + 0.35 * scene.texture[sl]
    scene.density[sl] += (weight * _occupancy(sd) * lumps).astype(np.float32)
    scene.claim(sl, sd <= 0.5)
    scene.obstacles.spheres.append((centre, bound))
    return True


def _add_gold(scene: _Scene) -> bool:
    """A colloidal gold fiducial (5 or 10 nm), usually on one of the ice surfaces."""
    rng = scene.rng
    diameter = (10.0 if rng.random() < 0.75 else 5.0) * rng.uniform(0.95, 1.05)
    radius = scene.px(diameter / 2)
    for _attempt in range(40):
        centre = scene.random_point()
        if rng.random() < 0.8:
            depth = rng.uniform(radius, radius + scene.px(6.0))
            centre[0] = depth if rng.random() < 0.5 else scene.size[0] - 1 - depth
        clear = scene.obstacles.clearance(centre[None], solid_only=True)[0]
        if clear >= radius + scene.px(_GAP):
            break
    else:
        return False
    reach = radius + 2
    found = scene.box(centre - reach, centre + reach)
    if found is not None:
        sl, (zz, yy, xx) = found
        sd = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
        sd -= radius
        scene.density[sl] += (_GOLD * _occupancy(sd)).astype(np.float32)
        scene.claim(sl, sd <= 0.5)
    scene.obstacles.spheres.append((centre, radius))
    return True


def _add_crowding(scene: _Scene) -> None:
    """Fill the free cytoplasm with soluble macromolecules at a mean density of ~25% protein,
    and the extracellular space more sparsely.

    Two populations of Gaussian blobs (~3 nm and ~7 nm across) at random places with random
    weights: the grainy, crowded texture of real cytoplasm."""
    rng = scene.rng
    total = np.zeros(scene.shape, dtype=np.float32)
    for sigma_nm, fill in ((_CROWD_SIGMA * 0.6, 0.12), (_CROWD_SIGMA * 1.5, 0.12)):
        sigma = max(scene.px(sigma_nm), 0.6)
        rate = min(fill / ((2 * math.pi) ** 1.5 * sigma**3), 0.5)
        hits = np.flatnonzero(rng.random(scene.shape, dtype=np.float32) < rate)
        points = np.zeros(scene.shape, dtype=np.float32)
        points.flat[hits] = rng.uniform(0.3, 1.7, size=hits.size).astype(np.float32)
        blobs = ndimage.gaussian_filter(points, sigma, mode="wrap", truncate=3.0)
        total += blobs / np.float32(max(float(blobs.mean()), 1e-9))
    inside = scene.free & ~scene.outside
    outside = scene.free & scene.outside
    level = float(scene.settings.crowding)
    weight = inside.astype(np.float32) * np.float32(level * 0.25 / 2)
    weight += outside.astype(np.float32) * np.float32(level * 0.05 / 2)
    scene.density += total * weight


def _build_scene(scene: _Scene) -> None:
    """Place every object, big and structural first, small and numerous last.

    The first mitochondrion and the first microtubule go in before anything else competes
    for room (a mitochondrion shrinks when it must), so even a small volume holds every
    labelled class."""
    s = scene.settings
    if s.carbon_edge:
        _add_carbon(scene)
    if s.cell_membrane:
        _add_cell_membrane(scene)
    n_mito = scene.count(s.n_mitochondria, "mitochondria", 1)
    n_mt = scene.count(s.n_microtubules, "microtubules", 1)
    if n_mito:
        _add_mitochondrion(scene)
    if n_mt:
        _add_microtubule(scene)
    for _ in range(n_mito - 1):
        _add_mitochondrion(scene)
    er_tubes = []
    for _ in range(scene.count(s.n_er_tubes, "er_tubes", 0)):
        index = _add_er_tube(scene)
        if index is not None:
            er_tubes.append(index)
    for _ in range(n_mt - 1):
        _add_microtubule(scene)
    n_vesicles = scene.count(s.n_vesicles, "vesicles", 1)
    dense = scene.rng.random(n_vesicles) < s.dense_vesicle_fraction
    for flag in dense:
        _add_vesicle(scene, bool(flag))
    n_ribosomes = scene.count(s.n_ribosomes, "ribosomes", 1)
    n_bound = int(round(n_ribosomes * s.er_ribosome_fraction)) if er_tubes else 0
    for i in range(n_ribosomes):
        er = er_tubes[i % len(er_tubes)] if i < n_bound else None
        _add_ribosome(scene, er)
    n_actin = scene.count(s.n_actin, "actin", 0)
    placed = 0
    while placed < n_actin:
        added = _add_actin(scene)
        placed += max(added, 1)
    for _ in range(scene.count(s.n_gold, "gold_per_um2", 0)):
        _add_gold(scene)
    for _ in range(int(round(s.complexes * n_ribosomes))):
        _add_complex(scene)
    _add_crowding(scene)


# --------------------------------------------------------------------------- imaging


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Angstrom for an accelerating voltage in kV."""
    v = voltage_kv * 1e3
    return 12.2643 / math.sqrt(v * (1 + 0.978459e-6 * v))


def ctf_1d(k: np.ndarray, settings: SimulationSettings) -> np.ndarray:
    """The contrast transfer function at spatial frequency ``k`` (1/Angstrom).

    Sign convention: negative means matter appears dark (the low-frequency band of an
    underfocused image).  Includes amplitude contrast and a B-factor envelope."""
    lam = electron_wavelength(settings.voltage_kv)
    defocus = settings.defocus_um * 1e4
    cs = settings.spherical_aberration_mm * 1e7
    k2 = k * k
    chi = math.pi * lam * defocus * k2 - 0.5 * math.pi * cs * lam**3 * k2 * k2
    a = settings.amplitude_contrast
    ctf = -(math.sqrt(1 - a * a) * np.sin(chi) + a * np.cos(chi))
    return ctf * np.exp(-settings.bfactor * k2 / 4.0)


def _tilt_angles(settings: SimulationSettings) -> np.ndarray:
    n = int(math.floor(settings.tilt_max / settings.tilt_step + 1e-9))
    return np.arange(-n, n + 1) * settings.tilt_step


def _detector_width(nz: int, nx: int, angles: np.ndarray) -> int:
    """Detector pixels needed so no ray through the volume misses the detector."""
    th = np.radians(angles)
    extent = (nx - 1) / 2 * np.abs(np.cos(th)) + (nz - 1) / 2 * np.abs(np.sin(th))
    return 2 * int(math.ceil(float(extent.max()))) + 3


def _projector(nz: int, nx: int, angles: np.ndarray, nu: int) -> sparse.csr_matrix:
    """Line-integral projector of an XZ slice (Joseph's method) as a sparse matrix.

    Rows: (tilt, detector pixel u); columns: voxels (z, x) of the slice, z-major.  The ray
    at tilt ``theta`` and detector position ``u`` is the line x cos(theta) - z sin(theta) = u;
    it is sampled once per voxel row along the axis it runs closest to, with linear
    interpolation along the other, and each sample weighted by the path length."""
    rows, cols, vals = [], [], []
    cz, cx, cu = (nz - 1) / 2, (nx - 1) / 2, (nu - 1) / 2
    u = np.arange(nu) - cu
    for t, theta in enumerate(np.radians(angles)):
        c, s = math.cos(theta), math.sin(theta)
        if abs(c) >= abs(s):
            z = np.arange(nz) - cz
            pos = (u[None, :] + z[:, None] * s) / c + cx  # fractional x index
            step = 1 / abs(c)
            major = np.broadcast_to(np.arange(nz)[:, None], pos.shape)
            n_minor, to_col = nx, lambda maj, mnr: maj * nx + mnr
        else:
            x = np.arange(nx) - cx
            pos = (x[:, None] * c - u[None, :]) / s + cz  # fractional z index
            step = 1 / abs(s)
            major = np.broadcast_to(np.arange(nx)[:, None], pos.shape)
            n_minor, to_col = nz, lambda maj, mnr: mnr * nx + maj
        det = np.broadcast_to(np.arange(nu)[None, :], pos.shape)
        lo = np.floor(pos).astype(np.int64)
        w = pos - lo
        for minor, weight in ((lo, 1 - w), (lo + 1, w)):
            ok = (minor >= 0) & (minor < n_minor) & (weight > 0)
            rows.append(t * nu + det[ok])
            cols.append(to_col(major[ok], minor[ok]))
            vals.append((weight[ok] * step).astype(np.float32))
    shape = (len(angles) * nu, nz * nx)
    return sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=shape
    )


def _backprojector(nz: int, nx: int, angles: np.ndarray, nu: int) -> sparse.csr_matrix:
    """Pixel-driven back-projector: each voxel takes the linearly interpolated detector
    value where its centre projects, summed over tilts.  Rows: voxels; columns: (tilt, u)."""
    cz, cx, cu = (nz - 1) / 2, (nx - 1) / 2, (nu - 1) / 2
    zz, xx = np.meshgrid(np.arange(nz) - cz, np.arange(nx) - cx, indexing="ij")
    voxel = np.arange(nz * nx)
    rows, cols, vals = [], [], []
    for t, theta in enumerate(np.radians(angles)):
        pos = (xx * math.cos(theta) - zz * math.sin(theta)).ravel() + cu
        lo = np.floor(pos).astype(np.int64)
        w = pos - lo
        for det, weight in ((lo, 1 - w), (lo + 1, w)):
            ok = (det >= 0) & (det < nu)
            rows.append(voxel[ok])
            cols.append(t * nu + det[ok])
            vals.append(weight[ok].astype(np.float32))
    shape = (nz * nx, len(angles) * nu)
    return sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=shape
    )


def _ramp_filter(n: int) -> np.ndarray:
    """Discrete ramp (Ram-Lak) filter for an rfft of length ``n``, built from its spatial
    kernel so the zero frequency is weighted correctly (Kak & Slaney, ch. 3)."""
    k = np.arange(-(n // 2), n - n // 2)
    h = np.zeros(n)
    h[k == 0] = 0.25
    odd = (k % 2) == 1
    h[odd] = -1.0 / (math.pi * k[odd]) ** 2
    return np.abs(np.fft.rfft(np.fft.ifftshift(h)))


def _image_tilt_series(
    proj: np.ndarray, angles: np.ndarray, settings: SimulationSettings, rng: np.random.Generator
) -> np.ndarray:
    """Projections (tilt, u, y) -> recorded images: CTF, envelope and radiation damage,
    noise, then as asked phase flip, low-pass and alignment errors.

    The noise level follows ``settings.snr`` at zero tilt and grows with the path length
    through the specimen (1 / cos) at higher tilts."""
    nt, nu, ny = proj.shape
    pad = 16
    ku = np.fft.fftfreq(nu, d=settings.voxel_size)
    ky = np.fft.rfftfreq(ny + 2 * pad, d=settings.voxel_size)
    k = np.sqrt(ku[:, None] ** 2 + ky[None, :] ** 2)
    filters = [ctf_1d(k, settings).astype(np.float32)]
    if settings.total_dose > 0:
        filters.append(exposure_filter(k, dose_before(angles, settings.total_dose)))
    images = _filtered(proj, pad, *filters)
    if math.isfinite(settings.snr):
        zero = int(np.argmin(np.abs(angles)))
        signal = images[zero][np.abs(proj[zero]) > 0]
        # robust spread (median absolute deviation): a few gold beads must not set the noise
        std = 1.4826 * float(np.median(np.abs(signal - np.median(signal)))) if signal.size else 0
        noise_std = std / math.sqrt(settings.snr)
        scale = 1 / np.sqrt(np.cos(np.radians(angles)))
        noise = rng.standard_normal(images.shape, dtype=np.float32)
        images += noise * (noise_std * scale)[:, None, None].astype(np.float32)
    if settings.phase_flip:
        flip = np.sign(-ctf_1d(k, dataclasses.replace(settings, bfactor=0.0)))
        images = _filtered(images, pad, np.where(flip == 0, 1.0, flip).astype(np.float32))
    if settings.lowpass < 1.0:
        images = _filtered(images, pad, _lowpass_window(k, settings))
    if settings.alignment_error_px > 0:
        images = _filtered(images, pad, _misalignment(images.shape, settings, pad))
    return images


def _filtered(images: np.ndarray, pad: int, *filters: np.ndarray) -> np.ndarray:
    """Each (u, y) image multiplied in Fourier space by each of ``filters`` in turn (on
    the rfft2 grid of u by y padded by ``pad`` on each side by reflection; one grid for
    all images, or one per image)."""
    nt, nu, ny = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad)), mode="reflect")
    spectrum = sp_fft.rfft2(padded, axes=(1, 2))
    for f in filters:
        spectrum = spectrum * f
    out = sp_fft.irfft2(spectrum, s=(nu, ny + 2 * pad), axes=(1, 2))
    return out[:, :, pad:-pad].astype(np.float32)


def dose_before(angles: np.ndarray, total_dose: float) -> np.ndarray:
    """The dose (e/A^2) each image's specimen has received before it is taken, in
    dose-symmetric order (Hagen et al., J. Struct. Biol. 2017): the untilted image first,
    then ever higher tilts, alternating sides; each image gets an equal share."""
    order = sorted(range(len(angles)), key=lambda i: (abs(float(angles[i])), -float(angles[i])))
    rank = np.empty(len(angles), dtype=np.float64)
    rank[order] = np.arange(len(angles))
    return rank * (total_dose / len(angles))


def exposure_filter(k: np.ndarray, dose: np.ndarray) -> np.ndarray:
    """(tilt, ...) amplitude left at spatial frequency ``k`` (1/A) after ``dose`` (one per
    tilt, e/A^2): exp(-N / 2 N_e(k)) with the critical exposure N_e(k) = 0.245 k^-1.665 +
    2.81 measured at 300 kV (Grant & Grigorieff, eLife 2015)."""
    with np.errstate(divide="ignore"):
        critical = np.where(k > 0, 0.245 * np.abs(k) ** -1.665 + 2.81, np.inf)
    dose = np.asarray(dose, dtype=np.float64).reshape(-1, *([1] * k.ndim))
    return np.exp(-dose / (2 * critical[None])).astype(np.float32)


def _misalignment(shape: tuple, settings: SimulationSettings, pad: int) -> np.ndarray:
    """The Fourier phases that shift each image in-plane by a random amount (normal in
    each axis, of r.m.s. length ``alignment_error_px``), as the residual errors of a
    tilt-series alignment do.  Drawn from a generator of its own, so the other draws of a
    seed stay as they are."""
    nt, nu, ny = shape
    rng = np.random.default_rng([settings.seed, 0xA11])
    shifts = rng.normal(0.0, settings.alignment_error_px / math.sqrt(2), size=(nt, 2))
    fu = np.fft.fftfreq(nu)[None, :, None]
    fy = np.fft.rfftfreq(ny + 2 * pad)[None, None, :]
    phase = np.exp(-2j * np.pi * (fu * shifts[:, 0, None, None] + fy * shifts[:, 1, None, None]))
    return phase.astype(np.complex64)


def _lowpass_window(k: np.ndarray, settings: SimulationSettings) -> np.ndarray:
    """A raised-cosine low-pass ending at ``lowpass`` x Nyquist: the smoother look of
    SIRT-like reconstructions and of data binned from finer pixels."""
    cut = settings.lowpass * 0.5 / settings.voxel_size
    t = np.clip((k - 0.7 * cut) / (0.3 * cut), 0.0, 1.0)
    return (0.5 * (1 + np.cos(np.pi * t))).astype(np.float32)


def _weighted_backprojection(
    images: np.ndarray, back: sparse.csr_matrix, nz: int, nx: int
) -> np.ndarray:
    """Ramp-filter each image along u (perpendicular to the tilt axis) and back-project."""
    nt, nu, ny = images.shape
    n_fft = sp_fft.next_fast_len(2 * nu, real=True)
    rows = np.ascontiguousarray(images.transpose(0, 2, 1))  # (tilt, y, u)
    spectrum = sp_fft.rfft(rows, n=n_fft, axis=-1)
    spectrum *= _ramp_filter(n_fft).astype(np.float32)
    rows = sp_fft.irfft(spectrum, n=n_fft, axis=-1)[..., :nu].astype(np.float32)
    filtered = np.ascontiguousarray(rows.transpose(0, 2, 1)).reshape(nt * nu, ny)
    volume = np.asarray(back @ filtered, dtype=np.float32).reshape(nz, nx, ny)
    return np.ascontiguousarray(volume.transpose(0, 2, 1)) * np.float32(math.pi / nt)


# --------------------------------------------------------------------------- public API


def iter_simulate_tomogram(
    settings: SimulationSettings | None = None,
    should_stop: Callable[[], bool] = never_stop,
    **overrides: Any,
) -> Generator[Progress, None, SimulatedTomogram | None]:
    """Simulate a tomogram step by step, yielding progress; returns the result (None if
    asked to stop).

    Parameters
    ----------
    settings
        What to simulate (:class:`SimulationSettings`; the defaults when None).
    should_stop
        Checked between the steps; when true the generator returns None.
    **overrides
        Fields of :class:`SimulationSettings` that replace those of ``settings``.
    """
    settings = _resolve(settings, overrides)
    rng = np.random.default_rng(settings.seed)
    total = 4
    yield Progress("simulate", 0, total, "building the cell")
    scene = _Scene(settings, rng)
    _build_scene(scene)
    density = scene.density
    labels = scene.labels
    centres = (
        np.array(scene.ribosome_centres, dtype=np.float64).reshape(-1, 3)
        if scene.ribosome_centres
        else np.zeros((0, 3))
    )
    del scene
    if should_stop():
        return None
    tomogram = yield from _iter_image_density(density, settings, rng, should_stop, total)
    if tomogram is None:
        return None
    yield Progress("simulate", 4, total, "done")
    return SimulatedTomogram(
        tomogram=tomogram,
        labels=labels,
        voxel_size=float(settings.voxel_size),
        class_names=CLASS_NAMES,
        ribosome_centres=centres,
        density=density if settings.keep_density else None,
        settings=settings,
        tilt_angles=_tilt_angles(settings).astype(np.float64),
    )


def _iter_image_density(
    density: np.ndarray,
    settings: SimulationSettings,
    rng: np.random.Generator,
    should_stop: Callable[[], bool],
    total: int,
) -> Generator[Progress, None, np.ndarray | None]:
    """Project ``density`` into a tilt series, image it (CTF, damage, misalignment, noise)
    and reconstruct it by weighted back-projection; steps 1-3 of ``total``."""
    nz, ny, nx = density.shape
    yield Progress("simulate", 1, total, "projecting the tilt series")
    angles = _tilt_angles(settings)
    nu = _detector_width(nz, nx, angles)
    slab = np.ascontiguousarray(density.transpose(0, 2, 1)).reshape(nz * nx, ny)
    proj = _projector(nz, nx, angles, nu) @ slab
    proj = np.asarray(proj, dtype=np.float32).reshape(len(angles), nu, ny)
    del slab
    if should_stop():
        return None
    yield Progress("simulate", 2, total, "imaging: CTF and noise")
    images = _image_tilt_series(proj, angles, settings, rng)
    del proj
    if should_stop():
        return None
    yield Progress("simulate", 3, total, "weighted back-projection")
    tomogram = _weighted_backprojection(images, _backprojector(nz, nx, angles, nu), nz, nx)
    tomogram -= np.float32(tomogram.mean())
    tomogram /= np.float32(max(float(tomogram.std()), 1e-12))
    if settings.invert_contrast:
        np.negative(tomogram, out=tomogram)  # matter bright, as some packages write it
    return tomogram


def image_density(
    density: np.ndarray, settings: SimulationSettings | None = None, **overrides: Any
) -> np.ndarray:
    """A tomogram of a density of one's own, imaged as :func:`simulate_tomogram` images its
    scenes (tilt series, CTF, noise, weighted back-projection): to test networks on the
    scenes of another simulator.  ``density`` is (Z, Y, X) with Z along the beam, matter
    positive; its shape replaces ``settings.shape``; the noise is drawn from
    ``settings.seed``.  Returns float32, mean 0, standard deviation 1."""
    density = np.asarray(density, dtype=np.float32)
    if density.ndim != 3 or min(density.shape) < 2:
        raise TomosegError(
            f"The density must be a 3D (Z, Y, X) volume, got shape {density.shape}."
        )
    if not np.isfinite(density).all():
        raise TomosegError("The density holds NaN or infinite values; replace them first.")
    settings = _resolve(settings, {**overrides, "shape": density.shape})
    rng = np.random.default_rng(settings.seed)
    steps = _iter_image_density(density, settings, rng, never_stop, 4)
    tomogram = drive(steps)
    assert tomogram is not None  # never asked to stop
    return tomogram


def simulate_tomogram(
    settings: SimulationSettings | None = None, **overrides: Any
) -> SimulatedTomogram:
    """Simulate a crowded cell tomogram with six-class ground truth.

    Parameters
    ----------
    settings
        What to simulate (:class:`SimulationSettings`; the defaults when None).
    **overrides
        Fields of :class:`SimulationSettings` that replace those of ``settings`` (or of the
        defaults), e.g. ``simulate_tomogram(shape=(32, 128, 128), seed=3)``.

    Returns
    -------
    SimulatedTomogram
        The reconstruction (float32, mean 0, standard deviation 1), its (Z, Y, X) labels,
        voxel size (Angstrom), class names, ribosome centres and tilt angles.
    """
    result = drive(iter_simulate_tomogram(settings, **overrides))
    assert result is not None  # never asked to stop
    return result


#: Ranges of :func:`random_settings` (uniform unless noted).  Wide on purpose: a network
#: trained on tomograms drawn from them must not depend on any one microscope or sample.
RANDOM_RANGES: dict[str, tuple[float, float]] = {
    "snr": (0.25, 2.0),  # log-uniform
    "defocus_um": (1.5, 7.0),
    "tilt_max": (40.0, 66.0),
    "tilt_step": (2.0, 4.0),
    "bfactor": (50.0, 400.0),
    "amplitude_contrast": (0.04, 0.15),
    "lowpass": (0.5, 1.0),
    "depth_nm": (60.0, 180.0),
    "membrane_thickness_nm": (3.5, 7.0),
    "microtubule_diameter_nm": (21.0, 28.0),
    "crowding": (0.2, 2.5),
    "density": (0.5, 2.0),  # log-uniform factor on every object count
}
#: Ranges of the imperfections ``random_settings(..., imperfect=True)`` draws, and the
#: fraction of tomograms that get each.
IMPERFECT_RANGES: dict[str, tuple[float, float]] = {
    "total_dose": (60.0, 180.0),
    "alignment_error_px": (0.2, 1.5),
}
IMPERFECT_FRACTION = 0.6
#: Ranges of the microtubules' looks ``random_settings(..., microtubule_variety=True)``
#: draws: how steeply they may run out of the XY plane, how beaded their walls are.
MICROTUBULE_RANGES: dict[str, tuple[float, float]] = {
    "microtubule_elevation_deg": (4.0, 35.0),
    "microtubule_lattice": (0.05, 0.8),
}
#: Range of the vesicles' shapes ``random_settings(..., vesicle_variety=True)`` draws: the
#: largest ratio of a vesicle's longest axis to its shortest (1: spheres).
VESICLE_RANGES: dict[str, tuple[float, float]] = {"vesicle_aspect": (1.0, 2.5)}
#: Range of the bilayers' core density ``random_settings(..., membrane_variety=True)``
#: draws: from lipid tails alone (two thin headgroup lines) to a core dense with membrane
#: proteins (one dense band), as membranes of real cells differ.
MEMBRANE_RANGES: dict[str, tuple[float, float]] = {"membrane_core_density": (-0.25, 0.75)}
#: Range of the large non-ribosome complexes ``random_settings(..., complex_variety=True)``
#: draws, per ribosome (proteasomes, chaperonins and other assemblies of a cell's cytosol).
COMPLEX_RANGES: dict[str, tuple[float, float]] = {"complexes": (0.0, 1.5)}


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A number drawn between ``low`` and ``high`` uniformly on a log scale."""
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def random_settings(
    rng: np.random.Generator,
    shape_yx: tuple[int, int] = (256, 256),
    voxel_size: float = 10.0,
    imperfect: bool = False,
    microtubule_variety: bool = False,
    vesicle_variety: bool = False,
    membrane_variety: bool = False,
    variety_ranges: dict[str, tuple[float, float]] | None = None,
    complex_variety: bool = False,
) -> SimulationSettings:
    """Settings drawn at random from :data:`RANDOM_RANGES` (domain randomisation): imaging
    (dose, defocus, tilt range and step, envelope, CTF correction or not, a smoother
    reconstruction), specimen (thickness, crowding, how many of each object) and feature
    sizes (bilayer thickness, microtubule diameter, vesicle radii).  The seed of the scene is
    drawn too, so one generator gives a reproducible series of different tomograms.

    Parameters
    ----------
    rng
        The random generator the settings are drawn from.
    shape_yx
        The tomogram's (Y, X) size in voxels; its Z size follows from the drawn thickness.
    voxel_size
        The voxel size in Angstrom.
    imperfect
        Also draw radiation damage and residual alignment errors
        (:data:`IMPERFECT_RANGES`, each in :data:`IMPERFECT_FRACTION` of the tomograms),
        from a generator seeded by the scene's seed, so ``rng`` gives the same series of
        settings either way.
    microtubule_variety
        Also draw the microtubules' elevation and wall lattice (:data:`MICROTUBULE_RANGES`)
        from a generator of their own, likewise.
    vesicle_variety
        Also draw how far the vesicles depart from spheres (:data:`VESICLE_RANGES`), from a
        generator of their own, likewise.
    membrane_variety
        Also draw the density of the bilayers' core (:data:`MEMBRANE_RANGES`), from a
        generator of its own, likewise.
    complex_variety
        Also draw how many large unlabelled complexes there are per ribosome
        (:data:`COMPLEX_RANGES`), from a generator of its own, likewise.
    variety_ranges
        Ranges that replace those of :data:`MICROTUBULE_RANGES`, :data:`VESICLE_RANGES`,
        :data:`MEMBRANE_RANGES` and :data:`COMPLEX_RANGES`
        (e.g. ``{"microtubule_elevation_deg": (4.0, 90.0)}``: microtubules up to along the
        beam); the same draws, scaled to the new range.
    """
    r = RANDOM_RANGES

    def draw(name: str) -> float:
        return float(rng.uniform(*r[name]))

    def log_draw(name: str) -> float:
        return log_uniform(rng, *r[name])

    depth = max(32, int(round(draw("depth_nm") * 10.0 / voxel_size)))
    density = log_draw("density")
    volume_um3 = depth * shape_yx[0] * shape_yx[1] * (voxel_size * 1e-4) ** 3
    counts = {
        f"n_{name}": int(rng.poisson(DEFAULT_DENSITIES[name] * volume_um3 * density))
        for name in ("ribosomes", "vesicles", "er_tubes", "actin")
    }
    counts["n_microtubules"] = max(1, int(rng.poisson(3 * density)))
    smallest = float(rng.uniform(10.0, 25.0))
    settings = SimulationSettings(
        shape=(depth, *shape_yx),
        voxel_size=voxel_size,
        seed=int(rng.integers(2**31)),
        tilt_max=draw("tilt_max"),
        tilt_step=draw("tilt_step"),
        defocus_um=draw("defocus_um"),
        amplitude_contrast=draw("amplitude_contrast"),
        bfactor=draw("bfactor"),
        phase_flip=bool(rng.random() < 0.7),
        snr=log_draw("snr"),
        membrane_thickness_nm=draw("membrane_thickness_nm"),
        microtubule_diameter_nm=draw("microtubule_diameter_nm"),
        vesicle_radius_nm=(smallest, smallest * float(rng.uniform(2.0, 6.0))),
        crowding=draw("crowding"),
        lowpass=draw("lowpass") if rng.random() < 0.5 else 1.0,
        n_mitochondria=int(rng.integers(0, 3)),
        n_gold=int(rng.integers(0, 12)),
        cell_membrane=bool(rng.random() < 0.7),
        carbon_edge=bool(rng.random() < 0.6),
        dense_vesicle_fraction=float(rng.uniform(0.0, 0.6)),
        er_ribosome_fraction=float(rng.uniform(0.0, 0.7)),
        keep_density=False,
        **counts,
    )
    drawn: dict[str, float] = {}
    if imperfect:
        extra = np.random.default_rng([settings.seed, 0xD05E])
        drawn = {
            name: float(extra.uniform(*limits)) if extra.random() < IMPERFECT_FRACTION else 0.0
            for name, limits in IMPERFECT_RANGES.items()
        }
    varieties = (
        (microtubule_variety, 0x7B, MICROTUBULE_RANGES),
        (vesicle_variety, 0x5E5, VESICLE_RANGES),
        (membrane_variety, 0x3E3B, MEMBRANE_RANGES),
        (complex_variety, 0xC0C, COMPLEX_RANGES),
    )
    for wanted, stream, table in varieties:
        if wanted:  # each variety from a generator of its own, seeded by the scene's seed
            extra = np.random.default_rng([settings.seed, stream])
            ranges = table | (variety_ranges or {})
            drawn |= {name: float(extra.uniform(*ranges[name])) for name in table}
    return dataclasses.replace(settings, **drawn)


def _resolve(settings: SimulationSettings | None, overrides: dict[str, Any]) -> SimulationSettings:
    """Defaults, then ``settings``, then ``overrides``; validated."""
    if settings is None:
        settings = SimulationSettings()
    elif not isinstance(settings, SimulationSettings):
        raise TomosegError(
            f"settings must be a SimulationSettings, got {type(settings).__name__}."
        )
    names = {f.name for f in dataclasses.fields(SimulationSettings)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TomosegError(
            f"Unknown simulation setting(s) {unknown}; valid names are {sorted(names)}."
        )
    settings = dataclasses.replace(settings, **overrides)
    if isinstance(settings.shape, (list, np.ndarray)):
        settings = dataclasses.replace(settings, shape=tuple(settings.shape))
    _check_settings(settings)
    return dataclasses.replace(settings, shape=tuple(int(n) for n in settings.shape))
