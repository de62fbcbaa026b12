"""Segmentation metrics with voxel spacing, empty-mask rules and per-case/per-label tables.

Public entry points:

- :func:`evaluate_case` (one case, used by the web UI): ``list[dict]``, one dict per label.
- :func:`evaluate_folders` (a folder of predictions against a folder of references).
- :func:`summarize`: per-label summary statistics that never average undefined values.

Every definition is stated in :mod:`resunet.evaluation.definitions` (printed in reports and
``docs/metrics.md``).
"""

from resunet.evaluation.cases import CaseMatch, match_cases, read_mask
from resunet.evaluation.metrics import (
    DEFAULT_TOLERANCE_MM,
    METRICS,
    SITUATIONS,
    LabelMetrics,
    binary_metrics,
    check_same_grid,
    evaluate_case,
    evaluate_case_metrics,
    resample_nearest,
)
from resunet.evaluation.runner import ROW_COLUMNS, Evaluation, evaluate_folders
from resunet.evaluation.summary import SUMMARY_COLUMNS, bootstrap_ci_mean, summarize

__all__ = [
    "DEFAULT_TOLERANCE_MM",
    "METRICS",
    "ROW_COLUMNS",
    "SITUATIONS",
    "SUMMARY_COLUMNS",
    "CaseMatch",
    "Evaluation",
    "LabelMetrics",
    "binary_metrics",
    "bootstrap_ci_mean",
    "check_same_grid",
    "evaluate_case",
    "evaluate_case_metrics",
    "evaluate_folders",
    "match_cases",
    "read_mask",
    "resample_nearest",
    "summarize",
]
