"""Simulated boxes mixed into fine-tuning, so that a shipped network keeps what it knew.

Fine-tuned on the boxes of one tomogram, a shipped network narrows to that tomogram's look
and loses on tomograms unlike it (``docs/models.md``, "Replay").  So fine-tuning also
trains on boxes of a few tomograms simulated as the shipped networks' pretraining drew
them (imaging, specimen, feature sizes and flaws at random), the user's features painted
from the simulator's truth.  The replayed samples only ever train: the held-out boxes,
the validation and the calibrated threshold stay the user's own.  Training takes them from
a :class:`SimulatedReplay` (``iter_train(..., replay_from=SimulatedReplay())``), as the
command line, the Train widget and the demo do.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

import numpy as np

from ..errors import TomosegError
from ..learning.pretrained import feature_of
from ..learning.trainset import TrainingSet, TrainsetSettings, concatenate
from ..progress import Progress

#: Tomograms simulated for one replay set, and their slice size (pixels at the training
#: set's voxel size).
TOMOGRAMS = 8
SLICE_SIZE = 192
#: Positive boxes per feature and negative boxes cut from each simulated tomogram.
BOXES = 8
#: Each tomogram is simulated at a voxel size drawn log-uniformly between these multiples
#: of the training set's and resampled to it, as pretraining drew 6-16 A for 10 A networks.
VOXEL_FACTORS = (0.6, 1.6)
#: Most tomograms drawn per tomogram kept, when some have none of a feature to box.
DRAWS_PER_TOMOGRAM = 3


def recipe() -> dict[str, Any]:
    """How replay sets are made (a resumed run must make the same one)."""
    return {
        "tomograms": TOMOGRAMS,
        "slice_size": SLICE_SIZE,
        "boxes": BOXES,
        "voxel_factors": list(VOXEL_FACTORS),
    }


def replay_features(class_names: Sequence[str]) -> list[str] | None:
    """The simulator class each feature of ``class_names`` (background first) means, or
    None when one means none or two mean the same (nothing to replay then)."""
    features = [feature_of(name) for name in class_names[1:]]
    if not features or None in features or len(set(features)) < len(features):
        return None
    return features  # type: ignore[return-value]


def _box_settings(trainset: TrainingSet, ncopy: int, seed: int) -> TrainsetSettings:
    """The training set's own way of cutting boxes (box size, context slices,
    normalisation), with ``ncopy`` copies per box."""
    recorded = dict(trainset.metadata.get("settings") or {})
    known = {k: v for k, v in recorded.items() if k in TrainsetSettings.__dataclass_fields__}
    norm = trainset.normalisation
    settings = TrainsetSettings(
        **{
            **known,
            "box_size": trainset.box_size,
            "context_slices": (trainset.in_channels - 1) // 2,
            "normalisation": norm.mode,
            "clamp_sigma": norm.clamp_sigma,
            "ncopy": ncopy,
            "seed": seed,
        }
    )
    settings.validate()
    return settings


def _simulated(rng: np.random.Generator, voxel: float) -> Any:
    """One tomogram drawn as the shipped networks' pretraining drew them, resampled to
    ``voxel`` Angstrom."""
    from .demo import at_voxel_size
    from .synthetic import log_uniform, random_settings, simulate_tomogram

    drawn = log_uniform(rng, *(f * voxel for f in VOXEL_FACTORS))
    settings = random_settings(
        rng,
        (round(SLICE_SIZE * voxel / drawn),) * 2,
        voxel_size=drawn,
        imperfect=True,
        microtubule_variety=True,
        membrane_variety=True,
        variety_ranges={"microtubule_elevation_deg": (4.0, 90.0)},
    )
    return at_voxel_size(simulate_tomogram(settings), voxel)


def iter_replay_set(
    trainset: TrainingSet,
    fraction: float,
    seed: int,
    should_stop: Callable[[], bool],
) -> Generator[Progress, None, tuple[TrainingSet | None, dict[str, Any]]]:
    """Simulate the replay set for ``trainset``: about ``fraction`` times its samples, from
    :data:`TOMOGRAMS` tomograms at its voxel size (10 A when unknown), painted with its
    classes.  Returns (the set, or None when there is nothing to replay, and what was done
    or why not)."""
    from .demo import trainset_from_truth

    features = replay_features(trainset.class_names)
    if features is None:
        return None, {"samples": 0, "why": "a feature the simulator does not draw"}
    voxel = trainset.voxel_size.inplane if trainset.voxel_size else 10.0
    ncopy = max(1, math.ceil(fraction * len(trainset) / (TOMOGRAMS * 2 * BOXES)))
    rng = np.random.default_rng([seed, 7])
    t0, sets, draws, most = time.perf_counter(), [], 0, DRAWS_PER_TOMOGRAM * TOMOGRAMS
    while len(sets) < TOMOGRAMS and draws < most:
        if should_stop():
            return None, {"samples": 0, "why": "stopped"}
        draws += 1
        sim = _simulated(rng, voxel)
        box = _box_settings(trainset, ncopy, seed + draws)
        try:
            cut = trainset_from_truth(
                sim, features, BOXES, BOXES, seed=seed + draws, trainset_settings=box
            )
        except TomosegError:  # none of a feature in this tomogram: draw another
            continue
        sets.append(dataclasses.replace(cut, class_names=trainset.class_names))
        yield Progress(
            "replay",
            len(sets),
            TOMOGRAMS,
            message=f"simulated tomogram {len(sets)}/{TOMOGRAMS} for replay",
        )
    if not sets:
        return None, {"samples": 0, "why": f"none of {most} simulated tomograms held them"}
    replay = concatenate(sets, source=f"replay: {len(sets)} simulated tomograms")
    target = max(1, round(fraction * len(trainset)))
    if len(replay) > target:  # whole boxes come in copies: keep as many samples as asked
        replay = replay.subset(np.sort(rng.choice(len(replay), target, replace=False)))
    return replay, {
        "samples": len(replay),
        "samples_with_features": int(replay.positive.sum()),
        "tomograms": len(sets),
        "voxel_size": voxel,
        "seconds": round(time.perf_counter() - t0, 1),
    }


class SimulatedReplay:
    """Where :func:`~napari_tomoseg.learning.training.iter_train` takes replayed samples
    from: :func:`iter_replay_set`, and the :func:`recipe` a resumed run must share."""

    def recipe(self) -> dict[str, Any]:
        return recipe()

    def __call__(
        self,
        trainset: TrainingSet,
        fraction: float,
        seed: int,
        should_stop: Callable[[], bool],
    ) -> Generator[Progress, None, tuple[TrainingSet | None, dict[str, Any]]]:
        return iter_replay_set(trainset, fraction, seed, should_stop)


def described(info: dict[str, Any] | None) -> str:
    """A sentence on what a run replayed (its ``metadata["replay"]``), or "" for nothing."""
    if not info or not info.get("samples"):
        return ""
    return (
        f"also trained on {info['samples']} samples of {info['tomograms']} simulated "
        "tomograms (replay)"
    )


__all__ = ["SimulatedReplay", "described", "iter_replay_set", "recipe", "replay_features"]
