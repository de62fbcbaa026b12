"""Results as a DICOM Structured Report: TID 1500 Measurement Report (highdicom), beside the SEG.

What RIS and viewers show as findings: one Comprehensive 3D SR whose Measurement Report holds, per
segment of the SEG written for the same case, a Volumetric ROI measurement group (TID 1411) with

- the tracking identifier (the label's name and a UID derived from the SEG and the segment number),
- the finding category/type: the SEG segment's own codes (category "Anatomical Structure", the
  label's SNOMED CT concept),
- the referenced segment (SEG SOP instance + segment number) and its source series,
- the algorithm identification (the model's name, resunet's version, the model's SHA-256 as a
  parameter), as in the SEG (IHE AI Results),
- one measurement: Volume (SCT 118565006) in mL (UCUM ``ml``): the voxel count times the voxel
  volume, the same number as ``volumes_ml`` in predictions.json.

The observer is the device (resunet), the evidence the source images and the SEG; the procedure
reported is "Imaging procedure" (SCT 363679005), as nothing more specific is known of a scan.
Hand-written only in choosing these codes: highdicom builds and checks the templates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pydicom
from pydicom.sr.codedict import codes

from resunet import __version__
from resunet.errors import InputError
from resunet.io.atomic import atomic_path
from resunet.io.dicom_headers import derived_uids, with_type2_defaults
from resunet.io.volume import Volume

#: SOP Class UID of Segmentation Storage
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def write_dicom_sr(
    seg_path: str | os.PathLike[str],
    source: Volume,
    path: str | os.PathLike[str],
    volumes_ml: Mapping[str, float],
    *,
    algorithm_name: str = "resunet",
    algorithm_version: str = __version__,
    model_sha256: str | None = None,
    uid_seed: str | None = None,
    series_number: int = 901,
    series_description: str = "resunet measurements",
) -> Path:
    """Write the TID 1500 Measurement Report of the SEG at ``seg_path`` (made for ``source``) to ``path``.

    Args:
        seg_path: the DICOM SEG of the case (:func:`resunet.io.seg.write_dicom_seg`).
        source: the DICOM volume the SEG was made for (its headers are the SR's evidence and patient/study).
        path: output file, written atomically.
        volumes_ml: label name -> volume (mL) of each segment, as ``Prediction.volumes_ml``; every
            segment of the SEG must have one (matched by SegmentLabel).
        algorithm_name, algorithm_version, model_sha256: the algorithm identification, as in the SEG.
        uid_seed: derive the SR's series and instance UIDs from this seed and the content (a redone
            service job writes the same SR); None: new random UIDs.

    Raises:
        InputError: the SEG cannot be read, is not a SEG, or has a segment without a volume.
    """
    import highdicom as hd  # ~0.6 s, only when an SR is written

    try:
        seg = pydicom.dcmread(str(seg_path), stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as err:
        raise InputError(f"{seg_path}: cannot read the SEG to report on ({err})") from None
    if str(seg.get("SOPClassUID", "")) != SEG_SOP_CLASS:
        raise InputError(f"{seg_path}: is not a DICOM SEG (SOP class {seg.get('SOPClassUID', '?')})")
    from resunet.io.seg import _source_datasets

    evidence = [with_type2_defaults(ds) for ds in _source_datasets(source)]
    algorithm = hd.sr.AlgorithmIdentification(
        name=str(algorithm_name)[:64], version=str(algorithm_version),
        parameters=[f"model_sha256={model_sha256}"] if model_sha256 else None,
    )
    source_series = hd.sr.SourceSeriesForSegmentation(str(evidence[0].SeriesInstanceUID))
    groups = []
    for item in seg.SegmentSequence:
        label = str(item.SegmentLabel)
        if label not in volumes_ml:
            raise InputError(f"{seg_path}: segment {item.SegmentNumber} ({label}) has no volume to report")
        number = int(item.SegmentNumber)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=hd.UID(f"{_uid_root(seg.SOPInstanceUID)}.{number}") if uid_seed is not None else hd.UID(),
                identifier=f"{label} (segment {number})"[:64]),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=SEG_SOP_CLASS, sop_instance_uid=str(seg.SOPInstanceUID), segment_number=number,
                source_series=source_series),
            finding_category=_code(item.SegmentedPropertyCategoryCodeSequence[0]),
            finding_type=_code(item.SegmentedPropertyTypeCodeSequence[0]),
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(
                name=codes.SCT.Volume, value=float(volumes_ml[label]),
                unit=hd.sr.CodedConcept("ml", "UCUM", "milliliter"), algorithm_id=algorithm)],
        ))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=str(algorithm_name)[:64], manufacturer_name="resunet",
            model_name=str(algorithm_name)[:64]),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    if uid_seed is None:
        series_uid, sop_uid = hd.UID(), hd.UID()
    else:
        import numpy as np

        series_uid, sop_uid = derived_uids("SR", uid_seed, evidence, np.zeros(0, np.uint8),
                                           sorted((k, round(float(v), 6)) for k, v in volumes_ml.items()),
                                           model_sha256, algorithm_name, algorithm_version, series_description,
                                           str(seg.SOPInstanceUID))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*evidence, seg],
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="resunet",
        is_complete=True,
        series_description=series_description,
    )
    p = Path(path)
    with atomic_path(p) as tmp:
        sr.save_as(tmp)
    return p


def read_sr_volumes(path: str | os.PathLike[str]) -> dict[str, float]:
    """Segment label -> volume (mL) from a Measurement Report written by :func:`write_dicom_sr` (highdicom)."""
    import highdicom as hd

    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(str(path)))
    out: dict[str, float] = {}
    for group in sr.content.get_volumetric_roi_measurement_groups():
        label = str(group.tracking_identifier).rsplit(" (segment", 1)[0]
        for m in group.get_measurements(name=codes.SCT.Volume):
            out[label] = float(m.value)
    return out


def _code(item: pydicom.Dataset) -> "object":
    import highdicom as hd

    return hd.sr.CodedConcept(str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))


def _uid_root(uid: str) -> str:
    """A UID prefix short enough to append ``.N`` (UIDs are at most 64 characters)."""
    return str(uid)[:58].rstrip(".")
