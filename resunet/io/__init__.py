"""Reading and writing scans: one :class:`Volume` type carries voxels and exact geometry.

Entry points: :func:`load_study` (NIfTI file, DICOM folder, .zip, single DICOM file) and
:func:`list_series`; writers :func:`write_nifti`, :func:`write_mask_nifti`,
:func:`write_dicom_series`, :func:`write_dicom_seg` (reader :func:`read_dicom_seg`) and
:func:`write_rtstruct` (reader :func:`read_rtstruct`).

The names are imported on first use (PEP 562 ``__getattr__``): ``import resunet.io.limits``, which
every ``resunet`` subcommand's parser needs, then costs no pydicom, nibabel, numpy or scipy import, so
``resunet predict --help`` and the start of a command load only what they use (issue 23 point 3).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: exported name -> the module that defines it
_EXPORTS = {
    "SeriesInfo": "resunet.io.dicom",
    "Volume": "resunet.io.volume",
    "atomic_path": "resunet.io.atomic",
    "atomic_write_bytes": "resunet.io.atomic",
    "atomic_write_text": "resunet.io.atomic",
    "list_series": "resunet.io.loader",
    "load_study": "resunet.io.loader",
    "read_dicom_seg": "resunet.io.seg",
    "read_nifti": "resunet.io.nifti",
    "read_rtstruct": "resunet.io.rtstruct",
    "sha256_file": "resunet.io.hashing",
    "sha256_path": "resunet.io.hashing",
    "write_dicom_seg": "resunet.io.seg",
    "write_dicom_series": "resunet.io.dicom_writer",
    "write_mask_nifti": "resunet.io.nifti",
    "write_nifti": "resunet.io.nifti",
    "write_rtstruct": "resunet.io.rtstruct",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what static tools and IDEs see
    from resunet.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text
    from resunet.io.dicom import SeriesInfo
    from resunet.io.dicom_writer import write_dicom_series
    from resunet.io.hashing import sha256_file, sha256_path
    from resunet.io.loader import list_series, load_study
    from resunet.io.nifti import read_nifti, write_mask_nifti, write_nifti
    from resunet.io.rtstruct import read_rtstruct, write_rtstruct
    from resunet.io.seg import read_dicom_seg, write_dicom_seg
    from resunet.io.volume import Volume


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'resunet.io' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
