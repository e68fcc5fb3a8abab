"""Merge several probability maps (one per network or feature) into one multi-level mask.

This is the "merging multiple annotation results" step of EMAN2 TomoSeg (Chen et al. 2017,
``mergetomoseg.py``): each voxel gets the integer of the feature that claims it, so
competing networks resolve ambiguities (e.g. a carbon edge that a microtubule network also
fires on).  The rule, per voxel:

* map ``i`` *claims* the voxel when its probability ``p_i >= threshold_i``;
* among the claiming maps the one with the highest score ``weight_i * p_i`` wins and the
  voxel gets label ``i + 1`` (inputs are numbered from 1 in the order given);
* no claim: label 0 (background);
* equal scores: the map listed **earlier** wins, so order the inputs by priority.

Thresholds and weights are per map, as in EMAN2's newer merger; ``mergetomoseg.py`` uses one
threshold for all maps with a default of 0.8, napari-tomoseg's default is 0.5 (the same
threshold the single-network mask uses), so a merged mask agrees with each network's own
mask where the networks do not compete.

Probability maps are float in [0, 1] or stored bytes (what :mod:`napari_tomoseg.applying.inference`
writes, of this or an earlier version; see :mod:`napari_tomoseg.data.probability`).
Memory-mapped maps are read ``z_chunk`` slices at a time, and the result can go into a
caller-provided (e.g. memory-mapped) array.  The mask is uint8, uint16 past 255 maps.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.probability import probabilities_as_float
from ..errors import TomosegError
from ..progress import Progress, StopCheck, drive, never_stop

#: Label colours used when an input names none: 20 distinct colours (Sasha Trubetskoy's
#: list of simple, distinct colours), as RGBA hex strings for napari.
DEFAULT_COLORS: tuple[str, ...] = (
    "#e6194bff",
    "#3cb44bff",
    "#ffe119ff",
    "#4363d8ff",
    "#f58231ff",
    "#911eb4ff",
    "#42d4f4ff",
    "#f032e6ff",
    "#bfef45ff",
    "#fabed4ff",
    "#469990ff",
    "#dcbeffff",
    "#9a6324ff",
    "#fffac8ff",
    "#800000ff",
    "#aaffc3ff",
    "#808000ff",
    "#ffd8b1ff",
    "#000075ff",
    "#a9a9a9ff",
)

BACKGROUND_NAME = "background"


@dataclass
class MergeInput:
    """One probability map (Z, Y, X) and how it competes.

    ``threshold``: the probability at which the map claims a voxel (EMAN2's
    ``mergetomoseg.py`` default is 0.8; here 0.5).  ``weight``: multiplies the probability
    when claims compete.  ``color``: the label's colour (any napari colour string); a
    distinct default is chosen when ``None``.
    """

    probabilities: np.ndarray
    name: str
    threshold: float = 0.5
    weight: float = 1.0
    color: str | None = None


@dataclass
class MergeResult:
    """The merged mask and what its values mean.

    ``mask``: (Z, Y, X) label values.  ``names[v]``: the name of label ``v`` (``names[0]``
    is ``"background"``).  ``colors``: label value -> colour.  ``voxels[v]``: how many
    voxels got label ``v``.  ``stopped``: the run was cancelled (slices past
    ``slices_done`` are 0).
    """

    mask: np.ndarray
    names: list[str]
    colors: dict[int, str]
    thresholds: list[float]
    weights: list[float]
    voxels: dict[int, int] = field(default_factory=dict)
    stopped: bool = False
    slices_done: int = 0

    def layer_metadata(self) -> dict[str, Any]:
        """Metadata for a napari Labels layer (``class_names`` and ``class_colors`` keyed by
        label value, as every napari-tomoseg Labels layer carries them) plus the merge rule."""
        return {
            "class_names": dict(enumerate(self.names)),
            "class_colors": dict(self.colors),
            "merge": {
                "inputs": list(self.names[1:]),
                "thresholds": list(self.thresholds),
                "weights": list(self.weights),
                "rule": "argmax of weight * p among maps with p >= threshold; ties: earlier map",
            },
            "voxels": dict(self.voxels),
        }


def _check_inputs(inputs: Sequence[MergeInput]) -> tuple[int, int, int]:
    if not inputs:
        raise TomosegError("Nothing to merge: give at least one probability map.")
    shape = None
    names: set[str] = set()
    for i, item in enumerate(inputs):
        if not isinstance(item, MergeInput):
            raise TomosegError(
                f"Input {i + 1} is a {type(item).__name__}; wrap each map in a MergeInput."
            )
        if not isinstance(item.name, str) or not item.name.strip():
            raise TomosegError(f"Input {i + 1} has no name; give every map a name.")
        if item.name in names:
            raise TomosegError(
                f"Two inputs are called {item.name!r}; give each map its own name so the "
                "labels can be told apart."
            )
        names.add(item.name)
        if item.name == BACKGROUND_NAME:
            raise TomosegError(f"{BACKGROUND_NAME!r} is the name of label 0; rename the map.")
        a = item.probabilities
        if not hasattr(a, "shape") or len(a.shape) != 3:
            raise TomosegError(
                f"Map {item.name!r} must be a 3D (Z, Y, X) array, got shape "
                f"{getattr(a, 'shape', None)}."
            )
        if np.dtype(a.dtype).kind not in "iuf":
            raise TomosegError(f"Map {item.name!r} has dtype {a.dtype}; it must be numeric.")
        if shape is None:
            shape = tuple(int(s) for s in a.shape)
        elif tuple(a.shape) != shape:
            raise TomosegError(
                f"Map {item.name!r} has shape {tuple(a.shape)} but {inputs[0].name!r} has "
                f"{shape}; all maps must come from the same tomogram grid."
            )
        if not (
            isinstance(item.threshold, (int, float))
            and math.isfinite(item.threshold)
            and 0.0 <= item.threshold <= 1.0
        ):
            raise TomosegError(
                f"The threshold of {item.name!r} must be between 0 and 1, got {item.threshold!r}."
            )
        if not (
            isinstance(item.weight, (int, float))
            and math.isfinite(item.weight)
            and item.weight > 0
        ):
            raise TomosegError(
                f"The weight of {item.name!r} must be a positive number, got {item.weight!r}."
            )
        if item.color is not None and (not isinstance(item.color, str) or not item.color):
            raise TomosegError(f"The colour of {item.name!r} must be a colour name or hex string.")
    assert shape is not None
    return shape  # type: ignore[return-value]


def _colors(inputs: Sequence[MergeInput]) -> dict[int, str]:
    taken = {item.color.lower() for item in inputs if item.color}
    spare = iter(c for c in DEFAULT_COLORS if c.lower() not in taken)
    out: dict[int, str] = {}
    for i, item in enumerate(inputs):
        if item.color:
            out[i + 1] = item.color
        else:
            out[i + 1] = next(spare, DEFAULT_COLORS[i % len(DEFAULT_COLORS)])
    return out


def merge_chunk(
    chunks: Sequence[np.ndarray], thresholds: Sequence[float], weights: Sequence[float]
) -> np.ndarray:
    """Apply the merge rule to matching blocks of the maps; returns int32 labels.

    Parameters
    ----------
    chunks
        The same block of every map, as stored (float or integer, see
        :func:`~napari_tomoseg.data.probability.probabilities_as_float`).
    thresholds, weights
        One per map, in map order (label ``i + 1`` is map ``i``; 0 is background).
    """
    best = np.full(chunks[0].shape, -np.inf, dtype=np.float32)
    label = np.zeros(chunks[0].shape, dtype=np.int32)
    for i, (chunk, t, w) in enumerate(zip(chunks, thresholds, weights)):
        p = probabilities_as_float(chunk)
        score = np.float32(w) * p
        wins = (p >= np.float32(t)) & (score > best)  # strict: an earlier map keeps a tie
        best[wins] = score[wins]
        label[wins] = i + 1
    return label


def iter_merge(
    inputs: Sequence[MergeInput],
    *,
    z_chunk: int = 16,
    should_stop: StopCheck = never_stop,
    out: np.ndarray | None = None,
) -> Generator[Progress, None, MergeResult]:
    """Merge ``inputs`` ``z_chunk`` slices at a time, yielding progress (rule: module notes).

    Parameters
    ----------
    inputs
        The maps (:class:`MergeInput`), all (Z, Y, X) of one shape with distinct names; map
        ``i`` becomes label ``i + 1``.
    z_chunk
        Slices merged at a time (bounds memory for memory-mapped maps).
    should_stop
        Checked before every chunk; when true the result comes back with ``stopped=True``.
    out
        A preallocated integer array (e.g. a memory map) of the maps' shape, or None for a
        new uint8 one (uint16 past 255 maps).
    """
    shape = _check_inputs(inputs)
    if isinstance(z_chunk, bool) or not isinstance(z_chunk, (int, np.integer)) or z_chunk < 1:
        raise TomosegError(f"z_chunk must be a positive integer, got {z_chunk!r}.")
    n = len(inputs)
    if n > 65535:
        raise TomosegError(f"At most 65535 maps can be merged into one mask, got {n}.")
    dtype = np.dtype(np.uint8) if n <= 255 else np.dtype(np.uint16)
    if out is None:
        out = np.zeros(shape, dtype=dtype)
    elif tuple(out.shape) != shape:
        raise TomosegError(f"The output array has shape {tuple(out.shape)}, expected {shape}.")
    elif np.dtype(out.dtype).kind not in "iu" or np.iinfo(out.dtype).max < n:
        raise TomosegError(f"The output array's dtype {out.dtype} cannot hold {n} labels.")
    thresholds = [float(item.threshold) for item in inputs]
    weights = [float(item.weight) for item in inputs]
    counts = np.zeros(n + 1, dtype=np.int64)
    names = [BACKGROUND_NAME, *(item.name for item in inputs)]
    colors = _colors(inputs)
    nz = shape[0]
    done = 0

    def result(stopped: bool) -> MergeResult:
        return MergeResult(
            mask=out,
            names=names,
            colors=colors,
            thresholds=thresholds,
            weights=weights,
            voxels={v: int(c) for v, c in enumerate(counts)},
            stopped=stopped,
            slices_done=done,
        )

    for z0 in range(0, nz, int(z_chunk)):
        if should_stop():
            return result(stopped=True)
        z1 = min(nz, z0 + int(z_chunk))
        label = merge_chunk([item.probabilities[z0:z1] for item in inputs], thresholds, weights)
        out[z0:z1] = label
        counts += np.bincount(label.ravel(), minlength=n + 1)
        done = z1
        yield Progress("merge", done, nz, message=f"slices {z0}-{z1 - 1} of {nz}")
    return result(stopped=False)


def merge_probability_maps(
    inputs: Sequence[MergeInput], *, z_chunk: int = 16, out: np.ndarray | None = None
) -> MergeResult:
    """Merge probability maps into one multi-level mask (see :func:`iter_merge`).

    Parameters
    ----------
    inputs, z_chunk, out
        As for :func:`iter_merge`.
    """
    return drive(iter_merge(inputs, z_chunk=z_chunk, out=out))


__all__ = [
    "DEFAULT_COLORS",
    "MergeInput",
    "MergeResult",
    "iter_merge",
    "merge_chunk",
    "merge_probability_maps",
]
