"""The scripts that make the shipped networks: pretraining (quick mode) and recalibration."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_tomoseg.errors import TomosegError
from napari_tomoseg.learning.model_file import load_network, save_network
from napari_tomoseg.learning.pretrained import MULTICLASS, shipped_file
from napari_tomoseg.learning.training import threshold_from_curve

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    stem = Path(name).stem  # a module name without a dot, so its functions pickle
    spec = importlib.util.spec_from_file_location(f"tomoseg_script_{stem}", SCRIPTS / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_network(path).model.state_dict()


def test_pretraining_quick_run_continues_a_network_and_writes_every_one(tmp_path):
    pretrain = _load("pretrain.py")
    start = tmp_path / "start.tsnet"
    shutil.copy(shipped_file(MULTICLASS), start)
    out = tmp_path / "out"
    argv = ["--quick", "--out", str(out), "--start", str(start), "--voxel-sizes", "8", "14"]
    assert pretrain.main([*argv, "--context-slices", "1"]) == 0
    summary = json.loads((out / "pretraining.json").read_text())
    assert summary["networks"][MULTICLASS]["continued_from"] == str(start)
    # each tomogram simulated at its own voxel size, the networks trained at 10 A
    multi = load_network(out / f"{MULTICLASS}.tsnet").meta
    drawn = [t["voxel_size"] for t in multi.trainset_summary["metadata"]["pretraining_tomograms"]]
    assert all(8 <= v <= 14 for v in drawn) and len(set(drawn)) == len(drawn) > 1
    assert tuple(multi.voxel_size) == (10.0, 10.0, 10.0)
    assert sorted(p.stem for p in out.glob("*.tsnet")) == sorted(summary["networks"])
    for path in out.glob("*.tsnet"):  # 2.5D: a slice each side, whatever the start took
        meta = load_network(path).meta
        assert (meta.in_channels, meta.context_slices) == (3, 1), path.name
    # continuing: the quick run's few mini-batches leave the weights near the start's
    began, now = _weights(start), _weights(out / f"{MULTICLASS}.tsnet")
    convs = [k for k, v in began.items() if v.is_floating_point() and v.ndim == 4]
    name = convs[1]  # the first one's input channels were fitted to the context
    assert torch.corrcoef(torch.stack([began[name].flatten(), now[name].flatten()]))[0, 1] > 0.9


def test_pretraining_with_no_multiclass_iterations_trains_only_the_binary_networks(tmp_path):
    pretrain = _load("pretrain.py")
    start = shipped_file(MULTICLASS)
    out = tmp_path / "out"
    argv = ["--quick", "--out", str(out), "--start", str(start), "--iterations", "0"]
    assert pretrain.main([*argv, "--features", "ribosome", "--binary-learning-rate", "1e-3"]) == 0
    summary = json.loads((out / "pretraining.json").read_text())
    assert summary["networks"][MULTICLASS] == {"taken_as_is_from": str(start)}
    assert sorted(p.stem for p in out.glob("*.tsnet")) == sorted([MULTICLASS, "ribosome"])
    for key, value in _weights(start).items():  # the multi-class network is the start's
        assert torch.allclose(value, _weights(out / f"{MULTICLASS}.tsnet")[key]), key
    binary = load_network(out / "ribosome.tsnet").meta
    assert binary.metrics["training"]["learning_rate"] == 1e-3
    with pytest.raises(SystemExit):  # nothing to start the binary networks from
        pretrain.parse_args(["--iterations", "0"])
    with pytest.raises(SystemExit):  # refused before anything is simulated
        pretrain.parse_args(["--voxel-sizes", "0", "12"])
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--context-slices", "-1"])


def test_pretraining_continues_a_binary_network_without_saving_it_as_all_features(tmp_path):
    pretrain = _load("pretrain.py")
    start = shipped_file("ribosome")
    out = tmp_path / "out"
    argv = ["--quick", "--out", str(out), "--start", str(start), "--iterations", "0"]
    assert pretrain.main([*argv, "--features", "ribosome"]) == 0
    summary = json.loads((out / "pretraining.json").read_text())
    assert sorted(p.stem for p in out.glob("*.tsnet")) == ["ribosome"]
    assert list(summary["networks"]) == ["ribosome"]
    assert summary["networks"]["ribosome"]["started_from"] == str(start)
    assert load_network(out / "ribosome.tsnet").meta.class_names == ("background", "ribosome")


def test_pretraining_simulates_in_processes_the_same_imperfect_tomograms(tmp_path):
    pretrain = _load("pretrain.py")
    argv = ["--quick", "--imperfect", "--vesicle-variety", "--membrane-variety"]  # two tomograms
    serial = pretrain.build_trainset(pretrain.parse_args(argv))
    parallel = pretrain.build_trainset(pretrain.parse_args([*argv, "--processes", "2"]))
    assert np.array_equal(serial.images, parallel.images)
    assert np.array_equal(serial.labels, parallel.labels)
    drawn = parallel.metadata["pretraining_tomograms"]
    assert drawn == serial.metadata["pretraining_tomograms"] and len(drawn) == 2
    recorded = {"total_dose", "alignment_error_px", "vesicle_aspect", "membrane_core_density"}
    assert all(recorded <= set(t) for t in drawn)
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--processes", "0"])
    with pytest.raises(SystemExit):  # the elevation range needs the variety, within 0-90
        pretrain.parse_args(["--microtubule-elevation", "4", "90"])
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--microtubule-variety", "--microtubule-elevation", "4", "95"])
    steep = pretrain.parse_args(["--microtubule-variety", "--microtubule-elevation", "4", "90"])
    assert pretrain._variety_ranges(steep) == {"microtubule_elevation_deg": (4.0, 90.0)}


def test_recalibration_rewrites_the_threshold_from_the_recorded_curve(tmp_path):
    recalibrate = _load("recalibrate.py")
    path = tmp_path / "net.tsnet"
    shutil.copy(shipped_file("microtubule"), path)
    before = load_network(path)
    curve = before.meta.metrics["training"]["threshold_calibration"]["f1"]
    expected, _ = threshold_from_curve(curve)
    before.meta.threshold = 0.3 if expected != 0.3 else 0.5  # as an older rule chose
    save_network(before, path, overwrite=True)
    (tmp_path / "pretraining.json").write_text(
        json.dumps({"networks": {"net": {"threshold": before.meta.threshold}}})
    )
    assert recalibrate.main([str(path)]) == 0
    after = load_network(path)
    assert expected == after.meta.threshold != before.meta.threshold
    summary = json.loads((tmp_path / "pretraining.json").read_text())
    assert summary["networks"]["net"]["threshold"] == expected  # the summary follows
    assert after.meta.metrics["training"]["threshold_calibration"]["chosen"] == expected
    for key, value in before.model.state_dict().items():  # the weights are untouched
        assert torch.equal(value, after.model.state_dict()[key]), key


def test_recalibration_refuses_a_network_without_a_curve(tmp_path):
    recalibrate = _load("recalibrate.py")
    path = tmp_path / "net.tsnet"
    shutil.copy(shipped_file("ribosome"), path)
    network = load_network(path)
    del network.meta.metrics["training"]["threshold_calibration"]
    save_network(network, path, overwrite=True)
    data_before = path.read_bytes()
    with pytest.raises(TomosegError, match="no threshold calibration curve"):
        recalibrate.recalibrate(path)
    assert path.read_bytes() == data_before  # nothing lost


def test_planes_calibration_records_both_curves_and_follows_its_rule(tmp_path, monkeypatch):
    from napari_tomoseg.simulator.synthetic import simulate_tomogram

    calibrate_planes = _load("calibrate_planes.py")
    path = tmp_path / "net.tsnet"
    shutil.copy(shipped_file("single_membrane"), path)
    before = load_network(path)
    sims = [simulate_tomogram(seed=5, shape=(40, 96, 96))]
    record = calibrate_planes.calibrate(path, "single_membrane", sims, dry_run=False)
    after = load_network(path)
    assert after.meta.metrics["planes_calibration"] == record
    assert after.meta.threshold_three_planes == record["three_planes_chosen"]
    wins = record["three_planes_f1_at_chosen"] > record["one_plane_f1_at_own_threshold"]
    assert after.meta.planes == record["planes"] == record["planes_by_rule"] == (3 if wins else 1)
    forced = calibrate_planes.calibrate(path, "single_membrane", sims, dry_run=False, planes=3)
    assert load_network(path).meta.planes == 3 and forced["planes_from"] == "command line"
    assert len(record["one_plane_f1"]) == len(record["three_planes_f1"]) > 5
    assert after.meta.threshold == before.meta.threshold  # the XY threshold stays
    for key, value in before.model.state_dict().items():  # the weights are untouched
        assert torch.equal(value, after.model.state_dict()[key]), key
    with pytest.raises(SystemExit, match="no class 'ribosome'"):
        calibrate_planes.calibrate(path, "ribosome", sims, dry_run=True)
