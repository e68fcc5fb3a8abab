"""How probability maps are stored: one signed byte per voxel, the probability in percent.

A probability ``p`` is kept as ``round(100 * p)`` in an ``int8`` array (0..100).  On disk
that is MRC mode 0, which MRC2014 defines as signed bytes; since every value lies in
0..127, readers that take mode 0 as unsigned (IMOD's convention) read the same numbers, so
``mrcfile``, IMOD, EMAN2 and ChimeraX all see 0..100.  One byte is a quarter of float32,
and the 1 % steps are far finer than any network's calibration.

Files written before this encoding hold ``round(255 * p)`` as unsigned bytes (mode 0 with
IMOD's unsigned stamp, read back as ``uint8``); :func:`probabilities_as_float` tells the two
apart by the dtype and reads both.  This module needs numpy only (no torch).
"""

from __future__ import annotations

import numpy as np

from ..errors import TomosegError

#: Stored probability ``value`` means ``p = value / PROBABILITY_SCALE``.
PROBABILITY_SCALE = 100
#: The dtype of stored probabilities (MRC mode 0).
PROBABILITY_DTYPE = np.dtype(np.int8)
#: Scale of the unsigned-byte maps of earlier versions (``uint8``, ``value / 255``).
LEGACY_SCALE = 255
#: Text put into the MRC header labels of a probability map.
PROBABILITY_LABEL = "napari-tomoseg probability map: value / 100 = probability"


def scale_of(dtype: np.dtype | type) -> float:
    """What a stored value of ``dtype`` is divided by to give the probability."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return 1.0
    if dtype == np.uint8:
        return float(LEGACY_SCALE)
    if dtype.kind in "iu":
        return float(PROBABILITY_SCALE)
    raise TomosegError(f"Probability maps must be numeric, got dtype {dtype}.")


def probabilities_as_float(array: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as float32 from stored values of any version.

    ``int8`` (and other integers) are percent, ``uint8`` the ``value / 255`` of earlier
    files, floats are returned as float32.  Works on slices of memory-mapped volumes, e.g.
    ``probabilities_as_float(tomogram.data[z])``.
    """
    a = np.asarray(array)
    scale = scale_of(a.dtype)
    if scale == 1.0:
        return a.astype(np.float32, copy=False)
    return a.astype(np.float32) / np.float32(scale)


def quantize_probabilities(p: np.ndarray) -> np.ndarray:
    """``int8`` ``round(100 * p)`` of probabilities (clipped to [0, 1]; ties to even)."""
    clipped = np.clip(np.asarray(p, dtype=np.float32), 0.0, 1.0)
    return np.rint(clipped * np.float32(PROBABILITY_SCALE)).astype(PROBABILITY_DTYPE)
