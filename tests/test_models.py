from __future__ import annotations

import pytest
import torch

from cifarlab.errors import ModelError
from cifarlab.models import AirNet, create_model, get_spec, list_models


def test_registry_lists_the_models():
    assert {"tutorial", "airnet", "resnet18", "keras-cnn", "keras-dense"} <= set(list_models())


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelError, match="valid models are: airnet, keras-cnn, keras-dense, resnet18, tutorial"):
        create_model("vgg")


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("size", [32, 24])
def test_forward_shapes(name, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, width=0.25, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    assert get_spec(name).description


def test_airnet_widths_follow_the_multiplier():
    m = create_model("airnet", width=1.0)
    assert [m.block1.conv1.out_channels, m.block2.conv1.out_channels,
            m.block3.conv1.out_channels] == [64, 256, 256]
    assert m.whiten.kernel_size == (2, 2) and not m.whiten.weight.requires_grad
    assert create_model("airnet", width=0.5).block2.conv1.out_channels == 128


def test_airnet_stem_whitens_patches():
    torch.manual_seed(0)
    base = torch.randn(64, 3, 16, 16)
    x = base + 0.8 * base.roll(1, dims=1)  # correlated channels
    m = AirNet()
    m.init_from_data(x)
    with torch.no_grad():
        y = torch.nn.functional.conv2d(x, m.whiten.weight[:12])  # the + half of the filters
    flat = y.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = flat.T @ flat / len(flat)
    assert torch.allclose(cov, torch.eye(12), atol=0.05)


def test_tutorial_is_the_classic_layout():
    m = create_model("tutorial")
    assert [type(c).__name__ for c in m.children()] == [
        "Conv2d", "MaxPool2d", "Conv2d", "Linear", "Linear", "Linear"]
    assert m.fc1.in_features == 16 * 5 * 5


def test_resnet18_has_cifar_stem_and_eight_blocks():
    m = create_model("resnet18")
    assert m.stem[0].kernel_size == (3, 3) and m.stem[0].stride == (1, 1)
    assert len(m.layers) == 8
    n = sum(p.numel() for p in m.parameters())
    assert 11_000_000 < n < 11_300_000
