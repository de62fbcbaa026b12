"""The service's review loop (``resunet serve --require-review``): decide on a held job, then send.

A ``pacs-pull`` or ``dicom-series`` job of a service started with ``--require-review`` finishes with its
outputs held (review state ``pending``, nothing sent; :mod:`resunet.serve.pacs_jobs`). A person then
``POST /v1/jobs/{id}/review`` with ``decision=approve|reject``, a comment and optionally a corrected
mask; :func:`review_job` does the rest with :mod:`resunet.inference.review`:

- the corrected mask (NIfTI on the input's grid, the model's label values) is checked, written as
  NIfTI and as a corrected DICOM SEG (SEMIAUTOMATIC, ContentCreatorName the reviewer, a new series
  referencing the model's SEG) into ``STATE/jobs/<id>/review/``;
- approve sends the approved SEG (the corrected one if given, else the model's SEG with its RTSTRUCT/SR)
  to where the job would have sent it: the PACS it came from (STOW-RS, or C-STORE to a ``dimse://``
  archive) or ``--store-to``; reject sends nothing and keeps the comment as the reason;
- the decision is recorded once in the audit log (kind ``review``, run id ``review-<job id>``, user =
  the token's name) and on the job (``GET /v1/jobs/{id}`` shows ``review``).

A failed send (archive down) records nothing: the job stays pending and the reviewer can try again
(the corrected SEG's UIDs follow from the job and its content, so the archive keeps it once).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from resunet.errors import InputError, PacsError
from resunet.io.hashing import sha256_file
from resunet.inference.review import (Decision, check_decision, mask_sha256, read_correction, record_decision,
                                      voxels_changed, write_comparison, write_corrected)

#: one decision at a time per service (the send and the audit record of two reviewers must not interleave)
_LOCK = threading.Lock()
#: one writer of a job's display files at a time (two page sessions opening the same job)
_DISPLAY_LOCK = threading.Lock()
#: the job's outputs sent when the model's result is approved as it is
SENT_OUTPUTS = ("seg", "rtstruct", "sr")


class NotPending(InputError):
    """The job is not waiting for a review (never held, or already decided): HTTP 409."""


def _source_folder(service: Any, job: Any) -> Path:
    if job.kind == "pacs-pull":
        return service.job_dir(job.id) / "input" / "study"
    return Path(job.input_path or service.job_dir(job.id) / "input")


def _input_sha256(job_dir: Path) -> str | None:
    """The segmented input's SHA-256 as the batch runner recorded it (PACS jobs fetch their input)."""
    import json

    from resunet.inference.records import SUMMARY

    try:
        doc = json.loads((job_dir / "out" / SUMMARY).read_text(encoding="utf-8"))
        return ((doc.get("cases") or [{}])[0].get("input") or {}).get("sha256")
    except (OSError, ValueError, AttributeError, IndexError):
        return None


def _job_labels(job_dir: Path) -> dict[int, str]:
    """The model's foreground labels (value -> name) from the job's predictions JSON; {} when unreadable."""
    import json

    from resunet.inference.records import SUMMARY

    try:
        raw = json.loads((job_dir / "out" / SUMMARY).read_text(encoding="utf-8"))["model"]["labels"]
        return {int(k): str(v) for k, v in raw.items() if int(k) > 0}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _send(files: list[Path], send: dict[str, Any] | None) -> dict[str, Any] | None:
    """Send ``files`` as the held job would have (``send`` from :mod:`resunet.serve.pacs_jobs`); PacsError."""
    if not send or not files:
        return None
    if send.get("to") == "pacs":
        url, study_uid = str(send["url"]), str(send["study_uid"])
        if url.startswith(("dimse://", "dimses://")):
            from resunet.pacs.dimse import Destination, send_files
            from resunet.pacs.dimse_qr import DimseSource

            from resunet.pacs.dimse_qr import QueryConfig

            src = DimseSource.parse(url)
            tls = QueryConfig(tls_ca=send.get("tls_ca"), tls_cert=send.get("tls_cert"), tls_key=send.get("tls_key"))
            send_files(files, Destination(src.host, src.port, src.ae_title), calling_aet=str(send.get("ae_title") or "RESUNET"),
                       ssl_context=tls.ssl_context(src))
        else:
            from resunet.pacs import PacsClient, PacsConfig

            PacsClient(PacsConfig.from_env(url)).store(files, study_uid)
        return {"url": url, "study_uid": study_uid, "files": [p.name for p in files]}
    from resunet.pacs.dimse import Destination, send_files

    from resunet.serve.pacs_jobs import store_ssl_context

    dest = str(send["destination"])
    send_files(files, Destination.parse(dest), calling_aet=str(send.get("ae_title") or "RESUNET"),
               ssl_context=store_ssl_context(send.get("tls")))
    return {"destination": dest, "files": [p.name for p in files]}


def load_for_review(service: Any, job: Any) -> tuple[Any, Any, dict[int, str], Path | None]:
    """What a reviewer looks at: the segmented input, the model's mask on its grid, the labels, the model's SEG.

    Returns ``(source Volume, model mask Volume (uint8, the model's label values), {value: name}, SEG path or
    None)``. Raises InputError when the job has neither a NIfTI mask nor a SEG (ResunetError from the reader
    when its input is unreadable).
    """
    from resunet.io import load_study, read_dicom_seg, read_nifti

    job_dir = service.job_dir(job.id)
    source = load_study(_source_folder(service, job), series_uid=(job.result or {}).get("series_uid"))
    seg_rec, mask_rec = job.outputs.get("seg"), job.outputs.get("mask")
    model_seg = job_dir / seg_rec["path"] if seg_rec else None
    labels = _job_labels(job_dir)  # the model's label values, as in the NIfTI mask the reviewer edits
    if mask_rec:
        model_arr = np.asarray(read_nifti(job_dir / mask_rec["path"]).array)
    elif model_seg is not None:  # SEG segments are numbered 1..N: back to the label values
        seg_mask = read_dicom_seg(model_seg, source)
        if not labels:
            labels = {int(k): str(v) for k, v in seg_mask.meta["labels"].items()}
        lut = np.zeros(max(int(np.asarray(seg_mask.array).max()), len(labels)) + 1, dtype=np.uint16)
        for n, value in enumerate(sorted(labels), start=1):
            lut[n] = value
        model_arr = lut[np.asarray(seg_mask.array).astype(np.int64)]
    else:
        raise InputError(f"job {job.id} has neither a mask nor a SEG to review")
    if not labels:
        labels = {int(v): f"label {int(v)}" for v in np.unique(model_arr) if int(v) > 0} or {1: "label 1"}
    model_mask = source.with_array(model_arr.astype(np.uint8), is_label=True)  # on the input's grid
    return source, model_mask, labels, model_seg


def review_job(service: Any, job: Any, decision: str, reviewer: str, comment: str = "",
               corrected: tuple[str | None, BinaryIO] | None = None, via: str | None = None) -> dict[str, Any]:
    """Decide on a held job; returns the job's new ``review`` record.

    Args:
        service: the :class:`resunet.serve.service.Service`.
        job: the job (state done, review pending).
        decision: ``approve`` or ``reject``.
        reviewer: the person deciding: the token's name, or the signed-in web page user the page's admin
            token speaks for (``via``).
        comment: free text; a rejection's reason.
        corrected: ``(file name, stream)`` of a corrected NIfTI label map on the input's grid, or None.
        via: the token's name when it records the decision on behalf of ``reviewer`` (the web page); kept
            in the job's review record and the audit provenance.

    Raises:
        NotPending: the job is not waiting for a review.
        GeometryError / InputError: the corrected mask does not fit (another grid, unknown labels, not NIfTI).
        PacsError: the approved SEG could not be sent (nothing recorded; try again).
    """
    from resunet.reports.provenance import collect_provenance

    decision = check_decision(decision, reviewer)
    with _LOCK:
        job = service.queue.get(job.id) or job
        if job.review_state != "pending":
            why = "is not held for review" if not job.review_state else f"was already {job.review_state}"
            raise NotPending(f"job {job.id} {why}; only a job in state review can be approved or rejected")
        if job.purged_at is not None:
            raise NotPending(f"the files of job {job.id} were deleted; it can no longer be reviewed")
        job_dir = service.job_dir(job.id)
        folder = job_dir / "review"
        if folder.exists():  # a decision cut short (failed send, killed service): redone from the start
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        source, model_mask, labels, model_seg = load_for_review(service, job)
        files: dict[str, Path] = {}
        fixed = None
        if corrected is not None:
            name, stream = corrected
            shown = Path(name or "mask.nii.gz").name
            if not shown.lower().endswith((".nii", ".nii.gz")):
                raise InputError(f"corrected mask {shown}: not a NIfTI file name; send the corrected label map "
                                 "as .nii.gz or .nii")
            upload = folder / ("upload.nii" if shown.lower().endswith(".nii") else "upload.nii.gz")
            with open(upload, "wb") as fh:
                shutil.copyfileobj(stream, fh)
            try:
                fixed = read_correction(upload, model_mask, labels, name=shown)
            finally:
                upload.unlink(missing_ok=True)
            model_info = (job.result or {}).get("model") or {}
            files = write_corrected(fixed, source, folder, labels, reviewer=reviewer, model_seg=model_seg,
                                    model_name=str(model_info.get("name") or "resunet"),
                                    model_sha256=model_info.get("sha256"), uid_seed=f"resunet serve review {job.id}",
                                    rtstruct="rtstruct" in job.outputs, approved=decision == "approve")
            comparison = write_comparison(model_mask, fixed, labels, folder)  # how much the reviewer changed
            if comparison is not None:
                files["comparison"] = comparison
        sent = None
        if decision == "approve":
            held = job.review.get("send")
            if "seg" in files:  # the corrected SEG (and RTSTRUCT); the model's SR describes the uncorrected mask
                to_send = [files[k] for k in ("seg", "rtstruct") if k in files]
            elif corrected is not None:
                to_send = []  # not a DICOM study: nothing to send
            else:
                to_send = [job_dir / job.outputs[k]["path"] for k in SENT_OUTPUTS if k in job.outputs]
            try:
                sent = _send(to_send, held)
            except PacsError:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        record = Decision(
            subject=job.id, decision=decision, reviewer=reviewer, comment=str(comment or ""),
            input_sha256=job.input_sha256 or _input_sha256(job_dir),
            model_mask_sha256=mask_sha256(model_mask),
            corrected_mask_sha256=mask_sha256(fixed) if fixed is not None else None,
            voxels_changed=voxels_changed(model_mask, fixed if fixed is not None else model_mask, labels))
        if service.config.audit_db is not False:
            from resunet.reports.audit import run_recorded

            db = service.audit_target()
            if run_recorded(record.run_id, db):  # recorded before a kill cut the decision short: keep that one
                db = False
        else:
            db = False
        prov = collect_provenance(command=["resunet", "serve", "review", job.id], run_id=record.run_id)
        prov["model"] = (job.result or {}).get("model") or {}
        # "name", not "path": the input is the archive's study (or a received series), not a file audit verify re-hashes
        prov["files"] = {"input": [{"name": job.input_name, "sha256": record.input_sha256}]}
        prov["job"] = {"id": job.id, "kind": job.kind, **({"decided_via": via} if via else {})}
        files["record"] = record_decision(record, folder, prov, db_path=db, files=files)
        review = {**job.review, "state": "approved" if decision == "approve" else "rejected",
                  "reviewer": reviewer, **({"via": via} if via else {}), "comment": record.comment, "decided_utc": record.time_utc,
                  "voxels_changed": record.voxels_changed, "corrected": fixed is not None,
                  "model_mask_sha256": record.model_mask_sha256, "corrected_mask_sha256": record.corrected_mask_sha256,
                  "outputs": {**{k: {**o, "path": f"review/{o['path']}"} for k, o in record.outputs.items()},
                              "record": {"path": f"review/{files['record'].name}", "sha256": sha256_file(files["record"]),
                                         "size_bytes": files["record"].stat().st_size}},
                  "audit_run_id": record.run_id if service.config.audit_db is not False else None,
                  **({"sent": sent} if sent else {})}
        if not service.queue.decide(job.id, review):
            raise NotPending(f"job {job.id} was decided by someone else a moment ago")
        return review


#: what ``GET /v1/jobs/{id}/review/display/{key}`` serves: the segmented input and the model's mask, as NIfTI
DISPLAY_FILES = {"image": "image.nii.gz", "mask": "model_mask.nii.gz"}


def display_file(service: Any, job: Any, key: str) -> Path:
    """The job's input volume (``image``) or the model's mask on its grid (``mask``) as NIfTI, for a viewer.

    Written once into ``STATE/jobs/<id>/display/`` (atomically, 0600 like the job's other files) and
    served from there; a job's input may be a DICOM study on the service's disk, which a web page cannot
    read, and a SEG-only job has no NIfTI mask. Raises InputError for an unknown ``key``.
    """
    from resunet.io import write_mask_nifti, write_nifti

    if key not in DISPLAY_FILES:
        raise InputError(f"no display file {key!r}; use one of {', '.join(DISPLAY_FILES)}")
    folder = service.job_dir(job.id) / "display"
    target = folder / DISPLAY_FILES[key]
    with _DISPLAY_LOCK:
        if not target.is_file():
            source, model_mask, _labels, _seg = load_for_review(service, job)
            folder.mkdir(mode=0o700, exist_ok=True)
            # the source's voxels unchanged; the mask with the label intent
            write_nifti(source, folder / DISPLAY_FILES["image"])
            write_mask_nifti(model_mask, folder / DISPLAY_FILES["mask"])
    return target
