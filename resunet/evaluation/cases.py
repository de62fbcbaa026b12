"""Finding the cases of an evaluation: prediction and reference files matched by name or by DICOM series.

- NIfTI: ``<case>.nii.gz`` (or ``.nii``) in both folders, matched by case name.
- DICOM SEG (``<case>.seg.dcm`` as ``resunet predict`` writes it, or any ``*.dcm`` whose Modality is
  SEG): a SEG is matched with a reference of the same case name (NIfTI or SEG), else with a reference
  SEG that refers to the same image series (ReferencedSeriesSequence SeriesInstanceUID). A SEG is read
  onto the grid of the series it refers to, which must be found in ``--images`` (a folder of DICOM
  studies: folders, zips or files; see :func:`resunet.io.load_study`). A case with a NIfTI prediction
  uses it and ignores a SEG of the same case (``resunet predict`` writes both with the same content).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from resunet.errors import InputError
from resunet.io.nifti import read_nifti
from resunet.io.volume import Volume

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SEG_SUFFIXES = (".seg.dcm", ".dcm")
#: Side outputs of ``resunet predict`` that share a prediction folder but are not label masks.
_NOT_MASKS = re.compile(r"\.(prob(-[^.]+)?|uncertainty(-models)?)$")


def case_name(path: Path) -> str | None:
    """``"case01"`` for ``case01.nii.gz`` / ``case01.nii``; None for other files."""
    for suf in NIFTI_SUFFIXES:
        if path.name.endswith(suf) and len(path.name) > len(suf):
            return path.name[: -len(suf)]
    return None


def _folder(folder: str | os.PathLike[str], role: str) -> Path:
    d = Path(folder)
    if not d.is_dir():
        raise InputError(f"{role} folder {d} does not exist or is not a folder")
    return d


def list_cases(folder: str | os.PathLike[str], role: str) -> dict[str, Path]:
    """``{case: path}`` of the NIfTI files directly in ``folder``.

    ``resunet predict``'s probability and uncertainty maps (``<case>.prob.nii.gz``,
    ``<case>.prob-<label>.nii.gz``, ``<case>.uncertainty.nii.gz``, ``<case>.uncertainty-models.nii.gz``) are not
    cases and are skipped.

    Raises:
        InputError: ``folder`` is missing or not a folder, or two files map to one case name.
    """
    d = _folder(folder, role)
    out: dict[str, Path] = {}
    for p in sorted(d.iterdir()):
        name = case_name(p)
        if name is None or not p.is_file() or name.startswith(".") or _NOT_MASKS.search(name):
            continue
        if name in out:
            raise InputError(f"{role} folder {d} holds both {out[name].name} and {p.name} for case {name!r}; keep one")
        out[name] = p
    return out


def list_segs(folder: str | os.PathLike[str], role: str) -> dict[str, tuple[Path, str]]:
    """``{case: (path, referenced SeriesInstanceUID)}`` of the DICOM SEG files directly in ``folder``."""
    import pydicom

    d = _folder(folder, role)
    out: dict[str, tuple[Path, str]] = {}
    for p in sorted(d.iterdir()):
        if not (p.is_file() and p.name.lower().endswith(".dcm")):
            continue
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        except Exception:  # not DICOM at all: not a SEG, not our business here
            continue
        if str(ds.get("Modality", "")) != "SEG":
            continue
        refs = ds.get("ReferencedSeriesSequence") or []
        if not refs or "SeriesInstanceUID" not in refs[0]:
            raise InputError(f"DICOM SEG {p} names no referenced series (ReferencedSeriesSequence); cannot place it")
        low = p.name.lower()
        name = p.name[: -len(".seg.dcm")] if low.endswith(".seg.dcm") else p.name[: -len(".dcm")]
        out[name] = (p, str(refs[0].SeriesInstanceUID))
    return out


@dataclass
class CaseMatch:
    """Cases found in both folders, and those found in only one (reported, never silently dropped).

    Attributes:
        pairs: ``(case, prediction file, reference file)``; a file is NIfTI or DICOM SEG.
        pred_only, gt_only: case names found on one side only.
        sources: for cases with a DICOM SEG on either side, ``(DICOM study path, series key)`` of the
            image series the SEG refers to (pass to :func:`resunet.io.load_study`).
    """

    pairs: list[tuple[str, Path, Path]] = field(default_factory=list)
    pred_only: list[str] = field(default_factory=list)
    gt_only: list[str] = field(default_factory=list)
    sources: dict[str, tuple[Path, str]] = field(default_factory=dict)


def _series_index(images_dir: Path) -> dict[str, tuple[Path, str]]:
    """``{SeriesInstanceUID: (study path, series key)}`` for every DICOM study directly in ``images_dir``."""
    from resunet.io.loader import list_series

    index: dict[str, tuple[Path, str]] = {}
    for p in sorted(images_dir.iterdir()):
        if case_name(p) is not None:
            continue  # NIfTI images carry no series UID
        try:
            series = list_series(p)
        except InputError:
            continue  # not a DICOM study
        for s in series:
            index.setdefault(s.series_instance_uid or s.uid, (p, s.uid))
    return index


def match_cases(
    pred_dir: str | os.PathLike[str],
    gt_dir: str | os.PathLike[str],
    images_dir: str | os.PathLike[str] | None = None,
) -> CaseMatch:
    """Match prediction and reference files (see the module docstring for the rules).

    Args:
        pred_dir: folder of predictions (NIfTI and/or DICOM SEG).
        gt_dir: folder of references (NIfTI and/or DICOM SEG).
        images_dir: folder of the DICOM studies that SEG files refer to (needed only with SEG files).

    Raises:
        InputError: a folder is missing, no case is present in both folders, or a SEG's series is
            not found in ``images_dir``.
    """
    preds: dict[str, Path] = dict(list_cases(pred_dir, "prediction"))
    gts: dict[str, Path] = dict(list_cases(gt_dir, "reference"))
    pred_segs = {c: v for c, v in list_segs(pred_dir, "prediction").items() if c not in preds}
    gt_segs = {c: v for c, v in list_segs(gt_dir, "reference").items() if c not in gts}
    seg_series: dict[str, str] = {}  # case -> referenced SeriesInstanceUID
    for c, (p, uid) in gt_segs.items():
        gts[c] = p
        seg_series[c] = uid
    gt_by_series = {uid: c for c, (_, uid) in gt_segs.items()}
    for c, (p, uid) in pred_segs.items():
        if c not in gts and uid in gt_by_series and gt_by_series[uid] not in preds:
            # matched through the referenced series: take the reference's case name
            c = gt_by_series[uid]
        if c in preds:
            continue
        preds[c] = p
        seg_series[c] = uid
    common = sorted(set(preds) & set(gts))
    m = CaseMatch(
        pairs=[(c, preds[c], gts[c]) for c in common],
        pred_only=sorted(set(preds) - set(gts)),
        gt_only=sorted(set(gts) - set(preds)),
    )
    if not m.pairs:
        raise InputError(
            f"no case is in both {pred_dir} ({len(preds)} masks) and {gt_dir} ({len(gts)} masks); "
            "cases are matched by file name <case>.nii.gz (DICOM SEG: <case>.seg.dcm or the referenced series)"
        )
    need = {c: seg_series[c] for c in common if c in seg_series}
    if need:
        if images_dir is None or not Path(images_dir).is_dir():
            raise InputError(
                f"{len(need)} case(s) ({', '.join(sorted(need)[:3])}...) have DICOM SEG masks; pass --images DIR "
                "holding the DICOM series they refer to"
            )
        index = _series_index(Path(images_dir))
        for c, uid in need.items():
            if uid not in index:
                raise InputError(
                    f"case {c}: the DICOM SEG refers to series {uid}, which is not in {images_dir}; "
                    "put that DICOM study there (folder, .zip or file)"
                )
            m.sources[c] = index[uid]
    return m


def read_mask(path: str | os.PathLike[str]) -> Volume:
    """Read a NIfTI file (mask or image) as a :class:`Volume` (``resunet.io.nifti.read_nifti``)."""
    return read_nifti(path)


def is_seg_path(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(".dcm")


def _seg_to_label_values(seg: Volume, label_names: dict[int, str] | None) -> Volume:
    """Map a SEG's segment numbers back to label values through the segment names.

    DICOM numbers segments 1..N without gaps, so ``{2: "liver", 5: "spleen"}`` is stored as segments 1
    and 2; with the label names (from predictions.json) the original values are restored. Without
    names, or when a name is unknown or ambiguous, segment numbers are kept.
    """
    import numpy as np

    seg_names = seg.meta.get("labels") or {}
    by_name: dict[str, list[int]] = {}
    for value, name in (label_names or {}).items():
        by_name.setdefault(name, []).append(int(value))
    mapping = {}
    for segnum, name in seg_names.items():
        values = by_name.get(name)
        if not values or len(values) != 1:
            return seg
        mapping[int(segnum)] = values[0]
    if all(k == v for k, v in mapping.items()):
        return seg
    lut = np.arange(max([*mapping, 0]) + 1, dtype=np.int64)
    for k, v in mapping.items():
        lut[k] = v
    return seg.with_array(lut[np.asarray(seg.array)], label_values_from="segment names")


def read_pair(
    pred_path: Path,
    gt_path: Path,
    source: tuple[Path, str] | None = None,
    label_names: dict[int, str] | None = None,
) -> tuple[Volume, Volume, Volume | None]:
    """Read one case: ``(prediction, reference, source image Volume or None)``.

    DICOM SEG files are read onto the grid of ``source`` (study path, series key), which is loaded
    with :func:`resunet.io.load_study` and returned as the case's image; their segment numbers are
    mapped back to label values through ``label_names`` ``{value: name}`` when given.
    """
    image = None
    if source is not None:
        from resunet.io.loader import load_study

        image = load_study(source[0], series_uid=source[1])

    def read(p: Path) -> Volume:
        if is_seg_path(p):
            from resunet.io.seg import read_dicom_seg

            if image is None:
                raise InputError(f"{p} is a DICOM SEG; its source series is needed to read it (pass --images DIR)")
            return _seg_to_label_values(read_dicom_seg(p, image), label_names)
        return read_mask(p)

    return read(pred_path), read(gt_path), image
