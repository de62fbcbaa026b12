"""Export a ResUNet for deployment: TorchScript, ONNX and ``torch.export``.

Every exporter wraps the network in :class:`LogitsModule`, whose ``forward(x)`` always returns the
full-resolution logits ``(B, out_channels, *spatial)`` as one tensor (deep-supervision outputs are
dropped, whatever the train/eval mode). With ``any_size=True`` (default) the exported graph pads
every input to a multiple of ``net.size_divisor`` and crops the logits back, unconditionally (an
exported graph cannot branch on the input size), so it accepts any spatial size; the padding costs
one copy even for sizes that are multiples. With ``any_size=False`` the graph has no padding and
callers must feed multiples of ``net.size_divisor``.

The network is exported in eval mode (norm statistics frozen); MC dropout is kept if the net has it
switched on (:meth:`ResUNet.enable_mc_dropout`). Files are written atomically (temp + rename).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import List

import torch
from torch import nn

from resunet.io.atomic import atomic_path
from resunet.errors import ModelError
from resunet.nets.errors import NetConfigError
from resunet.nets.network import ResUNet


class LogitsModule(nn.Module):
    """``forward(x) -> logits`` of a :class:`ResUNet` (full resolution, single tensor).

    ``any_size``: pad/crop inside unconditionally so any spatial size works in an exported graph.
    """

    def __init__(self, net: ResUNet, any_size: bool = True) -> None:
        super().__init__()
        self.net = net
        self.any_size = bool(any_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_all(x, False, self.any_size)[0]


def _prepare(net: ResUNet, example_shape: Sequence[int], any_size: bool) -> tuple[LogitsModule, torch.Tensor]:
    if not isinstance(net, ResUNet):
        raise NetConfigError(f"export needs a resunet ResUNet, got {type(net).__name__}")
    shape = tuple(int(s) for s in example_shape)
    if len(shape) != net.spatial_dims + 2 or shape[1] != net.in_channels or min(shape) < 1:
        raise NetConfigError(
            f"example_shape {shape} must be (B, {net.in_channels}, {', '.join('S' * net.spatial_dims)}) for this "
            f"{net.spatial_dims}D network with {net.in_channels} input channel(s)"
        )
    if not any_size:
        bad = [s for s, d in zip(shape[2:], net.size_divisor) if s % d]
        if bad:
            raise NetConfigError(
                f"example_shape {shape}: spatial sizes must be multiples of {net.size_divisor} when any_size=False"
            )
    param = next(net.parameters())
    wrapper = LogitsModule(net, any_size).eval()
    return wrapper, torch.randn(shape, dtype=param.dtype, device=param.device)


def export_torchscript(
    net: ResUNet, path: str | os.PathLike[str], example_shape: Sequence[int], any_size: bool = True
) -> Path:
    """Script the network (``torch.jit.script``) and save it to ``path`` (a ``.pt`` TorchScript file).

    ``example_shape``: ``(B, C, *spatial)`` input used to check the scripted module runs and matches
    eager mode before anything is written. Load with ``torch.jit.load(path)``; the module's forward
    returns logits. Returns the path.
    """
    was_training = net.training
    wrapper, x = _prepare(net, example_shape, any_size)
    try:
        scripted = torch.jit.script(wrapper)
        with torch.no_grad():
            _check_close(scripted(x), wrapper(x), "TorchScript")
        with atomic_path(path) as tmp:
            torch.jit.save(scripted, str(tmp))
    finally:
        net.train(was_training)
    return Path(path)


def export_program(
    net: ResUNet, example: torch.Tensor, dynamic: bool = True, any_size: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` the network; returns the ``ExportedProgram`` (save with ``torch.export.save``).

    ``example``: an input tensor ``(B, C, *spatial)``. ``dynamic``: batch and spatial sizes are
    symbolic (use an example with B >= 2 and spatial sizes >= 2, as ``torch.export`` specialises
    sizes 0 and 1); with ``any_size=False`` the spatial sizes are constrained to multiples of
    ``net.size_divisor``.
    """
    was_training = net.training
    wrapper, _ = _prepare(net, tuple(example.shape), any_size)
    dyn = _dynamic_shapes(net, tuple(example.shape), any_size) if dynamic else None
    try:
        return torch.export.export(wrapper, (example,), dynamic_shapes=dyn)
    finally:
        net.train(was_training)


def export_onnx(
    net: ResUNet,
    path: str | os.PathLike[str],
    example_shape: Sequence[int],
    dynamic: bool = True,
    any_size: bool = True,
    opset: int = 18,
) -> Path:
    """Export to ONNX (``torch.onnx.export`` with the dynamo exporter) as one self-contained file.

    Input name ``"image"`` ``(B, C, *spatial)``, output name ``"logits"`` ``(B, out_channels, *spatial)``.
    ``dynamic``: batch and spatial axes are dynamic (example sizes must be >= 2). Returns the path.
    """
    was_training = net.training
    wrapper, x = _prepare(net, example_shape, any_size)
    dyn = {"x": _dynamic_shapes(net, tuple(x.shape), any_size)["x"]} if dynamic else None
    try:
        program = torch.onnx.export(
            wrapper,
            (x,),
            dynamo=True,
            dynamic_shapes=dyn,
            input_names=["image"],
            output_names=["logits"],
            opset_version=opset,
            verbose=False,
        )
        with atomic_path(path) as tmp:
            program.save(str(tmp), external_data=False)
    finally:
        net.train(was_training)
    return Path(path)


def _dynamic_shapes(net: ResUNet, shape: tuple[int, ...], any_size: bool) -> dict:
    from torch.export import Dim

    if shape[0] < 2 or min(shape[2:]) < 2:
        raise NetConfigError(
            f"example shape {shape}: dynamic export needs batch >= 2 and spatial sizes >= 2 "
            "(torch.export specialises sizes 0 and 1)"
        )
    # Minimum sizes: instance norm needs more than one voxel at the coarsest level, which
    # torch.export can only express per axis: size > divisor (any_size) or >= 2 * divisor.
    axes = {0: Dim("batch", min=1, max=1024)}
    for i, div in enumerate(net.size_divisor):
        if any_size:
            # AUTO, not a named Dim: the padding arithmetic produces guards that hold for every
            # size but that the symbolic solver cannot prove; AUTO keeps them as runtime checks.
            axes[2 + i] = Dim.AUTO(min=div + 1, max=4096)
        else:
            axes[2 + i] = div * Dim(f"k{i}", min=2, max=4096 // div)
    return {"x": axes}


def _check_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-4):
        raise ModelError(f"{what} export does not reproduce the eager network's output")


__all__: List[str] = ["LogitsModule", "export_onnx", "export_program", "export_torchscript"]
