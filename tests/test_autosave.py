"""The autosave core: one folder per tomogram in the cache, written all at once, found and
restored exactly, listed, discarded (no Qt here; the viewer side is in test_unsaved)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import numpy as np
import psutil
import pytest

from napari_tomoseg.data import autosave
from napari_tomoseg.data.annotations import INFO_FILE, Annotations
from napari_tomoseg.data.boxes import Box
from napari_tomoseg.data.io import Writer, process_running, this_writer, write_mrc
from napari_tomoseg.errors import TomosegError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOMOSEG_CACHE_DIR", str(tmp_path / "cache"))


def _annotations(source: str, shape=(6, 40, 48), seed=0) -> Annotations:
    rng = np.random.default_rng(seed)
    return Annotations(
        painting=rng.integers(0, 3, size=shape).astype(np.uint8),
        positives=[Box(2, 20, 20, 16), Box(3, 12, 30, 16)],
        negatives=[Box(1, 30, 10, 16)],
        class_names={0: "background", 1: "membrane", 2: "ribosome"},
        box_size=16,
        voxel_size=(7.5, 7.5, 7.5),
        source=source,
    )


def test_an_autosave_restores_exactly_what_was_written(tmp_path, monkeypatch):
    tomo = write_mrc(tmp_path / "cell.mrc", np.zeros((6, 40, 48), np.float32), 7.5)
    written = _annotations(str(tomo))
    before = dt.datetime.now(dt.timezone.utc)
    info = autosave.write_autosave(written)
    assert info.folder.parent == autosave.autosave_root()
    assert info.folder.name.startswith("cell.mrc-")
    assert (info.n_positive, info.n_negative, info.shape) == (2, 1, (6, 40, 48))
    assert info.writer == this_writer()
    assert before <= info.saved <= dt.datetime.now(dt.timezone.utc)

    written.painting[:] = 0  # the autosave holds its own copy
    found = autosave.find_autosave(str(tomo), (6, 40, 48))
    assert found == info
    back = autosave.read_autosave(found)
    assert np.array_equal(back.painting, _annotations(str(tomo)).painting)
    assert back.positives == written.positives and back.negatives == written.negatives
    assert back.class_names == written.class_names and back.box_size == 16
    assert back.voxel_size == pytest.approx((7.5, 7.5, 7.5))

    # the same file named another way is the same tomogram; another shape is not
    monkeypatch.chdir(tmp_path)
    assert autosave.find_autosave(str(tomo.relative_to(tmp_path)), (6, 40, 48)) == info
    assert autosave.find_autosave(str(tomo), (6, 40, 40)) is None
    assert autosave.find_autosave("another layer", (6, 40, 48)) is None


def test_a_newer_autosave_replaces_the_older_one_and_the_list_is_newest_first(tmp_path):
    first = autosave.write_autosave(_annotations("layer a"))
    other = autosave.write_autosave(_annotations("layer b", shape=(4, 32, 32)))
    again = autosave.write_autosave(_annotations("layer a", seed=1))
    assert again.folder == first.folder and again.saved >= first.saved
    assert np.array_equal(
        autosave.read_autosave(again).painting, _annotations("layer a", seed=1).painting
    )
    assert [a.folder for a in autosave.list_autosaves()] == [again.folder, other.folder]
    assert "2 positive, 1 negative boxes" in again.describe()
    later = again.saved + dt.timedelta(minutes=12)
    assert "(12 min ago)" in again.describe(now=later)

    assert autosave.discard_autosave(again.folder)
    assert not again.folder.exists() and not autosave.discard_autosave(again.folder)
    assert [a.folder for a in autosave.list_autosaves()] == [other.folder]
    with pytest.raises(TomosegError, match="not an autosave folder"):
        autosave.discard_autosave(tmp_path)


def test_a_damaged_autosave_is_not_offered(tmp_path):
    info = autosave.write_autosave(_annotations("layer"))
    (info.folder / INFO_FILE).write_text("{not json")
    assert autosave.find_autosave("layer", info.shape) is None
    assert autosave.list_autosaves() == []
    with pytest.raises(TomosegError, match="source"):
        autosave.write_autosave(_annotations(""))


def test_an_autosave_kept_by_another_running_viewer_is_told_apart(tmp_path):
    info = autosave.write_autosave(_annotations("layer"))
    assert not info.open_elsewhere()  # this process wrote it
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = this_writer()
        started = int(psutil.Process(other.pid).create_time())
        assert process_running(other.pid, started)
        record = json.loads((info.folder / INFO_FILE).read_text())
        record["autosave"]["writer"] = Writer(me.host, me.ident, other.pid, started).token
        (info.folder / INFO_FILE).write_text(json.dumps(record))
        assert autosave.find_autosave("layer", info.shape).open_elsewhere()
    finally:
        other.kill()
        other.wait()
    assert not autosave.find_autosave("layer", info.shape).open_elsewhere()  # it died


def test_clean_lists_and_removes_the_autosaves_of_crashed_sessions(capsys):
    from napari_tomoseg import cli

    crashed = autosave.write_autosave(_annotations("crashed layer"))
    open_one = autosave.write_autosave(_annotations("open layer"))
    viewer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = this_writer()
        record = json.loads((open_one.folder / INFO_FILE).read_text())
        started = int(psutil.Process(viewer.pid).create_time())
        record["autosave"]["writer"] = Writer(me.host, me.ident, viewer.pid, started).token
        (open_one.folder / INFO_FILE).write_text(json.dumps(record))
        # this process wrote the crashed one: pretend it is gone by another dead writer
        record = json.loads((crashed.folder / INFO_FILE).read_text())
        record["autosave"]["writer"] = Writer(me.host, me.ident, 2**22 + 7, 1).token
        (crashed.folder / INFO_FILE).write_text(json.dumps(record))

        assert cli.main(["clean", "--autosaves", "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "would remove" in out and str(crashed.folder) in out and "of crashed layer" in out
        assert "kept" in out and str(open_one.folder) in out
        assert "Would remove the autosaved annotations of 1 tomogram(s)" in out
        assert crashed.folder.exists()

        assert cli.main(["clean", "--autosaves"]) == 0
        assert "Removed the autosaved annotations of 1 tomogram(s)" in capsys.readouterr().out
        assert not crashed.folder.exists() and open_one.folder.exists()
    finally:
        viewer.kill()
        viewer.wait()
    assert cli.main(["clean"]) == cli.EXIT_INPUT
    assert "--autosaves" in capsys.readouterr().err
