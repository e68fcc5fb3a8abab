"""Training a segmentation network on a training set, with validation and a preview.

:func:`iter_train` is the training loop as a generator: it yields a
:class:`~napari_tomoseg.progress.Progress` after every mini-batch (the loss, and at
evaluation steps the validation loss and per-class Dice), checks ``should_stop`` before each
mini-batch, and returns a :class:`TrainResult` holding the *best* network seen (highest mean
foreground Dice on the validation boxes; ties go to the lower validation loss), its
per-class metrics and a :class:`TrainingPreview` (box, label, output, as EMAN2's
``trainout``).  :func:`train` runs it to the end.

What it does, and why:

- **Validation by box.**  A training set holds several rotated copies of each painted box;
  copies of one box are nearly the same image, so samples are split into training and
  validation by *box* (``box_ids``), separately for positive and negative boxes.  With too
  few boxes for that (fewer than two positive boxes, or ``validation_fraction=0``) it
  validates on the training boxes, warns, and says so in ``TrainResult.metadata``.
- **Loss.**  Cross-entropy (for binary networks, with one output, the equivalent binary
  cross-entropy with logits) plus ``dice_weight`` times a soft Dice loss: one minus the
  mean Dice of the feature classes over the whole mini-batch, so that the background's
  majority does not decide (features are a few percent of the pixels).  Class-weighted
  cross-entropy (Zhao & Zhou's fixed weights of 2000-3000) is an option:
  ``class_weights="auto"`` weights each feature class by its inverse pixel frequency
  (clipped to ``[1, AUTO_WEIGHT_MAX]``), or give one weight per class; the default is none
  (``docs/benchmarks.md``, "Choices measured in the code's early days").  The reported
  validation loss (which breaks ties between equal validation Dice) is the cross-entropy
  part alone, averaged over the validation pixels: a batch Dice would depend on how the
  validation samples are grouped.
- **Optimiser.**  Adam.  The learning rate rises linearly over a short warm-up (without
  it the faithful ``tomoseg-cnn`` can lose all its ReLUs in the first steps at 1e-3) and
  then stays constant; ``lr_schedule="cosine"`` decays it to ``LR_FLOOR`` times the rate
  instead (EMAN2 decays by 0.9 per epoch).  To continue training an existing network pass it
  as ``init`` and give a smaller ``learning_rate`` (as in EMAN2).
- **Repeatable.**  The seed fixes the weight initialisation, the split, the order of the
  mini-batches and the augmentation: on a CPU the same seed gives the same loss history.
  It seeds torch's global generator (dropout draws from it).
- **Augmentation.**  Each mini-batch is rotated by a random multiple of 90 degrees and
  maybe flipped (exact, no interpolation); the training set already holds arbitrary copies.
- **Mixed precision** (``torch.autocast`` + ``GradScaler``) only on CUDA.  The number of CPU
  threads is left to the caller (``torch.set_num_threads``).
- **Checkpoints.**  With ``TrainSettings.checkpoint`` set, the full state of the run (weights,
  Adam moments, random generators, position in the mini-batches, history, best so far) is
  written there every ``checkpoint_every`` mini-batches and when the run is stopped by
  request; ``iter_train(..., resume=True)`` continues from it, and on the same device gives
  exactly the weights and history of a run that was never interrupted (see
  :mod:`napari_tomoseg.learning.checkpoint`).  The checkpoint is deleted when the run finishes all
  its mini-batches, and kept when it stops early or fails, so that it can be resumed.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..devices import resolve_device
from ..errors import TomosegError
from ..progress import Progress, drive, never_stop
from .augment import FINE_TUNING_AUGMENTATION, augment_batch, flip_rotate, resolve_augmentation
from .checkpoint import (
    TrainingState,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
    state_dict_crc,
    trainset_fingerprint,
)
from .model_file import Network, NetworkMeta, jsonable, package_versions
from .models import DEFAULT_ARCHITECTURE, get_spec, logits_to_proba, resolved_params
from .pretrained import (
    AUTO,
    SCRATCH,
    available,
    feature_of,
    starting_network,
    transfer_weights,
)

if TYPE_CHECKING:
    from .trainset import TrainingSet

#: Relative voxel-size difference above which a network is not continued on a training set.
VOXEL_SIZE_TOLERANCE = 0.05
#: Upper clip of automatic class weights (inverse frequency relative to the background).
AUTO_WEIGHT_MAX = 20.0
#: Final learning rate of the cosine schedule, as a fraction of the initial one.
LR_FLOOR = 0.05
#: Mini-batches of linear learning-rate warm-up (at most a tenth of the run).
WARMUP_STEPS = 100
#: The most simulated replay samples, as a multiple of the training set's.
MAX_REPLAY = 4.0
#: What a run that starts from existing weights trains (``TrainSettings.fine_tune``).
FINE_TUNE_CHOICES = ("auto", "all", "decoder")
#: Samples per forward pass during validation (bounds memory on big validation sets).
_EVAL_BATCH = 64


@dataclass
class TrainSettings:
    """Settings of one training run (shared by the widget, the command line and scripts).

    ``iterations`` counts mini-batches.  The default (1000 mini-batches of 16) trains the
    default architecture on a CPU in a few minutes and reaches a stable validation Dice on
    a typical training set of about 2000 samples; add more for harder features.
    ``lr_schedule`` is ``"constant"`` or ``"cosine"`` (decay to ``LR_FLOOR`` times
    ``learning_rate``); both start with a short linear warm-up.  ``augment`` applies a random
    90-degree rotation and flip to each mini-batch, and the changes of
    :mod:`napari_tomoseg.learning.augment` (zoom, blur, noise, contrast, inversion; unnamed
    strengths take their defaults, ``NO_AUGMENTATION`` turns them off) with the strengths
    of ``augmentation`` (a run from a shipped network takes ``FINE_TUNING_AUGMENTATION``
    for the strengths it leaves unnamed).  ``start_from`` says where a new network's
    weights come from: ``"auto"`` a shipped network trained on simulated tomograms when
    one knows the features by name (:mod:`napari_tomoseg.learning.pretrained`),
    ``"scratch"`` random weights, or the name of a shipped network.  ``keep_start``: when
    training started from a shipped network, the result's weights are at most this
    fraction of the starting weights plus the rest of the trained ones
    (:func:`average_weights`; less where the held-out boxes score clearly better with less,
    but never under half of it, :func:`_choose_keep`; 0 keeps the trained weights).
    ``replay``: when training starts from a shipped network, boxes of tomograms simulated as
    its pretraining drew them, this many times the training set's samples, train beside
    the user's (``iter_train``'s ``replay_from``; never validated).  0, the default: the
    replayed boxes carry the simulator's way of labelling, which a user's painting may not
    share (docs/models.md, "Boxes painted another way").  ``fine_tune``: ``"all"`` trains
    every layer; ``"decoder"`` keeps the encoder (the contracting path and the bottleneck)
    of the network training starts from as it is and trains the rest, so that what the
    pretraining learnt to see in many simulated tomograms is not narrowed to the painted
    one (a run from scratch has nothing to keep and refuses it); an input layer fitted to
    other context slices trains all the same.  ``"auto"``, the default: "decoder" from a
    shipped network that takes the training set's slices as they are, "all" otherwise
    (:func:`_resolved_fine_tune`; docs/models.md, "Keeping the encoder").
    The loss is cross-entropy (weighted by ``class_weights``: ``None``, ``"auto"`` or one
    weight per class) plus ``dice_weight`` times a soft Dice loss of the feature classes
    (module notes).  ``checkpoint`` is a file the run writes its full state to every
    ``checkpoint_every`` mini-batches and when stopped, so that a crashed or stopped run can
    be resumed (``iter_train(..., resume=True)``); it is deleted when the run finishes.
    """

    architecture: str = DEFAULT_ARCHITECTURE
    model_params: dict[str, Any] = field(default_factory=dict)
    iterations: int = 1000
    batch_size: int = 16
    learning_rate: float = 1e-3
    validation_fraction: float = 0.2
    class_weights: str | list[float] | None = None
    device: str = "auto"
    mixed_precision: bool = True
    seed: int = 0
    eval_every: int = 50
    preview_samples: int = 16
    augment: bool = True
    augmentation: dict[str, float] = field(default_factory=dict)
    start_from: str = "auto"
    keep_start: float = 0.5
    replay: float = 0.0
    fine_tune: str = "auto"
    lr_schedule: str = "constant"
    dice_weight: float = 1.0
    checkpoint: str | None = None
    checkpoint_every: int = 100

    @classmethod
    def continuing(cls, network: Network, **changes: Any) -> TrainSettings:
        """Settings to continue training ``network``: its architecture and parameters, and
        the seed and validation fraction it was trained with, so that on the same training
        set the same boxes stay held out (validation stays honest).

        Typically ``TrainSettings.continuing(net, learning_rate=1e-4)``.
        """
        base: dict[str, Any] = {
            "architecture": network.meta.architecture,
            "model_params": dict(network.meta.model_params),
        }
        before = network.meta.metrics.get("training", {})
        if isinstance(before, dict):
            if _is_int(before.get("seed")):
                base["seed"] = int(before["seed"])
            fraction = before.get("validation_fraction")
            if isinstance(fraction, float) and 0.0 <= fraction < 1.0:
                base["validation_fraction"] = fraction
        return cls(**{**base, **changes})

    @classmethod
    def for_run(cls, init: Network | None, **changes: Any) -> TrainSettings:
        """Settings of a run that trains a new network (``init`` None: ``changes`` on the
        defaults) or continues ``init`` (:meth:`continuing`: the network's own architecture
        and parameters whatever ``changes`` say of them, its seed and validation fraction
        unless ``changes`` give them).  ``tomoseg train`` and the Train widget both start
        here."""
        if init is None:
            return cls(**changes)
        own = {k: v for k, v in changes.items() if k not in ("architecture", "model_params")}
        return cls.continuing(init, **own)

    def validate(self) -> None:
        """Raise :class:`TomosegError` naming the first invalid setting."""
        get_spec(self.architecture)
        if not isinstance(self.augmentation, dict):
            raise TomosegError("augmentation must be a dictionary of strengths by name.")
        resolve_augmentation(self.augmentation)
        if not isinstance(self.model_params, dict):
            raise TomosegError("model_params must be a dictionary of architecture parameters.")
        resolved_params(self.architecture, self.model_params)
        checks = [
            (_positive_int(self.iterations), "iterations must be a positive integer"),
            (_positive_int(self.batch_size), "batch_size must be a positive integer"),
            (_positive_int(self.eval_every), "eval_every must be a positive integer"),
            (
                _positive_int(self.checkpoint_every),
                "checkpoint_every must be a positive integer (mini-batches)",
            ),
            (
                self.checkpoint is None
                or (isinstance(self.checkpoint, (str, os.PathLike)) and str(self.checkpoint)),
                "checkpoint must be a file path or None",
            ),
            (
                _is_int(self.preview_samples) and self.preview_samples >= 0,
                "preview_samples must be a non-negative integer",
            ),
            (
                isinstance(self.learning_rate, (int, float))
                and math.isfinite(self.learning_rate)
                and self.learning_rate > 0,
                "learning_rate must be a positive number (e.g. 1e-3; 1e-4 to continue)",
            ),
            (
                isinstance(self.validation_fraction, (int, float))
                and 0.0 <= self.validation_fraction < 1.0,
                "validation_fraction must be in [0, 1) (0.2 holds out a fifth of the boxes)",
            ),
            (_is_int(self.seed), "seed must be an integer"),
            (
                isinstance(self.keep_start, (int, float))
                and not isinstance(self.keep_start, bool)
                and 0.0 <= self.keep_start < 1.0,
                "keep_start must be in [0, 1) (0.5: half the shipped network's weights)",
            ),
            (
                isinstance(self.replay, (int, float))
                and not isinstance(self.replay, bool)
                and 0.0 <= self.replay <= MAX_REPLAY,
                f"replay must be in [0, {MAX_REPLAY:g}] (0.5: simulated samples half as "
                "many as the training set's; 0: none)",
            ),
            (
                self.fine_tune in FINE_TUNE_CHOICES,
                f"fine_tune must be one of {', '.join(FINE_TUNE_CHOICES)} (all: every layer; "
                "decoder: the start's encoder kept as it is; auto: decoder from a shipped "
                "network that takes the slices as they are, all otherwise)",
            ),
            (
                isinstance(self.dice_weight, (int, float))
                and not isinstance(self.dice_weight, bool)
                and math.isfinite(self.dice_weight)
                and self.dice_weight >= 0,
                "dice_weight must be a number >= 0 (0: cross-entropy alone; 1: the default)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise TomosegError(f"Invalid training setting: {message}.")
        cw = self.class_weights
        if cw is not None and cw != "auto":
            if isinstance(cw, str) or not hasattr(cw, "__len__"):
                raise TomosegError(
                    "class_weights must be 'auto', None or a list with one weight per class."
                )
            if not all(isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in cw):
                raise TomosegError("class_weights must all be positive numbers.")
        if not isinstance(self.start_from, str) or (
            self.start_from not in (AUTO, SCRATCH) and self.start_from not in available()
        ):
            names = ", ".join(available()) or "none shipped"
            raise TomosegError(
                f"start_from must be 'auto', 'scratch' or a shipped network ({names}); got "
                f"{self.start_from!r}."
            )
        if self.lr_schedule not in ("cosine", "constant"):
            raise TomosegError(
                f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}."
            )
        if not isinstance(self.device, str):
            raise TomosegError("device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")


@dataclass
class TrainingPreview:
    """The network's output on some samples, next to their image and label.

    ``images`` (N, H, W) float32 is the centre input channel; ``labels`` (N, H, W) uint8;
    ``outputs`` (N, H, W) float32 is the foreground probability for a binary network, or
    the most probable class for a multi-class one (whose full ``probabilities``
    (N, K, H, W) float16 are kept too); ``positive`` (N,) marks samples from positive boxes.
    Label pixels equal to ``ignore_index`` were left out of training.
    """

    images: np.ndarray
    labels: np.ndarray
    outputs: np.ndarray
    positive: np.ndarray
    n_classes: int = 2
    probabilities: np.ndarray | None = None
    ignore_index: int | None = None

    def as_stack(self) -> np.ndarray:
        """(N*3, H, W) float32: box, label, output for each sample, each scaled to [0, 1].

        The layout of EMAN2's ``trainout`` file: view it as a stack of three panels per
        sample; a well-trained network's output matches the label.  Labels are scaled by
        the largest class; ignored label pixels show as 0.5.
        """
        n = self.images.shape[0]
        if n == 0:
            return np.zeros((0, *self.images.shape[1:]), np.float32)
        img = self.images.astype(np.float32)
        lo = img.min(axis=(1, 2), keepdims=True)
        hi = img.max(axis=(1, 2), keepdims=True)
        img = (img - lo) / np.where(hi > lo, hi - lo, 1.0)
        top = max(self.n_classes - 1, 1)
        lab = self.labels.astype(np.float32) / top
        if self.ignore_index is not None:
            lab[self.labels == self.ignore_index] = 0.5
        out = self.outputs.astype(np.float32)
        if self.n_classes > 2:
            out = out / top
        out = np.clip(out, 0.0, 1.0)
        stack = np.empty((3 * n, *img.shape[1:]), np.float32)
        stack[0::3] = img
        stack[1::3] = lab
        stack[2::3] = out
        return stack


@dataclass
class TrainResult:
    """What training produced.

    ``network`` holds the best weights seen; ``metrics`` are its validation metrics
    (``classes``: per class precision, recall, f1 (= Dice), support; ``mean_foreground_f1``;
    ``pixel_accuracy``); ``history`` lists one entry per mini-batch (continuing a network
    appends to its history); ``metadata`` says how the data were split and weighted, which
    step was best, and whether validation fell back to the training boxes.
    """

    network: Network
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    preview: TrainingPreview
    stopped: bool
    seconds: float
    device: str
    metadata: dict[str, Any] = field(default_factory=dict)


#: The same function as :func:`napari_tomoseg.devices.resolve_device` (one device rule
#: for training and applying), under the name training has always had.
select_device = resolve_device


def confusion_matrix(
    pred: np.ndarray, target: np.ndarray, n_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """(n_classes, n_classes) int64 counts: rows are true classes, columns predictions.

    Pixels whose target is ``ignore_index`` are not counted.
    """
    pred = np.asarray(pred).ravel().astype(np.int64, copy=False)
    target = np.asarray(target).ravel().astype(np.int64, copy=False)
    if pred.shape != target.shape:
        raise TomosegError(
            f"Prediction and target differ in size ({pred.size} vs {target.size} pixels)."
        )
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    for name, arr in (("prediction", pred), ("target", target)):
        if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
            raise TomosegError(
                f"The {name} has class values outside 0..{n_classes - 1} "
                f"(found {arr.min()}..{arr.max()})."
            )
    flat = target * n_classes + pred
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def metrics_from_confusion(
    confusion: np.ndarray, class_names: tuple[str, ...] | list[str] | None = None
) -> dict[str, Any]:
    """Per-class precision, recall, F1 (= Dice) and support from a confusion matrix.

    Conventions: a class that is neither present nor predicted scores 1.0 (perfect
    agreement); present but never predicted (or predicted but absent) scores 0.
    ``mean_foreground_f1`` averages the F1 of the non-background classes that are present
    in the target (all of them if none is present).
    """
    k = confusion.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise TomosegError(f"{len(names)} class names given for {k} classes.")
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    classes: dict[str, dict[str, float]] = {}
    f1s = []
    for c in range(k):
        if support[c] == 0 and predicted[c] == 0:
            precision = recall = f1 = 1.0
        else:
            precision = tp[c] / predicted[c] if predicted[c] else 0.0
            recall = tp[c] / support[c] if support[c] else 0.0
            f1 = 2 * tp[c] / (support[c] + predicted[c])
        f1s.append(f1)
        classes[names[c]] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(support[c]),
        }
    fg = [c for c in range(1, k) if support[c] > 0] or list(range(1, k))
    total = confusion.sum()
    return {
        "classes": classes,
        "mean_foreground_f1": float(np.mean([f1s[c] for c in fg])) if fg else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
    }


def class_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    n_classes: int,
    class_names: tuple[str, ...] | list[str] | None = None,
    ignore_index: int | None = None,
) -> dict[str, Any]:
    """Per-class precision, recall, F1 (= Dice) and support of integer label arrays.

    Returns ``{"classes": {name: {"precision", "recall", "f1", "support"}},
    "mean_foreground_f1": float, "pixel_accuracy": float}``; names default to "0", "1", ...
    All pixels are pooled (not averaged per image); target pixels equal to ``ignore_index``
    are left out.  See :func:`metrics_from_confusion`.
    """
    return metrics_from_confusion(
        confusion_matrix(pred, target, n_classes, ignore_index), class_names
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _ignore_index(ts: Any) -> int | None:
    """The label value the loss skips (``metadata["ignore_index"]``), or None."""
    value = (getattr(ts, "metadata", None) or {}).get("ignore_index")
    if value is None:
        return None
    if not _is_int(value) or not 0 <= value <= 255:
        raise TomosegError(f"The training set's ignore_index must be 0..255, got {value!r}.")
    return int(value)


def _check_trainset(ts: Any) -> None:
    try:
        images, labels, box_ids, positive = ts.images, ts.labels, ts.box_ids, ts.positive
        names = tuple(ts.class_names)
    except AttributeError as exc:
        raise TomosegError(f"Not a training set: {exc}.") from None
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise TomosegError("Training images must be a (N, C, H, W) array.")
    n = images.shape[0]
    if n == 0:
        raise TomosegError("The training set is empty; box and paint some examples first.")
    if not isinstance(labels, np.ndarray) or labels.shape != (n, *images.shape[2:]):
        raise TomosegError(
            f"Training labels must be (N, H, W) = {(n, *images.shape[2:])}, "
            f"got {getattr(labels, 'shape', None)}."
        )
    if labels.dtype.kind not in "ui":
        raise TomosegError(f"Training labels must be integers, got {labels.dtype}.")
    if np.asarray(box_ids).shape != (n,) or np.asarray(positive).shape != (n,):
        raise TomosegError("box_ids and positive must hold one value per training sample.")
    if len(names) < 2:
        raise TomosegError(
            "The training set needs at least two classes (background and a feature)."
        )
    ignore = _ignore_index(ts)
    valid = labels if ignore is None else labels[labels != ignore]
    top = int(valid.max()) if valid.size else 0
    if (valid.size and int(valid.min()) < 0) or top >= len(names):
        raise TomosegError(
            f"Training labels hold class {top}, but only {len(names)} classes are named "
            f"({', '.join(names)})."
        )
    if ignore is not None and 0 <= ignore < len(names):
        raise TomosegError(
            f"ignore_index {ignore} is one of the classes; it must be >= {len(names)}."
        )
    if not np.all(np.isfinite(images)):
        raise TomosegError("The training images contain NaN or infinite values.")


def split_by_box(
    box_ids: np.ndarray, positive: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Sample indices for training and validation, splitting whole boxes.

    Positive and negative boxes are split separately, so both kinds are validated.  Each
    kind with at least two boxes gives ``round(fraction * n)`` of them (at least one, never
    all) to validation.  Without at least two positive boxes (or with ``fraction == 0``) no
    split is made: validation uses the training samples and ``info["held_out"]`` is False.
    """
    box_ids = np.asarray(box_ids)
    positive = np.asarray(positive, dtype=bool)
    boxes = np.unique(box_ids)
    pos_boxes = np.unique(box_ids[positive])
    neg_boxes = np.setdiff1d(boxes, pos_boxes)
    info: dict[str, Any] = {
        "n_boxes": int(boxes.size),
        "n_positive_boxes": int(pos_boxes.size),
        "n_negative_boxes": int(neg_boxes.size),
    }
    all_idx = np.arange(box_ids.size)
    if fraction <= 0 or pos_boxes.size < 2:
        reason = (
            "validation_fraction is 0"
            if fraction <= 0
            else f"only {pos_boxes.size} positive box(es); at least 2 are needed to hold one out"
        )
        info.update(held_out=False, reason=reason, validation_boxes=[])
        return all_idx, all_idx, info
    val_boxes = []
    for group in (pos_boxes, neg_boxes):
        if group.size < 2:
            continue
        n_val = int(min(max(round(fraction * group.size), 1), group.size - 1))
        val_boxes.extend(rng.permutation(group)[:n_val].tolist())
    is_val = np.isin(box_ids, np.asarray(val_boxes))
    info.update(held_out=True, reason="", validation_boxes=sorted(int(b) for b in val_boxes))
    return all_idx[~is_val], all_idx[is_val], info


def auto_class_weights(labels: np.ndarray, n_classes: int) -> tuple[list[float], list[int]]:
    """Inverse-frequency class weights relative to the background, clipped to
    ``[1, AUTO_WEIGHT_MAX]`` (background 1); also returns the pixel counts per class."""
    counts = np.bincount(labels.ravel(), minlength=n_classes)[:n_classes].astype(np.int64)
    weights = [1.0]
    for c in range(1, n_classes):
        if counts[c] == 0:
            weights.append(AUTO_WEIGHT_MAX)
        else:
            ratio = counts[0] / counts[c] if counts[0] else 1.0
            weights.append(float(np.clip(ratio, 1.0, AUTO_WEIGHT_MAX)))
    return weights, counts.tolist()


class _Loss:
    """Class-weighted cross-entropy (binary: BCE with logits and ``pos_weight``).

    The loss is the weighted mean over pixels, ``sum(w[y] * ce) / sum(w[y])``, with pixels
    labelled ``ignore_index`` left out.  :meth:`parts` returns the numerator and the
    denominator, so batches combine into the exact mean.
    """

    def __init__(
        self,
        weights: list[float],
        n_outputs: int,
        device: torch.device,
        ignore_index: int | None = None,
        dice_weight: float = 0.0,
    ) -> None:
        self.binary = n_outputs == 1
        self.dice_weight = float(dice_weight)
        self.weights = torch.tensor(weights, dtype=torch.float32, device=device)
        self.ignore_index = ignore_index

    def parts(
        self, logits: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float()
        valid = None
        if self.ignore_index is not None:
            valid = target != self.ignore_index
            target = torch.where(valid, target, torch.zeros_like(target))
        pixel_weight = self.weights[target]
        if self.binary:
            # BCE with pos_weight w1/w0, scaled by w0: the two-class weighted CE.
            w0, w1 = self.weights[0], self.weights[1]
            per_pixel = w0 * F.binary_cross_entropy_with_logits(
                logits[:, 0], target.to(torch.float32), pos_weight=w1 / w0, reduction="none"
            )
        else:
            per_pixel = F.cross_entropy(logits, target, weight=self.weights, reduction="none")
        if valid is not None:
            per_pixel = per_pixel * valid
            pixel_weight = pixel_weight * valid
        return per_pixel.sum(), pixel_weight.sum()

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total, norm = self.parts(logits, target)
        loss = total / norm.clamp_min(1e-12)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.soft_dice(logits, target)
        return loss

    def soft_dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """1 - mean soft Dice of the feature classes over the whole mini-batch.

        Summed over the batch ("batch Dice"), so samples from negative boxes, which hold no
        feature, count through their false positives instead of scoring 0 or 1 alone.
        """
        proba = logits_to_proba(logits)
        valid = None
        if self.ignore_index is not None:
            valid = (target != self.ignore_index).unsqueeze(1).to(proba.dtype)
            target = torch.where(target != self.ignore_index, target, torch.zeros_like(target))
        k = proba.shape[1]
        onehot = F.one_hot(target, k).permute(0, 3, 1, 2).to(proba.dtype)
        if valid is not None:
            proba, onehot = proba * valid, onehot * valid
        dims = (0, 2, 3)
        overlap = (proba * onehot).sum(dims)[1:]
        size = (proba + onehot).sum(dims)[1:]
        dice = (2.0 * overlap + 1.0) / (size + 1.0)
        return 1.0 - dice.mean()


def _lr_schedule(settings: TrainSettings) -> Callable[[int], float]:
    """Learning rate of mini-batch ``step`` (0-based).

    A linear warm-up over the first ``WARMUP_STEPS`` mini-batches (at most a tenth of the
    run), then constant (the default) or a cosine decay to ``LR_FLOOR`` times the rate.  The
    warm-up lets Adam's moment estimates settle before full-size steps: without it the
    15x15 kernels of ``tomoseg-cnn`` (9000 inputs per unit) can be pushed into dead ReLUs
    in the first few steps at a rate of 1e-3.
    """
    lr, total = float(settings.learning_rate), int(settings.iterations)
    warmup = max(1, min(WARMUP_STEPS, total // 10))
    cosine = settings.lr_schedule == "cosine"

    def schedule(step: int) -> float:
        rate = lr * min(1.0, (step + 1) / warmup)
        if cosine:
            t = min(step / total, 1.0)
            rate *= LR_FLOOR + (1.0 - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * t))
        return rate

    return schedule


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """float16 autocast on CUDA when asked; a no-op elsewhere (CPU, MPS)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _grad_scaler(enabled: bool) -> Any:
    """A CUDA gradient scaler (inactive unless ``enabled``), on old and new torch."""
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        return amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3


class _Batches:
    """Endless mini-batches of training indices: shuffled epochs, seeded."""

    def __init__(self, indices: np.ndarray, batch_size: int, rng: np.random.Generator):
        self.indices = indices
        self.batch_size = min(batch_size, indices.size)
        self.rng = rng
        self.order = np.empty(0, dtype=np.int64)
        self.pos = 0

    def next(self) -> np.ndarray:
        if self.pos + self.batch_size > self.order.size:
            self.order = self.rng.permutation(self.indices)
            self.pos = 0
        batch = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return np.sort(batch)


def _evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: np.ndarray,
    loss_fn: _Loss,
    n_classes: int,
    device: torch.device,
    use_amp: bool,
) -> tuple[float, np.ndarray]:
    """Validation loss and confusion matrix over ``indices`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    norm = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(n_classes * n_classes, dtype=torch.int64, device=device)
    try:
        with torch.no_grad():
            for start in range(0, indices.size, _EVAL_BATCH):
                idx = torch.from_numpy(indices[start : start + _EVAL_BATCH])
                x = images[idx].to(device, non_blocking=True)
                y = labels[idx].to(device, non_blocking=True).long()
                with _autocast(device, use_amp):
                    logits = model(x)
                part, weight = loss_fn.parts(logits, y)
                total += part.double()
                norm += weight.double()
                pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)
                flat = y * n_classes + pred
                if loss_fn.ignore_index is not None:
                    flat = flat[y != loss_fn.ignore_index]
                confusion += torch.bincount(flat.ravel(), minlength=n_classes * n_classes)
    finally:
        model.train(was_training)
    val_loss = float(total / norm) if float(norm) > 0 else float("nan")
    return val_loss, confusion.cpu().numpy().reshape(n_classes, n_classes)


def _preview_indices(positive: np.ndarray, candidates: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` samples, half from positive boxes, spread evenly over the candidates."""
    if n <= 0 or candidates.size == 0:
        return np.empty(0, dtype=np.int64)
    pos = candidates[positive[candidates]]
    neg = candidates[~positive[candidates]]
    n_pos = min(pos.size, max(n - neg.size, (n + 1) // 2))
    n_neg = min(neg.size, n - n_pos)

    def spread(arr: np.ndarray, m: int) -> np.ndarray:
        if m <= 0:
            return np.empty(0, dtype=np.int64)
        return arr[np.linspace(0, arr.size - 1, m).round().astype(np.int64)]

    return np.concatenate([spread(pos, n_pos), spread(neg, n_neg)]).astype(np.int64)


def _make_preview(
    model: nn.Module,
    ts: Any,
    indices: np.ndarray,
    n_classes: int,
    device: torch.device,
) -> TrainingPreview:
    images = ts.images[indices]
    centre = images.shape[1] // 2
    if len(images):
        proba = _predict(model, torch.from_numpy(images), device)
    else:
        proba = np.zeros((0, n_classes, *images.shape[2:]), np.float32)
    if n_classes == 2:
        outputs = proba[:, 1].astype(np.float32)
        probabilities = None
    else:
        outputs = proba.argmax(axis=1).astype(np.float32)
        probabilities = proba.astype(np.float16)
    return TrainingPreview(
        images=images[:, centre].astype(np.float32),
        labels=ts.labels[indices].astype(np.uint8),
        outputs=outputs,
        positive=np.asarray(ts.positive, dtype=bool)[indices],
        n_classes=n_classes,
        probabilities=probabilities,
        ignore_index=_ignore_index(ts),
    )


#: Thresholds tried when calibrating a network's mask threshold on its held-out boxes.
THRESHOLD_CANDIDATES = tuple(round(0.2 + 0.05 * i, 2) for i in range(13))  # 0.2 ... 0.8
#: How far below its best the held-out F1 of the chosen threshold may be: the highest
#: threshold within it is taken (the conservative end of the plateau, see calibrate_threshold).
PLATEAU_TOLERANCE = 0.02
#: The fractions of ``keep_start`` a fine-tuning's end tries (:func:`_choose_keep`), how
#: far below the best held-out F1 a larger one may score and still be chosen (two or three
#: held-out positive boxes of ten score a network only to about a tenth, and the average
#: is worth keeping unless they clearly disagree with it), and the least it keeps (one of
#: the fractions): the held-out boxes come from the painted tomogram, and keeping none of
#: the start on their word once cost 0.13 of the F1 on other tomograms (docs/models.md).
KEEP_FRACTIONS = (1.0, 0.5, 0.0)
KEEP_TOLERANCE = 0.1
KEEP_FLOOR = 0.5


def _box_weights(box_ids: np.ndarray) -> np.ndarray:
    """One weight per sample so that every box counts once, however many copies it has."""
    _, inverse, counts = np.unique(box_ids, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def _predict(model: nn.Module, images: torch.Tensor, device: torch.device) -> np.ndarray:
    """Class probabilities (N, K, H, W) float32 of ``images`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    parts = []
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], _EVAL_BATCH):
                x = images[start : start + _EVAL_BATCH].to(device)
                parts.append(logits_to_proba(model(x)).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(parts)


def calibrate_threshold(
    proba: np.ndarray, labels: np.ndarray, box_ids: np.ndarray, ignore_index: int | None = None
) -> tuple[float, dict[str, Any]]:
    """The mask threshold that maximises the F1 of held-out samples, and the F1 curve.

    As :mod:`napari_tomoseg.applying.inference` makes masks, a binary network marks the
    feature where its probability reaches the threshold, and a multi-class one gives a
    pixel its most probable class when that probability reaches it (else background).  Every box
    counts once (its rotated copies share one weight), and the F1 is the mean over the
    feature classes of F1 computed from the weighted counts.  The curve is smoothed over
    neighbouring thresholds: a few held-out boxes give a ragged curve, and a threshold on a
    plateau generalises better than a spike.  Of the thresholds whose smoothed F1 is within
    :data:`PLATEAU_TOLERANCE` of the best, the highest is chosen: held-out boxes of the
    training data cannot tell them apart, but on data unlike it a network's false positives
    have middling probabilities, so the conservative end of the plateau keeps precision
    (docs/benchmarks.md, "The calibrated threshold").

    Parameters
    ----------
    proba
        (N, K, H, W) the network's class probabilities, e.g. on the held-out samples.
    labels
        (N, H, W) their true classes.
    box_ids
        (N,) the box each sample was cut from; a box's copies share one weight.
    ignore_index
        A label value left out of the counts (e.g. pixels outside the boxes), or None.

    Returns
    -------
    tuple of (float, dict)
        The chosen threshold (one of ``THRESHOLD_CANDIDATES``) and the curve:
        ``candidates``, ``f1`` (unsmoothed), ``chosen``, ``f1_at_chosen``, ``f1_at_0.5``,
        ``best`` (the threshold of the highest smoothed F1).
    """
    weights = _box_weights(np.asarray(box_ids))[:, None, None]
    valid = np.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    k = proba.shape[1]
    if k == 2:  # a binary network's mask: the feature's probability reaches the threshold
        best_class, top = np.ones(labels.shape, np.int64), proba[:, 1]
    else:
        best_class, top = proba.argmax(axis=1), proba.max(axis=1)
    curve = []
    for t in THRESHOLD_CANDIDATES:
        pred = np.where(top >= t, best_class, 0)
        f1s = []
        for c in range(1, k):
            p, y = (pred == c) & valid, (labels == c) & valid
            tp = float((weights * (p & y)).sum())
            denom = float((weights * p).sum() + (weights * y).sum())
            if denom > 0:
                f1s.append(2 * tp / denom)
        curve.append(float(np.mean(f1s)) if f1s else 0.0)
    return threshold_from_curve(curve)


def threshold_from_curve(curve: list[float]) -> tuple[float, dict[str, Any]]:
    """The threshold :func:`calibrate_threshold` chooses from an F1 curve over
    ``THRESHOLD_CANDIDATES``, and the calibration record (see there)."""
    smooth = np.convolve(np.pad(curve, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    best = int(np.argmax(smooth))
    chosen = int(np.flatnonzero(smooth >= smooth[best] - PLATEAU_TOLERANCE)[-1])
    info = {
        "candidates": list(THRESHOLD_CANDIDATES),
        "f1": [round(float(v), 4) for v in curve],
        "chosen": THRESHOLD_CANDIDATES[chosen],
        "f1_at_chosen": round(float(curve[chosen]), 4),
        "f1_at_0.5": round(float(curve[THRESHOLD_CANDIDATES.index(0.5)]), 4),
        "best": THRESHOLD_CANDIDATES[best],
    }
    return THRESHOLD_CANDIDATES[chosen], info


def trained_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a run trains (all but those :func:`_keep_encoder` keeps), in order."""
    return [p for p in model.parameters() if p.requires_grad]


def auto_keeps_encoder(start_channels: int | None, in_channels: int) -> bool:
    """Whether ``fine_tune`` "auto" keeps the encoder of a shipped start of
    ``start_channels`` input channels (None: no start) for a training set of
    ``in_channels``: when it takes them as they are.  Kept, its encoder generalised better
    to unseen tomograms (docs/models.md, "Keeping the encoder"); a start fitted to other
    slices never saw them, and random weights have nothing to keep."""
    return start_channels is not None and start_channels == in_channels


def _resolved_fine_tune(
    settings: TrainSettings, start: Network | None, in_channels: int
) -> TrainSettings:
    """``settings`` with an "auto" ``fine_tune`` made "decoder" or "all"
    (:func:`auto_keeps_encoder`; a network being continued, the user's own, trains whole)."""
    if settings.fine_tune != "auto":
        return settings
    channels = start.meta.in_channels if start is not None else None
    keep = auto_keeps_encoder(channels, in_channels) and hasattr(start.model, "encoder")
    return replace(settings, fine_tune="decoder" if keep else "all")


def _keep_encoder(
    model: nn.Module, settings: TrainSettings, arch: str, started: bool, fitted_input: bool
) -> None:
    """Keep the encoder of the weights a run starts from as they are when ``fine_tune`` is
    "decoder": its parameters take no gradient (its batch norms still follow the user's
    data).  An input layer fitted to other context slices (``fitted_input``) trains all the
    same: its weights on the new slices are zeros that only training can fill.  Raise
    :class:`TomosegError` when there is nothing to keep or no encoder."""
    if settings.fine_tune == "all":
        return
    if not started:
        raise TomosegError(
            "fine_tune='decoder' keeps the encoder of the network a run starts from, but this "
            "run starts from random weights; start from a shipped network or use 'all'."
        )
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        raise TomosegError(
            f"The {arch} architecture has no encoder to keep; use fine_tune='all' with it."
        )
    for part in encoder():
        part.requires_grad_(False)
    if fitted_input:
        input_layer = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        input_layer.requires_grad_(True)


def _run_settings(settings: TrainSettings, arch: str, params: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues (JSON data)."""
    cw = settings.class_weights
    return jsonable(
        {
            "architecture": arch,
            "model_params": params,
            "iterations": int(settings.iterations),
            "batch_size": int(settings.batch_size),
            "learning_rate": float(settings.learning_rate),
            "lr_schedule": settings.lr_schedule,
            "seed": int(settings.seed),
            "validation_fraction": float(settings.validation_fraction),
            "class_weights": cw if cw is None or isinstance(cw, str) else [float(w) for w in cw],
            "augment": bool(settings.augment),
            "augmentation": resolve_augmentation(settings.augmentation),
            "start_from": settings.start_from,
            "dice_weight": float(settings.dice_weight),
            "eval_every": int(settings.eval_every),
            "replay": float(settings.replay),
            # named only when not the default, so checkpoints of earlier versions resume
            **({"fine_tune": settings.fine_tune} if settings.fine_tune != "all" else {}),
        }
    )


def _init_fingerprint(init: Network | None) -> dict[str, Any] | None:
    """What identifies the network a run continues (its weights and history length)."""
    if init is None:
        return None
    return {
        "weights_crc": state_dict_crc(init.model.state_dict()),
        "steps": len(init.meta.history),
    }


def _restore(
    saved: TrainingState,
    path: Path,
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    scaler: Any,
    rng: np.random.Generator,
    batches: _Batches,
    device: torch.device,
) -> None:
    """Put a checkpoint's state into the run's objects (all checked by the loader)."""
    try:
        model.load_state_dict(saved.model, strict=True)
        groups = optimiser.state_dict()["param_groups"]
        optimiser.load_state_dict({"state": saved.optimizer, "param_groups": groups})
        if scaler.is_enabled() and saved.scaler:
            scaler.load_state_dict(saved.scaler)
        rng.bit_generator.state = saved.rng
        torch.set_rng_state(saved.torch_rng)
        if device.type == "cuda" and saved.cuda_rng is not None:
            torch.cuda.set_rng_state(saved.cuda_rng, device)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise TomosegError(
            f"Cannot resume training from {path}: its state does not fit this run ({exc}). "
            "The checkpoint is damaged; delete it and train from the start."
        ) from None
    batches.order = np.asarray(saved.batches_order, np.int64)
    batches.pos = int(saved.batches_pos)


def average_weights(
    trained: dict[str, torch.Tensor], start: dict[str, torch.Tensor], keep: float
) -> dict[str, torch.Tensor]:
    """``keep`` times the ``start`` weights plus ``1 - keep`` times the ``trained`` ones.

    Fine-tuning a shipped network on a few boxes of one tomogram pulls it towards that
    tomogram; averaging its weights with those it started from keeps much of what the
    pretraining taught about other data (weight-space ensembling, Wortsman et al. 2022,
    "Robust fine-tuning of zero-shot models").  Counters (integer tensors) are the trained
    network's.  Measured in docs/models.md.
    """
    out = {}
    for name, value in trained.items():
        if value.is_floating_point():
            mixed = keep * start[name].to(value.device, torch.float32)
            out[name] = (mixed + (1.0 - keep) * value.float()).to(value.dtype)
        else:
            out[name] = value
    return out


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _checkpoint_path(settings: TrainSettings, resume: bool) -> Path | None:
    """The run's checkpoint file; with ``resume`` it must exist."""
    path = Path(settings.checkpoint) if settings.checkpoint is not None else None
    if resume and path is None:
        raise TomosegError(
            "Resuming needs the checkpoint file to resume from (TrainSettings.checkpoint)."
        )
    if resume and not path.is_file():  # type: ignore[union-attr]
        raise TomosegError(
            f"There is no checkpoint {path} to resume from (a run that finished "
            "deletes its checkpoint); train without resuming to start afresh."
        )
    return path


def _architecture(
    settings: TrainSettings,
    init: Network | None,
    trainset: TrainingSet,
    names: tuple[str, ...],
    in_channels: int,
) -> tuple[str, dict[str, Any]]:
    """Architecture and parameters of the run: the settings', or those of the network it
    continues, which must fit the settings and the training set."""
    if init is None:
        return settings.architecture, resolved_params(settings.architecture, settings.model_params)
    meta0 = init.meta
    problems = []
    if meta0.architecture != settings.architecture:
        problems.append(
            f"the network is a {meta0.architecture!r} but the settings ask for "
            f"{settings.architecture!r} (use TrainSettings.continuing(network, ...))"
        )
    if meta0.in_channels != in_channels:
        problems.append(
            f"the network takes {meta0.in_channels} input channel(s), the training set "
            f"has {in_channels} (context slices differ)"
        )
    if tuple(meta0.class_names) != names:
        problems.append(
            f"the network's classes {list(meta0.class_names)} differ from the training "
            f"set's {list(names)}"
        )
    net_vs = meta0.voxel_size.inplane if meta0.voxel_size else None
    set_vs = trainset.voxel_size.inplane if trainset.voxel_size else None
    if net_vs and set_vs and abs(net_vs - set_vs) > VOXEL_SIZE_TOLERANCE * net_vs:
        problems.append(
            f"the network was trained at voxel size {net_vs:g} A, the training set is at "
            f"{set_vs:g} A (bin or rescale the tomogram to the network's voxel size)"
        )
    if problems:
        raise TomosegError("Cannot continue training: " + "; ".join(problems) + ".")
    return meta0.architecture, dict(meta0.model_params)


@dataclass
class _Data:
    """The training set as tensors, and which samples train and which validate."""

    images: torch.Tensor
    labels: torch.Tensor
    train_idx: np.ndarray
    val_idx: np.ndarray
    split: dict[str, Any]


def _split_or_resume(
    trainset: TrainingSet,
    settings: TrainSettings,
    rng: np.random.Generator,
    model: nn.Module,
    device: torch.device,
    ckpt_path: Path | None,
    fingerprint: dict[str, Any] | None,
    replay: TrainingSet | None = None,
) -> tuple[_Data, TrainingState | None]:
    """Split the samples by box, or, resuming (``fingerprint`` given), load the checkpoint
    and take its split.  ``replay`` samples follow the training set's and only train.
    Returns the data on the host and the loaded state."""
    n_own, n_classes = trainset.images.shape[0], len(trainset.class_names)
    n_samples = n_own + (len(replay) if replay is not None else 0)
    train_idx, val_idx, split = split_by_box(
        trainset.box_ids, trainset.positive, float(settings.validation_fraction), rng
    )
    train_idx = np.concatenate([train_idx, np.arange(n_own, n_samples)])
    saved: TrainingState | None = None
    if fingerprint is not None:
        saved = load_checkpoint(
            ckpt_path,  # type: ignore[arg-type]
            fingerprint=fingerprint,
            model=model,
            parameters=trained_parameters(model),
            n_samples=int(n_samples),
        )
        train_idx, val_idx, split = saved.train_idx, saved.val_idx, dict(saved.split)
        if len(saved.class_weights) != n_classes:
            raise TomosegError(
                f"Cannot resume training from {ckpt_path}: it holds {len(saved.class_weights)} "
                f"class weights for {n_classes} classes. The checkpoint is damaged; delete it "
                "and train from the start."
            )
        if saved.device.split(":")[0] != device.type:
            warnings.warn(
                f"Resuming on {device} a run checkpointed on {saved.device}: it continues "
                "correctly, but not bit for bit as it would have on the same device.",
                UserWarning,
                stacklevel=3,
            )
    if not split["held_out"]:
        warnings.warn(
            f"Validating on the training boxes ({split['reason']}); the validation metrics "
            "will be optimistic. Box more examples for an honest estimate.",
            UserWarning,
            stacklevel=3,
        )
    images, labels = trainset.images, trainset.labels
    if replay is not None:  # (no copy of the user's samples without one)
        images = np.concatenate([images, replay.images])
        labels = np.concatenate([labels, replay.labels])
    images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    labels = torch.from_numpy(np.ascontiguousarray(labels))
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    return _Data(images, labels, train_idx, val_idx, split), saved


def _no_replay(start: Network | None, settings: TrainSettings, replay_from: Any) -> str:
    """Why a run replays nothing ("" when it replays)."""
    if start is None:
        return "not started from a shipped network"
    if settings.replay <= 0:
        return "replay is 0"
    return "" if replay_from is not None else "no replay source given"


def _given_weights(settings: TrainSettings, names: tuple) -> list[float] | None:
    """The class weights the settings list, one per class (None: not listed)."""
    if settings.class_weights is None or isinstance(settings.class_weights, str):
        return None
    weights = [float(w) for w in settings.class_weights]
    if len(weights) != len(names):
        raise TomosegError(
            f"class_weights has {len(weights)} values but the training set has "
            f"{len(names)} classes ({', '.join(names)})."
        )
    return weights


def _class_weights(
    settings: TrainSettings, saved: TrainingState | None, train_labels: np.ndarray, names: tuple
) -> tuple[list[float], np.ndarray]:
    """The cross-entropy weight of each class, and the pixel count of each class in the
    training samples (a warning names a class with none)."""
    n_classes = len(names)
    counts = np.bincount(train_labels.ravel(), minlength=n_classes)[:n_classes]
    given = _given_weights(settings, names)
    if saved is not None:
        weights = list(saved.class_weights)
    elif settings.class_weights == "auto":
        weights, _ = auto_class_weights(train_labels, n_classes)
    else:
        weights = given or [1.0] * n_classes
    absent = [names[c] for c in range(1, n_classes) if counts[c] == 0]
    if absent:
        warnings.warn(
            f"No training pixels of class(es) {', '.join(absent)}; the network cannot learn "
            "them. Paint them in some positive boxes.",
            UserWarning,
            stacklevel=3,
        )
    return weights, counts


class _Run:
    """One run's moving parts: the model and optimiser, the mini-batches, the history, the
    best state so far, and writing it all to the checkpoint."""

    def __init__(
        self,
        model: nn.Module,
        settings: TrainSettings,
        data: _Data,
        loss_fn: _Loss,
        names: tuple,
        device: torch.device,
        use_amp: bool,
        rng: np.random.Generator,
        weights: list[float],
    ):
        self.model, self.settings, self.data, self.loss_fn = model, settings, data, loss_fn
        self.names, self.device, self.use_amp, self.rng = names, device, use_amp, rng
        self.optimiser = torch.optim.Adam(
            trained_parameters(model), lr=float(settings.learning_rate)
        )
        self.scaler = _grad_scaler(use_amp)
        self.batches = _Batches(data.train_idx, int(settings.batch_size), rng)
        self.schedule = _lr_schedule(settings)
        self.augmentation = resolve_augmentation(settings.augmentation)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.steps_done = 0
        self.checkpointed = -1
        self.weights = [float(w) for w in weights]

    def restore(self, saved: TrainingState, path: Path) -> None:
        _restore(
            saved,
            path,
            self.model,
            self.optimiser,
            self.scaler,
            self.rng,
            self.batches,
            self.device,
        )
        self.history, self.best, self.steps_done = saved.history, saved.best, saved.step
        self.checkpointed = self.steps_done

    def write_checkpoint(self, path: Path, fingerprint: dict[str, Any]) -> None:
        """Save the run's state (a failed write warns: training goes on without it)."""
        best = self.best
        state = TrainingState(
            step=self.steps_done,
            fingerprint=fingerprint,
            model=self.model.state_dict(),
            optimizer=self.optimiser.state_dict()["state"],
            scaler=self.scaler.state_dict(),
            history=jsonable(self.history),
            best=None
            if best is None
            else {
                **jsonable({k: v for k, v in best.items() if k != "state"}),
                "state": best["state"],
            },
            rng=self.rng.bit_generator.state,
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            batches_order=self.batches.order,
            batches_pos=self.batches.pos,
            train_idx=self.data.train_idx,
            val_idx=self.data.val_idx,
            split=jsonable(self.data.split),
            class_weights=[float(w) for w in self.weights],
            device=str(self.device),
        )
        try:
            save_checkpoint(path, state)
        except TomosegError as exc:
            warnings.warn(
                f"Could not write the training checkpoint ({exc}); training goes on, but a "
                "crash now could not be resumed.",
                UserWarning,
                stacklevel=4,
            )
            return
        self.checkpointed = self.steps_done

    def validation_metrics(self) -> tuple[float, dict[str, Any]]:
        """Validation loss and metrics of the model as it is."""
        d = self.data
        val_loss, conf = _evaluate(
            self.model,
            d.images,
            d.labels,
            d.val_idx,
            self.loss_fn,
            len(self.names),
            self.device,
            self.use_amp,
        )
        return val_loss, metrics_from_confusion(conf, self.names)

    def evaluate(self, step: int) -> dict[str, float]:
        """Validate, keep the state if it is the best so far; the history's entries."""
        val_loss, metrics = self.validation_metrics()
        score = metrics["mean_foreground_f1"]
        best = self.best
        if (
            best is None
            or score > best["score"]
            or (score == best["score"] and val_loss < best["val_loss"])
        ):
            self.best = {
                "score": score,
                "val_loss": val_loss,
                "step": step,
                "state": _state_copy(self.model),
                "metrics": metrics,
            }
        out = {"val_loss": val_loss, "val_mean_dice": score}
        for cname in self.names[1:]:
            out[f"val_dice_{cname}"] = metrics["classes"][cname]["f1"]
        return out

    def step(self, i: int) -> float:
        """Train on mini-batch ``i``; returns its loss."""
        settings, device, rng = self.settings, self.device, self.rng
        idx = torch.from_numpy(self.batches.next())
        x, y = self.data.images[idx], self.data.labels[idx]
        if settings.augment:
            x, y = flip_rotate(x, y, rng)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True).long()
        if settings.augment and any(self.augmentation.values()):
            x, y = augment_batch(x, y, rng, self.augmentation)
        for group in self.optimiser.param_groups:
            group["lr"] = self.schedule(i)
        self.optimiser.zero_grad(set_to_none=True)
        with _autocast(device, self.use_amp):
            logits = self.model(x)
        loss = self.loss_fn(logits, y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimiser)
        self.scaler.update()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise TomosegError(
                f"Training diverged at mini-batch {i + 1} (the loss is {loss_value}); "
                "use a smaller learning rate."
            )
        return loss_value


def _loop(
    run: _Run,
    step0: int,
    should_stop: Callable[[], bool],
    checkpoint: Callable[[], None] | None,
) -> Generator[Progress, None, bool]:
    """The mini-batches left to do, validating and checkpointing on the way; returns
    whether the run was stopped by request."""
    settings, total = run.settings, int(run.settings.iterations)
    for i in range(run.steps_done, total):
        if should_stop():
            if checkpoint is not None and run.checkpointed != run.steps_done:
                checkpoint()
            return True
        loss_value = run.step(i)
        run.steps_done = i + 1
        entry: dict[str, Any] = {"step": step0 + run.steps_done, "loss": loss_value}
        if run.steps_done % settings.eval_every == 0 or run.steps_done == total:
            entry.update(run.evaluate(step0 + run.steps_done))
        run.history.append(entry)
        if (
            checkpoint is not None
            and run.steps_done % settings.checkpoint_every == 0
            and run.steps_done < total
        ):
            checkpoint()
        yield Progress(
            stage="train",
            step=run.steps_done,
            total=total,
            message=f"mini-batch {run.steps_done}/{total}, loss {loss_value:.4f}",
            metrics={k: float(v) for k, v in entry.items() if k != "step"},
        )
    return False


def _finish_model(
    run: _Run, trainset: TrainingSet, step0: int, start_state: dict[str, torch.Tensor] | None
) -> dict[str, Any] | None:
    """Put the best weights into the model (averaged with the starting ones, see
    :func:`_choose_keep`) and leave it in eval mode; ``run.best`` then holds their
    validation metrics.  Returns how the average was chosen (None: no starting weights)."""
    if run.best is None:  # stopped before the first evaluation: judge the weights as they are
        extra = run.evaluate(step0 + run.steps_done)
        if run.history:
            run.history[-1].update(extra)
    best = run.best
    assert best is not None
    run.model.load_state_dict(best["state"])
    choice = None
    if start_state is not None:  # the returned network, and its validation metrics
        choice = _choose_keep(run, trainset, best["state"], start_state)
        run.model.load_state_dict(average_weights(best["state"], start_state, choice["kept"]))
        best["metrics"] = run.validation_metrics()[1]
    run.model.eval()
    return choice


def _choose_keep(
    run: _Run,
    trainset: TrainingSet,
    best_state: dict[str, torch.Tensor],
    start_state: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """How much of the starting network's weights the result keeps: the largest of
    :data:`KEEP_FRACTIONS` times ``keep_start`` whose average scores the user's held-out
    boxes within :data:`KEEP_TOLERANCE` of the best one, but at least :data:`KEEP_FLOOR`
    times ``keep_start`` (the trained weights alone set the best, and are never kept).  The
    average keeps what the pretraining knew of other data, but where the user paints a
    feature otherwise than the simulator's labels (a narrower membrane, a microtubule's wall
    without its lumen) it pulls the result back to the simulator's way, and the held-out
    boxes show that (docs/models.md, "Boxes painted another way").  Without held-out boxes
    nothing can judge, and ``keep_start`` is kept.  ``calibration`` is the kept average's
    :func:`_calibrate` (None when nothing was tried), so that it is not computed again."""
    keep = float(run.settings.keep_start)
    tried = sorted({round(keep * f, 4) for f in KEEP_FRACTIONS}, reverse=True)
    if not run.data.split["held_out"] or keep == 0:
        return {"kept": keep, "held_out_f1": {}, "calibration": None}
    calibrations = {}
    for fraction in tried:
        run.model.load_state_dict(average_weights(best_state, start_state, fraction))
        calibrations[fraction] = _calibrate(run, trainset)
    scores = {f: cal[1]["f1_at_chosen"] for f, cal in calibrations.items()}
    top = max(scores.values())
    kept = max(
        next(f for f in tried if scores[f] >= top - KEEP_TOLERANCE), round(keep * KEEP_FLOOR, 4)
    )
    return {
        "kept": kept,
        "held_out_f1": {str(f): round(v, 4) for f, v in scores.items()},
        "calibration": calibrations[kept],
    }


def kept_described(metadata: dict[str, Any]) -> str:
    """A sentence on how much of its starting network a run's result kept (its metadata's
    ``keep_start``) and what the held-out boxes said, or "" for nothing kept or tried."""
    kept, scores = metadata.get("keep_start") or 0.0, metadata.get("keep_start_held_out_f1")
    if not scores:
        return f"kept {kept:.0%} of the starting network's weights" if kept else ""
    tried = ", ".join(f"{float(k):.0%} {v:.3f}" for k, v in scores.items())
    floor = (
        "; the least a run keeps"
        if max(scores.values()) - KEEP_TOLERANCE > scores.get(str(kept), 0.0)
        else ""
    )
    return (
        f"kept {kept:.0%} of the starting network's weights{floor} (held-out F1 keeping {tried})"
    )


def fine_tune_described(metadata: dict[str, Any]) -> str:
    """A sentence when a run kept its start's encoder (``fine_tune`` "decoder"), else ""."""
    if metadata.get("fine_tune") != "decoder":
        return ""
    return "its encoder kept as it started, the rest trained (fine-tune 'all' trains every layer)"


def _calibrate(run: _Run, trainset: TrainingSet) -> tuple[float, dict[str, Any]]:
    """The mask threshold, calibrated on the held-out boxes (or the training boxes)."""
    d = run.data
    idx = d.val_idx  # the training boxes themselves when none are held out
    threshold, calibration = calibrate_threshold(
        _predict(run.model, d.images[torch.from_numpy(idx)], run.device),
        trainset.labels[idx],
        np.asarray(trainset.box_ids)[idx],
        _ignore_index(trainset),
    )
    calibration["on"] = "held-out boxes" if d.split["held_out"] else "training boxes"
    return threshold, calibration


def _run_metadata(
    run: _Run, settings: TrainSettings, weights: list[float], counts: np.ndarray, step0: int
) -> dict[str, Any]:
    """How the run split, weighted and trained (``TrainResult.metadata``, in part)."""
    data, best = run.data, run.best
    assert best is not None
    return {
        "split": jsonable(data.split),
        "validated_on": "held-out boxes" if data.split["held_out"] else "training boxes",
        "n_train_samples": int(data.train_idx.size),
        "n_validation_samples": int(data.val_idx.size),
        "class_weights": [float(w) for w in weights],
        "dice_weight": float(settings.dice_weight),
        "augmentation": run.augmentation if settings.augment else "off",
        "fine_tune": settings.fine_tune,
        "class_pixel_counts": [int(c) for c in counts],
        "best_step": int(best["step"]),
        "steps_done": int(run.steps_done),
        "continued_from_step": int(step0),
        "learning_rate": float(settings.learning_rate),
        "batch_size": int(settings.batch_size),
        "seed": int(settings.seed),
        "validation_fraction": float(settings.validation_fraction),
        "mixed_precision": run.use_amp,
    }


def _keep_planes(meta: NetworkMeta, origin: Network | None) -> bool:
    """Whether ``meta`` takes the slice planes of ``origin``, the network training started
    from: a binary network of the same feature applied in three planes (a shipped membrane
    network) passes on three planes and its three-plane threshold, since the held-out
    boxes are XY slices and choose only the XY threshold."""
    own = getattr(origin, "meta", None)
    if own is None or own.planes != 3 or (len(own.class_names), len(meta.class_names)) != (2, 2):
        return False
    if (feature_of(own.class_names[1]) or own.class_names[1]) != (
        feature_of(meta.class_names[1]) or meta.class_names[1]
    ):
        return False
    meta.planes, meta.threshold_three_planes = 3, own.threshold_three_planes
    return True


def _network_meta(
    trainset: TrainingSet,
    arch: str,
    params: dict[str, Any],
    threshold: float,
    history: list[dict[str, Any]],
    metrics: dict[str, Any],
) -> NetworkMeta:
    """What the trained network's file records about it."""
    meta_in = dict(getattr(trainset, "metadata", {}) or {})
    names = tuple(str(n) for n in trainset.class_names)
    n_samples, in_channels = trainset.images.shape[:2]
    split = metrics["training"]["split"]
    box_size = meta_in.get("box_size")
    context = meta_in.get("context_slices", (in_channels - 1) // 2)
    colours = meta_in.get("class_colors")
    return NetworkMeta(
        architecture=arch,
        model_params=params,
        in_channels=int(in_channels),
        n_classes=len(names),
        class_names=names,
        class_colors=tuple(colours) if colours and len(colours) == len(names) else (),
        voxel_size=trainset.voxel_size,
        box_size=int(box_size) if _positive_int(box_size) else int(trainset.images.shape[-1]),
        normalisation=jsonable(dict(meta_in.get("normalisation") or {})),
        context_slices=int(context) if _is_int(context) and context >= 0 else 0,
        threshold=float(threshold),
        trainset_summary=jsonable(
            {
                "n_samples": int(n_samples),
                "n_positive_samples": int(np.count_nonzero(trainset.positive)),
                **{k: split[k] for k in ("n_boxes", "n_positive_boxes", "n_negative_boxes")},
                "metadata": meta_in,
            }
        ),
        history=jsonable(history),
        metrics=jsonable(metrics),
        versions=package_versions(),
    )


def iter_train(
    trainset: TrainingSet,
    settings: TrainSettings | None = None,
    *,
    init: Network | None = None,
    should_stop: Callable[[], bool] = never_stop,
    resume: bool = False,
    keep_checkpoint: bool = False,
    replay_from: Any = None,
) -> Generator[Progress, None, TrainResult]:
    """Train a network on ``trainset``; yields progress each mini-batch, returns the result.

    With ``settings.checkpoint`` set, the run's state is written there every
    ``settings.checkpoint_every`` mini-batches and when stopped (an existing file is
    replaced), and deleted when all mini-batches are done.

    Parameters
    ----------
    trainset
        The samples (:func:`~napari_tomoseg.learning.trainset.build_training_set`).
    settings
        How to train (:class:`TrainSettings`; the defaults when None).
    init
        A network to continue training (same architecture, classes and input channels as
        the settings and training set, else :class:`TomosegError`); it is not modified.
    should_stop
        Checked before every mini-batch; when true the loop ends and the best network so
        far is returned with ``stopped=True``.
    resume
        Continue the run saved in ``settings.checkpoint``.  The training set, ``init`` and
        the settings that shape the run (architecture, its parameters, iterations, batch
        size, learning rate and schedule, seed, validation fraction, class weights,
        augmentation, evaluation interval) must be those it was started with, else
        :class:`TomosegError` says what differs.
    keep_checkpoint
        Keep the checkpoint of a finished run too (with its final state, so resuming it
        gives the same result at once): for a caller that deletes it only once the network
        is safely saved.
    replay_from
        Where a run that starts from a shipped network takes the samples it replays
        (``settings.replay``): :class:`napari_tomoseg.simulator.replay.SimulatedReplay`, as
        the command line, the Train widget and the demo pass it; None replays nothing.

    Returns
    -------
    TrainResult
        The best network seen (with its calibrated threshold), its validation metrics, the
        history and a preview.
    """
    settings = settings or TrainSettings()
    settings.validate()
    _check_trainset(trainset)
    ckpt_path = _checkpoint_path(settings, resume)
    t_start = time.perf_counter()
    names = tuple(str(n) for n in trainset.class_names)
    n_samples, in_channels = trainset.images.shape[:2]
    device = resolve_device(settings.device)
    use_amp = bool(settings.mixed_precision) and device.type == "cuda"
    arch, params = _architecture(settings, init, trainset, names, int(in_channels))
    if init is not None:
        start, started_from = None, "the network being continued"
    else:
        start, started_from = starting_network(
            settings.start_from, names, arch, int(in_channels), params
        )
    if start is not None:  # strengths the settings leave unnamed: those of a fine-tuning
        fine = {**FINE_TUNING_AUGMENTATION, **settings.augmentation}
        settings = replace(settings, augmentation=fine)
    settings = _resolved_fine_tune(settings, start, int(in_channels))
    fingerprint: dict[str, Any] = {}
    if ckpt_path is not None:
        fingerprint = {
            "trainset": trainset_fingerprint(trainset),
            "settings": _run_settings(settings, arch, params),
            "init": _init_fingerprint(init if init is not None else start),
        }
        if not _no_replay(start, settings, replay_from):
            fingerprint["replay"] = replay_from.recipe()

    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    network = Network.create(arch, in_channels, len(names), model_params=params, class_names=names)
    model = network.model
    if init is not None:
        model.load_state_dict(init.model.state_dict())
    elif start is not None:
        transfer_weights(start, network)
    start_state = _state_copy(model) if start is not None and settings.keep_start > 0 else None
    fitted_input = start is not None and start.meta.in_channels != in_channels
    _keep_encoder(model, settings, arch, start is not None or init is not None, fitted_input)
    model.to(device)
    model.train()

    _given_weights(settings, names)  # a wrong list fails before the replay is simulated
    replay, replay_info = None, {"samples": 0, "why": _no_replay(start, settings, replay_from)}
    if not replay_info["why"]:
        replay, replay_info = yield from replay_from(
            trainset, float(settings.replay), int(settings.seed), should_stop
        )
    data, saved = _split_or_resume(
        trainset, settings, rng, model, device, ckpt_path, fingerprint if resume else None, replay
    )
    own = data.train_idx[data.train_idx < len(trainset)]  # weights and warnings: the user's
    weights, counts = _class_weights(settings, saved, trainset.labels[own], names)
    loss_fn = _Loss(
        weights, model.n_outputs, device, _ignore_index(trainset), float(settings.dice_weight)
    )
    run = _Run(model, settings, data, loss_fn, names, device, use_amp, rng, weights)
    if saved is not None:
        run.restore(saved, ckpt_path)  # type: ignore[arg-type]
    history0 = [dict(h) for h in (init.meta.history if init is not None else [])]
    step0 = int(history0[-1].get("step", len(history0))) if history0 else 0

    def checkpoint() -> None:
        run.write_checkpoint(ckpt_path, fingerprint)  # type: ignore[arg-type]

    stopped = yield from _loop(run, step0, should_stop, checkpoint if ckpt_path else None)
    finished = not stopped and ckpt_path is not None
    if finished and keep_checkpoint and run.checkpointed != run.steps_done:
        checkpoint()
    model.requires_grad_(True)  # the encoder kept by fine_tune="decoder" is an ordinary one again
    keep_choice = _finish_model(run, trainset, step0, start_state)
    calibrated = keep_choice["calibration"] if keep_choice is not None else None
    threshold, calibration = calibrated or _calibrate(run, trainset)
    preview = _make_preview(
        model,
        trainset,
        _preview_indices(
            np.asarray(trainset.positive, bool), data.val_idx, int(settings.preview_samples)
        ),
        len(names),
        device,
    )
    best = run.best
    assert best is not None
    metadata = {
        **_run_metadata(run, settings, weights, counts, step0),
        "resumed_from_step": None if saved is None else int(saved.step),
        "threshold_calibration": calibration,
        "started_from": started_from,
        "keep_start": keep_choice["kept"] if keep_choice is not None else 0.0,
        "keep_start_held_out_f1": keep_choice["held_out_f1"] if keep_choice else {},
        "replay": replay_info,
    }
    full_history = history0 + run.history
    metrics = {**best["metrics"], "training": metadata}
    network.meta = _network_meta(trainset, arch, params, threshold, full_history, metrics)
    if _keep_planes(network.meta, init if init is not None else start):
        metadata["planes_from"] = "the network it started from"
        network.meta.metrics["training"]["planes_from"] = metadata["planes_from"]
    result = TrainResult(
        network=network,
        history=full_history,
        metrics=best["metrics"],
        preview=preview,
        stopped=stopped,
        seconds=time.perf_counter() - t_start,
        device=str(device),
        metadata=metadata,
    )
    if not stopped and not keep_checkpoint:
        remove_checkpoint(ckpt_path)  # the run is complete: nothing left to resume
    return result


def train(
    trainset: TrainingSet,
    settings: TrainSettings | None = None,
    *,
    init: Network | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
    replay_from: Any = None,
) -> TrainResult:
    """Run :func:`iter_train` to the end, passing each progress event to ``progress``.

    Parameters
    ----------
    trainset, settings, init, resume, replay_from
        As for :func:`iter_train`.
    progress
        Called with each :class:`~napari_tomoseg.progress.Progress` event, or None.
    should_stop
        As for :func:`iter_train`; None never stops.
    """
    return drive(
        iter_train(
            trainset,
            settings,
            init=init,
            should_stop=should_stop or never_stop,
            resume=resume,
            replay_from=replay_from,
        ),
        progress,
    )


__all__ = [
    "AUTO_WEIGHT_MAX",
    "TrainResult",
    "TrainSettings",
    "TrainingPreview",
    "auto_class_weights",
    "average_weights",
    "calibrate_threshold",
    "threshold_from_curve",
    "class_metrics",
    "confusion_matrix",
    "iter_train",
    "metrics_from_confusion",
    "select_device",
    "split_by_box",
    "train",
]
