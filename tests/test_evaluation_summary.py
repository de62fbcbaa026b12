"""Summary statistics: undefined values counted, never averaged; bootstrap CI reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from resunet.evaluation import binary_metrics, bootstrap_ci_mean, summarize
from resunet.evaluation.summary import BOOTSTRAP_RESAMPLES


def _rows():
    z = np.zeros((6, 6, 6), bool)
    a = z.copy()
    a[1:4, 1:4, 1:4] = True
    b = z.copy()
    b[2:5, 1:4, 1:4] = True
    rows = []
    for case, (p, r) in enumerate([(a, a), (b, a), (z, a), (a, z), (z, z)]):
        rows.append({"case": f"c{case}", **binary_metrics(p, r, (1.0, 1.0, 2.0)).to_dict()})
    return rows


def test_undefined_values_are_counted_not_averaged_as_zero():
    rows = _rows()
    s = {r["metric"]: r for r in summarize(rows, {1: "liver"})}
    assert s["dice"]["label_name"] == "liver"
    # situations: both_present x2, pred_empty (c2), ref_empty (c3), both_empty (c4)
    for r in s.values():
        assert (r["n_both_present"], r["n_pred_empty"], r["n_ref_empty"], r["n_both_empty"]) == (2, 1, 1, 1)
        assert r["n_cases"] == 5
    dice = [r["dice"] for r in rows]
    assert s["dice"]["n_undefined"] == 0
    assert s["dice"]["mean"] == pytest.approx(np.mean(dice))
    # hd95 undefined in c2 and c3: the mean is over the 3 defined values, not 5 with zeros
    hd = [r["hd95"] for r in rows if r["hd95"] is not None]
    assert len(hd) == 3 and s["hd95"]["n_undefined"] == 2 and s["hd95"]["n_defined"] == 3
    assert s["hd95"]["mean"] == pytest.approx(np.mean(hd))
    assert s["hd95"]["mean"] != pytest.approx(sum(hd) / 5)
    # recall undefined only when the reference is empty (c3), precision only when the prediction is (c2)
    assert s["recall"]["n_undefined"] == 1 and s["precision"]["n_undefined"] == 1
    assert s["recall"]["mean"] == pytest.approx(np.mean([r["recall"] for r in rows if r["recall"] is not None]))
    q1, med, q3 = np.percentile(hd, [25, 50, 75])
    assert (s["hd95"]["median"], s["hd95"]["iqr"]) == (pytest.approx(med), pytest.approx(q3 - q1))
    assert s["hd95"]["std"] == pytest.approx(np.std(hd, ddof=1))


def test_bootstrap_ci_fixed_seed_and_degenerate_cases():
    x = [0.2, 0.5, 0.9, 0.7, 0.4, 0.8]
    lo, hi = bootstrap_ci_mean(x)
    assert (lo, hi) == bootstrap_ci_mean(x)  # fixed seed: reproducible
    assert lo < np.mean(x) < hi and min(x) <= lo and hi <= max(x)
    # the same computation spelled out: percentile bootstrap of the mean
    rng = np.random.default_rng(0)
    means = np.asarray(x)[rng.integers(0, len(x), size=(BOOTSTRAP_RESAMPLES, len(x)))].mean(axis=1)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert bootstrap_ci_mean([0.3]) is None


def test_all_undefined_gives_empty_statistics():
    z = np.zeros((4, 4, 4), bool)
    a = z.copy()
    a[1, 1, 1] = True
    rows = [{"case": "x", **binary_metrics(z, a, (1, 1, 1)).to_dict()}]
    s = {r["metric"]: r for r in summarize(rows)}
    assert s["hd95"]["mean"] is None and s["hd95"]["ci95_low"] is None and s["hd95"]["n_undefined"] == 1
    assert s["dice"]["mean"] == 0.0 and s["dice"]["std"] is None
