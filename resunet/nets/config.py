"""Settings of a :class:`resunet.nets.ResUNet`, grouped in small dataclasses.

:class:`ResUNetConfig` is the normalised, fully expanded form of the constructor's arguments: every
per-stage setting is a list with one entry per encoder stage, every per-axis setting a list with one
entry per spatial axis. ``ResUNetConfig.to_dict()`` is JSON-able and is what checkpoints store as
``"network"``; ``ResUNetConfig.from_dict`` (and ``ResUNet.from_config``) rebuild it, validating every
value with a one-line :class:`~resunet.nets.errors.NetConfigError` (a ``ValueError``).

Per-stage arguments accept a scalar (same for every stage) or a list/tuple with one entry per stage.
Per-axis arguments (strides, kernel sizes) accept an int (isotropic) or a sequence of
``spatial_dims`` ints (anisotropic, axis order as the input tensor's spatial axes). So
``strides=[1, 2, 2, (2, 2, 1)]`` is four stages, the last one not downsampling the third axis; to give
every stage the same anisotropic kernel write ``kernel_sizes=[(3, 3, 1)] * 4``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from resunet.nets.errors import NetConfigError
from resunet.nets.layers import ACTIVATIONS, NORMS

FORMAT = "resunet.ResUNet/1"
BLOCK_TYPES = ("basic", "bottleneck")
FULL_RES_MODES = ("block", "transpose")
_EXPANSION = {"basic": 1, "bottleneck": 4}


@dataclass
class StemConfig:
    """The first convolution (torchvision ``conv1``/``bn1``) and optional max-pool.

    Attributes:
        width: output channels of ``conv1``.
        kernel_size: kernel of ``conv1`` per spatial axis (int = isotropic); 7 in torchvision.
        stride: stride of ``conv1`` per spatial axis; 2 in torchvision, 1 keeps full resolution.
        pool_stride: stride of the 3-wide max-pool after the stem per axis; 1 = no pool.
    """

    width: int = 64
    kernel_size: Any = 7
    stride: Any = 2
    pool_stride: Any = 2


@dataclass
class DecoderConfig:
    """The U-Net decoder.

    Attributes:
        widths: channels of each decoder level, from the finest (output resolution) to the coarsest
            (one above the bottleneck); ``None`` = the encoder's skip widths (and half the stem width
            for the extra full-resolution level).
        blocks: residual basic blocks per decoder level (scalar or list, same order as ``widths``).
        full_res: what happens when the stem downsamples (stem stride > 1), so the finest skip is
            coarser than the input: ``"block"`` adds a full-resolution level (transposed-conv
            upsampling, concatenation with a 3x3 conv of the input, residual block); ``"transpose"``
            upsamples the logits with a learned transposed conv (cheapest; MONAI UNet's choice).
    """

    widths: Any = None
    blocks: Any = 1
    full_res: str = "block"


@dataclass
class ResUNetConfig:
    """Normalised settings of a ResUNet (see :class:`resunet.nets.ResUNet` for each argument)."""

    spatial_dims: int
    in_channels: int
    out_channels: int
    widths: list[int]
    blocks: list[int]
    block: str = "basic"
    strides: list[list[int]] = field(default_factory=list)
    kernel_sizes: list[list[int]] = field(default_factory=list)
    width_factor: float = 1.0
    norm: str = "instance"
    norm_groups: int = 8
    act: str = "relu"
    encoder_dropout: list[float] = field(default_factory=list)
    decoder_dropout: list[float] = field(default_factory=list)
    mc_dropout: bool = False
    deep_supervision: bool = False
    zero_init_residual: bool = False
    resnet_d: bool = False
    stem: StemConfig = field(default_factory=StemConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    # ----------------------------------------------------------------------------------- build
    @classmethod
    def build(
        cls,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        widths: Sequence[int],
        blocks: int | Sequence[int],
        block: str = "basic",
        strides: Any = None,
        kernel_sizes: Any = 3,
        width_factor: float = 1.0,
        norm: str = "instance",
        norm_groups: int = 8,
        act: str = "relu",
        encoder_dropout: float | Sequence[float] = 0.0,
        decoder_dropout: float | Sequence[float] = 0.0,
        mc_dropout: bool = False,
        deep_supervision: bool = False,
        zero_init_residual: bool = False,
        resnet_d: bool = False,
        stem: StemConfig | Mapping[str, Any] | None = None,
        decoder: DecoderConfig | Mapping[str, Any] | None = None,
    ) -> ResUNetConfig:
        """Validate and expand user arguments (scalars or per-stage lists) into a config.

        This is the one signature of the network's settings: ``ResUNet(...)`` takes exactly these
        arguments (its docstring says what each means) and their defaults are stated only here.
        ``strides=None``: 1 for the first stage (after the stem's pool, as torchvision's ``layer1``), 2
        for every other stage.
        """
        if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
            raise NetConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        d = int(spatial_dims)
        _positive_int(in_channels, "in_channels")
        _positive_int(out_channels, "out_channels")
        if isinstance(widths, (int, str)) or not isinstance(widths, Sequence) or len(widths) == 0:
            raise NetConfigError(f"widths must be a non-empty list of channel counts, one per stage, got {widths!r}")
        n = len(widths)
        widths_l = [_positive_int(w, f"widths[{i}]") for i, w in enumerate(widths)]
        blocks_l = [_positive_int(b, f"blocks[{i}]") for i, b in enumerate(_per_stage(blocks, n, "blocks"))]
        if block not in BLOCK_TYPES:
            raise NetConfigError(f"block must be one of {', '.join(BLOCK_TYPES)}, got {block!r}")
        if strides is None:
            strides = [1] + [2] * (n - 1)
        strides_l = [_per_axis(s, d, f"strides[{i}]") for i, s in enumerate(_per_stage(strides, n, "strides", axes=d))]
        kernels_l = [
            _per_axis(k, d, f"kernel_sizes[{i}]", odd=True)
            for i, k in enumerate(_per_stage(kernel_sizes, n, "kernel_sizes", axes=d))
        ]
        if not isinstance(width_factor, (int, float)) or isinstance(width_factor, bool) or width_factor <= 0:
            raise NetConfigError(f"width_factor must be a positive number, got {width_factor!r}")
        if norm not in NORMS:
            raise NetConfigError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        _positive_int(norm_groups, "norm_groups")
        if act not in ACTIVATIONS:
            raise NetConfigError(f"act must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
        enc_drop = [_probability(p, f"encoder_dropout[{i}]") for i, p in enumerate(_per_stage(encoder_dropout, n, "encoder_dropout"))]

        if stem is None:
            stem = StemConfig()
        elif isinstance(stem, Mapping):
            stem = _dataclass_from(StemConfig, stem, "stem")
        stem = StemConfig(
            width=_positive_int(stem.width, "stem.width"),
            kernel_size=_per_axis(stem.kernel_size, d, "stem.kernel_size", odd=True),
            stride=_per_axis(stem.stride, d, "stem.stride"),
            pool_stride=_per_axis(stem.pool_stride, d, "stem.pool_stride"),
        )
        if decoder is None:
            decoder = DecoderConfig()
        elif isinstance(decoder, Mapping):
            decoder = _dataclass_from(DecoderConfig, decoder, "decoder")
        if decoder.full_res not in FULL_RES_MODES:
            raise NetConfigError(f"decoder.full_res must be one of {', '.join(FULL_RES_MODES)}, got {decoder.full_res!r}")

        cfg = cls(
            spatial_dims=d,
            in_channels=int(in_channels),
            out_channels=int(out_channels),
            widths=widths_l,
            blocks=blocks_l,
            block=block,
            strides=strides_l,
            kernel_sizes=kernels_l,
            width_factor=float(width_factor),
            norm=norm,
            norm_groups=int(norm_groups),
            act=act,
            encoder_dropout=enc_drop,
            decoder_dropout=[],
            mc_dropout=_bool(mc_dropout, "mc_dropout"),
            deep_supervision=_bool(deep_supervision, "deep_supervision"),
            zero_init_residual=_bool(zero_init_residual, "zero_init_residual"),
            resnet_d=_bool(resnet_d, "resnet_d"),
            stem=stem,
            decoder=decoder,
        )
        levels = cfg.levels()
        m = cfg.num_decoder_levels
        if len(levels) < 2:
            raise NetConfigError("the encoder never downsamples after the stem: give a stage a stride > 1")
        if decoder.widths is None:
            dec_w = ([max(stem.width // 2, 1)] if cfg.has_full_res_level else []) + [c for _, _, c in levels[:-1]]
        else:
            dec_w = [_positive_int(w, f"decoder.widths[{i}]") for i, w in enumerate(_per_stage(decoder.widths, m, "decoder.widths"))]
        dec_b = [_positive_int(b, f"decoder.blocks[{i}]") for i, b in enumerate(_per_stage(decoder.blocks, m, "decoder.blocks"))]
        cfg.decoder = DecoderConfig(widths=dec_w, blocks=dec_b, full_res=decoder.full_res)
        cfg.decoder_dropout = [
            _probability(p, f"decoder_dropout[{i}]") for i, p in enumerate(_per_stage(decoder_dropout, m, "decoder_dropout"))
        ]
        if norm == "group":
            for c in {stem.width, *cfg.feature_channels(), *dec_w, *cfg.bottleneck_mid_widths()}:
                g = min(cfg.norm_groups, c)
                if c % g:
                    raise NetConfigError(
                        f"group norm: {g} groups do not divide {c} channels; choose norm_groups dividing every width"
                    )
        return cfg

    # ----------------------------------------------------------------------------- geometry
    @property
    def expansion(self) -> int:
        return _EXPANSION[self.block]

    def feature_channels(self) -> list[int]:
        """Channels of the stem output and of each stage output."""
        return [self.stem.width] + [w * self.expansion for w in self.widths]

    def bottleneck_mid_widths(self) -> list[int]:
        return [int(w * self.width_factor) for w in self.widths] if self.block == "bottleneck" else []

    def feature_strides(self) -> list[tuple[int, ...]]:
        """Cumulative stride per axis of the stem output and of each stage output."""
        cur = tuple(self.stem.stride)
        out = [cur]
        for i, s in enumerate(self.strides):
            pool = self.stem.pool_stride if i == 0 else [1] * self.spatial_dims
            cur = tuple(c * p * t for c, p, t in zip(cur, pool, s))
            out.append(cur)
        return out

    def levels(self) -> list[tuple[int, tuple[int, ...], int]]:
        """U-Net levels as ``(feature index, cumulative stride, channels)``, finest first.

        Feature 0 is the stem output, feature ``i >= 1`` the output of ``layer{i}``. Consecutive
        features at the same resolution collapse into one level: the skip is the last of them.
        """
        levels: list[tuple[int, tuple[int, ...], int]] = []
        for idx, (stride, ch) in enumerate(zip(self.feature_strides(), self.feature_channels())):
            if levels and levels[-1][1] == stride:
                levels[-1] = (idx, stride, ch)
            else:
                levels.append((idx, stride, ch))
        return levels

    @property
    def has_full_res_level(self) -> bool:
        """True when the finest skip is coarser than the input and the decoder adds a full-res block."""
        return self.decoder.full_res == "block" and any(s != 1 for s in self.levels()[0][1])

    @property
    def num_decoder_levels(self) -> int:
        return len(self.levels()) - 1 + (1 if self.has_full_res_level else 0)

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """Total stride per spatial axis: input sizes that are multiples pass without padding."""
        return tuple(self.feature_strides()[-1])

    # ----------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (lists, ints, floats, str, bool) that :meth:`from_dict` turns back into this config."""
        d = dataclasses.asdict(self)
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ResUNetConfig:
        """Rebuild (and re-validate) a config from :meth:`to_dict` output."""
        if not isinstance(d, Mapping):
            raise NetConfigError(f"network config must be a mapping, got {type(d).__name__}")
        d = dict(d)
        fmt = d.pop("format", FORMAT)
        if fmt != FORMAT:
            raise NetConfigError(f"network config format {fmt!r} is not {FORMAT!r}; this resunet cannot build it")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise NetConfigError(f"network config has unknown keys {unknown}; known: {sorted(names)}")
        missing = [k for k in ("spatial_dims", "in_channels", "out_channels", "widths", "blocks") if k not in d]
        if missing:
            raise NetConfigError(f"network config lacks {missing}")
        return cls.build(d.pop("spatial_dims"), d.pop("in_channels"), d.pop("out_channels"), **d)


# --------------------------------------------------------------------------------- validation
def _positive_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise NetConfigError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise NetConfigError(f"{name} must be true or false, got {v!r}")
    return v


def _probability(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0 or math.isnan(v):
        raise NetConfigError(f"{name} must be a dropout probability in [0, 1), got {v!r}")
    return float(v)


def _per_stage(v: Any, n: int, name: str, axes: int | None = None) -> list[Any]:
    """Scalar -> ``[v] * n``; list/tuple of length ``n`` -> list (each entry validated by the caller)."""
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            hint = f" (for one anisotropic value in every stage write [{tuple(v)}] * {n})" if axes and len(v) == axes else ""
            raise NetConfigError(f"{name} has {len(v)} entries but there are {n} stages/levels{hint}")
        return list(v)
    return [v] * n


def _per_axis(v: Any, d: int, name: str, odd: bool = False) -> list[int]:
    vals = [v] * d if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(vals, (list, tuple)) or len(vals) != d:
        raise NetConfigError(f"{name} must be an int or {d} ints (one per spatial axis), got {v!r}")
    out = [_positive_int(x, name) for x in vals]
    if odd and any(k % 2 == 0 for k in out):
        raise NetConfigError(f"{name} must be odd (so padding keeps the size), got {v!r}")
    return out


def _dataclass_from(cls: type, d: Mapping[str, Any], name: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise NetConfigError(f"{name} has unknown keys {unknown}; known: {sorted(names)}")
    return cls(**d)
