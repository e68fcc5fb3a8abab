"""The training engine on the project's simulated tomogram, the way the TomoSeg protocol asks a
person to work: 10 positive and 30 negative boxes, the single membrane painted in the
positives, the default network and settings, trained on a CPU for a few hundred mini-batches.

The network must find the membranes far better than chance, on the validation boxes, on
the whole tomogram it was trained on, and on a tomogram of another scene it never saw.
Chance here is a guess that marks each pixel with the feature's own frequency ``p``:
its expected Dice is ``p`` (about 0.07 for the single membrane).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_tomoseg.applying.inference import ApplySettings, apply_network
from napari_tomoseg.learning.training import TrainSettings, train
from napari_tomoseg.learning.trainset import TrainsetSettings, build_training_set
from napari_tomoseg.simulator.demo import boxes_from_ground_truth, central_slices, dice_scores
from napari_tomoseg.simulator.synthetic import CLASS_NAMES, simulate_tomogram

pytestmark = pytest.mark.slow

SHAPE = (96, 256, 256)
FEATURE = "single_membrane"
VALUE = CLASS_NAMES.index(FEATURE)
ITERATIONS = 200
#: The slices boxes are drawn from (``boxes_from_ground_truth``'s default Z range).
SCORED = slice(*central_slices(SHAPE[0]))


@pytest.fixture(scope="module")
def trained():
    """A default network trained on seed 0's single membrane, and the tomogram."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        sim = simulate_tomogram(shape=SHAPE, seed=0)
        painting = (sim.labels == VALUE).astype(np.uint8)
        positives, negatives = boxes_from_ground_truth(
            sim.labels, VALUE, n_positive=10, n_negative=30, seed=0
        )
        trainset = build_training_set(
            sim.tomogram,
            painting,
            positives,
            negatives,
            TrainsetSettings(seed=0),
            class_names=("background", FEATURE),
            voxel_size=sim.voxel_size,
        )
        result = train(trainset, TrainSettings(iterations=ITERATIONS, seed=0))
    finally:
        torch.set_num_threads(threads)
    return sim, painting, trainset, result


def _whole_tomogram_dice(network, sim) -> tuple[float, float]:
    """Dice of the thresholded apply over the central slices, and the feature's frequency."""
    applied = apply_network(
        network, sim.tomogram, voxel_size=sim.voxel_size, settings=ApplySettings()
    )
    truth = (sim.labels[SCORED] == VALUE).astype(np.uint8)
    mask = np.asarray(applied.mask)[SCORED]
    return dice_scores(mask, truth, [1])[1], float(truth.mean())


def test_validation_dice_is_far_above_chance(trained):
    _, _, trainset, result = trained
    frequency = float((trainset.labels == 1).mean())
    dice = result.metrics["classes"][FEATURE]["f1"]
    assert dice >= max(0.2, 3 * frequency), (dice, frequency)


def test_whole_training_tomogram_is_segmented(trained):
    sim, _, _, result = trained
    dice, frequency = _whole_tomogram_dice(result.network, sim)
    assert frequency < 0.1
    assert dice >= 0.55, dice


def test_a_tomogram_of_another_scene_is_segmented(trained):
    _, _, _, result = trained
    unseen = simulate_tomogram(shape=SHAPE, seed=100)
    dice, frequency = _whole_tomogram_dice(result.network, unseen)
    assert dice >= 0.45, (dice, frequency)
