"""PACS job kinds of ``resunet serve`` and its DICOM node (C-STORE listener feeding the job queue).

Two job kinds, both through :func:`resunet.pacs.segment.segment_and_send` (the one "segment a study
and send the results back" step of ``resunet predict --pacs``, with the job's batch options from
:func:`resunet.serve.jobs.job_batch`), so they persist in the SQLite queue, survive a restart and are audited like
uploads:

- ``pacs-pull`` (``POST /v1/pacs/jobs``): options ``study_uid``, ``series_uid``, ``formats``,
  ``store`` (send the SEG/RTSTRUCT back, default true) and ``pacs_url`` (the service's ``--pacs``).
  The handler retrieves the study into the job's ``input/`` folder (a DICOMweb root: WADO-RS, results
  stored with STOW-RS; a ``dimse://AET@HOST:PORT`` archive: C-FIND + C-GET with the node's AE title,
  complete or failed with both counts, results stored with C-STORE), segments it and sends the DICOM
  outputs back.
- ``dicom-series``: queued by the DICOM node when a series received with C-STORE is complete
  (``--dicom-port``); the series folder moves into the job's ``input/``; after segmentation the SEG
  (and RTSTRUCT) go with C-STORE to ``--store-to HOST:PORT:AET``.

With ``resunet serve --require-review`` (option ``require_review`` of both kinds) nothing is sent: the
job finishes with its outputs held (review state ``pending``, :mod:`resunet.serve.review`) and what it
would have sent where (``JobOutcome.review["send"]``); a person's approval sends it.

A job killed mid-run is redone from the start; its SEG/RTSTRUCT UIDs follow from the job id and the
result (``BatchOptions.uid_seed``), so a redo after the STOW stores the same instances again (the
archive keeps them once) instead of a second copy; no accepted study is lost.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from resunet.errors import ConfigError, InputError
from resunet.inference.bundled import resolve_model
from resunet.serve.jobs import (JobEnv, JobOutcome, job_batch, job_command, job_failure, job_outcome, register_kind,
                                segment_options)
from resunet.serve.queue import Job

log = logging.getLogger(__name__)

#: where the node writes instances while a series is arriving (under the state folder)
INCOMING = "dicom-incoming"


def _pacs_pull(job: Job, env: JobEnv) -> JobOutcome:
    from resunet.pacs import PacsClient, PacsConfig
    from resunet.pacs.segment import segment_and_send

    opts = job.options
    study_uid = str(opts.get("study_uid") or "")
    if not study_uid or not opts.get("pacs_url"):
        raise ConfigError(f"job {job.id}: a pacs-pull job needs study_uid and the service's --pacs URL")
    url = str(opts["pacs_url"])
    folder = env.job_dir(job.id) / "input" / "study"
    series = [str(opts["series_uid"])] if opts.get("series_uid") else None
    store = bool(opts.get("store", True))
    hold = store and bool(opts.get("require_review"))  # --require-review: nothing goes out before a person approves
    send_now = store and not hold
    predictor, batch = job_batch(job, env)
    if url.startswith(("dimse://", "dimses://")):  # a DIMSE archive: C-FIND + C-GET, C-STORE back
        from resunet.pacs.dimse_qr import DimseSource, QueryConfig
        from resunet.pacs.segment import segment_from_dimse

        qr = QueryConfig(calling_aet=str(opts.get("ae_title") or "RESUNET"), method="get", tls_ca=opts.get("tls_ca"),
                         tls_cert=opts.get("tls_cert"), tls_key=opts.get("tls_key"))
        run = segment_from_dimse(DimseSource.parse(url), qr, study_uid, predictor, batch,
                                 series_uid=series[0] if series else None, store=send_now, command=job_command(job),
                                 folder=folder, failure=job_failure(job, env, folder))
    else:
        client = PacsClient(PacsConfig.from_env(url))
        run = segment_and_send(study_uid, lambda into: client.retrieve(study_uid, into, series),
                               (lambda files: client.store(files, study_uid)) if send_now else None,
                               predictor, batch, source=url, command=job_command(job),
                               folder=folder, failure=job_failure(job, env, folder))
    outcome = job_outcome(job, env, run.batch, predictor, folder)
    if hold:
        outcome.review = {"state": "pending", "send": {"to": "pacs", "url": url, "study_uid": study_uid,
                                                       "ae_title": str(opts.get("ae_title") or "RESUNET"),
                                                       **{k: opts.get(k) for k in ("tls_ca", "tls_cert", "tls_key")}}}
    elif store:
        outcome.result["stored_to_pacs"] = {"url": opts["pacs_url"], "study_uid": study_uid,
                                            "files": [p.name for p in run.stored]}
    return outcome


def _dicom_series(job: Job, env: JobEnv) -> JobOutcome:
    from resunet.pacs.dimse import Destination, send_files
    from resunet.pacs.segment import segment_and_send

    if not job.input_path:
        raise InputError(f"job {job.id} has no received series")
    folder = Path(job.input_path)
    dest = job.options.get("destination")
    aet = str(job.options.get("ae_title") or "RESUNET")
    hold = bool(job.options.get("require_review"))  # --require-review: sent once a person approves
    predictor, batch = job_batch(job, env)
    tls = job.options.get("tls")
    run = segment_and_send(str(job.options.get("study_uid") or job.input_name or job.id), None,
                           (lambda files: send_files(files, Destination.parse(str(dest)), calling_aet=aet,
                                                     ssl_context=store_ssl_context(tls)))
                           if dest and not hold else None,
                           predictor, batch, source=f"DICOM node {aet}", command=job_command(job),
                           folder=folder, failure=job_failure(job, env, folder))
    outcome = job_outcome(job, env, run.batch, predictor, folder)
    if hold:
        outcome.review = {"state": "pending", "send": {"to": "dicom", "destination": dest, "ae_title": aet,
                                                       **({"tls": tls} if tls else {})} if dest else None}
    elif dest:
        outcome.result["sent_to"] = {"destination": dest, "files": [p.name for p in run.stored]}
    return outcome


def store_ssl_context(tls: dict[str, Any] | None) -> Any:
    """The client TLS context for a ``dicom-series`` job's ``--store-to`` (its ``tls`` option: the node's
    file paths, ``--dicom-tls``), or None (plain DIMSE)."""
    if not tls:
        return None
    from resunet.pacs.dimse import tls_client_context

    return tls_client_context(tls.get("tls_ca"), tls.get("tls_cert"), tls.get("tls_key"))


register_kind("pacs-pull", _pacs_pull)
register_kind("dicom-series", _dicom_series)


def enqueue_pull(service: Any, study_uid: str, who: str, series_uid: str | None = None,
                 formats: Any = None, store: bool = True) -> Job:
    """Queue a ``pacs-pull`` job (the HTTP route calls this); ConfigError when no PACS is configured."""
    url = getattr(service.config, "pacs_url", None)
    if not url:
        raise ConfigError("this service has no PACS; start it with `resunet serve --pacs URL`")
    if not study_uid or not str(study_uid).strip():
        raise InputError("study_uid is empty; give the Study Instance UID to pull")
    opts = segment_options({"formats": formats, "series_uid": series_uid}, service.default_formats())
    opts.update(study_uid=str(study_uid).strip(), store=bool(store), pacs_url=url,
                ae_title=str(getattr(service.config, "ae_title", "") or "RESUNET"),
                # file paths of the TLS set-up (no secrets in the job row: the key stays in its file)
                **{k: getattr(service.config, k, "") or None for k in ("tls_ca", "tls_cert", "tls_key")})
    if getattr(service.config, "require_review", False):
        opts["require_review"] = True
    job = service.queue.enqueue("pacs-pull", input_name=f"PACS study {study_uid}", options=opts, submitted_by=who)
    service.wake()
    return job


class NodeFeeder:
    """The callback of the service's :class:`~resunet.pacs.dimse.StoreListener`: a complete series becomes a job."""

    def __init__(self, service: Any, ae_title: str, destination: str | None, formats: tuple[str, ...]) -> None:
        self.service = service
        self.ae_title = ae_title
        self.destination = destination
        self.formats = formats

    def __call__(self, series: Any) -> None:
        extra: dict[str, Any] = {}
        routes = getattr(self.service, "routes", None)
        if routes is not None:  # the operator's rules pick the model, or leave the series alone
            rule = _route(routes, series)
            if rule is None:
                shutil.rmtree(series.folder, ignore_errors=True)
                return
            extra = {"model": str(resolve_model(rule.model)), "route": rule.name,
                     **({"then": [str(resolve_model(m)) for m in rule.then]} if rule.then else {})}
        job_id = uuid.uuid4().hex
        final = self.service.job_dir(job_id) / "input"
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(series.folder, final)  # same filesystem (both under the state folder): atomic
        study_dir = series.folder.parent
        if study_dir.is_dir() and not any(study_dir.iterdir()):
            study_dir.rmdir()
        opts = {"formats": list(self.formats), "series_uid": series.series_uid, "uncertainty": False,
                "probabilities": False, "destination": self.destination, "ae_title": self.ae_title, **extra}
        c = self.service.config
        if getattr(c, "dicom_tls", False) and self.destination:  # results go back over TLS with the node's files
            opts["tls"] = {k: getattr(c, k, "") or None for k in ("tls_ca", "tls_cert", "tls_key")}
        if getattr(self.service.config, "require_review", False):
            opts["require_review"] = True
        self.service.queue.enqueue("dicom-series", input_path=final, input_sha256=None, options=opts,
                                   input_name=f"{series.n_instances} instances from {series.calling_aet}",
                                   submitted_by=f"DICOM {series.calling_aet}", job_id=job_id)
        self.service.wake()
        log.info("series %s (%d instances from %s) queued as job %s", series.series_uid, series.n_instances,
                 series.calling_aet, job_id)


def _route(routes: Any, series: Any) -> Any:
    """The rule for a received series (facts from its first instance's header), or None (logged once)."""
    import pydicom

    from resunet.pacs.routing import SeriesFacts

    first = next(iter(sorted(series.folder.glob("*.dcm"))), None)
    ds = pydicom.dcmread(first, stop_before_pixels=True) if first is not None else pydicom.Dataset()
    facts = SeriesFacts.from_dataset(ds, series.n_instances)
    rule = routes.route(facts)
    if rule is None:
        routes.log_unrouted(log, series.series_uid, facts)
    else:
        log.info("routing: series %s -> rule '%s' (model %s)", series.series_uid, rule.name, " -> ".join(rule.models))
    return rule


def start_node(service: Any) -> Any:
    """Start the DICOM node of ``service`` when its config has a ``dicom_port``; returns the listener or None."""
    c = service.config
    if not getattr(c, "dicom_port", None):
        return None
    from resunet.pacs.dimse import Destination, ListenerConfig, StoreListener

    if c.store_to:
        Destination.parse(c.store_to)  # a bad destination is a start-up error
    cfg = ListenerConfig(ae_title=c.ae_title, port=c.dicom_port, host=c.dicom_host,
                         incoming_dir=service.state_dir / INCOMING, settle_seconds=c.settle_seconds,
                         allowed_calling_aets=tuple(c.allowed_aets))
    listener = StoreListener(cfg, NodeFeeder(service, cfg.ae_title, c.store_to, tuple(c.formats)),
                             ssl_context=c.node_ssl_context() if getattr(c, "dicom_tls", False) else None)
    return listener.start()
