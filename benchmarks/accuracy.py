"""Accuracy on simulated tomograms the training never saw: per-class precision, recall, F1.

    python benchmarks/accuracy.py --shifted [--quick] [--train-seeds 0 1 2] [--features F ...]
    python benchmarks/accuracy.py --imperfect [--parts zeroshot] ...
    python benchmarks/accuracy.py --shifted --parts binary merged [--train-seeds 0 1 2]
    python benchmarks/accuracy.py [--iterations N] [--features F ...] [--architectures A ...]
                                  [--compare-features F ...]
                                  [--multiclass-architectures A ...] [--box-counts 2 5 10 20]
                                  [--box-features F ...] [--test-seeds 1 2]
                                  [--snrs 0.8 0.5 1.5] [--shape 96 256 256] [--threads T]
                                  [--set NAME=VALUE ...] [--scene NAME=VALUE ...]
                                  [--quick] [--json FILE]

Training data: the simulator's tomogram at its default setting (SNR 0.8, 10 A, defocus 4 um,
tilts +-60, 5 nm membranes; scene seed = the training seed), boxed the way the TomoSeg
protocol asks a person to: about 10 positive boxes rich in the feature and 100 negative
boxes free of it (:func:`napari_tomoseg.simulator.demo.boxes_from_ground_truth`), the
feature painted from the ground truth inside the positive boxes.  Every network is trained with the
package's ``TrainSettings`` defaults except ``--iterations`` and ``--set``.

Test data:

* ``--shifted`` (the domain-shift benchmark): :data:`SHIFTED_TESTS`, tomograms of other
  scenes whose imaging, specimen or features differ from the training setting (SNR 0.3-1.5,
  defocus 2-6 um with and without CTF correction, voxel size 7-14 A, tilts +-45 to +-70,
  thicker specimen, crowding, inverted contrast, other membrane thickness, microtubule and
  vesicle sizes, a smoother reconstruction, and all at once).  Networks are applied as a
  user would: at the tomogram's voxel size (rescaled to the network's), with the network's
  own threshold (calibrated on its held-out boxes; 0.5 for networks without one).
* ``--imperfect``: :data:`IMPERFECT_TESTS` in place of the shifted ones, tilt series
  with radiation damage (dose-symmetric, 120-150 e/A^2) and residual alignment errors
  (0.7-1.5 px r.m.s.), and a control without them: flaws every real tilt series has and
  the shifted set leaves out.
* otherwise, tomograms of other seeds at the training noise level and at other noise
  levels (``--test-seeds`` x ``--snrs``).

``--scene NAME=VALUE`` changes a simulator setting in every test tomogram (over the test's
own), e.g. ``--scene vesicle_aspect=2.5`` (ellipsoidal vesicles; the objects placed after
the first vesicle then fall elsewhere, so compare networks on one run, not runs).

Each network is applied to the central 60 % of the slices (Z from 0.2 to 0.8 of the depth:
the slices the boxes are drawn from, away from the top and bottom of the volume) and scored
voxel by voxel against the ground truth; the confusion matrices of all test tomograms are
summed before precision, recall and F1 (= Dice) are computed
(:func:`napari_tomoseg.learning.training.metrics_from_confusion`).  With several ``--train-seeds``
(other training scenes, boxes and initialisations) the spread over seeds is reported.

Reported:

1. one binary network per feature and architecture (TomoSeg's way: one network per feature;
   ``--compare-features`` limits the architecture comparison to some features, to bound
   the run time, the other features getting a network of the default architecture);
2. one multi-class network for all six classes (positive boxes of every feature, the full
   six-class ground truth painted in them, negatives free of every feature), per class,
   next to the test F1 of the multi-class U-Net in Zhao & Zhou's Table 1 (real tomograms,
   not these: the data differ);
3. F1 against the number of positive boxes (``--box-counts``) for the default architecture
   and ``--box-features``, with the negatives fixed: how much annotation is enough;
4. (``--parts merged``) the binary networks merged as the Merge step merges a user's
   probability maps, each at its own threshold: the shipped ones of ``--features``, and
   those the binary part trains (default architecture) per start and training seed, every
   feature scored in the merged mask beside its score alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    binary_trainset,
    command_line,
    describe_machine,
    fmt,
    machine_info,
    markdown_table,
)

#: Zhao & Zhou, multi-class U-Net, Table 1, test F1 per class (real tomograms, their data).
SEED_TABLE1_TEST_F1: dict[str, float] = {
    "background": 0.98,
    "microtubule": 0.77,
    "ribosome": 0.01,
    "double_membrane": 0.66,
    "single_membrane": 0.79,
    "carbon_edge": 0.40,
}
#: The parts of the benchmark, in the order they run.
PARTS = ("zeroshot", "binary", "multiclass", "boxes", "suggest", "merged")
#: Fraction of the depth scored (and boxed): the central slices.
Z_FRACTION = (0.2, 0.8)

#: The domain-shift test set: a name and the simulator settings that differ from the
#: training setting (the simulator's defaults).  ``depth_factor`` multiplies the depth of
#: the volume (a thicker specimen).  Every test tomogram has a scene of its own
#: (seed ``SHIFTED_SEED + index``), never used for training.
SHIFTED_TESTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("SNR 0.3", {"snr": 0.3}),
    ("SNR 1.5", {"snr": 1.5}),
    ("defocus 2 um", {"defocus_um": 2.0}),
    ("defocus 6 um, CTF not corrected", {"defocus_um": 6.0, "phase_flip": False}),
    ("voxel 7 A", {"voxel_size": 7.0}),
    ("voxel 14 A", {"voxel_size": 14.0}),
    ("tilts +-45", {"tilt_max": 45.0}),
    ("tilts +-70", {"tilt_max": 70.0, "tilt_step": 2.0}),
    ("specimen 1.7x thicker", {"depth_factor": 1.67}),
    ("crowded", {"crowding": 2.0, "n_ribosomes": 60, "n_actin": 30}),
    ("contrast inverted", {"invert_contrast": True}),
    (
        "thicker membranes, thinner MTs, big vesicles",
        {
            "membrane_thickness_nm": 6.5,
            "microtubule_diameter_nm": 22.0,
            "vesicle_radius_nm": (30.0, 100.0),
        },
    ),
    ("thin membranes, smooth reconstruction", {"membrane_thickness_nm": 4.0, "lowpass": 0.6}),
    (
        "all at once",
        {
            "snr": 0.5,
            "defocus_um": 5.0,
            "phase_flip": False,
            "tilt_max": 50.0,
            "lowpass": 0.7,
            "membrane_thickness_nm": 6.0,
            "crowding": 1.5,
        },
    ),
)
SHIFTED_SEED = 101
#: A second test set (``--imperfect``): tilt series with the flaws of real ones, radiation
#: damage and residual alignment errors (the simulator's ``total_dose`` and
#: ``alignment_error_px``), and a control without them.  Every row is simulated on the same
#: scenes (seeds ``IMPERFECT_SEED`` onwards, ``AccuracyOptions.imperfect_scenes`` of them),
#: so that the rows differ by the flaw alone, not by where a scene puts its features.
IMPERFECT_TESTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("no imperfection (control)", {}),
    ("dose 120 e/A2", {"total_dose": 120.0}),
    ("misaligned 0.7 px", {"alignment_error_px": 0.7}),
    ("misaligned 1.5 px", {"alignment_error_px": 1.5}),
    (
        "dose 150 e/A2, misaligned 1 px, SNR 0.5",
        {"total_dose": 150.0, "alignment_error_px": 1.0, "snr": 0.5},
    ),
)
IMPERFECT_SEED = 201
#: Thresholds at which binary networks are also scored (threshold sensitivity).
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
#: The two shifted tests of the quick mode.
QUICK_SHIFTED = ("SNR 0.3", "contrast inverted")


@dataclass
class AccuracyOptions:
    """What :func:`run_accuracy` trains and tests (the command-line options)."""

    iterations: int | None = None  # None: TrainSettings' default
    # the multi-class network's mini-batches (None: ``iterations``); six classes learn slower
    multiclass_iterations: int | None = None
    # which of the three parts to run
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    features: list[str] = field(default_factory=list)  # empty: all five
    # features on which every architecture is trained (empty: all of ``features``); the
    # others get a network of the default architecture only
    compare_features: list[str] = field(default_factory=list)
    architectures: list[str] = field(default_factory=list)  # empty: all registered
    multiclass_architectures: list[str] = field(default_factory=list)  # empty: the default
    box_counts: list[int] = field(default_factory=lambda: [2, 5, 10, 20])
    box_features: list[str] = field(default_factory=lambda: ["single_membrane", "microtubule"])
    # features for the round of suggested boxes (accepted by the ground truth)
    suggest_features: list[str] = field(default_factory=lambda: ["single_membrane", "microtubule"])
    n_suggestions: int = 20
    n_positive: int = 10
    n_negative: int = 100
    # the domain-shift test set (SHIFTED_TESTS) instead of test_seeds x snrs
    shifted: bool = False
    # with ``shifted``: the imperfect tilt series (IMPERFECT_TESTS) instead of SHIFTED_TESTS
    imperfect: bool = False
    imperfect_scenes: int = 3  # scenes each imperfect test is simulated on
    shifted_tests: list[str] = field(default_factory=list)  # empty: all of SHIFTED_TESTS
    test_seeds: list[int] = field(default_factory=lambda: [1, 2])
    snrs: list[float] = field(default_factory=lambda: [0.8, 0.5, 1.5])
    shape: tuple[int, int, int] = (96, 256, 256)
    train_seeds: list[int] = field(default_factory=lambda: [0])
    # where training starts ("auto": a shipped network that knows the feature, "scratch")
    starts: list[str] = field(default_factory=lambda: ["auto"])
    # TrainSettings fields to change (the recipe under test), e.g. {"augment": False}
    train_overrides: dict[str, Any] = field(default_factory=dict)
    # simulator settings for every test tomogram, over each test's own (``--scene``)
    scene_overrides: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None  # None: each network's own (calibrated) threshold
    tta: int = 0  # test-time augmentation: orientations averaged on apply (0: none, 4, 8)
    planes: int | None = None  # slice planes on apply (None: each network's own, 1, 3)
    threads: int | None = None


def quick_options(shifted: bool = False) -> AccuracyOptions:
    """A very small run that checks the script end to end (seconds, meaningless numbers)."""
    return AccuracyOptions(
        iterations=3,
        features=["single_membrane"],
        architectures=["unet-lite"],
        multiclass_architectures=["unet-lite"],
        box_counts=[2, 4],
        box_features=["single_membrane"],
        suggest_features=["single_membrane"],
        n_suggestions=4,
        n_positive=4,
        n_negative=8,
        shifted=shifted,
        imperfect_scenes=1,
        shifted_tests=list(QUICK_SHIFTED) if shifted else [],
        test_seeds=[1],
        snrs=[0.8, 1.5],
        shape=(40, 96, 96),
    )


def scored_slices(depth: int) -> tuple[int, int]:
    """``(z0, z1)``: the slices that are scored (:data:`Z_FRACTION` of the depth)."""
    from napari_tomoseg.simulator.demo import central_slices

    return central_slices(depth, Z_FRACTION)


def apply_scored(network: Any, tomogram: Any, voxel_size: float, settings: Any, **kw: Any):
    """Apply ``network`` to the scored slices of ``tomogram`` alone (:func:`scored_slices`),
    the run starting on a Z-chunk boundary as a whole-volume apply's would, so the result is
    that apply's.  Returns the result and the index of the first scored slice in it."""
    from napari_tomoseg.applying.inference import apply_network

    z0, z1 = scored_slices(tomogram.shape[0])
    start = z0 // settings.z_chunk * settings.z_chunk
    result = apply_network(
        network, tomogram, voxel_size=voxel_size, settings=settings, z_range=(start, z1), **kw
    )
    return result, z0 - start


@dataclass
class TestTomogram:
    """One simulated test tomogram: what it is called, how it differs, the simulation."""

    name: str
    seed: int
    settings: dict[str, Any]
    sim: Any


def shifted_settings(
    name: str, changes: dict[str, Any], shape: tuple[int, int, int]
) -> dict[str, Any]:
    """Simulator overrides of one shifted test (``depth_factor`` turned into a shape)."""
    changes = dict(changes)
    factor = float(changes.pop("depth_factor", 1.0))
    depth = int(round(shape[0] * factor))
    return {"shape": (depth, *shape[1:]), **changes}


def make_tests(options: AccuracyOptions, say: Any = None) -> list[TestTomogram]:
    """Simulate the test tomograms ``options`` ask for."""
    from napari_tomoseg.simulator.synthetic import simulate_tomogram

    plan: list[tuple[str, int, dict[str, Any]]] = []
    shape = tuple(options.shape)
    if options.shifted:
        catalogue = IMPERFECT_TESTS if options.imperfect else SHIFTED_TESTS
        wanted = options.shifted_tests or [name for name, _ in catalogue]
        known = dict(catalogue)
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            raise SystemExit(f"unknown shifted tests {unknown}; known: {sorted(known)}")
        for index, (name, changes) in enumerate(catalogue):
            # shifted: a scene per test; imperfect: every test on the same scenes
            seeds = [SHIFTED_SEED + index]
            if options.imperfect:
                seeds = [IMPERFECT_SEED + k for k in range(options.imperfect_scenes)]
            if name in wanted:
                changed = {**shifted_settings(name, changes, shape), **options.scene_overrides}
                plan += [(name, seed, changed) for seed in seeds]
    else:
        for seed in options.test_seeds:
            for snr in options.snrs:
                changed = {"shape": shape, "snr": snr, **options.scene_overrides}
                plan.append((f"seed {seed}, SNR {snr}", seed, changed))
    tests = []
    for name, seed, settings in plan:
        if say is not None:
            say(f"simulating test tomogram {name!r} (seed {seed}) ...")
        sim = simulate_tomogram(seed=seed, **settings)
        tests.append(TestTomogram(name, seed, jsonable_settings(settings), sim))
    return tests


def jsonable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def apply_settings(options: AccuracyOptions) -> Any:
    """The :class:`ApplySettings` the options ask the test tomograms to be segmented with."""
    from napari_tomoseg.applying.inference import ApplySettings

    tta = {"tta": True, "tta_transforms": options.tta} if options.tta else {}
    return ApplySettings(threshold=options.threshold, planes=options.planes, **tta)


def evaluate(
    network: Any,
    tests: list[TestTomogram],
    truth_values: list[int] | None = None,
    options: AccuracyOptions | None = None,
    maps: list[tuple[Any, float]] | None = None,
) -> dict[str, Any]:
    """Apply ``network`` to the test tomograms and score its thresholded mask.

    A binary network is scored against ``labels in truth_values``; a multi-class one against
    the labels themselves (its classes are the simulator's).  Only the central slices
    (:func:`scored_slices`) are computed and scored, with the options' threshold (None: the
    network's own) and test-time augmentation.  Returns the pooled metrics and those of
    every test tomogram; a binary network's probabilities of the scored slices and its
    threshold go into ``maps`` (one per test) when given, to be merged.
    """
    from napari_tomoseg.data.probability import probabilities_as_float
    from napari_tomoseg.learning.training import confusion_matrix, metrics_from_confusion

    names = list(network.meta.class_names)
    k = len(names)
    options = options or AccuracyOptions()
    settings = apply_settings(options)
    total = np.zeros((k, k), dtype=np.int64)
    per_test = []
    for test in tests:
        sim = test.sim
        z0, z1 = scored_slices(sim.tomogram.shape[0])
        result, first = apply_scored(
            network, sim.tomogram, sim.voxel_size, settings, keep_probabilities=k == 2
        )
        pred = np.asarray(result.mask)[first:]
        labels = sim.labels[z0:z1]
        truth = np.isin(labels, truth_values).astype(np.uint8) if truth_values else labels
        conf = confusion_matrix(pred, truth, k)
        total += conf
        entry = {
            "name": test.name,
            "seed": test.seed,
            "settings": test.settings,
            "confusion": conf.tolist(),
            "metrics": metrics_from_confusion(conf, names),
        }
        if k == 2:  # how the F1 depends on the threshold (binary networks)
            p = probabilities_as_float(result.probabilities[0][first:])
            entry["sweep"] = [confusion_matrix(p >= t, truth, 2).tolist() for t in SWEEP]
            if maps is not None:
                maps.append((result.probabilities[0][first:], result.threshold))
        per_test.append(entry)
    return {"pooled": metrics_from_confusion(total, names), "per_test": per_test}


def _train(
    trainset: Any,
    architecture: str,
    options: AccuracyOptions,
    seed: int,
    start: str,
    iterations: int | None = None,
) -> Any:
    from napari_tomoseg.learning.training import TrainSettings, train
    from napari_tomoseg.simulator.replay import SimulatedReplay

    settings = TrainSettings(
        architecture=architecture, seed=seed, start_from=start, **options.train_overrides
    )
    iterations = iterations if iterations is not None else options.iterations
    if iterations is not None:
        settings.iterations = int(iterations)
    return train(trainset, settings, replay_from=SimulatedReplay())


def _network_label(arch: str, start: str, options: AccuracyOptions) -> str:
    """The network column: the architecture, and where training started when compared."""
    if len(options.starts) == 1:
        return arch
    return f"{arch} ({'from scratch' if start == 'scratch' else 'fine-tuned'})"


def _summary(result: Any, seconds: float, options: AccuracyOptions) -> dict[str, Any]:
    applied = apply_settings(options).resolved(result.network)
    return {
        "started_from": result.metadata.get("started_from"),
        "train_seconds": seconds,
        "val_mean_dice": result.metrics.get("mean_foreground_f1"),
        "best_step": result.metadata.get("best_step"),
        "steps": result.metadata.get("steps_done"),
        "threshold": applied.threshold,
        "planes": applied.planes,
        "replay": result.metadata.get("replay"),
        "keep_start": result.metadata.get("keep_start"),
        "keep_start_held_out_f1": result.metadata.get("keep_start_held_out_f1"),
    }


def _binary_entry(
    sim: Any,
    feature: str,
    arch: str,
    n_positive: int,
    seed: int,
    start: str,
    options: AccuracyOptions,
    tests: list[TestTomogram],
    maps: list[tuple[Any, float]] | None = None,
) -> dict[str, Any]:
    """Train one binary network on ``sim`` and score it on the tests (its probabilities
    kept in ``maps`` when given, see :func:`evaluate`)."""
    from napari_tomoseg.simulator.synthetic import CLASS_NAMES

    ts = binary_trainset(sim, feature, n_positive, options.n_negative, seed)
    t0 = time.perf_counter()
    result = _train(ts, arch, options, seed, start)
    return {
        "feature": feature,
        "architecture": arch,
        "network": _network_label(arch, start, options),
        "start": start,
        "n_positive": n_positive,
        "n_negative": options.n_negative,
        "train_seed": seed,
        **_summary(result, time.perf_counter() - t0, options),
        **evaluate(result.network, tests, [CLASS_NAMES.index(feature)], options, maps),
    }


def zero_shot(
    tests: list[TestTomogram],
    features: list[str],
    options: AccuracyOptions,
    say: Any,
    maps: dict[str, list] | None = None,
    multiclass: bool = True,
) -> list[dict[str, Any]]:
    """Score the shipped networks as they are (no boxes): each binary network of
    ``features`` on its feature (its probabilities kept in ``maps[feature]`` when given,
    see :func:`evaluate`), and unless ``multiclass`` is false the multi-class network on
    every class."""
    from napari_tomoseg.learning.pretrained import MULTICLASS, available, load_pretrained
    from napari_tomoseg.simulator.synthetic import CLASS_NAMES

    entries = []
    shipped = available()
    names = [MULTICLASS] if multiclass and MULTICLASS in shipped else []
    for name in names + [f for f in features if f in shipped]:
        say(f"zero-shot: the shipped network {name!r} ...")
        network = load_pretrained(name)
        values = None if name == MULTICLASS else [CLASS_NAMES.index(name)]
        kept = None if maps is None or name == MULTICLASS else maps.setdefault(name, [])
        scored = evaluate(network, tests, values, options, kept)
        threshold = apply_settings(options).resolved(network).threshold
        entries.append({"name": name, "threshold": threshold, **scored})
    return entries


def run_accuracy(options: AccuracyOptions, log: Any = None) -> dict[str, Any]:
    """Train and test everything ``options`` asks for; returns all numbers as a dict."""
    import torch

    from napari_tomoseg.learning.models import DEFAULT_ARCHITECTURE, available
    from napari_tomoseg.learning.training import TrainSettings
    from napari_tomoseg.simulator.demo import trainset_from_truth
    from napari_tomoseg.simulator.synthetic import (
        CLASS_NAMES,
        SimulationSettings,
        simulate_tomogram,
    )

    def say(text: str) -> None:
        if log is not None:
            log(text)

    if options.threads:
        torch.set_num_threads(int(options.threads))
    features = options.features or list(CLASS_NAMES[1:])
    archs = options.architectures or available()
    multi_archs = options.multiclass_architectures or [DEFAULT_ARCHITECTURE]
    t_start = time.perf_counter()
    defaults = TrainSettings(**options.train_overrides)
    report: dict[str, Any] = {
        "command": command_line(),
        "machine": machine_info(),
        "options": asdict(options),
        "iterations": options.iterations or defaults.iterations,
        "multiclass_iterations": options.multiclass_iterations
        or options.iterations
        or defaults.iterations,
        "default_architecture": DEFAULT_ARCHITECTURE,
        "torch_threads": torch.get_num_threads(),
        "zeroshot": [],
        "binary": [],
        "multiclass": [],
        "box_counts": [],
        "suggest": [],
        "merged": [],
    }
    shape = tuple(options.shape)
    train_sims = {}
    for seed in options.train_seeds:
        say(f"simulating the training tomogram (seed {seed}) ...")
        train_sims[seed] = simulate_tomogram(SimulationSettings(shape=shape, seed=seed))
    tests = make_tests(options, say)
    report["tests"] = [{"name": t.name, "seed": t.seed, "settings": t.settings} for t in tests]
    z0, z1 = scored_slices(shape[0])
    report["scored_slices"] = [z0, z1]

    # what is merged: the scores and maps of each binary network (the shipped ones; those
    # the binary part trains, of the default architecture) by (start, training seed)
    merge = "merged" in options.parts
    to_merge: dict[tuple[str, int | None], dict[str, tuple[dict, list]]] = {}
    if "zeroshot" in options.parts or merge:
        shipped: dict[str, list] | None = {} if merge else None
        entries = zero_shot(tests, features, options, say, shipped, "zeroshot" in options.parts)
        report["zeroshot"] = entries if "zeroshot" in options.parts else []
        if merge:
            named = {e["name"]: e for e in entries}
            to_merge[("shipped", None)] = {f: (named[f], m) for f, m in shipped.items()}
    trained: dict[tuple[str, str, int, int, str], dict[str, Any]] = {}
    for feature in features if "binary" in options.parts else []:
        compared = not options.compare_features or feature in options.compare_features
        for arch, start, (seed, sim) in itertools.product(
            archs if compared else [DEFAULT_ARCHITECTURE], options.starts, train_sims.items()
        ):
            say(f"binary {feature} / {arch} / {start} / seed {seed}: training ...")
            n = options.n_positive
            maps = [] if merge and arch == DEFAULT_ARCHITECTURE else None
            entry = _binary_entry(sim, feature, arch, n, seed, start, options, tests, maps)
            report["binary"].append(entry)
            trained[(feature, arch, n, seed, start)] = entry
            if maps is not None:
                to_merge.setdefault((start, seed), {})[feature] = (entry, maps)

    for arch, start, (seed, sim) in itertools.product(
        multi_archs if "multiclass" in options.parts else [], options.starts, train_sims.items()
    ):
        say(f"multi-class / {arch} / {start} / seed {seed}: training ...")
        ts = trainset_from_truth(
            sim,
            CLASS_NAMES[1:],
            options.n_positive,
            options.n_negative,
            seed=seed,
            all_classes=True,
        )
        t0 = time.perf_counter()
        result = _train(ts, arch, options, seed, start, options.multiclass_iterations)
        report["multiclass"].append(
            {
                "architecture": arch,
                "network": _network_label(arch, start, options),
                "start": start,
                "train_seed": seed,
                "boxes": ts.metadata["benchmark_boxes"],
                **_summary(result, time.perf_counter() - t0, options),
                **evaluate(result.network, tests, options=options),
            }
        )

    box_arch = DEFAULT_ARCHITECTURE
    for feature in options.box_features if "boxes" in options.parts else []:
        for n, start, (seed, sim) in itertools.product(
            options.box_counts, options.starts, train_sims.items()
        ):
            entry = trained.get((feature, box_arch, n, seed, start))
            if entry is None:
                say(f"{n} positive boxes, {feature} / {start} / seed {seed}: training ...")
                entry = _binary_entry(sim, feature, box_arch, n, seed, start, options, tests)
                trained[(feature, box_arch, n, seed, start)] = entry
            report["box_counts"].append(
                {k: v for k, v in entry.items() if k != "per_test"}
                | {"f1": entry["pooled"]["classes"][feature]["f1"]}
                | {"sweep": np.sum([t["sweep"] for t in entry["per_test"]], axis=0).tolist()}
            )
    for feature, start, (seed, sim) in itertools.product(
        options.suggest_features if "suggest" in options.parts else [],
        options.starts,
        train_sims.items(),
    ):
        say(f"suggested boxes, {feature} / {start} / seed {seed} ...")
        report["suggest"].append(suggestion_round(sim, feature, seed, start, options, tests))
    if merge:
        groups = [(start, seed, nets) for (start, seed), nets in to_merge.items()]
        report["merged"] = merged_part(groups, tests, say)
    report["seconds"] = time.perf_counter() - t_start
    return report


def merge_scored(
    maps: dict[str, list[tuple[Any, float]]], tests: list[TestTomogram]
) -> dict[str, Any]:
    """Merge the probability maps of binary networks on the scored slices of every test
    (``maps``: feature -> one ``(probabilities, threshold)`` per test, as :func:`evaluate`
    keeps them) as the Merge step does, each at its network's own threshold, the most
    probable claim winning, and score every label of the merged mask.

    A user who segments several features ends with this mask: a voxel two networks claim
    goes to one of them, which the scores of each network alone do not show.
    """
    from napari_tomoseg.applying.merge import MergeInput, merge_probability_maps
    from napari_tomoseg.learning.training import confusion_matrix, metrics_from_confusion
    from napari_tomoseg.simulator.synthetic import CLASS_NAMES

    names = list(CLASS_NAMES)
    as_label = np.array([0, *(names.index(f) for f in maps)], dtype=np.uint8)
    total = np.zeros((len(names), len(names)), dtype=np.int64)
    per_test = []
    for i, test in enumerate(tests):
        inputs = [MergeInput(m[i][0], feature, threshold=m[i][1]) for feature, m in maps.items()]
        merged = as_label[merge_probability_maps(inputs).mask]
        z0, z1 = scored_slices(test.sim.tomogram.shape[0])
        conf = confusion_matrix(merged, test.sim.labels[z0:z1], len(names))
        total += conf
        per_test.append({"name": test.name, "seed": test.seed, "confusion": conf.tolist()})
    return {"pooled": metrics_from_confusion(total, names), "per_test": per_test}


def merged_part(
    groups: list[tuple[str, int | None, dict[str, tuple[dict, list]]]],
    tests: list[TestTomogram],
    say: Any,
) -> list[dict[str, Any]]:
    """Merge each group of binary networks (``(start, training seed, {feature: (its
    entry, its maps)})``: the shipped ones, those the binary part trained per start and
    seed) and keep each feature's score alone beside the merged one."""
    entries = []
    for start, seed, networks in groups:
        if len(networks) < 2:
            continue  # one network has nothing to compete with
        which = start if seed is None else f"{start}, training seed {seed}"
        say(f"merging {', '.join(networks)} ({which}) ...")
        alone = {f: entry["pooled"]["classes"][f] for f, (entry, _) in networks.items()}
        scored = merge_scored({f: maps for f, (_, maps) in networks.items()}, tests)
        entries.append(
            {"start": start, "train_seed": seed, "features": list(networks), "alone": alone}
            | scored
        )
    return entries


def default_architecture() -> str:
    from napari_tomoseg.learning.models import DEFAULT_ARCHITECTURE

    return DEFAULT_ARCHITECTURE


def accept_by_truth(sim: Any, value: int, suggestions: list[Any]) -> tuple[list, list]:
    """Decide suggested boxes as a careful user would, from the ground truth: a box that
    holds the feature (at least 4 % of its pixels, as the benchmark's positive boxes do)
    becomes a positive box, any other a negative box."""
    positives, negatives = [], []
    for s in suggestions:
        fraction = float(np.mean(sim.labels[s.box.slices()] == value))
        (positives if fraction >= 0.04 else negatives).append(s.box)
    return positives, negatives


def suggestion_round(
    sim: Any,
    feature: str,
    seed: int,
    start: str,
    options: AccuracyOptions,
    tests: list[TestTomogram],
) -> dict[str, Any]:
    """Train on the boxes of the box-count part, suggest boxes on the training tomogram,
    accept them by the truth, train again with them (same seed, same settings), and score
    both networks.  With nothing accepted the second network would be the first: it is
    not trained again."""
    from napari_tomoseg.applying.inference import (
        ApplySettings,
        apply_network,
        probabilities_as_float,
    )
    from napari_tomoseg.applying.suggest import suggest_boxes
    from napari_tomoseg.simulator.demo import trainset_from_truth, truth_boxes
    from napari_tomoseg.simulator.synthetic import CLASS_NAMES

    value = CLASS_NAMES.index(feature)
    n_pos, n_neg = options.n_positive, options.n_negative
    positives, negatives, _ = truth_boxes(sim.labels, [value], n_pos, n_neg, seed=seed)

    def trained(extra: tuple[list, list] = ([], [])) -> Any:
        ts = trainset_from_truth(sim, [feature], n_pos, n_neg, seed=seed, extra_boxes=extra)
        return _train(ts, default_architecture(), options, seed, start).network

    net = trained()
    before = evaluate(net, tests, [value], options)["pooled"]
    z0, z1 = scored_slices(sim.tomogram.shape[0])
    applied = apply_network(net, sim.tomogram, voxel_size=sim.voxel_size, settings=ApplySettings())
    found = suggest_boxes(
        np.asarray(applied.probabilities[0]),
        positives,
        negatives,
        threshold=applied.threshold,
        n=options.n_suggestions,
        z_range=(z0, z1),
        to_float=probabilities_as_float,
    )
    more_pos, more_neg = accept_by_truth(sim, value, found)
    after = before
    if more_pos or more_neg:
        after = evaluate(trained((more_pos, more_neg)), tests, [value], options)["pooled"]
    return {
        "feature": feature,
        "start": start,
        "train_seed": seed,
        "threshold": applied.threshold,
        "suggested": len(found),
        "accepted_positive": len(more_pos),
        "accepted_negative": len(more_neg),
        "before": before["classes"][feature],
        "after": after["classes"][feature],
    }


def _pooled(entries: list[dict[str, Any]], test_names: list[str] | None = None) -> Any:
    """Metrics of the confusion matrices of ``entries`` summed over their tests (all, or
    those named), and over the entries (training seeds)."""
    from napari_tomoseg.learning.training import metrics_from_confusion

    matrices = [
        np.asarray(t["confusion"])
        for e in entries
        for t in e["per_test"]
        if test_names is None or t["name"] in test_names
    ]
    if not matrices:
        return None
    names = list(entries[0]["pooled"]["classes"])
    return metrics_from_confusion(np.sum(matrices, axis=0), names)


def _spread(values: list[float]) -> str:
    """``mean`` for one value, ``mean +- sd`` for several."""
    if len(values) == 1:
        return fmt(values[0])
    return f"{np.mean(values):.2f} +- {np.std(values, ddof=1):.2f}"


def _group(entries: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple, list]:
    groups: dict[tuple, list] = {}
    for e in entries:
        groups.setdefault(tuple(e[k] for k in keys), []).append(e)
    return groups


def _zero_shot_table(report: dict[str, Any]) -> list[str]:
    if not report.get("zeroshot"):
        return []
    lines = ["", "## Shipped networks applied as they are (zero-shot, no boxes)", ""]
    rows = []
    for e in report["zeroshot"]:
        classes = e["pooled"]["classes"]
        for cls in [c for c in classes if c != "background"]:
            c = classes[cls]
            row = [cls, e["name"], fmt(c["precision"]), fmt(c["recall"]), fmt(c["f1"])]
            rows.append(row + [fmt(e["threshold"])])
    headers = ["feature", "shipped network", "precision", "recall", "F1", "threshold"]
    lines.append(markdown_table(headers, rows, align="ll" + "r" * 4))
    return lines


def _binary_f1(confusion: Any) -> float | None:
    """F1 of a 2 x 2 confusion matrix (rows: truth, columns: prediction)."""
    (_, fp), (fn, tp) = np.asarray(confusion)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None


def _sweep_f1(pooled: list) -> list[str]:
    """F1 at each threshold of :data:`SWEEP` from the pooled 2 x 2 confusion matrices."""
    return [fmt(_binary_f1(c), 3) for c in pooled]


def _zero_shot_per_test(report: dict[str, Any]) -> list[str]:
    """F1 of each shipped binary network per test (the tomograms of a test pooled), with
    the feature's voxels in the scored slices: a cell resting on few voxels says little."""
    entries = [e for e in report.get("zeroshot") or [] if len(e["per_test"][0]["confusion"]) == 2]
    if not entries:
        return []
    names = list(dict.fromkeys(t["name"] for t in report["tests"]))
    rows = []
    for name in names:
        row = [name]
        for e in entries:
            conf = np.sum([t["confusion"] for t in e["per_test"] if t["name"] == name], axis=0)
            row.append(f"{fmt(_binary_f1(conf))} ({int(conf[1].sum()):,})")
        rows.append(row)
    title = "### Zero-shot F1 per test (in brackets: the feature's voxels scored)"
    headers = ["test", *[e["name"] for e in entries]]
    return ["", title, "", markdown_table(headers, rows, align="l" + "r" * len(entries))]


def _sweep_table(report: dict[str, Any]) -> list[str]:
    """Pooled F1 of every binary network of the zero-shot part, and of every network the
    box-count part trained, at the thresholds of :data:`SWEEP` (from the same
    probabilities as its main row): what the threshold each chose costs or gains."""
    rows = []
    for e in report.get("zeroshot") or []:
        sweeps = [t["sweep"] for t in e["per_test"] if "sweep" in t]
        if sweeps:
            pooled = np.sum(sweeps, axis=0).tolist()
            rows.append([f"{e['name']} (shipped)", fmt(e["threshold"]), *_sweep_f1(pooled)])
    for e in report.get("box_counts") or []:
        if "sweep" in e:
            label = f"{e['feature']}, {e['n_positive']} boxes, {e['network']}"
            rows.append([label, fmt(e["threshold"]), *_sweep_f1(e["sweep"])])
    if not rows:
        return []
    headers = ["network", "own threshold"] + [f"F1 at {t}" for t in SWEEP]
    title = "## F1 of the binary networks at other thresholds (pooled)"
    return ["", title, "", markdown_table(headers, rows, align="l" + "r" * (len(SWEEP) + 1))]


def _binary_tables(report: dict[str, Any]) -> list[str]:
    """Pooled P/R/F1 per feature and network (spread over seeds), and F1 per test."""
    groups = _group(report["binary"], ("feature", "network"))
    if not groups:
        return []
    test_names = [t["name"] for t in report["tests"]]
    rows = []
    for (feature, arch), entries in groups.items():
        per_seed = [e["pooled"]["classes"][feature] for e in entries]
        rows.append(
            [
                feature,
                arch,
                _spread([c["precision"] for c in per_seed]),
                _spread([c["recall"] for c in per_seed]),
                _spread([c["f1"] for c in per_seed]),
                ", ".join(fmt(c["f1"]) for c in per_seed),
                _spread([e["threshold"] or 0.5 for e in entries]),
                _spread([e["val_mean_dice"] for e in entries]),
                f"{np.mean([e['train_seconds'] for e in entries]):.0f}",
            ]
        )
    lines = ["", "## Binary networks (one per feature), pooled over the test tomograms", ""]
    headers = ["feature", "network", "precision", "recall", "F1", "F1 per training seed"]
    headers += ["threshold", "val. Dice", "train s"]
    lines.append(markdown_table(headers, rows, align="ll" + "r" * 7))
    lines += ["", "### F1 per test tomogram (pooled over training seeds)", ""]
    cols = list(groups)
    rows = []
    for name in test_names:
        row = [name]
        for (feature, _arch), entries in groups.items():
            m = _pooled(entries, [name])
            row.append(fmt(m["classes"][feature]["f1"]) if m else "-")
        rows.append(row)
    headers = ["test tomogram", *[f"{f} ({a})" for f, a in cols]]
    lines.append(markdown_table(headers, rows))
    return lines


def _multiclass_table(report: dict[str, Any]) -> list[str]:
    groups = _group(report["multiclass"], ("network",))
    if not groups:
        return []
    lines = [
        "",
        "## One multi-class network for all six classes, beside the seed's Table 1",
        "",
        "The seed's numbers are the test F1 of Zhao & Zhou's multi-class U-Net on *real*",
        "tomograms (a PC-12 cell, neuron cells and EMPIAR-10064 ribosome tomograms,",
        "labelled semi-automatically with EMAN2 and cleaned by hand; 512 x 512 crops",
        "split 80/10/10). Ours are measured on simulated tomograms with exact ground",
        "truth, other scenes and other settings than the training tomogram.",
        "The data differ: compare the pattern, not the digits.",
        "",
    ]
    binary = _group(report["binary"], ("feature", "network"))
    headers = ["class"]
    for (arch,) in groups:
        headers += [f"P ({arch})", f"R ({arch})", f"F1 ({arch})"]
    headers += [f"F1 binary {next(iter(groups))[0]}", "seed Table 1 test F1"]
    headers.append("truth voxels")
    rows = []
    first = next(iter(groups.values()))
    for cls, seed_f1 in SEED_TABLE1_TEST_F1.items():
        row = [cls]
        for entries in groups.values():
            per_seed = [e["pooled"]["classes"][cls] for e in entries]
            row += [_spread([c[k] for c in per_seed]) for k in ("precision", "recall", "f1")]
        own = binary.get((cls, next(iter(groups))[0]))
        row.append(_spread([e["pooled"]["classes"][cls]["f1"] for e in own]) if own else "-")
        support = first[0]["pooled"]["classes"][cls]["support"]
        rows.append(row + [fmt(seed_f1), f"{support:,}"])
    lines.append(markdown_table(headers, rows))
    o = report["options"]
    for (arch,), entries in groups.items():
        boxes = entries[0]["boxes"]
        mean_f1 = _spread([e["pooled"]["mean_foreground_f1"] for e in entries])
        lines.append(
            f"# multi-class {arch}: {boxes['positive']} positive boxes (up to "
            f"{o['n_positive']} per feature), {boxes['negative']} negative boxes; mean "
            f"foreground F1 {mean_f1}; {report['multiclass_iterations']} iterations, trained "
            f"in {np.mean([e['train_seconds'] for e in entries]):.0f} s"
        )
    return lines


def _box_count_table(report: dict[str, Any]) -> list[str]:
    if not report["box_counts"]:
        return []
    lines = ["", "## F1 against the number of positive boxes", ""]
    counts = sorted({e["n_positive"] for e in report["box_counts"]})
    by_feature: dict[tuple[str, str], dict[int, list[float]]] = {}
    for e in report["box_counts"]:
        key = (e["feature"], e["network"])
        by_feature.setdefault(key, {}).setdefault(e["n_positive"], []).append(e["f1"])
    rows = [
        [f, a, *[_spread(v[n]) if n in v else "-" for n in counts]]
        for (f, a), v in by_feature.items()
    ]
    lines.append(
        markdown_table(
            ["feature", "network", *[f"{n} positive boxes" for n in counts]],
            rows,
            align="ll" + "r" * len(counts),
        )
    )
    lines.append(f"# negative boxes fixed at {report['options']['n_negative']}")
    return lines


def _suggest_table(report: dict[str, Any]) -> list[str]:
    if not report.get("suggest"):
        return []
    lines = ["", "## One round of suggested boxes, decided by the ground truth", ""]
    rows = []
    for e in report["suggest"]:
        b, a = e["before"], e["after"]
        rows.append(
            [
                e["feature"],
                e["start"],
                str(e["train_seed"]),
                fmt(e.get("threshold")),
                f"{e['suggested']} ({e['accepted_positive']} positive, "
                f"{e['accepted_negative']} negative)",
                f"{fmt(b['precision'])} / {fmt(b['recall'])} / {fmt(b['f1'])}",
                f"{fmt(a['precision'])} / {fmt(a['recall'])} / {fmt(a['f1'])}",
            ]
        )
    headers = ["feature", "start", "seed", "threshold", "suggested boxes", "P / R / F1 before"]
    headers.append("P / R / F1 after")
    lines.append(markdown_table(headers, rows, align="lllrlrr"))
    return lines


def _merged_table(report: dict[str, Any]) -> list[str]:
    """Each feature alone and in the merged mask, per group of merged networks (the shipped
    ones; those trained from each start), P / R / F1 with the spread over training seeds."""
    groups = _group(report.get("merged") or [], ("start",))
    if not groups:
        return []
    lines = ["", "## The binary networks merged (each at its own threshold)", ""]
    rows = []
    for (start,), entries in groups.items():
        label = "shipped (zero-shot)" if start == "shipped" else f"trained ({start})"
        for feature in entries[0]["features"]:
            alone = [e["alone"][feature] for e in entries]
            merged = [e["pooled"]["classes"][feature] for e in entries]
            cells = [
                " / ".join(_spread([c[k] for c in group]) for k in ("precision", "recall", "f1"))
                for group in (alone, merged)
            ]
            rows.append([feature, label, *cells])
    headers = ["feature", "networks", "alone: P / R / F1", "merged: P / R / F1"]
    lines.append(markdown_table(headers, rows, align="llrr"))
    return lines


def _seeds(report: dict[str, Any]) -> str:
    return ", ".join(str(s) for s in dict.fromkeys(t["seed"] for t in report["tests"]))


def format_report(report: dict[str, Any]) -> str:
    """The printed report: machine, command, settings and the tables."""
    o = report["options"]
    z0, z1 = report["scored_slices"]
    depth = o["shape"][0]
    seeds = ", ".join(str(s) for s in o["train_seeds"])
    changed = ", ".join(f"{k}={v}" for k, v in o["train_overrides"].items())
    threshold = "each network's own" if o["threshold"] is None else f"{o['threshold']}"
    kind = "shifted settings" if o["shifted"] else "other seeds and noise levels"
    if o.get("imperfect"):
        kind = "imperfect tilt series (radiation damage, alignment errors)"
    lines = [
        "# accuracy on unseen simulated tomograms",
        f"# command: {report['command']}",
        describe_machine(report["machine"]),
        f"# training: simulated tomogram at the default setting ({'x'.join(map(str, o['shape']))}"
        f" voxels), training seed(s) {seeds} (scene, boxes, initialisation); "
        f"{o['n_positive']} positive and {o['n_negative']} negative boxes per feature, "
        f"TrainSettings defaults{' with ' + changed if changed else ''}, "
        f"{report['iterations']} iterations, {report['torch_threads']} torch thread(s)",
        f"# testing: {len(report['tests'])} tomograms ({kind}): "
        + "; ".join(dict.fromkeys(t["name"] for t in report["tests"]))
        + (f"; each on the scenes of seeds {_seeds(report)}" if o.get("imperfect") else "")
        + "".join(f"; every one with {k}={v}" for k, v in o.get("scene_overrides", {}).items()),
        f"# scored: the central {100 * Z_FRACTION[1] - 100 * Z_FRACTION[0]:.0f} % of the "
        f"slices (here {z0}-{z1 - 1} of {depth}); threshold: {threshold}; confusion "
        "matrices summed over the test tomograms; test-time augmentation: "
        + (f"{o['tta']} orientations" if o.get("tta") else "none")
        + f"; slice planes: {o.get('planes') or 'as each network says'}",
        f"# run time: {report['seconds'] / 60:.1f} min",
    ]
    lines += _zero_shot_table(report)
    lines += _zero_shot_per_test(report)
    lines += _sweep_table(report)
    lines += _binary_tables(report)
    lines += _multiclass_table(report)
    lines += _box_count_table(report)
    lines += _suggest_table(report)
    lines += _merged_table(report)
    return "\n".join(lines)


def _override(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` of ``--set``, the value read as JSON when it can be."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set takes NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def parse_args(argv: list[str] | None = None) -> tuple[AccuracyOptions, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shifted", action="store_true", help="the domain-shift test set")
    parser.add_argument(
        "--imperfect",
        action="store_true",
        help="the imperfect tilt series (radiation damage, alignment errors) as the "
        "shifted test set (implies --shifted)",
    )
    parser.add_argument(
        "--imperfect-scenes",
        type=int,
        help="with --imperfect: the scenes every test is simulated on (default: 3)",
    )
    parser.add_argument("--shifted-tests", nargs="+", help="only these shifted tests (names)")
    parser.add_argument("--train-seeds", type=int, nargs="+", help="default: 0")
    parser.add_argument(
        "--starts",
        nargs="+",
        choices=["auto", "scratch"],
        help="where training starts: auto (a shipped network that knows the feature; the "
        "default) and/or scratch (random weights); both compares them",
    )
    parser.add_argument("--iterations", type=int, help="mini-batches (default: TrainSettings')")
    parser.add_argument(
        "--multiclass-iterations",
        type=int,
        help="mini-batches of the multi-class network (default: --iterations)",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        help="run only these parts (default: all): the shipped networks zero-shot, binary "
        "networks, the multi-class network, F1 against the number of positive boxes, a "
        "round of suggested boxes, the binary networks merged (the shipped ones, and those "
        "of the binary part)",
    )
    parser.add_argument("--features", nargs="+", help="binary networks for (default: all)")
    parser.add_argument("--architectures", nargs="+", help="default: all registered")
    parser.add_argument(
        "--compare-features",
        nargs="+",
        help="features on which every architecture is trained (default: all of --features; "
        "the others get the default architecture only)",
    )
    parser.add_argument(
        "--multiclass-architectures", nargs="+", help="default: the default architecture"
    )
    parser.add_argument("--box-counts", type=int, nargs="+")
    parser.add_argument("--box-features", nargs="+")
    parser.add_argument("--suggest-features", nargs="+", help="features of the suggest part")
    parser.add_argument("--n-suggestions", type=int, help="suggested boxes per round")
    parser.add_argument("--n-positive", type=int)
    parser.add_argument("--n-negative", type=int)
    parser.add_argument("--test-seeds", type=int, nargs="+")
    parser.add_argument("--snrs", type=float, nargs="+")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"))
    parser.add_argument(
        "--set",
        type=_override,
        action="append",
        metavar="NAME=VALUE",
        help="a TrainSettings field for every network (repeatable), e.g. --set augment=false",
    )
    parser.add_argument(
        "--scene",
        type=_override,
        action="append",
        metavar="NAME=VALUE",
        help="a simulator setting for every test tomogram (repeatable), over each test's "
        "own, e.g. --scene vesicle_aspect=2.5",
    )
    parser.add_argument("--threshold", type=float, help="default: each network's own")
    parser.add_argument(
        "--tta",
        type=int,
        choices=(0, 4, 8),
        help="test-time augmentation on apply: orientations averaged (default: 0, none)",
    )
    parser.add_argument(
        "--planes",
        type=int,
        choices=(1, 3),
        help="slice planes on apply: 1 (XY) or 3 (XY, XZ, YZ; default: each network's own)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a tiny run to check the script")
    parser.add_argument("--json", help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    shifted = args.shifted or args.imperfect
    options = quick_options(shifted) if args.quick else AccuracyOptions(shifted=shifted)
    if args.imperfect:
        options.imperfect = True
        if args.quick:
            options.shifted_tests = [IMPERFECT_TESTS[0][0], IMPERFECT_TESTS[-1][0]]
    for name in (
        "iterations",
        "multiclass_iterations",
        "parts",
        "features",
        "architectures",
        "compare_features",
        "multiclass_architectures",
        "box_counts",
        "box_features",
        "suggest_features",
        "n_suggestions",
        "n_positive",
        "n_negative",
        "shifted_tests",
        "imperfect_scenes",
        "test_seeds",
        "snrs",
        "train_seeds",
        "starts",
        "threshold",
        "tta",
        "planes",
        "threads",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(options, name, value)
    if options.imperfect_scenes < 1:
        parser.error(f"--imperfect-scenes must be at least 1, got {options.imperfect_scenes}")
    if args.shape:
        options.shape = tuple(args.shape)
    if args.set:
        options.train_overrides = dict(args.set)
    if args.scene:
        from napari_tomoseg.simulator.synthetic import SimulationSettings

        options.scene_overrides = dict(args.scene)
        known = {f.name for f in fields(SimulationSettings)} - {"shape", "seed"}
        unknown = sorted(set(options.scene_overrides) - known)
        if unknown:
            parser.error(f"--scene: unknown simulator settings {unknown}; known: {sorted(known)}")
    return options, args


def main(argv: list[str] | None = None) -> int:
    options, args = parse_args(argv)
    report = run_accuracy(options, log=lambda text: print(f"... {text}", file=sys.stderr))
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
