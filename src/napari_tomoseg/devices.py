"""Which device a network trains or runs on: the one rule training and applying share."""

from __future__ import annotations

import torch

from .errors import TomosegError


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
