"""The geometry of a DICOM image stack: slices, enhanced multi-frame groups, orientation, spacing checks.

The rules are :mod:`resunet.io.dicom`'s module docstring ("Reading"): slices ordered by the
projection of ImagePositionPatient on ``n = row x column``; uneven gaps (missing slices), two slices
at one position, a stack not along ``n`` (gantry tilt) and mixed orientations refused with a
:class:`~resunet.errors.GeometryError`; enhanced multi-frame per-frame / shared functional groups;
classic multi-frame frames along ``n`` (GridFrameOffsetVector, else the slice spacing); images
without patient geometry on an identity grid. This module turns headers into :class:`Slice`
records (:func:`slices_of`) and a sorted, checked stack into its LPS affine (:func:`stack_geometry`);
:mod:`resunet.io.dicom` finds the series and reads the pixels.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from resunet.errors import GeometryError
from resunet.io.dicom_headers import HeaderView

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Tolerances for geometry checks. Positions in DICOM are decimal strings with a few decimals;
#: 1e-2 mm absolute / 1 % relative accepts scanner rounding but no missing slice or real tilt.
SPACING_RTOL = 0.01
SPACING_ATOL_MM = 0.01
TILT_TOL_MM = 0.01
ORIENTATION_TOL = 1e-4


def floats(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None



def float_or(value: Any, default: float | None) -> float | None:
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default



def _first(seq_owner: Dataset | None, seq: str, attr: str) -> Any:
    if seq_owner is None or seq not in seq_owner or len(seq_owner[seq].value) == 0:
        return None
    return seq_owner[seq].value[0].get(attr)



def frame_group(ds: Dataset, frame: int, seq: str, attr: str) -> Any:
    """An attribute from the per-frame functional group ``seq`` of ``frame``, else the shared one."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and frame < len(per):
        value = _first(per[frame], seq, attr)
        if value is not None:
            return value
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared is not None and len(shared):
        return _first(shared[0], seq, attr)
    return None



def enhanced_iop(ds: Dataset, frame: int) -> tuple[float, ...] | None:
    return floats(frame_group(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"))



@dataclass
class Slice:
    """One 2D image (a file or a frame) with its geometry and value transform."""

    source: str
    path: str
    ds: Dataset
    frame: int | None
    position: np.ndarray | None  # LPS mm
    iop: np.ndarray | None  # 6 floats
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) mm
    thickness: float | None
    spacing_between: float | None
    slope: float
    intercept: float
    header: Any = None  # the scan's header record (resunet.io.dicom._Header): pixel data offset
    philips: tuple[float, float] | None = None  # Philips private (scale slope, scale intercept)



def philips_scale(ds: Dataset | HeaderView) -> tuple[float, float] | None:
    """Philips' private floating-point scale slope/intercept (2005,xx0E)/(2005,xx0D), if present."""
    full = ds.ds if isinstance(ds, HeaderView) else ds
    if not any((0x2005 << 16 | e) in full for e in range(0x10, 0x20)):
        return None
    try:
        block = full.private_block(0x2005, "Philips MR Imaging DD 001")
        values = []
        for offset in (0x0E, 0x0D):
            v = block[offset].value if offset in block else None
            if isinstance(v, (bytes, bytearray)):
                v = struct.unpack("<f", bytes(v[:4]))[0] if len(v) >= 4 else None
            values.append(float(v) if v not in (None, "") else None)
    except (KeyError, ValueError, TypeError, struct.error):
        return None
    ss, si = values
    if ss is None or not np.isfinite(ss) or ss == 0:
        return None
    return ss, (si if si is not None and np.isfinite(si) else 0.0)



def slices_of(path: str, ds: Dataset | HeaderView, header: Any = None) -> list[Slice]:
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    slope = float_or(ds.get("RescaleSlope"), 1.0) or 1.0
    inter = float_or(ds.get("RescaleIntercept"), 0.0) or 0.0
    if str(ds.get("Modality", "")) == "RTDOSE" and ds.get("DoseGridScaling") not in (None, ""):
        slope = float_or(ds.get("DoseGridScaling"), 1.0) or 1.0  # dose in Gy (or the DoseUnits)
    ps = floats(ds.get("PixelSpacing")) or floats(ds.get("ImagerPixelSpacing"))
    if ps is not None and (len(ps) != 2 or min(ps) <= 0):
        ps = None  # "0\\0" in some radiographs: treated as absent
    thickness = float_or(ds.get("SliceThickness"), None)
    between = float_or(ds.get("SpacingBetweenSlices"), None)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        out = []
        for f in range(n_frames):
            pos = floats(frame_group(ds, f, "PlanePositionSequence", "ImagePositionPatient"))
            iop = enhanced_iop(ds, f)
            fps = floats(frame_group(ds, f, "PixelMeasuresSequence", "PixelSpacing")) or ps
            fth = float_or(frame_group(ds, f, "PixelMeasuresSequence", "SliceThickness"), thickness)
            fsb = float_or(frame_group(ds, f, "PixelMeasuresSequence", "SpacingBetweenSlices"), between)
            fsl = float_or(frame_group(ds, f, "PixelValueTransformationSequence", "RescaleSlope"), slope)
            fin = float_or(frame_group(ds, f, "PixelValueTransformationSequence", "RescaleIntercept"), inter)
            out.append(
                Slice(
                    source=f"{path} frame {f + 1}",
                    path=path,
                    ds=ds,
                    header=header,
                    frame=f,
                    position=np.array(pos) if pos and len(pos) == 3 else None,
                    iop=np.array(iop) if iop and len(iop) == 6 else None,
                    pixel_spacing=(fps[0], fps[1]) if fps and len(fps) == 2 else None,
                    thickness=fth,
                    spacing_between=fsb,
                    slope=fsl if fsl else 1.0,
                    intercept=fin or 0.0,
                )
            )
        return out
    pos = floats(ds.get("ImagePositionPatient"))
    iop = floats(ds.get("ImageOrientationPatient"))
    base = dict(
        path=path,
        ds=ds,
        header=header,
        philips=philips_scale(ds),
        iop=np.array(iop) if iop and len(iop) == 6 else None,
        pixel_spacing=(ps[0], ps[1]) if ps and len(ps) == 2 else None,
        thickness=thickness,
        spacing_between=between,
        slope=slope,
        intercept=inter,
    )
    if n_frames == 1:
        return [Slice(source=path, frame=None, position=np.array(pos) if pos and len(pos) == 3 else None, **base)]
    # classic multi-frame: frames stacked along the normal
    offsets = floats(ds.get("GridFrameOffsetVector"))
    if offsets and pos and len(pos) == 3 and offsets[0] != 0 and abs(offsets[0] - pos[2]) < 1e-3:
        # the older absolute form (offsets are z coordinates, first = IPP z): make them relative
        offsets = tuple(o - offsets[0] for o in offsets)
    step = between or thickness
    out = []
    normal = None
    if base["iop"] is not None:
        normal = np.cross(base["iop"][:3], base["iop"][3:])
    for f in range(n_frames):
        p = None
        if pos and len(pos) == 3 and normal is not None:
            if offsets and len(offsets) == n_frames:
                p = np.array(pos) + offsets[f] * normal
            elif step:
                p = np.array(pos) + f * step * normal
        out.append(Slice(source=f"{path} frame {f + 1}", frame=f, position=p, **base))
    if out[0].position is None and n_frames > 1:
        for s in out:
            s.position = None
    return out



def orientation_of(slices: Sequence[Slice], label: str) -> np.ndarray | None:
    iops = [s.iop for s in slices]
    if any(i is None for i in iops):
        if all(i is None for i in iops):
            return None
        raise GeometryError(f"{label}: some images have ImageOrientationPatient and some do not")
    iop0 = iops[0]
    for s in slices[1:]:
        if np.max(np.abs(s.iop - iop0)) > ORIENTATION_TOL * 10:
            raise GeometryError(
                f"{label}: images with different orientations ({s.source}); the series is not one stack,"
                " pick another series or split it"
            )
    row, col = iop0[:3], iop0[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(np.dot(row, col)) > 1e-3:
        raise GeometryError(f"{label}: ImageOrientationPatient {list(iop0)} is not two orthogonal unit vectors")
    row = row / np.linalg.norm(row)
    col = col - np.dot(col, row) * row
    col = col / np.linalg.norm(col)
    return np.concatenate([row, col])



def stack_geometry(slices: list[Slice], label: str) -> tuple[list[Slice], np.ndarray, bool]:
    """Sort slices along the normal, check spacing and tilt; return (sorted, affine_lps, known)."""
    iop = orientation_of(slices, label)
    ps = slices[0].pixel_spacing
    if ps is not None and (ps[0] <= 0 or ps[1] <= 0):
        raise GeometryError(f"{label}: PixelSpacing {ps} is not positive")
    for s in slices[1:]:
        if (s.pixel_spacing is None) != (ps is None) or (
            ps is not None and np.max(np.abs(np.subtract(s.pixel_spacing, ps))) > 1e-4
        ):
            raise GeometryError(f"{label}: images with different PixelSpacing ({s.source})")
    row_sp, col_sp = ps if ps is not None else (1.0, 1.0)
    positions = [s.position for s in slices]
    if ps is None and iop is not None and all(p is not None for p in positions):
        raise GeometryError(f"{label}: the images have positions but no valid PixelSpacing; cannot size the voxels")
    if iop is None or any(p is None for p in positions):
        if len(slices) > 1 and iop is not None:
            raise GeometryError(
                f"{label}: some images or frames have no position (ImagePositionPatient, or for multi-frame"
                " files GridFrameOffsetVector/SpacingBetweenSlices); cannot place the slices"
            )
        if len(slices) > 1 and len({s.path for s in slices}) > 1:
            raise GeometryError(
                f"{label}: {len(slices)} images without ImagePositionPatient/ImageOrientationPatient;"
                " their order and spacing in the body are unknown"
            )
        # no patient geometry: identity grid (like SimpleITK), flagged in meta
        thick = slices[0].spacing_between or slices[0].thickness or 1.0
        aff = np.diag([col_sp, row_sp, thick if thick > 0 else 1.0, 1.0])
        return slices, aff, False
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    proj = np.array([float(np.dot(p, normal)) for p in positions])
    order = np.argsort(proj, kind="stable")
    slices = [slices[i] for i in order]
    proj = proj[order]
    pos = np.array([positions[i] for i in order])
    if len(slices) == 1:
        dz = slices[0].spacing_between or slices[0].thickness or 1.0
        dz = abs(dz) if dz else 1.0
    else:
        gaps = np.diff(proj)
        if np.min(gaps) < SPACING_ATOL_MM:
            i = int(np.argmin(gaps))
            advice = (
                "this multi-frame file holds several stacks (echoes, time points or b-values); resunet reads"
                " one stack per file: split it first (e.g. dcm2niix writes one NIfTI per stack)"
                if len({s.path for s in slices}) == 1
                else "the series holds several stacks (echoes, time points or repeats) that resunet cannot"
                " tell apart: export one stack as its own series, or convert with dcm2niix"
            )
            raise GeometryError(
                f"{label}: two images at the same position ({slices[i].source} and {slices[i + 1].source}); {advice}"
            )
        dz = float(np.median(gaps))
        bad = np.abs(gaps - dz) > max(SPACING_ATOL_MM, SPACING_RTOL * dz)
        if np.any(bad):
            i = int(np.argmax(np.abs(gaps - dz)))
            raise GeometryError(
                f"{label}: uneven slice spacing: gap of {gaps[i]:.4g} mm between {Path(slices[i].source).name} and"
                f" {Path(slices[i + 1].source).name} where the others are {dz:.4g} mm; slices are missing or"
                " the series mixes stacks; export the complete series"
            )
        # tilt: every position must lie on the line origin + t * normal
        rel = pos - pos[0]
        off = rel - np.outer(rel @ normal, normal)
        worst = float(np.max(np.linalg.norm(off, axis=1)))
        if worst > TILT_TOL_MM:
            angle = float(np.degrees(np.arctan2(np.linalg.norm(off[-1]), rel[-1] @ normal)))
            raise GeometryError(
                f"{label}: the slices are not stacked along the slice normal (gantry tilt or sheared stack,"
                f" about {angle:.2f} deg, {worst:.3g} mm off axis); resunet does not resample tilted series:"
                " correct the tilt first (e.g. `dcm2niix` writes a tilt-corrected NIfTI)"
            )
    aff = np.eye(4)
    aff[:3, 0] = row * col_sp
    aff[:3, 1] = col * row_sp
    aff[:3, 2] = normal * dz
    aff[:3, 3] = pos[0]
    return slices, aff, True
