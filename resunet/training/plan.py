"""Plan a training run from the data: spacing, normalisation, patch, batch and network strides.

The rules follow nnU-Net's experiment planner, simplified (see each function):

- **Target spacing**: the median of the cases' voxel sizes per (reoriented RAS) axis. If the
  dataset is anisotropic (largest / smallest median spacing > ``anisotropy_ratio``, 3 by default),
  the thick axis takes the 10th percentile of that axis's spacings instead, so thin-slice cases are
  not thrown away to match the thick majority.
- **Normalisation**: CT: clip to the 0.5 / 99.5 percentiles of the training set's foreground
  intensities, then z-score with the foreground's mean/std after clipping (the same for every
  image). Everything else (MR, ...): per-image z-score.
- **Patch size**: start from the median resampled shape (the whole case when it fits), shrink the
  axis that is largest in mm until ``batch_size >= min_batch_size`` patches fit the memory budget.
- **Strides**: halve an axis at each downsampling step of the preset only while the feature map stays
  at least ``min_feature_size`` voxels and the axis's current spacing is at most twice the finest
  (thick slices are not downsampled until the in-plane resolution catches up). The patch is then
  rounded to a multiple of the resulting total stride so the network never pads.

Every decision can be fixed in :class:`resunet.training.config.PlanConfig`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from resunet.errors import ConfigError, DatasetError
from resunet.preprocess import Normalization, PreprocessPlan, reorientation
from resunet.training.config import PlanConfig
from resunet.training.dataset import DatasetSpec, read_case

#: Foreground intensity samples kept per case and channel for the CT statistics (nnU-Net: 10 000).
_SAMPLES_PER_CASE = 10_000


@dataclass
class CaseStats:
    """What the planner needs from one case (all on the reoriented RAS axes)."""

    case_id: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    foreground: list[np.ndarray]  # per channel, sampled foreground intensities
    label_voxels: dict[int, int]


@dataclass
class TrainingPlan:
    """The decided plan; ``to_dict()`` goes to ``RUN/plan.json`` and into the checkpoint's ``plan``.

    Attributes:
        spatial_dims: 2 or 3.
        modality: ``"CT"``, ``"MR"``, ...
        spacing: target spacing (mm) per reoriented axis; for 2D the slice axis is ``None`` (native).
        normalization: one per channel.
        patch_size: patch in voxels (2D: the two in-plane axes in order).
        batch_size: patches per step.
        slice_axis: for 2D, the reoriented axis sliced along (``None`` in 3D).
        network: keyword overrides for ``ResUNet.from_preset`` (strides, stem strides).
        size_divisor: total stride per patch axis.
        median_shape: median case shape on the target grid (3 axes).
        estimated_memory_mb: the planner's activation-memory estimate for one step.
    """

    spatial_dims: int
    modality: str
    spacing: list[float | None]
    normalization: list[Normalization]
    patch_size: list[int]
    batch_size: int
    slice_axis: int | None = None
    network: dict[str, Any] = field(default_factory=dict)
    size_divisor: list[int] = field(default_factory=list)
    median_shape: list[int] = field(default_factory=list)
    estimated_memory_mb: float = 0.0

    def preprocess_plan(self) -> PreprocessPlan:
        return PreprocessPlan(spacing=tuple(self.spacing), normalization=list(self.normalization))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        d = self.preprocess_plan().to_dict()
        d.update(
            patch_size=[int(p) for p in self.patch_size],
            batch_size=int(self.batch_size),
            spatial_dims=int(self.spatial_dims),
            modality=self.modality,
            slice_axis=self.slice_axis,
            network=_jsonable(self.network),
            size_divisor=[int(s) for s in self.size_divisor],
            median_shape=[int(s) for s in self.median_shape],
            estimated_memory_mb=round(float(self.estimated_memory_mb), 1),
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainingPlan":
        pp = PreprocessPlan.from_dict(d)
        return cls(spatial_dims=int(d["spatial_dims"]), modality=str(d.get("modality", "unknown")),
                   spacing=list(pp.spacing) if pp.spacing is not None else [None, None, None],
                   normalization=pp.normalization, patch_size=list(d["patch_size"]), batch_size=int(d["batch_size"]),
                   slice_axis=d.get("slice_axis"), network=d.get("network", {}), size_divisor=d.get("size_divisor", []),
                   median_shape=d.get("median_shape", []), estimated_memory_mb=float(d.get("estimated_memory_mb", 0.0)))

    def save(self, path: str | os.PathLike[str]) -> None:
        from resunet.io.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def collect_stats(spec: DatasetSpec, case_ids: Sequence[str] | None = None, seed: int = 0) -> list[CaseStats]:
    """Read each case once (checking it) and gather spacing, shape, foreground intensities, label counts."""
    rng = np.random.default_rng(seed)
    out = []
    for case in spec.cases:
        if case_ids is not None and case.case_id not in case_ids:
            continue
        images, label = read_case(spec, case)
        _, ro_shape, ro_affine = reorientation(images[0].affine, images[0].shape)
        spacing = tuple(float(s) for s in np.linalg.norm(ro_affine[:3, :3], axis=0))
        lab = np.asarray(label.array)
        fg = lab > 0
        samples = []
        for v in images:
            vals = np.asarray(v.array)[fg] if fg.any() else np.asarray(v.array).ravel()
            if vals.size > _SAMPLES_PER_CASE:
                vals = rng.choice(vals, _SAMPLES_PER_CASE, replace=False)
            samples.append(vals.astype(np.float64))
        values, counts = np.unique(lab, return_counts=True)
        out.append(CaseStats(case.case_id, spacing, ro_shape, samples, {int(v): int(c) for v, c in zip(values, counts)}))
    if not out:
        raise DatasetError(f"dataset {spec.root}: no cases to plan from")
    return out


def target_spacing(spacings: Sequence[Sequence[float]], anisotropy_ratio: float = 3.0) -> list[float]:
    """Median spacing per axis; a thick axis (ratio > ``anisotropy_ratio``) takes its 10th percentile."""
    sp = np.asarray(spacings, dtype=np.float64)
    target = np.median(sp, axis=0)
    thick = int(np.argmax(target))
    if target[thick] / max(float(np.min(target)), 1e-6) > anisotropy_ratio:
        target[thick] = max(float(np.percentile(sp[:, thick], 10)), float(np.min(target)))
    return [float(round(t, 6)) for t in target]


def ct_normalization(samples: Sequence[np.ndarray]) -> Normalization:
    """Clip at the foreground's 0.5/99.5 percentiles, z-score with the clipped foreground's mean/std."""
    vals = np.concatenate([np.asarray(s, dtype=np.float64) for s in samples])
    if vals.size == 0:
        raise DatasetError("no foreground voxels in any case: CT normalisation needs labelled foreground")
    lo, hi = np.percentile(vals, [0.5, 99.5])
    clipped = np.clip(vals, lo, hi)
    return Normalization("ct", clip=(float(lo), float(hi)), mean=float(clipped.mean()), std=float(max(clipped.std(), 1e-6)))


def plan_strides(
    patch: Sequence[int],
    spacing: Sequence[float],
    preset: dict[str, Any],
    min_feature_size: int = 4,
) -> tuple[dict[str, Any], list[int]]:
    """Per-axis stem and stage strides for a patch; returns ``(from_preset overrides, size_divisor)``.

    Each place where the preset downsamples (stem stride, stem pool, stage strides > 1) halves an
    axis only if the axis then keeps ``>= min_feature_size`` voxels and its current spacing is at most
    twice the finest current spacing (nnU-Net's rule for anisotropic data). Other axes keep stride 1.
    """
    d = len(patch)
    size = [float(p) for p in patch]
    sp = [float(s) for s in spacing]

    def step(factor: Any) -> list[int]:
        f = [int(x) for x in factor] if isinstance(factor, (list, tuple)) else [int(factor)] * d
        out = []
        finest = min(sp)
        for a in range(d):
            k = f[a]
            if k > 1 and size[a] / k >= min_feature_size and sp[a] <= 2.0 * finest + 1e-6:
                out.append(k)
            else:
                out.append(1)
        for a in range(d):
            size[a] /= out[a]
            sp[a] *= out[a]
        return out

    stem = dict(preset.get("stem") or {})
    stem_stride = step(stem.get("stride", 1))
    pool_stride = step(stem.get("pool_stride", 1))
    strides = preset.get("strides", 2)
    n_stages = len(preset["widths"])
    stage_list = strides if isinstance(strides, (list, tuple)) else [strides] * n_stages
    stage_strides = [step(s) for s in stage_list]
    total = [stem_stride[a] * pool_stride[a] * math.prod(s[a] for s in stage_strides) for a in range(d)]
    if all(t == 1 for s in stage_strides for t in s):
        raise ConfigError(f"patch {list(patch)} is too small to downsample even once (min_feature_size "
                          f"{min_feature_size}); use a larger plan.patch_size")
    overrides = {"strides": stage_strides, "stem": {"stride": stem_stride, "pool_stride": pool_stride}}
    return overrides, total


def _activation_bytes_per_voxel(preset: dict[str, Any], divisor_levels: list[list[int]]) -> float:
    """Rough activation memory per input voxel for one sample (fp32, forward + backward).

    Why a formula rather than a trial forward pass: it must be cheap and device-independent. Each
    level stores about (2 convs x 3 tensors: conv out, norm out, act out) per block, encoder and
    decoder alike, scaled down by the level's voxel reduction; times 2 for gradients.
    """
    widths = list(preset["widths"])
    blocks = preset.get("blocks", 1)
    blocks = list(blocks) if isinstance(blocks, (list, tuple)) else [blocks] * len(widths)
    exp = 4 if preset.get("block") == "bottleneck" else 1
    stem_w = int((preset.get("stem") or {}).get("width", widths[0]))
    total = stem_w * 3 / max(math.prod(divisor_levels[0]), 1)
    for i, w in enumerate(widths):
        red = max(math.prod(divisor_levels[i + 1]), 1)
        total += (w * exp * blocks[i] * 6) / red  # encoder
        total += (w * exp * 6 + w * exp) / red  # decoder block + upsampled/concat tensors
    return total * 4 * 2


def _cumulative(overrides: dict[str, Any], d: int) -> list[list[int]]:
    cur = [overrides["stem"]["stride"][a] * overrides["stem"]["pool_stride"][a] for a in range(d)]
    out = [list(cur)]
    for s in overrides["strides"]:
        cur = [c * t for c, t in zip(cur, s)]
        out.append(list(cur))
    return out


def make_plan(
    spec: DatasetSpec,
    stats: Sequence[CaseStats],
    cfg: PlanConfig,
    *,
    preset: dict[str, Any],
    spatial_dims: int = 3,
    slice_axis: int | None = None,
) -> TrainingPlan:
    """Decide the plan (see module docstring); values set in ``cfg`` are taken as they are.

    Args:
        spec: the dataset (channels, modality).
        stats: :func:`collect_stats` of the training cases.
        cfg: overrides.
        preset: the network preset's keyword arguments (``resunet.nets.presets.preset_kwargs``).
        spatial_dims: 2 or 3.
        slice_axis: 2D only: the reoriented axis to slice along (``None`` = the thickest; ties and
            true 2D images: the axis of size 1, else the last).
    """
    modality = cfg.modality or spec.modality
    # --- spacing -------------------------------------------------------------------------------
    spacings = [s.spacing for s in stats]
    if cfg.spacing is not None:
        spacing: list[float | None] = [float(x) if x is not None else None for x in cfg.spacing]
        if len(spacing) != 3:
            raise ConfigError(f"plan.spacing needs 3 values (mm, RAS axes); got {cfg.spacing}")
    else:
        spacing = list(target_spacing(spacings, cfg.anisotropy_ratio))
    if spatial_dims == 2:
        if slice_axis is None:
            singleton = [a for a in range(3) if all(s.shape[a] == 1 for s in stats)]
            if singleton:
                slice_axis = singleton[0]
            else:
                med = np.median(np.asarray(spacings), axis=0)
                slice_axis = int(max(range(3), key=lambda a: (round(float(med[a]), 3), a)))
        if cfg.spacing is None:
            spacing[slice_axis] = None  # slices keep their native thickness and count
    # --- normalisation ------------------------------------------------------------------------
    scheme = cfg.normalization or ("ct" if modality.upper() == "CT" else "zscore")
    n_ch = len(spec.channels)
    if scheme == "ct":
        norms = [ct_normalization([s.foreground[c] for s in stats]) for c in range(n_ch)]
    else:
        norms = [Normalization(scheme) for _ in range(n_ch)]
    # --- shapes on the target grid -------------------------------------------------------------
    shapes = []
    for s in stats:
        shapes.append([s.shape[a] if spacing[a] is None else max(1, round(s.shape[a] * s.spacing[a] / float(spacing[a])))
                       for a in range(3)])
    median_shape = [int(x) for x in np.median(np.asarray(shapes), axis=0)]
    axes = [a for a in range(3) if a != slice_axis] if spatial_dims == 2 else [0, 1, 2]
    eff_spacing = [float(spacing[a]) if spacing[a] is not None else float(np.median([s.spacing[a] for s in stats]))
                   for a in axes]
    total_voxels = float(sum(math.prod(sh) for sh in shapes))  # 2D: every slice is a sample
    # --- patch, strides, batch -----------------------------------------------------------------
    if cfg.patch_size is not None:
        patch = [int(p) for p in cfg.patch_size]
        overrides, divisor = _strides_or_given(patch, eff_spacing, preset, cfg)
        bpv = _activation_bytes_per_voxel(preset, _cumulative(overrides, len(axes)))
    else:
        patch = [median_shape[a] for a in axes]
        while math.prod(patch) > cfg.max_patch_voxels:
            patch = _shrink(patch, eff_spacing)
        while True:
            overrides, divisor = _strides_or_given(patch, eff_spacing, preset, cfg)
            rounded = [max(divisor[i], int(round(patch[i] / divisor[i])) * divisor[i]) for i in range(len(patch))]
            bpv = _activation_bytes_per_voxel(preset, _cumulative(overrides, len(axes)))
            fits = math.prod(rounded) * bpv * cfg.min_batch_size <= cfg.memory_budget_mb * 1e6
            if fits or all(p <= 2 * cfg.min_feature_size for p in patch):
                patch = rounded
                break
            patch = _shrink(patch, eff_spacing)
        overrides, divisor = _strides_or_given(patch, eff_spacing, preset, cfg)
    if cfg.batch_size is not None:
        batch = int(cfg.batch_size)
    else:
        by_memory = int(cfg.memory_budget_mb * 1e6 // max(math.prod(patch) * bpv, 1.0))
        # nnU-Net's cap: one batch covers at most 5% of all training voxels (no point in more)
        by_data = int(0.05 * total_voxels // max(math.prod(patch), 1))
        batch = max(cfg.min_batch_size, min(by_memory, by_data))
    return TrainingPlan(
        spatial_dims=spatial_dims, modality=modality, spacing=spacing, normalization=norms, patch_size=patch,
        batch_size=batch, slice_axis=slice_axis if spatial_dims == 2 else None, network=overrides,
        size_divisor=divisor, median_shape=median_shape, estimated_memory_mb=math.prod(patch) * bpv * batch / 1e6,
    )


def _strides_or_given(patch: list[int], spacing: list[float], preset: dict[str, Any], cfg: PlanConfig
                      ) -> tuple[dict[str, Any], list[int]]:
    overrides, divisor = plan_strides(patch, spacing, preset, cfg.min_feature_size)
    if cfg.strides is not None:
        d = len(patch)
        strides = [[int(x) for x in s] if isinstance(s, (list, tuple)) else [int(s)] * d for s in cfg.strides]
        if len(strides) != len(preset["widths"]):
            raise ConfigError(f"plan.strides needs one entry per encoder stage ({len(preset['widths'])}); got {cfg.strides}")
        overrides["strides"] = strides
        cum = _cumulative(overrides, d)[-1]
        divisor = cum
    return overrides, divisor


def _shrink(patch: list[int], spacing: list[float]) -> list[int]:
    """Shrink the axis that is largest in mm by ~10% (at least one voxel)."""
    mm = [p * s for p, s in zip(patch, spacing)]
    a = int(np.argmax(mm))
    out = list(patch)
    out[a] = max(1, min(out[a] - 1, int(out[a] * 0.9)))
    return out
