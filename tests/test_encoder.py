import torch
from torch import nn

from extract.encoders.tile_encoder import (
    ResNet18,
    TileTrunk,
    load_resnet18,
    save_encoder_checkpoint,
)


def test_trunk_equals_spatial_mean_of_layer3():
    torch.manual_seed(0)
    resnet = ResNet18().eval()
    trunk = TileTrunk(resnet).eval()
    images = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(images))))
        layer3 = resnet.layer3(resnet.layer2(resnet.layer1(x)))
        expected = layer3.mean(dim=(2, 3))
        got = trunk(images)
    assert got.shape == (3, 256)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(resnet.forward_features(images).mean(dim=(2, 3)), got, atol=1e-6)


def _torchvision_style_state_dict() -> dict:
    """A state dict with exactly torchvision's resnet18 keys (built independently of our names)."""
    keys = {}
    keys["conv1.weight"] = (64, 3, 7, 7)

    def bn(prefix, c):
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{name}"] = (c,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    cin = 64
    for layer, cout in zip((1, 2, 3, 4), (64, 128, 256, 512)):
        for block in (0, 1):
            p = f"layer{layer}.{block}"
            keys[f"{p}.conv1.weight"] = (cout, cin if block == 0 else cout, 3, 3)
            bn(f"{p}.bn1", cout)
            keys[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            bn(f"{p}.bn2", cout)
            if block == 0 and layer > 1:
                keys[f"{p}.downsample.0.weight"] = (cout, cin, 1, 1)
                bn(f"{p}.downsample.1", cout)
        cin = cout
    keys["fc.weight"] = (1000, 512)
    keys["fc.bias"] = (1000,)
    g = torch.Generator().manual_seed(1)
    return {k: (torch.tensor(7) if s == () else torch.randn(s, generator=g)) for k, s in keys.items()}


def test_torchvision_state_dict_loads_strict(tmp_path):
    state = _torchvision_style_state_dict()
    model = ResNet18()
    assert set(model.state_dict()) == set(state)
    model.load_state_dict(state, strict=True)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    loaded, info = load_resnet18(path)
    assert info.source == "torchvision" and info.name == "resnet18.pth" and len(info.sha256) == 64
    assert torch.equal(loaded.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_moco_checkpoint_loads(tmp_path):
    state = _torchvision_style_state_dict()
    moco = {f"module.encoder_q.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    moco["module.encoder_q.fc.0.weight"] = torch.randn(512, 512)  # MLP head, dropped
    moco["module.encoder_q.fc.2.weight"] = torch.randn(128, 512)
    moco.update({f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in state.items()})
    moco["module.queue"] = torch.randn(128, 10)
    path = tmp_path / "checkpoint_0199.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": moco}, path)
    loaded, info = load_resnet18(path)
    assert info.source == "moco"
    assert torch.equal(loaded.layer3[0].downsample[0].weight, state["layer3.0.downsample.0.weight"])


def test_own_checkpoint_round_trip(tmp_path):
    model, info = load_resnet18("random", seed=3)
    assert info.source == "random" and info.name == "random"
    _again, info_again = load_resnet18("random", seed=3)
    assert info.sha256 == info_again.sha256
    path = tmp_path / "enc.pt"
    save_encoder_checkpoint(model, path, extra={"epoch": 4})
    loaded, saved_info = load_resnet18(path)
    assert saved_info.source == "gigassl"
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="--encoder random"):
        load_resnet18(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_resnet18(garbage)
    wrong = tmp_path / "wrong.pt"
    torch.save(nn.Linear(3, 4).state_dict(), wrong)
    with pytest.raises(ValueError, match="wrong.pt: no ResNet stem"):
        load_resnet18(wrong)
