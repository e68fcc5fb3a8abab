"""Training sets: image and label crops of the boxes, augmented and balanced.

Follows the EMAN2 TomoSeg protocol (Chen et al., Nat. Methods 2017; EMAN2
``e2tomoseg_buildtrainset.py``):

* Every box gives an image crop and a label crop of ``box_size`` pixels on its Z slice.
  Negative boxes get all-background labels, whatever is painted there.
* Each negative box is copied ``ncopy`` times; each positive box
  ``max(1, ncopy * n_neg // n_pos)`` times, so positives balance negatives (``ncopy`` times
  without negatives).
* Every copy is augmented by a random in-plane rotation (any angle) and a random flip.  A
  region of ``ceil(box * sqrt(2))`` plus a spline margin is cut around the box, rotated, and
  the central box taken, so rotated corners hold real image data, not padding.  Near the
  edge of the volume the region is completed by mirror reflection (the box itself always
  lies inside the volume).  Images use cubic-spline interpolation; labels are rotated class
  by class (linear interpolation of each class's indicator, then the most likely class per
  pixel), so classes never blur into new values.
* Multi-class: label values 0..K are the classes (0 = background), K the largest value in
  the positive boxes or ``len(class_names) - 1``.  Label values above K outside the boxes
  count as background.
* Normalisation is chosen once (:class:`~napari_tomoseg.data.preprocess.Normalisation`, per
  tomogram or per box) and recorded in the metadata, so applying the network normalises the
  same way.
* 2.5D input: ``context_slices`` neighbouring slices each side become input channels
  (edge slices repeat at the Z ends); labels are those of the box's own slice.

Painting usually stops at the box edge while the feature goes on, so the rotated corners of
a positive copy may show feature that is labelled background.  With
``outside_box="ignore"`` the unpainted pixels that rotation brings in from outside a positive
box are set to :data:`IGNORE_INDEX` (recorded as ``metadata["ignore_index"]``) for the loss to
skip; the default ``"background"`` treats them as background, as painted.

A training set is saved as one ``.npz`` file (numpy arrays and the metadata as a JSON
string) and loaded without unpickling anything.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

try:  # optional in some Python builds; zipfile then cannot decode LZMA members either
    import lzma
except ImportError:  # pragma: no cover
    lzma = None  # type: ignore[assignment]

from .. import __version__
from ..data.boxes import DEFAULT_BOX_SIZE, Box, validate_boxes
from ..data.io import atomic_path
from ..data.preprocess import Normalisation, robust_stats
from ..data.voxels import VoxelSize, VoxelSizeLike
from ..errors import TomosegError, TomosegIOError

#: Value of ``TrainingSet.metadata["format"]`` and of the file's ``format`` entry.
TRAINSET_FORMAT = "napari-tomoseg-trainset"
#: Version of the file layout; files from newer versions are refused.
TRAINSET_VERSION = 1
#: Extension given to a training-set file saved without one.
TRAINSET_EXTENSION = ".npz"
#: Label of pixels the loss should skip (``outside_box="ignore"``).
IGNORE_INDEX = 255

#: Extra pixels around the rotated box so cubic interpolation never reads past the region.
_SPLINE_MARGIN = 3
_OUTSIDE_BOX_MODES = ("background", "ignore")
_ARRAY_KEYS = ("images", "labels", "box_ids", "positive", "class_names", "metadata")
#: What a damaged zip member raises while it is decoded: an unknown compression method or
#: flag (NotImplementedError), the encryption flag (RuntimeError), a corrupt deflate / LZMA
#: stream, absurd sizes.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    NotImplementedError,
    RuntimeError,
    zlib.error,
    OverflowError,
)
if lzma is not None:
    _DECODE_ERRORS += (lzma.LZMAError,)


@dataclass
class TrainsetSettings:
    """How a training set is built from boxes (shared by widget, command line and core)."""

    box_size: int = DEFAULT_BOX_SIZE
    ncopy: int = 10
    normalisation: str = "tomogram"
    clamp_sigma: float | None = 5.0
    context_slices: int = 2  # as the shipped networks (docs/models.md)
    rotate: bool = True
    flip: bool = True
    seed: int = 0
    outside_box: str = "background"

    def validate(self) -> None:
        """Raise TomosegError for a setting that cannot work."""
        for name, low in (("box_size", 4), ("ncopy", 1), ("context_slices", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TomosegError(f"{name} must be an integer, got {value!r}.")
            if value < low:
                raise TomosegError(f"{name} must be at least {low}, got {value}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise TomosegError(f"seed must be an integer, got {self.seed!r}.")
        self.box_size, self.ncopy = int(self.box_size), int(self.ncopy)
        self.context_slices, self.seed = int(self.context_slices), int(self.seed)
        self.rotate, self.flip = bool(self.rotate), bool(self.flip)
        if self.outside_box not in _OUTSIDE_BOX_MODES:
            raise TomosegError(
                f"outside_box must be one of {_OUTSIDE_BOX_MODES}, got {self.outside_box!r}."
            )
        self.clamp_sigma = self.normalisation_spec().clamp_sigma  # checks mode and clamp

    def normalisation_spec(self) -> Normalisation:
        """The :class:`Normalisation` these settings ask for (window = box size)."""
        return Normalisation(self.normalisation, self.clamp_sigma, int(self.box_size))


def copies_per_box(n_positive: int, n_negative: int, ncopy: int) -> tuple[int, int]:
    """(copies per positive box, copies per negative box): the EMAN2 balance rule."""
    if n_positive <= 0:
        raise TomosegError("No positive boxes: place at least one positive box.")
    if n_negative == 0:
        return ncopy, ncopy
    return max(1, ncopy * n_negative // n_positive), ncopy


@dataclass
class TrainingSet:
    """Augmented samples ready for training, with what is needed to reproduce them.

    ``images`` float32 (N, C, H, W); ``labels`` uint8 (N, H, W) class per pixel (or
    ``metadata["ignore_index"]``); ``box_ids`` int32 (N,) index of the source box (positives
    first, then negatives; split validation by box, not by copy); ``positive`` bool (N,).
    """

    images: np.ndarray
    labels: np.ndarray
    box_ids: np.ndarray
    positive: np.ndarray
    class_names: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.class_names = tuple(str(c) for c in self.class_names)
        images, labels = self.images, self.labels
        if images.ndim != 4 or images.dtype != np.float32:
            raise TomosegError(
                f"Training images must be float32 (N, C, H, W), got {images.dtype} {images.shape}."
            )
        n = images.shape[0]
        if labels.dtype != np.uint8 or labels.shape != (n, *images.shape[2:]):
            raise TomosegError(
                f"Training labels must be uint8 {(n, *images.shape[2:])}, got {labels.dtype} "
                f"{labels.shape}."
            )
        for name, dtype in (("box_ids", np.int32), ("positive", np.bool_)):
            array = getattr(self, name)
            if array.shape != (n,) or array.dtype != dtype:
                raise TomosegError(
                    f"{name} must be {np.dtype(dtype)} of shape ({n},), got {array.dtype} "
                    f"{array.shape}."
                )
        if len(self.class_names) < 2:
            raise TomosegError("A training set needs at least two classes (background + one).")
        if labels.size:
            valid = labels < self.n_classes
            ignore = self.metadata.get("ignore_index")
            if ignore is not None:
                valid |= labels == ignore
            if not valid.all():
                raise TomosegError(
                    f"Labels hold values >= the number of classes ({self.n_classes})."
                )

    # -- facts ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        """Input channels (1, or 2 * context_slices + 1 for 2.5D)."""
        return int(self.images.shape[1])

    @property
    def box_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def normalisation(self) -> Normalisation:
        """How the images were normalised (apply the network's input the same way)."""
        return Normalisation.from_dict(self.metadata["normalisation"])

    @property
    def voxel_size(self) -> VoxelSize | None:
        """The voxel size the samples were cut at (``metadata["voxel_size"]``, stored as
        a list ``[Z, Y, X]``); ``None`` when unknown or not a usable voxel size."""
        return VoxelSize.parse_or_none(self.metadata.get("voxel_size"))

    @property
    def ignore_index(self) -> int | None:
        """Label value the loss should skip, or None."""
        value = self.metadata.get("ignore_index")
        return None if value is None else int(value)

    def class_pixel_counts(self) -> np.ndarray:
        """Pixels of each class over all samples (ignored pixels not counted)."""
        return np.bincount(self.labels.ravel(), minlength=256)[: self.n_classes]

    def summary(self) -> dict[str, Any]:
        """Counts and settings worth showing before training."""
        counts = self.class_pixel_counts()
        total = max(int(counts.sum()), 1)
        return {
            "n_samples": len(self),
            "n_positive_samples": int(self.positive.sum()),
            "n_negative_samples": int((~self.positive).sum()),
            "n_positive_boxes": int(self.metadata.get("n_positive_boxes", 0)),
            "n_negative_boxes": int(self.metadata.get("n_negative_boxes", 0)),
            "box_size": self.box_size,
            "in_channels": self.in_channels,
            "n_classes": self.n_classes,
            "class_names": list(self.class_names),
            "class_fractions": {
                name: float(c) / total for name, c in zip(self.class_names, counts)
            },
            "normalisation": dict(self.metadata.get("normalisation", {})),
            "voxel_size": self.metadata.get("voxel_size"),
        }

    def subset(self, indices: np.ndarray | Sequence[int]) -> TrainingSet:
        """The samples at ``indices`` (or a boolean mask), metadata kept."""
        idx = np.asarray(indices)
        return TrainingSet(
            images=self.images[idx],
            labels=self.labels[idx],
            box_ids=self.box_ids[idx],
            positive=self.positive[idx],
            class_names=self.class_names,
            metadata=json.loads(json.dumps(self.metadata)),
        )

    # -- file -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write one ``.npz`` file atomically (``.npz`` added if the name has no extension).

        Parameters
        ----------
        path
            The file to write.
        overwrite
            Replace an existing file (else :class:`~napari_tomoseg.errors.OutputExistsError`).

        Returns
        -------
        Path
            The file written (with the extension added).
        """
        path = Path(path)
        if not path.suffix:
            path = path.with_suffix(TRAINSET_EXTENSION)
        try:
            meta_text = json.dumps(self.metadata)
        except (TypeError, ValueError) as exc:
            raise TomosegError(f"The training-set metadata is not JSON-able: {exc}") from None
        with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as handle:
            np.savez(
                handle,
                format=np.array(TRAINSET_FORMAT),
                version=np.array(TRAINSET_VERSION, dtype=np.int64),
                images=self.images,
                labels=self.labels,
                box_ids=self.box_ids,
                positive=self.positive,
                class_names=np.array(self.class_names, dtype=str),
                metadata=np.array(meta_text),
            )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainingSet:
        """Read a file written by :meth:`save`; never unpickles.

        Raises :class:`TomosegIOError` for a missing, foreign, corrupt or newer file, and
        for one holding pickled objects.

        Parameters
        ----------
        path
            A ``.npz`` training-set file.
        """
        path = Path(path)
        if not path.is_file():
            raise TomosegIOError(f"Cannot read training set {path}: the file does not exist.")

        def refuse(reason: str) -> TomosegIOError:
            return TomosegIOError(f"Cannot read training set {path}: {reason}.")

        try:
            with open(path, "rb") as handle:
                magic = handle.read(6)
        except OSError as exc:
            raise refuse(f"the file cannot be opened ({exc.strerror or exc})") from None
        if magic.startswith(b"\x93NUMPY"):
            raise refuse("it is a single numpy array, not a napari-tomoseg training set")
        if not magic.startswith(b"PK"):  # numpy would take any other file for a pickle
            if magic[:1] == b"\x80":
                raise refuse(
                    "it holds pickled Python objects, which are never loaded (a training set "
                    "is a .npz archive of plain arrays)"
                )
            raise refuse(
                "it is not a .npz archive (a training set is a .npz file saved by napari-tomoseg)"
            )
        try:
            with np.load(path, allow_pickle=False) as archive:
                if not isinstance(archive, np.lib.npyio.NpzFile):
                    raise refuse("it is a single numpy array, not a napari-tomoseg training set")
                keys = set(archive.files)
                if "format" not in keys or str(archive["format"]) != TRAINSET_FORMAT:
                    raise refuse("it is not a napari-tomoseg training set")
                version = int(archive["version"]) if "version" in keys else -1
                if version > TRAINSET_VERSION:
                    raise refuse(
                        f"it was written by a newer napari-tomoseg (format {version}); update "
                        "napari-tomoseg"
                    )
                missing = [k for k in _ARRAY_KEYS if k not in keys]
                if missing:
                    raise refuse(f"entries {missing} are missing (incomplete file)")
                arrays = {k: archive[k] for k in _ARRAY_KEYS}
                raw = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]
                if raw:  # a zip member without the .npy format: numpy hands back its bytes
                    raise refuse(f"entries {raw} are not numpy arrays (the file was altered)")
        except TomosegIOError:
            raise
        except (ValueError, TypeError) as exc:
            if "pickle" in str(exc).lower():
                raise refuse(
                    "it contains pickled Python objects, which are never loaded (a training "
                    "set holds plain arrays only)"
                ) from None
            raise refuse(f"the file is damaged ({exc})") from None
        except (OSError, EOFError, zipfile.BadZipFile, KeyError, *_DECODE_ERRORS) as exc:
            raise refuse(f"the file is damaged or not a numpy archive ({exc})") from None
        except MemoryError:
            raise refuse(
                "an entry claims to be larger than the memory available; the file is damaged"
            ) from None
        try:
            metadata = json.loads(str(arrays["metadata"]))
        except json.JSONDecodeError as exc:
            raise refuse(f"its metadata is not valid JSON ({exc})") from None
        if not isinstance(metadata, dict):
            raise refuse("its metadata is not a JSON object")
        try:
            return cls(
                images=arrays["images"],
                labels=arrays["labels"],
                box_ids=arrays["box_ids"],
                positive=arrays["positive"],
                class_names=tuple(str(c) for c in np.atleast_1d(arrays["class_names"])),
                metadata=metadata,
            )
        except TomosegError as exc:
            raise refuse(str(exc).rstrip(".")) from None
        except (ValueError, TypeError) as exc:
            raise refuse(f"its arrays or metadata are inconsistent ({exc})") from None


def concatenate(sets: Sequence[TrainingSet], source: str | None = None) -> TrainingSet:
    """One training set holding the samples of ``sets`` (same classes, channels and box
    size), with box numbers kept apart so validation still splits whole boxes.  The
    metadata is the first set's, with the counts summed and the sources listed."""
    if not sets:
        raise TomosegError("No training sets to join.")
    first = sets[0]
    for other in sets[1:]:
        if (
            other.class_names != first.class_names
            or other.images.shape[1:] != first.images.shape[1:]
        ):
            raise TomosegError(
                "Training sets can be joined only when they have the same classes, input "
                f"channels and box size ({first.class_names} {first.images.shape[1:]} vs "
                f"{other.class_names} {other.images.shape[1:]})."
            )
    offsets = np.cumsum([0] + [int(t.box_ids.max()) + 1 if len(t) else 0 for t in sets[:-1]])
    metadata = json.loads(json.dumps(first.metadata))
    for key in ("n_positive_boxes", "n_negative_boxes"):
        metadata[key] = int(sum(int(t.metadata.get(key, 0)) for t in sets))
    for key in ("positive_boxes", "negative_boxes", "benchmark_boxes"):
        metadata.pop(key, None)
    metadata["sources"] = [t.metadata.get("source") for t in sets]
    metadata["source"] = source or f"{len(sets)} joined training sets"
    joined = TrainingSet(
        images=np.concatenate([t.images for t in sets]),
        labels=np.concatenate([t.labels for t in sets]),
        box_ids=np.concatenate([t.box_ids + off for t, off in zip(sets, offsets)]).astype(
            np.int32
        ),
        positive=np.concatenate([t.positive for t in sets]),
        class_names=first.class_names,
        metadata=metadata,
    )
    joined.metadata["class_pixel_counts"] = [int(c) for c in joined.class_pixel_counts()]
    return joined


# -- building ---------------------------------------------------------------------------------
def _default_class_names(n_classes: int) -> tuple[str, ...]:
    if n_classes == 2:
        return ("background", "feature")
    return ("background", *(f"feature {k}" for k in range(1, n_classes)))


def _region(
    volume: np.ndarray, box: Box, side: int, context: int, dtype: type = np.float64
) -> np.ndarray:
    """(C, side, side) region centred on the box; mirror-reflected past the volume edge."""
    nz, ny, nx = volume.shape
    pad = (side - box.size) // 2
    y0, x0 = box.y0 - pad, box.x0 - pad
    y1, x1 = y0 + side, x0 + side
    cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, ny), min(x1, nx)
    zs = np.clip(np.arange(box.z - context, box.z + context + 1), 0, nz - 1)
    inner = np.stack([np.asarray(volume[int(z), cy0:cy1, cx0:cx1], dtype=dtype) for z in zs])
    widths = ((0, 0), (cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1))
    if any(w for pair in widths for w in pair):
        inner = np.pad(inner, widths, mode="reflect")
    return inner


def _sample_grid(size: int, side: int, angle: float, flip: bool) -> np.ndarray:
    """(2, size, size) source coordinates in a region of ``side``: rotate, then flip X."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    u, v = np.meshgrid(offsets, offsets, indexing="ij")
    if flip:
        v = -v
    c, s = math.cos(angle), math.sin(angle)
    centre = (side - 1) / 2.0
    return np.stack([centre + c * u - s * v, centre + s * u + c * v])


def _check_labels(labels: np.ndarray) -> None:
    if labels.dtype.kind not in "biuf":
        raise TomosegError(f"Labels must be integers; got dtype {labels.dtype}.")


def _as_classes(values: np.ndarray, where: str) -> np.ndarray:
    """Integer label values checked to be whole and non-negative."""
    if values.dtype.kind == "f" and not (
        np.all(np.isfinite(values)) and np.all(values == np.round(values))
    ):
        raise TomosegError(f"Labels in {where} are not whole numbers; paint integer labels.")
    if values.size and values.min() < 0:
        raise TomosegError(f"Labels in {where} are negative; labels are 0 (background) or more.")
    return values.astype(np.int64)


def _check_inputs(
    volume: np.ndarray, labels: np.ndarray, positive: list, negative: list, size: int
) -> tuple[int, ...]:
    """Refuse a tomogram, painting or boxes that cannot make a training set; the shape."""
    volume_shape = tuple(int(s) for s in volume.shape)
    if volume.ndim != 3:
        raise TomosegError(f"The tomogram must be 3D (Z, Y, X); got shape {volume_shape}.")
    if np.dtype(volume.dtype).kind not in "biuf":
        raise TomosegError(
            f"The tomogram must hold real numbers; got dtype {volume.dtype}. Convert it "
            "(e.g. to float32) first."
        )
    if tuple(labels.shape) != volume_shape:
        raise TomosegError(
            f"The labels (shape {tuple(labels.shape)}) do not match the tomogram (shape "
            f"{volume_shape}); paint in a Labels layer made for this tomogram."
        )
    _check_labels(labels)
    validate_boxes(positive, volume_shape, kind="positive")
    validate_boxes(negative, volume_shape, kind="negative")
    for kind, boxes in (("Positive", positive), ("Negative", negative)):
        for i, box in enumerate(boxes):
            if box.size != size:
                raise TomosegError(
                    f"{kind} box {i + 1} at {box.describe()} is {box.size} px, but the training "
                    f"box size is {size} px; redraw the boxes or change the box size."
                )
    return volume_shape


def _classes(
    labels: np.ndarray,
    positive: list,
    class_names: Sequence[str] | None,
    ignore: int | None,
) -> tuple[str, ...]:
    """The class names: as given (they must name every painted value), else one per label
    value 0..K painted in the positive boxes.  Every positive box must hold paint."""
    top = 0
    for i, box in enumerate(positive):
        painted = _as_classes(np.asarray(labels[box.slices()]), f"positive box {i + 1}")
        if not painted.any():
            raise TomosegError(
                f"Positive box {i + 1} at {box.describe()} has no painted voxels; paint the "
                "feature inside it or remove the box."
            )
        top = max(top, int(painted.max()))
    if class_names is not None:
        names = tuple(str(c) for c in class_names)
        if len(names) < 2:
            raise TomosegError("Give at least two class names: background and a feature.")
        if top > len(names) - 1:
            raise TomosegError(
                f"The positive boxes hold label {top}, but only {len(names)} classes "
                f"are named ({', '.join(names)}); name every label value."
            )
    else:
        names = tuple(_default_class_names(top + 1))
    limit = IGNORE_INDEX if ignore is not None else 256
    if len(names) > limit:
        raise TomosegError(f"{len(names)} classes are too many; at most {limit} are supported.")
    return names


def _class_maps(
    lab: np.ndarray, n_classes: int, box_mask: np.ndarray, ignore: int | None
) -> list[tuple[int, np.ndarray]]:
    """One indicator map per class painted in a box's region (to be rotated with the
    image); with ``ignore``, unpainted voxels outside the box become their own map."""
    lab[lab >= n_classes] = 0
    unknown = (lab == 0) & ~box_mask if ignore is not None else None
    maps: list[tuple[int, np.ndarray]] = []
    for value in np.unique(lab):
        member = lab == value
        if unknown is not None and value == 0:
            member &= ~unknown
        maps.append((int(value), member.astype(np.float64)))
    if unknown is not None and unknown.any():
        maps.append((ignore, unknown.astype(np.float64)))
    return maps


def _trainset_metadata(
    settings: TrainsetSettings,
    positive: list,
    negative: list,
    copies: tuple[int, int],
    stats: tuple[float, float] | None,
    class_names: tuple[str, ...],
    ignore: int | None,
    voxel_size: VoxelSizeLike | None,
    source: str | None,
    volume_shape: tuple[int, ...],
) -> dict[str, Any]:
    """What a training set records about how it was made."""
    vs = VoxelSize.parse(voxel_size)
    return {
        "format": TRAINSET_FORMAT,
        "version": TRAINSET_VERSION,
        "created_with": f"napari-tomoseg {__version__}",
        "settings": asdict(settings),
        "box_size": int(settings.box_size),
        "ncopy": int(settings.ncopy),
        "copies_per_positive": copies[0],
        "copies_per_negative": copies[1],
        "normalisation": settings.normalisation_spec().to_dict(),
        "tomogram_stats": None if stats is None else {"mean": stats[0], "std": stats[1]},
        "context_slices": int(settings.context_slices),
        "voxel_size": None if vs is None else list(vs),
        "n_positive_boxes": len(positive),
        "n_negative_boxes": len(negative),
        "positive_boxes": [b.as_list() for b in positive],
        "negative_boxes": [b.as_list() for b in negative],
        "seed": int(settings.seed),
        "source": source,
        "class_names": list(class_names),
        "ignore_index": ignore,
        "augmentation": {
            "rotate": bool(settings.rotate),
            "flip": bool(settings.flip),
            "image_interpolation": "cubic spline",
            "label_interpolation": "per-class linear, most likely class",
            "edge": "mirror reflection",
        },
        "volume_shape": list(volume_shape),
    }


def build_training_set(
    volume: np.ndarray,
    labels: np.ndarray,
    positive: Sequence[Box],
    negative: Sequence[Box],
    settings: TrainsetSettings | None = None,
    *,
    class_names: Sequence[str] | None = None,
    voxel_size: VoxelSizeLike | None = None,
    source: str | None = None,
) -> TrainingSet:
    """Cut, augment and balance the boxes of one tomogram into a :class:`TrainingSet`.

    ``volume`` and ``labels`` may be memory maps: only the regions around the boxes are
    read.  Without ``class_names`` the label values 0..K of the positive boxes are the
    classes.

    Parameters
    ----------
    volume
        The (Z, Y, X) tomogram.
    labels
        The painted (Z, Y, X) integer labels, same shape; read only around positive boxes.
    positive
        Boxes holding painted feature; at least one.
    negative
        Boxes without the feature (all background); may be empty.
    settings
        Box size, copies, augmentation, normalisation (:class:`TrainsetSettings`; the
        defaults when None).
    class_names
        The class names, background first; None: from the label values of the positives.
    voxel_size
        The tomogram's (Z, Y, X) or one value in Angstrom, recorded; None for unknown.
    source
        Where the data came from (e.g. the tomogram's path), recorded.
    """
    settings = settings or TrainsetSettings()
    settings.validate()
    positive, negative = list(positive), list(negative)
    size = int(settings.box_size)
    volume_shape = _check_inputs(volume, labels, positive, negative, size)
    ignore = IGNORE_INDEX if settings.outside_box == "ignore" else None
    class_names = _classes(labels, positive, class_names, ignore)
    n_classes = len(class_names)

    norm = settings.normalisation_spec()
    stats = robust_stats(volume) if norm.mode == "tomogram" else None
    context = int(settings.context_slices)
    n_pos, n_neg = len(positive), len(negative)
    copies_pos, copies_neg = copies_per_box(n_pos, n_neg, int(settings.ncopy))
    total = n_pos * copies_pos + n_neg * copies_neg

    images = np.empty((total, 2 * context + 1, size, size), dtype=np.float32)
    out_labels = np.zeros((total, size, size), dtype=np.uint8)
    box_ids = np.empty(total, dtype=np.int32)
    is_positive = np.zeros(total, dtype=bool)

    grow = int(math.ceil(size * (math.sqrt(2.0) - 1.0) / 2.0)) + _SPLINE_MARGIN
    side = size + 2 * grow
    rng = np.random.default_rng(int(settings.seed))
    box_mask = np.zeros((side, side), dtype=bool)
    box_mask[grow : grow + size, grow : grow + size] = True

    k = 0
    for index, box in enumerate(positive + negative):
        is_pos = index < n_pos
        kind = "Positive" if is_pos else "Negative"
        number = index + 1 if is_pos else index - n_pos + 1
        region = _region(volume, box, side, context)
        if not np.all(np.isfinite(region)):
            raise TomosegError(
                f"{kind} box {number} at {box.describe()} has NaN or Inf values in or near it; "
                "check the tomogram (or its filters) or move the box."
            )
        if stats is not None:
            region = norm.apply_with_stats(region, *stats).astype(np.float64)
        coeffs = [ndimage.spline_filter(plane, order=3, mode="mirror") for plane in region]
        class_maps: list[tuple[int, np.ndarray]] = []
        if is_pos:
            lab = _as_classes(_region(labels, box, side, 0, np.int64)[0], f"{kind} box {number}")
            class_maps = _class_maps(lab, n_classes, box_mask, ignore)
        for _ in range(copies_pos if is_pos else copies_neg):
            angle = rng.uniform(0.0, 2.0 * math.pi) if settings.rotate else 0.0
            flip = bool(rng.random() < 0.5) if settings.flip else False
            grid = _sample_grid(size, side, angle, flip)
            for c, coeff in enumerate(coeffs):
                images[k, c] = ndimage.map_coordinates(
                    coeff, grid, order=3, mode="mirror", prefilter=False
                )
            if stats is None:
                images[k] = norm.apply_to_patch(images[k])
            elif norm.clamp_sigma is not None:
                np.clip(images[k], -norm.clamp_sigma, norm.clamp_sigma, out=images[k])
            if class_maps:
                out_labels[k] = _rotate_classes(class_maps, grid)
            box_ids[k] = index
            is_positive[k] = is_pos
            k += 1

    metadata = _trainset_metadata(
        settings,
        positive,
        negative,
        (copies_pos, copies_neg),
        stats,
        class_names,
        ignore,
        voxel_size,
        source,
        volume_shape,
    )
    result = TrainingSet(images, out_labels, box_ids, is_positive, class_names, metadata)
    result.metadata["class_pixel_counts"] = [int(c) for c in result.class_pixel_counts()]
    return result


def _rotate_classes(class_maps: list[tuple[int, np.ndarray]], grid: np.ndarray) -> np.ndarray:
    """Resample each class indicator linearly at ``grid``; each pixel takes the largest."""
    if len(class_maps) == 1:
        return np.full(grid.shape[1:], class_maps[0][0], dtype=np.uint8)
    weights = np.stack(
        [ndimage.map_coordinates(m, grid, order=1, mode="nearest") for _, m in class_maps]
    )
    values = np.array([v for v, _ in class_maps], dtype=np.uint8)
    return values[np.argmax(weights, axis=0)]
