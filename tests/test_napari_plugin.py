"""The plugin inside a real napari viewer: manifest, reader, writer, sample data."""

from __future__ import annotations

import numpy as np
import pytest

from napari_tomoseg.data import io as tio

napari = pytest.importorskip("napari")


def test_manifest_is_valid_and_installed():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-tomoseg")
    assert manifest.display_name == "TomoSeg"
    ids = {c.id for c in manifest.contributions.commands}
    assert "napari-tomoseg.get_reader" in ids
    assert manifest.contributions.sample_data[0].display_name == "Simulated cell tomogram"


def test_open_mrc_in_viewer_at_its_voxel_size(make_napari_viewer, tmp_path):
    data = np.random.default_rng(0).random((6, 20, 30)).astype(np.float32)
    path = tio.write_mrc(tmp_path / "cell.rec", data, (14.0, 13.0, 13.0))
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin="napari-tomoseg")
    assert layer.name == "cell"
    np.testing.assert_allclose(layer.scale, (14.0, 13.0, 13.0))
    assert layer.metadata["voxel_size"] == pytest.approx((14.0, 13.0, 13.0))
    assert str(layer.units[0]) == "angstrom"
    np.testing.assert_array_equal(np.asarray(layer.data), data)


def test_a_layer_voxel_size_is_written_and_read_back_as_one_type(make_napari_viewer):
    from napari_tomoseg._layers import image_layer_kwargs, layer_voxel_size, voxel_metadata
    from napari_tomoseg.data.voxels import VoxelSize

    viewer = make_napari_viewer()
    vs = VoxelSize(14.0, 13.0, 12.0)
    meta = voxel_metadata(vs)
    assert meta == {"voxel_size": (14.0, 13.0, 12.0), "voxel_size_unit": "angstrom"}
    volume = np.zeros((2, 4, 4), np.float32)
    layer = viewer.add_image(volume, **image_layer_kwargs("t", vs, meta))
    back = layer_voxel_size(layer)
    assert isinstance(back, VoxelSize) and back == vs
    # what npe2 hands a writer: the layer's attributes as a dict
    assert layer_voxel_size({"metadata": layer.metadata, "scale": layer.scale}) == vs
    # cubic voxels as one number; unknown stays unknown
    assert voxel_metadata(10.0)["voxel_size"] == (10.0, 10.0, 10.0)
    assert voxel_metadata(None) == {"voxel_size": None, "voxel_size_unit": "angstrom"}
    # no metadata: the scale (an image's (Y, X) as VoxelSize.parse reads it); 1.0: unknown
    scaled = viewer.add_labels(volume.astype(np.uint8), scale=(9.0, 8.0, 8.0))
    assert layer_voxel_size(scaled) == (9.0, 8.0, 8.0)
    assert layer_voxel_size(viewer.add_image(np.zeros((4, 4)), scale=(5.0, 6.0))) == (5, 5, 6)
    assert layer_voxel_size(viewer.add_image(volume)) is None
    # metadata of more axes: the last three
    wide = viewer.add_image(np.zeros((2, 2, 4, 4)), metadata={"voxel_size": [1.0, *vs]})
    assert layer_voxel_size(wide) == vs


def test_save_labels_layer_as_mrc_from_viewer(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    labels = np.zeros((4, 10, 10), np.int32)
    labels[2, 3:6, 3:6] = 3
    layer = viewer.add_labels(labels, scale=(9.0, 9.0, 9.0), name="seg")
    out = tmp_path / "seg.mrc"
    viewer.layers.save(str(out), selected=False, plugin="napari-tomoseg")
    tomo = tio.read_tomogram(out)
    assert tomo.data.dtype == np.uint8
    np.testing.assert_array_equal(tomo.data, labels)
    assert tomo.voxel_size == pytest.approx((9.0, 9.0, 9.0))
    assert layer.data.dtype == np.int32  # the layer itself is untouched


def test_sample_data_opens_in_viewer_with_class_names(make_napari_viewer):
    viewer = make_napari_viewer()
    image, truth = viewer.open_sample("napari-tomoseg", "simulated_cell")
    assert image.data.shape == truth.data.shape == (96, 256, 256)
    np.testing.assert_allclose(image.scale, (10.0, 10.0, 10.0))
    np.testing.assert_allclose(truth.scale, image.scale)
    assert truth.metadata["class_names"] == {
        0: "background",
        1: "microtubule",
        2: "ribosome",
        3: "double_membrane",
        4: "single_membrane",
        5: "carbon_edge",
    }
    assert set(np.unique(truth.data)) == {0, 1, 2, 3, 4, 5}
    assert truth.data.dtype == np.uint8
