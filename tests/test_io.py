"""MRC reading and writing: modes, voxel size, errors, atomic writes."""

from __future__ import annotations

import gzip
import warnings

import mrcfile
import numpy as np
import pytest

from napari_tomoseg._reader import get_reader
from napari_tomoseg._writer import write_image_layer, write_labels_layer
from napari_tomoseg.data import io as tio
from napari_tomoseg.errors import MissingVoxelSizeWarning, TomosegError, TomosegIOError

MODES = {
    0: np.int8,
    1: np.int16,
    2: np.float32,
    6: np.uint16,
    12: np.float16,
}


def _write(path, data, voxel_size=(8.0, 8.0, 8.0)):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if voxel_size is not None:
            mrc.voxel_size = voxel_size
    return path


@pytest.mark.parametrize("mode", sorted(MODES))
def test_reads_every_supported_mode(tmp_path, mode):
    rng = np.random.default_rng(mode)
    dtype = MODES[mode]
    data = (rng.random((5, 12, 9)) * 100).astype(dtype)
    path = _write(tmp_path / f"m{mode}.mrc", data, voxel_size=(7.5, 6.0, 5.0))
    tomo = tio.read_tomogram(path)
    assert tomo.mode == mode
    assert tomo.data.shape == (5, 12, 9)
    np.testing.assert_array_equal(np.asarray(tomo.data), data)
    # header (x, y, z) -> (z, y, x)
    assert tomo.voxel_size == pytest.approx((5.0, 6.0, 7.5))
    assert isinstance(tomo.data, np.memmap)


def test_complex_mode_is_refused_with_a_clear_message(tmp_path):
    path = _write(tmp_path / "c.mrc", np.ones((2, 4, 4), np.complex64))
    with pytest.raises(TomosegIOError, match=r"c\.mrc.*mode 4 is not supported"):
        tio.read_tomogram(path)


@pytest.mark.parametrize("suffix", [".rec", ".map", ".st", ".ali", ".mrcs"])
def test_every_extension_reads_through_the_npe2_reader(tmp_path, suffix):
    data = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    path = _write(tmp_path / f"vol{suffix}", data, voxel_size=12.0)
    reader = get_reader(str(path))
    assert reader is not None
    [(array, kwargs, layer_type)] = reader(str(path))
    assert layer_type == "image"
    np.testing.assert_array_equal(np.asarray(array), data)
    assert kwargs["scale"] == pytest.approx((12.0, 12.0, 12.0))
    meta = kwargs["metadata"]
    assert meta["voxel_size"] == pytest.approx((12.0, 12.0, 12.0))
    assert meta["source_path"] == str(path)
    assert meta["voxel_size_unit"] == "angstrom"


def test_reader_declines_other_files(tmp_path):
    assert get_reader(str(tmp_path / "a.tif")) is None
    assert get_reader([str(tmp_path / "a.mrc"), str(tmp_path / "b.png")]) is None


def test_gzip_file_reads(tmp_path):
    data = np.random.default_rng(1).random((4, 6, 6)).astype(np.float32)
    plain = _write(tmp_path / "v.mrc", data, voxel_size=3.0)
    gz = tmp_path / "v.mrc.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    tomo = tio.read_tomogram(gz)
    np.testing.assert_array_equal(tomo.data, data)
    assert tomo.voxel_size == pytest.approx((3.0, 3.0, 3.0))


def test_origin_is_read_in_zyx(tmp_path):
    path = tmp_path / "o.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((2, 3, 4), np.float32))
        mrc.voxel_size = 10.0
        mrc.header.origin = (1.0, 2.0, 3.0)
    assert tio.read_tomogram(path).origin == (3.0, 2.0, 1.0)


@pytest.mark.parametrize("voxel_size", [None, 1.0])
def test_missing_or_unit_voxel_size_warns(tmp_path, voxel_size):
    path = _write(tmp_path / "nv.mrc", np.zeros((2, 4, 4), np.float32), voxel_size=voxel_size)
    with pytest.warns(MissingVoxelSizeWarning, match="no voxel size"):
        tomo = tio.read_tomogram(path)
    assert tomo.voxel_size is None
    assert tomo.scale == (1.0, 1.0, 1.0)


def test_empty_file_error(tmp_path):
    path = tmp_path / "empty.mrc"
    path.write_bytes(b"")
    with pytest.raises(TomosegIOError, match=r"empty\.mrc: the file is empty"):
        tio.read_tomogram(path)


def test_missing_file_error(tmp_path):
    with pytest.raises(TomosegIOError, match="does not exist"):
        tio.read_tomogram(tmp_path / "nope.mrc")


def test_not_an_mrc_file(tmp_path):
    path = tmp_path / "text.mrc"
    path.write_bytes(b"hello world, this is not a tomogram\n" * 64)
    with pytest.raises(TomosegIOError, match=r"text\.mrc.*not an MRC file"):
        tio.read_tomogram(path)


def test_short_file_error(tmp_path):
    path = tmp_path / "short.mrc"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(TomosegIOError, match="shorter than an MRC header"):
        tio.read_tomogram(path)


def test_truncated_file_error(tmp_path):
    path = _write(tmp_path / "t.mrc", np.ones((8, 32, 32), np.float32))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(TomosegIOError, match=r"t\.mrc: the file is truncated"):
        tio.read_tomogram(path)


def test_header_that_lies_about_size(tmp_path):
    path = _write(tmp_path / "lie.mrc", np.ones((2, 8, 8), np.float32))
    with mrcfile.open(path, mode="r+", permissive=True) as mrc:
        mrc.header.nz = 500  # promises far more data than the file holds
    with pytest.raises(TomosegIOError, match="truncated"):
        tio.read_tomogram(path)


def test_errors_are_tomoseg_errors(tmp_path):
    path = tmp_path / "x.mrc"
    path.write_bytes(b"")
    with pytest.raises(TomosegError):
        tio.read_tomogram(path)


def test_write_round_trip_keeps_data_and_voxel_size(tmp_path):
    data = np.random.default_rng(0).normal(size=(20, 33, 17)).astype(np.float32)
    out = tio.write_mrc(tmp_path / "w.mrc", data, (4.0, 5.0, 6.0), origin=(1.0, 2.0, 3.0))
    tomo = tio.read_tomogram(out)
    np.testing.assert_array_equal(tomo.data, data)
    assert tomo.voxel_size == pytest.approx((4.0, 5.0, 6.0))
    assert tomo.origin == pytest.approx((1.0, 2.0, 3.0))
    # Other readers can open it: mrcfile's own validator accepts it.
    with warnings.catch_warnings(), open(tmp_path / "validate.log", "w") as log:
        warnings.simplefilter("ignore")
        assert mrcfile.validate(str(out), print_file=log)


def test_write_from_memmap_streams_in_chunks(tmp_path):
    data = np.random.default_rng(1).random((40, 16, 16)).astype(np.float32)
    src = tio.write_mrc(tmp_path / "src.mrc", data, 10.0)
    mm = tio.read_tomogram(src).data
    out = tio.write_mrc(tmp_path / "copy.mrc", mm, 10.0)
    np.testing.assert_array_equal(tio.read_tomogram(out).data, data)


def test_write_gzip_round_trip(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    out = tio.write_mrc(tmp_path / "g.mrc.gz", data, 2.5)
    tomo = tio.read_tomogram(out)
    np.testing.assert_array_equal(tomo.data, data)
    assert tomo.voxel_size == pytest.approx((2.5, 2.5, 2.5))


def test_write_refuses_to_overwrite_without_permission(tmp_path):
    path = tmp_path / "keep.mrc"
    tio.write_mrc(path, np.zeros((2, 2, 2), np.float32), 1.5)
    before = path.read_bytes()
    with pytest.raises(TomosegIOError, match="already exists"):
        tio.write_mrc(path, np.ones((2, 2, 2), np.float32), 1.5)
    assert path.read_bytes() == before
    tio.write_mrc(path, np.ones((2, 2, 2), np.float32), 1.5, overwrite=True)
    assert np.all(tio.read_tomogram(path).data == 1)


class _ExplodingArray:
    """Array-like whose slices fail part-way, as a full disk or a crash would."""

    def __init__(self, shape):
        self.shape = shape
        self.ndim = len(shape)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key):
        if key.start and key.start >= 16:
            raise OSError("No space left on device")
        return np.full((min(16, self.shape[0] - key.start),) + self.shape[1:], 7, np.float32)


def test_interrupted_write_leaves_old_file_intact(tmp_path):
    path = tmp_path / "seg.mrc"
    old = np.full((40, 8, 8), 3, np.float32)
    tio.write_mrc(path, old, 9.0)
    before = path.read_bytes()
    with pytest.raises(OSError, match="No space left"):
        tio.write_mrc(path, _ExplodingArray((40, 8, 8)), 9.0, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.mrc"]  # no temp file left


def test_write_into_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TomosegIOError, match="does not exist"):
        tio.write_mrc(tmp_path / "no" / "x.mrc", np.zeros((2, 2, 2), np.float32))


def test_labels_dtype_choice(tmp_path):
    small = np.zeros((2, 4, 4), np.int64)
    small[0, 0, 0] = 5
    big = small.copy()
    big[1, 1, 1] = 300
    a = tio.write_labels(tmp_path / "a.mrc", small, 10.0)
    b = tio.write_labels(tmp_path / "b.mrc", big, 10.0)
    assert tio.read_tomogram(a).data.dtype == np.uint8
    assert tio.read_tomogram(b).data.dtype == np.uint16
    np.testing.assert_array_equal(tio.read_tomogram(b).data, big)
    with pytest.raises(TomosegIOError, match="non-negative"):
        tio.write_labels(tmp_path / "c.mrc", small - 1, 10.0)


def test_napari_writers_keep_voxel_size_from_layer(tmp_path):
    labels = np.zeros((3, 5, 5), np.int32)
    labels[1, 2, 2] = 4
    meta = {"scale": (11.0, 11.0, 11.0), "metadata": {"voxel_size": (11.0, 11.0, 11.0)}}
    [out] = write_labels_layer(str(tmp_path / "l.mrc"), labels, meta)
    tomo = tio.read_tomogram(out)
    assert tomo.data.dtype == np.uint8
    assert tomo.voxel_size == pytest.approx((11.0, 11.0, 11.0))
    image = np.random.default_rng(2).random((3, 5, 5))  # float64 becomes float32
    [img_out] = write_image_layer(str(tmp_path / "i.mrc"), image, {"scale": (7.0, 7.0, 7.0)})
    img = tio.read_tomogram(img_out)
    assert img.data.dtype == np.float32
    assert img.voxel_size == pytest.approx((7.0, 7.0, 7.0))
    np.testing.assert_allclose(img.data, image, rtol=1e-6)
    # a probability layer of the Apply widget is saved as the CLI writes one: percent bytes
    prob = np.array([[[0, 37, 100]]], np.int8)
    meta = {"scale": (7.0,) * 3, "metadata": {"tomoseg_probability": True}}
    [prob_out] = write_image_layer(str(tmp_path / "p.mrc"), prob, meta)
    with mrcfile.open(prob_out) as mrc:
        assert mrc.header.mode == 0 and mrc.data.tolist() == [[[0, 37, 100]]]
        assert "napari-tomoseg probability map: value / 100 = probability" in (
            tio.header_labels(mrc.header)
        )
    # opened again, it is a probability map for Merge and Suggest, its threshold kept
    meta["metadata"]["threshold"] = 0.8
    [prob_out] = write_image_layer(str(tmp_path / "p2.mrc"), prob, meta)
    [(data, kwargs, kind)] = get_reader(prob_out)(prob_out)
    assert kind == "image" and np.asarray(data).ravel().tolist() == [0, 37, 100]
    assert kwargs["metadata"]["tomoseg_probability"] is True
    assert kwargs["metadata"]["threshold"] == 0.8 and kwargs["metadata"]["scale_max"] == 100
    [(_, plain, _)] = get_reader(img_out)(img_out)  # a plain image is not taken for one
    assert "tomoseg_probability" not in plain["metadata"]


def test_a_recorded_threshold_is_read_back_and_a_bad_one_ignored(tmp_path):
    for text, expected in (("0.8", 0.8), ("0.125", 0.125), ("1.5", None), ("x", None)):
        path = tio.write_mrc(
            tmp_path / f"t{expected}.mrc",
            np.zeros((1, 2, 2), np.float32),
            10.0,
            overwrite=True,
            header_texts=[tio.THRESHOLD_LABEL + text],
        )
        assert tio.threshold_of(tio.read_tomogram(path)) == expected
    assert tio.threshold_label(None) == []


def test_labels_read_the_same_with_any_reader(tmp_path):
    labels = np.zeros((3, 4, 4), np.uint8)
    labels[0, 0, 0], labels[1, 1, 1] = 127, 5
    out = tio.write_labels(tmp_path / "u8.mrc", labels, 10.0)
    tomo = tio.read_tomogram(out)
    assert tomo.mode == 0 and tomo.data.dtype == np.uint8
    np.testing.assert_array_equal(tomo.data, labels)
    with mrcfile.open(out) as mrc:  # a plain MRC reader (signed bytes) sees the same values
        assert mrc.header.mode == 0
        np.testing.assert_array_equal(mrc.data, labels)
        assert float(mrc.header.dmax) == 127.0
    labels[2, 2, 2] = 200  # past 127 a signed byte cannot hold it: mode 6 (uint16)
    out = tio.write_labels(tmp_path / "u16.mrc", labels, 10.0)
    with mrcfile.open(out) as mrc:
        assert mrc.header.mode == 6
        np.testing.assert_array_equal(mrc.data, labels)
    np.testing.assert_array_equal(tio.read_tomogram(out).data, labels)


def test_unsigned_byte_files_of_earlier_versions_still_read(tmp_path):
    data = np.array([[[0, 128, 255]], [[1, 2, 3]]], np.uint8)
    path = tmp_path / "old.mrc"
    with tio.new_mrc_mmap(path, data.shape, np.uint8) as (mrc, out):  # IMOD-stamped mode 0
        out[...] = data
        tio.finish_header(mrc, 10.0)
    tomo = tio.read_tomogram(path)
    assert tomo.data.dtype == np.uint8
    np.testing.assert_array_equal(tomo.data, data)


# -- the voxel-size type ----------------------------------------------------------------------
def test_voxel_size_parses_one_value_an_image_pair_or_z_y_x():
    import json

    from napari_tomoseg.data.voxels import VoxelSize

    assert VoxelSize.parse(None) is None
    cubic = VoxelSize.parse(10)
    assert isinstance(cubic, VoxelSize) and cubic == (10.0, 10.0, 10.0)
    assert VoxelSize.parse((7.0, 5.0)) == (7.0, 7.0, 5.0)  # (Y, X) of a 2D image: Z takes Y
    vs = VoxelSize.parse(np.array([20, 10, 10.5]))
    assert (vs.z, vs.y, vs.x, vs.inplane, vs.xyz) == (20.0, 10.0, 10.5, 10.5, (10.5, 10.0, 20.0))
    assert vs.scaled(2) == (40.0, 20.0, 21.0)
    assert (cubic.describe(), vs.describe()) == ("10 A", "20 x 10 x 10.5 A")
    assert json.loads(json.dumps(vs)) == [20.0, 10.0, 10.5]  # a list of three in JSON files
    for bad in (0, -1.0, "ten", [], [1.0, 2.0, 3.0, 4.0], [1.0, float("nan"), 1.0], np.inf):
        with pytest.raises(TomosegError, match="Invalid voxel size"):
            VoxelSize.parse(bad)
        assert VoxelSize.parse_or_none(bad) is None
    assert tio.voxel_triple == VoxelSize.parse  # the earlier name, the same function


def test_readers_and_writers_carry_the_voxel_size_type(tmp_path):
    from napari_tomoseg.data.voxels import VoxelSize

    path = tio.write_mrc(tmp_path / "a.mrc", np.zeros((2, 4, 6), np.float32), (14.0, 13.0, 12.0))
    tomo = tio.read_tomogram(path)
    assert isinstance(tomo.voxel_size, VoxelSize) and tomo.voxel_size == (14.0, 13.0, 12.0)
    assert tomo.metadata()["voxel_size"] == tomo.voxel_size
    assert tomo.metadata()["voxel_size_unit"] == "angstrom"
    with mrcfile.open(path) as mrc:  # (X, Y, Z) in the header
        assert tuple(float(v) for v in mrc.voxel_size.tolist()) == (12.0, 13.0, 14.0)
    assert tio.Tomogram(np.zeros((2, 2, 2)), voxel_size=9.0).voxel_size == (9.0, 9.0, 9.0)
