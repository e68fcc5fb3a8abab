"""Tests of the cryo-ET simulator: ground truth, imaging physics, determinism, bad input."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from napari_tomoseg.errors import TomosegError
from napari_tomoseg.progress import Progress
from napari_tomoseg.simulator.synthetic import (
    CARBON_EDGE,
    CLASS_COLORS,
    CLASS_NAMES,
    DOUBLE_MEMBRANE,
    MICROTUBULE,
    RIBOSOME,
    SINGLE_MEMBRANE,
    SimulatedTomogram,
    SimulationSettings,
    _backprojector,
    _projector,
    ctf_1d,
    dose_before,
    electron_wavelength,
    exposure_filter,
    image_density,
    iter_simulate_tomogram,
    random_settings,
    simulate_tomogram,
)

SMALL = (48, 128, 128)


@pytest.fixture(scope="module")
def default_sim() -> SimulatedTomogram:
    """The default 96x256x256 volume at 10 A (a few seconds)."""
    return simulate_tomogram()


@pytest.fixture(scope="module")
def small_sim() -> SimulatedTomogram:
    return simulate_tomogram(shape=SMALL, seed=0)


def _xz_power(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fourier power in the XZ plane averaged over Y, |k| (cycles/voxel), angle from kz."""
    v = volume - volume.mean()
    power = (np.abs(np.fft.fft2(v, axes=(0, 2))) ** 2).mean(axis=1)
    kz = np.fft.fftfreq(v.shape[0])[:, None]
    kx = np.fft.fftfreq(v.shape[2])[None, :]
    k = np.broadcast_to(np.hypot(kz, kx), power.shape)
    angle = np.broadcast_to(np.degrees(np.arctan2(np.abs(kx), np.abs(kz))), power.shape)
    return power, k, angle


def _band_ratio(volume: np.ndarray, lo: float, hi: float) -> float:
    """Mean power at lo <= angle from the Z axis < hi over mean power far from Z (> 50 deg)."""
    power, k, angle = _xz_power(volume)
    band = (k > 0.03) & (k < 0.3)
    inside = band & (angle >= lo) & (angle < hi)
    reference = band & (angle > 50)
    return float(power[inside].mean() / power[reference].mean())


# --------------------------------------------------------------------------- API and shapes


def test_result_shapes_types_and_metadata(small_sim: SimulatedTomogram) -> None:
    sim = small_sim
    assert sim.tomogram.shape == SMALL and sim.tomogram.dtype == np.float32
    assert sim.labels.shape == SMALL and sim.labels.dtype == np.uint8
    assert sim.density is not None
    assert sim.density.shape == SMALL and sim.density.dtype == np.float32
    assert sim.voxel_size == 10.0
    assert sim.class_names == CLASS_NAMES
    assert sim.settings.shape == SMALL and sim.settings.seed == 0
    assert sim.ribosome_centres.ndim == 2 and sim.ribosome_centres.shape[1] == 3
    assert np.all(np.isfinite(sim.tomogram))
    assert abs(float(sim.tomogram.mean())) < 1e-3
    assert float(sim.tomogram.std()) == pytest.approx(1.0, rel=1e-3)
    assert int(sim.labels.max()) < len(CLASS_NAMES)
    np.testing.assert_allclose(sim.tilt_angles, np.arange(-60.0, 60.1, 3.0))


def test_class_names_and_colours() -> None:
    assert CLASS_NAMES == (
        "background",
        "microtubule",
        "ribosome",
        "double_membrane",
        "single_membrane",
        "carbon_edge",
    )
    assert set(CLASS_COLORS) == set(range(len(CLASS_NAMES)))
    assert CLASS_COLORS[0] == "#00000000"
    assert len(set(CLASS_COLORS.values())) == len(CLASS_NAMES)


def test_voxel_size_and_density_can_be_dropped() -> None:
    sim = simulate_tomogram(shape=(32, 64, 64), voxel_size=20.0, keep_density=False)
    assert sim.voxel_size == 20.0
    assert sim.density is None
    assert sim.tomogram.shape == (32, 64, 64)


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_arrays_different_seed_different() -> None:
    a = simulate_tomogram(shape=(32, 96, 96), seed=7)
    b = simulate_tomogram(shape=(32, 96, 96), seed=7)
    c = simulate_tomogram(shape=(32, 96, 96), seed=8)
    np.testing.assert_array_equal(a.tomogram, b.tomogram)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.density, b.density)
    np.testing.assert_array_equal(a.ribosome_centres, b.ribosome_centres)
    assert not np.array_equal(a.labels, c.labels)
    assert float(np.abs(a.tomogram - c.tomogram).mean()) > 0.5


# --------------------------------------------------------------------------- ground truth


def test_default_volume_has_every_class(default_sim: SimulatedTomogram) -> None:
    counts = np.bincount(default_sim.labels.ravel(), minlength=len(CLASS_NAMES))
    fractions = counts / default_sim.labels.size
    assert fractions[0] > 0.8
    for cls in (MICROTUBULE, RIBOSOME, DOUBLE_MEMBRANE, SINGLE_MEMBRANE, CARBON_EDGE):
        assert fractions[cls] > 0.003, (CLASS_NAMES[cls], fractions[cls])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_volume_has_every_class(seed: int) -> None:
    sim = simulate_tomogram(shape=SMALL, seed=seed)
    present = set(np.unique(sim.labels).tolist())
    assert present == set(range(len(CLASS_NAMES)))


def test_ribosome_centres_lie_in_ribosome_labels(default_sim: SimulatedTomogram) -> None:
    centres = default_sim.ribosome_centres
    assert len(centres) >= 10
    index = np.round(centres).astype(int)
    assert np.all(index >= 0) and np.all(index < np.array(default_sim.labels.shape))
    values = default_sim.labels[index[:, 0], index[:, 1], index[:, 2]]
    assert np.all(values == RIBOSOME)


def test_one_ribosome_has_the_volume_of_a_ribosome_at_any_voxel_size() -> None:
    """A ribosome is ~25-30 nm across (~6000-9000 nm^3), whatever the sampling."""
    empty = dict(
        n_microtubules=0,
        n_vesicles=0,
        n_mitochondria=0,
        n_er_tubes=0,
        n_actin=0,
        n_gold=0,
        cell_membrane=False,
        carbon_edge=False,
        n_ribosomes=1,
    )
    volumes = []
    for voxel, shape in ((10.0, (48, 64, 64)), (20.0, (24, 32, 32))):
        sim = simulate_tomogram(shape=shape, voxel_size=voxel, **empty)
        assert set(np.unique(sim.labels).tolist()) == {0, RIBOSOME}
        volumes.append(int((sim.labels == RIBOSOME).sum()) * (voxel / 10.0) ** 3)
    for v in volumes:
        assert 4000 < v < 12000
    assert volumes[0] == pytest.approx(volumes[1], rel=0.3)


def test_counts_and_flags_are_obeyed() -> None:
    sim = simulate_tomogram(
        shape=SMALL, n_ribosomes=0, carbon_edge=False, n_mitochondria=0, n_gold=0
    )
    present = set(np.unique(sim.labels).tolist())
    assert RIBOSOME not in present and CARBON_EDGE not in present
    assert DOUBLE_MEMBRANE not in present
    assert len(sim.ribosome_centres) == 0
    assert float(sim.density.max()) < 5  # no gold without fiducials
    gold = simulate_tomogram(shape=SMALL, n_gold=3)
    assert float(gold.density.max()) > 5


def test_membrane_label_is_a_bilayer_thick(small_sim: SimulatedTomogram) -> None:
    """Single-membrane labels are thin shells (~5 nm), not filled regions."""
    from scipy import ndimage

    membrane = small_sim.labels == SINGLE_MEMBRANE
    eroded = ndimage.binary_erosion(membrane, iterations=3)
    assert membrane.sum() > 1000
    assert eroded.sum() < 0.05 * membrane.sum()


# --------------------------------------------------------------------------- imaging physics


def test_missing_wedge_is_present(default_sim: SimulatedTomogram) -> None:
    """Within 30 degrees of the Z axis the reconstruction has lost its Fourier power."""
    density = _band_ratio(default_sim.density, 0, 27)
    recon = _band_ratio(default_sim.tomogram, 0, 27)
    assert density > 0.2  # the clean density does have power there
    assert recon < 0.1 * density


def test_smaller_tilt_range_widens_the_wedge(small_sim: SimulatedTomogram) -> None:
    narrow = simulate_tomogram(shape=SMALL, seed=0, tilt_max=45.0)
    band = (33, 42)  # measured inside a +-45 wedge, outside a +-60 one
    ref = _band_ratio(small_sim.density, *band)
    assert _band_ratio(small_sim.tomogram, *band) > 0.5 * ref
    assert _band_ratio(narrow.tomogram, *band) < 0.2 * ref


def test_reconstruction_differs_from_density_but_follows_it(
    small_sim: SimulatedTomogram,
) -> None:
    """Matter is dark; CTF and noise keep the correlation well below 1 but above 0."""
    density = small_sim.density.ravel()
    noisy = float(np.corrcoef(-small_sim.tomogram.ravel(), density)[0, 1])
    clean = simulate_tomogram(shape=SMALL, seed=0, snr=math.inf)
    noise_free = float(np.corrcoef(-clean.tomogram.ravel(), density)[0, 1])
    assert 0.1 < noisy < 0.7
    assert noisy < noise_free < 0.85  # noise lowers it; the CTF and wedge alone keep it < 1


def test_matter_appears_dark(default_sim: SimulatedTomogram) -> None:
    tomo, labels = default_sim.tomogram, default_sim.labels
    assert float(tomo[labels == RIBOSOME].mean()) < -0.2
    gold = default_sim.density > 5
    assert gold.any()
    assert float(np.median(tomo[gold])) < -3


def test_phase_flip_changes_the_image(small_sim: SimulatedTomogram) -> None:
    unflipped = simulate_tomogram(shape=SMALL, seed=0, phase_flip=False)
    np.testing.assert_array_equal(unflipped.labels, small_sim.labels)
    assert not np.allclose(unflipped.tomogram, small_sim.tomogram)


def test_projector_gives_line_integrals() -> None:
    """Projecting a disc of radius r gives 2r through its centre and its area in total."""
    n, r = 65, 20.0
    z, x = np.mgrid[:n, :n] - (n - 1) / 2
    disc = (np.hypot(z, x) <= r).astype(np.float32)
    angles = np.array([0.0, 30.0, 50.0, 60.0])
    nu = 2 * n + 1
    proj = (_projector(n, n, angles, nu) @ disc.ravel()).reshape(len(angles), nu)
    for row in proj:
        assert row[nu // 2] == pytest.approx(2 * r, rel=0.05)
        assert row.sum() == pytest.approx(disc.sum(), rel=0.01)


def test_backprojector_places_a_ray_where_it_came_from() -> None:
    """A single detector pixel back-projects along the line x cos(t) - z sin(t) = u."""
    n, nu = 33, 49
    angles = np.array([30.0])
    image = np.zeros(nu, dtype=np.float32)
    image[nu // 2 + 5] = 1.0  # u = 5
    back = (_backprojector(n, n, angles, nu) @ image).reshape(n, n)
    z, x = np.mgrid[:n, :n] - (n - 1) / 2
    u = x * math.cos(math.radians(30)) - z * math.sin(math.radians(30))
    assert np.all(back[np.abs(u - 5) >= 1] == 0)
    assert back[np.abs(u - 5) < 0.25].min() > 0.7


def test_ctf_physics() -> None:
    assert electron_wavelength(300.0) == pytest.approx(0.019687, rel=1e-3)
    assert electron_wavelength(200.0) == pytest.approx(0.025079, rel=1e-3)
    settings = SimulationSettings(
        defocus_um=4.0, spherical_aberration_mm=0.0, amplitude_contrast=0.0, bfactor=0.0
    )
    k = np.linspace(0.001, 0.05, 5000)
    ctf = ctf_1d(k, settings)
    assert np.all(ctf[k < 0.02] < 0)  # matter dark at low resolution (underfocus)
    first_zero = k[np.argmax(ctf > 0)]
    lam = electron_wavelength(300.0)
    assert first_zero == pytest.approx(1 / math.sqrt(lam * 4.0e4), rel=0.01)


# --------------------------------------------------------------------------- progress, errors


def test_iter_simulate_reports_progress_and_stops() -> None:
    gen = iter_simulate_tomogram(shape=(16, 32, 32))
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as done:
            result = done.value
            break
    assert all(isinstance(e, Progress) for e in events)
    assert events[-1].fraction == 1.0
    assert isinstance(result, SimulatedTomogram)

    stopped = iter_simulate_tomogram(shape=(16, 32, 32), should_stop=lambda: True)
    with pytest.raises(StopIteration) as info:
        while True:
            next(stopped)
    assert info.value.value is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"shape": (4, 64, 64)},
        {"shape": (32, 64)},
        {"voxel_size": 0.0},
        {"tilt_max": 95.0},
        {"tilt_step": 0.0},
        {"snr": -1.0},
        {"defocus_um": 0.0},
        {"n_ribosomes": -3},
        {"total_dose": -10.0},
        {"alignment_error_px": 50.0},
        {"no_such_setting": 1},
    ],
)
def test_bad_settings_raise_tomoseg_error(overrides: dict) -> None:
    with pytest.raises(TomosegError):
        simulate_tomogram(**overrides)


def test_dose_symmetric_order_and_exposure_filter() -> None:
    dose = dose_before(np.array([-6.0, -3.0, 0.0, 3.0, 6.0]), total_dose=50.0)
    # 0 first, then +3, -3, +6, -6: each image 10 e/A^2 after the one before
    assert np.allclose(dose, [40.0, 20.0, 0.0, 10.0, 30.0])
    k = np.array([0.0, 0.01, 0.05])
    kept = exposure_filter(k, np.array([0.0, 100.0]))
    assert np.allclose(kept[0], 1.0) and kept[1, 0] == 1.0  # no dose, and the mean, kept
    assert 1.0 > kept[1, 1] > kept[1, 2] > 0.0  # fine detail is lost first
    # Grant & Grigorieff's critical exposure at 1/20 A: 0.245 * 20**1.665 + 2.81 = 38.7 e/A^2
    assert kept[1, 2] == pytest.approx(np.exp(-100 / (2 * 38.73)), rel=1e-3)


def test_imperfections_blur_the_tomogram_and_leave_the_scene() -> None:
    kw = {"shape": (32, 80, 80), "seed": 5, "snr": math.inf}
    clean = simulate_tomogram(**kw)

    def likeness(**extra):
        other = simulate_tomogram(**kw, **extra)
        assert np.array_equal(other.labels, clean.labels)
        return float(np.corrcoef(clean.tomogram.ravel(), other.tomogram.ravel())[0, 1])

    assert likeness(total_dose=0.0, alignment_error_px=0.0) == pytest.approx(1.0)
    assert 0.9 < likeness(total_dose=150.0) < 0.9999
    assert likeness(alignment_error_px=1.5) < likeness(alignment_error_px=0.4) < 0.999
    # the same noise as without them: the imperfections draw from a generator of their own
    noisy = {**kw, "snr": 0.5}
    assert (
        np.corrcoef(
            simulate_tomogram(**noisy).tomogram.ravel(),
            simulate_tomogram(**noisy, total_dose=100.0).tomogram.ravel(),
        )[0, 1]
        > 0.9
    )


def test_random_settings_draw_imperfections_only_when_asked() -> None:
    plain = [random_settings(np.random.default_rng(s)) for s in range(10)]
    imperfect = [random_settings(np.random.default_rng(s), imperfect=True) for s in range(10)]
    assert all(p.total_dose == 0 and p.alignment_error_px == 0 for p in plain)
    for p, q in zip(plain, imperfect):  # the same settings otherwise
        assert dataclasses.replace(q, total_dose=0.0, alignment_error_px=0.0) == p
    doses = [q.total_dose for q in imperfect if q.total_dose > 0]
    errors = [q.alignment_error_px for q in imperfect if q.alignment_error_px > 0]
    assert 0 < len(doses) < 10 and 0 < len(errors) < 10
    assert all(60 <= d <= 180 for d in doses) and all(0.2 <= e <= 1.5 for e in errors)


def test_random_settings_draw_microtubule_variety_only_when_asked() -> None:
    plain = [random_settings(np.random.default_rng(s), imperfect=True) for s in range(10)]
    varied = [
        random_settings(np.random.default_rng(s), imperfect=True, microtubule_variety=True)
        for s in range(10)
    ]
    default = SimulationSettings()
    assert all(p.microtubule_elevation_deg == default.microtubule_elevation_deg for p in plain)
    for p, q in zip(plain, varied):  # the same settings otherwise, imperfections included
        kept = {"microtubule_elevation_deg": 4.0, "microtubule_lattice": 0.12}
        assert dataclasses.replace(q, **kept) == p
        assert 4 <= q.microtubule_elevation_deg <= 35 and 0.05 <= q.microtubule_lattice <= 0.8
    assert len({q.microtubule_lattice for q in varied}) == 10
    steep = random_settings(
        np.random.default_rng(3),
        imperfect=True,
        microtubule_variety=True,
        variety_ranges={"microtubule_elevation_deg": (4.0, 90.0)},
    )
    # the same draw, scaled to the wider range; everything else as before
    fraction = (varied[3].microtubule_elevation_deg - 4.0) / 31.0
    assert steep.microtubule_elevation_deg == pytest.approx(4.0 + 86.0 * fraction)
    assert dataclasses.replace(steep, microtubule_elevation_deg=4.0) == dataclasses.replace(
        varied[3], microtubule_elevation_deg=4.0
    )


def test_microtubule_elevation_and_lattice_change_the_tubes_not_the_rest() -> None:
    kw = {"shape": (48, 96, 96), "seed": 3, "snr": math.inf, "n_microtubules": 1}
    flat = simulate_tomogram(**kw)
    steep = simulate_tomogram(**kw, microtubule_elevation_deg=40.0)

    def z_extent(sim: SimulatedTomogram) -> int:
        z = np.nonzero((sim.labels == MICROTUBULE).any(axis=(1, 2)))[0]
        return int(z.max() - z.min())

    assert (flat.labels == MICROTUBULE).any() and (steep.labels == MICROTUBULE).any()
    assert z_extent(steep) > z_extent(flat) + 5
    smooth = simulate_tomogram(**kw, microtubule_lattice=0.0)
    beaded = simulate_tomogram(**kw, microtubule_lattice=0.8)
    assert np.array_equal(smooth.labels, beaded.labels)
    tube = beaded.labels == MICROTUBULE
    # a stronger lattice: more contrast along the tube, the same density elsewhere
    assert beaded.density[tube].std() > 1.2 * smooth.density[tube].std()
    far = ~ndimage.binary_dilation(tube, iterations=3)
    assert np.array_equal(beaded.density[far], smooth.density[far])
    with pytest.raises(TomosegError, match="microtubule_lattice"):
        simulate_tomogram(shape=(16, 32, 32), microtubule_lattice=2.0)


@pytest.mark.parametrize(
    ("flag", "name", "default", "low", "high"),
    [
        ("vesicle_variety", "vesicle_aspect", 1.0, 1.0, 2.5),
        ("membrane_variety", "membrane_core_density", -0.25, -0.25, 0.75),
        ("complex_variety", "complexes", 0.0, 0.0, 1.5),
    ],
)
def test_random_settings_draw_a_variety_only_when_asked(flag, name, default, low, high) -> None:
    kw = {"imperfect": True, "microtubule_variety": True}
    plain = [random_settings(np.random.default_rng(s), **kw) for s in range(10)]
    varied = [random_settings(np.random.default_rng(s), **kw, **{flag: True}) for s in range(10)]
    assert all(getattr(p, name) == default for p in plain)
    for p, q in zip(plain, varied):  # the same settings otherwise
        assert dataclasses.replace(q, **{name: default}) == p
        assert low <= getattr(q, name) <= high
    assert len({getattr(q, name) for q in varied}) == 10


def test_membrane_core_density_fills_the_bilayer_not_the_label_or_the_rest() -> None:
    kw = {"shape": (48, 96, 96), "seed": 2, "snr": math.inf, "n_vesicles": 3}
    tails = simulate_tomogram(**kw)
    packed = simulate_tomogram(**kw, membrane_core_density=0.75)
    assert np.array_equal(tails.labels, packed.labels)
    bilayer = np.isin(tails.labels, (SINGLE_MEMBRANE, DOUBLE_MEMBRANE))
    assert bilayer.sum() > 1000
    # the core between the headgroups: denser on average; far from every bilayer: the same
    assert packed.density[bilayer].mean() > tails.density[bilayer].mean() + 0.2
    far = ~ndimage.binary_dilation(bilayer, iterations=6)  # the profile ends ~3 voxels out
    assert np.allclose(packed.density[far], tails.density[far], atol=1e-3)
    with pytest.raises(TomosegError, match="membrane_core_density"):
        simulate_tomogram(shape=(16, 32, 32), membrane_core_density=2.0)


def test_complexes_add_unlabelled_particles_the_size_of_ribosomes() -> None:
    kw = {"shape": (48, 128, 128), "seed": 4, "snr": math.inf, "crowding": 0.0, "n_ribosomes": 8}
    none = simulate_tomogram(**kw)
    some = simulate_tomogram(**kw, complexes=1.5)
    assert np.array_equal(none.labels, some.labels)  # nothing labelled moves or appears
    added = (some.density - none.density > 0.5) & (some.labels == 0)
    blobs, n = ndimage.label(added)
    sizes = np.bincount(blobs.ravel())[1:]
    big = sizes[sizes > 100]  # a complex is thousands of voxels at 10 A, ribosome-sized
    ribosome = np.bincount(ndimage.label(some.labels == RIBOSOME)[0].ravel())[1:].max()
    assert len(big) >= 4  # 12 asked for; some touch, some lie partly outside the volume
    assert big.max() < 2 * ribosome
    with pytest.raises(TomosegError, match="complexes"):
        simulate_tomogram(shape=(16, 32, 32), complexes=-1.0)


def test_vesicle_aspect_makes_ellipsoids_with_the_bilayer_on_the_label() -> None:
    kw = {
        "shape": (80, 112, 112),
        "seed": 0,
        "snr": math.inf,
        "n_vesicles": 1,
        "vesicle_radius_nm": (20.0, 20.0),
        **dict.fromkeys(("n_microtubules", "n_mitochondria", "n_er_tubes", "n_ribosomes"), 0),
        **dict.fromkeys(("n_actin", "n_gold", "cell_membrane", "carbon_edge"), 0),
    }

    def elongation(sim: SimulatedTomogram) -> float:
        points = np.argwhere(sim.labels == SINGLE_MEMBRANE).astype(float)
        spread = np.linalg.eigvalsh(np.cov(points.T))
        return float(np.sqrt(spread.max() / spread.min()))

    sphere = simulate_tomogram(**kw)
    ellipsoid = simulate_tomogram(**kw, vesicle_aspect=3.0)
    assert elongation(sphere) < 1.05 and elongation(ellipsoid) > 1.5
    # the label holds the bilayer as on a sphere: the same density profile across it
    on_label = [s.density[s.labels == SINGLE_MEMBRANE].mean() for s in (sphere, ellipsoid)]
    assert on_label[1] == pytest.approx(on_label[0], rel=0.1)
    with pytest.raises(TomosegError, match="vesicle_aspect"):
        simulate_tomogram(shape=(16, 32, 32), vesicle_aspect=0.5)


def test_image_density_tomographs_a_density_of_ones_own() -> None:
    sim = simulate_tomogram(shape=(32, 80, 80), seed=4, snr=math.inf)
    tomogram = image_density(sim.density, voxel_size=sim.voxel_size, snr=math.inf)
    assert tomogram.shape == sim.density.shape and tomogram.dtype == np.float32
    assert abs(float(tomogram.mean())) < 1e-3 and float(tomogram.std()) == pytest.approx(1.0, 1e-3)
    # without noise, the same imaging as the simulator's own
    assert np.corrcoef(tomogram.ravel(), sim.tomogram.ravel())[0, 1] > 0.999
    noisy = image_density(sim.density, snr=0.5, seed=1)
    assert 0.2 < np.corrcoef(noisy.ravel(), sim.tomogram.ravel())[0, 1] < 0.95
    assert np.array_equal(noisy, image_density(sim.density, snr=0.5, seed=1))
    with pytest.raises(TomosegError, match="3D"):
        image_density(np.zeros((8, 8)))
    with pytest.raises(TomosegError, match="NaN"):
        image_density(np.full((8, 16, 16), np.nan))


# --------------------------------------------------------------------------- a picture


def test_save_central_slice_png(default_sim: SimulatedTomogram) -> None:
    """Write /tmp/sim_slice.png (tomogram and labels side by side) to look at by eye."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    z = default_sim.tomogram.shape[0] // 2
    colours = [CLASS_COLORS[i] for i in range(len(CLASS_NAMES))]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    image = default_sim.tomogram[z]
    lo, hi = np.percentile(image, [1, 99])
    axes[0].imshow(image, cmap="gray", vmin=lo, vmax=hi)
    axes[1].imshow(default_sim.labels[z], cmap=ListedColormap(colours), vmin=0, vmax=5)
    for ax, title in zip(axes, ("reconstruction", "ground truth")):
        ax.set_title(title)
        ax.axis("off")
    path = Path("/tmp/sim_slice.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    assert path.stat().st_size > 10_000


def test_a_truth_trainset_with_extra_boxes_keeps_its_own_and_adds_them(small_sim):
    from napari_tomoseg.data.boxes import Box
    from napari_tomoseg.simulator.demo import trainset_from_truth, truth_boxes

    value = CLASS_NAMES.index("single_membrane")
    pos, neg, per_value = truth_boxes(small_sim.labels, [value], 3, 5, seed=1)
    assert per_value == {value: len(pos)} and 0 < len(pos) <= 3 and 0 < len(neg) <= 5
    plain = trainset_from_truth(small_sim, ["single_membrane"], 3, 5, seed=1)
    assert plain.metadata["positive_boxes"] == [b.as_list() for b in pos]  # the same choice
    extra = Box(24, 64, 64, pos[0].size)
    more = trainset_from_truth(
        small_sim, ["single_membrane"], 3, 5, seed=1, extra_boxes=([], [extra])
    )
    assert more.metadata["negative_boxes"] == [b.as_list() for b in neg] + [extra.as_list()]
    assert more.metadata["positive_boxes"] == plain.metadata["positive_boxes"]


def test_a_simulation_resampled_to_another_voxel_size_keeps_its_features_in_place():
    from napari_tomoseg.simulator.demo import at_voxel_size

    sim = simulate_tomogram(shape=(32, 80, 80), voxel_size=14.0, seed=2)
    assert at_voxel_size(sim, 14.0) is sim
    out = at_voxel_size(sim, 10.0)
    assert out.voxel_size == 10.0 and out.density is None
    assert out.tomogram.shape == out.labels.shape == (45, 112, 112)
    assert out.tomogram.dtype == np.float32 and out.labels.dtype == sim.labels.dtype
    for value in range(len(CLASS_NAMES)):  # each class keeps its share of the volume
        assert abs((out.labels == value).mean() - (sim.labels == value).mean()) < 0.005
    # the image still matches its labels: matter (here membranes) is darker than solvent
    membrane = out.labels == SINGLE_MEMBRANE
    assert membrane.any()
    assert out.tomogram[membrane].mean() < out.tomogram[out.labels == 0].mean()
    assert len(sim.ribosome_centres) > 0  # and the particle coordinates follow
    assert np.allclose(out.ribosome_centres, (sim.ribosome_centres + 0.5) * 1.4 - 0.5)
