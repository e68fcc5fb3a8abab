"""OME-Zarr tomograms and lazy data (dask arrays, multiscale layers) through reading, apply,
merge and pick: the same results as the in-memory path, and never the whole volume read."""

from __future__ import annotations

import mmap

import dask.array as da
import numpy as np
import psutil
import pytest
import torch
import zarr

from napari_tomoseg import cli
from napari_tomoseg._reader import get_reader
from napari_tomoseg.applying.inference import apply_network
from napari_tomoseg.applying.merge import MergeInput, merge_probability_maps
from napari_tomoseg.applying.picking import PickSettings, pick
from napari_tomoseg.data.io import mrc_stem, read_tomogram, release_pages, write_mrc
from napari_tomoseg.data.preprocess import _BLOCK_ELEMENTS, robust_stats
from napari_tomoseg.errors import MissingVoxelSizeWarning, TomosegIOError
from napari_tomoseg.learning.model_file import Network, save_network

VOXEL = 13.48
ZARR3 = int(zarr.__version__.split(".")[0]) >= 3


def write_portal_zarr(path, volume, voxel=VOXEL, unit="angstrom", levels=3, **attrs):
    """An OME-Zarr as the CryoET Data Portal stores tomograms: OME-NGFF 0.4 on Zarr format 2,
    levels "0", "1", "2" (each binned by 2), axes z, y, x of type space in ``unit``, one
    scale transformation per level.  ``attrs`` replace entries of the multiscales entry."""
    group = zarr.open_group(str(path), mode="w", **({"zarr_format": 2} if ZARR3 else {}))
    make = getattr(group, "create_array", None) or group.create_dataset
    datasets = []
    level = np.asarray(volume)
    for k in range(levels):
        arr = make(str(k), shape=level.shape, dtype=level.dtype, chunks=(4, 32, 32))
        arr[...] = level
        scale = [voxel * 2**k] * 3
        datasets.append(
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
        level = level[::2, ::2, ::2]
    entry = {
        "version": "0.4",
        "name": "/",
        "axes": [{"name": a, "type": "space", "unit": unit} for a in "zyx"],
        "datasets": datasets,
        "metadata": {},
        **attrs,
    }
    group.attrs["multiscales"] = [entry]
    return path


def blob_volume(shape=(12, 70, 90), seed=0):
    """Bright spheres on a noisy background (float32) and their labels."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    labels = np.zeros(shape, dtype=np.uint8)
    for _ in range(6):
        c = rng.uniform([0, 8, 8], [shape[0], shape[1] - 8, shape[2] - 8])
        r = rng.uniform(4, 7)
        labels[((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= r * r] = 1
    volume = labels * 2.0 + rng.normal(0, 0.3, shape)
    return volume.astype(np.float32), labels


def tiny_network(seed=0):
    """A small untrained tomoseg-cnn (4 kernels of 5x5): weights do not matter here."""
    torch.manual_seed(seed)
    return Network.create(
        "tomoseg-cnn",
        1,
        2,
        model_params={"n_kernels": [4, 4], "kernel_size": 5},
        voxel_size=VOXEL,
        box_size=32,
        normalisation={"mode": "tomogram", "clamp_sigma": 5.0},
        threshold=0.5,
    )


class WholeRefused:
    """A dask array that refuses to become one numpy array, and any read larger than the
    blocks the core promises to read: slicing it gives dask arrays of the slices."""

    def __init__(self, array):
        self.array = array
        self.shape, self.dtype, self.ndim, self.size = array.shape, array.dtype, 3, array.size
        self.largest = 0

    def __getitem__(self, key):
        part = self.array[key]
        assert part.size <= _BLOCK_ELEMENTS, f"a read of {part.size} voxels at once"
        self.largest = max(self.largest, part.size)
        return part

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole volume was read into memory")


# -- reading -------------------------------------------------------------------------------------
def test_portal_layout_opens_lazily_at_its_voxel_size(tmp_path):
    volume, _ = blob_volume()
    path = write_portal_zarr(tmp_path / "TS_026.zarr", volume)
    assert (path / ".zattrs").is_file() and (path / "0" / ".zarray").is_file()  # Zarr format 2
    tomo = read_tomogram(path)
    assert not isinstance(tomo.data, np.ndarray)  # lazy: read when sliced
    assert tomo.voxel_size == pytest.approx((VOXEL,) * 3)
    assert tomo.scale == pytest.approx((VOXEL,) * 3)
    assert [level.shape for level in tomo.levels] == [(12, 70, 90), (6, 35, 45), (3, 18, 23)]
    np.testing.assert_array_equal(np.asarray(tomo.data[3:5]), volume[3:5])
    assert tomo.metadata()["source_format"] == "ome-zarr"
    assert tomo.metadata()["voxel_size_unit"] == "angstrom"
    assert mrc_stem(path) == "TS_026" and mrc_stem(tmp_path / "a.ome.zarr") == "a"


def test_units_and_translation_become_angstrom(tmp_path):
    volume, _ = blob_volume()
    path = write_portal_zarr(
        tmp_path / "nm.zarr",
        volume,
        voxel=0.5,
        unit="nanometer",
        levels=1,
        coordinateTransformations=[{"type": "scale", "scale": [2.0, 1.0, 1.0]}],
    )
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs)
    attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"] = [
        {"type": "scale", "scale": [0.5, 0.6, 0.7]},
        {"type": "translation", "translation": [1.0, 2.0, 3.0]},
    ]
    group.attrs["multiscales"] = attrs["multiscales"]
    tomo = read_tomogram(path)
    assert tomo.voxel_size == pytest.approx((10.0, 6.0, 7.0))  # nm -> A, times the outer scale
    assert tomo.origin == pytest.approx((20.0, 20.0, 30.0))
    assert tomo.levels == [tomo.data]


def _channel_zarr(path, data):
    """An OME-Zarr of one level with a channel axis first, in micrometres."""
    group = zarr.open_group(str(path), mode="w", **({"zarr_format": 2} if ZARR3 else {}))
    make = getattr(group, "create_array", None) or group.create_dataset
    make("0", shape=data.shape, dtype=data.dtype, chunks=data.shape)[...] = data
    axes = [{"name": "c", "type": "channel"}]
    axes += [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    transform = {"type": "scale", "scale": [1.0, 0.001, 0.001, 0.001]}
    datasets = [{"path": "0", "coordinateTransformations": [transform]}]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    return path


def test_a_single_channel_axis_is_dropped_and_several_are_refused(tmp_path):
    volume, _ = blob_volume()
    tomo = read_tomogram(_channel_zarr(tmp_path / "c1.zarr", volume[None]))
    assert tomo.data.shape == volume.shape and not isinstance(tomo.data, np.ndarray)
    assert tomo.voxel_size == pytest.approx((10.0, 10.0, 10.0))  # 1 nm, from micrometres
    np.testing.assert_array_equal(np.asarray(tomo.data[2:4]), volume[2:4])
    two = _channel_zarr(tmp_path / "c2.zarr", np.stack([volume, volume]))
    with pytest.raises(TomosegIOError, match=r"several images \(axes \['c'\] of lengths \(2,\)"):
        read_tomogram(two)


def test_a_plain_zarr_array_opens_without_voxel_size(tmp_path):
    volume, _ = blob_volume()
    zarr.save_array(str(tmp_path / "plain.zarr"), volume)
    with pytest.warns(MissingVoxelSizeWarning):
        tomo = read_tomogram(tmp_path / "plain.zarr")
    assert tomo.voxel_size is None
    np.testing.assert_array_equal(np.asarray(tomo.data[:]), volume)


def test_bad_zarr_stores_get_errors_naming_the_problem(tmp_path):
    volume, _ = blob_volume()
    with pytest.raises(TomosegIOError, match="does not exist"):
        read_tomogram(tmp_path / "missing.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(TomosegIOError, match="not a Zarr store"):
        read_tomogram(tmp_path / "empty.zarr")
    zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    with pytest.raises(TomosegIOError, match="multiscales"):
        read_tomogram(tmp_path / "group.zarr")
    axes = [{"name": a, "type": "space", "unit": "angstrom"} for a in "xyz"]
    write_portal_zarr(tmp_path / "axes.zarr", volume, levels=1, axes=axes)
    with pytest.raises(TomosegIOError, match=r"axes are \['x', 'y', 'z'\]"):
        read_tomogram(tmp_path / "axes.zarr")
    write_portal_zarr(tmp_path / "unit.zarr", volume, levels=1, unit="second")
    with pytest.raises(TomosegIOError, match="'second', not a length unit"):
        read_tomogram(tmp_path / "unit.zarr")
    gone = write_portal_zarr(tmp_path / "gone.zarr", volume, levels=2)
    for item in (gone / "1").iterdir():
        item.unlink()
    (gone / "1").rmdir()
    with pytest.raises(TomosegIOError, match="level '1' named in its metadata is missing"):
        read_tomogram(gone)


def test_the_napari_reader_gives_a_multiscale_layer(tmp_path):
    volume, _ = blob_volume()
    path = write_portal_zarr(tmp_path / "TS_1.zarr", volume)
    reader = get_reader(str(path))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(path))
    assert kind == "image" and kwargs["multiscale"] is True
    assert [d.shape for d in data] == [(12, 70, 90), (6, 35, 45), (3, 18, 23)]
    assert kwargs["scale"] == pytest.approx((VOXEL,) * 3)
    assert kwargs["metadata"]["voxel_size"] == pytest.approx((VOXEL,) * 3)


# -- lazy arrays in the core -------------------------------------------------------------------
def test_robust_stats_of_a_lazy_volume_read_the_same_rows():
    volume, _ = blob_volume()
    lazy = da.from_array(volume, chunks=(4, 35, 45))
    assert robust_stats(lazy, sample=3000) == robust_stats(volume, sample=3000)
    assert robust_stats(WholeRefused(lazy), sample=3000) == robust_stats(volume, sample=3000)


def test_apply_streams_a_dask_volume_that_refuses_to_be_read_whole():
    volume, _ = blob_volume()
    net = tiny_network()
    lazy = WholeRefused(da.from_array(volume, chunks=(4, 35, 45)))
    with pytest.raises(AssertionError, match="whole volume"):
        np.asarray(lazy)
    expected = apply_network(net, volume, voxel_size=VOXEL)
    got = apply_network(net, lazy, voxel_size=VOXEL)
    np.testing.assert_array_equal(got.mask, expected.mask)
    np.testing.assert_array_equal(got.probabilities[0], expected.probabilities[0])
    assert lazy.largest > 0  # it was read, in blocks no larger than the promised ones


def test_merge_and_pick_on_dask_arrays_equal_the_in_memory_ones():
    volume, labels = blob_volume()
    probs = (np.clip(volume / 2.0, 0, 1) * 100).astype(np.int8)
    other = (100 - probs).astype(np.int8)
    lazy = [WholeRefused(da.from_array(p, chunks=(4, 35, 45))) for p in (probs, other)]
    merged = merge_probability_maps([MergeInput(probs, "a"), MergeInput(other, "b")])
    got = merge_probability_maps([MergeInput(lazy[0], "a"), MergeInput(lazy[1], "b")])
    np.testing.assert_array_equal(got.mask, merged.mask)
    assert got.voxels == merged.voxels
    settings = PickSettings(min_size=5)
    expected = pick(labels, probabilities=probs, voxel_size=VOXEL, settings=settings)
    found = pick(
        WholeRefused(da.from_array(labels, chunks=(4, 35, 45))),
        probabilities=lazy[0],
        voxel_size=VOXEL,
        settings=settings,
    )
    assert len(expected.particles) >= 3
    assert found.particles == expected.particles and found.stats == expected.stats


def test_a_training_set_from_an_ome_zarr_tomogram_equals_the_in_memory_one(tmp_path):
    from napari_tomoseg.data.boxes import Box
    from napari_tomoseg.learning.trainset import TrainsetSettings, build_training_set

    volume, labels = blob_volume()
    tomo = read_tomogram(write_portal_zarr(tmp_path / "t.zarr", volume))
    painted = read_tomogram(write_portal_zarr(tmp_path / "l.zarr", labels, levels=1))
    boxes = ([Box(6, 35, 45, 32)], [Box(2, 20, 20, 32), Box(9, 50, 70, 32)])
    settings = TrainsetSettings(box_size=32, ncopy=2, seed=0)
    expected = build_training_set(volume, labels, *boxes, settings, voxel_size=VOXEL)
    got = build_training_set(tomo.data, painted.data, *boxes, settings, voxel_size=VOXEL)
    np.testing.assert_array_equal(got.images, expected.images)
    np.testing.assert_array_equal(got.labels, expected.labels)


def test_released_pages_leave_resident_memory_and_keep_the_data(tmp_path):
    path = tmp_path / "big.npy"
    mapped = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(64, 512, 512))
    process = psutil.Process()
    before = process.memory_info().rss
    mapped[:] = 1.5
    assert process.memory_info().rss - before > 50e6  # 64 MiB of written pages resident
    release_pages(mapped[10:20])  # a view finds its map
    assert process.memory_info().rss - before < 10e6
    assert float(mapped[33, 100, 100]) == 1.5
    del mapped
    assert float(np.load(path, mmap_mode="r")[63, 511, 511]) == 1.5
    private = np.load(path, mmap_mode="c")  # copy-on-write: changes live only in memory
    private[0] = 7.0
    release_pages(private)
    assert float(private[0, 0, 0]) == 7.0
    assert hasattr(mmap, "MADV_DONTNEED")


def _mapped_mib(process, folder):
    """Resident MiB of this process's maps of the files in ``folder``."""
    return sum(m.rss for m in process.memory_maps() if m.path.startswith(str(folder))) / 2**20


def test_apply_to_a_file_keeps_no_pages_of_the_files_resident(tmp_path):
    from napari_tomoseg.applying.inference import apply_file

    rng = np.random.default_rng(0)
    write_mrc(tmp_path / "t.mrc", rng.standard_normal((24, 384, 384), dtype=np.float32), 10.0)
    process = psutil.Process()
    tomo = read_tomogram(tmp_path / "t.mrc")
    robust_stats(tomo.data)  # its sampled rows map whole page-cache folios: released
    assert _mapped_mib(process, tmp_path) < 2.0
    seen = []
    result = apply_file(
        tiny_network(),
        tmp_path / "t.mrc",
        tmp_path / "m.mrc",
        tmp_path / "p.mrc",
        callback=lambda event: seen.append(_mapped_mib(process, tmp_path)),
    )
    # files of 13.5 + 3.4 + 3.4 MiB; a slice of them is 0.84 MiB, a batch of 8 slices 6.75
    assert len(seen) >= 3 and max(seen) < 8.0, seen
    assert result.mask.shape == (24, 384, 384)


# -- the command line -----------------------------------------------------------------------------
def run(*argv):
    return cli.main(["--quiet", *map(str, argv)])


def test_cli_apply_merge_pick_on_ome_zarr_equal_the_mrc_path(tmp_path):
    volume, _ = blob_volume()
    net = save_network(tiny_network(), tmp_path / "blob.tsnet")
    write_mrc(tmp_path / "tomo.mrc", volume, VOXEL)
    write_portal_zarr(tmp_path / "tomo.zarr", volume)
    for name, out in (("tomo.mrc", "from_mrc"), ("tomo.zarr", "from_zarr")):
        assert run("apply", net, tmp_path / name, "--output-dir", tmp_path / out) == 0
    outputs = {}
    for out in ("from_mrc", "from_zarr"):
        mask = read_tomogram(tmp_path / out / "tomo_blob_mask.mrc")
        prob = read_tomogram(tmp_path / out / "tomo_blob.mrc")
        assert mask.voxel_size == pytest.approx((VOXEL,) * 3)
        outputs[out] = (np.array(mask.data), np.array(prob.data))
    assert outputs["from_mrc"][0].any()
    for a, b in zip(outputs["from_mrc"], outputs["from_zarr"]):
        np.testing.assert_array_equal(a, b)

    # the probability map and the mask, as OME-Zarr, merge and pick as their MRC files do
    mask, prob = outputs["from_mrc"]
    write_portal_zarr(tmp_path / "prob.zarr", prob)
    write_portal_zarr(tmp_path / "prob2.zarr", (100 - prob).astype(np.int8))
    write_mrc(tmp_path / "prob2.mrc", (100 - prob).astype(np.int8), VOXEL)
    write_portal_zarr(tmp_path / "mask.zarr", mask)
    merged = {}
    for ext in ("mrc", "zarr"):
        first = tmp_path / ("from_mrc/tomo_blob.mrc" if ext == "mrc" else "prob.zarr")
        out = tmp_path / f"merged_{ext}.mrc"
        assert run("merge", first, tmp_path / f"prob2.{ext}", "--names", "a,b", "-o", out) == 0
        merged[ext] = read_tomogram(out)
        star = tmp_path / f"picks_{ext}.csv"
        source = tmp_path / ("from_mrc/tomo_blob_mask.mrc" if ext == "mrc" else "mask.zarr")
        assert run("pick", source, "--min-size", "5", "-o", star) == 0
    np.testing.assert_array_equal(np.asarray(merged["zarr"].data), np.asarray(merged["mrc"].data))
    assert merged["zarr"].voxel_size == pytest.approx((VOXEL,) * 3)
    picks = {ext: _rows(tmp_path / f"picks_{ext}.csv") for ext in ("mrc", "zarr")}
    assert len(picks["zarr"]) > 3
    for got, expected in zip(picks["zarr"], picks["mrc"], strict=True):
        assert [got[k] for k in "zyx"] + [got["size"]] == [expected[k] for k in "zyx"] + [
            expected["size"]
        ]
        # the MRC header holds the voxel size as float32: Angstrom agree to its precision
        assert float(got["x_A"]) == pytest.approx(float(expected["x_A"]), rel=1e-6)


def _rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- the widgets in a real viewer --------------------------------------------------------------
@pytest.fixture
def _widget_settings(tmp_path, monkeypatch):
    """Settings and cache in the test's folder; a modal question would hang: it fails."""
    from napari_tomoseg._widgets import _common

    def unexpected(*args, **kwargs):
        raise AssertionError(f"unexpected question to the user: {args}")

    monkeypatch.setenv("TOMOSEG_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("TOMOSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_common, "ask_unsaved_changes", unexpected)
    monkeypatch.setattr(_common, "ask_annotations_folder", unexpected)


def _apply_in_viewer(viewer, qtbot, layer, net_path):
    from napari_tomoseg._widgets import ApplyWidget

    widget = ApplyWidget(viewer)
    widget.source.value = "network file"
    widget.network_file.value = net_path
    widget.tomogram.value = layer
    assert widget.run() is not None
    qtbot.waitUntil(lambda: len(widget.layers_added) == 2, timeout=120_000)
    return widget.layers_added


def test_widgets_on_ome_zarr_and_dask_layers_equal_the_in_memory_path(
    make_napari_viewer, qtbot, tmp_path, _widget_settings
):
    pytest.importorskip("napari")
    from napari_tomoseg._widgets import BoxWidget, MergeWidget, PickWidget

    volume, _ = blob_volume()
    net_path = save_network(tiny_network(), tmp_path / "blob.tsnet")
    viewer = make_napari_viewer()
    zarr_path = write_portal_zarr(tmp_path / "TS_9.zarr", volume)
    [pyramid] = viewer.open(str(zarr_path), plugin="napari-tomoseg")
    assert pyramid.multiscale and pyramid.scale == pytest.approx((VOXEL,) * 3)
    boxes = BoxWidget(viewer)  # boxes, painting and gallery on the finest level
    boxes.tomogram.value = pyramid
    assert boxes.add_box((6, 35, 45), positive=True).fits(volume.shape)
    assert boxes.paint_layer().data.shape == volume.shape
    boxes.update_gallery()
    from napari_tomoseg._widgets import ImportWidget

    importer = ImportWidget(viewer)  # binning reads the finest level, a block at a time
    importer.source.value = pyramid
    importer.shrink.value = 2
    importer.run()
    qtbot.waitUntil(lambda: "TS_9 (bin 2)" in viewer.layers, timeout=60_000)
    binned = viewer.layers["TS_9 (bin 2)"]
    assert binned.data.shape == (6, 35, 45)
    assert binned.scale == pytest.approx((2 * VOXEL,) * 3)
    scale = (VOXEL,) * 3
    in_memory = viewer.add_image(volume, name="memory", scale=scale)
    lazy = viewer.add_image(da.from_array(volume, chunks=(4, 35, 45)), name="dask", scale=scale)
    results = {
        layer.name: _apply_in_viewer(viewer, qtbot, layer, net_path)
        for layer in (in_memory, pyramid, lazy)
    }
    prob, mask = results["memory"]
    assert mask.data.any()
    for name in ("TS_9", "dask"):
        np.testing.assert_array_equal(np.asarray(results[name][0].data), prob.data)
        np.testing.assert_array_equal(np.asarray(results[name][1].data), mask.data)
        assert results[name][1].scale == pytest.approx(scale)

    # merge a dask-backed probability layer, pick on a dask-backed Labels layer
    lazy_prob = viewer.add_image(
        da.from_array(np.asarray(prob.data), chunks=(4, 35, 45)),
        name="lazy prob",
        scale=scale,
        metadata={**prob.metadata},
    )
    lazy_mask = viewer.add_labels(
        da.from_array(np.asarray(mask.data), chunks=(4, 35, 45)), name="lazy mask", scale=scale
    )
    merges = []
    for layer in (prob, lazy_prob):
        merge = MergeWidget(viewer)
        merge.rows.clear()
        merge.add_row(layer)
        merges.append(np.array(merge.merge().data))
    np.testing.assert_array_equal(merges[0], merges[1])
    picks = []
    for layer in (mask, lazy_mask):
        picker = PickWidget(viewer)
        picker.segmentation.value = layer
        picker.min_size.value = 5
        picker.pick()
        picks.append(picker.result.particles)
    assert len(picks[0]) > 0 and picks[0] == picks[1]
