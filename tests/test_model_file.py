"""The network file: exact round trips, and refusal of foreign, damaged or unsafe files."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_tomoseg.data.voxels import VoxelSize
from napari_tomoseg.errors import TomosegError, TomosegIOError
from napari_tomoseg.learning.model_file import (
    FORMAT_MAGIC,
    FORMAT_VERSION,
    Network,
    NetworkMeta,
    load_network,
    read_network_meta,
    save_network,
)

MARKER_NAME = "code_ran.txt"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small tensors gain nothing from intra-op threads, and on a busy machine
    oversubscribed threads slow training several-fold; restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Exploit:
    """Unpickling this object writes a marker file: proof that code from a file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _network(arch: str = "unet-lite", in_channels: int = 3, n_classes: int = 3) -> Network:
    """A network with non-trivial weights and batch-norm statistics."""
    torch.manual_seed(7)
    net = Network.create(
        arch,
        in_channels,
        n_classes,
        class_names=("background", "membrane", "microtubule")[:n_classes]
        if n_classes <= 3
        else (),
        voxel_size=13.7,
        box_size=64,
        normalisation={"method": "zscore", "mean": 0.1, "std": 2.5},
        context_slices=(in_channels - 1) // 2,
        history=[{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.5, "val_loss": 0.6}],
        metrics={"mean_foreground_f1": 0.8},
    )
    with torch.no_grad():
        for _buf_name, buf in net.model.named_buffers():
            if buf.dtype.is_floating_point:
                buf.uniform_(0.5, 1.5)
        for p in net.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    net.model.eval()
    return net


@pytest.fixture
def saved(tmp_path) -> tuple[Network, Path]:
    net = _network()
    return net, save_network(net, tmp_path / "membrane.tsnet")


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _rewrite(arrays: dict[str, np.ndarray], path: Path) -> Path:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def _meta(arrays: dict[str, np.ndarray]) -> dict:
    return json.loads(str(arrays["__meta__"]))


def _with_meta(arrays: dict[str, np.ndarray], **changes) -> dict[str, np.ndarray]:
    meta = {**_meta(arrays), **changes}
    return {**arrays, "__meta__": np.array(json.dumps(meta))}


@pytest.mark.parametrize(
    ("arch", "in_channels", "n_classes"),
    [("unet-lite", 3, 3), ("tomoseg-cnn", 1, 2), ("unet", 1, 2)],
)
def test_round_trip_is_exact(tmp_path, arch, in_channels, n_classes):
    net = _network(arch, in_channels, n_classes)
    path = save_network(net, tmp_path / f"{arch}.tsnet")
    loaded = load_network(path)
    assert not loaded.model.training
    assert loaded.meta.to_dict() == net.meta.to_dict()
    x = torch.randn(2, in_channels, 40, 56)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), net.model(x))
    for name, tensor in net.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)


def test_metadata_is_deflated_weights_stored_and_the_bytes_repeat(tmp_path):
    net = _network()
    net.meta.history = [{"step": i + 1, "loss": 1.0 / (i + 1)} for i in range(2000)]
    first = save_network(net, tmp_path / "a.tsnet")
    with zipfile.ZipFile(first) as archive:
        members = {info.filename: info for info in archive.infolist()}
    meta = members.pop("__meta__.npy")
    assert meta.compress_type == zipfile.ZIP_DEFLATED
    assert meta.compress_size * 5 < meta.file_size  # 4-byte characters of JSON shrink
    assert members and all(m.compress_type == zipfile.ZIP_STORED for m in members.values())
    again = save_network(net, tmp_path / "b.tsnet")
    assert first.read_bytes() == again.read_bytes()


def test_a_file_numpy_savez_wrote_still_loads(saved, tmp_path):
    net, path = saved
    old = _rewrite(_arrays(path), tmp_path / "old.tsnet")  # every member stored
    loaded = load_network(old)
    assert loaded.meta.to_dict() == net.meta.to_dict()
    for name, tensor in net.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_loading_onto_a_missing_gpu_is_refused(saved):
    with pytest.raises(TomosegError, match="device 'cuda'"):
        load_network(saved[1], device="cuda")


def test_metadata_is_recorded(saved):
    net, path = saved
    meta = read_network_meta(path)
    assert meta.architecture == "unet-lite"
    assert meta.class_names == ("background", "membrane", "microtubule")
    assert meta.voxel_size == pytest.approx((13.7, 13.7, 13.7))
    assert meta.box_size == 64 and meta.context_slices == 1 and meta.in_channels == 3
    assert meta.normalisation == {"method": "zscore", "mean": 0.1, "std": 2.5}
    assert meta.history[-1]["val_loss"] == 0.6
    assert set(meta.versions) >= {"napari_tomoseg", "torch", "numpy"}
    assert meta.created.startswith("20")
    assert len(meta.class_colors) == 3 and meta.class_colors[0][3] == 0.0
    raw = _meta(_arrays(path))
    assert raw["format"] == FORMAT_MAGIC and raw["format_version"] == FORMAT_VERSION
    assert raw["model_params"]["base_channels"] == 16  # defaults are written out


def test_predict_proba_convenience(saved):
    _, path = saved
    net = load_network(path)
    image = np.random.default_rng(0).normal(size=(3, 33, 47)).astype(np.float32)
    proba = net.predict_proba(image)
    assert isinstance(proba, np.ndarray) and proba.dtype == np.float32
    assert proba.shape == (3, 33, 47)
    np.testing.assert_allclose(proba.sum(axis=0), 1.0, atol=1e-5)
    batch = net.predict_proba(torch.from_numpy(image[None]))
    assert isinstance(batch, torch.Tensor) and batch.shape == (1, 3, 33, 47)
    np.testing.assert_allclose(batch[0].numpy(), proba, atol=1e-6)
    with pytest.raises(TomosegError, match="expects input"):
        net.predict_proba(image[:2])


def test_never_overwrites_without_permission(saved):
    net, path = saved
    before = path.read_bytes()
    with pytest.raises(TomosegIOError, match="already exists"):
        save_network(net, path)
    assert path.read_bytes() == before
    with torch.no_grad():
        next(net.model.parameters()).add_(1.0)
    save_network(net, path, overwrite=True)
    assert path.read_bytes() != before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_pickled_object_in_a_tensor_entry_is_refused(saved, tmp_path):
    _, path = saved
    marker = tmp_path / MARKER_NAME
    arrays = _arrays(path)
    key = next(k for k in arrays if k.startswith("state:"))
    evil = np.empty(1, dtype=object)
    evil[0] = _Exploit(marker)
    arrays[key] = evil
    bad = _rewrite(arrays, tmp_path / "evil.tsnet")
    with zipfile.ZipFile(bad) as zf:  # the payload really is a pickle inside the archive
        assert b"write_text" in zf.read(key + ".npy")
    with pytest.raises(TomosegError, match="pickled"):
        load_network(bad)
    assert not marker.exists()
    # control: a loader that unpickles would have run the payload
    with np.load(bad, allow_pickle=True) as npz:
        npz[key]
    assert marker.read_text() == "pwned"


def test_pickled_metadata_is_refused(saved, tmp_path):
    _, path = saved
    marker = tmp_path / MARKER_NAME
    arrays = _arrays(path)
    evil = np.empty((), dtype=object)
    evil[()] = _Exploit(marker)
    arrays["__meta__"] = evil
    bad = _rewrite(arrays, tmp_path / "evil_meta.tsnet")
    with pytest.raises(TomosegError, match="pickled"):
        load_network(bad)
    with pytest.raises(TomosegError):
        read_network_meta(bad)
    assert not marker.exists()


def test_torch_and_plain_pickles_are_refused(tmp_path):
    marker = tmp_path / MARKER_NAME
    torch_file = tmp_path / "model.pt"
    torch.save({"model": _Exploit(marker)}, torch_file)  # a zip archive holding a pickle
    with pytest.raises(TomosegError, match="not a napari-tomoseg network file"):
        load_network(torch_file)
    pickle_file = tmp_path / "model.pkl"
    pickle_file.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(TomosegError, match="not a .tsnet zip archive"):
        load_network(pickle_file)
    assert not marker.exists()


def test_foreign_and_missing_files(tmp_path):
    text = tmp_path / "notes.tsnet"
    text.write_text("hello")
    with pytest.raises(TomosegError, match="not a .tsnet zip archive"):
        load_network(text)
    with pytest.raises(TomosegIOError, match="does not exist"):
        load_network(tmp_path / "absent.tsnet")
    plain = _rewrite({"weights": np.zeros(3)}, tmp_path / "plain.npz")
    with pytest.raises(TomosegError, match="metadata entry is missing"):
        load_network(plain)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "something-else"}, "format marker"),
        ({"format_version": 99}, "format version 99"),
        ({"architecture": "resnet"}, "does not know"),
        ({"class_names": ["background"]}, "class_names"),
        ({"voxel_size": -3.0}, "voxel_size"),
        ({"voxel_size": [10.0, 10.0]}, "a list of three"),
        ({"voxel_size": [10.0, 0.0, 10.0]}, "voxel_size"),
        ({"voxel_size": [10.0, "10", 10.0]}, "voxel_size"),
        ({"in_channels": "three"}, "in_channels"),
        ({"model_params": {"base_channels": 16, "evil": 1}}, "evil"),
        ({"history": {"step": 1}}, "history"),
        ({"colour_of_the_day": "red"}, "unknown field"),
    ],
)
def test_invalid_metadata_is_refused(saved, tmp_path, changes, message):
    _, path = saved
    bad = _rewrite(_with_meta(_arrays(path), **changes), tmp_path / "bad.tsnet")
    with pytest.raises(TomosegError, match=message):
        load_network(bad)


def test_weights_must_match_the_architecture(saved, tmp_path):
    _, path = saved
    arrays = _arrays(path)
    key = "state:head.weight"
    wrong_shape = {**arrays, key: np.zeros((2, 2), np.float32)}
    with pytest.raises(TomosegError, match="has shape"):
        load_network(_rewrite(wrong_shape, tmp_path / "a.tsnet"))
    missing = {k: v for k, v in arrays.items() if k != key}
    with pytest.raises(TomosegError, match="missing tensors"):
        load_network(_rewrite(missing, tmp_path / "b.tsnet"))
    extra = {**arrays, "state:backdoor.weight": np.zeros(3, np.float32)}
    with pytest.raises(TomosegError, match="unexpected tensors"):
        load_network(_rewrite(extra, tmp_path / "c.tsnet"))
    other_arch = _with_meta(arrays, architecture="tomoseg-cnn", model_params={})
    with pytest.raises(TomosegError, match="do not match"):
        load_network(_rewrite(other_arch, tmp_path / "d.tsnet"))
    text_tensor = {**arrays, key: np.full(arrays[key].shape, "x")}
    with pytest.raises(TomosegError, match="non-numeric"):
        load_network(_rewrite(text_tensor, tmp_path / "e.tsnet"))


def test_nan_weights_are_refused(saved, tmp_path):
    net, path = saved
    arrays = _arrays(path)
    key = "state:head.weight"
    poisoned = arrays[key].copy()
    poisoned.flat[0] = np.nan
    with pytest.raises(TomosegError, match="NaN"):
        load_network(_rewrite({**arrays, key: poisoned}, tmp_path / "nan.tsnet"))
    with torch.no_grad():
        net.model.head.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(TomosegError, match="not finite"):
        save_network(net, tmp_path / "nan_out.tsnet")
    assert not (tmp_path / "nan_out.tsnet").exists()


def test_meta_dict_round_trip_and_validation():
    meta = _network("tomoseg-cnn", 1, 2).meta
    again = NetworkMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert again == meta
    with pytest.raises(TomosegError, match="lacks the field 'n_classes'"):
        NetworkMeta.from_dict({k: v for k, v in meta.to_dict().items() if k != "n_classes"})
    with pytest.raises(TomosegError, match="box_size"):
        NetworkMeta.from_dict({**meta.to_dict(), "box_size": 0})


# -- the voxel size in the file ----------------------------------------------------------------
def _context_cnn(voxel_size) -> Network:
    torch.manual_seed(3)
    return Network.create(
        "tomoseg-cnn",
        3,
        2,
        model_params={"n_kernels": [4], "kernel_size": 3},
        voxel_size=voxel_size,
        context_slices=1,
        normalisation={"mode": "tomogram", "clamp_sigma": 5.0, "window": 16},
    )


def test_a_network_written_now_stores_z_y_x_and_reads_it_back(tmp_path):
    net = _context_cnn((16.0, 10.0, 10.0))
    assert isinstance(net.meta.voxel_size, VoxelSize)
    path = save_network(net, tmp_path / "anisotropic.tsnet")
    assert _meta(_arrays(path))["voxel_size"] == [16.0, 10.0, 10.0]
    back = load_network(path).meta
    assert isinstance(back.voxel_size, VoxelSize) and back.voxel_size == (16.0, 10.0, 10.0)
    assert back == net.meta
    cubic = save_network(_context_cnn(10.0), tmp_path / "cubic.tsnet")
    assert _meta(_arrays(cubic))["voxel_size"] == 10.0  # one number: every version reads it
    assert read_network_meta(cubic).voxel_size == (10.0, 10.0, 10.0)


def test_a_file_with_one_voxel_size_number_reads_as_cubic_voxels_and_applies_the_same(tmp_path):
    from napari_tomoseg.applying.inference import apply_network
    from napari_tomoseg.learning.pretrained import available

    # the shipped networks are such files: one number
    for shipped in available().values():
        assert _meta(_arrays(shipped))["voxel_size"] == 10.0
    new = save_network(_context_cnn(10.0), tmp_path / "new.tsnet")
    old = _rewrite(_with_meta(_arrays(new), voxel_size=10), tmp_path / "old.tsnet")
    old_net, new_net = load_network(old), load_network(new)
    assert old_net.meta.voxel_size == (10.0, 10.0, 10.0)
    assert isinstance(old_net.meta.voxel_size, VoxelSize)
    assert old_net.meta == new_net.meta
    # an 8 A tomogram: rescaled in-plane, context slices 1.25 slices apart, as before
    volume = np.random.default_rng(0).normal(size=(6, 40, 48)).astype(np.float32)
    a = apply_network(old_net, volume, voxel_size=8.0)
    b = apply_network(new_net, volume, voxel_size=8.0)
    assert np.array_equal(a.mask, b.mask)
    assert all(np.array_equal(p, q) for p, q in zip(a.probabilities, b.probabilities))
    assert a.notes == b.notes
    assert "rescaled in-plane from 8 x 8 A to the network's 10 A (40 x 48 -> 32 x 38 px)" in (
        " ".join(a.notes)
    )
    assert "context slices taken 1.25 slices apart (Z voxel 8 A, network 10 A)" in a.notes
