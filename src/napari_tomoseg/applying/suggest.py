"""Suggested boxes: where a trained network fires far from every positive box.

After a first training, the places where the network marks the feature although no
positive box is near are the ones worth a look: either the feature really is there (box it
as a positive example and paint it), or the network mistakes something else for it (box it
as a negative example).  Either way the next training learns from exactly the cases it got
wrong or had not seen; this is the round of hard-negative mining a careful user does by
eye, made systematic.

:func:`suggest_boxes` scores every box position of the probability map (on a grid of a
quarter box, on every ``z_step``-th slice) by the probability the network puts on the
pixels it marks (probability at or above the threshold, summed, over the box's area),
drops the positions that overlap an existing box or lie near a positive box, and returns
the strongest ones, no two of them overlapping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..data.boxes import DEFAULT_BOX_SIZE, Box, grid_box_sums
from ..errors import TomosegError
from ..progress import never_stop

#: Slices around a box within which another box on an overlapping square counts as the same
#: place (neighbouring slices of a tomogram show nearly the same thing).
Z_MARGIN = 3


@dataclass(frozen=True)
class Suggestion:
    """A box worth a look, with how strongly the network fires in it (0..1)."""

    box: Box
    score: float
    fired: float  # fraction of the box's pixels at or above the threshold


def overlaps(a: Box, b: Box, z_margin: int = Z_MARGIN) -> bool:
    """Whether two boxes cover some of the same pixels on slices at most ``z_margin``
    apart."""
    return (
        abs(a.z - b.z) <= z_margin and a.y0 < b.y1 and b.y0 < a.y1 and a.x0 < b.x1 and b.x0 < a.x1
    )


def _near_positive(candidate: Box, positives: Sequence[Box], z_far: int) -> bool:
    """Centres less than one and a half box widths apart (in Y and X) and less than
    ``z_far`` slices: there the network most likely sees the painted feature going on."""
    reach = 1.5 * candidate.size
    return any(
        abs(candidate.z - p.z) < z_far
        and abs(candidate.y - p.y) < reach
        and abs(candidate.x - p.x) < reach
        for p in positives
    )


def suggest_boxes(
    probability: np.ndarray,
    positives: Sequence[Box],
    negatives: Sequence[Box] = (),
    *,
    threshold: float = 0.5,
    n: int = 20,
    box_size: int = DEFAULT_BOX_SIZE,
    z_step: int = 2,
    z_range: tuple[int, int] | None = None,
    to_float: Callable[[np.ndarray], np.ndarray] | None = None,
    should_stop: Callable[[], bool] = never_stop,
) -> list[Suggestion]:
    """The ``n`` strongest places where ``probability`` (Z, Y, X) of one feature reaches
    ``threshold`` far from every positive box and overlapping no existing box.

    Sorted strongest first.

    Parameters
    ----------
    probability
        The (Z, Y, X) probability map of one feature (may be memory-mapped: read by slice).
    positives
        The training set's positive boxes; suggestions keep away from them.
    negatives
        Its negative boxes; suggestions do not overlap them.
    threshold
        The probability at which a pixel counts as marked, strictly between 0 and 1.
    n
        The most suggestions to return.
    box_size
        The side of a suggested box in pixels.
    z_step
        Search every ``z_step``-th slice.
    z_range
        ``(z0, z1)``: search only those slices; None: all.
    to_float
        Turns one slice of a stored map into probabilities 0..1 (e.g. int8 maps); None:
        the values are probabilities already.
    should_stop
        Checked before every slice; when true the slices searched so far are used.
    """
    if probability.ndim != 3:
        raise TomosegError(f"The probability map must be 3D (Z, Y, X); got {probability.shape}.")
    nz, ny, nx = probability.shape
    if box_size > min(ny, nx):
        raise TomosegError(f"A {box_size}-pixel box does not fit in a {ny} x {nx} slice.")
    if not 0.0 < threshold < 1.0:
        raise TomosegError(f"threshold must be between 0 and 1, got {threshold}.")
    existing = list(positives) + list(negatives)
    z0, z1 = z_range if z_range is not None else (0, nz)
    z_far = max(2 * Z_MARGIN, box_size // 8)
    half, step, area = box_size // 2, max(1, box_size // 4), float(box_size * box_size)
    rows: list[np.ndarray] = []  # score, fraction, z, y, x of every box that fires at all
    for z in range(max(0, z0), min(nz, z1), max(1, z_step)):
        if should_stop():
            break
        plane = np.asarray(probability[z])
        plane = to_float(plane) if to_float is not None else plane.astype(np.float32)
        fired = plane >= threshold
        sums, yy, xx = grid_box_sums(np.where(fired, plane, 0.0), box_size, step)
        counts, _, _ = grid_box_sums(fired.astype(np.float32), box_size, step)
        keep = sums.ravel() > 0
        zs = np.full(int(keep.sum()), z)
        rows.append(
            np.stack(
                [
                    sums.ravel()[keep] / area,
                    counts.ravel()[keep] / area,
                    zs,
                    yy.ravel()[keep] + half,
                    xx.ravel()[keep] + half,
                ],
                axis=1,
            )
        )
    table = np.concatenate(rows) if rows else np.zeros((0, 5))
    chosen: list[Suggestion] = []
    for score, fraction, z, y, x in table[np.argsort(-table[:, 0], kind="stable")]:
        box = Box(int(z), int(y), int(x), box_size)
        if _near_positive(box, positives, z_far) or any(overlaps(box, b) for b in existing):
            continue
        if any(overlaps(box, s.box, z_far) for s in chosen):
            continue
        chosen.append(Suggestion(box, float(score), float(fraction)))
        if len(chosen) == n:
            break
    return chosen
