"""Shared test setup: headless Qt, small torch thread count, fast simulated data."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen" if not os.environ.get("DISPLAY") else "xcb")
# The tests' caches and remembered settings go to folders of their own (one per pytest-xdist
# worker), never the user's; a test that needs its own sets them again.
_MADE = []
for _name in ("TOMOSEG_CACHE_DIR", "TOMOSEG_CONFIG_DIR"):
    if os.environ.get("PYTEST_XDIST_WORKER") or not os.environ.get(_name):
        os.environ[_name] = tempfile.mkdtemp(prefix=f"{_name.lower()}-")
        _MADE.append(os.environ[_name])


def pytest_configure(config):
    """Under pytest-xdist (``-n 2``) each worker runs torch on one thread, so that two
    workers share two cores instead of oversubscribing them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_unconfigure(config):
    for folder in _MADE:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread():
    """One torch thread for a test that trains: small tensors gain nothing from threads, and
    on a busy machine oversubscribed threads slow training several-fold."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_torch_thread_per_module():
    """:func:`one_torch_thread` for a whole module (``pytestmark = usefixtures(...)``)."""
    with _torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def small_replay_sets(request):
    """Fine-tuning from a shipped network simulates tomograms to replay
    (:mod:`napari_tomoseg.simulator.replay`); tests that fine-tune for other reasons get one
    small one.  ``@pytest.mark.full_replay`` keeps the real sizes.  (A patch of its own, so
    a test's ``monkeypatch.undo()`` leaves it.)"""
    if request.node.get_closest_marker("full_replay"):
        yield
        return
    from napari_tomoseg.simulator import replay

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(replay, "TOMOGRAMS", 1)
        patch.setattr(replay, "SLICE_SIZE", 96)
        yield
