"""Fuzzing the readers of untrusted files: MRC tomograms, network files, training sets.

Each property takes a valid small file, damages it (random bytes, a cut at a random point,
header fields or metadata replaced by random or hostile values, extra members, pickles) and
loads it.  The only acceptable outcomes are a load whose data is sane or a clean
:class:`~napari_tomoseg.errors.TomosegError`; any other exception fails the test, and a
deadline per example catches hangs.  Runs are derandomized (the same examples every run, so
CI is reproducible); set ``TOMOSEG_FUZZ_SCALE=N`` to run N times as many random examples.

Inputs that once escaped :mod:`napari_tomoseg.learning.model_file` (zip members it could not
decode, model parameters that made it allocate without bound) have one test each, with the exact
input; the random properties leave those bytes and values alone so that they test
everything else.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_tomoseg.data import io as tio
from napari_tomoseg.errors import TomosegError
from napari_tomoseg.learning.model_file import Network, NetworkMeta, load_network, save_network
from napari_tomoseg.learning.trainset import TrainingSet

_SCALE = max(1, int(os.environ.get("TOMOSEG_FUZZ_SCALE", "1")))
#: Longest one example may take (ms); loading a damaged file must never take long.
DEADLINE_MS = 3000


def fuzz(examples: int):
    """Hypothesis settings for one property: bounded, with a deadline, reproducible."""
    return settings(
        max_examples=examples * _SCALE,
        deadline=DEADLINE_MS,
        derandomize=_SCALE == 1,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Files:
    """Fresh file names in one folder (a memory map of a previous example stays valid)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def write(self, raw: bytes, suffix: str) -> Path:
        self.count += 1
        path = self.folder / f"f{self.count}{suffix}"
        path.write_bytes(raw)
        return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> _Files:
    return _Files(tmp_path_factory.mktemp("fuzz"))


def _set_bytes(raw: bytes, changes: list[tuple[int, int]], keep=()) -> bytes:
    out = bytearray(raw)
    for pos, value in changes:
        if pos % len(out) not in keep:
            out[pos % len(out)] = value
    return bytes(out)


byte_changes = st.lists(
    st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=16
)


# -- MRC files ------------------------------------------------------------------------------------
def _mrc_bases() -> dict[str, bytes]:
    """Valid files of three kinds: float32 volume, uint8 labels (IMOD-marked), int16 image."""
    import tempfile

    rng = np.random.default_rng(0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tio.write_mrc(folder / "v.mrc", rng.normal(size=(4, 5, 6)).astype(np.float32), 7.0)
        tio.write_labels(folder / "l.mrc", rng.integers(0, 3, (3, 4, 5)).astype(np.uint8), 9.0)
        tio.write_mrc(folder / "i.mrc", rng.integers(-99, 99, (5, 7)).astype(np.int16), 2.5)
        for name in ("v", "l", "i"):
            out[name] = (folder / f"{name}.mrc").read_bytes()
    return out


MRC_BASES = _mrc_bases()
ALLOWED_DTYPES = {np.dtype(t) for t in ("int8", "uint8", "int16", "uint16", "float16", "float32")}
#: (offset, format) of header words worth lying in: sizes, mode, sampling, cell, nsymbt, stamps.
HEADER_WORDS = {
    "nx": (0, "<i"),
    "ny": (4, "<i"),
    "nz": (8, "<i"),
    "mode": (12, "<i"),
    "mx": (28, "<i"),
    "my": (32, "<i"),
    "mz": (36, "<i"),
    "cella_x": (40, "<f"),
    "cella_z": (48, "<f"),
    "nsymbt": (92, "<i"),
    "imod_stamp": (152, "<i"),
    "imod_flags": (156, "<i"),
    "origin_x": (196, "<f"),
    "machst": (212, "<i"),
}
int_values = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([0, -1, 1, 2, 3, 4, 6, 12, 101, 2**16, 2**21, 2**31 - 1, -(2**31)]),
)
float_values = st.one_of(st.floats(width=32), st.sampled_from([0.0, 1.0, -1.0]))


def check_mrc(path: Path) -> str:
    """Read ``path`` both ways; every outcome must be sane data or a TomosegError."""
    outcome = "refused"
    for mmap in (True, False):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tomo = tio.read_tomogram(path, mmap=mmap)
        except TomosegError as exc:
            assert str(path) in str(exc)  # the message names the file
            continue
        data = np.asarray(tomo.data)
        assert data.ndim in (2, 3) and data.shape == tomo.extra["shape"]
        assert min(data.shape) >= 1 and data.dtype in ALLOWED_DTYPES
        assert tomo.mode in tio.SUPPORTED_MODES
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            np.sum(data, dtype=np.float64)  # every promised byte is there and readable
        if tomo.voxel_size is not None:
            assert len(tomo.voxel_size) == 3
            assert all(np.isfinite(v) and v > 0 for v in tomo.voxel_size)
        del data, tomo
        outcome = "read"
    return outcome


@fuzz(200)
@given(base=st.sampled_from(sorted(MRC_BASES)), changes=byte_changes)
def test_mrc_with_random_bytes(files, base, changes):
    raw = MRC_BASES[base]
    header_heavy = [(pos % 1024, value) for pos, value in changes[: len(changes) // 2]]
    damaged = _set_bytes(raw, header_heavy + changes[len(changes) // 2 :])
    check_mrc(files.write(damaged, ".mrc"))


@fuzz(100)
@given(base=st.sampled_from(sorted(MRC_BASES)), cut=st.integers(0, 2**20))
def test_mrc_cut_at_a_random_point(files, base, cut):
    raw = MRC_BASES[base]
    assert check_mrc(files.write(raw[: cut % len(raw)], ".mrc")) == "refused"


@fuzz(250)
@given(
    base=st.sampled_from(sorted(MRC_BASES)),
    fields=st.lists(
        st.one_of(
            st.tuples(st.sampled_from(sorted(HEADER_WORDS)), int_values),
            st.tuples(st.sampled_from(["cella_x", "cella_z", "origin_x"]), float_values),
        ),
        min_size=1,
        max_size=5,
    ),
    map_id=st.one_of(st.none(), st.binary(min_size=4, max_size=4)),
)
def test_mrc_header_that_lies(files, base, fields, map_id):
    raw = bytearray(MRC_BASES[base])
    for name, value in fields:
        offset, fmt = HEADER_WORDS[name]
        if fmt == "<f":
            raw[offset : offset + 4] = struct.pack(fmt, float(value))
        else:
            raw[offset : offset + 4] = struct.pack(fmt, int(value))
    if map_id is not None:
        raw[208:212] = map_id
    check_mrc(files.write(bytes(raw), ".mrc"))


@fuzz(100)
@given(
    base=st.sampled_from(sorted(MRC_BASES)),
    changes=byte_changes,
    cut=st.one_of(st.none(), st.integers(1, 2**16)),
    inside=st.booleans(),
)
def test_gzip_mrc_damaged(files, base, changes, cut, inside):
    """Damage inside the compressed stream, or a damaged file compressed cleanly."""
    raw = MRC_BASES[base]
    if inside:
        packed = _set_bytes(gzip.compress(raw), changes)
    else:
        packed = gzip.compress(_set_bytes(raw, [(p % 1024, v) for p, v in changes]))
    if cut is not None:
        packed = packed[: cut % len(packed)]
    check_mrc(files.write(packed, ".mrc.gz"))


# -- network files --------------------------------------------------------------------------------
def _network_bases() -> dict[str, bytes]:
    """Two tiny valid network files: tomoseg-cnn, and a one-level U-Net with batch norm."""
    import tempfile

    torch.manual_seed(0)
    nets = {
        "cnn": Network.create(
            "tomoseg-cnn",
            1,
            2,
            model_params={"n_kernels": [4], "kernel_size": 3},
            voxel_size=10.0,
            normalisation={"mode": "tomogram", "clamp_sigma": 5.0, "window": 16},
        ),
        "unet": Network.create(
            "unet-lite",
            3,
            3,
            model_params={"base_channels": 2, "depth": 1},
            voxel_size=12.5,
            context_slices=1,
            class_names=("background", "membrane", "ribosome"),
        ),
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, net in nets.items():
            out[name] = save_network(net, Path(tmp) / f"{name}.tsnet").read_bytes()
    return out


NET_BASES = _network_bases()


def _arrays(raw: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _zip_decode_fields(raw: bytes) -> set[int]:
    """Byte offsets of each member's flags and compression method (local and central).

    An unknown method or flag has its own tests below (it once escaped the loader), so the
    random properties leave these bytes alone.
    """
    keep: set[int] = set()
    for signature, first in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = raw.find(signature)
        while start >= 0:
            keep.update(range(start + first, start + first + 4))
            start = raw.find(signature, start + 1)
    return keep


def check_network(path: Path) -> str:
    """Load ``path``; a success must be a usable network, anything else a TomosegError."""
    try:
        net = load_network(path)
    except TomosegError as exc:
        assert "network" in str(exc).lower() or str(path) in str(exc)
        return "refused"
    meta = net.meta
    assert isinstance(meta, NetworkMeta) and meta.n_classes >= 2
    assert len(meta.class_names) == meta.n_classes
    for p in net.model.state_dict().values():
        assert not p.is_floating_point() or bool(torch.isfinite(p).all())
    proba = net.predict_proba(np.zeros((meta.in_channels, 8, 8), np.float32))
    assert proba.shape == (meta.n_classes, 8, 8) and np.allclose(proba.sum(axis=0), 1, atol=1e-4)
    return "loaded"


@fuzz(200)
@given(base=st.sampled_from(sorted(NET_BASES)), changes=byte_changes)
def test_network_with_random_bytes(files, base, changes):
    raw = NET_BASES[base]
    check_network(files.write(_set_bytes(raw, changes, _zip_decode_fields(raw)), ".tsnet"))


@fuzz(100)
@given(base=st.sampled_from(sorted(NET_BASES)), cut=st.integers(0, 2**20))
def test_network_cut_at_a_random_point(files, base, cut):
    raw = NET_BASES[base]
    assert check_network(files.write(raw[: cut % len(raw)], ".tsnet")) == "refused"


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
#: Text that int() cannot read ("999999" would be a positive magnitude, see below).
words = st.text(alphabet="abcxyz _-.", max_size=6)
#: Model parameters of every type but positive magnitudes (those have their own tests below).
model_param_junk = st.dictionaries(
    st.sampled_from(
        ["n_kernels", "kernel_size", "base_channels", "depth", "dropout", "upsample", "extra"]
    ),
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**40), 0),
        words,
        st.lists(st.one_of(words, st.integers(-5, 0), st.none()), max_size=3),
        st.dictionaries(words, st.integers(), max_size=2),
    ),
    max_size=3,
)
META_FIELDS = [
    "format",
    "format_version",
    "architecture",
    "in_channels",
    "n_classes",
    "class_names",
    "class_colors",
    "voxel_size",
    "box_size",
    "normalisation",
    "context_slices",
    "trainset_summary",
    "history",
    "metrics",
    "versions",
    "created",
    "unknown_field",
]


def _with_meta(raw: bytes, meta_text: str) -> bytes:
    return _npz({**_arrays(raw), "__meta__": np.array(meta_text)})


@fuzz(150)
@given(base=st.sampled_from(sorted(NET_BASES)), meta=json_values)
def test_network_metadata_replaced_by_random_json(files, base, meta):
    text = json.dumps(meta)
    assert check_network(files.write(_with_meta(NET_BASES[base], text), ".tsnet")) == "refused"


@fuzz(300)
@given(
    base=st.sampled_from(sorted(NET_BASES)),
    changes=st.lists(
        st.one_of(
            st.tuples(st.sampled_from(META_FIELDS), json_values),
            st.tuples(st.just("model_params"), model_param_junk),
            st.tuples(
                st.just("architecture"),
                st.sampled_from(["unet", "unet-lite", "tomoseg-cnn", "resnet", "", "UNET"]),
            ),
        ),
        min_size=1,
        max_size=4,
    ),
    drop=st.lists(st.sampled_from(META_FIELDS + ["model_params"]), max_size=2),
)
def test_network_metadata_fields_hostile(files, base, changes, drop):
    meta = json.loads(str(_arrays(NET_BASES[base])["__meta__"]))
    for key, value in changes:
        meta[key] = value
    for key in drop:
        meta.pop(key, None)
    check_network(files.write(_with_meta(NET_BASES[base], json.dumps(meta)), ".tsnet"))


tensor_dtypes = st.sampled_from(
    ["float32", "float64", "float16", "int8", "int64", "bool", "complex64", "<U3", "V4"]
)


@fuzz(150)
@given(
    base=st.sampled_from(sorted(NET_BASES)),
    which=st.integers(0, 100),
    shape=st.lists(st.integers(0, 6), max_size=4),
    dtype=tensor_dtypes,
    fill=st.sampled_from([0.0, 1.0, np.nan, np.inf]),
    same_shape=st.booleans(),
)
def test_network_tensor_of_wrong_shape_or_type(files, base, which, shape, dtype, fill, same_shape):
    arrays = _arrays(NET_BASES[base])
    keys = sorted(k for k in arrays if k.startswith("state:"))
    key = keys[which % len(keys)]
    target_shape = arrays[key].shape if same_shape else tuple(shape)
    if dtype in ("<U3", "V4"):
        value = np.zeros(target_shape, dtype=dtype)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = np.full(target_shape, fill).astype(dtype)
    arrays[key] = value
    outcome = check_network(files.write(_npz(arrays), ".tsnet"))
    if not same_shape and tuple(shape) != arrays[key].shape:
        assert outcome == "refused"


#: Names of extra members; a plain member named like an entry (``__meta__``, ``state:...``)
#: is a known defect (numpy hands back its raw bytes, see KNOWN_DEFECTS).
member_names = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters="/\\"),
    min_size=1,
    max_size=16,
).filter(lambda name: name != "__meta__" and not name.startswith("state:"))


@fuzz(100)
@given(
    base=st.sampled_from(sorted(NET_BASES)),
    extra=st.lists(st.tuples(member_names, st.binary(max_size=64), st.booleans()), max_size=3),
)
def test_network_with_extra_members(files, base, extra):
    """Additional entries (numpy arrays or any bytes) are refused, whatever their names."""
    buf = io.BytesIO(NET_BASES[base])
    with zipfile.ZipFile(buf, "a") as zf:
        existing = set(zf.namelist())
        for name, payload, as_array in extra:
            member = f"{name}.npy" if as_array else name
            if member in existing:
                continue
            existing.add(member)
            if as_array:
                array_buf = io.BytesIO()
                np.save(array_buf, np.frombuffer(payload, dtype=np.uint8))
                payload = array_buf.getvalue()
            zf.writestr(member, payload)
    outcome = check_network(files.write(buf.getvalue(), ".tsnet"))
    if extra:
        assert outcome == "refused"


# -- files that run code when unpickled --------------------------------------------------------
MARKER = "code_ran.txt"


class _Exploit:
    """Unpickling this object writes a marker file: proof that code from a file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from the file ran"))


def _evil(marker: Path, shape=()) -> np.ndarray:
    evil = np.empty(shape or (), dtype=object)
    evil[() if not shape else 0] = _Exploit(marker)
    return evil


def _exploit_works(path: Path, key: str, marker: Path) -> bool:
    """Control: a loader that unpickles would have run the payload."""
    with np.load(path, allow_pickle=True) as npz:
        npz[key]
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran


@pytest.mark.parametrize("where", ["state tensor", "metadata", "extra member"])
def test_pickle_inside_a_network_file_never_runs(tmp_path, where):
    marker = tmp_path / MARKER
    arrays = _arrays(NET_BASES["unet"])
    if where == "state tensor":
        key = sorted(k for k in arrays if k.startswith("state:"))[0]
        arrays[key] = _evil(marker, (1,))
    elif where == "metadata":
        key = "__meta__"
        arrays[key] = _evil(marker)
    else:
        key = "payload"
        arrays[key] = _evil(marker, (1,))
    path = tmp_path / "evil.tsnet"
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    with zipfile.ZipFile(path) as zf:
        assert b"write_text" in zf.read(f"{key}.npy")
    with pytest.raises(TomosegError, match="pickled|unexpected entries"):
        load_network(path)
    assert not marker.exists()
    assert _exploit_works(path, key, marker)


@pytest.mark.parametrize("form", ["object array in the archive", "plain pickle", "npy file"])
def test_pickle_as_a_training_set_never_runs(tmp_path, form):
    marker = tmp_path / MARKER
    path = tmp_path / "evil.npz"
    ts = _trainset()
    if form == "object array in the archive":
        np.savez(
            path,
            format=np.array("napari-tomoseg-trainset"),
            version=np.array(1),
            images=_evil(marker, (1,)),
            labels=ts.labels,
            box_ids=ts.box_ids,
            positive=ts.positive,
            class_names=np.array(ts.class_names),
            metadata=np.array(json.dumps(ts.metadata)),
        )
    elif form == "plain pickle":
        path.write_bytes(pickle.dumps({"images": _Exploit(marker)}))
    else:
        path = tmp_path / "evil.npy"
        np.save(path, _evil(marker, (2,)), allow_pickle=True)
    with pytest.raises(TomosegError, match="pickled Python objects|single numpy array"):
        TrainingSet.load(path)
    assert not marker.exists()
    if form == "object array in the archive":
        assert _exploit_works(path, "images", marker)
    else:
        assert not marker.exists()
        with open(path, "rb") as handle:
            if form == "npy file":
                np.load(handle, allow_pickle=True)
            else:
                pickle.load(handle)  # the control: what TrainingSet.load must never do
        assert marker.exists()


# -- training-set files ---------------------------------------------------------------------------
def _trainset() -> TrainingSet:
    rng = np.random.default_rng(0)
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[:2, 2:6, 2:6] = 1
    return TrainingSet(
        images=rng.normal(size=(4, 1, 8, 8)).astype(np.float32),
        labels=labels,
        box_ids=np.array([0, 0, 1, 1], np.int32),
        positive=np.array([True, True, False, False]),
        class_names=("background", "membrane"),
        metadata={"normalisation": {"mode": "tomogram", "clamp_sigma": 5.0, "window": 8}},
    )


def _trainset_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return _trainset().save(Path(tmp) / "set.npz").read_bytes()


TRAINSET_BYTES = _trainset_bytes()


def check_trainset(path: Path) -> str:
    try:
        ts = TrainingSet.load(path)
    except TomosegError as exc:
        assert str(path) in str(exc)
        return "refused"
    assert ts.images.ndim == 4 and ts.images.dtype == np.float32
    assert ts.labels.shape == (len(ts), *ts.images.shape[2:])
    assert ts.n_classes >= 2
    return "loaded"


@fuzz(150)
@given(changes=byte_changes, cut=st.one_of(st.none(), st.integers(0, 2**20)))
def test_training_set_with_random_bytes(files, changes, cut):
    """TrainingSet.load also survives damaged zip flags and compression methods."""
    raw = _set_bytes(TRAINSET_BYTES, changes)
    if cut is not None:
        raw = raw[: cut % len(raw)]
    check_trainset(files.write(raw, ".npz"))


@fuzz(100)
@given(
    entry=st.sampled_from(["images", "labels", "box_ids", "positive", "class_names", "version"]),
    shape=st.lists(st.integers(0, 5), max_size=4),
    dtype=tensor_dtypes,
    meta=st.one_of(st.none(), json_values),
)
def test_training_set_entries_hostile(files, entry, shape, dtype, meta):
    arrays = _arrays(TRAINSET_BYTES)
    arrays[entry] = np.zeros(tuple(shape), dtype=dtype)
    if meta is not None:
        arrays["metadata"] = np.array(json.dumps(meta))
    check_trainset(files.write(_npz(arrays), ".npz"))


# -- hostile files that once escaped the network loader (model_file.py) ---------------
def _meta_with(**changes) -> bytes:
    meta = json.loads(str(_arrays(NET_BASES["cnn"])["__meta__"]))
    meta.update(changes)
    return _with_meta(NET_BASES["cnn"], json.dumps(meta))


def _central_entry(raw: bytes, member: str) -> int:
    """Offset of ``member``'s central-directory record."""
    start = raw.find(b"PK\x01\x02")
    while start >= 0:
        name_len = struct.unpack("<H", raw[start + 28 : start + 30])[0]
        if raw[start + 46 : start + 46 + name_len].decode() == member:
            return start
        start = raw.find(b"PK\x01\x02", start + 1)
    raise AssertionError(member)


def _zip_field(raw: bytes, member: str, offset: int, value: int) -> bytes:
    out = bytearray(raw)
    at = _central_entry(raw, member) + offset
    out[at : at + 2] = struct.pack("<H", value)
    return bytes(out)


def _append_member(raw: bytes, name: str, payload: bytes) -> bytes:
    buf = io.BytesIO(raw)
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr(name, payload)
    return buf.getvalue()


def _huge_tensor_header() -> bytes:
    """The cnn file with one tensor whose .npy header claims 10**15 float32 values (4 PB)."""
    src = zipfile.ZipFile(io.BytesIO(NET_BASES["cnn"]))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "state:convs.0.weight.npy":
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    header, {"descr": "<f4", "fortran_order": False, "shape": (10**15,)}
                )
                data = header.getvalue() + bytes(64)
            zf.writestr(info.filename, data)
    return out.getvalue()


KNOWN_DEFECTS = {
    # zipfile raises NotImplementedError for an unknown compression method; not caught
    "compression method 99": lambda: _zip_field(NET_BASES["cnn"], "__meta__.npy", 10, 99),
    # flag bit 0 (encrypted): zipfile raises RuntimeError; bit 6: NotImplementedError
    "encrypted flag": lambda: _zip_field(NET_BASES["cnn"], "__meta__.npy", 8, 1),
    "strong-encryption flag": lambda: _zip_field(NET_BASES["cnn"], "__meta__.npy", 8, 1 << 6),
    # the model is built from the metadata before any size is checked: 1 PB requested (more
    # than any address space), torch's allocator raises RuntimeError; smaller sizes are
    # allocated and initialised, so a file can make the loader take any amount of memory
    "kernel_size 2**23+1": lambda: _meta_with(
        model_params={"n_kernels": [4], "kernel_size": 2**23 + 1}
    ),
    # JSON Infinity is accepted and int(inf) raises OverflowError inside build_model
    "kernel_size Infinity": lambda: _meta_with(
        model_params={"n_kernels": [4], "kernel_size": float("inf")}
    ),
    # numpy allocates what an entry's .npy header declares before reading: MemoryError
    "tensor header of 4 PB": _huge_tensor_header,
    # a plain (non-.npy) member named __meta__: numpy returns its raw bytes, and
    # _read_meta's raw.dtype raises AttributeError
    "raw member named __meta__": lambda: _append_member(NET_BASES["cnn"], "__meta__", b"{}"),
}


@pytest.mark.parametrize("name", list(KNOWN_DEFECTS))
def test_known_loader_defects_are_refused_cleanly(tmp_path, name):
    path = tmp_path / "hostile.tsnet"
    path.write_bytes(KNOWN_DEFECTS[name]())
    with pytest.raises(TomosegError):
        load_network(path)
