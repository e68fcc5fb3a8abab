"""The copick widget in a real napari viewer: picks and a mask into a project, a tomogram
and a segmentation back as layers on their voxel grid."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")
copick = pytest.importorskip("copick")

from napari_tomoseg._layers import labels_layer_kwargs  # noqa: E402
from napari_tomoseg._widgets import CopickWidget, PickWidget  # noqa: E402

VS = 12.0


@pytest.fixture(autouse=True)
def _settings_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TOMOSEG_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("TOMOSEG_CACHE_DIR", str(tmp_path / "cache"))


def test_copick_widget_writes_layers_and_opens_runs(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    mask = np.zeros((12, 20, 20), np.uint8)
    zz, yy, xx = np.indices(mask.shape)
    mask[(zz - 6) ** 2 + (yy - 7) ** 2 + (xx - 12) ** 2 <= 9] = 2
    mask[0:2] = 1  # a membrane slab away from the ball
    names = {0: "background", 1: "single_membrane", 2: "ribosome"}
    meta = {"voxel_size": (VS, VS, VS), "source_path": str(tmp_path / "tomo7.mrc")}
    labels = viewer.add_labels(mask, **labels_layer_kwargs("mask", (VS,) * 3, names, None, meta))
    pick = PickWidget(viewer)
    pick.segmentation.value = labels
    pick.feature.value = 2
    pick.min_size.value = 5
    points = pick.pick()

    widget = CopickWidget(viewer)
    config = tmp_path / "project.json"
    widget.config.value = config
    widget.points.value = points
    assert widget.write_picks() == {"ribosome": 1}  # run tomo7: the mask's tomogram
    widget.labels.value = labels
    assert widget.write_segmentation() == "mask"

    run = copick.from_file(str(config)).get_run("tomo7")
    xyz, _ = run.get_picks(object_name="ribosome")[0].numpy()
    assert np.allclose(xyz, [[12 * VS, 7 * VS, 6 * VS]])
    [seg] = run.get_segmentations(name="mask")
    assert np.array_equal(seg.numpy(), mask) and seg.voxel_size == VS
    assert {m.pickable_object_name for m in run.meshes} == {"single-membrane", "ribosome"}

    tomo = np.random.default_rng(0).normal(size=mask.shape).astype(np.float32)
    run.get_voxel_spacing(VS).new_tomogram("wbp").from_numpy(tomo)
    widget.run.value = "tomo7"
    image = widget.read_tomogram()
    assert np.array_equal(image.data, tomo) and tuple(image.scale) == (VS, VS, VS)
    opened = widget.read_segmentation()
    assert np.array_equal(opened.data, mask) and tuple(opened.scale) == (VS, VS, VS)
    assert opened.metadata["class_names"][2] == "ribosome"


def test_the_manifest_lists_the_copick_widget():
    import importlib
    from pathlib import Path

    from npe2 import PluginManifest

    import napari_tomoseg

    manifest = PluginManifest.from_file(Path(napari_tomoseg.__file__).parent / "napari.yaml")
    [command] = [c for c in manifest.contributions.commands if c.id.endswith("copick_widget")]
    module, name = command.python_name.split(":")
    dock = getattr(importlib.import_module(module), name)
    assert dock.__init__.__qualname__ != CopickWidget.__init__.__qualname__  # scrolled
    assert dock.__name__ == "CopickWidgetDock"
    shown = {w.command: w.display_name for w in manifest.contributions.widgets}
    assert shown[command.id] == "7. copick project"
