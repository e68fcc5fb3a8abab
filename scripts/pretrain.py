"""Train the starting networks that ship with napari-tomoseg, on simulated tomograms.

    python scripts/pretrain.py [--tomograms 48] [--iterations 12000]
                               [--binary-iterations 3000] [--out DIR] [--seed 0]
                               [--start NETWORK] [--voxel-sizes LOW HIGH]
                               [--context-slices C]
                               [--imperfect] [--microtubule-variety]
                               [--vesicle-variety] [--membrane-variety]
                               [--complex-variety]
                               [--threads T] [--processes P]
                               [--work DIR] [--quick]

1. Simulates ``--tomograms`` tomograms whose settings are drawn at random
   (:func:`napari_tomoseg.simulator.synthetic.random_settings`: dose, defocus, tilt range,
   envelope, CTF correction, reconstruction smoothness, thickness, crowding, object counts,
   bilayer thickness, microtubule diameter, vesicle sizes), at 10 A or, with
   ``--voxel-sizes LOW HIGH``, each at its own voxel size (log-uniform) and then resampled
   to the networks' 10 A the way apply resamples a user's tomogram
   (:func:`napari_tomoseg.simulator.demo.at_voxel_size`), so the networks learn what a
   rescaled tomogram looks like; with ``--imperfect`` some get radiation damage and
   residual alignment errors too; with ``--microtubule-variety`` the microtubules run up to
   35 degrees out of the XY plane (``--microtubule-elevation 4 90``: up to along the beam)
   and their walls are more or less beaded; with
   ``--vesicle-variety`` the vesicles are ellipsoids up to 2.5 times longer than wide;
   with ``--complex-variety`` up to 1.5 large unlabelled complexes per ribosome
   (proteasome-like barrels, hollow chaperonin-like double rings, lobed assemblies) that a
   ribosome network must not mark.
   ``--processes P`` simulates P tomograms at a time.
2. From each, cuts training boxes the way a user boxes (up to ``--positive`` boxes rich in
   each feature, ``--negative`` boxes free of every feature; ``--box-size`` pixels) with
   the simulator's six classes painted, and joins them into one training set.
3. Trains one multi-class network for the five features (``all_features``; from random
   weights, or continuing the network file ``--start``, e.g. on new scenes), then one
   binary network per feature, each starting from the multi-class network (its output
   layer from that feature's row against the background's) and trained on the same boxes
   with that feature alone painted, so every other feature is a negative example.
   ``--iterations 0`` skips the multi-class network: the binary networks start from
   ``--start`` as it is, which may itself be a binary network (a shipped feature's network
   continued on new scenes; only a multi-class start is saved again as ``all_features``).
   Training uses the package's own loop and augmentation (zoom, blur, noise, contrast,
   inversion) with a cosine learning-rate decay.
4. Saves the networks as ``<name>.tsnet`` into ``--out`` (default: the package's
   ``networks`` folder) and a JSON summary beside them.

Seeded: the same command gives the same networks on the same machine.  Run time and the
accuracy of the result: ``docs/models.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "napari_tomoseg" / "learning"
PACKAGE_DIR = PACKAGE_DIR / "networks"
#: The voxel size (Angstrom) of the networks this script trains.
NETWORK_VOXEL = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from napari_tomoseg.learning.trainset import TrainsetSettings

    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tomograms", type=int, default=48, help="simulated tomograms")
    parser.add_argument("--positive", type=int, default=12, help="boxes per feature per tomogram")
    parser.add_argument("--negative", type=int, default=30, help="negative boxes per tomogram")
    parser.add_argument("--box-size", type=int, default=96, help="box side in pixels")
    parser.add_argument("--ncopy", type=int, default=2, help="rotated copies per box")
    parser.add_argument("--shape-yx", type=int, nargs=2, default=(256, 256), help="slice size")
    parser.add_argument(
        "--context-slices",
        type=int,
        default=TrainsetSettings.context_slices,
        help="neighbouring slices each side as input channels (2.5D; default: the "
        "package's); a --start of other context slices is fitted to them",
    )
    parser.add_argument(
        "--voxel-sizes",
        type=float,
        nargs=2,
        default=(10.0, 10.0),
        metavar=("LOW", "HIGH"),
        help="simulate each tomogram at a voxel size drawn log-uniformly from LOW-HIGH A, "
        f"then resample it to the networks' {NETWORK_VOXEL:g} A as apply would",
    )
    parser.add_argument(
        "--imperfect",
        action="store_true",
        help="also draw radiation damage and residual alignment errors "
        "(synthetic.IMPERFECT_RANGES) for some of the tomograms",
    )
    parser.add_argument(
        "--microtubule-variety",
        action="store_true",
        help="also draw each tomogram's microtubule elevation and wall lattice "
        "(synthetic.MICROTUBULE_RANGES)",
    )
    parser.add_argument(
        "--microtubule-elevation",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="with --microtubule-variety: the range of the largest elevation drawn "
        "(degrees; default: synthetic.MICROTUBULE_RANGES', 4 35; 4 90 lets microtubules run "
        "along the beam, seen end-on as small rings)",
    )
    parser.add_argument(
        "--vesicle-variety",
        action="store_true",
        help="also draw how far each tomogram's vesicles depart from spheres "
        "(synthetic.VESICLE_RANGES)",
    )
    parser.add_argument(
        "--membrane-variety",
        action="store_true",
        help="also draw how dense each tomogram's bilayer cores are, from lipid tails alone "
        "to packed with membrane proteins (synthetic.MEMBRANE_RANGES)",
    )
    parser.add_argument(
        "--complex-variety",
        action="store_true",
        help="also draw how many large unlabelled complexes (proteasome-, chaperonin- and "
        "lobed shapes) each tomogram holds per ribosome (synthetic.COMPLEX_RANGES)",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=12000,
        help="multi-class mini-batches; 0 with --start: take that network as it is and "
        "train only the binary networks from it",
    )
    parser.add_argument(
        "--binary-iterations", type=int, default=3000, help="mini-batches per binary network"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--binary-learning-rate",
        type=float,
        default=None,
        help="learning rate of the binary networks (default: --learning-rate)",
    )
    parser.add_argument("--architecture", default=None, help="default: the package's default")
    parser.add_argument(
        "--features", nargs="+", default=None, help="binary networks for (default: all five)"
    )
    parser.add_argument(
        "--start",
        type=Path,
        default=None,
        help="a network file to continue: a multi-class one, or with --iterations 0 a "
        "binary one that each --features network starts from (default: random weights)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--processes", type=int, default=1, help="processes that simulate the tomograms"
    )
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR, help="where the networks go")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the training set and checkpoints (a rerun resumes from them)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run that checks the script")
    args = parser.parse_args(argv)
    if args.iterations < 0 or (args.iterations == 0 and args.start is None):
        parser.error("--iterations must be > 0, or 0 with --start (binary networks only)")
    if args.context_slices < 0:
        parser.error(f"--context-slices must be >= 0, got {args.context_slices}")
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    if min(args.voxel_sizes) <= 0:
        parser.error(f"--voxel-sizes must be > 0 Angstrom, got {args.voxel_sizes}")
    elevation = args.microtubule_elevation
    if elevation is not None and not (
        args.microtubule_variety and 0 <= elevation[0] <= elevation[1] <= 90
    ):
        parser.error(
            f"--microtubule-elevation takes 0 <= LOW <= HIGH <= 90 degrees, with "
            f"--microtubule-variety; got {elevation}"
        )
    if args.quick:
        args.tomograms, args.positive, args.negative, args.box_size = 2, 2, 4, 32
        args.shape_yx, args.binary_iterations = (96, 96), 2
        args.iterations = min(args.iterations, 4)  # 0 stays 0
    return args


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def draw_voxel_size(rng: np.random.Generator, limits: tuple[float, float]) -> float:
    """A voxel size log-uniform in ``limits``; no draw (so the same settings follow from
    the seed as before voxel sizes were drawn) when they are one size."""
    low, high = sorted(float(v) for v in limits)
    if high - low < 1e-9:
        return low
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _boxes_of(job: tuple[int, Any, argparse.Namespace]) -> tuple[Any, dict | str]:
    """Simulate one tomogram, resample it to the networks' voxel size and cut its boxes:
    (training set, its description), or (None, why it was skipped)."""
    from napari_tomoseg.learning.trainset import TrainsetSettings
    from napari_tomoseg.simulator.demo import at_voxel_size, trainset_from_truth
    from napari_tomoseg.simulator.synthetic import CLASS_NAMES, simulate_tomogram

    i, settings, args = job
    sim = at_voxel_size(simulate_tomogram(settings), NETWORK_VOXEL)
    box = TrainsetSettings(
        box_size=args.box_size,
        ncopy=args.ncopy,
        seed=args.seed + i,
        context_slices=args.context_slices,
    )
    try:
        ts = trainset_from_truth(
            sim,
            CLASS_NAMES[1:],
            args.positive,
            args.negative,
            seed=args.seed + i,
            all_classes=True,
            trainset_settings=box,
        )
    except Exception as exc:  # a scene too crowded or too empty for boxes: skip it
        return None, str(exc)
    about = {"seed": settings.seed, "voxel_size": round(settings.voxel_size, 2)}
    for name in _drawn_settings(args):
        about[name] = round(getattr(settings, name), 2)
    return ts, {**about, "boxes": ts.metadata["benchmark_boxes"]}


def _drawn_settings(args: argparse.Namespace) -> list[str]:
    """The simulator settings the command's imperfection and variety options draw, each
    recorded per tomogram."""
    from napari_tomoseg.simulator import synthetic

    tables = (
        (args.imperfect, synthetic.IMPERFECT_RANGES),
        (args.microtubule_variety, synthetic.MICROTUBULE_RANGES),
        (args.vesicle_variety, synthetic.VESICLE_RANGES),
        (args.membrane_variety, synthetic.MEMBRANE_RANGES),
        (args.complex_variety, synthetic.COMPLEX_RANGES),
    )
    return [name for wanted, table in tables if wanted for name in table]


def _variety_ranges(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """The variety ranges the command changes (``--microtubule-elevation``)."""
    if args.microtubule_elevation is None:
        return {}
    return {"microtubule_elevation_deg": tuple(args.microtubule_elevation)}


def _jobs(args: argparse.Namespace) -> list[tuple[int, Any, argparse.Namespace]]:
    """Each tomogram's index and settings (its voxel size among them), drawn in order from
    the seed, so the same command gives the same tomograms however many processes simulate
    them."""
    from napari_tomoseg.simulator.synthetic import random_settings

    rng = np.random.default_rng(args.seed)
    jobs = []
    for i in range(args.tomograms):
        voxel = draw_voxel_size(rng, args.voxel_sizes)
        shape_yx = tuple(round(n * NETWORK_VOXEL / voxel) for n in args.shape_yx)
        settings = random_settings(
            rng,
            shape_yx,
            voxel_size=voxel,
            imperfect=args.imperfect,
            microtubule_variety=args.microtubule_variety,
            vesicle_variety=args.vesicle_variety,
            membrane_variety=args.membrane_variety,
            variety_ranges=_variety_ranges(args),
            complex_variety=args.complex_variety,
        )
        jobs.append((i, settings, args))
    return jobs


def build_trainset(args: argparse.Namespace) -> Any:
    """Simulate the tomograms (in ``--processes`` processes) and join their boxes into
    one six-class training set."""
    from concurrent.futures import ProcessPoolExecutor

    from napari_tomoseg.learning.trainset import TrainingSet, concatenate

    cached = args.work / "pretrain.tstrain.npz" if args.work else None
    if cached is not None and cached.is_file():
        say(f"reusing the training set {cached}")
        return TrainingSet.load(cached)
    jobs = _jobs(args)
    parallel = ProcessPoolExecutor(args.processes) if args.processes > 1 else None
    sets, described = [], []
    with parallel or contextlib.nullcontext():
        done = parallel.map(_boxes_of, jobs) if parallel else map(_boxes_of, jobs)
        for (i, settings, _), (ts, about) in zip(jobs, done):
            say(
                f"simulated tomogram {i + 1}/{args.tomograms} {settings.shape} at "
                f"{settings.voxel_size:.1f} A, SNR {settings.snr:.2f}"
                + ("" if ts is not None else f": skipped: {about}")
            )
            if ts is not None:
                sets.append(ts)
                described.append(about)
    joined = concatenate(sets, source=f"{len(sets)} simulated tomograms (random settings)")
    joined.metadata["pretraining_tomograms"] = described
    if cached is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        joined.save(cached, overwrite=True)
    return joined


def train_network(
    trainset: Any,
    args: argparse.Namespace,
    name: str,
    iterations: int,
    init: Any = None,
    learning_rate: float | None = None,
) -> Any:
    """Train (resuming from ``--work`` when a checkpoint is there) and return the result."""
    from napari_tomoseg.learning.training import TrainSettings, iter_train
    from napari_tomoseg.progress import drive

    settings = TrainSettings(
        iterations=iterations,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate if learning_rate is None else learning_rate,
        lr_schedule="cosine",
        validation_fraction=0.1,
        eval_every=max(1, min(250, iterations // 4)),
        seed=args.seed,
        start_from="scratch",
    )
    if args.architecture:
        settings.architecture = args.architecture
    resume = False
    if args.work is not None:
        settings.checkpoint = str(args.work / f"{name}.ckpt")
        resume = Path(settings.checkpoint).is_file()
    last = [0.0]

    def report(event: Any) -> None:
        if time.monotonic() - last[0] > 60 or event.step == event.total:
            last[0] = time.monotonic()
            say(f"  {name}: {event.message} {dict(list(event.metrics.items())[:3])}")

    return drive(iter_train(trainset, settings, init=init, resume=resume), report)


def binary_subset(trainset: Any, feature: str) -> Any:
    """The six-class training set with one feature painted (the others background)."""
    from napari_tomoseg.learning.trainset import TrainingSet

    value = list(trainset.class_names).index(feature)
    labels = (trainset.labels == value).astype(np.uint8)
    positive = labels.reshape(len(labels), -1).any(axis=1)
    metadata = json.loads(json.dumps(trainset.metadata))
    metadata["class_names"] = ["background", feature]
    return TrainingSet(
        images=trainset.images,
        labels=labels,
        box_ids=trainset.box_ids,
        positive=positive,
        class_names=("background", feature),
        metadata=metadata,
    )


def network_like(network: Any, channels: int, class_names: tuple) -> tuple[Any, dict]:
    """A new network of ``network``'s architecture taking ``channels`` inputs and giving
    ``class_names``, with its weights (``pretrained.transfer_weights``: the input layer
    fitted, the output rows matched by feature); also what was copied."""
    from napari_tomoseg.learning.model_file import Network
    from napari_tomoseg.learning.pretrained import transfer_weights

    meta = network.meta
    new = Network.create(
        meta.architecture,
        channels,
        len(class_names),
        model_params=dict(meta.model_params),
        class_names=tuple(class_names),
    )
    return new, transfer_weights(network, new)


def fitted(network: Any, trainset: Any) -> Any:
    """``network`` taking the training set's input channels: itself when it does, else a
    copy whose input layer is fitted to the set's context slices (its metadata kept)."""
    channels = int(trainset.images.shape[1])
    meta = network.meta
    if meta.in_channels == channels:
        return network
    other, _ = network_like(network, channels, meta.class_names)
    other.meta = dataclasses.replace(meta, in_channels=channels, context_slices=channels // 2)
    say(f"fitted the start network's {meta.in_channels} input channels to {channels}")
    return other


def describe(result: Any, seconds: float, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "seconds": round(seconds, 1),
        "steps": result.metadata["steps_done"],
        "best_step": result.metadata["best_step"],
        "validation_mean_dice": round(result.metrics["mean_foreground_f1"], 4),
        "threshold": result.network.meta.threshold,
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    trainset = build_trainset(args)
    summary = train_and_save(args, trainset, " ".join(["python", *sys.argv]), t_start)
    print(json.dumps(summary, indent=1))
    return 0


def train_and_save(args: argparse.Namespace, trainset: Any, command: str, t_start: float) -> dict:
    """Train ``all_features`` (or take ``--start``) and the binary networks on
    ``trainset``, saving each into ``--out`` as it is done; the run's summary, also
    written there as ``pretraining.json``."""
    from napari_tomoseg.learning.model_file import load_network, save_network
    from napari_tomoseg.learning.pretrained import MULTICLASS

    summary: dict[str, Any] = {
        "command": command,
        "samples": len(trainset),
        "tomograms": len(trainset.metadata.get("sources", [])),
        "seconds_data": round(time.perf_counter() - t_start, 1),
        "voxel_sizes": sorted(args.voxel_sizes),
        "networks": {},
    }
    say(f"training set: {len(trainset)} samples from {summary['tomograms']} tomograms")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    start = fitted(load_network(args.start), trainset) if args.start else None
    origin = MULTICLASS
    if args.iterations == 0:  # the binary networks only, from --start as it is
        multi_network, origin = start, str(args.start)
        if tuple(start.meta.class_names) == tuple(trainset.class_names):
            summary["networks"][MULTICLASS] = {"taken_as_is_from": origin}
            save_network(start, args.out / f"{MULTICLASS}.tsnet", overwrite=True, half=True)
        # a binary start (continuing one feature's network) is not saved as all_features
    else:
        multi = train_network(trainset, args, MULTICLASS, args.iterations, init=start)
        multi_network = multi.network
        started = {"continued_from": str(args.start)} if args.start else {}
        summary["networks"][MULTICLASS] = describe(multi, time.perf_counter() - t0, started)
        save_network(multi_network, args.out / f"{MULTICLASS}.tsnet", overwrite=True, half=True)
    for feature in args.features or list(trainset.class_names[1:]):
        t0 = time.perf_counter()
        subset = binary_subset(trainset, feature)
        channels = multi_network.meta.in_channels
        init, copied = network_like(multi_network, channels, subset.class_names)
        result = train_network(
            subset, args, feature, args.binary_iterations, init, args.binary_learning_rate
        )
        save_network(result.network, args.out / f"{feature}.tsnet", overwrite=True, half=True)
        summary["networks"][feature] = describe(
            result, time.perf_counter() - t0, {"started_from": origin, **copied}
        )
        say(f"  {feature}: {summary['networks'][feature]}")
    summary["seconds_total"] = round(time.perf_counter() - t_start, 1)
    (args.out / "pretraining.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(main())
