"""A person's review of a model's mask: approve or reject it, optionally with a corrected mask.

The service's ``--require-review`` loop (:mod:`resunet.serve.review`) calls this; so can any other
front door. One decision is:

- checked: ``approve`` or ``reject``, a reviewer's name, a corrected mask (NIfTI label map) only on
  the input's grid and only with the model's label values (:func:`read_correction`);
- written into its own folder (``review/``): the corrected mask as NIfTI and as a DICOM SEG that says
  a person made it (SegmentAlgorithmType SEMIAUTOMATIC, ContentCreatorName the reviewer, a new series
  that references the model's SEG as a further source, :func:`resunet.io.seg.write_dicom_seg`), and
  ``review.json`` (the decision, hashes of the input, model mask and corrected mask, voxels changed
  per label, the provenance with its run id);
- recorded once in the audit log (:func:`resunet.reports.audit.record_run`, kind ``review``, run id
  ``review-<id>``), whose outputs hold ``review.json``'s hash: ``resunet audit verify DIR/review``
  re-hashes the files and checks ``review.json`` against the log, ``resunet audit log`` checks the chain.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resunet.errors import GeometryError, InputError, ResunetError
from resunet.io.atomic import atomic_write_text
from resunet.io.hashing import sha256_file
from resunet.io.volume import Volume

#: the decisions a reviewer can make
DECISIONS = ("approve", "reject")
#: the file of a decision in its folder (``resunet audit verify`` reads it, see resunet.reports.audit)
REVIEW_JSON = "review.json"
CORRECTED_NIFTI = "corrected.nii.gz"
CORRECTED_SEG = "corrected.seg.dcm"
CORRECTED_RTSTRUCT = "corrected.rtstruct.dcm"
#: model mask vs corrected mask per label (volumes, Dice, HD95): :func:`write_comparison`
COMPARISON_CSV = "comparison.csv"


class AlreadyDecided(InputError):
    """The subject was already approved or rejected: the audit log keeps one decision per subject.

    The message is for the person deciding (what happened, what to do), with no file or database path.
    """

    def __init__(self, subject: str) -> None:
        run_id = f"review-{subject}"
        super().__init__(
            f"this result was already approved or rejected (audit log run {run_id}); a decision is recorded once "
            "and the first one stands. To decide again, segment the study again and review the new result.")
        self.run_id = run_id


def check_not_decided(subject: str, db_path: Any = None) -> None:
    """Raise :class:`AlreadyDecided` when the audit log (None: the default one; False: none) holds a
    decision on ``subject``; call it before writing a decision's files."""
    if db_path is False:
        return
    from resunet.reports.audit import run_recorded

    if run_recorded(f"review-{subject}", db_path):
        raise AlreadyDecided(subject)


@dataclass
class Decision:
    """One review decision.

    Attributes:
        subject: what was reviewed (a service job id, a case id); names the audit run ``review-<subject>``.
        decision: ``approve`` or ``reject``.
        reviewer: the person (the service token's user, the web page's signed-in user).
        comment: free text (a rejection's reason); may be empty.
        time_utc: when the decision was made (ISO 8601, Z).
        input_sha256, model_mask_sha256, corrected_mask_sha256: the hashes of what was decided on
            (``corrected_mask_sha256`` None when the model's mask was approved or rejected as it was).
            The mask hashes are of the label array (uint8 bytes, i-j-k order) with its shape, so the same
            mask written as NIfTI or SEG has one hash.
        voxels_changed: label name -> voxels whose membership of that label the reviewer changed
            (added + removed); every label 0 without a corrected mask.
        outputs: ``{key: {"path" (relative to the review folder), "sha256", "size_bytes"}}``.
    """

    subject: str
    decision: str
    reviewer: str
    comment: str = ""
    time_utc: str = ""
    input_sha256: str | None = None
    model_mask_sha256: str | None = None
    corrected_mask_sha256: str | None = None
    voxels_changed: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return f"review-{self.subject}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_decision(decision: str, reviewer: str) -> str:
    """The decision in its canonical spelling; InputError naming the allowed values otherwise."""
    d = str(decision or "").strip().lower()
    if d not in DECISIONS:
        raise InputError(f"decision must be one of {', '.join(DECISIONS)}; got {decision!r}")
    if not str(reviewer or "").strip():
        raise InputError("a review needs the reviewer's name (the signed-in user or the token's name)")
    return d


def mask_sha256(mask: Volume) -> str:
    """SHA-256 of a label map's content: shape + uint16 voxels in i-j-k order (format independent)."""
    arr = np.ascontiguousarray(np.asarray(mask.array), dtype=np.uint16)
    return hashlib.sha256(str(arr.shape).encode() + arr.tobytes()).hexdigest()


def read_correction(path: str | Path, model_mask: Volume, labels: Mapping[int, str], name: str = "") -> Volume:
    """Read a corrected mask (NIfTI label map) and check it fits the model's mask.

    Args:
        path: the NIfTI file.
        model_mask: the model's mask (its grid is the input's).
        labels: label value -> name of the model (foreground values only are allowed besides 0).
        name: what to call the file in messages (the client's name of an upload).

    Raises:
        GeometryError: the corrected mask is on another grid (shape, spacing, orientation, origin).
        InputError: not a readable NIfTI, not a label map (fractions, negatives), or a label the model has not.
    """
    from resunet.io.nifti import read_nifti

    shown = name or Path(path).name
    try:
        vol = read_nifti(path)
    except InputError as err:  # the message names the file as the client does, not the server's path
        text = str(err).replace(str(path), shown).replace(str(Path(path).parent) + "/", "")
        text = text[len(shown) + 2:] if text.startswith(shown + ": ") else text
        raise InputError(f"corrected mask {shown}: {text}; send a NIfTI label map (.nii.gz)") from None
    if not vol.same_grid(model_mask):
        raise GeometryError(f"corrected mask {shown} is on another grid ({vol.describe_grid()}) than the input "
                            f"({model_mask.describe_grid()}); save the corrected mask on the input's grid")
    arr = np.asarray(vol.array)
    if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr != np.round(arr))):
        raise InputError(f"corrected mask {shown} is not a label map (it holds fractions or negative values); "
                         "save integer label values")
    values = {int(v) for v in np.unique(arr)} - {0}
    allowed = {int(k) for k in labels if int(k) > 0}
    extra = sorted(values - allowed)
    if extra:
        raise InputError(f"corrected mask {shown} holds labels {extra} that the model does not have "
                         f"({', '.join(f'{k}={v}' for k, v in sorted(labels.items()) if int(k) > 0)})")
    return model_mask.with_array(arr.astype(np.uint8), is_label=True)


def voxels_changed(model_mask: Volume, corrected: Volume, labels: Mapping[int, str]) -> dict[str, int]:
    """Per label name: voxels that the correction added to or removed from that label."""
    a, b = np.asarray(model_mask.array), np.asarray(corrected.array)
    if a.shape != b.shape:
        raise GeometryError(f"the corrected mask's shape {b.shape} is not the model mask's {a.shape}")
    return {str(name): int(np.count_nonzero((a == int(v)) != (b == int(v))))
            for v, name in sorted(labels.items()) if int(v) > 0}


def comparison_rows(model_mask: Volume, corrected: Volume, labels: Mapping[int, str]) -> list[dict[str, Any]]:
    """Per foreground label: volumes (mL) of the model's and the corrected mask, Dice and HD95 (mm).

    How much the reviewer changed: the evaluation package's metrics with the corrected mask as the
    reference and the model's as the prediction; None = undefined (e.g. HD95 with an empty mask).
    Raises GeometryError for oblique grids (the metrics' own rule).
    """
    from resunet.evaluation.metrics import evaluate_case

    fg = [int(k) for k in sorted(labels) if int(k) > 0]
    out = []
    for m in evaluate_case(model_mask, corrected, labels=fg):
        out.append({
            "label": m["label"], "name": str(labels[m["label"]]),
            "model_ml": round(float(m["vol_pred_ml"]), 3), "corrected_ml": round(float(m["vol_gt_ml"]), 3),
            "dice": None if m["dice"] is None else round(float(m["dice"]), 4),
            "hd95_mm": None if m["hd95"] is None else round(float(m["hd95"]), 2),
        })
    return out


def write_comparison(model_mask: Volume, corrected: Volume, labels: Mapping[int, str], folder: Path) -> Path | None:
    """Write ``comparison.csv`` (:func:`comparison_rows`) into a decision's folder; its path, or None.

    None when there is nothing to compare on the grid (an oblique grid has no surface metrics: the
    decision still counts, and the page says so). The CSV goes into the decision's outputs, so the
    audit record hashes it like the corrected mask.
    """
    import csv
    import io

    try:
        rows = comparison_rows(model_mask, corrected, labels)
    except ResunetError:  # oblique grids: no surface metrics
        return None
    if not rows:
        return None
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = Path(folder) / COMPARISON_CSV
    atomic_write_text(path, buf.getvalue())
    return path


def write_corrected(corrected: Volume, source: Volume | None, folder: Path, labels: Mapping[int, str], *,
                    reviewer: str, model_seg: Path | None = None, model_name: str = "resunet",
                    model_sha256: str | None = None, uid_seed: str | None = None, rtstruct: bool = False,
                    approved: bool = False) -> dict[str, Path]:
    """Write the corrected mask into ``folder``: ``corrected.nii.gz`` always, ``corrected.seg.dcm`` for a
    DICOM ``source`` (SEMIAUTOMATIC, ContentCreatorName ``reviewer``, referencing ``model_seg``'s instance),
    and with ``rtstruct`` ``corrected.rtstruct.dcm`` (SEMIAUTOMATIC ROIs, ROIInterpreter the reviewer,
    ApprovalStatus APPROVED with ReviewerName when ``approved``).

    Returns ``{"mask": path, "seg": path, "rtstruct": path}`` (``seg``/``rtstruct`` only for DICOM sources).
    """
    import pydicom

    from resunet.io.nifti import write_mask_nifti
    from resunet.io.seg import write_dicom_seg

    folder.mkdir(parents=True, exist_ok=True)
    out = {"mask": write_mask_nifti(corrected, folder / CORRECTED_NIFTI)}
    if source is not None and source.meta.get("format") == "dicom":
        derived = [pydicom.dcmread(model_seg, stop_before_pixels=True)] if model_seg else None
        out["seg"] = write_dicom_seg(
            source.with_array(np.asarray(corrected.array), is_label=True), source, folder / CORRECTED_SEG,
            {int(k): str(v) for k, v in labels.items() if int(k) > 0},
            series_description=f"resunet segmentation corrected by {reviewer}"[:64], series_number=901,
            algorithm_name=model_name, model_sha256=model_sha256, uid_seed=uid_seed, reviewer=reviewer,
            derived_from=derived)
        if rtstruct:
            from resunet.io.rtstruct import write_rtstruct

            out["rtstruct"] = write_rtstruct(
                source.with_array(np.asarray(corrected.array), is_label=True), source, folder / CORRECTED_RTSTRUCT,
                {int(k): str(v) for k, v in labels.items() if int(k) > 0},
                series_description=f"resunet contours corrected by {reviewer}"[:64], series_number=902,
                algorithm_name=model_name, model_sha256=model_sha256, uid_seed=uid_seed, reviewer=reviewer,
                approved=approved)
    return out


def record_decision(decision: Decision, folder: Path, provenance: Mapping[str, Any],
                    db_path: Any = None, files: Mapping[str, Path] | None = None) -> Path:
    """Write ``folder/review.json`` and append the decision to the audit log (kind ``review``).

    Args:
        decision: the decision (its ``outputs`` are filled from ``files`` here).
        provenance: :func:`resunet.reports.provenance.collect_provenance`'s dict; its run id and user are
            set to the decision's.
        db_path: the audit log (None: the default one; False: none).
        files: output files written for the decision (``write_corrected``'s result).

    Returns the path of ``review.json``. Raises AlreadyDecided when the subject was already decided,
    InputError when the audit log refuses the record otherwise.
    """
    from resunet.reports.audit import RunAlreadyRecorded, record_run

    check_not_decided(decision.subject, db_path)  # before review.json: a refused decision leaves no file

    folder.mkdir(parents=True, exist_ok=True)
    decision.outputs = {k: {"path": Path(p).name, "sha256": sha256_file(p), "size_bytes": Path(p).stat().st_size}
                        for k, p in sorted((files or {}).items())}
    if not decision.time_utc:
        decision.time_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    prov = {**provenance, "run_id": decision.run_id, "user": decision.reviewer, "review": decision.to_dict()}
    doc = {"schema": "resunet-review/1", "review": decision.to_dict(), "provenance": prov}
    target = folder / REVIEW_JSON
    atomic_write_text(target, json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")
    if db_path is not False:
        outputs: Sequence[dict[str, Any]] = [
            {"path": str(target), "sha256": sha256_file(target), "key": "review"},
            *({"path": str(folder / o["path"]), "sha256": o["sha256"], "key": k} for k, o in decision.outputs.items())]
        try:
            record_run("review", prov, outputs, db_path=db_path)
        except RunAlreadyRecorded:  # decided by someone else between the check and the record
            target.unlink(missing_ok=True)
            raise AlreadyDecided(decision.subject) from None
    return target
