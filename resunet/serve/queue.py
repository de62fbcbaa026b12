"""The service's job queue: one SQLite database file (WAL) in the state folder.

Why SQLite and not a dict: an accepted job must survive a SIGKILL of the service. Every state change
is one transaction, so after a crash the database holds exactly the jobs that were accepted (the
HTTP 202 is sent after the ``enqueue`` commit) and the ones that were finished (``finish`` commits the
state ``done`` together with the output hashes).

Job life cycle (column ``state``)::

    queued --claim--> running --finish--> done
                         |------fail----> failed
    running --(service killed, restarted)--> queued   (requeue_running at start-up; attempts + 1)
    done (review pending) --review--> done (approved | rejected)   (``resunet serve --require-review``)

- A job finished with ``review`` (:meth:`JobQueue.finish`) holds its outputs until a person decides
  (:mod:`resunet.serve.review`): its ``review_state`` is ``pending`` (``GET /v1/jobs?state=review``
  lists these, and retention leaves their files alone), then ``approved`` or ``rejected`` by
  :meth:`JobQueue.decide`, once.

- :meth:`JobQueue.claim` takes the oldest queued job atomically (``BEGIN IMMEDIATE``) and stamps it
  with a fresh claim token; :meth:`finish`/:meth:`fail` only change a job that still holds that token,
  so a job can be finished once only. Each transition is also appended to the ``events`` table, which
  is how "finished exactly once" is checked (one ``done`` event per job).
- Jobs have a ``kind`` (``"segment"``: segment the uploaded study) and free-form ``options`` (JSON).
  Other modules add kinds without touching this file: call :meth:`JobQueue.enqueue` with a new kind
  and register its handler with :func:`resunet.serve.jobs.register_kind` (see docs/ARCHITECTURE.md).
- Only one service process may use a state folder at a time (``resunet.serve.service`` holds a lock);
  that is what makes "re-queue every running job at start-up" safe.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from resunet.errors import ConfigError

#: Job states, in life-cycle order.
STATES = ("queued", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    submitted_by TEXT,
    input_name TEXT,
    input_path TEXT,
    input_sha256 TEXT,
    options_json TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    claim TEXT,
    error TEXT,
    outputs_json TEXT,
    result_json TEXT,
    audit_run_id TEXT,
    purged_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id);
"""


@dataclass
class Job:
    """One row of the ``jobs`` table.

    Attributes:
        id: 32 hex characters (uuid4).
        kind: what the worker does with it (``"segment"``, or a kind another module registered).
        state: one of :data:`STATES`.
        submitted_by: token name of the submitter (``"anonymous"`` without auth).
        input_name: the name the client gave (file name or ``n DICOM files``); shown in messages.
        input_path: the stored input (file or folder), absolute; None for kinds that fetch their input.
        input_sha256: SHA-256 of the stored input (``resunet.io.hashing.sha256_path``).
        options: kind-specific options (for ``segment``: ``formats``, ``uncertainty``, ...).
        created_at, started_at, finished_at, purged_at: Unix times, s.
        attempts: how many times a worker claimed it (> 1 after a crash mid-job).
        claim: token of the current claim (running jobs only).
        error: the one-line reason of a failed job.
        outputs: ``{key: {"path" (relative to the job folder), "sha256", "size_bytes"}}`` of a done job.
        result: kind-specific results (for ``segment``: volumes per label, model, timings).
        audit_run_id: the audit-log run id once recorded there.
    """

    id: str
    kind: str
    state: str
    submitted_by: str | None
    input_name: str | None
    input_path: str | None
    input_sha256: str | None
    options: dict[str, Any]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    claim: str | None = None
    error: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    audit_run_id: str | None = None
    purged_at: float | None = None
    review: dict[str, Any] = field(default_factory=dict)

    @property
    def review_state(self) -> str | None:
        """``pending``, ``approved`` or ``rejected`` for a job held for review (--require-review), else None."""
        return self.review.get("state") if self.review else None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        return cls(
            id=row["id"], kind=row["kind"], state=row["state"], submitted_by=row["submitted_by"],
            input_name=row["input_name"], input_path=row["input_path"], input_sha256=row["input_sha256"],
            options=json.loads(row["options_json"] or "{}"), created_at=row["created_at"],
            started_at=row["started_at"], finished_at=row["finished_at"], attempts=row["attempts"],
            claim=row["claim"], error=row["error"], outputs=json.loads(row["outputs_json"] or "{}"),
            result=json.loads(row["result_json"] or "{}"), audit_run_id=row["audit_run_id"],
            purged_at=row["purged_at"],
            review=json.loads(row["review_json"] or "{}") if "review_json" in row.keys() else {},
        )


class JobQueue:
    """The SQLite job queue at ``path`` (created with its tables on first use).

    Safe to use from several threads (one connection per thread) and processes (SQLite locking; WAL
    lets readers run while the worker writes).
    """

    def __init__(self, path: str | Path, node: str | None = None) -> None:
        self.path = Path(path)
        self.node = node  # who claims (``--workers``: ``NODE/wK``, so a dead worker's job is re-queued)
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._conn()
            conn.executescript(_SCHEMA)  # IF NOT EXISTS: safe on every start
            columns = {r["name"] for r in conn.execute("PRAGMA table_info(jobs)")}
            # databases made before --workers (node) and --require-review (review_state, review_json):
            # columns more, nothing else changes
            for column in ("node", "review_state", "review_json"):
                if column in columns:
                    continue
                try:
                    conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")
                except sqlite3.OperationalError as err:
                    if "duplicate column" not in str(err):  # another worker added it a moment ago
                        raise
        except (OSError, sqlite3.Error) as err:
            raise ConfigError(f"cannot open the job database {self.path}: {err}; check the state folder") from err

    # -- connections --------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a committed 202/done survives power loss too
            self._local.conn = conn
        return conn

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type: Any, *rest: Any) -> None:
            self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")

    def _tx(self) -> "JobQueue._Tx":
        """One write transaction (``BEGIN IMMEDIATE``: takes the write lock at once)."""
        return JobQueue._Tx(self._conn())

    @staticmethod
    def _event(conn: sqlite3.Connection, job_id: str, event: str, detail: str | None = None) -> None:
        conn.execute("INSERT INTO events (job_id, at, event, detail) VALUES (?, ?, ?, ?)",
                     (job_id, time.time(), event, detail))

    # -- the API other modules use -----------------------------------------------------------------
    def enqueue(
        self,
        kind: str,
        *,
        input_path: str | Path | None = None,
        input_name: str | None = None,
        input_sha256: str | None = None,
        options: dict[str, Any] | None = None,
        submitted_by: str | None = None,
        job_id: str | None = None,
    ) -> Job:
        """Add a job in state ``queued`` and return it (committed when this returns).

        Args:
            kind: a kind registered with :func:`resunet.serve.jobs.register_kind` (``"segment"`` built in).
            input_path: stored input file or folder (the job owns it: retention deletes it); None when the
                job fetches its input itself (e.g. a PACS pull).
            input_name: what to call the input in messages and listings.
            input_sha256: SHA-256 of the input, if known.
            options: JSON-able, kind-specific options.
            submitted_by: who asked (token name, AE title, ...); recorded in the audit log.
            job_id: a chosen id (32 hex); default a new uuid4.
        """
        job_id = job_id or uuid.uuid4().hex
        opts = json.dumps(options or {}, sort_keys=True)
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO jobs (id, kind, state, submitted_by, input_name, input_path, input_sha256,"
                " options_json, created_at) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                (job_id, kind, submitted_by, input_name, str(input_path) if input_path else None,
                 input_sha256, opts, now),
            )
            self._event(conn, job_id, "queued")
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def claim(self) -> Job | None:
        """Take the oldest queued job: state ``running``, a new claim token, attempts + 1; None if none."""
        token = uuid.uuid4().hex
        with self._tx() as conn:
            row = conn.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET state = 'running', claim = ?, started_at = ?, attempts = attempts + 1, node = ?"
                " WHERE id = ? AND state = 'queued'",
                (token, time.time(), self.node, row["id"]),
            )
            self._event(conn, row["id"], "claimed", token)
        return self.get(row["id"])

    def finish(self, job: Job, outputs: dict[str, Any], result: dict[str, Any] | None = None,
               review: dict[str, Any] | None = None) -> bool:
        """Mark ``job`` done with its output records, in one transaction; False if its claim is stale.

        ``review``: hold the outputs for a person's decision (``{"state": "pending", ...}``, what to send
        where once approved); see :meth:`decide`.
        """
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = 'done', finished_at = ?, outputs_json = ?, result_json = ?, claim = NULL,"
                " error = NULL, review_state = ?, review_json = ? WHERE id = ? AND state = 'running' AND claim = ?",
                (time.time(), json.dumps(outputs, sort_keys=True), json.dumps(result or {}, sort_keys=True, default=str),
                 (review or {}).get("state"), json.dumps(review, sort_keys=True, default=str) if review else None,
                 job.id, job.claim),
            )
            if cur.rowcount != 1:
                return False
            self._event(conn, job.id, "done", json.dumps({k: v.get("sha256") for k, v in outputs.items()}))
            if review:
                self._event(conn, job.id, "review", review.get("state"))
        return True

    def decide(self, job_id: str, review: dict[str, Any]) -> bool:
        """Record a review decision (``review["state"]`` approved/rejected) on a job still pending review, once;
        False when the job is not pending (already decided, or never held)."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE jobs SET review_state = ?, review_json = ? WHERE id = ? AND state = 'done'"
                " AND review_state = 'pending'",
                (review["state"], json.dumps(review, sort_keys=True, default=str), job_id))
            if cur.rowcount != 1:
                return False
            self._event(conn, job_id, "review", f"{review['state']} by {review.get('reviewer')}")
        return True

    def fail(self, job: Job, message: str) -> bool:
        """Mark ``job`` failed with a one-line ``message``; False if its claim is stale."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = 'failed', finished_at = ?, error = ?, claim = NULL"
                " WHERE id = ? AND state = 'running' AND claim = ?",
                (time.time(), message, job.id, job.claim),
            )
            if cur.rowcount != 1:
                return False
            self._event(conn, job.id, "failed", message)
        return True

    def requeue_running(self) -> list[str]:
        """Put every ``running`` job back to ``queued`` (start-up after a crash); returns their ids."""
        with self._tx() as conn:
            ids = [r["id"] for r in conn.execute("SELECT id FROM jobs WHERE state = 'running' ORDER BY seq")]
            conn.execute("UPDATE jobs SET state = 'queued', claim = NULL WHERE state = 'running'")
            for i in ids:
                self._event(conn, i, "requeued")
        return ids

    # -- what the PostgreSQL queue needs for several nodes; one SQLite file has one node ------------------
    def renew(self, job: Job) -> bool:
        """True while ``job`` still holds its claim (SQLite has no leases: its one service re-queues at start)."""
        row = self._conn().execute("SELECT 1 FROM jobs WHERE id = ? AND state = 'running' AND claim = ?",
                                   (job.id, job.claim)).fetchone()
        return row is not None

    def requeue_node(self, node: str | None = None) -> list[str]:
        """Running jobs claimed by ``node`` (default this queue's) or by its workers (``NODE/wK``) back to
        queued: a worker process that died, restarted by its service. Returns their ids."""
        node = node or self.node or ""
        with self._tx() as conn:
            ids = [r["id"] for r in conn.execute(
                "SELECT id FROM jobs WHERE state = 'running' AND (node = ? OR substr(node, 1, ?) = ?) ORDER BY seq",
                (node, len(node) + 2, node + "/w"))]
            for i in ids:
                conn.execute("UPDATE jobs SET state = 'queued', claim = NULL WHERE id = ?", (i,))
                self._event(conn, i, "requeued", node)
        return ids

    def requeue_expired(self) -> list[str]:
        """No leases in SQLite: nothing expires (see :class:`resunet.serve.queue_pg.PgJobQueue`)."""
        return []

    def ping(self) -> None:
        """Nothing to reach: the database is a file in the state folder."""

    # -- listings -------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Number of jobs per state (every state present, 0 when none)."""
        out = {s: 0 for s in STATES}
        for row in self._conn().execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            out[row["state"]] = int(row["n"])
        return out

    def jobs(self, state: str | None = None, limit: int = 1000) -> list[Job]:
        """Jobs (newest first), optionally of one state (``review``: done jobs whose review is pending)."""
        if state == "review":
            rows = self._conn().execute("SELECT * FROM jobs WHERE state = 'done' AND review_state = 'pending'"
                                        " ORDER BY seq DESC LIMIT ?", (limit,))
        elif state is None:
            rows = self._conn().execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,))
        else:
            rows = self._conn().execute("SELECT * FROM jobs WHERE state = ? ORDER BY seq DESC LIMIT ?", (state, limit))
        return [Job.from_row(r) for r in rows]

    def finished_before(self, when: float) -> list[Job]:
        """Done/failed jobs finished before Unix time ``when`` whose files are not purged yet."""
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE state IN ('done', 'failed') AND finished_at < ? AND purged_at IS NULL"
            " AND (review_state IS NULL OR review_state != 'pending') ORDER BY seq", (when,))
        return [Job.from_row(r) for r in rows]

    def mark_purged(self, job_id: str) -> None:
        """Record that retention deleted the job's files (the row stays: it is what the audit log points to)."""
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET purged_at = ? WHERE id = ?", (time.time(), job_id))
            self._event(conn, job_id, "purged")

    def retry(self, job_id: str, by: str) -> bool:
        """Put a failed job whose files are still there back in the queue; False if it is not such a job."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = 'queued', error = NULL, finished_at = NULL, claim = NULL"
                " WHERE id = ? AND state = 'failed' AND purged_at IS NULL", (job_id,))
            if cur.rowcount != 1:
                return False
            self._event(conn, job_id, "retried", by)
        return True

    def failed_with(self, prefix: str, max_attempts: int) -> list[Job]:
        """Failed jobs (files kept) whose error starts with ``prefix`` and that ran fewer than ``max_attempts`` times."""
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE state = 'failed' AND purged_at IS NULL AND substr(error, 1, ?) = ?"
            " AND attempts < ? ORDER BY seq", (len(prefix), prefix, max_attempts))
        return [Job.from_row(r) for r in rows]

    def erase(self, job_id: str, by: str) -> bool:
        """Mark a job's files deleted on request (``DELETE /v1/jobs/{id}``): a queued job fails with
        "deleted by ..." so that no worker takes it; False (nothing changed) when it is running."""
        now = time.time()
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE jobs SET purged_at = ?,"
                " error = CASE WHEN state = 'queued' THEN ? ELSE error END,"
                " finished_at = CASE WHEN state = 'queued' THEN ? ELSE finished_at END,"
                " state = CASE WHEN state = 'queued' THEN 'failed' ELSE state END"
                " WHERE id = ? AND state != 'running'",
                (now, f"deleted by {by} before it ran", now, job_id),
            )
            if cur.rowcount != 1:
                return False
            self._event(conn, job_id, "erased", by)
        return True

    def unaudited(self) -> list[Job]:
        """Finished jobs not yet recorded in the audit log (the recorder was killed in between)."""
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE state IN ('done', 'failed') AND audit_run_id IS NULL ORDER BY seq")
        return [Job.from_row(r) for r in rows]

    def mark_audited(self, job_id: str, run_id: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET audit_run_id = ? WHERE id = ?", (run_id, job_id))

    def known_ids(self) -> set[str]:
        return {r["id"] for r in self._conn().execute("SELECT id FROM jobs")}

    def note(self, job_id: str, event: str, detail: str | None = None) -> None:
        """Append an event of the job's life that is not a state change (e.g. ``memory``: its reservation
        in the node's memory budget, :mod:`resunet.serve.memory`)."""
        with self._tx() as conn:
            self._event(conn, job_id, event, detail)

    def events(self, job_id: str | None = None) -> Iterator[dict[str, Any]]:
        """The event log (oldest first): ``{"job_id", "at", "event", "detail"}``."""
        sql = "SELECT job_id, at, event, detail FROM events"
        rows = self._conn().execute(sql + " WHERE job_id = ? ORDER BY seq", (job_id,)) if job_id else \
            self._conn().execute(sql + " ORDER BY seq")
        for r in rows:
            yield dict(r)

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
