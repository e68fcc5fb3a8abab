"""Apply throughput and peak memory on tomograms of growing size (``tomoseg apply``, file in,
files out).

    python benchmarks/apply_scaling.py [--sizes 64 128 256] [--xy 512] [--architecture NAME]
                                       [--tiny]

For each size a float32 tomogram of N x XY x XY is written to a temporary folder, then a
fresh process runs ``tomoseg apply`` on it (memory-mapped MRC input, mask and probability
map written as memory-mapped MRC files) and the script reports its wall time and peak
resident memory: the process's and its children's high-water mark, from ``wait4``, so it
counts the file-backed pages of the maps as ``/usr/bin/time -v`` does.  Time should grow
linearly with the number of slices and peak memory stay flat.  The network is untrained
(weights do not change the cost); its architecture is the package default unless given;
``--tiny`` takes a 4-kernel 5x5 ``tomoseg-cnn``, so the input and output pages, not the
network's activations, are what the memory column shows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import CLI, command_line, describe_machine, machine_info, markdown_table, run_measured


def write_tomogram(path: Path, depth: int, xy: int, seed: int = 0) -> None:
    from napari_tomoseg.data.io import write_mrc

    rng = np.random.default_rng(seed)
    data = np.lib.format.open_memmap(
        path.with_suffix(".npy"), mode="w+", dtype=np.float32, shape=(depth, xy, xy)
    )
    for z in range(depth):
        data[z] = rng.standard_normal((xy, xy), dtype=np.float32)
    write_mrc(path, data, 10.0, overwrite=True)
    del data
    path.with_suffix(".npy").unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--xy", type=int, default=512)
    parser.add_argument("--architecture", default=None)
    parser.add_argument("--tiny", action="store_true", help="a 4-kernel 5x5 tomoseg-cnn")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, help="tiles per pass (default: ApplySettings')")
    args = parser.parse_args()

    import torch

    from napari_tomoseg.learning.model_file import Network, save_network
    from napari_tomoseg.learning.models import DEFAULT_ARCHITECTURE

    arch = "tomoseg-cnn" if args.tiny else args.architecture or DEFAULT_ARCHITECTURE
    params = {"n_kernels": [4, 4], "kernel_size": 5} if args.tiny else None
    torch.manual_seed(0)
    network = Network.create(
        arch,
        1,
        2,
        model_params=params,
        voxel_size=10.0,
        box_size=64,
        normalisation={"mode": "tomogram", "clamp_sigma": 5.0},
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        net_path = save_network(network, tmp_path / "net.tsnet")
        for depth in args.sizes:
            tomo = tmp_path / f"tomo_{depth}.mrc"
            write_tomogram(tomo, depth, args.xy)
            out_dir = tmp_path / f"out_{depth}"
            cmd = [sys.executable, "-c", CLI, "--quiet", "apply", str(net_path), str(tomo)]
            cmd += ["--output-dir", str(out_dir), "--device", args.device, "--cluster", "none"]
            if args.batch_size:
                cmd += ["--batch-size", str(args.batch_size)]
            seconds, peak_mib = run_measured(cmd)
            rows.append((depth, depth * args.xy * args.xy, seconds, peak_mib))
            for leftover in out_dir.glob("*.mrc"):
                leftover.unlink()
            tomo.unlink(missing_ok=True)

    name = "tiny tomoseg-cnn (4 kernels, 5x5)" if args.tiny else arch
    print(
        f"# apply scaling (tomoseg apply): {name}, {args.xy}x{args.xy} slices, device "
        f"{args.device}, batch {args.batch_size or 'default'}"
    )
    print(f"# command: {command_line()}")
    print(describe_machine(machine_info()))
    table = [
        [
            depth,
            f"{voxels:,}",
            f"{seconds:.1f}",
            f"{voxels / seconds / 1e6:.2f}",
            f"{(depth * args.xy * args.xy * 6) / 2**20:.0f}",
            f"{peak:.0f}",
        ]
        for depth, voxels, seconds, peak in rows
    ]
    headers = ["slices", "voxels", "seconds", "Mvoxels/s", "files (MiB)", "peak RSS (MiB)"]
    print(markdown_table(headers, table, align="r" * len(headers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
