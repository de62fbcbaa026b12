"""Helpers shared by the I/O tests and bench/io_pydicom_data.py: SimpleITK as the reference reader."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from resunet.io.volume import Volume

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def sitk_read(files: str | Sequence[str]) -> sitk.Image:
    """Read one file (sitk.ReadImage) or a list of slice files (ImageSeriesReader, GDCM order)."""
    if isinstance(files, str):
        return sitk.ReadImage(files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    return reader.Execute()


def sitk_to_ras(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(array [i, j, k], affine voxel -> RAS mm) of a SimpleITK image (which is LPS, array (k, j, i))."""
    arr = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("colour image")
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    arr = np.transpose(arr, (2, 1, 0))
    dim = img.GetDimension()
    direction = np.eye(3)
    direction[:dim, :dim] = np.array(img.GetDirection()).reshape(dim, dim)
    spacing = np.ones(3)
    spacing[:dim] = img.GetSpacing()
    origin = np.zeros(3)
    origin[:dim] = img.GetOrigin()
    aff = np.eye(4)
    aff[:3, :3] = direction * spacing
    aff[:3, 3] = origin
    return arr, RAS_FROM_LPS @ aff


def corners(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World positions (mm) of the 8 outer voxel corners of a grid, shape (8, 3)."""
    pts = np.array([[c - 0.5 for c in combo] for combo in itertools.product(*[(0, n) for n in shape])])
    return (affine[:3, :3] @ pts.T).T + affine[:3, 3]


def compare_with_sitk(
    vol: Volume, img: sitk.Image, scale: float = 1.0, max_abs_diff: float = 0.0
) -> tuple[bool, float, str]:
    """(voxels equal, max corner distance mm, note) between our Volume and SimpleITK's image.

    Our slice order is ascending along the slice normal; SimpleITK's may be the reverse, so the
    k axis is flipped when the two affines say so (same voxels in the same places either way).
    ``scale`` multiplies SimpleITK's values (RT dose: DoseGridScaling, which SimpleITK does not apply).
    ``max_abs_diff`` allows decoder rounding differences (lossy JPEG).
    For a single slice SimpleITK sets the slice spacing to 1 mm whatever the file says, so only the
    in-plane corners of the slice's centre plane are compared then.
    """
    ref, ref_aff = sitk_to_ras(img)
    if scale != 1.0:
        ref = ref.astype(np.float64) * scale
    arr, aff = np.asarray(vol.array), vol.affine.copy()
    note = ""
    if arr.shape != ref.shape:
        return False, float("inf"), f"shape {arr.shape} vs SimpleITK {ref.shape}"
    m = np.linalg.solve(ref_aff, aff)
    for ax in range(3):
        if m[ax, ax] < 0 and arr.shape[ax] > 1:
            arr = np.flip(arr, axis=ax)
            flip = np.eye(4)
            flip[ax, ax] = -1
            flip[ax, 3] = arr.shape[ax] - 1
            aff = aff @ flip
            note += f"axis {ax} reversed; "
    if arr.shape[2] == 1:
        aff, ref_aff = aff.copy(), ref_aff.copy()
        aff[:3, 2] = ref_aff[:3, 2] = 0.0
        note += "single slice: in-plane corners; "
    dist = float(np.max(np.linalg.norm(corners(aff, arr.shape) - corners(ref_aff, ref.shape), axis=1)))
    a64, r64 = arr.astype(np.float64), ref.astype(np.float64)
    same = bool(np.array_equal(a64, r64))
    if not same and max_abs_diff > 0:
        same = bool(np.max(np.abs(a64 - r64)) <= max_abs_diff)
        note += f"values within {max_abs_diff:g} (lossy decoder rounding); " if same else ""
    if not same and (np.issubdtype(ref.dtype, np.floating) or np.issubdtype(arr.dtype, np.floating)):
        same = bool(np.allclose(a64, r64, rtol=1e-6, atol=1e-6))
        note += "float values within 1e-6; " if same else ""
    return same, dist, note.strip()
