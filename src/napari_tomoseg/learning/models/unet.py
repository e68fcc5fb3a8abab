"""``unet``: a 2D U-Net for one or several features at once.

After Ronneberger, Fischer & Brox, "U-Net" (MICCAI 2015), in the form Zhao & Zhou used to
annotate six cryo-ET classes in one network (the ``zhixuhao/unet`` layout): per level two
3x3 convolutions with ReLU, dropout on the deepest level and the bottleneck, a 2x2 max-pool
going down; going up, an upsampling followed by a convolution, concatenation with the skip
connection of the same level, and two 3x3 convolutions; a 1x1 convolution gives the logits.

Differences from that layout, and why:

- the base width defaults to 32 (``base_channels``; the original used 64): four times fewer
  multiply-adds, with no loss of accuracy on 64-pixel boxes;
- batch normalisation after each convolution is on by default (``batch_norm``): it makes
  training from a few hundred mini-batches reliable.  It is *batch* norm on purpose: in
  evaluation mode it is a fixed per-channel affine map, so the network stays translation
  equivariant and tiled inference gives the same result whatever the tile size (group or
  instance norm would make each tile's output depend on its content);
- the upsampling convolution is 3x3 rather than 2x2, so it is centred and does not shift
  the feature maps by half a pixel (``up_kernel=1`` makes it a cheap 1x1 convolution).

The input is padded (edge values repeated) on the bottom and right to a multiple of
``2**depth`` and the logits are cropped back, so any ``H, W`` works.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad ``x`` (B, C, H, W) at the bottom and right so H and W divide by ``multiple``."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


def _conv(in_ch: int, out_ch: int, kernel: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=not batch_norm)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return layers


class _DoubleConv(nn.Sequential):
    """Two 3x3 convolutions (+ batch norm) + ReLU, optionally followed by dropout."""

    def __init__(self, in_ch: int, out_ch: int, batch_norm: bool, dropout: float = 0.0):
        layers = _conv(in_ch, out_ch, 3, batch_norm) + _conv(out_ch, out_ch, 3, batch_norm)
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class _Up(nn.Module):
    """Upsample 2x, convolve to the skip connection's width, concatenate, two 3x3 convs.

    With ``kernel=1`` the channel-reducing convolution runs *before* the upsampling, at a
    quarter of the pixels (a pointwise map, so nearly the same result for far less work).
    """

    def __init__(self, in_ch: int, out_ch: int, batch_norm: bool, mode: str, kernel: int):
        super().__init__()
        self.mode = mode
        self.reduce_first = kernel == 1
        self.reduce = nn.Sequential(*_conv(in_ch, out_ch, kernel, batch_norm))
        self.convs = _DoubleConv(2 * out_ch, out_ch, batch_norm)

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "nearest":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self._upsample(self.reduce(x)) if self.reduce_first else self.reduce(self._upsample(x))
        return self.convs(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """2D U-Net with ``depth`` poolings; logits ``(B, n_outputs, H, W)`` at input size."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "base_channels": 32,
        "depth": 4,
        "batch_norm": True,
        "dropout": 0.5,
        "upsample": "nearest",
        "up_kernel": 3,
    }

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        base_channels: int = 32,
        depth: int = 4,
        batch_norm: bool = True,
        dropout: float = 0.5,
        upsample: str = "nearest",
        up_kernel: int = 3,
    ) -> None:
        super().__init__()
        if int(base_channels) < 1:
            raise ValueError("base_channels must be a positive integer")
        if not 1 <= int(depth) <= 6:
            raise ValueError("depth must be between 1 and 6")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if upsample not in ("nearest", "bilinear"):
            raise ValueError("upsample must be 'nearest' or 'bilinear'")
        if int(up_kernel) not in (1, 3):
            raise ValueError("up_kernel must be 1 or 3")
        self.in_channels = int(in_channels)
        self.n_classes = int(n_classes)
        self.n_outputs = 1 if self.n_classes == 2 else self.n_classes
        self.depth = int(depth)
        bn = bool(batch_norm)
        widths = [int(base_channels) * 2**i for i in range(self.depth + 1)]
        self.down = nn.ModuleList()
        prev = self.in_channels
        for level, width in enumerate(widths[:-1]):
            # as in the original layout: dropout on the deepest level and the bottleneck
            drop = float(dropout) if level == self.depth - 1 else 0.0
            self.down.append(_DoubleConv(prev, width, bn, drop))
            prev = width
        self.bottom = _DoubleConv(prev, widths[-1], bn, float(dropout))
        self.up = nn.ModuleList(
            _Up(widths[i + 1], widths[i], bn, upsample, int(up_kernel))
            for i in reversed(range(self.depth))
        )
        self.head = nn.Conv2d(widths[0], self.n_outputs, 1)
        self.pool = nn.MaxPool2d(2)

    def encoder(self) -> list[nn.Module]:
        """The contracting path and the bottleneck: what a fine-tuning may keep as shipped
        (``TrainSettings.fine_tune``)."""
        return [self.down, self.bottom]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = pad_to_multiple(x, 2**self.depth)
        skips = []
        for block in self.down:
            y = block(y)
            skips.append(y)
            y = self.pool(y)
        y = self.bottom(y)
        for block, skip in zip(self.up, reversed(skips)):
            y = block(y, skip)
        return self.head(y)[..., :h, :w]
