"""Network architectures for 2D tomogram segmentation, behind one registry.

Every architecture is a fully convolutional :class:`torch.nn.Module` that maps a batch of
normalised image patches ``(B, C, H, W)`` (``C`` = 1 or the number of context slices) to
logits at the *same* ``H, W`` for any input size: it pads internally to the multiple its
pooling needs and crops back, so tiled inference over whole slices works.  Each model has an
attribute ``n_outputs``: 1 for a binary network (one sigmoid logit for the feature), else
``n_classes`` (softmax logits).  :func:`predict_proba` turns either into class probabilities.

Registered architectures:

``tomoseg-cnn``
    The network of Chen et al., Nat. Methods 14, 983 (2017) (EMAN2 ``e2tomoseg_convnet.py``).
``unet``
    A 2D U-Net (Ronneberger et al. 2015) as used for multi-class cryo-ET annotation by
    Zhao & Zhou (four levels, two 3x3 convolutions per level, dropout, skip connections).
``unet-lite``
    A three-level U-Net with base width 16 and batch norm: the same shape of model at a
    fraction of the cost.

More can be added with :func:`register`.  Loss and class weighting live in
:mod:`napari_tomoseg.learning.training`, not in the models.

``unet-lite`` is the default: as accurate as the others within the noise, and 4-7 times
faster (``docs/benchmarks.md``, "Choices measured in the code's early days").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import TomosegError
from .tomoseg_cnn import TomosegCNN
from .unet import UNet
from .unet_lite import build_unet_lite


@dataclass(frozen=True)
class ModelSpec:
    """One registered architecture: how to build it and what it is."""

    name: str
    builder: Callable[..., nn.Module]
    description: str
    default_params: dict[str, Any] = field(default_factory=dict)
    supports_multiclass: bool = True


#: All known architectures by name.
MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add an architecture to :data:`MODELS` (a name can be registered once)."""
    if not spec.name or not isinstance(spec.name, str):
        raise TomosegError("An architecture needs a non-empty name.")
    if spec.name in MODELS:
        raise TomosegError(f"An architecture called {spec.name!r} is already registered.")
    MODELS[spec.name] = spec
    return spec


def available() -> list[str]:
    """Names of the registered architectures, in registration order."""
    return list(MODELS)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` for ``name``; unknown names raise :class:`TomosegError`."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise TomosegError(
            f"Unknown network architecture {name!r}; available: {', '.join(available())}."
        ) from None


def resolved_params(name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The architecture's default parameters updated with ``params`` (unknown keys refused).

    The result is what a network file records, so a network is rebuilt exactly even if a
    default changes in a later version.
    """
    spec = get_spec(name)
    params = dict(params or {})
    unknown = sorted(set(params) - set(spec.default_params))
    if unknown:
        known = ", ".join(sorted(spec.default_params)) or "none"
        raise TomosegError(
            f"Architecture {name!r} has no parameter(s) {', '.join(unknown)}; "
            f"its parameters are: {known}."
        )
    return {**spec.default_params, **params}


def build_model(name: str, in_channels: int, n_classes: int, **params: Any) -> nn.Module:
    """Build architecture ``name`` for ``in_channels`` inputs and ``n_classes`` classes.

    ``n_classes`` counts the background, so a single feature is ``n_classes=2``; such
    binary networks have one output logit.  Parameters not given take the architecture's
    defaults (see :data:`MODELS`).
    """
    spec = get_spec(name)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise TomosegError(f"in_channels must be a positive integer, got {in_channels!r}.")
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise TomosegError(
            f"n_classes must be an integer >= 2 (background plus at least one feature), "
            f"got {n_classes!r}."
        )
    if n_classes > 2 and not spec.supports_multiclass:
        raise TomosegError(
            f"Architecture {name!r} segments one feature at a time; train one network per "
            f"feature or choose one of: "
            f"{', '.join(n for n, s in MODELS.items() if s.supports_multiclass)}."
        )
    full = resolved_params(name, params)
    try:
        return spec.builder(in_channels=in_channels, n_classes=n_classes, **full)
    except (TypeError, ValueError) as exc:
        raise TomosegError(f"Cannot build {name!r} with parameters {full}: {exc}") from None


def n_outputs_for(n_classes: int) -> int:
    """Output channels for ``n_classes``: one sigmoid logit when binary, else one per class."""
    return 1 if n_classes == 2 else n_classes


def logits_to_proba(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(B, K, H, W)`` from logits (1 channel: sigmoid; else softmax)."""
    logits = logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1.0 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def predict_proba(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(B, n_classes, H, W)`` at the input's resolution.

    Runs without gradients and in evaluation mode (dropout off, batch norm on its running
    statistics); the model's previous mode is restored afterwards.  A binary model's single
    logit becomes ``[1 - p, p]``; a multi-class model's logits go through a softmax.
    """
    if x.ndim != 4:
        raise TomosegError(
            f"Expected a batch (B, C, H, W), got an array of shape {tuple(x.shape)}."
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        model.train(was_training)
    return logits_to_proba(logits)


register(
    ModelSpec(
        name="tomoseg-cnn",
        builder=TomosegCNN,
        description=(
            "Chen et al. 2017 (EMAN2 TomoSeg): three 15x15 convolutions of 40, 40 and 1 "
            "kernels, 2x2 max-pool after the first; output upsampled 2x to input size."
        ),
        default_params=dict(TomosegCNN.DEFAULTS),
        supports_multiclass=True,
    )
)
register(
    ModelSpec(
        name="unet",
        builder=UNet,
        description=(
            "2D U-Net: four levels down and up, two 3x3 convolutions per level, dropout, "
            "skip connections (base width 32)."
        ),
        default_params=dict(UNet.DEFAULTS),
        supports_multiclass=True,
    )
)
register(
    ModelSpec(
        name="unet-lite",
        builder=build_unet_lite,
        description=(
            "Light U-Net: three levels, base width 16, batch norm; fast on a CPU, "
            "as accurate as the full U-Net on box-sized features."
        ),
        default_params=dict(build_unet_lite.DEFAULTS),  # type: ignore[attr-defined]
        supports_multiclass=True,
    )
)

#: The architecture new networks use unless told otherwise (chosen by measurement, above).
DEFAULT_ARCHITECTURE: str = "unet-lite"

__all__ = [
    "DEFAULT_ARCHITECTURE",
    "MODELS",
    "ModelSpec",
    "TomosegCNN",
    "UNet",
    "available",
    "build_model",
    "get_spec",
    "logits_to_proba",
    "n_outputs_for",
    "predict_proba",
    "register",
    "resolved_params",
]
