"""OME-Zarr input: a tomogram stored as an OME-NGFF image (a multiscale pyramid) or as a
plain Zarr array, opened lazily.

Nothing is read until a slice is asked for: the arrays are ``zarr`` arrays (dask views of
them when leading time / channel axes of length 1 are dropped), and indexing one reads only
the chunks it touches.  The finest level (the first dataset of the first
``multiscales`` entry) is the one every computation uses; the whole pyramid is kept for
display (a napari multiscale layer).  The voxel size is the finest level's ``scale``
transformation (times a ``multiscales``-wide one, if any) on the three space axes,
converted to Angstrom from the axes' units; a ``translation`` becomes the origin.

This reads the layout of the CryoET Data Portal (OME-NGFF 0.4 on Zarr format 2: levels
``"0"``, ``"1"``, ``"2"``, axes ``z, y, x`` of type ``space`` in ``angstrom``) and OME-NGFF
0.5 (Zarr format 3, the metadata under ``"ome"``), whichever Zarr format the installed
``zarr`` reads.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingVoxelSizeWarning, TomosegIOError
from .voxels import VoxelSize

#: Angstrom per unit, for the OME-NGFF space units a tomogram may use.
ANGSTROM_PER_UNIT: dict[str, float] = {
    "angstrom": 1.0,
    "nanometer": 10.0,
    "micrometer": 1e4,
    "millimeter": 1e7,
    "meter": 1e10,
    "picometer": 0.01,
}


def is_zarr_path(path: Any) -> bool:
    """True for a ``.zarr`` store (``tomo.zarr``, ``tomo.ome.zarr``)."""
    return str(path).rstrip("/\\").lower().endswith(".zarr")


def _fail(path: Path, problem: str, advice: str = "") -> TomosegIOError:
    return TomosegIOError(f"Cannot read {path}: {problem}." + (f" {advice}" if advice else ""))


def open_zarr(path: Path) -> Any:
    """The Zarr group or array at ``path``, opened read-only (errors name the file)."""
    import zarr

    if not path.exists():
        raise _fail(path, "it does not exist")
    try:
        return zarr.open(str(path), mode="r")
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise _fail(
            path,
            f"it is not a Zarr store ({exc})",
            "An OME-Zarr tomogram is a folder holding .zattrs/.zgroup or zarr.json files.",
        ) from None


def _multiscales(group: Any, path: Path) -> dict[str, Any]:
    """The first ``multiscales`` entry of a group's attributes (NGFF 0.4 or 0.5)."""
    attrs = dict(group.attrs)
    attrs = attrs.get("ome", attrs)  # NGFF 0.5 keeps its metadata under "ome"
    found = attrs.get("multiscales")
    if not isinstance(found, list) or not found or not isinstance(found[0], dict):
        raise _fail(
            path,
            "it is a Zarr group without OME-NGFF 'multiscales' metadata",
            "Open the image inside it (e.g. the folder of one tomogram) or an array.",
        )
    return found[0]


def _axes(entry: dict[str, Any], ndim: int, path: Path) -> list[dict[str, Any]]:
    """The axes as dicts (NGFF 0.3 lists names only): time / channel axes first, then the
    space axes, which must be (z,) y, x."""
    raw = entry.get("axes") or [{"name": n} for n in "zyx"[-ndim:]]
    axes = [a if isinstance(a, dict) else {"name": str(a)} for a in raw]
    names = [str(a.get("name", "")).lower() for a in axes]
    space = [n for n in names if n in ("x", "y", "z")]
    if (
        len(axes) != ndim
        or len(space) not in (2, 3)
        or names[len(names) - len(space) :] != list("zyx"[-len(space) :])
    ):
        raise _fail(
            path,
            f"its axes are {names} (an array of {ndim} dimensions)",
            "napari-tomoseg reads (z, y, x) tomograms and (y, x) images, after any time or "
            "channel axes.",
        )
    return axes


def _leading(axes: list[dict[str, Any]]) -> int:
    """How many axes (time, channel) come before the space axes."""
    return len(axes) - sum(str(a.get("name", "")).lower() in ("x", "y", "z") for a in axes)


def _single_image(levels: list[Any], axes: list[dict[str, Any]], path: Path) -> list[Any]:
    """The levels without their leading time / channel axes, which must have length 1
    (lazily: dask views of the Zarr arrays)."""
    lead = _leading(axes)
    if lead == 0:
        return levels
    names = [str(a.get("name")) for a in axes[:lead]]
    sizes = tuple(int(n) for n in levels[0].shape[:lead])
    if any(n != 1 for n in sizes):
        raise _fail(
            path,
            f"it holds several images (axes {names} of lengths {sizes})",
            "napari-tomoseg reads one tomogram: take one channel and time point out first.",
        )
    import dask.array as da

    return [da.from_zarr(level)[(0,) * lead] for level in levels]


def _transforms(items: Any) -> tuple[list[float] | None, list[float] | None]:
    """(scale, translation) of a list of NGFF coordinate transformations."""
    scale = translation = None
    for item in items or ():
        if item.get("type") == "scale" and "scale" in item:
            scale = [float(v) for v in item["scale"]]
        elif item.get("type") == "translation" and "translation" in item:
            translation = [float(v) for v in item["translation"]]
    return scale, translation


def _angstrom_factors(axes: list[dict[str, Any]], path: Path) -> list[float] | None:
    """Angstrom per unit of each axis; None (with a warning) when an axis gives no unit."""
    factors = []
    for axis in axes:
        unit = str(axis.get("unit") or "").lower()
        if not unit:
            return None
        if unit not in ANGSTROM_PER_UNIT:
            raise _fail(
                path,
                f"axis {axis.get('name')!r} is in {unit!r}, not a length unit",
                f"Known units: {', '.join(ANGSTROM_PER_UNIT)}.",
            )
        factors.append(ANGSTROM_PER_UNIT[unit])
    return factors


def _geometry(
    entry: dict[str, Any], axes: list[dict[str, Any]], path: Path
) -> tuple[VoxelSize, tuple[float, ...]]:
    """Voxel size (Z, Y, X; an image's (Y, X) as :meth:`VoxelSize.parse` makes it) and
    origin (axis order), in Angstrom, of the finest level."""
    scale, shift = _transforms(entry["datasets"][0].get("coordinateTransformations"))
    outer_scale, outer_shift = _transforms(entry.get("coordinateTransformations"))
    n = len(axes)
    lead = _leading(axes)
    for values in (scale, shift, outer_scale, outer_shift):
        if values is not None and len(values) != n:
            raise _fail(path, f"a transformation has {len(values)} values for {n} axes")
    scale = np.asarray(scale or [1.0] * n) * np.asarray(outer_scale or [1.0] * n)
    shift = np.asarray(shift or [0.0] * n) * np.asarray(outer_scale or [1.0] * n)
    shift = shift + np.asarray(outer_shift or [0.0] * n)
    scale, shift, axes = scale[lead:], shift[lead:], axes[lead:]
    factors = _angstrom_factors(axes, path)
    if factors is None:
        warnings.warn(
            f"{path.name}: the OME-Zarr axes give no unit; the scale {tuple(scale)} is taken "
            "as Angstrom.",
            MissingVoxelSizeWarning,
            stacklevel=4,
        )
        factors = [1.0] * len(axes)
    voxel = tuple(float(v) for v in scale * np.asarray(factors))
    origin = tuple(float(v) for v in shift * np.asarray(factors))
    if not all(np.isfinite(v) and v > 0 for v in voxel):
        raise _fail(path, f"its scale {tuple(scale)} is not a positive voxel size")
    return VoxelSize.parse(voxel), origin  # type: ignore[return-value]


def _levels(group: Any, entry: dict[str, Any], path: Path) -> list[Any]:
    """The arrays of every level, finest first."""
    datasets = entry.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise _fail(path, "its 'multiscales' metadata lists no datasets")
    levels = []
    for item in datasets:
        name = str(item.get("path", ""))
        try:
            levels.append(group[name])
        except (KeyError, ValueError, OSError) as exc:
            raise _fail(
                path,
                f"level {name!r} named in its metadata is missing ({exc})",
                "The store may not have been copied completely.",
            ) from None
    return levels


def read_zarr(path: Path) -> tuple[list[Any], VoxelSize | None, tuple[float, ...], str]:
    """``(levels finest first, voxel size, origin, format)`` of an OME-Zarr image or a
    plain Zarr array; in Angstrom, the voxel size (Z, Y, X), the origin in the array's axis
    order."""
    node = open_zarr(path)
    if hasattr(node, "shape"):  # a plain array: no voxel size recorded
        if node.ndim not in (2, 3):
            raise _fail(path, f"it holds a {node.ndim}D array; tomograms are 3D (z, y, x)")
        levels, voxel, origin, kind = [node], None, (0.0,) * node.ndim, "zarr"
    else:
        entry = _multiscales(node, path)
        levels = _levels(node, entry, path)
        axes = _axes(entry, levels[0].ndim, path)
        voxel, origin = _geometry(entry, axes, path)
        levels = _single_image(levels, axes, path)
        kind = "ome-zarr"
    for level in levels:
        if np.dtype(level.dtype).kind not in "biuf":
            raise _fail(path, f"its data type {level.dtype} is not a number type")
    return levels, voxel, origin, kind
