"""Where the tiles of a slice go and how they are blended, so tiled inference equals
whole-slice inference.

A fully convolutional network is translation equivariant for shifts that are multiples of
its total pooling factor (the *alignment*).  :func:`receptive_field` measures how far an
output pixel looks (the *margin*) and the alignment; :func:`plan_tiles` starts every tile on
a multiple of the alignment and gives it zero weight within ``margin`` pixels of an edge it
shares with another tile, blending the rest of the overlap with a cosine-squared ramp (a
partition of unity).  With ``overlap >= 2 * margin`` (:func:`auto_overlap`; the tile
grows to twice the overlap when needed) the result equals whole-slice inference to float
rounding, except within ``margin`` pixels of a slice's far edges (mirrored padding there);
a smaller explicit overlap still blends smoothly but is not exact, and a warning says so.
Also here: the orientations of test-time augmentation.  Sliding-window inference with
blending follows nnU-Net and MemBrain-seg (Gaussian weights there; a ramp with a discarded
margin here keeps fully convolutional networks exact); test-time augmentation over the 8
rotations / flips of the plane follows Ais and MemBrain-seg.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import TomosegError

if TYPE_CHECKING:
    from .settings import ApplySettings

#: Width (pixels) of the cosine blending ramp added to ``2 * margin`` by ``overlap="auto"``.
AUTO_BLEND = 8


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

    Parameters
    ----------
    model
        A 2D fully convolutional network (its weights are not used, nor is it changed).
    in_channels
        The channels it takes (``2 * context_slices + 1``).
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

    The tile size is trimmed (never grown past ``tile_size``) so the tiles fit the plane
    with as little padding as possible.  Exact for a network with this receptive-field
    margin when ``overlap >= 2 * margin``.

    Parameters
    ----------
    shape
        The plane's (H, W).
    tile_size
        The largest tile side, pixels (rounded up to ``alignment``).
    overlap
        Pixels shared by neighbouring tiles (rounded up to ``alignment``).
    margin
        Pixels at each inner tile edge that get zero weight (a quarter of the overlap when
        the overlap is under ``2 * margin``); the rest of the overlap is a cosine ramp.
    alignment
        Tiles start on multiples of it (the network's, :class:`ReceptiveField`).
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


def _effective_tiling(
    settings: ApplySettings, rf: ReceptiveField, stacklevel: int = 3
) -> tuple[int, int, list[str]]:
    """Tile size and overlap for these settings and this network, with notes (a warning
    for an inexact overlap, ``stacklevel`` frames up)."""
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
                stacklevel=stacklevel,
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
