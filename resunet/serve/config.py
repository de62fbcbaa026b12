"""Settings of ``resunet serve`` in one dataclass (every default here)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from resunet.errors import ConfigError
from resunet.netaddr import is_loopback_address

#: Default state folder (job database, tokens, uploads, results); ``$RESUNET_SERVE_STATE`` overrides it.
DEFAULT_STATE_DIR = Path("~/.resunet/serve")
STATE_ENV = "RESUNET_SERVE_STATE"
NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class ServeConfig:
    """How the service runs.

    Attributes:
        state_dir: folder for ``jobs.sqlite`` (queue), ``tokens.json``, ``jobs/<id>/`` (uploads and results).
        host, port: where uvicorn listens.
        model: checkpoint/export path; None = the bundled model.
        device, tta, overlap, sw_batch: Predictor settings, as ``resunet predict`` (TTA on by default).
        formats: output formats of a job that names none (``resunet.inference.batch.FORMATS``).
        max_upload_mb: largest request body accepted, MB (1 MB = 10^6 bytes); larger gets HTTP 413.
        retention_hours: uploads and results of finished jobs are deleted this long after they finish.
        sweep_interval_s: how often the retention sweep runs, s.
        require_token: ask for a bearer token even on loopback.
        allow_anonymous: serve without tokens on a non-loopback address (logged as a warning).
        root_path: URL prefix when behind a reverse proxy that strips it (uvicorn ``root_path``).
        forwarded_allow_ips: proxies whose X-Forwarded-* headers are trusted (uvicorn).
        audit_db: audit log path; None = the default (``$RESUNET_AUDIT_DB`` or ~/.resunet/audit.sqlite);
            False = no audit records.
        max_files: most files in one multipart upload (DICOM slices); send a .zip for more.
        pacs_url: the archive of ``pacs-pull`` jobs (``POST /v1/pacs/jobs``): a DICOMweb root, or
            ``dimse://AET@HOST:PORT`` (C-FIND + C-GET as ``ae_title``, results back with C-STORE);
            empty = none (docs/pacs.md).
        dicom_port: listen as a DICOM node (C-STORE SCP) on this port; 0 = no node.
        dicom_host, ae_title: the node's address and AE title.
        store_to: ``HOST:PORT:AET`` the node sends SEG/RTSTRUCT to with C-STORE; empty = keep them here.
        settle_seconds: a received series is complete after this long without a new instance.
        allowed_aets: AE titles that may send to the node; empty = any.
        min_slices: DICOM series with fewer slices are refused (localisers, stray instances).
        allow_split_series: segment the largest stack of a series whose images disagree (size,
            orientation) instead of refusing it with the counts.
        max_memory_gb: the service's memory budget for segmenting (GB); a study whose estimate is above
            it is refused on upload from its headers (422). None: ``$RESUNET_MAX_MEMORY_GB`` or the default
            of :mod:`resunet.io.limits`. Uploads are checked from headers only, each worker runs one job
            at a time, and ``--workers N`` share this one budget (:mod:`resunet.serve.memory`), so it
            bounds the node's segmentation memory as a whole.
        keep_upload_names: keep the client's file names (in the job database, the job's ``input`` and
            the output names). Off by default: upload names often carry the patient's name, MRN and
            birth date; the job id names the files instead.
        min_free_gb: free space (GB) the state folder's disk must keep: below it uploads get 507 and
            queued jobs wait; jobs failed for a full disk are re-queued by the sweep once it is back
            above (0 = no floor).
        routes: routing rules file (:mod:`resunet.pacs.routing`): the DICOM node segments a received
            series with the model of the first rule it matches, and leaves unmatched series alone.
        tls_ca, tls_cert, tls_key: PEM files for ``pacs_url`` ``dimses://`` (DIMSE over TLS): the CA that
            signed the archive's certificate, and our certificate and key when it checks clients.
        dicom_tls: the DICOM node speaks DICOM over TLS only (``--dicom-tls``): it listens with
            ``tls_cert``/``tls_key`` (required), with ``tls_ca`` senders must present a certificate
            signed by it, and ``store_to`` gets the results over TLS with the same files (the
            destination's certificate checked against ``tls_ca``, hostname check on).
        queue_url: ``postgresql://USER@HOST[:PORT]/DB``: jobs, tokens and the audit log in PostgreSQL,
            shared by every node whose state folder is the same shared folder (docs/deploy.md); empty =
            ``STATE/jobs.sqlite`` (one node). No password in it (:mod:`resunet.pgdb`).
        queue_password_file: file holding only the database password (else libpq's ``$PGPASSWORD`` /
            ``$PGPASSFILE``).
        lease_s: a PostgreSQL claim lasts this long without a renewal, s; a node renews its jobs' leases
            every ``min(5, lease/4)`` s, and a job whose node died is taken by another node once it expired.
        node_name: this node's name in the queue (jobs it runs, its lock file); default ``HOST-PORT``.
            Unique per node: a node that starts re-queues the running jobs of its own name.
        workers: worker processes, each with its own warm model (:mod:`resunet.serve.workers`); 1 = the
            job runs in a thread of the service process, as before.
        devices: devices of the workers, worker K on ``devices[K % len]`` (e.g. ``("cuda:0", "cuda:1")``);
            empty = every worker on ``device``. Given without ``workers``, one worker per device.
        worker_threads: torch threads of each worker process, or of the in-process worker with ``workers``
            1 (0 = torch's default: every core).
        require_review: hold the results of jobs that send to a PACS (``pacs-pull``, ``dicom-series``) until
            a person approves them (``POST /v1/jobs/{id}/review``, :mod:`resunet.serve.review`); the SQLite
            queue only.
    """

    state_dir: Path = field(default_factory=lambda: Path(os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR).expanduser())
    host: str = "127.0.0.1"
    port: int = 8000
    model: Path | None = None
    device: str = "auto"
    tta: bool = True
    overlap: float = 0.5
    sw_batch: int = 2
    formats: tuple[str, ...] = ("nifti", "seg")
    max_upload_mb: float = 2000.0
    retention_hours: float = 72.0
    sweep_interval_s: float = 60.0
    require_token: bool = False
    allow_anonymous: bool = False
    root_path: str = ""
    forwarded_allow_ips: str = "127.0.0.1"
    audit_db: Path | bool | None = None
    max_files: int = 5000
    pacs_url: str = ""
    dicom_port: int = 0
    dicom_host: str = "127.0.0.1"
    ae_title: str = "RESUNET"
    store_to: str = ""
    settle_seconds: float = 5.0
    allowed_aets: tuple[str, ...] = ()
    min_slices: int = 3
    allow_split_series: bool = False
    max_memory_gb: float | None = None
    keep_upload_names: bool = False
    min_free_gb: float = 1.0
    routes: Path | None = None
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    dicom_tls: bool = False
    queue_url: str = ""
    queue_password_file: Path | None = None
    lease_s: float = 60.0
    node_name: str = ""
    workers: int = 1
    devices: tuple[str, ...] = ()
    worker_threads: int = 0
    require_review: bool = False

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser()
        if self.max_upload_mb <= 0:
            raise ConfigError(f"--max-upload-mb must be > 0, got {self.max_upload_mb}")
        if self.retention_hours <= 0:
            raise ConfigError(f"--retention-hours must be > 0, got {self.retention_hours}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if not self.min_free_gb >= 0:
            raise ConfigError(f"--min-free-gb must be 0 or more, got {self.min_free_gb}")
        if self.min_slices < 1:
            raise ConfigError(f"--min-slices must be 1 or more, got {self.min_slices}")
        self.devices = tuple(d for d in self.devices if d)
        if self.devices and self.workers == 1:
            self.workers = len(self.devices)
        if self.workers < 1:
            raise ConfigError(f"--workers must be 1 or more, got {self.workers}")
        if self.worker_threads < 0:
            raise ConfigError(f"--worker-threads must be 0 (torch's default) or more, got {self.worker_threads}")
        if not self.lease_s > 0:
            raise ConfigError(f"--lease must be > 0 s, got {self.lease_s}")
        if self.pacs_url.startswith(("dimse://", "dimses://")):
            from resunet.pacs.dimse_qr import DimseSource

            source = DimseSource.parse(self.pacs_url)
            self.dimse_query().ssl_context(source)  # the TLS files are checked at start, not at the first job
        if (self.tls_ca or self.tls_cert or self.tls_key) and not (self.pacs_url.startswith("dimses://") or self.dicom_tls):
            raise ConfigError("--tls-ca/--tls-cert/--tls-key are for DIMSE over TLS: a --pacs dimses://AET@HOST:PORT "
                              "archive, or the DICOM node with --dicom-tls")
        if self.dicom_tls:
            if not self.dicom_port:
                raise ConfigError("--dicom-tls is the DICOM node's TLS: give --dicom-port too")
            if not (self.tls_cert and self.tls_key):
                raise ConfigError("--dicom-tls needs the node's certificate and key: --tls-cert FILE --tls-key FILE "
                                  "(and --tls-ca FILE to accept only senders with a certificate it signed)")
            self.node_ssl_context()  # the files are checked at start, not at the first association
        if self.queue_url:
            from resunet.pgdb import check_url

            check_url(self.queue_url)
        if not self.node_name:
            import socket

            self.node_name = f"{socket.gethostname()}-{self.port}"
        if self.require_review and self.queue_url:
            raise ConfigError("--require-review works with the SQLite queue of one node for now; drop --queue or "
                              "--require-review")
        if not NODE_RE.match(self.node_name):
            raise ConfigError(f"--node-name {self.node_name!r}: use 1-64 letters, digits, '.', '_' or '-'")

    def dimse_query(self) -> "QueryConfig":  # noqa: F821
        """How ``pacs-pull`` jobs talk to a DIMSE ``pacs_url``: C-GET as ``ae_title``, the TLS files."""
        from resunet.pacs.dimse_qr import QueryConfig

        return QueryConfig(calling_aet=self.ae_title, method="get", tls_ca=self.tls_ca or None,
                           tls_cert=self.tls_cert or None, tls_key=self.tls_key or None)

    def node_ssl_context(self) -> "ssl.SSLContext | None":  # noqa: F821
        """The DICOM node's listening TLS context (None without ``dicom_tls``); ConfigError for bad files."""
        if not self.dicom_tls:
            return None
        from resunet.pacs.dimse import tls_server_context

        return tls_server_context(self.tls_ca or None, self.tls_cert or None, self.tls_key or None)

    @property
    def shared(self) -> bool:
        """True when the queue is a PostgreSQL database that several nodes may share."""
        return bool(self.queue_url)

    @property
    def loopback(self) -> bool:
        return is_loopback_address(self.host)

    @property
    def auth_required(self) -> bool:
        """Bearer token needed on every job/metrics request: off loopback (unless anonymous is allowed) or asked for."""
        return self.require_token or (not self.loopback and not self.allow_anonymous)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def retention_s(self) -> float:
        return self.retention_hours * 3600.0
