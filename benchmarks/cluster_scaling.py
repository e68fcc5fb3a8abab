"""Batch apply on a local Dask cluster: wall time with 1 and 2 workers (and the plain loop).

    python benchmarks/cluster_scaling.py [--tomograms 8] [--shape 24 256 256]
                                         [--architecture NAME] [--split-slices 96]
                                         [--memory-xy 1024]

Writes ``--tomograms`` random float32 tomograms of ``--shape`` to a temporary folder and
applies one untrained network (weights do not change the cost; the package default
architecture unless given) to all of them:

* ``plain``: the single-process loop of ``tomoseg apply`` without cluster options
  (``inference.apply_file`` per tomogram, torch's default thread count), in a fresh process;
* ``W workers x T threads``: :func:`napari_tomoseg.applying.cluster.run_batch` on a local
  cluster of W worker processes with T torch threads each (start-up, including importing the
  package in each worker, is reported separately, not in the batch time; each worker loads the
  network once, inside the batch time);
* ``z-split``: one tomogram of ``--split-slices`` slices cut into Z chunks of a quarter of
  it, on 1 and on 2 workers;
* the peak resident memory of one process applying each architecture to a 2-slice
  tomogram of ``--memory-xy`` squared pixels (what a local cluster budgets per worker).

Prints a table with the machine, the command, the date and the load average before and
after (other work on the machine slows every row).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PLAIN = r"""
import sys, time
from napari_tomoseg.applying.inference import ApplySettings, apply_file
from napari_tomoseg.learning.model_file import load_network
net = load_network(sys.argv[1])
t0 = time.perf_counter()
for i, tomo in enumerate(sys.argv[3:]):
    apply_file(net, tomo, f"{sys.argv[2]}/m{i}.mrc", f"{sys.argv[2]}/p{i}.mrc",
               settings=ApplySettings(device="cpu"))
print(time.perf_counter() - t0)
"""


MEMORY = r"""
import resource, sys, torch
torch.set_num_threads(1)
from napari_tomoseg.applying.inference import ApplySettings, apply_file
from napari_tomoseg.learning.model_file import Network, save_network
torch.manual_seed(0)
net = Network.create(sys.argv[1], 1, 2, voxel_size=10.0,
                     normalisation={"mode": "tomogram", "clamp_sigma": 5.0})
apply_file(net, sys.argv[2], sys.argv[3] + "/m.mrc", sys.argv[3] + "/p.mrc",
           settings=ApplySettings(device="cpu"), overwrite=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def write_tomogram(path: Path, shape: tuple[int, int, int], seed: int) -> Path:
    from napari_tomoseg.data.io import write_mrc

    rng = np.random.default_rng(seed)
    return write_mrc(path, rng.standard_normal(shape, dtype=np.float32), 10.0)


def _warm() -> int:
    """Import the package (and torch) in a worker, as any long batch has done early on."""
    import napari_tomoseg.applying.cluster  # noqa: F401

    return os.getpid()


def run_cluster(jobs, workers: int, threads: int, z_split: int | None = None) -> tuple:
    """(start-up seconds, batch seconds) of one local-cluster run."""
    import distributed

    from napari_tomoseg.applying.cluster import BatchSettings, run_batch, start_local_cluster
    from napari_tomoseg.applying.inference import ApplySettings

    batch = BatchSettings(n_workers=workers, torch_threads=threads, gpus="none", z_split=z_split)
    t0 = time.perf_counter()
    cluster = start_local_cluster(batch)
    client = distributed.Client(cluster)
    client.run(_warm)
    startup = time.perf_counter() - t0
    try:
        result = run_batch(jobs, ApplySettings(device="cpu"), batch, client=client)
    finally:
        client.close()
        cluster.close()
    if len(result.done) != len(jobs):
        raise SystemExit(result.summary())
    return startup, result.seconds


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tomograms", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=(24, 256, 256))
    parser.add_argument("--architecture", default=None)
    parser.add_argument("--split-slices", type=int, default=96, help="0: skip the z-split rows")
    parser.add_argument(
        "--memory-xy",
        type=int,
        default=1024,
        help="also measure the peak memory of one process per architecture on 2 slices of "
        "this size (0: skip)",
    )
    args = parser.parse_args()

    import torch

    from napari_tomoseg.applying.cluster import plan_batch
    from napari_tomoseg.learning.model_file import Network, save_network
    from napari_tomoseg.learning.models import DEFAULT_ARCHITECTURE

    arch = args.architecture or DEFAULT_ARCHITECTURE
    shape = tuple(args.shape)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    load_before = load_average()
    rows: list[tuple[str, str, float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        network = Network.create(
            arch, 1, 2, voxel_size=10.0, normalisation={"mode": "tomogram", "clamp_sigma": 5.0}
        )
        net = save_network(network, root / "net.tsnet")
        tomos = [write_tomogram(root / f"t{i}.mrc", shape, i) for i in range(args.tomograms)]
        slices = shape[0] * len(tomos)

        (root / "plain").mkdir()
        out = subprocess.run(
            [sys.executable, "-c", PLAIN, str(net), str(root / "plain"), *map(str, tomos)],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(("plain loop, 1 process", "-", float(out.stdout.split()[-1]), slices))

        for workers, threads in ((1, 1), (2, 1), (1, 2)):
            jobs = plan_batch(tomos, [net], root / f"w{workers}t{threads}")
            startup, seconds = run_cluster(jobs, workers, threads)
            rows.append(
                (f"{workers} worker(s) x {threads} thread(s)", f"{startup:.1f}", seconds, slices)
            )

        if args.split_slices:
            big_shape = (args.split_slices, shape[1], shape[2])
            big = write_tomogram(root / "big.mrc", big_shape, 99)
            chunk = max(1, args.split_slices // 4)
            for workers in (1, 2):
                jobs = plan_batch([big], [net], root / f"split{workers}")
                startup, seconds = run_cluster(jobs, workers, 1, z_split=chunk)
                rows.append(
                    (
                        f"z-split {args.split_slices} slices in 4, {workers} worker(s) x 1",
                        f"{startup:.1f}",
                        seconds,
                        args.split_slices,
                    )
                )

        memory_rows = []
        if args.memory_xy:
            from napari_tomoseg.learning.models import available

            probe = write_tomogram(root / "probe.mrc", (2, args.memory_xy, args.memory_xy), 7)
            for name in available():
                out = subprocess.run(
                    [sys.executable, "-c", MEMORY, name, str(probe), str(root)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                memory_rows.append((name, float(out.stdout.split()[-1])))

    load_after = load_average()
    print(f"date: {started}")
    print(f"command: python benchmarks/cluster_scaling.py {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, python {platform.python_version()}, torch {torch.__version__}"
    )
    print(f"load average (1, 5, 15 min) before: {load_before}; after: {load_after}")
    print(
        f"work: {args.tomograms} tomograms of {shape[0]} x {shape[1]} x {shape[2]}, "
        f"network {arch} (untrained), ApplySettings defaults, device cpu"
    )
    print()
    base = next(s for name, _, s, _ in rows if name.startswith("1 worker(s) x 1"))
    print("| run | cluster start-up (s) | batch wall time (s) | slices/s | vs 1 worker x 1 |")
    print("|---|---|---|---|---|")
    for name, startup, seconds, n in rows:
        ratio = f"{base / seconds:.2f}x" if not name.startswith("z-split") else "-"
        print(f"| {name} | {startup} | {seconds:.1f} | {n / seconds:.2f} | {ratio} |")
    splits = [s for name, _, s, _ in rows if name.startswith("z-split")]
    if len(splits) == 2:
        print(f"\nz-split speed-up, 2 workers vs 1: {splits[0] / splits[1]:.2f}x")
    if memory_rows:
        print(
            f"\npeak memory of one process applying a network to 2 x {args.memory_xy} x "
            f"{args.memory_xy} (ApplySettings defaults, 1 thread):\n"
        )
        print("| architecture | peak RSS (MB) |")
        print("|---|---|")
        for name, mib in memory_rows:
            print(f"| {name} | {mib * 1.048576:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
