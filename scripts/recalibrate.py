"""Re-choose the threshold of trained networks from the F1 curve their training recorded.

    python scripts/recalibrate.py [NETWORK.tsnet ...] [--dry-run]

Every network trained by the package records the F1 of its held-out boxes at each candidate
threshold (``metrics["training"]["threshold_calibration"]``).  When the rule that picks the
threshold from that curve changes (:func:`napari_tomoseg.learning.training.threshold_from_curve`),
this script applies the current rule to the recorded curve and rewrites the file's threshold,
its weights untouched: the same threshold that training the network again would choose, since
the curve is the same.  Without arguments it recalibrates the shipped networks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "napari_tomoseg" / "learning"
PACKAGE_DIR = PACKAGE_DIR / "networks"


def recalibrate(path: Path, dry_run: bool = False) -> tuple[float | None, float]:
    """The old and the new threshold of the network at ``path`` (rewritten unless dry run)."""
    from napari_tomoseg.errors import TomosegError
    from napari_tomoseg.learning.model_file import load_network, save_network
    from napari_tomoseg.learning.training import threshold_from_curve

    network = load_network(path)
    training = (network.meta.metrics or {}).get("training", {})
    record = training.get("threshold_calibration")
    if not record or "f1" not in record:
        raise TomosegError(
            f"{path} records no threshold calibration curve (it was not trained by "
            "napari-tomoseg, or before calibration existed); train it again to calibrate it."
        )
    old = network.meta.threshold
    new, info = threshold_from_curve(record["f1"])
    if not dry_run:
        training["threshold_calibration"] = {**record, **info}
        network.meta.threshold = new
        # the shipped networks are stored in half precision (re-saving them is lossless)
        shipped = path.resolve().parent == PACKAGE_DIR.resolve()
        save_network(network, path, overwrite=True, half=shipped)
    return old, new


def update_summary(path: Path, thresholds: dict[str, float]) -> bool:
    """Write the new thresholds into the pretraining summary ``path`` (False if none there)."""
    if not path.is_file():
        return False
    summary = json.loads(path.read_text())
    for name, threshold in thresholds.items():
        entry = summary.get("networks", {}).get(name)
        if entry is not None:
            entry["threshold"] = threshold
            entry["threshold_recalibrated_by"] = "scripts/recalibrate.py"
    path.write_text(json.dumps(summary, indent=1))  # as scripts/pretrain.py writes it
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("networks", nargs="*", type=Path, help="default: the shipped networks")
    parser.add_argument("--dry-run", action="store_true", help="print, do not rewrite")
    args = parser.parse_args(argv)
    paths = args.networks or sorted(PACKAGE_DIR.glob("*.tsnet"))
    changed: dict[Path, dict[str, float]] = {}
    for path in paths:
        old, new = recalibrate(path, args.dry_run)
        changed.setdefault(path.parent / "pretraining.json", {})[path.stem] = new
        print(f"{path.name}: threshold {old} -> {new}")
    if not args.dry_run:
        for summary, thresholds in changed.items():
            if update_summary(summary, thresholds):
                print(f"{summary}: thresholds updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
