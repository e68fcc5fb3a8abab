"""The whole TomoSeg job on a simulated tomogram, with boxes taken from its ground truth.

Used by ``tomoseg demo`` (a headless run of the main job), by the end-to-end tests and by the
benchmarks: boxes are chosen the way a user would (positives full of the feature, negatives
free of it), the feature is "painted" from the ground truth, a network is trained, applied to
the whole tomogram and scored against the truth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.boxes import DEFAULT_BOX_SIZE, Box, grid_box_sums
from ..errors import TomosegError
from ..progress import Progress, drive

#: Box centres are searched on this pixel grid (finer adds little).
_GRID_STEP = 8


def _box_fractions(mask2d: np.ndarray, box_size: int, step: int) -> tuple[np.ndarray, ...]:
    """Fraction of ``mask2d`` inside every box of ``box_size`` whose corner lies on the grid."""
    sums, yy, xx = grid_box_sums(mask2d, box_size, step)
    return sums / float(box_size * box_size), yy, xx


#: The part of Z boxes are drawn from (as fractions of the depth).
BOX_Z_RANGE = (0.2, 0.8)


def central_slices(depth: int, z_range: tuple[float, float] = BOX_Z_RANGE) -> tuple[int, int]:
    """``(z0, z1)``: the slices of ``z_range`` (as fractions) of a volume ``depth`` deep."""
    z0 = int(depth * z_range[0])
    return z0, max(int(depth * z_range[1]), z0 + 1)


def boxes_from_ground_truth(
    labels: np.ndarray,
    feature: int | Sequence[int],
    *,
    n_positive: int = 10,
    n_negative: int = 40,
    box_size: int = DEFAULT_BOX_SIZE,
    min_fraction: float = 0.04,
    seed: int = 0,
    z_range: tuple[float, float] = BOX_Z_RANGE,
) -> tuple[list[Box], list[Box]]:
    """Positive boxes rich in ``feature`` and negative boxes free of it, like a user's.

    Slices are taken from the central part of Z, where a real reconstruction is best.
    Positives are spread over slices and positions; negatives hold no feature pixel (other
    structures are fine, as the protocol asks).  Raises :class:`TomosegError` if the volume
    cannot supply them.

    Parameters
    ----------
    labels
        The (Z, Y, X) ground-truth labels.
    feature
        The label value(s) of the feature; negatives are free of all of them.
    n_positive, n_negative
        How many boxes of each kind.
    box_size
        The box side in pixels.
    min_fraction
        The least fraction of a positive box's pixels that must be feature.
    seed
        The seed of the random choice among candidate boxes.
    z_range
        The part of Z boxes are drawn from, as fractions of the depth.

    Returns
    -------
    tuple of (list of Box, list of Box)
        The positive and the negative boxes.
    """
    values = [feature] if isinstance(feature, (int, np.integer)) else list(feature)
    nz, ny, nx = labels.shape
    if ny < box_size or nx < box_size:
        raise TomosegError(f"A {box_size}-pixel box does not fit in a {ny} x {nx} slice.")
    rng = np.random.default_rng(seed)
    z_lo, z_hi = central_slices(nz, z_range)
    half = box_size // 2
    pos_candidates: list[tuple[float, int, int, int]] = []
    neg_candidates: list[tuple[int, int, int]] = []
    for z in range(z_lo, z_hi, 2):
        frac, yy, xx = _box_fractions(np.isin(labels[z], values), box_size, _GRID_STEP)
        for f, y0, x0 in zip(frac.ravel(), yy.ravel(), xx.ravel()):
            if f >= min_fraction:
                pos_candidates.append((float(f), z, int(y0) + half, int(x0) + half))
            elif f == 0:
                neg_candidates.append((z, int(y0) + half, int(x0) + half))
    positives = _spread(pos_candidates, n_positive, box_size, rng, "positive", values)
    negatives = _spread(
        [(0.0, *c) for c in neg_candidates], n_negative, box_size, rng, "negative", values
    )
    return positives, negatives


def _spread(
    candidates: list[tuple[float, int, int, int]],
    count: int,
    box_size: int,
    rng: np.random.Generator,
    kind: str,
    values: list[int],
) -> list[Box]:
    """Pick ``count`` candidates at random, keeping chosen boxes apart in 3D."""
    if count == 0:
        return []
    order = rng.permutation(len(candidates))
    chosen: list[Box] = []
    for spacing in (box_size, box_size // 2, 0):
        for i in order:
            _, z, y, x = candidates[i]
            if any(
                abs(b.z - z) < 4 and abs(b.y - y) < spacing and abs(b.x - x) < spacing
                for b in chosen
            ) or any((b.z, b.y, b.x) == (z, y, x) for b in chosen):
                continue
            chosen.append(Box(z, y, x, box_size))
            if len(chosen) == count:
                return chosen
    raise TomosegError(
        f"Only {len(chosen)} {kind} boxes of {box_size} px can be placed for label(s) "
        f"{values}; use a larger volume or fewer boxes."
    )


def boxes_up_to(
    labels: np.ndarray,
    feature: int | Sequence[int],
    n_positive: int,
    n_negative: int,
    *,
    seed: int = 0,
    box_size: int = DEFAULT_BOX_SIZE,
) -> tuple[list[Box], list[Box]]:
    """:func:`boxes_from_ground_truth`, asking for fewer boxes (three quarters at a time)
    while the volume cannot supply that many (none when it holds no such feature).

    Parameters
    ----------
    labels, feature, seed, box_size
        As for :func:`boxes_from_ground_truth`.
    n_positive, n_negative
        The most boxes of each kind.
    """
    while True:
        try:
            return boxes_from_ground_truth(
                labels,
                feature,
                n_positive=n_positive,
                n_negative=n_negative,
                seed=seed,
                box_size=box_size,
            )
        except TomosegError:
            if n_positive + n_negative <= 1:
                return [], []
            n_positive, n_negative = n_positive * 3 // 4, n_negative * 3 // 4


def truth_boxes(
    labels: np.ndarray,
    values: Sequence[int],
    n_positive: int = 10,
    n_negative: int = 100,
    *,
    seed: int = 0,
    box_size: int = DEFAULT_BOX_SIZE,
) -> tuple[list[Box], list[Box], dict[int, int]]:
    """The boxes :func:`trainset_from_truth` trains on: up to ``n_positive`` rich in each
    label value (none twice), up to ``n_negative`` free of all of them, and how many
    positive boxes each value got."""
    positives: list[Box] = []
    per_value = {}
    for value in values:
        boxes, _ = boxes_up_to(labels, value, n_positive, 0, seed=seed, box_size=box_size)
        per_value[value] = len(boxes)
        taken = {(b.z, b.y, b.x) for b in positives}
        positives += [b for b in boxes if (b.z, b.y, b.x) not in taken]
    _, negatives = boxes_up_to(labels, list(values), 0, n_negative, seed=seed, box_size=box_size)
    return positives, negatives, per_value


def at_voxel_size(sim: Any, voxel_size: float) -> Any:
    """``sim`` resampled to ``voxel_size`` (Angstrom, isotropic), as a network of that voxel
    size sees a tomogram of another: each slice resized in-plane as apply does it
    (bilinear, antialiased when shrinking), then Z linearly; the labels by nearest
    neighbour onto the same grid; ``settings`` stay those it was simulated with.
    Pretraining uses it to show a 10 A network tomograms simulated at other voxel sizes."""
    import dataclasses

    from ..applying.inference.source import resize_planes
    from ..data.preprocess import resample_volume

    zoom = float(sim.voxel_size) / float(voxel_size)
    if abs(zoom - 1.0) < 1e-6:
        return sim
    labels = resample_volume(sim.labels, zoom, order=0)
    planes = resize_planes(np.asarray(sim.tomogram, np.float32), labels.shape[1:])
    tomogram = resample_volume(planes, (labels.shape[0] / planes.shape[0], 1.0, 1.0))
    centres = (np.asarray(sim.ribosome_centres, float) + 0.5) * zoom - 0.5
    return dataclasses.replace(
        sim,
        tomogram=tomogram.astype(np.float32, copy=False),
        labels=labels,
        voxel_size=float(voxel_size),
        ribosome_centres=centres,
        density=None,
    )


def trainset_from_truth(
    sim: Any,
    features: Sequence[str],
    n_positive: int = 10,
    n_negative: int = 100,
    *,
    seed: int = 0,
    all_classes: bool = False,
    trainset_settings: Any = None,
    extra_boxes: tuple[Sequence[Box], Sequence[Box]] = ((), ()),
) -> Any:
    """A TomoSeg training set from a simulated tomogram, boxed and painted the way a user
    would: positive boxes rich in each feature and negative boxes free of all of them, the
    features painted from the ground truth inside the positive boxes.  Fewer boxes are taken
    when the volume cannot hold that many; ``metadata["benchmark_boxes"]`` says how many.

    Parameters
    ----------
    sim
        A :class:`~napari_tomoseg.simulator.synthetic.SimulatedTomogram`.
    features
        Class names of the simulator to train; painted as 1, 2, ... in the order given.
    n_positive
        The most positive boxes per feature.
    n_negative
        The most negative boxes in all.
    seed
        The seed of the box choice (and of the default training-set settings).
    all_classes
        Paint the simulator's six classes (its label values) instead of ``features``.
    trainset_settings
        A :class:`~napari_tomoseg.learning.trainset.TrainsetSettings`; None: the defaults
        with ``seed``.
    extra_boxes
        Positive and negative boxes added to those chosen (e.g. accepted suggestions).
    """
    from ..learning.trainset import TrainsetSettings, build_training_set
    from .synthetic import CLASS_NAMES

    settings = trainset_settings or TrainsetSettings(seed=seed)
    values = [CLASS_NAMES.index(f) for f in features]
    positives, negatives, per_value = truth_boxes(
        sim.labels, values, n_positive, n_negative, seed=seed, box_size=settings.box_size
    )
    per_feature = {name: per_value[value] for name, value in zip(features, values)}
    positives, negatives = positives + list(extra_boxes[0]), negatives + list(extra_boxes[1])
    if all_classes:
        painting, names = sim.labels, CLASS_NAMES
    else:
        lut = np.zeros(256, np.uint8)
        lut[values] = np.arange(1, len(values) + 1)
        painting, names = lut[sim.labels], ("background", *features)
    trainset = build_training_set(
        sim.tomogram,
        painting,
        positives,
        negatives,
        settings,
        class_names=names,
        voxel_size=sim.voxel_size,
        source=f"simulated seed {sim.settings.seed}",
    )
    trainset.metadata["benchmark_boxes"] = {
        "positive": len(positives),
        "negative": len(negatives),
        "per_feature": per_feature,
    }
    return trainset


def dice_scores(prediction: np.ndarray, truth: np.ndarray, values: Sequence[int]) -> dict:
    """Dice (= F1) of ``prediction == v`` against ``truth == v`` for each value."""
    scores = {}
    for v in values:
        p, t = prediction == v, truth == v
        denom = int(p.sum()) + int(t.sum())
        scores[int(v)] = 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom
    return scores


@dataclass
class DemoSettings:
    """What the demo simulates and trains (defaults: a few minutes on a laptop CPU)."""

    feature: str = "single_membrane"
    shape: tuple[int, int, int] = (96, 256, 256)
    seed: int = 0
    n_positive: int = 10
    n_negative: int = 40
    architecture: str | None = None  # None: the default architecture
    iterations: int = 600
    threshold: float = 0.5


@dataclass
class DemoResult:
    """Scores and files of one demo run."""

    dice: float
    validation: dict[str, Any]
    #: Dice over the slices the boxes were drawn from (``central_slices``); the top and
    #: bottom of a tomogram are the worst reconstructed and hold no box
    dice_central: float = 0.0
    central_slices: tuple[int, int] = (0, 0)
    files: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    n_positive: int = 0
    n_negative: int = 0
    architecture: str = ""
    simulation: Any = None
    positives: list[Box] = field(default_factory=list)
    negatives: list[Box] = field(default_factory=list)
    mask: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    #: the feature trained (a simulator class name), the trained network and the
    #: inference result, for showing the run in napari (``tomoseg demo --viewer``)
    feature: str = ""
    network: Any = None
    applied: Any = None


def _output_paths(output_dir: str | Path | None, feature: str) -> dict[str, Path]:
    """The files a demo run writes into ``output_dir`` (none without one)."""
    if output_dir is None:
        return {}
    out = Path(output_dir)
    return {
        "tomogram": out / "simulated_tomogram.mrc",
        "truth": out / "ground_truth.mrc",
        "mask": out / f"{feature}_mask.mrc",
        "network": out / f"{feature}.tsnet",
    }


def iter_demo(
    output_dir: str | Path | None,
    settings: DemoSettings | None = None,
    *,
    overwrite: bool = False,
):
    """Simulate, box, paint, train, apply and score; yields progress, returns DemoResult.

    Parameters
    ----------
    output_dir
        The folder for the tomogram, ground truth, mask and network files; None writes none.
    settings
        What to simulate and train (:class:`DemoSettings`; the defaults when None).
    overwrite
        Replace existing output files; else they are refused before any work is done.
    """
    from ..applying.inference import ApplySettings, iter_apply
    from ..data.io import write_labels, write_mrc
    from ..learning.model_file import save_network
    from ..learning.training import TrainSettings, iter_train
    from ..learning.trainset import TrainsetSettings, build_training_set
    from .replay import SimulatedReplay
    from .synthetic import CLASS_NAMES, SimulationSettings, simulate_tomogram

    s = settings or DemoSettings()
    if s.feature not in CLASS_NAMES[1:]:
        raise TomosegError(f"Unknown feature {s.feature!r}; choose one of {CLASS_NAMES[1:]}.")
    value = CLASS_NAMES.index(s.feature)
    seconds: dict[str, float] = {}
    targets = _output_paths(output_dir, s.feature)
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:  # say so before minutes of work, and write none of them
        raise TomosegError(
            f"{', '.join(existing)} already exist(s); choose another output folder or overwrite."
        )

    t0 = time.perf_counter()
    yield Progress("simulate", 0, 1, message=f"simulating a {s.shape} tomogram")
    sim = simulate_tomogram(SimulationSettings(shape=s.shape, seed=s.seed))
    seconds["simulate"] = time.perf_counter() - t0

    positives, negatives = boxes_from_ground_truth(
        sim.labels, value, n_positive=s.n_positive, n_negative=s.n_negative, seed=s.seed
    )
    painting = (sim.labels == value).astype(np.uint8)  # paint the feature from the truth
    t0 = time.perf_counter()
    yield Progress("trainset", 0, 1, message="building the training set")
    trainset = build_training_set(
        sim.tomogram,
        painting,
        positives,
        negatives,
        TrainsetSettings(seed=s.seed),
        class_names=("background", s.feature),
        voxel_size=sim.voxel_size,
        source="simulated",
    )
    seconds["trainset"] = time.perf_counter() - t0

    train_settings = TrainSettings(iterations=s.iterations, seed=s.seed)
    if s.architecture:
        train_settings.architecture = s.architecture
    t0 = time.perf_counter()
    result = yield from iter_train(trainset, train_settings, replay_from=SimulatedReplay())
    seconds["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    applied = yield from iter_apply(
        result.network,
        sim.tomogram,
        voxel_size=sim.voxel_size,
        settings=ApplySettings(threshold=s.threshold),
    )
    seconds["apply"] = time.perf_counter() - t0
    mask = np.asarray(applied.mask)
    dice = dice_scores(mask, painting, [1])[1]
    z0, z1 = central_slices(s.shape[0])
    dice_central = dice_scores(mask[z0:z1], painting[z0:z1], [1])[1]

    files: dict[str, Path] = {}
    if targets:
        next(iter(targets.values())).parent.mkdir(parents=True, exist_ok=True)
        vs = sim.voxel_size
        files["tomogram"] = write_mrc(targets["tomogram"], sim.tomogram, vs, overwrite=overwrite)
        files["truth"] = write_labels(targets["truth"], sim.labels, vs, overwrite=overwrite)
        files["mask"] = write_labels(targets["mask"], mask, vs, overwrite=overwrite)
        files["network"] = save_network(result.network, targets["network"], overwrite=overwrite)
    return DemoResult(
        dice=dice,
        validation=result.metrics,
        dice_central=dice_central,
        central_slices=(z0, z1),
        files=files,
        seconds=seconds,
        n_positive=len(positives),
        n_negative=len(negatives),
        architecture=result.network.meta.architecture,
        simulation=sim,
        positives=positives,
        negatives=negatives,
        mask=mask,
        probabilities=applied.probabilities,
        feature=s.feature,
        network=result.network,
        applied=applied,
    )


def run_demo(
    output_dir: str | Path | None,
    settings: DemoSettings | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[Progress], None] | None = None,
) -> DemoResult:
    """Run :func:`iter_demo` to the end.

    Parameters
    ----------
    output_dir, settings, overwrite
        As for :func:`iter_demo`.
    progress
        Called with each :class:`~napari_tomoseg.progress.Progress` event, or None.
    """
    return drive(iter_demo(output_dir, settings, overwrite=overwrite), progress)
