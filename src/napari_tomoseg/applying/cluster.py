"""Apply trained networks to many tomograms on a Dask cluster, resumably.

A *batch* is a list of :class:`BatchJob` (one tomogram x one network, with its output
files).  :func:`iter_run_batch` (or :func:`run_batch`) sends the jobs to Dask workers: a local
cluster started for the batch (:func:`start_local_cluster`), or any running scheduler given
by address, e.g. one started by dask-jobqueue on SLURM or by dask-kubernetes.  The same call
therefore runs on a laptop, a GPU node or a cluster (see ``docs/cluster.md``).

**Workers.**  A local cluster has one worker process per visible GPU (each sees only its GPU
through ``CUDA_VISIBLE_DEVICES`` and advertises the Dask resource ``GPU=1``), or, without a
GPU, one single-threaded worker process per core (fewer when RAM is short; see
:func:`local_worker_plan`).  Every worker runs one task at a time.  A worker loads each
network once (cache keyed by the file's SHA-256 and the device, :func:`worker_network`) and
reuses it for all its tomograms.

**Outputs and the manifest.**  Output files are written atomically (temporary name, renamed
when complete), so a killed worker never leaves a half-written file under a final name.  When
a job finishes, its worker writes a small JSON *record* (output paths, sizes, modification
times, SHA-256, settings, timing) and the driver folds it into the batch *manifest* (JSON,
written atomically).  A rerun of the same batch skips every job whose manifest entry matches:
same tomogram (size and modification time), same network (SHA-256), same apply settings,
and outputs that still exist with the recorded size and modification time (and SHA-256 with
``verify_hashes``).  Only the missing jobs are redone.  A worker also *claims* a job before
writing (a JSON file), so that a rerun may replace outputs that a killed run of the same job
left behind; any other existing output is replaced only with ``overwrite=True``.

**Very large tomograms.**  With ``z_split``, a tomogram of more slices is cut along Z into
chunks (:func:`plan_z_chunks`) computed by different workers and stitched into the final
files.  A chunk task reads its slices plus the neighbouring slices a 2.5D network takes as
context (``context_slices`` on each side, more when the slice spacing is rescaled) from the
memory-mapped tomogram, normalises them with the whole tomogram's statistics, and writes its
slab to a temporary ``.npy`` part; the stitch task copies the parts into the final MRC files
(atomically) once all chunks are done.  Chunk boundaries fall on multiples of
``ApplySettings.z_chunk``, so the tiles are batched exactly as in the unsplit run and the
result is byte-identical to :func:`napari_tomoseg.applying.inference.iter_apply_file`
(the data; the MRC label holds the time of writing).  Finished parts survive a crash and
are reused.

**Failures.**  One job failing (a corrupt tomogram, a wrong network) fails alone: its reason
is reported and the other jobs go on.  A task whose worker dies is rescheduled by Dask up to
``allowed_failures`` times (local clusters; a remote scheduler uses its own setting), then
reported as failed.

**What Dask gives, and what this module keeps itself.**  Dask schedules the tasks, places
them by resources (``GPU=1``), reruns a task whose worker died and reports progress events.
It keeps nothing once the client is gone, so three things are ours: the manifest (a batch
killed by a wall-time limit, or rerun the next day, must skip what is done and prove the
outputs are the ones it wrote), the claim files (a rerun may replace its own half-written
outputs, never a user's file) and the local worker plan (one process per GPU with only that
GPU visible, or per core within the RAM; ``dask-cuda`` does the GPU half but needs CUDA
packages, and nothing in Dask plans the CPU half).

Dask (``distributed``) is an optional dependency: ``pip install "napari-tomoseg[cluster]"``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import queue
import shutil
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..data.io import (
    HeaderStats,
    atomic_path,
    atomic_paths,
    describe_removed,
    finish_header,
    new_mrc_mmap,
    output_header_texts,
    output_label,
    output_names,
    read_tomogram,
    remove_superseded_temporaries,
)
from ..data.probability import PROBABILITY_DTYPE
from ..data.voxels import VoxelSize
from ..errors import MissingVoxelSizeWarning, TemporariesRemovedWarning, TomosegError
from ..progress import Progress, StopCheck, drive, never_stop
from .inference import (
    ApplyOutputs,
    ApplySettings,
    iter_apply,
    iter_apply_file,
    network_planes,
    network_threshold,
    probability_paths,
    resolve_device,
)

#: Value of ``format`` in a batch manifest.
MANIFEST_FORMAT = "napari-tomoseg-batch"
MANIFEST_VERSION = 1
#: Manifest file name used when none is given (in the first job's output folder).
DEFAULT_MANIFEST_NAME = "tomoseg-batch.json"

_STATUSES = ("done", "skipped", "failed", "cancelled")
#: A network file's hash, class names, own mask threshold and slice planes
#: (``_network_facts``).
_NetworkFacts = tuple[str, tuple[str, ...], float, int]
_HASH_BLOCK = 8 * 1024 * 1024
_POLL_SECONDS = 0.1
_MAX_CACHED_NETWORKS = 8
_WORKER_CHECK_SECONDS = 2.0
#: RAM set aside per CPU worker when a local cluster is sized: applying the full U-Net to
#: 1024 x 1024 slices peaks at 2.6 GB per process (unet-lite 1.1 GB; measured by
#: benchmarks/cluster_scaling.py), and larger slices need more.
CPU_WORKER_MEMORY = 3 * 1024**3
_LOCAL_WORKER_TIMEOUT = 120.0


# -- settings and jobs ------------------------------------------------------------------------
@dataclass
class BatchSettings:
    """Where a batch runs and how it is cut up (shared by the CLI and scripts).

    ``scheduler``: address of a running Dask scheduler (``tcp://host:8786``) or the path of
    its scheduler file; ``None`` starts a local cluster for the batch.  Local cluster only:
    ``n_workers`` worker processes (``None``: one per GPU, else one per core, fewer when
    RAM is short, see :func:`local_worker_plan`),
    ``gpus`` (``"auto"``: every visible GPU, ``"none"``, or a list of GPU ids),
    ``memory_limit`` per worker (Dask syntax, ``"auto"`` shares the machine's memory),
    ``dashboard_address`` (e.g. ``":8787"``, needs bokeh; ``None``: no dashboard) and
    ``allowed_failures`` (times a task may lose its worker before it is reported failed).
    ``torch_threads``: CPU threads torch uses in each worker (``None``: the local plan's, or
    the worker's default on a remote cluster).  ``z_split``: tomograms with more slices are
    split into Z chunks of about this many slices (``None``: never split; binned and
    three-plane runs are never split: they need the whole tomogram).
    ``verify_hashes``: recompute the SHA-256 of recorded outputs before skipping a job.
    ``gpu_tasks``: every apply task asks for the Dask resource ``GPU=1`` (``True``), never
    (``False``), or when a worker advertises ``GPU`` as the batch starts (``None``; set
    ``True`` for an adaptive cluster that may have no worker yet).
    ``worker_timeout``: seconds the batch waits while the cluster has no worker at all
    before the unfinished jobs fail (``None``: 120 s for a local cluster started for the
    batch, forever on a running scheduler, whose workers may wait in a job queue).
    """

    scheduler: str | None = None
    n_workers: int | None = None
    torch_threads: int | None = None
    gpus: str | Sequence[int] = "auto"
    memory_limit: str | float | None = "auto"
    dashboard_address: str | None = None
    allowed_failures: int = 3
    z_split: int | None = None
    verify_hashes: bool = False
    gpu_tasks: bool | None = None
    worker_timeout: float | None = None

    def validate(self) -> None:
        """Raise :class:`TomosegError` for settings that cannot work."""
        for name in ("n_workers", "torch_threads", "z_split"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
            ):
                raise TomosegError(f"{name} must be a positive integer or None, got {value!r}.")
        if (
            isinstance(self.allowed_failures, bool)
            or not isinstance(self.allowed_failures, (int, np.integer))
            or self.allowed_failures < 0
        ):
            raise TomosegError(
                f"allowed_failures must be an integer >= 0, got {self.allowed_failures!r}."
            )
        if self.worker_timeout is not None and not (
            isinstance(self.worker_timeout, (int, float)) and self.worker_timeout > 0
        ):
            raise TomosegError(
                f"worker_timeout must be a positive number of seconds or None, "
                f"got {self.worker_timeout!r}."
            )
        _gpu_ids(self.gpus)


@dataclass(frozen=True)
class BatchJob:
    """One network applied to one tomogram: ``mask`` (uint8 class indices) and, unless
    ``probabilities`` is ``None``, the probability map(s) (see
    :func:`napari_tomoseg.applying.inference.probability_paths`)."""

    tomogram: Path
    network: Path
    mask: Path
    probabilities: Path | None = None

    def __post_init__(self) -> None:
        for name in ("tomogram", "network", "mask", "probabilities"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))

    @property
    def job_id(self) -> str:
        """Stable identifier from the absolute paths of tomogram, network and mask."""
        text = "\n".join(str(Path(p).absolute()) for p in (self.tomogram, self.network, self.mask))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """``tomogram x network`` for messages."""
        return f"{self.tomogram.name} x {self.network.name}"


def plan_batch(
    tomograms: Sequence[str | os.PathLike],
    networks: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    probabilities: bool = True,
) -> list[BatchJob]:
    """Every tomogram x every network, with output names as :func:`output_names` gives
    (``<tomogram stem>_<label>_mask.mrc`` and ``<tomogram stem>_<label>.mrc``).

    Parameters
    ----------
    tomograms
        The tomogram files.
    networks
        The network files (``.tsnet``).
    output_dir
        The folder all outputs are written to.
    labels
        One output label per network; None: the network file names without extension.
    probabilities
        Also write probability maps (else masks only).

    Returns
    -------
    list of BatchJob
        The jobs, network by network; two jobs writing one file are refused.
    """
    nets = [Path(n) for n in networks]
    if not nets or not tomograms:
        raise TomosegError("A batch needs at least one tomogram and one network.")
    names = list(labels) if labels is not None else [output_label(n) for n in nets]
    if len(names) != len(nets):
        raise TomosegError(f"{len(names)} labels were given for {len(nets)} networks.")
    out = Path(output_dir)
    jobs = []
    for net, label in zip(nets, names):
        for tomo in tomograms:
            mask, prob = output_names(out, Path(tomo), label)
            jobs.append(BatchJob(Path(tomo), net, mask, prob if probabilities else None))
    check_jobs(jobs)
    return jobs


def check_jobs(jobs: Sequence[BatchJob]) -> None:
    """Raise :class:`TomosegError` when two jobs would write the same file."""
    seen: dict[Path, str] = {}
    for job in jobs:
        targets = [job.mask] + ([job.probabilities] if job.probabilities else [])
        for path in targets:
            key = Path(path).absolute()
            if key in seen and seen[key] != job.job_id:
                raise TomosegError(
                    f"Two jobs would write {path}; give the tomograms or networks distinct "
                    "names (or distinct labels)."
                )
            seen[key] = job.job_id


def plan_z_chunks(n_slices: int, z_split: int | None, z_chunk: int) -> list[tuple[int, int]]:
    """Z ranges ``[(z0, z1), ...]`` for a tomogram of ``n_slices``.

    One range (the whole tomogram) unless ``n_slices > z_split``; otherwise chunks of
    ``z_split`` slices rounded up to a multiple of ``z_chunk``, so every chunk starts where
    the unsplit run starts a group of slices (and batches its tiles identically).
    """
    if n_slices < 1:
        raise TomosegError(f"A tomogram needs at least one slice, got {n_slices}.")
    if z_split is None or n_slices <= z_split:
        return [(0, n_slices)]
    size = -(-int(z_split) // int(z_chunk)) * int(z_chunk)
    return [(z0, min(n_slices, z0 + size)) for z0 in range(0, n_slices, size)]


# -- outcomes -----------------------------------------------------------------------------------
@dataclass
class JobOutcome:
    """What became of one job.

    ``status``: ``"done"`` (computed now), ``"skipped"`` (finished earlier, outputs verified),
    ``"failed"`` (``reason`` says why) or ``"cancelled"`` (the batch was stopped first).
    ``network_loaded``: the worker loaded the network for this job (``False``: reused from
    its cache).
    """

    job: BatchJob
    status: str
    reason: str = ""
    outputs: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    worker: str = ""
    chunks: int = 1
    network_loaded: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class BatchResult:
    """All outcomes (in the order of the jobs), the manifest and the wall time."""

    outcomes: list[JobOutcome]
    manifest: Path
    seconds: float
    n_workers: int
    stopped: bool = False

    def with_status(self, status: str) -> list[JobOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def done(self) -> list[JobOutcome]:
        return self.with_status("done")

    @property
    def skipped(self) -> list[JobOutcome]:
        return self.with_status("skipped")

    @property
    def failed(self) -> list[JobOutcome]:
        return self.with_status("failed")

    @property
    def cancelled(self) -> list[JobOutcome]:
        return self.with_status("cancelled")

    def summary(self) -> str:
        """A few lines: counts, then every failure with its reason."""
        lines = [
            f"{len(self.outcomes)} jobs on {self.n_workers} worker(s) in {self.seconds:.1f} s: "
            f"{len(self.done)} done, {len(self.skipped)} skipped (finished earlier), "
            f"{len(self.failed)} failed, {len(self.cancelled)} cancelled. "
            f"Manifest: {self.manifest}"
        ]
        for o in self.failed:
            lines.append(f"  FAILED {o.job.name}: {o.reason}")
        return "\n".join(lines)


# -- small file helpers -------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (replacing any earlier version)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TomosegError(
            f"Cannot read {path} ({exc}); delete it to let the batch start that record over."
        ) from None


def _describe_output(path: Path, with_hash: bool = True) -> dict[str, Any]:
    st = path.stat()
    out: dict[str, Any] = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if with_hash:
        out["sha256"] = file_sha256(path)
    return out


def _outputs_match(record: dict[str, Any], verify_hashes: bool) -> bool:
    """The recorded outputs exist unchanged (size, mtime; SHA-256 if asked)."""
    outputs = record.get("outputs") or []
    if not outputs:
        return False
    for item in outputs:
        path = Path(item["path"])
        try:
            st = path.stat()
        except OSError:
            return False
        if st.st_size != item.get("size") or st.st_mtime_ns != item.get("mtime_ns"):
            return False
        if verify_hashes and file_sha256(path) != item.get("sha256"):
            return False
    return True


def _targets(job: BatchJob, class_names: Sequence[str]) -> list[Path]:
    probs = probability_paths(job.probabilities, class_names[1:]) if job.probabilities else []
    return [job.mask, *probs]


# -- the manifest -------------------------------------------------------------------------------
@dataclass
class _State:
    """Paths of a batch's manifest and its working folder (records, claims, chunk parts)."""

    manifest: Path

    @property
    def folder(self) -> Path:
        return self.manifest.with_name(f".{self.manifest.stem}-work")

    @property
    def records(self) -> Path:
        return self.folder / "records"

    @property
    def claims(self) -> Path:
        return self.folder / "claims"

    @property
    def parts(self) -> Path:
        return self.folder / "parts"


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The batch manifest at ``path`` (an empty one when the file does not exist).

    ``jobs`` maps job ids to finished jobs (tomogram, network, fingerprint, outputs with
    size / mtime / SHA-256, finish time, seconds, worker); ``failed`` maps job ids to the
    reason of the last failure.
    """
    path = Path(path)
    if not path.exists():
        return {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "jobs": {},
            "failed": {},
        }
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise TomosegError(
            f"{path} is not a napari-tomoseg batch manifest; choose another manifest path."
        )
    if data.get("format_version") != MANIFEST_VERSION:
        raise TomosegError(
            f"{path} is a batch manifest of version {data.get('format_version')!r}; this "
            f"napari-tomoseg reads version {MANIFEST_VERSION}. Use another manifest path."
        )
    data.setdefault("jobs", {})
    data.setdefault("failed", {})
    return data


def _save_manifest(path: Path, data: dict[str, Any]) -> None:
    data["updated"] = _now()
    _write_json(path, data)


def _fold_records(state: _State, manifest: dict[str, Any]) -> None:
    """Move records that workers wrote (possibly after a crash of the driver) into the
    manifest, then delete them."""
    if not state.records.is_dir():
        return
    folded = []
    for path in sorted(state.records.glob("*.json")):
        try:
            record = _read_json(path)
        except TomosegError:
            continue
        if isinstance(record, dict) and "job_id" in record:
            manifest["jobs"][record["job_id"]] = record
            manifest["failed"].pop(record["job_id"], None)
            folded.append(path)
    if folded:
        _save_manifest(state.manifest, manifest)
        for path in folded:
            with contextlib.suppress(OSError):
                path.unlink()


# -- worker side --------------------------------------------------------------------------------
_NETWORKS: dict[tuple[str, str], Any] = {}
_NETWORK_LOCK = threading.Lock()
_TORCH_THREADS: list[int] = []


def worker_network(path: str | os.PathLike, sha256: str, device: str) -> tuple[Any, bool]:
    """The network at ``path`` on ``device``, loaded once per process and then reused.

    The cache key is the file's SHA-256 (as the driver measured it) and the device, so an
    edited file is never served from the cache; the file is hashed on loading and refused if
    it no longer matches.  Returns ``(network, loaded_now)``.
    """
    from ..learning.model_file import load_network

    key = (sha256, str(device))
    with _NETWORK_LOCK:
        net = _NETWORKS.get(key)
        if net is not None:
            return net, False
        actual = file_sha256(path)
        if actual != sha256:
            raise TomosegError(
                f"The network file {path} changed while the batch was running; run the "
                "batch again."
            )
        net = load_network(path, device=device)
        if len(_NETWORKS) >= _MAX_CACHED_NETWORKS:
            _NETWORKS.pop(next(iter(_NETWORKS)))
        _NETWORKS[key] = net
        return net, True


def _setup_worker(torch_threads: int | None) -> None:
    """Set torch's thread count once per process (when asked)."""
    if torch_threads and [torch_threads] != _TORCH_THREADS:
        import torch

        torch.set_num_threads(int(torch_threads))
        _TORCH_THREADS[:] = [torch_threads]


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class _TaskSpec:
    """Everything a worker needs for one job (sent with each task)."""

    job: BatchJob
    job_id: str
    fingerprint: dict[str, Any]
    network_sha256: str
    class_names: tuple[str, ...]
    threshold: float  # where the mask is cut (recorded in the probability maps' headers)
    shape: tuple[int, int, int]
    settings: ApplySettings
    overwrite: bool
    ours: bool
    manifest: Path
    torch_threads: int | None
    topic: str | None

    @property
    def state(self) -> _State:
        return _State(self.manifest)

    @property
    def part_dir(self) -> Path:
        token = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode())
        return self.state.parts / f"{self.job_id}-{token.hexdigest()[:12]}"

    def device(self) -> str:
        return str(resolve_device(self.settings.device))


def _report(topic: str | None, job_id: str, z0: int, done: int, total: int) -> None:
    """Send a progress event to the driver (no-op outside a Dask worker)."""
    if topic is None:
        return
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return
    worker.log_event(topic, {"job": job_id, "z0": int(z0), "done": int(done), "total": total})


def _finished_record(spec: _TaskSpec) -> dict[str, Any] | None:
    """A record of this very job (same fingerprint) whose outputs are intact, if any."""
    path = spec.state.records / f"{spec.job_id}.json"
    if not path.exists():
        return None
    try:
        record = _read_json(path)
    except TomosegError:
        return None
    if record.get("fingerprint") == spec.fingerprint and _outputs_match(record, False):
        return record
    return None


def _claimed(state: _State, job_id: str, fingerprint: dict[str, Any]) -> bool:
    """An earlier attempt of this very job (same fingerprint) claimed it."""
    path = state.claims / f"{job_id}.json"
    if not path.exists():
        return False
    try:
        return _read_json(path).get("fingerprint") == fingerprint
    except TomosegError:
        return False


def _claim(spec: _TaskSpec) -> bool:
    """Write this job's claim; returns whether an earlier attempt of the same job had
    claimed it (so outputs it left may be replaced)."""
    earlier = _claimed(spec.state, spec.job_id, spec.fingerprint)
    _write_json(
        spec.state.claims / f"{spec.job_id}.json",
        {
            "job_id": spec.job_id,
            "fingerprint": spec.fingerprint,
            "worker": _worker_name(),
            "started": _now(),
        },
    )
    return earlier


def _finish(spec: _TaskSpec, outputs: list[Path], started: float, **extra: Any) -> dict:
    """Describe the outputs, write the job's record atomically, drop its claim."""
    record = {
        "job_id": spec.job_id,
        "tomogram": str(spec.job.tomogram),
        "network": str(spec.job.network),
        "fingerprint": spec.fingerprint,
        "outputs": [_describe_output(p) for p in outputs],
        "finished": _now(),
        "seconds": time.perf_counter() - started,
        "worker": _worker_name(),
        "host": socket.gethostname(),
        "device": spec.device(),
        "torch_threads": _torch_threads(),
        **extra,
    }
    _write_json(spec.state.records / f"{spec.job_id}.json", record)
    with contextlib.suppress(OSError):
        (spec.state.claims / f"{spec.job_id}.json").unlink()
    return record


def _check_tomogram(spec: _TaskSpec) -> None:
    st = spec.job.tomogram.stat()
    fp = spec.fingerprint
    if st.st_size != fp["tomogram_size"] or st.st_mtime_ns != fp["tomogram_mtime_ns"]:
        raise TomosegError(
            f"{spec.job.tomogram} changed while the batch was running; run the batch again."
        )


def _notes_from(caught: list[warnings.WarningMessage], notes: Sequence[str]) -> list[str]:
    """The run's notes and the warnings it issued, each once."""
    return list(dict.fromkeys([*notes, *(str(w.message) for w in caught)]))


def _run_whole_task(spec: _TaskSpec) -> dict[str, Any]:
    """Worker task: apply the network to the whole tomogram with ``iter_apply_file``."""
    started = time.perf_counter()
    _setup_worker(spec.torch_threads)
    done = _finished_record(spec)
    if done is not None:
        return {**done, "reused": True}
    _check_tomogram(spec)
    may_replace = spec.overwrite or spec.ours or _claim(spec)
    network, loaded = worker_network(spec.job.network, spec.network_sha256, spec.device())
    total = spec.shape[0]

    def progress(event: Progress) -> None:
        if event.stage == "apply":
            _report(spec.topic, spec.job_id, 0, event.step, total)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = drive(
            iter_apply_file(
                network,
                spec.job.tomogram,
                spec.job.mask,
                spec.job.probabilities,
                settings=spec.settings,
                overwrite=may_replace,
            ),
            progress,
        )
    outputs = [p for p in [result.mask_path, *result.probability_paths] if p is not None]
    return _finish(
        spec,
        outputs,
        started,
        chunks=1,
        network_loaded=loaded,
        notes=_notes_from(caught, result.notes),
    )


def _iter_apply_slab(
    network: Any,
    volume: np.ndarray,
    voxel_size: VoxelSize | None,
    settings: ApplySettings,
    z0: int,
    z1: int,
    mask: np.ndarray,
    probabilities: list[np.ndarray],
) -> Generator[Progress, None, list[str]]:
    """Slices ``z0:z1`` of what ``inference.iter_apply`` computes for the whole ``volume``,
    into slab-sized ``mask`` / ``probabilities``; returns the run's notes."""
    result = yield from iter_apply(
        network,
        volume,
        voxel_size=voxel_size,
        settings=settings,
        out=ApplyOutputs(mask=mask, probabilities=list(probabilities) or None),
        keep_probabilities=bool(probabilities),
        z_range=(z0, z1),
    )
    return result.notes


def _part_paths(spec: _TaskSpec, z0: int) -> list[Path]:
    n = 1 + (len(spec.class_names) - 1 if spec.job.probabilities else 0)
    return [spec.part_dir / f"out{k}-z{z0:06d}.npy" for k in range(n)]


def _part_dtype(k: int) -> np.dtype:
    """Output ``k`` of a job: the mask (uint8 class indices), then the probability maps."""
    return PROBABILITY_DTYPE if k else np.dtype(np.uint8)


def _part_ok(path: Path, shape: tuple[int, ...], k: int) -> bool:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return tuple(arr.shape) == shape and arr.dtype == _part_dtype(k)


def _run_chunk_task(spec: _TaskSpec, z0: int, z1: int) -> dict[str, Any]:
    """Worker task: compute slices ``z0:z1`` into ``.npy`` parts (reused when present)."""
    started = time.perf_counter()
    _setup_worker(spec.torch_threads)
    paths = _part_paths(spec, z0)
    slab = (z1 - z0, spec.shape[1], spec.shape[2])
    info = {"z0": z0, "z1": z1, "worker": _worker_name()}
    if all(_part_ok(p, slab, k) for k, p in enumerate(paths)):
        _report(spec.topic, spec.job_id, z0, z1 - z0, spec.shape[0])
        return {**info, "reused": True, "network_loaded": False, "notes": [], "seconds": 0.0}
    _check_tomogram(spec)
    network, loaded = worker_network(spec.job.network, spec.network_sha256, spec.device())
    spec.part_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught, contextlib.ExitStack() as stack:
        warnings.simplefilter("always")
        tomo = read_tomogram(spec.job.tomogram)
        if tuple(tomo.data.shape) != spec.shape:
            raise TomosegError(f"{spec.job.tomogram} changed shape while the batch was running.")
        tmps = stack.enter_context(atomic_paths(paths, overwrite=True))
        arrays = [
            np.lib.format.open_memmap(t, mode="w+", dtype=_part_dtype(k), shape=slab)
            for k, t in enumerate(tmps)
        ]
        gen = _iter_apply_slab(
            network, tomo.data, tomo.voxel_size, spec.settings, z0, z1, arrays[0], arrays[1:]
        )
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                notes = stop.value
                break
            _report(spec.topic, spec.job_id, z0, event.step, spec.shape[0])
        for a in arrays:
            a.flush()
        del arrays
    return {
        **info,
        "reused": False,
        "network_loaded": loaded,
        "notes": _notes_from(caught, notes),
        "seconds": time.perf_counter() - started,
    }


def _write_stitched(
    spec: _TaskSpec,
    chunks: list[dict[str, Any]],
    targets: list[Path],
    may_replace: bool,
    tomo: Any,
) -> None:
    """Copy the chunk parts into the final MRC files as ``iter_apply_file`` writes them:
    all outputs renamed together at the end, header statistics added plane by plane."""
    with atomic_paths(targets, overwrite=may_replace) as tmps:
        for k, tmp in enumerate(tmps):
            with new_mrc_mmap(tmp, spec.shape, _part_dtype(k)) as (mrc, data):
                stats = HeaderStats()
                for c in chunks:
                    part = np.load(_part_paths(spec, c["z0"])[k], mmap_mode="r")
                    for i in range(part.shape[0]):
                        plane = np.asarray(part[i])
                        data[c["z0"] + i] = plane
                        stats.add(plane)
                texts = output_header_texts(
                    spec.job.tomogram, probability=k > 0, threshold=spec.threshold
                )
                finish_header(mrc, tomo.voxel_size, tomo.origin, stats, texts)
                mrc.flush()


def _run_stitch_task(spec: _TaskSpec, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Worker task: copy the chunk parts into the final MRC files (atomically), record."""
    started = time.perf_counter()
    done = _finished_record(spec)
    if done is not None:
        return {**done, "reused": True}
    _check_tomogram(spec)
    may_replace = spec.overwrite or spec.ours or _claim(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingVoxelSizeWarning)
        tomo = read_tomogram(spec.job.tomogram)
    targets = _targets(spec.job, spec.class_names)
    chunks = sorted(chunks, key=lambda c: c["z0"])
    expected = 0
    for c in chunks:
        if c["z0"] != expected:
            raise TomosegError(f"Chunk starting at slice {expected} is missing; rerun the batch.")
        expected = c["z1"]
    if expected != spec.shape[0]:
        raise TomosegError(f"The chunks end at slice {expected} of {spec.shape[0]}; rerun.")
    with warnings.catch_warnings(record=True) as caught:  # leftovers removed: notes
        warnings.simplefilter("always", TemporariesRemovedWarning)
        _write_stitched(spec, chunks, targets, may_replace, tomo)
    notes = _notes_from(caught, [])
    for c in chunks:
        notes.extend(n for n in c.get("notes", []) if n not in notes)
    compute = sum(float(c.get("seconds", 0.0)) for c in chunks)
    record = _finish(
        spec,
        targets,
        started - compute,
        chunks=len(chunks),
        network_loaded=any(c.get("network_loaded") for c in chunks),
        chunk_workers=sorted({str(c.get("worker", "")) for c in chunks}),
        notes=notes,
    )
    shutil.rmtree(spec.part_dir, ignore_errors=True)
    return record


# -- local clusters -----------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerPlan:
    """One worker process of a local cluster: its name, GPU (or ``None``), torch threads and
    the environment it starts with."""

    name: str
    gpu: int | None
    torch_threads: int
    env: dict[str, str]


def _gpu_ids(gpus: str | Sequence[int]) -> list[int] | None:
    """``None`` for "auto", else the explicit list (empty for "none")."""
    if isinstance(gpus, str):
        if gpus == "auto":
            return None
        if gpus == "none":
            return []
        try:
            return [int(g) for g in gpus.split(",") if g.strip()]
        except ValueError:
            raise TomosegError(
                f"gpus must be 'auto', 'none' or GPU ids like '0,1'; got {gpus!r}."
            ) from None
    ids = list(gpus)
    if any(isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 0 for g in ids):
        raise TomosegError(f"GPU ids must be non-negative integers, got {ids!r}.")
    return [int(g) for g in ids]


def visible_gpus() -> list[int]:
    """Ids of the CUDA GPUs this process may use (``CUDA_VISIBLE_DEVICES`` respected)."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        ids = []
        for item in listed.split(",")[:count]:
            with contextlib.suppress(ValueError):
                ids.append(int(item))
        if len(ids) == count:
            return ids
    return list(range(count))


def local_worker_plan(
    settings: BatchSettings | None = None,
    *,
    cores: int | None = None,
    gpus: Sequence[int] | None = None,
    memory: int | None = None,
) -> list[WorkerPlan]:
    """The worker processes a local cluster gets on this machine.

    With GPUs (``settings.gpus``, or all visible ones for ``"auto"``): one worker per GPU
    (``n_workers`` may ask for more; they then share the GPUs in turn), each seeing only its
    GPU, with the cores shared out as torch threads.  Without a GPU: one single-threaded
    worker per core, but at most one per :data:`CPU_WORKER_MEMORY` bytes of ``memory``
    (the machine's RAM), the cores then shared out as torch threads.  Separate processes
    scale better than torch threads in one process (``docs/cluster.md``, measured by
    ``benchmarks/cluster_scaling.py``).  ``n_workers`` / ``torch_threads`` override.  One
    task at a time per worker.
    """
    settings = settings or BatchSettings()
    settings.validate()
    cores = int(cores or os.cpu_count() or 1)
    ids = _gpu_ids(settings.gpus)
    if ids is None:
        ids = list(gpus) if gpus is not None else visible_gpus()
    if memory is None:
        import psutil

        memory = int(psutil.virtual_memory().total)
    by_memory = max(1, int(memory) // CPU_WORKER_MEMORY)
    n = settings.n_workers or (len(ids) if ids else min(cores, by_memory))
    threads = settings.torch_threads or max(1, cores // n)
    plans = []
    for i in range(n):
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        gpu = ids[i % len(ids)] if ids else None
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        name = f"tomoseg-{i}" if gpu is None else f"tomoseg-{i}-gpu{gpu}"
        plans.append(WorkerPlan(name=name, gpu=gpu, torch_threads=threads, env=env))
    return plans


def _require_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise TomosegError(
            "Cluster runs need Dask distributed; install it with "
            "pip install 'napari-tomoseg[cluster]' (or pip install 'dask[distributed]')."
        ) from None
    return distributed


def start_local_cluster(settings: BatchSettings | None = None) -> Any:
    """Start a local Dask cluster as :func:`local_worker_plan` lays out (a ``SpecCluster``;
    close it when done).  Workers are separate processes started by nannies, so a worker
    that dies (killed, out of memory) is restarted."""
    distributed = _require_distributed()
    import dask

    settings = settings or BatchSettings()
    plans = local_worker_plan(settings)
    workers = {
        p.name: {
            "cls": distributed.Nanny,
            "options": {
                "nthreads": 1,
                "env": p.env,
                "memory_limit": settings.memory_limit,
                "resources": {"GPU": 1} if p.gpu is not None else None,
                "silence_logs": 40,
            },
        }
        for p in plans
    }
    scheduler = {
        "cls": distributed.Scheduler,
        "options": {
            "dashboard_address": settings.dashboard_address or ":0",
            "dashboard": bool(settings.dashboard_address),
        },
    }
    config = {
        "distributed.scheduler.allowed-failures": int(settings.allowed_failures),
        "distributed.scheduler.worker-saturation": 1.0,
    }
    with dask.config.set(config):
        return distributed.SpecCluster(
            workers=workers, scheduler=scheduler, silence_logs=40, name="tomoseg"
        )


@contextlib.contextmanager
def open_client(settings: BatchSettings, client: Any = None) -> Iterator[tuple[Any, int | None]]:
    """A Dask client for the batch and the torch threads to ask workers for (``None``:
    leave the workers' own setting).

    ``client`` is used as is; else ``settings.scheduler`` (an address, or a scheduler file
    when it names an existing file) is connected to; else a local cluster is started and
    closed again at the end.
    """
    distributed = _require_distributed()
    if client is not None:
        yield client, settings.torch_threads
        return
    if settings.scheduler:
        target = settings.scheduler
        try:
            if Path(target).is_file():
                c = distributed.Client(scheduler_file=target, timeout="60s")
            else:
                c = distributed.Client(target, timeout="60s")
        except OSError as exc:
            raise TomosegError(
                f"Cannot reach the Dask scheduler {target!r} ({exc}); check the address "
                "(tcp://host:port) and that the scheduler is running."
            ) from None
        try:
            yield c, settings.torch_threads
        finally:
            c.close()
        return
    plans = local_worker_plan(settings)
    cluster = start_local_cluster(settings)
    try:
        c = distributed.Client(cluster)
        try:
            yield c, plans[0].torch_threads
        finally:
            c.close()
    finally:
        cluster.close()


# -- the driver ---------------------------------------------------------------------------------
@dataclass
class _Pending:
    spec: _TaskSpec
    index: int
    future: Any
    chunk_futures: list[Any]
    chunks: list[tuple[int, int]]
    job: BatchJob  # as the caller gave it (the spec holds absolute paths for the workers)


def _absolute(job: BatchJob) -> BatchJob:
    """The job with absolute paths (workers may run in other folders)."""
    prob = job.probabilities.absolute() if job.probabilities else None
    return BatchJob(job.tomogram.absolute(), job.network.absolute(), job.mask.absolute(), prob)


def _tidy(state: _State) -> None:
    """Remove the batch's working folders when nothing is left in them."""
    for folder in (state.records, state.claims, state.parts, state.folder):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _fingerprint(
    job: BatchJob, net_sha: str, settings: ApplySettings, class_names: Sequence[str]
) -> dict[str, Any]:
    st = job.tomogram.stat()
    return {
        "tomogram": str(job.tomogram.absolute()),
        "tomogram_size": st.st_size,
        "tomogram_mtime_ns": st.st_mtime_ns,
        "network": str(job.network.absolute()),
        "network_sha256": net_sha,
        "settings": json.loads(json.dumps(asdict(settings))),
        "outputs": [str(p.absolute()) for p in _targets(job, class_names)],
    }


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TomosegError):
        return str(exc)
    if type(exc).__name__ == "KilledWorker":
        return (
            "the worker running it died while running it (killed, out of memory or crashed) "
            f"too often ({exc}); run the batch again to retry"
        )
    return f"{type(exc).__name__}: {exc}"


def _safe_key(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:40]


def _network_facts(path: Path, planes: int | None) -> _NetworkFacts | str:
    """A network file's hash, class names, own threshold and the slice planes it is applied
    in (``planes``, None: its own), or why it cannot be read."""
    from ..learning.model_file import read_network_meta

    try:
        meta = read_network_meta(path)
        planes = network_planes(meta) if planes is None else planes
        return file_sha256(path), tuple(meta.class_names), network_threshold(meta, planes), planes
    except TomosegError as exc:
        return str(exc)
    except OSError as exc:
        return f"Cannot read the network {path}: {exc}."


def _plan_job(
    job: BatchJob,
    facts: _NetworkFacts | str,
    settings: ApplySettings,
    batch: BatchSettings,
    manifest_data: dict[str, Any],
    state: _State,
    manifest_path: Path,
    overwrite: bool,
) -> JobOutcome | tuple[_TaskSpec, list[tuple[int, int]]]:
    """What to do with one job: its outcome when it fails or is already done (the
    manifest says so), else the task to run and its Z chunks."""
    if isinstance(facts, str):
        return JobOutcome(job, "failed", reason=facts)
    net_sha, class_names, own_threshold, planes = facts
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MissingVoxelSizeWarning)
            tomo = read_tomogram(job.tomogram)
        if tomo.data.ndim != 3:
            raise TomosegError(
                f"{job.tomogram} holds a 2D image; networks are applied to 3D tomograms."
            )
        shape = tuple(int(s) for s in tomo.data.shape)
        del tomo
        targets = _targets(job, class_names)
        fingerprint = _fingerprint(job, net_sha, settings, class_names)
        for folder in {t.parent for t in targets}:
            folder.mkdir(parents=True, exist_ok=True)
    except TomosegError as exc:
        return JobOutcome(job, "failed", reason=str(exc))
    except OSError as exc:
        return JobOutcome(job, "failed", reason=f"{exc.__class__.__name__}: {exc}")
    job_id = job.job_id
    entry = manifest_data["jobs"].get(job_id)
    same = entry is not None and entry.get("fingerprint") == fingerprint
    if same and _outputs_match(entry, batch.verify_hashes):
        manifest_data["failed"].pop(job_id, None)
        return JobOutcome(
            job,
            "skipped",
            outputs=[Path(o["path"]) for o in entry["outputs"]],
            seconds=float(entry.get("seconds", 0.0)),
            worker=str(entry.get("worker", "")),
            chunks=int(entry.get("chunks", 1)),
            notes=list(entry.get("notes", [])),
        )
    existing = [p for p in targets if p.exists()]
    ours = same or _claimed(state, job_id, fingerprint)
    if existing and not (overwrite or ours):
        return JobOutcome(
            job,
            "failed",
            reason=f"{existing[0]} already exists (not written by this batch); "
            "choose another output folder or allow overwriting.",
        )
    spec = _TaskSpec(
        job=_absolute(job),
        job_id=job_id,
        fingerprint=fingerprint,
        network_sha256=net_sha,
        class_names=class_names,
        threshold=own_threshold if settings.threshold is None else settings.threshold,
        shape=shape,  # type: ignore[arg-type]
        settings=settings,
        overwrite=overwrite,
        ours=ours,
        manifest=manifest_path,
        torch_threads=batch.torch_threads,
        topic=None,
    )
    # a binned or three-plane run needs the whole tomogram at once
    z_split = batch.z_split if settings.shrink == 1 and planes == 1 else None
    chunks = plan_z_chunks(shape[0], z_split, settings.z_chunk)
    return spec, chunks


def _workers_and_resources(dask_client: Any, batch: BatchSettings) -> tuple[int, Any]:
    """How many workers the cluster has, and the Dask resources each task asks for (a GPU
    where the workers offer GPUs, or where ``batch.gpu_tasks`` says so)."""
    info = dask_client.scheduler_info()
    n_workers = len(info.get("workers", {}))
    gpu_workers = any(
        (w.get("resources") or {}).get("GPU") for w in info.get("workers", {}).values()
    )
    use_gpu = gpu_workers if batch.gpu_tasks is None else batch.gpu_tasks
    if use_gpu and n_workers and not gpu_workers:
        warnings.warn(
            "The tasks ask for a GPU but no worker of the cluster offers one (Dask "
            "resource GPU); they wait until such a worker joins.",
            UserWarning,
            stacklevel=4,
        )
    return n_workers, {"GPU": 1} if use_gpu else None


def _submit(
    dask_client: Any,
    todo: list[tuple[int, _TaskSpec, list[tuple[int, int]]]],
    jobs: list[BatchJob],
    topic: str,
    threads: int | None,
    token: str,
    resources: dict[str, int] | None,
    pending: list[_Pending],
) -> None:
    """Send every task to the cluster, first jobs first: a job in one piece, or its Z
    chunks and the stitch that waits for them.  Each job joins ``pending`` as it is sent
    (so that a failure half-way leaves the sent ones there to cancel)."""
    for rank, (i, spec, chunks) in enumerate(todo):
        spec = replace(spec, topic=topic, torch_threads=threads)
        stem = _safe_key(spec.job.tomogram.stem + "-" + spec.job.network.stem)
        priority = len(todo) - rank
        chunk_futures = []
        if len(chunks) == 1:
            future = dask_client.submit(
                _run_whole_task,
                spec,
                key=f"tomoseg-apply-{stem}-{spec.job_id[:8]}-{token}",
                pure=False,
                resources=resources,
                priority=priority,
            )
        else:
            for z0, z1 in chunks:
                chunk_futures.append(
                    dask_client.submit(
                        _run_chunk_task,
                        spec,
                        z0,
                        z1,
                        key=f"tomoseg-chunk-{stem}-z{z0}-{spec.job_id[:8]}-{token}",
                        pure=False,
                        resources=resources,
                        priority=priority,
                    )
                )
            future = dask_client.submit(
                _run_stitch_task,
                spec,
                chunk_futures,
                key=f"tomoseg-stitch-{stem}-{spec.job_id[:8]}-{token}",
                pure=False,
                priority=priority + len(todo),
            )
        pending.append(_Pending(spec, i, future, chunk_futures, chunks, jobs[i]))


@dataclass
class _BatchRun:
    """One run of a batch as it goes: each job's outcome, the manifest (saved as jobs end),
    the tasks still pending on the cluster and the slice counts progress is given in."""

    manifest_path: Path
    state: _State
    manifest: dict[str, Any]
    outcomes: list[JobOutcome | None]
    todo: list[tuple[int, _TaskSpec, list[tuple[int, int]]]] = field(default_factory=list)
    slices_of: dict[str, int] = field(default_factory=dict)
    progress_of: dict[str, dict[int, int]] = field(default_factory=dict)
    pending: list[_Pending] = field(default_factory=list)
    total_slices: int = 0
    finished_slices: int = 0
    last_message: str = ""

    def counts(self) -> dict[str, float]:
        out = {s: 0.0 for s in _STATUSES}
        for o in self.outcomes:
            if o is not None:
                out[o.status] += 1
        return out

    def progress(self, done: int, message: str, payload: Any = None) -> Progress:
        return Progress(
            "batch",
            done,
            self.total_slices,
            message=message,
            metrics=self.counts(),
            payload=payload,
        )

    def record(
        self, outcome: JobOutcome, record: dict[str, Any] | None, save: bool = True
    ) -> None:
        """Put a job's end into the manifest (and save it, then drop the worker's record)."""
        job_id = outcome.job.job_id
        if record is not None:
            self.manifest["jobs"][job_id] = {k: v for k, v in record.items() if k != "reused"}
            self.manifest["failed"].pop(job_id, None)
        elif outcome.status == "failed":
            self.manifest["failed"][job_id] = {
                "tomogram": str(outcome.job.tomogram),
                "network": str(outcome.job.network),
                "reason": outcome.reason,
                "time": _now(),
            }
        if not save:
            return
        _save_manifest(self.manifest_path, self.manifest)
        if record is not None:
            with contextlib.suppress(OSError):
                (self.state.records / f"{job_id}.json").unlink()

    def end_pending(self, client: Any, status: str, reason: str, record: bool) -> None:
        """Cancel every pending task; its job ends with ``status`` for ``reason``."""
        for p in self.pending:
            client.cancel([p.future, *p.chunk_futures])
            self.outcomes[p.index] = JobOutcome(p.job, status, reason=reason)
            if record:
                self.record(self.outcomes[p.index], None)
        self.pending = []

    def read_events(self, events: queue.Queue[Any]) -> bool:
        """Take the workers' slice counts from ``events``; True when a message changed."""
        changed = False
        while True:
            try:
                _, msg = events.get_nowait()
            except queue.Empty:
                return changed
            if not (isinstance(msg, dict) and msg.get("job") in self.slices_of):
                continue
            job_id = msg["job"]
            self.progress_of.setdefault(job_id, {})[int(msg["z0"])] = int(msg["done"])
            done_now = sum(self.progress_of[job_id].values())
            name = next((p.job.name for p in self.pending if p.spec.job_id == job_id), "")
            if name:
                self.last_message = f"{name}: {done_now}/{self.slices_of[job_id]} slices"
                changed = True

    def collect_ended(self) -> list[JobOutcome]:
        """The outcomes of the pending jobs that have ended (recorded, and no longer
        pending)."""
        still: list[_Pending] = []
        ended: list[JobOutcome] = []
        for p in self.pending:
            if not p.future.done():
                still.append(p)
                continue
            outcome, record = _collect(p)
            self.outcomes[p.index] = outcome
            self.record(outcome, record)
            self.finished_slices += self.slices_of[p.spec.job_id]
            ended.append(outcome)
        self.pending = still
        return ended

    def slices_done(self) -> int:
        """Slices of the ended jobs plus those the pending ones reported."""
        return self.finished_slices + sum(
            min(
                self.slices_of[p.spec.job_id],
                sum(self.progress_of.get(p.spec.job_id, {}).values()),
            )
            for p in self.pending
        )

    def result(self, start: float, n_workers: int, stopped: bool = False) -> BatchResult:
        return BatchResult(
            outcomes=[o for o in self.outcomes if o is not None],
            manifest=self.manifest_path,
            seconds=time.perf_counter() - start,
            n_workers=n_workers,
            stopped=stopped,
        )


def _plan_run(
    jobs: list[BatchJob],
    settings: ApplySettings,
    batch: BatchSettings,
    manifest: str | os.PathLike | None,
    overwrite: bool,
) -> _BatchRun:
    """Read the manifest and plan every job: ended (failed, or already done) or to do."""
    manifest_path = Path(manifest) if manifest else jobs[0].mask.parent / DEFAULT_MANIFEST_NAME
    state = _State(manifest_path)
    manifest_data = read_manifest(manifest_path)
    _fold_records(state, manifest_data)
    run = _BatchRun(manifest_path, state, manifest_data, [None] * len(jobs))
    networks: dict[Path, _NetworkFacts | str] = {}
    for i, job in enumerate(jobs):
        if job.network not in networks:
            networks[job.network] = _network_facts(job.network, settings.planes)
        planned = _plan_job(
            job,
            networks[job.network],
            settings,
            batch,
            manifest_data,
            state,
            manifest_path,
            overwrite,
        )
        if isinstance(planned, JobOutcome):
            run.outcomes[i] = planned
            if planned.status == "failed":
                run.record(planned, None, save=False)
            continue
        spec, chunks = planned
        run.todo.append((i, spec, chunks))
        run.total_slices += spec.shape[0]
        run.slices_of[spec.job_id] = spec.shape[0]
    _save_manifest(manifest_path, manifest_data)
    return run


def _no_workers_for(client: Any, since: float | None) -> float | None:
    """When the cluster has had no worker since (monotonic time), else None."""
    if client.scheduler_info().get("workers"):
        return None
    return since or time.monotonic()


def _watch(
    run: _BatchRun,
    client: Any,
    events: queue.Queue[Any],
    worker_timeout: float | None,
    should_stop: StopCheck,
) -> Generator[Progress, None, bool]:
    """Follow the pending tasks until all have ended, yielding progress; returns whether
    the batch was stopped.  Jobs fail when the cluster has had no worker for
    ``worker_timeout`` seconds."""
    no_workers_since: float | None = None
    next_check = time.monotonic() + _WORKER_CHECK_SECONDS
    while run.pending:
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + _WORKER_CHECK_SECONDS
            no_workers_since = _no_workers_for(client, no_workers_since)
            if no_workers_since is not None:
                waited = time.monotonic() - no_workers_since
                if worker_timeout is not None and waited > worker_timeout:
                    reason = (
                        f"the cluster had no worker for {waited:.0f} s (they died or "
                        "never started; see the worker logs)"
                    )
                    run.end_pending(client, "failed", reason, record=True)
                    break
                yield run.progress(run.finished_slices, f"waiting for workers ({waited:.0f} s)")
        if should_stop():
            run.end_pending(client, "cancelled", "the batch was stopped", record=False)
            return True
        changed = run.read_events(events)
        ended = run.collect_ended()
        done = run.slices_done()
        for outcome in ended:
            word = {"done": "done", "failed": "FAILED"}.get(outcome.status, outcome.status)
            yield run.progress(done, f"{word}: {outcome.job.name}", payload=outcome)
        if changed and not ended:
            yield run.progress(done, run.last_message)
        if run.pending and not ended:
            time.sleep(_POLL_SECONDS)
    return False


def iter_run_batch(
    jobs: Sequence[BatchJob],
    settings: ApplySettings | None = None,
    batch: BatchSettings | None = None,
    *,
    client: Any = None,
    manifest: str | os.PathLike | None = None,
    overwrite: bool = False,
    should_stop: StopCheck = never_stop,
) -> Generator[Progress, None, BatchResult]:
    """Run ``jobs`` on a Dask cluster; yields progress, returns a :class:`BatchResult`.

    Parameters
    ----------
    jobs
        The tomogram x network jobs (:func:`plan_batch`).
    settings
        How each network is applied (as for ``iter_apply_file``).
    batch
        Where and how (:class:`BatchSettings`).
    client
        An existing ``distributed.Client`` to use (else one is made from ``batch``).
    manifest
        The batch manifest (default ``tomoseg-batch.json`` in the first job's output
        folder).
    overwrite
        Replace outputs that the batch did not write itself.
    should_stop
        When it becomes true, unfinished tasks are cancelled and the result is returned
        with ``stopped=True`` (finished jobs stay recorded).

    Progress events (stage ``"batch"``) count slices over the whole batch; ``metrics``
    hold the numbers of jobs done / skipped / failed, ``message`` the latest news, and
    ``payload`` the :class:`JobOutcome` of a job that has just ended.
    """
    start = time.perf_counter()
    settings = settings or ApplySettings()
    settings.validate()
    batch = batch or BatchSettings()
    batch.validate()
    jobs = list(jobs)
    if not jobs:
        raise TomosegError("The batch has no jobs.")
    check_jobs(jobs)
    run = _plan_run(jobs, settings, batch, manifest, overwrite)
    if not run.todo:
        yield run.progress(0, "nothing to do")
        return run.result(start, 0)
    own_cluster = client is None and not batch.scheduler
    worker_timeout = batch.worker_timeout or (_LOCAL_WORKER_TIMEOUT if own_cluster else None)
    with open_client(batch, client) as (dask_client, threads):
        n_workers, resources = _workers_and_resources(dask_client, batch)
        token = uuid.uuid4().hex[:8]
        topic = f"tomoseg-progress-{token}"
        events: queue.Queue[Any] = queue.Queue()
        dask_client.subscribe_topic(topic, events.put)
        try:
            _submit(dask_client, run.todo, jobs, topic, threads, token, resources, run.pending)
            yield run.progress(0, f"{len(run.pending)} job(s) sent to {n_workers} worker(s)")
            stopped = yield from _watch(run, dask_client, events, worker_timeout, should_stop)
        finally:
            with contextlib.suppress(Exception):
                dask_client.unsubscribe_topic(topic)
            for p in run.pending:
                with contextlib.suppress(Exception):
                    dask_client.cancel([p.future, *p.chunk_futures])
    _save_manifest(run.manifest_path, run.manifest)
    _tidy(run.state)
    _remove_superseded(run.outcomes)
    return run.result(start, n_workers, stopped)


def _remove_superseded(outcomes: Sequence[JobOutcome | None]) -> None:
    """Remove what killed attempts of the finished jobs left beside their outputs, on
    any host (:func:`napari_tomoseg.data.io.remove_superseded_temporaries`), and say so."""
    outputs = [
        path
        for o in outcomes
        if o is not None and o.status in ("done", "skipped")
        for path in o.outputs
    ]
    removed = remove_superseded_temporaries(outputs)
    for folder in dict.fromkeys(t.path.parent for t in removed):
        here = [t for t in removed if t.path.parent == folder]
        warnings.warn(describe_removed(here, folder), TemporariesRemovedWarning, stacklevel=3)


def _collect(p: _Pending) -> tuple[JobOutcome, dict[str, Any] | None]:
    """The outcome of a finished (or erred) job future and its record."""
    job = p.job
    if p.future.status == "cancelled":
        return JobOutcome(job, "cancelled", reason="the task was cancelled"), None
    try:
        exc = p.future.exception()
        record = None if exc is not None else p.future.result()
    except Exception as lost:  # the scheduler lost the task (e.g. the connection dropped)
        exc = lost
    if exc is not None or record is None:
        reason = _reason(exc) if exc is not None else "the task returned nothing"
        return JobOutcome(job, "failed", reason=reason, chunks=len(p.chunks)), None
    outcome = JobOutcome(
        job,
        "skipped" if record.get("reused") else "done",
        outputs=[Path(o["path"]) for o in record["outputs"]],
        seconds=float(record.get("seconds", 0.0)),
        worker=str(record.get("worker", "")),
        chunks=int(record.get("chunks", 1)),
        network_loaded=bool(record.get("network_loaded", False)),
        notes=list(record.get("notes", [])),
    )
    return outcome, record


def run_batch(
    jobs: Sequence[BatchJob],
    settings: ApplySettings | None = None,
    batch: BatchSettings | None = None,
    callback: Callable[[Progress], None] | None = None,
    **kw: Any,
) -> BatchResult:
    """Run :func:`iter_run_batch` to the end; ``callback`` sees the progress.

    Parameters
    ----------
    jobs, settings, batch
        As for :func:`iter_run_batch`.
    callback
        Called with each :class:`~napari_tomoseg.progress.Progress` event, or None.
    **kw
        :func:`iter_run_batch`'s keyword arguments (``client``, ``manifest``,
        ``overwrite``, ``should_stop``).
    """
    return drive(iter_run_batch(jobs, settings, batch, **kw), callback)


__all__ = [
    "DEFAULT_MANIFEST_NAME",
    "BatchJob",
    "BatchResult",
    "BatchSettings",
    "CPU_WORKER_MEMORY",
    "JobOutcome",
    "WorkerPlan",
    "check_jobs",
    "file_sha256",
    "iter_run_batch",
    "local_worker_plan",
    "open_client",
    "output_names",
    "plan_batch",
    "plan_z_chunks",
    "read_manifest",
    "run_batch",
    "start_local_cluster",
    "visible_gpus",
    "worker_network",
]
