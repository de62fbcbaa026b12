"""Append-only audit log (SQLite) and ``audit verify``: were the files behind a report changed since?

Audit log
    One SQLite file (default ``~/.resunet/audit.sqlite``; ``RESUNET_AUDIT_DB`` or ``--audit-db``
    override it) with one table ``runs``. :func:`record_run` appends a row per predict / evaluate run:
    the run id, kind, UTC time, user, host, command, model hash, the full provenance JSON and the
    hashes of the outputs. Triggers refuse ``UPDATE`` and ``DELETE``, and each row stores
    ``record_sha256 = sha256(previous row's record_sha256 + this row's content)``, so editing or
    removing a row with another tool breaks the chain, which :func:`verify_log` detects.

Verify
    :func:`verify` reads ``metrics.json`` and/or ``predictions.json`` in a folder, finds every object
    with ``"path"`` and ``"sha256"`` keys in them (the provenance file records and the report's own
    outputs), recomputes each SHA-256 and lists the changed and missing files. Relative paths are
    resolved against the folder holding the JSON file. When the audit log holds the run, the JSON
    file itself is checked against the hash recorded at run time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resunet.errors import InputError
from resunet.io.hashing import sha256_path
from resunet.reports.provenance import file_record, utc_now

ENV_VAR = "RESUNET_AUDIT_DB"
DEFAULT_DB = Path("~/.resunet/audit.sqlite")
REPORT_JSON_NAMES = ("metrics.json", "predictions.json", "review.json")  # review.json: resunet.inference.review

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    recorded_utc TEXT NOT NULL,
    user TEXT,
    host TEXT,
    command TEXT,
    model_sha256 TEXT,
    provenance_json TEXT NOT NULL,
    outputs_json TEXT NOT NULL,
    prev_sha256 TEXT NOT NULL,
    record_sha256 TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS runs_no_update BEFORE UPDATE ON runs
BEGIN SELECT RAISE(ABORT, 'the resunet audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS runs_no_delete BEFORE DELETE ON runs
BEGIN SELECT RAISE(ABORT, 'the resunet audit log is append-only'); END;
"""
_GENESIS = "0" * 64


def audit_db_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The audit database path: ``explicit``, else ``$RESUNET_AUDIT_DB``, else ``~/.resunet/audit.sqlite``."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return DEFAULT_DB.expanduser()


def pg_target(explicit: str | os.PathLike[str] | None = None) -> str | None:
    """The PostgreSQL URL when the audit log is in PostgreSQL (``explicit`` or ``$RESUNET_AUDIT_DB`` is a
    ``postgresql://`` URL; :mod:`resunet.reports.audit_pg`), else None."""
    from resunet.pgdb import is_pg_url

    value = str(explicit) if explicit else os.environ.get(ENV_VAR)
    return value if is_pg_url(value) else None


def describe_db(explicit: str | os.PathLike[str] | None = None) -> str:
    """What messages call the audit log: its file, or its database URL without a password."""
    url = pg_target(explicit)
    if url:
        from resunet.pgdb import redact

        return redact(url)
    return str(audit_db_path(explicit))


def _connect(db: Path) -> sqlite3.Connection:
    try:
        db.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # ~/.resunet: the user's own
        # The log names input files and hashes of patient data: owner only, whatever the umask.
        # SQLite gives its journal/WAL files the database file's permissions.
        os.close(os.open(db, os.O_CREAT | os.O_RDWR, 0o600))
        with contextlib.suppress(PermissionError):  # a shared log owned by someone else stays as it is
            if db.stat().st_mode & 0o077:
                os.chmod(db, 0o600)
        conn = sqlite3.connect(str(db), timeout=30.0)
        conn.executescript(_SCHEMA)
    except (OSError, sqlite3.Error) as err:
        raise InputError(
            f"cannot open the audit log {db}: {err}; set {ENV_VAR} or --audit-db to a writable SQLite file"
        ) from err
    return conn


def _record_hash(prev: str, fields: Mapping[str, Any]) -> str:
    body = json.dumps(dict(fields), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev + body).encode("utf-8")).hexdigest()


def _output_records(outputs: Iterable[Any] | Mapping[str, Any]) -> list[dict[str, Any]]:
    items = outputs.values() if isinstance(outputs, Mapping) else outputs
    out = []
    for o in items:
        if isinstance(o, Mapping) and "sha256" in o:
            out.append(dict(o))
        else:
            out.append(file_record(o))
    return out


class RunAlreadyRecorded(InputError):
    """The audit log already holds a run with this run id (a run is recorded once). The message names the
    run, not the database: callers that show it to a person (a second review decision) word their own."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} is already recorded in the audit log; a run is recorded once")
        self.run_id = run_id


def record_run(
    kind: str,
    provenance: Mapping[str, Any],
    outputs: Iterable[Any] | Mapping[str, Any] = (),
    db_path: str | os.PathLike[str] | None = None,
) -> str:
    """Append one run to the audit log and return its ``run_id``.

    Args:
        kind: ``"predict"``, ``"evaluate"``, ...
        provenance: the dict from :func:`resunet.reports.provenance.collect_provenance` (its
            ``run_id`` is the record's key).
        outputs: output file paths (hashed now) or ready ``{"path", "sha256", ...}`` records; a mapping's
            values are used.
        db_path: audit database; default :func:`audit_db_path`.

    Raises:
        RunAlreadyRecorded: the run id is already recorded.
        InputError: the database cannot be opened or written.
    """
    db = audit_db_path(db_path)
    fields = {
        "run_id": str(provenance.get("run_id") or ""),
        "kind": kind,
        "recorded_utc": utc_now(),
        # the signed-in web user when there is one (the server account stays in the provenance JSON)
        "user": provenance.get("web_user") or provenance.get("user"),
        "host": provenance.get("host"),
        "command": provenance.get("command_line"),
        "model_sha256": (provenance.get("model") or {}).get("sha256"),
        "provenance_json": json.dumps(provenance, sort_keys=True),
        "outputs_json": json.dumps(_output_records(outputs), sort_keys=True),
    }
    if not fields["run_id"]:
        raise InputError("cannot record a run without a run_id in its provenance (use collect_provenance)")
    url = pg_target(db_path)
    if url:  # the shared log of a PostgreSQL queue
        from resunet.reports import audit_pg

        audit_pg.append(url, fields, _record_hash)
        return fields["run_id"]
    with closing(_connect(db)) as conn:
        try:
            with conn:  # one transaction: read the chain head and append
                conn.execute("BEGIN IMMEDIATE")
                row = conn.execute("SELECT record_sha256 FROM runs ORDER BY seq DESC LIMIT 1").fetchone()
                prev = row[0] if row else _GENESIS
                rec = _record_hash(prev, fields)
                conn.execute(
                    "INSERT INTO runs (run_id, kind, recorded_utc, user, host, command, model_sha256,"
                    " provenance_json, outputs_json, prev_sha256, record_sha256)"
                    " VALUES (:run_id, :kind, :recorded_utc, :user, :host, :command, :model_sha256,"
                    " :provenance_json, :outputs_json, :prev, :rec)",
                    {**fields, "prev": prev, "rec": rec},
                )
        except sqlite3.IntegrityError as err:
            if "run_id" in str(err):  # UNIQUE constraint failed: runs.run_id
                raise RunAlreadyRecorded(fields["run_id"]) from err
            raise InputError(f"cannot append run {fields['run_id']} to the audit log {db}: {err}") from err
        except sqlite3.Error as err:
            raise InputError(f"cannot append run {fields['run_id']} to the audit log {db}: {err}") from err
    return fields["run_id"]


def read_runs(db_path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """All audit records, oldest first, as dicts (``provenance`` and ``outputs`` decoded)."""
    url = pg_target(db_path)
    if url:
        from resunet.reports import audit_pg

        rows = audit_pg.read_runs(url)
    else:
        db = audit_db_path(db_path)
        if not db.exists():
            return []
        with closing(_connect(db)) as conn:
            conn.row_factory = sqlite3.Row
            rows = [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY seq")]
    for r in rows:
        r["provenance"] = json.loads(r["provenance_json"])
        r["outputs"] = json.loads(r["outputs_json"])
    return rows


def run_recorded(run_id: str, db_path: str | os.PathLike[str] | None = None) -> bool:
    """True when the audit log holds a run with this ``run_id`` (lets a recorder killed midway retry once)."""
    url = pg_target(db_path)
    if url:
        from resunet.reports import audit_pg

        return audit_pg.run_recorded(url, run_id)
    db = audit_db_path(db_path)
    if not db.exists():
        return False
    with closing(_connect(db)) as conn:
        return conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is not None


def verify_log(db_path: str | os.PathLike[str] | None = None) -> list[str]:
    """Problems found in the audit log's hash chain (empty list = intact)."""
    problems = []
    prev = _GENESIS
    for r in read_runs(db_path):
        fields = {k: r[k] for k in ("run_id", "kind", "recorded_utc", "user", "host", "command",
                                    "model_sha256", "provenance_json", "outputs_json")}  # fmt: skip
        if r["prev_sha256"] != prev or _record_hash(prev, fields) != r["record_sha256"]:
            problems.append(f"audit record {r['seq']} (run {r['run_id']}) was altered or a record before it removed")
        prev = r["record_sha256"]
    return problems


# -- verify ----------------------------------------------------------------------------------------


@dataclass
class FileCheck:
    """One file listed in a report: ``status`` is ``"ok"``, ``"changed"`` or ``"missing"``."""

    path: str
    listed_in: str
    expected_sha256: str
    actual_sha256: str | None
    status: str


@dataclass
class VerifyResult:
    """Outcome of :func:`verify`; ``ok`` is False when any file changed or is missing."""

    folder: str
    checks: list[FileCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> list[FileCheck]:
        return [c for c in self.checks if c.status == "changed"]

    @property
    def missing(self) -> list[FileCheck]:
        return [c for c in self.checks if c.status == "missing"]

    @property
    def ok(self) -> bool:
        return not self.changed and not self.missing and not self.problems


def _hashed_entries(obj: Any) -> Iterator[dict[str, Any]]:
    """Every dict with string ``path`` and ``sha256`` values, anywhere in a JSON document."""
    if isinstance(obj, dict):
        if isinstance(obj.get("path"), str) and isinstance(obj.get("sha256"), str):
            yield obj
        for v in obj.values():
            yield from _hashed_entries(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _hashed_entries(v)


def verify(folder: str | os.PathLike[str], db_path: str | os.PathLike[str] | None = None) -> VerifyResult:
    """Recompute the SHA-256 of every file listed in ``folder``'s metrics.json / predictions.json.

    Args:
        folder: a report or prediction folder (or one of those JSON files).
        db_path: audit log to cross-check the JSON files against (default :func:`audit_db_path`;
            a run that is not in the log is only noted, since reports travel between machines).

    Raises:
        InputError: the folder has neither JSON file, or a JSON file cannot be parsed.
    """
    p = Path(folder)
    if p.is_file():
        jsons = [p]
        p = p.parent
    elif p.is_dir():
        jsons = [p / n for n in REPORT_JSON_NAMES if (p / n).is_file()]
    else:
        raise InputError(f"{folder} does not exist")
    if not jsons:
        raise InputError(f"{folder} holds neither {' nor '.join(REPORT_JSON_NAMES)}; point audit verify at a report folder")
    result = VerifyResult(folder=str(p))
    runs = {r["run_id"]: r for r in read_runs(db_path)} if pg_target(db_path) or audit_db_path(db_path).exists() else {}
    seen: set[tuple[str, str]] = set()
    for jf in jsons:
        try:
            doc = json.loads(jf.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"cannot read {jf}: {err}") from err
        for entry in _hashed_entries(doc):
            target = Path(entry["path"])
            if not target.is_absolute():
                target = jf.parent / target
            key = (str(target), entry["sha256"])
            if key in seen:
                continue
            seen.add(key)
            if not target.exists():
                result.checks.append(FileCheck(str(target), jf.name, entry["sha256"], None, "missing"))
                continue
            actual = sha256_path(target)
            status = "ok" if actual == entry["sha256"] else "changed"
            result.checks.append(FileCheck(str(target), jf.name, entry["sha256"], actual, status))
        run_id = ((doc.get("provenance") or {}).get("run_id")) if isinstance(doc, dict) else None
        _check_against_log(jf, run_id, runs, result)
    return result


def _check_against_log(jf: Path, run_id: str | None, runs: dict[str, dict], result: VerifyResult) -> None:
    if not run_id:
        result.notes.append(f"{jf.name} names no run_id; it cannot be matched with the audit log")
        return
    run = runs.get(run_id)
    if run is None:
        result.notes.append(f"run {run_id} of {jf.name} is not in this machine's audit log")
        return
    recorded = [o for o in run["outputs"] if Path(o["path"]).name == jf.name]
    if not recorded:
        result.notes.append(f"the audit log has run {run_id} but no hash of {jf.name}")
        return
    actual = sha256_path(jf)
    if all(o["sha256"] != actual for o in recorded):
        result.problems.append(
            f"{jf} differs from the version recorded in the audit log for run {run_id} ({run['recorded_utc']})"
        )
    else:
        result.notes.append(f"{jf.name} matches the audit log record of run {run_id} ({run['recorded_utc']})")
