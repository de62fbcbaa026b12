"""DICOM series discovery and reading (pydicom), with the geometry checked rather than assumed.

Discovery (:func:`scan_dicom_files`): every regular file under a folder is tried with
``pydicom.dcmread(stop_before_pixels=True, force=False)``; files that are not DICOM are skipped and
counted. Objects that are not images (SR, RTSTRUCT, RT plan, SEG, presentation states, key object
selections, waveforms, DICOMDIR, ...) are skipped and counted. Images are grouped by
SeriesInstanceUID, then split by orientation (within 1e-3), rows/columns, echo number and temporal
position; each multi-frame file is a group of its own; a SOP Instance UID seen twice is read once. A group's ``key`` is the SeriesInstanceUID, with
``#2``, ``#3``... appended when one series splits into several groups.

Reading (:func:`read_series`):

- Slices are ordered by the projection of ImagePositionPatient on the slice normal
  ``n = row_direction x column_direction`` (never by file name or InstanceNumber), ascending.
- Gaps that differ from the others (missing slices), two slices at one position, a stack direction
  not parallel to ``n`` (gantry tilt, sheared stacks) and mixed orientations raise
  :class:`~resunet.errors.GeometryError`: we refuse rather than build a wrong volume.
- Pixel values: MONOCHROME1 is inverted over the stored range (``min_stored + max_stored - v``, so
  that bright means dense/high signal as in MONOCHROME2), then RescaleSlope/Intercept is applied.
  The output stays an integer array (int16, uint16 or int32: the smallest that holds the values)
  when every slope and intercept is a whole number, so CT HU are exact; otherwise float32.
- Colour images (RGB, YBR, palette) are refused: a scan volume is greyscale.
- Voxel order: ``array[i, j, k]`` = pixel (row ``j``, column ``i``) of slice ``k``, i.e. each slice's
  ``pixel_array.T``; shape ``(Columns, Rows, Slices)``. ``i`` runs along the first
  ImageOrientationPatient vector, ``j`` along the second, ``k`` along ``+n``. This is what
  nibabel/dcm2niix store before any flipping and the same grid SimpleITK builds (its numpy array
  is the transpose, ``(k, j, i)``).
- Affine: LPS from DICOM, converted to RAS (x and y negated): ``affine = diag(-1,-1,1,1) @ A_lps``.
- Enhanced multi-frame (CT/MR/PET): per-frame PlanePositionSequence and Plane Orientation / Pixel
  Measures / Pixel Value Transformation from the per-frame or shared functional groups.
- Classic multi-frame (RT dose, ...): frame ``f`` is at ``IPP + GridFrameOffsetVector[f] * n`` if
  present, else ``IPP + f * SpacingBetweenSlices (or SliceThickness) * n``.
- Images without patient geometry (no ImagePositionPatient/ImageOrientationPatient: secondary
  captures, ultrasound, plain radiographs) are read on an identity LPS grid with PixelSpacing (or
  ImagerPixelSpacing, else 1 mm) and ``meta["geometry"] = "unknown"``, with a warning; SimpleITK
  does the same.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from resunet.errors import GeometryError, InputError
from resunet.io.volume import Volume

log = logging.getLogger(__name__)

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: SOP classes that are never image volumes even if they carry pixel data or Rows/Columns.
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.1.3.10": "Media Storage Directory (DICOMDIR)",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation (SEG)",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection",
    "1.2.840.10008.5.1.4.1.1.66.1": "Spatial Registration",
    "1.2.840.10008.5.1.4.1.1.66.3": "Deformable Spatial Registration",
}
_NON_IMAGE_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "Structured Report (SR)",
    "1.2.840.10008.5.1.4.1.1.9.": "Waveform",
    "1.2.840.10008.5.1.4.1.1.11.": "Presentation State",
}

#: Tolerances for geometry checks. Positions in DICOM are decimal strings with a few decimals;
#: 1e-2 mm absolute / 1 % relative accepts scanner rounding but no missing slice or real tilt.
SPACING_RTOL = 0.01
SPACING_ATOL_MM = 0.01
TILT_TOL_MM = 0.01
ORIENTATION_TOL = 1e-4


@dataclass
class SeriesInfo:
    """One readable image series (or one multi-frame file), for listing and picking.

    Attributes:
        uid: the key to pass as ``series_uid`` (SeriesInstanceUID, ``#n`` appended when one series
            splits into several stacks).
        description: SeriesDescription ('' if absent).
        modality: Modality ('' if absent).
        n_slices: number of slices (frames for multi-frame files).
        rows, cols: image size in pixels.
        files: the files of the series (unsorted).
        series_instance_uid: the DICOM SeriesInstanceUID itself.
        series_number: SeriesNumber or None.
    """

    uid: str
    description: str
    modality: str
    n_slices: int
    rows: int
    cols: int
    files: list[str] = field(default_factory=list)
    series_instance_uid: str = ""
    series_number: int | None = None

    def describe(self) -> str:
        """One line for logs and the UI picker."""
        desc = f" '{self.description}'" if self.description else ""
        return f"{self.uid} ({self.modality or '?'}{desc}, {self.n_slices} slices of {self.rows}x{self.cols})"


@dataclass
class ScanReport:
    """What a folder scan found: the image series and the counts of what was skipped."""

    series: list[SeriesInfo]
    n_files: int = 0
    n_not_dicom: int = 0
    non_image: dict[str, int] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    not_dicom_examples: list[str] = field(default_factory=list)
    duplicates: int = 0

    def summary(self) -> str:
        """One line: counts of files, series, non-DICOM files and non-image objects."""
        parts = [f"{self.n_files} files", f"{len(self.series)} image series"]
        if self.n_not_dicom:
            parts.append(f"{self.n_not_dicom} not DICOM")
        for name, n in sorted(self.non_image.items()):
            parts.append(f"{n} {name}")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable DICOM")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate images (same SOP Instance UID) skipped")
        return ", ".join(parts)


def non_image_kind(ds: Dataset) -> str | None:
    """A name for the object's kind if it is not an image (SR, RTSTRUCT, SEG...), else None."""
    sop = str(ds.get("SOPClassUID", "") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
    if sop in NON_IMAGE_SOP_CLASSES:
        return NON_IMAGE_SOP_CLASSES[sop]
    for prefix, name in _NON_IMAGE_PREFIXES.items():
        if sop.startswith(prefix):
            return name
    if "Rows" not in ds or "Columns" not in ds:
        name = pydicom.uid.UID(sop).name if sop else ""
        if "Image Storage" in str(name):
            return "truncated or empty images (no pixel data)"
        modality = str(ds.get("Modality", "")) or "DICOM"
        return f"{modality} objects without pixel data"
    return None


def _iter_files(root: Path) -> Iterable[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file():  # symlinked files are followed; symlinked folders are not (no loops)
                yield p


@dataclass
class _Header:
    path: str
    sop_uid: str
    series_uid: str
    description: str
    modality: str
    series_number: int | None
    rows: int
    cols: int
    n_frames: int
    iop: tuple[float, ...] | None
    echo: str
    temporal: str


def _floats(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


def _dcmread(path: str | Path, stop_before_pixels: bool) -> Dataset:
    """Read a DICOM file; files without the 128-byte preamble/'DICM' (old ACR-NEMA style, no file
    meta) are accepted only if a forced read finds a SOP class and a series or study UID, so random
    bytes stay refused."""
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels, force=False)
    except InvalidDicomError:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels, force=True)
            ok = "SOPClassUID" in ds and ("SeriesInstanceUID" in ds or "StudyInstanceUID" in ds)
        except Exception:
            ok = False
        if not ok:
            raise InvalidDicomError(f"{path}: not a DICOM file") from None
        return ds


def _read_header(path: Path) -> Dataset:
    return _dcmread(path, stop_before_pixels=True)


def _split_by_orientation(headers: list[_Header]) -> list[list[_Header]]:
    """Cluster headers whose ImageOrientationPatient agree within 1e-3 (tolerance, not rounding,
    so scanner noise around a rounding boundary never splits one stack)."""
    clusters: list[tuple[tuple[float, ...] | None, list[_Header]]] = []
    for h in headers:
        for ref, members in clusters:
            if (ref is None and h.iop is None) or (
                ref is not None and h.iop is not None and max(abs(a - b) for a, b in zip(ref, h.iop)) <= 1e-3
            ):
                members.append(h)
                break
        else:
            clusters.append((h.iop, [h]))
    return [members for _, members in clusters]


def scan_dicom_files(root: str | os.PathLike[str]) -> ScanReport:
    """Find the image series under ``root`` (a folder, searched recursively, or one file).

    Returns:
        A :class:`ScanReport` whose ``series`` are sorted by number of slices, most first.
    """
    root = Path(root)
    groups: dict[tuple, list[_Header]] = defaultdict(list)
    report = ScanReport(series=[])
    seen_sops: set[str] = set()
    for path in _iter_files(root):
        report.n_files += 1
        try:
            ds = _read_header(path)
        except InvalidDicomError:
            report.n_not_dicom += 1
            if len(report.not_dicom_examples) < 3:
                report.not_dicom_examples.append(str(path))
            continue
        except Exception as err:  # truncated or corrupt DICOM: pydicom raises many kinds
            log.debug("%s: unreadable DICOM header: %s", path, err)
            report.unreadable.append(str(path))
            continue
        try:
            kind = non_image_kind(ds)
        except Exception as err:  # element values are parsed lazily: a corrupt one raises here
            log.debug("%s: malformed DICOM header: %s", path, err)
            report.unreadable.append(str(path))
            continue
        if kind is not None:
            report.non_image[kind] = report.non_image.get(kind, 0) + 1
            continue
        try:
            n_frames = int(ds.get("NumberOfFrames", 1) or 1)
            iop = _floats(ds.get("ImageOrientationPatient"))
            if iop is None and "SharedFunctionalGroupsSequence" in ds:
                iop = _enhanced_iop(ds, 0)
            h = _Header(
                path=str(path),
                sop_uid=str(ds.get("SOPInstanceUID", "")) or str(path),
                series_uid=str(ds.get("SeriesInstanceUID", "")) or f"no-series-uid:{path.parent}",
                description=str(ds.get("SeriesDescription", "") or ""),
                modality=str(ds.get("Modality", "") or ""),
                series_number=int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
                rows=int(ds.Rows),
                cols=int(ds.Columns),
                n_frames=n_frames,
                iop=tuple(iop) if iop and len(iop) == 6 else None,
                echo=str(ds.get("EchoNumbers", "") or ""),
                temporal=str(ds.get("TemporalPositionIdentifier", "") or ""),
            )
        except Exception as err:  # malformed element values
            log.debug("%s: malformed DICOM header: %s", path, err)
            report.unreadable.append(str(path))
            continue
        if h.sop_uid in seen_sops:  # the same image twice (copied into two folders): read it once
            report.duplicates += 1
            continue
        seen_sops.add(h.sop_uid)
        sub = (h.rows, h.cols, h.echo, h.temporal, h.path if n_frames > 1 else "")
        groups[(h.series_uid, sub)].append(h)

    by_uid: dict[str, list[list[_Header]]] = defaultdict(list)
    for (uid, _sub), headers in groups.items():
        by_uid[uid].extend(_split_by_orientation(headers))
    for uid, stacks in by_uid.items():
        stacks.sort(key=lambda hs: (-sum(h.n_frames for h in hs), hs[0].path))
        for n, headers in enumerate(stacks, start=1):
            h0 = headers[0]
            report.series.append(
                SeriesInfo(
                    uid=uid if len(stacks) == 1 else f"{uid}#{n}",
                    description=h0.description,
                    modality=h0.modality,
                    n_slices=sum(h.n_frames for h in headers),
                    rows=h0.rows,
                    cols=h0.cols,
                    files=sorted(h.path for h in headers),
                    series_instance_uid=uid,
                    series_number=h0.series_number,
                )
            )
    report.series.sort(key=lambda s: (-s.n_slices, s.series_number or 0, s.uid))
    return report


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------


def _first(seq_owner: Dataset | None, seq: str, attr: str) -> Any:
    if seq_owner is None or seq not in seq_owner or len(seq_owner[seq].value) == 0:
        return None
    return seq_owner[seq].value[0].get(attr)


def _frame_group(ds: Dataset, frame: int, seq: str, attr: str) -> Any:
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


def _enhanced_iop(ds: Dataset, frame: int) -> tuple[float, ...] | None:
    return _floats(_frame_group(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"))


@dataclass
class _Slice:
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


def _float_or(value: Any, default: float | None) -> float | None:
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _slices_of(path: str, ds: Dataset) -> list[_Slice]:
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    slope = _float_or(ds.get("RescaleSlope"), 1.0) or 1.0
    inter = _float_or(ds.get("RescaleIntercept"), 0.0) or 0.0
    if str(ds.get("Modality", "")) == "RTDOSE" and ds.get("DoseGridScaling") not in (None, ""):
        slope = _float_or(ds.get("DoseGridScaling"), 1.0) or 1.0  # dose in Gy (or the DoseUnits)
    ps = _floats(ds.get("PixelSpacing")) or _floats(ds.get("ImagerPixelSpacing"))
    if ps is not None and (len(ps) != 2 or min(ps) <= 0):
        ps = None  # "0\\0" in some radiographs: treated as absent
    thickness = _float_or(ds.get("SliceThickness"), None)
    between = _float_or(ds.get("SpacingBetweenSlices"), None)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        out = []
        for f in range(n_frames):
            pos = _floats(_frame_group(ds, f, "PlanePositionSequence", "ImagePositionPatient"))
            iop = _enhanced_iop(ds, f)
            fps = _floats(_frame_group(ds, f, "PixelMeasuresSequence", "PixelSpacing")) or ps
            fth = _float_or(_frame_group(ds, f, "PixelMeasuresSequence", "SliceThickness"), thickness)
            fsb = _float_or(_frame_group(ds, f, "PixelMeasuresSequence", "SpacingBetweenSlices"), between)
            fsl = _float_or(_frame_group(ds, f, "PixelValueTransformationSequence", "RescaleSlope"), slope)
            fin = _float_or(_frame_group(ds, f, "PixelValueTransformationSequence", "RescaleIntercept"), inter)
            out.append(
                _Slice(
                    source=f"{path} frame {f + 1}",
                    path=path,
                    ds=ds,
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
    pos = _floats(ds.get("ImagePositionPatient"))
    iop = _floats(ds.get("ImageOrientationPatient"))
    base = dict(
        path=path,
        ds=ds,
        iop=np.array(iop) if iop and len(iop) == 6 else None,
        pixel_spacing=(ps[0], ps[1]) if ps and len(ps) == 2 else None,
        thickness=thickness,
        spacing_between=between,
        slope=slope,
        intercept=inter,
    )
    if n_frames == 1:
        return [_Slice(source=path, frame=None, position=np.array(pos) if pos and len(pos) == 3 else None, **base)]
    # classic multi-frame: frames stacked along the normal
    offsets = _floats(ds.get("GridFrameOffsetVector"))
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
        out.append(_Slice(source=f"{path} frame {f + 1}", frame=f, position=p, **base))
    if out[0].position is None and n_frames > 1:
        for s in out:
            s.position = None
    return out


def _check_pixels(ds: Dataset, source: str) -> None:
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if spp != 1 or pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(
            f"{source}: is a colour image ({pi}, {spp} samples per pixel), not a greyscale scan;"
            " resunet reads CT/MR/PET-like greyscale series only"
        )


def _decode(ds: Dataset, source: str) -> np.ndarray:
    """All frames of ``ds`` as an array ``(frames, rows, cols)`` of stored values."""
    try:
        arr = ds.pixel_array
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as err:  # noqa: BLE001 - decoder missing, truncated or corrupt stream; the
        # Rust RLE decoder (pyo3) raises PanicException, a BaseException, on corrupt data
        ts = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
        name = getattr(ts, "name", str(ts))
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        msg = " / ".join(lines)[:400] if lines else type(err).__name__
        raise InputError(
            f"{source}: the pixel data cannot be decoded (transfer syntax {name}): {msg};"
            " the file may be truncated, or re-export it uncompressed"
        ) from None
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if arr.ndim != 3 or arr.shape[0] != n_frames:
        raise InputError(f"{source}: pixel data has shape {arr.shape}, expected {n_frames} greyscale frames")
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
        if int(ds.get("PixelRepresentation", 0)) == 1:
            lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        else:
            lo, hi = 0, (1 << bits) - 1
        arr = (lo + hi) - arr.astype(np.int64)
    return arr


def _output_dtype(values_min: float, values_max: float, exact_int: bool) -> np.dtype:
    if exact_int:
        for dt in (np.int16, np.uint16, np.int32):
            info = np.iinfo(dt)
            if info.min <= values_min and values_max <= info.max:
                return np.dtype(dt)
    return np.dtype(np.float32)


def _orientation_of(slices: Sequence[_Slice], label: str) -> np.ndarray | None:
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


def _stack_geometry(slices: list[_Slice], label: str) -> tuple[list[_Slice], np.ndarray, bool]:
    """Sort slices along the normal, check spacing and tilt; return (sorted, affine_lps, known)."""
    iop = _orientation_of(slices, label)
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


def read_slices(slices: list[_Slice], label: str) -> tuple[np.ndarray, np.ndarray, list[_Slice], bool]:
    """Decode and stack slices; returns (array (I,J,K), affine RAS, sorted slices, geometry_known)."""
    if not slices:
        raise InputError(f"{label}: no images to read")
    for s in slices:
        _check_pixels(s.ds, s.source)
    slices, aff_lps, known = _stack_geometry(slices, label)
    rows, cols = int(slices[0].ds.Rows), int(slices[0].ds.Columns)
    decoded: dict[int, np.ndarray] = {}
    planes = []
    for s in slices:
        key = id(s.ds)
        if key not in decoded:
            decoded[key] = _decode(s.ds, s.path)
        plane = decoded[key][s.frame or 0]
        if plane.shape != (rows, cols):
            raise InputError(f"{s.source}: image size {plane.shape} differs from {(rows, cols)} of the series")
        planes.append(plane)
    decoded.clear()
    slopes = [float(s.slope) for s in slices]
    inters = [float(s.intercept) for s in slices]
    integer = all(np.issubdtype(p.dtype, np.integer) for p in planes)
    exact = integer and all(v == round(v) for v in slopes + inters)
    identity = all(v == 1.0 for v in slopes) and all(v == 0.0 for v in inters)
    if exact:
        lo, hi = np.inf, -np.inf
        for plane, a, b in zip(planes, slopes, inters):
            ends = (float(plane.min()) * a + b, float(plane.max()) * a + b)
            lo, hi = min(lo, *ends), max(hi, *ends)
        dtype = _output_dtype(lo, hi, True)
    else:
        dtype = np.dtype(np.float32)
    # Filled slice by slice into (K, rows, cols): one pass, no full-size temporaries.
    data = np.empty((len(planes), rows, cols), dtype=dtype)
    for k, (plane, a, b) in enumerate(zip(planes, slopes, inters)):
        if identity:
            data[k] = plane
        elif exact:
            data[k] = plane.astype(np.int64) * int(a) + int(b)
        else:
            data[k] = plane.astype(np.float64) * a + b
    planes.clear()
    # (cols=i, rows=j, slices=k): a transposed view, Fortran-contiguous, the layout NIfTI stores
    array = data.transpose(2, 1, 0)
    return array, RAS_FROM_LPS @ aff_lps, slices, known


def read_series(info: SeriesInfo, source: str | None = None) -> Volume:
    """Read one image series (or multi-frame file) found by :func:`scan_dicom_files` into a Volume.

    Returns:
        Volume, ``array`` shape ``(Columns, Rows, Slices)`` (see module docstring), ``affine``
        voxel -> RAS mm; ``meta``: ``source``, ``format="dicom"``, ``modality``, ``series_uid``
        (SeriesInstanceUID), ``series_key`` (``info.uid``), ``series_description``,
        ``dicom_files`` (one per slice ``k``; a multi-frame file repeats), ``frames`` (frame
        index per slice, None for single-frame files), ``geometry`` (``"patient"`` or ``"unknown"``).

    Raises:
        InputError: unreadable/undecodable files, colour images.
        GeometryError: missing slices, tilt, mixed orientations (see module docstring).
    """
    label = f"{source or Path(info.files[0]).parent} series {info.uid}"
    slices: list[_Slice] = []
    for f in info.files:
        try:
            ds = _dcmread(f, stop_before_pixels=False)
        except InvalidDicomError:
            raise InputError(f"{f}: not a DICOM file") from None
        except Exception as err:
            raise InputError(f"{f}: unreadable DICOM file ({type(err).__name__}); the file may be truncated") from None
        if "Rows" not in ds or "Columns" not in ds or "PixelData" not in ds and "FloatPixelData" not in ds:
            raise InputError(f"{f}: the DICOM file ends early (no pixel data); it is truncated, copy it again")
        try:
            slices.extend(_slices_of(f, ds))
        except Exception as err:  # noqa: BLE001 - pydicom parses values lazily; any of them can be corrupt
            raise InputError(f"{f}: malformed DICOM attributes ({type(err).__name__}: {err})") from None
    try:
        array, affine, slices, known = read_slices(slices, label)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, NotImplementedError, OverflowError) as err:
        # pydicom raises these on malformed element values; name the series, never a traceback
        raise InputError(f"{label}: malformed DICOM attributes ({type(err).__name__}: {err})") from None
    if not known:
        log.warning("%s: no patient position/orientation in the files; using an identity grid", label)
    ds0 = slices[0].ds
    meta = {
        "source": str(source or Path(info.files[0]).parent),
        "format": "dicom",
        "modality": str(ds0.get("Modality", "") or info.modality),
        "series_uid": info.series_instance_uid or info.uid,
        "series_key": info.uid,
        "series_description": info.description,
        "study_uid": str(ds0.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(ds0.get("FrameOfReferenceUID", "")),
        "dicom_files": [s.path for s in slices],
        "frames": [s.frame for s in slices],
        "geometry": "patient" if known else "unknown",
    }
    return Volume(array=array, affine=affine, meta=meta)
