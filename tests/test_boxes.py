"""Boxes: Shapes-layer conversion, snapping, validation and cropping."""

from __future__ import annotations

import numpy as np
import pytest

from napari_tomoseg.data.boxes import (
    DEFAULT_BOX_SIZE,
    Box,
    box_from_shape,
    boxes_from_shapes,
    boxes_to_shapes,
    crop,
    validate_boxes,
)
from napari_tomoseg.errors import TomosegError


def rectangle(z: float, top: float, left: float, height: float, width: float) -> np.ndarray:
    """A (4, 3) rectangle as napari stores it: four corners on one Z slice."""
    return np.array(
        [
            [z, top, left],
            [z, top, left + width],
            [z, top + height, left + width],
            [z, top + height, left],
        ],
        dtype=float,
    )


def test_default_size_and_extent() -> None:
    box = Box(3, 100, 200)
    assert box.size == DEFAULT_BOX_SIZE == 64
    assert (box.y0, box.y1, box.x0, box.x1) == (68, 132, 168, 232)
    z, ys, xs = box.slices()
    assert z == 3
    assert ys.stop - ys.start == 64 and xs.stop - xs.start == 64


@pytest.mark.parametrize("size", [64, 33, 8])
def test_shapes_round_trip(size: int) -> None:
    boxes = [Box(0, 40, 40, size), Box(7, 101, 55, size), Box(12, 33, 250, size)]
    shapes = boxes_to_shapes(boxes)
    assert all(s.shape == (4, 3) and s.dtype == np.float64 for s in shapes)
    assert boxes_from_shapes(shapes, box_size=size) == boxes


def test_shape_outlines_exactly_the_box_pixels() -> None:
    box = Box(5, 50, 80, 10)
    shape = box.to_shape()
    assert np.all(shape[:, 0] == 5)
    # napari draws pixel j over [j - 0.5, j + 0.5]: the rectangle's edges are pixel edges.
    assert shape[:, 1].min() == box.y0 - 0.5 and shape[:, 1].max() == box.y1 - 0.5
    assert shape[:, 2].min() == box.x0 - 0.5 and shape[:, 2].max() == box.x1 - 0.5


def test_drawn_rectangle_snaps_to_box_size_around_its_centre() -> None:
    drawn = rectangle(z=5.0, top=70.3, left=160.7, height=100.0, width=80.0)  # 100 x 80
    (box,) = boxes_from_shapes([drawn], box_size=64)
    assert box.size == 64 and box.z == 5
    centre_y, centre_x = 70.3 + 50.0, 160.7 + 40.0
    # geometric centre of the box's pixels is within half a pixel of the drawn centre
    assert abs((box.y0 + (box.size - 1) / 2) - centre_y) <= 0.5
    assert abs((box.x0 + (box.size - 1) / 2) - centre_x) <= 0.5
    assert (box.y0, box.x0) == (89, 169)


def test_snapping_works_for_ellipse_like_and_rotated_shapes() -> None:
    diamond = np.array([[2, 50, 70], [2, 70, 90], [2, 90, 70], [2, 70, 50]], dtype=float)
    box = box_from_shape(diamond, box_size=20)
    # centre (70, 70) lies between two pixel-grid centres: halves round up, to 70.5
    assert (box.z, box.y0 + 9.5, box.x0 + 9.5) == (2, 70.5, 70.5)
    shifted = diamond + np.array([0.0, -0.3, 0.3])
    box = box_from_shape(shifted, box_size=20)
    assert (box.y0 + 9.5, box.x0 + 9.5) == (69.5, 70.5)


def test_z_is_rounded_when_nearly_integer() -> None:
    drawn = rectangle(z=6.9999999, top=10, left=10, height=64, width=64)
    assert boxes_from_shapes([drawn])[0].z == 7


def test_2d_shapes_are_refused() -> None:
    flat = np.array([[10, 10], [10, 70], [70, 70], [70, 10]], dtype=float)
    with pytest.raises(TomosegError, match="3D"):
        boxes_from_shapes([flat])


def test_shapes_spanning_several_slices_are_refused() -> None:
    tilted = rectangle(z=4, top=10, left=10, height=64, width=64)
    tilted[2, 0] = 6
    with pytest.raises(TomosegError, match="Shape 2 spans Z 4 to 6"):
        boxes_from_shapes([rectangle(1, 0, 0, 5, 5), tilted])


def test_box_coordinates_must_be_integers() -> None:
    assert Box(np.int64(2), np.int32(40), 40.0, 16) == Box(2, 40, 40, 16)
    with pytest.raises(TomosegError, match="integer"):
        Box(0, 10.5, 10)
    with pytest.raises(TomosegError, match="at least 2"):
        Box(0, 10, 10, 1)


def test_validate_accepts_boxes_inside() -> None:
    shape = (10, 128, 128)
    validate_boxes([Box(0, 32, 32), Box(9, 96, 96)], shape)


@pytest.mark.parametrize(
    ("box", "where"),
    [
        (Box(0, 31, 64), "covers y -1..62"),
        (Box(0, 64, 97), "x 65..128"),
        (Box(10, 64, 64), "slice z=10 is outside 0..9"),
        (Box(-1, 64, 64), "slice z=-1"),
    ],
)
def test_validate_names_the_box_off_the_volume(box: Box, where: str) -> None:
    boxes = [Box(2, 64, 64), box]
    with pytest.raises(TomosegError) as info:
        validate_boxes(boxes, (10, 128, 128), kind="negative")
    text = str(info.value)
    assert f"Negative box 2 at z={box.z}, y={box.y}, x={box.x} is off the volume" in text
    assert where in text


def test_validate_empty_sets() -> None:
    with pytest.raises(TomosegError, match="place at least one positive box"):
        validate_boxes([], (10, 128, 128))
    validate_boxes([], (10, 128, 128), kind="negative")  # negatives are optional
    with pytest.raises(TomosegError, match="place at least one negative box"):
        validate_boxes([], (10, 128, 128), kind="negative", allow_empty=False)


def test_validate_mixed_sizes_small_volume_and_dimensionality() -> None:
    with pytest.raises(TomosegError, match="box 2 .* is 32 px, but box 1 is 64 px"):
        validate_boxes([Box(0, 64, 64), Box(0, 64, 64, 32)], (4, 128, 128))
    with pytest.raises(TomosegError, match="smaller than a 64 px box"):
        validate_boxes([Box(0, 30, 30)], (4, 60, 200))
    with pytest.raises(TomosegError, match="3D"):
        validate_boxes([Box(0, 64, 64)], (128, 128))


def test_crop_equals_the_volume_slice() -> None:
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(6, 50, 60)).astype(np.float32)
    box = Box(3, 20, 30, 16)
    patch = crop(volume, box)
    assert patch.shape == (1, 16, 16) and patch.dtype == np.float32
    np.testing.assert_array_equal(patch[0], volume[3, 12:28, 22:38])


def test_crop_context_channels_clamp_at_z_ends() -> None:
    volume = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((1, 20, 20), np.float32)
    patch = crop(volume, Box(1, 10, 10, 8), context_slices=2)
    assert patch.shape == (5, 8, 8)
    assert [float(p[0, 0]) for p in patch] == [0.0, 0.0, 1.0, 2.0, 3.0]
    top = crop(volume, Box(4, 10, 10, 8), context_slices=1)
    assert [float(p[0, 0]) for p in top] == [3.0, 4.0, 4.0]


def test_crop_reads_a_memmap_and_refuses_boxes_off_it(tmp_path) -> None:
    path = tmp_path / "vol.raw"
    data = np.memmap(path, dtype=np.int16, mode="w+", shape=(4, 40, 40))
    data[:] = np.arange(40, dtype=np.int16)[None, None, :]
    data.flush()
    ro = np.memmap(path, dtype=np.int16, mode="r", shape=(4, 40, 40))
    patch = crop(ro, Box(2, 20, 20, 10))
    assert patch.dtype == np.int16
    np.testing.assert_array_equal(patch[0, 0], np.arange(15, 25))
    with pytest.raises(TomosegError, match="off the volume"):
        crop(ro, Box(2, 3, 20, 10))


def test_round_trip_through_a_napari_shapes_layer() -> None:
    napari_layers = pytest.importorskip("napari.layers")
    boxes = [Box(2, 40, 50, 32), Box(5, 80, 60, 32)]
    layer = napari_layers.Shapes(boxes_to_shapes(boxes), shape_type="rectangle", ndim=3)
    assert boxes_from_shapes(layer.data, box_size=32) == boxes
