"""Segmentation metrics with voxel spacing, empty-mask rules and per-case/per-label tables.

Public entry points:

- :func:`evaluate_case` (one case, used by the web UI): ``list[dict]``, one dict per label.
- :func:`evaluate_folders` (a folder of predictions against a folder of references).
- :func:`summarize`: per-label summary statistics that never average undefined values.

Every definition is stated in :mod:`resunet.evaluation.definitions` (printed in reports and
``docs/metrics.md``).
"""

import importlib
from typing import Any

#: the NSD tolerance, mm (``resunet evaluate --tolerance-mm``); here so that the CLI's parser reads it
#: without importing scipy
DEFAULT_TOLERANCE_MM = 2.0

#: public name -> submodule, imported on first use (scipy, nibabel)
_WHERE = {
    "CaseMatch": "cases", "match_cases": "cases", "read_mask": "cases", "METRICS": "metrics",
    "SITUATIONS": "metrics", "LabelMetrics": "metrics", "binary_metrics": "metrics",
    "check_same_grid": "metrics", "evaluate_case": "metrics", "evaluate_case_metrics": "metrics",
    "resample_nearest": "metrics", "ROW_COLUMNS": "runner", "Evaluation": "runner",
    "evaluate_folders": "runner", "SUMMARY_COLUMNS": "summary", "bootstrap_ci_mean": "summary",
    "summarize": "summary",
}
__all__ = sorted([*_WHERE, "DEFAULT_TOLERANCE_MM"])


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'resunet.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"resunet.evaluation.{_WHERE[name]}"), name)
