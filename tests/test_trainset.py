"""Training-set building (balance, augmentation, normalisation) and the saved file."""

from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import pytest

from napari_tomoseg.data.boxes import Box, crop
from napari_tomoseg.data.preprocess import Normalisation, robust_stats
from napari_tomoseg.errors import TomosegError, TomosegIOError
from napari_tomoseg.learning.trainset import (
    IGNORE_INDEX,
    TRAINSET_FORMAT,
    TrainingSet,
    TrainsetSettings,
    build_training_set,
    copies_per_box,
)

SIZE = 32
SHAPE = (16, 160, 160)
# (z, y, x, radius, label): spheres fully inside their boxes
SPHERES = [(8, 40, 40, 9, 1), (5, 40, 120, 8, 1), (10, 120, 40, 10, 2), (8, 118, 121, 7, 1)]


def make_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy volume with bright spheres and their labels (values 1 and 2)."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(0.0, 1.0, size=SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    for cz, cy, cx, r, value in SPHERES:
        inside = (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r**2
        volume[inside] += 4.0
        labels[inside] = value
    return volume, labels


def positive_boxes() -> list[Box]:
    return [Box(cz, cy, cx, SIZE) for cz, cy, cx, _, _ in SPHERES]


def negative_boxes(n: int = 5) -> list[Box]:
    spots = [(2, 80, 80), (14, 80, 20), (8, 20, 80), (3, 140, 80), (12, 80, 140), (1, 20, 20)]
    return [Box(z, y, x, SIZE) for z, y, x in spots[:n]]


@pytest.fixture(scope="module")
def tomogram() -> tuple[np.ndarray, np.ndarray]:
    return make_volume()


def build(tomogram, positive=None, negative=None, **changes) -> TrainingSet:
    volume, labels = tomogram
    # single slices unless a test asks for context (the default takes 2)
    settings = TrainsetSettings(**{"box_size": SIZE, "ncopy": 4, "context_slices": 0, **changes})
    return build_training_set(
        volume,
        labels,
        positive_boxes() if positive is None else positive,
        negative_boxes() if negative is None else negative,
        settings,
        voxel_size=8.0,
        source="synthetic",
    )


# -- counts and balance --------------------------------------------------------------------------
def test_copies_follow_the_eman2_balance_rule() -> None:
    assert copies_per_box(10, 100, 10) == (100, 10)
    assert copies_per_box(3, 7, 4) == (9, 4)
    assert copies_per_box(50, 2, 10) == (1, 10)  # at least one copy per positive
    assert copies_per_box(4, 0, 10) == (10, 10)  # no negatives: ncopy per positive
    with pytest.raises(TomosegError, match="positive"):
        copies_per_box(0, 10, 10)


def test_counts_ids_and_shapes(tomogram) -> None:
    ts = build(tomogram)
    n_pos, n_neg = 4, 5
    per_pos, per_neg = 4 * n_neg // n_pos, 4
    assert len(ts) == n_pos * per_pos + n_neg * per_neg
    assert ts.images.shape == (len(ts), 1, SIZE, SIZE) and ts.images.dtype == np.float32
    assert ts.labels.shape == (len(ts), SIZE, SIZE) and ts.labels.dtype == np.uint8
    assert ts.box_ids.dtype == np.int32 and ts.positive.dtype == np.bool_
    assert np.bincount(ts.box_ids).tolist() == [per_pos] * n_pos + [per_neg] * n_neg
    assert ts.positive.sum() == n_pos * per_pos
    assert np.array_equal(ts.positive, ts.box_ids < n_pos)
    assert ts.metadata["copies_per_positive"] == per_pos
    assert ts.metadata["n_positive_boxes"] == n_pos and ts.metadata["n_negative_boxes"] == n_neg
    summary = ts.summary()
    assert summary["n_samples"] == len(ts) and summary["in_channels"] == 1


def test_without_negatives_each_positive_gets_ncopy(tomogram) -> None:
    ts = build(tomogram, negative=[])
    assert len(ts) == 4 * 4 and ts.positive.all()


def test_negatives_are_all_background_even_where_painted(tomogram) -> None:
    volume, labels = tomogram
    painted_negative = Box(8, 40, 40, SIZE)  # the first sphere, boxed as a negative
    ts = build(tomogram, negative=[painted_negative, *negative_boxes(2)])
    negatives = ts.labels[~ts.positive]
    assert negatives.size and not negatives.any()
    assert ts.labels[ts.positive].any()


# -- augmentation --------------------------------------------------------------------------------
def test_without_augmentation_copies_equal_the_normalised_crop(tomogram) -> None:
    volume, labels = tomogram
    ts = build(tomogram, rotate=False, flip=False, clamp_sigma=None)
    mean, std = robust_stats(volume)
    for k in np.flatnonzero(ts.box_ids == 2):
        box = positive_boxes()[2]
        expected = (crop(volume, box).astype(np.float64) - mean) / std
        np.testing.assert_allclose(ts.images[k], expected, atol=1e-4)
        np.testing.assert_array_equal(ts.labels[k], crop(labels, box)[0])


def test_augmentation_changes_the_copies(tomogram) -> None:
    ts = build(tomogram)
    for box_id in range(9):
        copies = ts.images[ts.box_ids == box_id]
        differences = [not np.allclose(copies[0], c, atol=1e-3) for c in copies[1:]]
        assert all(differences)


def test_flips_alone_mirror_the_crop(tomogram) -> None:
    volume, _ = tomogram
    ts = build(tomogram, rotate=False, clamp_sigma=None, ncopy=8)
    box = positive_boxes()[0]
    original = ts.normalisation.apply_with_stats(crop(volume, box), *robust_stats(volume))[0]
    for image in ts.images[ts.box_ids == 0]:
        assert np.allclose(image[0], original, atol=1e-4) or np.allclose(
            image[0], original[:, ::-1], atol=1e-4
        )


def test_rotation_keeps_label_values_and_painted_fraction(tomogram) -> None:
    _, labels = tomogram
    ts = build(tomogram, ncopy=8)
    assert set(np.unique(ts.labels)) <= {0, 1, 2}
    for box_id, box in enumerate(positive_boxes()):
        original = crop(labels, box)[0]
        before = np.count_nonzero(original) / original.size
        after = [np.count_nonzero(lab) / lab.size for lab in ts.labels[ts.box_ids == box_id]]
        assert np.allclose(after, before, rtol=0.08)
        values = set(np.unique(ts.labels[ts.box_ids == box_id]))
        assert values == set(np.unique(original))  # each sphere keeps its own class


def test_image_and_label_rotate_together(tomogram) -> None:
    ts = build(tomogram, ncopy=8)
    for image, label in zip(ts.images[ts.positive], ts.labels[ts.positive]):
        inside, outside = image[0][label > 0], image[0][label == 0]
        assert inside.mean() - outside.mean() > 1.5  # bright spheres sit on their labels


def test_an_asymmetric_feature_stays_on_its_labels() -> None:
    volume = np.zeros((3, 96, 96), dtype=np.float32)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[1, 46:50, 50:70] = 1  # a bar to the right of the centre and a block up left
    labels[1, 30:36, 34:40] = 1
    volume[labels > 0] = 1.0
    settings = TrainsetSettings(box_size=SIZE, ncopy=12, clamp_sigma=None)
    ts = build_training_set(volume, labels, [Box(1, 48, 48, SIZE)], [], settings)
    own = ts.images.shape[1] // 2  # the box's own slice among the context slices
    for image, label in zip(ts.images[:, own], ts.labels):
        correlation = np.corrcoef(image.ravel(), label.ravel().astype(float))[0, 1]
        assert correlation > 0.9


def test_same_seed_same_set_other_seed_other_set(tomogram) -> None:
    first, second = build(tomogram, seed=3), build(tomogram, seed=3)
    assert np.array_equal(first.images, second.images)
    assert np.array_equal(first.labels, second.labels)
    other = build(tomogram, seed=4)
    assert not np.allclose(first.images, other.images)


def test_boxes_at_the_volume_edge_are_completed_by_reflection(tomogram) -> None:
    volume, labels = tomogram
    corner = [Box(0, SIZE // 2, SIZE // 2, SIZE)]
    labels = labels.copy()
    labels[0, 5:12, 5:12] = 1
    ts = build_training_set(volume, labels, corner, [], TrainsetSettings(box_size=SIZE, ncopy=6))
    assert np.all(np.isfinite(ts.images))
    assert len(ts) == 6 and ts.labels.any(axis=(1, 2)).all()


# -- normalisation and channels -------------------------------------------------------------------
def test_tomogram_normalisation_is_recorded(tomogram) -> None:
    volume, _ = tomogram
    ts = build(tomogram)
    assert ts.metadata["normalisation"] == {"mode": "tomogram", "clamp_sigma": 5.0, "window": SIZE}
    assert ts.normalisation == Normalisation("tomogram", 5.0, SIZE)
    stats = ts.metadata["tomogram_stats"]
    assert (stats["mean"], stats["std"]) == robust_stats(volume)
    assert np.abs(ts.images).max() <= 5.0


def test_box_normalisation_gives_each_sample_zero_mean_unit_std(tomogram) -> None:
    ts = build(tomogram, normalisation="box", clamp_sigma=None)
    assert ts.metadata["tomogram_stats"] is None
    assert ts.normalisation.mode == "box"
    np.testing.assert_allclose(ts.images.mean(axis=(1, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(ts.images.std(axis=(1, 2, 3)), 1.0, atol=1e-3)


def test_context_slices_become_channels(tomogram) -> None:
    volume, labels = tomogram
    box = Box(1, 40, 40, SIZE)
    labels = labels.copy()
    labels[1, 35:45, 35:45] = 1
    settings = TrainsetSettings(
        box_size=SIZE, ncopy=2, context_slices=2, rotate=False, flip=False, clamp_sigma=None
    )
    ts = build_training_set(volume, labels, [box], [], settings)
    assert ts.in_channels == 5 and ts.metadata["context_slices"] == 2
    mean, std = robust_stats(volume)
    expected = (crop(volume, box, context_slices=2).astype(np.float64) - mean) / std
    np.testing.assert_allclose(ts.images[0], expected, atol=1e-4)
    np.testing.assert_array_equal(ts.images[0][0], ts.images[0][1])  # z=-1 repeats z=0


# -- classes -------------------------------------------------------------------------------------
def test_multi_class_labels_make_one_multi_class_set(tomogram) -> None:
    ts = build(tomogram)
    assert ts.n_classes == 3
    assert ts.class_names == ("background", "feature 1", "feature 2")
    counts = ts.metadata["class_pixel_counts"]
    assert len(counts) == 3 and all(c > 0 for c in counts)
    assert counts == ts.class_pixel_counts().tolist()


def test_binary_labels_and_given_class_names(tomogram) -> None:
    volume, labels = tomogram
    binary = build(tomogram, positive=positive_boxes()[:2])
    assert binary.class_names == ("background", "feature") and binary.n_classes == 2
    named = build_training_set(
        volume,
        labels,
        positive_boxes()[:2],
        [],
        TrainsetSettings(box_size=SIZE, ncopy=2),
        class_names=["background", "membrane", "ribosome", "carbon"],
    )
    assert named.n_classes == 4 and named.metadata["class_pixel_counts"][3] == 0
    with pytest.raises(TomosegError, match="hold label 2, but only 2 classes are named"):
        build_training_set(
            volume,
            labels,
            positive_boxes(),
            [],
            TrainsetSettings(box_size=SIZE),
            class_names=["background", "membrane"],
        )


def test_ignore_mode_marks_only_unpainted_pixels_from_outside_the_box(tomogram) -> None:
    plain = build(tomogram, outside_box="ignore", rotate=False)
    assert plain.ignore_index == IGNORE_INDEX
    assert not (plain.labels == IGNORE_INDEX).any()  # no rotation: nothing from outside
    rotated = build(tomogram, outside_box="ignore", ncopy=8)
    positives, negatives = rotated.labels[rotated.positive], rotated.labels[~rotated.positive]
    assert (positives == IGNORE_INDEX).any()
    assert not negatives.any()
    assert set(np.unique(positives)) <= {0, 1, 2, IGNORE_INDEX}
    centre = positives[:, SIZE // 2 - 8 : SIZE // 2 + 8, SIZE // 2 - 8 : SIZE // 2 + 8]
    assert not (centre == IGNORE_INDEX).any()  # the box's middle always comes from inside


# -- errors --------------------------------------------------------------------------------------
def test_input_errors(tomogram) -> None:
    volume, labels = tomogram
    settings = TrainsetSettings(box_size=SIZE)
    with pytest.raises(TomosegError, match="place at least one positive box"):
        build_training_set(volume, labels, [], negative_boxes(), settings)
    empty = [*positive_boxes()[:2], Box(3, 80, 80, SIZE)]
    with pytest.raises(
        TomosegError,
        match="Positive box 3 at z=3, y=80, x=80 has no painted voxels; paint the feature "
        "inside it or remove the box",
    ):
        build_training_set(volume, labels, empty, [], settings)
    with pytest.raises(TomosegError, match="do not match the tomogram"):
        build_training_set(volume, labels[:, :100], positive_boxes(), [], settings)
    with pytest.raises(TomosegError, match="3D"):
        build_training_set(volume[0], labels[0], positive_boxes(), [], settings)
    with pytest.raises(TomosegError, match="smaller than a 32 px box"):
        build_training_set(volume[:, :20], labels[:, :20], [Box(0, 10, 10, SIZE)], [], settings)
    with pytest.raises(TomosegError, match="training box size is 64 px"):
        build_training_set(volume, labels, positive_boxes(), [], TrainsetSettings())
    with pytest.raises(TomosegError, match="Negative box 1 .* off the volume"):
        build_training_set(volume, labels, positive_boxes(), [Box(0, 5, 80, SIZE)], settings)
    with pytest.raises(TomosegError, match="negative"):
        build_training_set(volume, labels.astype(np.int16) - 1, positive_boxes(), [], settings)


def test_nan_in_a_crop_is_reported(tomogram) -> None:
    volume, labels = tomogram
    broken = volume.copy()
    broken[2, 80, 80] = np.nan
    with pytest.raises(TomosegError, match="Negative box 1 at z=2, y=80, x=80 has NaN or Inf"):
        build_training_set(
            broken, labels, positive_boxes(), negative_boxes(), TrainsetSettings(box_size=SIZE)
        )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ncopy": 0}, "ncopy"),
        ({"box_size": 2}, "box_size"),
        ({"context_slices": -1}, "context_slices"),
        ({"normalisation": "slice"}, "normalisation mode"),
        ({"clamp_sigma": -2.0}, "clamp_sigma"),
        ({"outside_box": "drop"}, "outside_box"),
    ],
)
def test_settings_are_validated(changes, message) -> None:
    with pytest.raises(TomosegError, match=message):
        TrainsetSettings(**changes).validate()


def test_memmap_input(tmp_path, tomogram) -> None:
    volume, labels = tomogram
    path = tmp_path / "vol.raw"
    mapped = np.memmap(path, dtype=np.float32, mode="w+", shape=volume.shape)
    mapped[:] = volume
    mapped.flush()
    ro = np.memmap(path, dtype=np.float32, mode="r", shape=volume.shape)
    from_disk = build((ro, labels))
    assert np.array_equal(from_disk.images, build(tomogram).images)


# -- the file ------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, tomogram) -> None:
    ts = build(tomogram, context_slices=1)
    path = ts.save(tmp_path / "membranes")
    assert path.name == "membranes.npz" and path.is_file()
    back = TrainingSet.load(path)
    for name in ("images", "labels", "box_ids", "positive"):
        original, loaded = getattr(ts, name), getattr(back, name)
        assert loaded.dtype == original.dtype
        assert np.array_equal(loaded, original)
    assert back.class_names == ts.class_names
    assert back.metadata == ts.metadata
    assert back.metadata["voxel_size"] == [8.0, 8.0, 8.0]
    assert back.metadata["source"] == "synthetic"
    assert back.in_channels == 3
    with pytest.raises(TomosegIOError, match="already exists"):
        ts.save(path)
    ts.save(path, overwrite=True)


def test_a_pickled_object_array_is_refused(tmp_path, tomogram) -> None:
    ts = build(tomogram, positive=positive_boxes()[:1], negative=[], ncopy=1)
    path = tmp_path / "evil.npz"
    np.savez(
        path,
        format=np.array(TRAINSET_FORMAT),
        version=np.array(1),
        images=ts.images,
        labels=ts.labels,
        box_ids=ts.box_ids,
        positive=ts.positive,
        class_names=np.array(ts.class_names, dtype=object),
        metadata=np.array(json.dumps(ts.metadata)),
    )
    with pytest.raises(TomosegIOError, match="pickled Python objects"):
        TrainingSet.load(path)
    plain_pickle = tmp_path / "plain.npz"
    plain_pickle.write_bytes(pickle.dumps({"images": ts.images}))
    with pytest.raises(TomosegIOError, match="pickled Python objects"):
        TrainingSet.load(plain_pickle)


def test_foreign_corrupt_and_newer_files_are_refused(tmp_path, tomogram) -> None:
    foreign = tmp_path / "other.npz"
    np.savez(foreign, x=np.zeros(3))
    with pytest.raises(TomosegIOError, match="not a napari-tomoseg training set"):
        TrainingSet.load(foreign)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 this is not really a zip file")
    with pytest.raises(TomosegIOError, match="damaged"):
        TrainingSet.load(garbage)
    with pytest.raises(TomosegIOError, match="does not exist"):
        TrainingSet.load(tmp_path / "missing.npz")
    ts = build(tomogram, positive=positive_boxes()[:1], negative=[], ncopy=1)
    path = ts.save(tmp_path / "ok.npz")
    newer = tmp_path / "newer.npz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(newer, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == "version.npy":
                with dst.open(item, "w") as handle:
                    np.lib.format.write_array(handle, np.array(99))
            else:
                dst.writestr(item, data)
    with pytest.raises(TomosegIOError, match="newer napari-tomoseg"):
        TrainingSet.load(newer)


def test_inconsistent_arrays_are_refused(tomogram) -> None:
    ts = build(tomogram, positive=positive_boxes()[:1], negative=[], ncopy=2)
    with pytest.raises(TomosegError, match="float32"):
        TrainingSet(
            ts.images.astype(np.float64),
            ts.labels,
            ts.box_ids,
            ts.positive,
            ts.class_names,
            ts.metadata,
        )
    with pytest.raises(TomosegError, match="values >= the number of classes"):
        TrainingSet(ts.images, ts.labels + 5, ts.box_ids, ts.positive, ts.class_names, ts.metadata)
    half = ts.subset(np.array([1]))
    assert len(half) == 1 and np.array_equal(half.images[0], ts.images[1])
