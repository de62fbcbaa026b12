"""Checking a study from its headers only, before anything expensive (model loading, decompression).

``resunet predict`` runs :func:`check_study` on every input of a batch before it loads the model, so
a batch with bad inputs reports all of them at once in seconds instead of after the model has loaded.
What is checked, without reading or decompressing voxel data:

- NIfTI: :func:`resunet.io.nifti.check_nifti` (readable header, 3D, size against the file, the per-case
  limits of :mod:`resunet.io.limits`: memory estimate, voxel size) and the minimum size to segment;
- .zip: the archive directory (:func:`resunet.io.archive.check_zip`: unsafe names, symlinks, sizes,
  ratios); the files inside are checked when the case is read;
- DICOM folder/file: the headers of every file (:func:`resunet.io.dicom.scan_dicom_files`), that an
  image series is there (the one asked for with ``series_uid``), and its rows x columns x slices
  against the limits and the minimum size.

Anything that passes here can still fail while reading (a truncated pixel stream, missing slices);
those cases fail one by one as before.
"""

from __future__ import annotations

import os
from pathlib import Path

from resunet.errors import InputError
from resunet.io.archive import check_zip
from resunet.io.limits import Limits, series_shape
from resunet.io.nifti import check_nifti, is_nifti_path


def check_study(path: str | os.PathLike[str], series_uid: str | None = None, limits: Limits | None = None) -> None:
    """Raise :class:`InputError` if the headers of the study at ``path`` already show it cannot be read.

    Args:
        path: as :func:`resunet.io.load_study` takes it.
        series_uid: the DICOM series that will be read (default: the one with the most slices).
        limits: per-case limits (default :meth:`Limits.from_env`).
    """
    from resunet.io.loader import _choose, _looks_like_zip, _scan

    p = Path(path)
    limits = limits if limits is not None else Limits.from_env()
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_file() and is_nifti_path(p):
        if series_uid:
            raise InputError(f"{p}: --series applies to DICOM input, not to a NIfTI file")
        img = check_nifti(p, limits)
        limits.check_min_size(p, (tuple(int(d) for d in img.shape[:3]) + (1, 1))[:3])
        return
    if p.is_file() and (p.name.lower().endswith(".zip") or _looks_like_zip(p)):
        check_zip(p)
        return
    if p.is_file() and p.name.upper() == "DICOMDIR":
        p = p.parent
    info = _choose(_scan(p).series, p, series_uid)
    limits.check_series(p, info)
    limits.check_min_size(p, series_shape(info), what=f"series {info.uid}")
