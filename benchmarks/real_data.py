"""Score a network on a real tomogram against labels someone else made.

    python benchmarks/real_data.py TOMOGRAM LABELS --feature NAME
        [--network NAME_OR_FILE] [--voxel-size A] [--invert] [--ignore 127]
        [--label-value 1] [--json FILE]

``TOMOGRAM`` and ``LABELS`` are MRC files of the same shape; voxels of ``LABELS`` equal to
``--label-value`` are the feature, ``--ignore`` marks voxels that nobody annotated (not
scored).  ``--network`` is a shipped network's name (default: the one for ``--feature``)
or a ``.tsnet`` file.  ``--invert`` flips the contrast first, for tomograms written with
matter bright.  The network is applied as ``tomoseg apply`` does (rescaled to its voxel
size; ``--voxel-size`` when the header has none) with its own threshold, and the
precision, recall and F1 of its mask are printed, with the F1 at other thresholds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from _common import (
    command_line,
    describe_machine,
    fmt,
    machine_info,
    markdown_table,
    precision_recall_f1,
)

SWEEP = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tomogram", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--feature", required=True, help="the labelled feature's name")
    parser.add_argument("--network", help="shipped network name or .tsnet file")
    parser.add_argument("--voxel-size", type=float, help="Angstrom, when the header has none")
    parser.add_argument("--invert", action="store_true", help="matter is bright: invert first")
    parser.add_argument("--ignore", type=int, default=None, help="label value not scored")
    parser.add_argument("--label-value", type=int, default=1)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def score(args: argparse.Namespace) -> dict:
    from napari_tomoseg.applying.inference import ApplySettings, apply_network
    from napari_tomoseg.data.io import read_tomogram
    from napari_tomoseg.data.probability import probabilities_as_float
    from napari_tomoseg.learning.model_file import load_network
    from napari_tomoseg.learning.pretrained import available, feature_of, load_pretrained

    tomo = read_tomogram(args.tomogram)
    labels = np.asarray(read_tomogram(args.labels).data).astype(np.int16) % 256
    volume = np.asarray(tomo.data, dtype=np.float32)
    if args.invert:
        volume = -volume
    name = args.network or feature_of(args.feature)
    network = load_pretrained(name) if name in available() else load_network(name)
    voxel = args.voxel_size or (tomo.voxel_size[-1] if tomo.voxel_size else None)
    result = apply_network(network, volume, voxel_size=voxel, settings=ApplySettings())
    values = list(network.meta.class_names)
    wanted = feature_of(args.feature) or args.feature
    matching = [feature_of(v) or v for v in values]
    k = matching.index(wanted) if wanted in matching else 1
    prob = probabilities_as_float(result.probabilities[k - 1])
    keep = labels != args.ignore if args.ignore is not None else np.ones(labels.shape, bool)
    truth = (labels == args.label_value)[keep]

    def prf(mask: np.ndarray) -> dict:
        return precision_recall_f1(float((mask & truth).sum()), mask.sum(), truth.sum())

    own = prf((np.asarray(result.mask) == k)[keep])
    sweep = {t: prf(prob[keep] >= t)["f1"] for t in SWEEP}
    return {
        "command": command_line(),
        "machine": machine_info(),
        "network": str(name),
        "threshold": result.threshold,
        "voxel_size": voxel,
        "notes": result.notes,
        "scored_voxels": int(keep.sum()),
        "feature_voxels": int(truth.sum()),
        **own,
        "f1_at": sweep,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = score(args)
    print(f"# real-data check: {args.tomogram.name} against {args.labels.name}")
    print(f"# command: {out['command']}")
    print(describe_machine(out["machine"]))
    print(
        f"# network: {out['network']}, threshold {out['threshold']:.2f}; voxel size "
        f"{out['voxel_size']} A; {out['feature_voxels']:,} of {out['scored_voxels']:,} "
        "scored voxels are the feature"
    )
    rows = [[args.feature, fmt(out["precision"]), fmt(out["recall"]), fmt(out["f1"])]]
    rows[0] += [fmt(out["f1_at"][t]) for t in SWEEP]
    headers = ["feature", "precision", "recall", "F1", *[f"F1 at {t}" for t in SWEEP]]
    print(markdown_table(headers, rows))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
