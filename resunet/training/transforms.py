"""MONAI transform pipelines for training and validation.

A case goes through two stages:

1. **Deterministic, cached** (:class:`PrepareCase`): read the case (checked by
   :func:`resunet.training.dataset.read_case`), bring it onto the network grid with the shared
   :func:`resunet.preprocess.prepare` / :func:`~resunet.preprocess.prepare_label` (the exact
   preprocessing inference runs), move the 2D slice axis last, pad to at least the patch. MONAI's
   ``CacheDataset`` (memory) or ``PersistentDataset`` (disk) keeps the result, so files are read and
   resampled once per run.
2. **Random, per sample**: foreground-oversampled patches (``RandCropByPosNegLabeld``), 2D slice
   squeeze, then augmentation in nnU-Net's order: spatial (rotation/scaling, elastic), noise, blur,
   intensity scale/shift, contrast (gamma), simulated low resolution, bias field, flips.

Arrays are channel-first: image ``(C, X, Y, Z)`` / label ``(1, X, Y, Z)`` in 3D, ``(C, X, Y)`` after
the 2D squeeze, axes the reoriented (RAS) axes of :func:`resunet.preprocess.prepare` (in 2D with the
slice axis moved last).
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from monai import transforms as mt

from resunet.preprocess import PreprocessPlan, prepare, prepare_label
from resunet.training.config import AugmentConfig
from resunet.training.dataset import Case, DatasetSpec, read_case


class PrepareCase(mt.Transform):
    """``{"case_id", "images", "label"}`` -> ``{"case_id", "image": (C,X,Y,Z) float32, "label": (1,X,Y,Z) uint8}``.

    Args:
        spec: the dataset (channels and labels, for the checks in ``read_case``).
        plan: target spacing and normalisation.
        slice_axis: 2D training: the reoriented axis to move last (``None`` in 3D).
        min_size: pad (edge value for the image, 0 for the label) to at least this size per axis.
    """

    def __init__(self, spec: DatasetSpec, plan: PreprocessPlan, slice_axis: int | None, min_size: Sequence[int]) -> None:
        self.spec = spec
        self.plan = plan
        self.slice_axis = slice_axis
        self.min_size = [int(s) for s in min_size]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[str, Any]:
        case = Case(case_id=str(data["case_id"]), images=list(data["images"]), label=data["label"])
        images, label = read_case(self.spec, case)
        prepared = prepare(images, self.plan)
        lab = prepare_label(label, prepared)[None]
        img = prepared.array
        if self.slice_axis is not None:
            img = np.moveaxis(img, 1 + self.slice_axis, -1)
            lab = np.moveaxis(lab, 1 + self.slice_axis, -1)
        pad = [(0, 0)] + [(max(0, m - s) // 2, max(0, m - s) - max(0, m - s) // 2) for s, m in zip(img.shape[1:], self.min_size)]
        if any(p != (0, 0) for p in pad):
            # Why edge padding for the image: zeros would be a fake intensity edge after z-scoring.
            img = np.pad(img, pad, mode="edge")
            lab = np.pad(lab, pad, mode="constant")
        return {"case_id": case.case_id, "image": np.ascontiguousarray(img, dtype=np.float32),
                "label": np.ascontiguousarray(lab)}


def crop_size(patch_size: Sequence[int], spatial_dims: int) -> list[int]:
    """The 3D crop taken from a prepared case: the patch, plus a size-1 slice axis in 2D."""
    return [int(p) for p in patch_size] + ([1] if spatial_dims == 2 else [])


def train_transforms(patch_size: Sequence[int], spatial_dims: int, aug: AugmentConfig) -> list[Any]:
    """The random stage (patches + augmentation); returns a list for ``monai.transforms.Compose``."""
    keys = ["image", "label"]
    out: list[Any] = [
        mt.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=crop_size(patch_size, spatial_dims),
                                  pos=aug.pos_neg[0], neg=aug.pos_neg[1], num_samples=aug.samples_per_volume),
    ]
    if spatial_dims == 2:
        out.append(mt.SqueezeDimd(keys=keys, dim=3))
    if not aug.enabled:
        return out + [mt.CastToTyped(keys=keys, dtype=(np.float32, np.uint8))]
    d = spatial_dims
    rot = math.radians(aug.rotate_deg)
    lo, hi = aug.scale_range
    p_affine = 1 - (1 - aug.rotate_prob) * (1 - aug.scale_prob)
    if p_affine > 0:
        # One resampling for rotation and scaling (cheaper than two); the probability combines both.
        out.append(mt.RandAffined(
            keys=keys, prob=p_affine,
            rotate_range=(rot,) * (3 if d == 3 else 1) if aug.rotate_prob > 0 else None,
            scale_range=((lo - 1.0, hi - 1.0),) * d if aug.scale_prob > 0 else None,
            mode=("bilinear", "nearest"), padding_mode="border"))
    if aug.elastic_prob > 0:
        if d == 3:
            out.append(mt.Rand3DElasticd(keys=keys, sigma_range=tuple(aug.elastic_sigma),
                                         magnitude_range=tuple(aug.elastic_magnitude), prob=aug.elastic_prob,
                                         mode=("bilinear", "nearest"), padding_mode="border"))
        else:
            out.append(mt.Rand2DElasticd(keys=keys, spacing=tuple(aug.elastic_sigma),
                                         magnitude_range=(aug.elastic_magnitude[0] / 100.0, aug.elastic_magnitude[1] / 100.0),
                                         prob=aug.elastic_prob, mode=("bilinear", "nearest"), padding_mode="border"))
    sig = tuple(aug.blur_sigma)
    out += [
        mt.RandGaussianNoised(keys="image", prob=aug.noise_prob, std=aug.noise_std),
        mt.RandGaussianSmoothd(keys="image", prob=aug.blur_prob, sigma_x=sig, sigma_y=sig, sigma_z=sig),
        mt.RandScaleIntensityd(keys="image", prob=aug.intensity_scale_prob, factors=aug.intensity_scale),
        mt.RandShiftIntensityd(keys="image", prob=aug.intensity_shift_prob, offsets=aug.intensity_shift),
        mt.RandAdjustContrastd(keys="image", prob=aug.gamma_prob, gamma=tuple(aug.gamma_range), retain_stats=True),
        mt.RandSimulateLowResolutiond(keys="image", prob=aug.lowres_prob, zoom_range=tuple(aug.lowres_zoom),
                                      upsample_mode="trilinear" if d == 3 else "bilinear"),
    ]
    if aug.bias_prob > 0:
        out.append(mt.RandBiasFieldd(keys="image", prob=aug.bias_prob, coeff_range=tuple(aug.bias_coeff)))
    flip_axes = range(d) if aug.flip_axes is None else [a for a in aug.flip_axes if 0 <= a < d]
    out += [mt.RandFlipd(keys=keys, prob=aug.flip_prob, spatial_axis=a) for a in flip_axes]
    out.append(mt.CastToTyped(keys=keys, dtype=(np.float32, np.uint8)))
    return out
