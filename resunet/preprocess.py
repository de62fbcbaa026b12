"""The preprocessing shared by training and inference, and its exact inverse.

Training caches every case through :func:`prepare` (and :func:`prepare_label`); inference runs the
same :func:`prepare` from the checkpoint's plan, predicts on the prepared grid, and maps the result
back with :func:`restore`. One function on both sides is what makes "the same preprocessing as
training" true by construction.

The network grid is derived from the input grid in two steps, neither of which rotates anything:

1. **Reorient** (exact, no interpolation): permute/flip voxel axes so they point as close as possible
   to R, A, S (``nibabel.orientations.io_orientation``). Oblique scans stay oblique; only the order
   and sign of axes change.
2. **Resample** each axis to the plan's spacing, keeping the field of view: ``n_out = round(n_in *
   spacing_in / spacing_target)``, and voxel centres placed like ``align_corners=False`` (the grid's
   outer corners stay where they were). The true output spacing is ``spacing_in * n_in / n_out``,
   within half a voxel of the target, and is what the prepared affine records.

Because both steps are axis-aligned in voxel space, the inverse is exact in geometry: interpolate
back to ``n_in`` along each axis (same corner convention) and undo the axis permutation/flip. No
world-space resampling with an arbitrary matrix is needed, so oblique, LPS or any axis order map back
onto the input grid without drift.

Why hand-written rather than MONAI ``Orientation`` + ``Spacing`` + ``Invertd``: those resample in
world space through a full affine (slower, and the inverse is a second interpolation through a
general matrix); this module keeps the two cheap, exactly invertible steps and uses
``torch.nn.functional.interpolate`` (multi-threaded) for the only interpolation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations as nio

from resunet.errors import ConfigError, GeometryError
from resunet.io.volume import Volume

NORMALIZATION_SCHEMES = ("zscore", "ct", "none")


@dataclass
class Normalization:
    """Intensity normalisation.

    Args:
        scheme: ``"zscore"`` (per image: subtract the image's mean, divide by its std; MR and others),
            ``"ct"`` (clip to ``clip`` then subtract ``mean`` and divide by ``std``, both computed on the
            training set's foreground; values in HU), or ``"none"``.
        clip: ``(low, high)`` intensity window for ``"ct"`` (the foreground's 0.5 and 99.5 percentiles).
        mean: foreground mean after clipping, for ``"ct"``.
        std: foreground standard deviation after clipping, for ``"ct"``.
    """

    scheme: str = "zscore"
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in NORMALIZATION_SCHEMES:
            raise ConfigError(f"normalization scheme must be one of {NORMALIZATION_SCHEMES}, got {self.scheme!r}")
        if self.scheme == "ct" and (self.clip is None or self.mean is None or not self.std):
            raise ConfigError("normalization scheme 'ct' needs clip, mean and a non-zero std")
        if self.clip is not None:
            self.clip = (float(self.clip[0]), float(self.clip[1]))

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Normalise one channel; returns float32."""
        x = array.astype(np.float32, copy=True)
        if self.scheme == "zscore":
            mean, std = float(x.mean()), float(x.std())
            x -= mean
            x /= max(std, 1e-8)
        elif self.scheme == "ct":
            assert self.clip is not None and self.mean is not None and self.std is not None
            np.clip(x, self.clip[0], self.clip[1], out=x)
            x -= self.mean
            x /= self.std
        return x

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["clip"] = list(self.clip) if self.clip is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Normalization":
        clip = d.get("clip")
        return cls(scheme=d.get("scheme", "zscore"), clip=tuple(clip) if clip is not None else None,
                   mean=d.get("mean"), std=d.get("std"))


@dataclass
class PreprocessPlan:
    """What :func:`prepare` does to a case.

    Args:
        spacing: target voxel size in mm along the reoriented (closest-to-RAS) axes; ``None`` for an
            axis keeps that axis's native spacing (2D models keep the slice axis); ``None`` overall
            skips resampling.
        normalization: one :class:`Normalization` per input channel (a single one is used for all).
    """

    spacing: tuple[float | None, float | None, float | None] | None = None
    normalization: list[Normalization] = field(default_factory=lambda: [Normalization()])

    def norm_for(self, channel: int) -> Normalization:
        return self.normalization[channel] if len(self.normalization) > 1 else self.normalization[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "spacing": list(self.spacing) if self.spacing is not None else None,
            "normalization": [n.to_dict() for n in self.normalization],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessPlan":
        sp = d.get("spacing")
        norms = d.get("normalization") or [{}]
        if isinstance(norms, dict):
            norms = [norms]
        return cls(spacing=tuple(sp) if sp is not None else None,  # type: ignore[arg-type]
                   normalization=[Normalization.from_dict(n) for n in norms])


@dataclass
class PreparedCase:
    """A case on the network grid, with what is needed to map results back.

    Attributes:
        array: float32, shape ``(C, X, Y, Z)``: normalised channels on the network grid.
        affine: 4x4 voxel -> RAS mm of the network grid.
        input_shape: ``(I, J, K)`` of the input grid.
        input_affine: 4x4 of the input grid.
        ornt: nibabel orientation array that took input axes to the reoriented axes.
        reoriented_shape: shape after reorientation, before resampling.
    """

    array: np.ndarray
    affine: np.ndarray
    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    ornt: np.ndarray
    reoriented_shape: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def _check_same_grid(volumes: Sequence[Volume]) -> None:
    for v in volumes[1:]:
        if not volumes[0].same_grid(v, atol=1e-3):
            raise GeometryError(
                f"input channels are on different grids: {volumes[0].meta.get('source', 'channel 0')} has "
                f"{volumes[0].describe_grid()}, {v.meta.get('source', 'another channel')} has {v.describe_grid()}; "
                "register/resample them to one grid first"
            )


def reorientation(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray]:
    """Axis permutation/flip closest to RAS.

    Returns:
        ``(ornt, new_shape, new_affine)``: the nibabel orientation array, the reoriented shape and the
        affine of the reoriented grid (same world positions, permuted/flipped voxel axes).
    """
    ornt = nio.io_orientation(affine)
    new_affine = affine @ nio.inv_ornt_aff(ornt, shape)
    perm = ornt[:, 0].astype(int)
    new_shape = [0, 0, 0]
    for src_axis, dst_axis in enumerate(perm):
        new_shape[dst_axis] = int(shape[src_axis])
    return ornt, tuple(new_shape), new_affine  # type: ignore[return-value]


def target_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float | None] | None) -> tuple[int, int, int]:
    """Grid size after resampling ``shape`` at ``spacing`` (mm) to ``target`` spacing (mm), field of view kept."""
    if target is None:
        return tuple(int(s) for s in shape)  # type: ignore[return-value]
    out = []
    for n, sp, tg in zip(shape, spacing, target):
        out.append(int(n) if tg is None else max(1, int(round(n * sp / float(tg)))))
    return tuple(out)  # type: ignore[return-value]


def resampled_affine(affine: np.ndarray, shape_in: Sequence[int], shape_out: Sequence[int]) -> np.ndarray:
    """Affine of a grid resampled from ``shape_in`` to ``shape_out`` with the corners kept (align_corners=False).

    Output voxel ``o`` has its centre at input index ``(o + 0.5) * n_in / n_out - 0.5``.
    """
    scale = np.asarray(shape_in, float) / np.asarray(shape_out, float)
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = 0.5 * scale - 0.5
    return affine @ m


def resize(array: np.ndarray | torch.Tensor, shape: Sequence[int], *, label: bool = False) -> torch.Tensor:
    """Resample a channel-first array ``(C, X, Y, Z)`` to ``(C, *shape)`` with corners kept.

    Images/probabilities use trilinear interpolation; label maps (``label=True``) use
    ``nearest-exact`` (centre-based nearest neighbour, consistent with :func:`resampled_affine`).
    Returns a float32 tensor (labels too; cast afterwards). When ``shape`` equals the current
    shape, the data are returned unchanged (no interpolation).
    """
    t = torch.as_tensor(array)
    if tuple(t.shape[1:]) == tuple(int(s) for s in shape):
        return t.float() if not label else t
    t = t.float().unsqueeze(0)
    if label:
        out = F.interpolate(t, size=tuple(int(s) for s in shape), mode="nearest-exact")
    else:
        out = F.interpolate(t, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)
    return out.squeeze(0)


def prepare(volumes: Volume | Sequence[Volume], plan: PreprocessPlan) -> PreparedCase:
    """Reorient, resample and normalise one case's channels onto the network grid.

    Args:
        volumes: one Volume per input channel, all on the same grid.
        plan: target spacing and normalisation.

    Returns:
        A :class:`PreparedCase` whose ``array`` is float32 ``(C, X, Y, Z)``.
    """
    vols = [volumes] if isinstance(volumes, Volume) else list(volumes)
    _check_same_grid(vols)
    ref = vols[0]
    ornt, ro_shape, ro_affine = reorientation(ref.affine, ref.shape)
    ro_spacing = np.linalg.norm(ro_affine[:3, :3], axis=0)
    out_shape = target_shape(ro_shape, ro_spacing, plan.spacing)
    # Resample in the input's own axis order, then reorient the (usually much smaller) result:
    # linear interpolation with corners kept is symmetric under axis flips and acts per axis, so this
    # equals reorient-then-resample up to float rounding, and it avoids copying the full-resolution
    # array through a flip/transpose (numpy/torch copies with negative or permuted strides took
    # 9-12 s for a 512x512x600 CT on 2 cores, the resampling itself 0.01 s).
    in_order_shape = tuple(out_shape[int(ornt[i, 0])] for i in range(3))
    channels = []
    for c, v in enumerate(vols):
        resized = resize(_as_tensor(v.array)[None], in_order_shape)[0]
        oriented = _apply_ornt(resized, ornt).contiguous().numpy()
        channels.append(plan.norm_for(c).apply(oriented))
    return PreparedCase(
        array=np.stack(channels, axis=0),
        affine=resampled_affine(ro_affine, ro_shape, out_shape),
        input_shape=ref.shape,
        input_affine=ref.affine.copy(),
        ornt=ornt,
        reoriented_shape=ro_shape,
    )


def prepare_label(label: Volume, case: PreparedCase) -> np.ndarray:
    """Bring a label map onto ``case``'s network grid (nearest neighbour). Returns uint8/int16 ``(X, Y, Z)``."""
    if label.shape != case.input_shape or not np.allclose(label.affine, case.input_affine, atol=1e-3):
        raise GeometryError(
            f"label {label.meta.get('source', '')} is on a different grid than its image: "
            f"label {label.describe_grid()}; image shape {case.input_shape}"
        )
    data = nio.apply_orientation(np.asarray(label.array), case.ornt)
    out = resize(np.ascontiguousarray(data)[None], case.shape, label=True)[0]
    dtype = np.uint8 if int(out.max()) < 256 else np.int16
    return out.numpy().astype(dtype)


def restore(array: np.ndarray | torch.Tensor, case: PreparedCase, *, label: bool = False) -> np.ndarray:
    """Map a channel-first result on the network grid ``(C, X, Y, Z)`` back onto the input grid.

    Probabilities/logits are interpolated linearly (take the argmax *after* restoring); label maps
    with ``label=True`` use nearest neighbour. Returns ``(C, I, J, K)`` on exactly the input grid.
    """
    t = torch.as_tensor(array)
    inv = _inverse_ornt(case.ornt)
    if label:  # nearest neighbour has ties at voxel boundaries that a flip would move: resample first
        back = resize(t, case.reoriented_shape, label=True).numpy()
        return np.stack([nio.apply_orientation(ch, inv) for ch in back], axis=0)
    # linear: reorient the small network-grid array first, then resample in the input's axis order
    # (same result up to float rounding, no full-resolution flip/transpose copy; see prepare).
    # Interpolating with the axes reversed makes each full-size channel Fortran-ordered, the layout
    # NIfTI data have: writing the mask back then needs no transposed copy.
    small = _apply_ornt(t, inv).permute(0, 3, 2, 1).contiguous()
    return resize(small, tuple(reversed(case.input_shape))).permute(0, 3, 2, 1).numpy()


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy array when torch supports its dtype and layout, else a float32 copy."""
    arr = np.asarray(array)
    try:
        return torch.from_numpy(arr)  # any positive strides, e.g. NIfTI's Fortran order: no copy
    except (TypeError, ValueError):  # negative strides, non-native byte order, a dtype torch lacks
        return torch.from_numpy(np.array(arr, dtype=np.float32, order="K"))


def _apply_ornt(t: torch.Tensor, ornt: np.ndarray) -> torch.Tensor:
    """``nibabel.orientations.apply_orientation`` on the last three axes of a tensor (flips, then transpose)."""
    lead = t.ndim - 3
    flips = [lead + i for i, (_, f) in enumerate(ornt) if f == -1]
    if flips:
        t = torch.flip(t, flips)
    perm = list(range(lead)) + [lead + int(i) for i in np.argsort(ornt[:, 0])]
    return t.permute(perm)


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """Orientation array that undoes ``ornt`` (nibabel applies axis moves, then flips)."""
    inv = np.zeros_like(ornt)
    for src, (dst, flip) in enumerate(ornt):
        inv[int(dst)] = [src, flip]
    return inv
