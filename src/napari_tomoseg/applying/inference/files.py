"""Applying a network to a tomogram file and writing the results as MRC files.

The outputs are written through memory maps into temporary files whose disk space is
reserved up front (a full disk is an error before the run, not during it) and renamed all
together when the run finishes (:func:`napari_tomoseg.data.io.atomic_paths`), so a cancelled or
failed run leaves nothing under the final names and previous outputs intact.  The pages of
the memory-mapped input and outputs leave resident memory after each slice.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...data.io import (
    HeaderStats,
    atomic_paths,
    finish_header,
    new_mrc_mmap,
    output_header_texts,
    read_tomogram,
    release_pages,
)
from ...data.probability import PROBABILITY_DTYPE
from ...data.voxels import VoxelSize, VoxelSizeLike
from ...errors import MissingVoxelSizeWarning, TomosegError, TomosegIOError
from ...progress import Progress, StopCheck, drive, never_stop
from .apply import _meta_checks, iter_apply
from .settings import ApplyOutputs, ApplyResult, ApplySettings


def probability_paths(path: str | os.PathLike, foreground_names: Sequence[str]) -> list[Path]:
    """File names for the probability maps: ``path`` itself for a single foreground class,
    else one file per class with the class name before the extension (``prob_ribosome.mrc``).

    Parameters
    ----------
    path
        The probability map file asked for.
    foreground_names
        The network's class names but the background's.
    """
    path = Path(path)
    names = list(foreground_names)
    if len(names) == 1:
        return [path]
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".gz") else path.suffix
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    out = []
    for name in names:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name)) or "class"
        out.append(path.with_name(f"{stem}_{safe}{suffix}"))
    if len(set(out)) != len(out):
        raise TomosegError(
            f"The class names {names} do not give distinct probability file names; "
            "rename the classes."
        )
    return out


class _Stopped(Exception):
    """Raised inside the atomic-write block so a cancelled run's temporary files go away."""


_HeaderStats = HeaderStats


class _RecordingArray:
    """Wraps an output memory map: writes go through and are counted for the header; then
    the map's pages, and those of ``release`` (the memory-mapped input), leave resident
    memory, so it stays flat however many slices the files hold (:func:`release_pages`)."""

    def __init__(self, target: np.ndarray, stats: _HeaderStats, release: Sequence = ()) -> None:
        self.target = target
        self.stats = stats
        self.shape = target.shape
        self.dtype = np.dtype(target.dtype)
        self.release = (target, *release)

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        self.target[key] = value
        self.stats.add(value)
        for array in self.release:
            release_pages(array)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.target[key]).astype(self.dtype)


def iter_apply_file(
    network: Any,
    tomogram_path: str | os.PathLike,
    output_mask_path: str | os.PathLike,
    output_prob_path: str | os.PathLike | None = None,
    *,
    settings: ApplySettings | None = None,
    overwrite: bool = False,
    should_stop: StopCheck = never_stop,
    voxel_size: VoxelSizeLike | None = None,
) -> Generator[Progress, None, ApplyResult]:
    """Apply ``network`` to a tomogram file, streaming, writing MRC files with the voxel
    size kept; yields progress, returns the result.

    The outputs are written through memory maps into temporary files renamed at the end;
    a cancelled run returns ``stopped=True`` and leaves no file under the final names.  The
    returned result's arrays are read-only memory maps of the written files.

    Parameters
    ----------
    network
        A loaded network, as for :func:`iter_apply`.
    tomogram_path
        The tomogram: MRC (memory-mapped) or OME-Zarr (read lazily), see
        :func:`napari_tomoseg.data.io.read_tomogram`.
    output_mask_path
        The mask file (uint8 class indices).
    output_prob_path
        The probability map file (``round(100 * p)``; one file per foreground class, see
        :func:`probability_paths`), or None for none.
    settings
        How to apply (:class:`ApplySettings`; the defaults when None).
    overwrite
        Replace existing outputs (else they are refused).
    should_stop
        As for :func:`iter_apply`.
    voxel_size
        Overrides the header's (Z, Y, X, or one value, Angstrom).
    """
    settings = settings or ApplySettings()
    settings.validate()
    _, _, class_names, _ = _meta_checks(network)
    src = Path(tomogram_path)
    tomo = read_tomogram(src)
    if tomo.data.ndim != 3:
        raise TomosegError(f"{src} holds a 2D image; networks are applied to 3D tomograms.")
    vs = VoxelSize.parse(voxel_size) if voxel_size is not None else tomo.voxel_size
    shape = tuple(int(s) for s in tomo.data.shape)
    mask_path = Path(output_mask_path)
    prob_paths = probability_paths(output_prob_path, class_names[1:]) if output_prob_path else []
    targets = [mask_path, *prob_paths]
    _check_targets(src, targets)

    result: ApplyResult | None = None
    try:
        with contextlib.ExitStack() as stack:
            # all outputs are renamed together at the end, or none is (io.atomic_paths)
            tmps = stack.enter_context(atomic_paths(targets, overwrite=overwrite))
            try:
                dtypes = [np.uint8] + [PROBABILITY_DTYPE] * (len(tmps) - 1)
                opened = [
                    stack.enter_context(new_mrc_mmap(t, shape, d)) for t, d in zip(tmps, dtypes)
                ]
            except OSError as exc:
                raise TomosegIOError(
                    f"Cannot write {', '.join(str(t) for t in targets)}: {exc.strerror or exc} "
                    f"(they need {len(targets) * math.prod(shape) / 1e6:.0f} MB); free disk "
                    "space or write elsewhere. Nothing was replaced."
                ) from None
            mrcs = [mrc for mrc, _ in opened]
            stats = [HeaderStats() for _ in mrcs]
            arrays = [
                _RecordingArray(data, s, release=[tomo.data] if k == 0 else [])
                for k, ((_, data), s) in enumerate(zip(opened, stats))
            ]
            outputs = ApplyOutputs(
                mask=arrays[0],  # type: ignore[arg-type]
                probabilities=arrays[1:] or None,  # type: ignore[arg-type]
            )
            result = yield from iter_apply(
                network,
                tomo.data,
                voxel_size=vs,
                settings=settings,
                should_stop=should_stop,
                out=outputs,
                keep_probabilities=bool(prob_paths),
            )
            if result.stopped:
                raise _Stopped
            for k, (m, s) in enumerate(zip(mrcs, stats)):
                texts = output_header_texts(src, probability=k > 0, threshold=result.threshold)
                finish_header(m, vs, tomo.origin, s, texts)
                m.flush()
    except _Stopped:
        assert result is not None
        result.mask = None
        result.probabilities = []
        return result
    assert result is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingVoxelSizeWarning)
        result.mask = read_tomogram(mask_path).data
        result.probabilities = [read_tomogram(p).data for p in prob_paths]
    result.mask_path = mask_path
    result.probability_paths = prob_paths
    return result


def _check_targets(src: Path, targets: list[Path]) -> None:
    """Refuse output files that would replace the input, are compressed (they cannot be
    written through memory maps) or share a name."""
    for p in targets:
        if p.resolve() == src.resolve():
            raise TomosegError(
                f"The output {p} would replace the input tomogram; choose another name."
            )
        if str(p).lower().endswith(".gz"):
            raise TomosegError(f"{p}: compressed outputs cannot be streamed; drop the .gz ending.")
    if len(set(targets)) != len(targets):
        raise TomosegError("The mask and probability outputs must have different file names.")


def apply_file(
    network: Any,
    tomogram_path: str | os.PathLike,
    output_mask_path: str | os.PathLike,
    output_prob_path: str | os.PathLike | None = None,
    callback: Callable[[Progress], None] | None = None,
    **kw: Any,
) -> ApplyResult:
    """Run :func:`iter_apply_file` to the end and return its :class:`ApplyResult`.

    Parameters
    ----------
    network, tomogram_path, output_mask_path, output_prob_path
        As for :func:`iter_apply_file`.
    callback
        Called with each :class:`~napari_tomoseg.progress.Progress` event, or None.
    **kw
        :func:`iter_apply_file`'s keyword arguments (``settings``, ``overwrite``, ...).
    """
    gen = iter_apply_file(network, tomogram_path, output_mask_path, output_prob_path, **kw)
    return drive(gen, callback)
