"""Accuracy of the shipped networks on the scenes of another simulator, imaged here.

    python benchmarks/other_simulator.py SCENE [SCENE ...] --classes 1=single_membrane ...
        [--voxel-size A] [--conditions NAME ...] [--tolerance 1] [--networks NAME ...]
        [--threads T] [--json FILE]

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
from accuracy import apply_scored, scored_slices

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


def score_scenes(args: argparse.Namespace, say: Any = print) -> dict[str, Any]:
    """Image every scene under every condition, apply the networks, count."""
    import torch

    from napari_tomoseg.applying.inference import ApplySettings
    from napari_tomoseg.learning.pretrained import MULTICLASS, available, load_pretrained
    from napari_tomoseg.simulator.synthetic import CLASS_NAMES, image_density

    if args.threads:
        torch.set_num_threads(args.threads)
    features = sorted(set(args.classes.values()), key=CLASS_NAMES.index)
    names = args.networks or [n for n in available() if n in features or n == MULTICLASS]
    networks = {n: load_pretrained(n) for n in names}
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for index, folder in enumerate(args.scenes):
        scene = load_scene(folder, args.classes, args.voxel_size)
        z0, z1 = scored_slices(scene["density"].shape[0])  # the slices accuracy.py scores
        labels = scene["labels"][z0:z1]
        for condition in args.conditions:
            say(f"... {scene['name']}, {condition}: imaging, then {len(networks)} networks")
            changes = {"voxel_size": scene["voxel_size"], "seed": index, **CONDITIONS[condition]}
            tomogram = image_density(scene["density"], **changes)
            for name, network in networks.items():
                result, first = apply_scored(
                    network, tomogram, scene["voxel_size"], ApplySettings()
                )
                mask = np.asarray(result.mask)[first:]
                classes = list(network.meta.class_names)
                for feature in features if name == MULTICLASS else [name]:
                    k = classes.index(feature) if name == MULTICLASS else 1
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
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }


def pooled(rows: list[dict[str, Any]], **match: Any) -> dict[str, int]:
    """The :func:`counts` of the rows that match, summed."""
    keys = ("tp", "marked", "truth", "marked_near", "truth_found")
    chosen = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return {k: sum(r[k] for r in chosen) for k in keys}


def format_report(report: dict[str, Any], conditions: list[str]) -> str:
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
        "",
    ]
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
