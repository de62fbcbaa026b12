"""Tests for resunet.nets: shapes, gradients, residual identity, parameter counts, config, errors.

Small inputs only (2 CPU cores). Shapes of the large presets are checked on the ``meta`` device
(PyTorch propagates shapes without computing), real forwards run on the small presets.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from resunet.errors import ConfigError
from resunet.nets import PRESETS, BasicBlock, Bottleneck, ResUNet


RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2"]
SMALL = ["tiny", "small", "base", "cpu"]

# torchvision.models: "num_params" of each ImageNet weight enum (docs.pytorch.org/vision/stable/models,
# e.g. ResNet50_Weights.IMAGENET1K_V1.meta["num_params"]) minus the fc layer
# (512 * 1000 + 1000 for basic-block nets, 2048 * 1000 + 1000 for bottleneck nets).
TORCHVISION_NUM_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
}
FC_PARAMS = {"basic": 512 * 1000 + 1000, "bottleneck": 2048 * 1000 + 1000}


def _odd_shape(d: int, batch: int = 1, channels: int = 1) -> tuple[int, ...]:
    return (batch, channels, 33, 35, 37)[: 2 + d]


@pytest.mark.parametrize("name", RESNETS)
def test_encoder_parameter_count_equals_torchvision_without_fc(name: str) -> None:
    with torch.device("meta"):
        net = ResUNet.from_preset(name, spatial_dims=2, in_channels=3, out_channels=2)
    block = PRESETS[name]["block"]
    expected = TORCHVISION_NUM_PARAMS[name] - FC_PARAMS[block]
    assert sum(p.numel() for p in net.encoder.parameters()) == expected
    assert net.size_divisor == (32, 32)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("name", RESNETS + SMALL)
def test_every_preset_maps_odd_sizes_to_same_size_logits(name: str, d: int) -> None:
    # meta device: shape propagation through the real module graph, without the arithmetic.
    with torch.device("meta"):
        net = ResUNet.from_preset(name, spatial_dims=d, in_channels=2, out_channels=3).eval()
        y = net(torch.empty(_odd_shape(d, batch=2, channels=2)))
    assert tuple(y.shape) == (2, 3) + _odd_shape(d)[2:]


@pytest.mark.parametrize(
    ("name", "d"),
    [("tiny", 2), ("tiny", 3), ("small", 3), ("cpu", 3), ("base", 2), ("resnet18", 2), ("resnet50", 2)],
)
def test_forward_on_odd_sizes_computes_finite_logits(name: str, d: int) -> None:
    torch.manual_seed(0)
    net = ResUNet.from_preset(name, spatial_dims=d, in_channels=1, out_channels=2).eval()
    x = torch.randn(_odd_shape(d))
    with torch.no_grad():
        y = net(x)
    assert tuple(y.shape) == (1, 2) + x.shape[2:]
    assert torch.isfinite(y).all()
    assert y.std() > 0


def test_padding_inside_equals_padding_outside() -> None:
    torch.manual_seed(0)
    net = ResUNet.from_preset("tiny", spatial_dims=3).eval()
    x = torch.randn(1, 1, 13, 17, 9)
    padded = F.pad(x, [0, 16 - 9, 0, 24 - 17, 0, 16 - 13])  # to multiples of 8, at the end of each axis
    with torch.no_grad():
        y = net(x)
        y_full = net(padded)
    torch.testing.assert_close(y, y_full[:, :, :13, :17, :9])


@pytest.mark.parametrize(("name", "d"), [("tiny", 3), ("small", 2), ("cpu", 3)])
def test_gradients_reach_every_parameter_including_the_first_conv(name: str, d: int) -> None:
    torch.manual_seed(0)
    net = ResUNet.from_preset(name, spatial_dims=d, deep_supervision=True).train()
    outs = net(torch.randn((2, 1, 13, 15, 17)[: 2 + d] if d == 3 else _odd_shape(d, batch=2)))
    loss = sum(o.square().mean() for o in outs)
    loss.backward()
    assert net.encoder.conv1.weight.grad is not None
    assert net.encoder.conv1.weight.grad.abs().sum() > 0
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("d", [2, 3])
def test_zero_init_residual_makes_identity_blocks_the_identity(block: str, d: int) -> None:
    torch.manual_seed(0)
    net = ResUNet(
        d, 1, 2, widths=[8, 16], blocks=2, block=block, strides=[1, 2], zero_init_residual=True, norm="batch",
        stem={"width": 8 * (4 if block == "bottleneck" else 1), "kernel_size": 3, "stride": 1, "pool_stride": 1},
    ).train()
    seen = []

    def hook(module, inputs, output):  # noqa: ANN001
        seen.append((module, inputs[0].detach().clone(), output.detach().clone()))

    blocks = [m for m in net.encoder.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    for m in blocks:
        m.register_forward_hook(hook)
    net(torch.randn((2, 1, 16, 20, 12)[: 2 + d]))
    identity_blocks = [(m, i, o) for m, i, o in seen if m.downsample is None]
    assert len(identity_blocks) >= 3  # layer1.0 (stem width = output width), layer1.1, layer2.1
    for _, inp, out in identity_blocks:
        assert (inp >= 0).all()  # blocks see post-ReLU features
        torch.testing.assert_close(out, inp)
    # Without zero-init the same blocks change their input.
    torch.manual_seed(0)
    plain = ResUNet.from_config({**net.config, "zero_init_residual": False})
    b = next(m for m in plain.encoder.modules() if isinstance(m, (BasicBlock, Bottleneck)) and m.downsample is None)
    x = torch.rand(2, b.conv1.in_channels, *([6] * d))
    assert not torch.allclose(b(x), x)


@pytest.mark.parametrize(("name", "d"), [("tiny", 3), ("small", 3), ("resnet18", 2)])
def test_deep_supervision_outputs_finest_first_and_single_tensor_in_eval(name: str, d: int) -> None:
    with torch.device("meta"):
        net = ResUNet.from_preset(name, spatial_dims=d, deep_supervision=True).train()
        x = torch.empty(_odd_shape(d, batch=2))
        outs = net(x)
        net.eval()
        single = net(x)
    assert isinstance(outs, list) and len(outs) == len(net.deep_supervision_strides) >= 3
    for o, stride in zip(outs, net.deep_supervision_strides):
        assert tuple(o.shape[2:]) == tuple(math.ceil(s / k) for s, k in zip(x.shape[2:], stride))
        assert o.shape[:2] == (2, 2)
    assert tuple(outs[0].shape) == (2, 2) + tuple(x.shape[2:])
    strides = [math.prod(s) for s in net.deep_supervision_strides]
    assert strides == sorted(strides) and strides[0] == 1
    assert isinstance(single, torch.Tensor) and single.shape == outs[0].shape


def test_anisotropic_strides_and_kernels_for_thick_slices() -> None:
    net = ResUNet(
        3, 1, 2, widths=[8, 16, 32], blocks=1, strides=[1, (2, 2, 1), (2, 2, 2)],
        kernel_sizes=[(3, 3, 1), (3, 3, 1), 3],
        stem={"width": 8, "kernel_size": (3, 3, 1), "stride": 1, "pool_stride": 1},
    ).eval()
    assert net.size_divisor == (4, 4, 2)
    assert net.encoder.layer1[0].conv1.weight.shape[2:] == (3, 3, 1)
    assert net.encoder.layer3[0].conv1.weight.shape[2:] == (3, 3, 3)
    with torch.no_grad():
        y = net(torch.randn(1, 1, 21, 19, 5))
    assert tuple(y.shape) == (1, 2, 21, 19, 5)
    assert net.config["strides"] == [[1, 1, 1], [2, 2, 1], [2, 2, 2]]


def test_config_round_trip_through_json_rebuilds_the_same_network() -> None:
    torch.manual_seed(0)
    net = ResUNet.from_preset(
        "tiny", spatial_dims=3, in_channels=2, out_channels=4, norm="group", norm_groups=4, act="leakyrelu",
        encoder_dropout=[0.0, 0.1, 0.1, 0.2], decoder_dropout=0.1, deep_supervision=True, resnet_d=True,
        strides=[1, 2, (2, 2, 1), 2],
    ).eval()
    cfg = _assert_json_config_rebuilds(net, torch.randn(2, 2, 9, 10, 11))
    assert tuple(cfg["strides"][2]) == (2, 2, 1) and net.size_divisor == (8, 8, 4)


def _assert_json_config_rebuilds(net: ResUNet, x: torch.Tensor) -> dict:
    """``net.config`` through JSON rebuilds a network with the same config that computes the same logits."""
    cfg = json.loads(json.dumps(net.config))
    twin = ResUNet.from_config(cfg)
    assert twin.config == net.config and twin.size_divisor == net.size_divisor
    twin.load_state_dict(net.state_dict())
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), net(x))
    return cfg


def test_cpu_preset_config_round_trip_rebuilds_the_same_network() -> None:
    torch.manual_seed(0)
    net = ResUNet.from_preset("cpu", spatial_dims=3, in_channels=1, out_channels=3).eval()
    # odd sizes that pad to 64 inside, so the 1/32 level has 2 voxels per axis (instance norm needs >1)
    cfg = _assert_json_config_rebuilds(net, torch.randn(1, 1, 37, 41, 45))
    assert cfg["decoder"] == {"widths": [8, 32, 64, 128], "blocks": [1, 1, 1, 1], "full_res": "transpose"}
    assert net.size_divisor == (32, 32, 32)


def _forward_gflop(net: torch.nn.Module, shape: tuple[int, ...]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.device("meta"), counter:
        net.eval()(torch.empty(shape))
    return counter.get_total_flops() / 1e9


def test_cpu_preset_needs_less_compute_than_small_and_monai_unet() -> None:
    # FLOPs counted on the meta device (shapes only): the cpu preset's lighter half-resolution
    # decoder level must make it cheaper than the bundled small preset and than the MONAI UNet
    # it is benchmarked against, at similar capacity (parameters).
    from monai.networks.nets import UNet

    shape = (1, 1, 96, 96, 96)
    with torch.device("meta"):
        cpu = ResUNet.from_preset("cpu", spatial_dims=3)
        small = ResUNet.from_preset("small", spatial_dims=3)
        unet = UNet(3, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    g_cpu, g_small, g_unet = (_forward_gflop(n, shape) for n in (cpu, small, unet))
    assert g_cpu < 0.8 * g_unet and g_cpu < 0.75 * g_small, (g_cpu, g_small, g_unet)
    n_cpu, n_unet = (sum(p.numel() for p in n.parameters()) for n in (cpu, unet))
    assert 0.5 * n_unet < n_cpu < 3 * n_unet


def test_preset_overrides_merge_into_stem_and_decoder() -> None:
    with torch.device("meta"):
        net = ResUNet.from_preset("resnet18", spatial_dims=3, stem={"stride": (2, 2, 1), "pool_stride": (2, 2, 1)})
    assert net.config["stem"] == {"width": 64, "kernel_size": [7, 7, 7], "stride": [2, 2, 1], "pool_stride": [2, 2, 1]}
    assert net.size_divisor == (32, 32, 8)
    assert net.preset == "resnet18"


def test_mc_dropout_keeps_sampling_in_eval_mode() -> None:
    torch.manual_seed(0)
    net = ResUNet.from_preset("tiny", spatial_dims=2, decoder_dropout=0.3).eval()
    x = torch.randn(1, 1, 24, 24)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
        net.enable_mc_dropout(True)
        assert net.config["mc_dropout"] is True
        assert not torch.equal(net(x), net(x))
        net.enable_mc_dropout(False)
        assert torch.equal(net(x), net(x))
    with pytest.raises(ValueError, match="no dropout"):
        ResUNet.from_preset("tiny", spatial_dims=2).enable_mc_dropout(True)


def test_channels_last_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    net = ResUNet.from_preset("tiny", spatial_dims=3).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        ref = net(x)
        net = net.to(memory_format=torch.channels_last_3d)
        y = net(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


BAD_ARGUMENTS = [
    ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),
    ({"in_channels": 0}, "in_channels must be a positive integer"),
    ({"widths": []}, "widths must be a non-empty list"),
    ({"blocks": [1, 2]}, "blocks has 2 entries but there are 4 stages"),
    ({"block": "dense"}, "block must be one of basic, bottleneck"),
    ({"strides": [1, 2, 2, (2, 2)]}, r"strides\[3\] must be an int or 3 ints"),
    ({"strides": (2, 2, 1)}, r"strides has 3 entries but there are 4 stages.*\* 4"),
    ({"kernel_sizes": 4}, "must be odd"),
    ({"norm": "layer"}, "norm must be one of instance, batch, group"),
    ({"act": "tanh"}, "act must be one of"),
    ({"encoder_dropout": 1.0}, r"encoder_dropout\[0\] must be a dropout probability"),
    ({"decoder": {"widths": [8, 16]}}, "decoder.widths has 2 entries but there are 3"),
    ({"decoder": {"full_res": "nearest"}}, "decoder.full_res must be one of"),
    ({"decoder": {"depth": 3}}, "decoder has unknown keys"),
    ({"norm": "group", "norm_groups": 3}, "group norm: 3 groups do not divide 8 channels"),
    ({"strides": 1}, "never downsamples"),
    ({"deep_supervision": "yes"}, "deep_supervision must be true or false"),
]


@pytest.mark.parametrize(("override", "message"), BAD_ARGUMENTS)
def test_bad_arguments_raise_one_line_value_errors(override: dict, message: str) -> None:
    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, **override}
    with pytest.raises(ValueError, match=message) as info:
        ResUNet.from_preset("tiny", **kwargs)
    assert isinstance(info.value, ConfigError)  # the CLI turns it into exit code 2
    assert "\n" not in str(info.value)


def test_unknown_preset_and_bad_configs_are_reported() -> None:
    with pytest.raises(ValueError, match="unknown network preset 'resnet9'; choose one of resnet18"):
        ResUNet.from_preset("resnet9")
    good = ResUNet.from_preset("tiny", spatial_dims=2).config
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        ResUNet.from_config({**good, "colour": "red"})
    with pytest.raises(ValueError, match="format 'other/2'"):
        ResUNet.from_config({**good, "format": "other/2"})
    with pytest.raises(ValueError, match="lacks"):
        ResUNet.from_config({k: v for k, v in good.items() if k != "widths"})
