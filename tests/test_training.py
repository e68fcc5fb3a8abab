"""Training: real learning on procedurally generated membranes, stopping, continuing,
determinism, validation by box, metrics and the preview.

The training data are 64x64 crops of a small simulated volume: dark spherical shells
("membranes", rings of varied radii in each slice) and dark solid blobs (not labelled)
in noise.  Positive boxes are cut around the shells with their shell labels, negative boxes
from a shell-free region that still holds blobs, so the network must learn the shape, not
just the darkness.  Each box gives several rotated/flipped copies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_tomoseg.errors import TomosegError
from napari_tomoseg.folders import CACHE_ENV
from napari_tomoseg.learning.checkpoint import default_checkpoint_path, read_checkpoint_meta
from napari_tomoseg.learning.model_file import Network, load_network, save_network
from napari_tomoseg.learning.models import DEFAULT_ARCHITECTURE
from napari_tomoseg.learning.training import (
    AUTO_WEIGHT_MAX,
    LR_FLOOR,
    WARMUP_STEPS,
    TrainingPreview,
    TrainSettings,
    _Loss,
    _lr_schedule,
    auto_class_weights,
    class_metrics,
    iter_train,
    select_device,
    split_by_box,
    train,
)
from napari_tomoseg.learning.trainset import TrainingSet
from napari_tomoseg.progress import Progress

BOX = 64


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small tensors gain nothing from intra-op threads, and on a busy machine
    oversubscribed threads slow training several-fold; restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ring_volume(
    seed: int, shape=(16, 224, 352), n_shells: int = 9, label_blobs: bool = False
) -> tuple[np.ndarray, np.ndarray, int]:
    """(volume, labels, x where the shell-free region starts): shells are class 1, and
    blobs class 2 when ``label_blobs`` (else unlabelled distractors)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=np.float32)
    signal = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    free_x = shape[2] - 128
    for _ in range(n_shells):
        r = rng.uniform(10, 30)
        c = (
            rng.uniform(5, shape[0] - 5),
            rng.uniform(r + 4, shape[1] - r - 4),
            rng.uniform(r + 4, free_x - r - 4),
        )
        shell = np.abs(np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) - r) < 1.6
        signal[shell] = -1.0
        label[shell] = 1
    for _ in range(40):
        r = rng.uniform(2, 5)
        c = rng.uniform((0, 0, 0), shape)
        blob = (np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < r) & (label == 0)
        signal[blob] = -1.0
        if label_blobs:
            label[blob] = 2
    volume = ndimage.gaussian_filter(signal + rng.normal(0, 1.0, shape).astype(np.float32), 1.0)
    volume = (volume - volume.mean()) / volume.std()
    return volume.astype(np.float32), label, free_x


def ring_trainset(
    seed: int = 0,
    n_pos: int = 12,
    n_neg: int = 24,
    copies: tuple[int, int] = (8, 4),
    label_blobs: bool = False,
) -> TrainingSet:
    """Positive boxes on shells (with labels), negative boxes from the shell-free region;
    each box gives rotated/flipped copies (exact 90-degree rotations and flips)."""
    volume, label, free_x = ring_volume(seed, label_blobs=label_blobs)
    rng = np.random.default_rng(seed + 1)
    h = BOX // 2
    nz, ny, nx = volume.shape
    images, labels, box_ids, positive = [], [], [], []

    def add(zc: int, yc: int, xc: int, box_id: int, is_pos: bool, ncopy: int) -> None:
        img = volume[zc, yc - h : yc + h, xc - h : xc + h]
        lab = label[zc, yc - h : yc + h, xc - h : xc + h]
        if not is_pos:
            lab = np.zeros_like(lab)
        for k in rng.permutation(8)[:ncopy]:
            a, b = np.rot90(img, k % 4), np.rot90(lab, k % 4)
            if k >= 4:
                a, b = a[:, ::-1], b[:, ::-1]
            images.append(a[None].copy())
            labels.append(b.copy())
            box_ids.append(box_id)
            positive.append(is_pos)

    zs, ys, xs = np.nonzero(label[:, h : ny - h, h : free_x - h] == 1)
    for i, p in enumerate(rng.choice(zs.size, n_pos, replace=False)):
        add(int(zs[p]), int(ys[p]) + h, int(xs[p]) + h, i, True, copies[0])
    for j in range(n_neg):
        add(
            int(rng.integers(0, nz)),
            int(rng.integers(h, ny - h)),
            int(rng.integers(free_x + h, nx - h + 1)),
            n_pos + j,
            False,
            copies[1],
        )
    names = ("background", "membrane", "blob") if label_blobs else ("background", "membrane")
    return TrainingSet(
        images=np.stack(images).astype(np.float32),
        labels=np.stack(labels).astype(np.uint8),
        box_ids=np.asarray(box_ids, np.int32),
        positive=np.asarray(positive, bool),
        class_names=names,
        metadata={
            "box_size": BOX,
            "voxel_size": [12.0, 12.0, 12.0],
            "normalisation": {"mode": "tomogram", "clamp_sigma": 5.0, "window": BOX},
            "context_slices": 0,
            "ncopy": copies[1],
            "n_positive_boxes": n_pos,
            "n_negative_boxes": n_neg,
            "seed": seed,
        },
    )


@pytest.fixture(scope="module")
def rings() -> TrainingSet:
    return ring_trainset()


@pytest.fixture(scope="module")
def short_run(rings):
    """A short unet-lite run from random weights, with every progress event recorded."""
    events: list[Progress] = []
    settings = TrainSettings(
        architecture="unet-lite",
        start_from="scratch",
        iterations=20,
        batch_size=8,
        eval_every=10,
        preview_samples=6,
        seed=5,
        validation_fraction=0.25,
    )
    result = train(rings, settings, progress=events.append)
    return result, events, settings


# -- metrics ----------------------------------------------------------------------------


def test_class_metrics_exact_numbers():
    pred = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    target = np.array([0, 1, 1, 1, 2, 0, 0, 2])
    m = class_metrics(pred, target, 3, ("bg", "mt", "rib"))
    assert m["classes"]["bg"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    assert m["classes"]["mt"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    assert m["classes"]["rib"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    assert m["mean_foreground_f1"] == pytest.approx(7 / 12)
    assert m["pixel_accuracy"] == pytest.approx(5 / 8)


def test_class_metrics_binary_dice_and_conventions():
    pred = np.array([[1, 1, 0, 0], [0, 0, 0, 1]])
    target = np.array([[1, 0, 1, 0], [0, 0, 0, 1]])
    m = class_metrics(pred, target, 2)
    # foreground: tp 2, fp 1, fn 1 -> precision 2/3, recall 2/3, dice 4/6
    assert m["classes"]["1"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    assert m["mean_foreground_f1"] == pytest.approx(2 / 3)
    # a class neither present nor predicted is perfect and left out of the foreground mean
    m3 = class_metrics(pred, target, 3)
    assert m3["classes"]["2"]["f1"] == 1.0 and m3["classes"]["2"]["support"] == 0
    assert m3["mean_foreground_f1"] == pytest.approx(2 / 3)
    # predicted but absent scores 0
    m_fp = class_metrics(np.array([2, 0]), np.array([0, 0]), 3)
    assert m_fp["classes"]["2"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # ignored target pixels do not count
    m_ig = class_metrics(np.array([1, 0, 1]), np.array([1, 255, 255]), 2, ignore_index=255)
    assert m_ig["classes"]["1"]["f1"] == 1.0 and m_ig["pixel_accuracy"] == 1.0
    with pytest.raises(TomosegError, match="outside"):
        class_metrics(np.array([0, 3]), np.array([0, 1]), 2)


def test_auto_class_weights():
    labels = np.zeros((10, 10), np.uint8)
    labels[0] = 1  # 10 % foreground -> weight 9
    weights, counts = auto_class_weights(labels, 3)
    assert counts == [90, 10, 0]
    assert weights == [1.0, 9.0, AUTO_WEIGHT_MAX]  # absent class gets the clip value
    sparse = np.zeros(10_000, np.uint8)
    sparse[:3] = 1
    assert auto_class_weights(sparse, 2)[0] == [1.0, AUTO_WEIGHT_MAX]


def test_weighted_loss_matches_definition_and_skips_ignored_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, :] = 255
    weights = [1.0, 4.0, 9.0]
    loss = _Loss(weights, 3, torch.device("cpu"), ignore_index=255)(logits, target)
    expected = torch.nn.functional.cross_entropy(
        logits, target, weight=torch.tensor(weights), ignore_index=255
    )
    torch.testing.assert_close(loss, expected)
    # binary: one logit with pos_weight equals the two-class weighted cross-entropy
    logit = torch.randn(2, 1, 4, 5)
    y = torch.randint(0, 2, (2, 4, 5))
    two = torch.cat([torch.zeros_like(logit), logit], dim=1)
    binary = _Loss([1.0, 7.0], 1, torch.device("cpu"))(logit, y)
    reference = torch.nn.functional.cross_entropy(two, y, weight=torch.tensor([1.0, 7.0]))
    torch.testing.assert_close(binary, reference)


def test_dice_term_matches_its_definition():
    torch.manual_seed(1)
    logits = torch.randn(3, 3, 6, 7)
    target = torch.randint(0, 3, (3, 6, 7))
    target[1, 2, :] = 255
    ce = _Loss([1.0, 1.0, 1.0], 3, torch.device("cpu"), ignore_index=255)(logits, target)
    both = _Loss([1.0, 1.0, 1.0], 3, torch.device("cpu"), 255, dice_weight=0.5)(logits, target)
    # by hand: soft Dice of classes 1 and 2 over the valid pixels of the whole batch
    p = torch.softmax(logits, dim=1).permute(1, 0, 2, 3).reshape(3, -1)
    t = target.reshape(-1)
    valid = t != 255
    dices = []
    for k in (1, 2):
        pk, tk = p[k][valid], (t[valid] == k).float()
        dices.append((2 * (pk * tk).sum() + 1) / (pk.sum() + tk.sum() + 1))
    torch.testing.assert_close(both, ce + 0.5 * (1 - torch.stack(dices).mean()))
    # a binary network's single logit: the feature's probability is its sigmoid
    logit = torch.randn(2, 1, 5, 5)
    y = torch.randint(0, 2, (2, 5, 5))
    q = torch.sigmoid(logit[:, 0])
    dice = (2 * (q * y).sum() + 1) / (q.sum() + y.sum() + 1)
    ce1 = _Loss([1.0, 1.0], 1, torch.device("cpu"))(logit, y)
    with_dice = _Loss([1.0, 1.0], 1, torch.device("cpu"), dice_weight=1.0)(logit, y)
    torch.testing.assert_close(with_dice, ce1 + 1 - dice)


def test_learning_rate_schedule():
    cosine = _lr_schedule(TrainSettings(learning_rate=1e-3, iterations=2000, lr_schedule="cosine"))
    assert cosine(0) == pytest.approx(1e-3 / WARMUP_STEPS)  # warm-up from the first step
    assert cosine(WARMUP_STEPS - 1) == pytest.approx(
        1e-3 * (1 + math.cos(math.pi * 99 / 2000)) / 2 * (1 - LR_FLOOR) + 1e-3 * LR_FLOOR
    )
    assert cosine(1000) == pytest.approx(1e-3 * (LR_FLOOR + (1 - LR_FLOOR) / 2))
    assert cosine(2000) == pytest.approx(1e-3 * LR_FLOOR)
    steps = [cosine(i) for i in range(2000)]
    assert max(steps) <= 1e-3 and steps.index(max(steps)) == WARMUP_STEPS - 1
    constant = _lr_schedule(
        TrainSettings(learning_rate=2e-4, iterations=50, lr_schedule="constant")
    )
    assert [constant(i) for i in (0, 4, 5, 49)] == pytest.approx([4e-5, 2e-4, 2e-4, 2e-4])


# -- devices ----------------------------------------------------------------------------


def test_select_device():
    if not torch.cuda.is_available():
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            assert select_device("auto") == torch.device("cpu")
        with pytest.raises(TomosegError, match="CUDA"):
            select_device("cuda")
        with pytest.raises(TomosegError, match="CUDA"):
            select_device("cuda:1")
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(TomosegError, match="Unknown device"):
        select_device("tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_with_mixed_precision(rings, tmp_path):
    settings = TrainSettings(
        architecture="unet-lite", iterations=150, batch_size=16, eval_every=50, device="cuda"
    )
    result = train(rings, settings)
    assert result.device.startswith("cuda")
    assert result.metadata["mixed_precision"] is True
    assert result.metrics["mean_foreground_f1"] > 0.5
    net = load_network(save_network(result.network, tmp_path / "gpu.tsnet"), device="cuda")
    x = torch.from_numpy(rings.images[:4]).cuda()
    assert net.predict_proba(x).shape == (4, 2, BOX, BOX)


# -- settings and splitting ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"iterations": 0}, "iterations"),
        ({"batch_size": -1}, "batch_size"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"class_weights": "balanced"}, "class_weights"),
        ({"class_weights": [1.0, -2.0]}, "positive"),
        ({"architecture": "resnet"}, "available"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"model_params": {"depht": 3}}, "depht"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"checkpoint": 5}, "checkpoint must be a file path"),
        ({"dice_weight": -1.0}, "dice_weight"),
        ({"dice_weight": float("nan")}, "dice_weight"),
        ({"keep_start": 1.0}, "keep_start"),
        ({"keep_start": -0.1}, "keep_start"),
    ],
)
def test_invalid_settings_are_refused(rings, changes, message):
    with pytest.raises(TomosegError, match=message):
        next(iter_train(rings, TrainSettings(**changes)))


def test_class_weights_must_match_the_classes(rings):
    with pytest.raises(TomosegError, match="3 values"):
        next(iter_train(rings, TrainSettings(class_weights=[1.0, 2.0, 3.0])))


def test_validation_is_split_by_box(rings):
    rng = np.random.default_rng(0)
    train_idx, val_idx, info = split_by_box(rings.box_ids, rings.positive, 0.2, rng)
    assert info["held_out"] is True
    assert set(rings.box_ids[train_idx]).isdisjoint(rings.box_ids[val_idx])
    assert np.union1d(train_idx, val_idx).size == len(rings.box_ids)
    assert rings.positive[val_idx].any() and (~rings.positive[val_idx]).any()
    assert len(set(rings.box_ids[val_idx][rings.positive[val_idx]])) == round(0.2 * 12)


def test_too_few_boxes_validates_on_training_data_and_says_so(rings):
    keep = (rings.box_ids == 0) | ~rings.positive  # a single positive box
    small = rings.subset(np.flatnonzero(keep))
    with pytest.warns(UserWarning, match="training boxes"):
        result = train(
            small,
            TrainSettings(architecture="unet-lite", iterations=2, batch_size=4, eval_every=2),
        )
    assert result.metadata["validated_on"] == "training boxes"
    assert "1 positive box" in result.metadata["split"]["reason"]
    assert result.metadata["n_validation_samples"] == len(small.box_ids)


# -- the training loop ------------------------------------------------------------------


def test_progress_history_preview_and_metadata(short_run, rings):
    result, events, settings = short_run
    assert [e.step for e in events] == list(range(1, 21))
    assert all(e.stage == "train" and e.total == 20 and "loss" in e.metrics for e in events)
    eval_events = [e for e in events if "val_loss" in e.metrics]
    assert [e.step for e in eval_events] == [10, 20]
    assert {"val_dice_membrane", "val_mean_dice"} <= set(eval_events[0].metrics)
    assert [h["step"] for h in result.history] == list(range(1, 21))
    assert not result.stopped and result.device == "cpu" and result.seconds > 0
    assert result.metadata["validated_on"] == "held-out boxes"
    assert result.metadata["best_step"] in (10, 20)
    best = max(eval_events, key=lambda e: e.metrics["val_mean_dice"])
    assert result.metrics["mean_foreground_f1"] == pytest.approx(best.metrics["val_mean_dice"])
    assert set(result.metrics["classes"]) == {"background", "membrane"}

    meta = result.network.meta
    assert meta.architecture == "unet-lite" and meta.in_channels == 1 and meta.n_classes == 2
    assert meta.class_names == ("background", "membrane")
    assert meta.voxel_size == (12.0, 12.0, 12.0) and meta.box_size == BOX
    assert meta.context_slices == 0
    assert meta.normalisation == rings.metadata["normalisation"]
    assert meta.history == result.history
    assert meta.trainset_summary["n_samples"] == len(rings.box_ids)
    assert not result.network.model.training

    preview = result.preview
    assert isinstance(preview, TrainingPreview)
    n = preview.images.shape[0]
    assert n == 6 and preview.positive.sum() == 3
    assert preview.outputs.shape == (n, BOX, BOX) and preview.outputs.dtype == np.float32
    assert preview.outputs.min() >= 0 and preview.outputs.max() <= 1
    stack = preview.as_stack()
    assert stack.shape == (3 * n, BOX, BOX)
    assert stack.min() >= 0 and stack.max() <= 1
    np.testing.assert_array_equal(stack[1::3], preview.labels.astype(np.float32))
    np.testing.assert_allclose(stack[2::3], preview.outputs)
    # the preview output is the saved network's prediction
    proba = result.network.predict_proba(preview.images[:, None])
    np.testing.assert_allclose(proba[:, 1], preview.outputs, atol=1e-5)


def test_same_seed_gives_the_same_history(rings):
    settings = TrainSettings(architecture="unet-lite", iterations=6, batch_size=4, eval_every=3)
    first = train(rings, settings).history
    second = train(rings, settings).history
    assert first == second
    other = train(rings, TrainSettings(**{**settings.__dict__, "seed": 1})).history
    assert [h["loss"] for h in other] != [h["loss"] for h in first]


def test_stop_request_ends_within_one_step(rings, tmp_path):
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    gen = iter_train(
        rings,
        TrainSettings(
            architecture="unet-lite",
            iterations=500,
            batch_size=4,
            eval_every=2,
            start_from="scratch",  # no replay to simulate first (tests/test_replay.py)
        ),
        should_stop=stop_after_three,
    )
    steps = []
    try:
        while True:
            steps.append(next(gen).step)
    except StopIteration as done:
        result = done.value
    assert steps == [1, 2, 3]
    assert calls["n"] == 4  # checked before every mini-batch, stopped at the first request
    assert result.stopped and result.metadata["steps_done"] == 3
    assert result.metadata["best_step"] == 2
    path = save_network(result.network, tmp_path / "stopped.tsnet")
    loaded = load_network(path)
    x = torch.from_numpy(rings.images[:3])
    torch.testing.assert_close(loaded.predict_proba(x), result.network.predict_proba(x))


def test_stop_before_the_first_step_still_returns_a_network(rings):
    result = train(
        rings,
        TrainSettings(architecture="unet-lite", iterations=50),
        should_stop=lambda: True,
    )
    assert result.stopped and result.history == [] and result.metadata["steps_done"] == 0
    assert 0.0 <= result.metrics["mean_foreground_f1"] <= 1.0
    assert result.network.predict_proba(rings.images[:1]).shape == (1, 2, BOX, BOX)


def test_continue_training_from_a_file(short_run, rings, tmp_path):
    first, _, _ = short_run
    path = save_network(first.network, tmp_path / "first.tsnet")
    start = load_network(path)
    before = {k: v.clone() for k, v in start.model.state_dict().items()}
    settings = TrainSettings.continuing(
        start, iterations=10, batch_size=8, eval_every=5, learning_rate=1e-4, seed=3
    )
    assert settings.architecture == "unet-lite"
    kept = TrainSettings.continuing(start)
    assert kept.seed == 5 and kept.validation_fraction == 0.25  # same boxes held out
    more = train(rings, settings, init=start)
    # the starting network is untouched; the result moved on from it
    for k, v in start.model.state_dict().items():
        assert torch.equal(v, before[k])
    changed = [
        k
        for k, v in more.network.model.state_dict().items()
        if v.dtype.is_floating_point and not torch.equal(v, before[k])
    ]
    assert changed
    assert len(more.history) == 30
    assert [h["step"] for h in more.history] == list(range(1, 31))
    assert more.history[:20] == first.history
    assert more.metadata["continued_from_step"] == 20
    assert more.network.meta.history == more.history
    again = load_network(save_network(more.network, tmp_path / "second.tsnet"))
    assert len(again.meta.history) == 30


def test_settings_for_a_run_keep_what_a_continued_network_was_trained_with():
    """Where the command line and the Train widget start: the defaults for a new network;
    the network's own architecture, seed and validation split when continuing one."""
    training = {"seed": 5, "validation_fraction": 0.25}
    meta = SimpleNamespace(
        architecture="unet", model_params={"w": 8}, metrics={"training": training}
    )
    net = SimpleNamespace(meta=meta)
    fresh = TrainSettings.for_run(None, architecture="unet-lite", iterations=7)
    assert (fresh.architecture, fresh.iterations, fresh.seed) == ("unet-lite", 7, 0)
    more = TrainSettings.for_run(net, architecture="unet-lite", model_params={}, iterations=7)
    assert (more.architecture, more.model_params, more.iterations) == ("unet", {"w": 8}, 7)
    assert (more.seed, more.validation_fraction) == (5, 0.25)
    assert TrainSettings.for_run(net, seed=2).seed == 2


def test_checkpoint_lies_beside_the_output_or_per_tomogram_in_the_cache(tmp_path, monkeypatch):
    """``tomoseg train`` keeps it beside the network it writes; the Train widget, with no
    output file yet, one per tomogram in the cache (the same for the same tomogram)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert default_checkpoint_path(tmp_path / "m.tsnet") == tmp_path / "m.tsnet.ckpt"
    one = default_checkpoint_path(source="/data/a/tomo.mrc")
    assert one.parent == tmp_path / "cache" / "checkpoints" and one.name.startswith("tomo.mrc-")
    assert one == default_checkpoint_path(source="/data/a/tomo.mrc")
    assert one != default_checkpoint_path(source="/data/b/tomo.mrc")
    with pytest.raises(TypeError):
        default_checkpoint_path()


def test_continue_training_refuses_a_mismatched_network(short_run, rings):
    net = short_run[0].network
    with pytest.raises(TomosegError, match="continuing"):
        next(iter_train(rings, TrainSettings(architecture="unet"), init=net))
    renamed = rings.subset(np.arange(len(rings.box_ids)))
    renamed.class_names = ("background", "vesicle")
    with pytest.raises(TomosegError, match="classes"):
        next(iter_train(renamed, TrainSettings.continuing(net), init=net))
    three = ring_trainset(n_pos=3, n_neg=3, copies=(1, 1))
    three.images = np.repeat(three.images, 3, axis=1)
    with pytest.raises(TomosegError, match="input channel"):
        next(iter_train(three, TrainSettings.continuing(net), init=net))


def test_continuing_compares_the_in_plane_voxel_size_of_network_and_training_set(short_run, rings):
    net = short_run[0].network
    assert net.meta.voxel_size == (12.0, 12.0, 12.0)  # the training set's (Z, Y, X)
    thicker = rings.subset(np.arange(len(rings.box_ids)))
    thicker.metadata["voxel_size"] = [20.0, 12.0, 12.0]  # another Z, the same in-plane size
    run = iter_train(thicker, TrainSettings.continuing(net, iterations=1), init=net)
    assert next(run) is not None  # accepted: it started
    run.close()
    coarser = rings.subset(np.arange(len(rings.box_ids)))
    coarser.metadata["voxel_size"] = [15.0, 15.0, 15.0]
    refused = "trained at voxel size 12 A, the training set is at 15 A"
    with pytest.raises(TomosegError, match=refused):
        next(iter_train(coarser, TrainSettings.continuing(net), init=net))


def test_multiclass_training_with_ignored_pixels():
    ts = ring_trainset(n_pos=6, n_neg=6, copies=(2, 1), label_blobs=True)
    ts.labels[ts.positive, :4, :] = 255  # a strip the loss must skip
    ts.metadata["ignore_index"] = 255
    result = train(
        ts,
        TrainSettings(
            architecture="tomoseg-cnn", iterations=4, batch_size=4, eval_every=2, preview_samples=4
        ),
    )
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert set(result.metrics["classes"]) == {"background", "membrane", "blob"}
    support = sum(c["support"] for c in result.metrics["classes"].values())
    n_val = result.metadata["n_validation_samples"]
    assert support < n_val * BOX * BOX  # the ignored strip is not counted
    preview = result.preview
    n_preview = min(4, n_val)
    assert preview.probabilities.shape == (n_preview, 3, BOX, BOX)
    assert preview.probabilities.dtype == np.float16
    proba = preview.probabilities.astype(np.float32)
    chosen = np.take_along_axis(proba, preview.outputs[:, None].astype(np.int64), axis=1)[:, 0]
    np.testing.assert_allclose(chosen, proba.max(axis=1), atol=2e-3)  # float16 rounding
    stack = preview.as_stack()
    assert stack.max() <= 1.0
    ignored = preview.labels == 255
    if ignored.any():
        assert np.all(stack[1::3][ignored] == 0.5)


@pytest.mark.parametrize(
    ("arch", "iterations"),
    [
        pytest.param("unet-lite", 60, id="unet-lite"),
        pytest.param("tomoseg-cnn", 60, id="tomoseg-cnn", marks=pytest.mark.slow),
        pytest.param("unet", 40, id="unet", marks=pytest.mark.slow),
    ],
)
def test_brief_training_learns_the_membranes(rings, arch, iterations):
    """A brief CPU training reaches a held-out Dice well above chance."""
    result = train(
        rings, TrainSettings(architecture=arch, iterations=iterations, batch_size=8, eval_every=20)
    )
    assert result.metadata["validated_on"] == "held-out boxes"
    # chance: calling every pixel membrane scores 2p / (1 + p), p = membrane fraction
    counts = result.metrics["classes"]
    p = counts["membrane"]["support"] / (
        counts["membrane"]["support"] + counts["background"]["support"]
    )
    assert 2 * p / (1 + p) < 0.25
    dice = result.metrics["mean_foreground_f1"]
    assert dice > 0.5, f"{arch}: validation Dice {dice:.3f}"
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_default_architecture_is_registered_and_used(rings):
    assert TrainSettings().architecture == DEFAULT_ARCHITECTURE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = train(rings, TrainSettings(iterations=1, batch_size=2, eval_every=1))
    assert result.network.meta.architecture == DEFAULT_ARCHITECTURE


# -- checkpoints: a crashed or stopped run continues exactly ---------------------------------

#: A short run that checkpoints every 4 mini-batches and evaluates every 5, from random
#: weights (a run that starts a new network, whatever networks are shipped).
CK = dict(
    architecture="unet-lite",
    iterations=12,
    batch_size=4,
    eval_every=5,
    preview_samples=2,
    checkpoint_every=4,
    start_from="scratch",
)


def _interrupt(*, stop_after: int | None = None, crash_after: int | None = None):
    """A ``should_stop`` that asks to stop after ``stop_after`` mini-batches of this run, or
    crashes (raises, as a killed process would end the loop) after ``crash_after``."""
    calls = {"n": 0}

    def check() -> bool:
        done = calls["n"]
        calls["n"] += 1
        if crash_after is not None and done >= crash_after:
            raise RuntimeError("power cut")
        return stop_after is not None and done >= stop_after

    return check


def _assert_same_weights(a: Network, b: Network) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _arrays(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _rewrite(arrays: dict[str, np.ndarray], path):
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


@pytest.fixture(scope="module")
def uninterrupted(rings):
    """The reference: the same run, never interrupted (and never checkpointed)."""
    return train(rings, TrainSettings(**CK))


@pytest.fixture(scope="module")
def stopped_checkpoint(rings, tmp_path_factory):
    """A checkpoint of the run stopped by request after 6 mini-batches (best from step 5)."""
    path = tmp_path_factory.mktemp("ckpt") / "stopped.ckpt"
    settings = TrainSettings(**CK, checkpoint=str(path))
    result = train(rings, settings, should_stop=_interrupt(stop_after=6))
    assert result.stopped
    return path, settings


def test_a_crashed_run_resumes_to_exactly_the_uninterrupted_result(rings, uninterrupted, tmp_path):
    path = tmp_path / "run.ckpt"
    settings = TrainSettings(**CK, checkpoint=str(path))
    with pytest.raises(RuntimeError, match="power cut"):
        train(rings, settings, should_stop=_interrupt(crash_after=10))
    assert read_checkpoint_meta(path)["step"] == 8  # the last checkpoint before the crash
    events: list[Progress] = []
    resumed = train(rings, settings, resume=True, progress=events.append)
    assert [e.step for e in events] == [9, 10, 11, 12]  # mini-batches 9 and 10 are redone
    assert resumed.history == uninterrupted.history
    assert resumed.metrics == uninterrupted.metrics
    assert resumed.metadata["best_step"] == uninterrupted.metadata["best_step"]
    assert resumed.metadata["split"] == uninterrupted.metadata["split"]
    assert resumed.metadata["resumed_from_step"] == 8
    assert uninterrupted.metadata["resumed_from_step"] is None
    _assert_same_weights(resumed.network, uninterrupted.network)
    assert not resumed.stopped
    assert not path.exists()  # a finished run leaves no checkpoint behind
    with pytest.raises(TomosegError, match="no checkpoint"):
        next(iter_train(rings, settings, resume=True))


def test_a_resumed_run_holds_the_same_state_tensor_for_tensor(rings, uninterrupted, tmp_path):
    """Stopped at mini-batch 11, a run that crashed at 6 and was resumed holds, bit for bit,
    the weights, Adam moments, random generators and batch order of one never interrupted;
    resumed again from that stop it finishes as the uninterrupted run."""
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    straight = train(
        rings, TrainSettings(**CK, checkpoint=str(a)), should_stop=_interrupt(stop_after=11)
    )
    assert straight.stopped and a.exists()  # a stop request keeps the checkpoint
    settings_b = TrainSettings(**CK, checkpoint=str(b))
    with pytest.raises(RuntimeError):
        train(rings, settings_b, should_stop=_interrupt(crash_after=6))
    assert read_checkpoint_meta(b)["step"] == 4
    again = train(rings, settings_b, resume=True, should_stop=_interrupt(stop_after=7))
    assert again.stopped and again.history == straight.history
    arrays_a, arrays_b = _arrays(a), _arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    assert {k.split(":")[0] for k in arrays_a} == {
        "__meta__",
        "model",
        "best",
        "optim",
        "split",
        "batches",
        "rng",
    }
    for key in arrays_a:
        if key != "__meta__":
            assert arrays_a[key].dtype == arrays_b[key].dtype, key
            np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)
    meta_a, meta_b = (json.loads(str(x["__meta__"])) for x in (arrays_a, arrays_b))
    meta_a.pop("created"), meta_b.pop("created")
    assert meta_a == meta_b and meta_a["step"] == 11
    finished = train(rings, settings_b, resume=True)
    assert finished.history == uninterrupted.history
    _assert_same_weights(finished.network, uninterrupted.network)
    assert not b.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_crashed_cuda_run_with_mixed_precision_resumes(rings, tmp_path):
    path = tmp_path / "gpu.ckpt"
    settings = TrainSettings(**{**CK, "device": "cuda"}, checkpoint=str(path))
    with pytest.raises(RuntimeError, match="power cut"):
        train(rings, settings, should_stop=_interrupt(crash_after=6))
    arrays = _arrays(path)
    meta = json.loads(str(arrays["__meta__"]))
    assert "rng:cuda" in arrays and meta["device"].startswith("cuda")
    assert meta["step"] == 4 and meta["scaler"]["scale"] > 0  # the AMP scaler is kept
    resumed = train(rings, settings, resume=True)
    assert resumed.metadata["mixed_precision"] is True
    assert resumed.metadata["resumed_from_step"] == 4
    assert [h["step"] for h in resumed.history] == list(range(1, 13))
    assert all(np.isfinite(h["loss"]) for h in resumed.history)
    assert not path.exists()


def test_a_checkpoint_of_another_run_is_refused(rings, stopped_checkpoint):
    path, settings = stopped_checkpoint
    before = path.read_bytes()
    n = len(rings.box_ids)
    repainted = rings.subset(np.arange(n))
    repainted.labels[0, 0, 0] ^= 1  # one pixel painted differently
    with pytest.raises(TomosegError, match="training set differs in its painted labels") as info:
        next(iter_train(repainted, settings, resume=True))
    assert str(path) in str(info.value) and "delete the checkpoint" in str(info.value)
    with pytest.raises(TomosegError, match="number of samples"):
        next(iter_train(rings.subset(np.arange(n - 4)), settings, resume=True))
    with pytest.raises(TomosegError, match="learning_rate was 0.001, now 0.0005"):
        next(iter_train(rings, dataclasses.replace(settings, learning_rate=5e-4), resume=True))
    with pytest.raises(TomosegError, match="iterations was 12, now 20"):
        next(iter_train(rings, dataclasses.replace(settings, iterations=20), resume=True))
    other = Network.create("unet-lite", 1, 2, class_names=rings.class_names)
    with pytest.raises(TomosegError, match="continues one"):
        next(iter_train(rings, settings, init=other, resume=True))
    with pytest.raises(TomosegError, match="TrainSettings.checkpoint"):
        next(iter_train(rings, dataclasses.replace(settings, checkpoint=None), resume=True))
    assert path.read_bytes() == before  # a refused resume leaves the checkpoint alone


def _damage(path, tmp_path, how: str):
    arrays = _arrays(path)
    meta = json.loads(str(arrays["__meta__"]))
    weight = next(k for k in arrays if k.startswith("model:") and arrays[k].ndim == 4)
    bad = tmp_path / f"{how.replace(' ', '_')}.ckpt"
    if how == "truncated":
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "a byte changed":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        bad.write_bytes(bytes(data))
    elif how == "not a zip":
        bad.write_text("checkpoint")
    elif how == "a network file":
        arrays["__meta__"] = np.array(json.dumps({**meta, "format": "napari-tomoseg-network"}))
        _rewrite(arrays, bad)
    elif how == "another format version":
        arrays["__meta__"] = np.array(json.dumps({**meta, "format_version": 99}))
        _rewrite(arrays, bad)
    elif how == "a weight of another shape":
        arrays[weight] = arrays[weight][:1]
        _rewrite(arrays, bad)
    elif how == "a NaN weight":
        arrays[weight] = np.full_like(arrays[weight], np.nan)
        _rewrite(arrays, bad)
    elif how == "a missing Adam moment":
        del arrays[next(k for k in arrays if k.startswith("optim:"))]
        _rewrite(arrays, bad)
    elif how == "an impossible step":
        arrays["__meta__"] = np.array(json.dumps({**meta, "step": 500}))
        _rewrite(arrays, bad)
    elif how == "indices off the training set":
        arrays["batches:order"] = arrays["batches:order"] + 10_000
        _rewrite(arrays, bad)
    elif how == "a malformed random state":
        arrays["__meta__"] = np.array(json.dumps({**meta, "rng": {"bit_generator": "MT19937"}}))
        _rewrite(arrays, bad)
    return bad


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "not a .ckpt zip archive"),
        ("a byte changed", "Cannot"),
        ("not a zip", "not a .ckpt zip archive"),
        ("a network file", "format marker"),
        ("another format version", "format version 99"),
        ("a weight of another shape", "has shape"),
        ("a NaN weight", "NaN"),
        ("a missing Adam moment", "missing"),
        ("an impossible step", "step count 500"),
        ("indices off the training set", "outside the training set"),
        ("a malformed random state", "does not fit this run"),
    ],
)
def test_a_damaged_checkpoint_is_refused_cleanly(
    rings, stopped_checkpoint, tmp_path, how, message
):
    path, settings = stopped_checkpoint
    bad = _damage(path, tmp_path, how)
    with pytest.raises(TomosegError, match=message) as info:
        next(iter_train(rings, dataclasses.replace(settings, checkpoint=str(bad)), resume=True))
    assert str(bad) in str(info.value)


def test_a_pickled_payload_in_a_checkpoint_never_runs(rings, stopped_checkpoint, tmp_path):
    from test_model_file import MARKER_NAME, _Exploit

    path, settings = stopped_checkpoint
    marker = tmp_path / MARKER_NAME
    arrays = _arrays(path)
    keys = ["__meta__", next(k for k in arrays if k.startswith("model:")), "rng:torch"]
    keys.append(next(k for k in arrays if k.startswith("optim:")))
    for key in keys:
        evil = np.empty(() if key == "__meta__" else (1,), dtype=object)
        evil[() if key == "__meta__" else 0] = _Exploit(marker)
        bad = _rewrite({**arrays, key: evil}, tmp_path / f"evil_{key.replace(':', '_')}.ckpt")
        with zipfile.ZipFile(bad) as zf:  # the payload really is a pickle in the archive
            assert b"write_text" in zf.read(key + ".npy")
        with pytest.raises(TomosegError, match="pickled"):
            next(
                iter_train(rings, dataclasses.replace(settings, checkpoint=str(bad)), resume=True)
            )
        assert not marker.exists(), key
    # control: a loader that unpickles would have run it
    with np.load(bad, allow_pickle=True) as npz:
        npz[keys[-1]]
    assert marker.read_text() == "pwned"


def test_a_checkpoint_that_cannot_be_written_warns_and_training_goes_on(rings, tmp_path):
    settings = TrainSettings(
        architecture="unet-lite",
        iterations=3,
        batch_size=4,
        eval_every=3,
        checkpoint=str(tmp_path / "missing-folder" / "run.ckpt"),
        checkpoint_every=1,
    )
    with pytest.warns(UserWarning, match="Could not write the training checkpoint"):
        result = train(rings, settings)
    assert len(result.history) == 3 and not result.stopped
