"""Surviving a device's running out of memory (and the device rule, from
:mod:`napari_tomoseg.devices`).

During an apply, a forward pass that runs out of device memory is tried again with half the tiles
per batch, down to one tile, then as smaller tiles (:func:`_predict_within_memory`);
:class:`MemoryBudget` carries the smaller batch size through the rest of the run and
collects notes saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...devices import resolve_device
from ...errors import TomosegError

__all__ = ["DeviceMemoryError", "MemoryBudget", "is_out_of_memory", "resolve_device"]


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
    (which computes it as smaller tiles, :func:`napari_tomoseg.applying.inference.predict.
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
