"""Residual blocks, written once for 2D and 3D.

A residual block computes ``y = act(F(x) + shortcut(x))``: the shortcut is the identity when the
shapes match and a projection (1x1 conv + norm, optionally preceded by average pooling as in
ResNet-D) when the stride or the channel count changes. Layer names follow torchvision's
``models/resnet.py`` (``conv1``, ``bn1``, ..., ``downsample.0``/``downsample.1``) so that published
ImageNet weights load by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from resunet.nets import layers


class BasicBlock(nn.Module):
    """Two k x k convolutions (ResNet-18/34 block); output channels = ``planes``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input ``(B, in_channels, *spatial)``.
        planes: channels of both convolutions and of the output.
        stride: stride per spatial axis of the first convolution (downsampling by that factor).
        kernel_size: kernel per spatial axis of both convolutions (odd).
        norm: ``instance``, ``batch`` or ``group``; ``norm_groups``: groups for group norm.
        act: activation name (see :data:`resunet.nets.layers.ACTIVATIONS`).
        resnet_d: project a strided shortcut with avg-pool + 1x1 conv instead of a strided 1x1 conv.
        width_factor: unused here (kept so both block types share one signature).
    """

    expansion = 1
    __jit_unused_properties__ = ["last_norm"]  # properties TorchScript must not compile

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        planes: int,
        stride: Sequence[int],
        kernel_size: Sequence[int],
        norm: str = "instance",
        norm_groups: int = 8,
        act: str = "relu",
        resnet_d: bool = False,
        width_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.conv1 = layers.conv(spatial_dims, in_channels, planes, kernel_size, stride)
        self.bn1 = layers.norm(spatial_dims, norm, planes, norm_groups)
        self.relu = layers.activation(act)
        self.conv2 = layers.conv(spatial_dims, planes, planes, kernel_size)
        self.bn2 = layers.norm(spatial_dims, norm, planes, norm_groups)
        self.downsample = shortcut(spatial_dims, in_channels, planes, stride, norm, norm_groups, resnet_d)

    @property
    def last_norm(self) -> nn.Module:
        """The norm whose zero-initialised weight turns the residual branch off."""
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, k x k (strided, as in torchvision's ResNet v1.5), 1x1 expand by 4.

    Output channels = ``planes * 4``; the middle width is ``int(planes * width_factor)``
    (``width_factor=2`` gives torchvision's wide_resnet50_2/101_2). Other arguments as
    :class:`BasicBlock`.
    """

    expansion = 4
    __jit_unused_properties__ = ["last_norm"]

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        planes: int,
        stride: Sequence[int],
        kernel_size: Sequence[int],
        norm: str = "instance",
        norm_groups: int = 8,
        act: str = "relu",
        resnet_d: bool = False,
        width_factor: float = 1.0,
    ) -> None:
        super().__init__()
        width = int(planes * width_factor)
        out_channels = planes * self.expansion
        self.conv1 = layers.conv(spatial_dims, in_channels, width, (1,))
        self.bn1 = layers.norm(spatial_dims, norm, width, norm_groups)
        self.conv2 = layers.conv(spatial_dims, width, width, kernel_size, stride)
        self.bn2 = layers.norm(spatial_dims, norm, width, norm_groups)
        self.conv3 = layers.conv(spatial_dims, width, out_channels, (1,))
        self.bn3 = layers.norm(spatial_dims, norm, out_channels, norm_groups)
        self.relu = layers.activation(act)
        self.downsample = shortcut(spatial_dims, in_channels, out_channels, stride, norm, norm_groups, resnet_d)

    @property
    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def shortcut(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    stride: Sequence[int],
    norm: str,
    norm_groups: int,
    resnet_d: bool,
) -> Optional[nn.Module]:
    """``None`` (identity) when shapes match, else the projection shortcut.

    Plain projection: ``Sequential(conv1x1(stride), norm)`` (torchvision keys ``downsample.0/1``).
    ResNet-D (He et al. 2019, "Bag of Tricks"): ``Sequential(avgpool(stride), conv1x1, norm)`` so
    the shortcut sees every input voxel instead of one in ``prod(stride)``.
    """
    strided = any(s != 1 for s in stride)
    if not strided and in_channels == out_channels:
        return None
    proj = layers.conv(spatial_dims, in_channels, out_channels, (1,), (1,) if resnet_d else stride)
    bn = layers.norm(spatial_dims, norm, out_channels, norm_groups)
    if resnet_d and strided:
        return nn.Sequential(layers.avg_pool(spatial_dims, stride), proj, bn)
    if resnet_d:
        return nn.Sequential(nn.Identity(), proj, bn)
    return nn.Sequential(proj, bn)


def make_stage(
    block: str,
    spatial_dims: int,
    in_channels: int,
    planes: int,
    blocks: int,
    stride: Sequence[int],
    kernel_size: Sequence[int],
    norm: str,
    norm_groups: int,
    act: str,
    resnet_d: bool,
    width_factor: float,
) -> nn.Sequential:
    """torchvision's ``_make_layer``: ``blocks`` blocks, the first one strided/projecting."""
    cls = BLOCKS[block]
    mods = []
    for i in range(blocks):
        mods.append(
            cls(
                spatial_dims,
                in_channels if i == 0 else planes * cls.expansion,
                planes,
                stride if i == 0 else (1,) * spatial_dims,
                kernel_size,
                norm,
                norm_groups,
                act,
                resnet_d,
                width_factor,
            )
        )
    return nn.Sequential(*mods)
