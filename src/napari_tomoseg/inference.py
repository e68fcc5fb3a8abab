"""Apply a trained network to whole tomograms: tiled, streaming, seam-free.

The networks are 2D (or 2.5D: ``2 * context_slices + 1`` adjacent Z slices as channels,
clamped at the Z ends).  A tomogram is processed a few Z slices at a time (``z_chunk``); each
slice is cut into overlapping square tiles, the tiles of several slices are batched for the
device, and the tiles' class probabilities are blended back into the slice.

**Exactness.**  All registered architectures are fully convolutional and translation
equivariant for shifts that are multiples of their total pooling factor (the *alignment*:
2 for ``tomoseg-cnn``, ``2**depth`` for a U-Net).  A tile's output is then identical to
whole-slice inference wherever the tile holds the whole receptive field of the output pixel.
So the tiler

* measures the network's receptive-field *margin* (the farthest input pixel that can change
  an output pixel) and its alignment once per network (:func:`receptive_field`),
* starts every tile on a multiple of the alignment,
* gives each tile zero weight within ``margin`` pixels of an edge that borders another tile,
  and blends the rest of the overlap with a cosine-squared ramp (a partition of unity).

With ``overlap >= 2 * margin`` (what ``overlap="auto"`` chooses: ``2 * margin`` plus an
8-pixel ramp, rounded up to the alignment) the tiled result equals whole-slice inference to
float rounding everywhere except within ``margin`` pixels of the far (bottom / right) edges
of a slice, where tiles see mirrored padding instead of the network's zero padding.  For
``tomoseg-cnn`` (15x15 kernels, one 15x15 layer before and two after a 2x2 max-pool, bilinear
2x upsampling) the measured margin is 37 pixels, so the automatic overlap is 82 pixels; a
U-Net's is larger (57 px for ``unet-lite``, 117 px for ``unet``: overlaps 128 and 256).
When the overlap would exceed half of ``tile_size``, the tile grows to twice the overlap.  A
smaller explicit overlap still blends smoothly (a quarter of it is discarded at each side)
but is no longer exact; a warning says so.

**Memory.** Input is read slice by slice (memory-mapped files stay on disk). Held in float32
are only the ``2 * context_slices + 1`` normalised slices around the current one, the padded
input and one accumulator (n_classes planes) for each slice whose tiles share the current
batch, and the batch itself; the whole volume never is. Results go into caller-provided
arrays, which may be memory maps: :func:`iter_apply_file` writes MRC files through
:func:`napari_tomoseg.io.new_mrc_mmap` into temporary files (their disk space reserved up
front, so a full disk is an error before the run, not a crash during it) that are renamed
only when the run finishes, all together (:func:`napari_tomoseg.io.atomic_paths`), so a
cancelled or failed run leaves nothing under the final names and previous outputs intact.
Peak memory does not grow with the number of slices (measured in the tests with
``tracemalloc``); it grows with the slice area, ``batch_size`` and ``tile_size``.  The
pages of the memory-mapped input and outputs leave resident memory after each slice
(:func:`napari_tomoseg.io.release_pages`), so the resident size stays flat too.  The
volume may be any array that slices like numpy (a dask or Zarr array): only slices of it
are ever read.
``tomogram`` normalisation reads a fixed-size random sample of the volume once
(:func:`napari_tomoseg.preprocess.robust_stats`).

**Faults.** A device out-of-memory error during a forward pass is survived: the cache is
emptied and the same tiles are tried again with half the batch size, down to one tile, then
as smaller tiles (same overlap and blending); ``ApplyResult.notes`` says so.  NaN or
infinite voxels are, by ``ApplySettings.nonfinite``, filled (the network sees the
tomogram's mean; the voxels are labelled background with probability 0) or refused.

**Speed** (measured in ``benchmarks/speed.py``, results in ``docs/benchmarks.md``).  The
network is applied as a prepared copy (:func:`prepare_for_inference`: batch norm folded
into the convolutions, channels-last layout, and on a CPU the large-kernel convolutions of
``tomoseg-cnn`` computed by FFT, :class:`FFTConv2d`); the caller's model is left as it is.
Each input slice goes to the device once; tiles are cut, blended, thresholded and quantised
there, and only the byte results come back.  A helper thread reads and normalises the next
slices while the network runs.  On a CPU, glibc keeps freed memory for the next forward
pass during the run (:func:`_keep_freed_memory`); on CUDA, cuDNN picks its fastest
algorithms.  Results equal those of the plain model to float rounding.

**Output.** Probabilities are stored as ``int8`` percent (``round(100 * p)``, see
:mod:`napari_tomoseg.probability`), one (Z, Y, X) array per foreground class (also for a
binary network: a list of one); :func:`probabilities_as_float` turns any such array (or an
MRC read back, of this or an earlier version) into float32. The Labels mask is
``uint8`` of class indices: for a binary network ``p >= threshold -> 1``; for several
classes the argmax over all classes (background included), kept only where its probability
reaches the threshold.

**Voxel size.**  The tomogram's voxel size is compared with the network's (the in-plane
size it was trained at).  Beyond ``voxel_size_tolerance`` (relative), policy ``"rescale"``
resamples each slice in-plane to the network's voxel size (bilinear, antialiased when
shrinking), applies the network and resamples the probabilities back to the tomogram's grid;
for a 2.5D network the context slices are taken at the network's Z spacing (linear
interpolation between slices).  Z is never resampled otherwise: a 2D network sees one slice
at a time.  Policy ``"refuse"`` raises a :class:`TomosegError` naming both sizes.  If either
size is unknown a warning is issued and the network is applied as is.

**Binning.**  ``ApplySettings.shrink`` (or :func:`apply_binned`) applies the network to a
mean-binned copy (held in memory, ``1/shrink**3`` of the volume) and brings the
probabilities back to the full grid with :func:`napari_tomoseg.preprocess.unbin_volume`
before thresholding.

References: sliding-window inference with blending is the approach of nnU-Net and
MemBrain-seg (Gaussian weights there; a cosine ramp with a discarded margin here, which
keeps fully convolutional networks exact); test-time augmentation over the 8 rotations /
flips of the plane follows Ais and MemBrain-seg.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import itertools
import math
import os
import platform
import queue
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import MissingVoxelSizeWarning, TomosegError, TomosegIOError
from .io import (
    HeaderStats,
    atomic_paths,
    finish_header,
    new_mrc_mmap,
    output_header_texts,
    read_tomogram,
    release_pages,
    voxel_triple,
)
from .models import predict_proba
from .preprocess import Normalisation, bin_volume, robust_stats, unbin_volume
from .probability import (
    PROBABILITY_DTYPE,
    PROBABILITY_SCALE,
    probabilities_as_float,
    quantize_probabilities,
)
from .progress import Progress, StopCheck, drive, never_stop

#: Width (pixels) of the cosine blending ramp added to ``2 * margin`` by ``overlap="auto"``.
AUTO_BLEND = 8

VOXEL_SIZE_POLICIES = ("rescale", "refuse")
#: What :func:`iter_apply` does with NaN or infinite voxels: fill them (and label them
#: background) or refuse the tomogram.
NONFINITE_POLICIES = ("fill", "refuse")
TTA_TRANSFORMS = (4, 8)
#: The mask threshold of a network that records none (one trained before calibration).
DEFAULT_THRESHOLD = 0.5

VoxelSize = float | Sequence[float]


# -- settings and results -----------------------------------------------------------------------
@dataclass
class ApplySettings:
    """How a network is applied to a tomogram (shared by widget, CLI and core).

    ``tile_size``: square tile side in pixels (rounded up to the network's alignment).  The
    default, 1024 with ``batch_size`` 2, holds the same number of pixels per forward pass
    (about the same memory) as 8 tiles of 512 but wastes far less work on the overlap that
    makes tiling exact (a 1024 x 1024 slice is one tile).  On a CPU, one thread, 1024 x 1024
    slices (``docs/benchmarks.md``) it applied ``tomoseg-cnn`` at 1.58 against 1.50
    Mvoxel/s, ``unet-lite`` at 1.73 against 1.33 and ``unet`` at 0.34 against 0.16.
    ``overlap``: pixels shared by neighbouring tiles, or ``"auto"`` (exact for fully
    convolutional networks, see the module notes).  ``batch_size``: tiles per forward pass.
    ``device``: ``"auto"`` (CUDA, then Apple MPS, then CPU), or a torch device string.
    ``mixed_precision``: float16 autocast on CUDA (ignored elsewhere).  ``tta``: average the
    probabilities over ``tta_transforms`` orientations of each tile (8: the four rotations
    and their mirror images; 4: the flips).  ``threshold``: probability for the mask;
    ``None`` takes the network's own (chosen on its held-out boxes when it was trained, see
    :func:`napari_tomoseg.training.calibrate_threshold`), or 0.5 for a network without one.
    ``voxel_size_policy``: ``"rescale"`` or ``"refuse"`` when the tomogram's voxel size
    differs from the network's by more than ``voxel_size_tolerance`` (relative).
    ``z_chunk``: Z slices whose tiles are batched together, one progress event each
    (groups start at multiples of it; ``should_stop`` is checked before every batch).
    ``shrink``: apply to a copy binned by this factor and unbin the probabilities.
    ``nonfinite``: what to do with NaN or infinite voxels (see :data:`NONFINITE_POLICIES`):
    ``"fill"`` gives the network the tomogram's mean in their place and labels them
    background (probability 0), with a warning and a note in the result; ``"refuse"`` raises
    a :class:`TomosegError` naming the first slice that has one.
    """

    tile_size: int = 1024
    overlap: int | str = "auto"
    batch_size: int = 2
    device: str = "auto"
    mixed_precision: bool = True
    tta: bool = False
    tta_transforms: int = 8
    threshold: float | None = None
    voxel_size_policy: str = "rescale"
    voxel_size_tolerance: float = 0.05
    z_chunk: int = 8
    shrink: int = 1
    nonfinite: str = "fill"

    def validate(self) -> None:
        """Raise :class:`TomosegError` for settings that cannot work."""
        for name in ("tile_size", "batch_size", "z_chunk", "shrink"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise TomosegError(f"{name} must be a positive integer, got {value!r}.")
        if self.tile_size < 16:
            raise TomosegError(f"tile_size must be at least 16 pixels, got {self.tile_size}.")
        if isinstance(self.overlap, str):
            if self.overlap != "auto":
                raise TomosegError(
                    f"overlap must be a number of pixels or 'auto', got {self.overlap!r}."
                )
        elif (
            isinstance(self.overlap, bool)
            or not isinstance(self.overlap, (int, np.integer))
            or self.overlap < 0
        ):
            raise TomosegError(f"overlap must be >= 0 pixels or 'auto', got {self.overlap!r}.")
        elif self.overlap >= self.tile_size:
            raise TomosegError(
                f"overlap ({self.overlap}) must be smaller than tile_size ({self.tile_size})."
            )
        if self.tta_transforms not in TTA_TRANSFORMS:
            raise TomosegError(
                f"tta_transforms must be 4 (flips) or 8 (rotations and flips), "
                f"got {self.tta_transforms!r}."
            )
        if self.threshold is not None and not (
            isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold <= 1.0
        ):
            raise TomosegError(
                f"threshold must be between 0 and 1 (or None: the network's own), got "
                f"{self.threshold!r}."
            )
        if self.voxel_size_policy not in VOXEL_SIZE_POLICIES:
            raise TomosegError(
                f"voxel_size_policy must be one of {VOXEL_SIZE_POLICIES}, "
                f"got {self.voxel_size_policy!r}."
            )
        if not (
            isinstance(self.voxel_size_tolerance, (int, float)) and self.voxel_size_tolerance >= 0
        ):
            raise TomosegError(
                f"voxel_size_tolerance must be >= 0, got {self.voxel_size_tolerance!r}."
            )
        if self.nonfinite not in NONFINITE_POLICIES:
            raise TomosegError(
                f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}."
            )
        resolve_device(self.device)

    def resolved(self, network: Any) -> ApplySettings:
        """These settings with the threshold decided: as given, else the network's own,
        else :data:`DEFAULT_THRESHOLD`."""
        if self.threshold is not None:
            return self
        return replace(self, threshold=network_threshold(network))


def network_threshold(network: Any) -> float:
    """The probability at which ``network``'s mask is cut: the threshold recorded in its
    file (chosen on its held-out boxes), or :data:`DEFAULT_THRESHOLD`."""
    own = getattr(getattr(network, "meta", None), "threshold", None)
    return float(own) if own is not None else DEFAULT_THRESHOLD


@dataclass
class ApplyOutputs:
    """Arrays (possibly memory maps) that receive a run's results, all of the tomogram's shape.

    ``mask``: uint8 class indices.  ``probabilities``: one int8 array per foreground class
    (``value / 100`` is the probability), or ``None`` to keep only the mask.
    """

    mask: np.ndarray
    probabilities: list[np.ndarray] | None = None


@dataclass
class ApplyResult:
    """What a run produced.

    ``probabilities``: one (Z, Y, X) int8 array per foreground class, in the order of
    ``foreground_names`` (empty when not kept); read with :func:`probabilities_as_float`.
    ``mask``: (Z, Y, X) uint8 class indices.  ``class_names``: all classes, background first.
    ``voxel_size``: the tomogram's (Z, Y, X) in Angstrom, or ``None``.  ``threshold``: the
    probability the mask was cut at.  ``stopped``: the run
    was cancelled; slices past ``slices_done`` are not filled (and no file was written).
    For file runs, ``mask_path`` / ``probability_paths`` name the files and the arrays are
    read-only memory maps of them.  ``notes`` list what was adapted (tile size, rescaling).
    """

    probabilities: list[np.ndarray]
    mask: np.ndarray | None
    class_names: list[str]
    voxel_size: tuple[float, float, float] | None
    seconds: float
    stopped: bool
    slices_done: int = 0
    mask_path: Path | None = None
    probability_paths: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    threshold: float = DEFAULT_THRESHOLD

    @property
    def foreground_names(self) -> list[str]:
        """Names of the classes that have a probability map (all but the background)."""
        return list(self.class_names[1:])

    @property
    def slices_per_second(self) -> float:
        return self.slices_done / self.seconds if self.seconds > 0 else 0.0


def _run_result(
    outputs: ApplyOutputs,
    class_names: list[str],
    voxel_size: tuple[float, float, float] | None,
    start: float,
    *,
    stopped: bool,
    slices_done: int,
    notes: list[str],
    threshold: float = DEFAULT_THRESHOLD,
) -> ApplyResult:
    """The :class:`ApplyResult` of a run that wrote into ``outputs`` (an
    :class:`ApplyOutputs`) and began at ``time.perf_counter()`` = ``start``."""
    return ApplyResult(
        probabilities=list(outputs.probabilities or []),
        mask=outputs.mask,
        class_names=class_names,
        voxel_size=voxel_size,
        seconds=time.perf_counter() - start,
        stopped=stopped,
        slices_done=slices_done,
        notes=notes,
        threshold=threshold,
    )


def _quantize_tensor(p: torch.Tensor) -> torch.Tensor:
    """Stored probabilities (:mod:`napari_tomoseg.probability`) of float32 ones, on their
    device (clipped to [0, 1]; ties to even)."""
    return torch.round(p.clamp(0.0, 1.0) * PROBABILITY_SCALE).to(torch.int8)


def probability_paths(path: str | os.PathLike, foreground_names: Sequence[str]) -> list[Path]:
    """File names for the probability maps: ``path`` itself for a single foreground class,
    else one file per class with the class name before the extension (``prob_ribosome.mrc``).
    """
    path = Path(path)
    names = list(foreground_names)
    if len(names) == 1:
        return [path]
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".gz") else path.suffix
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    out = []
    for name in names:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name)) or "class"
        out.append(path.with_name(f"{stem}_{safe}{suffix}"))
    if len(set(out)) != len(out):
        raise TomosegError(
            f"The class names {names} do not give distinct probability file names; "
            "rename the classes."
        )
    return out


# -- device -------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for ``"auto"`` (CUDA, then MPS, then CPU) or a device string."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TomosegError(
            f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'."
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TomosegError(
            f"Device {device!r} was asked for but CUDA is not available here; use 'auto' or 'cpu'."
        )
    return dev


# -- receptive field ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReceptiveField:
    """How far an output pixel looks (``margin``, pixels each way) and the shift
    (``alignment``, pixels) for which the network is exactly translation equivariant."""

    margin: int
    alignment: int


_RF_CACHE: weakref.WeakKeyDictionary[nn.Module, ReceptiveField] = weakref.WeakKeyDictionary()
_MAX_PROBE = 2048


class _SupportConv(nn.Module):
    """Stand-in for a convolution when tracing a receptive field: the input channels are
    summed and convolved with one positive kernel of the same geometry.

    With positive weights every output channel of a convolution reaches the same pixels, so
    one channel carries the whole support at a fraction of the cost.
    """

    def __init__(self, conv: nn.Conv2d | nn.ConvTranspose2d) -> None:
        super().__init__()
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.output_padding = getattr(conv, "output_padding", 0)
        self.padding_mode = conv.padding_mode
        kh, kw = conv.kernel_size
        self.register_buffer("kernel", torch.full((1, 1, kh, kw), 1.0 / (kh * kw)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.sum(dim=1, keepdim=True)
        kernel = self.kernel.to(x.dtype)
        if self.transposed:
            return F.conv_transpose2d(
                x,
                kernel,
                stride=self.stride,
                padding=self.padding,
                output_padding=self.output_padding,
                dilation=self.dilation,
            )
        padding = self.padding
        if self.padding_mode != "zeros" and not isinstance(padding, str):
            ph, pw = padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = 0
        return F.conv2d(x, kernel, stride=self.stride, padding=padding, dilation=self.dilation)


def _support_copy(model: nn.Module) -> nn.Module:
    """A cheap single-channel float64 CPU copy that reaches the same pixels as ``model``.

    Convolutions become :class:`_SupportConv`, batch norm (a per-channel affine map in
    evaluation mode) the identity; everything else (pooling, upsampling, activations, skip
    connections) is kept.  Positive inputs then stay positive, so a positive impulse
    reaches exactly the pixels the architecture connects it to (no cancellation, no dead
    ReLU), and its response outlines the receptive field.
    """
    probe = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    for parent in list(probe.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d)):
                parent._modules[name] = _SupportConv(child)
            elif isinstance(child, nn.modules.batchnorm._BatchNorm):
                parent._modules[name] = nn.Identity()
    return probe


def _positive_copy(model: nn.Module) -> nn.Module:
    """A float64 CPU copy with every weight positive and every bias zero (the general,
    slower tracer for architectures :func:`_support_copy` cannot reduce)."""
    probe = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    with torch.no_grad():
        for name, p in probe.named_parameters():
            if p.ndim >= 2:
                p.fill_(1.0 / max(1, p[0].numel()))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for name, b in probe.named_buffers():
            if name.endswith("running_mean"):
                b.zero_()
            elif name.endswith("running_var"):
                b.fill_(1.0)
    return probe


def _tracer(model: nn.Module, in_channels: int) -> tuple[nn.Module, int]:
    """The receptive-field tracer for ``model`` and the network's alignment.

    The alignment (total downsampling) is read from the smallest feature map of a probe
    pass, rounded up to a power of two.
    """
    size = 256
    for make in (_support_copy, _positive_copy):
        probe = make(model)
        sizes: list[int] = []

        def hook(_module: nn.Module, _inputs: Any, output: Any, sizes: list[int] = sizes) -> None:
            if isinstance(output, torch.Tensor) and output.ndim == 4:
                sizes.append(int(output.shape[-1]))

        handles = [m.register_forward_hook(hook) for m in probe.modules() if m is not probe]
        try:
            with torch.no_grad():
                probe(torch.zeros((1, in_channels, size, size), dtype=torch.float64))
        except (RuntimeError, ValueError, TypeError):
            continue
        finally:
            for h in handles:
                h.remove()
        smallest = min([s for s in sizes if s > 0] or [size])
        factor = max(1, size // smallest)
        return probe, 1 << (factor - 1).bit_length()
    raise TomosegError(
        "The network could not be run on a probe image; it does not look like a 2D "
        "fully convolutional network."
    )


def receptive_field(model: nn.Module, in_channels: int) -> ReceptiveField:
    """Measure the receptive-field margin and alignment of a 2D network (cached per model).

    The margin is the largest distance (per axis, pixels) between an input pixel and an
    output pixel it influences, measured on a positive-weight copy of the network (see
    :func:`_support_copy`) with impulses at several phases of the pooling grid.  It depends
    on the architecture only, not on the weights.
    """
    cached = _RF_CACHE.get(model)
    if cached is not None:
        return cached
    probe, align = _tracer(model, in_channels)
    phases = sorted({0, align // 2, align - 1})
    size = max(128, 8 * align)
    margin = 0
    while True:
        centre = (size // 2) // align * align
        x = torch.zeros((len(phases) + 1, in_channels, size, size), dtype=torch.float64)
        for i, ph in enumerate(phases):
            x[i, :, centre + ph, centre + ph] = 1.0
        with torch.no_grad():
            y = probe(x)
        diff = (y[:-1] - y[-1:]).abs().sum(dim=1)  # (phases, H, W)
        margin = 0
        touches = False
        for i, ph in enumerate(phases):
            ys, xs = torch.nonzero(diff[i] > 0, as_tuple=True)
            if ys.numel() == 0:
                continue
            q = centre + ph
            margin = max(margin, int((ys - q).abs().max()), int((xs - q).abs().max()))
            if min(int(ys.min()), int(xs.min())) <= 0 or max(int(ys.max()), int(xs.max())) >= (
                size - 1
            ):
                touches = True
        if not touches:
            break
        if size >= _MAX_PROBE:
            warnings.warn(
                f"The network's receptive field is wider than {size // 2} pixels; tiles will "
                "not reproduce whole-slice inference exactly.",
                stacklevel=2,
            )
            break
        size *= 2
    result = ReceptiveField(margin=margin, alignment=align)
    _RF_CACHE[model] = result
    return result


# -- tiling ---------------------------------------------------------------------------------------
def _round_up(value: int, multiple: int) -> int:
    return -(-int(value) // multiple) * multiple


def _ramp(n: int) -> np.ndarray:
    """Rising cosine-squared ramp of ``n`` samples, strictly between 0 and 1."""
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    return np.sin(0.5 * np.pi * t) ** 2


@dataclass(frozen=True)
class TilePlan:
    """Where the square tiles of a (H, W) plane go and how each is weighted."""

    shape: tuple[int, int]
    tile: int
    overlap: int
    margin: int
    blend: int
    alignment: int
    origins_y: tuple[int, ...]
    origins_x: tuple[int, ...]

    @property
    def padded_shape(self) -> tuple[int, int]:
        return (self.origins_y[-1] + self.tile, self.origins_x[-1] + self.tile)

    @property
    def n_tiles(self) -> int:
        return len(self.origins_y) * len(self.origins_x)

    def axis_weights(self, index: int, count: int) -> np.ndarray:
        """1D weights of tile ``index`` of ``count`` along one axis."""
        w = np.ones(self.tile, dtype=np.float64)
        m, b, t = self.margin, self.blend, self.tile
        if index > 0:
            w[:m] = 0.0
            if b:
                w[m : m + b] *= _ramp(b)
        if index < count - 1:
            w[t - m :] = 0.0
            if b:
                w[t - m - b : t - m] *= _ramp(b)[::-1]
        return w

    def tiles(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(y0, x0, weight (tile, tile) float32)`` for every tile of the plane.

        A tile's weight depends only on which of its edges border other tiles, so at most
        nine distinct weight arrays exist; they are shared (read-only) between tiles.
        """
        ny, nx = len(self.origins_y), len(self.origins_x)
        cache: dict[tuple[bool, bool, bool, bool], np.ndarray] = {}
        for i, y0 in enumerate(self.origins_y):
            for j, x0 in enumerate(self.origins_x):
                key = (i > 0, i < ny - 1, j > 0, j < nx - 1)
                if key not in cache:
                    w = np.outer(self.axis_weights(i, ny), self.axis_weights(j, nx))
                    cache[key] = w.astype(np.float32)
                    cache[key].flags.writeable = False
                yield y0, x0, cache[key]

    def weight_sum(self) -> np.ndarray:
        """Sum of all tile weights over the padded plane (> 0 on the plane itself)."""
        total = np.zeros(self.padded_shape, dtype=np.float32)
        for y0, x0, w in self.tiles():
            total[y0 : y0 + self.tile, x0 : x0 + self.tile] += w
        return total


def plan_tiles(
    shape: tuple[int, int],
    tile_size: int,
    overlap: int,
    margin: int,
    alignment: int = 1,
) -> TilePlan:
    """Lay square tiles over a (H, W) plane.

    Tiles start on multiples of ``alignment`` and share ``overlap`` pixels; the tile size is
    then trimmed (never grown past ``tile_size``) so the tiles fit the plane with as little
    padding as possible.  ``margin`` pixels at each inner tile edge get zero weight; the rest
    of the overlap is a cosine ramp.  Exact for a network with this receptive-field margin
    when ``overlap >= 2 * margin``.
    """
    a = max(1, int(alignment))
    h, w = (int(s) for s in shape)
    if h < 1 or w < 1:
        raise TomosegError(f"Cannot tile an empty plane of shape {shape}.")
    tile = _round_up(max(int(tile_size), a), a)
    ov = _round_up(int(overlap), a) if overlap > 0 else 0
    if ov >= tile:
        raise TomosegError(
            f"The overlap ({ov} px) must be smaller than the tile ({tile} px); use larger "
            "tiles or a smaller overlap."
        )
    stride = tile - ov
    counts = [max(1, -(-(n - ov) // stride)) if n > tile else 1 for n in (h, w)]
    need = max(n if c == 1 else -(-(n - ov) // c) + ov for n, c in zip((h, w), counts))
    tile = min(tile, _round_up(need, a))
    stride = tile - ov
    origins = []
    for n in (h, w):
        c = 1 if n <= tile else -(-(n - ov) // stride)
        origins.append(tuple(i * stride for i in range(c)))
    m = int(margin) if ov >= 2 * int(margin) else ov // 4
    return TilePlan(
        shape=(h, w),
        tile=tile,
        overlap=ov,
        margin=m,
        blend=ov - 2 * m,
        alignment=a,
        origins_y=origins[0],
        origins_x=origins[1],
    )


def auto_overlap(rf: ReceptiveField) -> int:
    """The overlap that makes tiling exact for ``rf``: ``2 * margin`` plus a short ramp."""
    return _round_up(2 * rf.margin + AUTO_BLEND, rf.alignment)


def _effective_tiling(settings: ApplySettings, rf: ReceptiveField) -> tuple[int, int, list[str]]:
    """Tile size and overlap for these settings and this network, with notes."""
    notes: list[str] = []
    tile = _round_up(settings.tile_size, rf.alignment)
    if settings.overlap == "auto":
        overlap = auto_overlap(rf)
        if 2 * overlap > tile:
            tile = _round_up(2 * overlap, rf.alignment)
            notes.append(
                f"tile grown to {tile} px to hold the automatic overlap of {overlap} px "
                f"(receptive-field margin {rf.margin} px)"
            )
    else:
        overlap = _round_up(int(settings.overlap), rf.alignment)
        if overlap < 2 * rf.margin:
            warnings.warn(
                f"An overlap of {overlap} px is less than twice the network's receptive-field "
                f"margin ({rf.margin} px): tiles are blended but differ slightly from "
                f"whole-slice inference near their edges. Use overlap='auto' for exact results.",
                stacklevel=3,
            )
        if overlap >= tile:
            raise TomosegError(
                f"overlap ({overlap}) must be smaller than tile_size ({tile}) after rounding "
                f"to the network's alignment of {rf.alignment} px."
            )
    return tile, overlap, notes


# -- test-time augmentation ----------------------------------------------------------------------
def _tta_ops(n: int) -> list[tuple[int, bool]]:
    """(quarter turns, mirror) pairs: 8 = the dihedral group of the square, 4 = the flips."""
    if n == 8:
        return [(k, f) for f in (False, True) for k in range(4)]
    return [(0, False), (0, True), (2, False), (2, True)]  # id, flip X, rot180 = flip XY, flip Y


def _forward_op(x: torch.Tensor, k: int, mirror: bool) -> torch.Tensor:
    if mirror:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k, dims=(-2, -1)) if k else x


def _inverse_op(x: torch.Tensor, k: int, mirror: bool) -> torch.Tensor:
    if k:
        x = torch.rot90(x, -k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if mirror else x


# -- the network, prepared for applying -----------------------------------------------------------
#: Attribute set on a prepared copy whose inputs should be channels-last.
_CHANNELS_LAST = "_tomoseg_channels_last"


def _fold_batch_norm(model: nn.Module) -> int:
    """Fold every evaluation-mode batch norm that directly follows a convolution inside an
    ``nn.Sequential`` into that convolution's weights and bias (in place); returns how many.

    In evaluation mode batch norm is the per-channel affine map
    ``y = (x - mean) * g / sqrt(var + eps) + b``, so ``conv`` then ``bn`` is one convolution
    with weights scaled by ``g / sqrt(var + eps)`` and a shifted bias: the same function up to
    float rounding, one pass over the feature map fewer.  Only ``Sequential`` children are
    touched, where the order of the modules is the order they run in.
    """
    folded = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            if not isinstance(parent, nn.Sequential):
                continue
            names = list(parent._modules)
            for first, second in zip(names, names[1:]):
                conv, bn = parent._modules[first], parent._modules[second]
                if not (
                    type(conv) is nn.Conv2d
                    and type(bn) is nn.BatchNorm2d
                    and bn.track_running_stats
                    and bn.running_mean is not None
                    and bn.running_var is not None
                    and bn.num_features == conv.out_channels
                ):
                    continue
                scale = torch.rsqrt(bn.running_var + bn.eps)
                shift = -bn.running_mean * scale
                if bn.affine:
                    scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
                bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                conv.bias = nn.Parameter(bias * scale + shift)
                parent._modules[second] = nn.Identity()
                folded += 1
    return folded


def _fast_fft_size(n: int) -> int:
    """The smallest size >= ``n`` whose only prime factors are 2, 3 and 5 (fast FFTs)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


class FFTConv2d(nn.Module):
    """A stride-1 'same' zero-padded ``nn.Conv2d`` computed with FFTs (overlap-save).

    The input is cut into blocks of ``block`` pixels that overlap by ``kernel - 1``; each
    block's spectrum is multiplied by the conjugate spectrum of the kernel (a
    cross-correlation, as ``Conv2d`` computes) and summed over input channels with one
    complex matrix product per frequency, and the valid part of each block's inverse
    transform is kept.  For a 15x15 kernel over 40 channels this is a few percent of the
    multiply-adds of direct convolution; the result agrees to float rounding (~1e-6).
    The kernel's spectrum is computed once per device (the module is for inference: its
    weights must not change after the first call).
    """

    def __init__(self, conv: nn.Conv2d, block: int | None = None) -> None:
        super().__init__()
        k = int(conv.kernel_size[0])
        self.kernel = k
        self.block = int(block) if block else _fast_fft_size(max(6 * k, 32))
        if self.block < k + 1:
            raise ValueError("the FFT block must be larger than the kernel")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size
        self._spectrum: dict[torch.device, torch.Tensor] = {}

    @staticmethod
    def suits(module: nn.Module) -> bool:
        """True for the convolutions this replaces with a gain: square odd kernels of at
        least 7 pixels, stride and dilation 1, no groups, 'same' zero padding, and at least
        8 input channels (each input channel's transform is shared by all outputs; with
        one input channel the direct convolution was faster in our measurements)."""
        if type(module) is not nn.Conv2d:
            return False
        k = module.kernel_size
        return (
            k[0] == k[1]
            and k[0] % 2 == 1
            and k[0] >= 7
            and module.stride == (1, 1)
            and module.dilation == (1, 1)
            and module.groups == 1
            and module.padding == (k[0] // 2, k[0] // 2)
            and module.padding_mode == "zeros"
            and module.in_channels >= 8
        )

    def _kernel_matrix(self, device: torch.device) -> torch.Tensor:
        """The kernel's spectrum as one real (2C, 2O) matrix per frequency bin.

        A complex product ``y = x k`` is the real one ``[xr xi] @ [[kr ki], [-ki kr]]``;
        with real and imaginary parts interleaved (``view_as_real``) the sum over input
        channels becomes a batched real matrix product, which runs as fast float32 GEMMs.
        """
        got = self._spectrum.get(device)
        if got is None:
            n, c, o = self.block, self.in_channels, self.out_channels
            w = self.weight.to(device=device, dtype=torch.float32)
            spectrum = torch.conj(torch.fft.rfft2(w, s=(n, n))).resolve_conj()  # (O, C, n, nf)
            per_bin = spectrum.permute(2, 3, 1, 0).reshape(-1, c, o)  # (bins, C, O)
            kr, ki = per_bin.real, per_bin.imag
            got = torch.empty((per_bin.shape[0], c, 2, o, 2), dtype=torch.float32, device=device)
            got[:, :, 0, :, 0], got[:, :, 0, :, 1] = kr, ki
            got[:, :, 1, :, 0], got[:, :, 1, :, 1] = -ki, kr
            got = got.reshape(-1, 2 * c, 2 * o)
            self._spectrum[device] = got
        return got

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n, k, o = self.block, self.kernel, self.out_channels
        p, step = k // 2, n - k + 1
        ny, nx = -(-h // step), -(-w // step)
        m = b * ny * nx
        padded = F.pad(x.float(), (p, p + nx * step - w, p, p + ny * step - h))
        blocks = padded.unfold(2, n, step).unfold(3, n, step)  # (B, C, ny, nx, n, n)
        blocks = blocks.permute(0, 2, 3, 1, 4, 5).reshape(m, c, n, n)
        spectra = torch.fft.rfft2(blocks)  # (M, C, n, nf) complex
        nf = spectra.shape[-1]
        per_bin = torch.view_as_real(spectra.permute(2, 3, 0, 1)).reshape(n * nf, m, 2 * c)
        out = torch.bmm(per_bin, self._kernel_matrix(x.device))  # (bins, M, 2 O)
        out = torch.view_as_complex(out.reshape(n, nf, m, o, 2)).permute(2, 3, 0, 1)
        y = torch.fft.irfft2(out, s=(n, n))[..., :step, :step]  # (M, O, step, step)
        y = y.reshape(b, ny, nx, o, step, step).permute(0, 3, 1, 4, 2, 5)
        y = y.reshape(b, o, ny * step, nx * step)[:, :, :h, :w]
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y.to(x.dtype)


def _use_fft_convolutions(model: nn.Module) -> int:
    """Replace every convolution :meth:`FFTConv2d.suits` with an :class:`FFTConv2d` (in
    place); returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if FFTConv2d.suits(child):
                parent._modules[name] = FFTConv2d(child)  # type: ignore[arg-type]
                swapped += 1
    return swapped


def prepare_for_inference(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """A copy of ``model`` made fast for applying on ``device``; ``model`` is not changed.

    The copy is in evaluation mode, needs no gradients, has its batch norms folded into the
    convolutions before them (:func:`_fold_batch_norm`) and, on a CPU or a CUDA GPU, keeps
    its weights (and takes its inputs) channels-last, the layout oneDNN and cuDNN run
    convolutions fastest in.  Measured on a CPU (``benchmarks/speed.py``) this makes
    ``unet-lite`` about twice and ``tomoseg-cnn`` about 1.4 times as fast as the plain
    model; the outputs agree to float rounding (about 1e-7).
    """
    device = resolve_device(device)
    fast = copy.deepcopy(model).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    _fold_batch_norm(fast)
    if device.type == "cpu":
        _use_fft_convolutions(fast)
    fast.to(device)
    if device.type in ("cpu", "cuda"):
        fast.to(memory_format=torch.channels_last)
        setattr(fast, _CHANNELS_LAST, True)
    return fast


@contextlib.contextmanager
def _cudnn_autotune(device: torch.device) -> Iterator[None]:
    """On CUDA, let cuDNN time its convolution algorithms (FFT and Winograd among them) for
    each new tile shape and keep the fastest; the global setting is restored afterwards."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_ALLOCATOR_LOCK = threading.Lock()
_ALLOCATOR_USERS = 0


def _glibc() -> Any:
    """The C library when it is glibc (whose allocator :func:`_keep_freed_memory` tunes)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def _keep_freed_memory(enabled: bool = True) -> Iterator[None]:
    """Let glibc's allocator keep and reuse freed memory while a CPU run lasts.

    A forward pass allocates feature maps of tens to hundreds of MB.  By default glibc
    serves blocks that large with fresh ``mmap`` pages and gives them back on ``free``, so
    every pass page-faults its whole working set again: measured on a CPU this took about
    half of ``unet-lite``'s and ``tomoseg-cnn``'s apply time.  Here large blocks come from
    the heap (grown 1 GiB at a time) and freed memory stays for the next pass; the peak is
    unchanged (the same blocks are live at once).  Afterwards the allocator is set as its
    own dynamic tuning leaves it after large blocks were freed (mmap threshold 32 MiB, trim
    threshold 64 MiB) and the unused memory is returned (``malloc_trim``).  Does nothing
    on other C libraries and systems.  Process-wide, so nested and concurrent runs count.
    """
    global _ALLOCATOR_USERS
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    with _ALLOCATOR_LOCK:
        _ALLOCATOR_USERS += 1
        if _ALLOCATOR_USERS == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
            libc.mallopt(_M_TOP_PAD, 1 << 30)
    try:
        yield
    finally:
        with _ALLOCATOR_LOCK:
            _ALLOCATOR_USERS -= 1
            if _ALLOCATOR_USERS == 0:
                libc.mallopt(_M_TOP_PAD, 128 << 10)
                libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
                libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
                libc.malloc_trim(0)


class _Prefetched:
    """Iterate over ``items`` while a helper thread computes up to ``depth`` items ahead.

    Used for the input slices: reading (memory-mapped files), resampling and normalising
    the next slices overlaps the forward pass of the current ones (NumPy and torch release
    the GIL), which matters when a GPU does the network and the CPU everything else.  Items
    and an error raised while making one arrive in order; :meth:`close` stops the helper.
    """

    def __init__(self, items: Iterable[Any], depth: int = 2) -> None:
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._fill, args=(iter(items),), daemon=True)
        self._thread.start()

    def _put(self, entry: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # delivered to the consumer, in order
            self._put(("error", exc))

    def __iter__(self) -> _Prefetched:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "item":
            return value
        self._done = True
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the helper thread and drop what it made ahead."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._done = True


def _predict_batch(
    model: nn.Module,
    batch: np.ndarray | torch.Tensor,
    device: torch.device,
    *,
    amp: bool,
    tta: int,
) -> torch.Tensor:
    """Class probabilities (B, K, T, T) float32, on ``device``, for a batch of normalised
    tiles (a NumPy array or a tensor)."""
    x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
    x = x.to(device, non_blocking=True)
    if getattr(model, _CHANNELS_LAST, False):
        x = x.contiguous(memory_format=torch.channels_last)
    ops = _tta_ops(tta) if tta else [(0, False)]
    ctx = (
        torch.autocast(device_type="cuda", dtype=torch.float16)
        if amp and device.type == "cuda"
        else contextlib.nullcontext()
    )
    total = None
    with torch.inference_mode(), ctx, _cudnn_autotune(device):
        for k, mirror in ops:
            p = predict_proba(model, _forward_op(x, k, mirror)).float()
            p = _inverse_op(p, k, mirror)
            total = p if total is None else total + p
    assert total is not None
    if len(ops) > 1:
        total = total / len(ops)
    return total.contiguous()


def _pad_plane(stack: np.ndarray, padded: tuple[int, int]) -> np.ndarray:
    """Mirror-pad a (C, H, W) stack at the bottom and right to ``padded``."""
    _, h, w = stack.shape
    ph, pw = padded[0] - h, padded[1] - w
    if ph == 0 and pw == 0:
        return stack
    mode = "reflect" if h > 1 and w > 1 else "edge"
    return np.pad(stack, ((0, 0), (0, ph), (0, pw)), mode=mode)


class DeviceMemoryError(TomosegError, RuntimeError):
    """The device ran out of memory even for one tile of the smallest usable size."""


@dataclass
class MemoryBudget:
    """How many tiles go through the network at once, shrunk after an out-of-memory error.

    One budget is shared by all batches of a run, so once a batch size failed the rest of
    the run uses the smaller one.  ``notes`` receives a line for each adaptation.
    """

    batch_size: int
    notes: list[str] = field(default_factory=list)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error (``torch.cuda.OutOfMemoryError``, or a
    ``RuntimeError`` that says "out of memory", as MPS and older CUDA builds raise)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _release_device_memory(device: torch.device) -> None:
    """Hand cached blocks back to the device after an out-of-memory error."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps":
        mps = getattr(torch, "mps", None)
        if mps is not None and hasattr(mps, "empty_cache"):
            mps.empty_cache()


def _predict_within_memory(
    model: nn.Module,
    tiles: torch.Tensor,
    plan: TilePlan,
    device: torch.device,
    *,
    amp: bool,
    tta: int,
    budget: MemoryBudget,
) -> torch.Tensor:
    """Probabilities (B, K, T, T) on ``device`` for ``tiles`` (B, C, T, T), surviving OOM.

    The tiles go through in chunks of ``budget.batch_size``.  When a chunk runs out of
    device memory, the cache is emptied and the same tiles are tried again with half the
    batch size, down to one tile; a single tile that does not fit is split into smaller
    tiles with the same overlap and blending (:func:`_predict_split_tile`).  Each tile's
    result does not depend on the batch it was in, so the output is unchanged.
    """
    out: list[torch.Tensor] = []
    start = 0
    while start < tiles.shape[0]:
        size = min(budget.batch_size, tiles.shape[0] - start)
        chunk = tiles[start : start + size]
        failed = False
        try:
            out.append(_predict_batch(model, chunk, device, amp=amp, tta=tta))
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            failed = True  # handled below, once the traceback no longer holds tensors
        if not failed:
            start += size
            continue
        _release_device_memory(device)
        if size > 1:
            budget.batch_size = max(1, size // 2)
            budget.notes.append(
                f"out of device memory with {size} tiles per batch; continued with "
                f"{budget.batch_size}"
            )
            continue
        out.append(
            _predict_split_tile(model, chunk[0], plan, device, amp=amp, tta=tta, budget=budget)[
                None
            ]
        )
        start += 1
    return torch.cat(out) if len(out) > 1 else out[0]


def _predict_split_tile(
    model: nn.Module,
    tile: torch.Tensor,
    plan: TilePlan,
    device: torch.device,
    *,
    amp: bool,
    tta: int,
    budget: MemoryBudget,
) -> torch.Tensor:
    """Probabilities (K, T, T) of one (C, T, T) tile computed as smaller tiles.

    The sub-tiles keep the plan's overlap, receptive-field margin and alignment, so they
    blend exactly as the tiles of a slice do (see the module notes); the smallest usable
    sub-tile is the overlap plus one alignment step.
    """
    side = int(tile.shape[-1])
    align, overlap = plan.alignment, plan.overlap
    smaller = _round_up(max(side // 2, overlap + align), align)
    if smaller >= side:
        raise DeviceMemoryError(
            f"The {device.type} device ran out of memory even for one {side}-px tile; free "
            "device memory (other programs may hold it), or apply with device='cpu'."
        )
    sub = plan_tiles((side, side), smaller, overlap, plan.margin, align)
    note = (
        f"out of device memory for one {side}-px tile; it was computed as {sub.n_tiles} "
        f"tiles of {sub.tile} px"
    )
    if note not in budget.notes:
        budget.notes.append(note)
    ((_, probs),) = list(
        _iter_planes(
            model,
            [(0, tile.cpu().numpy())],
            sub,
            device=device,
            batch_size=budget.batch_size,
            amp=amp,
            tta=tta,
            budget=budget,
        )
    )
    return probs


def _iter_planes(
    model: nn.Module,
    stacks: Iterable[tuple[Any, np.ndarray]],
    plan: TilePlan,
    *,
    device: torch.device,
    batch_size: int,
    amp: bool = False,
    tta: int = 0,
    n_classes: int | None = None,
    should_stop: StopCheck = never_stop,
    budget: MemoryBudget | None = None,
) -> Iterator[tuple[Any, torch.Tensor]]:
    """:func:`predict_slices`, yielding each plane's probabilities as a float32 tensor on
    ``device``: the input plane goes to the device once, tiles are cut and blended there,
    and the caller can threshold and quantise it there too (one small copy back per slice).
    """
    budget = budget if budget is not None else MemoryBudget(batch_size)
    h, w = plan.shape
    t = plan.tile
    tile_list = list(plan.tiles())
    weights: dict[int, torch.Tensor] = {}
    for _, _, wt in tile_list:
        if id(wt) not in weights:
            weights[id(wt)] = torch.tensor(wt, device=device)  # (wt is read-only)
    wsum = torch.from_numpy(np.ascontiguousarray(plan.weight_sum()[:h, :w])).to(device)
    acc: dict[int, torch.Tensor] = {}
    keys: dict[int, Any] = {}
    remaining: dict[int, int] = {}
    batch: list[torch.Tensor] = []
    where: list[tuple[int, int, int, torch.Tensor]] = []

    def run_batch() -> Iterator[tuple[Any, torch.Tensor]]:
        tiles = torch.stack(batch)
        batch.clear()
        probs = _predict_within_memory(model, tiles, plan, device, amp=amp, tta=tta, budget=budget)
        del tiles
        if n_classes is not None and probs.shape[1] != n_classes:
            raise TomosegError(
                f"The network gives {probs.shape[1]} class probabilities but its file "
                f"records {n_classes} classes; the network file is inconsistent."
            )
        for p, (slot, y0, x0, wt) in zip(probs, where):
            if slot not in acc:
                acc[slot] = torch.zeros(
                    (p.shape[0], *plan.padded_shape), dtype=torch.float32, device=device
                )
            acc[slot][:, y0 : y0 + t, x0 : x0 + t] += p * wt
            remaining[slot] -= 1
            if remaining[slot] == 0:
                plane = acc.pop(slot)[:, :h, :w] / wsum
                yield keys.pop(slot), plane
                del remaining[slot]
        where.clear()

    for slot, (key, stack) in enumerate(stacks):
        if stack.ndim != 3 or tuple(stack.shape[1:]) != (h, w):
            raise TomosegError(f"Expected a (C, {h}, {w}) stack, got shape {stack.shape}.")
        padded = _pad_plane(np.asarray(stack, dtype=np.float32), plan.padded_shape)
        plane_in = torch.from_numpy(np.ascontiguousarray(padded)).to(device, non_blocking=True)
        keys[slot] = key
        remaining[slot] = len(tile_list)
        for y0, x0, wt in tile_list:
            batch.append(plane_in[:, y0 : y0 + t, x0 : x0 + t])
            where.append((slot, y0, x0, weights[id(wt)]))
            if len(batch) >= batch_size:
                if should_stop():
                    return
                yield from run_batch()
        del plane_in
    if batch:
        if should_stop():
            return
        yield from run_batch()


def predict_slices(
    model: nn.Module,
    stacks: Iterable[tuple[Any, np.ndarray]],
    plan: TilePlan,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    amp: bool = False,
    tta: int = 0,
    n_classes: int | None = None,
    should_stop: StopCheck = never_stop,
    budget: MemoryBudget | None = None,
) -> Iterator[tuple[Any, np.ndarray]]:
    """Tiled prediction of whole planes: yields ``(key, probabilities (K, H, W) float32)``.

    ``stacks`` gives ``(key, normalised input (C, H, W))`` with H, W = ``plan.shape``.  The
    tiles of consecutive planes share batches; each plane is yielded as soon as all its tiles
    are done, so at most a batch's worth of planes is held.  Stops early (yielding nothing
    more) when ``should_stop()`` is true between batches.  A device out-of-memory error is
    survived by smaller batches, then smaller tiles (``budget`` carries the reduced batch
    size from call to call and collects notes; see :func:`_predict_within_memory`).
    ``model`` is used as given (see :func:`prepare_for_inference` for a faster copy).
    """
    for key, plane in _iter_planes(
        model,
        stacks,
        plan,
        device=resolve_device(device),
        batch_size=batch_size,
        amp=amp,
        tta=tta,
        n_classes=n_classes,
        should_stop=should_stop,
        budget=budget,
    ):
        yield key, plane.cpu().numpy()


# -- voxel size -----------------------------------------------------------------------------------


def _network_voxel_size(meta: Any) -> float | None:
    vs = getattr(meta, "voxel_size", None)
    if vs is None:
        return None
    values = np.atleast_1d(np.asarray(vs, dtype=float))
    value = float(values[-1])
    return value if np.isfinite(value) and value > 0 else None


@dataclass(frozen=True)
class _Geometry:
    """How the tomogram's grid maps onto the network's."""

    plane: tuple[int, int]  # tomogram (H, W)
    net_plane: tuple[int, int]  # (H', W') the network sees
    z_step: float  # context spacing in tomogram slices

    @property
    def rescaled(self) -> bool:
        return self.plane != self.net_plane


def _check_voxel_size(
    tomo_vs: tuple[float, float, float] | None,
    net_vs: float | None,
    shape: tuple[int, int, int],
    settings: ApplySettings,
    context: int,
) -> tuple[_Geometry, list[str]]:
    plane = (int(shape[1]), int(shape[2]))
    same = _Geometry(plane=plane, net_plane=plane, z_step=1.0)
    if tomo_vs is None or net_vs is None:
        which = "tomogram" if tomo_vs is None else "network"
        warnings.warn(
            f"The {which}'s voxel size is unknown, so it cannot be checked against the "
            f"{'network' if tomo_vs is None else 'tomogram'}'s; applying at the tomogram's "
            "pixel size as is. Set the voxel size to get a checked (or rescaled) result.",
            MissingVoxelSizeWarning,
            stacklevel=4,
        )
        return same, []
    axes = [tomo_vs[1], tomo_vs[2]] + ([tomo_vs[0]] if context > 0 else [])
    worst = max(abs(v - net_vs) / net_vs for v in axes)
    if worst <= settings.voxel_size_tolerance:
        return same, []
    sizes = " x ".join(f"{v:g}" for v in tomo_vs)
    if settings.voxel_size_policy == "refuse":
        raise TomosegError(
            f"The tomogram's voxel size ({sizes} A, Z x Y x X) differs from the network's "
            f"({net_vs:g} A) by {100 * worst:.0f}%, more than the tolerance of "
            f"{100 * settings.voxel_size_tolerance:g}%. Bin or resample the tomogram to "
            f"{net_vs:g} A, or apply with voxel_size_policy='rescale'."
        )
    net_plane = (
        max(1, round(plane[0] * tomo_vs[1] / net_vs)),
        max(1, round(plane[1] * tomo_vs[2] / net_vs)),
    )
    z_step = net_vs / tomo_vs[0] if context > 0 else 1.0
    notes = []
    if net_plane != plane:
        notes.append(
            f"rescaled in-plane from {tomo_vs[1]:g} x {tomo_vs[2]:g} A to the network's "
            f"{net_vs:g} A ({plane[0]} x {plane[1]} -> {net_plane[0]} x {net_plane[1]} px) "
            "and back"
        )
    if z_step != 1.0:
        notes.append(
            f"context slices taken {z_step:.3g} slices apart (Z voxel {tomo_vs[0]:g} A, "
            f"network {net_vs:g} A)"
        )
    return _Geometry(plane=plane, net_plane=net_plane, z_step=z_step), notes


def _resize_tensor(planes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resampling of (N, H, W) float32 planes to ``size`` (antialiased when
    shrinking), on the planes' device."""
    if tuple(planes.shape[-2:]) == tuple(size):
        return planes
    shrinking = size[0] < planes.shape[-2] or size[1] < planes.shape[-1]
    out = F.interpolate(
        planes[None], size=size, mode="bilinear", align_corners=False, antialias=shrinking
    )
    return out[0]


def _resize(planes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """:func:`_resize_tensor` for NumPy planes."""
    if tuple(planes.shape[-2:]) == tuple(size):
        return planes
    t = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))
    return _resize_tensor(t, size).numpy()


# -- the run --------------------------------------------------------------------------------------
def _meta_checks(network: Any) -> tuple[Any, nn.Module, list[str], int]:
    meta = getattr(network, "meta", None)
    model = getattr(network, "model", None)
    if meta is None or not isinstance(model, nn.Module):
        raise TomosegError(
            "Expected a loaded network (with .model and .meta); load one with "
            "napari_tomoseg.model_file.load_network(path)."
        )
    class_names = [str(n) for n in meta.class_names]
    n_classes = int(meta.n_classes)
    if len(class_names) != n_classes or n_classes < 2:
        raise TomosegError(
            f"The network records {n_classes} classes but {len(class_names)} class names; "
            "the network file is inconsistent."
        )
    context = int(getattr(meta, "context_slices", 0) or 0)
    if int(meta.in_channels) != 2 * context + 1:
        raise TomosegError(
            f"The network takes {meta.in_channels} input channels but records "
            f"{context} context slices (expected {2 * context + 1} channels); the network "
            "file is inconsistent."
        )
    return meta, model, class_names, context


def _make_mask(p: np.ndarray | torch.Tensor, threshold: float) -> np.ndarray | torch.Tensor:
    """uint8 class indices from (K, H, W) probabilities (rules in the module notes).

    A tensor gives a tensor on its device (so a GPU run thresholds on the GPU), an array an
    array.
    """
    t = p if isinstance(p, torch.Tensor) else torch.from_numpy(np.array(p, dtype=np.float32))
    if t.shape[0] == 2:
        mask = (t[1] >= threshold).to(torch.uint8)
    else:
        top, best = torch.max(t, dim=0)  # ties: the first (lowest) class, as numpy.argmax
        keep = (best > 0) & (top >= threshold)
        mask = torch.where(keep, best, torch.zeros_like(best)).to(torch.uint8)
    return mask if isinstance(p, torch.Tensor) else mask.numpy()


def _allocate_outputs(
    shape: tuple[int, int, int],
    n_foreground: int,
    out: ApplyOutputs | None,
    keep_probabilities: bool,
) -> ApplyOutputs:
    if out is None:
        probs = (
            [np.zeros(shape, dtype=PROBABILITY_DTYPE) for _ in range(n_foreground)]
            if keep_probabilities
            else None
        )
        return ApplyOutputs(mask=np.zeros(shape, dtype=np.uint8), probabilities=probs)
    arrays = [out.mask, *(out.probabilities or [])]
    for a in arrays:
        if tuple(a.shape) != shape:
            raise TomosegError(
                f"An output array has shape {tuple(a.shape)}; the tomogram's is {shape}."
            )
    if out.probabilities is not None and len(out.probabilities) != n_foreground:
        raise TomosegError(
            f"{len(out.probabilities)} probability outputs were given for {n_foreground} "
            "foreground classes."
        )
    return out


class _SliceSource:
    """Prepared (rescaled, normalised) slices of the tomogram, cached for the current slab.

    NaN and infinite voxels are refused (``refuse=True``) or replaced by the tomogram's
    mean (the plane's finite mean for box normalisation) before normalising, so they do not
    spread through the network; ``nonfinite[z]`` then holds slice ``z``'s mask of them (on
    the tomogram's grid) until the run has labelled them background.
    """

    def __init__(
        self,
        volume: np.ndarray,
        normalisation: Normalisation,
        stats: tuple[float, float] | None,
        geometry: _Geometry,
        *,
        refuse: bool = False,
    ) -> None:
        self.volume = volume
        self.norm = normalisation
        self.stats = stats
        self.geometry = geometry
        self.refuse = refuse
        self.cache: dict[int, np.ndarray] = {}
        self.nonfinite: dict[int, np.ndarray] = {}
        self.filled_voxels = 0
        self.filled_slices: set[int] = set()

    def _finite(self, index: int, raw: np.ndarray) -> np.ndarray:
        finite = np.isfinite(raw)
        if finite.all():
            return raw
        count = int(raw.size - np.count_nonzero(finite))
        if self.refuse:
            raise TomosegError(
                f"Slice z={index} of the tomogram has {count} NaN or infinite voxels; repair "
                "the tomogram (e.g. re-run the reconstruction or filter), or apply with "
                "nonfinite='fill' to label them background."
            )
        if index not in self.filled_slices:
            if not self.filled_slices:
                warnings.warn(
                    f"Slice z={index} of the tomogram has {count} NaN or infinite voxels; "
                    "the network sees the tomogram's mean there and they are labelled "
                    "background.",
                    UserWarning,
                    stacklevel=5,
                )
            self.filled_slices.add(index)
            self.filled_voxels += count
            self.nonfinite[index] = ~finite
        if self.stats is not None:
            fill = self.stats[0]
        else:
            fill = float(raw[finite].mean()) if finite.any() else 0.0
        return np.where(finite, raw, np.float32(fill))

    def add_note(self, notes: list[str]) -> None:
        """Say in ``notes`` how many NaN / infinite voxels were filled."""
        if self.filled_voxels:
            notes.append(
                f"{self.filled_voxels} NaN or infinite voxels in {len(self.filled_slices)} "
                "slice(s) were given the tomogram's mean and labelled background"
            )

    def plane(self, index: int) -> np.ndarray:
        got = self.cache.get(index)
        if got is None:
            raw = self._finite(index, np.asarray(self.volume[index], dtype=np.float32))[None]
            raw = _resize(raw, self.geometry.net_plane)
            if self.norm.mode == "box":
                got = self.norm.apply_to_volume(raw)[0]
            else:
                assert self.stats is not None
                got = self.norm.apply_with_stats(raw, *self.stats)[0]
            self.cache[index] = got
        return got

    def positions(self, z: int, context: int) -> list[tuple[int, int, float]]:
        """(lower slice, upper slice, fraction) of each context channel of slice ``z``."""
        nz = self.volume.shape[0]
        out = []
        for k in range(-context, context + 1):
            pos = min(max(z + k * self.geometry.z_step, 0.0), nz - 1.0)
            lo = int(math.floor(pos))
            frac = pos - lo
            hi = min(lo + 1, nz - 1)
            out.append((lo, hi, frac))
        return out

    def stack(self, z: int, context: int) -> np.ndarray:
        """The (C, H', W') input of slice ``z``; slices no longer needed leave the cache."""
        positions = self.positions(z, context)
        self.keep_from(min(lo for lo, _, _ in positions))
        chans = []
        for lo, hi, frac in positions:
            a = self.plane(lo)
            chans.append(a if frac < 1e-6 else (1.0 - frac) * a + frac * self.plane(hi))
        return np.stack(chans).astype(np.float32, copy=False)

    def keep_from(self, first: int) -> None:
        for key in [k for k in self.cache if k < first]:
            del self.cache[key]


def iter_apply(
    network: Any,
    volume: np.ndarray,
    *,
    voxel_size: VoxelSize | None = None,
    settings: ApplySettings | None = None,
    should_stop: StopCheck = never_stop,
    out: ApplyOutputs | None = None,
    keep_probabilities: bool = True,
    z_range: tuple[int, int] | None = None,
) -> Generator[Progress, None, ApplyResult]:
    """Apply ``network`` to a (Z, Y, X) ``volume``; yields progress, returns the result.

    ``volume`` may be memory-mapped: it is read slice by slice.  ``voxel_size``
    is the tomogram's (Z, Y, X, or one value) in Angstrom.  Results go into ``out`` (e.g.
    memory maps) or new in-memory arrays.  When ``should_stop()`` becomes true the run ends
    after the current batch and returns with ``stopped=True``.

    ``z_range=(z0, z1)`` computes only those slices, exactly as a whole run would (the
    whole tomogram's normalisation, neighbouring context slices, the same tile batches):
    the outputs then hold ``z1 - z0`` slices.  ``z0`` must be a multiple of
    ``settings.z_chunk`` (batches start there); this is how a tomogram is split across
    cluster workers.
    """
    settings = (settings or ApplySettings()).resolved(network)
    settings.validate()
    meta, model, class_names, context = _meta_checks(network)
    if volume.ndim != 3:
        raise TomosegError(
            f"Networks are applied to 3D (Z, Y, X) tomograms; got shape {tuple(volume.shape)}."
        )
    if volume.dtype.kind not in "biuf" or min(volume.shape) < 1:
        raise TomosegError(
            f"Cannot apply a network to an array of dtype {volume.dtype} and shape "
            f"{tuple(volume.shape)}."
        )
    vs = voxel_triple(voxel_size)
    z_lo, z_hi = _check_z_range(z_range, int(volume.shape[0]), settings)
    if settings.shrink > 1:
        if z_range is not None:
            raise TomosegError("A slice range cannot be combined with shrink > 1.")
        result = yield from _iter_apply_binned(
            network, volume, vs, settings, should_stop, out, keep_probabilities
        )
        return result

    start = time.perf_counter()
    shape = tuple(int(s) for s in volume.shape)
    n_fg = len(class_names) - 1
    slab = (z_hi - z_lo, shape[1], shape[2])
    outputs = _allocate_outputs(slab, n_fg, out, keep_probabilities)
    geometry, notes = _check_voxel_size(vs, _network_voxel_size(meta), shape, settings, context)

    device = resolve_device(settings.device)
    yield Progress("apply", 0, slab[0], message="measuring the network and the tomogram")
    rf = receptive_field(model, context * 2 + 1)
    fast = prepare_for_inference(model, device)  # a copy: the caller's model is not moved
    tile, overlap, tile_notes = _effective_tiling(settings, rf)
    notes += tile_notes
    plan = plan_tiles(geometry.net_plane, tile, overlap, rf.margin, rf.alignment)
    norm = Normalisation.from_dict(dict(meta.normalisation))
    stats = robust_stats(volume) if norm.mode == "tomogram" else None
    source = _SliceSource(volume, norm, stats, geometry, refuse=settings.nonfinite == "refuse")
    amp = bool(settings.mixed_precision) and device.type == "cuda"
    tta = settings.tta_transforms if settings.tta else 0
    budget = MemoryBudget(int(settings.batch_size), notes)
    done = 0

    def finish(stopped: bool) -> ApplyResult:
        return _run_result(
            outputs,
            class_names,
            vs,
            start,
            stopped=stopped,
            slices_done=done,
            notes=notes,
            threshold=settings.threshold,
        )

    # the next slices are read and normalised while the network works on these
    prefetched = _Prefetched(
        ((z, source.stack(z, context)) for z in range(z_lo, z_hi)), depth=settings.z_chunk
    )
    allocator = _keep_freed_memory(device.type == "cpu")
    allocator.__enter__()
    try:
        for z0 in range(z_lo, z_hi, settings.z_chunk):
            z1 = min(z_hi, z0 + settings.z_chunk)
            stacks = itertools.islice(prefetched, z1 - z0)
            for z, probs in _iter_planes(
                fast,
                stacks,
                plan,
                device=device,
                batch_size=settings.batch_size,
                amp=amp,
                tta=tta,
                n_classes=len(class_names),
                should_stop=should_stop,
                budget=budget,
            ):
                if probs.device.type not in ("cpu", "cuda"):
                    probs = probs.cpu()  # e.g. MPS: resampling and rounding on the CPU
                if geometry.rescaled:
                    probs = _resize_tensor(probs, geometry.plane)  # linear: sums stay 1
                bad = source.nonfinite.pop(z, None)
                if bad is not None:  # no data there: background, probability 0
                    where_bad = torch.from_numpy(bad).to(probs.device)
                    probs[:, where_bad] = 0.0
                    probs[0, where_bad] = 1.0
                # threshold and quantise where the probabilities are; copy back only bytes
                outputs.mask[z - z_lo] = _make_mask(probs, settings.threshold).cpu().numpy()
                if outputs.probabilities is not None:
                    stored = _quantize_tensor(probs[1:]).cpu().numpy()
                    for k, arr in enumerate(outputs.probabilities):
                        arr[z - z_lo] = stored[k]
                done += 1
            if done < z1 - z_lo:  # asked to stop between two batches
                source.add_note(notes)
                return finish(stopped=True)
            elapsed = time.perf_counter() - start
            yield Progress(
                "apply",
                done,
                slab[0],
                message=f"slices {z0}-{z1 - 1} of {shape[0]}",
                metrics={"slices_per_second": done / elapsed if elapsed > 0 else 0.0},
            )
    finally:
        prefetched.close()
        allocator.__exit__(None, None, None)
    source.add_note(notes)
    return finish(stopped=False)


def _check_z_range(
    z_range: tuple[int, int] | None, depth: int, settings: ApplySettings
) -> tuple[int, int]:
    """``(z0, z1)`` of the slices to compute (all of them when ``z_range`` is None)."""
    if z_range is None:
        return 0, depth
    z0, z1 = (int(v) for v in z_range)
    if not 0 <= z0 < z1 <= depth:
        raise TomosegError(f"Slice range {z_range} is outside the tomogram's 0..{depth}.")
    if z0 % settings.z_chunk:
        raise TomosegError(
            f"A slice range must start on a multiple of z_chunk ({settings.z_chunk}), "
            f"got {z0}, so that its tiles are batched as in a whole run."
        )
    return z0, z1


class _QuantizingSink:
    """Array-like target for :func:`unbin_volume` that stores float blocks quantised."""

    def __init__(self, target: np.ndarray) -> None:
        self.target = target
        self.shape = target.shape
        self.dtype = np.dtype(np.float32)

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        self.target[key] = quantize_probabilities(value)

    def __getitem__(self, key: Any) -> np.ndarray:
        return probabilities_as_float(self.target[key])


def _iter_apply_binned(
    network: Any,
    volume: np.ndarray,
    vs: tuple[float, float, float] | None,
    settings: ApplySettings,
    should_stop: StopCheck,
    out: ApplyOutputs | None,
    keep_probabilities: bool,
) -> Generator[Progress, None, ApplyResult]:
    """Apply to a copy binned by ``settings.shrink`` and bring the result to full size."""
    start = time.perf_counter()
    shrink = int(settings.shrink)
    _, _, class_names, _ = _meta_checks(network)
    shape = tuple(int(s) for s in volume.shape)
    n_fg = len(class_names) - 1
    outputs = _allocate_outputs(shape, n_fg, out, keep_probabilities)  # type: ignore[arg-type]
    yield Progress("bin", 0, 1, message=f"binning by {shrink}")
    binned = bin_volume(volume, shrink)
    small_vs = None if vs is None else (vs[0] * shrink, vs[1] * shrink, vs[2] * shrink)
    inner = yield from iter_apply(
        network,
        binned,
        voxel_size=small_vs,
        settings=replace(settings, shrink=1),
        should_stop=should_stop,
    )
    notes = [f"applied to a copy binned by {shrink}", *inner.notes]
    if inner.stopped or should_stop():
        return _run_result(
            outputs,
            class_names,
            vs,
            start,
            stopped=True,
            slices_done=0,
            notes=notes,
            threshold=settings.threshold,
        )
    del binned
    full = outputs.probabilities or [np.zeros(shape, dtype=PROBABILITY_DTYPE) for _ in range(n_fg)]
    for k, small in enumerate(inner.probabilities):
        yield Progress("unbin", k, n_fg, message=f"unbinning {class_names[k + 1]}")
        unbin_volume(
            probabilities_as_float(small),
            shrink,
            shape,
            clip=(0.0, 1.0),
            out=_QuantizingSink(full[k]),  # type: ignore[arg-type]
        )
        if should_stop():
            return _run_result(
                outputs,
                class_names,
                vs,
                start,
                stopped=True,
                slices_done=0,
                notes=notes,
                threshold=settings.threshold,
            )
    for z in range(shape[0]):
        fg = np.stack([probabilities_as_float(f[z]) for f in full])
        probs = np.concatenate([np.clip(1.0 - fg.sum(axis=0), 0.0, 1.0)[None], fg])
        outputs.mask[z] = _make_mask(probs, settings.threshold)
    yield Progress("unbin", n_fg, n_fg, message="done")
    return _run_result(
        outputs,
        class_names,
        vs,
        start,
        stopped=False,
        slices_done=shape[0],
        notes=notes,
        threshold=settings.threshold,
    )


def apply_network(
    network: Any,
    volume: np.ndarray,
    callback: Callable[[Progress], None] | None = None,
    **kw: Any,
) -> ApplyResult:
    """Run :func:`iter_apply` to the end (``kw`` as there); ``callback`` sees the progress."""
    return drive(iter_apply(network, volume, **kw), callback)


def apply_binned(
    network: Any,
    volume: np.ndarray,
    shrink: int,
    *,
    settings: ApplySettings | None = None,
    **kw: Any,
) -> ApplyResult:
    """Apply to ``volume`` binned by ``shrink``; probabilities and mask come back full size."""
    settings = replace(settings or ApplySettings(), shrink=shrink)
    return apply_network(network, volume, settings=settings, **kw)


# -- files ----------------------------------------------------------------------------------------
class _Stopped(Exception):
    """Raised inside the atomic-write block so a cancelled run's temporary files go away."""


_HeaderStats = HeaderStats


class _RecordingArray:
    """Wraps an output memory map: writes go through and are counted for the header; then
    the map's pages, and those of ``release`` (the memory-mapped input), leave resident
    memory, so it stays flat however many slices the files hold (:func:`release_pages`)."""

    def __init__(self, target: np.ndarray, stats: _HeaderStats, release: Sequence = ()) -> None:
        self.target = target
        self.stats = stats
        self.shape = target.shape
        self.dtype = np.dtype(target.dtype)
        self.release = (target, *release)

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        self.target[key] = value
        self.stats.add(value)
        for array in self.release:
            release_pages(array)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.target[key]).astype(self.dtype)


def iter_apply_file(
    network: Any,
    tomogram_path: str | os.PathLike,
    output_mask_path: str | os.PathLike,
    output_prob_path: str | os.PathLike | None = None,
    *,
    settings: ApplySettings | None = None,
    overwrite: bool = False,
    should_stop: StopCheck = never_stop,
    voxel_size: VoxelSize | None = None,
) -> Generator[Progress, None, ApplyResult]:
    """Apply ``network`` to a tomogram file, streaming, writing MRC files with the voxel
    size kept.

    The tomogram (MRC, or OME-Zarr: see :func:`napari_tomoseg.io.read_tomogram`) is
    memory-mapped or read lazily; the mask (uint8 class indices) and, if
    ``output_prob_path`` is given, the probability maps (``round(100 * p)``, one file per
    foreground class, see :func:`probability_paths`) are written through memory maps into
    temporary files renamed at the end.  A cancelled run returns ``stopped=True`` and leaves
    no file under the final names.  ``voxel_size`` overrides the header's.  The returned
    result's arrays are read-only memory maps of the written files.
    """
    settings = settings or ApplySettings()
    settings.validate()
    _, _, class_names, _ = _meta_checks(network)
    src = Path(tomogram_path)
    tomo = read_tomogram(src)
    if tomo.data.ndim != 3:
        raise TomosegError(f"{src} holds a 2D image; networks are applied to 3D tomograms.")
    vs = voxel_triple(voxel_size) if voxel_size is not None else tomo.voxel_size
    shape = tuple(int(s) for s in tomo.data.shape)
    mask_path = Path(output_mask_path)
    prob_paths = probability_paths(output_prob_path, class_names[1:]) if output_prob_path else []
    targets = [mask_path, *prob_paths]
    for p in targets:
        if p.resolve() == src.resolve():
            raise TomosegError(
                f"The output {p} would replace the input tomogram; choose another name."
            )
        if str(p).lower().endswith(".gz"):
            raise TomosegError(f"{p}: compressed outputs cannot be streamed; drop the .gz ending.")
    if len(set(targets)) != len(targets):
        raise TomosegError("The mask and probability outputs must have different file names.")

    result: ApplyResult | None = None
    try:
        with contextlib.ExitStack() as stack:
            # all outputs are renamed together at the end, or none is (io.atomic_paths)
            tmps = stack.enter_context(atomic_paths(targets, overwrite=overwrite))
            try:
                dtypes = [np.uint8] + [PROBABILITY_DTYPE] * (len(tmps) - 1)
                opened = [
                    stack.enter_context(new_mrc_mmap(t, shape, d)) for t, d in zip(tmps, dtypes)
                ]
            except OSError as exc:
                raise TomosegIOError(
                    f"Cannot write {', '.join(str(t) for t in targets)}: {exc.strerror or exc} "
                    f"(they need {len(targets) * math.prod(shape) / 1e6:.0f} MB); free disk "
                    "space or write elsewhere. Nothing was replaced."
                ) from None
            mrcs = [mrc for mrc, _ in opened]
            stats = [HeaderStats() for _ in mrcs]
            arrays = [
                _RecordingArray(data, s, release=[tomo.data] if k == 0 else [])
                for k, ((_, data), s) in enumerate(zip(opened, stats))
            ]
            outputs = ApplyOutputs(
                mask=arrays[0],  # type: ignore[arg-type]
                probabilities=arrays[1:] or None,  # type: ignore[arg-type]
            )
            result = yield from iter_apply(
                network,
                tomo.data,
                voxel_size=vs,
                settings=settings,
                should_stop=should_stop,
                out=outputs,
                keep_probabilities=bool(prob_paths),
            )
            if result.stopped:
                raise _Stopped
            for k, (m, s) in enumerate(zip(mrcs, stats)):
                finish_header(m, vs, tomo.origin, s, output_header_texts(src, probability=k > 0))
                m.flush()
    except _Stopped:
        assert result is not None
        result.mask = None
        result.probabilities = []
        return result
    assert result is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingVoxelSizeWarning)
        result.mask = read_tomogram(mask_path).data
        result.probabilities = [read_tomogram(p).data for p in prob_paths]
    result.mask_path = mask_path
    result.probability_paths = prob_paths
    return result


def apply_file(
    network: Any,
    tomogram_path: str | os.PathLike,
    output_mask_path: str | os.PathLike,
    output_prob_path: str | os.PathLike | None = None,
    callback: Callable[[Progress], None] | None = None,
    **kw: Any,
) -> ApplyResult:
    """Run :func:`iter_apply_file` to the end; ``callback`` sees the progress."""
    gen = iter_apply_file(network, tomogram_path, output_mask_path, output_prob_path, **kw)
    return drive(gen, callback)


__all__ = [
    "PROBABILITY_SCALE",
    "ApplyOutputs",
    "ApplyResult",
    "ApplySettings",
    "DeviceMemoryError",
    "MemoryBudget",
    "ReceptiveField",
    "TilePlan",
    "apply_binned",
    "apply_file",
    "apply_network",
    "auto_overlap",
    "iter_apply",
    "is_out_of_memory",
    "iter_apply_file",
    "plan_tiles",
    "predict_slices",
    "probabilities_as_float",
    "probability_paths",
    "quantize_probabilities",
    "receptive_field",
    "resolve_device",
]
