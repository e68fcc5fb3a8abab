"""The tomoseg command line: the whole path on a simulated tomogram, errors and exit codes."""

from __future__ import annotations

import numpy as np
import pytest

from napari_tomoseg import cli
from napari_tomoseg.applying.picking import read_star
from napari_tomoseg.applying.suggest import overlaps
from napari_tomoseg.data.boxes import read_boxes_csv, write_boxes_csv
from napari_tomoseg.data.io import read_tomogram, threshold_of, write_labels, write_mrc
from napari_tomoseg.errors import TomosegError
from napari_tomoseg.learning.checkpoint import read_checkpoint_meta
from napari_tomoseg.learning.model_file import load_network
from napari_tomoseg.learning.trainset import TrainingSet
from napari_tomoseg.simulator.demo import boxes_from_ground_truth
from napari_tomoseg.simulator.synthetic import CLASS_NAMES

MEMBRANE = CLASS_NAMES.index("single_membrane")
RIBOSOME = CLASS_NAMES.index("ribosome")


def run(*argv: str) -> int:
    return cli.main(["--quiet", *map(str, argv)])


@pytest.mark.parametrize(
    "command", ["demo", "simulate", "build-trainset", "train", "apply", "merge", "pick"]
)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: tomoseg " + command in capsys.readouterr().out


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["apply"])
    assert exit_info.value.code == cli.EXIT_USAGE


def test_missing_input_is_a_clear_error_with_exit_1(tmp_path, capsys):
    code = run("pick", tmp_path / "missing.mrc", "-o", tmp_path / "out.star")
    assert code == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "missing.mrc" in err and "does not exist" in err
    assert "Traceback" not in err


def test_box_files_round_trip_and_napari_csv(tmp_path):
    from napari_tomoseg.data.boxes import Box

    boxes = [Box(3, 40, 50, 32), Box(7, 60, 60, 32)]
    path = write_boxes_csv(tmp_path / "b.csv", boxes)
    assert read_boxes_csv(path) == boxes
    shapes_csv = tmp_path / "shapes.csv"
    shapes_csv.write_text(
        "index,shape-type,vertex-index,axis-0,axis-1,axis-2\n"
        "0,rectangle,0,5,10,10\n0,rectangle,1,5,10,70\n"
        "0,rectangle,2,5,60,70\n0,rectangle,3,5,60,10\n"
    )
    [box] = read_boxes_csv(shapes_csv, box_size=32)
    assert box.z == 5 and box.size == 32


def test_box_files_without_header_and_with_sizes(tmp_path):
    from napari_tomoseg.data.boxes import Box

    one = tmp_path / "one.csv"
    one.write_text("12,40,50\n")  # one headerless row: a box, not a header
    assert read_boxes_csv(one) == [Box(12, 40, 50, 64)]
    sized = tmp_path / "sized.csv"
    sized.write_text("3,40,50,32\n\n7,60,60,48\n")
    assert read_boxes_csv(sized) == [Box(3, 40, 50, 32), Box(7, 60, 60, 48)]
    assert [b.size for b in read_boxes_csv(sized, box_size=16)] == [16, 16]
    for text, line in (("z,y,x\n1,2,3\n4,5\n", 3), ("1,2,3\n4,five,6\n", 2)):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(TomosegError, match=f"line {line} "):
            read_boxes_csv(bad)


def test_build_trainset_takes_the_box_size_from_the_file(tmp_path, capsys):
    from napari_tomoseg.data.boxes import Box
    from napari_tomoseg.learning.trainset import TrainingSet

    rng = np.random.default_rng(0)
    write_mrc(tmp_path / "t.mrc", rng.normal(size=(8, 96, 96)).astype(np.float32), 10.0)
    paint = np.zeros((8, 96, 96), np.uint8)
    paint[4, 40:50, 40:50] = 1
    write_labels(tmp_path / "p.mrc", paint, 10.0)
    write_boxes_csv(tmp_path / "pos.csv", [Box(4, 45, 45, 32)])
    (tmp_path / "neg.csv").write_text("2,30,30,32\n")
    argv = ["build-trainset", tmp_path / "t.mrc", "--labels", tmp_path / "p.mrc"]
    argv += ["--positive", tmp_path / "pos.csv", "--negative", tmp_path / "neg.csv"]
    assert run(*argv, "--ncopy", 2, "-o", tmp_path / "ts.npz") == 0
    ts = TrainingSet.load(tmp_path / "ts.npz")
    assert ts.images.shape[-2:] == (32, 32) and int((~ts.positive).sum()) == 2
    # an explicit --box-size replaces the file's sizes
    assert run(*argv, "--box-size", 48, "-o", tmp_path / "ts48.npz") == 0
    assert TrainingSet.load(tmp_path / "ts48.npz").images.shape[-2:] == (48, 48)


def test_every_option_has_help_with_its_default(capsys):
    import argparse

    from napari_tomoseg.learning.training import TrainSettings

    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"tomoseg {name} {action.option_strings or action.dest}"
    with pytest.raises(SystemExit):
        cli.main(["apply", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: the current folder)" in text and "(default: 256)" in text
    assert "(default: 8)" in text
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = TrainSettings()
    assert f"mini-batches to train (default {defaults.iterations})" in text
    assert f"boxes per mini-batch (default {defaults.batch_size})" in text
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "tomoseg-cnn, unet or unet-lite" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_whole_path_train_apply_merge_pick(tmp_path, capsys):
    tomo, truth = tmp_path / "tomo.mrc", tmp_path / "truth.mrc"
    assert (
        run("simulate", "-o", tomo, "--labels-output", truth, "--shape", 48, 160, 160, "--seed", 2)
        == 0
    )
    labels = read_tomogram(truth).data
    voxel = read_tomogram(tomo).voxel_size
    assert voxel == pytest.approx((10.0, 10.0, 10.0))

    # Paint two features (membrane = 1, ribosome = 2) and box them as a user would.
    painting = np.zeros(labels.shape, np.uint8)
    painting[labels == MEMBRANE] = 1
    painting[labels == RIBOSOME] = 2
    write_labels(tmp_path / "paint.mrc", painting, voxel)
    pos_m, neg = boxes_from_ground_truth(labels, [MEMBRANE, RIBOSOME], n_positive=4, n_negative=12)
    pos_r, _ = boxes_from_ground_truth(labels, RIBOSOME, n_positive=4, n_negative=0, seed=3)
    write_boxes_csv(tmp_path / "pos.csv", pos_m + pos_r)
    write_boxes_csv(tmp_path / "neg.csv", neg)

    assert (
        run(
            "build-trainset",
            tomo,
            "--labels",
            tmp_path / "paint.mrc",
            "--positive",
            tmp_path / "pos.csv",
            "--negative",
            tmp_path / "neg.csv",
            "--ncopy",
            3,
            "--class-names",
            "background,membrane,ribosome",
            "-o",
            tmp_path / "ts.npz",
        )
        == 0
    )
    assert (
        run(
            "train",
            tmp_path / "ts.npz",
            "-o",
            tmp_path / "net.tsnet",
            "--iterations",
            40,
            "--batch-size",
            8,
            "--class-weights",
            "1,5,5",
            "--dice-weight",
            0.5,
            "--keep-start",
            0.3,
            "--replay",
            0.25,
            "--fine-tune",
            "decoder",
            "--augmentation",  # 40 mini-batches: too few to learn through the augmentation
            "none",
        )
        == 0
    )
    recorded = load_network(tmp_path / "net.tsnet").meta.metrics["training"]
    assert recorded["class_weights"] == [1.0, 5.0, 5.0] and recorded["dice_weight"] == 0.5
    assert "all_features" in recorded["started_from"]
    assert set(recorded["keep_start_held_out_f1"]) == {"0.3", "0.15", "0.0"}  # --keep-start's
    assert recorded["keep_start"] in (0.3, 0.15)  # never less than half of it
    replayed = recorded["replay"]["samples"]
    out = capsys.readouterr().out
    assert replayed > 0 and f"also trained on {replayed} samples" in out
    assert f"kept {recorded['keep_start']:.0%} of the starting network's weights" in out
    assert "(held-out F1 keeping 30% " in out
    assert recorded["fine_tune"] == "decoder" and "its encoder kept as it started" in out
    assert replayed == round(0.25 * len(TrainingSet.load(tmp_path / "ts.npz")))
    bad = ("train", tmp_path / "ts.npz", "-o", tmp_path / "bad.tsnet", "--class-weights")
    assert run(*bad, "1,x") == cli.EXIT_INPUT
    assert "--class-weights must be none, auto or numbers" in capsys.readouterr().err
    assert run(*bad, "1,2") == cli.EXIT_INPUT  # three classes need three weights
    assert "3 classes" in capsys.readouterr().err
    assert not (tmp_path / "bad.tsnet").exists()
    # Existing outputs are never replaced without --overwrite, and the message says so.
    assert (
        run("train", tmp_path / "ts.npz", "-o", tmp_path / "net.tsnet", "--iterations", 1)
        == cli.EXIT_INPUT
    )
    assert "add --overwrite" in capsys.readouterr().err

    # Two tomograms at once, one of them corrupt: it fails alone.
    broken = tmp_path / "broken.mrc"
    broken.write_bytes(b"not a tomogram" * 100)
    out = tmp_path / "seg"
    code = run("apply", tmp_path / "net.tsnet", tomo, broken, "--output-dir", out)
    assert code == cli.EXIT_PARTIAL
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "broken.mrc" in printed
    mask_path = out / "tomo_net_mask.mrc"
    membrane_prob = out / "tomo_net_membrane.mrc"
    ribosome_prob = out / "tomo_net_ribosome.mrc"
    for path in (mask_path, membrane_prob, ribosome_prob):
        assert read_tomogram(path).voxel_size == pytest.approx(voxel)
    assert not list(out.glob("broken*"))

    merged = tmp_path / "merged.mrc"
    assert (
        run(
            "merge",
            membrane_prob,
            ribosome_prob,
            "-o",
            merged,
            "--names",
            "membrane,ribosome",
            "--threshold",
            0.5,
            0.4,
        )
        == 0
    )
    merged_mask = read_tomogram(merged).data
    assert set(np.unique(merged_mask)) <= {0, 1, 2}
    assert (merged_mask == 1).any()

    # The probability maps record the threshold the mask was cut at (the network's own);
    # merge and suggest take it when no --threshold is given, and say so.
    own = load_network(tmp_path / "net.tsnet").meta.threshold
    assert threshold_of(read_tomogram(membrane_prob)) == pytest.approx(own, abs=1e-4)
    recorded = tmp_path / "merged_recorded.mrc"
    assert run("merge", membrane_prob, ribosome_prob, "-o", recorded) == 0
    assert "(recorded by apply)" in capsys.readouterr().out
    explicit = tmp_path / "merged_explicit.mrc"
    assert run("merge", membrane_prob, ribosome_prob, "-o", explicit, "--threshold", own) == 0
    assert np.array_equal(read_tomogram(recorded).data, read_tomogram(explicit).data)
    suggested = tmp_path / "suggested.csv"
    args = ("--positive", tmp_path / "pos.csv", "--negative", tmp_path / "neg.csv")
    assert run("suggest", membrane_prob, *args, "-n", 5, "-o", suggested) == 0
    assert f"threshold {own:g} (recorded by apply)" in capsys.readouterr().out
    existing = read_boxes_csv(tmp_path / "pos.csv") + read_boxes_csv(tmp_path / "neg.csv")
    for box in read_boxes_csv(suggested):
        assert not any(overlaps(box, other) for other in existing)

    star = tmp_path / "ribosomes.star"
    assert run("pick", mask_path, "--feature", 2, "--min-size", 20, "-o", star) == 0
    table = read_star(star)
    assert all(p.label == 2 for p in table.particles)
    assert table.tomo_name == "tomo"  # the tomogram's name (RELION), not the mask's
    assert run("pick", merged, "-o", tmp_path / "m.star") == 0  # merge keeps it
    assert read_star(tmp_path / "m.star").tomo_name == "tomo"
    named = tmp_path / "named.star"
    assert run("pick", mask_path, "--tomo-name", "TS_01", "-o", named) == 0
    assert read_star(named).tomo_name == "TS_01"
    assert run("apply", tmp_path / "net.tsnet", tomo, "--output-dir", out) == cli.EXIT_PARTIAL
    assert "add --overwrite to replace it" in capsys.readouterr().out


class _Interrupts:
    """Stands in for Ctrl-C handling: a stop request after ``stop_after`` mini-batches, or a
    second Ctrl-C (KeyboardInterrupt, the run dies) after ``kill_after``."""

    def __init__(self, stop_after: int | None = None, kill_after: int | None = None):
        self.stop_after, self.kill_after, self.calls = stop_after, kill_after, 0

    def __call__(self) -> _Interrupts:  # used as the class: StopOnInterrupt()
        return self

    def __enter__(self):
        def should_stop() -> bool:
            done, self.calls = self.calls, self.calls + 1
            if self.kill_after is not None and done >= self.kill_after:
                raise KeyboardInterrupt
            return self.stop_after is not None and done >= self.stop_after

        return should_stop

    def __exit__(self, *exc) -> None:
        return None


def test_train_keeps_a_checkpoint_until_done_and_resumes(
    tmp_path, capsys, monkeypatch, one_torch_thread
):
    import torch

    from test_training import ring_trainset

    ts_path = ring_trainset(n_pos=6, n_neg=6, copies=(4, 2)).save(tmp_path / "ts.npz")
    common = ("--architecture", "unet-lite", "--iterations", 10, "--batch-size", 4)
    common += ("--checkpoint-every", 4, "--device", "cpu")
    common += ("--start-from", "scratch")  # stops count mini-batches alone: no replay
    ref, net = tmp_path / "ref.tsnet", tmp_path / "net.tsnet"
    ckpt = tmp_path / "net.tsnet.ckpt"

    assert run("train", ts_path, "-o", ref, *common) == 0
    assert ref.is_file() and not (tmp_path / "ref.tsnet.ckpt").exists()  # finished: removed

    # The run dies (a second Ctrl-C) after 6 mini-batches: the checkpoint of 4 is kept.
    capsys.readouterr()
    monkeypatch.setattr(cli, "StopOnInterrupt", _Interrupts(kill_after=6))
    assert run("train", ts_path, "-o", net, *common) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert f"last checkpoint is {ckpt}" in err and "--resume" in err
    assert not net.exists() and read_checkpoint_meta(ckpt)["step"] == 4
    monkeypatch.undo()

    # Starting again without --resume would throw the checkpoint away: refused.
    assert run("train", ts_path, "-o", net, *common) == cli.EXIT_INPUT
    assert "add --resume" in capsys.readouterr().err

    # A stop request (Ctrl-C once) after 3 more: the network is saved, the checkpoint kept.
    monkeypatch.setattr(cli, "StopOnInterrupt", _Interrupts(stop_after=3))
    assert run("train", ts_path, "-o", net, *common, "--resume") == 0
    out = capsys.readouterr().out
    assert "stopped early" in out and f"mini-batch 7 of 10: {ckpt}" in out
    assert net.is_file() and read_checkpoint_meta(ckpt)["step"] == 7
    monkeypatch.undo()

    # Resumed to the end: the very network of the uninterrupted run; checkpoint removed.
    assert run("train", ts_path, "-o", net, *common, "--resume") == 0
    assert "finished" in capsys.readouterr().out and not ckpt.exists()
    a, b = load_network(ref), load_network(net)
    assert a.meta.history == b.meta.history
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b.model.state_dict()[name]), name

    assert run("train", ts_path, "-o", net, *common, "--resume") == cli.EXIT_INPUT
    assert "there is no checkpoint" in capsys.readouterr().err

    # The run finishes but its network cannot be written (a full disk): the checkpoint,
    # holding the final state, is kept, and --resume saves that network without training.
    from napari_tomoseg.errors import TomosegIOError
    from napari_tomoseg.learning import model_file

    full = tmp_path / "full.tsnet"

    def disk_full(*args, **kwargs):
        raise TomosegIOError(f"Cannot write {full}: No space left on device.")

    monkeypatch.setattr(model_file, "save_network", disk_full)
    assert run("train", ts_path, "-o", full, *common) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "No space left" in err and "--resume" in err
    assert not full.exists() and read_checkpoint_meta(f"{full}.ckpt")["step"] == 10
    monkeypatch.undo()
    assert run("train", ts_path, "-o", full, *common, "--resume") == 0
    assert full.is_file() and not (tmp_path / "full.tsnet.ckpt").exists()
    c = load_network(full)
    assert c.meta.history == a.meta.history
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, c.model.state_dict()[name]), name


def test_demo_runs_the_whole_job_and_its_dice_is_that_of_its_files(tmp_path, capsys):
    from napari_tomoseg.simulator.demo import dice_scores

    out = tmp_path / "demo"
    # the microtubule network applies in one slice plane (the membranes' in three, 3x longer)
    args = ["--iterations", 20, "--seed", 1, "--feature", "microtubule"]
    assert run("demo", "--output-dir", out, *args) == 0
    printed = capsys.readouterr().out
    names = ["simulated_tomogram.mrc", "ground_truth.mrc", "microtubule_mask.mrc"]
    tomogram, truth, mask = (read_tomogram(out / n) for n in names)
    assert tomogram.voxel_size == truth.voxel_size == mask.voxel_size == (10.0, 10.0, 10.0)
    assert load_network(out / "microtubule.tsnet").meta.voxel_size == (10.0, 10.0, 10.0)
    # the printed Dice are those of the written mask against the written truth
    labels, predicted = np.asarray(truth.data), np.asarray(mask.data)
    value = CLASS_NAMES.index("microtubule")
    whole = dice_scores(predicted, (labels == value).astype(np.uint8), [1])[1]
    z0, z1 = int(labels.shape[0] * 0.2), int(labels.shape[0] * 0.8)
    central = dice_scores(predicted[z0:z1], (labels[z0:z1] == value).astype(np.uint8), [1])[1]
    assert f"against the ground truth: {whole:.3f}" in printed
    assert f"Dice over slices {z0}-{z1 - 1}, where the boxes were drawn" in printed
    assert f"{central:.3f}" in printed

    # Run again into the same folder: refused before any work, nothing touched.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert run("demo", "--output-dir", out, *args) == cli.EXIT_INPUT
    assert "already exist" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
