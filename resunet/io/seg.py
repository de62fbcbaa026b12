"""DICOM SEG writing and reading (highdicom), so viewers show our masks on the source series.

A mask for a DICOM study is written as one BINARY Segmentation object that references every source
image (``source.meta["dicom_files"]``, or the headers kept in ``source.meta["dicom_datasets"]``
when the study came from a .zip whose temp folder is gone). Frames are matched to source images by
SOP Instance UID (and frame number for multi-frame sources), so the mask lands on the right slices
whatever order the files were in. Reading back gives a label map on the source grid.

Segment coding: each label's specific SNOMED CT category and type (:mod:`resunet.io.dicom_codes`:
"CSF" -> Body Substance / Cerebrospinal Fluid, "grey matter" -> Anatomical Structure / Gray Matter,
...; a model card's ``label_codes`` first), the label text as SegmentLabel, and a
RecommendedDisplayCIELabValue per segment: the label's colour, the same as the RTSTRUCT's
ROIDisplayColor and the web viewer's overlay.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from resunet import __version__
from resunet.errors import GeometryError, InputError
from resunet.io.atomic import atomic_path
from resunet.io.dicom_codes import SegmentCoding, codes_from_model_card, label_colour, segment_coding
from resunet.io.dicom_headers import derived_uids, read_header, with_type2_defaults
from resunet.io.volume import Volume

log = logging.getLogger(__name__)


def contributing_equipment(name: str, version: str, model_sha256: str | None = None) -> DicomSequence:
    """ContributingEquipmentSequence naming resunet as the processing equipment (IHE AI Results).

    One item: Manufacturer "resunet", ManufacturerModelName = ``name`` (e.g. "resunet brain_extraction"),
    SoftwareVersions = ``version``, purpose (DCM 109102 "Processing Equipment"), and the model's
    SHA-256 in ContributionDescription, so a viewer shows which software and model made the object.
    """
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = "109102", "DCM", "Processing Equipment"
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    item.Manufacturer = "resunet"
    item.ManufacturerModelName = str(name)[:64]
    item.SoftwareVersions = str(version)[:64]
    item.ContributionDateTime = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
    text = f"automatic segmentation by {name} (resunet {__version__})"
    item.ContributionDescription = text + (f"; model sha256 {model_sha256}" if model_sha256 else "")
    return DicomSequence([item])


def _source_datasets(source: Volume) -> list[Dataset]:
    """The source images' headers, one per distinct file, in slice order ``k``."""
    if source.meta.get("format") != "dicom":
        raise InputError(
            f"{source.meta.get('source', 'volume')}: a DICOM SEG needs a DICOM source series;"
            " write a NIfTI mask for NIfTI input"
        )
    kept = source.meta.get("dicom_datasets")
    if kept:
        return list(kept)
    files = source.meta.get("dicom_files") or []
    seen: dict[str, Dataset] = {}
    for f in files:
        if f not in seen:
            try:
                seen[f] = read_header(f)[0]  # preamble-less files too, as the reader accepted them
            except (OSError, pydicom.errors.InvalidDicomError) as err:
                raise InputError(f"{f}: cannot re-read the source DICOM file for the SEG ({err})") from None
    return list(seen.values())


def _check_source_uids(datasets: list[Dataset], source: Volume) -> None:
    """Refuse sources a SEG cannot reference: shared SOP Instance UIDs, missing study/series UIDs."""
    name = source.meta.get("source", "the source series")
    seen: dict[str, int] = {}
    for n, ds in enumerate(datasets):
        uid = str(ds.get("SOPInstanceUID", "") or "")
        if uid in seen:
            files = list(dict.fromkeys(source.meta.get("dicom_files") or []))
            a = Path(files[seen[uid]]).name if seen[uid] < len(files) else "?"
            b = Path(files[n]).name if n < len(files) else "?"
            raise InputError(
                f"{name}: images {a} and {b} share the SOP Instance UID {uid}, so a DICOM SEG or RTSTRUCT"
                " cannot reference them; write a NIfTI mask instead (--format nifti) or export the series"
                " again with unique UIDs"
            )
        seen[uid] = n
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
        if not str(datasets[0].get(keyword, "") or ""):
            raise InputError(
                f"{name}: the source images have no {keyword}, which a DICOM SEG or RTSTRUCT must reference;"
                " write a NIfTI mask instead (--format nifti)"
            )


def check_mask_on_source(mask: Volume, source: Volume, labels: Mapping[int, str], target: str) -> np.ndarray:
    """The mask's array, after checking it can be written as ``target`` (e.g. "a DICOM SEG") for ``source``.

    Raises:
        GeometryError: the mask is not on the source grid.
        InputError: the mask holds labels that have no name in ``labels``.
    """
    if not mask.same_grid(source):
        raise GeometryError(
            f"the mask ({mask.describe_grid()}) is not on the source grid ({source.describe_grid()});"
            f" resample it onto the source before writing {target}"
        )
    arr = np.asarray(mask.array)
    present = {int(v) for v in np.unique(arr)} - {0}
    missing = sorted(present - {int(k) for k in labels})
    if missing:
        raise InputError(f"mask holds labels {missing} that have no name in labels={dict(labels)}")
    return arr


def write_dicom_seg(
    mask: Volume,
    source: Volume,
    path: str | os.PathLike[str],
    labels: Mapping[int, str],
    *,
    series_description: str = "resunet segmentation",
    series_number: int = 900,
    algorithm_name: str = "resunet",
    algorithm_version: str = __version__,
    model_sha256: str | None = None,
    uid_seed: str | None = None,
    segment_codes: Mapping[str, SegmentCoding] | None = None,
    reviewer: str | None = None,
    derived_from: Sequence[Dataset] | None = None,
) -> Path:
    """Write ``mask`` as a DICOM SEG (BINARY, one segment per label) referencing ``source``'s series.

    Args:
        mask: label map on exactly ``source``'s grid (``source.with_array(labels)``), values 0..N.
        source: the DICOM volume the mask was made for (from :func:`resunet.io.load_study`).
        path: output file (``.dcm``), written atomically.
        labels: label value -> name, e.g. ``{1: "brain"}``; 0 is background and not written. DICOM
            numbers segments 1..N without gaps, so label values are renumbered in increasing order
            (``{2: "liver", 5: "spleen"}`` become segments 1 and 2); :func:`read_dicom_seg` returns
            segment numbers and ``meta["labels"]`` names them.
        series_description, series_number: of the new SEG series.
        algorithm_name, algorithm_version: AlgorithmIdentificationSequence (family: AI), with
            ``model_sha256`` in its AlgorithmParameters; every segment is AUTOMATIC, and the
            dataset gets a ContributingEquipmentSequence (IHE AI Results: who made the SEG).
        uid_seed: the new series and instance UIDs follow from this seed and the content
            (:func:`resunet.io.dicom_headers.derived_uids`; a service job's id, so a redone job
            writes the same SEG); None: new random UIDs.
        segment_codes: label name -> category/type, winning over :mod:`resunet.io.dicom_codes`'s
            table; None: the model card's ``label_codes`` that the Predictor puts in
            ``mask.meta["label_codes"]`` (:func:`resunet.io.dicom_codes.codes_from_model_card`).
        reviewer: a person corrected the model's mask (the review loop, :mod:`resunet.inference.review`):
            every segment is SEMIAUTOMATIC instead of AUTOMATIC and ContentCreatorName is this name.
        derived_from: headers of other instances this SEG is derived from (the model's SEG that the
            reviewer corrected): recorded as further source images (highdicom ``further_source_images``:
            in ReferencedSeriesSequence and SourceImageSequence, not used for the geometry).

    Raises:
        GeometryError: the mask is not on the source grid.
        InputError: the source is not DICOM, the mask holds labels missing from ``labels``, two
            source images share a SOP Instance UID, or the sources lack a study/series/SOP class UID.

    Source headers missing Type 2 patient/study attributes (anonymised studies) are written with
    those attributes empty (:func:`resunet.io.dicom_headers.with_type2_defaults`, on copies).
    """
    import highdicom as hd  # imported here: ~0.6 s, only needed when writing a SEG

    arr = check_mask_on_source(mask, source, labels, "a DICOM SEG")
    # anonymised sources lack Type 2 patient/study attributes that highdicom copies: fill them with
    # empty values on copies (the user's files and the kept headers are never changed)
    datasets = [with_type2_defaults(ds) for ds in _source_datasets(source)]
    _check_source_uids(datasets, source)
    frames = source.meta.get("frames") or [None] * source.shape[2]
    segment_numbers = sorted(int(k) for k in labels if int(k) > 0)
    # highdicom wants segment numbers 1..N without gaps for a label-map style array
    relabel = {old: new for new, old in enumerate(segment_numbers, start=1)}
    lut = np.zeros(max(int(arr.max()), max(segment_numbers, default=0)) + 1, dtype=np.uint8)
    for old, new in relabel.items():
        lut[old] = new
    planes = lut[arr.astype(np.int64)].transpose(2, 1, 0)  # (K, rows, cols)

    if frames[0] is not None:  # multi-frame source: frame order of the file
        n_frames = int(datasets[0].get("NumberOfFrames", 1))
        pixel_array = np.zeros((n_frames, planes.shape[1], planes.shape[2]), dtype=np.uint8)
        for k, f in enumerate(frames):
            pixel_array[f] = planes[k]
        source_images = datasets[:1]
    else:  # single-frame source: one SEG frame per source image, in slice order
        pixel_array = np.ascontiguousarray(planes)
        source_images = datasets
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=str(algorithm_version),
        parameters={"model_sha256": model_sha256} if model_sha256 else None,
    )
    if segment_codes is None:  # the model card's codes, carried by the Predictor's mask
        segment_codes = codes_from_model_card({"label_codes": mask.meta.get("label_codes")})
    descriptions = []
    for num in segment_numbers:
        coding = segment_coding(str(labels[num]), segment_codes)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=relabel[num],
            segment_label=str(labels[num])[:64],
            segmented_property_category=coding.category,
            segmented_property_type=coding.type,
            algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if reviewer is None
                            else hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC),
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*label_colour(num)),  # colour of the label value
        ))
    series_uid, sop_uid = (hd.UID(), hd.UID()) if uid_seed is None else derived_uids(
        "SEG", uid_seed, datasets, arr, sorted((int(k), str(v)) for k, v in labels.items()), model_sha256,
        algorithm_name, algorithm_version, series_description,
        *([reviewer or "", *(str(ds.get("SOPInstanceUID", "")) for ds in derived_from or ())]
          if reviewer is not None or derived_from else []))  # a model's SEG keeps the UIDs it always had
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="resunet",
        manufacturer_model_name=algorithm_name,
        software_versions=str(algorithm_version),
        device_serial_number="0",
        series_description=series_description,
        # Type 2 (Content Identification macro): the reviewer who corrected it, else empty (an algorithm made it)
        content_creator_name=_person_name(reviewer),
        omit_empty_frames=bool(arr.any()),  # all background: keep the frames (omitting every one would leave none)
        further_source_images=list(derived_from) if derived_from else None,
    )
    seg.ContributingEquipmentSequence = contributing_equipment(algorithm_name, str(algorithm_version), model_sha256)
    p = Path(path)
    with atomic_path(p) as tmp:
        seg.save_as(tmp)
    return p


def _person_name(name: str | None) -> str:
    """A reviewer's name as a DICOM PN: as given when it has components (``Doe^Jane``), else the one name as
    the family name with a trailing caret (``alice^``, as highdicom asks for single-component names)."""
    text = str(name or "").strip()[:63]
    return text if not text or "^" in text else text + "^"


def read_dicom_seg(path: str | os.PathLike[str], source: Volume) -> Volume:
    """Read a DICOM SEG onto ``source``'s grid: a label map (segment number per voxel, uint8/uint16).

    Raises:
        InputError: not a readable SEG, or it does not reference ``source``'s images.
    """
    import highdicom as hd

    p = Path(path)
    try:
        seg = hd.seg.segread(str(p))
    except Exception as err:  # highdicom/pydicom raise several kinds on a non-SEG or broken file
        raise InputError(f"{p}: not a readable DICOM SEG ({type(err).__name__}: {err})") from None
    datasets = _source_datasets(source)
    frames = source.meta.get("frames") or [None] * source.shape[2]
    referenced = {str(uids[2]) for uids in seg.get_source_image_uids()}
    if not referenced & {str(ds.SOPInstanceUID) for ds in datasets}:
        raise InputError(
            f"{p}: this SEG does not fit the given source series (it references none of its images;"
            f" source series {source.meta.get('series_uid')})"
        )
    try:
        if frames[0] is not None:
            uid = str(datasets[0].SOPInstanceUID)
            planes = seg.get_pixels_by_source_frame(
                uid,
                source_frame_numbers=[int(f) + 1 for f in frames],
                combine_segments=True,
                assert_missing_frames_are_empty=True,
            )
        else:
            by_file = {}
            for f, ds in zip(dict.fromkeys(source.meta["dicom_files"]), datasets):
                by_file[f] = str(ds.SOPInstanceUID)
            uids = [by_file[f] for f in source.meta["dicom_files"]]
            planes = seg.get_pixels_by_source_instance(
                uids, combine_segments=True, assert_missing_frames_are_empty=True
            )
    except (KeyError, ValueError, RuntimeError, AttributeError) as err:
        raise InputError(f"{p}: this SEG does not fit the given source series ({err})") from None
    array = np.ascontiguousarray(np.asarray(planes).transpose(2, 1, 0))
    array = array.astype(np.uint8 if array.max(initial=0) <= 255 else np.uint16)
    labels = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    return source.with_array(array, is_label=True, labels=labels, seg_file=str(p), format="dicom-seg")
