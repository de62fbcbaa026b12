"""Reading and writing scans: one :class:`Volume` type carries voxels and exact geometry.

Entry points: :func:`load_study` (NIfTI file, DICOM folder, .zip, single DICOM file) and
:func:`list_series`; writers :func:`write_nifti`, :func:`write_mask_nifti`,
:func:`write_dicom_series`, :func:`write_dicom_seg` (reader :func:`read_dicom_seg`) and
:func:`write_rtstruct` (reader :func:`read_rtstruct`).
"""

from resunet.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from resunet.io.dicom import SeriesInfo
from resunet.io.dicom_writer import write_dicom_series
from resunet.io.hashing import sha256_file, sha256_path
from resunet.io.loader import list_series, load_study
from resunet.io.nifti import read_nifti, write_mask_nifti, write_nifti
from resunet.io.seg import read_dicom_seg, write_dicom_seg
from resunet.io.rtstruct import read_rtstruct, write_rtstruct
from resunet.io.volume import Volume

__all__ = [
    "SeriesInfo",
    "Volume",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "list_series",
    "load_study",
    "read_dicom_seg",
    "read_nifti",
    "read_rtstruct",
    "sha256_file",
    "sha256_path",
    "write_dicom_seg",
    "write_dicom_series",
    "write_mask_nifti",
    "write_nifti",
    "write_rtstruct",
]
