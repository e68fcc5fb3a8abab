"""Tiled, streaming application of networks to whole tomograms."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tracemalloc
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from napari_tomoseg.applying import inference as inf
from napari_tomoseg.applying.inference import (
    DEFAULT_THRESHOLD,
    ApplySettings,
    apply_binned,
    apply_file,
    apply_network,
    iter_apply,
    iter_apply_file,
    network_threshold,
    plan_tiles,
    predict_slices,
    probabilities_as_float,
    receptive_field,
)
from napari_tomoseg.applying.inference import apply as inf_apply
from napari_tomoseg.applying.inference import kernels as inf_kernels
from napari_tomoseg.applying.inference import tiling as inf_tiling
from napari_tomoseg.applying.merge import MergeInput, merge_probability_maps
from napari_tomoseg.data.io import header_labels, read_tomogram, source_label, write_mrc
from napari_tomoseg.data.preprocess import Normalisation, robust_stats
from napari_tomoseg.data.probability import PROBABILITY_LABEL
from napari_tomoseg.errors import MissingVoxelSizeWarning, TomosegError, TomosegIOError
from napari_tomoseg.learning.model_file import Network, NetworkMeta, load_network, save_network
from napari_tomoseg.learning.models import build_model, predict_proba


# -- small networks with known behaviour --------------------------------------------------------
class Threshold(nn.Module):
    """Binary: logit = gain * (x - level) on the centre channel (a 1x1 'network')."""

    def __init__(self, gain: float = 6.0, level: float = 1.0, channels: int = 1, use: int = -1):
        super().__init__()
        self.gain, self.level = gain, level
        self.use = channels // 2 if use < 0 else use
        self.scale = nn.Parameter(torch.ones(1))  # a parameter, so the model has a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.gain * (x[:, self.use : self.use + 1] - self.level)


class TinyFCN(nn.Module):
    """Conv 5x5 -> ReLU -> max-pool 2 -> conv 5x5 -> ReLU -> bilinear 2x -> conv 1x1."""

    def __init__(self, n_out: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(1, 6, 5, padding=2)
        self.c2 = nn.Conv2d(6, 6, 5, padding=2)
        self.c3 = nn.Conv2d(6, n_out, 1)
        with torch.no_grad():
            for c in (self.c1, self.c2, self.c3):
                c.weight.copy_(torch.randn(c.weight.shape, generator=g) * 0.3)
                c.bias.copy_(torch.randn(c.bias.shape, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, w % 2, 0, h % 2), mode="replicate")  # odd sizes: pool needs even
        y = F.max_pool2d(F.relu(self.c1(x)), 2)
        y = F.relu(self.c2(y))
        y = F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.c3(y)[..., :h, :w]


def _symmetrise(weight: torch.Tensor) -> torch.Tensor:
    """Average a kernel over the 8 rotations / mirror images of the square."""
    views = []
    for flip in (False, True):
        k = torch.flip(weight, dims=(-1,)) if flip else weight
        views += [torch.rot90(k, r, dims=(-2, -1)) for r in range(4)]
    return torch.stack(views).mean(dim=0)


class D4Model(nn.Module):
    """Convolutions with rotation/mirror-symmetric kernels: equivariant to the 8 TTA views."""

    def __init__(self, symmetric: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.c1 = nn.Conv2d(1, 4, 5, padding=2)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 3, 1)
        with torch.no_grad():
            for c in (self.c1, self.c2, self.c3):
                w = torch.randn(c.weight.shape, generator=g) * 0.5
                c.weight.copy_(_symmetrise(w) if symmetric else w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(F.relu(self.c1(x)), 2)
        y = F.relu(self.c2(y))
        return self.c3(F.interpolate(y, scale_factor=2.0, mode="nearest"))


def network(
    model: nn.Module,
    n_classes: int = 2,
    *,
    context: int = 0,
    voxel_size: float | None = 10.0,
    normalisation: dict | None = None,
    class_names: tuple[str, ...] = (),
) -> Network:
    meta = NetworkMeta(
        architecture="tomoseg-cnn",
        model_params={},
        in_channels=2 * context + 1,
        n_classes=n_classes,
        class_names=class_names,
        voxel_size=voxel_size,
        normalisation=normalisation or {"mode": "tomogram", "clamp_sigma": None},
        context_slices=context,
    )
    return Network(model=model, meta=meta)


def blobs(shape=(12, 70, 90), seed=0, noise=0.05):
    """Spheres of value 1 on 0 with a little noise; returns (volume float32, labels)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    labels = np.zeros(shape, dtype=np.uint8)
    for _ in range(6):
        c = rng.uniform([0, 8, 8], [shape[0], shape[1] - 8, shape[2] - 8])
        r = rng.uniform(5, 8)
        labels[((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= r * r] = 1
    vol = labels.astype(np.float32) + rng.normal(0, noise, shape).astype(np.float32)
    return vol, labels


def dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def normalised(volume, clamp=None):
    norm = Normalisation(mode="tomogram", clamp_sigma=clamp)
    return norm.apply_with_stats(volume, *robust_stats(volume))


# -- receptive field and tiling -----------------------------------------------------------------
def test_receptive_field_of_registered_architectures():
    cnn = build_model("tomoseg-cnn", 1, 2)
    rf = receptive_field(cnn, 1)
    # 7 px (first 15x15 layer) + 1 (pool) + 2 x 14 (15x15 at half resolution) + bilinear 2x
    assert rf.alignment == 2
    assert 34 <= rf.margin <= 40
    lite = build_model("unet-lite", 1, 3)
    rf_lite = receptive_field(lite, 1)
    assert rf_lite.alignment == 8  # three 2x2 poolings
    assert rf_lite.margin > rf.margin
    # the single-channel tracer agrees with the full positive-weight copy
    small = build_model("tomoseg-cnn", 1, 2, n_kernels=[3, 3])
    probe = inf_tiling._positive_copy(small)
    x = torch.zeros((2, 1, 160, 160), dtype=torch.float64)
    x[0, 0, 80, 80] = 1.0
    with torch.no_grad():
        y = probe(x)
    ys, xs = torch.nonzero((y[0] - y[1]).abs().sum(0) > 0, as_tuple=True)
    full_margin = max(int((ys - 80).abs().max()), int((xs - 80).abs().max()))
    assert receptive_field(small, 1).margin >= full_margin >= receptive_field(small, 1).margin - 1


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 300),
    w=st.integers(1, 300),
    tile=st.integers(16, 128),
    overlap_frac=st.floats(0.0, 0.9),
    margin=st.integers(0, 40),
    align=st.sampled_from([1, 2, 8, 16]),
)
def test_tile_plan_covers_every_pixel(h, w, tile, overlap_frac, margin, align):
    tile = max(tile, align)
    overlap = int(overlap_frac * tile) // align * align
    if overlap >= inf_tiling._round_up(tile, align):
        return
    plan = plan_tiles((h, w), tile, overlap, margin, align)
    assert plan.tile <= inf_tiling._round_up(tile, align)
    assert all(o % align == 0 for o in plan.origins_y + plan.origins_x)
    ph, pw = plan.padded_shape
    assert ph >= h and pw >= w
    assert plan.weight_sum()[:h, :w].min() > 0


def _tiled_vs_whole(model, shape, tile, n_classes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 1, *shape)).astype(np.float32)
    rf = receptive_field(model, 1)
    tile_size, overlap, _ = inf_tiling._effective_tiling(ApplySettings(tile_size=tile), rf)
    plan = plan_tiles(shape, tile_size, overlap, rf.margin, rf.alignment)
    assert plan.n_tiles >= 4  # really tiled
    tiled = dict(predict_slices(model, [(i, x[i]) for i in range(2)], plan, batch_size=3))
    whole = predict_proba(model, torch.from_numpy(x)).numpy()
    assert whole.shape[1] == n_classes
    h, w = shape
    m = rf.margin  # the far edges see mirrored padding instead of zeros
    for i in range(2):
        assert tiled[i].shape == (n_classes, h, w)
        np.testing.assert_allclose(
            tiled[i][:, : h - m, : w - m], whole[i][:, : h - m, : w - m], atol=1e-5, rtol=0
        )
    return tiled, whole, rf


def test_tiled_equals_whole_slice_tomoseg_cnn():
    torch.manual_seed(0)
    model = build_model("tomoseg-cnn", 1, 2)  # 15x15 kernels, 2x2 max-pool
    _tiled_vs_whole(model, (192, 212), tile=128, n_classes=2)


def test_tiled_equals_whole_slice_unet_lite():
    torch.manual_seed(1)
    model = build_model("unet-lite", 1, 3)
    model.eval()
    _tiled_vs_whole(model, (300, 330), tile=160, n_classes=3, seed=1)


def test_small_explicit_overlap_warns_and_still_blends():
    model = TinyFCN()
    net = network(model, 3)
    vol = np.random.default_rng(0).normal(size=(2, 60, 70)).astype(np.float32)
    with pytest.warns(UserWarning, match="receptive-field"):
        result = apply_network(
            net, vol, voxel_size=10.0, settings=ApplySettings(tile_size=32, overlap=4, tta=False)
        )
    assert result.mask.shape == vol.shape


def test_large_tomogram_odd_sizes_batches_and_chunks_match_whole_slices():
    model = TinyFCN(n_out=3, seed=2)
    net = network(model, 3, class_names=("background", "a", "b"))
    rng = np.random.default_rng(5)
    vol = rng.normal(size=(7, 131, 157)).astype(np.float32) * 3 + 20
    s = ApplySettings(tile_size=48, batch_size=5, z_chunk=3, threshold=0.4)
    events = []
    result = apply_network(net, vol, voxel_size=10.0, settings=s, callback=events.append)
    ref = predict_proba(model, torch.from_numpy(normalised(vol)[:, None])).numpy()
    m = receptive_field(model, 1).margin
    for k in (1, 2):
        got = probabilities_as_float(result.probabilities[k - 1])
        assert np.abs(got - ref[:, k])[:, :-m, :-m].max() <= 0.5 / 100 + 1e-5
    want = np.argmax(ref, axis=1)
    want = np.where((want > 0) & (np.max(ref, axis=1) >= 0.4), want, 0)
    inner = (slice(None), slice(0, -m), slice(0, -m))
    assert (result.mask[inner] == want[inner]).mean() > 0.999
    assert result.probabilities[0].dtype == np.int8 and result.mask.dtype == np.uint8
    assert result.foreground_names == ["a", "b"]
    steps = [e.step for e in events if e.stage == "apply"]
    assert steps[-1] == 7 and steps == sorted(steps)
    assert not result.stopped and result.slices_done == 7


def test_context_slices_are_clamped_at_the_z_ends():
    # the network looks only at the slice *before* (channel 0 of 3)
    net = network(Threshold(gain=40.0, level=0.0, channels=3, use=0), 2, context=1)
    vol = np.zeros((4, 40, 40), dtype=np.float32)
    vol[0] = 1.0  # only the first slice is bright
    result = apply_network(net, vol, voxel_size=10.0)
    # slice 0's previous slice is itself (clamped); slice 1 sees slice 0; others see dark
    assert result.mask[0].all() and result.mask[1].all()
    assert not result.mask[2].any() and not result.mask[3].any()


# -- test-time augmentation ---------------------------------------------------------------------
@pytest.mark.parametrize("n", [8, 4])
def test_tta_on_an_equivariant_model_changes_nothing(n):
    vol = np.random.default_rng(1).normal(size=(2, 100, 90)).astype(np.float32)
    x = normalised(vol)[:, None]
    model = D4Model(symmetric=True)
    rf = receptive_field(model, 1)
    plan = plan_tiles((100, 90), 64, inf.auto_overlap(rf), rf.margin, rf.alignment)
    plain = dict(predict_slices(model, [(i, x[i]) for i in range(2)], plan))
    tta = dict(predict_slices(model, [(i, x[i]) for i in range(2)], plan, tta=n))
    for i in range(2):
        np.testing.assert_allclose(tta[i], plain[i], atol=1e-5, rtol=0)
    # and on a model without the symmetry the views do disagree (so the test can fail)
    skew = D4Model(symmetric=False)
    a = dict(predict_slices(skew, [(0, x[0])], plan))[0]
    b = dict(predict_slices(skew, [(0, x[0])], plan, tta=n))[0]
    assert np.abs(a - b).max() > 1e-3


def test_tta_setting_reaches_the_run():
    vol = np.random.default_rng(2).normal(size=(2, 50, 50)).astype(np.float32)
    net = network(D4Model(symmetric=True), 3)
    plain = apply_network(net, vol, voxel_size=10.0)
    tta = apply_network(net, vol, voxel_size=10.0, settings=ApplySettings(tta=True))
    for a, b in zip(plain.probabilities, tta.probabilities):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    skew = network(D4Model(symmetric=False), 3)
    a = apply_network(skew, vol, voxel_size=10.0)
    b = apply_network(skew, vol, voxel_size=10.0, settings=ApplySettings(tta=True))
    assert np.abs(a.probabilities[0].astype(int) - b.probabilities[0].astype(int)).max() > 2


# -- masks --------------------------------------------------------------------------------------
def test_mask_rules_binary_and_multiclass():
    binary = np.array([[[0.7]], [[0.3]]], dtype=np.float32)  # (2, 1, 1): p1 = 0.3
    assert inf_apply._make_mask(binary, 0.25)[0, 0] == 1  # binary: p >= threshold
    assert inf_apply._make_mask(binary, 0.5)[0, 0] == 0
    p = np.zeros((3, 1, 4), dtype=np.float32)
    p[:, 0, 0] = [0.2, 0.5, 0.3]  # class 1 wins and reaches 0.5
    p[:, 0, 1] = [0.3, 0.35, 0.35]  # tie between 1 and 2 (argmax: 1) but below 0.5
    p[:, 0, 2] = [0.6, 0.1, 0.3]  # background wins
    p[:, 0, 3] = [0.1, 0.3, 0.6]
    assert inf_apply._make_mask(p, 0.5).tolist() == [[1, 0, 0, 2]]
    assert inf_apply._make_mask(p, 0.3).tolist() == [[1, 1, 0, 2]]


def test_probability_storage_round_trip():
    p = np.linspace(0, 1, 1001, dtype=np.float32)
    q = inf.quantize_probabilities(p)
    assert q.dtype == np.int8 and q[0] == 0 and q[-1] == 100  # percent, MRC mode 0
    assert np.abs(probabilities_as_float(q) - p).max() <= 0.5 / 100 + 1e-7
    assert np.array_equal(probabilities_as_float(q.astype(np.int16)), probabilities_as_float(q))
    assert probabilities_as_float(p) is p or np.array_equal(probabilities_as_float(p), p)
    # the unsigned bytes of earlier versions (value / 255) still read right
    legacy = np.rint(p * 255).astype(np.uint8)
    assert np.abs(probabilities_as_float(legacy) - p).max() <= 0.5 / 255 + 1e-7


# -- files, cancel, memory ----------------------------------------------------------------------
def _write_tomogram(path, volume, voxel_size=10.0):
    write_mrc(path, volume, voxel_size)
    return path


def test_apply_file_writes_mrc_with_voxel_size_and_matches_memory(tmp_path):
    vol, labels = blobs((10, 60, 70))
    src = _write_tomogram(tmp_path / "tomo.mrc", vol, voxel_size=(10.0, 10.0, 10.0))
    net = network(TinyFCN(n_out=3, seed=4), 3, class_names=("background", "mem", "rib"))
    s = ApplySettings(tile_size=48, z_chunk=4)
    result = apply_file(net, src, tmp_path / "mask.mrc", tmp_path / "prob.mrc", settings=s)
    assert result.mask_path == tmp_path / "mask.mrc"
    assert [p.name for p in result.probability_paths] == ["prob_mem.mrc", "prob_rib.mrc"]
    memory = apply_network(net, vol, voxel_size=10.0, settings=s)
    mask = read_tomogram(tmp_path / "mask.mrc")
    assert mask.voxel_size == pytest.approx((10.0, 10.0, 10.0))
    assert mask.data.shape == vol.shape
    assert np.array_equal(np.asarray(mask.data), memory.mask)
    for path, arr in zip(result.probability_paths, memory.probabilities):
        t = read_tomogram(path)
        assert t.voxel_size == pytest.approx((10.0, 10.0, 10.0))
        assert np.array_equal(np.asarray(t.data), arr)
        assert np.allclose(probabilities_as_float(t.data[3]), probabilities_as_float(arr[3]))
    assert np.array_equal(np.asarray(result.mask), memory.mask)
    assert not list(tmp_path.glob("*.part"))


def test_apply_file_binary_single_probability_file_and_header(tmp_path):
    vol, labels = blobs((6, 40, 48), seed=2)
    src = _write_tomogram(tmp_path / "t.rec", vol, voxel_size=7.5)
    net = network(Threshold(), 2, voxel_size=7.5)
    result = apply_file(net, src, tmp_path / "m.mrc", tmp_path / "p.mrc")
    assert result.probability_paths == [tmp_path / "p.mrc"]
    assert dice(result.mask, labels) > 0.95
    import mrcfile

    ours = read_tomogram(tmp_path / "p.mrc").data
    assert ours.dtype == np.int8  # one byte per voxel
    with mrcfile.open(tmp_path / "p.mrc", permissive=True) as mrc:
        assert mrc.header.mode == 0
        data = np.asarray(mrc.data)  # a plain reader sees the same values: percent
        assert np.array_equal(data, ours) and data.min() >= 0 and data.max() <= 100
        np.testing.assert_allclose(data / 100.0, probabilities_as_float(result.probabilities[0]))
        texts = header_labels(mrc.header)
        assert PROBABILITY_LABEL in texts and source_label("t.rec") in texts
        assert mrc.header.dmax == pytest.approx(float(data.max()))
        assert mrc.header.dmean == pytest.approx(float(data.mean()), rel=1e-4)
        assert float(mrc.voxel_size.x) == pytest.approx(7.5)


def test_cancelled_file_run_leaves_no_file(tmp_path):
    vol, _ = blobs((9, 40, 40))
    src = _write_tomogram(tmp_path / "tomo.mrc", vol)
    net = network(Threshold(), 2)
    calls = {"n": 0}

    def stop_after_first_slab():
        calls["n"] += 1
        return calls["n"] > 1

    gen = iter_apply_file(
        net,
        src,
        tmp_path / "mask.mrc",
        tmp_path / "prob.mrc",
        settings=ApplySettings(z_chunk=2, batch_size=1),
        should_stop=stop_after_first_slab,
    )
    from napari_tomoseg.progress import drive

    result = drive(gen)
    assert result.stopped and result.slices_done < 9
    assert not (tmp_path / "mask.mrc").exists() and not (tmp_path / "prob.mrc").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tomo.mrc"]


def test_failed_file_run_leaves_no_file(tmp_path):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            if x.dtype == torch.float32:  # the float64 receptive-field probe passes
                raise RuntimeError("out of memory")
            return x[:, :1] * self.w

    src = _write_tomogram(tmp_path / "tomo.mrc", blobs((4, 32, 32))[0])
    with pytest.raises(RuntimeError):
        apply_file(network(Broken(), 2), src, tmp_path / "mask.mrc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tomo.mrc"]


def test_existing_output_is_refused_without_overwrite(tmp_path):
    src = _write_tomogram(tmp_path / "tomo.mrc", blobs((3, 32, 32))[0])
    (tmp_path / "mask.mrc").write_bytes(b"keep me")
    net = network(Threshold(), 2)
    with pytest.raises(TomosegIOError, match="already exists"):
        apply_file(net, src, tmp_path / "mask.mrc")
    assert (tmp_path / "mask.mrc").read_bytes() == b"keep me"
    apply_file(net, src, tmp_path / "mask.mrc", overwrite=True)
    assert read_tomogram(tmp_path / "mask.mrc").data.shape == (3, 32, 32)
    with pytest.raises(TomosegError, match="replace the input"):
        apply_file(net, src, src, overwrite=True)


def _peak_bytes_of_file_run(folder, n_slices):
    shape = (n_slices, 256, 256)
    rng = np.random.default_rng(0)
    raw = np.memmap(folder / f"raw{n_slices}.bin", dtype=np.int16, mode="w+", shape=shape)
    for z in range(n_slices):
        raw[z] = rng.integers(-100, 100, size=shape[1:], dtype=np.int16)
    src = folder / f"big{n_slices}.mrc"
    write_mrc(src, raw, 10.0)
    del raw
    # box normalisation: no whole-tomogram statistics, so only the streaming is measured
    norm = {"mode": "box", "clamp_sigma": 5.0, "window": 32}
    net = network(Threshold(level=0.5), 2, normalisation=norm)
    tracemalloc.start()
    try:
        result = apply_file(
            net,
            src,
            folder / f"mask{n_slices}.mrc",
            folder / f"prob{n_slices}.mrc",
            settings=ApplySettings(tile_size=256, z_chunk=4, batch_size=4),
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.slices_done == n_slices
    assert read_tomogram(folder / f"prob{n_slices}.mrc").data.shape == shape
    return peak, int(np.prod(shape)) * 4


def test_streaming_peak_memory_is_flat_in_z(tmp_path):
    small_peak, _ = _peak_bytes_of_file_run(tmp_path, 12)
    big_peak, big_float = _peak_bytes_of_file_run(tmp_path, 96)
    # eight times the slices, (almost) the same peak: nothing scales with Z
    assert big_peak < 1.3 * small_peak + 256 * 1024, (small_peak, big_peak)
    assert big_peak < big_float / 3, (big_peak, big_float)


# -- voxel size ---------------------------------------------------------------------------------
def test_voxel_size_mismatch_refused_with_both_sizes():
    vol, _ = blobs((3, 40, 40))
    net = network(Threshold(), 2, voxel_size=10.0)
    s = ApplySettings(voxel_size_policy="refuse")
    with pytest.raises(TomosegError, match=r"15 x 15 x 15 A.*10 A"):
        apply_network(net, vol, voxel_size=15.0, settings=s)
    # within the tolerance nothing is refused or rescaled
    result = apply_network(net, vol, voxel_size=10.3, settings=s)
    assert result.notes == []


def test_voxel_size_rescale_gives_the_tomogram_grid():
    # a 10 A network applied to a 5 A tomogram of the same blobs (upsampled 2x in-plane)
    coarse, labels = blobs((4, 40, 48), seed=3, noise=0.0)
    fine = np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2)
    fine_labels = np.repeat(np.repeat(labels, 2, axis=1), 2, axis=2)
    net = network(Threshold(level=1.0), 2, voxel_size=10.0)
    result = apply_network(net, fine, voxel_size=(10.0, 5.0, 5.0))
    assert result.mask.shape == fine.shape and result.probabilities[0].shape == fine.shape
    assert any("rescaled" in n for n in result.notes)
    assert dice(result.mask, fine_labels) > 0.95


def test_rescale_uses_the_network_grid():
    # a network that fires only on features at least 9 px wide *on its own grid*: a 30-px
    # bar of a 2.5 A tomogram is 7.5 px at the network's 10 A, so after rescaling it must
    # not fire there, while applied as is (wrongly) it does; a 100-px slab fires either way
    class WideOnly(nn.Module):
        def __init__(self, level):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))
            self.level = level

        def forward(self, x):
            return self.w * 20 * (F.avg_pool2d(x, 9, stride=1, padding=4) - self.level)

    vol = np.zeros((2, 80, 240), dtype=np.float32)
    vol[:, :, 40:70] = 10.0  # the bar
    vol[:, :, 110:210] = 10.0  # the slab
    norm = {"mode": "tomogram", "clamp_sigma": None}
    bright = float(normalised(vol).max())
    net = network(WideOnly(0.8 * bright), 2, voxel_size=10.0, normalisation=norm)
    as_is = apply_network(net, vol, voxel_size=10.0)
    rescaled = apply_network(net, vol, voxel_size=2.5)
    assert as_is.mask[0, 40, 55] == 1 and as_is.mask[0, 40, 160] == 1
    assert rescaled.mask[0, 40, 55] == 0 and rescaled.mask[0, 40, 160] == 1
    assert rescaled.mask.shape == vol.shape
    refuse = ApplySettings(voxel_size_policy="refuse")
    with pytest.raises(TomosegError, match="2.5"):
        apply_network(net, vol, voxel_size=2.5, settings=refuse)


def test_context_slices_are_taken_at_the_network_z_voxel_size():
    """A 2.5D network of anisotropic voxels: Y and X are checked against its in-plane size,
    Z (the spacing of its context slices) against its own Z size."""
    # the network looks only at the slice *before* (channel 0 of 3), 20 A away in Z
    net = network(
        Threshold(gain=40.0, level=0.0, channels=3, use=0), 2, context=1, voxel_size=(20, 10, 10)
    )
    vol = np.zeros((6, 40, 40), dtype=np.float32)
    vol[2] = 1.0  # only slice 2 is bright
    same = apply_network(net, vol, voxel_size=(20.0, 10.0, 10.0))
    assert same.notes == []  # its own voxel size: nothing rescaled, context 1 slice apart
    assert [bool(same.mask[z].all()) for z in range(6)] == [False] * 3 + [True] + [False] * 2
    finer = apply_network(net, vol, voxel_size=10.0)  # 10 A slices: the slice 20 A before
    assert finer.notes == ["context slices taken 2 slices apart (Z voxel 10 A, network 20 A)"]
    assert [bool(finer.mask[z].all()) for z in range(6)] == [False] * 4 + [True, False]


def test_unknown_voxel_size_warns_and_proceeds():
    vol, labels = blobs((3, 40, 40))
    net = network(Threshold(), 2, voxel_size=10.0)
    with pytest.warns(MissingVoxelSizeWarning, match="unknown"):
        result = apply_network(net, vol, voxel_size=None)
    assert dice(result.mask, labels) > 0.95
    with pytest.warns(MissingVoxelSizeWarning):
        apply_network(network(Threshold(), 2, voxel_size=None), vol, voxel_size=10.0)


# -- binning ------------------------------------------------------------------------------------
def test_apply_binned_comes_back_full_size_and_agrees_with_labels():
    vol, labels = blobs((16, 72, 80), seed=4, noise=0.05)
    net = network(Threshold(level=0.8), 2, voxel_size=20.0)  # trained on 2x binned data
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # binned voxel size 20 A matches: no warning
        result = apply_binned(net, vol, 2, voxel_size=10.0)
    assert result.mask.shape == vol.shape
    assert result.probabilities[0].shape == vol.shape
    assert dice(result.mask, labels) > 0.85
    assert any("binned by 2" in n for n in result.notes)
    full = apply_network(net, vol, voxel_size=20.0)  # unbinned, same voxel size claim
    assert dice(result.mask, full.mask) > 0.85


# -- settings, progress, devices ----------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {"tile_size": 0},
        {"overlap": "lots"},
        {"overlap": 600, "tile_size": 512},
        {"batch_size": 0},
        {"threshold": 1.5},
        {"voxel_size_policy": "guess"},
        {"tta_transforms": 3},
        {"z_chunk": -1},
        {"shrink": 0},
        {"device": "tpu9"},
    ],
)
def test_bad_settings_are_refused(kw):
    with pytest.raises(TomosegError):
        ApplySettings(**kw).validate()


def test_one_device_rule_for_training_and_applying():
    from napari_tomoseg.applying.inference import resolve_device
    from napari_tomoseg.learning.training import select_device

    assert select_device is resolve_device
    assert resolve_device(" CPU ") == torch.device("cpu")  # as training always accepted
    assert resolve_device("cpu:0") == torch.device("cpu", 0)  # as applying always accepted
    assert resolve_device(torch.device("meta")) == torch.device("meta")
    with pytest.raises(TomosegError, match="Unknown device"):
        resolve_device("tpu9")
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        with pytest.raises(TomosegError, match="MPS"):
            resolve_device("mps")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        assert resolve_device(f"cuda:{n - 1}") == torch.device("cuda", n - 1)
        with pytest.raises(TomosegError, match=f"only {n} CUDA GPU"):
            resolve_device(f"cuda:{n}")
    else:
        with pytest.raises(TomosegError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_bad_inputs_are_refused():
    net = network(Threshold(), 2)
    with pytest.raises(TomosegError, match="3D"):
        apply_network(net, np.zeros((10, 10), np.float32))
    with pytest.raises(TomosegError, match="loaded network"):
        apply_network(object(), np.zeros((2, 10, 10), np.float32))
    inconsistent = network(Threshold(channels=3), 2, context=1)
    inconsistent.meta.in_channels = 1
    with pytest.raises(TomosegError, match="channels"):
        apply_network(inconsistent, np.zeros((2, 10, 10), np.float32))


def test_stop_in_memory_returns_partial_result():
    vol, _ = blobs((10, 40, 40))
    net = network(Threshold(), 2)
    seen = {"n": 0}

    def stop():
        seen["n"] += 1
        return seen["n"] > 2

    gen = iter_apply(
        net,
        vol,
        voxel_size=10.0,
        settings=ApplySettings(z_chunk=2, batch_size=1),
        should_stop=stop,
    )
    from napari_tomoseg.progress import drive

    result = drive(gen)
    assert result.stopped and 0 < result.slices_done < 10
    assert not result.mask[result.slices_done :].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_precision_matches_cpu():
    torch.manual_seed(0)
    model = build_model("tomoseg-cnn", 1, 2)
    net = network(model, 2)
    vol = np.random.default_rng(0).normal(size=(4, 300, 280)).astype(np.float32)
    cpu = apply_network(net, vol, voxel_size=10.0, settings=ApplySettings(device="cpu"))
    gpu = apply_network(net, vol, voxel_size=10.0, settings=ApplySettings(device="cuda"))
    diff = np.abs(cpu.probabilities[0].astype(int) - gpu.probabilities[0].astype(int))
    assert diff.max() <= 3
    assert next(model.parameters()).device.type == "cpu"  # the model went back


def test_binned_file_run_matches_binned_memory_run(tmp_path):
    vol, labels = blobs((8, 48, 56), seed=6)
    src = _write_tomogram(tmp_path / "tomo.mrc", vol, voxel_size=10.0)
    net = network(Threshold(level=0.8), 2, voxel_size=20.0)
    s = ApplySettings(shrink=2)
    on_disk = apply_file(net, src, tmp_path / "mask.mrc", tmp_path / "prob.mrc", settings=s)
    memory = apply_binned(net, vol, 2, voxel_size=10.0)
    assert np.array_equal(np.asarray(on_disk.mask), memory.mask)
    assert np.array_equal(np.asarray(on_disk.probabilities[0]), memory.probabilities[0])
    assert read_tomogram(tmp_path / "mask.mrc").voxel_size == pytest.approx((10.0,) * 3)
    assert dice(memory.mask, labels) > 0.85


# -- the CPU allocator tuning -------------------------------------------------------------------
_CPU = ApplySettings(device="cpu")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",  # bytes in mmapped blocks
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _glibc_probe():
    """``mapped(nbytes)``: whether glibc serves a block that large with fresh mmap pages
    (freed straight back to the system), or None without glibc's ``mallinfo2``."""
    libc = inf_kernels._glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _Mallinfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def mapped(nbytes: int) -> bool:
        before = libc.mallinfo2().hblkhd
        block = libc.malloc(nbytes)
        after = libc.mallinfo2().hblkhd
        libc.free(block)
        return after - before >= nbytes

    return mapped


def _paused_cpu_run():
    """A CPU apply suspended after its first slab, inside the allocator tuning."""
    vol, _ = blobs((4, 40, 40))
    settings = replace(_CPU, z_chunk=1)
    gen = iter_apply(network(Threshold(), 2), vol, voxel_size=10.0, settings=settings)
    assert next(gen).step == 0  # "measuring": not yet tuned
    assert next(gen).step == 1  # the first slab is done, the second not begun
    return gen


def _allocator_sequence():
    """The allocator's state through CPU runs that end every way; asserts as it goes."""
    mapped = _glibc_probe()
    os.environ.pop(inf_kernels.KEEP_FREED_MEMORY_ENV, None)
    big = 40 << 20
    assert mapped(big) and inf_kernels._ALLOCATOR_USERS == 0
    gen = _paused_cpu_run()
    assert not mapped(big)  # during the run: from the heap, kept for the next pass
    gen.close()  # a cancelled or abandoned run (the widget's worker quits)
    assert mapped(big) and inf_kernels._ALLOCATOR_USERS == 0
    gen = _paused_cpu_run()
    with pytest.raises(TomosegError, match="boom"):
        gen.throw(TomosegError("boom"))
    assert mapped(big) and inf_kernels._ALLOCATOR_USERS == 0
    vol, _ = blobs((3, 40, 40))
    apply_network(network(Threshold(), 2), vol, voxel_size=10.0, settings=_CPU)
    assert mapped(big) and inf_kernels._ALLOCATOR_USERS == 0
    with inf_kernels._keep_freed_memory():
        with inf_kernels._keep_freed_memory():
            pass
        assert not mapped(big)  # nested: the inner one leaves the outer's tuning in place
    assert mapped(big) and inf_kernels._ALLOCATOR_USERS == 0
    os.environ[inf_kernels.KEEP_FREED_MEMORY_ENV] = "0"
    gen = _paused_cpu_run()
    assert mapped(big)  # turned off: the allocator is never changed
    gen.close()


def test_allocator_tuning_lasts_the_run_and_is_undone_however_it_ends():
    if _glibc_probe() is None:
        pytest.skip("needs glibc with mallinfo2")
    # in a fresh process: whether glibc maps a large block also depends on what the heap
    # holds, which the tests that ran before in this process leave behind
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import test_inference\n"
        "test_inference._allocator_sequence()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


class _RecordingLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_allocator_settings_put_back_after_a_run_are_those_glibc_settles_at(monkeypatch):
    libc = _RecordingLibc()
    monkeypatch.setattr(inf_kernels, "_glibc", lambda: libc)
    monkeypatch.delenv(inf_kernels.KEEP_FREED_MEMORY_ENV, raising=False)
    vol, _ = blobs((3, 40, 40))
    apply_network(network(Threshold(), 2), vol, voxel_size=10.0, settings=_CPU)
    k = inf_kernels
    top_pad, mmap, trim = k._M_TOP_PAD, k._M_MMAP_THRESHOLD, k._M_TRIM_THRESHOLD
    assert libc.calls == [
        ("mallopt", mmap, 1 << 30),
        ("mallopt", trim, 2**31 - 1),
        ("mallopt", top_pad, 1 << 30),
        ("mallopt", top_pad, 128 << 10),
        ("mallopt", mmap, 32 << 20),
        ("mallopt", trim, 64 << 20),
        ("malloc_trim", 0),
    ]
    libc.calls.clear()
    monkeypatch.setenv(inf_kernels.KEEP_FREED_MEMORY_ENV, "off")
    apply_network(network(Threshold(), 2), vol, voxel_size=10.0, settings=_CPU)
    assert libc.calls == []


# -- three slice planes -------------------------------------------------------------------------
def _planes_network(model=None, **meta):
    net = network(TinyFCN(n_out=2) if model is None else model, 2)
    net.meta = replace(net.meta, **meta)
    return net


def test_three_planes_average_the_xy_xz_and_yz_runs_with_xy_counting_half():
    vol, _ = blobs((20, 40, 44), seed=2, noise=0.2)
    net = _planes_network()
    run = {}
    for name, order in (("XY", (0, 1, 2)), ("XZ", (1, 0, 2)), ("YZ", (2, 0, 1))):
        one = apply_network(
            net, np.transpose(vol, order), voxel_size=10.0, settings=ApplySettings(planes=1)
        )
        run[name] = probabilities_as_float(one.probabilities[0]).transpose(np.argsort(order))
    assert not np.allclose(run["XY"], run["XZ"], atol=0.05)  # the planes do differ
    expected = 0.5 * run["XY"] + 0.25 * run["XZ"] + 0.25 * run["YZ"]
    result = apply_network(
        net, vol, voxel_size=10.0, settings=ApplySettings(planes=3, threshold=0.4)
    )
    got = probabilities_as_float(result.probabilities[0])
    assert np.abs(got - expected).max() <= 0.011  # each run's stored probabilities are 1/100
    clear = np.abs(expected - 0.4) > 0.011
    assert np.array_equal(result.mask[clear], (expected >= 0.4)[clear])
    # the mask is the stored map at the threshold: merging the saved map alone gives it back
    assert np.array_equal(result.mask, got >= np.float32(0.4))
    alone = merge_probability_maps([MergeInput(result.probabilities[0], "f", threshold=0.4)])
    assert np.array_equal(alone.mask, result.mask)
    assert result.threshold == 0.4 and any("XZ and YZ" in n for n in result.notes)
    part = apply_network(
        net, vol, voxel_size=10.0, settings=ApplySettings(planes=3, z_chunk=4), z_range=(8, 16)
    )  # a slice range is the same slices of the whole run
    whole = apply_network(net, vol, voxel_size=10.0, settings=ApplySettings(planes=3, z_chunk=4))
    assert np.array_equal(part.mask, whole.mask[8:16])
    assert np.array_equal(part.probabilities[0], whole.probabilities[0][8:16])
    calls = []  # stopped in the XZ slices (XY takes 10 checks): stopped, no mask made
    stopped = apply_network(
        net, vol, voxel_size=10.0, settings=ApplySettings(planes=3, z_chunk=4),
        should_stop=lambda: calls.append(1) or len(calls) > 12,
    )  # fmt: skip
    assert stopped.stopped and stopped.slices_done == 0 and not stopped.mask.any()


def test_the_mask_is_cut_where_the_stored_probability_reaches_the_threshold():
    # stored in 1 % steps: 0.3951 is kept as 0.40, so it reaches a threshold of 0.4 (the
    # Merge step, reading the saved map, would claim it); 0.3949 is kept as 0.39
    binary = np.array([[0.6049, 0.6051, 0.6, 0.5951], [0.3951, 0.3949, 0.4, 0.4049]])
    for probs in (binary[:, None], torch.from_numpy(binary[:, None]).float()):
        mask = inf_apply._make_mask(probs, 0.4)
        assert np.asarray(mask).tolist() == [[1, 0, 1, 1]]
    # several classes: the argmax, kept where its stored probability reaches the threshold
    three = np.array([[0.21, 0.2, 0.31], [0.3951, 0.3949, 0.2], [0.3949, 0.4051, 0.49]])
    assert inf_apply._make_mask(three[:, None], 0.4).tolist() == [[1, 2, 2]]


def test_the_network_file_says_how_many_planes_and_their_threshold(tmp_path):
    cnn = build_model("tomoseg-cnn", 1, 2)  # a registered architecture, to save and load
    net = _planes_network(cnn, threshold=0.7, planes=3, threshold_three_planes=0.45)
    save_network(net, tmp_path / "n.tsnet")
    back = load_network(tmp_path / "n.tsnet")
    assert (back.meta.planes, back.meta.threshold_three_planes) == (3, 0.45)
    assert ApplySettings().resolved(back).planes == 3
    assert ApplySettings().resolved(back).threshold == 0.45
    assert ApplySettings(planes=1).resolved(back).threshold == 0.7  # XY: its own threshold
    assert ApplySettings(planes=1, threshold=0.2).resolved(back).threshold == 0.2
    plain = _planes_network(threshold=0.7)  # trained here: XY, and 0.5 if asked for three
    assert (ApplySettings().resolved(plain).planes, network_threshold(plain)) == (1, 0.7)
    assert ApplySettings(planes=3).resolved(plain).threshold == DEFAULT_THRESHOLD
    data = back.meta.to_dict()
    for bad in (2, "3", True):
        with pytest.raises(TomosegError, match="planes"):
            NetworkMeta.from_dict({**data, "planes": bad})
    for bad in (2, "all", True):
        with pytest.raises(TomosegError, match="planes"):
            ApplySettings(planes=bad).validate()
