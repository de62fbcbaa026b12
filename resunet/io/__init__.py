"""Reading and writing scans: one :class:`Volume` type carries voxels and exact geometry.

Entry points: :func:`load_study` (NIfTI file, DICOM folder, .zip, single DICOM file) and
:func:`list_series`; writers :func:`write_nifti`, :func:`write_mask_nifti`,
:func:`write_dicom_series`, :func:`write_dicom_seg` (reader :func:`read_dicom_seg`) and
:func:`write_rtstruct` (reader :func:`read_rtstruct`).
"""

import importlib
from typing import Any

#: public name -> submodule, imported on first use: ``from resunet.io.atomic import ...`` (the service,
#: the CLI's argument parsers) must not pay for pydicom, nibabel and highdicom (seconds at start-up)
_WHERE = {
    "atomic_path": "atomic", "atomic_write_bytes": "atomic", "atomic_write_text": "atomic",
    "SeriesInfo": "dicom", "write_dicom_series": "dicom_writer", "sha256_file": "hashing", "sha256_path": "hashing",
    "list_series": "loader", "load_study": "loader", "read_nifti": "nifti", "write_mask_nifti": "nifti",
    "write_nifti": "nifti", "read_dicom_seg": "seg", "write_dicom_seg": "seg", "read_rtstruct": "rtstruct",
    "write_rtstruct": "rtstruct", "Volume": "volume",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'resunet.io' has no attribute {name!r}")
    return getattr(importlib.import_module(f"resunet.io.{_WHERE[name]}"), name)
