"""The architecture registry and the networks' shapes, structure and probabilities."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_tomoseg.errors import TomosegError
from napari_tomoseg.learning.models import (
    DEFAULT_ARCHITECTURE,
    MODELS,
    ModelSpec,
    available,
    build_model,
    predict_proba,
    register,
    resolved_params,
)

ARCHS = ["tomoseg-cnn", "unet", "unet-lite"]


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def test_registry_lists_the_architectures():
    assert available()[:3] == ARCHS
    assert DEFAULT_ARCHITECTURE in MODELS
    for name in ARCHS:
        spec = MODELS[name]
        assert spec.name == name and spec.description and spec.supports_multiclass


def test_unknown_architecture_names_the_available_ones():
    with pytest.raises(TomosegError) as err:
        build_model("resnet-9000", 1, 2)
    for name in ARCHS:
        assert name in str(err.value)


def test_register_adds_an_architecture_and_refuses_duplicates():
    class Tiny(nn.Module):
        def __init__(self, in_channels: int, n_classes: int, width: int = 4):
            super().__init__()
            self.n_outputs = 1 if n_classes == 2 else n_classes
            self.conv = nn.Conv2d(in_channels, self.n_outputs, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    spec = ModelSpec("tiny-test", Tiny, "a 3x3 conv", {"width": 4}, supports_multiclass=False)
    register(spec)
    try:
        assert "tiny-test" in available()
        model = build_model("tiny-test", 2, 2, width=8)
        assert model(torch.zeros(1, 2, 5, 7)).shape == (1, 1, 5, 7)
        with pytest.raises(TomosegError, match="one feature at a time"):
            build_model("tiny-test", 1, 3)
        with pytest.raises(TomosegError, match="already registered"):
            register(spec)
    finally:
        del MODELS["tiny-test"]


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize(
    ("shape", "n_classes"), [((2, 1, 64, 64), 2), ((1, 3, 37, 50), 4), ((1, 1, 17, 95), 2)]
)
def test_logits_have_the_input_size(name, shape, n_classes):
    model = build_model(name, shape[1], n_classes)
    expected_outputs = 1 if n_classes == 2 else n_classes
    assert model.n_outputs == expected_outputs
    out = model(torch.randn(*shape))
    assert out.shape == (shape[0], expected_outputs, shape[2], shape[3])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "size", "offset", "crop", "margin"),
    [("tomoseg-cnn", 192, 32, 112, 40), ("unet-lite", 224, 48, 128, 56)],
)
def test_output_does_not_depend_on_the_tile(name, size, offset, crop, margin):
    """Fully convolutional: a tile's centre matches the whole image's output there.

    Offsets are multiples of the pooling stride; the margin exceeds the receptive field.
    """
    torch.manual_seed(0)
    model = build_model(name, 1, 2).eval()
    image = torch.randn(1, 1, size, size)
    with torch.no_grad():
        whole = model(image)
        tile = model(image[..., offset : offset + crop, offset : offset + crop])
    inner = slice(margin, crop - margin)
    outer = slice(offset + margin, offset + crop - margin)
    torch.testing.assert_close(
        tile[..., inner, inner], whole[..., outer, outer], atol=1e-4, rtol=1e-4
    )


def test_tomoseg_cnn_is_the_published_network():
    model = build_model("tomoseg-cnn", 1, 2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [40, 40, 1]
    assert all(c.kernel_size == (15, 15) for c in convs)
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 1 and pools[0].kernel_size == 2
    assert all(float(c.bias.detach().abs().max()) == 0.0 for c in convs)
    # the multi-class extension: one kernel per class in the last layer
    multi = build_model("tomoseg-cnn", 3, 5)
    last = [m for m in multi.modules() if isinstance(m, nn.Conv2d)][-1]
    assert last.out_channels == 5 and multi.convs[0].in_channels == 3


def test_unet_structure_and_parameters():
    assert resolved_params("unet")["base_channels"] == 32
    model = build_model("unet", 1, 6)
    assert len(model.down) == 4
    assert [blk[0].out_channels for blk in model.down] == [32, 64, 128, 256]
    assert any(isinstance(m, nn.Dropout) for m in model.modules())
    wide = build_model("unet", 1, 2, base_channels=64, batch_norm=False)
    assert wide.down[0][0].out_channels == 64
    assert not any(isinstance(m, nn.BatchNorm2d) for m in wide.modules())
    lite = build_model("unet-lite", 1, 2)
    assert len(lite.down) == 3 and lite.down[0][0].out_channels == 16
    n_lite = sum(p.numel() for p in lite.parameters())
    n_unet = sum(p.numel() for p in model.parameters())
    assert n_lite * 10 < n_unet


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "unet", "in_channels": 1, "n_classes": 1}, "n_classes"),
        ({"name": "unet", "in_channels": 0, "n_classes": 2}, "in_channels"),
        ({"name": "unet", "in_channels": 1, "n_classes": 2, "depth": 9}, "depth"),
        ({"name": "unet", "in_channels": 1, "n_classes": 2, "widht": 3}, "widht"),
        ({"name": "tomoseg-cnn", "in_channels": 1, "n_classes": 2, "kernel_size": 4}, "odd"),
    ],
)
def test_bad_build_arguments_are_refused(kwargs, message):
    with pytest.raises(TomosegError, match=message):
        build_model(**kwargs)


def test_predict_proba_binary_is_sigmoid_pair():
    torch.manual_seed(1)
    model = build_model("unet-lite", 1, 2)
    model.train()
    x = torch.randn(2, 1, 24, 40)
    proba = predict_proba(model, x)
    assert model.training  # mode restored
    assert proba.shape == (2, 2, 24, 40)
    model.eval()
    with torch.no_grad():
        p = torch.sigmoid(model(x))[:, 0]
    torch.testing.assert_close(proba[:, 1], p)
    torch.testing.assert_close(proba.sum(dim=1), torch.ones(2, 24, 40))


def test_predict_proba_multiclass_is_softmax():
    torch.manual_seed(2)
    model = build_model("tomoseg-cnn", 2, 4).eval()
    x = torch.randn(1, 2, 30, 30)
    proba = predict_proba(model, x)
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=1)
    assert proba.shape == (1, 4, 30, 30)
    torch.testing.assert_close(proba, expected)
    with pytest.raises(TomosegError, match="B, C, H, W"):
        predict_proba(model, x[0])
