"""MRC input and output: memory-mapped reading, voxel size kept, atomic writing.

Units: every length in napari-tomoseg is in **Angstrom**, as in the MRC header.  A layer's
``scale`` is the voxel size in Angstrom per axis (Z, Y, X), so a tomogram and its
segmentation line up in world coordinates, and picked coordinates come out in Angstrom.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mrcfile
import mrcfile.utils
import numpy as np

from .errors import MissingVoxelSizeWarning, TomosegIOError

#: File name endings the reader accepts (tomograms, stacks, tilt series, aligned stacks).
MRC_EXTENSIONS: tuple[str, ...] = (".mrc", ".rec", ".map", ".st", ".ali", ".mrcs", ".mrc.gz")

#: Modes napari-tomoseg reads: int8, int16, float32, uint16, float16 (complex ones are refused).
SUPPORTED_MODES: dict[int, str] = {
    0: "int8",
    1: "int16",
    2: "float32",
    6: "uint16",
    12: "float16",
}

_HEADER_BYTES = 1024
# IMOD marks mode-0 files whose bytes are unsigned: a stamp at header byte 152 and a flags word
# at 156 whose bit 0 is clear (IMOD "MRC file format" documentation).  Both sit in `extra2`.
_IMOD_STAMP = 1146047817
_IMOD_STAMP_OFFSET = 152 - 112  # offset inside extra2, which starts at header byte 112
#: Z slices copied per chunk when streaming a volume to disk (bounded memory).
_WRITE_CHUNK_SLICES = 16


@dataclass
class Tomogram:
    """A volume with the facts of its header.

    ``data`` is (Z, Y, X) (or (Y, X) for a single image), memory-mapped when read from an
    uncompressed file.  ``voxel_size`` is (Z, Y, X) in Angstrom, or ``None`` when the file
    does not give a usable one.
    """

    data: np.ndarray
    voxel_size: tuple[float, float, float] | None = None
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    path: Path | None = None
    mode: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> tuple[float, ...]:
        """Layer scale in Angstrom per voxel (1.0 where the voxel size is unknown)."""
        vs = self.voxel_size or (1.0, 1.0, 1.0)
        return tuple(float(v) for v in vs[-self.data.ndim :])

    def metadata(self) -> dict[str, Any]:
        """Header facts for a napari layer's ``metadata``."""
        return {
            "voxel_size": self.voxel_size,
            "voxel_size_unit": "angstrom",
            "origin": self.origin,
            "source_path": str(self.path) if self.path else None,
            "mrc_mode": self.mode,
            **self.extra,
        }


def is_mrc_path(path: str | os.PathLike) -> bool:
    """True if the file name has one of the MRC endings the reader accepts."""
    name = str(path).lower()
    return name.endswith(MRC_EXTENSIONS)


def _as_zyx(values: Any) -> tuple[float, float, float]:
    """MRC header triples are (x, y, z); napari-tomoseg works in (z, y, x)."""
    return (float(values.z), float(values.y), float(values.x))


def voxel_size_from_header(header: Any) -> tuple[float, float, float] | None:
    """Voxel size (Z, Y, X) in Angstrom from a header; ``None`` if absent, 0 or 1.0."""
    mx, my, mz = int(header.mx), int(header.my), int(header.mz)
    cell = header.cella
    sizes = []
    for length, count in ((cell.z, mz), (cell.y, my), (cell.x, mx)):
        sizes.append(float(length) / count if count > 0 else 0.0)
    if not all(np.isfinite(s) and s > 0 for s in sizes):
        return None
    if all(abs(s - 1.0) < 1e-6 for s in sizes):
        return None
    return (sizes[0], sizes[1], sizes[2])


def _fail(path: Path, problem: str, advice: str = "") -> TomosegIOError:
    text = f"Cannot read {path}: {problem}."
    if advice:
        text += f" {advice}"
    return TomosegIOError(text)


def read_tomogram(path: str | os.PathLike, *, mmap: bool = True) -> Tomogram:
    """Open an MRC-family file; the data stays on disk (memory-mapped) when possible.

    Raises :class:`TomosegIOError` naming the file and the problem when the file is missing,
    empty, not an MRC file, truncated, or of an unsupported mode.  Warns with
    :class:`MissingVoxelSizeWarning` when the header has no usable voxel size.
    """
    path = Path(path)
    if not path.exists():
        raise _fail(path, "the file does not exist")
    if path.is_dir():
        raise _fail(path, "it is a folder, not a file")
    size = path.stat().st_size
    if size == 0:
        raise _fail(path, "the file is empty")
    compressed = str(path).lower().endswith(".gz")
    if not compressed and size < _HEADER_BYTES:
        raise _fail(path, f"the file is only {size} bytes, shorter than an MRC header (1024)")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
                header = mrc.header.copy()
                ext_bytes = int(mrc.header.nsymbt)
    except (ValueError, OSError, EOFError) as exc:
        raise _fail(path, f"the header is not a valid MRC header ({exc})") from None
    if header is None or bytes(header.map).strip(b"\x00 ") != b"MAP":
        raise _fail(
            path,
            "it is not an MRC file (the 'MAP' identifier is missing from the header)",
            "Check that this is a tomogram in MRC format (.mrc, .rec, .map, .st, .ali, .mrcs).",
        )
    mode = int(header.mode)
    if mode not in SUPPORTED_MODES:
        raise _fail(
            path,
            f"MRC mode {mode} is not supported",
            "Supported modes are 0 (int8), 1 (int16), 2 (float32), 6 (uint16) and "
            "12 (float16); convert the file, e.g. to float32.",
        )
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) <= 0:
        raise _fail(path, f"the header gives an impossible size ({nx} x {ny} x {nz})")
    dtype = mrcfile.utils.data_dtype_from_header(header)
    if mode == 0 and _imod_unsigned_bytes(header):
        dtype = np.dtype(np.uint8)
    shape = (nz, ny, nx) if nz > 1 else (ny, nx)
    offset = _HEADER_BYTES + max(ext_bytes, 0)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    if compressed or not mmap:
        data = _read_in_memory(path, shape, dtype)
    else:
        if size < offset + nbytes:
            raise _fail(
                path,
                f"the file is truncated: the header promises {nbytes} bytes of data "
                f"({nx} x {ny} x {nz}, mode {mode}) but only {max(size - offset, 0)} follow",
                "The file may not have been copied completely.",
            )
        data = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)

    voxel_size = voxel_size_from_header(header)
    if voxel_size is None:
        warnings.warn(
            f"{path.name}: the header has no voxel size (it is 0 or 1.0 Angstrom); using 1.0. "
            "Set the real pixel size, or networks and coordinates will be in wrong units.",
            MissingVoxelSizeWarning,
            stacklevel=2,
        )
    origin = _as_zyx(header.origin)
    return Tomogram(
        data=data,
        voxel_size=voxel_size,
        origin=origin,
        path=path,
        mode=mode,
        extra={"shape": tuple(int(s) for s in shape)},
    )


def _read_in_memory(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Read the whole data block (compressed files cannot be memory-mapped)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=True) as mrc:
                data = mrc.data
                if data is None or data.size != int(np.prod(shape)):
                    raise _fail(path, "the file is truncated: the data block is incomplete")
                return np.array(data, dtype=dtype.newbyteorder("="), copy=True).reshape(shape)
    except (ValueError, OSError, EOFError) as exc:
        raise _fail(path, f"the data could not be read ({exc})") from None


def _imod_unsigned_bytes(header: Any) -> bool:
    """True when an IMOD stamp says the mode-0 bytes are unsigned (uint8)."""
    extra = bytes(header.extra2.tobytes())
    byteorder = header.mode.dtype.byteorder
    int32 = np.dtype(np.int32).newbyteorder(">" if byteorder == ">" else "<")
    start = _IMOD_STAMP_OFFSET
    stamp, flags = np.frombuffer(extra[start : start + 8], dtype=int32)
    return int(stamp) == _IMOD_STAMP and not int(flags) & 1


def _mark_unsigned_bytes(header: Any) -> None:
    """Stamp a mode-0 header as unsigned bytes the way IMOD does."""
    extra = bytearray(header.extra2.tobytes())
    start = _IMOD_STAMP_OFFSET
    extra[start : start + 8] = np.array([_IMOD_STAMP, 0], dtype="<i4").tobytes()
    header.extra2 = bytes(extra)


def labels_dtype(max_label: int) -> np.dtype:
    """uint8 for up to 255 labels, uint16 beyond (the MRC modes that hold them)."""
    if max_label < 0:
        raise TomosegIOError(f"Labels must be non-negative integers (found {max_label}).")
    if max_label <= 255:
        return np.dtype(np.uint8)
    if max_label <= 65535:
        return np.dtype(np.uint16)
    raise TomosegIOError(f"{max_label} labels do not fit in an MRC file (65535 at most).")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    If the body raises (or the process dies), ``path`` is untouched and the temporary file is
    removed, so a failed write never leaves a half-written or clobbered file.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise TomosegIOError(
            f"{path} already exists; choose another name or allow overwriting explicitly."
        )
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise TomosegIOError(f"Cannot write {path}: the folder {folder} does not exist.")
    if not os.access(folder, os.W_OK):
        raise TomosegIOError(f"Cannot write {path}: the folder {folder} is not writable.")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _normalise_voxel_size(voxel_size: Any, ndim: int) -> tuple[float, float, float] | None:
    if voxel_size is None:
        return None
    values = np.atleast_1d(np.asarray(voxel_size, dtype=float))
    if values.size == 1:
        values = np.repeat(values, 3)
    if values.size == 2:  # (Y, X) of a 2D image
        values = np.array([values[0], values[0], values[1]])
    if values.size != 3 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise TomosegIOError(f"Invalid voxel size {voxel_size!r}: give positive Angstrom values.")
    return (float(values[0]), float(values[1]), float(values[2]))


def write_mrc(
    path: str | os.PathLike,
    data: np.ndarray,
    voxel_size: float | tuple[float, ...] | None = None,
    *,
    origin: tuple[float, float, float] | None = None,
    overwrite: bool = False,
    dtype: np.dtype | type | None = None,
) -> Path:
    """Write a 2D or 3D array to an MRC file atomically, keeping the voxel size (Angstrom).

    ``data`` may be memory-mapped or lazy: it is copied in chunks of Z slices, so memory use
    stays bounded.  ``.gz`` names are written gzip-compressed.  Supported dtypes are those
    of the MRC modes (int8, int16, uint16, float16, float32); pass ``dtype`` to convert.
    An existing file is replaced only with ``overwrite=True``.
    """
    path = Path(path)
    if data.ndim not in (2, 3):
        raise TomosegIOError(f"Cannot write {path}: MRC holds 2D or 3D data, got {data.ndim}D.")
    target = np.dtype(dtype) if dtype is not None else np.dtype(data.dtype)
    if target == np.bool_:
        target = np.dtype(np.uint8)
    if target == np.float64:
        target = np.dtype(np.float32)
    if target not in {np.dtype(t) for t in SUPPORTED_MODES.values()} | {np.dtype(np.uint8)}:
        raise TomosegIOError(
            f"Cannot write {path}: dtype {target} has no MRC mode; convert to float32, "
            "int16, uint16 or uint8 first."
        )
    vs = _normalise_voxel_size(voxel_size, data.ndim)
    compressed = str(path).lower().endswith(".gz")
    with atomic_path(path, overwrite=overwrite) as tmp:
        if compressed:
            with mrcfile.new(tmp, overwrite=True, compression="gzip") as mrc:
                mrc.set_data(np.asarray(data, dtype=target))
                finish_header(mrc, vs, origin)
        else:
            shape = tuple(int(s) for s in data.shape)
            with new_mrc_mmap(tmp, shape, target) as (mrc, out):
                stats = HeaderStats()
                if data.ndim == 2:
                    out[...] = np.asarray(data, dtype=target)
                    stats.add(out)
                else:
                    for z in range(0, shape[0], _WRITE_CHUNK_SLICES):
                        chunk = np.asarray(data[z : z + _WRITE_CHUNK_SLICES]).astype(
                            target, copy=False
                        )
                        out[z : z + chunk.shape[0]] = chunk
                        stats.add(chunk)
                finish_header(mrc, vs, origin, stats)
    return path


class HeaderStats:
    """Running min / max / mean / rms of data written in pieces, for the MRC header."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.low = math.inf
        self.high = -math.inf

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return
        self.n += values.size
        self.total += float(values.sum())
        self.total_sq += float(np.square(values).sum())
        self.low = min(self.low, float(values.min()))
        self.high = max(self.high, float(values.max()))

    def write(self, header: Any) -> None:
        if self.n == 0:
            return
        mean = self.total / self.n
        header.dmin, header.dmax, header.dmean = self.low, self.high, mean
        header.rms = math.sqrt(max(self.total_sq / self.n - mean * mean, 0.0))


@contextlib.contextmanager
def new_mrc_mmap(
    path: str | os.PathLike, shape: tuple[int, ...], dtype: np.dtype | type
) -> Iterator[tuple[Any, np.ndarray]]:
    """A new memory-mapped MRC file for ``dtype`` data: yields ``(mrc, writable array)``.

    uint8 goes into a mode-0 file whose header marks the bytes unsigned the way IMOD does
    (one byte per voxel, read back as uint8 by :func:`read_tomogram`).  Pass the header
    statistics to :func:`finish_header` for such files (mrcfile would count signed bytes).
    """
    dtype = np.dtype(dtype)
    unsigned_bytes = dtype == np.uint8
    mode = 0 if unsigned_bytes else int(mrcfile.utils.mode_from_dtype(dtype))
    with mrcfile.new_mmap(path, shape=shape, mrc_mode=mode, overwrite=True) as mrc:
        if unsigned_bytes:
            _mark_unsigned_bytes(mrc.header)
        yield mrc, (mrc.data.view(np.uint8) if unsigned_bytes else mrc.data)


def finish_header(
    mrc: Any,
    voxel_size: Any = None,
    origin: tuple[float, float, float] | None = None,
    stats: HeaderStats | None = None,
) -> None:
    """Write voxel size (Angstrom, Z Y X), origin and statistics into a new file's header."""
    vs = _normalise_voxel_size(voxel_size, 3)
    if vs is not None:
        mrc.voxel_size = (vs[2], vs[1], vs[0])
    if origin is not None:
        oz, oy, ox = (float(v) for v in origin)
        mrc.header.origin = (ox, oy, oz)
    if mrc.data is not None and mrc.data.ndim == 3:
        mrc.header.ispg = 1  # a volume, not an image stack
    if stats is not None:
        stats.write(mrc.header)
    else:
        mrc.update_header_stats()


def _set_header(mrc: Any, voxel_size: Any, origin: Any) -> None:
    """Header facts without statistics (kept for callers written before finish_header)."""
    finish_header(mrc, voxel_size, origin)


def write_labels(
    path: str | os.PathLike,
    labels: np.ndarray,
    voxel_size: float | tuple[float, ...] | None = None,
    **kwargs: Any,
) -> Path:
    """Write an integer segmentation as uint8 (or uint16 past 255 labels)."""
    labels = np.asarray(labels) if not isinstance(labels, np.ndarray) else labels
    if labels.dtype.kind not in "biu":
        raise TomosegIOError(f"Labels must be integers; got dtype {labels.dtype}.")
    top = int(labels.max()) if labels.size else 0
    low = int(labels.min()) if labels.size else 0
    if low < 0:
        raise TomosegIOError(f"Labels must be non-negative (found {low}).")
    return write_mrc(path, labels, voxel_size, dtype=labels_dtype(top), **kwargs)
