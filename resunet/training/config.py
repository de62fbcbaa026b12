"""Training configuration: every default in one place, YAML round trip, ``key.sub=value`` overrides.

A run is described by one :class:`TrainConfig`. ``resunet train`` builds it from (in this order)
the defaults below, ``--config CONFIG.yaml``, the explicit flags (``--preset``, ``--epochs``, ...)
and ``--set key.sub=value`` overrides, then writes the fully resolved result to ``RUN/config.yaml``.
Unknown keys are a :class:`~resunet.errors.ConfigError`, never silently ignored.

Plan fields left ``None`` (``plan.spacing``, ``plan.patch_size``, ...) are decided from the data by
:mod:`resunet.training.plan`; the decided values are in ``RUN/plan.json``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from resunet.errors import ConfigError
from resunet.nets.presets import DEFAULT_3D_PRESET


@dataclass
class DataConfig:
    """Where cases come from and how they are cached and split.

    Attributes:
        cache: ``"memory"`` (MONAI CacheDataset of the prepared cases), ``"disk"`` (PersistentDataset
            under ``cache_dir``) or ``"none"`` (prepare on every access).
        cache_dir: folder for ``"disk"``; default ``RUN/cache``.
        num_workers: DataLoader worker processes (0 = load in the main process).
        folds: number of cross-validation folds (split by case, fixed ``split_seed``); 1 = train on all
            cases and validate on none. With fewer cases than folds the run uses as many folds as
            there are cases (one case held out per fold; a single case trains without validation),
            says so in one line and writes the number used here in ``RUN/config.yaml``.
        fold: which fold is held out for validation (0-based); ``resunet train --fold all`` trains
            every fold into ``RUN/fold_<k>/``.
        split_seed: seed of the case shuffle that defines the folds (independent of ``seed``).
        val_cases: explicit validation case ids (overrides the folds when set).
        slice_axis: for 2D training on 3D volumes, the (reoriented, RAS) axis sliced along; ``None``
            = the axis with the largest spacing (ties: the last axis).
    """

    cache: str = "memory"
    cache_dir: str | None = None
    num_workers: int = 2
    folds: int = 5
    fold: int = 0
    split_seed: int = 12345
    val_cases: list[str] | None = None
    slice_axis: int | None = None


@dataclass
class PlanConfig:
    """Overrides of the data-driven plan (``None`` = decide from the data).

    Attributes:
        spacing: target voxel size in mm along the reoriented (RAS) axes.
        normalization: ``"zscore"``, ``"ct"`` or ``"none"``; ``None`` = by modality.
        modality: ``"CT"``, ``"MR"``, ...; ``None`` = from dataset.json (``channel_names``/``modality``).
        patch_size: patch in voxels (2 or 3 entries, per spatial axis).
        batch_size: patches per optimiser step (per process under DDP).
        strides: per-stage downsampling, e.g. ``[[1,1,1],[2,2,2],[2,2,1],...]``; ``None`` = from the patch.
        memory_budget_mb: activation memory the patch/batch planner may use (MB, rough estimate).
        max_patch_voxels: upper bound on the patch's voxel count.
        min_batch_size: smallest batch the planner will choose.
        anisotropy_ratio: a spacing ratio above this marks the thick axis (nnU-Net uses 3).
        min_feature_size: stop halving an axis once it would drop below this many voxels.
    """

    spacing: list[float] | None = None
    normalization: str | None = None
    modality: str | None = None
    patch_size: list[int] | None = None
    batch_size: int | None = None
    strides: list[list[int]] | None = None
    memory_budget_mb: float = 6000.0
    max_patch_voxels: int = 128 ** 3
    min_batch_size: int = 2
    anisotropy_ratio: float = 3.0
    min_feature_size: int = 4


@dataclass
class ModelConfig:
    """The network.

    Attributes:
        preset: a :class:`resunet.nets.ResUNet` preset name (default ``base``, the 3D preset with
            the highest achieved GFLOP/s in bench/results/nets.md; ``cpu`` trains fastest on a CPU).
        spatial_dims: 2 (slices) or 3 (volumes).
        deep_supervision: train with auxiliary outputs at lower decoder resolutions.
        overrides: extra keyword arguments for ``ResUNet.from_preset`` (e.g. ``{"norm": "batch"}``).
        pretrained: local torchvision ResNet ``.pth`` whose weights start the encoder (resnet presets;
            2D as is, 3D inflated); ``None`` = random initialisation.
        pretrained_sha256: SHA-256 of that file, filled in by the run (the checkpoint's model card
            records it too, as ``pretrained``).
    """

    preset: str = DEFAULT_3D_PRESET
    spatial_dims: int = 3
    deep_supervision: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    pretrained_sha256: str | None = None


@dataclass
class AugmentConfig:
    """On-the-fly augmentation (MONAI transforms); probabilities are per sample.

    Attributes:
        enabled: switch all augmentation off (patches are still sampled).
        pos_neg: ``[pos, neg]`` weights of foreground- vs background-centred patches
            (RandCropByPosNegLabeld); ``[1, 2]`` means one in three patches centres on foreground.
        samples_per_volume: patches drawn from each loaded case per visit.
        rotate_prob, rotate_deg: rotation about each axis, uniform in +-``rotate_deg`` degrees
            (2D: in-plane only).
        scale_prob, scale_range: isotropic zoom factor range ``[lo, hi]``.
        elastic_prob: Rand3DElasticd probability (3D only; slow on CPU, off by default).
        elastic_sigma, elastic_magnitude: elastic smoothing (voxels) and displacement magnitude.
        flip_prob: per spatial axis.
        flip_axes: the patch axes that may be flipped (``None`` = all; e.g. ``[0]`` = left-right only
            on RAS-reoriented 3D data, since heads are never upside down after reorientation).
        intensity_scale_prob, intensity_scale: multiply by ``1 + u``, ``u`` in +-``intensity_scale``.
        intensity_shift_prob, intensity_shift: add ``u`` in +-``intensity_shift`` (normalised units).
        gamma_prob, gamma_range: RandAdjustContrastd gamma range.
        noise_prob, noise_std: RandGaussianNoised standard deviation (normalised units).
        blur_prob, blur_sigma: RandGaussianSmoothd sigma range in voxels.
        lowres_prob, lowres_zoom: RandSimulateLowResolutiond zoom range (< 1 = coarser).
        bias_prob, bias_coeff: RandBiasFieldd coefficient range.
    """

    enabled: bool = True
    pos_neg: list[float] = field(default_factory=lambda: [1.0, 2.0])
    samples_per_volume: int = 2
    rotate_prob: float = 0.2
    rotate_deg: float = 30.0
    scale_prob: float = 0.2
    scale_range: list[float] = field(default_factory=lambda: [0.7, 1.4])
    elastic_prob: float = 0.0
    elastic_sigma: list[float] = field(default_factory=lambda: [9.0, 13.0])
    elastic_magnitude: list[float] = field(default_factory=lambda: [0.0, 200.0])
    flip_prob: float = 0.5
    flip_axes: list[int] | None = None
    intensity_scale_prob: float = 0.15
    intensity_scale: float = 0.25
    intensity_shift_prob: float = 0.15
    intensity_shift: float = 0.1
    gamma_prob: float = 0.3
    gamma_range: list[float] = field(default_factory=lambda: [0.7, 1.5])
    noise_prob: float = 0.1
    noise_std: float = 0.1
    blur_prob: float = 0.2
    blur_sigma: list[float] = field(default_factory=lambda: [0.5, 1.0])
    lowres_prob: float = 0.25
    lowres_zoom: list[float] = field(default_factory=lambda: [0.5, 1.0])
    bias_prob: float = 0.0
    bias_coeff: list[float] = field(default_factory=lambda: [0.0, 0.3])


@dataclass
class OptimConfig:
    """Optimiser, schedule and gradient handling.

    Attributes:
        optimizer: ``"sgd"`` (Nesterov momentum, nnU-Net's default), ``"adam"`` or ``"adamw"``.
        lr: initial (peak) learning rate.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        weight_decay: L2 (SGD/Adam) or decoupled (AdamW) weight decay.
        betas: Adam(W) betas.
        scheduler: ``"poly"`` (``lr * (1 - step/total) ** poly_exponent``), ``"cosine"``,
            ``"step"``, ``"plateau"`` (on validation Dice) or ``"none"``.
        warmup_epochs: linear warm-up epochs before poly/cosine (0 = none).
        poly_exponent: exponent of the poly schedule.
        min_lr: floor of the cosine schedule.
        step_size, step_gamma: StepLR epochs and factor.
        plateau_patience, plateau_factor: ReduceLROnPlateau settings (in validations).
        grad_clip: max gradient L2 norm (0 = no clipping).
    """

    optimizer: str = "sgd"
    lr: float = 1e-2
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "poly"
    warmup_epochs: int = 0
    poly_exponent: float = 0.9
    min_lr: float = 1e-6
    step_size: int = 50
    step_gamma: float = 0.5
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    grad_clip: float = 12.0


@dataclass
class LossConfig:
    """Dice + cross-entropy (monai DiceCELoss).

    Attributes:
        lambda_dice, lambda_ce: weights of the two terms.
        batch_dice: compute Dice over the whole batch (nnU-Net's "batch dice") rather than per sample.
        include_background: include label 0 in the Dice term.
        ds_weights: deep-supervision weights, ``"exp"`` (1, 1/2, 1/4, ... normalised, the lowest
            resolution dropped as in nnU-Net) or an explicit list.
    """

    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    batch_dice: bool = False
    include_background: bool = False
    ds_weights: Any = "exp"


@dataclass
class ValidationConfig:
    """Validation on whole held-out volumes.

    Attributes:
        every: validate every this many epochs (and after the last).
        overlap: sliding-window overlap (0..1).
        sw_batch_size: windows per forward pass.
        mode: window blending, ``"gaussian"`` or ``"constant"``.
        max_cases: validate on at most this many held-out cases (``None`` = all).
        save_predictions: after training, predict every held-out case with ``best.pt`` (the
            :class:`resunet.inference.Predictor`, as ``resunet predict`` would) into
            ``RUN/validation/<case>.nii.gz`` on the case's own grid, for ``resunet evaluate``
            (on with ``--fold all``).
        tta: mirror test-time augmentation for those predictions.
    """

    every: int = 1
    overlap: float = 0.5
    sw_batch_size: int = 2
    mode: str = "gaussian"
    max_cases: int | None = None
    save_predictions: bool = False
    tta: bool = True


@dataclass
class FineTuneConfig:
    """Fine-tuning a deployed model (``resunet train --init-from CHECKPOINT``), e.g. on reviewed corrections.

    The plan (spacing, normalisation, patch, batch) and the architecture come from the parent
    checkpoint, never re-planned; the weights start as the parent's. ``resunet train --init-from``
    applies ``epochs`` and ``lr`` below (instead of the from-scratch ``epochs``/``optim.lr``) unless
    ``--epochs``, ``--set epochs=...`` or ``--set optim.lr=...`` say otherwise (``--set finetune.epochs``
    and ``--set finetune.lr`` change these fine-tuning values): these are the one place of the defaults.

    A few corrections of one patient overfit that patient and the parent forgets what it knew
    (catastrophic forgetting; measured in bench/results/review.md). Four kept remedies, each a key:

    Attributes:
        init_from: the parent checkpoint (``.pt``); None = train from scratch.
        epochs: epochs of a fine-tuning run; an epoch is one pass over the corrections (``iterations_per_epoch``
            unset), so 28 epochs of 5 corrections are 140 optimiser steps at batch 2: the setting
            bench/bench_review.py measured (docs/training.md).
        lr: initial learning rate of a fine-tuning run (a tenth of ``optim.lr``'s default, so the
            parent's weights are adjusted, not overwritten).
        warmup_epochs: learning-rate warm-up epochs of a fine-tuning run.
        rehearse: rehearsal (experience replay): a dataset folder (MSD or nnU-Net v2, the parent's
            labels) whose cases are mixed into every fine-tuning epoch; ``"parent"`` = the parent's
            own training data where resunet can regenerate it (the bundled ``brain_extraction``
            model: its Colin27 example study, as is and skull-stripped, as in its training set);
            ``None`` = no rehearsal (the default: with the frozen encoder and ``parent_weight`` the parent's
            own contrast lost at most 0.0044 Dice without it, and rehearsing cost the new site's gain;
            bench/results/review.md). The child's card says what was rehearsed on.
        rehearse_fraction: share of each epoch's case draws taken from the rehearsal cases (0..1).
        freeze_encoder: keep the encoder's weights (and norm statistics) at the parent's; only the
            decoder and heads learn. On by default: of the options measured one by one on
            bench/bench_review.py it lost least on the held-out other head (bench/results/review.md).
        encoder_lr_scale: learning rate of the encoder relative to ``lr`` (1 = the same; ignored when
            ``freeze_encoder``).
        freeze_decoder_levels: the coarsest this many decoder levels keep the parent's weights (and norm
            statistics) too, counted from the bottleneck up; with ``freeze_encoder`` only the finer
            decoder levels and the output heads learn (0 = the whole decoder learns).
        holdout: corrections kept out of training to choose the epoch when there are at least
            ``holdout_min_cases`` (and ``dataset.val_cases`` is unset); the parent itself is
            validated first (epoch 0), so a fine-tune that only gets worse keeps the parent's
            weights in ``best.pt``. 0 = use ``dataset.folds`` as in from-scratch training.
        holdout_min_cases: the fewest cases from which ``holdout`` corrections are kept out (6: on
            bench/bench_review.py's 5 corrections, holding one out to choose the epoch cost most of the
            gain; docs/training.md).
        parent_weight: weight-space ensemble with the parent (WiSE-FT, Wortsman et al. 2022):
            ``best.pt``'s weights = ``parent_weight * parent + (1 - parent_weight) * fine-tuned``
            (0 = the fine-tuned weights as they are; 0.35 by default: it kept every held-out case within
            0.01 of the parent over 5 training seeds, where the fine-tuned weights alone lost 0.022 on one).
        masked_copies: share of the correction draws (0..1, below 1) that are masked copies of the
            training corrections: the image with every voxel outside its corrected label set to the
            image's background value (the median of the array's faces), with the same label (0 = none);
            the held-out corrections' copies join the validation that chooses the epoch. It shows the
            model the new site's contrast as an already-cropped input whose whole foreground stays (for
            brain extraction: a skull-stripped head of the new contrast stays whole), as the parent's
            skull-stripped rehearsal case does for the parent's contrast. Written to
            ``RUN/masked_corrections``.
        train_only: learn only a small part of the network, the rest kept at the parent's (overrides
            ``freeze_encoder``, ``encoder_lr_scale`` and ``freeze_decoder_levels``): ``"norm"`` = the
            normalisation layers' affine weights and biases (everywhere), ``"stem"`` = the encoder's
            first stage (stem convolution, its norm and ``layer1``); ``None`` = as those keys say.
            Common domain-adaptation choices for a contrast shift.
        distill_weight: learning without forgetting (Li & Hoiem 2017): weight of a distillation term
            on the rehearsal draws, the KL divergence of the child's softmax from the parent's (per
            voxel, full resolution), added to the loss (0 = none; needs rehearsal).
    """

    init_from: str | None = None
    epochs: int = 28
    lr: float = 1e-3
    warmup_epochs: int = 0
    rehearse: str | None = None
    rehearse_fraction: float = 0.5
    freeze_encoder: bool = True
    encoder_lr_scale: float = 1.0
    freeze_decoder_levels: int = 0
    holdout: int = 1
    holdout_min_cases: int = 6
    parent_weight: float = 0.35
    masked_copies: float = 0.0
    train_only: str | None = None
    distill_weight: float = 0.0


@dataclass
class TrainConfig:
    """One training run. See the sub-configs for the meaning of each key.

    Attributes:
        data: dataset folder (MSD or nnU-Net v2 raw layout).
        out: run folder (config.yaml, plan.json, best.pt, last.pt, log.csv).
        epochs: number of epochs.
        iterations_per_epoch: optimiser steps per epoch; ``None`` = one pass over the training
            cases (``ceil(cases * samples_per_volume / batch_size)``, at least 1).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        amp: ``"auto"`` (bf16 on CUDA when supported, else fp16; none on CPU), ``"bf16"``,
            ``"fp16"`` or ``"none"``.
        channels_last: use channels-last memory format on CUDA, and on the CPU for 3D networks
            (faster there; 2D is slower on the CPU, so it stays off: bench/results/nets.md).
        compile: wrap the network in ``torch.compile``.
        seed: seed of weights, patch sampling and augmentation.
        deterministic: ``torch.use_deterministic_algorithms(True)`` (bit-for-bit repeatable runs
            given the same ``num_workers``; slower).
        threads: torch intra-op threads on the CPU (``None`` = torch's default).
        progress: show a progress bar per epoch.
        tensorboard: write TensorBoard event files to ``RUN/tensorboard`` when installed.
        labels: label value -> name override (default from dataset.json).
        postprocess: post-processing defaults stored in the checkpoint for inference.
        model_card: fields merged into the checkpoint's model card.
        finetune: fine-tuning from a parent checkpoint (:class:`FineTuneConfig`).
    """

    data: str = ""
    out: str = ""
    epochs: int = 100
    iterations_per_epoch: int | None = None
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    threads: int | None = None
    progress: bool = True
    tensorboard: bool = True
    dataset: DataConfig = field(default_factory=DataConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    labels: dict[str, str] | None = None
    postprocess: dict[str, Any] = field(
        default_factory=lambda: {"largest_component": False, "fill_holes": False, "min_island_voxels": 0})
    model_card: dict[str, Any] = field(default_factory=dict)
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)

    # -- validation of values ------------------------------------------------------------------
    def check(self) -> "TrainConfig":
        """Raise :class:`ConfigError` for values out of range; returns self."""
        choices = {
            "device": (self.device, ("auto", "cpu", "cuda")),
            "amp": (self.amp, ("auto", "bf16", "fp16", "none")),
            "dataset.cache": (self.dataset.cache, ("memory", "disk", "none")),
            "optim.optimizer": (self.optim.optimizer, ("sgd", "adam", "adamw")),
            "optim.scheduler": (self.optim.scheduler, ("poly", "cosine", "step", "plateau", "none")),
            "validation.mode": (self.validation.mode, ("gaussian", "constant")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
        if self.model.spatial_dims not in (2, 3):
            raise ConfigError(f"model.spatial_dims must be 2 or 3; got {self.model.spatial_dims!r}")
        if self.plan.normalization not in (None, "zscore", "ct", "none"):
            raise ConfigError(f"plan.normalization must be zscore, ct or none; got {self.plan.normalization!r}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1; got {self.epochs}")
        if self.dataset.folds < 1 or not 0 <= self.dataset.fold < max(self.dataset.folds, 1):
            raise ConfigError(f"dataset.fold must be in 0..{self.dataset.folds - 1} for {self.dataset.folds} folds; "
                              f"got {self.dataset.fold}")
        if self.validation.every < 1:
            raise ConfigError(f"validation.every must be at least 1; got {self.validation.every}")
        if len(self.augment.pos_neg) != 2 or min(self.augment.pos_neg) < 0 or sum(self.augment.pos_neg) <= 0:
            raise ConfigError(f"augment.pos_neg must be two non-negative weights; got {self.augment.pos_neg}")
        ft = self.finetune
        if not 0.0 <= ft.rehearse_fraction < 1.0:
            raise ConfigError(f"finetune.rehearse_fraction must be in 0..1 (below 1: some draws must be corrections); "
                              f"got {ft.rehearse_fraction}")
        if not 0.0 <= ft.parent_weight < 1.0:
            raise ConfigError(f"finetune.parent_weight must be in 0..1 (below 1); got {ft.parent_weight}")
        if (ft.encoder_lr_scale < 0 or ft.freeze_decoder_levels < 0 or ft.holdout < 0 or ft.holdout_min_cases < 2
                or ft.epochs < 1 or ft.lr <= 0):
            raise ConfigError("finetune: epochs >= 1, lr > 0, encoder_lr_scale >= 0, freeze_decoder_levels >= 0, "
                              f"holdout >= 0 and holdout_min_cases >= 2 are needed; got {ft}")
        if not 0.0 <= ft.masked_copies < 1.0:
            raise ConfigError(f"finetune.masked_copies must be in 0..1 (a share of the correction draws, below 1); "
                              f"got {ft.masked_copies}")
        if ft.distill_weight < 0:
            raise ConfigError(f"finetune.distill_weight must be >= 0; got {ft.distill_weight}")
        if ft.train_only not in (None, "norm", "stem"):
            raise ConfigError(f"finetune.train_only must be norm, stem or null; got {ft.train_only!r}")
        for name in ("patch_size", "spacing"):
            value = getattr(self.plan, name)
            if value is not None and len(value) != self.model.spatial_dims and not (name == "spacing" and len(value) == 3):
                raise ConfigError(f"plan.{name} needs {self.model.spatial_dims} entries; got {value}")
        return self

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, not tuples) in field order."""
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=110)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write YAML atomically."""
        from resunet.io.atomic import atomic_write_text

        atomic_write_text(path, self.to_yaml())

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "config") -> "TrainConfig":
        """Build from a nested dict; unknown keys raise :class:`ConfigError` naming the key."""
        return _build(cls, d, where, prefix="")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> "TrainConfig":
        """Read a YAML file (a partial config is filled from the defaults)."""
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {p} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys, got a {type(data).__name__}")
        return cls.from_dict(data, where=str(p))

    def override(self, assignments: Sequence[str]) -> "TrainConfig":
        """Apply ``key.sub=value`` strings (values parsed as YAML: ``0.1``, ``true``, ``[1,2]``, ``null``)."""
        d = self.to_dict()
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"--set expects key=value (e.g. optim.lr=0.01); got {item!r}")
            key, raw = item.split("=", 1)
            key = key.strip()
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                value = raw
            node = d
            parts = key.split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"unknown config key {key!r} (no section {part!r}); see RUN/config.yaml for the keys")
                node = node[part]
            if parts[-1] not in node and not _is_free_dict(key):
                raise ConfigError(f"unknown config key {key!r}; see RUN/config.yaml for the keys")
            node[parts[-1]] = value
        return TrainConfig.from_dict(d, where="--set")


#: Keys whose values are free-form dicts (any sub-key allowed).
_FREE_DICTS = ("model.overrides", "labels", "postprocess", "model_card")


def _is_free_dict(key: str) -> bool:
    return any(key.startswith(f + ".") for f in _FREE_DICTS)


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _build(cls: type, d: dict[str, Any], where: str, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown config key '{prefix}{unknown[0]}'; known keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, where, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, where, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str, key: str) -> Any:
    """Check/convert a YAML scalar against a simple type hint (int, float, bool, str, list, dict, Optional)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    bad = ConfigError(f"{where}: {key} must be {_hint_name(hint)}; got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, args[0], where, key) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {str(k): v for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if hint is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads "5e-4" as a string (it wants "5.0e-4"); a number is meant
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad
        return str(value)
    return value


#: a number in exponent notation without a dot (``5e-4``, ``1E3``), which YAML 1.1 leaves a string
_YAML11_FLOAT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def _hint_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is list:
        return f"a list of {_hint_name(typing.get_args(hint)[0])}" if typing.get_args(hint) else "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
