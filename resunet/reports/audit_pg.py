"""The audit log in PostgreSQL (table ``resunet_audit``): one log for every node of a shared queue.

``resunet serve --queue postgresql://...`` records its jobs here (unless ``--audit-db`` names a file),
and ``resunet audit log --audit-db postgresql://USER@HOST/DB`` lists and checks it. The same records and
the same hash chain as the SQLite log (:mod:`resunet.reports.audit`): ``record_sha256 = sha256(previous
record_sha256 + this row's fields)``. Appends from several nodes are serialised by a transaction-scoped
advisory lock taken before the chain head is read, so two nodes never chain onto the same head; rules
refuse ``UPDATE`` and ``DELETE`` on the table (a trigger, as in SQLite).
"""

from __future__ import annotations

from typing import Any, Mapping

from resunet.errors import InputError, ResunetError

#: advisory lock key of the audit chain head (any constant, the same on every node)
CHAIN_LOCK = 0x7265_7375_6E65_7402
GENESIS = "0" * 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resunet_audit (
    seq BIGSERIAL PRIMARY KEY,
    run_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    recorded_utc TEXT NOT NULL,
    user_name TEXT,
    host TEXT,
    command TEXT,
    model_sha256 TEXT,
    provenance_json TEXT NOT NULL,
    outputs_json TEXT NOT NULL,
    prev_sha256 TEXT NOT NULL,
    record_sha256 TEXT NOT NULL
);
CREATE OR REPLACE FUNCTION resunet_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN RAISE EXCEPTION 'the resunet audit log is append-only'; END $$;
DROP TRIGGER IF EXISTS resunet_audit_no_change ON resunet_audit;
CREATE TRIGGER resunet_audit_no_change BEFORE UPDATE OR DELETE ON resunet_audit
FOR EACH ROW EXECUTE FUNCTION resunet_audit_append_only();
"""


def _connect(url: str) -> Any:
    from psycopg.rows import dict_row

    from resunet.pgdb import connect

    try:
        conn = connect(url)
    except ResunetError as err:
        raise InputError(f"cannot open the audit log: {err}") from None
    conn.row_factory = dict_row
    if conn.execute("SELECT to_regclass('resunet_audit') IS NOT NULL AS there").fetchone()["there"]:
        return conn  # made already: no DDL (and no table lock) on every append
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK,))
        if not conn.execute("SELECT to_regclass('resunet_audit') IS NOT NULL AS there").fetchone()["there"]:
            conn.execute(_SCHEMA)
    return conn


def append(url: str, fields: Mapping[str, Any], record_hash: Any) -> None:
    """Append one record (``fields`` as :func:`resunet.reports.audit.record_run` builds them) to the chain.

    Raises:
        RunAlreadyRecorded: the run id is already recorded.
        InputError: the database cannot be reached.
    """
    import psycopg
    import psycopg.errors

    from resunet.pgdb import redact

    conn = _connect(url)
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK,))  # one appender at a time, every node
            row = conn.execute("SELECT record_sha256 FROM resunet_audit ORDER BY seq DESC LIMIT 1").fetchone()
            prev = row["record_sha256"] if row else GENESIS
            rec = record_hash(prev, fields)
            conn.execute(
                "INSERT INTO resunet_audit (run_id, kind, recorded_utc, user_name, host, command, model_sha256,"
                " provenance_json, outputs_json, prev_sha256, record_sha256) VALUES (%(run_id)s, %(kind)s,"
                " %(recorded_utc)s, %(user)s, %(host)s, %(command)s, %(model_sha256)s, %(provenance_json)s,"
                " %(outputs_json)s, %(prev)s, %(rec)s)", {**fields, "prev": prev, "rec": rec})
    except psycopg.errors.UniqueViolation as err:
        if "run_id" not in str(err):
            raise InputError(f"cannot append run {fields['run_id']} to the audit log {redact(url)}: "
                             f"{str(err).strip().splitlines()[0]}") from None
        from resunet.reports.audit import RunAlreadyRecorded

        raise RunAlreadyRecorded(str(fields["run_id"])) from None
    except psycopg.Error as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot append run {fields['run_id']} to the audit log {redact(url)}: {first}") from None
    finally:
        conn.close()


def read_runs(url: str) -> list[dict[str, Any]]:
    """Every record, oldest first, with the column names of the SQLite log (``user``, not ``user_name``)."""
    conn = _connect(url)
    try:
        rows = conn.execute("SELECT * FROM resunet_audit ORDER BY seq").fetchall()
    finally:
        conn.close()
    out = []
    for r in rows:
        r = dict(r)
        r["user"] = r.pop("user_name")
        out.append(r)
    return out


def run_recorded(url: str, run_id: str) -> bool:
    conn = _connect(url)
    try:
        return conn.execute("SELECT 1 FROM resunet_audit WHERE run_id = %s", (run_id,)).fetchone() is not None
    finally:
        conn.close()
