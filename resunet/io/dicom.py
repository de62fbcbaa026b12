"""DICOM series discovery and reading (pydicom), with the geometry checked rather than assumed.

Discovery (:func:`scan_dicom_files`): every regular file under a folder is tried with
:func:`resunet.io.dicom_headers.read_header` (the header as ``pydicom.dcmread(stop_before_pixels=True,
force=False)`` gives it, parsed from one read of the file for plain little endian files, and where
the pixel data starts); files that are not DICOM are skipped and counted.
Objects that are not images (SR, RTSTRUCT, RT plan, SEG, presentation states, key object
selections, waveforms, DICOMDIR, private non-image objects, ...) and colour images (RGB/YBR/palette
screenshots and photos) are left aside and counted. Images are grouped by SeriesInstanceUID, then
split by orientation (within 1e-3), rows/columns, echo number, echo time and temporal position;
a stack whose images repeat positions is split by AcquisitionNumber when that resolves it
(acquisitions interleaved in one series); each multi-frame file is a group of its own. A SOP
Instance UID seen twice at the same position is read once (a copy); two different images sharing
one are both read, with a warning (a DICOM SEG then refuses them). A group's ``key`` is the
SeriesInstanceUID, with ``#1``, ``#2``... appended when one series splits into several groups
(most slices first, then by echo, echo time and acquisition number). The headers read are kept on
the :class:`SeriesInfo`, so reading a series parses no header twice.

Reading (:func:`read_series`; the stack geometry, slices to affine with its checks, is
:mod:`resunet.io.dicom_geometry`, this docstring its specification):

- Slices are ordered by the projection of ImagePositionPatient on the slice normal
  ``n = row_direction x column_direction`` (never by file name or InstanceNumber), ascending.
- Gaps that differ from the others (missing slices), two slices at one position, a stack direction
  not parallel to ``n`` (gantry tilt, sheared stacks) and mixed orientations raise
  :class:`~resunet.errors.GeometryError`: we refuse rather than build a wrong volume.
- Pixel data: straight from each file into one preallocated array (uncompressed little endian),
  else decoded by pydicom, in worker processes when there are many files
  (:mod:`resunet.io.dicom_pixels`).
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from resunet.errors import InputError
from resunet.io.dicom_geometry import (RAS_FROM_LPS, SPACING_ATOL_MM, Slice, enhanced_iop, float_or, floats, slices_of,
                                      stack_geometry)
from resunet.io.dicom_headers import HeaderView, UnsupportedEncoding, read_header
from resunet.io.dicom_pixels import READ_THREADS, NeedsWiderType, PixelSource, read_pixels
from resunet.io.memory import MemoryStudy
from resunet.io.volume import Volume

log = logging.getLogger(__name__)


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
        headers: the headers the scan read (pixel data not read), one per file, so that reading the
            series does not parse them again; empty when not kept (then they are read again).
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
    headers: list[_Header] = field(default_factory=list, repr=False, compare=False)

    def describe(self) -> str:
        """One line for logs and the UI picker."""
        desc = f" '{self.description}'" if self.description else ""
        return f"{self.uid} ({self.modality or '?'}{desc}, {self.n_slices} slices of {self.rows}x{self.cols})"


@dataclass
class ScanReport:
    """What a folder scan found: the image series and what was left aside, per reason.

    Attributes:
        series: the greyscale image series, most slices first.
        n_files: every regular file looked at.
        n_not_dicom: files that are not DICOM (``not_dicom_examples``: the first three).
        non_image: DICOM objects that are not images, by kind (SR, RTSTRUCT, colour images, ...).
        unreadable: DICOM files whose header cannot be read (``unreadable_reasons``: why, when known).
        duplicates: second copies of an image (same SOP Instance UID, same position) not read again.
        colour: one refusal line per colour image (RGB/YBR/palette screenshots, photos).
        uid_conflicts: pairs of files that share a SOP Instance UID but are different images.
    """

    series: list[SeriesInfo]
    n_files: int = 0
    n_not_dicom: int = 0
    non_image: dict[str, int] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    not_dicom_examples: list[str] = field(default_factory=list)
    duplicates: int = 0
    colour: list[str] = field(default_factory=list)
    unreadable_reasons: dict[str, str] = field(default_factory=dict)
    uid_conflicts: list[tuple[str, str]] = field(default_factory=list)

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

    def left_aside(self, chosen: SeriesInfo, how: str = "") -> str:
        """What was read and what was left aside and why, e.g. ``read 62 files of series X (...),
        the one with the most slices; left aside 5 of 67 files: 3 in 2 other image series (...),
        1 Structured Report (SR) (not part of an image volume), 1 not DICOM (e.g. notes.txt)``."""
        n_read = len(chosen.files)
        parts = []
        others = [s for s in self.series if s is not chosen]
        if others:
            n_other = sum(len(s.files) for s in others)
            parts.append(
                f"{n_other} in {len(others)} other image series (pick one with --series; list them with"
                " `resunet convert --list`)"
            )
        for name, n in sorted(self.non_image.items()):
            parts.append(f"{n} {name} (not part of an image volume)")
        if self.n_not_dicom:
            examples = ", ".join(Path(f).name for f in self.not_dicom_examples)
            parts.append(f"{self.n_not_dicom} not DICOM (e.g. {examples})")
        if self.unreadable:
            names = ", ".join(Path(f).name for f in self.unreadable[:3])
            parts.append(f"{len(self.unreadable)} unreadable DICOM (truncated, corrupt or unsupported encoding: {names})")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate copies of images already read (same SOP Instance UID)")
        n_aside = self.n_files - n_read
        head = f"read {n_read} file{'s' if n_read != 1 else ''} of series {chosen.describe()}"
        head += f", {how}" if how else ""
        if not parts or n_aside <= 0:
            return head + "; nothing else in the folder"
        return f"{head}; left aside {n_aside} of {self.n_files} files: " + ", ".join(parts)


def non_image_kind(ds: Dataset | HeaderView) -> str | None:
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
        if not sop.startswith("1.2.840.10008."):
            return "private (non-standard) objects without pixel data"
        modality = str(ds.get("Modality", "")) or "DICOM"
        return f"{modality} objects without pixel data"
    return None


def colour_of(ds: Dataset | HeaderView) -> str | None:
    """``'RGB, 3 samples per pixel'`` for colour images (RGB, YBR, palette), None for greyscale."""
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2")
    if spp != 1 or pi not in ("MONOCHROME1", "MONOCHROME2"):
        return f"{pi}, {spp} samples per pixel"
    return None


def colour_message(source: str, what: str) -> str:
    """The one-line refusal of a colour image."""
    return (
        f"{source}: is a colour image ({what}), not a greyscale scan;"
        " resunet reads CT/MR/PET-like greyscale series only"
    )


def _iter_files(root: Path | MemoryStudy) -> Iterable[tuple[str, bytes | None]]:
    """``(name, bytes)`` of each file under ``root``: bytes None for a file on disk (read from its
    path), the file's bytes for a :class:`~resunet.io.memory.MemoryStudy` (name = its label)."""
    if isinstance(root, MemoryStudy):
        for rel in sorted(root.files):
            yield root.label(rel), root.files[rel]
        return
    if root.is_file():
        yield str(root), None
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file():  # symlinked files are followed; symlinked folders are not (no loops)
                yield str(p), None


@dataclass
class _Header:
    """One image file's header as the scan found it, with the values grouping needs."""

    path: str
    ds: Dataset  # header only (pixel data not read)
    pixel_offset: int | None  # byte offset of the pixel data element; None: unknown (deflated)
    has_pixels: bool | None  # False: the file ends where the pixel data should start
    sop_uid: str
    series_uid: str
    description: str
    modality: str
    series_number: int | None
    rows: int
    cols: int
    n_frames: int
    iop: tuple[float, ...] | None
    position: tuple[float, ...] | None
    echo: str
    echo_time: str
    temporal: str
    acquisition: str
    data: bytes | None = None  # the whole file's bytes when it is held in memory (MemoryStudy)


def _header_of(path: str | Path) -> _Header | None:
    """Read one file's header; None for non-image objects (callers classify them with the dataset).

    Raises:
        InvalidDicomError: not DICOM; other exceptions: truncated/corrupt header.
    """
    ds, offset = read_header(path)
    return _make_header(str(path), ds, offset)


def _make_header(path: str, ds: Dataset, offset: int | None, data: bytes | None = None) -> _Header:
    hv = HeaderView(ds)
    n_frames = int(hv.get("NumberOfFrames", 1) or 1)
    iop = floats(hv.get("ImageOrientationPatient"))
    if iop is None and "SharedFunctionalGroupsSequence" in ds:
        iop = enhanced_iop(ds, 0)
    pos = floats(hv.get("ImagePositionPatient"))
    series_number = hv.get("SeriesNumber")
    echo_time = float_or(hv.get("EchoTime"), None)
    has_pixels = None
    if offset is not None:
        has_pixels = offset < (len(data) if data is not None else os.stat(path).st_size)
    return _Header(
        path=path,
        ds=ds,
        pixel_offset=offset,
        has_pixels=has_pixels,
        sop_uid=str(hv.get("SOPInstanceUID", "")) or path,
        series_uid=str(hv.get("SeriesInstanceUID", "")) or f"no-series-uid:{Path(path).parent}",
        description=str(hv.get("SeriesDescription", "") or ""),
        modality=str(hv.get("Modality", "") or ""),
        series_number=int(float(series_number)) if series_number not in (None, "") else None,
        rows=int(hv.Rows),
        cols=int(hv.Columns),
        n_frames=n_frames,
        iop=tuple(iop) if iop and len(iop) == 6 else None,
        position=tuple(pos) if pos and len(pos) == 3 else None,
        echo=str(hv.get("EchoNumbers", "") or ""),
        echo_time=f"{echo_time:.3f}" if echo_time is not None else "",
        temporal=str(hv.get("TemporalPositionIdentifier", "") or ""),
        acquisition=str(hv.get("AcquisitionNumber", "") or ""),
        data=data,
    )


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


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")


def _has_repeated_positions(headers: list[_Header]) -> bool:
    """True if two single-frame images of the stack lie at the same position along the normal."""
    if len(headers) < 2 or headers[0].iop is None or any(h.position is None or h.n_frames > 1 for h in headers):
        return False
    iop = np.array(headers[0].iop)
    normal = np.cross(iop[:3], iop[3:])
    proj = np.sort([float(np.dot(h.position, normal)) for h in headers])
    return bool(np.min(np.diff(proj)) < SPACING_ATOL_MM)


def _split_by_acquisition(headers: list[_Header]) -> list[list[_Header]]:
    """Split a stack whose images repeat positions by AcquisitionNumber, if that resolves it.

    Several acquisitions interleaved in one series (same SeriesInstanceUID, e.g. a repeat or two
    echo trains numbered as acquisitions) put two images at each position. AcquisitionNumber is
    split on only then: some scanners number every slice group of one volume as its own acquisition.
    """
    if not _has_repeated_positions(headers):
        return [headers]
    groups: dict[str, list[_Header]] = defaultdict(list)
    for h in headers:
        groups[h.acquisition].append(h)
    if len(groups) < 2 or any(_has_repeated_positions(g) for g in groups.values()):
        return [headers]  # not resolved by acquisition numbers: the reader refuses it with advice
    return [groups[a] for a in sorted(groups, key=lambda a: (_number(a), a))]


def scan_dicom_files(root: str | os.PathLike[str] | MemoryStudy) -> ScanReport:
    """Find the image series under ``root`` (a folder, searched recursively, one file, or the files
    of a :class:`~resunet.io.memory.MemoryStudy`, read from their bytes the same way).

    Returns:
        A :class:`ScanReport` whose ``series`` are sorted by number of slices, most first; each
        series keeps the headers read (``SeriesInfo.headers``).
    """
    root = root if isinstance(root, MemoryStudy) else Path(root)
    groups: dict[tuple, list[_Header]] = defaultdict(list)
    report = ScanReport(series=[])
    seen_sops: dict[str, _Header] = {}
    for path, data in _iter_files(root):
        report.n_files += 1
        try:
            ds, offset = read_header(path, data)
        except UnsupportedEncoding as err:
            report.unreadable.append(str(path))
            report.unreadable_reasons[str(path)] = str(err)
            continue
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
            hv = HeaderView(ds)
            kind = non_image_kind(hv)
            colour = colour_of(hv) if kind is None else None
        except Exception as err:  # element values are parsed lazily: a corrupt one raises here
            log.debug("%s: malformed DICOM header: %s", path, err)
            report.unreadable.append(str(path))
            continue
        if colour is not None:
            kind = "colour images (screenshots, photos: not a greyscale scan)"
            report.colour.append(colour_message(str(path), colour))
        if kind is not None:
            report.non_image[kind] = report.non_image.get(kind, 0) + 1
            continue
        try:
            h = _make_header(path, ds, offset, data)
        except Exception as err:  # malformed element values
            log.debug("%s: malformed DICOM header: %s", path, err)
            report.unreadable.append(str(path))
            continue
        first = seen_sops.get(h.sop_uid)
        if first is not None:
            if first.series_uid == h.series_uid and first.position == h.position and first.n_frames == h.n_frames:
                report.duplicates += 1  # the same image twice (copied into two folders): read it once
                continue
            # a different image under the same UID (broken anonymiser or export): both are read;
            # a DICOM SEG cannot reference them and refuses (resunet.io.seg)
            report.uid_conflicts.append((first.path, h.path))
        else:
            seen_sops[h.sop_uid] = h
        sub = (h.rows, h.cols, h.echo, h.echo_time, h.temporal, h.path if h.n_frames > 1 else "")
        groups[(h.series_uid, sub)].append(h)

    by_uid: dict[str, list[list[_Header]]] = defaultdict(list)
    for (uid, _sub), headers in groups.items():
        for stack in _split_by_orientation(headers):
            by_uid[uid].extend(_split_by_acquisition(stack))
    for uid, stacks in by_uid.items():
        stacks.sort(
            key=lambda hs: (
                -sum(h.n_frames for h in hs),
                min((_number(h.echo), _number(h.echo_time), _number(h.acquisition)) for h in hs),
                min(h.path for h in hs),
            )
        )
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
                    headers=sorted(headers, key=lambda h: h.path),
                )
            )
    report.series.sort(key=lambda s: (-s.n_slices, s.series_number or 0, s.uid))
    if report.uid_conflicts:
        a, b = report.uid_conflicts[0]
        log.warning(
            "%s: %d image(s) share a SOP Instance UID with a different image (e.g. %s and %s); both are read,"
            " but a DICOM SEG cannot reference them: the export or anonymisation broke the UIDs",
            root, len(report.uid_conflicts), Path(a).name, Path(b).name,
        )
    return report


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------


def _check_pixels(ds: Dataset, source: str) -> None:
    colour = colour_of(ds)
    if colour is not None:
        raise InputError(colour_message(source, colour))


def _output_dtype(values_min: float, values_max: float, exact_int: bool) -> np.dtype:
    if exact_int:
        for dt in (np.int16, np.uint16, np.int32):
            info = np.iinfo(dt)
            if info.min <= values_min and values_max <= info.max:
                return np.dtype(dt)
    return np.dtype(np.float32)


def _stored_range(src: PixelSource) -> tuple[int, int]:
    """The smallest and largest value ``src``'s stored bits hold (BitsStored, PixelRepresentation)."""
    bits = src.bits_stored
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if src.signed else (0, (1 << bits) - 1)


def _whole(a: np.ndarray, b: np.ndarray) -> bool:
    """True if every slope ``a`` and intercept ``b`` is a whole number (an integer rescale stays exact)."""
    return bool(np.all(a == np.round(a)) and np.all(b == np.round(b)))


def _read_type(stored: np.dtype, sources: list[PixelSource], slopes: list[float], inters: list[float]) -> np.dtype:
    """The type to read 8-bit stored values into: the integer type their rescale is known to end in.

    8-bit stored integers always end up wider (:func:`_apply_rescale` never returns 8-bit types): with
    whole slopes and intercepts, the type that holds every value the stored bits allow after the
    rescale (8-bit JPEG baseline CT, 0..255 x 8 - 1024: int16) is read into from the start, and the
    rescale works in place, instead of a second volume-sized array whose first touches cost 0.1-1.3 s
    for 1000 slices here. Anything else is read as stored.
    """
    if stored.itemsize != 1 or not np.issubdtype(stored, np.integer):
        return stored
    a = np.asarray(slopes, dtype=np.float64)
    b = np.asarray(inters, dtype=np.float64)
    if not _whole(a, b):
        return stored
    ranges = [_stored_range(src) for src in sources]
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    ends = np.concatenate([a * lo + b, a * hi + b])
    wide = _output_dtype(float(ends.min()), float(ends.max()), True)
    return wide if np.issubdtype(wide, np.integer) else stored


def read_slices(slices: list[Slice], label: str) -> tuple[np.ndarray, np.ndarray, list[Slice], bool]:
    """Read and stack slices; returns (array (I,J,K), affine RAS, sorted slices, geometry_known).

    Geometry is checked first (no pixel is read for a refused series); then every file's pixel
    data goes straight into one preallocated ``(K, rows, cols)`` array of the stored type
    (:mod:`resunet.io.dicom_pixels`), MONOCHROME1 is inverted and the rescale applied in place.
    """
    if not slices:
        raise InputError(f"{label}: no images to read")
    for s in slices:
        _check_pixels(s.ds, s.source)
    slices, aff_lps, known = stack_geometry(slices, label)
    rows, cols = int(slices[0].ds.Rows), int(slices[0].ds.Columns)
    # one pixel source per distinct file; plane_of[n][f] = slice k of frame f of file n
    index: dict[str, int] = {}
    sources: list[PixelSource] = []
    plane_of: list[list[int]] = []
    for k, s in enumerate(slices):
        n = index.get(s.path)
        if n is None:
            n = index[s.path] = len(sources)
            src = _pixel_source(s)
            if (src.rows, src.cols) != (rows, cols):
                raise InputError(f"{s.source}: image size {(src.rows, src.cols)} differs from {(rows, cols)} of the series")
            sources.append(src)
            plane_of.append([-1] * src.n_frames)
        f = s.frame or 0
        if not 0 <= f < len(plane_of[n]):
            raise InputError(f"{s.source}: frame {f + 1} is not in the file ({len(plane_of[n])} frames)")
        plane_of[n][f] = k
    slopes, inters = [float(s.slope) for s in slices], [float(s.intercept) for s in slices]
    stored = _read_type(np.result_type(*{src.dtype for src in sources}), sources, slopes, inters)
    while True:
        raw = np.empty((len(slices), rows, cols), dtype=stored)
        try:
            read_pixels(sources, raw, plane_of)
            break
        except NeedsWiderType as err:  # a decoder returned a wider type than the header says
            if err.dtype == stored:
                raise InputError(f"{label}: pixel values of an unexpected type ({err.dtype})") from None
            stored = err.dtype
    for n, src in enumerate(sources):  # MONOCHROME1: invert over the stored range
        s0 = slices[next(k for k in plane_of[n] if k >= 0)]
        if str(s0.ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            lo, hi = _stored_range(src)
            for k in plane_of[n]:
                if k >= 0:
                    raw[k] = (lo + hi) - raw[k].astype(np.int64)
    data = _apply_rescale(raw, slopes, inters)
    # (cols=i, rows=j, slices=k): a transposed view, Fortran-contiguous, the layout NIfTI stores
    array = data.transpose(2, 1, 0)
    return array, RAS_FROM_LPS @ aff_lps, slices, known


def _pixel_source(s: Slice) -> PixelSource:
    h, ds = s.header, s.ds
    implicit, little = ds.ds.original_encoding if isinstance(ds, HeaderView) else ds.original_encoding
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    bits_allocated = int(ds.get("BitsAllocated", 16) or 16)
    return PixelSource(
        path=s.path,
        source=s.path,
        offset=h.pixel_offset if h is not None and h.has_pixels else None,
        transfer_syntax=ts,
        little_endian=bool(little) if little is not None else True,
        implicit_vr=bool(implicit) if implicit is not None else True,
        n_frames=int(ds.get("NumberOfFrames", 1) or 1),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        bits_allocated=bits_allocated,
        bits_stored=int(ds.get("BitsStored", bits_allocated) or bits_allocated),
        signed=int(ds.get("PixelRepresentation", 0) or 0) == 1,
        float_data="FloatPixelData" in ds or "DoubleFloatPixelData" in ds,
        data=h.data if h is not None else None,
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2"),
    )


def _wrap(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Integers cast to ``dtype`` modulo its width (``astype`` wraps)."""
    return np.asarray(values, dtype=np.int64).astype(dtype)


def _apply_rescale(raw: np.ndarray, slopes: list[float], inters: list[float]) -> np.ndarray:
    """``raw * slope + intercept`` per slice ``k`` (axis 0), in the smallest exact type.

    Integer data with whole slopes and intercepts stay integers (int16, uint16 or int32, the
    smallest holding every value; CT HU stay exact), computed in place modulo the type's width,
    which is exact because every result fits. Otherwise float32, computed in float64 per slice.
    """
    n = raw.shape[0]
    a = np.asarray(slopes, dtype=np.float64)
    b = np.asarray(inters, dtype=np.float64)
    integer = np.issubdtype(raw.dtype, np.integer)
    exact = integer and _whole(a, b)
    identity = bool(np.all(a == 1.0) and np.all(b == 0.0))
    step = 16  # slices per chunk: a chunk's pass stays in cache, float64 temporaries stay small
    starts = range(0, n, step)
    if exact:
        flat = raw.reshape(n, -1)
        mins = np.empty(n, dtype=np.float64)
        maxs = np.empty(n, dtype=np.float64)

        def ends_of(k0: int) -> None:  # min then max of the same chunk, while it is in cache
            mins[k0: k0 + step] = flat[k0: k0 + step].min(axis=1)
            maxs[k0: k0 + step] = flat[k0: k0 + step].max(axis=1)

        _in_threads(ends_of, starts)
        ends = np.concatenate([mins * a + b, maxs * a + b])
        dtype = _output_dtype(float(ends.min()), float(ends.max()), True)
    else:
        dtype = np.dtype(np.float32)
    if exact and dtype != np.float32:
        if identity and raw.dtype == dtype:
            return raw
        # exact: every stored value fits (checked above). A wider type (8-bit JPEG baseline stored
        # values to int16 HU) is a new array: each thread converts its chunks, so the first touches
        # of its pages fault in parallel (one thread's astype of 1000 slices took 0.8-1.3 s here)
        data = raw if raw.dtype == dtype else np.empty(raw.shape, dtype=dtype)
        same = bool(np.all(a == a[0]) and np.all(b == b[0]))
        wa, wb = _wrap(a, dtype), _wrap(b, dtype)

        def rescale(k0: int) -> None:
            part = data[k0: k0 + step]
            if data is not raw:
                part[...] = raw[k0: k0 + step]
            if identity:
                return
            if same:
                if a[0] != 1:
                    np.multiply(part, wa[0], out=part)
                if b[0] != 0:
                    np.add(part, wb[0], out=part)
            else:
                np.multiply(part, wa[k0: k0 + step, None, None], out=part)
                np.add(part, wb[k0: k0 + step, None, None], out=part)

        _in_threads(rescale, starts)
        return data
    data = np.empty(raw.shape, dtype=np.float32)

    def convert(k0: int) -> None:
        chunk = raw[k0: k0 + step].astype(np.float64)
        chunk *= a[k0: k0 + step, None, None]
        chunk += b[k0: k0 + step, None, None]
        data[k0: k0 + step] = chunk

    _in_threads(convert, starts)  # first touches of ``data`` fault its pages in parallel too
    return data


def _in_threads(fn: Callable[[int], None], starts: range) -> None:
    """``fn(k0)`` for each chunk start, in READ_THREADS threads: numpy releases the GIL in these
    passes, so a 1000-slice CT's range check and rescale (0.12 s in one thread) use both cores."""
    if len(starts) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(starts))) as pool:
            list(pool.map(fn, starts))
    elif starts:
        fn(starts[0])


def read_series(info: SeriesInfo, source: str | None = None) -> Volume:
    """Read one image series (or multi-frame file) found by :func:`scan_dicom_files` into a Volume.

    Uses the headers the scan kept (``info.headers``), else reads them again.

    Returns:
        Volume, ``array`` shape ``(Columns, Rows, Slices)`` (see module docstring), ``affine``
        voxel -> RAS mm; ``meta``: ``source``, ``format="dicom"``, ``modality``, ``series_uid``
        (SeriesInstanceUID), ``series_key`` (``info.uid``), ``series_description``,
        ``dicom_files`` (one per slice ``k``; a multi-frame file repeats), ``frames`` (frame
        index per slice, None for single-frame files), ``geometry`` (``"patient"`` or ``"unknown"``);
        for Philips files with private scale factors ``philips_scale_slope``/``philips_scale_intercept``.

    Raises:
        InputError: unreadable/undecodable files, colour images.
        GeometryError: missing slices, tilt, mixed orientations (see module docstring).
    """
    label = f"{source or Path(info.files[0]).parent} series {info.uid}"
    headers = list(info.headers)
    if len(headers) != len(info.files):
        headers = []
        for f in info.files:
            try:
                headers.append(_header_of(f))
            except UnsupportedEncoding as err:
                raise InputError(str(err)) from None
            except InvalidDicomError:
                raise InputError(f"{f}: not a DICOM file") from None
            except Exception as err:
                raise InputError(f"{f}: unreadable DICOM file ({type(err).__name__}); the file may be truncated") from None
    slices: list[Slice] = []
    for h in headers:
        if h.has_pixels is False:
            raise InputError(f"{h.path}: the DICOM file ends early (no pixel data); it is truncated, copy it again")
        try:
            slices.extend(slices_of(h.path, HeaderView(h.ds), h))
        except Exception as err:  # noqa: BLE001 - pydicom parses values lazily; any of them can be corrupt
            raise InputError(f"{h.path}: malformed DICOM attributes ({type(err).__name__}: {err})") from None
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
    philips = {s.philips for s in slices if s.philips is not None}
    if philips:
        ss, si = sorted(philips)[0]
        meta["philips_scale_slope"], meta["philips_scale_intercept"] = ss, si
        log.info(
            "%s: Philips private scale slope %g (intercept %g) found; the values are the display values"
            " (RescaleSlope/Intercept, as the scanner's viewer and SimpleITK show them); the floating-point"
            " values (dcm2niix's default) are value / (RescaleSlope * %g)",
            label, ss, si, ss,
        )
    return Volume(array=array, affine=affine, meta=meta)
