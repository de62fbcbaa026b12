"""The HTTP API of ``resunet serve`` (FastAPI): submit, poll, fetch; health, readiness, metrics.

Routes (``/docs`` shows them with their schemas):

- ``POST /v1/jobs`` (multipart: ``files`` = one NIfTI, one .zip of a DICOM series, or DICOM files;
  form fields ``formats``, ``uncertainty``, ``probabilities``, ``series_uid``) -> 202 with the job;
- ``GET /v1/jobs/{id}`` -> the job's state, error, results and output links; ``GET /v1/jobs`` -> recent jobs;
- ``GET /v1/jobs/{id}/outputs/{key}`` -> one result file (``mask``, ``seg``, ``uncertainty``,
  ``predictions``, ...); ``GET /v1/jobs/{id}/predictions`` -> the predictions JSON;
- ``POST /v1/jobs/{id}/review`` (multipart: ``decision`` = approve|reject, ``comment``, optional
  ``corrected`` NIfTI mask) -> the decision on a job held by ``--require-review`` (state ``review``;
  ``GET /v1/jobs?state=review`` lists them); approve sends the (corrected) SEG to the PACS; an admin token
  (the web page's) may add ``reviewer`` = the signed-in person it decides for;
- ``GET /v1/jobs/{id}/review/display/{image|mask}`` -> a held job's input volume and the model's mask as NIfTI
  (what the web page's "To review" list shows);
- ``GET /healthz`` (process alive), ``GET /readyz`` (model loaded: 200, else 503), ``GET /metrics``.

Errors are JSON ``{"detail": "<one line>"}``: 4xx with the library's message for bad input (the same
text ``resunet predict`` prints), 401 without a valid token where one is needed, 404 for an unknown
job or output, 409 when the job is not done yet, 410 when retention deleted its files, 413 for an
upload over the limit. Never a traceback: anything unexpected is logged and answered with a one-line 500.
"""

# no "from __future__ import annotations": FastAPI reads these annotations at run time, closures included

import hashlib
import inspect
import logging
import re
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline

from resunet import __version__
from resunet.errors import ResunetError, ServerError
from resunet.inference.output_names import download_name
from resunet.io.hashing import sha256_file
from resunet.serve.queue import Job
from resunet.serve.service import Service, UploadTooLarge, _iso
from resunet.serve.tokens import Caller

log = logging.getLogger("resunet.serve")

_bearer = HTTPBearer(auto_error=False, description="a token made by `resunet serve --add-token NAME`")


class _RedactQuery(logging.Filter):
    """Drop the query string from uvicorn's access-log lines: a client that puts a token (or a patient
    id) in the URL must not leave it in the log. uvicorn's access record carries
    ``(client, method, path_with_query, http_version, status)`` as its args."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (args[0], args[1], args[2].split("?", 1)[0] + "?[query redacted]", *args[3:])
        return True


class BodyLimit:
    """Stop reading a request body at the upload limit, chunked bodies included (pure ASGI middleware).

    The ``Content-Length`` check in :func:`create_app` refuses a declared size before the body is read,
    but a chunked upload declares none, and Starlette spools every multipart file part to disk before
    the handler can count it: a 200 MB chunked body was written in full under a 1 MB limit. Here the
    bytes are counted as they arrive; past the limit the app is told the client went away (it reads no
    more) and whatever it answers is replaced by the 413. Written by hand because Starlette and FastAPI
    have no request-size limit of their own.
    """

    def __init__(self, app: Any, max_bytes: int, detail: str) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body = JSONResponse({"detail": detail}, status_code=413)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        total = 0
        over = False
        started = False

        async def counted() -> Any:
            nonlocal total, over
            if over:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                total += len(msg.get("body", b""))
                if total > self.max_bytes:
                    over = True
                    return {"type": "http.disconnect"}
            return msg

        async def guarded(msg: Any) -> None:
            nonlocal started
            if over:
                return  # the app's answer to the cut body is dropped; ours is sent below
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self.body(scope, receive, send)


#: a reviewer name the page may send: its login names, e-mail addresses, an OIDC display name (letters of any script)
_REVIEWER_NAME = re.compile(r"^[\w.@' -]{1,128}$")

_UID = re.compile(r"(?<![\d.])[0-2](?:\.(?:0|[1-9]\d*)){4,}(?![\d.])")


def redact_uids(text: str) -> str:
    """DICOM UIDs (5+ numeric components; IP addresses and versions have fewer) -> ``uid:<sha256[:12]>``.

    Study/series/instance UIDs identify a patient's examination; the hash still lets an operator
    who has a UID find its lines (``python -c "import hashlib; print(hashlib.sha256(b'UID').hexdigest()[:12])"``).
    """
    return _UID.sub(lambda m: "uid:" + hashlib.sha256(m.group(0).encode()).hexdigest()[:12], text)


class _RedactUids(logging.Filter):
    """:func:`redact_uids` on every record a handler writes (resunet's, pynetdicom's, uvicorn's errors)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        red = redact_uids(text)
        if red != text:
            record.msg, record.args = red, None
        return True


def install_access_log_redaction() -> None:
    """Add :class:`_RedactQuery` to ``uvicorn.access`` and :class:`_RedactUids` to the handlers of the root
    and ``uvicorn.error`` loggers, once (idempotent). Called when the server starts, after uvicorn has
    configured its loggers."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _RedactQuery) for f in access.filters):
        access.addFilter(_RedactQuery())
    for name in ("", "uvicorn", "uvicorn.error"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _RedactUids) for f in handler.filters):
                handler.addFilter(_RedactUids())


def create_app(service: Service, manage_lifecycle: bool = True) -> FastAPI:
    """The FastAPI application over ``service`` (already :meth:`~Service.open`).

    Args:
        manage_lifecycle: start the service's threads when the server starts and stop them at shutdown.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        install_access_log_redaction()  # after uvicorn configured its loggers
        if manage_lifecycle:
            service.start()
        yield
        if manage_lifecycle:
            service.stop()

    kwargs: dict[str, Any] = {}
    if "form_limits" in inspect.signature(FastAPI.__init__).parameters:  # FastAPI >= 0.13x: DICOM series as files
        kwargs["form_limits"] = {"max_files": service.config.max_files}
    # FastAPIOffline: FastAPI whose /docs (Swagger UI) and /redoc pages load their JavaScript, CSS and
    # favicon from files shipped in the fastapi-offline package (under /docs-assets), not from a CDN
    app = FastAPIOffline(
        static_url="/docs-assets",
        title="resunet serve",
        version=__version__,
        description="Segmentation of DICOM and NIfTI studies with a warm Residual U-Net: submit a study, poll the "
        "job, fetch the mask (NIfTI, DICOM SEG, ...), the predictions JSON and the uncertainty map.",
        lifespan=lifespan,
        root_path=service.config.root_path,
        **kwargs,
    )
    metrics = service.metrics
    assert metrics is not None and service.queue is not None
    queue = service.queue
    max_bytes = service.config.max_upload_bytes

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_bytes + 1_000_000:  # + room for multipart framing
            response: Response = JSONResponse(
                {"detail": f"upload larger than the limit of {service.config.max_upload_mb:g} MB; ask the operator to "
                 "raise --max-upload-mb or send a smaller study"}, status_code=413)
        else:
            try:
                response = await call_next(request)
            except Exception:  # noqa: BLE001 - never a traceback to the client
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                response = JSONResponse({"detail": "internal error; the service log has the details"}, status_code=500)
        route = request.scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        metrics.latency.labels(request.method, path).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for e in err.errors():
            where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        hint = " (send the study as multipart form field 'files'; see /docs)" if request.url.path.endswith("/jobs") else ""
        return JSONResponse({"detail": "; ".join(parts) + hint}, status_code=422)

    @app.exception_handler(ServerError)
    async def server_error(request: Request, err: ServerError) -> JSONResponse:
        # The operator's message (with paths) goes to the log; the client learns it is not its fault.
        log.error("server fault on %s %s: %s", request.method, request.url.path, err)
        return JSONResponse({"detail": "the service cannot answer because of a fault on the server (the operator "
                             "finds the reason in the service log); try again later"}, status_code=err.http_status,
                            headers={"Retry-After": "60"})

    @app.exception_handler(ResunetError)
    async def resunet_error(request: Request, err: ResunetError) -> JSONResponse:
        status = 413 if isinstance(err, UploadTooLarge) else 422
        return JSONResponse({"detail": str(err)}, status_code=status)

    def caller(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
        """The token's :class:`Caller`; 401 when a token is needed and missing or unknown."""
        found = service.tokens.lookup(creds.credentials) if creds is not None else None
        if found is not None:
            return found
        if service.config.auth_required:
            raise HTTPException(
                status_code=401,
                detail="a valid bearer token is needed (Authorization: Bearer <token>); ask the operator for one "
                "(resunet serve --add-token NAME)" if creds is None else "unknown or revoked token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return Caller("anonymous")  # loopback without a token: this machine itself, every job

    def who(c: Annotated[Caller, Depends(caller)]) -> str:
        """The caller's name (what jobs record as their submitter)."""
        return c.name

    def visible(job: Job, c: Caller) -> bool:
        return c.sees(job.submitted_by, service.tokens.group_of(job.submitted_by) if c.scope != "admin" else "")

    def job_or_404(job_id: str, c: Caller) -> Job:
        job = queue.get(job_id)
        if job is None or not visible(job, c):  # another group's job: as if it did not exist
            raise HTTPException(status_code=404, detail=f"no job {job_id!r} on this service")
        return job

    def describe(job: Job, request: Request) -> dict[str, Any]:
        base = str(request.base_url).rstrip("/")
        state = "review" if job.state == "done" and job.review_state == "pending" else job.state
        out: dict[str, Any] = {
            "id": job.id, "kind": job.kind, "state": state, "input": job.input_name,
            "input_sha256": job.input_sha256, "submitted_by": job.submitted_by, "options": job.options,
            "created_utc": _iso(job.created_at), "started_utc": _iso(job.started_at),
            "finished_utc": _iso(job.finished_at), "attempts": job.attempts, "error": job.error,
            "url": f"{base}/v1/jobs/{job.id}",
        }
        if job.state == "done":
            out["result"] = job.result
            out["outputs"] = {
                k: {"file": o["path"].rsplit("/", 1)[-1], "sha256": o.get("sha256"), "size_bytes": o.get("size_bytes"),
                    "url": f"{base}/v1/jobs/{job.id}/outputs/{k}"}
                for k, o in sorted(job.outputs.items())
            }
        if job.review:
            out["review"] = {k: v for k, v in job.review.items() if k != "outputs"}
            out["review"]["outputs"] = {
                k: {"file": o["path"].rsplit("/", 1)[-1], "sha256": o.get("sha256"), "size_bytes": o.get("size_bytes"),
                    "url": f"{base}/v1/jobs/{job.id}/review/outputs/{k}"}
                for k, o in sorted((job.review.get("outputs") or {}).items())}
        if job.purged_at is not None:
            out["files_deleted_utc"] = _iso(job.purged_at)
        return out

    @app.post("/v1/jobs", status_code=202, summary="Submit a study; returns the queued job at once")
    def submit(
        request: Request,
        user: Annotated[str, Depends(who)],
        files: Annotated[list[UploadFile], File(description="one .nii/.nii.gz, one .zip of a DICOM series, or DICOM files")],
        formats: Annotated[str | None, Form(description="comma-separated output formats (default: the service's --format)")] = None,
        uncertainty: Annotated[bool, Form(description="also write the TTA uncertainty map")] = False,
        probabilities: Annotated[bool, Form(description="also write per-label probability maps")] = False,
        series_uid: Annotated[str | None, Form(description="DICOM series to read (default: the largest)")] = None,
    ) -> JSONResponse:
        # a plain def: FastAPI runs it in its thread pool, so copying and checking the upload does not block
        options = {"formats": formats, "uncertainty": uncertainty, "probabilities": probabilities, "series_uid": series_uid}
        job = service.submit([(f.filename, f.file) for f in files], options, user)
        log.info("job %s queued (input sha256 %s) from %s", job.id, (job.input_sha256 or "")[:12], user)
        body = describe(job, request)
        return JSONResponse(body, status_code=202, headers={"Location": body["url"]})

    @app.post("/v1/pacs/jobs", status_code=202, summary="Pull a study from the service's PACS, segment it, store the SEG back")
    def submit_pacs(
        request: Request,
        user: Annotated[str, Depends(who)],
        study_uid: Annotated[str, Form(description="Study Instance UID on the PACS (--pacs)")],
        series_uid: Annotated[str | None, Form(description="only this series (default: every image series, the largest segmented)")] = None,
        formats: Annotated[str | None, Form(description="comma-separated output formats (default: the service's --format)")] = None,
        store: Annotated[bool, Form(description="store the SEG/RTSTRUCT back into the study (STOW-RS)")] = True,
    ) -> JSONResponse:
        from resunet.serve.pacs_jobs import enqueue_pull

        job = enqueue_pull(service, study_uid, user, series_uid=series_uid, formats=formats, store=store)
        log.info("job %s queued: PACS study from %s", job.id, user)
        body = describe(job, request)
        return JSONResponse(body, status_code=202, headers={"Location": body["url"]})

    @app.get("/v1/jobs", summary="Recent jobs the caller may see (a submit token: its own and its group's), newest first")
    def list_jobs(request: Request, c: Annotated[Caller, Depends(caller)], state: str | None = None,
                  limit: int = 100) -> dict[str, Any]:
        limit = max(1, min(limit, 1000))
        if c.scope == "admin":
            counts = {**queue.counts(), "review": len(queue.jobs("review", 100_000))}  # done, held for a person
            return {"jobs": [describe(j, request) for j in queue.jobs(state, limit)], "counts": counts}
        mine = [j for j in queue.jobs(state, 100_000) if visible(j, c)]
        counts = {k: 0 for k in queue.counts()} | {"review": 0}
        for j in mine:
            counts[j.state] = counts.get(j.state, 0) + 1
            if j.state == "done" and j.review_state == "pending":
                counts["review"] += 1
        return {"jobs": [describe(j, request) for j in mine[:limit]], "counts": counts}

    @app.get("/v1/jobs/{job_id}", summary="State of a job, its results and output links")
    def get_job(job_id: str, request: Request, c: Annotated[Caller, Depends(caller)]) -> dict[str, Any]:
        return describe(job_or_404(job_id, c), request)

    @app.post("/v1/jobs/{job_id}/review", summary="Approve or reject a job held for review (--require-review), "
              "optionally with a corrected mask; approve sends the SEG to the PACS")
    def review(
        job_id: str,
        request: Request,
        c: Annotated[Caller, Depends(caller)],
        decision: Annotated[str, Form(description="approve or reject")],
        comment: Annotated[str, Form(description="free text; the reason of a rejection")] = "",
        corrected: Annotated[UploadFile | None, File(description="corrected mask: a NIfTI label map on the input's "
                                                     "grid with the model's label values")] = None,
        reviewer: Annotated[str | None, Form(description="the signed-in person the caller decides for (the web "
                                             "page's admin token only; default: the token's name)")] = None,
    ) -> dict[str, Any]:
        from resunet.errors import PacsError
        from resunet.serve.review import NotPending, review_job

        job = job_or_404(job_id, c)
        person, via = c.name, None
        if reviewer and reviewer.strip() and reviewer.strip() != c.name:
            if c.scope != "admin":
                raise HTTPException(status_code=403, detail="only an admin token (the web page's) may record a "
                                    "decision for another person; leave out 'reviewer' to decide as the token's user")
            if not _REVIEWER_NAME.match(reviewer.strip()):
                raise HTTPException(status_code=422, detail="reviewer: letters, digits, spaces and . _ @ ' - only, "
                                    "1-128 characters (the web page's user name)")
            person, via = reviewer.strip(), c.name
        try:
            review_job(service, job, decision, person, comment,
                       (corrected.filename, corrected.file) if corrected is not None and corrected.filename else None,
                       via=via)
        except NotPending as err:
            raise HTTPException(status_code=409, detail=str(err)) from None
        except PacsError as err:
            raise HTTPException(status_code=502, detail=f"the decision was not recorded: {err}; try again") from None
        log.info("job %s %s by %s%s", job.id, decision, person, f" via {via}" if via else "")
        return describe(queue.get(job.id) or job, request)

    @app.get("/v1/jobs/{job_id}/review/display/{key}", summary="For a viewer: the job's input volume (image) or the "
             "model's mask on its grid (mask), as NIfTI")
    def get_review_display(job_id: str, key: str, c: Annotated[Caller, Depends(caller)]) -> FileResponse:
        from resunet.serve.review import DISPLAY_FILES, display_file

        job = job_or_404(job_id, c)
        if key not in DISPLAY_FILES:
            raise HTTPException(status_code=404, detail=f"no display file {key!r}; use one of {', '.join(DISPLAY_FILES)}")
        if job.state != "done" or not job.review:
            raise HTTPException(status_code=409, detail=f"job {job.id} is not a finished job held for review "
                                "(--require-review); only those have display files")
        if job.purged_at is not None:
            raise HTTPException(status_code=410, detail=f"the files of job {job.id} were deleted; it can no longer be shown")
        path = display_file(service, job, key)
        return FileResponse(path, media_type="application/gzip", filename=path.name,
                            headers={"X-Content-SHA256": sha256_file(path)})

    @app.get("/v1/jobs/{job_id}/review/outputs/{key}", summary="Download a file of a job's review (corrected mask or SEG)")
    def get_review_output(job_id: str, key: str, c: Annotated[Caller, Depends(caller)]) -> FileResponse:
        job = job_or_404(job_id, c)
        rec = (job.review.get("outputs") or {}).get(key) if job.review else None
        path = service.job_dir(job.id) / rec["path"] if rec else None
        if path is None or not path.is_file():
            raise HTTPException(status_code=404, detail=f"job {job.id} has no review output {key!r}")
        media = {".dcm": "application/dicom", ".json": "application/json"}.get(path.suffix, "application/gzip")
        return FileResponse(path, media_type=media, filename=path.name,
                            headers={"X-Content-SHA256": rec["sha256"]})

    @app.post("/v1/jobs/{job_id}/retry", summary="Run a failed job again (e.g. after a server fault was fixed)")
    def retry_job(job_id: str, request: Request, c: Annotated[Caller, Depends(caller)]) -> dict[str, Any]:
        job = job_or_404(job_id, c)
        if not queue.retry(job.id, c.name):
            raise HTTPException(status_code=409, detail=f"job {job.id} is {job.state}"
                                + (" and its files were deleted" if job.purged_at is not None else "")
                                + "; only a failed job whose files remain can be retried")
        service.wake()
        log.info("job %s re-queued by %s", job.id, c.name)
        return describe(queue.get(job.id) or job, request)

    @app.delete("/v1/jobs/{job_id}", summary="Erase a job's inputs and outputs now (its audit record stays)")
    def delete_job(job_id: str, request: Request, c: Annotated[Caller, Depends(caller)]) -> dict[str, Any]:
        job = job_or_404(job_id, c)
        if job.state == "running":
            raise HTTPException(status_code=409, detail=f"job {job.id} is running; delete it once it is done or failed")
        try:
            service.erase(job, c.name)
        except ResunetError as err:  # claimed by a worker between the check above and now
            raise HTTPException(status_code=409, detail=str(err)) from None
        log.info("job %s erased by %s", job.id, c.name)
        return describe(queue.get(job.id) or job, request)

    def output_file(job: Job, key: str) -> FileResponse:
        if job.state in ("queued", "running"):
            raise HTTPException(status_code=409, detail=f"job {job.id} is {job.state}; poll /v1/jobs/{job.id} until done")
        if job.state == "failed":
            raise HTTPException(status_code=409, detail=f"job {job.id} failed: {job.error}")
        if job.purged_at is not None:
            raise HTTPException(status_code=410, detail=f"the files of job {job.id} were deleted (retention time, or "
                                "DELETE /v1/jobs/{id}); the job record and its hashes remain")
        rec = job.outputs.get(key)
        if rec is None:
            raise HTTPException(status_code=404, detail=f"job {job.id} has no output {key!r}; it has: {', '.join(sorted(job.outputs))}")
        path = service.job_dir(job.id) / rec["path"]
        if not path.is_file():
            raise HTTPException(status_code=410, detail=f"output {key!r} of job {job.id} is gone from the service's disk")
        media = "application/json" if path.suffix == ".json" else (
            "application/dicom" if path.suffix == ".dcm" else "application/gzip")
        # a name that can't be taken for the scan (the mask on disk is <case>.nii.gz, the input's own name)
        return FileResponse(path, media_type=media, filename=download_name(key, path.name),
                            headers={"X-Content-SHA256": rec["sha256"]})

    @app.get("/v1/jobs/{job_id}/outputs/{key}", summary="Download one result file of a done job")
    def get_output(job_id: str, key: str, c: Annotated[Caller, Depends(caller)]) -> FileResponse:
        return output_file(job_or_404(job_id, c), key)

    @app.get("/v1/jobs/{job_id}/predictions", summary="The predictions JSON (volumes per label, hashes, model)")
    def get_predictions(job_id: str, c: Annotated[Caller, Depends(caller)]) -> FileResponse:
        return output_file(job_or_404(job_id, c), "predictions")

    @app.get("/healthz", summary="The process is alive")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.time() - service.started_at, 3)}

    @app.get("/readyz", summary="The model is loaded and warm and the queue's database answers (503 until then)")
    def readyz() -> JSONResponse:
        model = service.model
        db_error = service.check_database()  # a PostgreSQL queue that went away: not ready, jobs wait in it
        ready = service.ready and db_error is None
        body: dict[str, Any] = {"ready": ready, "node": service.node}
        if model is not None:
            body["model"] = {"name": model.name, "sha256": model.sha256, "kind": model.kind}
        if service.model_error:
            body["error"] = service.model_error
        elif db_error:
            log.error("readyz: %s", db_error)
            body["error"] = "the job database does not answer (the service log names it); jobs wait until it is back"
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    def get_metrics(user: Annotated[str, Depends(who)]) -> Response:
        from resunet.serve.metrics import CONTENT_TYPE

        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(  # outermost: counts the bytes before any parser or spool sees them
        BodyLimit, max_bytes=max_bytes + 1_000_000,  # + room for multipart framing, as the Content-Length check
        detail=f"upload larger than the limit of {service.config.max_upload_mb:g} MB; ask the operator to raise "
        "--max-upload-mb or send a smaller study")
    return app
