"""Replay: fine-tuning from a shipped network also trains on simulated boxes of the
user's features, which never validate."""

from __future__ import annotations

from unittest.mock import ANY

import numpy as np
import pytest
import torch

from napari_tomoseg.learning.training import TrainSettings
from napari_tomoseg.learning.training import train as train_plainly
from napari_tomoseg.progress import drive, never_stop
from napari_tomoseg.simulator.demo import trainset_from_truth
from napari_tomoseg.simulator.replay import SimulatedReplay, iter_replay_set, replay_features
from napari_tomoseg.simulator.synthetic import simulate_tomogram

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def train(*args, **kwargs):
    """Training as the command line, the Train widget and the demo run it."""
    return train_plainly(*args, replay_from=SimulatedReplay(), **kwargs)


@pytest.fixture(scope="module")
def membranes():
    """A user's training set of membranes ("Membranes", as a user names them), at 8 A."""
    sim = simulate_tomogram(shape=(40, 128, 128), seed=5, voxel_size=8.0)
    trainset = trainset_from_truth(sim, ["single_membrane"], 3, 6, seed=2)
    trainset.class_names = ("background", "Membranes")
    return trainset


def test_the_features_replayed_are_those_the_simulator_draws():
    assert replay_features(("background", "Membranes")) == ["single_membrane"]
    assert replay_features(("background", "mito", "MT")) == ["double_membrane", "microtubule"]
    assert replay_features(("background", "actin")) is None  # not drawn: nothing to replay
    assert replay_features(("background", "membrane", "vesicle")) is None  # one feature twice


@pytest.fixture
def two_tomograms(small_replay_sets):
    """Replay sets of two small tomograms (conftest's one, twice; undone before it)."""
    from napari_tomoseg.simulator import replay

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(replay, "TOMOGRAMS", 2)
        yield


@pytest.mark.usefixtures("two_tomograms")
def test_a_replay_set_is_cut_like_the_training_set(membranes):
    events = []
    replay, info = drive(iter_replay_set(membranes, 0.5, 3, never_stop), events.append)
    again, _ = drive(iter_replay_set(membranes, 0.5, 3, never_stop))
    assert replay.class_names == membranes.class_names
    assert replay.images.shape[1:] == membranes.images.shape[1:]  # box size, context slices
    assert replay.normalisation == membranes.normalisation
    assert info["voxel_size"] == pytest.approx(8.0) and info["tomograms"] == 2
    assert 0.5 * len(membranes) <= len(replay) <= 1.5 * len(membranes)
    # half the samples hold the membrane, painted from the simulator's truth
    assert info["samples_with_features"] == int(replay.positive.sum()) > 0
    assert all(replay.labels[i].any() for i in np.flatnonzero(replay.positive))
    assert not replay.labels[~replay.positive].any()
    assert [e.stage for e in events] == ["replay", "replay"]
    np.testing.assert_array_equal(replay.images, again.images)  # seeded


def test_nothing_is_replayed_for_a_feature_the_simulator_does_not_draw(membranes):
    actin = membranes.subset(np.arange(len(membranes)))
    actin.class_names = ("background", "actin")
    replay, info = drive(iter_replay_set(actin, 0.5, 0, never_stop))
    assert replay is None and "does not draw" in info["why"]


def test_replayed_samples_train_but_never_validate(membranes):
    common = {"iterations": 2, "eval_every": 1, "augment": False, "seed": 1}
    plain = train(membranes, TrainSettings(replay=0.0, **common))
    mixed = train(membranes, TrainSettings(replay=0.5, **common))
    scratch = train(membranes, TrainSettings(start_from="scratch", **common))
    added = mixed.metadata["replay"]["samples"]
    assert added > 0 and plain.metadata["replay"] == {"samples": 0, "why": "replay is 0"}
    assert "not started from a shipped" in scratch.metadata["replay"]["why"]
    library = train_plainly(membranes, TrainSettings(replay=0.5, **common))  # no source
    assert library.metadata["replay"] == {"samples": 0, "why": "no replay source given"}
    assert mixed.metadata["n_train_samples"] == plain.metadata["n_train_samples"] + added
    assert mixed.metadata["split"] == plain.metadata["split"]
    assert mixed.metadata["n_validation_samples"] == plain.metadata["n_validation_samples"]
    assert mixed.metadata["threshold_calibration"]["on"] == "held-out boxes"
    assert mixed.network.meta.class_names == membranes.class_names
    assert mixed.history[0]["loss"] != plain.history[0]["loss"]  # they did train on it


@pytest.mark.usefixtures("two_tomograms")
def test_a_stop_while_simulating_the_replay_ends_the_run(membranes):
    calls = {"n": 0}

    def stop_at_second_check() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    events = []
    settings = TrainSettings(iterations=50, replay=0.5)
    result = train(membranes, settings, progress=events.append, should_stop=stop_at_second_check)
    assert [e.stage for e in events] == ["replay"]  # one tomogram, then the stop
    assert result.stopped and result.metadata["steps_done"] == 0
    assert result.metadata["replay"]["why"] == "stopped"


def test_a_fine_tuning_resumed_makes_the_same_replay_and_network(membranes, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    common = {"iterations": 6, "eval_every": 2, "replay": 0.5}
    settings = TrainSettings(**common, checkpoint=str(ckpt), checkpoint_every=2)
    whole = train(membranes, TrainSettings(**common))
    steps = {"n": 0}

    def stop_at_step_three() -> bool:
        return steps["n"] >= 3

    stopped = train(
        membranes,
        settings,
        progress=lambda e: steps.update(n=e.step if e.stage == "train" else 0),
        should_stop=stop_at_step_three,
    )
    assert stopped.stopped and ckpt.is_file()
    resumed = train(membranes, settings, resume=True)
    assert resumed.metadata["replay"] == {**whole.metadata["replay"], "seconds": ANY}
    assert resumed.history == whole.history
    for name, tensor in whole.network.model.state_dict().items():
        assert torch.equal(tensor, resumed.network.model.state_dict()[name]), name


@pytest.mark.slow
@pytest.mark.full_replay
def test_replay_at_its_real_size_takes_tomograms_as_pretraining_drew_them(membranes):
    replay, info = drive(iter_replay_set(membranes, 0.5, 0, never_stop))
    assert info["tomograms"] == 8
    assert 0.5 * len(membranes) <= len(replay) <= 1.5 * len(membranes)
