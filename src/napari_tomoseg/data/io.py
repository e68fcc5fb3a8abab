"""MRC input and output: memory-mapped reading, voxel size kept, atomic writing.

Units: every length in napari-tomoseg is in **Angstrom**, as in the MRC header.  A layer's
``scale`` is the voxel size in Angstrom per axis (Z, Y, X), so a tomogram and its
segmentation line up in world coordinates, and picked coordinates come out in Angstrom.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import math
import mmap
import os
import re
import secrets
import socket
import stat
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mrcfile
import mrcfile.utils
import numpy as np

from ..errors import (
    MissingVoxelSizeWarning,
    OutputExistsError,
    TemporariesRemovedWarning,
    TomosegIOError,
)
from .voxels import VoxelSize, VoxelSizeLike, voxel_metadata
from .zarr_io import is_zarr_path

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
#: errno values of a file system that cannot fsync (closing a memory map writes it anyway).
_NO_FSYNC = {errno.EINVAL, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}
#: errno values of a full disk or quota (EDQUOT is missing on some systems).
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
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
    uncompressed MRC file, a lazy Zarr array (read chunk by chunk when indexed) for
    OME-Zarr.  ``voxel_size`` is a :class:`~napari_tomoseg.data.voxels.VoxelSize` (Z, Y, X
    in Angstrom; one value or (Y, X) given here becomes one), or ``None`` when the file does
    not give a usable one.  ``levels``: an OME-Zarr pyramid, finest (``data``) first, for
    display; empty for MRC files.
    """

    data: np.ndarray
    voxel_size: VoxelSize | None = None
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    path: Path | None = None
    mode: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    levels: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.voxel_size = VoxelSize.parse(self.voxel_size)

    @property
    def scale(self) -> tuple[float, ...]:
        """Layer scale in Angstrom per voxel (1.0 where the voxel size is unknown)."""
        vs = self.voxel_size or (1.0, 1.0, 1.0)
        return tuple(float(v) for v in vs[-self.data.ndim :])

    def metadata(self) -> dict[str, Any]:
        """Header facts for a napari layer's ``metadata``."""
        return {
            **voxel_metadata(self.voxel_size),
            "origin": self.origin,
            "source_path": str(self.path) if self.path else None,
            "mrc_mode": self.mode,
            **self.extra,
        }


def is_mrc_path(path: str | os.PathLike) -> bool:
    """True if the file name has one of the MRC endings the reader accepts."""
    name = str(path).lower()
    return name.endswith(MRC_EXTENSIONS)


def is_tomogram_path(path: str | os.PathLike) -> bool:
    """True for the files :func:`read_tomogram` opens: MRC-family files and ``.zarr``."""
    return is_mrc_path(path) or is_zarr_path(path)


def _as_zyx(values: Any) -> tuple[float, float, float]:
    """MRC header triples are (x, y, z); napari-tomoseg works in (z, y, x)."""
    return (float(values.z), float(values.y), float(values.x))


def voxel_size_from_header(header: Any) -> VoxelSize | None:
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
    return VoxelSize(*sizes)


def _fail(path: Path, problem: str, advice: str = "") -> TomosegIOError:
    text = f"Cannot read {path}: {problem}."
    if advice:
        text += f" {advice}"
    return TomosegIOError(text)


def read_tomogram(path: str | os.PathLike, *, mmap: bool = True) -> Tomogram:
    """Open an MRC-family file or an OME-Zarr (``.zarr``); the data stays on disk
    (memory-mapped, or a lazy Zarr array) when possible.

    Raises :class:`TomosegIOError` naming the file and the problem when the file is missing,
    empty, not an MRC file, truncated, or of an unsupported mode.  Warns with
    :class:`MissingVoxelSizeWarning` when the header has no usable voxel size.

    Parameters
    ----------
    path
        The file: MRC (``.mrc``, ``.rec``, ``.map``, ``.st``, ``.ali``, ``.mrcs``, also
        ``.gz``-compressed) or an OME-Zarr / Zarr array (``.zarr``).
    mmap
        False reads an uncompressed MRC file into memory instead of mapping it; ``.gz``
        files are always read into memory, Zarr arrays always lazily.

    Returns
    -------
    Tomogram
        ``data`` (Z, Y, X) or (Y, X), the voxel size (Angstrom, or None), origin, MRC mode
        and header labels.
    """
    path = Path(path)
    if is_zarr_path(path):
        return _read_zarr_tomogram(path)
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
    except (ValueError, OSError, EOFError, OverflowError, zlib.error) as exc:
        if compressed and _is_decode_error(exc):
            raise _damaged_gzip(path, exc) from None
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
    # Python integers: a header's three int32 sizes can overflow any fixed-width product.
    nbytes = nx * ny * nz * dtype.itemsize

    if not compressed and size < offset:
        raise _fail(
            path,
            f"the header announces an extended header of {ext_bytes} bytes, which runs past "
            f"the end of the file ({size} bytes)",
            "The file is damaged or was not copied completely.",
        )
    if not compressed and size < offset + nbytes:
        raise _fail(
            path,
            f"the file is truncated: the header promises {nbytes} bytes of data "
            f"({nx} x {ny} x {nz}, mode {mode}) but only {max(size - offset, 0)} follow",
            "The file may not have been copied completely.",
        )
    if compressed or not mmap:
        data = _read_in_memory(path, shape, dtype)
    else:
        try:
            data = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        except (ValueError, OSError, OverflowError) as exc:
            raise _fail(path, f"the data cannot be mapped ({exc})") from None

    voxel_size = voxel_size_from_header(header)
    if voxel_size is None:
        warnings.warn(
            f"{path.name}: the header has no voxel size (it is 0 or 1.0 Angstrom); using 1.0. "
            "Set the real pixel size, or networks and coordinates will be in wrong units.",
            MissingVoxelSizeWarning,
            stacklevel=2,
        )
    origin = _as_zyx(header.origin)
    extra: dict[str, Any] = {"shape": tuple(int(s) for s in shape)}
    labels = header_labels(header)
    if labels:
        extra["header_labels"] = labels
    return Tomogram(
        data=data, voxel_size=voxel_size, origin=origin, path=path, mode=mode, extra=extra
    )


def _read_zarr_tomogram(path: Path) -> Tomogram:
    """An OME-Zarr image or Zarr array as a :class:`Tomogram` (see :mod:`.zarr_io`)."""
    from .zarr_io import read_zarr

    levels, voxel, origin, kind = read_zarr(path)
    data = levels[0]
    if voxel is None:
        warnings.warn(
            f"{path.name}: the Zarr array records no voxel size; using 1.0. Set the real "
            "pixel size, or networks and coordinates will be in wrong units.",
            MissingVoxelSizeWarning,
            stacklevel=3,
        )
    shape = tuple(int(s) for s in data.shape)
    return Tomogram(
        data=data,
        voxel_size=voxel,
        origin=(0.0,) * (3 - len(origin)) + tuple(origin),  # type: ignore[arg-type]
        path=path,
        extra={"shape": shape, "source_format": kind, "levels": len(levels)},
        levels=levels,
    )


def header_labels(header: Any) -> list[str]:
    """The text labels of an MRC header (``nlabl`` of them, blanks stripped)."""
    n = min(max(int(header.nlabl), 0), 10)
    texts = (bytes(header.label[i]).decode("latin-1").strip(" \x00") for i in range(n))
    return [t for t in texts if t]


#: How an output's header names the tomogram it segments (read by ``source_name``).
SOURCE_LABEL = "napari-tomoseg segmentation of tomogram: "


def source_label(tomogram: str | os.PathLike) -> str:
    """The header label that names the tomogram an output was made from (its file stem)."""
    return SOURCE_LABEL + mrc_stem(tomogram)


#: How a probability map's header records the threshold its mask was cut at (read by
#: ``threshold_of``): ``merge`` and ``suggest`` take it as their default.
THRESHOLD_LABEL = "napari-tomoseg mask threshold: "


def threshold_label(threshold: float | None) -> list[str]:
    """The header label recording a mask threshold (none for None)."""
    return [] if threshold is None else [f"{THRESHOLD_LABEL}{float(threshold):.4g}"]


def output_header_texts(
    tomogram: str | os.PathLike, probability: bool, threshold: float | None = None
) -> list[str]:
    """The header labels of an apply output: its source tomogram, and for a probability map
    what its values mean and the threshold its mask was cut at (``docs/formats.md``)."""
    from .probability import PROBABILITY_LABEL

    if not probability:
        return [source_label(tomogram)]
    return [source_label(tomogram), PROBABILITY_LABEL, *threshold_label(threshold)]


def threshold_of(tomogram: Tomogram) -> float | None:
    """The mask threshold a probability map's header records, if it records a valid one."""
    for text in tomogram.extra.get("header_labels", ()):
        if text.startswith(THRESHOLD_LABEL):
            try:
                value = float(text[len(THRESHOLD_LABEL) :])
            except ValueError:
                return None
            return value if 0.0 < value < 1.0 else None
    return None


def source_name(tomogram: Tomogram) -> str | None:
    """The tomogram a mask or probability map was made from, if its header says so."""
    for text in tomogram.extra.get("header_labels", ()):
        if text.startswith(SOURCE_LABEL):
            return text[len(SOURCE_LABEL) :].strip() or None
    return None


#: How a mask's header names its classes, background first (read by ``class_names_of``).
CLASSES_LABEL = "napari-tomoseg classes: "


def classes_label(names: Sequence[str]) -> list[str]:
    """The header label naming a mask's classes (background first), or none when the names
    do not fit an MRC label (80 characters) or hold a comma."""
    text = CLASSES_LABEL + ",".join(str(n) for n in names)
    return [text] if len(text) <= 80 and not any("," in str(n) for n in names) else []


def class_names_of(tomogram: Tomogram) -> list[str] | None:
    """The class names (background first) a mask's header records, if it does."""
    for text in tomogram.extra.get("header_labels", ()):
        if text.startswith(CLASSES_LABEL):
            return text[len(CLASSES_LABEL) :].split(",")
    return None


def output_names(output_dir: Path, tomogram: str | os.PathLike, label: str) -> tuple[Path, Path]:
    """``<stem>_<label>_mask.mrc`` and ``<stem>_<label>.mrc``: where applying the network
    ``label`` to ``tomogram`` writes its mask and probability map (CLI, batch and widgets)."""
    stem = mrc_stem(tomogram)
    return output_dir / f"{stem}_{label}_mask.mrc", output_dir / f"{stem}_{label}.mrc"


def output_label(network: str | os.PathLike, name: str | None = None) -> str:
    """The ``label`` of :func:`output_names` for the network file ``network``: ``name``
    when given (``tomoseg apply --name``), else the file's name without its extension."""
    return name or Path(network).stem


def output_feature(path: str | os.PathLike, source: str | None, suffix: str = "") -> str:
    """What an output named by :func:`output_names` is of, read back from its name:
    ``tomo1_membrane_mask.mrc`` (``suffix`` "_mask") or ``tomo1_membrane.mrc`` made from
    ``tomo1`` (``source``, when known) is of ``membrane``."""
    stem = mrc_stem(path).removesuffix(suffix)
    return stem.removeprefix(f"{source}_") if source else stem


def mrc_stem(path: str | os.PathLike) -> str:
    """A file's name without its ending (``tomo1.rec``, ``tomo1.mrc.gz`` and
    ``tomo1.ome.zarr`` give ``tomo1``)."""
    name = Path(path).name
    if is_zarr_path(name):
        return re.sub(r"(\.ome)?\.zarr$", "", name, flags=re.IGNORECASE)
    return Path(name.removesuffix(".gz")).stem


def _read_in_memory(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Read the whole data block (compressed files cannot be memory-mapped).

    Any failure of the decoder (a damaged gzip stream raises ``zlib.error``, a short one
    ``EOFError``) becomes a :class:`TomosegIOError` naming the file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=True) as mrc:
                data = mrc.data
                if data is None or data.size != math.prod(shape):
                    raise _fail(
                        path,
                        "the file is truncated: the data block is shorter than the header says",
                        "The file may not have been copied completely.",
                    )
                return np.array(data, dtype=dtype.newbyteorder("="), copy=True).reshape(shape)
    except TomosegIOError:
        raise
    except (ValueError, OSError, EOFError, OverflowError, zlib.error) as exc:
        if _is_decode_error(exc):
            raise _damaged_gzip(path, exc) from None
        raise _fail(path, f"the data could not be read ({exc})") from None


def _is_decode_error(exc: BaseException) -> bool:
    """True for the errors of a damaged or cut-short gzip stream."""
    return isinstance(exc, (zlib.error, EOFError, gzip.BadGzipFile))


def _damaged_gzip(path: Path, exc: BaseException) -> TomosegIOError:
    return _fail(
        path,
        f"the gzip-compressed data is damaged or cut short ({exc})",
        "The file may not have been copied completely; copy it again.",
    )


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
    """uint8 for labels up to 127, uint16 beyond (MRC modes 0 and 6).

    Mode 0 is signed bytes in MRC2014 and unsigned ones in IMOD; values up to 127 read the
    same either way, so larger ones go to mode 6, which every reader takes as unsigned.
    """
    if max_label < 0:
        raise TomosegIOError(f"Labels must be non-negative integers (found {max_label}).")
    if max_label <= 127:
        return np.dtype(np.uint8)
    if max_label <= 65535:
        return np.dtype(np.uint16)
    raise TomosegIOError(f"{max_label} labels do not fit in an MRC file (65535 at most).")


#: Suffix of the temporary file a write goes into before it is renamed onto its target.
#: Temporaries are hidden (``.NAME.WRITER.part``, see :func:`temporary_name`) and have no
#: MRC extension, so readers and folder listings of napari-tomoseg never take one for a
#: result.
TEMP_SUFFIX = ".part"
#: Suffix of the hidden hard link that keeps a replaced file until a multi-file write has
#: committed (``.NAME.WRITER.old``): it is the previous file, byte for byte.
BACKUP_SUFFIX = ".old"
#: A temporary whose writer cannot be checked (another host, or a name without one) is
#: stale once unchanged this long: a running write touches its file far more often.
STALE_AFTER_S = 24 * 3600.0


def _new_file_mode() -> int:
    """Permission bits a plain ``open(path, "w")`` would give a new file (0o666 & ~umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


#: Read once at import (``os.umask`` can only be read by setting it, which is not
#: thread-safe); temporaries are made with 0o600 and are given these bits before renaming.
_FILE_MODE = _new_file_mode()


def _check_target(path: Path, overwrite: bool) -> Path:
    """The folder ``path`` will be written in; refuses what cannot or must not be replaced."""
    if path.is_dir():
        raise TomosegIOError(f"Cannot write {path}: it is a folder; give a file name.")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExistsError(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise TomosegIOError(f"Cannot write {path}: the folder {folder} does not exist.")
    if not os.access(folder, os.W_OK):
        raise TomosegIOError(f"Cannot write {path}: the folder {folder} is not writable.")
    return folder


def _write_failed(path: Path, exc: OSError, what: str = "") -> TomosegIOError:
    reason = exc.strerror or str(exc)
    if exc.errno in _DISK_FULL:
        reason += " (the disk or your quota is full; free space and try again)"
    text = f"Cannot write {path}: {reason}."
    if what:
        text += f" {what}"
    return TomosegIOError(text)


def _make_temp(path: Path, folder: Path) -> Path:
    """A new, empty, private temporary beside ``path`` named after this process."""
    for _ in range(16):
        tmp = folder / temporary_name(path.name, TEMP_SUFFIX)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _write_failed(path, exc, "Nothing was written.") from None
        os.close(fd)
        return tmp
    raise TomosegIOError(f"Cannot write {path}: no free temporary name in {folder}.")


def _sync(tmp: Path, mode: int) -> None:
    """Flush a finished temporary to disk and give it its final permission bits."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, mode)


def _sync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable (best effort: not every system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _backup_link(path: Path) -> Path | None:
    """A hidden hard link to ``path`` (its previous content), or None if links are refused."""
    for _ in range(16):
        backup = path.with_name(temporary_name(path.name, BACKUP_SUFFIX))
        try:
            os.link(path, backup)
        except FileExistsError:
            continue
        except OSError:  # e.g. a file system without hard links: no rollback possible
            return None
        return backup
    return None


def _commit(pairs: Sequence[tuple[Path, Path]]) -> None:
    """Rename every temporary onto its target; if one rename fails, put back the targets
    already replaced (from hard-link backups) and remove the new ones, then raise."""
    done: list[tuple[Path, Path | None, bool]] = []  # (target, backup, existed before)
    pending: Path | None = None
    current = pairs[0][1] if pairs else Path(".")
    try:
        for tmp, current in pairs:
            existed = current.exists()
            pending = _backup_link(current) if existed and len(pairs) > 1 else None
            os.replace(tmp, current)
            done.append((current, pending, existed))
            pending = None
    except BaseException as exc:
        for target, backup, existed in reversed(done):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, target)
                elif not existed:
                    target.unlink()
        if pending is not None:
            with contextlib.suppress(OSError):
                pending.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, TomosegIOError):
            raise _write_failed(current, exc, "The previous file (if any) is unchanged.") from None
        raise
    for _, backup, _ in done:
        if backup is not None:
            with contextlib.suppress(OSError):
                backup.unlink()


@contextlib.contextmanager
def atomic_paths(
    paths: Sequence[str | os.PathLike], *, overwrite: bool = False
) -> Iterator[list[Path]]:
    """Yield one temporary path beside each of ``paths``; on success all are renamed onto
    their targets together.

    If the body raises, nothing is renamed and every temporary is removed, so the targets
    keep their previous content (or stay absent).  If a rename fails, the targets already
    replaced get their previous content back (kept meanwhile as hidden hard links), so a
    multi-file write is all or nothing.  A process killed while writing leaves at most its
    hidden temporaries (``.NAME.WRITER.part``, named after the process, see
    :func:`temporary_name`) and, when killed during the final renames, a hidden
    ``.NAME.WRITER.old`` link to a previous file.  Before writing, the stale ones of every
    target folder are deleted (:func:`remove_stale_temporaries`) and named in a
    :class:`~napari_tomoseg.errors.TemporariesRemovedWarning`, so every command, widget and
    cluster worker tidies up after killed runs.  Existing targets are replaced only with
    ``overwrite=True``; a written file gets
    the permissions a new file would (``0o666`` less the umask) or those of the file it
    replaces.  Failures to write raise :class:`TomosegIOError` naming the file.
    """
    targets = [Path(p) for p in paths]
    if len({os.path.abspath(t) for t in targets}) != len(targets):
        raise TomosegIOError(f"The same file is named twice among {[str(t) for t in targets]}.")
    folders = [_check_target(t, overwrite) for t in targets]
    for folder in dict.fromkeys(folders):
        _remove_leftovers(folder)
    tmps: list[Path] = []
    try:
        for target, folder in zip(targets, folders):
            tmps.append(_make_temp(target, folder))
        yield list(tmps)
        for tmp, target in zip(tmps, targets):
            mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else _FILE_MODE
            try:
                _sync(tmp, mode)
            except OSError as exc:
                raise _write_failed(
                    target, exc, "The previous file (if any) is unchanged."
                ) from None
        _commit(list(zip(tmps, targets)))
        for folder in dict.fromkeys(folders):
            _sync_folder(folder)
    except BaseException:
        for tmp in tmps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    If the body raises (or the process dies), ``path`` is untouched and the temporary file is
    removed (a killed process leaves it, hidden, see :func:`stale_temporaries`), so a failed
    write never leaves a half-written or clobbered file.  See :func:`atomic_paths`.

    Parameters
    ----------
    path
        The file to write.
    overwrite
        Allow replacing an existing ``path`` (else :class:`OutputExistsError` before writing).

    Yields
    ------
    Path
        The hidden temporary file beside ``path`` to write to.
    """
    with atomic_paths([path], overwrite=overwrite) as (tmp,):
        yield tmp


# -- temporaries: who wrote them, and which are left over -----------------------------------
@dataclass(frozen=True)
class Writer:
    """The process that writes a temporary, as recorded in its name.

    ``host`` is the short host name (for people to read); ``ident`` hashes the full host
    name with the PID namespace, so two containers that share a host name but not their
    process IDs are told apart; ``started`` (whole seconds since the epoch, 0 if unknown)
    tells the process from a later one that got the same PID.
    """

    host: str
    ident: str
    pid: int
    started: int = 0

    @property
    def token(self) -> str:
        return f"{self.host}-{self.ident}-{self.pid}-{self.started:x}"

    @classmethod
    def parse(cls, token: str) -> Writer | None:
        """The writer a :attr:`token` names, or None if it names none."""
        match = _WRITER_RE.fullmatch(token)
        if match is None:
            return None
        return cls(match["host"], match["ident"], int(match["pid"]), int(match["started"], 16))

    def on_this_host(self) -> bool:
        me = this_writer()
        return (self.host, self.ident) == (me.host, me.ident)

    def running(self) -> bool | None:
        """Whether the process still runs: True / False on this host, None elsewhere
        (another machine's processes cannot be seen from here)."""
        if not self.on_this_host():
            return None
        return process_running(self.pid, self.started)

    def describe(self) -> str:
        where = "this host" if self.on_this_host() else self.host
        return f"process {self.pid} on {where}"


_WRITER_RE = re.compile(
    r"(?P<host>[A-Za-z0-9_-]*)-(?P<ident>[0-9a-f]{6})-(?P<pid>[0-9]+)-(?P<started>[0-9a-f]+)"
)
#: ``.TARGET.WRITER-RANDOM.part`` (or ``.old``) as written now, and ``.TARGET.RANDOM.part``
#: as written by earlier versions, which recorded no writer.
_TEMP_RE = re.compile(
    r"\.(?P<target>.+)\.(?P<writer>[A-Za-z0-9_-]*-[0-9a-f]{6}-[0-9]+-[0-9a-f]+)"
    r"-[0-9a-f]{8}\.(?P<kind>part|old)"
)
_OLD_TEMP_RE = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.(?P<kind>part|old)")
_MAX_NAME_BYTES = 255
_THIS_WRITER: dict[int, Writer] = {}


def _process_start(pid: int) -> int:
    """When process ``pid`` started (whole seconds since the epoch), 0 if unknown."""
    import psutil

    try:
        return int(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return 0


def this_writer() -> Writer:
    """This process as the writer of temporaries (computed once per process)."""
    pid = os.getpid()
    writer = _THIS_WRITER.get(pid)
    if writer is None:
        hostname = socket.gethostname() or "localhost"
        short = re.sub(r"[^A-Za-z0-9_-]", "_", hostname.split(".")[0])[:32] or "host"
        try:
            namespace = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            namespace = 0
        ident = zlib.crc32(f"{hostname}/{namespace}".encode()) & 0xFFFFFF
        writer = Writer(short, f"{ident:06x}", pid, _process_start(pid))
        _THIS_WRITER[pid] = writer
    return writer


def process_running(pid: int, started: int = 0) -> bool:
    """Whether process ``pid`` of this host runs; with ``started`` (as recorded in a
    :class:`Writer`) only if it is that very process, not a later one with its PID.
    A zombie (killed, not yet reaped) no longer runs."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return not started or abs(int(proc.create_time()) - started) <= 1
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # e.g. access denied: it exists
        return True


def temporary_name(target: str, suffix: str = TEMP_SUFFIX, writer: Writer | None = None) -> str:
    """A hidden name beside ``target`` that records its writer (this process by default):
    ``.TARGET.HOST-IDENT-PID-STARTED-RANDOM.part``; a very long target is shortened."""
    token = f"{(writer or this_writer()).token}-{secrets.token_hex(4)}{suffix}"
    name = target
    while len(f".{name}.{token}".encode()) > _MAX_NAME_BYTES and len(name) > 1:
        name = name[:-1]
    return f".{name}.{token}"


@dataclass(frozen=True)
class Temporary:
    """A hidden temporary (``kind`` "part") or backup (``kind`` "old") of napari-tomoseg's
    atomic writes, with its writer (None for names from versions that recorded none) and
    whether that process is ``"running"``, ``"gone"`` or ``"unknown"`` (another host)."""

    path: Path
    target: str
    kind: str
    size: int
    mtime: float
    writer: Writer | None
    state: str

    def is_stale(self, min_age_s: float = STALE_AFTER_S, now: float | None = None) -> bool:
        """Left over for good: its process is gone, or (when that cannot be checked) it
        is unchanged for ``min_age_s`` seconds.  Never while its process runs."""
        if self.state != "unknown":
            return self.state == "gone"
        return (time.time() if now is None else now) - self.mtime >= min_age_s

    def describe(self, now: float | None = None) -> str:
        """Whose it is and whether that process still runs, in words."""
        if self.writer is None:
            who = "from a version that recorded no process"
        elif self.state == "unknown":
            who = f"written by {self.writer.describe()}, which cannot be checked from here"
        else:
            still = "still running" if self.state == "running" else "gone"
            return f"written by {self.writer.describe()}, which is {still}"
        idle = (time.time() if now is None else now) - self.mtime
        return f"{who}, unchanged for {format_duration(idle)}"


def _temporary_at(entry: os.DirEntry) -> Temporary | None:
    name = entry.name
    if not name.startswith(".") or not name.endswith((TEMP_SUFFIX, BACKUP_SUFFIX)):
        return None
    match = _TEMP_RE.fullmatch(name) or _OLD_TEMP_RE.fullmatch(name)
    if match is None:
        return None
    try:
        if not entry.is_file(follow_symlinks=False):
            return None
        info = entry.stat(follow_symlinks=False)
    except OSError:
        return None
    writer = Writer.parse(match["writer"]) if "writer" in match.groupdict() else None
    running = writer.running() if writer is not None else None
    state = "unknown" if running is None else ("running" if running else "gone")
    return Temporary(
        Path(entry.path),
        match["target"],
        match["kind"],
        info.st_size,
        info.st_mtime,
        writer,
        state,
    )


def list_temporaries(folder: str | os.PathLike) -> list[Temporary]:
    """Every temporary and backup of napari-tomoseg's atomic writes in ``folder``, stale
    or not (:meth:`Temporary.is_stale`), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TomosegIOError(f"{folder} is not a folder.")
    with os.scandir(folder) as entries:
        found = [t for t in map(_temporary_at, entries) if t is not None]
    return sorted(found, key=lambda t: t.path.name)


def stale_temporaries(
    folder: str | os.PathLike, min_age_s: float = STALE_AFTER_S
) -> list[Temporary]:
    """The temporaries that writes in ``folder`` left behind when they were killed.

    A temporary is stale when its name records a process of this host that is gone, or,
    when its writer cannot be checked (another host, or an older name without one), when
    it is unchanged for ``min_age_s`` seconds.  A temporary of a process that runs on this
    host is never stale.  Stale ones hold no result that is not also under its real name
    (a ``.part`` never became a file; an ``.old`` is the previous version of a file that was
    replaced), and :func:`remove_stale_temporaries` deletes them.
    """
    now = time.time()
    return [t for t in list_temporaries(folder) if t.is_stale(min_age_s, now)]


def remove_stale_temporaries(
    folder: str | os.PathLike, min_age_s: float = STALE_AFTER_S
) -> list[Temporary]:
    """Delete what :func:`stale_temporaries` lists; returns the ones removed.

    A temporary judged by its age is checked again just before it is deleted, so one
    that a write on another host touched meanwhile is kept.
    """
    removed = []
    for temp in stale_temporaries(folder, min_age_s):
        with contextlib.suppress(OSError):
            if temp.state == "unknown" and temp.path.stat().st_mtime != temp.mtime:
                continue
            temp.path.unlink()
            removed.append(temp)
    return removed


def remove_superseded_temporaries(targets: Sequence[str | os.PathLike]) -> list[Temporary]:
    """Delete the temporaries of ``targets`` that are now written completely.

    For a batch whose jobs have finished: a temporary of one of their outputs can only be
    from an earlier attempt that was killed (or given up by the scheduler), on whichever
    host, so it is removed without waiting for its age; one of a process that runs on
    this host is kept all the same.
    """
    names: dict[Path, set[str]] = {}
    for target in map(Path, targets):
        names.setdefault(target.parent, set()).add(target.name)
    removed = []
    for folder, wanted in names.items():
        with contextlib.suppress(OSError):
            for temp in list_temporaries(folder):
                if temp.target in wanted and temp.state != "running":
                    with contextlib.suppress(OSError):
                        temp.path.unlink()
                        removed.append(temp)
    return removed


def format_size(nbytes: float) -> str:
    """Bytes as people read them: 512 B, 3.4 kB, 1.2 GB (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(nbytes) < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def format_duration(seconds: float) -> str:
    """A duration as people read it: 40 s, 12 min, 3.5 h, 2.0 days."""
    seconds = max(float(seconds), 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def describe_removed(removed: Sequence[Temporary], folder: str | os.PathLike) -> str:
    """One sentence naming the removed temporaries, their sizes and why they were stale."""
    total = sum(t.size for t in removed)
    files = "file" if len(removed) == 1 else "files"
    listed = "; ".join(f"{t.path.name} ({format_size(t.size)}, {t.describe()})" for t in removed)
    return (
        f"Removed {len(removed)} temporary {files} ({format_size(total)}) that interrupted "
        f"writes had left in {folder}: {listed}."
    )


def _remove_leftovers(folder: Path) -> None:
    """Delete the stale temporaries of a folder about to be written in, and say so."""
    try:
        removed = remove_stale_temporaries(folder)
    except OSError:
        return  # tidying up never stops a write
    if removed:
        warnings.warn(describe_removed(removed, folder), TemporariesRemovedWarning, stacklevel=4)


#: Voxels per block when a volume is read a block of Z slices at a time (:func:`read_slabs`).
SLAB_VOXELS = 4_000_000


def read_slabs(volume: Any, max_voxels: int = SLAB_VOXELS) -> Iterator[tuple[int, np.ndarray]]:
    """``(z0, block)`` for consecutive blocks of whole Z slices of a (Z, ...) volume, each
    read into memory on its own (a lazy dask or Zarr array, or a memory map, is never
    read whole).  A memory map's pages are released after each block (:func:`release_pages`),
    so resident memory does not grow with the volume.

    Parameters
    ----------
    volume
        A (Z, ...) array: numpy, memory map, dask or Zarr.
    max_voxels
        The most voxels per block; a block holds at least one slice, however large.

    Yields
    ------
    tuple of (int, numpy.ndarray)
        The first slice's index and the block, ``volume[z0 : z0 + step]`` in memory.
    """
    plane = math.prod(int(n) for n in volume.shape[1:])
    step = max(1, int(max_voxels) // max(1, plane))
    for z0 in range(0, int(volume.shape[0]), step):
        yield z0, np.asarray(volume[z0 : z0 + step])
        release_pages(volume)


def _shared_mapping_of(array: Any) -> mmap.mmap | None:
    """The shared ``mmap`` behind a numpy memory map (or a view of one), else None (also
    for copy-on-write maps, whose changes exist only in memory)."""
    seen = array
    while seen is not None:
        found = getattr(seen, "_mmap", None)
        if isinstance(seen, np.memmap) and isinstance(found, mmap.mmap):
            return None if seen.mode == "c" else found
        seen = getattr(seen, "base", None)
    return None


def release_pages(array: Any) -> None:
    """Drop a memory-mapped array's pages from this process's resident memory.

    The data is kept: in a file mapped shared (numpy's ``"r"``, ``"r+"`` and ``"w+"``
    modes, mrcfile's memory maps; copy-on-write maps are left alone) written pages stay in
    the page cache until written back, and a later access reads them again.  Streaming
    code calls this after each block so that resident memory does not grow with the file
    (``madvise(MADV_DONTNEED)``; a no-op for arrays in memory and where the system lacks
    it).
    """
    mapping = _shared_mapping_of(array)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if mapping is None or advice is None or mapping.closed:
        return
    with contextlib.suppress(OSError, ValueError):
        mapping.madvise(advice)


#: The name modules and scripts used before :class:`VoxelSize`: the same parse function.
voxel_triple = VoxelSize.parse


def write_mrc(
    path: str | os.PathLike,
    data: np.ndarray,
    voxel_size: VoxelSizeLike | None = None,
    *,
    origin: tuple[float, float, float] | None = None,
    overwrite: bool = False,
    dtype: np.dtype | type | None = None,
    header_texts: Sequence[str] = (),
) -> Path:
    """Write a 2D or 3D array to an MRC file atomically, keeping the voxel size (Angstrom).

    ``data`` may be memory-mapped or lazy: it is copied in chunks of Z slices, so memory use
    stays bounded.  ``.gz`` names are written gzip-compressed.  Supported dtypes are those
    of the MRC modes (int8, int16, uint16, float16, float32) and uint8 (mode 0, marked
    unsigned the way IMOD does); bool becomes uint8 and float64 float32.

    Parameters
    ----------
    path
        The MRC file; a ``.gz`` name is written gzip-compressed.
    data
        The (Z, Y, X) volume or (Y, X) image; numpy, memory map or lazy (dask, Zarr).
    voxel_size
        (Z, Y, X) or one value in Angstrom; None leaves the header's default.
    origin
        (Z, Y, X) for the header's origin field (Angstrom); None leaves it at 0.
    overwrite
        Replace an existing file (else :class:`~napari_tomoseg.errors.OutputExistsError`).
    dtype
        Convert to this dtype first (one of the supported ones); the data's own when None.
    header_texts
        Text labels for the header, ten of 80 characters at most (see
        :func:`finish_header`).

    Returns
    -------
    Path
        ``path``.
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
    vs = VoxelSize.parse(voxel_size)
    compressed = str(path).lower().endswith(".gz")
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            _write_mrc_body(tmp, data, target, vs, origin, compressed, header_texts)
    except OSError as exc:
        if isinstance(exc, TomosegIOError):
            raise
        raise _write_failed(path, exc, "The previous file (if any) is unchanged.") from None
    return path


def _write_mrc_body(
    tmp: Path,
    data: np.ndarray,
    target: np.dtype,
    vs: VoxelSize | None,
    origin: tuple[float, float, float] | None,
    compressed: bool,
    header_texts: Sequence[str] = (),
) -> None:
    """Write ``data`` as ``target`` dtype into the temporary file of :func:`write_mrc`."""
    if compressed:
        with mrcfile.new(tmp, overwrite=True, compression="gzip") as mrc:
            mrc.set_data(np.asarray(data, dtype=target))
            finish_header(mrc, vs, origin, header_texts=header_texts)
        return
    shape = tuple(int(s) for s in data.shape)
    with new_mrc_mmap(tmp, shape, target) as (mrc, out):
        stats = HeaderStats()
        if data.ndim == 2:
            out[...] = np.asarray(data, dtype=target)
            stats.add(out)
        else:
            for z in range(0, shape[0], _WRITE_CHUNK_SLICES):
                chunk = np.asarray(data[z : z + _WRITE_CHUNK_SLICES]).astype(target, copy=False)
                out[z : z + chunk.shape[0]] = chunk
                stats.add(chunk)
        finish_header(mrc, vs, origin, stats, header_texts)


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
        _preallocate(Path(path))
        if unsigned_bytes:
            _mark_unsigned_bytes(mrc.header)
        yield mrc, (mrc.data.view(np.uint8) if unsigned_bytes else mrc.data)
        _write_back(Path(path))


def _write_back(path: Path) -> None:
    """Write a memory-mapped file's changed pages to disk with ``fsync``, which lets other
    threads run meanwhile; the ``msync`` that closing the map then does (numpy's
    ``memmap.flush``) holds the GIL, and finds little left to write (a viewer that autosaves
    in a worker thread would otherwise stop for as long)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # a failed write-back (a full disk) is not ignored
        if exc.errno not in _NO_FSYNC:
            raise
    finally:
        os.close(fd)


def _preallocate(path: Path) -> None:
    """Reserve the disk blocks of a new (sparse) memory-mapped file before it is written.

    Writing through a memory map onto a full disk kills the process with SIGBUS instead of
    raising an error; reserving the space first turns a full disk into an ``OSError``
    (ENOSPC) up front, before anything is written.  Systems without ``posix_fallocate``
    (or file systems that do not support it) skip the reservation.
    """
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is None:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size > 0:
            try:
                allocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in _DISK_FULL or exc.errno == errno.EFBIG:
                    raise
    finally:
        os.close(fd)


def finish_header(
    mrc: Any,
    voxel_size: Any = None,
    origin: tuple[float, float, float] | None = None,
    stats: HeaderStats | None = None,
    header_texts: Sequence[str] = (),
) -> None:
    """Write voxel size (Angstrom, Z Y X), origin, statistics and text labels (what the
    values mean, whose tomogram they segment; IMOD's ``header`` shows them) into a new
    file's header."""
    for text in list(header_texts)[:10]:  # an MRC header holds ten labels of 80 characters
        mrc.add_label(text[:80])
    vs = VoxelSize.parse(voxel_size)
    if vs is not None:
        mrc.voxel_size = vs.xyz
    if origin is not None:
        oz, oy, ox = (float(v) for v in origin)
        mrc.header.origin = (ox, oy, oz)
    if mrc.data is not None and mrc.data.ndim == 3:
        mrc.header.ispg = 1  # a volume, not an image stack
    if stats is not None:
        stats.write(mrc.header)
    else:
        mrc.update_header_stats()


def write_labels(
    path: str | os.PathLike,
    labels: np.ndarray,
    voxel_size: VoxelSizeLike | None = None,
    **kwargs: Any,
) -> Path:
    """Write an integer segmentation as uint8 (or uint16 past label 127, see
    :func:`labels_dtype`).

    Parameters
    ----------
    path
        The MRC file, as for :func:`write_mrc`.
    labels
        Non-negative integer labels (0 is background), at most 65535.
    voxel_size
        (Z, Y, X) or one value in Angstrom, or None.
    **kwargs
        :func:`write_mrc`'s other keyword arguments (``overwrite``, ``origin``,
        ``header_texts``); not ``dtype``, which is chosen here.

    Returns
    -------
    Path
        ``path``.
    """
    labels = np.asarray(labels) if not isinstance(labels, np.ndarray) else labels
    if labels.dtype.kind not in "biu":
        raise TomosegIOError(
            f"Cannot write {path}: labels must be integers; got dtype {labels.dtype}."
        )
    top = int(labels.max()) if labels.size else 0
    low = int(labels.min()) if labels.size else 0
    if low < 0:
        raise TomosegIOError(
            f"Cannot write {path}: labels must be non-negative (found {low}); 0 is background."
        )
    return write_mrc(path, labels, voxel_size, dtype=labels_dtype(top), **kwargs)
