"""Transfer learning: torchvision-format ImageNet ResNet weights into a ResUNet encoder.

``load_torchvision_resnet(net, path_or_state_dict)`` reads a torchvision ``ResNet`` state dict (the
``.pth`` files torchvision publishes, read from a local file with ``torch.load(weights_only=True)``,
never executing code) and copies it into ``net.encoder`` by name. It works for the resnet presets
(any ``norm``; ``resnet_d`` shortcuts are mapped) and:

- adapts ``conv1`` to the network's input channels: 1 channel = sum over RGB (a grey image is
  R = G = B, so the summed filter gives the same response as the RGB filter did); N channels =
  RGB repeated cyclically and scaled by 3/N (so activations keep their magnitude); this is the
  rule of timm's ``adapt_input_conv``, written out here so timm is not a dependency;
- inflates 2D kernels into a 3D encoder I3D-style (Carreira & Zisserman 2017): the k x k kernel is
  repeated ``kd`` times along the depth axis and divided by ``kd``, so on an input that is constant
  along depth the 3D network reproduces the 2D network's activations;
- ignores ``fc.*`` (the classifier) and, when the network's norm keeps no running statistics
  (instance/group norm), the batch-norm ``running_mean``/``running_var``/``num_batches_tracked``.

Everything else must match (``strict=True``) or is listed in the returned :class:`LoadReport`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from resunet.errors import ModelError
from resunet.nets.network import ResUNet

_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class LoadReport:
    """What :func:`load_torchvision_resnet` did, key by key (encoder key names).

    Attributes:
        loaded: keys copied unchanged.
        adapted: ``"key: how"`` for keys copied after a change (input channels, inflation, renaming).
        skipped: source keys deliberately not used (classifier, running stats the net lacks).
        missing: encoder keys no source key filled (they keep their fresh initialisation).
        unexpected: source keys with no place in the encoder.
        mismatched: ``"key: source shape -> encoder shape"`` that could not be adapted.
    """

    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every encoder tensor came from the source and every source tensor was used."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One line: counts, then the first few problem keys."""
        parts = [f"{len(self.loaded)} loaded", f"{len(self.adapted)} adapted", f"{len(self.skipped)} skipped"]
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {name}: {', '.join(keys[:3])}{more}")
        return "; ".join(parts)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a local ``.pth``/``.pt`` file without executing code.

    Accepts a plain state dict or a dict with a ``"state_dict"``/``"model"`` entry; strips a
    ``"module."`` prefix (DataParallel checkpoints).
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"pretrained weights {p}: no such file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/unsafe files
        raise ModelError(f"pretrained weights {p}: cannot be read as a weights-only state dict ({exc.__class__.__name__})") from None
    return _as_state_dict(obj, str(p))


def _as_state_dict(obj: object, name: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"pretrained weights {name}: not a state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Turn an RGB first-conv weight ``(O, 3, *k)`` into ``(O, in_channels, *k)``.

    1 channel: sum over RGB. N channels: RGB repeated cyclically, first N kept, scaled by 3 / N.
    """
    src = weight.shape[1]
    if in_channels == src:
        return weight.clone()
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_channels / src)
    w = weight.repeat(1, reps, *([1] * (weight.dim() - 2)))[:, :in_channels]
    return w * (src / in_channels)


def inflate(weight: torch.Tensor, kernel: tuple[int, ...], depth_axis: int = 0) -> torch.Tensor:
    """I3D inflation of a 2D conv weight ``(O, I, kh, kw)`` into ``(O, I, *kernel)`` (3 axes).

    The 2D kernel is placed in the plane of the two axes other than ``depth_axis`` (0, 1 or 2, the
    3D kernel's spatial axis to repeat along), repeated ``kernel[depth_axis]`` times along it and
    divided by that count. ``kernel`` must equal ``(kh, kw)`` on the other two axes.
    """
    if weight.dim() != 4 or len(kernel) != 3 or depth_axis not in (0, 1, 2):
        raise ModelError(f"cannot inflate a weight of shape {tuple(weight.shape)} into kernel {kernel}")
    plane = tuple(k for i, k in enumerate(kernel) if i != depth_axis)
    if plane != tuple(weight.shape[2:]):
        raise ModelError(
            f"cannot inflate a {tuple(weight.shape[2:])} kernel into {kernel} along axis {depth_axis}"
        )
    kd = kernel[depth_axis]
    w = weight.unsqueeze(2 + depth_axis)
    reps = [1, 1, 1, 1, 1]
    reps[2 + depth_axis] = kd
    return w.repeat(*reps) / kd


def load_torchvision_resnet(
    net: ResUNet,
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    strict: bool = True,
    depth_axis: int = 0,
) -> LoadReport:
    """Load torchvision ResNet weights into ``net.encoder`` (2D, or 3D by inflation).

    Args:
        net: a ResUNet built from a resnet preset (or the same stage layout).
        path_or_state_dict: local file of a torchvision ``ResNet`` state dict, or the dict itself.
        strict: raise :class:`resunet.errors.ModelError` unless every encoder tensor is filled and
            every source tensor (apart from ``fc`` and running stats the net has no place for) used.
        depth_axis: for a 3D net, the kernel axis (0, 1 or 2 = the input's first, second or third
            spatial axis) along which 2D kernels are repeated; when a kernel does not fit along it
            (anisotropic kernels) the first axis that fits is used.

    Returns a :class:`LoadReport`. Nothing is written into the network when ``strict`` fails.
    """
    if isinstance(path_or_state_dict, Mapping):
        src = _as_state_dict(path_or_state_dict, "state dict")
    else:
        src = read_state_dict(path_or_state_dict)
    target = net.encoder.state_dict()
    cfg = net._cfg
    report = LoadReport()
    new: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    for skey, sval in src.items():
        if skey.startswith("fc."):
            report.skipped.append(skey)
            used.add(skey)
            continue
        tkey = skey
        note = []
        if cfg.resnet_d and ".downsample." in skey:
            # torchvision: downsample.0 = conv, .1 = norm; ResNet-D here: .0 = pool, .1 conv, .2 norm.
            head, _, tail = skey.partition(".downsample.")
            idx, _, rest = tail.partition(".")
            if idx in ("0", "1"):
                tkey = f"{head}.downsample.{int(idx) + 1}.{rest}"
                note.append("renamed for ResNet-D")
        if tkey not in target:
            if skey.rsplit(".", 1)[-1] in _RUNNING and cfg.norm != "batch":
                report.skipped.append(skey)
                used.add(skey)
            continue
        tval = target[tkey]
        val = sval
        if tkey == "conv1.weight" and val.dim() == tval.dim() - (cfg.spatial_dims - 2) and val.shape[1] != tval.shape[1]:
            val = adapt_input_conv(val, tval.shape[1])
            note.append(f"input channels {sval.shape[1]} -> {tval.shape[1]}")
        if cfg.spatial_dims == 3 and val.dim() == 4 and tval.dim() == 5:
            kernel = tuple(tval.shape[2:])
            axes = [depth_axis] + [a for a in (0, 1, 2) if a != depth_axis]
            fit = [a for a in axes if tuple(k for i, k in enumerate(kernel) if i != a) == tuple(val.shape[2:])]
            if fit:
                val = inflate(val, kernel, fit[0])
                note.append(f"inflated along axis {fit[0]} (x{kernel[fit[0]]})")
        if tuple(val.shape) != tuple(tval.shape):
            report.mismatched.append(f"{skey}: {tuple(sval.shape)} -> {tuple(tval.shape)}")
            used.add(skey)
            continue
        new[tkey] = val.to(dtype=tval.dtype)
        used.add(skey)
        (report.adapted.append(f"{tkey}: {', '.join(note)}") if note else report.loaded.append(tkey))

    report.unexpected = [k for k in src if k not in used]
    report.missing = [k for k in target if k not in new]
    if strict and not report.complete:
        raise ModelError(f"pretrained weights do not fit this network's encoder: {report.summary()}")
    with torch.no_grad():
        net.encoder.load_state_dict(new, strict=False)
    return report


#: torchvision architecture of each resnet preset: (block, blocks per stage, width of layer1.0.conv1)
TORCHVISION_ARCHS: dict[str, tuple[str, tuple[int, ...], int]] = {
    "resnet18": ("basic", (2, 2, 2, 2), 64),
    "resnet34": ("basic", (3, 4, 6, 3), 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 64),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 128),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23, 3), 128),
}


def torchvision_arch(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The torchvision ResNet a state dict belongs to (``"resnet50"``, ...), from its keys and shapes; else None."""
    blocks = [0, 0, 0, 0]
    for key in state_dict:
        parts = key.split(".")
        if len(parts) > 2 and parts[0] in ("layer1", "layer2", "layer3", "layer4") and parts[1].isdigit():
            i = int(parts[0][-1]) - 1
            blocks[i] = max(blocks[i], int(parts[1]) + 1)
    first = state_dict.get("layer1.0.conv1.weight")
    if first is None:
        return None
    block = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
    for name, arch in TORCHVISION_ARCHS.items():
        if arch == (block, tuple(blocks), int(first.shape[0])):
            return name
    return None


def check_pretrained_file(path: str | os.PathLike[str], preset: str) -> dict[str, torch.Tensor]:
    """Read ``path`` and check that it holds the torchvision weights of ``preset``; returns the state dict.

    Raises:
        ModelError: one line naming the file, what it holds and the preset that would take it.
    """
    p = Path(path)
    src = read_state_dict(p)
    arch = torchvision_arch(src)
    holds = f"holds torchvision {arch} weights" if arch else "is not a torchvision ResNet state dict"
    if preset not in TORCHVISION_ARCHS:
        raise ModelError(
            f"--pretrained {p}: preset {preset!r} has no torchvision encoder to take ImageNet weights ({p.name} "
            f"{holds}); use --preset {arch or 'resnet18'} (presets taking them: {', '.join(TORCHVISION_ARCHS)})"
        )
    if arch != preset:
        hint = f"use --preset {arch}" if arch else "pass a torchvision resnet18..152 or wide_resnet50_2/101_2 .pth"
        raise ModelError(f"--pretrained {p}: the file {holds}, which do not fit preset {preset!r}; {hint}")
    return src


def load_pretrained_file(net: ResUNet, path: str | os.PathLike[str], depth_axis: int = 0,
                         state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, object]:
    """``resunet train --pretrained FILE``: load a local torchvision ResNet ``.pth`` into ``net``'s encoder.

    Strict: every encoder tensor must come from the file (2D as is, 3D inflated, the first conv
    adapted to the input channels) and every tensor of the file but ``fc`` must be used.

    Returns the record the model card and config keep: ``file`` (name), ``path``, ``sha256``,
    ``arch`` (the torchvision architecture recognised in the file), ``parameters`` (number of
    values taken from the file, ``fc`` and running statistics excluded), ``loaded``, ``adapted``.

    ``state_dict``: the file's contents when already read by :func:`check_pretrained_file`.

    Raises:
        ModelError: one line naming the file, what it holds and the preset that would take it.
    """
    from resunet.io.hashing import sha256_file

    p = Path(path)
    preset = getattr(net, "preset", None) or "this network"
    src = dict(state_dict) if state_dict is not None else check_pretrained_file(p, preset)
    arch = torchvision_arch(src)
    try:
        report = load_torchvision_resnet(net, src, strict=True, depth_axis=depth_axis)
    except ModelError as err:
        raise ModelError(f"--pretrained {p}: {err}") from None
    used = [k for k, v in src.items() if not k.startswith("fc.") and k.rsplit(".", 1)[-1] not in _RUNNING]
    return {
        "file": p.name,
        "path": str(p.resolve()),
        "sha256": sha256_file(p),
        "arch": arch,
        "parameters": int(sum(src[k].numel() for k in used)),
        "loaded": len(report.loaded),
        "adapted": len(report.adapted),
    }


__all__ = ["LoadReport", "TORCHVISION_ARCHS", "adapt_input_conv", "check_pretrained_file", "inflate", "load_pretrained_file",
           "load_torchvision_resnet", "read_state_dict", "torchvision_arch"]
