"""The input side of an apply: a tomogram's slices read, checked, rescaled and normalised.

The tomogram's voxel size is compared with the network's (:func:`_check_voxel_size`: Y
and X with the network's in-plane size, Z with its Z size when the network takes context
slices); beyond the tolerance, policy ``"rescale"`` resamples each slice in-plane to the
network's in-plane voxel size and takes a 2.5D network's context slices at the network's Z
spacing, policy
``"refuse"`` raises; if either size is unknown a warning says so and the slices are used
as they are.  :class:`_SliceSource` reads the volume one slice at a time (memory maps and
lazy arrays stay on disk), fills or refuses NaN and infinite voxels, normalises (for
``tomogram`` normalisation with statistics of a fixed-size sample of the volume), and keeps
only the slices the current context needs; :class:`_Prefetched` prepares the next slices
in a helper thread while the network runs.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...data.preprocess import Normalisation
from ...data.voxels import VoxelSize
from ...errors import MissingVoxelSizeWarning, TomosegError
from .settings import ApplySettings


class _Prefetched:
    """Iterate over ``items`` while a helper thread computes up to ``depth`` items ahead.

    Used for the input slices: reading (memory-mapped files), resampling and normalising
    the next slices overlaps the forward pass of the current ones (NumPy and torch release
    the GIL), which matters when a GPU does the network and the CPU everything else.  Items
    and an error raised while making one arrive in order; :meth:`close` stops the helper.
    """

    def __init__(self, items: Iterable[Any], depth: int = 2) -> None:
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._fill, args=(iter(items),), daemon=True)
        self._thread.start()

    def _put(self, entry: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # delivered to the consumer, in order
            self._put(("error", exc))

    def __iter__(self) -> _Prefetched:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "item":
            return value
        self._done = True
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the helper thread and drop what it made ahead."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._done = True


@dataclass(frozen=True)
class _Geometry:
    """How the tomogram's grid maps onto the network's."""

    plane: tuple[int, int]  # tomogram (H, W)
    net_plane: tuple[int, int]  # (H', W') the network sees
    z_step: float  # context spacing in tomogram slices

    @property
    def rescaled(self) -> bool:
        return self.plane != self.net_plane


def _check_voxel_size(
    tomo_vs: VoxelSize | None,
    net_vs: VoxelSize | None,
    shape: tuple[int, int, int],
    settings: ApplySettings,
    context: int,
) -> tuple[_Geometry, list[str]]:
    plane = (int(shape[1]), int(shape[2]))
    same = _Geometry(plane=plane, net_plane=plane, z_step=1.0)
    if tomo_vs is None or net_vs is None:
        which = "tomogram" if tomo_vs is None else "network"
        warnings.warn(
            f"The {which}'s voxel size is unknown, so it cannot be checked against the "
            f"{'network' if tomo_vs is None else 'tomogram'}'s; applying at the tomogram's "
            "pixel size as is. Set the voxel size to get a checked (or rescaled) result.",
            MissingVoxelSizeWarning,
            stacklevel=4,
        )
        return same, []
    inplane = net_vs.inplane
    pairs = [(tomo_vs.y, net_vs.y), (tomo_vs.x, net_vs.x)]
    if context > 0:
        pairs.append((tomo_vs.z, net_vs.z))
    worst = max(abs(v - net) / net for v, net in pairs)
    if worst <= settings.voxel_size_tolerance:
        return same, []
    sizes = " x ".join(f"{v:g}" for v in tomo_vs)
    if settings.voxel_size_policy == "refuse":
        raise TomosegError(
            f"The tomogram's voxel size ({sizes} A, Z x Y x X) differs from the network's "
            f"({net_vs.describe()}) by {100 * worst:.0f}%, more than the tolerance of "
            f"{100 * settings.voxel_size_tolerance:g}%. Bin or resample the tomogram to "
            f"{net_vs.describe()}, or apply with voxel_size_policy='rescale'."
        )
    net_plane = (
        max(1, round(plane[0] * tomo_vs.y / net_vs.y)),
        max(1, round(plane[1] * tomo_vs.x / net_vs.x)),
    )
    z_step = net_vs.z / tomo_vs.z if context > 0 else 1.0
    notes = []
    if net_plane != plane:
        notes.append(
            f"rescaled in-plane from {tomo_vs.y:g} x {tomo_vs.x:g} A to the network's "
            f"{inplane:g} A ({plane[0]} x {plane[1]} -> {net_plane[0]} x {net_plane[1]} px) "
            "and back"
        )
    if z_step != 1.0:
        notes.append(
            f"context slices taken {z_step:.3g} slices apart (Z voxel {tomo_vs.z:g} A, "
            f"network {net_vs.z:g} A)"
        )
    return _Geometry(plane=plane, net_plane=net_plane, z_step=z_step), notes


def _resize_tensor(planes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resampling of (N, H, W) float32 planes to ``size`` (antialiased when
    shrinking), on the planes' device."""
    if tuple(planes.shape[-2:]) == tuple(size):
        return planes
    shrinking = size[0] < planes.shape[-2] or size[1] < planes.shape[-1]
    out = F.interpolate(
        planes[None], size=size, mode="bilinear", align_corners=False, antialias=shrinking
    )
    return out[0]


def resize_planes(planes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """:func:`_resize_tensor` for NumPy planes."""
    if tuple(planes.shape[-2:]) == tuple(size):
        return planes
    t = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))
    return _resize_tensor(t, size).numpy()


class _SliceSource:
    """Prepared (rescaled, normalised) slices of the tomogram, cached for the current slab.

    NaN and infinite voxels are refused (``refuse=True``) or replaced by the tomogram's
    mean (the plane's finite mean for box normalisation) before normalising, so they do not
    spread through the network; ``nonfinite[z]`` then holds slice ``z``'s mask of them (on
    the tomogram's grid) until the run has labelled them background.
    """

    def __init__(
        self,
        volume: np.ndarray,
        normalisation: Normalisation,
        stats: tuple[float, float] | None,
        geometry: _Geometry,
        *,
        refuse: bool = False,
    ) -> None:
        self.volume = volume
        self.norm = normalisation
        self.stats = stats
        self.geometry = geometry
        self.refuse = refuse
        self.cache: dict[int, np.ndarray] = {}
        self.nonfinite: dict[int, np.ndarray] = {}
        self.filled_voxels = 0
        self.filled_slices: set[int] = set()

    def _finite(self, index: int, raw: np.ndarray) -> np.ndarray:
        finite = np.isfinite(raw)
        if finite.all():
            return raw
        count = int(raw.size - np.count_nonzero(finite))
        if self.refuse:
            raise TomosegError(
                f"Slice z={index} of the tomogram has {count} NaN or infinite voxels; repair "
                "the tomogram (e.g. re-run the reconstruction or filter), or apply with "
                "nonfinite='fill' to label them background."
            )
        if index not in self.filled_slices:
            if not self.filled_slices:
                warnings.warn(
                    f"Slice z={index} of the tomogram has {count} NaN or infinite voxels; "
                    "the network sees the tomogram's mean there and they are labelled "
                    "background.",
                    UserWarning,
                    stacklevel=5,
                )
            self.filled_slices.add(index)
            self.filled_voxels += count
            self.nonfinite[index] = ~finite
        if self.stats is not None:
            fill = self.stats[0]
        else:
            fill = float(raw[finite].mean()) if finite.any() else 0.0
        return np.where(finite, raw, np.float32(fill))

    def add_note(self, notes: list[str]) -> None:
        """Say in ``notes`` how many NaN / infinite voxels were filled."""
        if self.filled_voxels:
            notes.append(
                f"{self.filled_voxels} NaN or infinite voxels in {len(self.filled_slices)} "
                "slice(s) were given the tomogram's mean and labelled background"
            )

    def plane(self, index: int) -> np.ndarray:
        got = self.cache.get(index)
        if got is None:
            raw = self._finite(index, np.asarray(self.volume[index], dtype=np.float32))[None]
            raw = resize_planes(raw, self.geometry.net_plane)
            if self.norm.mode == "box":
                got = self.norm.apply_to_volume(raw)[0]
            else:
                assert self.stats is not None
                got = self.norm.apply_with_stats(raw, *self.stats)[0]
            self.cache[index] = got
        return got

    def positions(self, z: int, context: int) -> list[tuple[int, int, float]]:
        """(lower slice, upper slice, fraction) of each context channel of slice ``z``."""
        nz = self.volume.shape[0]
        out = []
        for k in range(-context, context + 1):
            pos = min(max(z + k * self.geometry.z_step, 0.0), nz - 1.0)
            lo = int(math.floor(pos))
            frac = pos - lo
            hi = min(lo + 1, nz - 1)
            out.append((lo, hi, frac))
        return out

    def stack(self, z: int, context: int) -> np.ndarray:
        """The (C, H', W') input of slice ``z``; slices no longer needed leave the cache."""
        positions = self.positions(z, context)
        self.keep_from(min(lo for lo, _, _ in positions))
        chans = []
        for lo, hi, frac in positions:
            a = self.plane(lo)
            chans.append(a if frac < 1e-6 else (1.0 - frac) * a + frac * self.plane(hi))
        return np.stack(chans).astype(np.float32, copy=False)

    def keep_from(self, first: int) -> None:
        for key in [k for k in self.cache if k < first]:
            del self.cache[key]
