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
from resunet.io.archive import check_zip, extract_zip
from resunet.io.limits import Limits, series_shape
from resunet.io.nifti import check_nifti, check_nifti_stream


def check_study(
    path: str | os.PathLike[str],
    series_uid: str | None = None,
    limits: Limits | None = None,
    *,
    deep: bool = False,
    min_slices: int = 1,
    allow_split: bool = True,
) -> int:
    """Raise :class:`InputError` if the headers of the study at ``path`` already show it cannot be read.

    Returns the estimated peak memory (bytes) of segmenting it (:meth:`Limits.estimate_bytes`); for a
    ``.zip`` checked without ``deep``, the limit itself (its contents are not looked at).

    Args:
        path: as :func:`resunet.io.load_study` takes it.
        series_uid: the DICOM series that will be read (default: the one with the most slices).
        limits: per-case limits (default :meth:`Limits.from_env`).
        deep: also what costs disk and time but no memory: a ``.zip`` is extracted and its headers
            checked like a folder's (or its one NIfTI like a NIfTI's), and a ``.nii.gz`` is decompressed
            as a stream to find truncation. What ``resunet serve`` checks on upload: the client gets
            its 4xx at once, and no volume is decoded in the request.
        min_slices, allow_split: the service's series rules (:func:`resunet.io.loader.series_rule_error`).
    """
    from resunet.io.loader import choose_series, find_series, route_study, zip_contents

    route = route_study(path, series_uid)  # load_study's routing: the same input, the same reading
    p = route.path
    limits = limits if limits is not None else Limits.from_env()
    if route.kind == "nifti":
        img = (check_nifti_stream if deep else check_nifti)(p, limits)
        limits.check_min_size(p, (tuple(int(d) for d in img.shape[:3]) + (1, 1))[:3])
        return _nifti_estimate(img, limits)
    if route.kind == "zip":
        check_zip(p)
        if not deep:
            return limits.max_bytes
        with extract_zip(p) as folder:
            report, nifti = zip_contents(folder, p, series_uid)
            if nifti is not None:  # a zipped NIfTI, as load_study reads it
                img = check_nifti_stream(nifti, limits)
                limits.check_min_size(p, (tuple(int(d) for d in img.shape[:3]) + (1, 1))[:3])
                return _nifti_estimate(img, limits)
            return _check_series(p, report, choose_series(report.series, p, series_uid), limits, min_slices,
                                 allow_split)
    report = find_series(p)
    return _check_series(p, report, choose_series(report.series, p, series_uid), limits, min_slices, allow_split)


def _nifti_estimate(img, limits: Limits) -> int:
    from resunet.io.nifti import nifti_size

    shape, itemsize = nifti_size(img)
    return limits.estimate_bytes(shape[0] * shape[1] * shape[2], itemsize)


def _check_series(p: Path, report, info, limits: Limits, min_slices: int, allow_split: bool) -> int:
    from resunet.io.loader import series_rule_error, split_groups

    need = limits.check_series(p, info)
    limits.check_min_size(p, series_shape(info), what=f"series {info.uid}")
    why = series_rule_error(info.series_instance_uid or info.uid, split_groups(report, info), info.n_slices,
                            min_slices=min_slices, allow_split=allow_split)
    if why:
        raise InputError(why)
    return need
