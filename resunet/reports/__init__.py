"""Turning metric tables plus provenance into CSV, JSON, HTML/PDF reports and an audit trail.

- :func:`collect_provenance` (provenance.py): who/what/when of a run, embedded in metrics.json and
  predictions.json.
- :func:`record_run`, :func:`verify` (audit.py): append-only SQLite audit log; re-hash a report's files.
- :func:`write_evaluation_outputs`, :func:`render_report` (report.py): metrics.csv, summary.csv,
  metrics.json, report.html, report.pdf. Imported lazily (matplotlib), so importing this package for
  provenance stays cheap.
"""

from typing import Any

from resunet.reports.audit import audit_db_path, record_run, verify
from resunet.reports.provenance import collect_provenance, file_record, software_versions, utc_now

_LAZY = {"render_report", "write_evaluation_outputs"}

__all__ = [
    "audit_db_path",
    "collect_provenance",
    "file_record",
    "record_run",
    "render_report",
    "software_versions",
    "utc_now",
    "verify",
    "write_evaluation_outputs",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from resunet.reports import report

        return getattr(report, name)
    raise AttributeError(f"module 'resunet.reports' has no attribute {name!r}")
