"""The predictions record store: per-case records, their journal, the summary and the merge of shards.

Everything that writes or reads ``predictions.json`` lives here; :func:`resunet.inference.batch.run_batch`
is the loop that produces the records, :func:`resunet.inference.validate.write_refused_summary`
records cases refused before a model was loaded, and ``resunet serve`` names the summary by
:data:`SUMMARY`. (nnU-Net keeps its ``export_prediction.py`` apart from its predict loop likewise.)

Files in the output folder ``OUT``:

- ``predictions.jsonl``, the journal: every finished case appends one JSON line (flushed and
  fsynced) before anything else about it is written, so a SIGKILL loses at most the case in flight;
  a line cut by a kill is terminated when the journal is next opened and skipped when read.
- ``predictions.json`` and ``predictions.csv``, the summary: ``{"schema": SCHEMA, "model",
  "settings", "provenance", "counts", "cases": [record]}`` sorted by case id, rewritten atomically
  (after every case up to :data:`REWRITE_EVERY_CASE_UP_TO` records, then at most every
  :data:`REWRITE_INTERVAL_S` seconds, and at the end).
- shard ``i`` of ``n`` writes ``predictions.shard-<i>-of-<n>.jsonl/.json`` instead;
  :func:`merge_summaries` merges every journal and summary in ``OUT`` into ``predictions.json``
  under a file lock (latest record per case wins).

A record: ``case, input{path, sha256, kind}, status ok|failed, reason, outputs{kind: {path (relative
to OUT), sha256, size_bytes}}, seconds, device, model{name, sha256[, members]}, run_id`` and, once
finished, ``finished_utc`` (plus ``volumes_ml``, ``voxel_counts``, ``timings``, ``grid``,
``series_uid``, ``warnings`` when ok; ``shard`` when sharded; ``server_fault`` when not the input's fault).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from resunet.io.atomic import atomic_write_text

SCHEMA = "resunet-predictions/1"
SUMMARY = "predictions.json"
SUMMARY_CSV = "predictions.csv"
JOURNAL = "predictions.jsonl"
LOCK = ".predictions.lock"
REWRITE_EVERY_CASE_UP_TO = 2000
REWRITE_INTERVAL_S = 30.0


def journal_name(shard: tuple[int, int] = (0, 1)) -> str:
    """The journal's file name of shard ``(i, n)`` (``predictions.jsonl`` unsharded)."""
    return f"predictions.shard-{shard[0]}-of-{shard[1]}.jsonl" if shard[1] > 1 else JOURNAL


def summary_name(shard: tuple[int, int] = (0, 1)) -> str:
    """The summary's file name of shard ``(i, n)`` (``predictions.json`` unsharded)."""
    return f"predictions.shard-{shard[0]}-of-{shard[1]}.json" if shard[1] > 1 else SUMMARY


def case_record(case_id: str, input_record: dict[str, Any], *, device: str | None, model: dict[str, Any],
                run_id: str, reason: str | None = None, seconds: float | None = None) -> dict[str, Any]:
    """A case's record before it is segmented: ``failed`` until the runner says ``ok`` (see the module docstring)."""
    return {"case": case_id, "input": input_record, "status": "failed", "reason": reason, "outputs": {},
            "seconds": seconds, "device": device, "model": model, "run_id": run_id}


def read_records(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Latest record per case id from ``predictions.json``, shard summaries and every journal in ``out_dir``."""
    records: dict[str, dict[str, Any]] = {}

    def take(rec: Any) -> None:
        if not isinstance(rec, dict) or "case" not in rec:
            return
        old = records.get(rec["case"])
        if old is None or str(rec.get("finished_utc", "")) >= str(old.get("finished_utc", "")):
            records[rec["case"]] = rec

    for p in sorted(out_dir.glob("predictions*.json")):
        with contextlib.suppress(OSError, ValueError):
            for rec in json.loads(p.read_text(encoding="utf-8")).get("cases", []):
                take(rec)
    for p in sorted(out_dir.glob("predictions*.jsonl")):
        with contextlib.suppress(OSError):
            for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
                with contextlib.suppress(ValueError):  # a line cut by a kill is skipped
                    take(json.loads(line))
    return records


def _csv_text(records: Sequence[dict[str, Any]]) -> str:
    labels: list[str] = []
    for r in records:
        for name in r.get("volumes_ml") or {}:
            if name not in labels:
                labels.append(name)
    cols = ["case", "status", "reason", "input_path", "input_sha256", "mask", "seg", "seconds", "device",
            "model_name", "model_sha256", "warnings"] + [f"volume_ml:{n}" for n in labels]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in records:
        outs = r.get("outputs") or {}
        row = [r.get("case"), r.get("status"), r.get("reason") or "", (r.get("input") or {}).get("path"),
               (r.get("input") or {}).get("sha256"), (outs.get("mask") or {}).get("path", ""),
               (outs.get("seg") or {}).get("path", ""), r.get("seconds"), r.get("device"),
               (r.get("model") or {}).get("name"), (r.get("model") or {}).get("sha256"),
               " | ".join(r.get("warnings") or [])]
        row += [(r.get("volumes_ml") or {}).get(n, "") for n in labels]
        w.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def write_summary(out_dir: Path, name: str, records: Sequence[dict[str, Any]], header: dict[str, Any]) -> Path:
    """Write ``name`` (JSON) and its CSV twin atomically; records sorted by case id."""
    recs = sorted(records, key=lambda r: r["case"])
    doc = {
        "schema": SCHEMA,
        **header,
        "counts": {
            "cases": len(recs),
            "ok": sum(r.get("status") == "ok" for r in recs),
            "failed": sum(r.get("status") == "failed" for r in recs),
        },
        "cases": recs,
    }
    path = out_dir / name
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=False, default=str) + "\n")
    atomic_write_text(path.with_suffix(".csv"), _csv_text(recs))
    return path


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    import fcntl

    with open(out_dir / LOCK, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def merge_summaries(out_dir: str | os.PathLike[str], header: dict[str, Any] | None = None) -> Path:
    """Merge every shard journal/summary in ``out_dir`` into ``predictions.json`` and ``predictions.csv``.

    Safe to run while shards are still running (a file lock serialises merges); the latest record
    per case wins. Returns the summary path.
    """
    out = Path(out_dir)
    with _locked(out):
        records = read_records(out)
        head = dict(header or {})
        runs: dict[str, Any] = {}
        for p in sorted(out.glob("predictions*.json")):
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(p.read_text(encoding="utf-8"))
                runs.update(doc.get("runs") or {})
                prov = doc.get("provenance")
                if isinstance(prov, dict) and prov.get("run_id"):
                    runs[prov["run_id"]] = prov
                for key in ("model", "settings"):
                    head.setdefault(key, doc.get(key))
        head["runs"] = runs
        return write_summary(out, SUMMARY, list(records.values()), head)


def _end_journal_line(path: Path) -> None:
    """Terminate a journal line cut by a kill, so the next record starts on its own line."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")


class RecordStore:
    """The records of one run (one shard) into ``out_dir``: journal appends and summary rewrites.

    Use as a context manager (it holds the journal open)::

        with RecordStore(out, header, shard=(0, 1), previous=read_records(out)) as store:
            store.add(record)        # journal line, fsynced; the summary rewritten when due
        path = store.finish()        # the summary (merged over every shard when sharded)

    Args:
        header: ``model``, ``settings`` and ``provenance`` of the summary.
        shard: ``(index, count)``; a shard writes its own journal and summary.
        previous: records of earlier runs into the folder; an unsharded summary keeps those of cases
            this run does not redo.
    """

    def __init__(self, out_dir: str | os.PathLike[str], header: dict[str, Any], *, shard: tuple[int, int] = (0, 1),
                 previous: dict[str, dict[str, Any]] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.header = header
        self.shard = shard
        self.previous = previous or {}
        self.kept: dict[str, dict[str, Any]] = {}  # records of cases skipped as already done
        self.records: dict[str, dict[str, Any]] = {}  # this run's records
        self.journal_path = self.out_dir / journal_name(shard)
        self.summary_path = self.out_dir / summary_name(shard)
        self._journal: Any = None
        self._last_write = 0.0

    @property
    def sharded(self) -> bool:
        return self.shard[1] > 1

    def __enter__(self) -> "RecordStore":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _end_journal_line(self.journal_path)
        self._journal = open(self.journal_path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def keep(self, record: dict[str, Any]) -> None:
        """A case skipped because an earlier run did it: its record stays in the summary."""
        self.kept[record["case"]] = record

    def add(self, record: dict[str, Any], save: bool = True) -> None:
        """Append a finished case's record to the journal (flushed and fsynced), then rewrite the summary when due."""
        self._journal.write(json.dumps(record, default=str) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self.records[record["case"]] = record
        if save:
            self.save(force=False)

    def save(self, force: bool = True) -> Path:
        """Rewrite this shard's summary (when ``force``, or when due: see the module docstring)."""
        n = len(self.kept) + len(self.records)
        if not force and n > REWRITE_EVERY_CASE_UP_TO and time.monotonic() - self._last_write < REWRITE_INTERVAL_S:
            return self.summary_path
        allrec = dict(self.kept)
        allrec.update(self.records)
        if not self.sharded:  # keep records of cases not in this run (earlier runs into the same folder)
            merged = dict(self.previous)
            merged.update(allrec)
            allrec = merged
        write_summary(self.out_dir, self.summary_path.name, list(allrec.values()), self.header)
        self._last_write = time.monotonic()
        return self.summary_path

    def finish(self) -> Path:
        """The final summary: rewritten, and merged over every shard's when sharded. Returns its path."""
        self.save(force=True)
        return merge_summaries(self.out_dir, self.header) if self.sharded else self.summary_path

    def mine(self) -> dict[str, dict[str, Any]]:
        """This run's records and the kept ones, by case id."""
        return {**self.kept, **self.records}
