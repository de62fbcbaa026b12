"""Simulated acquisitions of one T1 head: other resolutions, orientations, scanners.

Used by ``reproduce.py`` to turn the single Colin27 head into a training set and the MNI152
template (a different head) into a held-out test set. Every variant is a new scan of the same
anatomy, written with its own voxel grid:

- **grid**: voxel size (e.g. 1x1x3 or 2x2x3 mm, the thick axis along any direction), axis order and
  signs (RAS, LPS, LSA, PIR, ...), a small head rotation (oblique), and a cropped field of view.
  Thick slices average the anatomy over the slice thickness (Gaussian pre-filter, FWHM = the new
  spacing) before sampling, as a real thick-slice acquisition would (partial volume).
- **intensities**: a monotone remapping (gamma, scanner scale and offset, int16 or float32
  storage), a smooth multiplicative bias field, Rician noise, and optionally the skull removed
  (a skull-stripped input).

The label is resampled with the same geometry (linear interpolation of the mask, threshold 0.5; a
label map with several labels is resampled channel by channel, one per label, and the largest wins).
All randomness comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from resunet.io import Volume

_AXIS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}


def axes_matrix(code: str) -> np.ndarray:
    """3x3 matrix whose column ``j`` is the RAS direction voxel axis ``j`` points to (``"LPS"`` ...)."""
    return np.array([_AXIS[c] for c in code], dtype=float).T


@dataclass
class Acquisition:
    """One simulated scan's settings (stored in the dataset for provenance)."""

    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    orientation: str = "RAS"
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    crop_frac: tuple[float, float, float, float, float, float] = (0, 0, 0, 0, 0, 0)
    gamma: float = 1.0
    scale: float = 1.0
    offset: float = 0.0
    bias: float = 0.0
    noise: float = 0.0
    strip_skull: bool = False
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_acquisition(rng: np.random.Generator, *, thick: bool | None = None) -> Acquisition:
    """Draw scanner/grid settings like those seen across sites (spacings 1-3 mm, any axis order)."""
    if thick is None:
        thick = bool(rng.random() < 0.6)
    if thick:
        inplane = float(rng.choice([0.9, 1.0, 1.2, 1.5, 2.0]))
        sp = [inplane, inplane, float(rng.choice([2.5, 3.0, 3.5, 4.0]))]
        rng.shuffle(sp)  # thick axis along any voxel axis
    else:
        iso = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5]))
        sp = [iso, iso, iso]
    orientation = str(rng.choice(["RAS", "LPS", "LSA", "PIR", "LAS", "RPI", "ASL", "IPL", "SAR"]))
    return Acquisition(
        spacing=tuple(sp),  # type: ignore[arg-type]
        orientation=orientation,
        rotation_deg=tuple(float(x) for x in rng.uniform(-12, 12, 3)),  # type: ignore[arg-type]
        crop_frac=tuple(float(x) for x in rng.uniform(0, 0.08, 6) * (rng.random(6) < 0.5)),  # type: ignore[arg-type]
        gamma=float(np.exp(rng.uniform(np.log(0.6), np.log(1.6)))),
        scale=float(np.exp(rng.uniform(np.log(50), np.log(4000)))),
        offset=float(rng.uniform(-0.05, 0.05)),
        bias=float(rng.uniform(0.0, 0.5)),
        noise=float(rng.uniform(0.0, 0.06)),
        strip_skull=bool(rng.random() < 0.15),
        dtype=str(rng.choice(["int16", "float32"])),
    )


def simulate(image: Volume, mask: Volume, acq: Acquisition, rng: np.random.Generator) -> tuple[Volume, Volume]:
    """A new acquisition of ``image`` (and its brain ``mask``) per ``acq``.

    Returns:
        ``(image, mask)`` on the new grid; the image has the intensity remapping applied, the mask
        is uint8 0/1 (or the input's label values when it has several labels).
    """
    src = np.asarray(image.array, dtype=np.float32)
    lab = np.asarray(mask.array)
    values = [int(v) for v in np.unique(lab) if v != 0]
    if len(values) > 1:
        # several labels: one channel per label (background first), each resampled like the binary
        # mask below, then the label whose channel is largest wins (as nnU-Net resamples labels)
        values = [0, *values]
        m = np.stack([(lab == v).astype(np.float32) for v in values])
    else:
        values = []
        m = (lab > 0).astype(np.float32)
    if acq.strip_skull:
        src = src * ndimage.binary_dilation(lab > 0, iterations=1)
    # --- new grid ------------------------------------------------------------------------------
    rot = Rotation.from_euler("xyz", acq.rotation_deg, degrees=True).as_matrix()
    direction = rot @ axes_matrix(acq.orientation)
    lin = direction @ np.diag(acq.spacing)
    n = np.array(src.shape)
    corners = np.array([[i, j, k] for i in (-0.5, n[0] - 0.5) for j in (-0.5, n[1] - 0.5) for k in (-0.5, n[2] - 0.5)])
    world = corners @ image.affine[:3, :3].T + image.affine[:3, 3]
    u = np.linalg.solve(lin, world.T).T  # corners in new voxel units
    lo, hi = u.min(0), u.max(0)
    extent = hi - lo
    crop = np.array(acq.crop_frac).reshape(3, 2)
    lo = lo + crop[:, 0] * extent
    hi = hi - crop[:, 1] * extent
    shape = np.maximum(np.floor(hi - lo).astype(int), 8)
    origin_u = lo + 0.5
    out_affine = np.eye(4)
    out_affine[:3, :3] = lin
    out_affine[:3, 3] = lin @ origin_u
    # --- partial volume: blur the source along the directions the new grid is coarser ----------
    src_lin = image.affine[:3, :3]
    src_sp = np.linalg.norm(src_lin, axis=0)
    # new spacing seen along each source axis (axis-aligned approximation through |cosines|)
    cos = np.abs((src_lin / src_sp).T @ direction)
    eff = cos @ np.asarray(acq.spacing)
    sigma = np.sqrt(np.maximum(eff**2 - src_sp**2, 0)) / 2.3548 / src_sp
    if np.any(sigma > 0.1):
        src = ndimage.gaussian_filter(src, sigma)
        m = np.stack([ndimage.gaussian_filter(c, sigma) for c in m]) if values else ndimage.gaussian_filter(m, sigma)
    # --- resample -------------------------------------------------------------------------------
    to_src = np.linalg.inv(image.affine) @ out_affine
    img_out = ndimage.affine_transform(src, to_src[:3, :3], to_src[:3, 3], output_shape=tuple(shape), order=1,
                                       mode="constant", cval=0.0)
    if values:
        chans = [ndimage.affine_transform(c, to_src[:3, :3], to_src[:3, 3], output_shape=tuple(shape), order=1,
                                          mode="constant", cval=1.0 if v == 0 else 0.0) for c, v in zip(m, values)]
        m_out = np.asarray(values, dtype=np.uint8)[np.argmax(np.stack(chans), 0)]
    else:
        m_out = ndimage.affine_transform(m, to_src[:3, :3], to_src[:3, 3], output_shape=tuple(shape), order=1,
                                         mode="constant", cval=0.0) > 0.5
    # --- intensities -----------------------------------------------------------------------------
    ref = float(np.percentile(src[src > 0], 99)) if np.any(src > 0) else 1.0
    x = np.clip(img_out / ref, 0, None) ** acq.gamma
    if acq.bias > 0:
        ijk = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), 0)
        coeff = rng.normal(0, 1, (3, 2))
        field = sum(coeff[a, 0] * ijk[a] + coeff[a, 1] * (ijk[a] ** 2 - 1 / 3) for a in range(3))
        field = field / max(np.abs(field).max(), 1e-6)
        x = x * np.exp(acq.bias * field)
    if acq.noise > 0:
        n1 = rng.normal(0, acq.noise, x.shape)
        n2 = rng.normal(0, acq.noise, x.shape)
        x = np.sqrt((x + n1) ** 2 + n2**2)  # Rician magnitude noise, as in MR magnitude images
    x = x * acq.scale + acq.offset * acq.scale
    if acq.dtype == "int16":
        x = np.clip(np.round(x), -32768, 32767).astype(np.int16)
    else:
        x = x.astype(np.float32)
    meta = {"source": f"simulated:{acq.orientation}", "format": "nifti"}
    return Volume(x, out_affine, meta), Volume(m_out.astype(np.uint8), out_affine, {"is_label": True})
