"""Apply throughput and peak memory on tomograms of growing size (file in, files out).

    python benchmarks/apply_scaling.py [--sizes 64 128 256] [--xy 512] [--architecture NAME]

For each size a float32 tomogram of N x XY x XY is written to a temporary folder, then a
fresh process applies a network to it with ``inference.apply_file`` (memory-mapped input,
memory-mapped outputs) and reports its wall time and peak resident memory.  Time should grow
linearly with the number of slices and peak memory stay flat.  The network is untrained
(weights do not change the cost); its architecture is the package default unless given.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import command_line, describe_machine, machine_info, markdown_table

CHILD = r"""
import json, resource, sys, time
import torch
from napari_tomoseg.inference import ApplySettings, apply_file
from napari_tomoseg.model_file import load_network
net = load_network(sys.argv[1])
settings = ApplySettings(device=sys.argv[5])
if sys.argv[6] != "default":
    settings.batch_size = int(sys.argv[6])
t0 = time.perf_counter()
result = apply_file(net, sys.argv[2], sys.argv[3], sys.argv[4], settings=settings)
seconds = time.perf_counter() - t0
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gpu_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print(json.dumps({"seconds": seconds, "peak_mib": peak_kib / 1024,
                  "gpu_peak_mib": gpu_peak / 2**20, "slices": result.slices_done}))
"""


def write_tomogram(path: Path, depth: int, xy: int, seed: int = 0) -> None:
    from napari_tomoseg.io import write_mrc

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
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, help="tiles per pass (default: ApplySettings')")
    args = parser.parse_args()

    import torch

    from napari_tomoseg.model_file import Network, save_network
    from napari_tomoseg.models import DEFAULT_ARCHITECTURE

    arch = args.architecture or DEFAULT_ARCHITECTURE
    torch.manual_seed(0)
    network = Network.create(
        arch,
        1,
        2,
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
            cmd = [
                sys.executable,
                "-c",
                CHILD,
                str(net_path),
                str(tomo),
                str(tmp_path / f"mask_{depth}.mrc"),
                str(tmp_path / f"prob_{depth}.mrc"),
                args.device,
                str(args.batch_size or "default"),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            stats = json.loads(out.stdout.strip().splitlines()[-1])
            voxels = depth * args.xy * args.xy
            rows.append((depth, voxels, stats))
            for leftover in tmp_path.glob(f"*_{depth}.mrc"):
                leftover.unlink()
            tomo.unlink(missing_ok=True)

    print(
        f"# apply scaling: {arch}, {args.xy}x{args.xy} slices, device {args.device}, "
        f"batch {args.batch_size or 'default'}"
    )
    print(f"# command: {command_line()}")
    print(describe_machine(machine_info()))
    table = [
        [
            depth,
            f"{voxels:,}",
            f"{s['seconds']:.1f}",
            f"{voxels / s['seconds'] / 1e6:.2f}",
            f"{s['peak_mib']:.0f}",
            f"{s['gpu_peak_mib']:.0f}",
        ]
        for depth, voxels, s in rows
    ]
    headers = ["slices", "voxels", "seconds", "Mvoxels/s", "peak RSS (MiB)", "GPU peak (MiB)"]
    print(markdown_table(headers, table, align="r" * len(headers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
