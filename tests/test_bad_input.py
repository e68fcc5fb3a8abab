"""Bad input, faults and interrupted writes: a clear error, no crash, no hang, nothing lost.

Every case of ``CASES`` is one test id.  A case prepares its files in a temporary folder and
returns the call that must fail; the test then checks that the call raises a
:class:`~napari_tomoseg.errors.TomosegError` whose message names the problem, within
``HANG_S`` seconds, and that the folder is byte for byte as it was (no partial file left, no
existing file touched).  ``docs/robustness.md`` lists the cases with their messages and
states their number, which :func:`test_documented_case_count` keeps honest.

The second half tests faults: device out-of-memory during apply (retried with smaller
batches, then smaller tiles), a full disk or a failing rename during a write, and a process
killed in the middle of writing a file.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from napari_tomoseg._reader import get_reader
from napari_tomoseg.applying import inference as inf
from napari_tomoseg.applying.inference import (
    ApplyOutputs,
    ApplySettings,
    DeviceMemoryError,
    apply_file,
    apply_network,
    iter_apply_file,
)
from napari_tomoseg.applying.inference import apply as inf_apply
from napari_tomoseg.applying.inference import predict as inf_predict
from napari_tomoseg.applying.merge import MergeInput, merge_probability_maps
from napari_tomoseg.applying.picking import Particle, pick, write_csv, write_star
from napari_tomoseg.data import io as tio
from napari_tomoseg.data.annotations import Annotations, load_annotations, save_annotations
from napari_tomoseg.data.boxes import Box, box_from_shape, read_boxes_csv, write_boxes_csv
from napari_tomoseg.data.preprocess import PreprocessSettings, lowpass, preprocess, robust_stats
from napari_tomoseg.errors import MissingVoxelSizeWarning, TomosegError, TomosegIOError
from napari_tomoseg.learning.model_file import Network, load_network, save_network
from napari_tomoseg.learning.training import TrainSettings, iter_train
from napari_tomoseg.learning.trainset import TrainingSet, TrainsetSettings, build_training_set
from napari_tomoseg.progress import drive

#: Longest a refused call may take before it counts as a hang.
HANG_S = 30
ROOT = Path(__file__).resolve().parents[1]
SHAPE = (6, 48, 48)
BOX = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


@pytest.fixture(autouse=True)
def _no_hang():
    """Fail a test that takes longer than ``HANG_S`` seconds instead of waiting forever."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def hung(_signum, _frame):
        raise TimeoutError(f"the call did not return within {HANG_S} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- small inputs -------------------------------------------------------------------------------
def volume(shape=SHAPE, seed=0) -> np.ndarray:
    """Noise with a bright square in the middle of every slice."""
    rng = np.random.default_rng(seed)
    v = rng.normal(0.0, 1.0, size=shape).astype(np.float32)
    if len(shape) == 3 and shape[1] >= 32 and shape[2] >= 32:
        v[:, 16:32, 16:32] += 3.0
    return v


def painting(shape=SHAPE) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[:, 20:28, 20:28] = 1
    return labels


def positives() -> list[Box]:
    return [Box(2, 24, 24, BOX), Box(3, 24, 24, BOX)]


def negatives() -> list[Box]:
    return [Box(1, 10, 40, BOX), Box(4, 40, 10, BOX)]


def trainset_settings(**changes) -> TrainsetSettings:
    return TrainsetSettings(**{"box_size": BOX, "ncopy": 2, **changes})


def tiny_network(
    n_classes: int = 2,
    voxel_size: float | None = 10.0,
    class_names: tuple[str, ...] = (),
    seed: int = 0,
) -> Network:
    """A tomoseg-cnn with one 4-kernel 3x3 layer: fast, with a real receptive field."""
    torch.manual_seed(seed)
    return Network.create(
        "tomoseg-cnn",
        1,
        n_classes,
        model_params={"n_kernels": [4], "kernel_size": 3},
        class_names=class_names,
        voxel_size=voxel_size,
        normalisation={"mode": "tomogram", "clamp_sigma": 5.0, "window": BOX},
    )


def write_tomogram(path: Path, data: np.ndarray | None = None, voxel_size=10.0) -> Path:
    tio.write_mrc(path, volume() if data is None else data, voxel_size, overwrite=True)
    return path


def header_field(path: Path, offset: int, value: int) -> Path:
    """Overwrite one little-endian int32 word of an MRC header."""
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 4] = struct.pack("<i", value)
    path.write_bytes(bytes(raw))
    return path


def small_trainset(class_names=("background", "membrane"), voxel_size=10.0) -> TrainingSet:
    rng = np.random.default_rng(0)
    n = 8
    labels = np.zeros((n, BOX, BOX), np.uint8)
    labels[:4, 4:12, 4:12] = 1
    return TrainingSet(
        images=rng.normal(size=(n, 1, BOX, BOX)).astype(np.float32),
        labels=labels,
        box_ids=np.repeat(np.arange(4, dtype=np.int32), 2),
        positive=np.array([True] * 4 + [False] * 4),
        class_names=class_names,
        metadata={
            "voxel_size": [voxel_size] * 3,
            "normalisation": {"mode": "tomogram", "clamp_sigma": 5.0, "window": BOX},
            "box_size": BOX,
        },
    )


def annotations() -> Annotations:
    return Annotations(
        painting=painting(),
        positives=positives(),
        negatives=negatives(),
        class_names={0: "background", 1: "membrane"},
        box_size=BOX,
        voxel_size=(10.0, 10.0, 10.0),
    )


PARTICLES = [Particle(label=1, class_name="membrane", z=1.0, y=2.0, x=3.0, size=5, component=1)]


# -- the cases ----------------------------------------------------------------------------------
Setup = Callable[[Path], Callable[[], object]]
CASES: dict[str, tuple[Setup, type[Exception], str]] = {}


def case(name: str, match: str, error: type[Exception] = TomosegError):
    """Register a bad-input case: ``setup(folder)`` returns the call that must be refused."""

    def register(setup: Setup) -> Setup:
        assert name not in CASES, name
        CASES[name] = (setup, error, match)
        return setup

    return register


# MRC files ------------------------------------------------------------------------------------
@case("mrc: a text file named .mrc", "not an MRC file", TomosegIOError)
def _(d):
    (d / "notes.mrc").write_text("tomogram notes\n" * 200)
    return lambda: tio.read_tomogram(d / "notes.mrc")


@case("mrc: a PNG image named .mrc", "not an MRC file", TomosegIOError)
def _(d):
    (d / "image.mrc").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    return lambda: tio.read_tomogram(d / "image.mrc")


@case("mrc: empty file", "the file is empty", TomosegIOError)
def _(d):
    (d / "empty.mrc").write_bytes(b"")
    return lambda: tio.read_tomogram(d / "empty.mrc")


@case("mrc: shorter than a header", "shorter than an MRC header", TomosegIOError)
def _(d):
    (d / "short.mrc").write_bytes(write_tomogram(d / "t.mrc").read_bytes()[:500])
    (d / "t.mrc").unlink()
    return lambda: tio.read_tomogram(d / "short.mrc")


@case("mrc: data truncated", "truncated", TomosegIOError)
def _(d):
    path = write_tomogram(d / "t.mrc")
    path.write_bytes(path.read_bytes()[:-100])
    return lambda: tio.read_tomogram(path)


@case("mrc: header claims more slices than stored", "truncated", TomosegIOError)
def _(d):
    path = header_field(write_tomogram(d / "t.mrc"), 8, SHAPE[0] + 5)
    return lambda: tio.read_tomogram(path)


@case("mrc: header sizes overflow 64 bits", "truncated", TomosegIOError)
def _(d):
    path = write_tomogram(d / "t.mrc")
    for offset, value in ((0, 2**21), (4, 2**21), (8, 2**22)):
        header_field(path, offset, value)
    return lambda: tio.read_tomogram(path)


@case("mrc: header sizes overflow, read into memory", "truncated", TomosegIOError)
def _(d):
    path = write_tomogram(d / "t.mrc")
    for offset, value in ((0, 2**31 - 1), (4, 2**31 - 1), (8, 4)):
        header_field(path, offset, value)
    return lambda: tio.read_tomogram(path, mmap=False)


@case("mrc: negative size in header", "impossible size", TomosegIOError)
def _(d):
    path = header_field(write_tomogram(d / "t.mrc"), 4, -48)
    return lambda: tio.read_tomogram(path)


@case("mrc: negative extended-header length", "not a valid MRC header", TomosegIOError)
def _(d):
    path = header_field(write_tomogram(d / "t.mrc"), 92, -5)
    return lambda: tio.read_tomogram(path)


@case("mrc: extended header longer than the file", "runs past the end", TomosegIOError)
def _(d):
    path = header_field(write_tomogram(d / "t.mrc"), 92, 10_000_000)
    return lambda: tio.read_tomogram(path)


@case("mrc: complex mode 4", "mode 4 is not supported", TomosegIOError)
def _(d):
    path = header_field(write_tomogram(d / "t.mrc"), 12, 4)
    return lambda: tio.read_tomogram(path)


@case("mrc: unknown mode 77", "mode 77", TomosegIOError)
def _(d):
    path = header_field(write_tomogram(d / "t.mrc"), 12, 77)
    return lambda: tio.read_tomogram(path)


@case("mrc: missing file", "does not exist", TomosegIOError)
def _(d):
    return lambda: tio.read_tomogram(d / "nowhere.mrc")


@case("mrc: a folder", "a folder", TomosegIOError)
def _(d):
    (d / "stack.mrc").mkdir()
    return lambda: tio.read_tomogram(d / "stack.mrc")


@case("mrc.gz: damaged compressed stream", "gzip-compressed data is damaged", TomosegIOError)
def _(d):
    packed = bytearray(gzip.compress(write_tomogram(d / "t.mrc").read_bytes()))
    (d / "t.mrc").unlink()
    packed[60:160] = bytes(100)
    (d / "t.mrc.gz").write_bytes(bytes(packed))
    return lambda: tio.read_tomogram(d / "t.mrc.gz")


@case("mrc.gz: compressed stream cut short", "damaged or cut short", TomosegIOError)
def _(d):
    packed = gzip.compress(write_tomogram(d / "t.mrc").read_bytes())
    (d / "t.mrc").unlink()
    (d / "t.mrc.gz").write_bytes(packed[: len(packed) // 2])
    return lambda: tio.read_tomogram(d / "t.mrc.gz")


# NaN and Inf voxels ---------------------------------------------------------------------------
def _with(value: float, where=(2, 24, 24)) -> np.ndarray:
    v = volume()
    v[where] = value
    return v


@case("trainset: NaN inside a positive box", "NaN or Inf values")
def _(d):
    v = _with(np.nan)
    return lambda: build_training_set(v, painting(), positives(), negatives(), trainset_settings())


@case("trainset: +Inf beside a negative box", "Negative box 1 .* NaN or Inf")
def _(d):
    v = _with(np.inf, (1, 10, 29))  # outside the box, inside the region rotation reads
    s = trainset_settings(context_slices=0)  # single slices: the positive box at z=2 is clear
    return lambda: build_training_set(v, painting(), positives(), negatives(), s)


@case("trainset: NaN with box normalisation", "NaN or Inf values")
def _(d):
    v = _with(np.nan)
    s = trainset_settings(normalisation="box")
    return lambda: build_training_set(v, painting(), positives(), negatives(), s)


@case("trainset: all voxels NaN", "no finite values")
def _(d):
    v = np.full(SHAPE, np.nan, np.float32)
    return lambda: build_training_set(v, painting(), positives(), negatives(), trainset_settings())


@case("train: training images with NaN", "NaN or infinite")
def _(d):
    ts = small_trainset()
    ts.images[0, 0, 0, 0] = np.nan
    return lambda: drive(iter_train(ts, TrainSettings(architecture="tomoseg-cnn", device="cpu")))


@case("preprocess: low-pass of a volume with NaN", r"NaN or infinite voxels \(first in slice z=2")
def _(d):
    v = _with(np.nan)
    return lambda: lowpass(v, 60.0, 10.0)


@case("preprocess: import step with Inf, no normalising", "NaN or infinite voxels")
def _(d):
    v = _with(-np.inf)
    s = PreprocessSettings(lowpass_angstrom=60.0, normalise=False)
    return lambda: preprocess(v, 10.0, s)


@case("normalise: all voxels Inf", "no finite values")
def _(d):
    return lambda: robust_stats(np.full(SHAPE, np.inf, np.float32))


@case("apply: NaN voxels with nonfinite='refuse'", "Slice z=2 .* 1 NaN or infinite voxels")
def _(d):
    v = _with(np.nan)
    s = ApplySettings(device="cpu", nonfinite="refuse")
    return lambda: apply_network(tiny_network(), v, voxel_size=10.0, settings=s)


@case("apply: all voxels NaN", "no finite values")
def _(d):
    v = np.full(SHAPE, np.nan, np.float32)
    return lambda: apply_network(tiny_network(), v, voxel_size=10.0)


@case("apply: unknown nonfinite policy", "nonfinite must be one of")
def _(d):
    return lambda: apply_network(
        tiny_network(), volume(), settings=ApplySettings(nonfinite="skip")
    )


# shapes -----------------------------------------------------------------------------------------
@case("trainset: a 2D image as tomogram", "must be 3D")
def _(d):
    img = volume()[0]
    return lambda: build_training_set(img, img.astype(np.uint8), positives(), negatives())


@case("apply: a 2D image as tomogram", "3D")
def _(d):
    return lambda: apply_network(tiny_network(), volume()[0], voxel_size=10.0)


@case("apply: a 4D array as tomogram", "3D")
def _(d):
    return lambda: apply_network(tiny_network(), volume()[None], voxel_size=10.0)


@case("apply file: a 2D MRC image", "holds a 2D image")
def _(d):
    path = write_tomogram(d / "image.mrc", volume()[0])
    return lambda: apply_file(tiny_network(), path, d / "mask.mrc")


@case("apply: tomogram of text", "dtype")
def _(d):
    return lambda: apply_network(tiny_network(), np.full(SHAPE, "a"), voxel_size=10.0)


@case("pick: a 2D mask", "3D")
def _(d):
    return lambda: pick(painting()[0])


@case("pick: a float mask", "integer labels")
def _(d):
    return lambda: pick(painting().astype(np.float32))


@case("trainset: tomogram of complex numbers", "real numbers")
def _(d):
    v = volume().astype(np.complex64)
    return lambda: build_training_set(v, painting(), positives(), negatives(), trainset_settings())


@case("trainset: tomogram smaller than a box", "smaller than a 64 px box")
def _(d):
    v, lab = volume((4, 40, 40)), painting((4, 40, 40))
    return lambda: build_training_set(v, lab, [Box(2, 20, 20)], [], TrainsetSettings())


@case("trainset: box off the volume in X", "Positive box 2 .* is off the volume: it covers")
def _(d):
    boxes = [positives()[0], Box(2, 24, 44, BOX)]
    return lambda: build_training_set(volume(), painting(), boxes, [], trainset_settings())


@case("trainset: box on slice z = number of slices", r"slice z=6 is outside 0\.\.5")
def _(d):
    return lambda: build_training_set(
        volume(), painting(), positives(), [Box(6, 24, 24, BOX)], trainset_settings()
    )


@case("trainset: box on a negative slice", r"slice z=-1 is outside")
def _(d):
    return lambda: build_training_set(
        volume(), painting(), [Box(-1, 24, 24, BOX)], [], trainset_settings()
    )


@case("trainset: no positive boxes", "No positive boxes")
def _(d):
    return lambda: build_training_set(volume(), painting(), [], negatives(), trainset_settings())


@case("trainset: positive box with nothing painted", "Positive box 2 .* has no painted voxels")
def _(d):
    boxes = [positives()[0], Box(2, 10, 10, BOX)]
    return lambda: build_training_set(volume(), painting(), boxes, [], trainset_settings())


@case("trainset: labels layer of another shape", "do not match the tomogram")
def _(d):
    lab = painting((6, 48, 40))
    return lambda: build_training_set(volume(), lab, positives(), [], trainset_settings())


@case("trainset: labels with fractions", "not whole numbers")
def _(d):
    lab = painting().astype(np.float32) * 0.5
    return lambda: build_training_set(volume(), lab, positives(), [], trainset_settings())


@case("trainset: negative labels", "negative")
def _(d):
    lab = painting().astype(np.int16) * -1
    return lambda: build_training_set(volume(), lab, positives(), [], trainset_settings())


@case("trainset: boxes of two sizes", "all boxes of a training set must have one size")
def _(d):
    boxes = [positives()[0], Box(3, 24, 24, BOX + 2)]
    return lambda: build_training_set(volume(), painting(), boxes, [], trainset_settings())


@case("trainset: boxes of another size than the setting", "the training box size is 32 px")
def _(d):
    s = trainset_settings(box_size=32)
    return lambda: build_training_set(volume(), painting(), positives(), [], s)


@case("boxes: a 2D shape (no Z)", "3D")
def _(d):
    return lambda: box_from_shape(np.array([[0.0, 0.0], [0.0, 5.0], [5.0, 5.0], [5.0, 0.0]]))


@case("boxes: a shape spanning slices", "one Z")
def _(d):
    return lambda: box_from_shape(np.array([[1.0, 0.0, 0.0], [3.0, 5.0, 5.0]]))


@case("boxes: CSV with a word for a number", "not a number")
def _(d):
    (d / "boxes.csv").write_text("z,y,x,size\n1,2,three,16\n")
    return lambda: read_boxes_csv(d / "boxes.csv")


@case("boxes: CSV of other columns", "expected columns")
def _(d):
    (d / "boxes.csv").write_text("a,b\n1,2\n")
    return lambda: read_boxes_csv(d / "boxes.csv")


@case("merge: maps of two grids", "same tomogram grid")
def _(d):
    a = MergeInput(np.zeros(SHAPE, np.float32), "membrane")
    b = MergeInput(np.zeros((6, 48, 40), np.float32), "ribosome")
    return lambda: merge_probability_maps([a, b])


# networks ---------------------------------------------------------------------------------------
@case("apply: network for another voxel size (policy refuse)", "differs from the network's")
def _(d):
    s = ApplySettings(device="cpu", voxel_size_policy="refuse")
    return lambda: apply_network(
        tiny_network(voxel_size=10.0), volume(), voxel_size=20.0, settings=s
    )


@case("apply: outputs for another number of classes", "probability outputs were given")
def _(d):
    out = ApplyOutputs(np.zeros(SHAPE, np.uint8), [np.zeros(SHAPE, np.uint8)] * 2)
    return lambda: apply_network(tiny_network(), volume(), voxel_size=10.0, out=out)


@case("apply: network whose outputs disagree with its classes", "inconsistent")
def _(d):
    net = tiny_network(n_classes=2)
    net.meta.n_classes, net.meta.class_names = 3, ("background", "a", "b")
    return lambda: apply_network(net, volume(), voxel_size=10.0)


@case("train: continue with a training set of other classes", "Cannot continue training")
def _(d):
    net = tiny_network(class_names=("background", "membrane"))
    ts = small_trainset(class_names=("background", "ribosome"))
    s = TrainSettings.continuing(net, iterations=1, device="cpu")
    return lambda: drive(iter_train(ts, s, init=net))


@case("train: continue with a three-class training set", "differ from the training set's")
def _(d):
    net = tiny_network(class_names=("background", "membrane"))
    ts = small_trainset(class_names=("background", "membrane", "ribosome"))
    s = TrainSettings.continuing(net, iterations=1, device="cpu")
    return lambda: drive(iter_train(ts, s, init=net))


@case("network file: a text file", "not a .tsnet zip archive")
def _(d):
    (d / "net.tsnet").write_text("weights")
    return lambda: load_network(d / "net.tsnet")


@case("network file: a training set instead", "not a napari-tomoseg network file")
def _(d):
    small_trainset().save(d / "set.npz")
    return lambda: load_network(d / "set.npz")


@case("training-set file: a network instead", "not a napari-tomoseg training set")
def _(d):
    save_network(tiny_network(), d / "net.tsnet")
    return lambda: TrainingSet.load(d / "net.tsnet")


@case("training-set file: plain text", "not a .npz archive")
def _(d):
    (d / "set.npz").write_text("not numbers")
    return lambda: TrainingSet.load(d / "set.npz")


# output files -----------------------------------------------------------------------------------
@case("output: folder not writable", "is not writable", TomosegIOError)
def _(d):
    out = d / "locked"
    out.mkdir()
    out.chmod(0o555)
    if os.access(out, os.W_OK):  # root ignores permission bits
        out.chmod(0o755)
        pytest.skip("permission bits do not stop this user (root): cannot test a locked folder")
    return lambda: tio.write_mrc(out / "x.mrc", volume(), 10.0)


@case("output: the name of a folder", "it is a folder", TomosegIOError)
def _(d):
    (d / "result.mrc").mkdir()
    return lambda: tio.write_mrc(d / "result.mrc", volume(), 10.0, overwrite=True)


@case("output: folder does not exist", "does not exist", TomosegIOError)
def _(d):
    return lambda: tio.write_labels(d / "missing" / "mask.mrc", painting(), 10.0)


@case("output: 4D array to MRC", "2D or 3D", TomosegIOError)
def _(d):
    return lambda: tio.write_mrc(d / "x.mrc", volume()[None])


@case("output: complex array to MRC", "has no MRC mode", TomosegIOError)
def _(d):
    return lambda: tio.write_mrc(d / "x.mrc", volume().astype(np.complex64))


@case("output: negative labels", "x.mrc: labels must be non-negative", TomosegIOError)
def _(d):
    return lambda: tio.write_labels(d / "x.mrc", painting().astype(np.int8) - 1)


@case("output: float labels", "x.mrc: labels must be integers", TomosegIOError)
def _(d):
    return lambda: tio.write_labels(d / "x.mrc", painting().astype(np.float32))


@case("apply file: output would replace the input", "would replace the input")
def _(d):
    path = write_tomogram(d / "t.mrc")
    return lambda: apply_file(tiny_network(), path, path, overwrite=True)


@case("apply file: mask and probabilities one file", "different file names")
def _(d):
    path = write_tomogram(d / "t.mrc")
    return lambda: apply_file(tiny_network(), path, d / "m.mrc", d / "m.mrc")


def _keep(path: Path, text: str = "keep me") -> Path:
    path.write_text(text)
    return path


EXISTS = "already exists"


@case("existing output, no overwrite: write_mrc", EXISTS, TomosegIOError)
def _(d):
    target = _keep(d / "v.mrc")
    return lambda: tio.write_mrc(target, volume(), 10.0)


@case("existing output, no overwrite: write_labels", EXISTS, TomosegIOError)
def _(d):
    target = _keep(d / "m.mrc")
    return lambda: tio.write_labels(target, painting())


@case("existing output, no overwrite: save_network", EXISTS, TomosegIOError)
def _(d):
    target = _keep(d / "n.tsnet")
    return lambda: save_network(tiny_network(), target)


@case("existing output, no overwrite: TrainingSet.save", EXISTS, TomosegIOError)
def _(d):
    target = _keep(d / "s.npz")
    return lambda: small_trainset().save(target)


@case("existing output, no overwrite: write_csv", EXISTS, TomosegIOError)
def _(d):
    target = _keep(d / "p.csv")
    return lambda: write_csv(target, PARTICLES, 10.0)


@case("existing output, no overwrite: write_star", EXISTS, TomosegIOError)
def _(d):
    target = _keep(d / "p.star")
    return lambda: write_star(target, PARTICLES, 10.0)


@case("existing output, no overwrite: write_boxes_csv", EXISTS, TomosegIOError)
def _(d):
    target = _keep(d / "b.csv")
    return lambda: write_boxes_csv(target, positives())


@case("existing output, no overwrite: iter_apply_file mask", EXISTS, TomosegIOError)
def _(d):
    src, target = write_tomogram(d / "t.mrc"), _keep(d / "m.mrc")
    return lambda: apply_file(tiny_network(), src, target)


@case("existing output, no overwrite: iter_apply_file probabilities", EXISTS, TomosegIOError)
def _(d):
    src, target = write_tomogram(d / "t.mrc"), _keep(d / "p.mrc")
    return lambda: apply_file(tiny_network(), src, d / "m.mrc", target)


@case("existing output, no overwrite: save_annotations", "already holds annotations")
def _(d):
    save_annotations(d / "a", annotations())
    return lambda: save_annotations(d / "a", annotations())


@case("existing output, no overwrite: a lone painting.mrc", "already has painting.mrc")
def _(d):
    (d / "a").mkdir()
    _keep(d / "a" / "painting.mrc")
    return lambda: save_annotations(d / "a", annotations())


@case("annotations: of a tomogram of another shape", "not \\[6, 48, 40\\]")
def _(d):
    save_annotations(d / "a", annotations())
    other = Annotations(painting=painting((6, 48, 40)))
    return lambda: save_annotations(d / "a", other, overwrite=True)


@case("annotations: 2D painting", "must be a 3D")
def _(d):
    return lambda: save_annotations(d / "a", Annotations(painting=painting()[0]))


@case("annotations: folder without saved annotations", "holds no saved annotations")
def _(d):
    (d / "a").mkdir()
    return lambda: load_annotations(d / "a")


@case("annotations: damaged annotations.json", "is damaged: 'shape'")
def _(d):
    save_annotations(d / "a", annotations())
    info = json.loads((d / "a" / "annotations.json").read_text())
    (d / "a" / "annotations.json").write_text(json.dumps({**info, "shape": "big"}))
    return lambda: load_annotations(d / "a")


@case("annotations: opened with another tomogram", "belong to a tomogram of shape")
def _(d):
    save_annotations(d / "a", annotations())
    return lambda: load_annotations(d / "a", expected_shape=(6, 48, 40))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_clearly(name, tmp_path):
    setup, error, match = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingVoxelSizeWarning)
        warnings.simplefilter("ignore", UserWarning)
        act = setup(tmp_path)
        before = _snapshot(tmp_path)
        with pytest.raises(error, match=match) as info:
            act()
    assert isinstance(info.value, TomosegError)
    assert _snapshot(tmp_path) == before  # nothing written, nothing replaced, no temporary


def test_documented_case_count():
    text = (ROOT / "docs" / "robustness.md").read_text()
    stated = re.search(r"\*\*(\d+) bad-input cases\*\*", text)
    assert stated is not None, "docs/robustness.md must state the number of cases"
    assert int(stated.group(1)) == len(CASES)
    for name in CASES:
        assert name.split(": ", 1)[-1] in text, f"{name!r} is not in docs/robustness.md"


def test_continuing_training_at_another_voxel_size_is_refused():
    net = tiny_network(voxel_size=10.0, class_names=("background", "membrane"))
    ts = small_trainset(voxel_size=20.0)
    settings = TrainSettings.continuing(
        net, iterations=1, device="cpu", eval_every=1, preview_samples=0
    )
    with pytest.raises(TomosegError, match="voxel size"):
        drive(iter_train(ts, settings, init=net))


# -- odd but valid input: works, no crash ---------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 5, 7), (3, 2, 90), (2, 90, 1)])
def test_apply_to_tiny_tomograms(shape):
    """Slices smaller than the receptive field or a tile still give a full-size result."""
    result = apply_network(tiny_network(), volume(shape), voxel_size=10.0)
    assert result.mask.shape == shape and result.probabilities[0].shape == shape


def test_robust_stats_ignore_nan_and_inf():
    v = volume()
    bad = v.copy()
    bad[0, :3, :3] = np.nan
    bad[1, 5, 5] = np.inf
    finite = bad[np.isfinite(bad)].astype(np.float64)
    mean, std = robust_stats(bad)
    assert mean == pytest.approx(finite.mean(), rel=1e-9)
    assert std == pytest.approx(finite.std(), rel=1e-9)


def test_apply_fills_nan_voxels_and_labels_them_background():
    """nonfinite='fill': NaN stays where it is (labelled background) and does not leak."""
    net = tiny_network()
    clean = volume()
    mean, _ = robust_stats(clean)
    holes = np.zeros(SHAPE, bool)
    holes[2, 20:24, 20:24] = True
    holes[4, 0, :] = True
    dirty = clean.copy()
    dirty[holes] = np.nan
    filled = clean.copy()
    filled[holes] = robust_stats(dirty)[0]  # what the network is given in their place
    settings = ApplySettings(device="cpu", threshold=0.5)
    with pytest.warns(UserWarning, match="NaN or infinite voxels"):
        got = apply_network(net, dirty, voxel_size=10.0, settings=settings)
    ref = apply_network(net, filled, voxel_size=10.0, settings=settings)
    n_holes = int(holes.sum())
    assert any(f"{n_holes} NaN or infinite voxels in 2 slice(s)" in n for n in got.notes)
    assert np.all(got.mask[holes] == 0) and np.all(got.probabilities[0][holes] == 0)
    # elsewhere the result is that of the filled volume (the statistics barely differ)
    diff = np.abs(got.probabilities[0].astype(int) - ref.probabilities[0].astype(int))
    assert diff[~holes].max() <= 2
    assert np.mean(got.mask[~holes] == ref.mask[~holes]) > 0.995
    assert mean == pytest.approx(robust_stats(dirty)[0], abs=0.05)


# -- device out of memory -------------------------------------------------------------------------
OOM_SHAPE = (5, 96, 80)


def _oom_when(monkeypatch, too_big: Callable[[np.ndarray], bool], message: str | None = None):
    """Make the forward pass raise a CUDA out-of-memory error for batches ``too_big`` says."""
    real = inf_predict._predict_batch
    calls = {"refused": 0, "run": 0}

    def predict(model, batch, device, **kw):
        if too_big(batch):
            calls["refused"] += 1
            if message is None:
                raise torch.cuda.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total)"
                )
            raise RuntimeError(message)
        calls["run"] += 1
        return real(model, batch, device, **kw)

    monkeypatch.setattr(inf_predict, "_predict_batch", predict)
    return calls


def _run(net, vol, **settings):
    s = ApplySettings(device="cpu", tile_size=48, batch_size=8, **settings)
    return apply_network(net, vol, voxel_size=10.0, settings=s)


@pytest.mark.parametrize("message", [None, "MPS backend out of memory (MPS allocated: 8 GB)"])
def test_out_of_memory_halves_the_batch_and_gives_the_same_result(monkeypatch, message):
    net, vol = tiny_network(), volume(OOM_SHAPE)
    normal = _run(net, vol)
    calls = _oom_when(monkeypatch, lambda b: b.shape[0] > 2, message)
    got = _run(net, vol)
    assert calls["refused"] == 2  # 8 failed, 4 failed, then 2 for the rest of the run
    assert any("8 tiles per batch; continued with 4" in n for n in got.notes)
    assert any("4 tiles per batch; continued with 2" in n for n in got.notes)
    assert np.array_equal(got.mask, normal.mask)
    assert np.abs(got.probabilities[0].astype(int) - normal.probabilities[0]).max() <= 1


def test_out_of_memory_on_one_tile_splits_it_into_smaller_tiles(monkeypatch):
    net, vol = tiny_network(), volume(OOM_SHAPE)
    normal = _run(net, vol)
    calls = _oom_when(monkeypatch, lambda b: b.shape[-1] > 32)
    got = _run(net, vol)
    assert calls["run"] > 0 and any("computed as" in n and "tiles of" in n for n in got.notes)
    assert not got.stopped and got.slices_done == OOM_SHAPE[0]
    # sub-tiles blend like tiles: the same result up to float rounding, except where any
    # tiling differs from whole-slice inference (the margin at the far edges of a slice)
    margin = inf.receptive_field(net.model, 1).margin
    inner = (slice(None), slice(0, OOM_SHAPE[1] - margin), slice(0, OOM_SHAPE[2] - margin))
    diff = np.abs(got.probabilities[0].astype(int) - normal.probabilities[0])
    assert diff[inner].max() <= 1
    assert np.mean(got.mask == normal.mask) > 0.99


def test_out_of_memory_for_every_tile_size_is_a_clear_error_and_leaves_no_file(
    monkeypatch, tmp_path
):
    src = write_tomogram(tmp_path / "t.mrc", volume(OOM_SHAPE))
    _oom_when(monkeypatch, lambda b: True)
    with pytest.raises(DeviceMemoryError, match="ran out of memory even for one"):
        apply_file(tiny_network(), src, tmp_path / "mask.mrc", tmp_path / "prob.mrc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.mrc"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_out_of_memory_is_survived():
    """A real CUDA OOM: the process may use 512 MB; 8 tiles of 1024 px of a U-Net need GBs."""
    torch.manual_seed(0)
    net = Network.create("unet", 1, 2, voxel_size=10.0)
    vol = volume((2, 1024, 1024))
    s = ApplySettings(device="cuda", tile_size=1024, batch_size=8, mixed_precision=False)
    free = apply_network(net, vol, voxel_size=10.0, settings=s)
    torch.cuda.empty_cache()
    cap = 512 * 2**20 / torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap, 0)
    try:
        got = apply_network(net, vol, voxel_size=10.0, settings=s)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
    assert any("out of device memory" in n for n in got.notes), got.notes
    assert got.slices_done == 2 and got.mask.shape == vol.shape
    assert np.mean(got.mask == free.mask) > 0.99


def test_other_runtime_errors_are_not_retried(monkeypatch):
    def broken(*_args, **_kw):
        raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")

    monkeypatch.setattr(inf_predict, "_predict_batch", broken)
    with pytest.raises(RuntimeError, match="CUDNN_STATUS"):
        _run(tiny_network(), volume(OOM_SHAPE))


# -- a full disk or a failing rename during a write -----------------------------------------------
def _enospc(*_args, **_kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def _fail_on_call(monkeypatch, module, name: str, n: int):
    """Make ``module.name`` raise ENOSPC on its ``n``-th call (1-based), else work."""
    real = getattr(module, name)
    count = {"calls": 0}

    def maybe(*args, **kw):
        count["calls"] += 1
        if count["calls"] == n:
            _enospc()
        return real(*args, **kw)

    monkeypatch.setattr(module, name, maybe)
    return count


class _FullDiskArray:
    """A (40, 8, 8) array whose second block of slices fails as a full disk would."""

    shape, ndim, dtype = (40, 8, 8), 3, np.dtype(np.float32)

    def __getitem__(self, key):
        if key.start >= 16:
            _enospc()
        return np.full((16, 8, 8), 7, np.float32)


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name not in keep and p.is_file())


@pytest.mark.parametrize("where", ["data", "fsync", "rename", "reserve"])
def test_write_mrc_on_a_full_disk_keeps_the_previous_file(monkeypatch, tmp_path, where):
    path = tio.write_mrc(tmp_path / "seg.mrc", np.full((40, 8, 8), 3, np.float32), 9.0)
    before = path.read_bytes()
    data: object = np.ones((40, 8, 8), np.float32)
    if where == "data":
        data = _FullDiskArray()
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", _enospc)
    elif where == "rename":
        monkeypatch.setattr(os, "replace", _enospc)
    else:
        monkeypatch.setattr(os, "posix_fallocate", _enospc, raising=False)
    with pytest.raises(TomosegIOError, match=r"seg\.mrc: No space left on device .*disk"):
        tio.write_mrc(path, data, 9.0, overwrite=True)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, {"seg.mrc"}) == []


@pytest.mark.parametrize("where", ["painting", "negatives", "rename 1", "rename 3", "rename 4"])
def test_save_annotations_on_a_full_disk_keeps_the_previous_ones(monkeypatch, tmp_path, where):
    folder = save_annotations(tmp_path / "a", annotations())
    before = _snapshot(folder)
    changed = annotations()
    changed.painting[:] = 2
    changed.positives = changed.positives[:1]
    import napari_tomoseg.data.annotations as ann

    if where == "painting":
        _fail_on_call(monkeypatch, tio, "_write_mrc_body", 1)
    elif where == "negatives":
        _fail_on_call(monkeypatch, ann, "write_boxes_csv", 2)
    else:  # the final renames: 3 inner ones (painting, 2 CSVs) come first
        _fail_on_call(monkeypatch, os, "replace", 3 + int(where.split()[1]))
    with pytest.raises(OSError, match="No space left on device"):
        save_annotations(folder, changed, overwrite=True)
    assert _snapshot(folder) == before
    assert load_annotations(folder).positives == positives()
    monkeypatch.undo()
    save_annotations(folder, changed, overwrite=True)  # and a save that works replaces all
    assert load_annotations(folder).positives == changed.positives


@pytest.mark.parametrize("where", ["mid-run", "reserve", "rename 2", "rename 3"])
def test_apply_file_on_a_full_disk_keeps_the_previous_outputs(monkeypatch, tmp_path, where):
    src = write_tomogram(tmp_path / "t.mrc", volume((9, 40, 40)))
    net = tiny_network(n_classes=3, class_names=("background", "membrane", "ribosome"))
    mask, prob = tmp_path / "mask.mrc", tmp_path / "prob.mrc"
    apply_file(net, src, mask, prob, settings=ApplySettings(device="cpu", z_chunk=2))
    keep = {p.name for p in tmp_path.iterdir()}
    assert keep == {"t.mrc", "mask.mrc", "prob_membrane.mrc", "prob_ribosome.mrc"}
    before = _snapshot(tmp_path)
    other = tiny_network(n_classes=3, class_names=("background", "membrane", "ribosome"), seed=5)
    if where == "mid-run":
        _fail_on_call(monkeypatch, inf_apply, "_make_mask", 4)
        match = "No space left on device"
    elif where == "reserve":
        monkeypatch.setattr(os, "posix_fallocate", _enospc, raising=False)
        match = "No space left on device .*Nothing was replaced"
    else:
        _fail_on_call(monkeypatch, os, "replace", int(where.split()[1]))
        match = "No space left on device"
    gen = iter_apply_file(
        other, src, mask, prob, overwrite=True, settings=ApplySettings(device="cpu", z_chunk=2)
    )
    with pytest.raises(OSError, match=match):
        drive(gen)
    assert _snapshot(tmp_path) == before
    assert _leftovers(tmp_path, keep) == []


def test_all_or_nothing_commit_restores_replaced_files(monkeypatch, tmp_path):
    """atomic_paths: when the 3rd rename fails, the 2 files already replaced come back."""
    targets = [tmp_path / f"f{i}.txt" for i in range(3)]
    for t in targets[:2]:
        t.write_text(f"old {t.name}")
    _fail_on_call(monkeypatch, os, "replace", 3)
    with pytest.raises(TomosegIOError, match=r"f2\.txt: No space left"):  # noqa: SIM117
        with tio.atomic_paths(targets, overwrite=True) as tmps:
            for tmp in tmps:
                tmp.write_text("new")
    assert [t.read_text() for t in targets[:2]] == ["old f0.txt", "old f1.txt"]
    assert not targets[2].exists()
    assert _leftovers(tmp_path, {"f0.txt", "f1.txt"}) == []


def test_written_files_get_normal_permissions(tmp_path):
    """Temporaries are private (0o600); the result has the umask's bits, or the old file's."""
    mask = os.umask(0o022)
    os.umask(mask)
    path = tio.write_mrc(tmp_path / "v.mrc", volume(), 10.0)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    path.chmod(0o640)
    tio.write_mrc(path, volume(), 10.0, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


# -- a process killed while writing ---------------------------------------------------------------
_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from napari_tomoseg.data.io import write_mrc

    target, started = Path(sys.argv[1]), Path(sys.argv[2])

    class BigSlowArray:
        # 256 slices of 128 x 128; reading past slice 64 signals and then stalls
        shape, ndim, dtype = (256, 128, 128), 3, np.dtype(np.float32)

        def __getitem__(self, key):
            if key.start >= 64:
                started.write_text("half written")
                time.sleep(120)
            return np.full((16, 128, 128), 5, np.float32)

    write_mrc(target, BigSlowArray(), 4.0, overwrite=True)
    """
)


def test_killed_writer_leaves_the_previous_file_and_only_a_hidden_temporary(tmp_path):
    target = tio.write_mrc(tmp_path / "tomo.mrc", volume(), 10.0)
    before = target.read_bytes()
    started = tmp_path / "started.txt"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target), str(started)])
    try:
        deadline = time.monotonic() + 25
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the writer did not start"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == before
    left = _leftovers(tmp_path, {"tomo.mrc", "started.txt"})
    # the name records the writer: this host and the killed process's PID
    writer = tio.this_writer()
    pattern = (
        rf"\.tomo\.mrc\.{writer.host}-{writer.ident}-{proc.pid}-[0-9a-f]+-[0-9a-f]{{8}}\.part"
    )
    assert len(left) == 1 and re.fullmatch(pattern, left[0]), left
    temp = tmp_path / left[0]
    assert temp.stat().st_size > 256 * 128 * 128 * 4  # the space was reserved up front
    # readers ignore it; its process is gone, so it is stale at once, whatever its age
    assert not tio.is_mrc_path(temp) and get_reader(str(temp)) is None
    [found] = tio.stale_temporaries(tmp_path)
    assert (found.path, found.state, found.writer.pid) == (temp, "gone", proc.pid)
    assert [t.path for t in tio.remove_stale_temporaries(tmp_path)] == [temp]
    assert _leftovers(tmp_path, {"tomo.mrc", "started.txt"}) == []
    assert np.array_equal(tio.read_tomogram(target).data, volume())


def test_reader_keeps_working_with_a_mrcfile_written_file(tmp_path):
    """Files from other programs (mrcfile's own writer) are read; only damage is refused."""
    with mrcfile.new(tmp_path / "other.mrc") as mrc:
        mrc.set_data(volume())
        mrc.voxel_size = 10.0
    tomo = tio.read_tomogram(tmp_path / "other.mrc")
    assert np.array_equal(tomo.data, volume()) and tomo.voxel_size == (10.0, 10.0, 10.0)
