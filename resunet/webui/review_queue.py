"""The web page's "To review" list: the held jobs of a ``resunet serve --require-review``, over its REST API.

The page has no queue of its own: it lists ``GET /v1/jobs?state=review`` of the service named by the app
setting ``service_url`` (``resunet app --service URL``), shows a job's input and the model's mask
(``GET /v1/jobs/{id}/review/display/image|mask``, NIfTI) through :mod:`resunet.webui.viewer`, and sends
the person's decision to ``POST /v1/jobs/{id}/review``; the service checks it, sends the approved SEG to
the PACS and writes the audit record. The signed-in user's name goes along as ``reviewer`` (the page's
token must then be an admin token: it decides for the page's users; without a login the token's own name
is the reviewer).

The token is a secret, never a setting that is logged or written back: ``RESUNET_SERVICE_TOKEN`` in the
page's environment, else ``[resunet] service_token`` in ``.streamlit/secrets.toml``.

An opened job is shown in three views and in the page's mask editor
(:func:`resunet.webui.edit_panel.editor_panel`, the same panel as a local run's "Correct and sign off":
paint/erase/fill/delete, undo/redo, interpolate, the model-vs-corrected volumes, Dice and HD95). An
edited mask is put in ``st.session_state[CORRECTIONS][job_id]`` (a Volume on the job's input grid, the
model's label values; anything else may put one there too) and Approve sends it as the correction: the
service writes the corrected SEG (SEMIAUTOMATIC, the reviewer as ContentCreatorName) and sends it to the
PACS. Without one the model's mask is approved as it is; Reject never sends a mask.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from resunet.errors import ResunetError

#: session_state key: {job id: corrected mask Volume} that Approve sends as the correction
CORRECTIONS = "review_corrected_masks"
#: the token's environment variable (it wins over the secrets file)
TOKEN_ENV = "RESUNET_SERVICE_TOKEN"


class ReviewServiceError(ResunetError):
    """The review service could not be reached or refused a request: the message says which and what to do."""


def service_token(secrets: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The page's bearer token for the service: ``$RESUNET_SERVICE_TOKEN``, else ``[resunet] service_token``."""
    env = os.environ if env is None else env
    if env.get(TOKEN_ENV, "").strip():
        return env[TOKEN_ENV].strip()
    if secrets is None:
        from resunet.webui.auth import _secrets_dict

        secrets = _secrets_dict()
    section = secrets.get("resunet")
    token = section.get("service_token") if isinstance(section, Mapping) else None
    return str(token).strip() if token else None


@dataclass
class ServiceClient:
    """The calls the page makes to ``resunet serve`` (requests; the token in the Authorization header only).

    Args:
        url: the service's base URL (``http://host:8000``).
        token: bearer token, or None (a loopback service without tokens).
        timeout_s: seconds to wait for one answer (a decision sends to the PACS first: allow for it).
    """

    url: str
    token: str | None = None
    timeout_s: float = 120.0

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import requests

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            r = requests.request(method, self.url + path, headers=headers, timeout=self.timeout_s, **kwargs)
        except requests.Timeout:
            raise ReviewServiceError(f"the review service at {self.url} did not answer within {self.timeout_s:g} s; "
                                     "try again, or ask the operator whether it is overloaded") from None
        except requests.RequestException as err:
            raise ReviewServiceError(f"the review service at {self.url} cannot be reached ({type(err).__name__}); "
                                     "check that `resunet serve` runs there and the page's service_url") from None
        if r.status_code < 400:
            return r
        try:
            detail = str(r.json().get("detail") or "")
        except ValueError:
            detail = ""
        detail = detail or r.reason or "no reason given"
        if r.status_code == 401:
            raise ReviewServiceError(f"the review service refused the page's token ({detail}); set {TOKEN_ENV} or "
                                     "[resunet] service_token to a token from `resunet serve --add-token NAME --scope admin`")
        if r.status_code == 403:
            raise ReviewServiceError(f"the review service refused: {detail}")
        if r.status_code >= 500:
            raise ReviewServiceError(f"the review service failed ({r.status_code}): {detail}")
        raise ReviewServiceError(f"the review service refused the request ({r.status_code}): {detail}")

    def pending(self) -> list[dict[str, Any]]:
        """The jobs waiting for a review, newest first (the service's job records)."""
        return list(self._call("GET", "/v1/jobs", params={"state": "review", "limit": 200}).json().get("jobs") or [])

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def fetch_display(self, job_id: str, folder: Path) -> tuple[Any, Any]:
        """The job's input volume and the model's mask (Volumes on the same grid), via NIfTI files in ``folder``."""
        from resunet.io import read_nifti
        from resunet.io.atomic import atomic_write_bytes

        out = []
        for key in ("image", "mask"):
            path = folder / f"{key}.nii.gz"
            atomic_write_bytes(path, self._call("GET", f"/v1/jobs/{job_id}/review/display/{key}").content)
            out.append(read_nifti(path))
        return out[0], out[1]

    def labels(self, job_id: str) -> dict[int, str]:
        """The model's foreground labels (value -> name) from the job's ``predictions`` output; {} without one."""
        try:
            doc = self._call("GET", f"/v1/jobs/{job_id}/outputs/predictions").json()
            raw = (doc.get("model") or {}).get("labels") or {}
            return {int(k): str(v) for k, v in raw.items() if int(k) > 0}
        except (ReviewServiceError, ValueError, AttributeError, TypeError):
            return {}  # the editor then names the labels by their values

    def decide(self, job_id: str, decision: str, reviewer: str | None, comment: str = "",
               corrected: bytes | None = None) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/review``; returns the job (its ``review`` says what was sent where).

        Args:
            decision: ``approve`` or ``reject``.
            reviewer: the signed-in person (None: the token's name is recorded).
            comment: optional for approve, the reason for reject.
            corrected: a corrected mask as .nii.gz bytes on the job's input grid, or None.
        """
        data = {"decision": decision, "comment": comment}
        if reviewer:
            data["reviewer"] = reviewer
        files = {"corrected": ("corrected.nii.gz", io.BytesIO(corrected), "application/gzip")} if corrected else None
        return self._call("POST", f"/v1/jobs/{job_id}/review", data=data, files=files).json()


def job_row(job: Mapping[str, Any]) -> dict[str, Any]:
    """One line of the list: what the clinician needs to pick a job, nothing more (no UIDs, no file names)."""
    result = job.get("result") or {}
    model = result.get("model") or {}
    vols = result.get("volumes_ml") or {}
    return {
        "Job": job.get("id"),
        "Model": model.get("name") or "?",
        "Finished (UTC)": (job.get("finished_utc") or "").replace("T", " ").rstrip("Z"),
        "From": {"pacs-pull": "PACS pull", "dicom-series": "DICOM node"}.get(str(job.get("kind")), str(job.get("kind"))),
        "Volumes (mL)": ", ".join(f"{k} {float(v):.1f}" for k, v in vols.items()) if isinstance(vols, Mapping) else "",
    }


def outcome_text(review: Mapping[str, Any]) -> tuple[str, str]:
    """``(kind, text)`` for the page (``success`` or ``info``): the decision, who, and what was sent where."""
    who = review.get("reviewer") or "?"
    if review.get("state") == "approved":
        sent = review.get("sent")
        if sent:
            where = sent.get("url") or sent.get("destination") or "the archive"
            what = ", ".join(str(f).rsplit(".", 2)[-2] if str(f).count(".") >= 2 else str(f)
                             for f in sent.get("files") or [])
            corrected = "corrected " if review.get("corrected") else ""
            return "success", f"Approved by {who}: the {corrected}{what or 'results'} sent to {where}."
        return "success", f"Approved by {who}; nothing was sent (this job has no archive to send to)."
    reason = review.get("comment") or "(no reason)"
    return "info", f"Rejected by {who}: {reason}. Nothing was sent to the PACS."


def review_section(cfg: Any, ws: Any, user: str | None) -> None:
    """The "To review" part of the page (only when ``cfg.service_url`` is set)."""
    import streamlit as st

    client = ServiceClient(cfg.service_url, service_token(), cfg.service_timeout_s)
    state = st.session_state
    outcomes: dict[str, dict[str, Any]] = state.setdefault("review_outcomes", {})
    with st.expander("To review: results of the service held for a person", expanded=True):
        refresh = st.button("Refresh the list", key="review_refresh")
        if refresh or "review_jobs" not in state:
            try:
                state["review_jobs"] = client.pending()
                state.pop("review_list_error", None)
            except ResunetError as err:
                state["review_jobs"], state["review_list_error"] = [], str(err)
        for job_id, review in outcomes.items():
            kind, text = outcome_text(review)
            (st.success if kind == "success" else st.info)(f"Job {job_id}: {text}")
        if state.get("review_list_error"):
            st.error(state["review_list_error"], icon="⚠️")
            return
        jobs = [j for j in state["review_jobs"] if j.get("id") not in outcomes]
        if not jobs:
            st.info("No results wait for a review.")
            return
        st.dataframe([job_row(j) for j in jobs], hide_index=True, key="review_table")
        ids = [str(j["id"]) for j in jobs]
        job_id = st.selectbox("Job to review", ids, key="review_job",
                              format_func=lambda i: " · ".join(str(v) for v in job_row(next(j for j in jobs if j["id"] == i)).values()))
        if st.button("Open", key="review_open") or state.get("review_opened", (None,))[0] == job_id:
            if state.get("review_opened", (None,))[0] != job_id:
                try:
                    image, mask = client.fetch_display(job_id, ws.subdir("review"))
                except ResunetError as err:
                    st.error(str(err), icon="⚠️")
                    return
                state["review_opened"] = (job_id, image, mask)
                state["review_labels"] = {job_id: client.labels(job_id)}
            _job_panel(client, state["review_opened"], user, outcomes, ws)


def _job_panel(client: ServiceClient, opened: tuple[str, Any, Any], user: str | None,
               outcomes: dict[str, dict[str, Any]], ws: Any) -> None:
    """The opened job: three views of its input with the model's mask, then Approve / Reject."""
    import streamlit as st

    from resunet.webui import viewer

    job_id, image, mask = opened
    img, msk = viewer.to_display(image), viewer.to_display(mask)
    window = viewer.auto_window(img.array)
    scale = viewer.scale_for(img)
    for col, view in zip(st.columns(3), viewer.VIEWS):
        with col:
            n = img.n_slices(view)
            idx = st.slider(f"{view.capitalize()} slice", 1, n, n // 2 + 1, key=f"review_slice_{view}") if n > 1 else 1
            pic = viewer.render_slice(img, view, idx - 1, window=window, mask=msk, mm_to_px=scale)
            buf = io.BytesIO()
            pic.save(buf, format="PNG", compress_level=1)
            st.image(buf.getvalue(), caption=f"job {job_id} · {view} {idx}/{n}", output_format="PNG")
    labels = _labels_for(mask, st.session_state.get("review_labels", {}).get(job_id))
    st.markdown("**Correct the model's mask** (optional): toggle *Edit mask*; Approve then sends your corrected "
                "mask to the service.")
    from resunet.webui.edit_panel import editor_panel  # the local review's panel: one editor for both

    corrections = st.session_state.setdefault(CORRECTIONS, {})
    before = st.session_state.get("review_edit_state") or {}
    if before.get("owner") not in (None, ("service-job", job_id)) and before.get("editor") is not None:
        # another job opened: the previous job's editor goes, and with it its unsent correction
        if corrections.get(before["owner"][1]) is before["editor"].corrected:
            corrections.pop(before["owner"][1])
    ed = editor_panel(image, mask, labels, owner=("service-job", job_id), prefix="review_edit")
    if ed.voxels_changed():
        corrections[job_id] = ed.corrected
    elif corrections.get(job_id) is ed.corrected:  # every edit undone: the model's mask again
        corrections.pop(job_id)
    correction = corrections.get(job_id)
    st.caption(f"You decide as **{user or 'the service token'}**. "
               + ("Approve sends your corrected mask." if correction is not None else
                  "Approve sends the model's mask as it is."))
    comment = st.text_input("Comment (optional when approving; the reason, required, when rejecting)",
                            key=f"review_comment_{job_id}")
    left, right = st.columns(2)
    decision = None
    # keys apart from the local review's (review_approve/review_reject): both panels can be on one page
    if left.button("Approve", key="review_job_approve", type="primary"):
        decision = "approve"
    if right.button("Reject", key="review_job_reject"):
        if not comment.strip():
            st.error("A rejection needs a reason: write it in the comment box, then click Reject.", icon="⚠️")
            return
        decision = "reject"
    if decision is None:
        return
    corrected = None
    if decision == "approve" and correction is not None:
        corrected = _nifti_bytes(correction, ws.subdir("review-corrected"))
    try:
        with st.spinner("Sending the decision to the service…"):
            job = client.decide(job_id, decision, user, comment.strip(), corrected)
    except ResunetError as err:
        st.error(str(err), icon="⚠️")
        return
    outcomes[job_id] = job.get("review") or {}
    st.session_state.pop("review_opened", None)
    corrections.pop(job_id, None)
    st.rerun()


def _labels_for(mask: Any, labels: Mapping[int, str] | None) -> dict[int, str]:
    """The editor's labels: the model's (from the job), else the mask's values named by number."""
    import numpy as np

    if labels:
        return {int(k): str(v) for k, v in labels.items() if int(k) > 0}
    return {int(v): f"label {int(v)}" for v in np.unique(np.asarray(mask.array)) if int(v) > 0} or {1: "label 1"}


def _nifti_bytes(mask: Any, folder: Path) -> bytes:
    """A mask Volume as .nii.gz bytes (resunet's label-map writer) via ``folder``, for the review upload."""
    from resunet.io import write_mask_nifti

    return Path(write_mask_nifti(mask, folder / "corrected.nii.gz")).read_bytes()
