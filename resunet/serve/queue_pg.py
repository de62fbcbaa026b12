"""The job queue in PostgreSQL (``resunet serve --queue postgresql://USER@HOST/DB``): one queue for many nodes.

The same contract as the SQLite :class:`resunet.serve.queue.JobQueue` (the queue tests run against
both), plus what several nodes need:

- :meth:`PgJobQueue.claim` takes the oldest queued job with ``SELECT ... FOR UPDATE SKIP LOCKED``
  (two nodes claiming at once get two different jobs, neither waits for the other) and gives it a
  lease: ``lease_until`` = the database's clock + ``lease_s``. The database's clock, not the node's, so
  nodes whose clocks disagree still agree on when a lease ends.
- The node renews the lease while the job runs (:meth:`renew`, from a heartbeat thread). A node that
  dies (SIGKILL, power loss) stops renewing; once the lease has expired any node's
  :meth:`requeue_expired` puts the job back in the queue (event ``lease-expired``, naming the dead node)
  and another node takes it. A restarted node re-queues its own running jobs at once
  (:meth:`requeue_node`).
- The claim token still makes "finished" happen once: :meth:`finish` changes only a row that holds the
  claim, and a re-queued job gets a new claim, so a node that was presumed dead but comes back cannot
  finish the job a second time.
- Wake-up: :meth:`enqueue` sends ``NOTIFY resunet_jobs`` in its transaction; nodes also poll every
  second, so a lost notification costs at most a second.

Tables (created on first use, under an advisory lock so two nodes starting at once do not race):
``resunet_jobs``, ``resunet_events`` (every transition, as in SQLite), ``resunet_meta`` (the state
folder this database belongs to), ``resunet_tokens`` (:class:`resunet.serve.tokens.PgTokenStore`); the
audit log is ``resunet_audit`` (:mod:`resunet.reports.audit_pg`).

A connection per thread (psycopg connections are not to be shared by threads mid-transaction). A
connection that broke (the database restarted) is replaced and the call tried once more; if the
database is still away the call raises :class:`resunet.errors.ServerError` (HTTP 503, /readyz 503, the
worker waits and retries).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from resunet.errors import ConfigError, ServerError
from resunet.pgdb import connect, redact
from resunet.serve.queue import STATES, Job

T = TypeVar("T")
#: ``pg_advisory_xact_lock`` key that serialises schema creation (any constant, the same on every node)
SCHEMA_LOCK = 0x7265_7375_6E65_7401
CHANNEL = "resunet_jobs"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resunet_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS resunet_jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    submitted_by TEXT,
    input_name TEXT,
    input_path TEXT,
    input_sha256 TEXT,
    options_json TEXT NOT NULL DEFAULT '{}',
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0,
    claim TEXT,
    error TEXT,
    outputs_json TEXT,
    result_json TEXT,
    audit_run_id TEXT,
    purged_at DOUBLE PRECISION,
    node TEXT,
    lease_until DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS resunet_jobs_state ON resunet_jobs (state, seq);
CREATE TABLE IF NOT EXISTS resunet_events (
    seq BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    event TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS resunet_events_job ON resunet_events (job_id);
CREATE TABLE IF NOT EXISTS resunet_tokens (
    name TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    created_utc TEXT NOT NULL,
    scope TEXT NOT NULL DEFAULT 'submit',
    grp TEXT NOT NULL DEFAULT ''
);
"""
_NOW = "extract(epoch from clock_timestamp())"


def _job(row: dict[str, Any]) -> Job:
    return Job(
        id=row["id"], kind=row["kind"], state=row["state"], submitted_by=row["submitted_by"],
        input_name=row["input_name"], input_path=row["input_path"], input_sha256=row["input_sha256"],
        options=json.loads(row["options_json"] or "{}"), created_at=row["created_at"],
        started_at=row["started_at"], finished_at=row["finished_at"], attempts=row["attempts"],
        claim=row["claim"], error=row["error"], outputs=json.loads(row["outputs_json"] or "{}"),
        result=json.loads(row["result_json"] or "{}"), audit_run_id=row["audit_run_id"], purged_at=row["purged_at"],
    )


def create_schema(conn: Any) -> None:
    """Create the resunet tables if missing (safe when several nodes start at once)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        conn.execute(_SCHEMA)


class PgJobQueue:
    """The PostgreSQL job queue at ``url`` (tables created on first use).

    Args:
        url: ``postgresql://USER@HOST[:PORT]/DB`` (no password: see :mod:`resunet.pgdb`).
        node: this node's name, stamped on the jobs it claims (``--node-name``).
        lease_s: how long a claim holds without a renewal, s (``--lease``).
    """

    def __init__(self, url: str, node: str = "node", lease_s: float = 60.0) -> None:
        if lease_s <= 0:
            raise ConfigError(f"--lease must be > 0 s, got {lease_s}")
        self.url = url
        self.node = node
        self.lease_s = float(lease_s)
        self.path = redact(url)  # what messages call this queue
        self._local = threading.local()
        try:
            create_schema(self._conn())
        except ServerError as err:
            raise ConfigError(f"{err}; check --queue and that the database is up") from None

    # -- connections ------------------------------------------------------------------------------
    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            from psycopg.rows import dict_row

            conn = connect(self.url)
            conn.row_factory = dict_row
            self._local.conn = conn
        return conn

    def _run(self, fn: Callable[[Any], T]) -> T:
        """``fn(conn)``; a broken connection (database restarted) is replaced and ``fn`` run once more."""
        import psycopg

        for attempt in (0, 1):
            conn = None
            try:
                conn = self._conn()  # inside: a database that is down refuses the connection itself
                return fn(conn)
            except psycopg.OperationalError as err:
                self._local.conn = None
                try:
                    if conn is not None:
                        conn.close()
                except Exception:  # noqa: BLE001 - it is broken already
                    pass
                if attempt:
                    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    raise ServerError(f"the job database {self.path} is unreachable: {first}") from None
        raise AssertionError("unreachable")

    @staticmethod
    def _event(conn: Any, job_id: str, event: str, detail: str | None = None) -> None:
        conn.execute("INSERT INTO resunet_events (job_id, at, event, detail) VALUES (%s, %s, %s, %s)",
                     (job_id, time.time(), event, detail))

    def ping(self) -> None:
        """ServerError when the database does not answer."""
        self._run(lambda c: c.execute("SELECT 1").fetchone())

    # -- the contract of JobQueue ---------------------------------------------------------------
    def enqueue(self, kind: str, *, input_path: str | Path | None = None, input_name: str | None = None,
                input_sha256: str | None = None, options: dict[str, Any] | None = None,
                submitted_by: str | None = None, job_id: str | None = None) -> Job:
        """Add a job in state ``queued`` (committed, and the nodes notified, when this returns)."""
        job_id = job_id or uuid.uuid4().hex
        opts = json.dumps(options or {}, sort_keys=True)
        now = time.time()

        def tx(conn: Any) -> None:
            with conn.transaction():
                # ON CONFLICT: the call tried again after the connection broke at commit adds nothing twice
                cur = conn.execute(
                    "INSERT INTO resunet_jobs (id, kind, state, submitted_by, input_name, input_path, input_sha256,"
                    " options_json, created_at) VALUES (%s, %s, 'queued', %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (id) DO NOTHING",
                    (job_id, kind, submitted_by, input_name, str(input_path) if input_path else None,
                     input_sha256, opts, now))
                if cur.rowcount == 1:
                    self._event(conn, job_id, "queued")
                    conn.execute(f"NOTIFY {CHANNEL}")

        self._run(tx)
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        row = self._run(lambda c: c.execute("SELECT * FROM resunet_jobs WHERE id = %s", (job_id,)).fetchone())
        return _job(row) if row else None

    def claim(self) -> Job | None:
        """Take the oldest queued job (``FOR UPDATE SKIP LOCKED``) with a lease of ``lease_s``; None if none."""
        token = uuid.uuid4().hex

        def tx(conn: Any) -> dict[str, Any] | None:
            with conn.transaction():
                row = conn.execute(
                    "UPDATE resunet_jobs SET state = 'running', claim = %s, started_at = %s, attempts = attempts + 1,"
                    f" node = %s, lease_until = {_NOW} + %s"
                    " WHERE id = (SELECT id FROM resunet_jobs WHERE state = 'queued' ORDER BY seq LIMIT 1"
                    " FOR UPDATE SKIP LOCKED) AND state = 'queued' RETURNING *",
                    (token, time.time(), self.node, self.lease_s)).fetchone()
                if row is not None:
                    self._event(conn, row["id"], "claimed", f"{token} {self.node}")
                return row

        row = self._run(tx)
        return _job(row) if row else None

    def renew(self, job: Job) -> bool:
        """Extend ``job``'s lease by ``lease_s`` from now; False when its claim is stale (taken over)."""
        cur = self._run(lambda c: c.execute(
            f"UPDATE resunet_jobs SET lease_until = {_NOW} + %s WHERE id = %s AND state = 'running' AND claim = %s",
            (self.lease_s, job.id, job.claim)))
        return cur.rowcount == 1

    def finish(self, job: Job, outputs: dict[str, Any], result: dict[str, Any] | None = None) -> bool:
        """Mark ``job`` done with its output records; False if its claim is stale."""
        def tx(conn: Any) -> bool:
            with conn.transaction():
                cur = conn.execute(
                    "UPDATE resunet_jobs SET state = 'done', finished_at = %s, outputs_json = %s, result_json = %s,"
                    " claim = NULL, lease_until = NULL, error = NULL WHERE id = %s AND state = 'running' AND claim = %s",
                    (time.time(), json.dumps(outputs, sort_keys=True),
                     json.dumps(result or {}, sort_keys=True, default=str), job.id, job.claim))
                if cur.rowcount != 1:
                    return False
                self._event(conn, job.id, "done", json.dumps({k: v.get("sha256") for k, v in outputs.items()}))
                return True

        return self._run(tx)

    def fail(self, job: Job, message: str) -> bool:
        """Mark ``job`` failed with a one-line ``message``; False if its claim is stale."""
        def tx(conn: Any) -> bool:
            with conn.transaction():
                cur = conn.execute(
                    "UPDATE resunet_jobs SET state = 'failed', finished_at = %s, error = %s, claim = NULL,"
                    " lease_until = NULL WHERE id = %s AND state = 'running' AND claim = %s",
                    (time.time(), message, job.id, job.claim))
                if cur.rowcount != 1:
                    return False
                self._event(conn, job.id, "failed", message)
                return True

        return self._run(tx)

    def _requeue(self, where: str, params: tuple[Any, ...], event: str) -> list[str]:
        def tx(conn: Any) -> list[str]:
            with conn.transaction():
                rows = conn.execute(
                    "UPDATE resunet_jobs SET state = 'queued', claim = NULL, lease_until = NULL"
                    f" WHERE id IN (SELECT id FROM resunet_jobs WHERE state = 'running' AND {where}"
                    " FOR UPDATE SKIP LOCKED) RETURNING id, seq, node", params).fetchall()
                rows.sort(key=lambda r: r["seq"])
                for r in rows:
                    self._event(conn, r["id"], event, r["node"])
                if rows:
                    conn.execute(f"NOTIFY {CHANNEL}")
                return [r["id"] for r in rows]

        return self._run(tx)

    def requeue_running(self) -> list[str]:
        """Every running job back to queued, whichever node runs it (for a one-node cluster; a node normally
        calls :meth:`requeue_node` and :meth:`requeue_expired`)."""
        return self._requeue("TRUE", (), "requeued")

    def requeue_node(self, node: str | None = None) -> list[str]:
        """Jobs this node (or ``node``) or its worker processes (``NODE/wK``) were running, back to queued
        (the node restarted, or its service restarts a worker that died)."""
        node = node or self.node
        return self._requeue("(node = %s OR left(node, %s) = %s)", (node, len(node) + 2, node + "/w"), "requeued")

    def requeue_expired(self) -> list[str]:
        """Running jobs whose lease has expired (their node died) back to queued; returns their ids."""
        return self._requeue(f"lease_until < {_NOW}", (), "lease-expired")

    # -- listings ---------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATES}
        for row in self._run(lambda c: c.execute("SELECT state, COUNT(*) AS n FROM resunet_jobs GROUP BY state").fetchall()):
            out[row["state"]] = int(row["n"])
        return out

    def jobs(self, state: str | None = None, limit: int = 1000) -> list[Job]:
        if state is None:
            rows = self._run(lambda c: c.execute("SELECT * FROM resunet_jobs ORDER BY seq DESC LIMIT %s", (limit,)).fetchall())
        else:
            rows = self._run(lambda c: c.execute(
                "SELECT * FROM resunet_jobs WHERE state = %s ORDER BY seq DESC LIMIT %s", (state, limit)).fetchall())
        return [_job(r) for r in rows]

    def finished_before(self, when: float) -> list[Job]:
        rows = self._run(lambda c: c.execute(
            "SELECT * FROM resunet_jobs WHERE state IN ('done', 'failed') AND finished_at < %s AND purged_at IS NULL"
            " ORDER BY seq", (when,)).fetchall())
        return [_job(r) for r in rows]

    def mark_purged(self, job_id: str) -> None:
        def tx(conn: Any) -> None:
            with conn.transaction():
                cur = conn.execute("UPDATE resunet_jobs SET purged_at = %s WHERE id = %s AND purged_at IS NULL",
                                   (time.time(), job_id))
                if cur.rowcount == 1:  # another node's sweep may have been first
                    self._event(conn, job_id, "purged")

        self._run(tx)

    def retry(self, job_id: str, by: str) -> bool:
        def tx(conn: Any) -> bool:
            with conn.transaction():
                cur = conn.execute(
                    "UPDATE resunet_jobs SET state = 'queued', error = NULL, finished_at = NULL, claim = NULL"
                    " WHERE id = %s AND state = 'failed' AND purged_at IS NULL", (job_id,))
                if cur.rowcount != 1:
                    return False
                self._event(conn, job_id, "retried", by)
                conn.execute(f"NOTIFY {CHANNEL}")
                return True

        return self._run(tx)

    def failed_with(self, prefix: str, max_attempts: int) -> list[Job]:
        rows = self._run(lambda c: c.execute(
            "SELECT * FROM resunet_jobs WHERE state = 'failed' AND purged_at IS NULL AND substr(error, 1, %s) = %s"
            " AND attempts < %s ORDER BY seq", (len(prefix), prefix, max_attempts)).fetchall())
        return [_job(r) for r in rows]

    def erase(self, job_id: str, by: str) -> bool:
        now = time.time()

        def tx(conn: Any) -> bool:
            with conn.transaction():
                cur = conn.execute(
                    "UPDATE resunet_jobs SET purged_at = %s,"
                    " error = CASE WHEN state = 'queued' THEN %s ELSE error END,"
                    " finished_at = CASE WHEN state = 'queued' THEN %s ELSE finished_at END,"
                    " state = CASE WHEN state = 'queued' THEN 'failed' ELSE state END"
                    " WHERE id = %s AND state != 'running'",
                    (now, f"deleted by {by} before it ran", now, job_id))
                if cur.rowcount != 1:
                    return False
                self._event(conn, job_id, "erased", by)
                return True

        return self._run(tx)

    def unaudited(self) -> list[Job]:
        rows = self._run(lambda c: c.execute(
            "SELECT * FROM resunet_jobs WHERE state IN ('done', 'failed') AND audit_run_id IS NULL ORDER BY seq").fetchall())
        return [_job(r) for r in rows]

    def mark_audited(self, job_id: str, run_id: str) -> None:
        self._run(lambda c: c.execute("UPDATE resunet_jobs SET audit_run_id = %s WHERE id = %s", (run_id, job_id)))

    def known_ids(self) -> set[str]:
        return {r["id"] for r in self._run(lambda c: c.execute("SELECT id FROM resunet_jobs").fetchall())}

    def note(self, job_id: str, event: str, detail: str | None = None) -> None:
        """Append an event of the job's life that is not a state change (e.g. ``memory``: its reservation
        in the node's memory budget, :mod:`resunet.serve.memory`)."""
        def tx(conn: Any) -> None:
            with conn.transaction():
                self._event(conn, job_id, event, detail)

        self._run(tx)

    def events(self, job_id: str | None = None) -> Iterator[dict[str, Any]]:
        sql = "SELECT job_id, at, event, detail FROM resunet_events"
        if job_id:
            rows = self._run(lambda c: c.execute(sql + " WHERE job_id = %s ORDER BY seq", (job_id,)).fetchall())
        else:
            rows = self._run(lambda c: c.execute(sql + " ORDER BY seq").fetchall())
        yield from (dict(r) for r in rows)

    # -- the cluster --------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self._run(lambda c: c.execute("SELECT value FROM resunet_meta WHERE key = %s", (key,)).fetchone())
        return row["value"] if row else None

    def set_meta_once(self, key: str, value: str) -> str:
        """Store ``value`` under ``key`` unless a value is there; returns the stored value (first node wins)."""
        self._run(lambda c: c.execute("INSERT INTO resunet_meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                                      (key, value)))
        got = self.meta(key)
        assert got is not None
        return got

    def wait_notify(self, timeout: float) -> bool:
        """Block up to ``timeout`` s for a ``NOTIFY resunet_jobs`` (a job queued or re-queued); True if one came.

        Uses this thread's own listening connection (LISTEN needs a session that stays open).
        """
        import psycopg

        conn = getattr(self._local, "listen", None)
        try:
            if conn is None or conn.closed:
                conn = connect(self.url)
                conn.execute(f"LISTEN {CHANNEL}")
                self._local.listen = conn
            got = False
            for _ in conn.notifies(timeout=timeout, stop_after=1):
                got = True
            return got
        except (psycopg.Error, ServerError):
            self._local.listen = None
            time.sleep(min(timeout, 1.0))
            return False

    def close(self) -> None:
        for name in ("conn", "listen"):
            conn = getattr(self._local, name, None)
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001
                    pass
                setattr(self._local, name, None)
