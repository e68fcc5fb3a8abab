"""``unet-lite``: a light U-Net that runs fast on a CPU.

The :class:`~napari_tomoseg.learning.models.unet.UNet` with three levels instead of four, base
width 16 instead of 32, bilinear upsampling after a 1x1 channel-reducing convolution (run
at the lower resolution), batch norm and light dropout.  A 64-pixel box
is 8 pixels across at the bottleneck, still wide enough to see a whole membrane arc, while
the cost per pixel falls about tenfold.  Batch (not group) norm keeps the network
translation equivariant in evaluation mode, which tiled inference relies on.
"""

from __future__ import annotations

from typing import Any

from .unet import UNet

DEFAULTS: dict[str, Any] = {
    "base_channels": 16,
    "depth": 3,
    "batch_norm": True,
    "dropout": 0.1,
    "upsample": "bilinear",
    "up_kernel": 1,
}


def build_unet_lite(
    in_channels: int,
    n_classes: int,
    base_channels: int = 16,
    depth: int = 3,
    batch_norm: bool = True,
    dropout: float = 0.1,
    upsample: str = "bilinear",
    up_kernel: int = 1,
) -> UNet:
    """Build the light U-Net (a :class:`UNet` with the lighter defaults above)."""
    return UNet(
        in_channels,
        n_classes,
        base_channels=base_channels,
        depth=depth,
        batch_norm=batch_norm,
        dropout=dropout,
        upsample=upsample,
        up_kernel=up_kernel,
    )


build_unet_lite.DEFAULTS = DEFAULTS  # type: ignore[attr-defined]
