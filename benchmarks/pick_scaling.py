"""Pick time and peak memory on segmentations of growing size (``tomoseg pick``, file in,
STAR file out).

    python benchmarks/pick_scaling.py [--sizes 40 160 320] [--xy 1024]

For each size an N x XY x XY label mask is written to a temporary folder: label 1 holds
spheres of radius 6 voxels (particles, a few hundred per 100 slices), label 2 a wavy sheet
4 voxels thick that crosses every slice (a membrane: one component spanning the whole
volume).  A fresh process then runs ``tomoseg pick`` on it (memory-mapped MRC input,
centroids, the default minimum size) and the script reports its wall time and peak
resident memory (``ru_maxrss`` of it and its children, from ``wait4``, as
``/usr/bin/time -v`` counts it).  Time should grow linearly with the number of slices and
peak memory stay flat.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import CLI, command_line, describe_machine, machine_info, markdown_table, run_measured

RADIUS = 6
SHEET = 4
PARTICLES_PER_SLICE = 3.0


def mask_slab(z0: int, z1: int, xy: int, centres: np.ndarray) -> np.ndarray:
    """Slices z0..z1 of the mask: the sheet (2) and the spheres (1) that reach them."""
    z, y, x = np.ogrid[z0:z1, 0:xy, 0:xy]
    sheet_y = xy / 2 + 0.1 * xy * np.sin(2 * np.pi * (x / xy + z / 400.0))
    out = np.where(np.abs(y - sheet_y) < SHEET / 2, 2, 0).astype(np.uint8)
    near = centres[(centres[:, 0] > z0 - RADIUS - 1) & (centres[:, 0] < z1 + RADIUS + 1)]
    for cz, cy, cx in near:
        box = tuple(
            slice(max(lo, int(c) - RADIUS - 1), min(hi, int(c) + RADIUS + 2))
            for c, lo, hi in ((cz, z0, z1), (cy, 0, xy), (cx, 0, xy))
        )
        if box[0].start >= box[0].stop:
            continue
        gz, gy, gx = np.ogrid[box]
        ball = (gz - cz) ** 2 + (gy - cy) ** 2 + (gx - cx) ** 2 <= RADIUS**2
        part = out[box[0].start - z0 : box[0].stop - z0, box[1], box[2]]
        part[ball & (part == 0)] = 1
    return out


def write_mask(path: Path, depth: int, xy: int, seed: int = 0) -> int:
    """Write the mask slab by slab (never whole in memory); returns the number of spheres."""
    from napari_tomoseg.data.io import write_labels

    rng = np.random.default_rng(seed)
    n = int(PARTICLES_PER_SLICE * depth)
    centres = rng.uniform((0, RADIUS, RADIUS), (depth, xy - RADIUS, xy - RADIUS), size=(n, 3))
    data = np.lib.format.open_memmap(
        path.with_suffix(".npy"), mode="w+", dtype=np.uint8, shape=(depth, xy, xy)
    )
    for z0 in range(0, depth, 16):
        data[z0 : z0 + 16] = mask_slab(z0, min(depth, z0 + 16), xy, centres)
    data.flush()
    write_labels(path, data, 10.0, overwrite=True)
    del data
    path.with_suffix(".npy").unlink()
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 160, 320])
    parser.add_argument("--xy", type=int, default=1024)
    args = parser.parse_args()

    from napari_tomoseg.applying.picking import read_star

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for depth in args.sizes:
            mask = tmp_path / f"mask_{depth}.mrc"
            spheres = write_mask(mask, depth, args.xy)
            star = tmp_path / f"picks_{depth}.star"
            cmd = [sys.executable, "-c", CLI, "--quiet", "pick", str(mask), "-o", str(star)]
            cmd += ["--tomo-name", f"tomo_{depth}"]
            seconds, peak_mib = run_measured(cmd)
            picked = len(read_star(star).particles)
            rows.append((depth, spheres, picked, seconds, peak_mib))
            mask.unlink()

    print(f"# pick scaling (tomoseg pick, centroids): {args.xy}x{args.xy} slices")
    print(f"# command: {command_line()}")
    print(describe_machine(machine_info()))
    table = [
        [
            depth,
            f"{depth * args.xy * args.xy / 2**20:.0f}",
            spheres,
            picked,
            f"{seconds:.1f}",
            f"{peak:.0f}",
        ]
        for depth, spheres, picked, seconds, peak in rows
    ]
    headers = ["slices", "mask (MiB)", "spheres", "particles", "seconds", "peak RSS (MiB)"]
    print(markdown_table(headers, table, align="r" * len(headers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
