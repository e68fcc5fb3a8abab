"""The ``tomoseg`` command: the TomoSeg workflow without a viewer, for batch and cluster work.

Every subcommand calls the same core functions as the napari widgets.  Exit codes: 0 done,
1 a problem with the input (the message says what to do), 2 wrong arguments, 3 some
tomograms of a batch failed (the others finished), 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from .errors import OutputExistsError, TomosegError
from .progress import Progress, drive

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class ProgressPrinter:
    """Progress events as ``tqdm`` bars on stderr: one bar per stage, closed when the stage
    ends (updated every few seconds only when stderr is not a terminal, e.g. a log file)."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar: Any = None

    def __call__(self, event: Progress) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        total = event.total if event.total > 0 else None
        bar = self._bar
        if bar is None or bar.desc != event.stage or event.step < bar.n:
            self.close()  # a new stage, or the same stage started again (the next tomogram)
            bar = self._bar = tqdm(
                total=total,
                desc=event.stage,
                file=self.stream,
                mininterval=0.2 if self.tty else 5.0,
                dynamic_ncols=True,
            )
        bar.total = total
        metrics = " ".join(f"{k}={v:.4g}" for k, v in list(event.metrics.items())[:3])
        bar.set_postfix_str(f"{event.message} {metrics}".strip(), refresh=False)
        bar.update(event.step - bar.n)
        if total is not None and event.step >= total:
            self.close()

    def close(self) -> None:
        """End the current bar (its last state stays on the screen)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class StopOnInterrupt:
    """First Ctrl-C asks the running task to stop cleanly (keeping its result); a second
    one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> Callable[[], bool]:
        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nStopping after this step (Ctrl-C again to abort)...", file=sys.stderr)

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not in the main thread: no signal handling
            self._previous = None
        return lambda: self.requested

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# -- subcommands ------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    from .simulator.demo import DemoSettings, iter_demo

    settings = DemoSettings(
        feature=args.feature,
        iterations=args.iterations,
        seed=args.seed,
        architecture=args.architecture,
    )
    result = drive(iter_demo(args.output_dir, settings, overwrite=args.overwrite), progress)
    print(
        f"Trained {result.architecture} on {result.n_positive} positive and "
        f"{result.n_negative} negative boxes of '{args.feature}'."
    )
    val = result.validation.get("mean_foreground_f1")
    if val is not None:
        print(f"Validation Dice (boxes held out): {val:.3f}")
    print(f"Dice of the whole-tomogram mask against the ground truth: {result.dice:.3f}")
    z0, z1 = result.central_slices
    print(
        f"Dice over slices {z0}-{z1 - 1}, where the boxes were drawn (the top and bottom "
        f"slices are the worst reconstructed): {result.dice_central:.3f}"
    )
    print("Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    for name, path in result.files.items():
        print(f"  {name}: {path}")
    if args.viewer:
        _open_demo_viewer(result)
    return EXIT_OK


def _open_demo_viewer(result: Any) -> None:
    """Show the demo's tomogram, boxes, painting and result in napari with the widgets."""
    from ._widgets._demo import open_demo_viewer

    open_demo_viewer(result)


def _cmd_simulate(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    from .data.io import write_labels, write_mrc
    from .simulator.synthetic import CLASS_NAMES, SimulationSettings, iter_simulate_tomogram

    settings = SimulationSettings(
        shape=tuple(args.shape), seed=args.seed, voxel_size=args.voxel_size
    )
    sim = drive(iter_simulate_tomogram(settings), progress)
    write_mrc(args.output, sim.tomogram, sim.voxel_size, overwrite=args.overwrite)
    print(f"Wrote {args.output}")
    if args.labels_output:
        write_labels(args.labels_output, sim.labels, sim.voxel_size, overwrite=args.overwrite)
        print(
            f"Wrote {args.labels_output} (classes: "
            + ", ".join(f"{i}={n}" for i, n in enumerate(CLASS_NAMES))
            + ")"
        )
    return EXIT_OK


def _read_box_files(args: argparse.Namespace) -> tuple[list, list, int]:
    """The positive and negative boxes of ``--positive``/``--negative`` and their size:
    ``--box-size`` when given (it replaces the files' sizes), else the files' own."""
    from .data.boxes import DEFAULT_BOX_SIZE, read_boxes_csv

    positives = read_boxes_csv(args.positive, args.box_size)
    negatives = read_boxes_csv(args.negative, args.box_size) if args.negative else []
    sizes = [b.size for b in positives + negatives]
    return positives, negatives, args.box_size or (sizes[0] if sizes else DEFAULT_BOX_SIZE)


def _cmd_build_trainset(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    from .data.io import read_tomogram
    from .learning.trainset import TrainsetSettings, build_training_set

    tomo = read_tomogram(args.tomogram)
    labels = read_tomogram(args.labels)
    positives, negatives, box_size = _read_box_files(args)
    settings = TrainsetSettings(
        box_size=box_size,
        ncopy=args.ncopy,
        normalisation=args.normalisation,
        context_slices=args.context_slices,
        seed=args.seed,
    )
    class_names = tuple(args.class_names.split(",")) if args.class_names else None
    progress(Progress("trainset", 0, 1, message="building"))
    trainset = build_training_set(
        tomo.data,
        labels.data,
        positives,
        negatives,
        settings,
        class_names=class_names,
        voxel_size=tomo.voxel_size,
        source=str(args.tomogram),
    )
    progress(Progress("trainset", 1, 1, message="done"))
    out = trainset.save(args.output, overwrite=args.overwrite)
    print(
        f"Wrote {out}: {len(trainset)} samples from {len(positives)} positive and "
        f"{len(negatives)} negative boxes, classes {', '.join(trainset.class_names)}"
    )
    return EXIT_OK


def _parse_class_weights(text: str) -> str | list[float] | None:
    """``--class-weights``: "none", "auto" or comma-separated numbers (one per class)."""
    word = text.strip().lower()
    if word in ("none", "auto"):
        return None if word == "none" else "auto"
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise TomosegError(
            f"--class-weights must be none, auto or numbers separated by commas, got {text!r}."
        ) from None


def _cmd_train(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    from .learning.checkpoint import remove_checkpoint
    from .learning.model_file import load_network
    from .learning.trainset import TrainingSet

    trainset = TrainingSet.load(args.trainset)
    init = load_network(args.from_trained) if args.from_trained else None
    settings = _train_settings(args, init)
    output = Path(args.output)
    checkpoint = _train_checkpoint(args, output)
    settings.checkpoint = str(checkpoint)
    result = _run_training(args, trainset, settings, init, checkpoint, progress)
    _save_trained(result, output, checkpoint, overwrite=args.overwrite or args.resume)
    if not result.stopped:
        remove_checkpoint(checkpoint)
    _print_training(result, output, checkpoint, settings.iterations)
    return EXIT_OK


def _train_settings(args: argparse.Namespace, init: Any) -> Any:
    """The settings of ``tomoseg train``: the options given, on the defaults or on those of
    the network it continues (``--from-trained``; see ``TrainSettings.for_run``)."""
    from .learning.augment import NO_AUGMENTATION
    from .learning.training import TrainSettings

    names = (
        "iterations",
        "batch_size",
        "learning_rate",
        "device",
        "seed",
        "checkpoint_every",
        "dice_weight",
        "keep_start",
        "replay",
        "fine_tune",
    )
    changes = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.architecture:
        changes["architecture"] = args.architecture
    if args.class_weights is not None:
        changes["class_weights"] = _parse_class_weights(args.class_weights)
    changes["start_from"] = args.start_from
    if args.augmentation == "none":
        changes["augmentation"] = dict(NO_AUGMENTATION)
    return TrainSettings.for_run(init, **changes)


def _train_checkpoint(args: argparse.Namespace, output: Path) -> Path:
    """The checkpoint of ``tomoseg train`` (``--checkpoint``, else beside ``output``), once
    the output and the checkpoint are known to allow the run: an existing output only with
    --overwrite or --resume, --resume only from a checkpoint that is there, an unfinished
    run's checkpoint replaced only with --overwrite."""
    from .learning.checkpoint import default_checkpoint_path

    # --resume may replace the network that the stopped run it continues saved there
    if output.exists() and not (args.overwrite or args.resume):
        raise OutputExistsError(output, "add --overwrite")
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint_path(output)
    if args.resume and not checkpoint.is_file():
        raise TomosegError(
            f"--resume: there is no checkpoint {checkpoint} (a run that finished deletes its "
            "checkpoint; give --checkpoint if it was written elsewhere). Leave out --resume "
            "to start afresh."
        )
    if not args.resume and checkpoint.exists() and not args.overwrite:
        raise TomosegError(
            f"{checkpoint} holds the checkpoint of an unfinished run: add --resume to continue "
            "it, or --overwrite (or delete it) to start afresh."
        )
    return checkpoint


def _run_training(
    args: argparse.Namespace,
    trainset: Any,
    settings: Any,
    init: Any,
    checkpoint: Path,
    progress: ProgressPrinter,
) -> Any:
    """Train (the first Ctrl-C stops cleanly, keeping the result); a run that dies says how
    to continue from its checkpoint, which is kept until the network is saved."""
    from .learning.training import iter_train
    from .simulator.replay import SimulatedReplay

    with StopOnInterrupt() as should_stop:
        try:
            return drive(
                iter_train(
                    trainset,
                    settings,
                    init=init,
                    should_stop=should_stop,
                    resume=args.resume,
                    keep_checkpoint=True,  # deleted by _cmd_train, once the network is saved
                    replay_from=SimulatedReplay(),
                ),
                progress,
            )
        except BaseException as exc:  # a crash or a second Ctrl-C: say how to go on
            if checkpoint.is_file() and not isinstance(exc, TomosegError):
                print(
                    f"Training did not finish; its last checkpoint is {checkpoint}: run "
                    "the same command with --resume to continue from it.",
                    file=sys.stderr,
                )
            raise


def _save_trained(result: Any, output: Path, checkpoint: Path, *, overwrite: bool) -> None:
    """Save the trained network; when that fails (e.g. a full disk) with the checkpoint
    still there, the error says that the trained state is kept in it."""
    from .learning.model_file import save_network

    try:
        save_network(result.network, output, overwrite=overwrite)
    except TomosegError as exc:
        if checkpoint.is_file():  # e.g. a full disk: the trained state is not lost
            raise TomosegError(
                f"{exc} The trained state is kept in {checkpoint}: free space (or fix the "
                "output folder) and run the same command with --resume to save it."
            ) from exc
        raise


def _print_training(result: Any, output: Path, checkpoint: Path, iterations: int) -> None:
    """What ``tomoseg train`` did: how it ended, where it started from, the threshold, the
    checkpoint of a stopped run and the validation scores of each class."""
    from .learning.training import fine_tune_described, kept_described
    from .simulator.replay import described as replay_described

    state = "stopped early" if result.stopped else "finished"
    print(f"Training {state} in {result.seconds:.0f} s on {result.device}; saved {output}")
    print(
        f"  started from {result.metadata['started_from']}; mask threshold "
        f"{result.network.meta.threshold:.2f} (chosen on the "
        f"{result.metadata['threshold_calibration']['on']})"
    )
    replayed = replay_described(result.metadata.get("replay"))
    if replayed:
        print(f"  {replayed}; --replay 0 leaves them out")
    kept = kept_described(result.metadata)
    if kept:
        print(f"  {kept}")
    fine_tuned = fine_tune_described(result.metadata)
    if fine_tuned:
        print(f"  {fine_tuned}")
    if result.stopped and checkpoint.is_file():
        steps = result.metadata["steps_done"]
        print(
            f"Checkpoint after mini-batch {steps} of {iterations}: {checkpoint}; "
            "to continue, run the same command with --resume."
        )
    for name, m in result.metrics.get("classes", {}).items():
        print(
            f"  {name:>18}: precision {m['precision']:.3f} recall {m['recall']:.3f} "
            f"F1/Dice {m['f1']:.3f}"
        )


def _cmd_apply(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    from .applying.inference import ApplySettings, iter_apply_file, resolve_device
    from .data.io import output_label, output_names
    from .learning.model_file import load_network

    settings = ApplySettings(
        threshold=args.threshold,
        tta=args.tta,
        planes=args.planes,
        shrink=args.shrink,
        voxel_size_policy=args.voxel_size_policy,
        device=args.device,
        tile_size=args.tile_size,
        batch_size=args.batch_size,
    )
    settings.validate()
    _split_apply_inputs(args)
    networks = [args.network, *(args.also_network or [])]
    if args.name and len(networks) > 1:
        raise TomosegError(
            "--name labels a single network; with several networks the outputs are named "
            "after the network files."
        )
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if _cluster_requested(args):
        return _cmd_apply_batch(args, settings, networks, out_dir, progress)
    failed: list[tuple[str, str]] = []
    done = 0
    total = len(args.tomograms) * len(networks)
    with StopOnInterrupt() as should_stop:
        for net_path in networks:
            if should_stop():
                break
            network = load_network(net_path, device=resolve_device(args.device))
            label = output_label(net_path, args.name)
            for i, tomogram in enumerate(args.tomograms, 1):
                if should_stop():
                    break
                tomogram = Path(tomogram)
                mask_path, prob_path = output_names(out_dir, tomogram, label)
                print(f"[{i}/{len(args.tomograms)}] {tomogram} -> {mask_path}", file=sys.stderr)
                try:
                    result = drive(
                        iter_apply_file(
                            network,
                            tomogram,
                            mask_path,
                            None if args.no_probabilities else prob_path,
                            settings=settings,
                            overwrite=args.overwrite,
                            should_stop=should_stop,
                        ),
                        progress,
                    )
                except TomosegError as exc:
                    failed.append((str(tomogram), message_of(exc)))
                    print(f"  failed: {message_of(exc)}", file=sys.stderr)
                    continue
                if result.stopped:
                    print("  cancelled: no output written", file=sys.stderr)
                    break
                done += 1
                for note in result.notes:
                    print(f"  note: {note}", file=sys.stderr)
                outputs = [result.mask_path, *result.probability_paths]
                print("  wrote " + ", ".join(str(p) for p in outputs))
    print(f"Applied to {done} of {total} tomograms; {len(failed)} failed.")
    for name, reason in failed:
        print(f"  FAILED {name}: {reason}")
    if should_stop():
        return EXIT_INTERRUPTED
    return EXIT_PARTIAL if failed else EXIT_OK


def _split_apply_inputs(args: argparse.Namespace) -> None:
    """``args.network`` and ``args.tomograms`` from the positional inputs and --pretrained."""
    if args.pretrained:
        from .learning.pretrained import shipped_file

        args.network, args.tomograms = str(shipped_file(args.pretrained)), list(args.inputs)
        return
    if len(args.inputs) < 2:
        raise TomosegError(
            "Give the network file and at least one tomogram (tomoseg apply NETWORK "
            "TOMOGRAM ...), or --pretrained NAME and the tomograms."
        )
    args.network, args.tomograms = args.inputs[0], list(args.inputs[1:])


def _cmd_pretrained(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    """List the networks shipped with the package."""
    from .applying.inference import network_planes, network_threshold
    from .learning.model_file import read_network_meta
    from .learning.pretrained import available

    files = available()
    if not files:
        print("This installation has no shipped networks.")
        return EXIT_OK
    for name, path in files.items():
        meta = read_network_meta(path)
        classes = ", ".join(meta.class_names[1:])
        trained_at = meta.voxel_size.describe() if meta.voxel_size else "an unknown voxel size"
        print(
            f"{name:>16}: {meta.architecture}, {classes}; trained at {trained_at}, "
            f"{meta.context_slices} context slice(s), applied in "
            f"{'the XY, XZ and YZ slices' if network_planes(meta) == 3 else 'the XY slices'}, "
            f"threshold {network_threshold(meta):.2f} ({path})"
        )
    print(
        "Use one with 'tomoseg apply --pretrained NAME TOMOGRAM ...'; training starts from "
        "the one that knows the feature unless 'tomoseg train --start-from scratch'."
    )
    return EXIT_OK


def _cmd_suggest(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    """Boxes worth a look where a network fires far from every positive box."""
    from .applying.suggest import suggest_boxes
    from .data.boxes import write_boxes_csv
    from .data.io import read_tomogram
    from .data.probability import probabilities_as_float

    tomogram = read_tomogram(args.probabilities)
    threshold = args.threshold
    if threshold is None:
        threshold = _recorded_threshold(args.probabilities, tomogram)
    positives, negatives, box_size = _read_box_files(args)
    found = suggest_boxes(
        tomogram.data,
        positives,
        negatives,
        threshold=threshold,
        n=args.number,
        box_size=box_size,
        to_float=probabilities_as_float,
    )
    write_boxes_csv(args.output, [s.box for s in found], overwrite=args.overwrite)
    print(f"{len(found)} suggested boxes (strongest first) written to {args.output}:")
    for s in found:
        print(
            f"  z {s.box.z:4d}  y {s.box.y:5d}  x {s.box.x:5d}  score {s.score:.3f} "
            f"({100 * s.fired:.0f}% of the box marked)"
        )
    print(
        "Look at each: box it as a negative example if the feature is not there, as a "
        "positive one (and paint it) if it is; then train again."
    )
    return EXIT_OK


def _cluster_requested(args: argparse.Namespace) -> bool:
    """Whether the apply options ask for the Dask batch engine (see ``docs/cluster.md``)."""
    cluster_flags = [
        name
        for name, value in (
            ("--workers", args.workers),
            ("--scheduler", args.scheduler),
            ("--z-split", args.z_split),
            ("--threads", args.threads),
            ("--gpus", args.gpus),
            ("--manifest", args.manifest),
            ("--dashboard", args.dashboard),
        )
        if value is not None
    ] + (["--verify-hashes"] if args.verify_hashes else [])
    if args.cluster == "none":
        if cluster_flags:
            raise TomosegError(
                f"--cluster none runs in this process; drop {', '.join(cluster_flags)} "
                "or choose --cluster local."
            )
        return False
    return args.cluster == "local" or bool(cluster_flags)


def _cmd_apply_batch(
    args: argparse.Namespace,
    settings: Any,
    networks: Sequence[str],
    out_dir: Path,
    progress: ProgressPrinter,
) -> int:
    """``tomoseg apply`` on a Dask cluster: local, or a running scheduler."""
    from .applying.cluster import BatchSettings, JobOutcome, iter_run_batch, plan_batch

    batch = BatchSettings(
        scheduler=args.scheduler,
        n_workers=args.workers,
        torch_threads=args.threads,
        gpus=args.gpus or "auto",
        dashboard_address=args.dashboard,
        z_split=args.z_split,
        verify_hashes=args.verify_hashes,
    )
    batch.validate()
    jobs = plan_batch(
        args.tomograms,
        networks,
        out_dir,
        labels=[args.name] if args.name else None,  # --name: a single network
        probabilities=not args.no_probabilities,
    )
    where = args.scheduler or "a local Dask cluster"
    print(f"Applying {len(jobs)} job(s) on {where}", file=sys.stderr)

    def show(event: Progress) -> None:
        outcome = event.payload
        if isinstance(outcome, JobOutcome):
            if outcome.status == "failed":
                print(f"  FAILED {outcome.job.name}: {outcome.reason}", file=sys.stderr)
            elif outcome.status in ("done", "skipped"):
                word = "wrote" if outcome.status == "done" else "already done"
                paths = ", ".join(str(p) for p in outcome.outputs)
                print(f"  {outcome.job.name}: {word} {paths}", file=sys.stderr)
                for note in outcome.notes:
                    print(f"    note: {note}", file=sys.stderr)
        progress(event)

    with StopOnInterrupt() as should_stop:
        result = drive(
            iter_run_batch(
                jobs,
                settings,
                batch,
                manifest=args.manifest,
                overwrite=args.overwrite,
                should_stop=should_stop,
            ),
            show,
        )
    print(result.summary())
    if result.stopped:
        return EXIT_INTERRUPTED
    return EXIT_PARTIAL if result.failed else EXIT_OK


def _cmd_merge(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    from .applying.merge import MergeInput, iter_merge
    from .data.io import (
        classes_label,
        output_feature,
        read_tomogram,
        source_label,
        source_name,
        write_labels,
    )

    n = len(args.probabilities)
    weights = _per_input(args.weight, n, "--weight")
    tomos = [read_tomogram(p) for p in args.probabilities]
    if args.threshold is None:
        thresholds = [_recorded_threshold(p, t) for p, t in zip(args.probabilities, tomos)]
    else:
        thresholds = _per_input(args.threshold, n, "--threshold")
    source = source_name(tomos[0])
    if args.names:
        names = args.names.split(",")
    else:  # tomo1_membrane.mrc, made from tomo1: "membrane"
        names = [output_feature(p, source, "_prob") for p in args.probabilities]
    if len(names) != n:
        raise TomosegError(f"--names gives {len(names)} names for {n} probability maps.")
    inputs = [
        MergeInput(t.data, name, th, w)
        for t, name, th, w in zip(tomos, names, thresholds, weights)
    ]
    result = drive(iter_merge(inputs), progress)
    texts = ([source_label(source)] if source else []) + classes_label(result.names)
    write_labels(
        args.output, result.mask, tomos[0].voxel_size, overwrite=args.overwrite, header_texts=texts
    )
    print(f"Wrote {args.output}:")
    for value, name in enumerate(result.names):
        print(f"  {value} = {name}: {result.voxels.get(value, 0)} voxels")
    return EXIT_OK


def _recorded_threshold(path: str, tomogram: Any) -> float:
    """The mask threshold a probability map's header records (``tomoseg apply`` writes the
    network's own), else 0.5; says which."""
    from .applying.inference import DEFAULT_THRESHOLD
    from .data.io import threshold_of

    recorded = threshold_of(tomogram)
    if recorded is None:
        print(f"{path}: no recorded mask threshold, using {DEFAULT_THRESHOLD}")
        return DEFAULT_THRESHOLD
    print(f"{path}: threshold {recorded:g} (recorded by apply)")
    return recorded


def _per_input(values: Sequence[float], n: int, flag: str) -> list[float]:
    if len(values) == 1:
        return list(values) * n
    if len(values) != n:
        raise TomosegError(f"{flag} takes one value or one per map ({n}); got {len(values)}.")
    return list(values)


def _writes_csv(path: str | Path) -> bool:
    """Whether ``tomoseg pick`` writes ``path`` as CSV (else as RELION STAR)."""
    return Path(path).suffix.lower() == ".csv"


def _cmd_pick(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    from .applying.picking import PickSettings, pick, write_csv, write_star
    from .data.io import class_names_of, mrc_stem, read_tomogram, source_name

    mask = read_tomogram(args.mask)
    tomo_name = args.tomo_name or source_name(mask)
    if tomo_name is None and not _writes_csv(args.output):
        tomo_name = mrc_stem(args.mask)
        print(
            f"note: {args.mask} does not name its tomogram (not written by 'tomoseg apply' or "
            f"'merge'); _rlnTomoName is {tomo_name!r}. Give --tomo-name to set it.",
            file=sys.stderr,
        )
    probabilities = read_tomogram(args.probabilities).data if args.probabilities else None
    settings = PickSettings(
        min_size=args.min_size,
        method=args.method,
        min_distance=args.min_distance,
        classes=args.feature or None,
    )
    names = args.names.split(",") if args.names else class_names_of(mask)
    result = pick(
        mask.data,
        probabilities=probabilities,
        voxel_size=mask.voxel_size,
        class_names=names,
        settings=settings,
    )
    output = Path(args.output)
    if _writes_csv(output):
        write_csv(output, result, mask.voxel_size, overwrite=args.overwrite)
    else:
        write_star(
            output,
            result,
            mask.voxel_size,
            overwrite=args.overwrite,
            tomo_name=tomo_name,
            shape=mask.data.shape,
        )
    print(result.summary())
    print(f"Wrote {len(result.particles)} particles to {output}")
    return EXIT_OK


def _cmd_clean(args: argparse.Namespace, progress: ProgressPrinter) -> int:
    from .data.io import format_size, list_temporaries, remove_stale_temporaries

    if not args.folders and not args.autosaves:
        raise TomosegError("Give the folder(s) to clean, or --autosaves.")
    min_age_s = args.older_than * 3600.0
    removed_bytes = kept_bytes = removed = kept = 0
    for folder in _clean_folders(args.folders, args.recursive):
        found = list_temporaries(folder)
        gone = [] if args.dry_run else remove_stale_temporaries(folder, min_age_s)
        gone_paths = {t.path for t in gone}
        for temp in found:
            stale = temp.path in gone_paths or (args.dry_run and temp.is_stale(min_age_s))
            word = ("would remove" if args.dry_run else "removed") if stale else "kept"
            print(f"{word:>12}  {format_size(temp.size):>9}  {temp.path}  ({temp.describe()})")
            if stale:
                removed, removed_bytes = removed + 1, removed_bytes + temp.size
            else:
                kept, kept_bytes = kept + 1, kept_bytes + temp.size
    if args.folders:
        verb = "Would remove" if args.dry_run else "Removed"
        print(
            f"{verb} {removed} temporary file(s) ({format_size(removed_bytes)}); kept {kept} "
            f"({format_size(kept_bytes)}) whose writers may still be running."
        )
    if args.autosaves:
        _clean_autosaves(args.dry_run)
    return EXIT_OK


def _clean_autosaves(dry_run: bool) -> None:
    """List the autosaved annotations in the cache; remove them unless ``dry_run`` (those
    that a running viewer keeps up to date are kept)."""
    from .data.autosave import autosave_root, discard_autosave, list_autosaves
    from .data.io import format_size

    count = total = 0
    for info in list_autosaves():
        busy = info.open_elsewhere()
        word = "kept" if busy else ("would remove" if dry_run else "removed")
        size = info.nbytes
        print(f"{word:>12}  {format_size(size):>9}  {info.folder}  ({info.describe()})")
        print(f"{'':>12}  {'':>9}  of {info.source}")
        if not busy:
            count, total = count + 1, total + size
            if not dry_run:
                discard_autosave(info.folder)
    verb = "Would remove" if dry_run else "Removed"
    print(
        f"{verb} the autosaved annotations of {count} tomogram(s) ({format_size(total)}) "
        f"from {autosave_root()}."
    )


def _clean_folders(folders: Sequence[str], recursive: bool) -> list[Path]:
    """The folders ``tomoseg clean`` looks in (with their subfolders when recursive)."""
    import os

    out = []
    for name in folders:
        folder = Path(name)
        if not folder.is_dir():
            raise TomosegError(f"{folder} is not a folder; give the folder to clean.")
        out.append(folder)
        if recursive:
            out.extend(Path(root) / d for root, dirs, _ in os.walk(folder) for d in sorted(dirs))
    return out


# -- the parser -------------------------------------------------------------------------------
class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none or says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        worth_saying = default not in (None, False, argparse.SUPPRESS)
        if action.option_strings and worth_saying and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _add_demo(command: Callable[..., argparse.ArgumentParser]) -> None:
    """The ``tomoseg demo`` command and its options."""
    p = command(
        "demo",
        help="run the whole job on a simulated tomogram",
        description="Simulate a cell tomogram, box and paint one feature from "
        "its ground truth, train, apply to the whole tomogram and report the "
        "Dice against the truth.",
    )
    p.add_argument(
        "--output-dir",
        default="tomoseg-demo",
        help="where the MRC files and the network go (default: tomoseg-demo)",
    )
    p.add_argument(
        "--feature",
        default="single_membrane",
        help="microtubule, ribosome, double_membrane, single_membrane (default) or carbon_edge",
    )
    p.add_argument(
        "--iterations", type=int, default=600, help="training mini-batches (default 600)"
    )
    p.add_argument(
        "--architecture",
        default=None,
        help="tomoseg-cnn, unet or unet-lite (default: the package default)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the scene and the training")
    p.add_argument(
        "--viewer", action="store_true", help="open napari with the result (needs a display)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace earlier demo files")
    p.set_defaults(func=_cmd_demo)


def _add_simulate(command: Callable[..., argparse.ArgumentParser]) -> None:
    """The ``tomoseg simulate`` command and its options."""
    p = command("simulate", help="write a simulated tomogram and its ground truth")
    p.add_argument("-o", "--output", required=True, help="tomogram MRC to write")
    p.add_argument("--labels-output", help="ground-truth labels MRC to write")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=(96, 256, 256),
        metavar=("Z", "Y", "X"),
        help="size of the volume in voxels",
    )
    p.add_argument("--voxel-size", type=float, default=10.0, help="Angstrom (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scene")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=_cmd_simulate)


def _add_build_trainset(command: Callable[..., argparse.ArgumentParser]) -> None:
    """The ``tomoseg build-trainset`` command and its options."""
    p = command(
        "build-trainset",
        help="cut boxes into a training set",
        description="Cut the positive boxes (with their painted labels) and negative boxes "
        "from a tomogram into rotated/flipped copies, balanced as in EMAN2 TomoSeg.",
    )
    p.add_argument("tomogram", help="the tomogram (MRC)")
    p.add_argument(
        "--labels",
        required=True,
        help="painted labels (MRC, same shape; 0 = background, 1.. = features)",
    )
    p.add_argument(
        "--positive",
        required=True,
        help="CSV of positive boxes: z,y,x[,size] "
        "centres in voxels, or a napari Shapes CSV export",
    )
    p.add_argument("--negative", help="CSV of negative boxes (same formats)")
    p.add_argument(
        "--box-size",
        type=int,
        help="box side in pixels for every box (default: the box files' size column, else 64)",
    )
    p.add_argument("--ncopy", type=int, default=10, help="copies per negative box (default 10)")
    p.add_argument(
        "--normalisation",
        choices=["tomogram", "box"],
        default="tomogram",
        help="scale the boxes by the whole tomogram's statistics or each box's own",
    )
    p.add_argument(
        "--context-slices",
        type=int,
        default=2,
        help="neighbouring slices per side as extra channels (2.5D; default 2, as the "
        "shipped networks; 0: single slices)",
    )
    p.add_argument(
        "--class-names", help="comma-separated, background first, e.g. background,membrane"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the rotations and flips")
    p.add_argument("-o", "--output", required=True, help="training-set file to write (.npz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_build_trainset)


def _add_train(command: Callable[..., argparse.ArgumentParser]) -> None:
    """The ``tomoseg train`` command and its options."""
    p = command(
        "train",
        help="train a network on a training set",
        description="Train a network; Ctrl-C stops cleanly and saves the best network so far. "
        "The run keeps a checkpoint (by default OUTPUT.ckpt) while it is unfinished: after a "
        "crash or a Ctrl-C, the same command with --resume continues it exactly.",
    )
    p.add_argument("trainset", help="training-set file from build-trainset")
    p.add_argument("-o", "--output", required=True, help="network file to write (.tsnet)")
    p.add_argument(
        "--architecture", help="tomoseg-cnn, unet or unet-lite (default: the package default)"
    )
    p.add_argument("--iterations", type=int, help="mini-batches to train (default 1000)")
    p.add_argument("--batch-size", type=int, help="boxes per mini-batch (default 16)")
    p.add_argument("--learning-rate", type=float, help="e.g. 1e-3; use ~1e-4 to continue")
    p.add_argument("--from-trained", help="continue training this network file")
    p.add_argument(
        "--start-from",
        default="auto",
        help="where a new network's weights come from: auto (a shipped network trained on "
        "simulated tomograms when one knows the features by name; the default), scratch "
        "(random weights), or the name of a shipped network (see 'tomoseg pretrained')",
    )
    p.add_argument(
        "--keep-start",
        type=float,
        help="when starting from a shipped network, the largest fraction of its weights "
        "averaged into the result, which keeps what it knows about other tomograms; half "
        "of it where the held-out boxes score clearly better so (default 0.5; "
        "0: the fine-tuned weights alone)",
    )
    p.add_argument(
        "--replay",
        type=float,
        help="when starting from a shipped network, also train on boxes of tomograms "
        "simulated as its pretraining drew them, this many times your samples, so it does "
        "not forget other tomograms (default 0: none; 0.5 where you paint features as the "
        "simulator labels them; they are never validated)",
    )
    p.add_argument(
        "--fine-tune",
        choices=["auto", "all", "decoder"],
        help="when starting from a shipped network or continuing one, train every layer "
        "(all) or keep its encoder as it is and train the rest (decoder); auto, the "
        "default: decoder from a shipped network that takes the training set's context "
        "slices as they are, all otherwise",
    )
    p.add_argument(
        "--augmentation",
        choices=["default", "none"],
        default="default",
        help="change every mini-batch in the ways tomograms differ (zoom, blur, noise, "
        "contrast, inversion: default; twice the noise and more blur when fine-tuning a "
        "shipped network), or only rotate and flip it (none)",
    )
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, help="seed of the weights and mini-batches (default 0)")
    p.add_argument(
        "--dice-weight",
        type=float,
        help="weight of the soft Dice term added to the cross-entropy (default 1; 0: "
        "cross-entropy alone)",
    )
    p.add_argument(
        "--class-weights",
        help="cross-entropy class weights: none (default), auto (inverse pixel frequency) "
        "or one number per class, comma-separated (e.g. 1,20)",
    )
    p.add_argument(
        "--checkpoint",
        help="checkpoint file of the run (default: the output name + .ckpt); deleted when "
        "the run finishes",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        help="mini-batches between checkpoints (default 100)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run saved in the checkpoint (same training set and "
        "settings); replaces the network that a stopped run saved",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing output and checkpoint"
    )
    p.set_defaults(func=_cmd_train)


def _add_apply(command: Callable[..., argparse.ArgumentParser]) -> None:
    """The ``tomoseg apply`` command and its options."""
    p = command(
        "apply",
        help="segment whole tomograms with a network",
        description="Apply a network to one or many tomograms. For each, "
        "writes <name>_<network>_mask.mrc and the probability map(s) "
        "<name>_<network>[_<class>].mrc (probability in percent, 0..100; see docs/formats.md).",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="NETWORK TOMOGRAM",
        help="the network file (.tsnet), then the tomograms (MRC) of the same pixel size; "
        "with --pretrained, tomograms only",
    )
    p.add_argument(
        "--pretrained",
        metavar="NAME",
        help="segment with a network shipped with napari-tomoseg (no boxes needed; see "
        "'tomoseg pretrained' for the names)",
    )
    p.add_argument(
        "--output-dir", default=".", help="folder for the results (default: the current folder)"
    )
    p.add_argument("--name", help="label used in output names (default: network file name)")
    p.add_argument(
        "--threshold",
        type=float,
        help="probability at which the mask is cut (default: the network's own, chosen on "
        "its held-out boxes when it was trained; 0.5 for a network without one)",
    )
    p.add_argument("--tta", action="store_true", help="test-time augmentation (8x slower)")
    p.add_argument(
        "--planes",
        type=int,
        choices=[1, 3],
        help="slice planes the network is applied in: 1 (XY) or 3 (XY, XZ and YZ, the "
        "probabilities averaged; finds membranes face-on to the beam; 3x slower); default: "
        "the network's own (3 for the shipped membrane networks)",
    )
    p.add_argument(
        "--shrink",
        type=int,
        default=1,
        help="apply on a copy binned by this factor, then unbin the result",
    )
    p.add_argument(
        "--voxel-size-policy",
        choices=["rescale", "refuse"],
        default="rescale",
        help="what to do when the tomogram's voxel size differs from the network's",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N or mps",
    )
    p.add_argument(
        "--tile-size",
        type=int,
        default=256,
        help="side in pixels of the tiles a slice is cut into (smaller: less memory)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="tiles per forward pass")
    p.add_argument("--no-probabilities", action="store_true", help="write only the masks")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--network",
        dest="also_network",
        action="append",
        metavar="NETWORK",
        help="apply this network too (repeat for more); outputs are named after each file",
    )
    c = p.add_argument_group(
        "cluster",
        "Run the tomograms x networks on a Dask cluster (needs napari-tomoseg[cluster]). "
        "Any of these options switches it on; without them everything runs in this process. "
        "A rerun skips the jobs the manifest records as finished. See docs/cluster.md.",
    )
    c.add_argument(
        "--cluster",
        choices=["none", "local"],
        help="local: start a Dask cluster on this machine (one worker per GPU, else "
        "one single-threaded worker per core); none: run in this process (the default)",
    )
    c.add_argument("--workers", type=int, help="local cluster with this many worker processes")
    c.add_argument("--threads", type=int, help="torch CPU threads per worker")
    c.add_argument("--gpus", help="local cluster GPUs: auto (default), none, or ids like 0,1")
    c.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="use a running Dask scheduler: tcp://host:8786 or a scheduler JSON file",
    )
    c.add_argument(
        "--z-split",
        type=int,
        metavar="SLICES",
        help="split tomograms of more slices into Z chunks of about this many slices, "
        "computed on different workers and stitched (identical result)",
    )
    c.add_argument(
        "--manifest",
        help="batch manifest (JSON) recording finished jobs "
        "(default: OUTPUT_DIR/tomoseg-batch.json)",
    )
    c.add_argument(
        "--verify-hashes",
        action="store_true",
        help="re-hash recorded outputs (SHA-256) before skipping them",
    )
    c.add_argument("--dashboard", metavar="ADDRESS", help="local cluster dashboard, e.g. :8787")
    p.set_defaults(func=_cmd_apply)


def _add_merge(command: Callable[..., argparse.ArgumentParser]) -> None:
    """The ``tomoseg merge`` command and its options."""
    p = command(
        "merge",
        help="merge probability maps into one multi-level mask",
        description="Each voxel gets the number of the map with the highest "
        "weight x probability among those above their threshold (maps "
        "numbered 1.. in the order given; ties go to the earlier map); 0 "
        "where no map claims it.",
    )
    p.add_argument("probabilities", nargs="+", help="probability maps (MRC) of one tomogram")
    p.add_argument("-o", "--output", required=True, help="merged mask (MRC) to write")
    p.add_argument(
        "--threshold",
        type=float,
        nargs="+",
        help="one value, or one per map (default: each map's recorded threshold, the one its "
        "mask was cut at; 0.5 for a map that records none)",
    )
    p.add_argument(
        "--weight", type=float, nargs="+", default=[1.0], help="one value, or one per map"
    )
    p.add_argument("--names", help="comma-separated feature names, one per map")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_merge)


def _add_pick(command: Callable[..., argparse.ArgumentParser]) -> None:
    """The ``tomoseg pick`` command and its options."""
    p = command(
        "pick",
        help="extract particle coordinates from a mask",
        description="Connected components of each feature; one particle per "
        "component (centroid) or probability/distance peaks. Writes RELION "
        ".star or .csv with coordinates in Angstrom.",
    )
    p.add_argument("mask", help="a mask (MRC) from apply or merge")
    p.add_argument("-o", "--output", required=True, help=".star or .csv file to write")
    p.add_argument("--feature", type=int, nargs="+", help="label value(s) to pick (default: all)")
    p.add_argument(
        "--names",
        help="comma-separated class names, background first (default: those the mask's "
        "header records, as merge and copick import write them)",
    )
    p.add_argument("--min-size", type=int, default=50, help="smallest component in voxels")
    p.add_argument(
        "--method",
        choices=["centroid", "peak"],
        default="centroid",
        help="one particle per component (centroid) or per probability/distance peak",
    )
    p.add_argument("--min-distance", type=int, default=10, help="voxels between peaks")
    p.add_argument("--probabilities", help="probability map (MRC) for peak picking")
    p.add_argument(
        "--tomo-name",
        help="_rlnTomoName of the picks, as in RELION's tomograms.star (default: the "
        "tomogram the mask was made from, as its header records)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_pick)


def _add_clean(command: Callable[..., argparse.ArgumentParser]) -> None:
    """The ``tomoseg clean`` command and its options."""
    p = command(
        "clean",
        help="list and remove temporary files that killed runs left behind",
        description="Every file is written to a hidden temporary beside it "
        "(.NAME.HOST-ID-PID-START-RANDOM.part) and renamed when complete, so a killed run "
        "leaves such files behind. This lists them with their sizes and removes the stale "
        "ones: those whose process (on this host) is gone, and those from another host "
        "(whose process cannot be checked from here) unchanged for --older-than hours. A "
        "temporary of a process running on this host is never removed. Every command does "
        "the same in the folders it writes to.",
    )
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="folder(s) to look in")
    p.add_argument(
        "-n",
        "--dry-run",
        "--list",
        dest="dry_run",
        action="store_true",
        help="only list what would be removed",
    )
    p.add_argument(
        "--older-than",
        type=float,
        default=24.0,
        metavar="HOURS",
        help="remove temporaries written on other hosts once unchanged this long (default 24)",
    )
    p.add_argument("-r", "--recursive", action="store_true", help="look in the subfolders too")
    p.add_argument(
        "--autosaves",
        action="store_true",
        help="also list and remove the annotations the viewer autosaved in the cache folder "
        "(unsaved work of sessions that crashed; those of a running viewer are kept)",
    )
    p.set_defaults(func=_cmd_clean)


def _add_pretrained(command: Callable[..., argparse.ArgumentParser]) -> None:
    """The ``tomoseg pretrained`` command and its options."""
    p = command(
        "pretrained",
        help="list the networks shipped with napari-tomoseg",
        description="The starting networks trained on simulated tomograms that come with the "
        "package: use one as it is (tomoseg apply --pretrained NAME) or let training start "
        "from it (tomoseg train --start-from auto, the default).",
    )
    p.set_defaults(func=_cmd_pretrained)


def _add_suggest(command: Callable[..., argparse.ArgumentParser]) -> None:
    """The ``tomoseg suggest`` command and its options."""
    p = command(
        "suggest",
        help="suggest boxes where a network fires far from every positive box",
        description="After a first training and apply: the places where the network marks "
        "the feature far from every positive box, strongest first, none overlapping an "
        "existing box. Look at each and box it as a negative example (the network is wrong "
        "there) or a positive one (paint it), then train again.",
    )
    p.add_argument("probabilities", help="the feature's probability map (MRC from apply)")
    p.add_argument("--positive", required=True, help="CSV of the positive boxes")
    p.add_argument("--negative", help="CSV of the negative boxes")
    p.add_argument("-o", "--output", required=True, help="CSV of suggested boxes to write")
    p.add_argument("-n", "--number", type=int, default=20, help="how many boxes (default 20)")
    p.add_argument(
        "--box-size",
        type=int,
        help="box side in pixels for every box (default: the box files' size column, else 64)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="probability from which the network counts as firing (default: the map's "
        "recorded threshold, the one its mask was cut at; 0.5 for a map that records none)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_suggest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tomoseg",
        formatter_class=HelpWithDefaults,
        description="Segment cryo-electron tomograms with networks trained from a few "
        "painted boxes (EMAN2 TomoSeg workflow). Lengths are in Angstrom, box positions in "
        "voxels (z, y, x).",
        epilog="Typical path: build-trainset -> train -> apply -> merge -> pick. "
        "'tomoseg demo' runs it all on a simulated tomogram.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    command = functools.partial(sub.add_parser, formatter_class=HelpWithDefaults)

    _add_demo(command)
    _add_simulate(command)
    _add_build_trainset(command)
    _add_train(command)
    _add_apply(command)
    _add_merge(command)
    _add_pick(command)
    _add_clean(command)
    _add_pretrained(command)
    _add_suggest(command)
    from ._cli_copick import add_copick_parsers

    add_copick_parsers(command)
    return parser


def _notes_for_removed_temporaries(show: Callable[..., None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints the removal of leftover temporaries (done
    by every write, see ``io.atomic_paths``) as a plain note, the others as before."""
    from .errors import TemporariesRemovedWarning

    def showwarning(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
        if issubclass(category, TemporariesRemovedWarning):
            print(f"note: {message}", file=sys.stderr)
        else:
            show(message, category, *args, **kwargs)

    return showwarning


def message_of(exc: TomosegError) -> str:
    """What to tell the user of ``exc``, naming the option that helps where there is one."""
    if isinstance(exc, OutputExistsError):
        return str(OutputExistsError(exc.path, "add --overwrite to replace it"))
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tomoseg`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = ProgressPrinter(quiet=args.quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _notes_for_removed_temporaries(warnings.showwarning)
            try:
                return int(args.func(args, progress))
            finally:
                progress.close()
    except TomosegError as exc:
        print(f"tomoseg {args.command}: error: {message_of(exc)}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"tomoseg {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
