"""Recall of membrane voxels by their orientation to the beam: what the missing wedge hides.

    python benchmarks/wedge_recall.py [--networks NAME_OR_FILE ...] [--feature F]
                                      [--tests NAME ...] [--threads T] [--json FILE]

A membrane seen face-on (its normal along the beam, Z) has its Fourier components where
the missing wedge removes them, so it is hard to see in any slice.  This script applies
binary networks (shipped names or ``.tsnet`` files) to tomograms of the shifted test set
(``accuracy.SHIFTED_TESTS``), estimates each labelled voxel's normal from the smoothed
ground truth, and prints the fraction of the feature's voxels and the network's recall in
bins of ``|n_z|`` (0: the membrane stands upright, seen edge-on; 1: it lies flat, seen
face-on), over the central slices that ``accuracy.py`` scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _common import command_line, describe_machine, machine_info, markdown_table

#: Bin edges of |n_z|.
BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
#: The tests of the default run: clean to hard, one thick specimen.
DEFAULT_TESTS = ("SNR 1.5", "defocus 2 um", "tilts +-45", "specimen 1.7x thicker")


def normal_z(truth: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """|n_z| of the surface through each voxel: the Z share of the smoothed label's gradient."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(truth.astype(np.float32), sigma)
    gz, gy, gx = np.gradient(smooth)
    return np.abs(gz) / (np.sqrt(gz * gz + gy * gy + gx * gx) + 1e-12)


def binned_recall(pred: np.ndarray, truth: np.ndarray, nz: np.ndarray) -> tuple[list, list]:
    """Per |n_z| bin: the number of feature voxels and how many of them ``pred`` marks."""
    which = np.clip(np.digitize(nz[truth], BINS) - 1, 0, len(BINS) - 2)
    found = pred[truth]
    total = np.bincount(which, minlength=len(BINS) - 1)
    hits = np.bincount(which, weights=found, minlength=len(BINS) - 1)
    return total.astype(int).tolist(), hits.astype(int).tolist()


def load(name: str) -> Any:
    from napari_tomoseg.learning.model_file import load_network
    from napari_tomoseg.learning.pretrained import load_pretrained

    return load_network(name) if Path(name).suffix == ".tsnet" else load_pretrained(name)


def run(networks: list[str], feature: str, tests: list[str]) -> dict[str, Any]:
    """Recall by orientation of each network, summed over ``tests``."""
    import accuracy

    from napari_tomoseg.applying.inference import ApplySettings, apply_network
    from napari_tomoseg.simulator.synthetic import CLASS_NAMES

    options = accuracy.AccuracyOptions(shifted=True, shifted_tests=list(tests))
    sims = accuracy.make_tests(options)
    value = CLASS_NAMES.index(feature)
    report: dict[str, Any] = {"feature": feature, "tests": list(tests), "bins": list(BINS)}
    rows = {}
    for name in networks:
        network = load(name)
        total = np.zeros(len(BINS) - 1, int)
        hits = np.zeros(len(BINS) - 1, int)
        for test in sims:
            sim = test.sim
            z0, z1 = accuracy.scored_slices(sim.tomogram.shape[0])
            result = apply_network(
                network, sim.tomogram, voxel_size=sim.voxel_size, settings=ApplySettings()
            )
            truth = sim.labels == value
            nz = normal_z(truth)[z0:z1]
            t, h = binned_recall(np.asarray(result.mask)[z0:z1] > 0, truth[z0:z1], nz)
            total += t
            hits += h
        rows[name] = {"voxels": total.tolist(), "found": hits.tolist()}
    report["networks"] = rows
    return report


def format_report(report: dict[str, Any]) -> str:
    bins = report["bins"]
    heads = [f"{lo:.1f}-{hi:.1f}" for lo, hi in zip(bins[:-1], bins[1:])]
    first = next(iter(report["networks"].values()))
    share = np.array(first["voxels"]) / max(1, sum(first["voxels"]))
    table = [["share of the feature's voxels", *(f"{v:.2f}" for v in share)]]
    for name, row in report["networks"].items():
        recall = np.array(row["found"]) / np.maximum(1, row["voxels"])
        table.append([f"recall, {name}", *(f"{v:.2f}" for v in recall)])
    return "\n".join(
        [
            f"# recall of {report['feature']} by |n_z| (0: seen edge-on, 1: face-on)",
            f"# command: {command_line()}",
            describe_machine(machine_info()),
            f"# tests: {'; '.join(report['tests'])} (central slices, each network's threshold)",
            "",
            markdown_table(["abs(n_z)", *heads], table),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["double_membrane"])
    parser.add_argument("--feature", default="double_membrane")
    parser.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="also write the counts to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = run(args.networks, args.feature, args.tests)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
