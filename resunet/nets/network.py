"""The Residual U-Net: a ResNet encoder, a U-Net decoder, 2D or 3D from one code path."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, List, Union

import torch
import torch.nn.functional as F
from torch import nn

from resunet.nets import layers
from resunet.nets.blocks import BasicBlock, Bottleneck, make_stage
from resunet.nets.config import ResUNetConfig
from resunet.nets.errors import NetConfigError


class ResNetEncoder(nn.ModuleDict):
    """torchvision-compatible ResNet trunk returning the skip features, finest first.

    Children, in order: ``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1`` ... ``layerN`` (the names
    torchvision's ``ResNet`` uses, so ``encoder.load_state_dict(torchvision_sd_without_fc)`` works for
    the resnet presets in 2D). ``forward(x)`` returns one tensor per U-Net level (see
    :meth:`ResUNetConfig.levels`). A ``ModuleDict`` with a forward, like torchvision's
    ``IntermediateLayerGetter``, so the loop stays scriptable.
    """

    def __init__(self, cfg: ResUNetConfig) -> None:
        d = cfg.spatial_dims
        mods: OrderedDict[str, nn.Module] = OrderedDict()
        mods["conv1"] = layers.conv(d, cfg.in_channels, cfg.stem.width, cfg.stem.kernel_size, cfg.stem.stride)
        mods["bn1"] = layers.norm(d, cfg.norm, cfg.stem.width, cfg.norm_groups)
        mods["relu"] = layers.activation(cfg.act)
        mods["maxpool"] = layers.max_pool(d, cfg.stem.pool_stride)
        in_ch = cfg.stem.width
        for i, (w, n, s, k, p) in enumerate(
            zip(cfg.widths, cfg.blocks, cfg.strides, cfg.kernel_sizes, cfg.encoder_dropout)
        ):
            stage = make_stage(
                cfg.block, d, in_ch, w, n, s, k, cfg.norm, cfg.norm_groups, cfg.act, cfg.resnet_d, cfg.width_factor
            )
            if p > 0:
                # Parameter-free, appended last: torchvision state-dict keys are unchanged.
                stage.append(layers.MCDropout(p, cfg.mc_dropout))
            mods[f"layer{i + 1}"] = stage
            in_ch = w * cfg.expansion
        super().__init__(mods)
        names = ["relu"] + [f"layer{i + 1}" for i in range(len(cfg.widths))]
        self.return_layers: List[str] = [names[idx] for idx, _, _ in cfg.levels()]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats: List[torch.Tensor] = []
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                feats.append(x)
        return feats


class DecoderLevel(nn.Module):
    """Upsample the coarser features (transposed conv), concatenate the skip, residual block(s).

    ``forward(x, skip)``: ``x (B, in_channels, *coarse)``, ``skip (B, skip_channels, *fine)`` with
    ``fine = coarse * stride`` -> ``(B, width, *fine)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        width: int,
        stride: Sequence[int],
        blocks: int,
        kernel_size: Sequence[int],
        norm: str,
        norm_groups: int,
        act: str,
        dropout: float,
        mc: bool,
    ) -> None:
        super().__init__()
        self.up = layers.conv_transpose(spatial_dims, in_channels, width, stride)
        mods: list[nn.Module] = [
            BasicBlock(spatial_dims, width + skip_channels if i == 0 else width, width, (1,), kernel_size, norm, norm_groups, act)
            for i in range(blocks)
        ]
        if dropout > 0:
            mods.append(layers.MCDropout(dropout, mc))
        self.blocks = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.blocks(torch.cat([self.up(x), skip], dim=1))


class ResUNet(nn.Module):
    """Residual U-Net: ResNet encoder (basic or bottleneck blocks), U-Net decoder, 2D or 3D.

    Args:
        spatial_dims: 2 (images ``(B, C, H, W)``) or 3 (volumes ``(B, C, D, H, W)``).
        in_channels: input channels (e.g. 1 for one MR sequence, 4 for BraTS).
        out_channels: output channels = classes including background; the net returns logits.
        widths: per encoder stage, the block width ("planes"); a stage outputs ``width * expansion``
            channels (expansion 1 for basic, 4 for bottleneck blocks). Its length sets the number of
            stages (torchvision: ``(64, 128, 256, 512)``).
        blocks: residual blocks per stage (scalar or per stage; resnet50: ``(3, 4, 6, 3)``).
        block: ``"basic"`` (two k x k convs) or ``"bottleneck"`` (1x1, k x k, 1x1 with expansion 4).
        strides: per stage, the stride of its first block, per axis (int, or ``spatial_dims`` ints for
            anisotropic downsampling, e.g. ``(2, 2, 1)`` keeps thick slices along the last axis);
            default 1 for the first stage and 2 for the others.
        kernel_sizes: per stage, the (odd) kernel of the k x k convolutions, int or per axis.
        width_factor: bottleneck middle width = ``planes * width_factor`` (2 for wide ResNets).
        norm: ``"instance"`` (default, affine, no running stats), ``"batch"`` or ``"group"``.
        norm_groups: groups for group norm (``min(norm_groups, channels)`` must divide channels).
        act: ``"relu"``, ``"leakyrelu"`` (slope 0.01), ``"gelu"``, ``"silu"`` or ``"elu"``.
        encoder_dropout: dropout probability after each encoder stage (scalar or per stage).
        decoder_dropout: dropout probability after each decoder level (scalar or per level, finest
            first).
        mc_dropout: keep dropout active in eval mode (Monte Carlo uncertainty); see
            :meth:`enable_mc_dropout`.
        deep_supervision: in training mode return ``[full_res, coarser...]`` logits (one per decoder
            level, finest first); eval mode always returns one tensor.
        zero_init_residual: zero the last norm's weight in every residual branch, so a fresh block
            is ``act(x)`` (the identity for the non-negative inputs it receives after a ReLU).
        resnet_d: ResNet-D shortcuts (avg-pool then 1x1 conv) where a stage downsamples.
        stem: :class:`StemConfig` or dict (width, kernel_size, stride, pool_stride); default is
            torchvision's 7x7/2 conv + 3x3/2 max-pool with 64 channels.
        decoder: :class:`DecoderConfig` or dict (widths finest first, blocks, full_res).

    ``forward(x)``: ``x`` of shape ``(B, in_channels, *spatial)`` with any spatial size; returns
    logits ``(B, out_channels, *spatial)``. Sizes that are not multiples of :attr:`size_divisor` are
    zero-padded at the end of each axis inside the network and the output is cropped back, so
    callers never pad; padding costs a copy and the padded border sees zeros, so sliding-window
    callers should prefer patch sizes that are multiples. For speed on CPU with 3D inputs, convert
    the model and input to ``torch.channels_last_3d`` and use batch >= 2 (at batch 1 PyTorch runs
    small 3D convolutions on a slow fallback path).
    """

    # Python-side properties that TorchScript must not try to compile.
    __jit_unused_properties__ = [
        "config", "size_divisor", "spatial_dims", "in_channels", "out_channels", "deep_supervision",
        "deep_supervision_strides",
    ]

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, **settings: Any) -> None:
        # One signature, one default each: the settings (names, types, defaults, checks) are
        # ResUNetConfig.build's; __signature__ below shows them on ResUNet too.
        super().__init__()
        cfg = ResUNetConfig.build(spatial_dims, in_channels, out_channels, **settings)
        self._cfg = cfg
        self.preset: str | None = None
        d = cfg.spatial_dims
        levels = cfg.levels()
        dec = cfg.decoder
        self.encoder = ResNetEncoder(cfg)

        # Decoder levels in execution order (coarse -> fine); config lists are finest first.
        full = cfg.has_full_res_level
        n_skip_levels = len(levels) - 1
        mods = []
        in_ch = levels[-1][2]
        for k in range(n_skip_levels - 1, -1, -1):
            j = k + (1 if full else 0)  # index into the finest-first decoder lists
            feat_idx, stride, skip_ch = levels[k]
            ratio = [a // b for a, b in zip(levels[k + 1][1], stride)]
            kernel = cfg.kernel_sizes[max(feat_idx - 1, 0)]
            mods.append(
                DecoderLevel(
                    d, in_ch, skip_ch, dec.widths[j], ratio, dec.blocks[j], kernel, cfg.norm, cfg.norm_groups,
                    cfg.act, cfg.decoder_dropout[j], cfg.mc_dropout,
                )
            )
            in_ch = dec.widths[j]
        if full:
            w0 = dec.widths[0]
            self.input_block = nn.Sequential(
                layers.conv(d, cfg.in_channels, w0, cfg.kernel_sizes[0]),
                layers.norm(d, cfg.norm, w0, cfg.norm_groups),
                layers.activation(cfg.act),
            )
            mods.append(
                DecoderLevel(
                    d, in_ch, w0, w0, levels[0][1], dec.blocks[0], cfg.kernel_sizes[0], cfg.norm, cfg.norm_groups,
                    cfg.act, cfg.decoder_dropout[0], cfg.mc_dropout,
                )
            )
        else:
            self.input_block = None
        self.decoder = nn.ModuleList(mods)

        # Heads. decoder outputs are produced coarse -> fine; output i (finest first) reads
        # decoder output len(mods) - 1 - i.
        finest_stride = levels[0][1]
        self._transpose_head = dec.full_res == "transpose" and any(s != 1 for s in finest_stride)
        if self._transpose_head:
            self.head = layers.conv_transpose(d, dec.widths[0], cfg.out_channels, finest_stride, bias=True)
        else:
            self.head = layers.conv(d, dec.widths[0], cfg.out_channels, (1,), bias=True)
        ds: list[nn.Module] = []
        ds_src: list[int] = []
        ds_strides: list[list[int]] = []
        if cfg.deep_supervision:
            out_strides = ([[1] * d] if full else []) + [list(s) for _, s, _ in levels[:-1]]
            first = 0 if self._transpose_head else 1
            for i in range(first, len(dec.widths)):
                ds.append(layers.conv(d, dec.widths[i], cfg.out_channels, (1,), bias=True))
                ds_src.append(len(mods) - 1 - i)
                ds_strides.append(out_strides[i])
        self.ds_heads = nn.ModuleList(ds)
        self._ds_src: List[int] = ds_src
        self._ds_strides: List[List[int]] = ds_strides
        self._divisor: List[int] = list(cfg.size_divisor)
        self._deep_supervision: bool = cfg.deep_supervision
        self._init_weights(cfg.zero_init_residual)

    # ------------------------------------------------------------------------------ properties
    @property
    def config(self) -> dict[str, Any]:
        """JSON-able dict with everything needed to rebuild this network (``ResUNet.from_config``)."""
        return self._cfg.to_dict()

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """Product of all strides per spatial axis; multiples pass without internal padding."""
        return tuple(self._divisor)

    @property
    def spatial_dims(self) -> int:
        return self._cfg.spatial_dims

    @property
    def in_channels(self) -> int:
        return self._cfg.in_channels

    @property
    def out_channels(self) -> int:
        return self._cfg.out_channels

    @property
    def deep_supervision(self) -> bool:
        return self._deep_supervision

    @property
    def deep_supervision_strides(self) -> list[tuple[int, ...]]:
        """Downsampling factor per axis of each deep-supervision output, finest first (first = 1s)."""
        return [(1,) * self.spatial_dims] + [tuple(s) for s in self._ds_strides]

    # ---------------------------------------------------------------------------- constructors
    @classmethod
    def from_config(cls, config: Mapping[str, Any] | ResUNetConfig) -> ResUNet:
        """Rebuild a network (fresh weights) from :attr:`config` output."""
        cfg = config if isinstance(config, ResUNetConfig) else ResUNetConfig.from_dict(config)
        d = cfg.to_dict()
        d.pop("format")
        return cls(d.pop("spatial_dims"), d.pop("in_channels"), d.pop("out_channels"), **d)

    @classmethod
    def from_preset(
        cls, name: str, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, **overrides: Any
    ) -> ResUNet:
        """Build preset ``name`` (see :data:`resunet.nets.presets.PRESETS`), overriding any argument."""
        from resunet.nets.presets import merged_kwargs, preset_kwargs

        kwargs = merged_kwargs(preset_kwargs(name), overrides)
        net = cls(spatial_dims, in_channels, out_channels, **kwargs)
        net.preset = name
        return net

    # ----------------------------------------------------------------------------------- state
    def enable_mc_dropout(self, enabled: bool = True) -> ResUNet:
        """Keep dropout active in eval mode (``True``) or not; returns ``self``.

        Raises :class:`NetConfigError` if the network has no dropout (both probabilities 0).
        """
        drops = [m for m in self.modules() if isinstance(m, layers.MCDropout)]
        if enabled and not drops:
            raise NetConfigError(
                "this network has no dropout layers: build it with encoder_dropout or decoder_dropout > 0 for MC dropout"
            )
        for m in drops:
            m.mc = bool(enabled)
        self._cfg.mc_dropout = bool(enabled)
        return self

    def _init_weights(self, zero_init_residual: bool) -> None:
        # torchvision's initialisation: He normal (fan_out) for convolutions, norms at (1, 0).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)) and getattr(m.last_norm, "weight", None) is not None:
                    nn.init.zeros_(m.last_norm.weight)

    # --------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Logits ``(B, out_channels, *spatial)``; a list (finest first) with deep supervision in training."""
        outs = self.forward_all(x, self.training and self._deep_supervision)
        if self.training and self._deep_supervision:
            return outs
        return outs[0]

    def forward_all(self, x: torch.Tensor, deep: bool, always_pad: bool = False) -> List[torch.Tensor]:
        """Full-resolution logits first, then (if ``deep``) the coarser deep-supervision logits.

        ``always_pad``: pad/crop even when sizes are multiples of :attr:`size_divisor` (exported
        graphs cannot branch on sizes; see :mod:`resunet.nets.export`).
        """
        sizes: List[int] = []
        pad: List[int] = []
        padded = always_pad
        for i in range(len(self._divisor)):
            s = x.shape[2 + i]
            sizes.append(s)
            # ceil(s / d) * d - s, written so torch.export can prove the padded size is d * k.
            p = (s + self._divisor[i] - 1) // self._divisor[i] * self._divisor[i] - s
            if not torch.jit.is_scripting():
                _check_non_negative(p)
            if not always_pad and p != 0:
                padded = True
            pad = [0, p] + pad  # F.pad lists the last axis first
        if padded:
            x = F.pad(x, pad)
        feats = self.encoder(x)
        y = feats[-1]
        dec_outs: List[torch.Tensor] = []
        n_skips = len(feats) - 1
        for j, level in enumerate(self.decoder):
            if j < n_skips:
                skip = feats[n_skips - 1 - j]
            else:
                assert self.input_block is not None
                skip = self.input_block(x)
            y = level(y, skip)
            dec_outs.append(y)
        out = self.head(y)
        if padded:
            out = _crop(out, sizes, [1] * len(sizes))
        result = [out]
        if deep:
            for i, h in enumerate(self.ds_heads):
                o = h(dec_outs[self._ds_src[i]])
                if padded:
                    o = _crop(o, sizes, self._ds_strides[i])
                result.append(o)
        return result


def _signature_from_build() -> Any:
    """``ResUNet(spatial_dims, in_channels, out_channels, *, widths, blocks, ...)`` as ``ResUNetConfig.build`` states it."""
    import inspect

    build = inspect.signature(ResUNetConfig.build)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return build.replace(parameters=[self_param, *build.parameters.values()], return_annotation=None)


ResUNet.__init__.__signature__ = _signature_from_build()  # type: ignore[attr-defined]


@torch.jit.unused
def _check_non_negative(p: int) -> None:
    # Tells torch.export's symbolic shapes what F.pad needs (p >= 0); TorchScript never calls it.
    torch._check(p >= 0)


def _crop(t: torch.Tensor, sizes: List[int], strides: List[int]) -> torch.Tensor:
    """Crop the padding off: axis i keeps ``ceil(sizes[i] / strides[i])`` voxels."""
    for i in range(len(sizes)):
        t = t.narrow(2 + i, 0, (sizes[i] + strides[i] - 1) // strides[i])
    return t
