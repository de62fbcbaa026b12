"""Named network presets: the ResNet family from the literature plus small CPU-sized networks.

``ResUNet.from_preset(name, spatial_dims, in_channels, out_channels, **overrides)`` looks names up
here. The ResNet presets copy torchvision's encoder exactly (7x7/2 stem with 64 channels, 3x3/2
max-pool, stages of 64/128/256/512 planes with strides 1/2/2/2), so for ``spatial_dims=2,
in_channels=3`` the encoder has torchvision's parameter count without ``fc`` and ImageNet weights
load by name (see :mod:`resunet.nets.pretrained`); their decoder widths are
segmentation_models_pytorch's Unet defaults (16, 32, 64, 128, 256 from full resolution down).
Total stride (``size_divisor``) of the ResNet presets: 32 per axis.

CPU presets (full-resolution residual stem, basic blocks):
- ``tiny``: 8/16/32/64 channels, one block per stage, divisor 8; for tests and smoke runs.
- ``small``: the bundled brain-extraction model's network and the default CPU training preset.
  Stem at half resolution (3x3/2 conv, 16 ch), stages of 32/64/128/256 channels at 1/4..1/32
  resolution (one basic block each), decoder 128/64/32/16 and a learned transposed-conv logit
  upsampling: no convolution runs at full resolution and only the stem and one decoder block at
  half resolution, where low-channel 3D convolutions are slowest on CPU (their backward pass ran
  ~8x slower than their forward here). Divisor 32; 5.7 M parameters, 11.4 GFLOP per 96^3 patch.
- ``base``: the default 3D preset (``DEFAULT_3D_PRESET``) for real tasks: 3x3/2 stem with 32
  channels, stages 64/128/256/320 with 2/3/4/4 basic blocks at 1/4..1/32 resolution, decoder
  256/128/64/32 and a transposed-conv logit upsampling. Compute sits where channel counts are high
  (efficient convolutions), not at full resolution; 46 M parameters, 62.5 GFLOP per 96^3 patch
  (nnU-Net ResEnc-M: 102 M, 605 GFLOP). Divisor 32.
- ``cpu``: the fastest preset to train on CPU, for 3D work on a few cores. ``small``'s encoder (3x3/2
  stem with 16 channels at 1/2 resolution, stages of 32/64/128/256 channels at 1/4..1/32, one basic
  block each) with a lighter decoder at 1/2 resolution: 8 channels there (128/64/32 at the coarser
  levels) before the transposed-conv logit upsampling. Profiling showed the backward pass of 3D
  convolutions with 16-32 channels at 48^3 dominating ``small``'s training step; the 8-channel level
  cuts that work by ~3x. Divisor 32; 5.7 M parameters, 8.1 GFLOP per 96^3 patch (MONAI
  ``UNet(16..256, num_res_units=2)``: 4.8 M, 10.2 GFLOP); training step (2 x 1 x 96^3, 2 threads)
  1.20x faster than that UNet, both in the contiguous layout (bench/results/nets.md).
- ``gpu``: a 3D preset sized for GPU tensor cores, meant for channels-last with bf16 autocast (the
  training defaults on CUDA: ``channels_last: true``, ``amp: auto``). ``base``'s layout with twice its
  widths: 3x3/2 stem with 64 channels at 1/2 resolution, stages 128/256/512/512 with 2/3/4/2 basic
  blocks at 1/4..1/32, decoder 512/256/128/32 (coarse to fine) and the transposed-conv logit
  upsampling, so no convolution runs at full resolution and most of the compute sits in wide
  convolutions at 1/4 and 1/8. 125.2 M parameters (nnU-Net ResEnc-M: 102.3 M), 195 GFLOP per 96^3
  and 462 GFLOP per 128^3 patch (ResEnc-M: 605 and 1435), counted with FlopCounterMode. Divisor 32.
  Its GPU step time and achieved TFLOP/s are measured by ``bench/gpu_check.py`` (row ``gpu cl``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from resunet.nets.errors import NetConfigError

_RESNET_STEM = {"width": 64, "kernel_size": 7, "stride": 2, "pool_stride": 2}
_RESNET_DECODER = {"widths": [16, 32, 64, 128, 256], "blocks": 1, "full_res": "block"}


def _resnet(block: str, blocks: list[int], width_factor: float = 1.0) -> dict[str, Any]:
    return {
        "widths": [64, 128, 256, 512],
        "blocks": blocks,
        "block": block,
        "strides": [1, 2, 2, 2],
        "kernel_sizes": 3,
        "width_factor": width_factor,
        "stem": dict(_RESNET_STEM),
        "decoder": dict(_RESNET_DECODER),
    }


def merged_kwargs(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``overrides``, where nested settings (``stem``, ``decoder``) merge key by key:
    ``{"stem": {"stride": 1}}`` changes the stem's stride and keeps its width. Neither input is changed."""
    out = dict(base)
    for key, value in overrides.items():
        old = out.get(key)
        out[key] = {**old, **value} if isinstance(value, Mapping) and isinstance(old, Mapping) else value
    return out


_SMALL: dict[str, Any] = {
    "widths": [32, 64, 128, 256],
    "blocks": 1,
    "block": "basic",
    "strides": [2, 2, 2, 2],
    "kernel_sizes": 3,
    "stem": {"width": 16, "kernel_size": 3, "stride": 2, "pool_stride": 1},
    "decoder": {"widths": [16, 32, 64, 128], "blocks": 1, "full_res": "transpose"},
}

PRESETS: dict[str, dict[str, Any]] = {
    # He et al. 2016 / torchvision.models.resnet*; wide: Zagoruyko & Komodakis 2016.
    "resnet18": _resnet("basic", [2, 2, 2, 2]),
    "resnet34": _resnet("basic", [3, 4, 6, 3]),
    "resnet50": _resnet("bottleneck", [3, 4, 6, 3]),
    "resnet101": _resnet("bottleneck", [3, 4, 23, 3]),
    "resnet152": _resnet("bottleneck", [3, 8, 36, 3]),
    "wide_resnet50_2": _resnet("bottleneck", [3, 4, 6, 3], 2.0),
    "wide_resnet101_2": _resnet("bottleneck", [3, 4, 23, 3], 2.0),
    "tiny": {
        "widths": [8, 16, 32, 64],
        "blocks": 1,
        "block": "basic",
        "strides": [1, 2, 2, 2],
        "kernel_sizes": 3,
        "stem": {"width": 8, "kernel_size": 3, "stride": 1, "pool_stride": 1},
        "decoder": {"widths": None, "blocks": 1, "full_res": "block"},
    },
    "small": _SMALL,
    "base": {
        "widths": [64, 128, 256, 320],
        "blocks": [2, 3, 4, 4],
        "block": "basic",
        "strides": [2, 2, 2, 2],
        "kernel_sizes": 3,
        "stem": {"width": 32, "kernel_size": 3, "stride": 2, "pool_stride": 1},
        "decoder": {"widths": [32, 64, 128, 256], "blocks": 1, "full_res": "transpose"},
    },
    # small's encoder, 8 instead of 16 channels at the decoder's half-resolution level
    "cpu": merged_kwargs(_SMALL, {"decoder": {"widths": [8, 32, 64, 128]}}),
    # base's layout, twice as wide, and its width at 1/16 kept at 1/32: sized for GPU tensor cores
    "gpu": {
        "widths": [128, 256, 512, 512],
        "blocks": [2, 3, 4, 2],
        "block": "basic",
        "strides": [2, 2, 2, 2],
        "kernel_sizes": 3,
        "stem": {"width": 64, "kernel_size": 3, "stride": 2, "pool_stride": 1},
        "decoder": {"widths": [32, 128, 256, 512], "blocks": 1, "full_res": "transpose"},
    },
}

#: The preset the bundled brain-extraction model uses.
BUNDLED_PRESET = "small"
#: The default 3D preset (benchmark goal: highest achieved GFLOP/s among peers).
DEFAULT_3D_PRESET = "base"


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_kwargs(name: str) -> dict[str, Any]:
    """A fresh copy of preset ``name``'s constructor keyword arguments (without dims/channels)."""
    if name not in PRESETS:
        raise NetConfigError(f"unknown network preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
