"""Applying a network to a whole tomogram: :func:`iter_apply` and the ways to run it.

A tomogram is processed a few Z slices at a time (``z_chunk``); each slice's tiles go
through the prepared network (:mod:`.kernels`, :mod:`.predict`) and the probabilities are
thresholded into the mask and quantised (:mod:`napari_tomoseg.data.probability`) on the device,
so only bytes come back, into caller-provided arrays (possibly memory maps) or new ones:
a uint8 mask of class indices and one int8 probability array per foreground class (a list
of one for a binary network).  ``shrink`` applies to a mean-binned copy (in memory,
``1/shrink**3`` of the volume) and unbins the probabilities before thresholding.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from ...data.preprocess import Normalisation, bin_volume, robust_stats, unbin_volume
from ...data.probability import (
    PROBABILITY_DTYPE,
    PROBABILITY_SCALE,
    probabilities_as_float,
    quantize_probabilities,
)
from ...data.voxels import VoxelSize, VoxelSizeLike
from ...errors import TomosegError
from ...progress import Progress, StopCheck, drive, never_stop
from .device import MemoryBudget, resolve_device
from .kernels import _keep_freed_memory, prepare_for_inference
from .predict import _iter_planes
from .settings import ApplyOutputs, ApplyResult, ApplySettings, _run_result
from .source import (
    _check_voxel_size,
    _Geometry,
    _Prefetched,
    _resize_tensor,
    _SliceSource,
)
from .tiling import TilePlan, _effective_tiling, plan_tiles, receptive_field


def _quantize_tensor(p: torch.Tensor) -> torch.Tensor:
    """Stored probabilities (:mod:`napari_tomoseg.data.probability`) of float32 ones, on their
    device (clipped to [0, 1]; ties to even)."""
    return torch.round(p.clamp(0.0, 1.0) * PROBABILITY_SCALE).to(torch.int8)


def _meta_checks(network: Any) -> tuple[Any, nn.Module, list[str], int]:
    meta = getattr(network, "meta", None)
    model = getattr(network, "model", None)
    if meta is None or not isinstance(model, nn.Module):
        raise TomosegError(
            "Expected a loaded network (with .model and .meta); load one with "
            "napari_tomoseg.learning.model_file.load_network(path)."
        )
    class_names = [str(n) for n in meta.class_names]
    n_classes = int(meta.n_classes)
    if len(class_names) != n_classes or n_classes < 2:
        raise TomosegError(
            f"The network records {n_classes} classes but {len(class_names)} class names; "
            "the network file is inconsistent."
        )
    context = int(getattr(meta, "context_slices", 0) or 0)
    if int(meta.in_channels) != 2 * context + 1:
        raise TomosegError(
            f"The network takes {meta.in_channels} input channels but records "
            f"{context} context slices (expected {2 * context + 1} channels); the network "
            "file is inconsistent."
        )
    return meta, model, class_names, context


def _make_mask(p: np.ndarray | torch.Tensor, threshold: float) -> np.ndarray | torch.Tensor:
    """uint8 class indices from (K, H, W) probabilities.

    For a binary network ``p >= threshold -> 1``; for several classes the argmax over all
    classes (background included), kept only where its probability reaches the threshold.
    The threshold is tested on the probability as stored (1 % steps), as the Merge step
    tests it, so the saved map at this threshold gives this very mask.  A tensor gives a
    tensor on its device (so a GPU run thresholds on the GPU), an array an array.
    """
    t = p if isinstance(p, torch.Tensor) else torch.from_numpy(np.array(p, dtype=np.float32))

    def reaches(q: torch.Tensor) -> torch.Tensor:
        stored = _quantize_tensor(q).to(torch.float32) / PROBABILITY_SCALE
        return stored >= threshold  # a Python float is compared in float32, as the merge does

    if t.shape[0] == 2:
        mask = reaches(t[1]).to(torch.uint8)
    else:
        top, best = torch.max(t, dim=0)  # ties: the first (lowest) class, as numpy.argmax
        keep = (best > 0) & reaches(top)
        mask = torch.where(keep, best, torch.zeros_like(best)).to(torch.uint8)
    return mask if isinstance(p, torch.Tensor) else mask.numpy()


def _allocate_outputs(
    shape: tuple[int, int, int],
    n_foreground: int,
    out: ApplyOutputs | None,
    keep_probabilities: bool,
) -> ApplyOutputs:
    if out is None:
        probs = (
            [np.zeros(shape, dtype=PROBABILITY_DTYPE) for _ in range(n_foreground)]
            if keep_probabilities
            else None
        )
        return ApplyOutputs(mask=np.zeros(shape, dtype=np.uint8), probabilities=probs)
    arrays = [out.mask, *(out.probabilities or [])]
    for a in arrays:
        if tuple(a.shape) != shape:
            raise TomosegError(
                f"An output array has shape {tuple(a.shape)}; the tomogram's is {shape}."
            )
    if out.probabilities is not None and len(out.probabilities) != n_foreground:
        raise TomosegError(
            f"{len(out.probabilities)} probability outputs were given for {n_foreground} "
            "foreground classes."
        )
    return out


def iter_apply(
    network: Any,
    volume: np.ndarray,
    *,
    voxel_size: VoxelSizeLike | None = None,
    settings: ApplySettings | None = None,
    should_stop: StopCheck = never_stop,
    out: ApplyOutputs | None = None,
    keep_probabilities: bool = True,
    z_range: tuple[int, int] | None = None,
) -> Generator[Progress, None, ApplyResult]:
    """Apply ``network`` to a (Z, Y, X) ``volume``; yields progress, returns the result.

    Parameters
    ----------
    network
        A loaded network (``.model`` and ``.meta``, :func:`napari_tomoseg.learning.model_file.
        load_network`).
    volume
        The tomogram; it may be memory-mapped or lazy (dask, Zarr): it is read slice by
        slice.
    voxel_size
        The tomogram's (Z, Y, X, or one value) in Angstrom, or None (unknown: a warning).
    settings
        How to apply (:class:`ApplySettings`; the defaults when None).
    should_stop
        Checked before every batch; when true the run ends and returns ``stopped=True``.
    out
        Arrays (e.g. memory maps) for the results; new in-memory arrays when None.
    keep_probabilities
        False keeps only the mask (when ``out`` is None).
    z_range
        ``(z0, z1)``: only those slices, exactly as a whole run computes them (the whole
        tomogram's normalisation, neighbouring context slices, the same tile batches); the
        outputs then hold ``z1 - z0`` slices.  ``z0`` must be a multiple of
        ``settings.z_chunk``.  This is how a tomogram is split across cluster workers.
    """
    settings = (settings or ApplySettings()).resolved(network)
    settings.validate()
    meta, model, class_names, context = _meta_checks(network)
    _check_volume(volume)
    vs = VoxelSize.parse(voxel_size)
    z_lo, z_hi = _check_z_range(z_range, int(volume.shape[0]), settings)
    if settings.shrink > 1:
        if z_range is not None:
            raise TomosegError("A slice range cannot be combined with shrink > 1.")
        result = yield from _iter_apply_binned(
            network, volume, vs, settings, should_stop, out, keep_probabilities
        )
        return result
    if settings.planes == 3:
        result = yield from _iter_apply_planes(
            network, volume, vs, settings, should_stop, out, keep_probabilities, z_range
        )
        return result

    start = time.perf_counter()
    shape = tuple(int(s) for s in volume.shape)
    slab = (z_hi - z_lo, shape[1], shape[2])
    outputs = _allocate_outputs(slab, len(class_names) - 1, out, keep_probabilities)
    geometry, notes = _check_voxel_size(
        vs, VoxelSize.parse(getattr(meta, "voxel_size", None)), shape, settings, context
    )
    device = resolve_device(settings.device)
    yield Progress("apply", 0, slab[0], message="measuring the network and the tomogram")
    fast, plan = _prepare_network(model, context, settings, geometry, device, notes)
    run = _Run(
        model=fast,
        plan=plan,
        device=device,
        settings=settings,
        budget=MemoryBudget(int(settings.batch_size), notes),
        n_classes=len(class_names),
        geometry=geometry,
        source=_slice_source(volume, meta, geometry, settings),
        outputs=outputs,
        z_lo=z_lo,
    )

    def finish(stopped: bool, done: int) -> ApplyResult:
        run.source.add_note(notes)
        return _run_result(
            outputs,
            class_names,
            vs,
            start,
            stopped=stopped,
            slices_done=done,
            notes=notes,
            threshold=settings.threshold,
        )

    # the next slices are read and normalised while the network works on these
    prefetched = _Prefetched(
        ((z, run.source.stack(z, context)) for z in range(z_lo, z_hi)), depth=settings.z_chunk
    )
    with _keep_freed_memory(device.type == "cpu"), contextlib.closing(prefetched):
        done = yield from _iter_slabs(run, prefetched, z_hi, should_stop, start, shape[0])
        if done < slab[0]:  # asked to stop between two batches
            return finish(stopped=True, done=done)
    return finish(stopped=False, done=done)


def _check_volume(volume: np.ndarray) -> None:
    """Raise :class:`TomosegError` unless ``volume`` is a non-empty 3D array of numbers."""
    if volume.ndim != 3:
        raise TomosegError(
            f"Networks are applied to 3D (Z, Y, X) tomograms; got shape {tuple(volume.shape)}."
        )
    if volume.dtype.kind not in "biuf" or min(volume.shape) < 1:
        raise TomosegError(
            f"Cannot apply a network to an array of dtype {volume.dtype} and shape "
            f"{tuple(volume.shape)}."
        )


def _prepare_network(
    model: nn.Module,
    context: int,
    settings: ApplySettings,
    geometry: _Geometry,
    device: torch.device,
    notes: list[str],
) -> tuple[nn.Module, TilePlan]:
    """The fast copy of ``model`` on ``device`` (:func:`prepare_for_inference`; the caller's
    model is not moved) and the tiles of the plane it sees; tiling notes go to ``notes``."""
    rf = receptive_field(model, context * 2 + 1)
    fast = prepare_for_inference(model, device)
    tile, overlap, tile_notes = _effective_tiling(settings, rf, stacklevel=4)
    notes += tile_notes
    return fast, plan_tiles(geometry.net_plane, tile, overlap, rf.margin, rf.alignment)


def _slice_source(
    volume: np.ndarray, meta: Any, geometry: _Geometry, settings: ApplySettings
) -> _SliceSource:
    """The slices of ``volume`` as the network sees them, normalised as it was trained."""
    norm = Normalisation.from_dict(dict(meta.normalisation))
    stats = robust_stats(volume) if norm.mode == "tomogram" else None
    return _SliceSource(volume, norm, stats, geometry, refuse=settings.nonfinite == "refuse")


@dataclass
class _Run:
    """What the slab loop of :func:`iter_apply` works with: the prepared network and its
    tiles, where the slices come from and where slice ``z`` goes (``z - z_lo``)."""

    model: nn.Module
    plan: TilePlan
    device: torch.device
    settings: ApplySettings
    budget: MemoryBudget
    n_classes: int
    geometry: _Geometry
    source: _SliceSource
    outputs: ApplyOutputs
    z_lo: int


def _iter_slabs(
    run: _Run,
    stacks: Iterator[tuple[int, np.ndarray]],
    z_hi: int,
    should_stop: StopCheck,
    start: float,
    depth: int,
) -> Generator[Progress, None, int]:
    """Run the network over slices ``run.z_lo:z_hi`` of ``stacks``, ``z_chunk`` slices a
    progress event; returns how many slices were stored (fewer when asked to stop)."""
    settings = run.settings
    done = 0
    for z0 in range(run.z_lo, z_hi, settings.z_chunk):
        z1 = min(z_hi, z0 + settings.z_chunk)
        for z, probs in _iter_planes(
            run.model,
            itertools.islice(stacks, z1 - z0),
            run.plan,
            device=run.device,
            batch_size=settings.batch_size,
            amp=bool(settings.mixed_precision) and run.device.type == "cuda",
            tta=settings.tta_transforms if settings.tta else 0,
            n_classes=run.n_classes,
            should_stop=should_stop,
            budget=run.budget,
        ):
            _store_plane(run, z, probs)
            done += 1
        if done < z1 - run.z_lo:  # asked to stop between two batches
            return done
        elapsed = time.perf_counter() - start
        yield Progress(
            "apply",
            done,
            z_hi - run.z_lo,
            message=f"slices {z0}-{z1 - 1} of {depth}",
            metrics={"slices_per_second": done / elapsed if elapsed > 0 else 0.0},
        )
    return done


def _store_plane(run: _Run, z: int, probs: torch.Tensor) -> None:
    """Slice ``z``'s (K, H', W') probabilities into the outputs: back on the tomogram's grid,
    its NaN / infinite voxels background, thresholded and quantised where the
    probabilities are (only bytes are copied back)."""
    if probs.device.type not in ("cpu", "cuda"):
        probs = probs.cpu()  # e.g. MPS: resampling and rounding on the CPU
    if run.geometry.rescaled:
        probs = _resize_tensor(probs, run.geometry.plane)  # linear: sums stay 1
    bad = run.source.nonfinite.pop(z, None)
    if bad is not None:  # no data there: background, probability 0
        where_bad = torch.from_numpy(bad).to(probs.device)
        probs[:, where_bad] = 0.0
        probs[0, where_bad] = 1.0
    outputs = run.outputs
    outputs.mask[z - run.z_lo] = _make_mask(probs, run.settings.threshold).cpu().numpy()
    if outputs.probabilities is not None:
        stored = _quantize_tensor(probs[1:]).cpu().numpy()
        for k, arr in enumerate(outputs.probabilities):
            arr[z - run.z_lo] = stored[k]


def _check_z_range(
    z_range: tuple[int, int] | None, depth: int, settings: ApplySettings
) -> tuple[int, int]:
    """``(z0, z1)`` of the slices to compute (all of them when ``z_range`` is None)."""
    if z_range is None:
        return 0, depth
    z0, z1 = (int(v) for v in z_range)
    if not 0 <= z0 < z1 <= depth:
        raise TomosegError(f"Slice range {z_range} is outside the tomogram's 0..{depth}.")
    if z0 % settings.z_chunk:
        raise TomosegError(
            f"A slice range must start on a multiple of z_chunk ({settings.z_chunk}), "
            f"got {z0}, so that its tiles are batched as in a whole run."
        )
    return z0, z1


class _QuantizingSink:
    """Array-like target for :func:`unbin_volume` that stores float blocks quantised."""

    def __init__(self, target: np.ndarray) -> None:
        self.target = target
        self.shape = target.shape
        self.dtype = np.dtype(np.float32)

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        self.target[key] = quantize_probabilities(value)

    def __getitem__(self, key: Any) -> np.ndarray:
        return probabilities_as_float(self.target[key])


def _iter_apply_binned(
    network: Any,
    volume: np.ndarray,
    vs: VoxelSize | None,
    settings: ApplySettings,
    should_stop: StopCheck,
    out: ApplyOutputs | None,
    keep_probabilities: bool,
) -> Generator[Progress, None, ApplyResult]:
    """Apply to a copy binned by ``settings.shrink`` and bring the result to full size."""
    start = time.perf_counter()
    shrink = int(settings.shrink)
    _, _, class_names, _ = _meta_checks(network)
    shape = tuple(int(s) for s in volume.shape)
    n_fg = len(class_names) - 1
    outputs = _allocate_outputs(shape, n_fg, out, keep_probabilities)  # type: ignore[arg-type]
    yield Progress("bin", 0, 1, message=f"binning by {shrink}")
    binned = bin_volume(volume, shrink)
    small_vs = None if vs is None else vs.scaled(shrink)
    inner = yield from iter_apply(
        network,
        binned,
        voxel_size=small_vs,
        settings=replace(settings, shrink=1),
        should_stop=should_stop,
    )
    notes = [f"applied to a copy binned by {shrink}", *inner.notes]

    def finish(stopped: bool) -> ApplyResult:
        return _run_result(
            outputs,
            class_names,
            vs,
            start,
            stopped=stopped,
            slices_done=0 if stopped else shape[0],
            notes=notes,
            threshold=settings.threshold,
        )

    if inner.stopped or should_stop():
        return finish(stopped=True)
    del binned
    full = outputs.probabilities or [np.zeros(shape, dtype=PROBABILITY_DTYPE) for _ in range(n_fg)]
    for k, small in enumerate(inner.probabilities):
        yield Progress("unbin", k, n_fg, message=f"unbinning {class_names[k + 1]}")
        unbin_volume(
            probabilities_as_float(small),
            shrink,
            shape,
            clip=(0.0, 1.0),
            out=_QuantizingSink(full[k]),  # type: ignore[arg-type]
        )
        if should_stop():
            return finish(stopped=True)
    _mask_from_probabilities(outputs, [full], settings.threshold, store=False)  # stored above
    yield Progress("unbin", n_fg, n_fg, message="done")
    return finish(stopped=False)


#: The slice planes of ``planes`` 3: name, the axis order that makes them the Z slices, and
#: their weight in the average.  The XY slices, those the network was trained on, count half
#: (of six ways to combine the planes, the best on simulated calibration tomograms;
#: ``docs/models.md``).
_PLANES = (("XY", (0, 1, 2), 0.5), ("XZ", (1, 0, 2), 0.25), ("YZ", (2, 0, 1), 0.25))


def _iter_apply_planes(
    network: Any,
    volume: np.ndarray,
    vs: VoxelSize | None,
    settings: ApplySettings,
    should_stop: StopCheck,
    out: ApplyOutputs | None,
    keep_probabilities: bool,
    z_range: tuple[int, int] | None,
) -> Generator[Progress, None, ApplyResult]:
    """Apply in the XY, XZ and YZ slices and average the probabilities (weights:
    :data:`_PLANES`).  The side views are transposed views of the whole tomogram, read into
    memory once, and are computed whole even when ``z_range`` is given."""
    start = time.perf_counter()
    class_names = _meta_checks(network)[2]
    z_lo, z_hi = _check_z_range(z_range, int(volume.shape[0]), settings)
    shape = (z_hi - z_lo, int(volume.shape[1]), int(volume.shape[2]))
    outputs = _allocate_outputs(shape, len(class_names) - 1, out, keep_probabilities)
    views: list[list[np.ndarray]] = []
    notes = ["applied in the XY, XZ and YZ slices, the probabilities averaged (XY half)"]

    finish = partial(
        _run_result, outputs, class_names, vs, start, notes=notes, threshold=settings.threshold
    )
    whole = np.asarray(volume)  # the side views cut across every Z slice: read it once
    for k, (name, order, _) in enumerate(_PLANES):
        inner = yield from _tagged(
            iter_apply(
                network,
                np.transpose(whole, order),
                voxel_size=None if vs is None else VoxelSize(*(tuple(vs)[i] for i in order)),
                settings=replace(settings, planes=1),
                should_stop=should_stop,
                z_range=None if k else z_range,
            ),
            f"{name} slices ({k + 1} of {len(_PLANES)})",
        )
        if inner.stopped:
            return finish(stopped=True, slices_done=0)
        back = np.argsort(order)
        views.append(
            [p if not k else np.transpose(p, back)[z_lo:z_hi] for p in inner.probabilities]
        )
        notes += [f"{name}: {note}" for note in inner.notes if note not in notes]
    _mask_from_probabilities(outputs, views, settings.threshold, [w for *_, w in _PLANES])
    return finish(stopped=False, slices_done=shape[0])


def _tagged(
    events: Generator[Progress, None, ApplyResult], tag: str
) -> Generator[Progress, None, ApplyResult]:
    """``events`` with ``tag`` before each message; returns what they return."""
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            return done.value
        yield replace(event, message=f"{tag}: {event.message}" if event.message else tag)


def _mask_from_probabilities(
    outputs: ApplyOutputs,
    runs: list[list[np.ndarray]],
    threshold: float,
    weights: list[float] | None = None,
    store: bool = True,
) -> None:
    """Fill ``outputs`` slice by slice with the mask at ``threshold`` of the weighted mean
    of ``runs`` (each a stored probability array per foreground class), and with the mean
    itself unless ``store`` is False."""
    for z in range(outputs.mask.shape[0]):
        fg = np.stack(
            [
                np.average(
                    [probabilities_as_float(run[c][z]) for run in runs], axis=0, weights=weights
                )
                for c in range(len(runs[0]))
            ]
        )
        probs = np.concatenate([np.clip(1.0 - fg.sum(axis=0), 0.0, 1.0)[None], fg])
        outputs.mask[z] = _make_mask(probs, threshold)
        for c, target in enumerate((outputs.probabilities or []) if store else []):
            target[z] = quantize_probabilities(fg[c])


def apply_network(
    network: Any,
    volume: np.ndarray,
    callback: Callable[[Progress], None] | None = None,
    **kw: Any,
) -> ApplyResult:
    """Run :func:`iter_apply` to the end and return its :class:`ApplyResult`.

    Parameters
    ----------
    network, volume
        As for :func:`iter_apply`.
    callback
        Called with each :class:`~napari_tomoseg.progress.Progress` event, or None.
    **kw
        :func:`iter_apply`'s keyword arguments (``voxel_size``, ``settings``, ...).
    """
    return drive(iter_apply(network, volume, **kw), callback)


def apply_binned(
    network: Any,
    volume: np.ndarray,
    shrink: int,
    *,
    settings: ApplySettings | None = None,
    **kw: Any,
) -> ApplyResult:
    """Apply to ``volume`` binned by ``shrink``; probabilities and mask come back full size.

    Parameters
    ----------
    network, volume
        As for :func:`iter_apply`.
    shrink
        The binning factor (replaces ``settings.shrink``).
    settings
        The other settings (the defaults when None).
    **kw
        :func:`apply_network`'s other arguments (``voxel_size``, ``callback``, ...).
    """
    settings = replace(settings or ApplySettings(), shrink=shrink)
    return apply_network(network, volume, settings=settings, **kw)
