"""What makes a network work on tomograms unlike its training data: augmentation, a
calibrated threshold, suggested boxes, domain-randomised simulation and joined sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_tomoseg.applying.inference import ApplySettings, apply_network
from napari_tomoseg.applying.suggest import overlaps, suggest_boxes
from napari_tomoseg.data.boxes import Box
from napari_tomoseg.data.probability import probabilities_as_float
from napari_tomoseg.errors import TomosegError
from napari_tomoseg.learning.augment import (
    AUGMENTATION_DEFAULTS,
    NO_AUGMENTATION,
    augment_batch,
    resolve_augmentation,
)
from napari_tomoseg.learning.model_file import Network, load_network, save_network
from napari_tomoseg.learning.training import (
    PLATEAU_TOLERANCE,
    THRESHOLD_CANDIDATES,
    calibrate_threshold,
    threshold_from_curve,
)
from napari_tomoseg.learning.trainset import TrainingSet, concatenate
from napari_tomoseg.simulator.synthetic import RANDOM_RANGES, random_settings, simulate_tomogram


def _batch(seed: int = 0, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, 48, 48), generator=g)
    y = torch.zeros((n, 48, 48), dtype=torch.long)
    y[:, 20:28, :] = 1  # a band of feature across every sample
    return x, y


# -- augmentation -----------------------------------------------------------------------------
def test_augmentation_settings_are_checked():
    assert resolve_augmentation({}) == AUGMENTATION_DEFAULTS
    assert resolve_augmentation({"noise": 0.0})["noise"] == 0.0
    with pytest.raises(TomosegError, match="Unknown augmentation setting.*brightness"):
        resolve_augmentation({"brightness": 1.0})
    with pytest.raises(TomosegError, match="invert must be between 0.0 and 1.0"):
        resolve_augmentation({"invert": 2.0})


def test_inversion_flips_the_contrast_and_leaves_the_labels():
    x, y = _batch()
    params = {**NO_AUGMENTATION, "invert": 1.0}
    out, labels = augment_batch(x, y, np.random.default_rng(0), params)
    assert torch.equal(out, -x) and torch.equal(labels, y)


def test_noise_and_blur_keep_each_image_spread_and_the_labels():
    x, y = _batch()
    params = {**NO_AUGMENTATION, "noise": 2.0, "noise_colour": 1.0, "blur": 2.0}
    out, labels = augment_batch(x, y, np.random.default_rng(1), params)
    assert torch.equal(labels, y)
    assert not torch.allclose(out, x)
    spread_in = x.flatten(1).std(dim=1)
    spread_out = out.flatten(1).std(dim=1)
    assert torch.allclose(spread_out, spread_in, rtol=0.25)


def test_zoom_moves_labels_with_the_image_and_keeps_classes():
    x = torch.zeros((4, 1, 48, 48))
    x[:, :, 20:28, :] = -1.0  # the image shows the band that is labelled
    _, y = _batch(n=4)
    params = {**NO_AUGMENTATION, "scale": 0.5}
    out, labels = augment_batch(x, y, np.random.default_rng(2), params)
    assert set(labels.unique().tolist()) <= {0, 1}
    widths = labels[:, :, 24].sum(dim=1).tolist()
    assert len(set(widths)) > 1  # different zooms per sample
    dark = out[:, 0, :, 24] < -0.5
    agree = (dark == labels[:, :, 24].bool()).float().mean()
    assert agree > 0.9


def test_augmentation_is_repeatable_with_the_same_generator():
    x, y = _batch()
    a = augment_batch(x, y, np.random.default_rng(5), AUGMENTATION_DEFAULTS)
    b = augment_batch(x, y, np.random.default_rng(5), AUGMENTATION_DEFAULTS)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- calibrated threshold ---------------------------------------------------------------------
def test_calibration_picks_the_threshold_that_separates_the_classes():
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[:2, 2:6, 2:6] = 1
    p = np.where(labels == 1, 0.42, 0.0).astype(np.float32)
    p[2:] = 0.3  # negative samples with a weaker, false signal everywhere
    proba = np.stack([1 - p, p], axis=1)
    chosen, info = calibrate_threshold(proba, labels, np.array([0, 1, 2, 3]))
    assert 0.3 < chosen <= 0.42
    assert info["f1_at_chosen"] == pytest.approx(1.0)
    assert info["f1_at_0.5"] == 0.0
    assert len(info["f1"]) == len(THRESHOLD_CANDIDATES)


def test_on_a_plateau_the_highest_threshold_is_chosen():
    # a pretrained network's held-out curve: 0.57 at 0.2, falling slowly to 0.553 at 0.8
    flat = list(np.linspace(0.570, 0.553, len(THRESHOLD_CANDIDATES)))
    chosen, info = threshold_from_curve(flat)
    assert chosen == 0.8 and info["best"] == 0.2
    assert info["f1_at_chosen"] == pytest.approx(0.553, abs=1e-4)
    # a clear peak: the chosen threshold stays on it
    peak = [0.3, 0.5, 0.7, 0.8, 0.8, 0.7, 0.5, 0.4, 0.3, 0.2, 0.2, 0.2, 0.2]
    chosen, info = threshold_from_curve(peak)
    assert info["best"] == 0.35 and chosen in (0.35, 0.4)
    smooth = np.convolve(np.pad(peak, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    index = THRESHOLD_CANDIDATES.index(chosen)
    assert smooth[index] >= smooth.max() - PLATEAU_TOLERANCE
    assert all(v < smooth.max() - PLATEAU_TOLERANCE for v in smooth[index + 1 :])


def test_each_box_counts_once_however_many_copies():
    labels = np.zeros((5, 4, 4), np.uint8)
    labels[0] = 1  # one positive box ...
    p = np.full((5, 4, 4), 0.3, np.float32)  # ... and one negative box with 4 copies
    proba = np.stack([1 - p, p], axis=1)
    _, weighted = calibrate_threshold(proba, labels, np.array([0, 1, 1, 1, 1]))
    _, copies = calibrate_threshold(proba, labels, np.arange(5))
    low = THRESHOLD_CANDIDATES.index(0.2)
    assert weighted["f1"][low] == pytest.approx(2 / 3, abs=1e-4)  # 16 TP against 16 FP
    assert copies["f1"][low] == pytest.approx(2 * 16 / (16 + 80), abs=1e-4)


def _constant_network(value: float) -> Network:
    """A binary network whose output is sigmoid(bias) = ``value`` everywhere but where
    the input is dark (a strong negative weight on the input)."""
    net = Network.create("tomoseg-cnn", 1, 2)
    with torch.no_grad():
        for p in net.model.parameters():
            p.zero_()
        convs = net.model.convs
        convs[0].weight[0, 0, 7, 7] = -1.0  # one feature: the (dark) input
        convs[1].weight[0, 0, 7, 7] = 1.0
        convs[2].weight[0, 0, 7, 7] = 4.0
        convs[2].bias.fill_(math.log(value / (1 - value)))
    return net


def test_the_stored_threshold_is_loaded_and_used_by_apply(tmp_path):
    net = _constant_network(0.3)
    volume = np.random.default_rng(0).normal(0, 0.1, (2, 32, 32)).astype(np.float32)
    volume[:, 10:20, 10:20] = -3.0  # p well above 0.5 there, 0.3 elsewhere
    kw = {"voxel_size": 10.0}
    base = apply_network(net, volume, settings=ApplySettings(), **kw)
    probs = probabilities_as_float(base.probabilities[0])
    assert base.threshold == 0.5
    assert np.array_equal(np.asarray(base.mask), (probs >= 0.5).astype(np.uint8))
    net.meta.threshold = 0.25
    loaded = load_network(save_network(net, tmp_path / "t.tsnet"))
    assert loaded.meta.threshold == 0.25
    used = apply_network(loaded, volume, settings=ApplySettings(), **kw)
    assert used.threshold == 0.25
    assert np.asarray(used.mask).all()  # 0.3 everywhere reaches the network's threshold
    given_t = apply_network(loaded, volume, settings=ApplySettings(threshold=0.5), **kw)
    assert given_t.threshold == 0.5
    assert np.array_equal(np.asarray(given_t.mask), np.asarray(base.mask))


def test_a_threshold_outside_zero_one_is_refused(tmp_path):
    net = _constant_network(0.3)
    net.meta.threshold = 1.5
    with pytest.raises(TomosegError, match="'threshold' is invalid"):
        save_network(net, tmp_path / "bad.tsnet")
    assert not (tmp_path / "bad.tsnet").exists()


# -- suggested boxes --------------------------------------------------------------------------
boxes_strategy = st.lists(
    st.builds(
        Box,
        st.integers(0, 19),
        st.integers(16, 80),
        st.integers(16, 80),
        st.just(32),
    ),
    max_size=6,
)


@settings(max_examples=40, deadline=None)
@given(positives=boxes_strategy, negatives=boxes_strategy, seed=st.integers(0, 10))
def test_suggestions_never_overlap_an_existing_box_or_each_other(positives, negatives, seed):
    rng = np.random.default_rng(seed)
    probability = (rng.random((20, 96, 96)) ** 3).astype(np.float32)
    found = suggest_boxes(probability, positives, negatives, box_size=32, n=10, z_step=1)
    for s in found:
        assert not any(overlaps(s.box, b) for b in positives + negatives)
        assert 0 < s.score <= 1 and 0 < s.fired <= 1
    for i, a in enumerate(found):
        assert not any(overlaps(a.box, b.box) for b in found[i + 1 :])


def test_suggestions_are_where_the_network_fires_strongest_away_from_positives():
    p = np.zeros((30, 128, 128), np.float32)
    p[10, 10:40, 10:40] = 0.9  # a strong false detection
    p[20, 80:100, 80:100] = 0.6  # a weaker one
    p[5, 70:120, 5:60] = 0.95  # beside a positive box: the feature going on
    positive = [Box(5, 90, 40, 32)]
    found = suggest_boxes(p, positive, [], box_size=32, n=5, z_step=1)
    assert [s.box.z for s in found[:2]] == [10, 20]
    assert found[0].score > found[1].score
    assert all(s.box.z != 5 for s in found)
    uint8 = (p * 255).astype(np.uint8)
    again = suggest_boxes(
        uint8, positive, [], box_size=32, n=5, z_step=1, to_float=lambda a: a / 255
    )
    assert [s.box for s in again] == [s.box for s in found]


# -- domain-randomised simulation and joined training sets --------------------------------------
def test_random_settings_are_seeded_valid_and_varied():
    a = [random_settings(np.random.default_rng(3), (64, 64)) for _ in range(2)]
    assert a[0] == a[1]
    draws = [random_settings(np.random.default_rng(s), (64, 64)) for s in range(12)]
    low, high = RANDOM_RANGES["snr"]
    assert all(low <= d.snr <= high for d in draws)
    assert len({round(d.defocus_um, 3) for d in draws}) == 12
    assert {d.phase_flip for d in draws} == {True, False}
    sim = simulate_tomogram(draws[0])
    assert sim.tomogram.shape == draws[0].shape and np.isfinite(sim.tomogram).all()


def test_inverted_contrast_is_the_same_tomogram_negated():
    plain = simulate_tomogram(shape=(24, 64, 64), seed=4)
    inverted = simulate_tomogram(shape=(24, 64, 64), seed=4, invert_contrast=True)
    assert np.allclose(inverted.tomogram, -plain.tomogram)
    assert np.array_equal(inverted.labels, plain.labels)


def test_thicker_membranes_are_labelled_thicker():
    thin = simulate_tomogram(shape=(32, 96, 96), seed=2, membrane_thickness_nm=4.0)
    thick = simulate_tomogram(shape=(32, 96, 96), seed=2, membrane_thickness_nm=7.0)
    assert (thick.labels == 4).sum() > 1.4 * (thin.labels == 4).sum()


def test_joined_training_sets_keep_boxes_apart():
    def one(value: float, boxes: int) -> TrainingSet:
        n = 2 * boxes
        return TrainingSet(
            images=np.full((n, 1, 8, 8), value, np.float32),
            labels=np.zeros((n, 8, 8), np.uint8),
            box_ids=np.repeat(np.arange(boxes), 2).astype(np.int32),
            positive=np.zeros(n, bool),
            class_names=("background", "membrane"),
            metadata={"n_positive_boxes": 0, "n_negative_boxes": boxes, "source": str(value)},
        )

    joined = concatenate([one(1.0, 3), one(2.0, 2)])
    assert len(joined) == 10
    assert joined.box_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert joined.metadata["n_negative_boxes"] == 5
    assert joined.metadata["sources"] == ["1.0", "2.0"]
    bad = one(1.0, 1)
    bad.class_names = ("background", "other")
    with pytest.raises(TomosegError, match="same classes"):
        concatenate([one(1.0, 1), bad])


def test_half_precision_files_are_half_the_size_and_give_the_same_output(tmp_path):
    torch.manual_seed(0)
    net = Network.create("unet-lite", 1, 2)
    full = save_network(net, tmp_path / "full.tsnet")
    half = save_network(net, tmp_path / "half.tsnet", half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    x = np.random.default_rng(0).standard_normal((1, 1, 64, 64)).astype(np.float32)
    a = load_network(full).predict_proba(x)
    b = load_network(half).predict_proba(x)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 2e-3
