"""Training-time augmentation: make a network trained on one tomogram work on others.

A user boxes and paints one tomogram, but applies the network to many, recorded at other
doses, defoci and thicknesses, reconstructed by other programs, sometimes with the contrast
the other way round.  The training set already holds rotated and flipped copies of every
box; each mini-batch is changed further, differently every time, in the ways tomograms
differ from each other while the features stay what they are:

- ``scale``: a zoom by up to this fraction either way (membranes, tubes and particles of
  somewhat other sizes, and voxel sizes that are not quite what the header says);
- ``blur``: a Gaussian blur of up to this sigma in pixels (lower resolution, stronger
  defocus envelope, smoother reconstructions such as SIRT);
- ``noise``: added noise of up to this standard deviation, in units of the image's
  (lower dose), whose correlation length is up to ``noise_colour`` pixels (noise in a
  reconstruction is not white);
- ``gain``: a change of contrast and offset by up to this fraction (other normalisation);
- ``invert``: the probability of inverting the contrast (programs that write matter
  bright instead of dark).

After a blur or added noise each image is brought back to the spread it had, as the
normalisation of a whole tomogram does when it is applied.  Labels move with the zoom only.
The random draws come from the training loop's generator, so a seeded run is repeatable.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import TomosegError

#: The default augmentation (the strengths are the largest drawn; each draw is uniform).
AUGMENTATION_DEFAULTS: dict[str, float] = {
    "scale": 0.2,
    "blur": 1.2,
    "noise": 0.6,
    "noise_colour": 1.0,
    "gain": 0.2,
    "invert": 0.5,
}
#: The strengths a fine-tuning from a shipped network changes (the rest as the defaults):
#: twice the noise (down to about a quarter of the painted tomogram's SNR) and a stronger
#: blur.  A shipped network knows the features already; with the defaults some
#: fine-tunings lost recall on noisier and smoother tomograms than the painted one.
#: Training from scratch gained nothing from them (docs/models.md, "Stronger noise and
#: blur when fine-tuning").
FINE_TUNING_AUGMENTATION: dict[str, float] = {"noise": 1.2, "blur": 2.0}
#: Allowed range of each strength.
_LIMITS: dict[str, tuple[float, float]] = {
    "scale": (0.0, 0.5),
    "blur": (0.0, 3.0),
    "noise": (0.0, 3.0),
    "noise_colour": (0.0, 3.0),
    "gain": (0.0, 0.9),
    "invert": (0.0, 1.0),
}
#: ``augmentation`` that changes nothing beyond the 90-degree rotations and flips.
NO_AUGMENTATION: dict[str, float] = dict.fromkeys(AUGMENTATION_DEFAULTS, 0.0)


def resolve_augmentation(params: dict[str, Any] | None) -> dict[str, float]:
    """The defaults updated with ``params``; unknown names and values out of range raise
    :class:`TomosegError`."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(AUGMENTATION_DEFAULTS))
    if unknown:
        raise TomosegError(
            f"Unknown augmentation setting(s) {', '.join(unknown)}; known: "
            f"{', '.join(AUGMENTATION_DEFAULTS)}."
        )
    out = {**AUGMENTATION_DEFAULTS, **params}
    for name, value in out.items():
        low, high = _LIMITS[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TomosegError(f"Augmentation setting {name} must be a number, got {value!r}.")
        if not low <= value <= high:
            raise TomosegError(
                f"Augmentation setting {name} must be between {low} and {high}, got {value}."
            )
        out[name] = float(value)
    return out


def flip_rotate(
    x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole mini-batch rotated by a random multiple of 90 degrees, maybe mirrored."""
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    if k:
        x = torch.rot90(x, k, dims=(2, 3))
        y = torch.rot90(y, k, dims=(1, 2))
    if flip:
        x = torch.flip(x, dims=(3,))
        y = torch.flip(y, dims=(2,))
    return x, y


def _uniform(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    return rng.uniform(low, high, size=n).astype(np.float32)


def _zoom(
    x: torch.Tensor, y: torch.Tensor, factors: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom each sample about its centre (mirror padding); labels by nearest neighbour."""
    theta = torch.zeros((x.shape[0], 2, 3), dtype=x.dtype, device=x.device)
    inverse = torch.from_numpy(1.0 / factors).to(x.device, x.dtype)
    theta[:, 0, 0] = inverse
    theta[:, 1, 1] = inverse
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    y = F.grid_sample(
        y[:, None].to(x.dtype),
        grid,
        mode="nearest",
        padding_mode="reflection",
        align_corners=False,
    )
    return x, y[:, 0].round().to(torch.long)


def _gaussian_blur(x: torch.Tensor, sigmas: np.ndarray) -> torch.Tensor:
    """Blur each sample (all its channels) with its own Gaussian sigma (pixels)."""
    b, c, h, w = x.shape
    radius = max(1, int(math.ceil(3 * float(sigmas.max()))))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = torch.from_numpy(np.maximum(sigmas, 1e-3)).to(x.device, x.dtype)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * s[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    flat = x.reshape(1, b * c, h, w)
    pad = min(radius, h - 1, w - 1)
    flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    if pad < radius:  # a tiny image: pad the rest with edge values
        extra = radius - pad
        flat = F.pad(flat, (extra, extra, extra, extra), mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * c)
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=b * c)
    return flat.reshape(b, c, h, w)


def _spread(x: torch.Tensor) -> torch.Tensor:
    """Standard deviation of each sample, shaped to broadcast over (B, C, H, W)."""
    return x.flatten(1).std(dim=1).clamp_min(1e-6)[:, None, None, None]


def augment_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    rng: np.random.Generator,
    params: dict[str, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Change a mini-batch ``x`` (B, C, H, W) and its labels ``y`` (B, H, W) as ``params``
    (:func:`resolve_augmentation`) allow; every sample gets its own random strengths."""
    b = x.shape[0]
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    if params["scale"] > 0:
        top = math.log1p(params["scale"])
        x, y = _zoom(x, y, np.exp(_uniform(rng, b, -top, top)))
    if params["blur"] > 0:
        before = _spread(x)
        x = _gaussian_blur(x, _uniform(rng, b, 0.0, params["blur"]))
        x = x * (before / _spread(x))
    if params["noise"] > 0:
        noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        if params["noise_colour"] > 0:
            noise = _gaussian_blur(noise, _uniform(rng, b, 0.0, params["noise_colour"]))
            noise = noise / _spread(noise)
        level = torch.from_numpy(_uniform(rng, b, 0.0, params["noise"])).to(x.device, x.dtype)
        level = level[:, None, None, None]
        x = (x + level * _spread(x) * noise) / torch.sqrt(1 + level**2)
    if params["gain"] > 0:
        g = params["gain"]
        gain = torch.from_numpy(np.exp(_uniform(rng, b, -g, g))).to(x.device, x.dtype)
        shift = torch.from_numpy(_uniform(rng, b, -g, g)).to(x.device, x.dtype)
        x = x * gain[:, None, None, None] + shift[:, None, None, None]
    if params["invert"] > 0:
        flip = torch.from_numpy(rng.random(b) < params["invert"]).to(x.device)
        x = torch.where(flip[:, None, None, None], -x, x)
    return x, y
