"""Save and restore a user's annotations: the painting and the boxes of one tomogram.

An annotation folder holds ``painting.mrc`` (labels, with the voxel size),
``positive_boxes.csv`` and ``negative_boxes.csv`` (box centres in voxels, see
:func:`napari_tomoseg.data.boxes.write_boxes_csv`) and ``annotations.json`` (feature names, box
size, the tomogram's shape and source).  The files are written together, all or nothing
(:func:`napari_tomoseg.data.io.atomic_paths`), so an interrupted save leaves the previous
annotations intact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TomosegError, TomosegIOError
from .boxes import DEFAULT_BOX_SIZE, Box, read_boxes_csv, write_boxes_csv
from .io import atomic_paths, read_tomogram, write_labels
from .voxels import VoxelSize

PAINTING_FILE = "painting.mrc"
POSITIVE_FILE = "positive_boxes.csv"
NEGATIVE_FILE = "negative_boxes.csv"
INFO_FILE = "annotations.json"
FORMAT = "napari-tomoseg annotations"


@dataclass
class Annotations:
    """A painting (Z, Y, X labels) with its boxes and feature names; ``voxel_size`` as
    :meth:`VoxelSize.parse` reads it (one value or (Z, Y, X) Angstrom, or ``None``)."""

    painting: np.ndarray
    positives: list[Box] = field(default_factory=list)
    negatives: list[Box] = field(default_factory=list)
    class_names: dict[int, str] = field(default_factory=lambda: {0: "background"})
    box_size: int = DEFAULT_BOX_SIZE
    voxel_size: VoxelSize | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        self.voxel_size = VoxelSize.parse(self.voxel_size)


def save_annotations(
    folder: str | os.PathLike,
    annotations: Annotations,
    *,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``annotations`` into ``folder`` (created if needed).

    Annotations already in the folder (or any file of the same names) are replaced only
    with ``overwrite=True``, and never those of a tomogram of another shape.  The four files
    are written to temporaries first and renamed together at the end
    (:func:`napari_tomoseg.data.io.atomic_paths`), so a failed save (a full disk, an error)
    leaves the previous annotations as they were.  ``extra`` entries are stored in
    ``annotations.json`` beside the standard ones (e.g. when an autosave was made), read
    back with :func:`read_annotations_info`.
    """
    folder = Path(folder)
    if getattr(annotations.painting, "ndim", None) != 3:
        raise TomosegError(
            "The painting must be a 3D (Z, Y, X) labels array of the tomogram's shape, got "
            f"shape {getattr(annotations.painting, 'shape', None)}."
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TomosegIOError(
            f"Cannot save annotations in {folder}: {exc.strerror or exc}."
        ) from None
    info_path = folder / INFO_FILE
    shape = [int(s) for s in annotations.painting.shape]
    if info_path.exists():
        previous = _read_info(info_path)
        if previous.get("shape") != shape:
            raise TomosegError(
                f"{folder} holds annotations of a tomogram of shape {previous.get('shape')}, "
                f"not {shape}; choose another folder."
            )
        if not overwrite:
            raise TomosegError(
                f"{folder} already holds annotations; allow overwriting to replace them."
            )
    names = (PAINTING_FILE, POSITIVE_FILE, NEGATIVE_FILE, INFO_FILE)
    present = [n for n in names if (folder / n).exists()]
    if present and not overwrite:
        raise TomosegError(
            f"{folder} already has {', '.join(present)}; choose another folder or allow "
            "overwriting."
        )
    info = {
        "format": FORMAT,
        "version": 1,
        "shape": shape,
        "box_size": int(annotations.box_size),
        "class_names": {str(k): str(v) for k, v in annotations.class_names.items()},
        "voxel_size": None if annotations.voxel_size is None else list(annotations.voxel_size),
        "source": annotations.source,
    }
    info.update({k: v for k, v in (extra or {}).items() if k not in info})
    # info last: it is renamed last, so it only ever describes files already in place
    with atomic_paths([folder / n for n in names], overwrite=True) as tmps:
        painting, positives, negatives, info_tmp = tmps
        write_labels(painting, annotations.painting, annotations.voxel_size, overwrite=True)
        write_boxes_csv(positives, annotations.positives, overwrite=True)
        write_boxes_csv(negatives, annotations.negatives, overwrite=True)
        info_tmp.write_text(json.dumps(info, indent=1))
    return folder


def read_annotations_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The contents of a saved annotations folder's ``annotations.json`` (checked to be one)."""
    return _read_info(Path(folder) / INFO_FILE)


def _read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TomosegError(f"Cannot read {path}: {exc}.") from None
    if not isinstance(info, Mapping) or info.get("format") != FORMAT:
        raise TomosegError(f"{path} is not a napari-tomoseg annotations file.")
    return dict(info)


def _checked_info(info: dict[str, Any], path: Path) -> tuple[list[int], int, dict[int, str]]:
    """Shape, box size and class names of an annotations file, checked to be usable."""
    shape = info.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise TomosegError(f"{path} is damaged: 'shape' must be three positive integers.")
    box_size = info.get("box_size", DEFAULT_BOX_SIZE)
    if isinstance(box_size, bool) or not isinstance(box_size, int) or box_size < 2:
        raise TomosegError(f"{path} is damaged: 'box_size' must be an integer of at least 2.")
    raw_names = info.get("class_names") or {}
    if not isinstance(raw_names, Mapping):
        raise TomosegError(f"{path} is damaged: 'class_names' must map labels to names.")
    try:
        names = {int(k): str(v) for k, v in raw_names.items()}
    except (TypeError, ValueError):
        raise TomosegError(f"{path} is damaged: class labels must be integers.") from None
    return [int(n) for n in shape], int(box_size), names


def load_annotations(
    folder: str | os.PathLike, expected_shape: Sequence[int] | None = None
) -> Annotations:
    """Read annotations saved by :func:`save_annotations` (checks the tomogram's shape)."""
    folder = Path(folder)
    info_path = folder / INFO_FILE
    if not info_path.is_file():
        raise TomosegError(
            f"{folder} holds no saved annotations ({INFO_FILE} is missing); choose the folder "
            "the annotations were saved in."
        )
    info = _read_info(info_path)
    shape, box_size, names = _checked_info(info, info_path)
    if expected_shape is not None and shape != [int(s) for s in expected_shape]:
        raise TomosegError(
            f"The annotations in {folder} belong to a tomogram of shape {shape}, not "
            f"{list(expected_shape)}; open the matching tomogram."
        )
    painting = read_tomogram(folder / PAINTING_FILE)
    if list(painting.data.shape) != shape:
        raise TomosegError(f"{folder / PAINTING_FILE} does not match {INFO_FILE}.")
    return Annotations(
        painting=np.array(painting.data),
        positives=read_boxes_csv(folder / POSITIVE_FILE, box_size),
        negatives=read_boxes_csv(folder / NEGATIVE_FILE, box_size),
        class_names=names or {0: "background"},
        box_size=box_size,
        voxel_size=painting.voxel_size,
        source=info.get("source"),
    )
