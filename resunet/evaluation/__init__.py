"""Segmentation metrics with voxel spacing, empty-mask rules and per-case/per-label tables.

Public entry points:

- :func:`evaluate_case` (one case, used by the web UI): ``list[dict]``, one dict per label.
- :func:`evaluate_folders` (a folder of predictions against a folder of references).
- :func:`summarize`: per-label summary statistics that never average undefined values.

Every definition is stated in :mod:`resunet.evaluation.definitions` (printed in reports and
``docs/metrics.md``).

The names are imported on first use (PEP 562 ``__getattr__``), so ``resunet.evaluation.tolerance``
(the ``resunet evaluate`` parser's default) costs no numpy or scipy import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: exported name -> the module that defines it
_EXPORTS = {
    "CaseMatch": "resunet.evaluation.cases",
    "match_cases": "resunet.evaluation.cases",
    "read_mask": "resunet.evaluation.cases",
    "DEFAULT_TOLERANCE_MM": "resunet.evaluation.tolerance",
    "METRICS": "resunet.evaluation.metrics",
    "SITUATIONS": "resunet.evaluation.metrics",
    "LabelMetrics": "resunet.evaluation.metrics",
    "binary_metrics": "resunet.evaluation.metrics",
    "check_same_grid": "resunet.evaluation.metrics",
    "evaluate_case": "resunet.evaluation.metrics",
    "evaluate_case_metrics": "resunet.evaluation.metrics",
    "resample_nearest": "resunet.evaluation.metrics",
    "ROW_COLUMNS": "resunet.evaluation.runner",
    "Evaluation": "resunet.evaluation.runner",
    "evaluate_folders": "resunet.evaluation.runner",
    "SUMMARY_COLUMNS": "resunet.evaluation.summary",
    "bootstrap_ci_mean": "resunet.evaluation.summary",
    "summarize": "resunet.evaluation.summary",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what static tools and IDEs see
    from resunet.evaluation.cases import CaseMatch, match_cases, read_mask
    from resunet.evaluation.metrics import (
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
    from resunet.evaluation.tolerance import DEFAULT_TOLERANCE_MM


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'resunet.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
