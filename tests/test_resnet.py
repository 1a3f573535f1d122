"""extract.encoders.resnet: the three architectures, torchvision's names and sizes, the trunk cut."""

import pytest
import torch

from extract.encoders.resnet import ARCHITECTURES, ResNet18, build_resnet
from extract.encoders.tile_encoder import TileTrunk

# Parameter counts of torchvision's resnet18 / resnet34 / resnet50 (1000-class fc).
TORCHVISION_PARAMETERS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
WIDTHS = {"resnet18": (256, 512), "resnet34": (256, 512), "resnet50": (1024, 2048)}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_sizes_match_torchvision_and_the_trunk_is_layer3_then_mean(arch: str) -> None:
    torch.manual_seed(0)
    model = build_resnet(arch).eval()
    assert model.arch == arch and sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMETERS[arch]
    assert (model.trunk_width, model.layer4_width) == WIDTHS[arch]
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.forward_features(images)
        trunk = TileTrunk(model).eval()(images)
        layer4 = model.layer4(maps)
        assert model(images).shape == (2, 1000)
    assert maps.shape == (2, WIDTHS[arch][0], 4, 4) and layer4.shape == (2, WIDTHS[arch][1], 2, 2)
    assert trunk.shape == (2, WIDTHS[arch][0]) and torch.allclose(trunk, maps.mean(dim=(2, 3)))
    assert torch.isfinite(layer4).all()


def test_resnet50_uses_torchvision_v1_5_names_and_strides() -> None:
    model = build_resnet("resnet50")
    names = set(model.state_dict())
    assert {"layer1.0.conv3.weight", "layer1.0.downsample.0.weight", "layer4.2.bn3.running_var"} <= names
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)  # v1.5


def test_resnet18_class_is_the_resnet18_arch() -> None:
    torch.manual_seed(1)
    a = ResNet18()
    torch.manual_seed(1)
    b = build_resnet("resnet18")
    assert type(b) is ResNet18
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="resnet101.*resnet18, resnet34, resnet50"):
        build_resnet("resnet101")
