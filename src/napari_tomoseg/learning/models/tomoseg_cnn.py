"""``tomoseg-cnn``: the convolutional network of EMAN2 TomoSeg (Chen et al. 2017).

Chen, M. et al. "Convolutional neural networks for automated annotation of cellular
cryo-electron tomograms", Nat. Methods 14, 983-985 (2017); EMAN2 ``e2tomoseg_convnet.py``.
The network, as published and as EMAN2 builds it by default:

- three 2D convolution layers of 40, 40 and 1 kernels, all 15x15, zero padded ('same');
- a 2x2 max-pool after the first layer (none after the others);
- ReLU after every layer except the last;
- weights drawn Glorot-uniform, biases zero (the Theano version's initialisation).

Two deliberate differences, both needed to fit the rest of napari-tomoseg:

- **Output resolution.**  EMAN2 trains against the label *downsampled* 2x (the pooling
  halves the image) and scales the output up when applying the network.  Here ``forward``
  upsamples the half-resolution output 2x (bilinear) and crops it to the input size, so
  every architecture returns logits at input resolution and the loss is computed on the
  full-resolution label.  Odd sizes are padded (edge values repeated) to even first.
- **Output and loss.**  EMAN2 regresses the clipped output onto the label with a log mean
  squared error.  Here the last layer gives a logit, trained with (class-weighted) binary
  cross-entropy; for more than two classes the last layer has ``n_classes`` kernels and a
  softmax cross-entropy is used (an extension: EMAN2 trains one network per feature).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class TomosegCNN(nn.Module):
    """Three 15x15 convolution layers with one 2x2 max-pool; logits at input resolution."""

    DEFAULTS: ClassVar[dict[str, Any]] = {"n_kernels": [40, 40], "kernel_size": 15}

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        n_kernels: list[int] | tuple[int, ...] = (40, 40),
        kernel_size: int = 15,
    ) -> None:
        super().__init__()
        widths = [int(k) for k in n_kernels]
        if len(widths) < 1 or any(k < 1 for k in widths):
            raise ValueError("n_kernels must list at least one positive layer width")
        if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
            raise ValueError("kernel_size must be a positive odd number")
        self.in_channels = int(in_channels)
        self.n_classes = int(n_classes)
        self.n_outputs = 1 if self.n_classes == 2 else self.n_classes
        k = int(kernel_size)
        chans = [self.in_channels, *widths, self.n_outputs]
        self.convs = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], k, padding=k // 2) for i in range(len(chans) - 1)
        )
        self.pool = nn.MaxPool2d(2)
        for conv in self.convs:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = h % 2, w % 2
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        y = self.pool(F.relu(self.convs[0](x)))
        for conv in self.convs[1:-1]:
            y = F.relu(conv(y))
        y = self.convs[-1](y)
        y = F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)
        return y[..., :h, :w]
