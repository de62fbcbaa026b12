"""Tests for resunet.nets.pretrained (torchvision weights, inflation) and resunet.nets.export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from resunet.errors import ModelError
from resunet.nets import ResUNet
from resunet.nets.export import export_onnx, export_program, export_torchscript
from resunet.nets.pretrained import adapt_input_conv, inflate, load_torchvision_resnet



def torchvision_resnet_state_dict(blocks: list[int], bottleneck: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with torchvision ``ResNet``'s exact keys and shapes, written out from its source
    (torchvision/models/resnet.py: conv1 7x7 64, bn1, layer1..4 of 64/128/256/512 planes, strides
    1/2/2/2, ``downsample.0`` conv1x1 + ``downsample.1`` bn, fc 1000), filled with random values."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(key: str, o: int, i: int, k: int) -> None:
        sd[key + ".weight"] = torch.randn(o, i, k, k, generator=g) * 0.05

    def bn(key: str, c: int) -> None:
        sd[key + ".weight"] = torch.rand(c, generator=g) + 0.5
        sd[key + ".bias"] = torch.randn(c, generator=g) * 0.1
        sd[key + ".running_mean"] = torch.randn(c, generator=g) * 0.1
        sd[key + ".running_var"] = torch.rand(c, generator=g) + 0.5
        sd[key + ".num_batches_tracked"] = torch.tensor(100)

    exp = 4 if bottleneck else 1
    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for li, (planes, n, stride) in enumerate(zip([64, 128, 256, 512], blocks, [1, 2, 2, 2]), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            if bottleneck:
                conv(p + ".conv1", planes, inplanes, 1)
                bn(p + ".bn1", planes)
                conv(p + ".conv2", planes, planes, 3)
                bn(p + ".bn2", planes)
                conv(p + ".conv3", planes * 4, planes, 1)
                bn(p + ".bn3", planes * 4)
            else:
                conv(p + ".conv1", planes, inplanes, 3)
                bn(p + ".bn1", planes)
                conv(p + ".conv2", planes, planes, 3)
                bn(p + ".bn2", planes)
            if b == 0 and (stride != 1 or inplanes != planes * exp):
                conv(p + ".downsample.0", planes * exp, inplanes, 1)
                bn(p + ".downsample.1", planes * exp)
            inplanes = planes * exp
    sd["fc.weight"] = torch.randn(1000, 512 * exp, generator=g) * 0.01
    sd["fc.bias"] = torch.zeros(1000)
    return sd


@pytest.fixture(scope="module")
def resnet18_sd() -> dict[str, torch.Tensor]:
    sd = torchvision_resnet_state_dict([2, 2, 2, 2], bottleneck=False)
    assert len(sd) == 122  # len(torchvision.models.resnet18().state_dict())
    return sd


def test_strict_load_into_2d_encoder_copies_every_tensor(resnet18_sd, tmp_path) -> None:
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(resnet18_sd, path)  # a real file, read back with weights_only=True
    net = ResUNet.from_preset("resnet18", spatial_dims=2, in_channels=3, norm="batch")
    report = load_torchvision_resnet(net, path)
    assert report.complete
    assert report.skipped == ["fc.weight", "fc.bias"]
    assert len(report.loaded) == 120 and report.adapted == []
    enc = net.encoder.state_dict()
    for k in report.loaded:
        assert torch.equal(enc[k], resnet18_sd[k]), k


def test_bottleneck_weights_load_with_instance_norm_and_resnet_d() -> None:
    sd = torchvision_resnet_state_dict([3, 4, 6, 3], bottleneck=True, seed=1)
    net = ResUNet.from_preset("resnet50", spatial_dims=2, in_channels=3, norm="instance", resnet_d=True)
    report = load_torchvision_resnet(net, sd)
    assert report.complete
    running = [k for k in sd if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")]
    assert sorted(report.skipped) == sorted(["fc.weight", "fc.bias", *running])
    assert torch.equal(net.encoder.layer2[0].downsample[1].weight, sd["layer2.0.downsample.0.weight"])
    assert torch.equal(net.encoder.layer4[2].bn3.bias, sd["layer4.2.bn3.bias"])


def test_first_conv_adapts_to_one_and_five_input_channels(resnet18_sd) -> None:
    w = resnet18_sd["conv1.weight"]
    net1 = ResUNet.from_preset("resnet18", spatial_dims=2, in_channels=1, norm="batch")
    report = load_torchvision_resnet(net1, resnet18_sd)
    assert report.adapted == ["conv1.weight: input channels 3 -> 1"]
    # A grey image (R = G = B) gives the same first-layer response as before.
    grey = torch.rand(1, 1, 20, 20)
    torch.testing.assert_close(
        F.conv2d(grey, net1.encoder.conv1.weight, stride=2, padding=3),
        F.conv2d(grey.expand(1, 3, 20, 20), w, stride=2, padding=3),
    )
    w5 = adapt_input_conv(w, 5)
    assert w5.shape == (64, 5, 7, 7)
    # RGB repeated cyclically (R, G, B, R, G) and scaled by 3/5.
    torch.testing.assert_close(w5, torch.cat([w, w[:, :2]], dim=1) * 3 / 5)


def test_inflation_into_3d_encoder_reproduces_2d_responses(resnet18_sd) -> None:
    net = ResUNet.from_preset("resnet18", spatial_dims=3, in_channels=3, norm="batch")
    report = load_torchvision_resnet(net, resnet18_sd)
    assert report.complete
    assert "conv1.weight: inflated along axis 0 (x7)" in report.adapted
    w3 = net.encoder.conv1.weight
    assert w3.shape == (64, 3, 7, 7, 7)
    torch.testing.assert_close(w3.sum(dim=2), resnet18_sd["conv1.weight"])
    # On an input constant along depth, the inflated conv equals the 2D conv (away from the depth border).
    img = torch.rand(1, 64, 16, 18)
    vol = img.unsqueeze(2).expand(1, 64, 9, 16, 18)
    y3 = F.conv3d(vol, net.encoder.layer1[0].conv1.weight, padding=1)
    y2 = F.conv2d(img, resnet18_sd["layer1.0.conv1.weight"], padding=1)
    torch.testing.assert_close(y3[:, :, 4], y2, rtol=1e-4, atol=1e-5)


def test_inflation_follows_anisotropic_kernels() -> None:
    w = torch.randn(4, 2, 3, 3)
    assert inflate(w, (3, 3, 1), depth_axis=2).shape == (4, 2, 3, 3, 1)
    torch.testing.assert_close(inflate(w, (3, 3, 1), depth_axis=2)[..., 0], w)
    torch.testing.assert_close(inflate(w, (5, 3, 3), depth_axis=0), w.unsqueeze(2).expand(4, 2, 5, 3, 3) / 5)
    with pytest.raises(ModelError, match="cannot inflate"):
        inflate(w, (3, 5, 3), depth_axis=0)


def test_strict_load_reports_missing_unexpected_and_mismatched(resnet18_sd) -> None:
    net = ResUNet.from_preset("resnet18", spatial_dims=2, in_channels=3, norm="batch")
    before = net.encoder.conv1.weight.detach().clone()
    broken = dict(resnet18_sd)
    del broken["layer3.1.conv2.weight"]
    broken["layer5.0.conv1.weight"] = torch.zeros(1)
    broken["layer4.0.conv1.weight"] = torch.zeros(512, 256, 1, 1)
    with pytest.raises(ModelError, match="2 missing: layer3.1.conv2.weight, layer4.0.conv1.weight; 1 unexpected: layer5.0.conv1.weight; 1 mismatched"):
        load_torchvision_resnet(net, broken)
    assert torch.equal(net.encoder.conv1.weight, before)  # strict failure writes nothing
    report = load_torchvision_resnet(net, broken, strict=False)
    assert report.missing == ["layer3.1.conv2.weight", "layer4.0.conv1.weight"]
    assert report.unexpected == ["layer5.0.conv1.weight"]
    assert report.mismatched == ["layer4.0.conv1.weight: (512, 256, 1, 1) -> (512, 256, 3, 3)"]
    assert torch.equal(net.encoder.conv1.weight, resnet18_sd["conv1.weight"])


def test_unreadable_weights_file_is_a_model_error(tmp_path) -> None:
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a zip file")
    net = ResUNet.from_preset("tiny", spatial_dims=2)
    with pytest.raises(ModelError, match="cannot be read as a weights-only state dict"):
        load_torchvision_resnet(net, bad)
    with pytest.raises(ModelError, match="no such file"):
        load_torchvision_resnet(net, tmp_path / "missing.pth")


# ------------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def tiny3d() -> ResUNet:
    torch.manual_seed(0)
    return ResUNet.from_preset("tiny", spatial_dims=3, deep_supervision=True, out_channels=3).eval()


@pytest.fixture(scope="module")
def tiny2d() -> ResUNet:
    torch.manual_seed(0)
    return ResUNet.from_preset("tiny", spatial_dims=2, out_channels=3).eval()


def test_torchscript_round_trip_on_other_sizes(tiny3d, tmp_path) -> None:
    tiny3d.train()  # export switches to eval mode for the export only
    path = export_torchscript(tiny3d, tmp_path / "net.pt", (1, 1, 16, 16, 16))
    assert tiny3d.training is True
    tiny3d.eval()
    loaded = torch.jit.load(str(path))
    x = torch.randn(2, 1, 13, 22, 17)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), tiny3d(x), rtol=1e-4, atol=1e-5)


def test_torch_export_program_with_dynamic_sizes(tiny2d, tmp_path) -> None:
    program = export_program(tiny2d, torch.randn(2, 1, 37, 29))
    torch.export.save(program, tmp_path / "net.pt2")
    module = torch.export.load(tmp_path / "net.pt2").module()
    x = torch.randn(3, 1, 45, 18)
    with torch.no_grad():
        torch.testing.assert_close(module(x), tiny2d(x), rtol=1e-4, atol=1e-5)


def test_onnx_round_trip_with_onnxruntime(tiny2d, tmp_path) -> None:
    path = export_onnx(tiny2d, tmp_path / "net.onnx", (2, 1, 37, 29))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]  # one self-contained file
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    x = torch.randn(1, 1, 50, 21)
    (y,) = session.run(["logits"], {"image": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, tiny2d(x).numpy(), rtol=1e-4, atol=1e-4)


def test_export_rejects_wrong_example_shapes(tiny2d, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"must be \(B, 1, S, S\)"):
        export_torchscript(tiny2d, tmp_path / "x.pt", (1, 3, 16, 16))
    with pytest.raises(ValueError, match="multiples of"):
        export_onnx(tiny2d, tmp_path / "x.onnx", (2, 1, 17, 16), any_size=False)
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.onnx").exists()
