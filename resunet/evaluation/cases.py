"""Finding the cases of an evaluation: prediction and reference files matched by file name."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from resunet.errors import InputError
from resunet.io.volume import Volume

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: Side outputs of ``resunet predict`` that share a prediction folder but are not label masks.
_NOT_MASKS = re.compile(r"\.(prob(-\d+)?|uncertainty)$")


def case_name(path: Path) -> str | None:
    """``"case01"`` for ``case01.nii.gz`` / ``case01.nii``; None for other files."""
    for suf in NIFTI_SUFFIXES:
        if path.name.endswith(suf) and len(path.name) > len(suf):
            return path.name[: -len(suf)]
    return None


def list_cases(folder: str | os.PathLike[str], role: str) -> dict[str, Path]:
    """``{case: path}`` of the NIfTI files directly in ``folder``.

    ``resunet predict``'s probability and uncertainty maps (``<case>.prob.nii.gz``,
    ``<case>.prob-<label>.nii.gz``, ``<case>.uncertainty.nii.gz``) are not cases and are skipped.

    Raises:
        InputError: ``folder`` is missing or not a folder, or two files map to one case name.
    """
    d = Path(folder)
    if not d.is_dir():
        raise InputError(f"{role} folder {d} does not exist or is not a folder")
    out: dict[str, Path] = {}
    for p in sorted(d.iterdir()):
        name = case_name(p)
        if name is None or not p.is_file() or name.startswith(".") or _NOT_MASKS.search(name):
            continue
        if name in out:
            raise InputError(f"{role} folder {d} holds both {out[name].name} and {p.name} for case {name!r}; keep one")
        out[name] = p
    return out


@dataclass
class CaseMatch:
    """Cases found in both folders, and those found in only one (reported, never silently dropped)."""

    pairs: list[tuple[str, Path, Path]] = field(default_factory=list)  # (case, prediction, reference)
    pred_only: list[str] = field(default_factory=list)
    gt_only: list[str] = field(default_factory=list)


def match_cases(pred_dir: str | os.PathLike[str], gt_dir: str | os.PathLike[str]) -> CaseMatch:
    """Match ``<case>.nii.gz`` (or ``.nii``) files of the prediction and reference folders by case name.

    Raises:
        InputError: a folder is missing, or no case is present in both folders.
    """
    preds = list_cases(pred_dir, "prediction")
    gts = list_cases(gt_dir, "reference")
    common = sorted(set(preds) & set(gts))
    m = CaseMatch(
        pairs=[(c, preds[c], gts[c]) for c in common],
        pred_only=sorted(set(preds) - set(gts)),
        gt_only=sorted(set(gts) - set(preds)),
    )
    if not m.pairs:
        raise InputError(
            f"no case is in both {pred_dir} ({len(preds)} NIfTI files) and {gt_dir} ({len(gts)} NIfTI files); "
            "cases are matched by file name <case>.nii.gz"
        )
    return m


def read_mask(path: str | os.PathLike[str]) -> Volume:
    """Read a NIfTI label mask as a :class:`Volume` (through ``resunet.io.nifti.read_nifti`` when present)."""
    try:
        from resunet.io.nifti import read_nifti
    except ImportError:  # io.nifti not in this build yet: read with nibabel directly
        return _read_nifti_nibabel(path)
    return read_nifti(path)


def _read_nifti_nibabel(path: str | os.PathLike[str]) -> Volume:
    import nibabel as nib
    import numpy as np

    try:
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types on corrupt files
        raise InputError(f"cannot read NIfTI file {path}: {err}") from err
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise InputError(f"{path}: expected a 3D mask, got shape {arr.shape}")
    return Volume(array=arr, affine=img.affine, meta={"source": str(path), "format": "nifti", "is_label": True})
