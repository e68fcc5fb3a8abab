"""What an apply is asked to do (:class:`ApplySettings`) and what it gives back
(:class:`ApplyOutputs`, :class:`ApplyResult`): one set of settings shared by the widget, the
command line and the core, so each default lives in one place."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ...data.voxels import VoxelSize
from ...errors import TomosegError
from .device import resolve_device

VOXEL_SIZE_POLICIES = ("rescale", "refuse")
#: What :func:`iter_apply` does with NaN or infinite voxels: fill them (and label them
#: background) or refuse the tomogram.
NONFINITE_POLICIES = ("fill", "refuse")
TTA_TRANSFORMS = (4, 8)
#: Slice planes a network can be applied in: 1 (XY, the slices it was trained on) or 3 (XY,
#: XZ and YZ, the probabilities averaged; see :class:`ApplySettings`).
PLANES = (1, 3)
#: The mask threshold of a network that records none (one trained before calibration).
DEFAULT_THRESHOLD = 0.5


# -- settings and results -----------------------------------------------------------------------
@dataclass
class ApplySettings:
    """How a network is applied to a tomogram (shared by widget, CLI and core).

    ``tile_size``: square tile side in pixels (rounded up to the network's alignment).  The
    default, 1024 with ``batch_size`` 2, holds the same number of pixels per forward pass
    (about the same memory) as 8 tiles of 512 but wastes far less work on the overlap that
    makes tiling exact (a 1024 x 1024 slice is one tile; speeds in ``docs/benchmarks.md``).
    ``overlap``: pixels shared by neighbouring tiles, or ``"auto"`` (exact for fully
    convolutional networks, see :mod:`napari_tomoseg.applying.inference.tiling`).  ``batch_size``:
    tiles per forward pass.
    ``device``: ``"auto"`` (CUDA, then Apple MPS, then CPU), or a torch device string.
    ``mixed_precision``: float16 autocast on CUDA (ignored elsewhere).  ``tta``: average the
    probabilities over ``tta_transforms`` orientations of each tile (8: the four rotations
    and their mirror images; 4: the flips).  ``threshold``: probability for the mask;
    ``None`` takes the network's own (chosen on its held-out boxes when it was trained, see
    :func:`napari_tomoseg.learning.training.calibrate_threshold`), or 0.5 for a network
    without one.
    ``voxel_size_policy``: ``"rescale"`` or ``"refuse"`` when the tomogram's voxel size
    differs from the network's by more than ``voxel_size_tolerance`` (relative).
    ``z_chunk``: Z slices whose tiles are batched together, one progress event each
    (groups start at multiples of it; ``should_stop`` is checked before every batch).
    ``shrink``: apply to a copy binned by this factor and unbin the probabilities.
    ``nonfinite``: what to do with NaN or infinite voxels (see :data:`NONFINITE_POLICIES`):
    ``"fill"`` gives the network the tomogram's mean in their place and labels them
    background (probability 0), with a warning and a note in the result; ``"refuse"`` raises
    a :class:`TomosegError` naming the first slice that has one.
    ``planes``: 1 applies the network to the XY slices; 3 also to the XZ and YZ slices and
    averages the probabilities, the XY ones weighing half (a membrane face-on to the beam,
    faint in XY, is a line across the XZ and YZ slices; three times the work); ``None``
    takes the network's own choice (:func:`network_planes`).
    """

    tile_size: int = 1024
    overlap: int | str = "auto"
    batch_size: int = 2
    device: str = "auto"
    mixed_precision: bool = True
    tta: bool = False
    tta_transforms: int = 8
    threshold: float | None = None
    voxel_size_policy: str = "rescale"
    voxel_size_tolerance: float = 0.05
    z_chunk: int = 8
    shrink: int = 1
    nonfinite: str = "fill"
    planes: int | None = None

    def validate(self) -> None:
        """Raise :class:`TomosegError` for settings that cannot work."""
        for name in ("tile_size", "batch_size", "z_chunk", "shrink"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise TomosegError(f"{name} must be a positive integer, got {value!r}.")
        if self.tile_size < 16:
            raise TomosegError(f"tile_size must be at least 16 pixels, got {self.tile_size}.")
        if isinstance(self.overlap, str):
            if self.overlap != "auto":
                raise TomosegError(
                    f"overlap must be a number of pixels or 'auto', got {self.overlap!r}."
                )
        elif (
            isinstance(self.overlap, bool)
            or not isinstance(self.overlap, (int, np.integer))
            or self.overlap < 0
        ):
            raise TomosegError(f"overlap must be >= 0 pixels or 'auto', got {self.overlap!r}.")
        elif self.overlap >= self.tile_size:
            raise TomosegError(
                f"overlap ({self.overlap}) must be smaller than tile_size ({self.tile_size})."
            )
        if self.tta_transforms not in TTA_TRANSFORMS:
            raise TomosegError(
                f"tta_transforms must be 4 (flips) or 8 (rotations and flips), "
                f"got {self.tta_transforms!r}."
            )
        if self.threshold is not None and not (
            isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold <= 1.0
        ):
            raise TomosegError(
                f"threshold must be between 0 and 1 (or None: the network's own), got "
                f"{self.threshold!r}."
            )
        if self.voxel_size_policy not in VOXEL_SIZE_POLICIES:
            raise TomosegError(
                f"voxel_size_policy must be one of {VOXEL_SIZE_POLICIES}, "
                f"got {self.voxel_size_policy!r}."
            )
        if not (
            isinstance(self.voxel_size_tolerance, (int, float)) and self.voxel_size_tolerance >= 0
        ):
            raise TomosegError(
                f"voxel_size_tolerance must be >= 0, got {self.voxel_size_tolerance!r}."
            )
        if self.nonfinite not in NONFINITE_POLICIES:
            raise TomosegError(
                f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}."
            )
        if self.planes is not None and (
            isinstance(self.planes, bool) or self.planes not in PLANES
        ):
            raise TomosegError(
                f"planes must be 1 (XY slices) or 3 (XY, XZ and YZ slices), or None (the "
                f"network's own), got {self.planes!r}."
            )
        resolve_device(self.device)

    def resolved(self, network: Any) -> ApplySettings:
        """These settings with the planes and the threshold decided: as given, else the
        network's own (:func:`network_planes`, :func:`network_threshold`)."""
        planes = self.planes if self.planes is not None else network_planes(network)
        threshold = self.threshold
        if threshold is None:
            threshold = network_threshold(network, planes)
        return replace(self, planes=planes, threshold=threshold)


def network_planes(network: Any) -> int:
    """The slice planes ``network`` is applied in unless told otherwise (:data:`PLANES`):
    what its file records, else 1."""
    own = getattr(getattr(network, "meta", network), "planes", None)
    return int(own) if own in PLANES else 1


def network_threshold(network: Any, planes: int | None = None) -> float:
    """The probability at which ``network``'s mask is cut, applied in ``planes`` slice
    planes (None: its own, :func:`network_planes`): the threshold recorded in its file for
    them (for XY, chosen on its held-out boxes), or :data:`DEFAULT_THRESHOLD`.

    Parameters
    ----------
    network
        A loaded network or its metadata, or anything without a threshold (None included).
    planes
        1 or 3; None: the network's own.
    """
    meta = getattr(network, "meta", network)
    planes = network_planes(meta) if planes is None else planes
    name = "threshold" if planes == 1 else "threshold_three_planes"
    own = getattr(meta, name, None)
    return float(own) if own is not None else DEFAULT_THRESHOLD


@dataclass
class ApplyOutputs:
    """Arrays (possibly memory maps) that receive a run's results, all of the tomogram's shape.

    ``mask``: uint8 class indices.  ``probabilities``: one int8 array per foreground class
    (``value / 100`` is the probability), or ``None`` to keep only the mask.
    """

    mask: np.ndarray
    probabilities: list[np.ndarray] | None = None


@dataclass
class ApplyResult:
    """What a run produced.

    ``probabilities``: one (Z, Y, X) int8 array per foreground class, in the order of
    ``foreground_names`` (empty when not kept); read with :func:`probabilities_as_float`.
    ``mask``: (Z, Y, X) uint8 class indices.  ``class_names``: all classes, background first.
    ``voxel_size``: the tomogram's (Z, Y, X) in Angstrom, or ``None``.  ``threshold``: the
    probability the mask was cut at.  ``stopped``: the run
    was cancelled; slices past ``slices_done`` are not filled (and no file was written).
    For file runs, ``mask_path`` / ``probability_paths`` name the files and the arrays are
    read-only memory maps of them.  ``notes`` list what was adapted (tile size, rescaling).
    """

    probabilities: list[np.ndarray]
    mask: np.ndarray | None
    class_names: list[str]
    voxel_size: VoxelSize | None
    seconds: float
    stopped: bool
    slices_done: int = 0
    mask_path: Path | None = None
    probability_paths: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    threshold: float = DEFAULT_THRESHOLD

    @property
    def foreground_names(self) -> list[str]:
        """Names of the classes that have a probability map (all but the background)."""
        return list(self.class_names[1:])

    @property
    def slices_per_second(self) -> float:
        return self.slices_done / self.seconds if self.seconds > 0 else 0.0


def _run_result(
    outputs: ApplyOutputs,
    class_names: list[str],
    voxel_size: VoxelSize | None,
    start: float,
    *,
    stopped: bool,
    slices_done: int,
    notes: list[str],
    threshold: float = DEFAULT_THRESHOLD,
) -> ApplyResult:
    """The :class:`ApplyResult` of a run that wrote into ``outputs`` (an
    :class:`ApplyOutputs`) and began at ``time.perf_counter()`` = ``start``."""
    return ApplyResult(
        probabilities=list(outputs.probabilities or []),
        mask=outputs.mask,
        class_names=class_names,
        voxel_size=voxel_size,
        seconds=time.perf_counter() - start,
        stopped=stopped,
        slices_done=slices_done,
        notes=notes,
        threshold=threshold,
    )
