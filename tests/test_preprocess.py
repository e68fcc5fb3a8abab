"""Preprocessing: binning, unbinning, resampling, filters, statistics, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_tomoseg.data.preprocess import (
    Normalisation,
    PreprocessSettings,
    bin_volume,
    highpass,
    iter_preprocess,
    local_normalise,
    lowpass,
    normalise,
    preprocess,
    resample_volume,
    robust_stats,
    unbin_labels,
    unbin_volume,
)
from napari_tomoseg.errors import TomosegError
from napari_tomoseg.progress import Progress


def smooth_map(shape: tuple[int, int, int]) -> np.ndarray:
    """A smooth positive 3D map (sum of wide Gaussians), float64."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    out = np.zeros(shape)
    for cz, cy, cx, w in [(0.3, 0.4, 0.5, 0.25), (0.7, 0.6, 0.2, 0.2), (0.5, 0.8, 0.8, 0.3)]:
        out += np.exp(
            -(
                ((z / shape[0] - cz) / w) ** 2
                + ((y / shape[1] - cy) / w) ** 2
                + ((x / shape[2] - cx) / w) ** 2
            )
        )
    return out


# -- binning -----------------------------------------------------------------------------------
def test_bin_volume_is_a_block_mean_and_drops_the_remainder() -> None:
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(9, 14, 11)).astype(np.float32)
    binned = bin_volume(volume, 2)
    assert binned.shape == (4, 7, 5) and binned.dtype == np.float32
    expected = volume[:8, :14, :10].reshape(4, 2, 7, 2, 5, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(binned, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(bin_volume(volume, 1), volume)


def test_bin_volume_on_a_memmap(tmp_path) -> None:
    path = tmp_path / "vol.raw"
    data = np.memmap(path, dtype=np.int16, mode="w+", shape=(8, 12, 12))
    data[:] = np.arange(8, dtype=np.int16)[:, None, None]
    data.flush()
    ro = np.memmap(path, dtype=np.int16, mode="r", shape=(8, 12, 12))
    binned = bin_volume(ro, 4)
    assert binned.shape == (2, 3, 3)
    np.testing.assert_allclose(binned[:, 0, 0], [1.5, 5.5])


@pytest.mark.parametrize("factor", [0, -2, 1.5, "two", True])
def test_bad_shrink_factors_are_refused(factor) -> None:
    with pytest.raises(TomosegError, match="shrink factor"):
        bin_volume(np.zeros((4, 4, 4)), factor)


def test_too_large_factor_is_refused() -> None:
    with pytest.raises(TomosegError, match="too large"):
        bin_volume(np.zeros((3, 40, 40)), 4)


def test_unbin_labels_is_nearest_neighbour_and_fills_the_remainder() -> None:
    labels = np.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]]], dtype=np.uint8)
    full = unbin_labels(labels, 2, (5, 5, 4))
    assert full.shape == (5, 5, 4) and full.dtype == np.uint8
    assert set(np.unique(full)) == set(range(8))
    np.testing.assert_array_equal(full[:4, :4, :4], labels.repeat(2, 0).repeat(2, 1).repeat(2, 2))
    np.testing.assert_array_equal(full[4], full[3])  # dropped slice repeats the last one
    np.testing.assert_array_equal(full[:, 4, :], full[:, 3, :])


def test_unbin_labels_inverts_bin_on_block_labels() -> None:
    rng = np.random.default_rng(2)
    small = rng.integers(0, 4, size=(3, 5, 6)).astype(np.uint16)
    full = small.repeat(3, 0).repeat(3, 1).repeat(3, 2)
    assert np.array_equal(unbin_labels(small, 3, full.shape), full)
    with pytest.raises(TomosegError, match="does not come from shape"):
        unbin_labels(small, 3, (30, 15, 18))


def test_unbin_labels_into_a_given_output_array(tmp_path) -> None:
    out = np.memmap(tmp_path / "out.raw", dtype=np.uint8, mode="w+", shape=(4, 6, 6))
    small = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
    result = unbin_labels(small, 2, (4, 6, 6), out=out)
    assert result is out
    assert out[3, 5, 5] == 17


def test_fourier_unbin_of_a_smooth_map_is_close_to_the_original() -> None:
    original = smooth_map((24, 40, 36))
    binned = bin_volume(original, 2)
    restored = unbin_volume(binned, 2, original.shape)
    assert restored.shape == original.shape and restored.dtype == np.float32
    error = np.abs(restored - original) / np.ptp(original)
    naive = np.abs(binned.repeat(2, 0).repeat(2, 1).repeat(2, 2) - original) / np.ptp(original)
    # largest near the faces (the cosine series has zero slope there), tiny inside
    assert error.max() < 0.03
    assert np.median(error) < 0.002
    assert error.max() < naive.max() / 4  # far better than repeating voxels


def test_unbin_volume_with_remainder_and_clipping() -> None:
    probabilities = np.zeros((4, 8, 8))
    probabilities[1:3, 2:6, 2:6] = 1.0  # sharp edges: the interpolant overshoots
    free = unbin_volume(probabilities, 3, (13, 25, 24))
    assert free.shape == (13, 25, 24)
    assert free.max() > 1.0 or free.min() < 0.0
    clipped = unbin_volume(probabilities, 3, (13, 25, 24), clip=(0.0, 1.0))
    assert clipped.min() >= 0.0 and clipped.max() <= 1.0
    np.testing.assert_array_equal(clipped[12], clipped[11])
    np.testing.assert_allclose(unbin_volume(probabilities, 1, (4, 8, 8)), probabilities)


# -- resampling --------------------------------------------------------------------------------
@pytest.mark.parametrize(("zoom", "order"), [((1.5, 2.0, 0.5), 1), (0.6, 3)])
def test_resample_matches_a_whole_volume_zoom(zoom, order) -> None:
    volume = smooth_map((10, 16, 20)).astype(np.float32)
    result = resample_volume(volume, zoom, order=order)
    reference = ndimage.zoom(
        volume.astype(np.float64), zoom, order=order, mode="nearest", grid_mode=True
    )
    assert result.shape == reference.shape and result.dtype == np.float32
    np.testing.assert_allclose(result, reference, atol=2e-3 * np.ptp(volume))


def test_resample_labels_with_order_zero_keeps_values() -> None:
    labels = np.zeros((6, 10, 10), dtype=np.uint8)
    labels[2:4, 3:7, 3:7] = 5
    labels[:, 0, 0] = 2
    out = resample_volume(labels, 1.7, order=0)
    assert out.dtype == np.uint8 and out.shape == (10, 17, 17)
    assert set(np.unique(out)) == {0, 2, 5}
    with pytest.raises(TomosegError, match="positive"):
        resample_volume(labels, (1.0, 0.0, 1.0))


# -- filters -----------------------------------------------------------------------------------
def wave_amplitude(volume: np.ndarray, period: float) -> float:
    """Amplitude of a cosine of ``period`` pixels along X, measured on the central slice."""
    row = volume[volume.shape[0] // 2, volume.shape[1] // 2].astype(float)
    x = np.arange(row.size)
    centre = slice(row.size // 4, 3 * row.size // 4)
    basis = np.exp(-2j * np.pi * x / period)
    return float(2 * np.abs(np.mean(row[centre] * basis[centre])))


def waves(periods: list[float], shape=(8, 16, 128)) -> np.ndarray:
    x = np.arange(shape[2], dtype=float)
    row = sum(np.cos(2 * np.pi * x / p) for p in periods)
    return np.broadcast_to(row, shape).astype(np.float32).copy()


def test_lowpass_halves_amplitude_at_the_cutoff_and_removes_fine_detail() -> None:
    voxel = 4.0  # Angstrom; cutoff 64 A = 16 px
    result = lowpass(waves([16.0]), 64.0, voxel)
    assert wave_amplitude(result, 16.0) == pytest.approx(0.5, abs=0.03)
    mixed = lowpass(waves([128.0, 4.0]), 64.0, voxel)
    assert wave_amplitude(mixed, 128.0) > 0.95
    assert wave_amplitude(mixed, 4.0) < 0.01


def test_lowpass_reduces_high_frequency_power_of_noise() -> None:
    rng = np.random.default_rng(3)
    noise = rng.normal(size=(16, 32, 32)).astype(np.float32)
    smooth = lowpass(noise, 8.0, 1.0)
    spectrum = np.abs(np.fft.fftn(noise)) ** 2
    filtered = np.abs(np.fft.fftn(smooth)) ** 2
    freq = np.sqrt(
        sum(f**2 for f in np.meshgrid(*(np.fft.fftfreq(n) for n in noise.shape), indexing="ij"))
    )
    high = freq > 0.3
    low = (freq > 0) & (freq < 0.04)
    assert filtered[high].sum() / spectrum[high].sum() < 1e-3
    assert filtered[low].sum() / spectrum[low].sum() > 0.5


def test_lowpass_per_slice_keeps_slices_apart() -> None:
    volume = np.zeros((9, 20, 20), dtype=np.float32)
    volume[4] = 1.0
    in_3d = lowpass(volume, 8.0, 1.0)
    per_slice = lowpass(volume, 8.0, 1.0, per_slice=True)
    assert np.abs(per_slice[3]).max() < 1e-6
    assert in_3d[3].mean() > 0.1


def test_highpass_removes_slow_gradients_and_keeps_fine_detail() -> None:
    volume = waves([8.0], shape=(6, 16, 128)) + np.linspace(0, 20, 128, dtype=np.float32)
    result = highpass(volume, 200.0, 2.0)  # 100 px cutoff
    assert wave_amplitude(result, 8.0) > 0.95
    central = result[3, 8, 32:96]
    assert abs(float(central.mean())) < 0.5  # the ramp of 0..20 is gone
    assert result.dtype == np.float32


def test_cutoffs_finer_than_nyquist_are_refused() -> None:
    with pytest.raises(TomosegError, match="Nyquist"):
        lowpass(np.zeros((4, 8, 8)), 7.0, 4.0)
    with pytest.raises(TomosegError, match="Nyquist"):
        highpass(np.zeros((4, 8, 8)), 3.0, (2.0, 2.0, 2.0))
    with pytest.raises(TomosegError, match="voxel size"):
        lowpass(np.zeros((4, 8, 8)), 30.0, None)


# -- statistics and normalisation ---------------------------------------------------------------
def test_robust_stats_on_a_memmap(tmp_path) -> None:
    rng = np.random.default_rng(4)
    shape = (40, 200, 256)
    path = tmp_path / "big.raw"
    data = np.memmap(path, dtype=np.float32, mode="w+", shape=shape)
    for z in range(shape[0]):
        data[z] = rng.normal(3.0, 2.0, size=shape[1:])
    data[5, 7, :] = np.nan
    data[9, 9, :10] = np.inf
    data.flush()
    ro = np.memmap(path, dtype=np.float32, mode="r", shape=shape)
    mean, std = robust_stats(ro, sample=200_000, seed=0)
    assert mean == pytest.approx(3.0, abs=0.03)
    assert std == pytest.approx(2.0, abs=0.03)
    assert robust_stats(ro, sample=200_000, seed=0) == (mean, std)  # deterministic per seed


def test_robust_stats_exact_on_small_volumes_and_ignores_nan() -> None:
    rng = np.random.default_rng(5)
    volume = rng.normal(size=(5, 30, 30))
    volume[0, 0, :3] = [np.nan, np.inf, -np.inf]
    finite = volume[np.isfinite(volume)]
    mean, std = robust_stats(volume)
    assert mean == pytest.approx(finite.mean(), rel=1e-9, abs=1e-12)
    assert std == pytest.approx(finite.std(), rel=1e-9)
    with pytest.raises(TomosegError, match="no finite values"):
        robust_stats(np.full((2, 3, 3), np.nan))


def test_normalise_gives_zero_mean_unit_std_and_clamps() -> None:
    rng = np.random.default_rng(6)
    volume = rng.normal(10.0, 4.0, size=(8, 40, 40))
    out = normalise(volume, *robust_stats(volume))
    assert out.dtype == np.float32
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(out.std()) == pytest.approx(1.0, abs=1e-4)
    clamped = normalise(volume, *robust_stats(volume), clamp_sigma=1.5)
    assert clamped.max() == pytest.approx(1.5) and clamped.min() == pytest.approx(-1.5)
    assert np.all(normalise(np.full((2, 4, 4), 7.0), 7.0, 0.0) == 0)


def test_normalisation_dict_round_trip_and_validation() -> None:
    spec = Normalisation("box", 3.0, 32)
    assert spec.to_dict() == {"mode": "box", "clamp_sigma": 3.0, "window": 32}
    assert Normalisation.from_dict(spec.to_dict()) == spec
    assert Normalisation.from_dict({"mode": "tomogram", "clamp_sigma": None}).clamp_sigma is None
    with pytest.raises(TomosegError, match="Unknown normalisation mode"):
        Normalisation("slice")
    with pytest.raises(TomosegError, match="Unknown normalisation settings"):
        Normalisation.from_dict({"mode": "box", "gamma": 1})
    with pytest.raises(TomosegError, match="clamp_sigma"):
        Normalisation("box", -1.0)


def test_normalisation_patch_and_volume() -> None:
    rng = np.random.default_rng(7)
    patch = rng.normal(5.0, 3.0, size=(3, 32, 32))
    boxed = Normalisation("box", None).apply_to_patch(patch)
    assert float(boxed.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(boxed.std()) == pytest.approx(1.0, abs=1e-4)
    tomo = Normalisation("tomogram", None)
    with pytest.raises(TomosegError, match="robust_stats"):
        tomo.apply_to_patch(patch)
    np.testing.assert_allclose(
        tomo.apply_to_patch(patch, stats=(5.0, 3.0)), (patch - 5.0) / 3.0, rtol=1e-5, atol=1e-6
    )
    volume = rng.normal(5.0, 3.0, size=(6, 40, 40))
    whole = tomo.apply_to_volume(volume)
    assert float(whole.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(whole.std()) == pytest.approx(1.0, abs=1e-4)


def test_box_mode_on_a_volume_removes_local_offsets() -> None:
    rng = np.random.default_rng(8)
    volume = rng.normal(size=(3, 96, 96))
    volume[:, :, 48:] = volume[:, :, 48:] * 5 + 100  # right half: other offset and spread
    out = Normalisation("box", None, 16).apply_to_volume(volume)
    right, left = out[:, 8:88, 60:88], out[:, 8:88, 8:36]
    for half in (left, right):
        assert abs(float(half.mean())) < 0.1
        assert float(half.std()) == pytest.approx(1.0, abs=0.15)
    np.testing.assert_array_equal(out, local_normalise(volume, 16))


# -- the import step ---------------------------------------------------------------------------
def test_preprocess_bins_filters_normalises_and_scales_the_voxel_size() -> None:
    rng = np.random.default_rng(9)
    volume = (rng.normal(size=(16, 64, 64)) * 3 + 50).astype(np.float32)
    settings = PreprocessSettings(
        shrink=2, lowpass_angstrom=20.0, highpass_angstrom=200.0, clamp_sigma=3.0
    )
    out, voxel = preprocess(volume, 2.5, settings)
    assert out.shape == (8, 32, 32) and out.dtype == np.float32
    assert voxel == (5.0, 5.0, 5.0)
    assert float(out.mean()) == pytest.approx(0.0, abs=0.01)  # clamping shifts it a little
    assert float(out.std()) == pytest.approx(1.0, abs=0.05)
    assert out.max() <= 3.0 and out.min() >= -3.0


def test_preprocess_without_voxel_size_and_without_filters() -> None:
    volume = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    out, voxel = preprocess(volume, None, PreprocessSettings(normalise=False))
    assert voxel is None
    np.testing.assert_array_equal(out, volume)


@pytest.mark.parametrize(
    ("settings", "voxel", "message"),
    [
        (PreprocessSettings(shrink=0), 2.0, "shrink factor"),
        (PreprocessSettings(shrink=2.5), 2.0, "shrink factor"),
        (PreprocessSettings(shrink=4, lowpass_angstrom=20.0), 3.0, "Nyquist"),
        (PreprocessSettings(lowpass_angstrom=40.0, highpass_angstrom=30.0), 2.0, "coarser"),
        (PreprocessSettings(highpass_angstrom=300.0), None, "voxel size"),
        (PreprocessSettings(clamp_sigma=0.0), 2.0, "clamp_sigma"),
    ],
)
def test_preprocess_settings_are_validated(settings, voxel, message) -> None:
    with pytest.raises(TomosegError, match=message):
        preprocess(np.zeros((8, 16, 16), np.float32), voxel, settings)


def test_iter_preprocess_reports_progress_and_stops() -> None:
    volume = np.ones((4, 16, 16), np.float32)
    settings = PreprocessSettings(lowpass_angstrom=10.0)
    events: list[Progress] = []
    gen = iter_preprocess(volume, 1.0, settings)
    try:
        while True:
            events.append(next(gen))
    except StopIteration as done:
        result = done.value
    assert [e.message for e in events] == ["bin", "low-pass", "normalise", "done"]
    assert result[0].shape == (4, 16, 16)
    calls = iter([False, True])
    stopped = iter_preprocess(volume, 1.0, settings, should_stop=lambda: next(calls))
    next(stopped)
    with pytest.raises(StopIteration) as info:
        next(stopped)
    assert info.value.value is None
