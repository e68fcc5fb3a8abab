"""Components, counts, particle coordinates, CSV / STAR export and surface meshes."""

from __future__ import annotations

import numpy as np
import pytest

from napari_tomoseg.applying.picking import (
    CSV_COLUMNS,
    Particle,
    PickSettings,
    mesh_area,
    mesh_volume,
    pick,
    read_csv,
    read_star,
    surface_mesh,
    write_csv,
    write_star,
)
from napari_tomoseg.data.probability import quantize_probabilities
from napari_tomoseg.errors import MissingVoxelSizeWarning, TomosegError, TomosegIOError
from napari_tomoseg.simulator.synthetic import RIBOSOME, simulate_tomogram


def sphere(shape, centre, radius):
    zz, yy, xx = np.indices(shape)
    c = np.asarray(centre, dtype=float)
    return ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= radius**2


# -- picking ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def simulated():
    return simulate_tomogram(shape=(96, 176, 176), seed=2, n_ribosomes=14)


def test_centroids_find_the_simulated_ribosomes(simulated):
    sim = simulated
    truth = sim.ribosome_centres
    result = pick(
        sim.labels == RIBOSOME,
        voxel_size=sim.voxel_size,
        class_names={1: "ribosome"},
        settings=PickSettings(min_size=50),
    )
    found = result.coordinates()
    assert len(found) >= len(truth) - 2  # fragments cut by the volume faces may be merged
    dist = np.sqrt(((truth[:, None] - found[None]) ** 2).sum(-1))
    between = np.sqrt(((truth[:, None] - truth[None]) ** 2).sum(-1)) + 1e9 * np.eye(len(truth))
    inside = np.minimum(truth, np.array(sim.labels.shape) - 1 - truth).min(axis=1)
    # whole ribosomes (~29 nm across at 1 nm voxels) away from the faces and from each other
    clear = (inside >= 15) & (between.min(axis=1) >= 32)
    assert clear.sum() >= 3
    assert dist.min(axis=1)[clear].max() <= 3.0
    # and no pick is far from every true ribosome
    assert dist.min(axis=0).max() <= 8.0
    stats = result.stats[1]
    assert stats.name == "ribosome" and stats.particles == len(found)
    assert stats.voxels <= int((sim.labels == RIBOSOME).sum())
    # 10 A voxels are 1 nm^3 each
    assert stats.volume_nm3 == pytest.approx(stats.voxels * (sim.voxel_size / 10) ** 3)
    assert result.counts == {"ribosome": len(found)}


def test_peaks_split_touching_spheres_that_centroids_merge():
    shape = (40, 40, 60)
    mask = (sphere(shape, (20, 20, 22), 8) | sphere(shape, (20, 20, 37), 8)).astype(np.uint8)
    centroid = pick(mask, settings=PickSettings(min_size=10))
    assert len(centroid.particles) == 1
    assert centroid.particles[0].x == pytest.approx(29.5, abs=0.01)
    peak = pick(mask, settings=PickSettings(min_size=10, method="peak", min_distance=6))
    xs = sorted(p.x for p in peak.particles)
    assert len(xs) == 2
    assert xs[0] == pytest.approx(22, abs=1.5) and xs[1] == pytest.approx(37, abs=1.5)
    assert {p.component for p in peak.particles} == {1}
    assert peak.stats[1].components == 1 and peak.stats[1].particles == 2


def test_peaks_of_a_probability_map():
    shape = (30, 40, 50)
    zz, yy, xx = np.indices(shape)
    prob = np.zeros(shape, np.float32)
    for c in ((15, 20, 15), (15, 22, 33)):
        prob = np.maximum(
            prob, np.exp(-((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / 50.0)
        )
    mask = (prob > 0.2).astype(np.uint8)
    result = pick(mask, probabilities=prob, settings=PickSettings(method="peak", min_distance=5))
    got = sorted((round(p.z), round(p.y), round(p.x)) for p in result.particles)
    assert got == [(15, 20, 15), (15, 22, 33)]
    assert all(p.score == pytest.approx(1.0, abs=0.1) for p in result.particles)
    # stored probabilities (percent, and the value / 255 bytes of earlier files) work the same
    for stored in (quantize_probabilities(prob), np.rint(prob * 255).astype(np.uint8)):
        again = pick(mask, probabilities=[stored], settings=PickSettings(method="peak"))
        assert sorted((round(p.z), round(p.y), round(p.x)) for p in again.particles) == got


def test_min_size_classes_names_and_anisotropic_volumes():
    shape = (20, 30, 30)
    mask = np.zeros(shape, np.uint8)
    mask[sphere(shape, (10, 10, 10), 4)] = 1  # 257 voxels
    mask[2:4, 25:27, 25:27] = 1  # 8 voxels: too small
    mask[sphere(shape, (10, 20, 20), 3)] = 3
    names = ["background", "vesicle", "unused", "granule"]
    result = pick(
        mask, voxel_size=(20.0, 10.0, 10.0), class_names=names, settings=PickSettings(min_size=20)
    )
    assert set(result.stats) == {1, 3}
    v = result.stats[1]
    assert v.components == 1 and v.voxels == int(sphere(shape, (10, 10, 10), 4).sum())
    assert v.volume_nm3 == pytest.approx(v.voxels * 2.0)  # 20 x 10 x 10 A^3 = 2 nm^3
    assert result.counts == {"vesicle": 1, "granule": 1}
    only3 = pick(mask, class_names=names, settings=PickSettings(min_size=20, classes=[3]))
    assert [p.class_name for p in only3.particles] == ["granule"]
    assert only3.stats[3].volume_nm3 is None  # no voxel size, no volume
    assert np.allclose(result.coordinates_angstrom()[0], [200.0, 100.0, 100.0])
    assert "vesicle: 1 particles" in result.summary()


def shapes_across_slabs(shape=(24, 40, 40)):
    """A U (two arms that join only in the last slices), a diagonal rod, spheres and a
    two-voxel speck: components that cross, and join across, the faces between slabs."""
    mask = np.zeros(shape, np.uint8)
    mask[2:22, 5:8, 5:8] = 1
    mask[2:22, 5:8, 20:23] = 1
    mask[19:22, 5:8, 5:23] = 1  # the U's bottom
    for z in range(shape[0]):
        mask[z, 30 - z // 2 : 33 - z // 2, 10 + z : 13 + z] = 1
    mask[sphere(shape, (6, 25, 30), 4)] = 1
    mask[sphere(shape, (18, 34, 34), 3)] = 1
    mask[0, 0, 0:2] = 1
    return mask


def slabs_of(monkeypatch, slices):
    import functools

    from napari_tomoseg.applying import picking
    from napari_tomoseg.data.io import read_slabs

    plane = 40 * 40
    monkeypatch.setattr(
        picking, "read_slabs", functools.partial(read_slabs, max_voxels=slices * plane)
    )


@pytest.mark.parametrize("slices", [1, 3, 24])
def test_components_joined_across_slabs_are_scipys_of_the_whole_volume(monkeypatch, slices):
    from scipy import ndimage

    mask = shapes_across_slabs()
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum_labels(mask, labels, range(1, n + 1))
    kept = [i + 1 for i in range(n) if sizes[i] >= 5]
    expected = ndimage.center_of_mass(mask, labels, kept)
    rng = np.random.default_rng(1)
    prob = rng.random(mask.shape).astype(np.float32)
    scores = ndimage.mean(prob, labels, kept)
    slabs_of(monkeypatch, slices)
    result = pick(mask, probabilities=prob, settings=PickSettings(min_size=5))
    assert result.stats[1].components == len(kept) == 4  # the speck is too small
    assert [p.component for p in result.particles] == list(range(1, 5))  # scipy's order
    assert np.allclose(result.coordinates(), expected)
    assert [p.size for p in result.particles] == [int(sizes[k - 1]) for k in kept]
    assert np.allclose([p.score for p in result.particles], scores, atol=1e-5)
    assert result.stats[1].voxels == int(sum(sizes[k - 1] for k in kept))


def test_a_wide_face_between_slabs_joins_one_component(monkeypatch):
    mask = np.zeros((6, 40, 40), np.uint8)
    mask[:, 4:36, 4:36] = 1  # 1024 touching voxel pairs across every face
    slabs_of(monkeypatch, 1)
    result = pick(mask, settings=PickSettings(min_size=5))
    assert result.stats[1].components == 1 and result.particles[0].size == 6 * 32 * 32
    assert np.allclose(result.coordinates(), [[2.5, 19.5, 19.5]])


def test_peak_picking_in_slabs_equals_picking_in_one(monkeypatch):
    mask = shapes_across_slabs()
    settings = PickSettings(min_size=5, method="peak", min_distance=4)
    whole = pick(mask, settings=settings)
    slabs_of(monkeypatch, 2)
    assert pick(mask, settings=settings).particles == whole.particles


def test_picking_memory_does_not_grow_with_the_volume(monkeypatch):
    import tracemalloc

    slabs_of(monkeypatch, 4)  # 4 slices of 40 x 40 per slab
    peaks = []
    for depth in (16, 160):
        mask = np.zeros((depth, 40, 40), np.uint8)
        mask[:, 18:22, :] = 1  # a sheet through every slab
        for z in range(4, depth - 4, 10):
            mask[sphere(mask.shape, (z, 8, 20), 3)] = 1
        tracemalloc.start()
        result = pick(mask, settings=PickSettings(min_size=5))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert result.stats[1].components == 1 + len(range(4, depth - 4, 10))
    # a whole-volume label map would take 5 bytes a voxel: 1.2 MB more for 160 slices
    assert peaks[1] < peaks[0] + 200_000, peaks


@pytest.mark.parametrize(
    "kw",
    [{"min_size": 0}, {"method": "magic"}, {"min_distance": 0}, {"classes": [0]}],
)
def test_bad_pick_settings(kw):
    with pytest.raises(TomosegError):
        pick(np.zeros((3, 3, 3), np.uint8), settings=PickSettings(**kw))


def test_bad_pick_inputs():
    with pytest.raises(TomosegError, match="3D"):
        pick(np.zeros((3, 3), np.uint8))
    with pytest.raises(TomosegError, match="integer"):
        pick(np.zeros((3, 3, 3), np.float32))
    mask = np.zeros((4, 4, 4), np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    mask[0, 0, 0] = 2
    with pytest.raises(TomosegError, match="several features"):
        pick(mask, probabilities=np.zeros((4, 4, 4)), settings=PickSettings(min_size=1))


# -- CSV and STAR -------------------------------------------------------------------------------
@pytest.fixture
def particles():
    rng = np.random.default_rng(0)
    out = []
    for i in range(7):
        z, y, x = rng.uniform(0, 100, 3)
        label = 1 + i % 2
        out.append(
            Particle(
                label,
                ["ribosome", "big vesicle"][i % 2],
                z,
                y,
                x,
                int(rng.integers(50, 900)),
                component=i + 1,
                score=float(rng.random()),
            )
        )
    return out


def test_csv_round_trip(tmp_path, particles):
    path = write_csv(tmp_path / "p.csv", particles, (20.0, 10.0, 10.0))
    header = path.read_text().splitlines()[0]
    assert header == ",".join(CSV_COLUMNS)
    assert header.startswith("label,class,z,y,x,z_A,y_A,x_A")
    table = read_csv(path)
    assert table.particles == particles
    assert table.voxel_size == pytest.approx((20.0, 10.0, 10.0))
    first = path.read_text().splitlines()[1].split(",")
    assert float(first[5]) == pytest.approx(particles[0].z * 20.0)
    assert float(first[7]) == pytest.approx(particles[0].x * 10.0)
    with pytest.raises(TomosegIOError, match="already exists"):
        write_csv(tmp_path / "p.csv", particles, 10.0)
    write_csv(tmp_path / "p.csv", particles[:2], 10.0, overwrite=True)
    assert len(read_csv(tmp_path / "p.csv").particles) == 2


def test_csv_without_voxel_size_warns_and_leaves_angstrom_empty(tmp_path, particles):
    with pytest.warns(MissingVoxelSizeWarning):
        write_csv(tmp_path / "p.csv", particles, None)
    table = read_csv(tmp_path / "p.csv")
    assert table.particles == particles and table.voxel_size is None
    assert path_line(tmp_path / "p.csv", 1).split(",")[5:8] == ["", "", ""]


def path_line(path, n):
    return path.read_text().splitlines()[n]


def test_star_round_trip_and_relion_columns(tmp_path, particles):
    shape = (100, 200, 300)
    path = write_star(tmp_path / "p.star", particles, 10.0, tomo_name="TS_01", shape=shape)
    text = path.read_text()
    for column in (
        "_rlnTomoName",
        "_rlnCoordinateX",
        "_rlnCoordinateZ",
        "_rlnCenteredCoordinateXAngst",
        "_rlnCenteredCoordinateZAngst",
        "_rlnClassNumber",
    ):
        assert column in text
    assert "data_particles" in text and "_rlnImagePixelSize 10.0" in text
    table = read_star(path)
    assert table.particles == particles
    assert table.voxel_size == (10.0, 10.0, 10.0)
    assert table.tomo_name == "TS_01" and table.shape == shape
    # RELION 5 centred coordinates: (coordinate - size / 2) * voxel size
    rows = [line.split() for line in text.splitlines() if line.startswith("TS_01")]
    x_c = float(rows[0][4])
    assert x_c == pytest.approx((particles[0].x - 150) * 10.0)
    z_c = float(rows[0][6])
    assert z_c == pytest.approx((particles[0].z - 50) * 10.0)


def test_star_from_a_pick_result_and_a_hand_written_relion_file(tmp_path):
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[sphere(mask.shape, (10, 9, 11), 4)] = 1
    result = pick(
        mask, voxel_size=8.0, class_names=["bg", "a thing"], settings=PickSettings(min_size=5)
    )
    write_star(tmp_path / "r.star", result, tomo_name="tomo 1")
    table = read_star(tmp_path / "r.star")
    assert table.particles == result.particles and table.shape == (20, 20, 20)
    assert table.tomo_name == "tomo 1"
    (tmp_path / "relion.star").write_text(
        "# RELION\n\ndata_particles\n\nloop_\n_rlnTomoName #1\n_rlnCoordinateX #2\n"
        "_rlnCoordinateY #3\n_rlnCoordinateZ #4\nTS_1 10.5 20 30\nTS_1 1 2 3\n\n"
    )
    other = read_star(tmp_path / "relion.star")
    assert [(p.x, p.y, p.z) for p in other.particles] == [(10.5, 20.0, 30.0), (1.0, 2.0, 3.0)]
    assert other.tomo_name == "TS_1" and other.voxel_size is None
    (tmp_path / "bad.star").write_text("data_x\nloop_\n_rlnFoo #1\n1\n")
    with pytest.raises(TomosegIOError, match="_rlnCoordinateX"):
        read_star(tmp_path / "bad.star")


# -- meshes -------------------------------------------------------------------------------------
def _edges_shared_twice(faces):
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return bool((counts == 2).all())


def test_sphere_mesh_is_closed_outward_and_has_a_plausible_area():
    r = 10.0
    mask = sphere((36, 36, 36), (17.3, 18.0, 17.6), r).astype(np.uint8)
    vertices, faces = surface_mesh(mask)
    assert vertices.shape[1] == 3 and faces.shape[1] == 3
    assert _edges_shared_twice(faces)
    area = mesh_area(vertices, faces)
    assert area == pytest.approx(4 * np.pi * r**2, rel=0.06)
    assert mesh_volume(vertices, faces) == pytest.approx(4 / 3 * np.pi * r**3, rel=0.05)
    assert np.allclose(vertices.mean(axis=0), (17.3, 18.0, 17.6), atol=0.3)
    coarse_v, coarse_f = surface_mesh(mask, step=2)
    assert len(coarse_f) < len(faces) / 3
    assert mesh_area(coarse_v, coarse_f) == pytest.approx(4 * np.pi * r**2, rel=0.12)
    assert np.allclose(coarse_v.mean(axis=0), (17.3, 18.0, 17.6), atol=0.8)


def test_smooth_map_mesh_is_more_accurate_and_labels_select():
    zz, yy, xx = np.indices((40, 40, 40))
    dist = np.sqrt((zz - 20.2) ** 2 + (yy - 19.7) ** 2 + (xx - 20.0) ** 2)
    smooth = np.clip(12.0 - dist + 0.5, 0, 1).astype(np.float32)  # 0.5 level at radius 12
    v, f = surface_mesh(smooth, level=0.5)
    assert mesh_area(v, f) == pytest.approx(4 * np.pi * 144, rel=0.02)
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[sphere(labels.shape, (10, 10, 10), 5)] = 2
    labels[sphere(labels.shape, (20, 20, 20), 3)] = 4
    v2, f2 = surface_mesh(labels, label=2)
    assert np.allclose(v2.mean(axis=0), 10, atol=0.3)
    v4, f4 = surface_mesh(labels, label=4)
    assert np.allclose(v4.mean(axis=0), 20, atol=0.3)
    touching = np.ones((4, 5, 6), np.uint8)  # fills the volume: closed at the faces
    vt, ft = surface_mesh(touching)
    assert _edges_shared_twice(ft) and mesh_volume(vt, ft) > 0
    empty_v, empty_f = surface_mesh(np.zeros((5, 5, 5), np.uint8))
    assert empty_v.shape == (0, 3) and empty_f.shape == (0, 3)
    with pytest.raises(TomosegError):
        surface_mesh(labels, step=0)
