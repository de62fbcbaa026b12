"""Write a :class:`Volume` as a DICOM series: one CT or MR Image Storage file per slice.

Used for the bundled example study and for tests (geometry cases written with known truth). The
files are ordinary single-frame images in explicit VR little endian, with new UIDs from
``pydicom.uid.generate_uid``; every file is written atomically.

Geometry mapping (the inverse of :mod:`resunet.io.dicom`): voxel ``[i, j, k]`` is pixel
``(row=j, column=i)`` of slice ``k``, so each slice's pixel array is ``array[:, :, k].T``.
``ImageOrientationPatient`` holds the LPS directions of the ``i`` and ``j`` axes,
``PixelSpacing`` = (spacing along ``j``, spacing along ``i``), and ``ImagePositionPatient`` of
slice ``k`` is the LPS position of voxel ``(0, 0, k)``. The ``k`` axis must be perpendicular to
the ``i``/``j`` plane (DICOM images cannot describe a sheared grid).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds  # a DS (max 16 characters) as exact as fits

from resunet import __version__
from resunet.errors import GeometryError, InputError
from resunet.io.atomic import atomic_path
from resunet.io.volume import Volume

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}


def _pixel_encoding(array: np.ndarray) -> tuple[np.ndarray, int, float, float]:
    """Stored integers, PixelRepresentation, RescaleSlope and RescaleIntercept for ``array``.

    Integer data that fit in 16 bits are stored as they are (slope 1, intercept 0), so the round
    trip is exact. Anything else (floats, wider integers) is mapped linearly onto int16.
    """
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        if lo >= 0 and hi <= 65535:
            return array.astype(np.uint16), 0, 1.0, 0.0
        if lo >= -32768 and hi <= 32767:
            return array.astype(np.int16), 1, 1.0, 0.0
    data = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(data)):
        raise InputError("cannot write a DICOM series from data holding NaN or inf")
    lo, hi = float(data.min()), float(data.max())
    if hi == lo:
        slope = 1.0
    else:
        slope = float(format_number_as_ds((hi - lo) / 65534.0))
        if slope == 0.0:
            slope = (hi - lo) / 65534.0
    inter = float(format_number_as_ds(lo + 32767.0 * slope))
    stored = np.clip(np.round((data - inter) / slope), -32768, 32767).astype(np.int16)
    return stored, 1, slope, inter


def write_dicom_series(
    volume: Volume,
    folder: str | os.PathLike[str],
    *,
    modality: str = "MR",
    series_description: str = "resunet series",
    patient_name: str = "Anonymous^",
    patient_id: str = "RESUNET0001",
    study_description: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    file_names: Sequence[str] | None = None,
    sop_instance_uid_root: str | None = None,
    date_time: _dt.datetime | None = None,
    patient_position: str = "HFS",
) -> list[Path]:
    """Write ``volume`` as one DICOM file per slice ``k`` into ``folder``.

    Args:
        volume: the scan; ``array`` shape ``(I, J, K)`` becomes ``K`` images of ``J`` rows by ``I``
            columns; ``affine`` (voxel -> RAS mm) becomes IPP/IOP/PixelSpacing (LPS, mm).
        folder: output folder (created); existing files with the same names are replaced.
        modality: ``"MR"`` (MR Image Storage) or ``"CT"`` (CT Image Storage; values should be HU).
        series_description, patient_name, patient_id, study_description: written as given.
        study_uid, series_uid, frame_of_reference_uid: reuse these UIDs (new ones otherwise).
        series_number: SeriesNumber.
        file_names: one name per slice (default ``IM00001.dcm``...).
        sop_instance_uid_root: if given, slice ``k`` gets SOPInstanceUID ``f"{root}.{k + 1}"``
            (reproducible files); otherwise new random UIDs.
        date_time: study/series/content date and time (default: now).
        patient_position: PatientPosition (``"HFS"`` head first supine, the usual position for head
            and body scans; ``""`` when unknown). It does not change the geometry: positions and
            orientations are in patient coordinates whatever the position on the table.

    Returns:
        The written paths in slice order ``k``.

    Raises:
        GeometryError: the ``k`` axis is not perpendicular to the ``i``/``j`` plane.
        InputError: unknown modality or data that cannot be stored.
    """
    modality = modality.upper()
    if modality not in _SOP_CLASS:
        raise InputError(f"modality must be one of {sorted(_SOP_CLASS)}, got {modality!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_i, n_j, n_k = volume.shape
    if file_names is not None and len(file_names) != n_k:
        raise InputError(f"file_names has {len(file_names)} names for {n_k} slices")

    lps = LPS_FROM_RAS @ volume.affine[:3, :]
    spacing = np.asarray(volume.spacing)
    dirs = lps[:3, :3] / spacing
    normal = np.cross(dirs[:, 0], dirs[:, 1])
    if abs(abs(float(np.dot(normal, dirs[:, 2]))) - 1.0) > 1e-6 or abs(float(np.dot(dirs[:, 0], dirs[:, 1]))) > 1e-6:
        raise GeometryError(
            f"{volume.meta.get('source', 'volume')}: the voxel axes are not orthogonal; a DICOM image"
            " series cannot describe this grid, resample it first"
        )

    stored, pixel_rep, slope, inter = _pixel_encoding(np.asarray(volume.array))
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    now = date_time or _dt.datetime.now()
    if sop_instance_uid_root is not None and len(f"{sop_instance_uid_root}.{n_k}") > 64:
        raise InputError(f"sop_instance_uid_root {sop_instance_uid_root!r} is too long for a 64-character UID")
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    sop_class = _SOP_CLASS[modality]
    iop = [format_number_as_ds(float(v)) for v in (*dirs[:, 0], *dirs[:, 1])]

    paths: list[Path] = []
    for k in range(n_k):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        sop_uid = f"{sop_instance_uid_root}.{k + 1}" if sop_instance_uid_root else generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        # value 3 is required for MR (PS3.3 C.8.3.1.1.1); "OTHER" is its defined term for an image of
        # no named kind; CT's value 3 "AXIAL" (C.8.2.1.1.1) says it is a cross-section
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER" if modality == "MR" else "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
        ds.AccessionNumber = ""
        ds.Modality = modality
        ds.Manufacturer = "resunet"
        ds.SoftwareVersions = __version__
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.Laterality = ""  # Type 2C (General Series): not a paired body part, so empty
        ds.PatientPosition = patient_position  # Type 2C for CT and MR images (General Series)
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        pos = lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3]
        ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in pos]
        ds.ImageOrientationPatient = iop
        ds.PixelSpacing = [format_number_as_ds(float(spacing[1])), format_number_as_ds(float(spacing[0]))]
        ds.SliceThickness = format_number_as_ds(float(spacing[2]))
        ds.SpacingBetweenSlices = format_number_as_ds(float(spacing[2]))
        ds.SliceLocation = format_number_as_ds(float(np.dot(normal, pos)))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = n_j
        ds.Columns = n_i
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = pixel_rep
        if modality == "CT":
            ds.RescaleIntercept = format_number_as_ds(inter)
            ds.RescaleSlope = format_number_as_ds(slope)
            ds.RescaleType = "HU"
        elif (slope, inter) != (1.0, 0.0):
            # the MR Image IOD has no Rescale attributes (dciodvfy warns "not present in standard DICOM
            # IOD"), but float data cannot be stored without them; integers are stored as they are
            ds.RescaleIntercept = format_number_as_ds(inter)
            ds.RescaleSlope = format_number_as_ds(slope)
            ds.RescaleType = "US"
        if modality == "CT":
            ds.KVP = ""
            ds.AcquisitionNumber = 1
        else:
            ds.ScanningSequence = "RM"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.EchoTime = ""
            ds.RepetitionTime = ""
            ds.EchoTrainLength = ""
        pixels = np.ascontiguousarray(stored[:, :, k].T)
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
        name = file_names[k] if file_names is not None else f"IM{k + 1:05d}.dcm"
        path = folder / name
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths
