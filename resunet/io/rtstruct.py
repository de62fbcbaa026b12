"""DICOM RT Structure Set (RTSTRUCT) writing and reading: contours per label on each source slice.

Radiotherapy planning systems take contours, not label maps. A mask on a DICOM series' grid is
written as one RTSTRUCT with one ROI per label: on every slice ``k`` where the label is present,
each connected region becomes one CLOSED_PLANAR contour in patient LPS mm, referencing that slice's
image (SOP Instance UID, and frame number for multi-frame sources). A region's holes are joined to
its outer boundary by zero-width keyhole cuts (:mod:`resunet.io.contours`), so readers that OR the
contours of a structure (plastimatch's default, many planning systems) and readers that XOR them
(the even-odd rule) fill the same voxels. Reading back rasterises the contours onto the source
grid with the even-odd rule, so files from other writers with separate hole contours read right too.

Written here rather than with ``rt-utils`` (looked at, version 1.2.7): it re-reads the source series
from a folder of files with pixel data (our zip inputs keep headers only, enhanced multi-frame
sources have one file), computes slice geometry itself instead of taking the reader's checked
geometry, reads Type 2 patient/study attributes that anonymised sources lack (AttributeError), and
pulls OpenCV plus a ``dataclasses`` back-port. highdicom and pydicom have no RTSTRUCT builder.
Contours come from scikit-image (``measure.find_contours``: marching squares at level 0.5, so each
outline runs between inside and outside pixel centres) and are rasterised back with
``draw.polygon`` (pixel centres inside), which gives the mask back voxel for voxel.

Patient/study attributes are copied from the source where present and written empty where missing
(Type 2); the source files are never modified.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from resunet import __version__
from resunet.errors import GeometryError, InputError
from resunet.io.atomic import atomic_path
from resunet.io.contours import keyhole_contours
from resunet.io.dicom_codes import label_colour
from resunet.io.dicom_headers import derived_uids
from resunet.io.seg import _check_source_uids, _person_name, _source_datasets, check_mask_on_source, contributing_equipment
from resunet.io.volume import Volume

RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
CONTOUR_DATA = Tag(0x3006, 0x0050)
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
#: patient and study attributes copied from the source (empty when the source lacks them)
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
           "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription")


def _contour_data(points: np.ndarray) -> RawDataElement:
    """ContourData (3006,0050) as an encoded DS element: pydicom validates each DS value it is given
    (~50 us each, ~2 s for a brain's 35 000 coordinates), so the text is built once here."""
    # 0.1 um (4 decimals in mm) is far below any voxel and keeps the element half as long
    raw = "\\".join(format_number_as_ds(float(v)) for v in np.round(points.ravel(), 4)).encode("ascii")
    if len(raw) % 2:
        raw += b" "  # DICOM values have even length; DS pads with a space
    return RawDataElement(CONTOUR_DATA, "DS", len(raw), raw, 0, False, True)


def _source_slices(source: Volume) -> tuple[list[Dataset], list[Dataset], list[int | None]]:
    """``(datasets, slice_ds, frames)``: the source headers, the header of the image each slice k lies
    on (a file's dataset; zip sources keep headers in slice order; one multi-frame file serves every
    slice) and the frame index per slice (None for single-frame files), for writing and reading back."""
    datasets = _source_datasets(source)
    _check_source_uids(datasets, source)  # shared SOP Instance UIDs would make the references ambiguous
    files = source.meta.get("dicom_files") or []
    frames = source.meta.get("frames") or [None] * source.shape[2]
    by_file = dict(zip(dict.fromkeys(files), datasets)) if files else {}
    slice_ds = [by_file[f] for f in files] if by_file else list(datasets)
    if len(slice_ds) != source.shape[2]:
        slice_ds = [datasets[0]] * source.shape[2] if frames[0] is not None else slice_ds
    return datasets, slice_ds, frames


def write_rtstruct(
    mask: Volume,
    source: Volume,
    path: str | os.PathLike[str],
    labels: Mapping[int, str],
    *,
    algorithm_name: str = "resunet",
    algorithm_version: str = __version__,
    model_sha256: str | None = None,
    series_description: str = "resunet contours",
    series_number: int = 901,
    uid_seed: str | None = None,
    reviewer: str | None = None,
    approved: bool = False,
) -> Path:
    """Write ``mask`` as an RTSTRUCT referencing ``source``'s series: one ROI per label.

    Args:
        mask: label map on exactly ``source``'s grid, values 0..N.
        source: the DICOM volume the mask was made for (from :func:`resunet.io.load_study`).
        path: output file (``.dcm``), written atomically.
        labels: label value -> ROI name, e.g. ``{1: "brain"}``; 0 is background. ROINumber = label value.
        algorithm_name, algorithm_version, model_sha256: ROIGenerationDescription and the
            ContributingEquipmentSequence (IHE AI Results style: who made the contours).
        series_description, series_number: of the new RTSTRUCT series.
        reviewer: a person corrected the model's mask (the review loop, :mod:`resunet.inference.review`):
            every ROI's ROIGenerationAlgorithm is SEMIAUTOMATIC, ROIInterpreter and OperatorsName the reviewer.
        approved: with ``reviewer``, the RT Approval module says APPROVED with ReviewerName/Date/Time
            (else UNAPPROVED).

    Raises:
        GeometryError: the mask is not on the source grid, or the source has no patient geometry.
        InputError: the source is not DICOM, or the mask holds labels missing from ``labels``.
    """
    arr = check_mask_on_source(mask, source, labels, "an RTSTRUCT")
    if source.meta.get("geometry") == "unknown":
        raise GeometryError(
            f"{source.meta.get('source', 'volume')}: the source has no patient position/orientation, so"
            " contours in patient coordinates cannot be placed; write a DICOM SEG or NIfTI mask instead"
        )
    datasets, slice_ds, frames = _source_slices(source)
    ref = datasets[0]

    now = _dt.datetime.now()
    ds = Dataset()
    series_uid_new, sop_uid = (generate_uid(), generate_uid()) if uid_seed is None else derived_uids(
        "RTSTRUCT", uid_seed, datasets, arr, sorted((int(k), str(v)) for k, v in labels.items()), model_sha256,
        algorithm_name, algorithm_version, series_description,
        *([reviewer or "", bool(approved)] if reviewer is not None else []))  # a model's RTSTRUCT keeps its UIDs
    person = _person_name(reviewer)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 192"  # values are re-encoded from pydicom's decoded text
    ds.SOPClassUID = RTSTRUCT_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = ds.StructureSetDate = ds.SeriesDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.StructureSetTime = ds.SeriesTime = now.strftime("%H%M%S")
    for key in _COPIED:
        setattr(ds, key, ref.get(key, "") or "")
    study_uid = str(ref.get("StudyInstanceUID", "") or source.meta.get("study_uid") or generate_uid())
    for_uid = str(ref.get("FrameOfReferenceUID", "") or source.meta.get("frame_of_reference_uid") or generate_uid())
    series_uid = str(source.meta.get("series_uid") or ref.get("SeriesInstanceUID", ""))
    ds.StudyInstanceUID = study_uid
    # Frame of Reference module (PS3.3 C.7.4.1, in the RT Structure Set IOD): the source's frame,
    # so the contours' patient coordinates are those of the images
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ref.get("PositionReferenceIndicator", "") or ""
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_uid_new
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.InstanceNumber = 1
    ds.OperatorsName = person
    ds.Manufacturer = "resunet"
    ds.ManufacturerModelName = algorithm_name[:64]
    ds.SoftwareVersions = str(algorithm_version)
    ds.ContributingEquipmentSequence = contributing_equipment(algorithm_name, algorithm_version, model_sha256)
    ds.StructureSetLabel = "resunet"
    ds.StructureSetName = algorithm_name[:64]
    ds.ApprovalStatus = "APPROVED" if reviewer and approved else "UNAPPROVED"
    if ds.ApprovalStatus == "APPROVED":  # RT Approval module: who approved it and when (Type 2C)
        ds.ReviewDate, ds.ReviewTime, ds.ReviewerName = now.strftime("%Y%m%d"), now.strftime("%H%M%S"), person

    def image_ref(k: int) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = slice_ds[k].SOPClassUID
        item.ReferencedSOPInstanceUID = slice_ds[k].SOPInstanceUID
        if frames[k] is not None:
            item.ReferencedFrameNumber = int(frames[k]) + 1
        return item

    series_item = Dataset()
    series_item.SeriesInstanceUID = series_uid
    series_item.ContourImageSequence = Sequence([image_ref(k) for k in range(source.shape[2])])
    study_item = Dataset()
    study_item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (as PS3.3 asks)
    study_item.ReferencedSOPInstanceUID = study_uid
    study_item.RTReferencedSeriesSequence = Sequence([series_item])
    for_item = Dataset()
    for_item.FrameOfReferenceUID = for_uid
    for_item.RTReferencedStudySequence = Sequence([study_item])
    ds.ReferencedFrameOfReferenceSequence = Sequence([for_item])

    lps = LPS_FROM_RAS @ np.asarray(source.affine, dtype=float)[:3, :]  # voxel (i, j, k, 1) -> LPS mm
    roi_seq, contour_seq, obs_seq = Sequence(), Sequence(), Sequence()
    for value in sorted(int(k) for k in labels if int(k) > 0):
        name = str(labels[value])[:64]
        roi = Dataset()
        roi.ROINumber = value
        roi.ReferencedFrameOfReferenceUID = for_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "SEMIAUTOMATIC" if reviewer else "AUTOMATIC"
        roi.ROIGenerationDescription = f"{algorithm_name} {algorithm_version}"[:64]
        roi_seq.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = value
        rc.ROIDisplayColor = list(label_colour(value))  # the SEG's and the viewer's colour of this label
        contours = Sequence()
        planes = arr == value
        for k in np.flatnonzero(planes.any(axis=(0, 1))):
            for c in keyhole_contours(planes[:, :, k]):
                vox = np.c_[c, np.full(len(c), float(k)), np.ones(len(c))]
                pts = vox @ lps.T  # (n, 3) LPS mm
                item = Dataset()
                item.ContourImageSequence = Sequence([image_ref(int(k))])
                item.ContourGeometricType = "CLOSED_PLANAR"
                item.NumberOfContourPoints = len(pts)
                item.ContourNumber = len(contours) + 1
                item[CONTOUR_DATA] = _contour_data(pts)
                contours.append(item)
        if len(contours):
            rc.ContourSequence = contours
        contour_seq.append(rc)
        obs = Dataset()
        obs.ObservationNumber = value
        obs.ReferencedROINumber = value
        obs.RTROIInterpretedType = "ORGAN"
        obs.ROIInterpreter = person
        obs_seq.append(obs)
    ds.StructureSetROISequence = roi_seq
    ds.ROIContourSequence = contour_seq
    ds.RTROIObservationsSequence = obs_seq

    p = Path(path)
    with atomic_path(p) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return p


def read_rtstruct(path: str | os.PathLike[str], source: Volume) -> Volume:
    """Rasterise an RTSTRUCT's contours onto ``source``'s grid: a label map (ROINumber per voxel).

    Each contour goes on the slice whose image it references (``ContourImageSequence``), or, when
    it references none of the source images, on the slice its points lie on (within half a slice
    spacing). Contours of one ROI on one slice combine with the even-odd rule; where ROIs overlap,
    the later ROI in the file wins. ``meta["labels"]`` maps ROINumber -> ROIName.

    Raises:
        InputError: not a readable RTSTRUCT, or its contours do not lie on the source slices.
    """
    from skimage.draw import polygon

    p = Path(path)
    try:
        ds = pydicom.dcmread(p)
    except Exception as err:  # pydicom raises several kinds on a broken file
        raise InputError(f"{p}: not a readable DICOM file ({type(err).__name__}: {err})") from None
    if str(ds.get("SOPClassUID", "")) != RTSTRUCT_STORAGE or "ROIContourSequence" not in ds:
        raise InputError(f"{p}: not a DICOM RT Structure Set (SOP class {ds.get('SOPClassUID', 'missing')})")
    _, slice_ds, frames = _source_slices(source)
    uids = [str(d.SOPInstanceUID) for d in slice_ds]
    if len(uids) != source.shape[2]:
        uids = [uids[0]] * source.shape[2]
    slice_of = {(u, None if f is None else int(f) + 1): k for k, (u, f) in enumerate(zip(uids, frames))}

    n_i, n_j, n_k = source.shape
    ras_to_vox = np.linalg.inv(np.asarray(source.affine, dtype=float))
    out = np.zeros(source.shape, dtype=np.uint16)
    names = {int(r.ROINumber): str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence", [])}
    placed = 0
    for rc in ds.ROIContourSequence:
        value = int(rc.ReferencedROINumber)
        planes: dict[int, np.ndarray] = {}
        for item in rc.get("ContourSequence", []):
            pts = np.asarray([float(v) for v in item.ContourData], dtype=float).reshape(-1, 3)
            vox = np.c_[pts @ LPS_FROM_RAS, np.ones(len(pts))] @ ras_to_vox.T  # LPS -> RAS -> (i, j, k)
            k = None
            for ref in item.get("ContourImageSequence", []):
                frame = int(ref.ReferencedFrameNumber) if "ReferencedFrameNumber" in ref else None
                k = slice_of.get((str(ref.ReferencedSOPInstanceUID), frame), k)
            if k is None:
                kk = float(np.mean(vox[:, 2]))
                if abs(kk - round(kk)) > 0.5 or not 0 <= round(kk) < n_k or np.ptp(vox[:, 2]) > 0.5:
                    raise InputError(f"{p}: contour of ROI {value} does not lie on a slice of the source series")
                k = int(round(kk))
            rr, cc = polygon(vox[:, 0], vox[:, 1], shape=(n_i, n_j))
            plane = planes.setdefault(k, np.zeros((n_i, n_j), dtype=bool))
            fill = np.zeros_like(plane)
            fill[rr, cc] = True
            plane ^= fill  # even-odd: a hole contour inside an outer one removes the hole
            placed += 1
        for k, plane in planes.items():
            out[:, :, k][plane] = value
    if placed == 0 and any("ContourSequence" in rc for rc in ds.ROIContourSequence):
        raise InputError(f"{p}: none of its contours lie on the source series")
    array = out.astype(np.uint8) if out.max(initial=0) <= 255 else out
    return source.with_array(array, is_label=True, labels=names, rtstruct_file=str(p), format="dicom-rtstruct")
