"""Shared helpers of the benchmark scripts: machine description, tables, child processes.

Every benchmark prints the machine, the date and the software versions next to its
tables, and measures memory in a fresh process (``ru_maxrss`` is a per-process peak), so
these live in one place.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else what platform says)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    """Total RAM in GiB, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def module_version(name: str) -> str | None:
    """Installed version of ``name`` (without importing it), or None when absent."""
    if importlib.util.find_spec(name) is None:
        return None
    from importlib import metadata

    for dist in (name, name.replace("_", "-"), f"{name}-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "installed"


#: Environment variables that limit the vector instructions torch and oneDNN use (to measure
#: an AVX2-only CPU on an AVX-512 one).
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, RAM, GPU, OS, date, load and software versions."""
    import numpy as np
    import torch

    import napari_tomoseg

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    versions = {
        "python": platform.python_version(),
        "napari_tomoseg": napari_tomoseg.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    for optional in ("tensorflow", "keras"):
        v = module_version(optional)
        if v is not None:
            versions[optional] = v
    limits = {k: os.environ[k] for k in ISA_LIMITS if k in os.environ}
    return {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_limits": limits,
        "cpus": os.cpu_count(),
        "ram_gib": memory_gib(),
        "gpu": gpu,
        "load_average": load,
        "versions": versions,
    }


def describe_machine(info: dict[str, Any]) -> str:
    """One comment line per fact of :func:`machine_info`, for the top of a printed report."""
    ram = f"{info['ram_gib']:.0f} GiB RAM" if info.get("ram_gib") else "RAM unknown"
    load = info.get("load_average")
    load_text = ", ".join(f"{v:.2f}" for v in load) if load else "unknown"
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    limits = ", ".join(f"{k}={v}" for k, v in info.get("isa_limits", {}).items())
    isa = f"{info.get('cpu_capability', 'unknown')} (limited by {limits})" if limits else None
    return "\n".join(
        [
            f"# date: {info['date']}",
            f"# machine: {info['cpu']}, {info['cpus']} CPUs, {ram}, {info['platform']}",
            f"# vector instructions torch uses: {isa or info.get('cpu_capability', 'unknown')}",
            f"# GPU: {info['gpu'] or 'none (CUDA not available)'}",
            f"# load average at start (1, 5, 15 min): {load_text}",
            f"# versions: {versions}",
        ]
    )


def command_line() -> str:
    """The command that started this process, as a user would type it."""
    return " ".join(["python", *sys.argv])


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None
) -> str:
    """A markdown table; ``align`` has one character per column: ``l`` or ``r``."""
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError("align needs one character per column")
    marks = {"l": "---", "r": "---:"}
    lines = [
        "| " + " | ".join(str(h) for h in headers) + " |",
        "|" + "|".join(marks[a] for a in align) + "|",
    ]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} columns")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table (``-`` for None)."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def f1_of(precision: float | None, recall: float | None) -> float | None:
    """The harmonic mean of precision and recall (None if either is undefined)."""
    if precision is None or recall is None:
        return None
    total = precision + recall
    return 2 * precision * recall / total if total else 0.0


def precision_recall_f1(tp: float, marked: float, truth: float) -> dict[str, float | None]:
    """Precision, recall and F1 from voxel counts (None where a count leaves one undefined:
    nothing marked, no feature)."""
    p = tp / marked if marked else None
    r = tp / truth if truth else None
    return {"precision": p, "recall": r, "f1": f1_of(p, r)}


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_child(script: str, spec: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    """Run ``script --child SPEC`` in a fresh Python and return the JSON it printed last.

    ``threads`` caps the OpenMP / MKL / TensorFlow thread pools of the child through the
    environment (torch's own count is set by the child).  A failing child raises
    ``RuntimeError`` with its stderr.
    """
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env.setdefault("KERAS_BACKEND", "tensorflow")
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    cmd = [sys.executable, script, "--child", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(
            f"benchmark child {spec.get('mode')} failed ({out.returncode}):\n{out.stderr[-4000:]}"
        )
    lines = [ln for ln in out.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"benchmark child printed no result:\n{out.stdout[-2000:]}")
    return json.loads(lines[-1])


def binary_trainset(
    sim: Any, feature: str, n_positive: int = 10, n_negative: int = 100, seed: int = 0
) -> Any:
    """A TomoSeg training set for one feature of a simulated tomogram, boxed like a user:
    ``n_positive`` boxes rich in the feature and ``n_negative`` boxes free of it, the
    feature painted from the ground truth inside the positive boxes, default
    :class:`TrainsetSettings` (:func:`napari_tomoseg.simulator.demo.trainset_from_truth`)."""
    from napari_tomoseg.simulator.demo import trainset_from_truth

    return trainset_from_truth(sim, [feature], n_positive, n_negative, seed=seed)


# -- a command's peak memory, as a scheduler counts it --------------------------------
CLI = "import sys; from napari_tomoseg.cli import main; sys.exit(main())"
# A small process starts the command and reads its peak from wait4.  Started from this one
# directly, the command's ru_maxrss would begin at this process's own peak (Linux counts the
# resident size of the address space that exec replaces, here a copy of this one's).
LAUNCHER = r"""
import os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), time.perf_counter() - t0, usage.ru_maxrss)
"""


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; (seconds, peak resident MiB of it and its children).  Fails loudly."""
    out = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    status, seconds, peak_kib = out.stdout.strip().splitlines()[-1].split()
    if int(status) != 0:
        sys.stderr.write(out.stdout)
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    return float(seconds), int(peak_kib) / 1024  # Linux reports KiB
