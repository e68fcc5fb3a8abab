"""Which device a network runs on, and surviving its running out of memory.

:func:`resolve_device` turns a device name into a torch device, for training
(:func:`napari_tomoseg.training.select_device` is the same function) and applying.  During
an apply, a forward pass that runs out of device memory is tried again with half the tiles
per batch, down to one tile, then as smaller tiles (:func:`_predict_within_memory`);
:class:`MemoryBudget` carries the smaller batch size through the rest of the run and
collects notes saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import TomosegError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device to train or apply on (the one function both use).

    Parameters
    ----------
    device
        ``"auto"``: CUDA if available, then Apple MPS, then the CPU.  Otherwise a torch
        device name (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``; case and surrounding
        spaces do not matter) or a ``torch.device``, which is returned as it is.

    Raises :class:`TomosegError` for a name torch does not know, and for CUDA, a CUDA GPU
    index or MPS that this machine does not have.
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise TomosegError(
            f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TomosegError(
                f"Device {device!r} was asked for but CUDA is not available here (no CUDA "
                "GPU, or torch was installed without CUDA support); use 'auto' or 'cpu', or "
                "install a CUDA build of torch."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise TomosegError(
                f"GPU {dev.index} was requested but only {count} CUDA GPU(s) exist."
            )
    elif dev.type == "mps" and not _mps_available():
        raise TomosegError("Apple MPS was requested but is not available; use 'auto'.")
    return dev


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


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
    tiles: torch.Tensor,
    device: torch.device,
    budget: MemoryBudget,
    *,
    predict: Callable[[torch.Tensor], torch.Tensor],
    split: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``predict(tiles)`` for ``tiles`` (B, C, T, T) on ``device``, surviving OOM.

    The tiles go through ``predict`` in chunks of ``budget.batch_size``.  When a chunk runs
    out of device memory, the cache is emptied and the same tiles are tried again with half
    the batch size, down to one tile; a single tile that does not fit goes to ``split``
    (which computes it as smaller tiles, :func:`napari_tomoseg.inference.predict.
    _predict_split_tile`).  Each tile's result does not depend on the batch it was in, so
    the output is unchanged.
    """
    out: list[torch.Tensor] = []
    start = 0
    while start < tiles.shape[0]:
        size = min(budget.batch_size, tiles.shape[0] - start)
        chunk = tiles[start : start + size]
        failed = False
        try:
            out.append(predict(chunk))
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
        out.append(split(chunk[0])[None])
        start += 1
    return torch.cat(out) if len(out) > 1 else out[0]
