"""Turning metric tables plus provenance into CSV, JSON, HTML/PDF reports and an audit trail.

- :func:`collect_provenance` (provenance.py): who/what/when of a run, embedded in metrics.json and
  predictions.json.
"""

from resunet.reports.provenance import collect_provenance, file_record, software_versions, utc_now

__all__ = ["collect_provenance", "file_record", "software_versions", "utc_now"]
