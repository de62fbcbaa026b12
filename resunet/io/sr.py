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

Lesion classes (a model card's ``lesion_labels``, :func:`resunet.io.dicom_codes.lesion_labels_from_model_card`)
get, after their segment's group, one more group per connected lesion: the components of that
label in the mask (:func:`skimage.measure.label`, full connectivity: 26 neighbours in 3D, 8 in 2D),
numbered 1, 2, ... in the order skimage labels them (first voxel in array order), tracking
identifier ``"<label> lesion <n> (segment <s>)"``, the same segment reference, codes and algorithm,
and the lesion's Volume in mL (its voxel count times the voxel volume). A centroid or bounding box
is not reported: highdicom's volumetric group takes a segment *or* a region, not both.

The observer is the device (resunet), the evidence the source images and the SEG; the procedure
reported is "Imaging procedure" (SCT 363679005), as nothing more specific is known of a scan.
Hand-written only in choosing these codes: highdicom builds and checks the templates.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
    mask: Volume | None = None,
    lesion_labels: Sequence[str] | None = None,
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
        mask: the label mask the SEG was written from (``Prediction.mask``: uint8 on ``source``'s
            grid, ``meta["labels"]`` = ``{"value": name}``); needed for the per-lesion groups.
        lesion_labels: label names reported per connected lesion too; None: ``mask.meta["lesion_labels"]``
            (the model card's ``lesion_labels``, put there by the Predictor), or none without a mask.

    Raises:
        InputError: the SEG cannot be read, is not a SEG, or has a segment without a volume; lesion
            labels asked for without a mask, or naming a label the mask does not have.
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
    lesions = lesion_volumes_ml(mask, lesion_labels, seg_path) if (mask is not None or lesion_labels) else {}

    def group(item: pydicom.Dataset, identifier: str, uid_suffix: str, volume_ml: float) -> Any:
        number = int(item.SegmentNumber)
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=hd.UID(f"{_uid_root(seg.SOPInstanceUID, len(uid_suffix))}{uid_suffix}") if uid_seed is not None
                else hd.UID(),
                identifier=identifier[:64]),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=SEG_SOP_CLASS, sop_instance_uid=str(seg.SOPInstanceUID), segment_number=number,
                source_series=source_series),
            finding_category=_code(item.SegmentedPropertyCategoryCodeSequence[0]),
            finding_type=_code(item.SegmentedPropertyTypeCodeSequence[0]),
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(
                name=codes.SCT.Volume, value=float(volume_ml),
                unit=hd.sr.CodedConcept("ml", "UCUM", "milliliter"), algorithm_id=algorithm)],
        )

    groups = []
    for item in seg.SegmentSequence:
        label = str(item.SegmentLabel)
        if label not in volumes_ml:
            raise InputError(f"{seg_path}: segment {item.SegmentNumber} ({label}) has no volume to report")
        number = int(item.SegmentNumber)
        groups.append(group(item, f"{label} (segment {number})", f".{number}", volumes_ml[label]))
        for n, vol in enumerate(lesions.get(label, []), start=1):
            groups.append(group(item, f"{label} lesion {n} (segment {number})", f".{number}.{n}", vol))
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
                                           sorted((k, [round(v, 6) for v in vs]) for k, vs in lesions.items()),
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


def lesion_volumes_ml(mask: Volume | None, lesion_labels: Sequence[str] | None,
                     what: str | os.PathLike[str] = "the SR") -> dict[str, list[float]]:
    """Label name -> volume (mL) of each connected lesion of that label, in skimage's labelling order.

    Components are found with :func:`skimage.measure.label` at full connectivity (26 neighbours in 3D);
    a lesion's volume is its voxel count times ``mask.voxel_volume_ml``. ``lesion_labels`` None:
    ``mask.meta["lesion_labels"]``.

    Raises:
        InputError: lesion labels without a mask, or a lesion label that ``mask.meta["labels"]`` lacks.
    """
    import numpy as np
    from skimage.measure import label as connected

    if lesion_labels is not None:
        names = list(lesion_labels)
    else:
        names = list(mask.meta.get("lesion_labels") or []) if mask is not None else []
    if not names:
        return {}
    if mask is None:
        raise InputError(f"{what}: per-lesion volumes of {names} need the label mask the SEG was written from")
    values = {str(n): int(v) for v, n in (mask.meta.get("labels") or {}).items()}
    out: dict[str, list[float]] = {}
    arr = np.asarray(mask.array)
    for name in names:
        if name not in values:
            raise InputError(f"{what}: lesion label {name!r} is not one of the mask's labels {sorted(values)}")
        components = connected(arr == values[name], connectivity=arr.ndim)
        counts = np.bincount(components.ravel())[1:]
        out[name] = [round(int(c) * mask.voxel_volume_ml, 6) for c in counts]
    return out


def _groups(path: str | os.PathLike[str]) -> list[tuple[str, float]]:
    """(tracking identifier, volume mL) of each volumetric group of an SR written by :func:`write_dicom_sr`."""
    import highdicom as hd

    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(str(path)))
    return [(str(group.tracking_identifier), float(m.value))
            for group in sr.content.get_volumetric_roi_measurement_groups()
            for m in group.get_measurements(name=codes.SCT.Volume)]


def read_sr_volumes(path: str | os.PathLike[str]) -> dict[str, float]:
    """Segment label -> volume (mL) from a Measurement Report written by :func:`write_dicom_sr` (highdicom).

    The per-lesion groups are left out (:func:`read_sr_lesion_volumes`).
    """
    out: dict[str, float] = {}
    for ident, value in _groups(path):
        label = ident.rsplit(" (segment", 1)[0]
        if not _LESION.fullmatch(ident):
            out[label] = value
    return out


def read_sr_lesion_volumes(path: str | os.PathLike[str]) -> dict[str, list[float]]:
    """Label -> the volumes (mL) of its lesions, lesion 1 first, from the per-lesion groups of an SR."""
    found: dict[str, dict[int, float]] = {}
    for ident, value in _groups(path):
        m = _LESION.fullmatch(ident)
        if m:
            found.setdefault(m["label"], {})[int(m["n"])] = value
    return {label: [v for _, v in sorted(by_n.items())] for label, by_n in found.items()}


def _code(item: pydicom.Dataset) -> "object":
    import highdicom as hd

    return hd.sr.CodedConcept(str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))


def _uid_root(uid: str, suffix_len: int = 6) -> str:
    """A UID prefix short enough to append a suffix of ``suffix_len`` characters (UIDs are at most 64)."""
    return str(uid)[:64 - max(6, suffix_len)].rstrip(".")


_LESION = re.compile(r"(?P<label>.+) lesion (?P<n>\d+) \(segment \d+\)")
