"""The benchmark scripts run end to end in their quick modes and report what they claim."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """Import ``benchmarks/<name>.py`` (the scripts import their shared ``_common``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"tomoseg_bench_{name}", BENCHMARKS / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def speed():
    return _load("speed.py")


@pytest.fixture(scope="module")
def accuracy():
    return _load("accuracy.py")


def test_flops_per_voxel_of_the_chen_network_from_its_layer_shapes(speed):
    from napari_tomoseg.learning.models import build_model

    model = build_model("tomoseg-cnn", 1, 2)
    # 15x15 kernels: 1 -> 40 at full resolution, then 40 -> 40 and 40 -> 1 after a 2x2 pool
    want = 2 * 225 * (1 * 40 + (40 * 40 + 40 * 1) / 4)
    assert speed.conv_flops_per_voxel(model) == pytest.approx(want)


def test_flops_count_transposed_convolutions_by_their_input(speed):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ConvTranspose2d(4, 2, 2, 2))
    # conv: 4 x 9 multiply-adds per output pixel at half resolution (a quarter of the pixels);
    # transposed: every input pixel sends 4 channels x 2 x 2 x 2 outputs
    want = 2 * (4 * 9 / 4 + 4 * 2 * 4 / 4)
    assert speed.conv_flops_per_voxel(model, size=64) == pytest.approx(want)


def test_speed_quick_run_prints_every_row_and_skips_keras_without_tensorflow(speed, monkeypatch):
    monkeypatch.setattr(speed, "tensorflow_available", lambda: False)
    options = speed.quick_options()
    options.in_process = True
    options.architectures = ["unet-lite"]
    options.train_steps = 2
    options.context_slices = 2  # 2.5D networks: five slices in, the naive row too
    report = speed.run_speed(options)
    text = speed.format_report(report)
    assert "# our networks take 5 slice(s) per output slice" in text
    names = [r["name"] for r in report["rows"]]
    assert names[0].startswith("seed figure")
    assert report["rows"][0]["voxels_per_second"] == pytest.approx(4096**2 / (0.24 * 3600))
    for label in ("naive PyTorch", "apply_network", "apply_file"):
        assert sum(n.startswith(label) for n in names) == 1
    assert not any(n.startswith("Keras") for n in names)
    assert any("Keras peer: TensorFlow is not installed" in s for s in report["skipped"])
    assert "# skipped: Keras peer" in text
    assert all(r["ratio_to_peer"] is None for r in report["rows"])
    for r in report["rows"][1:]:
        assert r["voxels_per_second"] > 0 and r["gflops"] > 0
    if not torch.cuda.is_available():
        assert any("CUDA is not available" in s for s in report["skipped"])
    assert report["training"][0]["steps"] == 2
    assert "| unet-lite | not reached in 2 steps |" in text or "| unet-lite | step" in text


@pytest.mark.parametrize(
    ("isa", "preset", "expected"),
    [("AVX2", None, "0"), ("avx", None, "0"), ("AVX2", "1", "1"), ("AVX512_CORE", None, None)],
)
def test_an_emulated_avx2_cpu_gives_the_peer_tensorflows_default_there(
    speed, isa, preset, expected
):
    env = {"ONEDNN_MAX_CPU_ISA": isa}
    if preset is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = preset  # the user's own choice stands
    note = speed.tensorflow_as_on_the_emulated_cpu(env)
    assert env.get("TF_ENABLE_ONEDNN_OPTS") == expected
    assert (note is not None) == (preset is None and expected == "0")
    if note:
        assert "TF_ENABLE_ONEDNN_OPTS=0" in note


_KERAS_TWIN_CHECK = """
import sys
import numpy as np
import torch
sys.path.insert(0, sys.argv[1])
import speed
from napari_tomoseg.learning.models import build_model

torch.manual_seed(3)
model = build_model("tomoseg-cnn", 1, 2).eval()
with torch.no_grad():
    for conv in model.convs:
        conv.bias.normal_(0, 0.1)
image = np.random.default_rng(0).standard_normal((48, 64), dtype=np.float32)
print(speed.keras_twin_difference(model, speed.build_keras_twin(model), image))
"""


def test_keras_twin_gives_our_probabilities():
    """In a child process: TensorFlow brings its own LLVM, and once it is loaded, Mesa's
    software OpenGL (which the napari tests draw with) crashes in the same process."""
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow is not installed (the optional 'benchmark' extra)")
    done = subprocess.run(
        [sys.executable, "-c", _KERAS_TWIN_CHECK, str(BENCHMARKS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-4


def test_autosave_pause_measures_real_autosaves(tmp_path, monkeypatch, capsys):
    """The autosave benchmark (a real viewer) writes one autosave per repeat and reports
    the GUI thread's gaps during it."""
    pytest.importorskip("napari")
    monkeypatch.setenv("TOMOSEG_CACHE_DIR", str(tmp_path / "cache"))
    bench = _load("autosave_pause.py")
    rows = bench.measure((8, 64, 64), 2, warmup=0.2)
    assert len(rows) == 2
    for row in rows:
        assert row["autosave_s"] > 0 and row["max_gap_ms"] >= row["p99_gap_ms"] > 0
        assert row["gather_ms"] < 1000 * row["autosave_s"]
    from napari_tomoseg.data.autosave import list_autosaves

    [saved] = list_autosaves()  # one tomogram, autosaved (the second replaced the first)
    assert saved.n_positive == saved.n_negative == 8


def support_of(report) -> int:
    """Scored voxels of the quick run: the central slices of its test tomograms."""
    z0, z1 = report["scored_slices"]
    return len(report["binary"][0]["per_test"]) * (z1 - z0) * 96 * 96


def test_accuracy_quick_run_prints_the_three_tables(accuracy):
    options = accuracy.quick_options()
    report = accuracy.run_accuracy(options)
    text = accuracy.format_report(report)
    assert len(report["binary"]) == 1 and len(report["multiclass"]) == 1
    entry = report["binary"][0]
    assert [t["settings"]["snr"] for t in entry["per_test"]] == [0.8, 1.5]
    f1 = entry["pooled"]["classes"]["single_membrane"]["f1"]
    assert 0.0 <= f1 <= 1.0
    assert "| single_membrane | unet-lite | " in text
    # the multi-class table has every class next to the seed's Table 1
    for cls, seed_f1 in accuracy.SEED_TABLE1_TEST_F1.items():
        assert f"| {cls} | " in text and f"| {seed_f1:.2f} |" in text
    assert "The data differ" in text
    assert "| 2 positive boxes | 4 positive boxes |" in text
    assert [e["n_positive"] for e in report["box_counts"]] == [2, 4]
    for e in report["box_counts"]:  # each trained network's F1 at other thresholds too
        assert np.array(e["sweep"]).shape == (len(accuracy.SWEEP), 2, 2)
        assert np.array(e["sweep"])[0].sum() == support_of(report)
        assert f"| single_membrane, {e['n_positive']} boxes, unet-lite | " in text
    z0, z1 = report["scored_slices"]
    assert (z0, z1) == (8, 32)
    # scored voxels: the central slices of two test tomograms
    support = sum(c["support"] for c in entry["pooled"]["classes"].values())
    assert support == 2 * (z1 - z0) * 96 * 96 == support_of(report)


def test_accuracy_runs_one_part_with_its_own_iterations(accuracy):
    options, _ = accuracy.parse_args(
        ["--quick", "--parts", "multiclass", "--multiclass-iterations", "4"]
    )
    report = accuracy.run_accuracy(options)
    assert report["binary"] == [] and report["box_counts"] == []
    assert [m["steps"] for m in report["multiclass"]] == [4]
    text = accuracy.format_report(report)
    assert "Binary networks" not in text and "4 iterations" in text


def test_accuracy_shifted_quick_run_tests_on_shifted_settings(accuracy):
    options, _ = accuracy.parse_args(
        ["--shifted", "--quick", "--parts", "binary", "--train-seeds", "0", "1", "--tta", "4"]
    )
    assert options.tta == 4
    report = accuracy.run_accuracy(options)
    entries = report["binary"]
    assert [e["train_seed"] for e in entries] == [0, 1]
    names = [t["name"] for t in entries[0]["per_test"]]
    assert names == list(accuracy.QUICK_SHIFTED)
    inverted = dict(accuracy.SHIFTED_TESTS)["contrast inverted"]
    assert entries[0]["per_test"][1]["settings"]["invert_contrast"] is inverted["invert_contrast"]
    # each network was applied at its own calibrated threshold
    for e in entries:
        assert 0.0 < e["threshold"] < 1.0
    text = accuracy.format_report(report)
    assert "| single_membrane | unet-lite | " in text and " +- " in text
    assert "| SNR 0.3 | " in text and "| contrast inverted | " in text
    assert "test-time augmentation: 4 orientations" in text


def test_accuracy_imperfect_quick_run_tests_on_damaged_and_misaligned_tilt_series(accuracy):
    options, _ = accuracy.parse_args(["--imperfect", "--quick", "--parts", "zeroshot"])
    assert options.shifted and options.imperfect
    report = accuracy.run_accuracy(options)
    per_test = report["zeroshot"][0]["per_test"]
    control, flawed = accuracy.IMPERFECT_TESTS[0], accuracy.IMPERFECT_TESTS[-1]
    assert [t["name"] for t in per_test] == [control[0], flawed[0]]
    # the flaw and its control on the same scene: they differ by the flaw alone
    assert per_test[0]["seed"] == per_test[1]["seed"] == accuracy.IMPERFECT_SEED
    assert per_test[0]["settings"].get("total_dose", 0) == 0
    assert per_test[1]["settings"]["alignment_error_px"] == flawed[1]["alignment_error_px"]
    text = accuracy.format_report(report)
    assert f"(imperfect tilt series (radiation damage, alignment errors)): {control[0]}" in text
    assert f"each on the scenes of seeds {accuracy.IMPERFECT_SEED}" in text
    assert "Zero-shot F1 per test" in text


def test_every_imperfect_test_is_simulated_on_the_same_scenes(accuracy):
    options, _ = accuracy.parse_args(["--imperfect", "--imperfect-scenes", "2"])
    options.shape, options.shifted_tests = (24, 48, 48), [accuracy.IMPERFECT_TESTS[1][0]]
    tests = accuracy.make_tests(options)
    seed = accuracy.IMPERFECT_SEED
    assert [(t.name, t.seed) for t in tests] == [
        (options.shifted_tests[0], s) for s in (seed, seed + 1)
    ]
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--imperfect", "--imperfect-scenes", "0"])


def test_the_zero_shot_per_test_table_pools_the_scenes_of_a_test(accuracy):
    # tp, fp, fn = 3, 1, 1 and 1, 0, 2 on two scenes of one test: F1 = 8 / 12, 7 truth voxels
    per_test = [
        {"name": "flaw", "confusion": [[90, 1], [1, 3]]},
        {"name": "flaw", "confusion": [[50, 0], [2, 1]]},
    ]
    report = {"tests": per_test, "zeroshot": [{"name": "mt", "per_test": per_test}]}
    text = "\n".join(accuracy._zero_shot_per_test(report))
    assert "| flaw | 0.67 (7) |" in text


def test_the_threshold_sweep_table_pools_the_tests_of_each_binary_network(accuracy):
    n = len(accuracy.SWEEP)
    # two tests; at every threshold tp, fp, fn = 3, 1, 1 in the first and 1, 0, 2 in the second
    first, second = [[[90, 1], [1, 3]]] * n, [[[50, 0], [2, 1]]] * n
    report = {
        "zeroshot": [
            {"name": "mt", "threshold": 0.8, "per_test": [{"sweep": first}, {"sweep": second}]},
            {"name": "all", "threshold": 0.6, "per_test": [{}, {}]},  # multi-class: no sweep
        ],
        # a trained network: its sweep pooled already (tp, fp, fn = 1, 1, 2)
        "box_counts": [
            {
                "feature": "mt",
                "n_positive": 10,
                "network": "unet-lite",
                "threshold": 0.4,
                "sweep": [[[9, 1], [2, 1]]] * n,
            }
        ],
    }
    lines = "\n".join(accuracy._sweep_table(report)).splitlines()
    rows = [ln for ln in lines if ln.startswith("| mt")]
    assert rows == [
        "| mt (shipped) | 0.80 | " + " | ".join(["0.667"] * n) + " |",  # 2*4 / (2*4 + 1 + 3)
        "| mt, 10 boxes, unet-lite | 0.40 | " + " | ".join(["0.400"] * n) + " |",  # 2 / 5
    ]
    assert not any(ln.startswith("| all ") for ln in lines)
    assert accuracy._sweep_table({"zeroshot": []}) == []


def test_shifted_settings_make_a_thicker_volume(accuracy):
    name, changes = next(t for t in accuracy.SHIFTED_TESTS if "thicker" in t[0])
    settings = accuracy.shifted_settings(name, changes, (96, 256, 256))
    assert settings["shape"] == (160, 256, 256) and "depth_factor" not in settings


def test_scene_settings_reach_every_test_tomogram_over_its_own(accuracy):
    options, _ = accuracy.parse_args(
        ["--shifted", "--quick", "--scene", "vesicle_aspect=2.0", "--scene", "snr=1.0"]
    )
    assert options.scene_overrides == {"vesicle_aspect": 2.0, "snr": 1.0}
    tests = accuracy.make_tests(options)
    assert [t.name for t in tests] == list(accuracy.QUICK_SHIFTED)
    for test in tests:  # each keeps its own change but the one --scene replaces
        assert test.sim.settings.vesicle_aspect == 2.0 and test.sim.settings.snr == 1.0
    assert tests[1].sim.settings.invert_contrast  # "contrast inverted" keeps its change
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--shifted", "--scene", "vesicle_aspects=2"])


def test_accuracy_quick_suggestion_round_adds_the_suggested_boxes(accuracy):
    options, _ = accuracy.parse_args(
        ["--quick", "--parts", "suggest", "--iterations", "2", "--shape", "40", "192", "192"]
        + ["--planes", "1"]  # scored in XY alone: the round is under test, not the planes
    )
    report = accuracy.run_accuracy(options)
    [entry] = report["suggest"]
    assert entry["suggested"] == entry["accepted_positive"] + entry["accepted_negative"]
    assert 0 < entry["suggested"] <= 4
    for key in ("before", "after"):
        assert 0.0 <= entry[key]["f1"] <= 1.0
    assert "One round of suggested boxes" in accuracy.format_report(report)


def test_accuracy_merges_the_shipped_and_the_trained_binary_networks(accuracy):
    options, _ = accuracy.parse_args(
        ["--shifted", "--quick", "--parts", "binary", "merged", "--iterations", "2"]
        + ["--features", "single_membrane", "double_membrane"]
    )
    report = accuracy.run_accuracy(options)
    assert report["zeroshot"] == []  # scored for the merge only, not reported
    shipped, trained = report["merged"]
    assert (shipped["start"], trained["start"], trained["train_seed"]) == ("shipped", "auto", 0)
    for entry in report["merged"]:
        assert entry["features"] == ["single_membrane", "double_membrane"]
        total = np.sum([t["confusion"] for t in entry["per_test"]], axis=0)
        assert total.sum() == support_of(report)  # every scored voxel, each label once
        # nothing but the merged features is predicted, and a merged feature's voxels are at
        # most those its network marks alone (true positives: the diagonal)
        assert total[:, [1, 2, 5]].sum() == 0
        for feature in entry["features"]:
            alone, merged = entry["alone"][feature], entry["pooled"]["classes"][feature]
            assert merged["support"] == alone["support"]
            assert merged["recall"] <= alone["recall"] + 1e-9
    binary = {e["feature"]: e["pooled"]["classes"][e["feature"]] for e in report["binary"]}
    assert trained["alone"] == binary
    text = accuracy.format_report(report)
    assert "| double_membrane | trained (auto) | " in text
    assert "| single_membrane | shipped (zero-shot) | " in text


def test_pick_scaling_writes_the_mask_slab_by_slab_and_reports_each_size(tmp_path, capsys):
    scaling = _load("pick_scaling.py")
    mask = tmp_path / "mask.mrc"
    spheres = scaling.write_mask(mask, 20, 96, seed=3)
    from scipy import ndimage

    from napari_tomoseg.data.io import read_tomogram

    labels = read_tomogram(mask).data
    assert spheres == 60 and set(map(int, labels[::5, ::7, ::7].ravel())) <= {0, 1, 2}
    # the sheet is one component through every slice; the spheres are whole balls
    _, n = ndimage.label(labels == 2)
    assert n == 1 and all((labels[z] == 2).any() for z in range(20))
    # a slab written on its own equals the same slices of the whole mask
    centres = scaling.np.random.default_rng(3).uniform(
        (0, scaling.RADIUS, scaling.RADIUS),
        (20, 96 - scaling.RADIUS, 96 - scaling.RADIUS),
        (60, 3),
    )
    assert (scaling.mask_slab(8, 13, 96, centres) == labels[8:13]).all()
    sys_argv = sys.argv
    sys.argv = ["pick_scaling.py", "--sizes", "12", "--xy", "64"]
    try:
        assert scaling.main() == 0
    finally:
        sys.argv = sys_argv
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| 12 |")]
    assert len(row) == 1 and float(row[0].split("|")[-2]) > 0  # a peak RSS was measured


def test_wedge_recall_bins_membranes_by_how_they_face_the_beam():
    wedge = _load("wedge_recall.py")
    truth = np.zeros((64, 64, 64), bool)
    truth[30:34, 4:28, 4:60] = True  # a sheet lying flat: seen face-on
    truth[4:60, 36:60, 30:34] = True  # an upright one: seen edge-on
    nz = wedge.normal_z(truth)
    assert nz[32, 16, 32] > 0.99 and nz[32, 48, 32] < 0.01
    pred = np.zeros_like(truth)
    pred[4:60, 36:60, 30:34] = True  # a network that finds only the upright sheet
    total, found = wedge.binned_recall(pred, truth, nz)
    assert sum(total) == truth.sum()
    assert found[0] > 0.99 * total[0] > 0 and found[-1] < 0.1 * total[-1]
    report = {"feature": "x", "tests": ["t"], "bins": list(wedge.BINS)}
    report["networks"] = {"net": {"voxels": total, "found": found}}
    text = wedge.format_report(report)
    assert "| recall, net | 1.00 |" in text and "| share of the feature's voxels |" in text


def test_other_simulator_scores_a_scene_folder_as_its_labels_say(tmp_path, capsys):
    other = _load("other_simulator.py")
    from napari_tomoseg.simulator.synthetic import MICROTUBULE, SINGLE_MEMBRANE, simulate_tomogram

    # a scene "from another simulator": our own, its classes renumbered (7 and 9), voxel
    # size in scene.json, and one class (ribosomes, 2) left out of --classes
    sim = simulate_tomogram(shape=(40, 96, 96), seed=2)
    labels = np.zeros(sim.labels.shape, np.uint8)
    labels[sim.labels == SINGLE_MEMBRANE], labels[sim.labels == MICROTUBULE] = 7, 9
    labels[sim.labels == 2] = 2
    scene = tmp_path / "scene"
    scene.mkdir()
    np.save(scene / "density.npy", sim.density)
    np.save(scene / "labels.npy", labels)
    (scene / "scene.json").write_text('{"voxel_size_A": 10.0}')
    out = tmp_path / "report.json"
    argv = [str(scene), "--classes", "7=single_membrane", "9=microtubule"]
    argv += ["--conditions", "default", "--networks", "single_membrane", "--json", str(out)]
    assert other.main(argv) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    z0, z1 = 8, 32  # the central 60 % of 40 slices
    assert row["truth"] == int((labels[z0:z1] == 7).sum()) > 0
    m = other.metrics(row)
    assert m["f1"] > 0.3  # the shipped network finds our own membranes
    assert m["f1_tol"] >= m["f1"] and m["recall_tol"] >= m["recall"]
    assert "| default | single_membrane | single_membrane |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        other.parse_args([str(scene), "--classes", "7=lipid"])
    (scene / "labels.npy").unlink()
    with pytest.raises(SystemExit, match="labels.npy"):
        other.main([str(scene), "--classes", "7=single_membrane"])


def test_other_simulator_trains_on_one_scene_and_scores_the_others(tmp_path, capsys):
    other = _load("other_simulator.py")
    from napari_tomoseg.simulator.synthetic import SINGLE_MEMBRANE, simulate_tomogram

    folders = []
    for seed in (3, 4):  # two scenes "of another simulator", membranes as value 5
        sim = simulate_tomogram(shape=(32, 96, 96), seed=seed)
        folder = tmp_path / f"scene{seed}"
        folder.mkdir()
        np.save(folder / "density.npy", sim.density)
        np.save(folder / "labels.npy", np.where(sim.labels == SINGLE_MEMBRANE, 5, 0))
        (folder / "scene.json").write_text('{"voxel_size_A": 10.0}')
        folders.append(folder)
    out = tmp_path / "report.json"
    argv = [*map(str, folders), "--classes", "5=single_membrane", "--conditions", "default"]
    argv += ["--networks", "single_membrane", "--train-scene", str(folders[0]), "--boxes", "3"]
    argv += ["--negatives", "4", "--starts", "auto", "--set", "iterations=4", "--json", str(out)]
    assert other.main(argv) == 0
    report = json.loads(out.read_text())
    # the training scene is not scored; the shipped and the trained network are, on the other
    assert {r["scene"] for r in report["rows"]} == {"scene4"}
    assert [r["network"] for r in report["rows"]] == [
        "single_membrane",
        "single_membrane, fine-tuned",
    ]
    assert report["rows"][0]["truth"] == report["rows"][1]["truth"] > 0
    (training,) = report["trainings"]
    assert training["boxes"]["positive"] == 3 and "shipped" in training["started_from"]
    assert training["replay"]["why"] == "replay is 0"  # the default recipe replays nothing
    assert training["keep_start"] in (0.5, 0.25, 0.0)  # chosen on the held-out boxes
    text = capsys.readouterr().out
    assert "# trained on scene3: single_membrane, fine-tuned, 3 positive and 4 negative" in text
    assert "| default | single_membrane | single_membrane, fine-tuned |" in text


def test_other_simulator_counts_within_the_tolerance():
    other = _load("other_simulator.py")
    truth = np.zeros((1, 1, 10), bool)
    truth[0, 0, 4] = True
    pred = np.zeros_like(truth)
    pred[0, 0, [5, 8]] = True  # one mark next to the feature, one three voxels off
    c = other.counts(pred, truth, 1.0)
    assert c == {"tp": 0, "marked": 2, "truth": 1, "marked_near": 1, "truth_found": 1}
    m = other.metrics(c)
    assert m["f1"] == 0.0 and m["precision_tol"] == 0.5 and m["recall_tol"] == 1.0
