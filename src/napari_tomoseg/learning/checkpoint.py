"""Training checkpoints: what a training run needs to continue exactly after a crash.

:func:`napari_tomoseg.learning.training.iter_train` writes a checkpoint every
``TrainSettings.checkpoint_every`` mini-batches and when it is stopped by request, and
continues from one with ``resume=True``.  On the same device (and always on a CPU) a run
interrupted at any point and resumed gives exactly the weights and history of an
uninterrupted run with the same seed: a checkpoint holds the model weights, the Adam
moments, the gradient-scaler state, the history and the best weights so far, the split,
the class weights, the state of numpy's and torch's random generators and the position in
the shuffled mini-batches.  Mini-batches after the last checkpoint are simply redone.

Format (version 1).  Like the network file (:mod:`napari_tomoseg.learning.model_file`): an
uncompressed ``numpy.savez`` zip of plain arrays, read with ``allow_pickle=False`` (no code
from the file ever runs), written atomically (:func:`napari_tomoseg.data.io.atomic_path`):

- ``__meta__``: a 0-d unicode array, a JSON object with ``"format":
  "napari-tomoseg-checkpoint"``, ``"format_version": 1``, the ``fingerprint`` of the run
  (training set, settings that must match, the network it continued), ``step`` (mini-batches
  done), ``history``, ``best`` (step, score, validation loss, metrics), ``split``,
  ``class_weights``, ``rng`` (the numpy bit generator's state),
  ``batches_pos``, ``optimizer`` (the layout of Adam's per-parameter state),
  ``scaler`` (the gradient scaler's numbers), ``device`` and ``versions``;
- ``model:<name>`` and ``best:<name>``: the current and the best weights;
- ``optim:<n>``: the tensors of the optimiser state the JSON layout names;
- ``split:train``, ``split:val``, ``batches:order``: sample indices;
- ``rng:torch`` (and ``rng:cuda`` on a GPU): torch's generator states (bytes).

Every entry is checked before use: the format marker and version, the fingerprint, the
name, shape and numeric dtype of every tensor against the network being trained, finite
weights, indices inside the training set.  Anything else is refused with a
:class:`~napari_tomoseg.errors.TomosegError` that says to delete the checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.io import atomic_path
from ..errors import TomosegError
from ..folders import cache_dir, cache_name
from .model_file import (
    SafeFileKind,
    entry_header,
    jsonable,
    open_safe_npz,
    package_versions,
    read_json_entry,
    read_safe_array,
)

#: The file name extension of a checkpoint (``net.tsnet.ckpt`` beside ``net.tsnet``).
CHECKPOINT_EXTENSION = ".ckpt"
#: Value of the ``format`` key that marks a napari-tomoseg training checkpoint.
FORMAT_MAGIC = "napari-tomoseg-checkpoint"
#: The format version this module writes and reads.
FORMAT_VERSION = 1

CHECKPOINT_FILE = SafeFileKind(
    "training checkpoint",
    CHECKPOINT_EXTENSION,
    "Delete it and train from the start.",
    "The checkpoint is damaged; delete it and train from the start.",
)
_META_KEY = "__meta__"
#: Arrays larger than this (bytes) enter a fingerprint by a strided subset.
_CRC_BYTES = 64 * 1024 * 1024

#: Readable names of the fingerprint fields, for the message that refuses a checkpoint.
_FIELD_NAMES = {
    "n_samples": "number of samples",
    "image_shape": "sample shape (channels, height, width)",
    "image_dtype": "image data type",
    "labels_dtype": "label data type",
    "class_names": "class names",
    "ignore_index": "ignored label value",
    "images_crc": "image contents",
    "labels_crc": "painted labels",
    "box_ids_crc": "boxes the samples come from",
    "positive_crc": "positive/negative boxes",
}


@dataclass
class TrainingState:
    """Everything :func:`~napari_tomoseg.learning.training.iter_train` needs to continue a run.

    ``optimizer`` is the ``state`` part of the optimiser's ``state_dict`` (per parameter
    index, a dict of tensors and numbers); ``best`` is None before the first evaluation,
    else ``{"score", "val_loss", "step", "metrics", "state"}`` with ``state`` the best
    weights.  ``rng`` is ``numpy.random.Generator.bit_generator.state``.
    """

    step: int
    fingerprint: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[int, dict[str, Any]]
    scaler: dict[str, Any]
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    rng: dict[str, Any]
    torch_rng: torch.Tensor
    batches_order: np.ndarray
    batches_pos: int
    train_idx: np.ndarray
    val_idx: np.ndarray
    split: dict[str, Any]
    class_weights: list[float]
    cuda_rng: torch.Tensor | None = None
    device: str = "cpu"
    versions: dict[str, str] = field(default_factory=package_versions)


def default_checkpoint_path(
    output: str | os.PathLike | None = None, *, source: str | None = None
) -> Path:
    """Where a training run keeps its checkpoint (``tomoseg train`` and the Train widget).

    A run that writes the network file ``output`` keeps it beside that file:
    ``<output>.ckpt``.  A run with no output file (``output`` None: the Train widget, which
    saves the network only when asked, after training) keeps one per tomogram ``source``
    (its file path, or a layer name) in the user's cache,
    ``<cache>/checkpoints/<name>-<CRC of source>.ckpt``, where the next run of the same
    tomogram finds it to resume.
    """
    if output is not None:
        output = Path(output)
        return output.with_name(output.name + CHECKPOINT_EXTENSION)
    if source is None:
        raise TypeError("default_checkpoint_path needs the output file or the source tomogram")
    return cache_dir() / "checkpoints" / f"{cache_name(source)}{CHECKPOINT_EXTENSION}"


def array_crc(array: np.ndarray) -> int:
    """A CRC-32 of an array's values (a strided subset of arrays over 64 MiB): cheap enough
    to take at every start, and it changes when a label or an image is changed."""
    flat = np.asarray(array).reshape(-1)
    step = max(1, -(-flat.nbytes // _CRC_BYTES))
    return zlib.crc32(np.ascontiguousarray(flat[::step]).view(np.uint8)) ^ (step << 32)


def trainset_fingerprint(trainset: Any) -> dict[str, Any]:
    """What identifies a training set: sizes, classes and CRCs of its arrays."""
    images = trainset.images
    labels = trainset.labels
    ignore = (getattr(trainset, "metadata", None) or {}).get("ignore_index")
    return jsonable(
        {
            "n_samples": int(images.shape[0]),
            "image_shape": list(images.shape[1:]),
            "image_dtype": str(images.dtype),
            "labels_dtype": str(labels.dtype),
            "class_names": [str(n) for n in trainset.class_names],
            "ignore_index": ignore,
            "images_crc": array_crc(images),
            "labels_crc": array_crc(labels),
            "box_ids_crc": array_crc(np.asarray(trainset.box_ids, np.int64)),
            "positive_crc": array_crc(np.asarray(trainset.positive, bool)),
        }
    )


def state_dict_crc(state: dict[str, torch.Tensor]) -> int:
    """A CRC-32 over the names and values of a model's weights."""
    crc = 0
    for name, tensor in state.items():
        crc = zlib.crc32(name.encode(), crc)
        array = tensor.detach().cpu().contiguous().numpy()
        crc = zlib.crc32(array.reshape(-1).view(np.uint8), crc)
    return crc


def fingerprint_differences(saved: Any, current: dict[str, Any]) -> list[str]:
    """Human-readable differences between a checkpoint's fingerprint and the current run's
    (``trainset``, ``settings``, ``init`` and ``replay`` parts)."""
    if not isinstance(saved, dict):
        return ["the checkpoint has no fingerprint"]
    out: list[str] = []
    ts_saved = saved.get("trainset") if isinstance(saved.get("trainset"), dict) else {}
    ts_now = current["trainset"]
    changed = [_FIELD_NAMES.get(k, k) for k in ts_now if ts_saved.get(k) != ts_now[k]]
    if changed:
        out.append(f"the training set differs in its {', '.join(changed)}")
    st_saved = saved.get("settings") if isinstance(saved.get("settings"), dict) else {}
    for key, value in current["settings"].items():
        if st_saved.get(key) != value:
            out.append(f"{key} was {st_saved.get(key)!r}, now {value!r}")
    init_saved, init_now = saved.get("init"), current["init"]
    if init_saved != init_now:
        if init_now is None:
            out.append("the run continued a network, this one starts a new one")
        elif init_saved is None:
            out.append("the run started a new network, this one continues one")
        else:
            out.append("the run continued another network")
    if saved.get("replay") != current.get("replay"):
        out.append(
            f"its simulated replay set was made as {saved.get('replay')}, now as "
            f"{current.get('replay')} (another napari-tomoseg version?)"
        )
    return out


def save_checkpoint(path: str | os.PathLike, state: TrainingState) -> Path:
    """Write ``state`` to ``path`` atomically (replacing an older checkpoint there)."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}

    def put(name: str, tensor: torch.Tensor | np.ndarray) -> str:
        if isinstance(tensor, torch.Tensor):
            tensor = tensor.detach().cpu().numpy()
        arrays[name] = np.array(tensor, copy=True, order="C")
        return name

    for name, tensor in state.model.items():
        put("model:" + name, tensor)
    best = None
    if state.best is not None:
        for name, tensor in state.best["state"].items():
            put("best:" + name, tensor)
        best = {k: state.best[k] for k in ("score", "val_loss", "step", "metrics")}
    layout: dict[str, dict[str, Any]] = {}
    for index, entries in state.optimizer.items():
        layout[str(int(index))] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                name = put(f"optim:{len(arrays)}", value)
                layout[str(int(index))][str(key)] = {"tensor": name, "dtype": str(value.dtype)}
            elif isinstance(value, (bool, int, float)):
                layout[str(int(index))][str(key)] = {"value": value}
            else:
                raise TomosegError(
                    f"Cannot checkpoint the optimiser state {key!r} of type "
                    f"{type(value).__name__}."
                )
    put("split:train", np.asarray(state.train_idx, np.int64))
    put("split:val", np.asarray(state.val_idx, np.int64))
    put("batches:order", np.asarray(state.batches_order, np.int64))
    put("rng:torch", state.torch_rng)
    if state.cuda_rng is not None:
        put("rng:cuda", state.cuda_rng)
    meta = {
        "format": FORMAT_MAGIC,
        "format_version": FORMAT_VERSION,
        "fingerprint": state.fingerprint,
        "step": int(state.step),
        "history": state.history,
        "best": best,
        "split": state.split,
        "class_weights": [float(w) for w in state.class_weights],
        "rng": state.rng,
        "batches_pos": int(state.batches_pos),
        "optimizer": layout,
        "scaler": state.scaler,
        "device": state.device,
        "versions": state.versions,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    arrays[_META_KEY] = np.array(json.dumps(jsonable(meta), allow_nan=False))
    with atomic_path(path, overwrite=True) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON part of a checkpoint (cheap: no tensors read), after checking its format."""
    path = Path(path)
    with open_safe_npz(path, CHECKPOINT_FILE) as npz:
        return _read_meta(path, npz)


def remove_checkpoint(path: str | os.PathLike | None) -> bool:
    """Delete a checkpoint (a finished run no longer needs it); True if one was removed.
    A checkpoint that cannot be deleted is left (it is harmless: resuming a finished run
    only finishes it again)."""
    if path is None:
        return False
    try:
        Path(path).unlink()
    except OSError:
        return False
    return True


def load_checkpoint(
    path: str | os.PathLike,
    *,
    fingerprint: dict[str, Any],
    model: nn.Module,
    parameters: list[torch.Tensor],
    n_samples: int,
) -> TrainingState:
    """Read and check a checkpoint for the run that ``fingerprint`` describes.

    ``model`` is the network being trained (its ``state_dict`` gives the expected tensor
    names, shapes and dtypes), ``parameters`` the optimiser's parameters in order and
    ``n_samples`` the size of the training set.  A checkpoint of another run is refused
    naming what differs; a damaged one is refused naming the damage.
    """
    path = Path(path)
    with open_safe_npz(path, CHECKPOINT_FILE) as npz:
        meta = _read_meta(path, npz)
        differences = fingerprint_differences(meta.get("fingerprint"), fingerprint)
        if differences:
            raise TomosegError(
                f"Cannot resume training from {path}: the checkpoint belongs to another "
                f"run: {'; '.join(differences)}. Resume with the same training set and "
                "settings, or delete the checkpoint to start afresh."
            )
        reader = _Reader(path, npz)
        try:
            return _state_from(reader, meta, fingerprint, model, parameters, n_samples)
        except TomosegError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            problem = f"its contents are inconsistent ({type(exc).__name__}: {exc})"
            raise reader.damaged(problem) from None


class _Reader:
    """Reads the tensors of an open checkpoint, checking each header before the data."""

    def __init__(self, path: Path, npz: Any) -> None:
        self.path = path
        self.npz = npz
        self.used: set[str] = {_META_KEY}

    def damaged(self, problem: str) -> TomosegError:
        return TomosegError(
            f"Cannot resume training from {self.path}: {problem}. {CHECKPOINT_FILE.damaged_advice}"
        )

    def array(
        self,
        key: str,
        shape: tuple[int, ...] | None = None,
        kinds: str = "fiub",
        *,
        ndim: int | None = None,
    ) -> np.ndarray:
        if not isinstance(key, str) or key not in self.npz.files:
            raise self.damaged(f"the entry {key!r} is missing")
        declared, dtype = entry_header(self.path, self.npz, key, CHECKPOINT_FILE)
        if shape is not None and declared != tuple(shape):
            raise self.damaged(f"the entry {key!r} has shape {declared}, expected {shape}")
        if ndim is not None and len(declared) != ndim:
            raise self.damaged(f"the entry {key!r} has {len(declared)} dimensions, not {ndim}")
        if dtype.kind not in kinds:
            raise self.damaged(f"the entry {key!r} has data type {dtype}")
        size = math.prod(declared) * dtype.itemsize
        if size > self.npz.zip.getinfo(key + ".npy").file_size:
            raise self.damaged(f"the entry {key!r} is shorter than its header says")
        value = read_safe_array(self.path, self.npz, key, CHECKPOINT_FILE)
        if value.shape != declared or value.dtype != dtype:
            raise self.damaged(f"the entry {key!r} does not match its header")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise self.damaged(f"the entry {key!r} holds NaN or infinite values")
        self.used.add(key)
        return value

    def tensors(self, prefix: str, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = {k[len(prefix) :] for k in self.npz.files if k.startswith(prefix)}
        if names != set(reference):
            missing = sorted(set(reference) - names)[:3]
            extra = sorted(names - set(reference))[:3]
            raise self.damaged(
                f"its {prefix.rstrip(':')} weights do not match the network "
                f"(missing {missing}, unexpected {extra})"
            )
        out = {}
        for name, ref in reference.items():
            array = self.array(prefix + name, tuple(ref.shape))
            out[name] = torch.from_numpy(array.copy()).to(ref.dtype)
        return out

    def indices(self, key: str, n_samples: int) -> np.ndarray:
        value = self.array(key, kinds="iu", ndim=1).astype(np.int64)
        if value.size and (value.min() < 0 or value.max() >= n_samples):
            raise self.damaged(f"the entry {key!r} holds indices outside the training set")
        return value


def _read_meta(path: Path, npz: Any) -> dict[str, Any]:
    if _META_KEY not in npz.files:
        raise TomosegError(
            f"Cannot load training checkpoint {path}: it is not a napari-tomoseg training "
            f"checkpoint (the metadata entry is missing). {CHECKPOINT_FILE.advice}"
        )
    data = read_json_entry(path, npz, _META_KEY, CHECKPOINT_FILE)
    if not isinstance(data, dict) or data.get("format") != FORMAT_MAGIC:
        raise TomosegError(
            f"Cannot load training checkpoint {path}: it is not a napari-tomoseg training "
            f"checkpoint (the format marker is missing). {CHECKPOINT_FILE.advice}"
        )
    if data.get("format_version") != FORMAT_VERSION:
        raise TomosegError(
            f"Cannot load training checkpoint {path}: it has format version "
            f"{data.get('format_version')!r}; this napari-tomoseg reads version "
            f"{FORMAT_VERSION}. {CHECKPOINT_FILE.advice}"
        )
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> float:
    """A float from JSON (``null`` stands for NaN, which JSON cannot hold)."""
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _state_from(
    reader: _Reader,
    meta: dict[str, Any],
    fingerprint: dict[str, Any],
    model: nn.Module,
    parameters: list[torch.Tensor],
    n_samples: int,
) -> TrainingState:
    iterations = fingerprint["settings"].get("iterations")
    step = meta["step"]
    if not _is_int(step) or step < 0 or (_is_int(iterations) and step > iterations):
        raise reader.damaged(f"its step count {step!r} is impossible")
    history = meta["history"]
    if (
        not isinstance(history, list)
        or len(history) != step
        or not all(isinstance(h, dict) for h in history)
    ):
        raise reader.damaged("its history does not hold one entry per mini-batch")
    reference = model.state_dict()
    weights = reader.tensors("model:", reference)
    best = meta["best"]
    if best is not None:
        if not isinstance(best, dict) or not _is_int(best.get("step")):
            raise reader.damaged("its best-so-far record is malformed")
        if not isinstance(best.get("metrics"), dict):
            raise reader.damaged("its best-so-far metrics are malformed")
        best = {
            "score": _number(best["score"]),
            "val_loss": _number(best["val_loss"]),
            "step": int(best["step"]),
            "metrics": best["metrics"],
            "state": reader.tensors("best:", reference),
        }
    elif any(k.startswith("best:") for k in reader.npz.files):
        raise reader.damaged("it holds best weights without their record")
    layout = meta["optimizer"]
    if not isinstance(layout, dict):
        raise reader.damaged("its optimiser state is malformed")
    optimizer: dict[int, dict[str, Any]] = {}
    for index_text, entries in layout.items():
        index = int(index_text)
        if not 0 <= index < len(parameters) or not isinstance(entries, dict):
            raise reader.damaged(f"its optimiser state names parameter {index_text!r}")
        shape = tuple(parameters[index].shape)
        restored: dict[str, Any] = {}
        for key, entry in entries.items():
            if not isinstance(entry, dict):
                raise reader.damaged(f"its optimiser entry {key!r} is malformed")
            if "tensor" in entry:
                array = reader.array(entry["tensor"], kinds="fiu")
                if array.shape not in ((), shape):
                    raise reader.damaged(
                        f"its optimiser entry {key!r} of parameter {index} has shape "
                        f"{array.shape}, expected {shape}"
                    )
                restored[str(key)] = torch.from_numpy(array.copy())
            elif isinstance(entry.get("value"), (bool, int, float)):
                restored[str(key)] = entry["value"]
            else:
                raise reader.damaged(f"its optimiser entry {key!r} is malformed")
        optimizer[index] = restored
    scaler = meta["scaler"]
    if not isinstance(scaler, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in scaler.values()
    ):
        raise reader.damaged("its gradient-scaler state is malformed")
    rng = meta["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("bit_generator"), str):
        raise reader.damaged("its random-generator state is malformed")
    batches_pos = meta["batches_pos"]
    order = reader.indices("batches:order", n_samples)
    if not _is_int(batches_pos) or not 0 <= batches_pos <= order.size:
        raise reader.damaged("its position in the mini-batches is impossible")
    weights_list = [_number(w) for w in meta["class_weights"]]
    if not all(math.isfinite(w) and w > 0 for w in weights_list):
        raise reader.damaged("its class weights are not positive numbers")
    split = meta["split"]
    if not isinstance(split, dict) or not isinstance(split.get("held_out"), bool):
        raise reader.damaged("its split is malformed")
    torch_rng = reader.array("rng:torch", kinds="u", ndim=1)
    cuda_rng = (
        reader.array("rng:cuda", kinds="u", ndim=1) if "rng:cuda" in reader.npz.files else None
    )
    state = TrainingState(
        step=step,
        fingerprint=meta["fingerprint"],
        model=weights,
        optimizer=optimizer,
        scaler=dict(scaler),
        history=[dict(h) for h in history],
        best=best,
        rng=rng,
        torch_rng=torch.from_numpy(torch_rng.astype(np.uint8)),
        batches_order=order,
        batches_pos=batches_pos,
        train_idx=reader.indices("split:train", n_samples),
        val_idx=reader.indices("split:val", n_samples),
        split=split,
        class_weights=weights_list,
        cuda_rng=None if cuda_rng is None else torch.from_numpy(cuda_rng.astype(np.uint8)),
        device=str(meta.get("device", "")),
        versions=dict(meta.get("versions") or {}),
    )
    unused = sorted(set(reader.npz.files) - reader.used)
    if unused:
        raise reader.damaged(f"it holds unexpected entries {unused[:5]}")
    return state


__all__ = [
    "CHECKPOINT_EXTENSION",
    "TrainingState",
    "array_crc",
    "default_checkpoint_path",
    "fingerprint_differences",
    "load_checkpoint",
    "read_checkpoint_meta",
    "remove_checkpoint",
    "save_checkpoint",
    "state_dict_crc",
    "trainset_fingerprint",
]
