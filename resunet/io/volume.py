"""The one type that carries voxels together with their geometry.

Conventions (the same as nibabel and NIfTI, so a Volume maps 1:1 onto a NIfTI file):

- ``array`` is indexed ``[i, j, k]`` (voxel axes, NIfTI order), shape ``(I, J, K)``. A 2D image is
  stored as ``(I, J, 1)``. Multi-channel data are several Volumes on the same grid, never a 4th axis.
- ``affine`` is the 4x4 matrix that maps voxel indices ``(i, j, k, 1)`` to world coordinates in mm
  in the RAS+ frame (NIfTI/nibabel): x increases towards the patient's Right, y towards Anterior,
  z towards Superior. DICOM's LPS frame is the same space with x and y negated; readers convert
  LPS -> RAS with ``diag(-1, -1, 1)``.
- The centre of voxel ``(0, 0, 0)`` sits at ``affine[:3, 3]``; voxel corners are at half indices.

``meta`` holds what writers need to put results back where they belong (the DICOM series a mask
refers to, the NIfTI header's units, ...). Keys used across modules:

- ``"source"``: str, path of the file or folder the volume was read from.
- ``"format"``: ``"nifti"`` or ``"dicom"``.
- ``"modality"``: DICOM modality (``"CT"``, ``"MR"``, ...) when known.
- ``"series_uid"``, ``"series_description"``: DICOM series identity.
- ``"dicom_files"``: list of str, the source files in slice order (index ``k``), for DICOM SEG.
- ``"nifti_header"``: the source ``nibabel`` header, so a mask NIfTI keeps qform/sform codes.
- ``"is_label"``: True for label maps (masks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np

from resunet.errors import GeometryError, InputError


@dataclass
class Volume:
    """Voxels plus the exact geometry of a scan or mask.

    Args:
        array: voxel data, shape ``(I, J, K)``, indexed in voxel order (see module docstring).
        affine: 4x4 float64 voxel-index -> RAS+ world (mm) matrix.
        meta: source metadata needed to write results back (see module docstring for the keys).
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise GeometryError(f"affine must be 4x4, got shape {self.affine.shape}")
        if self.array.ndim != 3:
            raise InputError(
                f"a Volume holds a 3D array (I, J, K); got shape {self.array.shape}"
                f" from {self.meta.get('source', 'an array')}"
            )
        if min(self.array.shape) < 1:
            raise InputError(
                f"{self.meta.get('source', 'volume')}: a dimension has size 0 (shape {self.array.shape})"
            )
        if not np.all(np.isfinite(self.affine)) or abs(np.linalg.det(self.affine[:3, :3])) < 1e-12:
            raise GeometryError(
                f"{self.meta.get('source', 'volume')}: the voxel-to-world matrix is singular or not finite"
            )

    # -- geometry -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel grid size ``(I, J, K)``."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the ``i``, ``j``, ``k`` axes (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (= cm^3)."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def orientation(self) -> str:
        """Axis codes such as ``"RAS"`` or ``"LPS"``: where each voxel axis points in the patient."""
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix of unit column vectors: the world (RAS) direction of each voxel axis."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    @property
    def origin(self) -> np.ndarray:
        """World (RAS, mm) position of the centre of voxel ``(0, 0, 0)``."""
        return self.affine[:3, 3].copy()

    def same_grid(self, other: "Volume", atol: float = 1e-4) -> bool:
        """True if ``other`` has the same shape and an affine equal within ``atol`` (mm)."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))

    def describe_grid(self) -> str:
        """One line naming shape, spacing, orientation and origin, for error messages."""
        sp = "x".join(f"{s:.4g}" for s in self.spacing)
        org = ", ".join(f"{o:.4g}" for o in self.origin)
        return f"shape {self.shape}, spacing {sp} mm, orientation {self.orientation}, origin ({org}) mm"

    def with_array(self, array: np.ndarray, **meta_updates: Any) -> "Volume":
        """A Volume on the same grid with new voxels (e.g. a mask for this scan).

        Args:
            array: new voxels, shape must equal ``self.shape``.
            meta_updates: keys to set in a copy of ``self.meta``.
        """
        if tuple(array.shape) != self.shape:
            raise GeometryError(f"new array shape {array.shape} differs from the grid {self.shape}")
        meta = dict(self.meta)
        meta.update(meta_updates)
        return Volume(array=array, affine=self.affine.copy(), meta=meta)

    def to_nifti(self) -> nib.Nifti1Image:
        """A ``nibabel`` image with exactly this array and affine (header copied when the source was NIfTI)."""
        header = self.meta.get("nifti_header")
        img = nib.Nifti1Image(self.array, self.affine, header=header.copy() if header is not None else None)
        img.set_data_dtype(self.array.dtype)
        # set_sform/qform with code 1 (scanner) unless the source carried its own codes
        scode = int(header["sform_code"]) if header is not None and int(header["sform_code"]) > 0 else 1
        qcode = int(header["qform_code"]) if header is not None and int(header["qform_code"]) > 0 else 1
        img.set_sform(self.affine, code=scode)
        img.set_qform(self.affine, code=qcode)
        return img
