"""Label volume of a filament from points on its axis, for ``benchmarks/real_data.py``.

    python benchmarks/tube_labels.py TOMOGRAM OUT_LABELS --points Z,Y,X Z,Y,X ...
        [--radius 125] [--unit A] [--no-ignore]

Voxels within ``--radius`` (Angstrom) of the polyline through the axis points get label 1.
Voxels beyond the first or the last point along the axis get 127, the value that
``real_data.py --ignore 127`` leaves unscored: the filament goes on there, but nobody said
where.  ``--points`` are in ``--unit`` (``A``, ``nm`` or ``voxel``); with ``A`` or ``nm``
the tomogram's voxel size turns them into voxels.  The default radius, 125 A, is a
microtubule's outer radius (as the simulator paints it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

IGNORE = 127
UNITS = {"A": 1.0, "nm": 10.0}


def tube_labels(
    shape: tuple[int, ...], points: np.ndarray, radius: float, ignore_ends: bool = True
) -> np.ndarray:
    """int16 labels: 1 within ``radius`` voxels of the polyline ``points`` (voxels, Z Y X);
    ``IGNORE`` past its ends along the axis when ``ignore_ends``."""
    grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).astype(np.float32)
    dist = np.full(shape, np.inf, dtype=np.float32)
    for a, b in zip(points[:-1], points[1:]):
        d = b - a
        t = np.clip(((grid - a) @ d) / float(d @ d), 0.0, 1.0)
        dist = np.minimum(dist, np.linalg.norm(grid - (a + t[..., None] * d), axis=-1))
    labels = (dist <= radius).astype(np.int16)
    if ignore_ends:
        before = (grid - points[0]) @ (points[1] - points[0]) < 0
        after = (grid - points[-1]) @ (points[-1] - points[-2]) > 0
        labels[before | after] = IGNORE
    return labels


def main(argv: list[str] | None = None) -> int:
    import mrcfile

    from napari_tomoseg.data.io import read_tomogram

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tomogram", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--points", nargs="+", required=True, help="axis points Z,Y,X")
    parser.add_argument("--radius", type=float, default=125.0, help="Angstrom")
    parser.add_argument("--unit", choices=[*UNITS, "voxel"], default="A")
    parser.add_argument("--no-ignore", action="store_true", help="no 127 past the ends")
    args = parser.parse_args(argv)
    tomo = read_tomogram(args.tomogram)
    if not tomo.voxel_size:
        raise SystemExit(f"{args.tomogram} has no voxel size in its header; set it first.")
    voxel = np.asarray(tomo.voxel_size, dtype=np.float32)
    points = np.array([[float(v) for v in p.split(",")] for p in args.points], np.float32)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) < 2:
        raise SystemExit("--points needs at least two Z,Y,X points.")
    if args.unit != "voxel":
        points = points * np.float32(UNITS[args.unit]) / voxel
    labels = tube_labels(
        tomo.data.shape, points, args.radius / float(voxel[-1]), not args.no_ignore
    )
    with mrcfile.new(args.out, overwrite=True) as out:
        out.set_data(labels)
        out.voxel_size = tuple(float(v) for v in voxel[::-1])
    print(
        f"{args.out}: {int((labels == 1).sum()):,} feature voxels, "
        f"{int((labels == IGNORE).sum()):,} not scored"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
