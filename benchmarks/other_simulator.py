"""Accuracy of the shipped networks on the scenes of another simulator, imaged here.

    python benchmarks/other_simulator.py SCENE [SCENE ...] --classes 1=single_membrane ...
        [--voxel-size A] [--conditions NAME ...] [--tolerance 1] [--networks NAME ...]
        [--train-scene SCENE [--boxes 10] [--negatives 100] [--starts auto scratch]
         [--set NAME=VALUE ...]] [--threads T] [--json FILE]

Each ``SCENE`` is a folder with ``density.npy`` ((Z, Y, X) floats, Z along the beam,
matter positive) and ``labels.npy`` (integer classes, the same shape) written by another
simulator, and optionally ``scene.json`` with its ``voxel_size_A``.  ``--classes`` says
which label value is which feature of the shipped networks; every other value counts as
background, so a network marking it is wrong.  Our simulator's scenes share its habits
(membrane profiles, how features are placed, the label conventions) with the training
data; another simulator's do not, so this tests what the shifted set cannot.

Each scene is turned into a tomogram by :func:`~napari_tomoseg.simulator.synthetic.image_density`
under each of :data:`CONDITIONS` (the tilt series, CTF and noise are ours; the scene is
theirs).  The networks are applied as ``benchmarks/accuracy.py`` applies them (central
60 % of the slices, each network's own threshold, rescaled to its voxel size) and scored
voxel by voxel, and with a tolerance: a marked voxel counts as right within
``--tolerance`` voxels of the feature, a feature voxel as found within it of a mark.  The
other simulator may draw a feature thinner or thicker than ours (a membrane as the band
between its leaflets, say); the tolerance shows how much of the voxel score is that.

With ``--train-scene`` a user's path is scored as well: that scene, imaged under the default
condition, is boxed as ``benchmarks/accuracy.py`` boxes ours (``--boxes`` positive boxes of
each feature painted from the other simulator's labels, ``--negatives`` negative boxes), one
binary network per feature is trained on it with the default recipe from each of
``--starts`` (``--set`` changes a ``TrainSettings`` field), and the trained networks and the
shipped ones are scored on the other scenes.  The labels then teach the other simulator's
conventions, as a user's painting teaches theirs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    command_line,
    describe_machine,
    f1_of,
    fmt,
    machine_info,
    markdown_table,
    precision_recall_f1,
)
from accuracy import _override, apply_scored, scored_slices

#: Imaging conditions each scene is tomographed under (SimulationSettings fields).
CONDITIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "hard": {"snr": 0.4, "defocus_um": 5.0, "tilt_max": 50.0, "alignment_error_px": 0.7},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenes", type=Path, nargs="+", help="folders of density/labels.npy")
    parser.add_argument(
        "--classes",
        nargs="+",
        required=True,
        metavar="VALUE=FEATURE",
        help="which label value is which feature, e.g. 1=single_membrane 3=microtubule",
    )
    parser.add_argument("--voxel-size", type=float, help="Angstrom (default: scene.json's)")
    parser.add_argument(
        "--conditions", nargs="+", choices=list(CONDITIONS), default=list(CONDITIONS)
    )
    parser.add_argument("--tolerance", type=float, default=1.0, help="voxels (default: 1)")
    parser.add_argument("--networks", nargs="+", help="shipped networks (default: all that apply)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path)
    train = parser.add_argument_group("training on one of the scenes (a user's path)")
    train.add_argument("--train-scene", type=Path, help="scene folder the boxes are cut from")
    train.add_argument("--boxes", type=int, default=10, help="positive boxes per feature")
    train.add_argument("--negatives", type=int, default=100, help="negative boxes")
    train.add_argument(
        "--starts",
        nargs="+",
        choices=("auto", "scratch"),
        default=["auto"],
        help="auto: the shipped network of the feature (the default recipe); scratch",
    )
    train.add_argument(
        "--set",
        type=_override,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a TrainSettings field for the trained networks, e.g. keep_start=0.25",
    )
    train.add_argument("--seed", type=int, default=0, help="of the boxes and the training")
    args = parser.parse_args(argv)
    args.classes = dict(_class_pair(parser, text) for text in args.classes)
    return args


def _class_pair(parser: argparse.ArgumentParser, text: str) -> tuple[int, str]:
    from napari_tomoseg.simulator.synthetic import CLASS_NAMES

    value, _, feature = text.partition("=")
    if not value.strip().isdigit() or feature not in CLASS_NAMES[1:]:
        parser.error(
            f"--classes takes VALUE=FEATURE with FEATURE in {CLASS_NAMES[1:]}, got {text!r}"
        )
    return int(value), feature


def load_scene(folder: Path, classes: dict[int, str], voxel_size: float | None) -> dict[str, Any]:
    """The scene's density, its labels as our class indices, and its voxel size."""
    from napari_tomoseg.simulator.synthetic import CLASS_NAMES

    for name in ("density.npy", "labels.npy"):
        if not (folder / name).is_file():
            raise SystemExit(
                f"{folder} has no {name}: a scene folder needs density.npy and labels.npy"
            )
    density = np.load(folder / "density.npy").astype(np.float32)
    raw = np.load(folder / "labels.npy")
    if raw.shape != density.shape:
        raise SystemExit(
            f"{folder}: labels {raw.shape} and density {density.shape} differ in shape"
        )
    info = folder / "scene.json"
    meta = json.loads(info.read_text()) if info.is_file() else {}
    voxel = voxel_size or meta.get("voxel_size_A")
    if not voxel:
        raise SystemExit(
            f"{folder}: no voxel size (no scene.json with voxel_size_A): give --voxel-size"
        )
    labels = np.zeros(raw.shape, dtype=np.uint8)
    for value, feature in classes.items():
        labels[raw == value] = CLASS_NAMES.index(feature)
    return {"name": folder.name, "density": density, "labels": labels, "voxel_size": float(voxel)}


def counts(pred: np.ndarray, truth: np.ndarray, tolerance: float) -> dict[str, int]:
    """Voxel counts of one mask against the truth, exact and within ``tolerance`` voxels."""
    from scipy.ndimage import distance_transform_edt

    near_truth = (
        distance_transform_edt(~truth) <= tolerance if truth.any() else np.zeros_like(truth)
    )
    near_pred = distance_transform_edt(~pred) <= tolerance if pred.any() else np.zeros_like(pred)
    return {
        "tp": int((pred & truth).sum()),
        "marked": int(pred.sum()),
        "truth": int(truth.sum()),
        "marked_near": int((pred & near_truth).sum()),
        "truth_found": int((truth & near_pred).sum()),
    }


def metrics(c: dict[str, int]) -> dict[str, float | None]:
    """Precision, recall and F1, exact and with the tolerance, from summed :func:`counts`."""
    p_tol = c["marked_near"] / c["marked"] if c["marked"] else None
    r_tol = c["truth_found"] / c["truth"] if c["truth"] else None
    return {
        **precision_recall_f1(c["tp"], c["marked"], c["truth"]),
        "precision_tol": p_tol,
        "recall_tol": r_tol,
        "f1_tol": f1_of(p_tol, r_tol),
    }


def imaged(scene: dict[str, Any], condition: str, seed: int) -> np.ndarray:
    """The scene tomographed by our imaging under ``condition`` (noise drawn from ``seed``)."""
    from napari_tomoseg.simulator.synthetic import image_density

    changes = {"voxel_size": scene["voxel_size"], "seed": seed, **CONDITIONS[condition]}
    return image_density(scene["density"], **changes)


def shipped_networks(args: argparse.Namespace, features: list[str]) -> dict[str, tuple]:
    """``{name: (network, the features it is scored on)}`` of the shipped networks."""
    from napari_tomoseg.learning.pretrained import MULTICLASS, available, load_pretrained

    names = args.networks or [n for n in available() if n in features or n == MULTICLASS]
    return {n: (load_pretrained(n), features if n == MULTICLASS else [n]) for n in names}


def trained_networks(
    args: argparse.Namespace, features: list[str], say: Any
) -> tuple[dict[str, tuple], list[dict[str, Any]]]:
    """One binary network per feature and start, trained on ``--train-scene``'s boxes with
    the default recipe; ``({label: (network, [feature])}, what each training reported)``."""
    from types import SimpleNamespace

    from napari_tomoseg.learning.training import TrainSettings, train
    from napari_tomoseg.simulator.demo import trainset_from_truth
    from napari_tomoseg.simulator.replay import SimulatedReplay

    scene = load_scene(args.train_scene, args.classes, args.voxel_size)
    seed = len(args.scenes)  # its noise differs from every scored scene's
    say(f"... {scene['name']}, default: imaging, then boxes and training")
    sim = SimpleNamespace(
        tomogram=imaged(scene, "default", seed),
        labels=scene["labels"],
        voxel_size=scene["voxel_size"],
        settings=SimpleNamespace(seed=seed),
    )
    networks, trainings = {}, []
    for feature in features:
        trainset = trainset_from_truth(sim, [feature], args.boxes, args.negatives, seed=args.seed)
        for start in args.starts:
            settings = TrainSettings(seed=args.seed, start_from=start, **dict(args.set))
            t0 = time.perf_counter()
            result = train(trainset, settings, replay_from=SimulatedReplay())
            label = f"{feature}, {'fine-tuned' if start == 'auto' else 'from scratch'}"
            networks[label] = (result.network, [feature])
            trainings.append(
                {
                    "network": label,
                    "boxes": trainset.metadata.get("benchmark_boxes"),
                    "started_from": result.metadata.get("started_from"),
                    "replay": result.metadata.get("replay"),
                    "best_step": result.metadata.get("best_step"),
                    "keep_start": result.metadata.get("keep_start"),
                    "keep_start_held_out_f1": result.metadata.get("keep_start_held_out_f1"),
                    "seconds": time.perf_counter() - t0,
                }
            )
            say(f"... trained {label} in {trainings[-1]['seconds']:.0f} s")
    return networks, trainings


def score_scenes(args: argparse.Namespace, say: Any = print) -> dict[str, Any]:
    """Image every scene under every condition, apply the networks, count."""
    import torch

    from napari_tomoseg.applying.inference import ApplySettings
    from napari_tomoseg.simulator.synthetic import CLASS_NAMES

    if args.threads:
        torch.set_num_threads(args.threads)
    features = sorted(set(args.classes.values()), key=CLASS_NAMES.index)
    t0 = time.perf_counter()
    networks, trainings = shipped_networks(args, features), []
    scenes = list(args.scenes)
    if args.train_scene is not None:
        trained, trainings = trained_networks(args, features, say)
        networks |= trained
        scenes = [s for s in scenes if s.resolve() != args.train_scene.resolve()]
    rows: list[dict[str, Any]] = []
    for folder in scenes:
        scene = load_scene(folder, args.classes, args.voxel_size)
        z0, z1 = scored_slices(scene["density"].shape[0])  # the slices accuracy.py scores
        labels = scene["labels"][z0:z1]
        for condition in args.conditions:
            say(f"... {scene['name']}, {condition}: imaging, then {len(networks)} networks")
            tomogram = imaged(scene, condition, args.scenes.index(folder))
            for name, (network, scored) in networks.items():
                result, first = apply_scored(
                    network, tomogram, scene["voxel_size"], ApplySettings()
                )
                mask = np.asarray(result.mask)[first:]
                classes = list(network.meta.class_names)
                for feature in scored:
                    k = classes.index(feature) if len(classes) > 2 else 1
                    truth = labels == CLASS_NAMES.index(feature)
                    c = counts(mask == k, truth, args.tolerance)
                    rows.append(
                        {
                            "scene": scene["name"],
                            "condition": condition,
                            "network": name,
                            "feature": feature,
                            **c,
                        }
                    )
    return {
        "command": command_line(),
        "machine": machine_info(),
        "classes": {str(k): v for k, v in args.classes.items()},
        "tolerance": args.tolerance,
        "train_scene": args.train_scene.name if args.train_scene else None,
        "trainings": trainings,
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }


def pooled(rows: list[dict[str, Any]], **match: Any) -> dict[str, int]:
    """The :func:`counts` of the rows that match, summed."""
    keys = ("tp", "marked", "truth", "marked_near", "truth_found")
    chosen = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return {k: sum(r[k] for r in chosen) for k in keys}


def format_report(report: dict[str, Any], conditions: list[str]) -> str:
    from napari_tomoseg.simulator.replay import described

    rows = report["rows"]
    scenes = list(dict.fromkeys(r["scene"] for r in rows))
    pairs = list(dict.fromkeys((r["network"], r["feature"]) for r in rows))
    lines = [
        "# accuracy on another simulator's scenes, imaged here",
        f"# command: {report['command']}",
        describe_machine(report["machine"]),
        f"# scenes: {', '.join(scenes)}; classes {report['classes']}; conditions "
        + "; ".join(f"{c} {CONDITIONS[c] or '(the simulator defaults)'}" for c in conditions),
        f"# scored: the central 60 % of the slices; each network's own threshold; tolerance "
        f"{report['tolerance']:g} voxel(s); run time {report['seconds'] / 60:.1f} min",
    ]
    for t in report.get("trainings", []):
        boxes = t["boxes"] or {}
        replay = described(t["replay"]) or "no replay"
        lines.append(
            f"# trained on {report['train_scene']}: {t['network']}, "
            f"{boxes.get('positive')} positive and {boxes.get('negative')} negative boxes, "
            f"from {t['started_from'] or 'random weights'}, {replay}, "
            f"best step {t['best_step']}, {t['seconds']:.0f} s"
        )
    lines.append("")
    table = []
    for condition in conditions:
        for network, feature in pairs:
            c = pooled(rows, condition=condition, network=network, feature=feature)
            m = metrics(c)
            table.append(
                [condition, feature, network]
                + [
                    fmt(m[k])
                    for k in ("precision", "recall", "f1", "precision_tol", "recall_tol", "f1_tol")
                ]
                + [f"{c['truth']:,}"]
            )
    headers = [
        "condition",
        "feature",
        "network",
        "P",
        "R",
        "F1",
        "P (tol.)",
        "R (tol.)",
        "F1 (tol.)",
        "feature voxels",
    ]
    lines.append(markdown_table(headers, table, align="lll" + "r" * 7))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = score_scenes(args, say=lambda text: print(text, file=sys.stderr))
    print(format_report(report, args.conditions))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
