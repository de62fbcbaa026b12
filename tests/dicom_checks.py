"""Independent checks of the DICOM objects resunet writes: dicom3tools' validator, plastimatch's
RTSTRUCT rasteriser, and a rasteriser of our own that uses nothing of resunet (pydicom headers and
scikit-image only), so a writer and reader that are wrong the same way cannot agree with each other.

Tools missing: the test fails under ``CI`` (scripts/setup-system.sh installs them) and skips elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

#: dciodvfy warnings resunet's objects still get, each with its reason in docs/io.md ("Validator
#: warnings left"); any other warning fails the check
KNOWN_WARNINGS = (
    # write_dicom_series: Laterality (Type 2C) empty: the writer does not know the body part
    "should be absent (not empty) if an unpaired body part",
)


def require_tool(name: str, package: str) -> str:
    """The tool's path; fails the test under CI when it is missing, skips it otherwise."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} (Debian {package}) is missing; scripts/setup-system.sh installs it")
        pytest.skip(f"{name} not installed (Debian {package})")
    return path


def dciodvfy(path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` that dicom3tools' ``dciodvfy`` reports for one file."""
    exe = require_tool("dciodvfy", "dicom3tools")
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=300)
    lines = (res.stdout + res.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings


def assert_dciodvfy_clean(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
                          known: Sequence[str] = KNOWN_WARNINGS) -> None:
    """0 errors and no warning outside ``known`` (substrings) for each file."""
    files = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    assert files
    for f in files:
        errors, warnings = dciodvfy(f)
        unexplained = [w for w in warnings if not any(k in w for k in known)]
        assert errors == [] and unexplained == [], (str(f), errors, unexplained)


#: dcentvfy warnings left (docs/io.md): the SR IOD and the MR IOD file AccessionNumber (empty in both)
#: under different information entities in dicom3tools' tables; the values agree
KNOWN_ENTITY_WARNINGS = ("Different information entities for attribute - Element=<AccessionNumber>",)


def assert_study_consistent(files: Iterable[str | os.PathLike[str]]) -> None:
    """dcmtk's ``dcmftest``: each file is a DICOM Part 10 file; dicom3tools' ``dcentvfy``: the files of
    one study agree on every patient/study/series/frame-of-reference attribute (0 errors, and no warning
    outside ``KNOWN_ENTITY_WARNINGS``)."""
    files = [str(f) for f in files]
    ftest = require_tool("dcmftest", "dcmtk")
    res = subprocess.run([ftest, *files], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and all(line.startswith("yes:") for line in res.stdout.splitlines()), res.stdout
    exe = require_tool("dcentvfy", "dicom3tools")
    res = subprocess.run([exe, *files], capture_output=True, text=True, timeout=300)
    lines = (res.stdout + res.stderr).splitlines()
    bad = [line for line in lines if line.startswith("Error")
           or (line.startswith("Warning") and not any(k in line for k in KNOWN_ENTITY_WARNINGS))]
    assert bad == [], bad


def _series_headers(series_files: Sequence[str | os.PathLike[str]]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in series_files]


def _grid(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """IPP, row direction X (column index grows), column direction Y (row index grows), column and
    row spacing (mm), straight from the image header (PS3.3 C.7.6.2.1.1)."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    ps = np.asarray(ds.PixelSpacing, dtype=float)
    return np.asarray(ds.ImagePositionPatient, dtype=float), iop[:3], iop[3:], float(ps[1]), float(ps[0])


def rasterise_rtstruct(rtstruct: str | os.PathLike[str], series_files: Sequence[str | os.PathLike[str]],
                       rule: str = "or") -> dict[str, np.ndarray]:
    """ROI name -> boolean array ``[column, row, slice]`` (slice = position in ``series_files``),
    rasterised without resunet: each contour's LPS points go through the referenced image's own
    ImagePositionPatient / ImageOrientationPatient / PixelSpacing to (column, row), then
    ``skimage.draw.polygon`` (pixel centres inside). Contours of an ROI on one slice combine by
    ``rule``: "or" (as plastimatch and many planning systems) or "xor" (the even-odd rule)."""
    from skimage.draw import polygon

    headers = _series_headers(series_files)
    by_uid = {str(h.SOPInstanceUID): k for k, h in enumerate(headers)}
    cols, rows = int(headers[0].Columns), int(headers[0].Rows)
    ds = pydicom.dcmread(rtstruct)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    out: dict[str, np.ndarray] = {}
    for rc in ds.ROIContourSequence:
        arr = np.zeros((cols, rows, len(headers)), dtype=bool)
        for item in rc.get("ContourSequence", []):
            k = by_uid[str(item.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            ipp, x, y, dc, dr = _grid(headers[k])
            pts = np.asarray(item.ContourData, dtype=float).reshape(-1, 3) - ipp
            assert np.allclose(pts @ np.cross(x, y), 0.0, atol=1e-3), "contour off its image's plane"
            c, r = pts @ x / dc, pts @ y / dr
            fill = np.zeros((cols, rows), dtype=bool)
            rr, cc = polygon(c, r, shape=(cols, rows))
            fill[rr, cc] = True
            if rule == "or":
                arr[:, :, k] |= fill
            else:
                arr[:, :, k] ^= fill
        out[names[int(rc.ReferencedROINumber)]] = arr
    return out


def plastimatch_structures(rtstruct: str | os.PathLike[str], series_dir: str | os.PathLike[str],
                           series_files: Sequence[str | os.PathLike[str]]) -> dict[str, np.ndarray]:
    """ROI name -> boolean array ``[column, row, slice]`` (slice = position in ``series_files``) as
    plastimatch converts the RTSTRUCT with its default options (contours OR-ed): ``plastimatch
    convert --referenced-ct``, one NIfTI per structure, each sampled at the source pixels' centres
    (LPS from the image headers, through the NIfTI's affine)."""
    exe = require_tool("plastimatch", "plastimatch")
    headers = _series_headers(series_files)
    cols, rows = int(headers[0].Columns), int(headers[0].Rows)
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([exe, "convert", "--input", str(rtstruct), "--referenced-ct", str(series_dir),
                              "--output-prefix", tmp, "--prefix-format", "nii.gz"],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        ds = pydicom.dcmread(rtstruct, stop_before_pixels=True)
        out: dict[str, np.ndarray] = {}
        cc, rr = np.meshgrid(np.arange(cols), np.arange(rows), indexing="ij")
        for roi in ds.StructureSetROISequence:
            img = nib.load(Path(tmp) / f"{roi.ROIName}.nii.gz")
            data = np.asarray(img.dataobj) > 0
            to_vox = np.linalg.inv(img.affine)
            arr = np.zeros((cols, rows, len(headers)), dtype=bool)
            for k, h in enumerate(headers):
                ipp, x, y, dc, dr = _grid(h)
                lps = ipp + cc[..., None] * dc * x + rr[..., None] * dr * y
                ras = lps * np.array([-1.0, -1.0, 1.0])
                v = ras @ to_vox[:3, :3].T + to_vox[:3, 3]
                idx = np.round(v).astype(int)
                assert np.allclose(v, idx, atol=1e-3), "plastimatch's grid is not the source grid"
                inside = np.all((idx >= 0) & (idx < np.array(data.shape)), axis=-1)
                arr[:, :, k][inside] = data[idx[inside][:, 0], idx[inside][:, 1], idx[inside][:, 2]]
            out[str(roi.ROIName)] = arr
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = float(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total
