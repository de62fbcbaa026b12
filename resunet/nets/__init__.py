"""resunet.nets: the Residual U-Net family (ResNet encoder, U-Net decoder), 2D and 3D.

Main entry points: :class:`ResUNet` (constructor, ``from_preset``, ``from_config``, ``config``,
``size_divisor``), the presets in :mod:`resunet.nets.presets`, ImageNet weight loading in
:mod:`resunet.nets.pretrained` and TorchScript/ONNX/torch.export in :mod:`resunet.nets.export`.
"""

from resunet.nets.blocks import BasicBlock, Bottleneck
from resunet.nets.config import DecoderConfig, ResUNetConfig, StemConfig
from resunet.nets.errors import NetConfigError
from resunet.nets.network import ResUNet
from resunet.nets.presets import BUNDLED_PRESET, DEFAULT_3D_PRESET, PRESETS, preset_names

__all__ = [
    "BUNDLED_PRESET",
    "DEFAULT_3D_PRESET",
    "PRESETS",
    "BasicBlock",
    "Bottleneck",
    "DecoderConfig",
    "NetConfigError",
    "ResUNet",
    "ResUNetConfig",
    "StemConfig",
    "preset_names",
]
