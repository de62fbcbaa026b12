"""Export a checkpoint to ONNX or TorchScript, carrying its metadata so the file is self-describing.

The network itself is exported by :mod:`resunet.nets.export` (any input size, logits out). Here the
checkpoint's JSON metadata (plan, labels, channels, network config, post-processing, model card,
versions, source checkpoint SHA-256, spatial dims and size divisor) is embedded:

- ONNX: one ``metadata_props`` entry with key ``"resunet"`` holding the JSON;
- TorchScript: the extra file ``resunet.json`` inside the archive
  (``torch.jit.load(path, _extra_files={"resunet.json": ""})``).

:func:`resunet.inference.model.load_model` reads both back, so ``resunet predict --model model.onnx``
runs the same pre- and post-processing as the checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from resunet.errors import ConfigError, ModelError
from resunet.inference.model import EXTRA_FILE, METADATA_KEY, checkpoint_metadata
from resunet.io.atomic import atomic_path

FORMATS = ("onnx", "torchscript")


def export_model(checkpoint: str | os.PathLike[str] | Any, fmt: str, out: str | os.PathLike[str]) -> Path:
    """Export ``checkpoint`` (path or Checkpoint) to ``out`` in format ``fmt`` (``onnx`` | ``torchscript``).

    The exported graph takes float32 ``(B, C, *spatial)`` of any batch and spatial size and returns
    logits ``(B, K, *spatial)``. Written atomically. Returns ``out``.
    """
    from resunet.nets.export import export_onnx, export_torchscript
    from resunet.training.checkpoint import Checkpoint, load_checkpoint

    if fmt not in FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    net = ckpt.build_network()
    meta = checkpoint_metadata(ckpt)
    meta["spatial_dims"] = int(net.spatial_dims)
    meta["size_divisor"] = [int(d) for d in net.size_divisor]
    meta["export_format"] = fmt
    text = json.dumps(meta, sort_keys=True)
    # example window: 2 windows (dynamic batch needs >= 2) of one divisor-multiple per axis
    example = (2, int(net.in_channels), *[max(2 * int(d), 16) for d in net.size_divisor])
    out = Path(out)
    if fmt == "onnx":
        if out.suffix.lower() != ".onnx":
            raise ConfigError(f"{out}: an ONNX export's file name must end in .onnx")
        import onnx

        with atomic_path(out) as staged:
            export_onnx(net, staged, example, dynamic=True, any_size=True)
            proto = onnx.load(str(staged))
            entry = proto.metadata_props.add()
            entry.key, entry.value = METADATA_KEY, text
            onnx.save(proto, str(staged))
    else:
        with atomic_path(out) as staged:
            export_torchscript(net, staged, example, any_size=True)
            module = torch.jit.load(str(staged), map_location="cpu")
            torch.jit.save(module, str(staged), _extra_files={EXTRA_FILE: text})
    if not out.exists():
        raise ModelError(f"{out}: export did not produce a file")
    return out
