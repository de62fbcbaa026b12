"""Approved review corrections -> a training set (``resunet corrections export``).

A review decision (:mod:`resunet.inference.review`) lives in a folder of its own holding
``review.json`` and, when the reviewer corrected the mask, ``corrected.nii.gz`` on the input's grid.
Decisions are found under any folder given (recursively): a ``resunet serve`` state folder keeps
them in ``STATE/jobs/<job id>/review/`` beside the job's input (``input/study`` for a PACS pull,
``input/`` for a received series); any other front door's decision names its input file in its
provenance (``files.input[].path``).

:func:`export_corrections` writes every **approved** decision with a corrected mask (rejected ones
never; an approval of the model's mask as it was teaches the model nothing and is skipped) as one
case of an MSD dataset::

    DATASET/dataset.json            MSD description (labels and channel of the model that was reviewed)
    DATASET/imagesTr/<case>.nii.gz  the input the reviewer saw (DICOM series converted to NIfTI)
    DATASET/labelsTr/<case>.nii.gz  the corrected mask
    DATASET/corrections.json        provenance per case: decision id, reviewer, time, model sha256,
                                    hashes of input and corrected mask, the files' sha256

The case id is ``review-<subject>`` (the decision id: a job id, never a patient's name or a file name).
Re-exporting into the same folder adds only decisions not yet there. Files are 0600, folders 0700.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from resunet.errors import DatasetError, InputError, ResunetError
from resunet.io.atomic import atomic_write_text, make_private
from resunet.io.hashing import sha256_file, sha256_path
from resunet.io.names import safe_name
from resunet.io.nifti import is_nifti_path

log = logging.getLogger(__name__)

#: the provenance file of an exported corrections dataset (read back by resunet train --init-from)
CORRECTIONS_JSON = "corrections.json"
SCHEMA = "resunet-corrections/1"
#: the decision files this module reads (resunet.inference.review writes them; names repeated here,
#: not imported, so that the training floor stays free of the inference package's imports)
REVIEW_JSON = "review.json"
REVIEW_SCHEMA = "resunet-review/1"


@dataclass
class ExportResult:
    """What :func:`export_corrections` did.

    Attributes:
        out: the dataset folder.
        added: case ids written now.
        kept: case ids already in the dataset (skipped: re-export is idempotent).
        skipped: ``(decision id, reason)`` of decisions not exported (rejected, no correction, input gone, ...).
    """

    out: Path
    added: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def find_decisions(sources: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Every ``review.json`` under ``sources`` (folders searched recursively, or the files themselves), sorted.

    Raises:
        InputError: a source does not exist.
    """
    found: set[Path] = set()
    for src in sources:
        p = Path(src)
        if p.is_file() and p.name == REVIEW_JSON:
            found.add(p.resolve())
        elif p.is_dir():
            found.update(f.resolve() for f in p.rglob(REVIEW_JSON) if f.is_file())
        else:
            raise InputError(f"--from {src}: no such folder (give a resunet serve state folder or a folder of "
                             "review decisions)")
    return sorted(found)


def _input_path(doc: dict[str, Any], review_dir: Path) -> Path | None:
    """The input the reviewer decided on: the provenance's input file, else the service job's input folder."""
    for item in ((doc.get("provenance") or {}).get("files") or {}).get("input") or []:
        path = (item or {}).get("path")
        if path and Path(path).exists():
            return Path(path)
    job_dir = review_dir.parent
    for cand in (job_dir / "input" / "study", job_dir / "input"):
        if cand.is_dir() and any(cand.iterdir()):
            entries = [e for e in cand.iterdir() if not e.name.startswith(".")]
            if len(entries) == 1 and is_nifti_path(entries[0]):  # an uploaded NIfTI scan
                return entries[0]
            return cand
    return None


def _same_input(src: Path, expected: str) -> bool:
    """Whether ``src`` (or the folder holding that one file) hashes to the decision's input hash."""
    return expected in {sha256_path(src), *((sha256_path(src.parent),) if src.is_file() else ())}


def _model_labels(model: dict[str, Any], review_dir: Path, mask: Any) -> dict[str, str]:
    """The reviewed model's labels (``{"0": "background", "1": ...}``): from the decision's provenance, else the
    service job's predictions.json (``out/predictions.json``: model.labels), else the mask's values."""
    raw = model.get("labels")
    if not raw:
        try:
            doc = json.loads((review_dir.parent / "out" / "predictions.json").read_text(encoding="utf-8"))
            raw = doc["model"]["labels"]
        except (OSError, ValueError, KeyError, TypeError):
            raw = {str(int(v)): f"label {int(v)}" for v in np.unique(np.asarray(mask.array)) if int(v) > 0}
    labels = {str(int(k)): str(v) for k, v in dict(raw).items()}
    labels.setdefault("0", "background")
    return dict(sorted(labels.items(), key=lambda kv: int(kv[0])))


def read_corrections(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-case provenance records of an exported dataset (``[]`` when it has no corrections.json)."""
    path = Path(root) / CORRECTIONS_JSON
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        cases = doc["cases"]
        if doc.get("schema") != SCHEMA or not isinstance(cases, list):
            raise ValueError("not a corrections file")
        return [dict(c) for c in cases]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{path} is not a resunet corrections file ({err}); export the dataset again "
                           "into an empty folder") from None


def _check_out(out: Path) -> list[dict[str, Any]]:
    """The existing records of ``out``; DatasetError when ``out`` holds something that is not ours."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise DatasetError(f"--out {out} is a file; give a folder for the dataset")
    entries = [e.name for e in out.iterdir()]
    if not entries:
        return []
    if CORRECTIONS_JSON not in entries and set(entries) <= {"imagesTr", "labelsTr", "dataset.json"}:
        try:  # an export cut short before corrections.json: ours, redone from the start
            if json.loads((out / "dataset.json").read_text(encoding="utf-8")).get("name") == "resunet-corrections":
                return []
        except (OSError, ValueError, AttributeError):
            pass
    if CORRECTIONS_JSON not in entries:
        raise DatasetError(f"--out {out} already holds other files ({', '.join(sorted(entries)[:3])}...) and is not "
                           "a corrections dataset; give an empty or new folder")
    return read_corrections(out)


def export_corrections(sources: Iterable[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                       model: str | None = None) -> ExportResult:
    """Write every approved correction found under ``sources`` into the MSD dataset ``out``.

    Args:
        sources: folders searched for decisions (a ``resunet serve`` state folder, a review folder) or review.json files.
        out: the dataset folder (new, empty, or an earlier export: then only new decisions are added).
        model: only decisions on this model (its name as in the model card, or its sha256 or a prefix of it).

    Raises:
        InputError: a source is missing.
        DatasetError: nothing approved to export, ``out`` holds something else, or decisions of models with
            different labels are mixed (pass ``model``).
    """
    from resunet.io.loader import load_study
    from resunet.io.nifti import read_nifti, write_mask_nifti, write_nifti

    out = Path(out)
    sources = list(sources)
    decisions = find_decisions(sources)
    records = _check_out(out)
    have = {r["decision_id"]: r for r in records}
    result = ExportResult(out=out)
    labels: dict[str, str] | None = None
    channel = "MRI"
    prior = out / "dataset.json"
    if prior.exists():
        labels = json.loads(prior.read_text(encoding="utf-8")).get("labels")
    new: list[dict[str, Any]] = []
    for path in decisions:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            review = doc["review"]
            did = f"review-{review['subject']}"
        except (OSError, ValueError, KeyError, TypeError):
            result.skipped.append((str(path.parent.name), "not a resunet review.json"))
            continue
        if doc.get("schema") != REVIEW_SCHEMA:
            result.skipped.append((did, f"unknown schema {doc.get('schema')!r}"))
            continue
        prov = doc.get("provenance") or {}
        mdl = prov.get("model") or {}
        if model and model not in (mdl.get("name"), ) and not str(mdl.get("sha256") or "").startswith(model):
            result.skipped.append((did, f"made with another model ({mdl.get('name')})"))
            continue
        if review.get("decision") != "approve":
            result.skipped.append((did, "rejected"))
            continue
        mask_rec = (review.get("outputs") or {}).get("mask")
        if not review.get("corrected_mask_sha256") or not mask_rec:
            result.skipped.append((did, "approved as the model made it (no correction)"))
            continue
        case_id = safe_name(did, "review", dots=False)
        if did in have:
            result.kept.append(case_id)
            continue
        mask_path = path.parent / Path(str(mask_rec["path"])).name
        if not mask_path.is_file() or sha256_file(mask_path) != mask_rec.get("sha256"):
            result.skipped.append((did, "the corrected mask is missing or changed since the decision"))
            continue
        src = _input_path(doc, path.parent)
        if src is None:
            result.skipped.append((did, "its input is no longer there (job purged?)"))
            continue
        if review.get("input_sha256") and not _same_input(src, review["input_sha256"]):
            result.skipped.append((did, "its input changed since the decision"))
            continue
        try:
            image = load_study(src, series_uid=(prov.get("job") or {}).get("series_uid"))
            mask = read_nifti(mask_path)
        except ResunetError as err:
            result.skipped.append((did, f"unreadable ({type(err).__name__})"))
            continue
        if not mask.same_grid(image):
            result.skipped.append((did, "the corrected mask is not on the input's grid"))
            continue
        case_labels = _model_labels(mdl, path.parent, mask)
        if labels is None:
            labels = case_labels
        elif labels != case_labels:
            raise DatasetError(f"decision {did} was made with a model whose labels ({case_labels}) differ from the "
                               f"dataset's ({labels}); export one model's corrections at a time (--model NAME)")
        chans = mdl.get("channels") or []
        if chans:
            channel = str(chans[0])
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        (out / "imagesTr").mkdir(exist_ok=True, mode=0o700)
        (out / "labelsTr").mkdir(exist_ok=True, mode=0o700)
        img_path = write_nifti(image, out / "imagesTr" / f"{case_id}.nii.gz")
        arr = np.asarray(mask.array)
        lab_path = write_mask_nifti(image.with_array(arr.astype(np.uint8 if arr.max(initial=0) < 256 else np.uint16),
                                                     is_label=True), out / "labelsTr" / f"{case_id}.nii.gz")
        new.append({"case_id": case_id, "decision_id": did, "reviewer": review.get("reviewer"),
                    "time_utc": review.get("time_utc"), "comment": review.get("comment", ""),
                    "model": {"name": mdl.get("name"), "sha256": mdl.get("sha256")},
                    "input_sha256": review.get("input_sha256"), "model_mask_sha256": review.get("model_mask_sha256"),
                    "corrected_mask_sha256": review.get("corrected_mask_sha256"),
                    "voxels_changed": review.get("voxels_changed") or {},
                    "files": {"image": {"path": f"imagesTr/{case_id}.nii.gz", "sha256": sha256_file(img_path)},
                              "label": {"path": f"labelsTr/{case_id}.nii.gz", "sha256": sha256_file(lab_path)}}})
        result.added.append(case_id)
    if not records and not new:
        why = "; ".join(f"{d}: {r}" for d, r in result.skipped[:5]) or "no review.json found"
        raise DatasetError(f"nothing approved to export from {', '.join(str(s) for s in sources)} "
                           f"({len(decisions)} decision(s): {why}); approve corrected masks first")
    if new:
        cases = sorted([*records, *new], key=lambda r: r["case_id"])
        dataset = {"name": "resunet-corrections", "description": "approved review corrections (resunet corrections "
                   "export); provenance per case in corrections.json",
                   "modality": {"0": channel}, "labels": labels, "numTraining": len(cases),
                   "training": [{"image": f"./imagesTr/{c['case_id']}.nii.gz", "label": f"./labelsTr/{c['case_id']}.nii.gz"}
                                for c in cases]}
        # corrections.json last: a dataset cut short is refused or completed by the next export
        atomic_write_text(out / "dataset.json", json.dumps(dataset, indent=1) + "\n")
        atomic_write_text(out / CORRECTIONS_JSON, json.dumps(
            {"schema": SCHEMA, "exported_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": cases},
            indent=1, sort_keys=True) + "\n")
    make_private(out)
    return result
