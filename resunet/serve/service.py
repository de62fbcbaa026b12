"""The service behind the HTTP API: state folder, warm model, worker thread, retention sweep, audit.

One :class:`Service` per state folder (a lock file refuses a second one: "re-queue every running
job at start-up" relies on it). Start-up order: :meth:`Service.open` (lock, queue database, re-queue
jobs a killed service left ``running``, audit records a kill cut short) happens before uvicorn binds,
so a wrong state folder is a one-line CLI error; :meth:`Service.start` then loads the model in a
background thread (``/healthz`` answers at once, ``/readyz`` when the model is warm) and starts the
worker and the retention sweep.

Layout of the state folder::

    jobs.sqlite          the queue (resunet.serve.queue), WAL mode
    tokens.json          bearer-token hashes (resunet.serve.tokens)
    service.lock         held by the running service
    uploads/             uploads being received and checked (moved into jobs/<id>/input when accepted)
    jobs/<id>/input/     the accepted study
    jobs/<id>/out/       results (written by the batch runner of ``resunet predict``)

With ``--queue postgresql://...`` (several nodes, one shared state folder) the queue, the tokens and the
audit log are in the database instead; each node then holds ``nodes/<node>.lock`` and receives uploads
in ``uploads/<node>/``, and ``cluster.json`` ties the folder to its database (:meth:`Service._check_cluster`).
A lease thread renews the leases of the node's running jobs and re-queues the jobs of nodes that died.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from resunet.errors import ConfigError, DiskFullError, InputError, ResunetError, ServerError
from resunet.serve.config import ServeConfig
from resunet.serve.jobs import KINDS, JobOutcome, client_message, segment_options
from resunet.serve.metrics import Metrics
from resunet.serve.queue import Job, JobQueue
from resunet.serve.tokens import TOKENS_FILE, TokenStore
import resunet.serve.pacs_jobs  # noqa: E402,F401 - registers the pacs-pull and dicom-series job kinds

log = logging.getLogger("resunet.serve")

#: Upload file names kept as given when they are this plain; anything else is replaced by ``_``.
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def safe_upload_name(name: str | None, fallback: str) -> str:
    """A file name safe to create in a folder: the last path part, plain characters, not hidden."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch if ch in _NAME_CHARS else "_" for ch in base).lstrip(".")[:128]
    return base or fallback


#: prefix of the error of a job failed for a server fault (retried by the sweep once there is space)
SERVER_FAULT = "server fault:"
#: a job failed for server faults this many times is no longer retried automatically
MAX_ATTEMPTS = 5
# 'space is back' after a full disk: this much more free than when the job failed (see space_is_back)
SPACE_BACK_BYTES = 8 * 1024 * 1024


def _upload_suffix(name: str) -> str:
    """The part of an upload's name that says its type (``.nii.gz``, ``.nii``, ``.zip``, ``.dcm``, or none)."""
    low = name.lower()
    for suffix in (".nii.gz", ".nii", ".zip", ".dcm"):
        if low.endswith(suffix):
            return suffix
    return ""


class UploadTooLarge(InputError):
    """The upload is larger than ``--max-upload-mb``."""


class Service:
    """The state, model and threads of one ``resunet serve`` process."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.tokens: TokenStore = TokenStore(self.state_dir / TOKENS_FILE)
        self.queue: Any = None  # JobQueue (SQLite) or resunet.serve.queue_pg.PgJobQueue
        self.metrics: Metrics | None = None
        self.started_at = time.time()
        self.model: Any = None
        self.model_error: str | None = None
        self._predictors: dict[bool, Any] = {}
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._free_at_fault: int | None = None  # bytes free on the state disk when a job last failed for it
        self._threads: list[threading.Thread] = []
        self._lock_fh: Any = None
        self.model_path: Path | None = None
        self.routes: Any = None  # resunet.pacs.routing.Routes when --routes is given
        self.node = config.node_name
        self.uploads_dir = self.state_dir / "uploads" / (self.node if config.shared else "")
        self._running: dict[str, Job] = {}  # jobs this process runs now (their leases are renewed)
        self.db_error: str | None = None  # the last database fault, shown on /readyz
        self.pool: Any = None  # resunet.serve.workers.WorkerPool with --workers N > 1
        self.worker_name: str | None = None  # set in a worker process (open_worker)
        self._memory: Any = None  # resunet.serve.memory.MemoryBudget, in worker processes

    # -- start-up ------------------------------------------------------------------------------------
    def open(self) -> "Service":
        """Lock the state folder, open the queue, re-queue jobs left running; raises ConfigError."""
        import fcntl

        from resunet.io.atomic import make_private, use_private_files
        from resunet.io.scratch import use_temp_root

        use_private_files()  # inputs, outputs, jobs.sqlite, received DICOM: 0600/0700 whatever the umask
        try:
            make_private(self.state_dir)
            # zip extractions and PACS pulls (full copies of a series) stay inside the private state folder,
            # and what a killed service left there is removed now (resunet.io.scratch)
            use_temp_root(self.state_dir / "tmp")
            (self.state_dir / "jobs").mkdir(exist_ok=True)
            self.uploads_dir.mkdir(parents=True, exist_ok=True)
            if self.config.shared:  # one shared folder, a lock per node: it guards "re-queue my running jobs"
                (self.state_dir / "nodes").mkdir(exist_ok=True)
                self._lock_fh = open(self.state_dir / "nodes" / f"{self.node}.lock", "a+")
            else:
                self._lock_fh = open(self.state_dir / "service.lock", "a+")
        except OSError as err:
            raise ConfigError(f"cannot use the state folder {self.state_dir}: {err}; pass --state-dir with a writable folder") from None
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if self.config.shared:
                raise ConfigError(f"another resunet serve node named {self.node} is running on the state folder "
                                  f"{self.state_dir}; give each node its own --node-name") from None
            raise ConfigError(
                f"another resunet serve is running with the state folder {self.state_dir}; stop it or pass another --state-dir"
            ) from None
        if self.config.routes is not None:  # a bad rules file or a rule's missing model stops the start
            from resunet.pacs.routing import load_routes

            self.routes = load_routes(self.config.routes)
            self.routes.check_models()
        if self.config.shared:
            self._open_shared_queue()
        else:  # (re-queueing every running job includes those of this node's workers: NODE/wK)
            self.queue = JobQueue(self.state_dir / "jobs.sqlite")
            self.metrics = Metrics(self.queue.counts, node=self.node)
            again = self.queue.requeue_running()
            if again:
                log.warning("re-queued %d job(s) left running by a stopped service: %s", len(again), ", ".join(again))
        for p in self.uploads_dir.iterdir():  # uploads cut short by a kill never became jobs (this node's only)
            shutil.rmtree(p, ignore_errors=True)
        self.record_audits()
        from resunet.inference.bundled import default_model_path

        self.model_path = Path(self.config.model) if self.config.model else default_model_path()
        if not self.model_path.exists():
            raise ConfigError(f"model {self.model_path} does not exist; pass --model with a checkpoint or export")
        if self.config.workers > 1:
            from resunet.serve.workers import WorkerPool

            self.pool = WorkerPool(self)
            self.pool.prepare()
            assert self.metrics is not None
            self.metrics.add_workers(str(self.pool.metrics_dir), self.pool.alive)
        return self

    def open_worker(self, name: str) -> "Service":
        """Open the queue as worker process ``name`` (``NODE/wK``) of a running service: no lock (the service
        holds it), nothing re-queued (the service does that when a worker dies), jobs claimed as ``name``."""
        from resunet.io.atomic import use_private_files
        from resunet.io.scratch import use_temp_root
        from resunet.serve.metrics import WorkerMetrics

        use_private_files()
        use_temp_root(self.state_dir / "tmp")  # removes only the temp folders of dead processes
        self.worker_name = name
        if self.config.routes is not None:
            from resunet.pacs.routing import load_routes

            self.routes = load_routes(self.config.routes)
        if self.config.shared:
            from resunet.pgdb import PASSWORD_FILE_ENV
            from resunet.serve.queue_pg import PgJobQueue

            if self.config.queue_password_file:
                os.environ[PASSWORD_FILE_ENV] = str(self.config.queue_password_file)
            self.queue = PgJobQueue(self.config.queue_url, node=name, lease_s=self.config.lease_s)
        else:
            self.queue = JobQueue(self.state_dir / "jobs.sqlite", node=name)
        self.metrics = WorkerMetrics(name)  # type: ignore[assignment]
        self.model_path = Path(self.config.model) if self.config.model else _bundled_model()
        return self

    def work(self) -> None:
        """The worker process's loop (after :meth:`open_worker`): load the model, then claim and run jobs
        until SIGTERM; its leases are renewed by a thread (PostgreSQL)."""
        if self.config.shared:
            for target in (self._lease_loop, self._listen_loop):
                t = threading.Thread(target=target, name=f"resunet-{target.__name__}", daemon=True)
                t.start()
                self._threads.append(t)
        self._load_then_work()

    def _open_shared_queue(self) -> None:
        """The PostgreSQL queue: its tokens, the cluster check, this node's and dead nodes' jobs re-queued."""
        from resunet.pgdb import PASSWORD_FILE_ENV
        from resunet.serve.queue_pg import PgJobQueue
        from resunet.serve.tokens import PgTokenStore

        if self.config.queue_password_file:  # libpq-style env var: worker processes inherit it
            os.environ[PASSWORD_FILE_ENV] = str(self.config.queue_password_file)
        self.queue = PgJobQueue(self.config.queue_url, node=self.node, lease_s=self.config.lease_s)
        self.tokens = PgTokenStore(self.queue)
        self.metrics = Metrics(self.queue.counts, node=self.node)
        self._check_cluster()
        again = self.queue.requeue_node()
        if again:
            log.warning("re-queued %d job(s) this node (%s) was running when it stopped: %s", len(again), self.node,
                        ", ".join(again))
        self._requeue_expired()

    def _check_cluster(self) -> None:
        """Refuse a node whose state folder is not the shared folder its database belongs to.

        Job rows hold absolute paths into the state folder, so every node must see the same folder at the
        same path. The first node writes ``cluster.json`` (a random id) into the folder and the same id and
        the folder's path into the database; every later node must find both equal. A node that mounts no
        shared folder (its own empty local folder) is refused here instead of failing every job it takes.
        """
        marker = self.state_dir / "cluster.json"
        url = self.queue.path
        db_id = self.queue.meta("cluster_id")
        for _ in range(30):  # a node starting at the same moment may be between writing the file and the row
            if db_id is not None or not marker.exists():
                break
            time.sleep(0.1)
            db_id = self.queue.meta("cluster_id")
        if db_id is None:
            if marker.exists():
                raise ConfigError(f"the state folder {self.state_dir} belongs to another job database ({_marker_db(marker)}), "
                                  f"not to {url}; use another --state-dir, or remove {marker} if that database is gone")
            _write_marker_once(marker, {"schema": "resunet-serve-cluster/1", "cluster_id": uuid.uuid4().hex,
                                        "database": url, "state_dir": str(self.state_dir)})
            mine = json.loads(marker.read_text(encoding="utf-8"))["cluster_id"]
            db_id = self.queue.set_meta_once("cluster_id", mine)
            self.queue.set_meta_once("state_dir", str(self.state_dir))
        recorded_dir = self.queue.meta("state_dir") or str(self.state_dir)
        if recorded_dir != str(self.state_dir):
            raise ConfigError(f"the job database {url} names the state folder {recorded_dir}, not {self.state_dir}: mount the "
                              f"shared state folder at {recorded_dir} on this node (job records hold its paths) and pass "
                              f"--state-dir {recorded_dir}")
        try:
            file_id = json.loads(marker.read_text(encoding="utf-8"))["cluster_id"]
        except FileNotFoundError:
            file_id = None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{marker} is unreadable ({err}); it ties the state folder to {url}") from None
        if file_id != db_id:
            why = ("has no cluster.json: it is not the shared folder the other nodes use (mount the shared "
                   "filesystem there)") if file_id is None else "belongs to another job database"
            raise ConfigError(f"the state folder {self.state_dir} {why}; the job database {url} was set up with the "
                              f"state folder {recorded_dir} of cluster {db_id[:12]}")

    def start(self) -> None:
        """Load the model (background), then run the worker; run the retention sweep (and the leases)."""
        self._threads = [
            threading.Thread(target=self._load_then_work, name="resunet-serve-worker", daemon=True),
            threading.Thread(target=self._sweep_loop, name="resunet-serve-retention", daemon=True),
        ]
        if self.pool is not None:  # jobs run in the worker processes, not here
            self._threads = self._threads[1:]
            self.pool.start()
        if self.config.shared:
            self._threads.append(threading.Thread(target=self._lease_loop, name="resunet-serve-leases", daemon=True))
            if self.pool is None:
                self._threads.append(threading.Thread(target=self._listen_loop, name="resunet-serve-listen", daemon=True))
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the threads to end (a job being segmented finishes or is redone at the next start)."""
        self._stop.set()
        self._wake.set()
        if self.pool is not None:
            self.pool.stop(timeout)
        for t in self._threads:
            t.join(timeout)
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def wake(self) -> None:
        """Tell the worker a job was queued (other modules enqueue too, e.g. the DICOM node)."""
        self._wake.set()

    @property
    def ready(self) -> bool:
        """The model is warm: here, or (``--workers N``) in at least one live worker process."""
        if self.pool is not None:
            rec = self.pool.warm()
            if rec is not None and self.model is None:
                import types

                self.model = types.SimpleNamespace(**rec["model"])  # name, sha256, kind: for /readyz and the audit
            return rec is not None
        return self._ready.is_set()

    def _load_model(self) -> None:
        from resunet.inference import load_model

        t0 = time.perf_counter()
        self.model = load_model(self.model_path)
        pred = self.predictor(uncertainty=False)
        pred.warm_up()  # first convolutions' one-off setup, off the first job
        seconds = time.perf_counter() - t0
        assert self.metrics is not None
        self.metrics.model_load.set(seconds)
        self.metrics.model_ready.set(1)
        log.info("model %s (sha256 %s) loaded and warm in %.1f s on %s", self.model.name, self.model.sha256[:12],
                 seconds, pred.device)
        self._ready.set()

    def predictor(self, uncertainty: bool = False, model: str | None = None, then: Sequence[str] = ()) -> Any:
        """The Predictor for this model (or ``model``, a routed job's checkpoint path; with ``then``, a
        chain of models, :mod:`resunet.inference.chain`) and the service's settings, built once per
        (models, uncertainty mode) and kept warm."""
        from resunet.inference import Predictor, load_model

        key: Any = bool(uncertainty) if model is None else (bool(uncertainty), str(model), *map(str, then))
        if key not in self._predictors:
            c = self.config
            settings = dict(device=c.device, tta=c.tta, overlap=c.overlap, sw_batch=c.sw_batch,
                            uncertainty="tta" if uncertainty else None)
            loaded = self.model if model is None else load_model(model)
            built: Any = Predictor(loaded, **settings)
            if then:
                from resunet.inference.chain import ChainPredictor

                built = ChainPredictor([built, *(Predictor(load_model(m), **settings) for m in then)])
            self._predictors[key] = built
        return self._predictors[key]

    def job_dir(self, job_id: str) -> Path:
        return self.state_dir / "jobs" / job_id

    def default_formats(self) -> tuple[str, ...]:
        return tuple(self.config.formats)

    def input_rules(self) -> dict[str, Any]:
        from resunet.io.limits import Limits

        return {"min_slices": self.config.min_slices, "allow_split_series": self.config.allow_split_series,
                "limits": Limits.from_env(max_memory_gb=self.config.max_memory_gb)}

    # -- submitting -------------------------------------------------------------------------------
    def submit(self, files: Sequence[tuple[str | None, BinaryIO]], options: dict[str, Any], who: str) -> Job:
        """Store an upload, check it reads as a study (the CLI's message if not), queue a ``segment`` job.

        Args:
            files: ``(client file name, readable binary stream)`` per uploaded file: one NIfTI, one .zip,
                or DICOM files.
            options: ``segment`` options (see :func:`resunet.serve.jobs.segment_options`).
            who: token name of the submitter.

        Raises:
            InputError, ConfigError: the upload or an option is not usable (HTTP 4xx with this message).
        """
        assert self.queue is not None
        opts = segment_options(options, self.default_formats())
        self.check_space()
        if not files:
            raise InputError("no file uploaded; send one .nii/.nii.gz file, one .zip of a DICOM series, or DICOM files")
        if len(files) > self.config.max_files:
            raise InputError(f"{len(files)} files uploaded, more than the limit of {self.config.max_files}; send a .zip of the series")
        names = [safe_upload_name(n, f"file{i:05d}") for i, (n, _) in enumerate(files)]
        from resunet.io.nifti import is_nifti_path

        n_nifti = sum(is_nifti_path(Path(n)) for n in names)
        n_zip = sum(n.lower().endswith(".zip") for n in names)
        if (n_nifti or n_zip) and len(names) > 1:
            raise InputError(
                f"{len(names)} files uploaded ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); send one NIfTI file, "
                "one .zip, or only DICOM files, not a mix"
            )
        job_id = uuid.uuid4().hex
        staging = self.uploads_dir / job_id
        staging.mkdir(parents=True)
        try:
            keep = self.config.keep_upload_names
            if n_nifti or n_zip or len(names) == 1:  # one file: read as the CLI reads that file
                # Upload names carry PHI (Doe_John_MRN..._DOB....nii.gz): unless the operator keeps them,
                # the stored file, the job's input name and so every output name come from the job id.
                stored = names[0] if keep else job_id + _upload_suffix(names[0])
                target = staging / stored
                display = names[0] if keep else f"upload{_upload_suffix(names[0])}"
                client = names[0]  # what the client sent: named in an answer to this request only
                self._copy(files[0][1], target, 0)
            else:
                target = staging / "study"
                target.mkdir()
                display = client = f"{len(names)} DICOM files"
                total = 0
                seen: set[str] = set()
                for i, ((_, fh), name) in enumerate(zip(files, names)):
                    if not keep:
                        name = f"{i:05d}.dcm"
                    elif name in seen:
                        name = f"{i:05d}_{name}"
                    seen.add(name)
                    total = self._copy(fh, target / name, total)
            opts["memory_estimate_bytes"] = self._check_study(target, opts["series_uid"], staging, client,
                                                              self.input_rules())
            from resunet.io.hashing import sha256_path

            sha = sha256_path(target)
            final_dir = self.job_dir(job_id) / "input"
            final_dir.parent.mkdir(parents=True)
            os.replace(staging, final_dir)  # same filesystem: atomic
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            job = self.queue.enqueue("segment", input_path=final_dir / target.name, input_name=display,
                                     input_sha256=sha, options=opts, submitted_by=who, job_id=job_id)
        except ServerError:  # the database is away: not accepted (503), so the stored upload goes
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            raise
        self._wake.set()
        return job

    def _copy(self, src: BinaryIO, dst: Path, total: int) -> int:
        """Copy an upload to ``dst``; returns the running byte total; UploadTooLarge past the limit."""
        limit = self.config.max_upload_bytes
        try:
            with open(dst, "wb") as out:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > limit:
                        raise UploadTooLarge(
                            f"upload larger than the limit of {self.config.max_upload_mb:g} MB; ask the operator to raise "
                            "--max-upload-mb or send a smaller study"
                        )
                    out.write(chunk)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):  # the server's disk, not the client's upload
                raise DiskFullError(f"no space left in the state folder {self.state_dir} while storing an upload ({err});"
                                    " free space there") from None
            raise
        return total

    @staticmethod
    def _check_study(target: Path, series_uid: str | None, staging: Path, display: str, rules: dict[str, Any]) -> int:
        """Check the upload from its headers (resunet.io.precheck, deep: zips extracted, .nii.gz streamed):
        its InputError, with client names, if it cannot be read, is over the memory limit, or is only part
        of a series / too few slices (``rules``, :meth:`input_rules`). No volume is decoded here: eight
        parallel uploads that each decoded a 600^3 volume in the request took the service to 4 GB."""
        from resunet.io.precheck import check_study

        try:
            return check_study(target, series_uid=series_uid, limits=rules["limits"], deep=True,
                               min_slices=rules["min_slices"], allow_split=rules["allow_split_series"])
        except ResunetError as err:
            text = _rename(str(err), staging, display)
            if target.is_file() and target.name != display:  # the stored name (job id) -> the client's own
                text = text.replace(target.name, display)
            raise type(err)(text) from None
        except Exception as err:  # a reader bug must still be a clear 4xx about this input
            log.debug("reading upload %s failed:\n%s", display, traceback.format_exc())
            raise InputError(f"{display}: cannot be read as a scan ({type(err).__name__}: {err})") from None

    # -- the worker --------------------------------------------------------------------------------
    def _load_then_work(self) -> None:
        if self.config.worker_threads and self.worker_name is None:  # the in-process worker (--workers 1)
            import torch

            torch.set_num_threads(self.config.worker_threads)
        try:
            self._load_model()
        except Exception as err:  # noqa: BLE001 - the service stays up and says why on /readyz
            self.model_error = str(err) if isinstance(err, ResunetError) else f"{type(err).__name__}: {err}"
            log.error("cannot load the model %s: %s", self.model_path, self.model_error)
            return
        if self.worker_name is not None:  # tell the pool this worker is warm (WorkerPool.warm)
            from resunet.io.atomic import atomic_write_text
            from resunet.serve.workers import WorkerPool

            rec = {"pid": os.getpid(), "worker": self.worker_name, "device": str(self.predictor().device),
                   "model": {"name": self.model.name, "sha256": self.model.sha256, "kind": self.model.kind}}
            atomic_write_text(WorkerPool(self).ready_file(self.worker_name), json.dumps(rec))
        poll = 0.25 if self.worker_name is not None and not self.config.shared else 1.0  # SQLite workers poll
        while not self._stop.is_set():
            try:
                busy = self.run_one()
                self.db_error = None
            except ServerError as err:  # the database went away: jobs wait in it; try again shortly
                if self.db_error != str(err):
                    log.error("worker waits for the job database: %s", err)
                self.db_error = str(err)
                busy = False
                self._stop.wait(2.0)
            if not busy:
                self._wake.wait(poll)
                self._wake.clear()

    def run_one(self) -> bool:
        """Claim and run one job; False when the queue is empty."""
        assert self.queue is not None and self.metrics is not None
        if self.low_on_space():  # jobs wait in the queue until the operator frees space
            return False
        job = self.queue.claim()
        if job is None:
            return False
        self._running[job.id] = job
        try:
            return self._run_claimed(job)
        finally:
            self._running.pop(job.id, None)

    def _run_claimed(self, job: Job) -> bool:
        t0 = time.perf_counter()
        handler = KINDS.get(job.kind)
        outcome: JobOutcome | None = None
        error: str | None = None
        try:
            if handler is None:
                raise ConfigError(f"job {job.id} has kind {job.kind!r}, which this service does not run")
            with self._memory_for(job):
                outcome = handler(job, self)
        except ServerError as err:  # the server's fault (a full disk): the operator's message goes to the log
            log.error("job %s failed for a server fault (retried when space is back): %s", job.id, err)
            with contextlib.suppress(OSError):
                self._free_at_fault = shutil.disk_usage(self.state_dir).free
            error = (f"{SERVER_FAULT} {err.client_text};"
                     f" the job is retried automatically once the operator has fixed it (or POST /v1/jobs/{job.id}/retry)")
        except ResunetError as err:
            error = client_message(str(err), self.job_dir(job.id), job.input_name, job.input_path)
        except Exception as err:  # noqa: BLE001 - one bad job must not stop the worker
            log.error("job %s failed with an internal error:\n%s", job.id, traceback.format_exc())
            error = f"internal error ({type(err).__name__}: {client_message(str(err), self.job_dir(job.id), job.input_name, job.input_path)})"
        if outcome is not None:
            held = {"review": outcome.review} if outcome.review else {}  # --require-review (SQLite queue only)
            ok = self._settle(lambda: self.queue.finish(job, outcome.outputs, outcome.result, **held))
            outcome_name = "done"
        else:
            ok = self._settle(lambda: self.queue.fail(job, error or "unknown error"))
            outcome_name = "failed"
            log.warning("job %s (input sha256 %s) failed: %s", job.id, (job.input_sha256 or "")[:12], error)
        if not ok:
            log.warning("job %s was taken over by another node (its lease expired); this node's result is dropped", job.id)
        if ok:
            self.metrics.jobs_finished.labels(outcome_name).inc()
            if outcome_name == "failed":
                self.metrics.job_failures.inc()
            self.metrics.job_duration.observe(time.perf_counter() - t0)
        self.record_audits()
        return True

    def _memory_for(self, job: Job) -> Any:
        """The job's reservation in the node's memory budget (:mod:`resunet.serve.memory`), with
        ``--workers N``; one in-process worker runs one job at a time, which the budget covers already."""
        if self.worker_name is None:
            return contextlib.nullcontext()
        from resunet.serve.memory import MemoryBudget

        limits = self.input_rules()["limits"]
        if self._memory is None:
            self._memory = MemoryBudget(self.state_dir / "memory", self.node, limits.max_bytes)
        need = job.options.get("memory_estimate_bytes")
        if need is None and job.input_path and Path(job.input_path).exists():  # a received series: its headers
            from resunet.io.precheck import check_study

            with contextlib.suppress(Exception):  # an unreadable input fails in the job with its reason
                need = check_study(job.input_path, limits=limits)

        def note(event: str, detail: dict[str, Any]) -> None:
            with contextlib.suppress(ServerError):
                self.queue.note(job.id, event, json.dumps(detail, sort_keys=True))

        return self._memory.reserve(job.id, need, stop=self._stop.is_set, note=note)

    def _settle(self, commit: Any) -> bool:
        """Run ``commit`` (finish/fail); while the database is away, retry for up to the lease time (the job
        keeps its claim that long; after it another node redoes it). False: the claim is stale."""
        deadline = time.monotonic() + self.config.lease_s
        while True:
            try:
                return bool(commit())
            except ServerError as err:
                if time.monotonic() > deadline or self._stop.is_set():
                    log.error("cannot record a finished job (it will be redone once its lease expires): %s", err)
                    return False
                self.db_error = str(err)
                time.sleep(2.0)

    # -- several nodes: leases ---------------------------------------------------------------------
    def _lease_loop(self) -> None:
        """Renew the leases of this process's running jobs; re-queue the jobs of nodes whose leases expired
        (the service process does that; a worker process only renews)."""
        interval = min(5.0, self.config.lease_s / 4)
        while not self._stop.wait(interval):
            try:
                for job in list(self._running.values()):
                    if not self.queue.renew(job):
                        log.warning("job %s: its claim was taken over (lease expired); its result will be dropped", job.id)
                if self.worker_name is None:
                    self._requeue_expired()
            except ResunetError as err:
                log.error("lease renewal: %s", err)

    def _requeue_expired(self) -> list[str]:
        ids = self.queue.requeue_expired()
        if ids:
            assert self.metrics is not None
            self.metrics.lease_expiries.inc(len(ids))
            log.warning("re-queued %d job(s) whose node stopped renewing its lease: %s", len(ids), ", ".join(ids))
            self._wake.set()
        return ids

    def _listen_loop(self) -> None:
        """Wake the worker when any node queues a job (PostgreSQL NOTIFY); the worker polls each second too."""
        while not self._stop.is_set():
            if self.queue.wait_notify(1.0):
                self._wake.set()

    def check_database(self) -> str | None:
        """None when the queue's database answers, else the reason (for /readyz)."""
        try:
            self.queue.ping()
        except ResunetError as err:
            return str(err)
        return None

    def audit_target(self) -> Any:
        """Where jobs are recorded: None (the default log), a file, or the PostgreSQL queue's database."""
        if self.config.audit_db in (None, True):
            return self.config.queue_url or None
        return self.config.audit_db

    def record_audits(self) -> None:
        """Append every finished, not yet recorded job to the audit log (once: run id ``serve-<job id>``)."""
        if self.config.audit_db is False or self.queue is None:
            return
        from resunet.reports.audit import record_run, run_recorded

        db = self.audit_target()
        for job in self.queue.unaudited():
            run_id = f"serve-{job.id}"
            try:
                if not run_recorded(run_id, db):
                    try:
                        record_run("serve", self._provenance(job, run_id), self._output_records(job), db_path=db)
                    except ResunetError:
                        if not run_recorded(run_id, db):  # another node recorded it in between: fine
                            raise
                self.queue.mark_audited(job.id, run_id)
            except ResunetError as err:
                log.error("cannot record job %s in the audit log: %s", job.id, err)
                return

    def _provenance(self, job: Job, run_id: str) -> dict[str, Any]:
        from resunet.reports.provenance import collect_provenance

        prov = collect_provenance(command=["resunet", "serve", "job", job.id], run_id=run_id,
                                  started_utc=_iso(job.started_at or job.created_at))
        prov["user"] = job.submitted_by or "anonymous"
        model = job.result.get("model") if job.result else None
        if not model and self.model is not None:
            model = {"name": self.model.name, "sha256": self.model.sha256}
        prov["model"] = {**(model or {}), "path": str((job.options or {}).get("model") or self.model_path)}
        if (job.options or {}).get("route"):
            prov["route"] = job.options["route"]  # the routing rule that picked the model
        prov["files"] = {"input": [{"path": job.input_name, "sha256": job.input_sha256}]}
        prov["job"] = {"id": job.id, "kind": job.kind, "state": job.state, "error": job.error,
                       "options": job.options, "attempts": job.attempts, "finished_utc": _iso(job.finished_at)}
        return prov

    def _output_records(self, job: Job) -> list[dict[str, Any]]:
        return [{"path": str(self.job_dir(job.id) / o["path"]), "sha256": o["sha256"], "key": k}
                for k, o in sorted(job.outputs.items())]

    # -- retention ---------------------------------------------------------------------------------
    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.config.sweep_interval_s):
            try:
                self.sweep()
                self.retry_server_faults()
            except ResunetError as err:  # e.g. the queue database is down: one line, retried at the next interval
                log.error("retention sweep failed (retried in %.0f s): %s", self.config.sweep_interval_s, err)
            except Exception:  # noqa: BLE001 - a failed sweep is retried at the next interval
                log.error("retention sweep failed:\n%s", traceback.format_exc())

    def free_gb(self) -> float:
        """Free space on the state folder's disk, GB."""
        return shutil.disk_usage(self.state_dir).free / 1e9

    def low_on_space(self) -> bool:
        """True when the state folder's disk has less free space than ``--min-free-gb``."""
        return self.config.min_free_gb > 0 and self.free_gb() < self.config.min_free_gb

    def check_space(self) -> None:
        """DiskFullError (507) when the state folder's disk is below its free-space floor: an upload is
        refused before it can fill the disk (the operator's message names the folder)."""
        if self.low_on_space():
            raise DiskFullError(f"the state folder {self.state_dir} has {self.free_gb():.2f} GB free, below the floor of "
                                f"{self.config.min_free_gb:g} GB (--min-free-gb); free space there")

    def space_is_back(self) -> bool:
        """True when the state disk is above its floor and has at least SPACE_BACK_BYTES more free than
        when a job last failed for a full disk: with a floor of 0 (or a disk that filled above it), being
        above the floor alone says nothing, and re-queueing at once would only fail the job again."""
        if self.low_on_space():
            return False
        if self._free_at_fault is None:
            return True
        try:
            return shutil.disk_usage(self.state_dir).free >= self._free_at_fault + SPACE_BACK_BYTES
        except OSError:
            return False

    def retry_server_faults(self) -> list[str]:
        """Re-queue jobs failed for a server fault (a full disk) once space is back (space_is_back)."""
        assert self.queue is not None
        if not self.space_is_back():
            return []
        again = [j.id for j in self.queue.failed_with(SERVER_FAULT, MAX_ATTEMPTS) if self.queue.retry(j.id, "service")]
        if again:
            self._free_at_fault = None
            log.warning("re-queued %d job(s) that failed for a server fault: %s", len(again), ", ".join(again))
            self._wake.set()
        return again

    def erase(self, job: Any, by: str) -> None:
        """Delete a job's inputs and outputs now, on its submitter's (or an admin's) request; the job row
        and its audit record (with the hashes) stay. Raises InputError when it is running (claimed)."""
        assert self.queue is not None
        if not self.queue.erase(job.id, by):
            raise InputError(f"job {job.id} is running; delete it once it is done or failed")
        shutil.rmtree(self.job_dir(job.id), ignore_errors=True)

    def sweep(self, now: float | None = None) -> int:
        """Delete the files of jobs finished more than ``retention_hours`` ago; returns how many jobs."""
        assert self.queue is not None
        now = time.time() if now is None else now
        cutoff = now - self.config.retention_s
        n = 0
        for job in self.queue.finished_before(cutoff):
            shutil.rmtree(self.job_dir(job.id), ignore_errors=True)
            self.queue.mark_purged(job.id)
            n += 1
        known = self.queue.known_ids()
        orphan_cutoff = now - max(self.config.retention_s, 3600.0)  # never race an upload being committed
        for d in (self.state_dir / "jobs").iterdir():  # folders of uploads whose job row never committed
            with contextlib.suppress(OSError):
                if d.name not in known and d.stat().st_mtime < orphan_cutoff:
                    shutil.rmtree(d, ignore_errors=True)
        if n:
            log.info("retention: deleted the files of %d job(s) finished more than %g h ago", n, self.config.retention_hours)
        return n


def _write_marker_once(marker: Path, doc: dict[str, Any]) -> None:
    """Create ``marker`` with ``doc`` unless it exists (atomic: a hard link of a finished temp file; a node
    racing this one keeps the first)."""
    tmp = marker.with_name(f".{marker.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    try:
        os.link(tmp, marker)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _marker_db(marker: Path) -> str:
    try:
        return str(json.loads(marker.read_text(encoding="utf-8")).get("database") or "unnamed")
    except (OSError, ValueError, AttributeError):
        return "unreadable cluster.json"


def _rename(message: str, staging: Path, display: str) -> str:
    text = message
    for folder in sorted({p for p in staging.rglob("*")} | {staging}, key=lambda p: -len(str(p))):
        if folder.is_dir():
            text = text.replace(str(folder) + "/", "")
    return text.replace(str(staging), display)


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
