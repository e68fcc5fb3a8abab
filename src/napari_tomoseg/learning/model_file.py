"""The network file: trained weights plus everything needed to apply them correctly.

File name extension: **``.tsnet``** (any name is accepted; ``.tsnet`` is the convention the
widgets and the command line use).

Format (version 1).  A ``.tsnet`` file is a zip archive of ``.npy`` members, as
:func:`numpy.savez` writes (and :func:`numpy.load` reads), holding only plain arrays; the
weights are stored uncompressed (they hardly compress, and load faster), the metadata is
deflated (a JSON text in 4-byte characters, with one history entry per mini-batch, shrinks
about tenfold):

- ``__meta__``: a 0-d unicode array, a JSON object with ``"format": "napari-tomoseg-network"``
  and ``"format_version": 1`` plus the :class:`NetworkMeta` fields (architecture and its
  parameters, input channels, classes with names and colours, voxel size in Angstrom
  (``[Z, Y, X]``; files written before it was a triple hold one number, read as cubic
  voxels), box size, the normalisation that was applied to the training images, context
  slices, a summary of the training set, the loss and metric history, the metrics of the
  saved weights, package versions and the creation time);
- ``state:<name>`` for every tensor of the model's ``state_dict``: a numeric array.

Loading never executes code from the file: there is no pickle anywhere.  Arrays are read
with ``numpy.load(allow_pickle=False)``, so an object array (whose unpickling could run
code) is refused before it is decoded; the JSON is parsed as data and validated (types,
ranges, a known architecture) before use; the architecture is built from the registry and
every tensor must match its name, shape and a numeric dtype, and be finite.  Anything else
(not a zip, a missing magic, another format version, extra or missing tensors, NaN weights)
is refused with a :class:`~napari_tomoseg.errors.TomosegError` that says why.

Files are written atomically (a crash never leaves half a file) and an existing file is
replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import zipfile
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from ..colours import default_class_colors
from ..data.io import atomic_path
from ..data.voxels import VoxelSize
from ..errors import TomosegError, TomosegIOError
from .models import MODELS, available, build_model, get_spec, predict_proba, resolved_params

#: The conventional file name extension of a network file.
NETWORK_EXTENSION = ".tsnet"
#: Value of the ``format`` key that marks a napari-tomoseg network file.
FORMAT_MAGIC = "napari-tomoseg-network"
#: The format version this module writes and reads.
FORMAT_VERSION = 1

_META_KEY = "__meta__"
_STATE_PREFIX = "state:"
_MAX_META_CHARS = 64 * 1024 * 1024
#: Largest network a file may ask for (parameters); far beyond any architecture here.
_MAX_PARAMETERS = 500_000_000
#: What reading a damaged or hostile zip member can raise (zipfile, zlib, numpy).
_READ_ERRORS = (
    OSError,
    zipfile.BadZipFile,
    EOFError,
    KeyError,
    NotImplementedError,
    RuntimeError,
    zlib.error,
    OverflowError,
    MemoryError,
)
_MAX_CLASSES = 65535
_MAX_IN_CHANNELS = 1024


def default_class_names(n_classes: int) -> tuple[str, ...]:
    """``("background", "feature 1", ...)`` for unnamed classes."""
    return ("background", *(f"feature {i}" for i in range(1, n_classes)))


def package_versions() -> dict[str, str]:
    """Versions of the software that made a network (recorded in the file)."""
    from .. import __version__

    return {
        "napari_tomoseg": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: numpy scalars/arrays and tuples converted, non-finite
    floats as ``None``, mapping keys as strings, anything else as its ``str``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


@dataclass(frozen=True)
class SafeFileKind:
    """What a safely read archive is, for the messages that refuse one: ``noun`` names it
    ("network"), ``extension`` is its file name extension, ``advice`` says what to do with
    a file that is not one and ``damaged_advice`` what to do with one that cannot be read."""

    noun: str
    extension: str
    advice: str
    damaged_advice: str = ""


NETWORK_FILE = SafeFileKind(
    "network",
    NETWORK_EXTENSION,
    f"Choose a file saved by napari-tomoseg (extension {NETWORK_EXTENSION}).",
)


def _refuse(
    path: Path | str, problem: str, advice: str = "", kind: SafeFileKind = NETWORK_FILE
) -> TomosegError:
    text = f"Cannot load {kind.noun} {path}: {problem}."
    if advice:
        text += f" {advice}"
    return TomosegError(text)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class NetworkMeta:
    """What a network needs to be rebuilt and applied correctly, and how it was made.

    ``voxel_size`` is the training images' :class:`~napari_tomoseg.data.voxels.VoxelSize`
    (Z, Y, X in Angstrom; one number given here means cubic voxels; ``None`` if unknown);
    ``normalisation`` describes how the training images were normalised (apply the same to
    new tomograms); ``context_slices`` is the number of neighbouring Z slices on each side
    that were stacked as input channels.  ``threshold`` is the probability at which the
    network's mask is cut, chosen on its held-out boxes (``None``: 0.5).  ``planes`` is how
    many slice planes apply uses by default (1: XY; 3: XY, XZ and YZ averaged, see
    :class:`~napari_tomoseg.applying.inference.ApplySettings`), and
    ``threshold_three_planes`` the threshold for three planes (``None``: 0.5).
    """

    architecture: str
    model_params: dict[str, Any]
    in_channels: int
    n_classes: int
    class_names: tuple[str, ...] = ()
    class_colors: tuple[tuple[float, ...], ...] = ()
    voxel_size: VoxelSize | None = None
    box_size: int | None = None
    normalisation: dict[str, Any] = field(default_factory=dict)
    context_slices: int = 0
    threshold: float | None = None
    planes: int = 1
    threshold_three_planes: float | None = None
    trainset_summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=package_versions)
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )

    def __post_init__(self) -> None:
        if not self.class_names and _is_int(self.n_classes) and self.n_classes >= 2:
            self.class_names = default_class_names(self.n_classes)
        if not self.class_colors and _is_int(self.n_classes) and self.n_classes >= 2:
            self.class_colors = default_class_colors(self.n_classes)
        self.class_names = tuple(self.class_names)
        self.class_colors = tuple(tuple(float(c) for c in rgba) for rgba in self.class_colors)
        self.voxel_size = VoxelSize.parse(self.voxel_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (what the file stores).  The voxel size of cubic voxels is
        one number, which every version reads; other voxels are ``[Z, Y, X]``."""
        data = {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}
        vs = self.voxel_size
        if vs is not None and vs.z == vs.y == vs.x:
            data["voxel_size"] = float(vs.x)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> NetworkMeta:
        """Validate metadata read from a file and build a :class:`NetworkMeta`.

        The fields' types and ranges are :class:`_MetaSchema`'s (pydantic, strict: no
        coercion); what depends on several fields or on the registry is checked here.
        Raises :class:`TomosegError` naming the first field that is missing or invalid.
        """
        if not isinstance(data, dict):
            raise TomosegError("Network metadata must be a JSON object.")
        arch = data.get("architecture")
        if "architecture" in data and (not isinstance(arch, str) or arch not in MODELS):
            raise TomosegError(
                f"The network uses architecture {arch!r}, which this version of napari-tomoseg "
                f"does not know (available: {', '.join(available())}); update napari-tomoseg."
            )
        try:
            meta = _MetaSchema.model_validate(data)
        except ValidationError as exc:
            raise _metadata_error(exc, data) from None
        params = resolved_params(meta.architecture, meta.model_params)
        n_cls = meta.n_classes

        def bad(key: str, what: str) -> TomosegError:
            return TomosegError(
                f"Network metadata field {key!r} is invalid: {what} (got {data.get(key)!r})."
            )

        if n_cls > 2 and not get_spec(meta.architecture).supports_multiclass:
            raise bad("n_classes", f"architecture {meta.architecture!r} is binary only")
        if len(meta.class_names) != n_cls or len(set(meta.class_names)) != n_cls:
            raise bad("class_names", _META_RULES["class_names"].format(n=n_cls))
        if meta.planes not in (1, 3):
            raise bad("planes", _META_RULES["planes"])
        colours = meta.class_colors or []
        if colours and len(colours) != n_cls:
            raise bad("class_colors", _META_RULES["class_colors"].format(n=n_cls))
        return cls(
            architecture=meta.architecture,
            model_params=params,
            in_channels=meta.in_channels,
            n_classes=n_cls,
            class_names=tuple(meta.class_names),
            class_colors=tuple(tuple(c) for c in colours),
            voxel_size=VoxelSize.parse(meta.voxel_size),
            box_size=meta.box_size,
            normalisation=meta.normalisation,
            context_slices=meta.context_slices,
            threshold=meta.threshold,
            planes=meta.planes,
            threshold_three_planes=meta.threshold_three_planes,
            trainset_summary=meta.trainset_summary,
            history=meta.history,
            metrics=meta.metrics,
            versions=meta.versions,
            created=meta.created,
        )


_Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class _MetaSchema(BaseModel):
    """The types and ranges of a network file's metadata (strict: JSON as it was written)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    format: Any = None  # both checked before, where the file is opened
    format_version: Any = None
    architecture: str
    model_params: dict[str, Any]
    in_channels: Annotated[int, Field(ge=1, le=_MAX_IN_CHANNELS)]
    n_classes: Annotated[int, Field(ge=2, le=_MAX_CLASSES)]
    class_names: list[Annotated[str, Field(min_length=1)]]
    class_colors: list[Annotated[list[_Fraction], Field(min_length=3, max_length=4)]] | None = None
    # one number in files of cubic voxels (and all written before the triple)
    voxel_size: (
        _Positive | Annotated[list[_Positive], Field(min_length=3, max_length=3)] | None
    ) = None
    box_size: Annotated[int, Field(ge=1)] | None = None
    normalisation: dict[str, Any] = {}
    context_slices: Annotated[int, Field(ge=0)] = 0
    threshold: Annotated[float, Field(gt=0, lt=1)] | None = None
    planes: Annotated[int, Field(ge=1, le=3)] = 1  # 1 or 3, checked in from_dict
    threshold_three_planes: Annotated[float, Field(gt=0, lt=1)] | None = None
    trainset_summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    versions: dict[str, Any] = {}
    created: str = ""


#: What each metadata field must be, in the words of the error messages.
_META_RULES = {
    "model_params": "must be an object",
    "in_channels": f"must be an integer from 1 to {_MAX_IN_CHANNELS}",
    "n_classes": f"must be an integer from 2 to {_MAX_CLASSES}",
    "class_names": "must be {n} distinct non-empty strings",
    "class_colors": "must be {n} RGB(A) lists of numbers in [0, 1]",
    "voxel_size": "must be a positive number of Angstrom, a list of three (Z, Y, X), or null",
    "box_size": "must be a positive integer or null",
    "context_slices": "must be a non-negative integer",
    "threshold": "must be a probability between 0 and 1, or null",
    "planes": "must be 1 (XY slices) or 3 (XY, XZ and YZ slices)",
    "threshold_three_planes": "must be a probability between 0 and 1, or null",
    "history": "must be a list of objects",
    "created": "must be a string",
}


def _metadata_error(exc: ValidationError, data: dict[str, Any]) -> TomosegError:
    """The first problem pydantic found, as this project words it: missing fields first,
    then invalid ones in the schema's order, then unknown ones."""
    errors = exc.errors()
    missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing"]
    if missing:
        return TomosegError(f"Network metadata lacks the field {missing[0]!r}.")
    invalid = [e for e in errors if e["type"] != "extra_forbidden"]
    if invalid:
        key = str(invalid[0]["loc"][0])
        n = data.get("n_classes", "N")
        what = _META_RULES.get(key, "must be an object").format(n=n)
        return TomosegError(
            f"Network metadata field {key!r} is invalid: {what} (got {data.get(key)!r})."
        )
    unknown = sorted(str(e["loc"][0]) for e in errors)
    return TomosegError(
        f"Network metadata has unknown field(s) {', '.join(unknown)}; the file was "
        "made by another version of napari-tomoseg."
    )


@dataclass
class Network:
    """A trained (or new) model together with its :class:`NetworkMeta`."""

    model: nn.Module
    meta: NetworkMeta

    @classmethod
    def create(
        cls,
        architecture: str,
        in_channels: int,
        n_classes: int,
        *,
        model_params: dict[str, Any] | None = None,
        **meta_fields: Any,
    ) -> Network:
        """Build a freshly initialised network and its metadata (other fields by keyword)."""
        params = resolved_params(architecture, model_params)
        model = build_model(architecture, in_channels, n_classes, **params)
        meta = NetworkMeta(
            architecture=architecture,
            model_params=params,
            in_channels=in_channels,
            n_classes=n_classes,
            **meta_fields,
        )
        return cls(model=model, meta=meta)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def to(self, device: str | torch.device) -> Network:
        """Move the model to ``device`` (in place) and return ``self``."""
        self.model.to(device)
        return self

    def predict_proba(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Class probabilities for normalised input ``(C, H, W)`` or ``(B, C, H, W)``.

        Returns ``(n_classes, H, W)`` or ``(B, n_classes, H, W)``: a float32 numpy array
        for numpy input, a tensor (on the model's device) for tensor input.  The input must
        already be normalised as ``meta.normalisation`` describes.
        """
        as_numpy = not isinstance(x, torch.Tensor)
        t = torch.as_tensor(np.asarray(x, dtype=np.float32)) if as_numpy else x
        single = t.ndim == 3
        if single:
            t = t.unsqueeze(0)
        if t.ndim != 4 or t.shape[1] != self.meta.in_channels:
            raise TomosegError(
                f"The network expects input (B, {self.meta.in_channels}, H, W) or "
                f"({self.meta.in_channels}, H, W); got shape {tuple(x.shape)}."
            )
        proba = predict_proba(self.model, t.to(self.device, dtype=torch.float32))
        if single:
            proba = proba[0]
        return proba.cpu().numpy() if as_numpy else proba


def save_network(
    network: Network, path: str | os.PathLike, *, overwrite: bool = False, half: bool = False
) -> Path:
    """Write ``network`` to ``path`` (a ``.tsnet`` file) atomically; returns the path.

    Weights that are not finite are refused: such a network is broken and would only
    produce NaN.

    Parameters
    ----------
    network
        The network (model and :class:`NetworkMeta`); its metadata is validated first.
    path
        The file to write (no extension is added).
    overwrite
        Replace an existing file (else :class:`~napari_tomoseg.errors.OutputExistsError`).
    half
        Store the floating-point weights as float16 (half the size, for the networks shipped
        with the package); they are loaded back as float32.
    """
    path = Path(path)
    meta = network.meta.to_dict()
    # validate what we write with the same rules as what we read
    NetworkMeta.from_dict(meta)
    payload = {"format": FORMAT_MAGIC, "format_version": FORMAT_VERSION, **meta}
    arrays: dict[str, np.ndarray] = {_META_KEY: np.array(json.dumps(payload, allow_nan=False))}
    for name, tensor in network.model.state_dict().items():
        array = tensor.detach().cpu().numpy()
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise TomosegError(
                f"Cannot save the network: weight {name!r} is not finite (training diverged); "
                "train again with a smaller learning rate."
            )
        if half and array.dtype.kind == "f":
            array = array.astype(np.float16)
            if not np.all(np.isfinite(array)):
                raise TomosegError(f"Weight {name!r} is too large for float16; save without half.")
        arrays[_STATE_PREFIX + name] = array.copy(order="C")
    with atomic_path(path, overwrite=overwrite) as tmp:
        _write_archive(tmp, arrays)
    return path


def _write_archive(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as a zip of ``.npy`` members (what :func:`numpy.load` reads), the
    metadata deflated and the weights stored; fixed member dates, so the same network
    gives the same bytes."""
    with zipfile.ZipFile(path, "w", allowZip64=True) as archive:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED if key == _META_KEY else zipfile.ZIP_STORED
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def read_network_meta(path: str | os.PathLike) -> NetworkMeta:
    """Read and validate only the metadata of a network file (cheap; no weights).

    Parameters
    ----------
    path
        A network file (``.tsnet``).
    """
    path = Path(path)
    with _open_npz(path) as npz:
        return _read_meta(path, npz)


def load_network(path: str | os.PathLike, device: str | torch.device = "cpu") -> Network:
    """Load a network file safely (no code from the file runs) onto ``device``.

    The model is returned in evaluation mode.  Refuses, with a :class:`TomosegError`, any
    file that is not a valid napari-tomoseg network file of a supported version.

    Parameters
    ----------
    path
        A network file (``.tsnet``).
    device
        A torch device or its name (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).
    """
    path = Path(path)
    with _open_npz(path) as npz:
        meta = _read_meta(path, npz)
        # Build on the "meta" device first: sizes are checked before anything is allocated,
        # so a file cannot make the loader take unbounded memory.
        skeleton = _build(path, meta, torch.device("meta"))
        n_params = sum(p.numel() for p in skeleton.parameters())
        if n_params > _MAX_PARAMETERS:
            raise _refuse(path, f"its metadata asks for a network of {n_params} parameters")
        for name, reference in skeleton.state_dict().items():
            key = _STATE_PREFIX + name
            if key in npz.files:
                shape = _entry_shape(path, npz, key)
                if shape != tuple(reference.shape):
                    raise _refuse(
                        path,
                        f"tensor {name!r} has shape {shape}, but architecture "
                        f"{meta.architecture!r} needs {tuple(reference.shape)}",
                        "The file is damaged or was altered.",
                    )
        model = _build(path, meta, torch.device("cpu"))
        expected = model.state_dict()
        present = {k[len(_STATE_PREFIX) :] for k in npz.files if k.startswith(_STATE_PREFIX)}
        others = sorted(k for k in npz.files if k != _META_KEY and not k.startswith(_STATE_PREFIX))
        missing = sorted(set(expected) - present)
        extra = sorted(present - set(expected))
        if others or missing or extra:
            detail = []
            if missing:
                detail.append(f"missing tensors {missing[:5]}")
            if extra:
                detail.append(f"unexpected tensors {extra[:5]}")
            if others:
                detail.append(f"unexpected entries {others[:5]}")
            raise _refuse(
                path,
                f"its weights do not match architecture {meta.architecture!r} "
                f"({'; '.join(detail)})",
                "The file is damaged or was altered.",
            )
        state: dict[str, torch.Tensor] = {}
        for name, reference in expected.items():
            array = _read_array(path, npz, _STATE_PREFIX + name)
            if tuple(array.shape) != tuple(reference.shape):
                raise _refuse(
                    path,
                    f"tensor {name!r} has shape {tuple(array.shape)}, but architecture "
                    f"{meta.architecture!r} needs {tuple(reference.shape)}",
                    "The file is damaged or was altered.",
                )
            if array.dtype.kind not in "fiub":
                raise _refuse(path, f"tensor {name!r} has non-numeric dtype {array.dtype}")
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise _refuse(
                    path,
                    f"tensor {name!r} contains NaN or infinite values",
                    "The network is broken; train it again.",
                )
            state[name] = torch.from_numpy(array.copy(order="C")).to(reference.dtype)
    model.load_state_dict(state, strict=True)
    try:
        model.to(device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise TomosegError(
            f"Cannot put the network on device {str(device)!r} ({exc}); use 'cpu' or an "
            "available GPU."
        ) from None
    model.eval()
    return Network(model=model, meta=meta)


def _build(path: Path, meta: NetworkMeta, device: torch.device) -> nn.Module:
    """The architecture the metadata names, on ``device``; any failure is a refusal."""
    try:
        with device:
            return build_model(
                meta.architecture, meta.in_channels, meta.n_classes, **meta.model_params
            )
    except TomosegError as exc:
        raise _refuse(path, str(exc)) from None
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        raise _refuse(path, f"its architecture settings cannot be built ({exc})") from None


def _entry_shape(path: Path, npz: Any, key: str) -> tuple[int, ...]:
    return entry_header(path, npz, key)[0]


def entry_header(
    path: Path, npz: Any, key: str, kind: SafeFileKind = NETWORK_FILE
) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype an entry's .npy header declares, read without loading the data
    (an entry of Python objects is refused here already: it would be unpickled)."""
    try:
        with npz.zip.open(key + ".npy") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(handle)
    except (*_READ_ERRORS, ValueError, TypeError) as exc:
        raise _refuse(
            path, f"entry {key!r} cannot be read ({exc})", kind.damaged_advice, kind
        ) from None
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise _refuse(
            path,
            f"entry {key!r} holds a pickled Python object, which could run code",
            "Refused for safety; only files saved by napari-tomoseg can be loaded.",
            kind,
        )
    return tuple(int(s) for s in shape), dtype


class _NpzHandle:
    """Context manager around ``np.load`` that turns every failure into a refusal."""

    def __init__(self, path: Path, kind: SafeFileKind = NETWORK_FILE) -> None:
        self.path = path
        self.kind = kind
        self.npz: Any = None

    def __enter__(self) -> Any:
        path, kind = self.path, self.kind
        if not path.exists():
            raise TomosegIOError(f"Cannot load {kind.noun} {path}: the file does not exist.")
        if not path.is_file():
            raise TomosegIOError(f"Cannot load {kind.noun} {path}: it is not a file.")
        if not zipfile.is_zipfile(path):
            raise _refuse(
                path,
                f"it is not a napari-tomoseg {kind.noun} file (not a {kind.extension} zip "
                "archive)",
                kind.advice,
                kind,
            )
        try:
            self.npz = np.load(path, allow_pickle=False)
        except (*_READ_ERRORS, ValueError) as exc:
            raise _refuse(
                path, f"the archive cannot be read ({exc})", kind.damaged_advice, kind
            ) from None
        return self.npz

    def __exit__(self, *exc: object) -> None:
        if self.npz is not None:
            self.npz.close()


def _open_npz(path: Path, kind: SafeFileKind = NETWORK_FILE) -> _NpzHandle:
    return _NpzHandle(path, kind)


def open_safe_npz(path: Path, kind: SafeFileKind) -> _NpzHandle:
    """Open an ``.npz`` archive of plain arrays (``allow_pickle=False``) as a context
    manager; a missing, foreign or unreadable file is refused in ``kind``'s words."""
    return _NpzHandle(Path(path), kind)


def _read_array(path: Path, npz: Any, key: str, kind: SafeFileKind = NETWORK_FILE) -> np.ndarray:
    try:
        value = npz[key]
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise _refuse(
                path,
                f"entry {key!r} holds a pickled Python object, which could run code",
                "Refused for safety; only files saved by napari-tomoseg can be loaded.",
                kind,
            ) from None
        raise _refuse(
            path, f"entry {key!r} cannot be read ({exc})", kind.damaged_advice, kind
        ) from None
    except _READ_ERRORS as exc:
        raise _refuse(
            path, f"entry {key!r} cannot be read ({exc})", kind.damaged_advice, kind
        ) from None
    if not isinstance(value, np.ndarray):  # a raw (non-.npy) member comes back as bytes
        raise _refuse(path, f"entry {key!r} is not an array", kind.damaged_advice, kind)
    return value


def read_safe_array(path: Path, npz: Any, key: str, kind: SafeFileKind) -> np.ndarray:
    """Read one entry of an archive from :func:`open_safe_npz`; anything but a plain
    array (a pickled object, a damaged member) is refused in ``kind``'s words."""
    return _read_array(path, npz, key, kind)


def read_json_entry(path: Path, npz: Any, key: str, kind: SafeFileKind) -> Any:
    """Parse an archive entry that holds a JSON text (a 0-d unicode array), as data only:
    ``NaN`` and ``Infinity`` are refused, so are texts over 64 MiB."""
    raw = _read_array(path, npz, key, kind)
    if raw.dtype.kind != "U" or raw.ndim != 0 or len(str(raw)) > _MAX_META_CHARS:
        raise _refuse(path, f"entry {key!r} is not a JSON text", kind.advice, kind)
    try:
        return json.loads(str(raw), parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise _refuse(
            path, f"entry {key!r} is not valid JSON ({exc})", kind.advice, kind
        ) from None


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity are not JSON; a file that holds them was not written here."""
    raise ValueError(f"{name} is not a valid number here")


def _read_meta(path: Path, npz: Any) -> NetworkMeta:
    if _META_KEY not in npz.files:
        raise _refuse(
            path,
            "it is not a napari-tomoseg network file (the metadata entry is missing)",
            f"Choose a file saved by napari-tomoseg (extension {NETWORK_EXTENSION}).",
        )
    raw = _read_array(path, npz, _META_KEY)
    if raw.dtype.kind != "U" or raw.ndim != 0 or len(str(raw)) > _MAX_META_CHARS:
        raise _refuse(path, "the metadata entry is not a JSON text")
    try:
        data = json.loads(str(raw), parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise _refuse(path, f"the metadata is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_MAGIC:
        raise _refuse(
            path,
            "it is not a napari-tomoseg network file (the format marker is missing)",
            f"Choose a file saved by napari-tomoseg (extension {NETWORK_EXTENSION}).",
        )
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise _refuse(
            path,
            f"it has format version {version!r}; this napari-tomoseg reads version "
            f"{FORMAT_VERSION}",
            "Use the napari-tomoseg version that wrote it, or update napari-tomoseg.",
        )
    try:
        return NetworkMeta.from_dict(data)
    except TomosegError as exc:
        raise _refuse(path, str(exc).rstrip(".")) from None
