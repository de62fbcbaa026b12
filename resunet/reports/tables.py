"""metrics.csv, summary.csv and metrics.json writers (atomic; undefined = empty cell / null)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from resunet.evaluation.definitions import DEFINITIONS
from resunet.evaluation.runner import ROW_COLUMNS, Evaluation
from resunet.evaluation.summary import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, SUMMARY_COLUMNS
from resunet.io.atomic import atomic_write_text

METRICS_SCHEMA = "resunet-metrics/1"


def _cell(v: Any) -> str:
    """CSV cell: None -> empty; floats with full precision (``repr``)."""
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"non-finite value {v} in a metrics table")
        return repr(v)
    return str(v)


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV text with a header of ``columns``; missing keys and None become empty cells."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in columns])
    return buf.getvalue()


def write_metrics_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """One row per case and label, columns :data:`resunet.evaluation.ROW_COLUMNS`."""
    atomic_write_text(path, csv_text(rows, ROW_COLUMNS))
    return Path(path)


def write_summary_csv(summary: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """One row per label and metric, columns :data:`resunet.evaluation.SUMMARY_COLUMNS`."""
    atomic_write_text(path, csv_text(summary, SUMMARY_COLUMNS))
    return Path(path)


def metrics_document(
    evaluation: Evaluation, provenance: Mapping[str, Any], outputs: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """The content of metrics.json: tables, unmatched cases, conventions, provenance and output hashes."""
    return {
        "schema": METRICS_SCHEMA,
        "tolerance_mm": evaluation.tolerance_mm,
        "labels": evaluation.labels,
        "label_names": {str(k): v for k, v in evaluation.label_names.items()},
        "n_cases": len(evaluation.match.pairs),
        "unmatched": {"pred_only": evaluation.match.pred_only, "gt_only": evaluation.match.gt_only},
        "resampled_cases": evaluation.resampled,
        "conventions": {
            "undefined": "null",
            "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
            "bootstrap_seed": BOOTSTRAP_SEED,
            "definitions": {section: dict(items) for section, items in DEFINITIONS},
        },
        "rows": evaluation.rows,
        "summary": evaluation.summary,
        "provenance": dict(provenance),
        "outputs": list(outputs),
    }


def write_json(doc: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a JSON document atomically (NaN/inf refused: undefined values must be None)."""
    atomic_write_text(path, json.dumps(doc, indent=1, allow_nan=False, ensure_ascii=False) + "\n")
    return Path(path)
