"""Shared test setup: headless Qt, small torch thread count, fast simulated data."""

from __future__ import annotations

import contextlib
import os

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen" if not os.environ.get("DISPLAY") else "xcb")


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
    (:mod:`napari_tomoseg.simulator.replay`); tests that fine-tune for other reasons get two
    one small one.  ``@pytest.mark.full_replay`` keeps the real sizes.  (A patch of its own, so
    a test's ``monkeypatch.undo()`` leaves it.)"""
    if request.node.get_closest_marker("full_replay"):
        yield
        return
    from napari_tomoseg.simulator import replay

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(replay, "TOMOGRAMS", 1)
        patch.setattr(replay, "SLICE_SIZE", 96)
        yield
