"""Making a network fast to apply on a CPU (and a GPU) without changing its results.

:func:`prepare_for_inference` makes a copy with batch norm folded into the convolutions,
channels-last weights and, on a CPU, large-kernel convolutions computed by FFT
(:class:`FFTConv2d`); :func:`_keep_freed_memory` lets glibc keep freed memory for the next
forward pass while a CPU run lasts, and :func:`_cudnn_autotune` lets cuDNN pick its fastest
algorithms on CUDA.  Each agrees with the plain model to float rounding; the measurements
are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
import platform
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .device import resolve_device

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
    convolutions before them (:func:`_fold_batch_norm`), on a CPU computes its large-kernel
    convolutions by FFT (:class:`FFTConv2d`) and, on a CPU or a CUDA GPU, keeps its weights
    (and takes its inputs) channels-last, the layout oneDNN and cuDNN run convolutions
    fastest in (speed-ups in ``docs/benchmarks.md``).  The outputs agree with the plain
    model's to float rounding.

    Parameters
    ----------
    model
        The network.
    device
        Where the copy goes (a name or ``torch.device``, see :func:`resolve_device`).
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
#: Set to ``0`` (or ``no``, ``off``, ``false``) to leave glibc's allocator alone during CPU
#: runs (:func:`_keep_freed_memory`), at the cost of their speed.
KEEP_FREED_MEMORY_ENV = "TOMOSEG_KEEP_FREED_MEMORY"


def _glibc() -> Any:
    """The C library when it is glibc (whose allocator :func:`_keep_freed_memory` tunes)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _allocator_tuning_allowed() -> bool:
    """False when :data:`KEEP_FREED_MEMORY_ENV` turns the allocator tuning off."""
    value = os.environ.get(KEEP_FREED_MEMORY_ENV, "").strip().lower()
    return value not in ("0", "no", "off", "false")


@contextlib.contextmanager
def _keep_freed_memory(enabled: bool = True) -> Iterator[None]:
    """Let glibc's allocator keep and reuse freed memory while a CPU run lasts.

    A forward pass allocates feature maps of tens to hundreds of MB.  By default glibc
    serves blocks that large with fresh ``mmap`` pages and gives them back on ``free``, so
    every pass page-faults its whole working set again (on a CPU about half the apply time
    of ``unet-lite`` and ``tomoseg-cnn``, ``docs/benchmarks.md``).  Here large blocks come
    from the heap (grown 1 GiB at a time) and freed memory stays for the next pass; the peak
    is unchanged (the same blocks are live at once).

    When the last run ends (however it ends: finished, stopped, failed or its generator
    closed) the unused memory is returned (``malloc_trim``) and blocks over 32 MiB are
    mapped and returned on ``free`` again, as before the run.  glibc cannot report its
    previous settings, so they are set to where its own dynamic tuning settles once a large
    block was freed (mmap threshold 32 MiB, trim threshold 64 MiB, top pad 128 KiB); from
    then on they stay there rather than adapting.  ``enabled=False``, the environment
    variable :data:`KEEP_FREED_MEMORY_ENV` set to ``0``, or a C library other than glibc
    leave the allocator untouched.  Process-wide, so nested and concurrent runs count.
    """
    global _ALLOCATOR_USERS
    libc = _glibc() if enabled and _allocator_tuning_allowed() else None
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
