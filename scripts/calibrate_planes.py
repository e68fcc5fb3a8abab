"""Decide whether networks are applied in three slice planes, and at what threshold.

    python scripts/calibrate_planes.py NETWORK.tsnet FEATURE [NETWORK.tsnet FEATURE ...]
                                       [--tomograms 8] [--seed 20] [--threads T]
                                       [--planes 1|3] [--dry-run]

Applied in the XY, XZ and YZ slices with the probabilities averaged (``planes`` 3 of
:class:`napari_tomoseg.applying.inference.ApplySettings`), a membrane network also sees the
membranes that lie face-on to the beam, faint in XY slices but lines across the others.
Which networks gain, and the threshold the average needs (it is not the XY one), are
measured here, not on the test sets: ``--tomograms`` tomograms are simulated with the
settings drawn as for the shipped networks' last pretraining (run 10 of ``docs/models.md``,
another seed), each network is applied to them at their own voxel sizes in one and in
three planes, and the F1 of ``FEATURE`` over their central slices is taken at every
candidate threshold.  The three-plane threshold is chosen from that curve by the rule
training uses (:func:`napari_tomoseg.learning.training.threshold_from_curve`); three planes
become the network's default when their F1 there beats one plane's at the network's own
threshold, or as ``--planes`` says (recorded as such).  The file is rewritten (weights
untouched) with both curves in its metrics.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pretrain  # noqa: E402  (the settings drawn for pretraining)

#: pretrain.py's options of the shipped networks' last run (``docs/models.md``, run 10).
PRETRAINING_OPTIONS = [
    "--voxel-sizes", "6", "16", "--imperfect", "--microtubule-variety",
    "--microtubule-elevation", "4", "90", "--membrane-variety",
]  # fmt: skip


def calibration_tomograms(count: int, seed: int) -> list[Any]:
    """``count`` simulated tomograms, settings drawn as pretraining draws them (at their own
    voxel sizes, as a user's tomograms come)."""
    from napari_tomoseg.simulator.synthetic import simulate_tomogram

    args = pretrain.parse_args(
        [*PRETRAINING_OPTIONS, "--tomograms", str(count), "--seed", str(seed)]
    )
    return [simulate_tomogram(settings) for _, settings, _ in pretrain._jobs(args)]


def f1_curve(network: Any, feature: str, sims: list[Any], planes: int) -> list[float]:
    """Pooled F1 of ``feature`` over the central slices of ``sims`` at every
    ``THRESHOLD_CANDIDATES`` threshold, the network applied in ``planes`` planes."""
    from napari_tomoseg.applying.inference import ApplySettings, apply_network
    from napari_tomoseg.data.probability import probabilities_as_float
    from napari_tomoseg.learning.training import THRESHOLD_CANDIDATES
    from napari_tomoseg.simulator.demo import BOX_Z_RANGE, central_slices
    from napari_tomoseg.simulator.synthetic import CLASS_NAMES

    k = list(network.meta.class_names).index(feature) - 1
    counts = np.zeros((len(THRESHOLD_CANDIDATES), 3))
    for sim in sims:
        z0, z1 = central_slices(sim.tomogram.shape[0], BOX_Z_RANGE)
        result = apply_network(
            network,
            sim.tomogram,
            voxel_size=sim.voxel_size,
            settings=ApplySettings(planes=planes, threshold=0.5),
        )
        p = probabilities_as_float(result.probabilities[k][z0:z1])
        truth = sim.labels[z0:z1] == CLASS_NAMES.index(feature)
        for i, t in enumerate(THRESHOLD_CANDIDATES):
            marked = p >= t
            counts[i] += ((marked & truth).sum(), marked.sum(), truth.sum())
    return [float(2 * tp / max(m + t, 1)) for tp, m, t in counts]


def calibrate(
    path: Path, feature: str, sims: list[Any], dry_run: bool, planes: int | None = None
) -> dict[str, Any]:
    """Measure both curves, choose the three-plane threshold and the default planes (or
    take ``planes``), and rewrite the network file (unless ``dry_run``); what was decided."""
    from napari_tomoseg.applying.inference import network_threshold
    from napari_tomoseg.learning.model_file import load_network, save_network
    from napari_tomoseg.learning.training import THRESHOLD_CANDIDATES, threshold_from_curve

    network = load_network(path)
    if feature not in network.meta.class_names[1:]:
        raise SystemExit(f"{path} has no class {feature!r} ({network.meta.class_names})")
    one, three = (f1_curve(network, feature, sims, planes) for planes in (1, 3))
    own = network_threshold(network, 1)
    at_own = one[int(np.argmin([abs(t - own) for t in THRESHOLD_CANDIDATES]))]
    chosen, info = threshold_from_curve(three)
    by_rule = 3 if info["f1_at_chosen"] > at_own else 1
    record = {
        "feature": feature,
        "tomograms": len(sims),
        "seeds": [int(s.settings.seed) for s in sims],
        "one_plane_f1": [round(v, 4) for v in one],
        "one_plane_f1_at_own_threshold": round(at_own, 4),
        **{f"three_planes_{key}": value for key, value in info.items()},
        "planes_by_rule": by_rule,
        "planes": by_rule if planes is None else planes,
        "planes_from": "rule" if planes is None else "command line",
    }
    if not dry_run:
        network.meta.threshold_three_planes = chosen
        network.meta.planes = record["planes"]
        network.meta.metrics["planes_calibration"] = record
        shipped = path.resolve().parent == pretrain.PACKAGE_DIR.resolve()
        save_network(network, path, overwrite=True, half=shipped)
    return record


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", help="network file, then the feature it is scored on")
    parser.add_argument("--tomograms", type=int, default=8, help="simulated tomograms")
    parser.add_argument("--seed", type=int, default=20, help="their seed (not pretraining's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--planes",
        type=int,
        choices=(1, 3),
        help="the default planes to record (default: the rule's)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print, do not rewrite")
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        parser.error("give each network file with the feature it is scored on")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    sims = calibration_tomograms(args.tomograms, args.seed)
    for path, feature in zip(args.pairs[::2], args.pairs[1::2]):
        r = calibrate(Path(path), feature, sims, args.dry_run, args.planes)
        print(
            f"{path}: one plane F1 {r['one_plane_f1_at_own_threshold']:.3f} at its threshold; "
            f"three planes {r['three_planes_f1_at_chosen']:.3f} at "
            f"{r['three_planes_chosen']} -> planes {r['planes_by_rule']} by the rule, "
            f"{r['planes']} recorded"
        )
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
