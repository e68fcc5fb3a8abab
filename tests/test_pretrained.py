"""The networks shipped with the package: safe to load, useful zero-shot, and the start of
training for the features they know."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_tomoseg import cli
from napari_tomoseg.applying.inference import ApplySettings, apply_network
from napari_tomoseg.data.io import read_tomogram, write_mrc
from napari_tomoseg.errors import TomosegError
from napari_tomoseg.learning import training
from napari_tomoseg.learning.augment import (
    AUGMENTATION_DEFAULTS,
    FINE_TUNING_AUGMENTATION,
    NO_AUGMENTATION,
)
from napari_tomoseg.learning.model_file import Network, read_network_meta
from napari_tomoseg.learning.pretrained import (
    MULTICLASS,
    available,
    feature_of,
    load_pretrained,
    match,
    shipped_file,
    starting_network,
    transfer_weights,
)
from napari_tomoseg.learning.training import KEEP_FLOOR, KEEP_TOLERANCE, TrainSettings, train
from napari_tomoseg.learning.trainset import TrainsetSettings
from napari_tomoseg.simulator.demo import central_slices, dice_scores, trainset_from_truth
from napari_tomoseg.simulator.synthetic import CLASS_NAMES, simulate_tomogram

FEATURES = CLASS_NAMES[1:]


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


@pytest.fixture(scope="module")
def shifted():
    """A tomogram unlike the default training setting: another scene, noisier, defocus
    5 um without CTF correction, thicker membranes."""
    return simulate_tomogram(
        shape=(48, 192, 192),
        seed=77,
        snr=0.5,
        defocus_um=5.0,
        phase_flip=False,
        membrane_thickness_nm=6.0,
    )


def test_every_feature_and_the_multiclass_network_are_shipped_and_load_safely():
    files = available()
    assert set(files) == {MULTICLASS, *FEATURES}
    total = 0
    for name, path in files.items():
        total += path.stat().st_size
        net = load_pretrained(name)
        meta = net.meta
        assert meta.voxel_size == pytest.approx((10.0, 10.0, 10.0))  # one number in the file
        assert meta.threshold is not None and 0.0 < meta.threshold < 1.0
        assert meta.architecture == TrainSettings().architecture
        if name == MULTICLASS:
            assert meta.class_names == CLASS_NAMES
        else:
            assert meta.class_names == ("background", name)
    assert total < 8 * 2**20  # a few MB in all (half-precision weights; 6.0 MB now)
    with pytest.raises(TomosegError, match="no shipped network 'actin'.*available: "):
        load_pretrained("actin")


def test_the_default_training_set_takes_the_context_of_the_shipped_networks():
    default = TrainsetSettings().context_slices
    for name in (MULTICLASS, "single_membrane", "microtubule"):  # fine-tuned as they are
        assert read_network_meta(shipped_file(name)).context_slices == default, name


@pytest.mark.parametrize(
    ("word", "feature"),
    [
        ("Membranes", "single_membrane"),
        ("plasma membrane", "single_membrane"),
        ("MT", "microtubule"),
        ("microtubules", "microtubule"),
        ("mitochondria", "double_membrane"),
        ("Ribosomes", "ribosome"),
        ("carbon", "carbon_edge"),
        ("actin", None),
        ("feature 1", None),
    ],
)
def test_feature_names_a_user_gives_are_recognised(word, feature):
    assert feature_of(word) == feature


def test_the_network_to_start_from_is_chosen_by_the_painted_features():
    assert match(("background", "membrane")) == "single_membrane"
    assert match(("background", "membrane", "ribosomes")) == MULTICLASS
    assert match(("background", "actin")) is None
    assert match(("background", "membrane", "actin")) is None
    net, said = starting_network("auto", ("background", "MT"), "unet-lite", 1)
    assert net is not None and net.meta.class_names[1] == "microtubule"
    assert "microtubule" in said
    none, said = starting_network("auto", ("background", "MT"), "unet", 1)
    assert none is None and "random weights" in said
    none, said = starting_network("scratch", ("background", "MT"), "unet-lite", 1)
    assert none is None and "scratch" in said
    shipped = read_network_meta(shipped_file("ribosome")).in_channels
    other, said = starting_network("ribosome", ("background", "x"), "unet-lite", shipped + 2)
    assert other is not None and other.meta.in_channels == shipped  # fitted when transferred
    assert f"fitted from {shipped // 2} to {shipped // 2 + 1} context slice(s)" in said
    with pytest.raises(TomosegError, match="input channel"):
        starting_network("ribosome", ("background", "x"), "unet", 1)
    with pytest.raises(TomosegError, match="input channel"):
        starting_network("ribosome", ("background", "x"), "unet-lite", 2)


def test_a_network_starts_one_of_other_context_slices_computing_the_same():
    torch.manual_seed(2)
    flat = Network.create("unet-lite", 1, 6, class_names=CLASS_NAMES)
    wide = Network.create("unet-lite", 5, 6, class_names=CLASS_NAMES)
    transfer_weights(flat, wide)  # 2D -> 2.5D: the same on the central slice, any input
    x = torch.randn(2, 5, 32, 32)
    with torch.no_grad():
        flat.model.eval(), wide.model.eval()
        assert torch.allclose(wide.model(x), flat.model(x[:, 2:3]), atol=1e-5)
        torch.nn.init.normal_(next(wide.model.parameters()))  # a context it has learned
        narrow = Network.create("unet-lite", 3, 6, class_names=CLASS_NAMES)
        transfer_weights(wide, narrow)  # 5 -> 3 slices: the same where Z does not change
        narrow.model.eval()
        same = x[:, 2:3].expand(-1, 5, -1, -1)
        assert torch.allclose(narrow.model(same[:, :3]), wide.model(same), atol=1e-4)
        assert not torch.allclose(narrow.model(x[:, 1:4]), wide.model(x), atol=1e-3)
    with pytest.raises(TomosegError, match="input channel"):
        transfer_weights(wide, Network.create("unet-lite", 2, 6, class_names=CLASS_NAMES))


def test_a_binary_network_takes_its_feature_against_background_from_the_multiclass_one():
    torch.manual_seed(1)
    source = Network.create("unet-lite", 1, 6, class_names=CLASS_NAMES)
    target = Network.create("unet-lite", 1, 2, class_names=("background", "MT"))
    info = transfer_weights(source, target)
    assert info["output_classes_matched"] == ["microtubule"]
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        source.model.eval(), target.model.eval()
        logits = source.model(x)
        expected = logits[:, 1] - logits[:, 0]  # microtubule against background
        assert torch.allclose(target.model(x)[:, 0], expected, atol=1e-4)


def test_zero_shot_shipped_networks_segment_an_unseen_tomogram(shifted):
    z0, z1 = central_slices(shifted.tomogram.shape[0])
    scores = {}
    for name in ("single_membrane", "microtubule", "ribosome"):
        result = apply_network(
            load_pretrained(name),
            shifted.tomogram,
            voxel_size=shifted.voxel_size,
            settings=ApplySettings(),
        )
        truth = (shifted.labels == CLASS_NAMES.index(name)).astype(np.uint8)
        mask = np.asarray(result.mask)
        scores[name] = dice_scores(mask[z0:z1], truth[z0:z1], [1])[1]
    # measured: see docs/models.md; floors well above what chance gives (< 0.1)
    assert scores["single_membrane"] >= 0.45, scores
    assert scores["microtubule"] >= 0.45, scores
    assert scores["ribosome"] >= 0.35, scores


def test_fine_tuning_starts_from_the_shipped_weights(shifted):
    trainset = trainset_from_truth(shifted, ["single_membrane"], 4, 12, seed=1)
    trainset.class_names = ("background", "membrane")
    common = {"iterations": 1, "eval_every": 1, "augment": False, "seed": 3}
    tuned = train(trainset, TrainSettings(start_from="auto", **common))
    scratch = train(trainset, TrainSettings(start_from="scratch", **common))
    assert "single_membrane" in tuned.metadata["started_from"]
    assert "random" in scratch.metadata["started_from"]
    assert tuned.history[0]["loss"] < scratch.history[0]["loss"]
    assert tuned.metrics["mean_foreground_f1"] > scratch.metrics["mean_foreground_f1"]
    # applied as the shipped network is: three planes at its three-plane threshold
    shipped = load_pretrained("single_membrane").meta
    assert (tuned.network.meta.planes, tuned.network.meta.threshold_three_planes) == (
        3,
        shipped.threshold_three_planes,
    )
    assert tuned.metadata["planes_from"] == "the network it started from"
    assert (scratch.network.meta.planes, scratch.network.meta.threshold_three_planes) == (1, None)


def test_a_fine_tuning_augments_with_more_noise_and_blur_unless_told(shifted):
    """A run from a shipped network takes FINE_TUNING_AUGMENTATION for the strengths its
    settings leave unnamed; a run from scratch the defaults; named strengths win."""
    trainset = trainset_from_truth(shifted, ["single_membrane"], 4, 12, seed=1)
    common = {"iterations": 1, "eval_every": 1, "seed": 3}

    def used(**changes):
        return train(trainset, TrainSettings(**common, **changes)).metadata["augmentation"]

    tuned, scratch = used(), used(start_from="scratch")
    assert scratch == AUGMENTATION_DEFAULTS
    assert tuned == {**AUGMENTATION_DEFAULTS, **FINE_TUNING_AUGMENTATION} != scratch
    assert used(augmentation={"noise": 0.3}) == {**tuned, "noise": 0.3}
    assert used(augmentation=NO_AUGMENTATION) == NO_AUGMENTATION


def _stop_after(checks: int):
    """A ``should_stop`` that asks to stop from its ``checks``-th call on."""
    calls = {"n": 0}

    def check() -> bool:
        calls["n"] += 1
        return calls["n"] > checks

    return check


def _split_parameters(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """The names of ``model``'s parameters in its encoder (``model.encoder()``) and of the
    others."""
    inside = {id(p) for part in model.encoder() for p in part.parameters()}
    named = list(model.named_parameters())
    return [n for n, p in named if id(p) in inside], [n for n, p in named if id(p) not in inside]


def test_fine_tuning_the_decoder_keeps_the_shipped_encoder_and_resumes(shifted, tmp_path):
    trainset = trainset_from_truth(shifted, ["single_membrane"], 4, 12, seed=1)
    ckpt = tmp_path / "run.ckpt"
    common = {"iterations": 6, "eval_every": 2, "augment": False, "seed": 3, "keep_start": 0.0}
    resumable = {"checkpoint": str(ckpt), "checkpoint_every": 2}
    settings = TrainSettings(fine_tune="decoder", **resumable, **common)
    stopped = train(trainset, settings, should_stop=_stop_after(3))
    assert stopped.stopped and ckpt.is_file()
    resumed = train(trainset, settings, resume=True)  # the optimiser's state fits again
    assert resumed.metadata["resumed_from_step"] is not None
    whole = train(trainset, TrainSettings(fine_tune="decoder", **common))
    full = train(trainset, TrainSettings(fine_tune="all", **common))
    start = load_pretrained("single_membrane").model.state_dict()
    kept, tuned = whole.network.model.state_dict(), full.network.model.state_dict()
    encoder, decoder = _split_parameters(whole.network.model)
    assert encoder and all(torch.equal(kept[k], start[k]) for k in encoder)
    assert any(not torch.equal(tuned[k], start[k]) for k in encoder)  # "all" trains them
    assert any(not torch.equal(kept[k], start[k]) for k in decoder)
    assert all(p.requires_grad for p in whole.network.model.parameters())
    assert whole.metadata["fine_tune"] == "decoder" and full.metadata["fine_tune"] == "all"
    assert resumed.history == whole.history
    for name, tensor in kept.items():
        assert torch.equal(tensor, resumed.network.model.state_dict()[name]), name


def test_fine_tuning_the_decoder_trains_an_input_layer_fitted_to_other_slices(shifted):
    """The shipped carbon_edge network sees one slice; started for five, its input layer
    has zero weights on the four new ones, which a kept encoder would never fill."""
    trainset = trainset_from_truth(shifted, ["carbon_edge"], 3, 6, seed=1)
    assert load_pretrained("carbon_edge").meta.in_channels < trainset.images.shape[1]
    common = {"iterations": 3, "eval_every": 3, "augment": False, "seed": 3, "keep_start": 0.0}
    result = train(trainset, TrainSettings(fine_tune="decoder", **common))
    model = result.network.model
    start = Network.create("unet-lite", trainset.images.shape[1], 2, class_names=("b", "c"))
    transfer_weights(load_pretrained("carbon_edge"), start)
    first, fitted = model.down[0][0].weight, start.model.down[0][0].weight
    assert not torch.any(fitted[:, [0, 1, 3, 4]])  # zeros on the context slices ...
    assert torch.any(first[:, [0, 1, 3, 4]] != 0)  # ... filled by the training
    encoder, _ = _split_parameters(model)
    kept, begun = model.state_dict(), start.model.state_dict()
    others = [k for k in encoder if not k.startswith("down.0.0.")]
    assert others and all(torch.equal(kept[k], begun[k]) for k in others)


def test_fine_tuning_keeps_the_encoder_by_default_where_the_start_takes_the_slices(shifted):
    """auto: the encoder kept from a shipped network that takes the training set's slices
    as they are (the same run as "decoder"), every layer trained otherwise."""
    common = {"iterations": 2, "eval_every": 2, "augment": False, "seed": 3, "keep_start": 0.0}
    assert TrainSettings().fine_tune == "auto"
    membrane = trainset_from_truth(shifted, ["single_membrane"], 3, 6, seed=1)
    auto = train(membrane, TrainSettings(**common))
    decoder = train(membrane, TrainSettings(fine_tune="decoder", **common))
    assert auto.metadata["fine_tune"] == "decoder" and auto.history == decoder.history
    for name, tensor in auto.network.model.state_dict().items():
        assert torch.equal(tensor, decoder.network.model.state_dict()[name]), name
    narrower = trainset_from_truth(
        shifted,
        ["single_membrane"],
        3,
        6,
        seed=1,
        trainset_settings=TrainsetSettings(context_slices=1),
    )
    assert train(narrower, TrainSettings(**common)).metadata["fine_tune"] == "all"
    scratch = train(membrane, TrainSettings(start_from="scratch", **common))
    assert scratch.metadata["fine_tune"] == "all"


def test_fine_tuning_the_decoder_needs_a_start_and_a_known_choice(shifted):
    trainset = trainset_from_truth(shifted, ["single_membrane"], 2, 4, seed=1)
    with pytest.raises(TomosegError, match="random weights"):
        train(trainset, TrainSettings(iterations=1, start_from="scratch", fine_tune="decoder"))
    with pytest.raises(TomosegError, match="fine_tune must be one of auto, all, decoder"):
        TrainSettings(fine_tune="encoder").validate()


def test_fine_tuned_weights_are_averaged_with_the_shipped_ones(shifted):
    trainset = trainset_from_truth(shifted, ["single_membrane"], 4, 12, seed=1)
    common = {"iterations": 3, "eval_every": 1, "augment": False, "seed": 3}
    plain = train(trainset, TrainSettings(keep_start=0.0, **common))
    mixed = train(trainset, TrainSettings(keep_start=0.4, **common))
    scratch = train(trainset, TrainSettings(keep_start=0.4, start_from="scratch", **common))
    assert plain.metadata["keep_start"] == 0.0 and scratch.metadata["keep_start"] == 0.0
    assert plain.metadata["keep_start_held_out_f1"] == {}  # nothing to choose
    # the held-out boxes scored the average at 0.4, 0.2 and 0 of the start; the largest
    # within KEEP_TOLERANCE of the best is kept, but never less than half of keep_start
    scores = {float(k): v for k, v in mixed.metadata["keep_start_held_out_f1"].items()}
    assert sorted(scores) == [0.0, 0.2, 0.4] and mixed.metadata["split"]["held_out"]
    kept = mixed.metadata["keep_start"]
    near = max(f for f, v in scores.items() if v >= max(scores.values()) - KEEP_TOLERANCE)
    assert kept == max(near, 0.4 * KEEP_FLOOR) and kept > 0
    # the threshold is the one calibrated for the kept average
    assert mixed.metadata["threshold_calibration"]["f1_at_chosen"] == scores[kept]
    start = load_pretrained("single_membrane").model.state_dict()
    tuned, result = plain.network.model.state_dict(), mixed.network.model.state_dict()
    floats = [k for k, v in tuned.items() if v.is_floating_point()]
    assert floats and any(not torch.equal(tuned[k], start[k]) for k in floats)
    for k in floats:
        expected = kept * start[k].float() + (1 - kept) * tuned[k]
        torch.testing.assert_close(result[k], expected, rtol=1e-5, atol=1e-6)
    # without held-out boxes nothing can judge the average: keep_start is kept as asked
    with pytest.warns(UserWarning, match="training boxes"):
        alone = train(trainset, TrainSettings(keep_start=0.4, validation_fraction=0, **common))
    assert alone.metadata["keep_start"] == 0.4 and not alone.metadata["split"]["held_out"]


def test_fine_tuning_keeps_a_share_of_the_start_however_its_boxes_score(shifted, monkeypatch):
    """Held-out boxes that score the trained weights alone far above every average still
    get half of keep_start: they come from the painted tomogram, which is not every
    tomogram the network will see."""
    trainset = trainset_from_truth(shifted, ["single_membrane"], 4, 12, seed=1)
    scored = iter([0.3, 0.5, 0.9])  # keeping 0.4, 0.2 and none of the start, in that order
    real = training._calibrate

    def calibrate(run, ts):
        threshold, calibration = real(run, ts)
        return threshold, {**calibration, "f1_at_chosen": next(scored, 0.0)}

    monkeypatch.setattr(training, "_calibrate", calibrate)
    common = {"iterations": 2, "eval_every": 1, "augment": False, "seed": 3}
    result = train(trainset, TrainSettings(keep_start=0.4, **common))
    assert result.metadata["keep_start_held_out_f1"] == {"0.4": 0.3, "0.2": 0.5, "0.0": 0.9}
    assert result.metadata["keep_start"] == 0.4 * KEEP_FLOOR == 0.2
    said = training.kept_described(result.metadata)
    assert said.startswith("kept 20% of the starting network's weights; the least a run keeps")


def test_shipped_membrane_networks_apply_in_three_planes_unless_told(tmp_path, shifted):
    network = load_pretrained("single_membrane")
    assert network.meta.planes == 3 and network.meta.threshold_three_planes is not None
    volume = shifted.tomogram[:24]
    tomo = write_mrc(tmp_path / "tomo.mrc", volume, shifted.voxel_size)
    masks = {}
    for planes, extra in ((3, []), (1, ["--planes", "1"])):
        out = tmp_path / f"planes{planes}"
        args = ["-q", "apply", "--pretrained", "single_membrane", str(tomo), *extra]
        assert cli.main([*args, "--output-dir", str(out)]) == 0
        masks[planes] = read_tomogram(out / "tomo_single_membrane_mask.mrc").data
        direct = apply_network(
            network, volume, voxel_size=shifted.voxel_size, settings=ApplySettings(planes=planes)
        )
        assert np.array_equal(masks[planes], direct.mask)
    assert not np.array_equal(masks[1], masks[3])


def test_apply_a_shipped_network_from_the_command_line(tmp_path, shifted, capsys):
    tomo = write_mrc(tmp_path / "tomo.mrc", shifted.tomogram[:16], shifted.voxel_size)
    assert cli.main(["pretrained"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in available()) and "context slice(s)" in listed
    code = cli.main(
        ["-q", "apply", "--pretrained", "ribosome", str(tomo), "--output-dir", str(tmp_path)]
    )
    assert code == 0
    mask = read_tomogram(tmp_path / "tomo_ribosome_mask.mrc")
    assert mask.data.shape == (16, 192, 192)
    assert mask.voxel_size == pytest.approx((10.0,) * 3)
    assert cli.main(["apply", "--pretrained", "actin", str(tomo)]) == cli.EXIT_INPUT
    assert "no shipped network 'actin'" in capsys.readouterr().err
    assert cli.main(["apply", str(tomo)]) == cli.EXIT_INPUT
    assert "Give the network file and at least one tomogram" in capsys.readouterr().err
