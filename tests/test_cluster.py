"""Batch application on a real Dask cluster: same results as one machine, resumable, robust."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

distributed = pytest.importorskip("distributed")
import cloudpickle  # noqa: E402  (comes with distributed)
import dask  # noqa: E402

from napari_tomoseg import cli  # noqa: E402
from napari_tomoseg.applying import cluster  # noqa: E402
from napari_tomoseg.applying.cluster import (  # noqa: E402
    BatchJob,
    BatchSettings,
    file_sha256,
    local_worker_plan,
    output_names,
    plan_batch,
    plan_z_chunks,
    read_manifest,
    run_batch,
    worker_network,
)
from napari_tomoseg.applying.inference import ApplySettings, apply_file  # noqa: E402
from napari_tomoseg.data import io  # noqa: E402
from napari_tomoseg.data.io import read_tomogram, write_mrc  # noqa: E402
from napari_tomoseg.errors import TomosegError  # noqa: E402
from napari_tomoseg.learning.model_file import Network, load_network, save_network  # noqa: E402
from napari_tomoseg.simulator.synthetic import simulate_tomogram  # noqa: E402

SHAPE = (24, 96, 96)
SETTINGS = ApplySettings(z_chunk=4, batch_size=8)
ONE_THREAD = BatchSettings(torch_threads=1)

# the worker plugin below is defined here; workers get it by value, not by importing tests
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- data and cluster -----------------------------------------------------------------------------
def _network(context: int, normalisation: str, seed: int) -> Network:
    """An untrained small network: deterministic, and its probabilities vary around 0.5, so
    masks and probability maps are far from constant."""
    torch.manual_seed(seed)
    return Network.create(
        "tomoseg-cnn",
        2 * context + 1,
        2,
        model_params={"n_kernels": [8, 8], "kernel_size": 7},
        voxel_size=10.0,
        context_slices=context,
        normalisation={"mode": normalisation, "clamp_sigma": 5.0, "window": 32},
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-data")
    tomograms = []
    for seed in range(3):
        sim = simulate_tomogram(shape=SHAPE, seed=seed)
        tomograms.append(write_mrc(root / f"t{seed}.mrc", sim.tomogram, sim.voxel_size))
    nets = {
        "ctx": save_network(_network(1, "tomogram", 0), root / "ctx.tsnet"),
        "flat": save_network(_network(0, "box", 1), root / "flat.tsnet"),
    }
    return {"root": root, "tomograms": tomograms, "networks": nets}


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


_REFERENCES: dict[tuple[str, str], Path] = {}


def _reference(data, tomogram: Path, network: str, settings=SETTINGS) -> Path:
    """The single-process result (``iter_apply_file``) of ``network`` on ``tomogram``."""
    key = (str(tomogram), network + repr(settings))
    if key not in _REFERENCES:
        out = data["root"] / "reference" / f"{len(_REFERENCES)}"
        out.mkdir(parents=True)
        net = load_network(data["networks"][network])
        apply_file(net, tomogram, out / "mask.mrc", out / "prob.mrc", settings=settings)
        _REFERENCES[key] = out
    return _REFERENCES[key]


def _same_mrc(a: Path, b: Path) -> bool:
    """Byte-identical MRC files but for the label (mrcfile stamps the time of writing)."""
    x, y = a.read_bytes(), b.read_bytes()
    return len(x) == len(y) and x[:220] == y[:220] and x[1024:] == y[1024:]


def _stats(paths):
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_ino) for p in paths}


# -- pure planning ------------------------------------------------------------------------------
def test_plan_z_chunks_cover_the_volume_on_group_boundaries():
    assert plan_z_chunks(24, None, 4) == [(0, 24)]
    assert plan_z_chunks(24, 24, 4) == [(0, 24)]
    assert plan_z_chunks(24, 8, 4) == [(0, 8), (8, 16), (16, 24)]
    chunks = plan_z_chunks(101, 10, 8)  # 10 rounds up to 16, the next multiple of z_chunk
    assert chunks[0] == (0, 16) and chunks[-1] == (96, 101)
    assert all(z0 % 8 == 0 for z0, _ in chunks)
    assert [z for a, b in chunks for z in range(a, b)] == list(range(101))
    with pytest.raises(TomosegError):
        plan_z_chunks(0, 8, 4)


def test_local_worker_plan_cpu_and_gpu():
    gib = 1024**3
    cpu = local_worker_plan(BatchSettings(gpus="none"), cores=16, memory=64 * gib)
    assert len(cpu) == 16 and {p.torch_threads for p in cpu} == {1}
    assert all(p.gpu is None and "CUDA_VISIBLE_DEVICES" not in p.env for p in cpu)
    assert cpu[0].env["OMP_NUM_THREADS"] == "1"
    short = local_worker_plan(BatchSettings(gpus="none"), cores=16, memory=12 * gib)
    assert len(short) == 4 and short[0].torch_threads == 4  # RAM for 4 workers only
    tiny = local_worker_plan(BatchSettings(gpus="none"), cores=2, memory=1 * gib)
    assert len(tiny) == 1 and tiny[0].torch_threads == 2
    gpu = local_worker_plan(BatchSettings(), cores=16, gpus=[0, 1], memory=64 * gib)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in gpu] == ["0", "1"]
    assert [p.torch_threads for p in gpu] == [8, 8]
    shared = local_worker_plan(
        BatchSettings(gpus=[3, 5], n_workers=3, torch_threads=2), cores=8, memory=64 * gib
    )
    assert [p.gpu for p in shared] == [3, 5, 3] and shared[0].env["OMP_NUM_THREADS"] == "2"
    with pytest.raises(TomosegError, match="gpus"):
        local_worker_plan(BatchSettings(gpus="first"))
    with pytest.raises(TomosegError, match="n_workers"):
        BatchSettings(n_workers=0).validate()


def test_plan_batch_names_as_the_cli_and_refuses_clashes(tmp_path):
    jobs = plan_batch(["a/t1.mrc", "b/t2.rec"], ["n1.tsnet", "n2.tsnet"], tmp_path)
    assert len(jobs) == 4
    for job in jobs:
        assert (job.mask, job.probabilities) == io.output_names(
            tmp_path, job.tomogram, job.network.stem
        )
    assert len({j.job_id for j in jobs}) == 4
    assert output_names(tmp_path, Path("x/t.mrc.gz"), "m")[0].name == "t_m_mask.mrc"
    with pytest.raises(TomosegError, match="Two jobs"):
        plan_batch(["a/t1.mrc", "b/t1.mrc"], ["n.tsnet"], tmp_path)


def test_worker_network_cache_loads_once_and_refuses_a_changed_file(tmp_path):
    path = save_network(_network(0, "box", 5), tmp_path / "n.tsnet")
    digest = file_sha256(path)
    first, loaded = worker_network(path, digest, "cpu")
    again, loaded_again = worker_network(path, digest, "cpu")
    assert loaded and not loaded_again and again is first
    # the file changes after the driver hashed it and before a new worker loads it
    save_network(_network(0, "box", 6), path, overwrite=True)
    cluster._NETWORKS.clear()
    with pytest.raises(TomosegError, match="changed"):
        worker_network(path, digest, "cpu")
    fresh, loaded = worker_network(path, file_sha256(path), "cpu")
    assert loaded and fresh is not first


# -- on the cluster ------------------------------------------------------------------------------
def test_batch_equals_single_machine_and_rerun_skips(data, client, tmp_path):
    tomos = data["tomograms"]
    nets = data["networks"]
    jobs = plan_batch(tomos, [nets["ctx"], nets["flat"]], tmp_path)
    events = []
    result = run_batch(jobs, SETTINGS, ONE_THREAD, client=client, callback=events.append)
    assert [o.status for o in result.outcomes] == ["done"] * 6, result.summary()
    assert result.n_workers == 2
    for job in jobs:
        ref = _reference(data, job.tomogram, job.network.stem)
        assert _same_mrc(job.mask, ref / "mask.mrc"), job.name
        assert _same_mrc(job.probabilities, ref / "prob.mrc"), job.name
        mask = np.asarray(read_tomogram(job.mask).data)
        assert 0 < mask.mean() < 1  # a real mask, not a constant
    # each worker loaded each network once and reused it for its other tomograms
    for net in nets.values():
        mine = [o for o in result.outcomes if o.job.network == net]
        assert sum(o.network_loaded for o in mine) == len({o.worker for o in mine})
    assert len({o.worker for o in result.outcomes}) == 2
    # progress: one event per finished job with its outcome, slices counted to the total
    ended = [e.payload for e in events if e.payload is not None]
    assert sorted(o.job.job_id for o in ended) == sorted(j.job_id for j in jobs)
    assert events[-1].step == events[-1].total == 6 * SHAPE[0]
    # the manifest records every output with its size and hash
    manifest = read_manifest(result.manifest)
    assert set(manifest["jobs"]) == {j.job_id for j in jobs}
    for entry in manifest["jobs"].values():
        assert entry["fingerprint"]["settings"]["z_chunk"] == 4
        for item in entry["outputs"]:
            path = Path(item["path"])
            assert item["size"] == path.stat().st_size
            assert item["sha256"] == file_sha256(path)
    before = _stats(p for j in jobs for p in (j.mask, j.probabilities))
    again = run_batch(jobs, SETTINGS, BatchSettings(verify_hashes=True), client=client)
    assert [o.status for o in again.outcomes] == ["skipped"] * 6
    assert _stats(p for j in jobs for p in (j.mask, j.probabilities)) == before
    # changed settings are a different job: refused without overwrite (outputs not ours)
    other = ApplySettings(z_chunk=4, threshold=0.6)
    changed = run_batch(jobs[:1], other, ONE_THREAD, client=client)
    assert changed.outcomes[0].status == "failed"
    assert "already exists" in changed.outcomes[0].reason


def test_workers_remove_what_killed_runs_left_beside_their_outputs(data, client, tmp_path):
    """A temporary of a killed process of this host goes when a worker writes into its
    folder (a note of the job); one from another host, which cannot be checked, goes when
    the job that owns its output is done (a warning of the batch)."""
    from napari_tomoseg.data.io import Writer, temporary_name
    from napari_tomoseg.errors import TemporariesRemovedWarning
    from test_leftovers import _killed_writer

    [job] = plan_batch([data["tomograms"][0]], [data["networks"]["flat"]], tmp_path)
    dead = _killed_writer(job.mask, 5000)
    remote = tmp_path / temporary_name(job.mask.name, writer=Writer("node7", "abcdef", 9, 1))
    remote.write_bytes(b"r" * 64)
    manifest = tmp_path / "elsewhere" / "batch.json"  # the driver writes nothing beside them
    manifest.parent.mkdir()
    with pytest.warns(TemporariesRemovedWarning, match=f"{remote.name} .*node7"):
        result = run_batch([job], SETTINGS, ONE_THREAD, client=client, manifest=manifest)
    [outcome] = result.outcomes
    assert outcome.status == "done", result.summary()
    assert any(dead.name in note and "which is gone" in note for note in outcome.notes)
    assert not dead.exists() and not remote.exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".part", ".old"))]


def test_bad_tomograms_fail_alone_with_their_reason(data, client, tmp_path):
    tomos = data["tomograms"]
    truncated = tmp_path / "truncated.mrc"
    truncated.write_bytes(tomos[0].read_bytes()[: 1024 + 5000])
    wrong_size = write_mrc(tmp_path / "wrong.mrc", read_tomogram(tomos[1]).data, 20.0)
    jobs = plan_batch(
        [tomos[0], truncated, wrong_size, tomos[2]], [data["networks"]["ctx"]], tmp_path / "out"
    )
    (tmp_path / "out").mkdir()
    refuse = ApplySettings(z_chunk=4, voxel_size_policy="refuse")
    result = run_batch(jobs, refuse, ONE_THREAD, client=client)
    status = {o.job.tomogram.name: o for o in result.outcomes}
    assert status["t0.mrc"].status == status["t2.mrc"].status == "done"
    assert status["truncated.mrc"].status == "failed"
    assert "truncated" in status["truncated.mrc"].reason
    assert status["wrong.mrc"].status == "failed"  # raised on the worker
    assert "voxel size" in status["wrong.mrc"].reason
    assert not jobs[1].mask.exists() and not jobs[2].mask.exists()
    assert "FAILED truncated.mrc" in result.summary()
    failed = read_manifest(result.manifest)["failed"]
    assert {v["tomogram"] for v in failed.values()} == {str(truncated), str(wrong_size)}
    ref = _reference(data, tomos[2], "ctx", refuse)
    assert _same_mrc(jobs[3].mask, ref / "mask.mrc")


def test_cli_apply_on_a_running_scheduler(data, client, tmp_path, capsys):
    broken = tmp_path / "broken.mrc"
    broken.write_bytes(data["tomograms"][0].read_bytes()[:2000])
    out = tmp_path / "out"
    address = client.scheduler.address
    args = [
        "-q",
        "apply",
        str(data["networks"]["flat"]),
        str(data["tomograms"][0]),
        str(broken),
        "--output-dir",
        str(out),
        "--scheduler",
        address,
        "--threads",
        "1",
        "--z-split",
        "8",
        "--no-probabilities",
    ]
    assert cli.main(args) == cli.EXIT_PARTIAL
    text = capsys.readouterr()
    assert "1 done" in text.out and "FAILED broken.mrc" in text.out
    ref = _reference(data, data["tomograms"][0], "flat", ApplySettings())
    assert _same_mrc(out / "t0_flat_mask.mrc", ref / "mask.mrc")
    assert not (out / "t0_flat.mrc").exists()
    entry = next(iter(read_manifest(out / "tomoseg-batch.json")["jobs"].values()))
    assert entry["chunks"] == 3
    # rerun: finished job skipped, the broken one still fails
    assert cli.main(args) == cli.EXIT_PARTIAL
    assert "1 skipped" in capsys.readouterr().out
    # cluster options and --cluster none contradict each other
    assert cli.main([*args, "--cluster", "none"]) == cli.EXIT_INPUT


@pytest.mark.parametrize(
    "network, voxel_size, holes", [("ctx", 8.0, False), ("flat", None, False), ("ctx", None, True)]
)
def test_z_split_equals_unsplit_byte_for_byte(data, client, tmp_path, network, voxel_size, holes):
    """2.5D with rescaled in-plane size and context spacing (tomogram 8 A, network 10 A),
    2D with box normalisation, and a 2.5D network on a tomogram with NaN voxels next to a
    chunk border: chunks on several workers, stitched without seams."""
    tomo = data["tomograms"][0]
    volume = np.array(read_tomogram(tomo).data)
    if holes:
        volume[7:9, 40:44, 10:20] = np.nan
    if voxel_size is not None or holes:
        tomo = write_mrc(tmp_path / "t.mrc", volume, voxel_size or 10.0)
    jobs = plan_batch([tomo], [data["networks"][network]], tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_batch(
            jobs, SETTINGS, BatchSettings(torch_threads=1, z_split=8), client=client
        )
    outcome = result.outcomes[0]
    assert outcome.status == "done" and outcome.chunks == 3, result.summary()
    if voxel_size is not None:
        assert any("rescaled" in n for n in outcome.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _reference(data, tomo, network)
    assert _same_mrc(jobs[0].mask, ref / "mask.mrc")
    assert _same_mrc(jobs[0].probabilities, ref / "prob.mrc")
    work = result.manifest.with_name(f".{result.manifest.stem}-work") / "parts"
    assert not work.exists() or not any(work.iterdir())  # parts removed after stitching


class KillOnce(distributed.WorkerPlugin):
    """Kills its worker process when a task whose key contains ``match`` starts, once
    (the marker file remembers it): a worker dying in the middle of a batch."""

    name = "kill-once"

    def __init__(self, match: str, marker: str) -> None:
        self.match = match
        self.marker = marker

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and self.match in str(key) and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(key))
            os._exit(1)


def test_chunk_whose_worker_dies_is_redone_and_the_batch_completes(data, client, tmp_path):
    jobs = plan_batch([data["tomograms"][1]], [data["networks"]["ctx"]], tmp_path)
    marker = tmp_path / "killed"
    client.register_plugin(KillOnce("tomoseg-chunk-t1-ctx-z8-", str(marker)))
    try:
        result = run_batch(
            jobs, SETTINGS, BatchSettings(torch_threads=1, z_split=8), client=client
        )
    finally:
        client.unregister_worker_plugin(KillOnce.name)
    assert marker.exists()  # a worker did die running the middle chunk
    assert result.outcomes[0].status == "done", result.summary()
    ref = _reference(data, data["tomograms"][1], "ctx")
    assert _same_mrc(jobs[0].mask, ref / "mask.mrc")
    assert _same_mrc(jobs[0].probabilities, ref / "prob.mrc")
    client.wait_for_workers(2, timeout=60)


@pytest.mark.slow
def test_killed_worker_then_rerun_redoes_only_the_missing(data, tmp_path):
    """No retries: the job whose worker died fails; a rerun does it and nothing else."""
    jobs = plan_batch(data["tomograms"], [data["networks"]["ctx"]], tmp_path)
    marker = tmp_path / "killed"
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        c.register_plugin(KillOnce("tomoseg-apply-t1-", str(marker)))
        first = run_batch(jobs, SETTINGS, ONE_THREAD, client=c)
        assert marker.exists()
        status = {o.job.tomogram.name: o for o in first.outcomes}
        assert status["t1.mrc"].status == "failed"
        assert "worker" in status["t1.mrc"].reason
        finished = [o.job for o in first.outcomes if o.status == "done"]
        assert finished  # the other worker went on
        outputs = [p for j in finished for p in (j.mask, j.probabilities)]
        before = _stats(outputs)
        times = {k: v["finished"] for k, v in read_manifest(first.manifest)["jobs"].items()}
        c.wait_for_workers(2, timeout=60)
        second = run_batch(jobs, SETTINGS, ONE_THREAD, client=c)
    again = {o.job.job_id: o.status for o in second.outcomes}
    for job in jobs:
        assert again[job.job_id] == ("skipped" if job in finished else "done")
    assert _stats(outputs) == before  # nothing finished was written again
    manifest = read_manifest(second.manifest)
    assert all(manifest["jobs"][k]["finished"] == t for k, t in times.items())
    assert set(manifest["jobs"]) == {j.job_id for j in jobs} and not manifest["failed"]
    for job in jobs:
        ref = _reference(data, job.tomogram, "ctx")
        assert _same_mrc(job.mask, ref / "mask.mrc")


@pytest.mark.slow
def test_local_cluster_started_for_the_batch(data, tmp_path):
    """No client given: a local cluster is laid out, started and closed for the batch."""
    jobs = plan_batch(data["tomograms"][:2], [data["networks"]["flat"]], tmp_path)
    batch = BatchSettings(n_workers=2, torch_threads=1, gpus="none")
    result = run_batch(jobs, SETTINGS, batch)
    assert result.n_workers == 2
    assert [o.status for o in result.outcomes] == ["done", "done"], result.summary()
    for job in jobs:
        assert _same_mrc(job.mask, _reference(data, job.tomogram, "flat") / "mask.mrc")
    entries = read_manifest(result.manifest)["jobs"].values()
    assert {e["torch_threads"] for e in entries} == {1}
    assert {e["device"] for e in entries} == {"cpu"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_workers_take_one_gpu_each(data, tmp_path):
    gpus = cluster.visible_gpus()
    with (
        cluster.start_local_cluster(BatchSettings(gpus="auto")) as local,
        distributed.Client(local) as c,
    ):
        seen = c.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == sorted(str(g) for g in gpus)
        workers = c.scheduler_info()["workers"].values()
        assert all(w["resources"].get("GPU") == 1 for w in workers)
        jobs = plan_batch(data["tomograms"], [data["networks"]["ctx"]], tmp_path)
        settings = ApplySettings(z_chunk=4, mixed_precision=False)
        result = run_batch(jobs, settings, BatchSettings(z_split=8), client=c)
    assert [o.status for o in result.outcomes] == ["done"] * 3, result.summary()
    entries = read_manifest(result.manifest)["jobs"].values()
    assert {e["device"] for e in entries} == {"cuda"}
    for job in jobs:  # float32 on the GPU: the same masks up to rounding at the threshold
        ref = _reference(data, job.tomogram, "ctx", settings)
        a = np.asarray(read_tomogram(job.mask).data)
        b = np.asarray(read_tomogram(ref / "mask.mrc").data)
        assert np.mean(a == b) > 0.999


def test_a_cluster_without_workers_fails_the_jobs_after_the_timeout(data, tmp_path):
    with (
        distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty,
        distributed.Client(empty) as c,
    ):
        jobs = plan_batch(data["tomograms"][:1], [data["networks"]["flat"]], tmp_path)
        batch = BatchSettings(worker_timeout=2.5)
        events = []
        result = run_batch(jobs, SETTINGS, batch, client=c, callback=events.append)
    assert result.outcomes[0].status == "failed"
    assert "no worker" in result.outcomes[0].reason
    assert any("waiting for workers" in e.message for e in events)
    with pytest.raises(TomosegError, match="worker_timeout"):
        BatchSettings(worker_timeout=0).validate()


def test_batch_job_paths_and_manifest_format(tmp_path):
    job = BatchJob("a.mrc", "n.tsnet", tmp_path / "m.mrc")
    assert isinstance(job.tomogram, Path) and job.name == "a.mrc x n.tsnet"
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(TomosegError, match="not a napari-tomoseg batch manifest"):
        read_manifest(bad)
    assert read_manifest(tmp_path / "none.json")["jobs"] == {}
