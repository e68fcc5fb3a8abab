"""Import-time preprocessing of tomograms: binning, filtering, normalisation.

This is the "import tomograms" step of the EMAN2 TomoSeg protocol (Chen et al. 2017): bin
(shrink) a large tomogram, optionally low-/high-pass filter it, and normalise it, plus the
inverse operations to bring a segmentation back to the full-size tomogram.

Choices (all lengths in Angstrom, axes Z, Y, X):

* **Binning** is a mean-pool over ``factor**3`` voxels (EMAN2's ``math.meanshrink``).  Voxels
  past the last whole block are dropped, so the binned shape is ``shape // factor``.
* **Unbinning** of labels repeats each voxel (nearest neighbour: values never mix).  A float
  map (e.g. a probability map) is resampled with a discrete-cosine (Fourier) interpolation on
  the voxel-centre grid: smooth maps come back closely, nothing wraps around at the edges,
  and the half-voxel offset of mean-pooled voxels is respected.
* **Filters** are Gaussian in Fourier space, applied in 3D (isotropic in Angstrom) or per
  slice; the cutoff is the resolution (Angstrom) where the filter passes half the amplitude.
  A Gaussian is separable, so the 3D filter runs axis by axis on blocks of the volume
  (mirror-padded to avoid wrap-around), with bounded memory.  The high-pass is the volume
  minus its low-pass.
* **Normalisation** subtracts a mean and divides by a standard deviation, estimated from a
  random subsample of rows (fast on a memory-mapped 10 GB tomogram), optionally clamping at
  +-``clamp_sigma``.  :class:`Normalisation` records how training data were normalised so a
  network's input is normalised the same way when it is applied.

Large volumes are processed in blocks of Z slices (or Y rows), so apart from the output array
only a block's worth of temporary memory is used, and memory-mapped input stays on disk.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.fft
from scipy import ndimage

from ..errors import TomosegError
from ..progress import Progress, StopCheck, drive, never_stop
from .boxes import DEFAULT_BOX_SIZE
from .io import release_pages
from .voxels import VoxelSize, VoxelSizeLike

#: Target size (in float64 elements) of one block of a volume processed at a time.
_BLOCK_ELEMENTS = 8_000_000
#: Rows of a memory-mapped volume :func:`robust_stats` reads before releasing their pages.
_MAPPED_ROWS = 32

#: Gaussian cutoff convention: amplitude 1/2 at the cutoff -> sigma_f = f_c / sqrt(2 ln 2).
_HALF_AMPLITUDE = math.sqrt(2.0 * math.log(2.0))

NORMALISATION_MODES = ("tomogram", "box")


# -- small helpers ----------------------------------------------------------------------------
def _check_factor(factor: Any) -> int:
    if isinstance(factor, (bool, np.bool_)):
        raise TomosegError(f"The shrink factor must be an integer >= 1, got {factor!r}.")
    try:
        value = float(factor)
    except (TypeError, ValueError):
        raise TomosegError(f"The shrink factor must be an integer >= 1, got {factor!r}.") from None
    if not value.is_integer() or value < 1:
        raise TomosegError(f"The shrink factor must be an integer >= 1, got {factor!r}.")
    return int(value)


def _needed_voxel_size(voxel_size: VoxelSizeLike | None) -> VoxelSize:
    """The voxel size; filtering in Angstrom needs one."""
    vs = VoxelSize.parse(voxel_size)
    if vs is None:
        raise TomosegError(
            "Filtering in Angstrom needs the voxel size; set the tomogram's pixel size."
        )
    return vs


def _block_len(other_elements: int) -> int:
    """How many items along the blocked axis fit in one block of ``_BLOCK_ELEMENTS``."""
    return max(1, _BLOCK_ELEMENTS // max(1, other_elements))


def _check_3d(volume: np.ndarray, what: str) -> None:
    if volume.ndim != 3:
        raise TomosegError(f"{what} needs a 3D (Z, Y, X) volume, got shape {volume.shape}.")


# -- binning ----------------------------------------------------------------------------------
def bin_volume(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean-pool a 2D or 3D volume by ``factor`` along every axis (float32 result).

    Voxels past the last whole block are dropped (shape ``shape // factor``).  Works on
    blocks of slices, so a memory-mapped volume is read piece by piece.

    Parameters
    ----------
    volume
        A (Z, Y, X) or (Y, X) array; numpy, memory map or lazy.
    factor
        The binning (shrink) factor, a positive integer; 1 returns a float32 copy.  The
        voxel size grows by the same factor.
    """
    factor = _check_factor(factor)
    if volume.ndim not in (2, 3):
        raise TomosegError(f"Binning needs a 2D or 3D volume, got shape {volume.shape}.")
    if factor == 1:
        return np.asarray(volume, dtype=np.float32).copy()
    out_shape = tuple(int(s) // factor for s in volume.shape)
    if min(out_shape) == 0:
        raise TomosegError(
            f"A shrink factor of {factor} is too large for a volume of shape "
            f"{tuple(volume.shape)}."
        )
    out = np.empty(out_shape, dtype=np.float32)
    rest = out_shape[1:]
    per_out_slice = int(np.prod(rest)) * factor**volume.ndim
    step = _block_len(per_out_slice)
    trim = tuple(slice(0, n * factor) for n in rest)
    for start in range(0, out_shape[0], step):
        stop = min(out_shape[0], start + step)
        block = np.asarray(volume[(slice(start * factor, stop * factor), *trim)], dtype=np.float64)
        split: list[int] = [stop - start, factor]
        for n in rest:
            split += [n, factor]
        pooled = block.reshape(split).mean(axis=tuple(range(1, 2 * volume.ndim, 2)))
        out[start:stop] = pooled
    return out


def _check_unbin_shape(
    small: tuple[int, ...], factor: int, target_shape: Sequence[int]
) -> tuple[int, ...]:
    target = tuple(int(t) for t in target_shape)
    if len(target) != len(small):
        raise TomosegError(
            f"Cannot unbin a {len(small)}D array to the {len(target)}D shape {target}."
        )
    for n, t in zip(small, target):
        if n not in (t // factor, -(-t // factor)):
            raise TomosegError(
                f"An array of shape {small} binned by {factor} does not come from shape "
                f"{target}; give the shape of the tomogram it was binned from."
            )
    return target


def unbin_labels(
    labels: np.ndarray,
    factor: int,
    target_shape: Sequence[int],
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Nearest-neighbour upsampling of a label volume to ``target_shape`` (dtype kept).

    Each binned voxel becomes a ``factor``-sided block; the few voxels binning dropped at
    the far edges repeat the last value.  ``out`` may be a preallocated (e.g. memory-mapped)
    array of ``target_shape``; the work goes slice by slice.

    Parameters
    ----------
    labels
        The binned (Z, Y, X) or (Y, X) label array.
    factor
        The factor it was binned by.
    target_shape
        The shape of the unbinned tomogram (voxels); ``labels.shape`` must be its binned one.
    out
        An array of ``target_shape`` to write into (e.g. a memory map), or None for a new one.

    Returns
    -------
    numpy.ndarray
        ``out``, or the new array, of ``target_shape`` and ``labels.dtype``.
    """
    factor = _check_factor(factor)
    if labels.ndim not in (2, 3):
        raise TomosegError(f"Unbinning needs a 2D or 3D array, got shape {labels.shape}.")
    target = _check_unbin_shape(tuple(labels.shape), factor, target_shape)
    if out is None:
        out = np.empty(target, dtype=labels.dtype)
    elif tuple(out.shape) != target:
        raise TomosegError(f"The output array has shape {out.shape}, expected {target}.")

    def upsample_row_block(block: np.ndarray) -> np.ndarray:
        # block: (..., Y, X) in binned units; repeat then crop/pad the trailing axes.
        result = np.asarray(block)
        for axis in range(1, labels.ndim):
            result = np.repeat(result, factor, axis=axis)
            length = target[axis]
            if result.shape[axis] >= length:
                result = np.take(result, np.arange(length), axis=axis)
            else:
                idx = np.minimum(np.arange(length), result.shape[axis] - 1)
                result = np.take(result, idx, axis=axis)
        return result

    for i in range(labels.shape[0]):
        first = i * factor
        if first >= target[0]:
            break
        last = target[0] if i == labels.shape[0] - 1 else min(target[0], first + factor)
        plane = upsample_row_block(labels[i : i + 1])
        out[first:last] = plane
    return out


def _dct_resize(data: np.ndarray, axis: int, length: int) -> np.ndarray:
    """Cosine-series interpolation along ``axis`` to ``length`` samples (voxel centres).

    The DCT-II treats sample j as the value at (j + 1/2) / n of the interval, which is where
    the centre of a mean-pooled voxel lies; truncating or zero-padding the coefficients and
    inverting evaluates the same smooth interpolant at (i + 1/2) / length.  The even
    extension of the DCT means no wrap-around between opposite edges.
    """
    n = data.shape[axis]
    if n == length:
        return data
    coeffs = scipy.fft.dct(data, type=2, norm="ortho", axis=axis)
    resized = scipy.fft.idct(coeffs, type=2, n=length, norm="ortho", axis=axis)
    resized *= math.sqrt(length / n)
    return resized


def unbin_volume(
    volume: np.ndarray,
    factor: int,
    target_shape: Sequence[int],
    *,
    clip: tuple[float, float] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Resample a binned float map (e.g. probabilities) back to ``target_shape`` (float32).

    Discrete-cosine (Fourier) interpolation, separable: first along Z on the small binned
    volume, then along Y and X on blocks of output slices.  The voxels binning dropped at
    the far edges repeat the last value.  Interpolation can overshoot near sharp edges;
    ``clip=(0, 1)`` keeps probabilities in range.  ``out`` may be a preallocated (e.g.
    memory-mapped) float array of ``target_shape``.

    Parameters
    ----------
    volume
        The binned (Z, Y, X) float map.
    factor
        The factor it was binned by.
    target_shape
        The shape of the unbinned tomogram (voxels); ``volume.shape`` must be its binned one.
    clip
        ``(low, high)`` to clip the result to, or None.
    out
        A float array of ``target_shape`` to write into, or None for a new float32 one.
    """
    factor = _check_factor(factor)
    _check_3d(volume, "Unbinning a map")
    target = _check_unbin_shape(tuple(volume.shape), factor, target_shape)
    if out is None:
        out = np.empty(target, dtype=np.float32)
    elif tuple(out.shape) != target:
        raise TomosegError(f"The output array has shape {out.shape}, expected {target}.")
    nz, ny, nx = volume.shape
    full = (nz * factor, ny * factor, nx * factor)

    # Along Z on the binned volume (1/factor**2 of the output's size).
    stage = _dct_resize(np.asarray(volume, dtype=np.float64), 0, full[0])
    rows = min(full[0], target[0])
    step = _block_len(full[1] * full[2] * 2)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = _dct_resize(stage[start:stop], 1, full[1])
        block = _dct_resize(block, 2, full[2])
        block = _fit_trailing(block, target[1:])
        if clip is not None:
            np.clip(block, clip[0], clip[1], out=block)
        out[start:stop] = block
    if target[0] > rows:
        out[rows:] = out[rows - 1]
    return out


def _fit_trailing(block: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """Crop or edge-pad the Y and X axes of a (k, Y, X) block to ``lengths``."""
    ly, lx = lengths
    block = block[:, :ly, :lx]
    pad_y, pad_x = ly - block.shape[1], lx - block.shape[2]
    if pad_y > 0 or pad_x > 0:
        block = np.pad(block, ((0, 0), (0, max(pad_y, 0)), (0, max(pad_x, 0))), mode="edge")
    return block


# -- resampling to another voxel size ------------------------------------------------------------
def resample_volume(
    volume: np.ndarray, zoom: float | Sequence[float], order: int = 1
) -> np.ndarray:
    """Resample a 3D volume by ``zoom`` (> 1 enlarges) per axis, e.g. to another voxel size.

    The output shape is ``round(shape * zoom)`` and the new voxel size is the old one times
    ``shape / new_shape`` (pixel-area convention, ``grid_mode=True``).  Spline order 0 keeps
    the dtype (use it for labels); other orders give float32.  Works axis by axis on blocks
    (Y/X per slice, then Z), so temporary memory stays bounded.

    Parameters
    ----------
    volume
        The (Z, Y, X) volume.
    zoom
        One factor for all axes or (Z, Y, X) factors, each > 0 (new voxel size = old / zoom,
        up to rounding of the shape).
    order
        The spline order, 0 (nearest, for labels) to 5.
    """
    _check_3d(volume, "Resampling")
    zooms = np.atleast_1d(np.asarray(zoom, dtype=float))
    if zooms.size == 1:
        zooms = np.repeat(zooms, 3)
    if zooms.size != 3 or not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise TomosegError(f"Zoom must be one or three positive numbers, got {zoom!r}.")
    if order not in range(6):
        raise TomosegError(f"Spline order must be 0..5, got {order}.")
    out_shape = tuple(max(1, round(n * z)) for n, z in zip(volume.shape, zooms))
    dtype = volume.dtype if order == 0 else np.dtype(np.float32)
    if out_shape == tuple(volume.shape):
        return np.asarray(volume).astype(dtype, copy=True)
    work_dtype = dtype if order == 0 else np.float64
    nz = volume.shape[0]
    # Y and X, slice by slice.
    stage = np.empty((nz, out_shape[1], out_shape[2]), dtype=dtype)
    zoom_yx = (out_shape[1] / volume.shape[1], out_shape[2] / volume.shape[2])
    for z in range(nz):
        plane = np.asarray(volume[z], dtype=work_dtype)
        if plane.shape != stage.shape[1:]:
            plane = ndimage.zoom(plane, zoom_yx, order=order, mode="nearest", grid_mode=True)
        stage[z] = plane
    if out_shape[0] == nz:
        return stage
    # Z, on blocks of Y rows (a 2D (Z, rows*X) problem: zoom 1 along the second axis).
    out = np.empty(out_shape, dtype=dtype)
    zoom_z = (out_shape[0] / nz, 1.0)
    step = _block_len(nz * out_shape[2] * 4)
    for start in range(0, out_shape[1], step):
        stop = min(out_shape[1], start + step)
        block = stage[:, start:stop, :].reshape(nz, -1).astype(work_dtype, copy=False)
        zoomed = ndimage.zoom(block, zoom_z, order=order, mode="nearest", grid_mode=True)
        out[:, start:stop, :] = zoomed.reshape(out_shape[0], stop - start, out_shape[2])
    return out


# -- filters ----------------------------------------------------------------------------------
def _check_cutoff(cutoff_angstrom: float, voxel: VoxelSize, what: str) -> float:
    try:
        cutoff = float(cutoff_angstrom)
    except (TypeError, ValueError):
        raise TomosegError(f"The {what} cutoff must be a number of Angstrom.") from None
    nyquist = 2.0 * max(voxel)
    if not math.isfinite(cutoff) or cutoff < nyquist:
        raise TomosegError(
            f"The {what} cutoff of {cutoff_angstrom} A is finer than Nyquist ({nyquist:g} A "
            f"= 2 x voxel size); give a cutoff of at least {nyquist:g} A."
        )
    return cutoff


def _gauss_axis(block: np.ndarray, axis: int, sigma_f: float) -> np.ndarray:
    """Gaussian low-pass along ``axis``; ``sigma_f`` in cycles/voxel of that axis.

    Mirror padding of about four real-space sigmas keeps opposite edges from mixing.
    """
    n = block.shape[axis]
    sigma_real = 1.0 / (2.0 * math.pi * sigma_f)
    pad = min(n, int(math.ceil(4.0 * sigma_real)) + 1)
    length = scipy.fft.next_fast_len(n + 2 * pad, real=True)
    widths = [(0, 0)] * block.ndim
    widths[axis] = (pad, length - n - pad)
    padded = np.pad(block, widths, mode="symmetric")
    freqs = scipy.fft.rfftfreq(length)
    gain = np.exp(-0.5 * (freqs / sigma_f) ** 2)
    shape = [1] * block.ndim
    shape[axis] = gain.size
    spectrum = scipy.fft.rfft(padded, axis=axis)
    spectrum *= gain.reshape(shape)
    filtered = scipy.fft.irfft(spectrum, n=length, axis=axis)
    return np.take(filtered, np.arange(pad, pad + n), axis=axis)


def _refuse_nonfinite(block: np.ndarray, first_slice: int) -> None:
    """Refuse NaN / Inf before a Fourier filter, which would spread them everywhere."""
    finite = np.isfinite(block)
    if finite.all():
        return
    bad = np.nonzero(~finite.reshape(block.shape[0], -1).all(axis=1))[0]
    raise TomosegError(
        f"The tomogram has NaN or infinite voxels (first in slice z={first_slice + int(bad[0])})"
        "; a filter would spread them over the whole volume. Repair the tomogram or replace "
        "them (e.g. with numpy.nan_to_num) before filtering."
    )


def lowpass(
    volume: np.ndarray,
    cutoff_angstrom: float,
    voxel_size: VoxelSizeLike,
    *,
    per_slice: bool = False,
) -> np.ndarray:
    """Gaussian low-pass in Fourier space; amplitude 1/2 at ``cutoff_angstrom`` (float32).

    3D (isotropic in Angstrom, also anisotropic voxels) unless ``per_slice``, which filters
    each Z slice in Y and X only.  Separable, on blocks: memory is the output plus a block.
    NaN or infinite voxels are refused (:class:`TomosegError`): the filter would spread them.

    Parameters
    ----------
    volume
        The (Z, Y, X) volume.
    cutoff_angstrom
        The cutoff resolution in Angstrom; at least Nyquist (2 x the largest voxel side).
    voxel_size
        The volume's voxel size, (Z, Y, X) or one value in Angstrom; required.
    per_slice
        Filter each Z slice in Y and X only (no filtering along Z).
    """
    _check_3d(volume, "Low-pass filtering")
    voxel = _needed_voxel_size(voxel_size)
    cutoff = _check_cutoff(cutoff_angstrom, voxel, "low-pass")
    sigma = [v / cutoff / _HALF_AMPLITUDE for v in voxel]  # cycles/voxel per axis
    nz, ny, nx = volume.shape
    out = np.empty(volume.shape, dtype=np.float32)
    step = _block_len(ny * nx * 3)
    for start in range(0, nz, step):
        block = np.asarray(volume[start : start + step], dtype=np.float64)
        _refuse_nonfinite(block, start)
        block = _gauss_axis(block, 2, sigma[2])
        block = _gauss_axis(block, 1, sigma[1])
        out[start : start + block.shape[0]] = block
    if not per_slice and nz > 1:
        step = _block_len(nz * nx * 3)
        for start in range(0, ny, step):
            block = out[:, start : start + step, :].astype(np.float64)
            out[:, start : start + step, :] = _gauss_axis(block, 0, sigma[0])
    return out


def highpass(
    volume: np.ndarray,
    cutoff_angstrom: float,
    voxel_size: VoxelSizeLike,
    *,
    per_slice: bool = False,
) -> np.ndarray:
    """Gaussian high-pass: the volume minus its low-pass at ``cutoff_angstrom`` (float32).

    Removes slow intensity gradients (uneven ice thickness) larger than the cutoff; the
    amplitude is 1/2 at the cutoff.

    Parameters
    ----------
    volume, voxel_size, per_slice
        As for :func:`lowpass`.
    cutoff_angstrom
        The cutoff in Angstrom: structures larger than this are removed; at least Nyquist.
    """
    voxel = _needed_voxel_size(voxel_size)
    _check_cutoff(cutoff_angstrom, voxel, "high-pass")
    out = lowpass(volume, cutoff_angstrom, voxel, per_slice=per_slice)
    step = _block_len(volume.shape[1] * volume.shape[2])
    for start in range(0, volume.shape[0], step):
        block = np.asarray(volume[start : start + step], dtype=np.float32)
        np.subtract(block, out[start : start + step], out=out[start : start + step])
    return out


# -- statistics and normalisation ---------------------------------------------------------------
def robust_stats(
    volume: np.ndarray, sample: int = 2_000_000, seed: int | None = 0
) -> tuple[float, float]:
    """Mean and standard deviation of the finite voxels, from a random subsample.

    Whole X rows at random (Z, Y) positions are read, in file order, so a memory-mapped
    tomogram of many GB costs a few hundred small reads (a lazy array, e.g. dask or Zarr,
    is read a block of slices at a time instead: the same rows, so the same numbers).  The
    pages a memory map brings in are released as it goes (:func:`.io.release_pages`), so
    resident memory does not grow with the file.
    Volumes with at most ``sample`` voxels are measured completely.  NaN and Inf are
    ignored.

    Parameters
    ----------
    volume
        The volume (any number of dimensions); numpy, memory map or lazy (dask, Zarr).
    sample
        About how many voxels to read (whole X rows, rounded up).
    seed
        The seed of the row choice (a fixed one gives the same numbers every time); None for
        a fresh random choice.

    Returns
    -------
    tuple of (float, float)
        ``(mean, std)`` of the finite voxels read.
    """
    if volume.size == 0:
        raise TomosegError("Cannot measure an empty volume.")
    total = 0
    acc = 0.0
    acc2 = 0.0

    def add(values: np.ndarray) -> None:
        nonlocal total, acc, acc2
        values = np.asarray(values, dtype=np.float64).ravel()
        finite = values[np.isfinite(values)]
        if finite.size:
            total += finite.size
            acc += float(finite.sum())
            acc2 += float(np.square(finite).sum())

    if volume.ndim == 0:
        add(np.asarray(volume))
    elif volume.size <= sample or volume.ndim == 1:
        if volume.ndim == 1 and volume.size > sample:
            rng = np.random.default_rng(seed)
            add(volume[np.sort(rng.choice(volume.size, size=sample, replace=False))])
        else:
            step = _block_len(int(np.prod(volume.shape[1:])))
            for start in range(0, volume.shape[0], step):
                add(volume[start : start + step])
                release_pages(volume)
    else:
        row_len = volume.shape[-1]
        n_rows = int(np.prod(volume.shape[:-1]))
        want = min(n_rows, max(1, -(-sample // row_len)))
        rng = np.random.default_rng(seed)
        picks = np.sort(rng.choice(n_rows, size=want, replace=False))
        index = np.unravel_index(picks, volume.shape[:-1])
        step = max(1, _block_len(row_len))
        if isinstance(volume, np.memmap):  # a row maps its whole page-cache folio (up to
            step = min(step, _MAPPED_ROWS)  # MBs): read few rows, then drop their pages
        for start in range(0, want, step):
            add(_rows(volume, tuple(i[start : start + step] for i in index)))
            release_pages(volume)
    if total == 0:
        raise TomosegError(
            "The volume has no finite values (all NaN or Inf); check the file or the filters."
        )
    mean = acc / total
    var = max(acc2 / total - mean * mean, 0.0)
    return float(mean), float(math.sqrt(var))


def _rows(volume: np.ndarray, index: tuple[np.ndarray, ...]) -> np.ndarray:
    """``volume[index]`` for sorted index arrays on the leading axes.  Lazy arrays (dask,
    Zarr) take no such index: they are read one block of Z slices at a time."""
    if isinstance(volume, np.ndarray):
        return volume[index]
    zs = index[0]
    block = _block_len(int(np.prod(volume.shape[1:])))
    pieces = []
    i = 0
    while i < len(zs):
        z0 = int(zs[i])
        j = int(np.searchsorted(zs, z0 + block, side="left"))
        slab = np.asarray(volume[z0 : min(z0 + block, volume.shape[0])])
        pieces.append(slab[(zs[i:j] - z0, *(k[i:j] for k in index[1:]))])
        i = j
    return np.concatenate(pieces)


def _safe_std(std: float) -> float:
    """A usable divisor: a zero, negative or non-finite spread becomes 1 (constant data)."""
    return float(std) if math.isfinite(std) and std > 0 else 1.0


def normalise(
    volume: np.ndarray, mean: float, std: float, clamp_sigma: float | None = None
) -> np.ndarray:
    """``(volume - mean) / std`` as float32, clamped to +-``clamp_sigma`` when given.

    A zero spread (constant data) divides by 1.  NaN stays NaN.  Works on blocks of
    slices, so a memory-mapped input is read piece by piece.

    Parameters
    ----------
    volume
        The array to normalise; numpy, memory map or lazy.
    mean, std
        The statistics to normalise by (e.g. from :func:`robust_stats`).
    clamp_sigma
        Clip the result to +-this many standard deviations, > 0; None for no clipping.
    """
    if clamp_sigma is not None and not clamp_sigma > 0:
        raise TomosegError(f"clamp_sigma must be positive or None, got {clamp_sigma!r}.")
    scale = 1.0 / _safe_std(std)
    out = np.empty(volume.shape, dtype=np.float32)
    if volume.ndim == 0:
        out[...] = (float(volume) - mean) * scale
    else:
        step = _block_len(int(np.prod(volume.shape[1:])))
        for start in range(0, volume.shape[0], step):
            block = np.asarray(volume[start : start + step], dtype=np.float64)
            out[start : start + step] = (block - mean) * scale
    if clamp_sigma is not None:
        np.clip(out, -clamp_sigma, clamp_sigma, out=out)
    return out


def local_normalise(
    volume: np.ndarray, window: int, clamp_sigma: float | None = None
) -> np.ndarray:
    """Normalise each pixel by the mean and spread of a ``window``-sided square around it.

    The sliding-window counterpart of normalising each training box by its own statistics,
    computed slice by slice (float32 result).

    Parameters
    ----------
    volume
        A (Z, Y, X) or (Y, X) array.
    window
        The square's side in pixels, >= 2 (capped at the slice size); usually the box size.
    clamp_sigma
        Clip the result to +-this value, or None for no clipping.
    """
    if window < 2:
        raise TomosegError(f"The normalisation window must be at least 2 pixels, got {window}.")
    if volume.ndim not in (2, 3):
        raise TomosegError(f"Local normalisation needs a 2D or 3D volume, got {volume.shape}.")
    out = np.empty(volume.shape, dtype=np.float32)
    planes = [volume] if volume.ndim == 2 else (volume[z] for z in range(volume.shape[0]))
    for z, plane in enumerate(planes):
        x = np.asarray(plane, dtype=np.float64)
        size = (min(window, x.shape[0]), min(window, x.shape[1]))
        mean = ndimage.uniform_filter(x, size=size, mode="reflect")
        mean_sq = ndimage.uniform_filter(x * x, size=size, mode="reflect")
        std = np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))
        std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
        result = (x - mean) / std
        if volume.ndim == 2:
            out[...] = result
        else:
            out[z] = result
    if clamp_sigma is not None:
        np.clip(out, -clamp_sigma, clamp_sigma, out=out)
    return out


@dataclass
class Normalisation:
    """How a network's input is normalised, recorded with training sets and networks.

    ``mode="tomogram"``: every voxel by the mean and spread of its whole tomogram (robust
    subsample), so a network applied to another tomogram normalises that one by its own
    statistics.  ``mode="box"``: each training box by its own mean and spread; on a whole
    tomogram the same is done with a sliding ``window`` (the box size).  Values beyond
    +-``clamp_sigma`` are clamped (``None``: no clamping).
    """

    mode: str = "tomogram"
    clamp_sigma: float | None = 5.0
    window: int = DEFAULT_BOX_SIZE

    def __post_init__(self) -> None:
        if self.mode not in NORMALISATION_MODES:
            raise TomosegError(
                f"Unknown normalisation mode {self.mode!r}; use one of {NORMALISATION_MODES}."
            )
        if self.clamp_sigma is not None:
            if not (isinstance(self.clamp_sigma, (int, float)) and self.clamp_sigma > 0):
                raise TomosegError(
                    f"clamp_sigma must be a positive number or None, got {self.clamp_sigma!r}."
                )
            self.clamp_sigma = float(self.clamp_sigma)
        if isinstance(self.window, bool) or not isinstance(self.window, (int, np.integer)):
            raise TomosegError(
                f"The normalisation window must be an integer, got {self.window!r}."
            )
        self.window = int(self.window)
        if self.window < 2:
            raise TomosegError(f"The normalisation window must be >= 2, got {self.window}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (stored in training sets and network files)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalisation:
        """Inverse of :meth:`to_dict`; unknown keys or a bad mode raise TomosegError."""
        if not isinstance(data, dict):
            raise TomosegError(f"A normalisation must be a dict, got {type(data).__name__}.")
        unknown = set(data) - {"mode", "clamp_sigma", "window"}
        if unknown:
            raise TomosegError(
                f"Unknown normalisation settings {sorted(unknown)}; the file may come from a "
                "newer napari-tomoseg."
            )
        return cls(**data)

    def apply_with_stats(self, x: np.ndarray, mean: float, std: float) -> np.ndarray:
        """Normalise ``x`` by the given mean and spread, clamped as recorded."""
        return normalise(x, mean, std, self.clamp_sigma)

    def apply_to_patch(
        self, patch: np.ndarray, stats: tuple[float, float] | None = None
    ) -> np.ndarray:
        """Normalise one patch (all its channels together).

        Box mode uses the patch's own finite mean and spread.  Tomogram mode needs the
        tomogram's ``stats`` (from :func:`robust_stats`).
        """
        if self.mode == "box":
            x = np.asarray(patch, dtype=np.float64)
            finite = x[np.isfinite(x)]
            if finite.size == 0:
                raise TomosegError("The patch has no finite values (all NaN or Inf).")
            return normalise(x, float(finite.mean()), float(finite.std()), self.clamp_sigma)
        if stats is None:
            raise TomosegError(
                "Tomogram normalisation of a patch needs the tomogram's (mean, std); compute "
                "them with robust_stats(volume)."
            )
        return self.apply_with_stats(patch, *stats)

    def apply_to_volume(
        self, volume: np.ndarray, stats: tuple[float, float] | None = None
    ) -> np.ndarray:
        """Normalise a whole tomogram the way the training data were (float32).

        Tomogram mode: by ``stats`` or, if not given, this volume's :func:`robust_stats`.
        Box mode: sliding-window normalisation with ``window`` (see :func:`local_normalise`).
        """
        if self.mode == "box":
            return local_normalise(volume, self.window, self.clamp_sigma)
        mean, std = stats if stats is not None else robust_stats(volume)
        return self.apply_with_stats(volume, mean, std)


# -- the import step ----------------------------------------------------------------------------
@dataclass
class PreprocessSettings:
    """The import step: shrink (bin), filters in Angstrom, normalisation and clamping.

    ``clamp_sigma`` applies only with ``normalise`` (values in units of the spread).
    """

    shrink: int = 1
    lowpass_angstrom: float | None = None
    highpass_angstrom: float | None = None
    normalise: bool = True
    clamp_sigma: float | None = None

    def validate(self, voxel_size: VoxelSizeLike | None = None) -> None:
        """Raise TomosegError for settings that cannot work (with this voxel size)."""
        self.shrink = _check_factor(self.shrink)
        if self.clamp_sigma is not None and not self.clamp_sigma > 0:
            raise TomosegError(f"clamp_sigma must be positive or empty, got {self.clamp_sigma}.")
        if self.lowpass_angstrom is None and self.highpass_angstrom is None:
            return
        voxel = _needed_voxel_size(voxel_size).scaled(self.shrink)
        if self.lowpass_angstrom is not None:
            _check_cutoff(self.lowpass_angstrom, voxel, "low-pass")
        if self.highpass_angstrom is not None:
            _check_cutoff(self.highpass_angstrom, voxel, "high-pass")
        if (
            self.lowpass_angstrom is not None
            and self.highpass_angstrom is not None
            and self.highpass_angstrom <= self.lowpass_angstrom
        ):
            raise TomosegError(
                f"The high-pass cutoff ({self.highpass_angstrom} A) must be coarser (larger) "
                f"than the low-pass cutoff ({self.lowpass_angstrom} A), or nothing is left."
            )


def iter_preprocess(
    volume: np.ndarray,
    voxel_size: VoxelSizeLike | None,
    settings: PreprocessSettings | None = None,
    should_stop: StopCheck = never_stop,
) -> Generator[Progress, None, tuple[np.ndarray, VoxelSize | None] | None]:
    """The import step as a progress generator; returns ``(volume, voxel_size)``.

    Order: bin, high-pass, low-pass, normalise (+ clamp).  The voxel size (Z, Y, X, Angstrom)
    is multiplied by the shrink factor.  Returns ``None`` when stopped (nothing partial is
    worth keeping).

    Parameters
    ----------
    volume
        The (Z, Y, X) tomogram; numpy, memory map or lazy.
    voxel_size
        Its voxel size, (Z, Y, X) or one value in Angstrom; None is allowed only without
        filters (the result's voxel size is then None too).
    settings
        Shrink, filter cutoffs, normalisation (:class:`PreprocessSettings`; the defaults
        when None: normalise only).
    should_stop
        Checked before every step; when true the generator returns None.
    """
    settings = settings or PreprocessSettings()
    settings.validate(voxel_size)
    _check_3d(volume, "Preprocessing")
    voxel = VoxelSize.parse(voxel_size)
    steps = ["bin"]
    if settings.highpass_angstrom is not None:
        steps.append("high-pass")
    if settings.lowpass_angstrom is not None:
        steps.append("low-pass")
    if settings.normalise:
        steps.append("normalise")
    total = len(steps)
    result = np.asarray(volume)
    for i, step in enumerate(steps):
        if should_stop():
            return None
        yield Progress("preprocess", i, total, message=step)
        if step == "bin":
            result = bin_volume(volume, settings.shrink)
            if voxel is not None:
                voxel = voxel.scaled(settings.shrink)
        elif step == "high-pass":
            result = highpass(result, settings.highpass_angstrom, voxel)  # type: ignore[arg-type]
        elif step == "low-pass":
            result = lowpass(result, settings.lowpass_angstrom, voxel)  # type: ignore[arg-type]
        else:
            mean, std = robust_stats(result)
            result = normalise(result, mean, std, settings.clamp_sigma)
    yield Progress("preprocess", total, total, message="done")
    return result.astype(np.float32, copy=False), voxel


def preprocess(
    volume: np.ndarray,
    voxel_size: VoxelSizeLike | None,
    settings: PreprocessSettings | None = None,
) -> tuple[np.ndarray, VoxelSize | None]:
    """Run the import step to the end: ``(float32 volume, voxel size * shrink)``.

    Parameters
    ----------
    volume, voxel_size, settings
        As for :func:`iter_preprocess`.
    """
    result = drive(iter_preprocess(volume, voxel_size, settings))
    assert result is not None  # only a stop request gives None, and nobody asks here
    return result
