"""Nothing left behind on disk: temporaries of killed writes are found, reported, removed.

Every write goes to a hidden temporary named after its process (host, PID, start time) and
renamed when complete (``io.atomic_paths``); a killed process leaves it behind.  The next
write into that folder removes the stale ones and says so, and ``tomoseg clean`` lists and
removes them with their sizes.  A temporary of a process that runs on this host is never
touched.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from napari_tomoseg import cli
from napari_tomoseg.data import io as tio
from napari_tomoseg.errors import TemporariesRemovedWarning
from napari_tomoseg.learning.model_file import Network, save_network

ROOT = Path(__file__).resolve().parents[1]

#: Dies (SIGKILL) inside ``atomic_path`` after writing N bytes into its temporary.
_DIES_WHILE_WRITING = textwrap.dedent(
    """
    import os, signal, sys
    from napari_tomoseg.data.io import atomic_path

    with atomic_path(sys.argv[1], overwrite=True) as tmp:
        tmp.write_bytes(b"x" * int(sys.argv[2]))
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def _killed_writer(target: Path, nbytes: int) -> Path:
    """Run a process that dies while writing ``target``; returns the temporary it left."""
    before = set(target.parent.iterdir())
    proc = subprocess.run(
        [sys.executable, "-c", _DIES_WHILE_WRITING, str(target), str(nbytes)],
        env=_env(),
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL
    [left] = set(target.parent.iterdir()) - before
    return left


def _parts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# -- the rule: who wrote it, and is it still running ---------------------------------------------
def test_a_temporary_is_stale_only_when_its_process_is_gone_or_it_is_old_and_unknown(tmp_path):
    me = tio.this_writer()
    assert me.pid == os.getpid() and me.running() is True

    dead = _killed_writer(tmp_path / "dead.mrc", 1000)
    mine = tmp_path / tio.temporary_name("mine.mrc")  # this very process: running
    mine.write_bytes(b"m" * 10)
    # the PID of this process, but another start time: a later process that got the PID
    reused = tmp_path / tio.temporary_name(
        "reused.mrc", writer=tio.Writer(me.host, me.ident, me.pid, me.started - 3600)
    )
    reused.write_bytes(b"r")
    elsewhere = tio.Writer("node7", "abcdef", 4242, 1)  # another host: cannot be checked
    remote = tmp_path / tio.temporary_name("remote.mrc", writer=elsewhere)
    remote.write_bytes(b"e" * 5)
    old_style = tmp_path / ".legacy.mrc.ab_cd123.part"  # an earlier version's name
    old_style.write_bytes(b"o")
    (tmp_path / ".notes.part").write_text("not ours")  # not a napari-tomoseg name
    (tmp_path / "result.mrc.part").write_text("not hidden")

    found = {t.path.name: t for t in tio.list_temporaries(tmp_path)}
    assert set(found) == {dead.name, mine.name, reused.name, remote.name, old_style.name}
    assert found[dead.name].state == "gone" and found[dead.name].size == 1000
    assert found[dead.name].target == "dead.mrc"
    assert found[mine.name].state == "running"
    assert found[reused.name].state == "gone"
    assert found[remote.name].state == "unknown" and found[remote.name].writer == elsewhere
    assert found[old_style.name].writer is None

    stale = {t.path for t in tio.stale_temporaries(tmp_path)}
    assert stale == {dead, reused}  # the remote and old-style ones are recent
    _age(remote, 25 * 3600)
    _age(old_style, 25 * 3600)
    _age(mine, 30 * 86400)  # however old, a running process's temporary is never stale
    stale = {t.path for t in tio.stale_temporaries(tmp_path)}
    assert stale == {dead, reused, remote, old_style}
    assert {t.path for t in tio.stale_temporaries(tmp_path, min_age_s=30 * 3600)} == {
        dead,
        reused,
    }


def test_every_write_removes_the_stale_temporaries_of_its_folder_and_says_so(tmp_path):
    dead = _killed_writer(tmp_path / "seg.mrc", 4321)
    live = tmp_path / tio.temporary_name("other.mrc")
    live.write_bytes(b"l")
    with pytest.warns(TemporariesRemovedWarning) as caught:
        tio.write_labels(tmp_path / "mask.mrc", np.ones((2, 4, 4), np.uint8))
    [message] = [str(w.message) for w in caught]
    assert "Removed 1 temporary file (4.3 kB)" in message and dead.name in message
    assert "process" in message and "which is gone" in message
    assert not dead.exists() and live.exists()  # a running writer's file is kept
    # nothing stale left: the next write says nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error", TemporariesRemovedWarning)
        tio.write_labels(tmp_path / "mask.mrc", np.ones((2, 4, 4), np.uint8), overwrite=True)


def test_a_batch_removes_the_temporaries_of_its_finished_outputs_from_any_host(tmp_path):
    """Once a job's outputs are complete, a temporary of one of them can only be from a
    killed attempt: removed even when its writer (another host) cannot be checked."""
    done = tmp_path / "t_net_mask.mrc"
    done.write_bytes(b"result")
    remote = tmp_path / tio.temporary_name("t_net_mask.mrc", writer=tio.Writer("n7", "abcdef", 9))
    remote.write_bytes(b"r" * 7)
    unrelated = tmp_path / tio.temporary_name("u.mrc", writer=tio.Writer("n7", "abcdef", 9))
    unrelated.write_bytes(b"u")
    running = tmp_path / tio.temporary_name("t_net_mask.mrc")  # this process: kept
    running.write_bytes(b"k")
    removed = tio.remove_superseded_temporaries([done])
    assert [t.path for t in removed] == [remote]
    assert not remote.exists() and unrelated.exists() and running.exists() and done.exists()


# -- tomoseg clean ------------------------------------------------------------------------------
def test_clean_lists_and_removes_leftovers_with_their_sizes(tmp_path, capsys):
    (tmp_path / "tomo_mask.mrc").write_bytes(b"a result")
    # a write of this process, still running while clean looks (made first: any write
    # removes the stale temporaries of its folder)
    with tio.atomic_path(tmp_path / "busy.mrc") as busy:
        busy.write_bytes(b"b" * 10)
        dead = _killed_writer(tmp_path / "tomo_mask.mrc", 2_500_000)
        remote = tmp_path / tio.temporary_name(
            "tomo_prob.mrc", writer=tio.Writer("node7", "abcdef", 77, 1)
        )
        remote.write_bytes(b"r" * 1500)
        work = tmp_path / ".tomoseg-batch-work" / "parts"
        work.mkdir(parents=True)
        deep = _killed_writer(work / "out0-z000000.npy", 300)
        keep = {p.name for p in tmp_path.iterdir()}

        assert cli.main(["clean", str(tmp_path), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert re.search(rf"would remove +2\.5 MB +{re.escape(str(dead))} ", out)
        assert re.search(rf"kept +1\.5 kB +{re.escape(str(remote))} .*node7", out)
        assert re.search(rf"kept +10 B +{re.escape(str(busy))} .*still running", out)
        assert "Would remove 1 temporary file(s) (2.5 MB); kept 2 (1.5 kB)" in out
        assert {p.name for p in tmp_path.iterdir()} == keep  # nothing removed

        assert cli.main(["clean", str(tmp_path), "-r"]) == 0
        out = capsys.readouterr().out
        assert re.search(rf"removed +2\.5 MB +{re.escape(str(dead))} ", out)
        assert re.search(rf"removed +300 B +{re.escape(str(deep))} ", out)
        assert "Removed 2 temporary file(s) (2.5 MB); kept 2 (1.5 kB)" in out
        assert not dead.exists() and not deep.exists()
        assert remote.exists() and busy.exists()

        # the other host's temporary, once unchanged longer than --older-than
        _age(remote, 3 * 3600)
        assert cli.main(["clean", str(tmp_path), "--older-than", "2"]) == 0
        assert "Removed 1 temporary file(s) (1.5 kB); kept 1 (10 B)" in capsys.readouterr().out
        assert not remote.exists() and busy.exists()
    assert (tmp_path / "busy.mrc").read_bytes() == b"b" * 10  # the running write finished
    assert _parts(tmp_path) == []
    assert cli.main(["clean", str(tmp_path / "busy.mrc")]) == cli.EXIT_INPUT
    assert "is not a folder" in capsys.readouterr().err


# -- a killed apply, and the next run ---------------------------------------------------------
def test_a_killed_apply_keeps_the_outputs_and_the_next_run_removes_its_temporaries(
    tmp_path, capsys
):
    """``tomoseg apply --overwrite`` SIGKILLed while writing: the previous outputs are intact
    and its two hidden temporaries remain; the next run removes them and says so."""
    rng = np.random.default_rng(0)
    tomogram = tio.write_mrc(
        tmp_path / "t.mrc", rng.normal(size=(160, 192, 192)).astype(np.float32), 10.0
    )
    net = Network.create(
        "tomoseg-cnn", 1, 2, model_params={"n_kernels": [8, 8], "kernel_size": 7}, voxel_size=10.0
    )
    network = save_network(net, tmp_path / "net.tsnet")
    out = tmp_path / "out"
    out.mkdir()
    previous = {"t_net_mask.mrc": b"previous mask", "t_net.mrc": b"previous probabilities"}
    for name, content in previous.items():
        (out / name).write_bytes(content)
    args = ["--quiet", "apply", str(network), str(tomogram), "--output-dir", str(out)]
    args += ["--overwrite", "--device", "cpu"]

    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "napari_tomoseg.cli", *args],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 120
            while len(_parts(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # a few slices into the outputs
            assert proc.poll() is None, log.read_text()
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    left = _parts(out)
    assert len(left) == 2, left
    assert all(f"-{proc.pid}-" in name for name in left)  # named after the killed process
    for name, content in previous.items():
        assert (out / name).read_bytes() == content

    capsys.readouterr()
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "note: Removed 2 temporary files" in err, err
    for name in left:
        assert name in err
    assert _parts(out) == []
    mask = tio.read_tomogram(out / "t_net_mask.mrc").data
    assert mask.shape == (160, 192, 192) and mask.dtype == np.uint8
