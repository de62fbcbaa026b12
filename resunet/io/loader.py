"""The single entry point for reading a study: NIfTI file, DICOM folder, .zip, or one DICOM file.

``load_study(path)`` decides by what ``path`` is:

- a file ending in ``.nii``/``.nii.gz`` -> :func:`resunet.io.nifti.read_nifti`;
- a file ending in ``.zip`` -> extracted safely into a private temp folder (removed afterwards),
  then read as a DICOM folder;
- a folder -> every file under it (any names, nested) scanned as DICOM;
- a file named ``DICOMDIR`` -> its folder (as on CDs);
- any other file -> read as one DICOM file (single- or multi-frame);
- a :class:`resunet.io.memory.MemoryStudy` (DICOM files held in memory, e.g. pulled with WADO-RS)
  -> read exactly as the folder holding those files would be, from their bytes.

When several image series are found the one with the most slices is read (or the one named by
``series_uid``) and the choice is logged with the others found.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from resunet.errors import InputError
from resunet.io.archive import extract_zip
from resunet.io.limits import Limits
from resunet.io.memory import MemoryStudy
from resunet.io.dicom import ScanReport, SeriesInfo, read_series, scan_dicom_files
from resunet.io.nifti import is_nifti_path, read_nifti
from resunet.io.volume import Volume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyRoute:
    """How a study path is read (:func:`route_study`): ``kind`` ``nifti`` | ``zip`` | ``dicom``, and the
    ``path`` to read (a DICOMDIR's folder for ``dicomdir``)."""

    kind: str
    path: Path
    dicomdir: bool = False


def route_study(path: str | os.PathLike[str], series_uid: str | None = None) -> StudyRoute:
    """What ``path`` is, as :func:`load_study` reads it and :func:`resunet.io.precheck.check_study`
    checks it (the module docstring's rules); InputError when it does not exist, or when a series is
    asked of a NIfTI file."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_file() and is_nifti_path(p):
        if series_uid:
            raise InputError(f"{p}: --series applies to DICOM input, not to a NIfTI file")
        return StudyRoute("nifti", p)
    if p.is_file() and (p.name.lower().endswith(".zip") or looks_like_zip(p)):
        return StudyRoute("zip", p)
    if p.is_file() and p.name.upper() == "DICOMDIR":  # CDs and exports: the images are beside the index
        return StudyRoute("dicom", p.parent, dicomdir=True)
    return StudyRoute("dicom", p)


def find_series(path: Path) -> ScanReport:
    """The DICOM headers under ``path`` (:func:`resunet.io.dicom.scan_dicom_files`); InputError saying
    why when there is no image series."""
    report = scan_dicom_files(path)
    if not report.series:
        raise InputError(_nothing_found(path, report))
    return report


def zip_contents(folder: Path, zip_path: Path, series_uid: str | None) -> tuple[ScanReport, Path | None]:
    """An extracted zip's DICOM headers, and its one NIfTI file when it holds no image series (and no
    series is asked for: a zipped NIfTI, common for web uploads); InputError when it holds neither."""
    report = scan_dicom_files(folder)
    if not report.series:
        niftis = sorted(f for f in folder.rglob("*") if f.is_file() and is_nifti_path(f))
        if len(niftis) == 1 and not series_uid:
            return report, niftis[0]
        raise InputError(_nothing_found(zip_path, report, folder))
    return report, None


def _nothing_found(path: Path, report: ScanReport, contents: Path | None = None) -> str:
    """One line saying why no image series was found under ``path`` (``contents``: extracted zip)."""
    what = "zip" if contents is not None else ("file" if path.is_file() else "folder")
    where = contents if contents is not None else path
    if report.n_files == 0:
        return f"{path}: the {what} is empty; expected DICOM image files, a .zip of them, or a .nii/.nii.gz file"
    if report.unreadable and not report.non_image and not report.n_not_dicom:
        first = report.unreadable[0]
        if first in report.unreadable_reasons:
            return report.unreadable_reasons[first]
        return f"{first}: unreadable DICOM file (truncated or corrupt); {report.summary()}"
    if report.colour and sum(report.non_image.values()) == len(report.colour):
        extra = f" ({report.summary()})" if report.n_files > 1 else ""
        return report.colour[0] + extra
    if report.non_image:
        kinds = ", ".join(sorted(report.non_image))
        return f"{path}: no image series, only {kinds} ({report.summary()}); point to the images of the study"
    if contents is None and path.is_file():
        return f"{path}: not a DICOM file and not .nii/.nii.gz or .zip; expected a scan"
    niftis = sorted(p.name for p in where.rglob("*") if p.is_file() and is_nifti_path(p))
    if niftis:
        return (
            f"{path}: no DICOM images here, but NIfTI files ({', '.join(niftis[:3])}); pass one .nii/.nii.gz"
            " file itself"
        )
    return f"{path}: no DICOM images found ({report.summary()}); expected DICOM image files, a .zip, or NIfTI"


def choose_series(series: list[SeriesInfo], path: Path, series_uid: str | None) -> SeriesInfo:
    """The series to read: ``series_uid`` (a :class:`SeriesInfo` ``uid`` or a SeriesInstanceUID), else
    the first (the one with the most slices); InputError listing what exists if it is not there.
    Also the header check's choice (:func:`resunet.io.precheck.check_study`)."""
    if not series_uid:
        return series[0]
    exact = [s for s in series if s.uid == series_uid] or [s for s in series if s.series_instance_uid == series_uid]
    if not exact:
        found = "; ".join(s.describe() for s in series[:8]) + (f"; and {len(series) - 8} more" if len(series) > 8 else "")
        raise InputError(f"{path}: no image series {series_uid}; found: {found}")
    return exact[0]


def _pick(report: ScanReport, path: Path, series_uid: str | None) -> SeriesInfo:
    series = report.series
    chosen = choose_series(series, path, series_uid)
    others = [s for s in series if s is not chosen]
    how = "as asked" if series_uid else "the one with the most slices"
    log.info("%s: %s", path, report.left_aside(chosen, how))
    if others:
        shown = "; ".join(s.describe() for s in others[:8])
        more = f"; and {len(others) - 8} more (list them with `resunet convert --list`)" if len(others) > 8 else ""
        log.info("%s: also found %d other series: %s%s", path, len(others), shown, more)
    if report.unreadable:
        first = report.unreadable[0]
        why = report.unreadable_reasons.get(first, "truncated or corrupt")
        names = ", ".join(Path(f).name for f in report.unreadable[:5])
        log.warning("%s: %d unreadable DICOM files left aside (%s): %s", path, len(report.unreadable), why, names)
    for other in others:  # the headers of series not read are no longer needed
        other.headers = []
    return chosen


def list_series(path: str | os.PathLike[str]) -> list[SeriesInfo]:
    """The image series in a DICOM folder, .zip or file, most slices first.

    A NIfTI file gives an empty list (it has no series). For a .zip the ``files`` of each series
    point into a temp folder that no longer exists; use ``uid`` with :func:`load_study`.

    Raises:
        InputError: the path does not exist or holds no image series.
    """
    route = route_study(path)
    if route.kind == "nifti":
        return []
    if route.kind == "zip":
        with extract_zip(route.path) as folder:
            series = list(find_series(folder).series)
    else:
        series = list(find_series(route.path).series)
    for s in series:  # listing only: do not hold every header in memory
        s.headers = []
    return series


def load_study(path: str | os.PathLike[str] | MemoryStudy, series_uid: str | None = None,
               limits: Limits | None = None) -> Volume:
    """Read a study into one :class:`Volume` (voxels ``[i, j, k]``, affine voxel -> RAS mm).

    Args:
        path: a ``.nii``/``.nii.gz`` file, a folder of DICOM files (any names, nested), a ``.zip``
            of such a folder, a single DICOM file (multi-frame included), or a
            :class:`~resunet.io.memory.MemoryStudy` (see :func:`load_memory_study`).
        series_uid: for DICOM, the series to read (a :class:`SeriesInfo` ``uid`` or a
            SeriesInstanceUID); default: the image series with the most slices.

    Raises:
        InputError: unreadable or unsupported input (one line naming the file and what to do).
        GeometryError: the series' geometry cannot be represented (missing slices, tilt, ...).
    """
    limits = limits if limits is not None else Limits.from_env()
    if isinstance(path, MemoryStudy):
        return load_memory_study(path, series_uid, limits)
    route = route_study(path, series_uid)
    p = route.path
    if route.kind == "nifti":
        return read_nifti(p, limits)
    if route.kind == "zip":
        with extract_zip(p) as folder:
            report, nifti = zip_contents(folder, p, series_uid)
            if nifti is not None:
                vol = read_nifti(nifti, limits)
                vol.meta["source"] = f"{p}:{nifti.relative_to(folder)}"
                return vol
            chosen = _pick(report, p, series_uid)
            limits.check_series(p, chosen)
            vol = read_series(chosen, source=str(p))
            limits.check_spacing(p, vol.spacing)
            _note_split(vol, report, chosen)
            # the files are gone once the temp folder is removed: keep their headers (for DICOM SEG)
            # and their names inside the zip
            vol.meta["dicom_datasets"] = _headers(vol.meta["dicom_files"])
            vol.meta["dicom_files"] = [str(Path(f).relative_to(folder)) for f in vol.meta["dicom_files"]]
            vol.meta["dicom_files_in_zip"] = True
            return vol
    if route.dicomdir:
        log.info("%s: a DICOMDIR index; reading the folder it sits in", path)
    report = find_series(p)
    chosen = _pick(report, p, series_uid)
    limits.check_series(p, chosen)
    vol = read_series(chosen, source=str(p))
    limits.check_spacing(p, vol.spacing)
    _note_split(vol, report, chosen)
    return vol


def load_memory_study(study: MemoryStudy, series_uid: str | None = None, limits: Limits | None = None) -> Volume:
    """Read DICOM files held in memory into one :class:`Volume`, as :func:`load_study` reads a folder
    of the same files: the same scan, series choice, limits, geometry checks and pixel decoders,
    from the bytes (no file is written). ``meta["dicom_files"]`` holds the instances' labels
    (``<study name>/<series>/<n>.dcm``) and ``meta["dicom_datasets"]`` their headers in slice order,
    which the SEG, RTSTRUCT and SR writers reference (as for a .zip, whose files are gone too).

    Raises:
        InputError, GeometryError: as :func:`load_study`, naming the study and the instance.
    """
    limits = limits if limits is not None else Limits.from_env()
    report = scan_dicom_files(study)
    label = Path(study.name)
    if not report.series:
        raise InputError(_nothing_found_in_memory(study, report))
    chosen = _pick(report, label, series_uid)
    limits.check_series(label, chosen)
    by_path = {h.path: h for h in chosen.headers}
    vol = read_series(chosen, source=study.name)
    limits.check_spacing(label, vol.spacing)
    _note_split(vol, report, chosen)
    vol.meta["dicom_datasets"] = [by_path[f].ds for f in dict.fromkeys(vol.meta["dicom_files"])]
    vol.meta["dicom_in_memory"] = True
    return vol


def _nothing_found_in_memory(study: MemoryStudy, report: ScanReport) -> str:
    """Why instances held in memory hold no image series (one line)."""
    if report.n_files == 0:
        return f"{study.name}: no instances were received; expected the DICOM images of the study"
    if report.unreadable:
        first = report.unreadable[0]
        return report.unreadable_reasons.get(first) or f"{first}: unreadable DICOM instance (truncated or corrupt); {report.summary()}"
    if report.colour and sum(report.non_image.values()) == len(report.colour):
        return report.colour[0]
    if report.non_image:
        return f"{study.name}: no image series, only {', '.join(sorted(report.non_image))} ({report.summary()})"
    return f"{study.name}: no DICOM images among the instances received ({report.summary()})"


def split_groups(report: ScanReport, chosen: SeriesInfo) -> list[dict] | None:
    """The stacks of the chosen Series Instance UID (chosen first) when its images disagree, else None.

    One Series Instance UID whose instances disagree (image size, orientation, echo, ...) is split
    into stacks and the largest is read; the others are what a caller that must not segment part of a
    series (the service, the DICOM node) refuses with the counts (:func:`series_rule_error`).
    """
    uid = chosen.series_instance_uid
    siblings = [s for s in report.series if s is not chosen and uid and s.series_instance_uid == uid]
    if not siblings:
        return None
    return [{"key": s.uid, "n_slices": s.n_slices, "rows": s.rows, "cols": s.cols} for s in [chosen, *siblings]]


def _note_split(vol: Volume, report: ScanReport, chosen: SeriesInfo) -> None:
    """Keep :func:`split_groups` in ``meta["series_split"]`` (for :func:`check_series_complete`)."""
    groups = split_groups(report, chosen)
    if groups:
        vol.meta["series_split"] = groups


def series_rule_error(uid: str, groups: list[dict] | None, n_slices: int, *, min_slices: int = 1,
                      allow_split: bool = True) -> str | None:
    """Why a DICOM series must not be segmented (part of a split series, too few slices), or None.

    The one rule behind the header check (:func:`resunet.io.precheck.check_study`) and the check of
    a read volume (:func:`check_series_complete`).
    """
    if groups and not allow_split:
        total = sum(int(g["n_slices"]) for g in groups)
        parts = ", ".join(f"{g['n_slices']} of {g['cols']}x{g['rows']}" for g in groups)
        return (
            f"series {uid}: its {total} images disagree in size or orientation ({parts}); only "
            f"{groups[0]['n_slices']} would be segmented. Send the series again from the scanner or PACS, "
            "or ask the operator to allow split series (--allow-split-series)"
        )
    if n_slices < min_slices:
        return (
            f"series {uid}: {n_slices} slice{'s' if n_slices != 1 else ''}, fewer than the {min_slices} this service "
            "segments (a localiser or a stray instance?); send the whole series, or ask the operator to lower --min-slices"
        )
    return None


def check_series_complete(vol: Volume, *, min_slices: int = 1, allow_split: bool = True) -> None:
    """Refuse a DICOM volume that is only part of its series, or that has too few slices
    (:func:`series_rule_error`; NIfTI volumes pass).

    Raises:
        InputError: naming the series, what was found and what to do.
    """
    if vol.meta.get("format") != "dicom":
        return
    why = series_rule_error(vol.meta.get("series_uid") or "?", vol.meta.get("series_split"), int(vol.shape[2]),
                            min_slices=min_slices, allow_split=allow_split)
    if why:
        raise InputError(why)


def _headers(files: list[str]) -> list[Dataset]:
    """Headers (no pixels) of the distinct files in slice order, kept when the files are temporary."""
    return [pydicom.dcmread(f, stop_before_pixels=True, force=True) for f in dict.fromkeys(files)]


def looks_like_zip(p: Path) -> bool:
    """True if the file starts with a zip local-file or empty-archive signature."""
    try:
        with open(p, "rb") as fh:
            return fh.read(4) in (b"PK\x03\x04", b"PK\x05\x06")
    except OSError:
        return False
