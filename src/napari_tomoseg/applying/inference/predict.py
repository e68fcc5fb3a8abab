"""Tiled prediction of whole planes on a device.

Each input plane goes to the device once; its tiles (:class:`~.tiling.TilePlan`) are cut
there, the tiles of consecutive planes share batches, and their class probabilities are
blended back into the plane there, so only the finished plane needs to come back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import TomosegError
from ...learning.models import predict_proba
from ...progress import StopCheck, never_stop
from .device import DeviceMemoryError, MemoryBudget, _predict_within_memory, resolve_device
from .kernels import _CHANNELS_LAST, _cudnn_autotune
from .tiling import TilePlan, _forward_op, _inverse_op, _round_up, _tta_ops, plan_tiles


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
    blend exactly as the tiles of a slice do (:mod:`.tiling`); the smallest usable
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
        probs = _predict_within_memory(
            tiles,
            device,
            budget,
            predict=lambda chunk: _predict_batch(model, chunk, device, amp=amp, tta=tta),
            split=lambda tile: _predict_split_tile(
                model, tile, plan, device, amp=amp, tta=tta, budget=budget
            ),
        )
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
    size from call to call and collects notes; see
    :func:`napari_tomoseg.applying.inference.device._predict_within_memory`).
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
