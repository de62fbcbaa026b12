"""Per-label summary statistics over cases; undefined values (None) are counted, never averaged as zero."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from resunet.evaluation.metrics import METRICS, SITUATIONS

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0

#: Columns of one summary row (one row per label and metric).
SUMMARY_COLUMNS: tuple[str, ...] = (
    "label",
    "label_name",
    "metric",
    "n_cases",
    "n_defined",
    "n_undefined",
    "mean",
    "std",
    "median",
    "q1",
    "q3",
    "iqr",
    "ci95_low",
    "ci95_high",
    *(f"n_{s}" for s in SITUATIONS),
)


def bootstrap_ci_mean(
    values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean: ``resamples`` draws with replacement, ``default_rng(seed)``.

    Returns ``None`` for fewer than 2 values.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def describe(values: Sequence[float | None]) -> dict[str, Any]:
    """Statistics of the defined (non-None) values: n_defined, n_undefined, mean, std, median, q1, q3, iqr, CI."""
    defined = np.asarray([v for v in values if v is not None], dtype=np.float64)
    out: dict[str, Any] = {"n_defined": int(defined.size), "n_undefined": int(len(values) - defined.size)}
    keys = ("mean", "std", "median", "q1", "q3", "iqr", "ci95_low", "ci95_high")
    out.update(dict.fromkeys(keys))
    if defined.size == 0:
        return out
    q1, med, q3 = np.percentile(defined, [25, 50, 75])
    out.update(mean=float(defined.mean()), median=float(med), q1=float(q1), q3=float(q3), iqr=float(q3 - q1))
    if defined.size >= 2:
        out["std"] = float(defined.std(ddof=1))
        out["ci95_low"], out["ci95_high"] = bootstrap_ci_mean(defined)  # type: ignore[misc]
    return out


def summarize(rows: Sequence[dict[str, Any]], label_names: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """Summary rows (columns :data:`SUMMARY_COLUMNS`), one per label and metric, from per-case rows.

    Args:
        rows: per-case, per-label dicts with ``label``, ``situation`` and every name in :data:`METRICS`.
        label_names: optional ``{label: name}``.
    """
    label_names = label_names or {}
    out = []
    for label in sorted({int(r["label"]) for r in rows}):
        lrows = [r for r in rows if int(r["label"]) == label]
        counts = {f"n_{s}": sum(1 for r in lrows if r["situation"] == s) for s in SITUATIONS}
        for metric in METRICS:
            stats = describe([r[metric] for r in lrows])
            out.append(
                {
                    "label": label,
                    "label_name": label_names.get(label, ""),
                    "metric": metric,
                    "n_cases": len(lrows),
                    **stats,
                    **counts,
                }
            )
    return out
