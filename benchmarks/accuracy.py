"""Accuracy on simulated tomograms the training never saw: per-class precision, recall, F1.

    python benchmarks/accuracy.py [--iterations N] [--features F ...] [--architectures A ...]
                                  [--compare-features F ...]
                                  [--multiclass-architectures A ...] [--box-counts 2 5 10 20]
                                  [--box-features F ...] [--test-seeds 1 2]
                                  [--snrs 0.8 0.5 1.5] [--shape 96 256 256] [--threads T]
                                  [--quick] [--json FILE]

Training data: the simulator's tomogram of seed 0 (default noise, SNR 0.8), boxed the way
the TomoSeg protocol asks a person to: about 10 positive boxes rich in the feature and
100 negative boxes free of it (:func:`napari_tomoseg.demo.boxes_from_ground_truth`), the
feature painted from the ground truth inside the positive boxes.  Every network is
trained with the package's ``TrainSettings`` defaults except ``--iterations``.

Test data: tomograms of other seeds (other scenes) at the training noise level and at other
noise levels (``--test-seeds`` x ``--snrs``), never seen in training.  Each network is
applied to the central 60 % of the slices (Z from 0.2 to 0.8 of the depth: the slices
the boxes are drawn from, away from the top and bottom of the volume), thresholded at 0.5
(``ApplySettings`` defaults), and scored voxel by voxel against the ground truth; the
confusion matrices of all test tomograms are summed before precision, recall and F1
(= Dice) are computed (:func:`napari_tomoseg.training.metrics_from_confusion`).

Reported:

1. one binary network per feature and architecture (TomoSeg's way: one network per feature;
   ``--compare-features`` limits the architecture comparison to some features, to bound
   the run time, the other features getting a network of the default architecture);
2. one multi-class network for all six classes (positive boxes of every feature, the full
   six-class ground truth painted in them, negatives free of every feature), per class,
   next to the test F1 of the multi-class U-Net in Zhao & Zhou's Table 1 (real tomograms,
   not these: the data differ);
3. F1 against the number of positive boxes (``--box-counts``) for the default architecture
   and ``--box-features``, with the negatives fixed: how much annotation is enough.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
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
PARTS = ("binary", "multiclass", "boxes")
#: Fraction of the depth scored (and boxed): the central slices.
Z_FRACTION = (0.2, 0.8)


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
    n_positive: int = 10
    n_negative: int = 100
    test_seeds: list[int] = field(default_factory=lambda: [1, 2])
    snrs: list[float] = field(default_factory=lambda: [0.8, 0.5, 1.5])
    shape: tuple[int, int, int] = (96, 256, 256)
    train_seed: int = 0
    threads: int | None = None


def quick_options() -> AccuracyOptions:
    """A very small run that checks the script end to end (seconds, meaningless numbers)."""
    return AccuracyOptions(
        iterations=3,
        features=["single_membrane"],
        architectures=["unet-lite"],
        multiclass_architectures=["unet-lite"],
        box_counts=[2, 4],
        box_features=["single_membrane"],
        n_positive=4,
        n_negative=8,
        test_seeds=[1],
        snrs=[0.8, 1.5],
        shape=(40, 96, 96),
    )


def scored_slices(depth: int) -> tuple[int, int]:
    """``(z0, z1)``: the slices that are scored (:data:`Z_FRACTION` of the depth)."""
    from napari_tomoseg.demo import central_slices

    return central_slices(depth, Z_FRACTION)


def evaluate(
    network: Any,
    tests: list[tuple[int, float, Any]],
    truth_values: list[int] | None = None,
) -> dict[str, Any]:
    """Apply ``network`` to the test tomograms and score its thresholded mask.

    ``tests`` holds ``(seed, snr, SimulatedTomogram)``.  A binary network is scored against
    ``labels in truth_values``; a multi-class one against the labels themselves (its
    classes are the simulator's).  Only the central slices (:func:`scored_slices`) are
    computed and scored.  Returns the pooled metrics and those of every test tomogram.
    """
    from napari_tomoseg.inference import ApplySettings, apply_network
    from napari_tomoseg.training import confusion_matrix, metrics_from_confusion

    names = list(network.meta.class_names)
    k = len(names)
    settings = ApplySettings(threshold=0.5)
    total = np.zeros((k, k), dtype=np.int64)
    per_test = []
    for seed, snr, sim in tests:
        z0, z1 = scored_slices(sim.tomogram.shape[0])
        start = z0 // settings.z_chunk * settings.z_chunk  # runs start on a chunk boundary
        result = apply_network(
            network,
            sim.tomogram,
            voxel_size=sim.voxel_size,
            settings=settings,
            z_range=(start, z1),
            keep_probabilities=False,
        )
        pred = np.asarray(result.mask)[z0 - start :]
        labels = sim.labels[z0:z1]
        truth = np.isin(labels, truth_values).astype(np.uint8) if truth_values else labels
        conf = confusion_matrix(pred, truth, k)
        total += conf
        per_test.append(
            {
                "seed": seed,
                "snr": snr,
                "confusion": conf.tolist(),
                "metrics": metrics_from_confusion(conf, names),
            }
        )
    return {"pooled": metrics_from_confusion(total, names), "per_test": per_test}


def _train(
    trainset: Any, architecture: str, options: AccuracyOptions, iterations: int | None = None
) -> Any:
    from napari_tomoseg.training import TrainSettings, train

    settings = TrainSettings(architecture=architecture, seed=options.train_seed)
    iterations = iterations if iterations is not None else options.iterations
    if iterations is not None:
        settings.iterations = int(iterations)
    return train(trainset, settings)


def _boxes_up_to(labels: np.ndarray, values: Any, positive: int, negative: int, seed: int) -> Any:
    """:func:`boxes_from_ground_truth`, asking for fewer boxes (three quarters at a time)
    while the volume cannot supply that many."""
    from napari_tomoseg.demo import boxes_from_ground_truth
    from napari_tomoseg.errors import TomosegError

    while True:
        try:
            return boxes_from_ground_truth(
                labels, values, n_positive=positive, n_negative=negative, seed=seed
            )
        except TomosegError:
            if positive + negative <= 1:
                return [], []
            positive, negative = positive * 3 // 4, negative * 3 // 4


def multiclass_trainset(sim: Any, n_positive: int, n_negative: int, seed: int = 0) -> Any:
    """A six-class training set: up to ``n_positive`` boxes per feature with the whole
    ground truth painted in them, and up to ``n_negative`` boxes free of every feature
    (fewer when the volume cannot hold that many; the set's metadata says how many)."""
    from napari_tomoseg.synthetic import CLASS_NAMES
    from napari_tomoseg.trainset import TrainsetSettings, build_training_set

    features = list(range(1, len(CLASS_NAMES)))
    positives = []
    seen = set()
    per_feature = {}
    for value in features:
        boxes, _ = _boxes_up_to(sim.labels, value, n_positive, 0, seed)
        per_feature[CLASS_NAMES[value]] = len(boxes)
        for b in boxes:
            if (b.z, b.y, b.x) not in seen:
                seen.add((b.z, b.y, b.x))
                positives.append(b)
    _, negatives = _boxes_up_to(sim.labels, features, 0, n_negative, seed)
    ts = build_training_set(
        sim.tomogram,
        sim.labels,
        positives,
        negatives,
        TrainsetSettings(seed=seed),
        class_names=CLASS_NAMES,
        voxel_size=sim.voxel_size,
        source=f"simulated seed {sim.settings.seed}",
    )
    ts.metadata["benchmark_boxes"] = {
        "positive": len(positives),
        "negative": len(negatives),
        "per_feature": per_feature,
    }
    return ts


def _summary(result: Any, seconds: float) -> dict[str, Any]:
    return {
        "train_seconds": seconds,
        "val_mean_dice": result.metrics.get("mean_foreground_f1"),
        "best_step": result.metadata.get("best_step"),
        "steps": result.metadata.get("steps_done"),
    }


def run_accuracy(options: AccuracyOptions, log: Any = None) -> dict[str, Any]:
    """Train and test everything ``options`` asks for; returns all numbers as a dict."""
    import torch

    from napari_tomoseg.models import DEFAULT_ARCHITECTURE, available
    from napari_tomoseg.synthetic import CLASS_NAMES, SimulationSettings, simulate_tomogram
    from napari_tomoseg.training import TrainSettings

    def say(text: str) -> None:
        if log is not None:
            log(text)

    if options.threads:
        torch.set_num_threads(int(options.threads))
    features = options.features or list(CLASS_NAMES[1:])
    archs = options.architectures or available()
    multi_archs = options.multiclass_architectures or [DEFAULT_ARCHITECTURE]
    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "command": command_line(),
        "machine": machine_info(),
        "options": asdict(options),
        "iterations": options.iterations or TrainSettings().iterations,
        "multiclass_iterations": options.multiclass_iterations
        or options.iterations
        or TrainSettings().iterations,
        "default_architecture": DEFAULT_ARCHITECTURE,
        "torch_threads": torch.get_num_threads(),
        "binary": [],
        "multiclass": [],
        "box_counts": [],
    }
    shape = tuple(options.shape)
    say(f"simulating the training tomogram (seed {options.train_seed}) ...")
    train_sim = simulate_tomogram(SimulationSettings(shape=shape, seed=options.train_seed))
    tests = []
    for seed in options.test_seeds:
        for snr in options.snrs:
            say(f"simulating test tomogram seed {seed}, SNR {snr} ...")
            sim = simulate_tomogram(SimulationSettings(shape=shape, seed=seed, snr=snr))
            tests.append((seed, snr, sim))
    z0, z1 = scored_slices(shape[0])
    report["scored_slices"] = [z0, z1]

    trained: dict[tuple[str, str, int], dict[str, Any]] = {}
    for feature in features if "binary" in options.parts else []:
        value = CLASS_NAMES.index(feature)
        ts = binary_trainset(
            train_sim, feature, options.n_positive, options.n_negative, options.train_seed
        )
        compared = not options.compare_features or feature in options.compare_features
        for arch in archs if compared else [DEFAULT_ARCHITECTURE]:
            say(f"binary {feature} / {arch}: training ...")
            t0 = time.perf_counter()
            result = _train(ts, arch, options)
            entry = {
                "feature": feature,
                "architecture": arch,
                "n_positive": options.n_positive,
                "n_negative": options.n_negative,
                **_summary(result, time.perf_counter() - t0),
                **evaluate(result.network, tests, [value]),
            }
            report["binary"].append(entry)
            trained[(feature, arch, options.n_positive)] = entry

    for arch in multi_archs if "multiclass" in options.parts else []:
        say(f"multi-class / {arch}: training ...")
        ts = multiclass_trainset(
            train_sim, options.n_positive, options.n_negative, options.train_seed
        )
        t0 = time.perf_counter()
        result = _train(ts, arch, options, options.multiclass_iterations)
        report["multiclass"].append(
            {
                "architecture": arch,
                "boxes": ts.metadata["benchmark_boxes"],
                **_summary(result, time.perf_counter() - t0),
                **evaluate(result.network, tests),
            }
        )

    box_arch = DEFAULT_ARCHITECTURE
    for feature in options.box_features if "boxes" in options.parts else []:
        value = CLASS_NAMES.index(feature)
        for n in options.box_counts:
            entry = trained.get((feature, box_arch, n))
            if entry is None:
                say(f"{n} positive boxes, {feature} / {box_arch}: training ...")
                ts = binary_trainset(train_sim, feature, n, options.n_negative, options.train_seed)
                t0 = time.perf_counter()
                result = _train(ts, box_arch, options)
                entry = {
                    "feature": feature,
                    "architecture": box_arch,
                    "n_positive": n,
                    "n_negative": options.n_negative,
                    **_summary(result, time.perf_counter() - t0),
                    **evaluate(result.network, tests, [value]),
                }
                trained[(feature, box_arch, n)] = entry
            report["box_counts"].append(
                {k: v for k, v in entry.items() if k != "per_test"}
                | {"f1": entry["pooled"]["classes"][feature]["f1"]}
            )
    report["seconds"] = time.perf_counter() - t_start
    return report


def _f1_by_snr(entry: dict[str, Any], cls: str, snrs: list[float]) -> list[str]:
    """F1 of class ``cls`` at each noise level, pooled over the test seeds."""
    from napari_tomoseg.training import metrics_from_confusion

    out = []
    for snr in snrs:
        matrices = [np.asarray(t["confusion"]) for t in entry["per_test"] if t["snr"] == snr]
        if not matrices:
            out.append(fmt(None))
            continue
        names = list(entry["pooled"]["classes"])
        metrics = metrics_from_confusion(np.sum(matrices, axis=0), names)
        out.append(fmt(metrics["classes"][cls]["f1"]))
    return out


def format_report(report: dict[str, Any]) -> str:
    """The printed report: machine, command, settings and the three tables."""
    o = report["options"]
    z0, z1 = report["scored_slices"]
    depth = o["shape"][0]
    tests = ", ".join(f"seed {s}" for s in o["test_seeds"])
    lines = [
        "# accuracy on unseen simulated tomograms",
        f"# command: {report['command']}",
        describe_machine(report["machine"]),
        f"# training: simulated tomogram seed {o['train_seed']} ({'x'.join(map(str, o['shape']))}"
        f" voxels, SNR 0.8), {o['n_positive']} positive and {o['n_negative']} negative boxes "
        f"per feature, TrainSettings defaults with {report['iterations']} iterations, "
        f"{report['torch_threads']} torch thread(s)",
        f"# testing: {tests} at SNR {', '.join(str(s) for s in o['snrs'])} "
        f"({len(o['test_seeds']) * len(o['snrs'])} tomograms); slices {z0}-{z1 - 1} of "
        f"{depth} scored (the central {100 * (z1 - z0) / depth:.0f} %), threshold 0.5; "
        "confusion matrices summed over the test tomograms",
        f"# run time: {report['seconds'] / 60:.1f} min",
    ]
    snrs = o["snrs"]
    rows = []
    for e in report["binary"]:
        c = e["pooled"]["classes"][e["feature"]]
        rows.append(
            [
                e["feature"],
                e["architecture"],
                fmt(c["precision"]),
                fmt(c["recall"]),
                fmt(c["f1"]),
                *_f1_by_snr(e, e["feature"], snrs),
                fmt(e["val_mean_dice"]),
                f"{e['train_seconds']:.0f}",
            ]
        )
    if rows:
        lines += ["", "## Binary networks (one per feature), pooled over the test tomograms", ""]
        lines.append(
            markdown_table(
                [
                    "feature",
                    "network",
                    "precision",
                    "recall",
                    "F1",
                    *[f"F1 at SNR {s}" for s in snrs],
                    "val. Dice",
                    "train s",
                ],
                rows,
                align="ll" + "r" * (5 + len(snrs)),
            )
        )
    if report["multiclass"]:
        lines += [
            "",
            "## One multi-class network for all six classes, beside the seed's Table 1",
            "",
            "The seed's numbers are the test F1 of Zhao & Zhou's multi-class U-Net on *real*",
            "tomograms (a PC-12 cell, neuron cells and EMPIAR-10064 ribosome tomograms,",
            "labelled semi-automatically with EMAN2 and cleaned by hand; 512 x 512 crops",
            "split 80/10/10). Ours are measured on simulated tomograms with exact ground",
            "truth, other scenes and other noise levels than the training tomogram.",
            "The data differ: compare the pattern, not the digits.",
            "",
        ]
        binary_default = {
            e["feature"]: e["pooled"]["classes"][e["feature"]]["f1"]
            for e in report["binary"]
            if e["architecture"] == report["default_architecture"]
        }
        headers = ["class"]
        for m in report["multiclass"]:
            headers += [f"P ({m['architecture']})", f"R ({m['architecture']})"]
            headers += [f"F1 ({m['architecture']})"]
        headers += [f"F1 binary {report['default_architecture']}", "seed Table 1 test F1"]
        rows = []
        for cls, seed_f1 in SEED_TABLE1_TEST_F1.items():
            row = [cls]
            for m in report["multiclass"]:
                c = m["pooled"]["classes"][cls]
                row += [fmt(c["precision"]), fmt(c["recall"]), fmt(c["f1"])]
            support = report["multiclass"][0]["pooled"]["classes"][cls]["support"]
            row += [fmt(binary_default.get(cls)), fmt(seed_f1), f"{support:,}"]
            rows.append(row)
        headers.append("truth voxels")
        lines.append(markdown_table(headers, rows))
        for m in report["multiclass"]:
            lines.append(
                f"# multi-class {m['architecture']}: {m['boxes']['positive']} positive boxes "
                f"(up to {o['n_positive']} per feature), {m['boxes']['negative']} negative "
                f"boxes; mean foreground F1 {m['pooled']['mean_foreground_f1']:.2f}; "
                f"{report['multiclass_iterations']} iterations, trained in "
                f"{m['train_seconds']:.0f} s"
            )
    if report["box_counts"]:
        lines += ["", "## F1 against the number of positive boxes", ""]
        counts = sorted({e["n_positive"] for e in report["box_counts"]})
        by_feature: dict[tuple[str, str], dict[int, float]] = {}
        for e in report["box_counts"]:
            by_feature.setdefault((e["feature"], e["architecture"]), {})[e["n_positive"]] = e["f1"]
        rows = [[f, a, *[fmt(v.get(n)) for n in counts]] for (f, a), v in by_feature.items()]
        lines.append(
            markdown_table(
                ["feature", "network", *[f"{n} positive boxes" for n in counts]],
                rows,
                align="ll" + "r" * len(counts),
            )
        )
        lines.append(f"# negative boxes fixed at {o['n_negative']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[AccuracyOptions, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        help="run only these parts (default: all): binary networks, the multi-class "
        "network, F1 against the number of positive boxes",
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
    parser.add_argument("--n-positive", type=int)
    parser.add_argument("--n-negative", type=int)
    parser.add_argument("--test-seeds", type=int, nargs="+")
    parser.add_argument("--snrs", type=float, nargs="+")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a tiny run to check the script")
    parser.add_argument("--json", help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    options = quick_options() if args.quick else AccuracyOptions()
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
        "n_positive",
        "n_negative",
        "test_seeds",
        "snrs",
        "threads",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(options, name, value)
    if args.shape:
        options.shape = tuple(args.shape)
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
