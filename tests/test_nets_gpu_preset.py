"""The `gpu` preset: sized against nnU-Net ResEnc-M (counted on the meta device) and trainable on a CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resunet.nets import ResUNet

# bench/results/nets.md and gpu.md: nnU-Net ResEnc-M, 102.3 M parameters, 1434.8 GFLOP forward per 128^3 sample
RESENC_M_PARAMS = 102.3e6
RESENC_M_GFLOP_128 = 1434.8


def test_gpu_preset_has_resenc_m_capacity_at_a_third_of_its_compute() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = ResUNet.from_preset("gpu", spatial_dims=3)
    counter = FlopCounterMode(display=False)
    with torch.device("meta"), counter:
        net.eval()(torch.empty(1, 1, 128, 128, 128))
    gflop = counter.get_total_flops() / 1e9
    params = sum(p.numel() for p in net.parameters())
    assert params >= RESENC_M_PARAMS, params
    assert gflop < RESENC_M_GFLOP_128 / 2.5, gflop
    assert net.size_divisor == (32, 32, 32)


def test_gpu_preset_trains_one_step_on_a_tiny_patch() -> None:
    # contiguous layout: channels-last is the GPU setting, and on this CPU it made the step slower
    torch.manual_seed(0)
    net = ResUNet.from_preset("gpu", spatial_dims=3, in_channels=1, out_channels=2, deep_supervision=False).train()
    x = torch.randn(1, 1, 64, 32, 32)
    y = (x[:, 0] > 0).long()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    before = net.head.weight.detach().clone()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert not torch.equal(before, net.head.weight)
