"""The 3D view's core: specks removed, smooth surfaces per feature, the box to frame."""

from __future__ import annotations

import numpy as np
import pytest

from napari_tomoseg.applying.render import RenderSettings, remove_specks, render_scene
from napari_tomoseg.errors import TomosegError


def _ball(shape, centre, radius):
    zz, yy, xx = np.indices(shape)
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2


def test_remove_specks_drops_pieces_below_the_size_and_keeps_the_rest():
    mask = np.zeros((20, 40, 40), bool)
    mask[2:6, 2:6, 2:6] = True  # 64 voxels
    mask[10:13, 20:23, 20:23] = True  # 27 voxels
    mask[15, 35, 35] = True  # 1 voxel
    mask[16, 36, 36] = True  # touches the last one at a corner: one piece of 2 voxels
    kept, removed = remove_specks(mask, min_size=27)
    assert removed == 1
    np.testing.assert_array_equal(kept, mask & ~(np.indices(mask.shape)[0] >= 15))
    kept, removed = remove_specks(mask, min_size=28)
    assert removed == 2 and kept.sum() == 64 and kept[2:6, 2:6, 2:6].all()
    kept, removed = remove_specks(mask, min_size=2)
    np.testing.assert_array_equal(kept, mask)
    assert removed == 0


def test_render_scene_keeps_each_feature_drops_specks_and_frames_what_is_left():
    labels = np.zeros((32, 64, 64), np.uint8)
    labels[_ball(labels.shape, (16, 20, 20), 6)] = 1
    labels[_ball(labels.shape, (16, 44, 40), 5)] = 2
    labels[2, 60, 60] = 1  # a speck of feature 1, far from everything
    labels[30, 2:4, 2:4] = 2  # a 4-voxel speck of feature 2
    scene = render_scene(labels, settings=RenderSettings(min_size=50))
    assert [s.value for s in scene.surfaces] == [1, 2]
    assert [s.specks for s in scene.surfaces] == [1, 1]
    assert scene.surfaces[0].voxels == int(_ball(labels.shape, (16, 20, 20), 6).sum())
    # the frame is the box of the two balls, not of the specks
    np.testing.assert_allclose(scene.lower, (10, 14, 14))
    np.testing.assert_allclose(scene.upper, (22, 49, 45))
    np.testing.assert_allclose(scene.centre, (16, 31.5, 29.5))
    for surface in scene.surfaces:
        # a closed surface around the ball: every vertex near its radius
        centre = (16, 20, 20) if surface.value == 1 else (16, 44, 40)
        radius = 6 if surface.value == 1 else 5
        distance = np.linalg.norm(surface.vertices - np.array(centre), axis=1)
        assert abs(np.median(distance) - radius) < 1.0
        assert surface.faces.max() < len(surface.vertices)


def test_smoothing_takes_off_the_voxel_staircase():
    labels = _ball((32, 32, 32), (16, 16, 16), 9).astype(np.uint8)
    rough = render_scene(labels, settings=RenderSettings(sigma=0.0, level=0.5)).surfaces[0]
    smooth = render_scene(labels, settings=RenderSettings(sigma=1.0)).surfaces[0]

    def radii(surface):
        return np.linalg.norm(surface.vertices - 16.0, axis=1)

    # a sphere's vertices all lie at one radius: the staircase of voxels scatters them
    assert radii(smooth).std() < 0.7 * radii(rough).std()
    assert abs(radii(smooth).mean() - 9) < 0.5  # and the ball keeps its size


def test_a_thin_membrane_stays_one_sheet_after_smoothing():
    labels = np.zeros((24, 48, 48), np.uint8)
    labels[:, 20:22, :] = 1  # a flat membrane two voxels thick
    [surface] = render_scene(labels).surfaces
    assert surface.specks == 0 and len(surface.faces) > 0
    # the sheet spans the whole volume in Z and X
    assert np.ptp(surface.vertices[:, 0]) > 20 and np.ptp(surface.vertices[:, 2]) > 44


def test_nothing_left_and_bad_settings():
    labels = np.zeros((8, 16, 16), np.uint8)
    labels[4, 8, 8] = 3
    scene = render_scene(labels)
    assert scene.surfaces == [] and scene.centre is None
    with pytest.raises(TomosegError, match="min_size"):
        render_scene(labels, settings=RenderSettings(min_size=0))
    with pytest.raises(TomosegError, match="level"):
        render_scene(labels, settings=RenderSettings(level=1.5))
    with pytest.raises(TomosegError, match="3D"):
        render_scene(labels[0])


def test_large_volumes_are_averaged_in_blocks():
    labels = _ball((40, 40, 40), (20, 20, 20), 12).astype(np.uint8)
    fine = render_scene(labels).surfaces[0]
    coarse = render_scene(labels, settings=RenderSettings(max_voxels=40**3 // 8)).surfaces[0]
    assert len(coarse.faces) < len(fine.faces) / 2
    # the coarse surface is still in the volume's voxels (same place, same size)
    np.testing.assert_allclose(coarse.vertices.mean(axis=0), fine.vertices.mean(axis=0), atol=1)
