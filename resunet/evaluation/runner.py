"""Evaluating a folder of predictions against a folder of references, cases in parallel."""

from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resunet.errors import ResunetError
from resunet.evaluation.cases import CaseMatch, match_cases, read_pair
from resunet.evaluation.metrics import DEFAULT_TOLERANCE_MM, METRICS, evaluate_case_metrics
from resunet.evaluation.summary import summarize

log = logging.getLogger(__name__)

#: Columns of metrics.csv, in order.
ROW_COLUMNS: tuple[str, ...] = ("case", "label", "label_name", "situation", *METRICS, "n_pred", "n_gt", "tp")


@dataclass
class Evaluation:
    """Result of :func:`evaluate_folders`.

    Attributes:
        rows: one dict per case and label (keys :data:`ROW_COLUMNS` plus ``tolerance_mm``), sorted by
            case then label; ``None`` = undefined.
        summary: one dict per label and metric (see :func:`resunet.evaluation.summary.summarize`).
        labels: label values evaluated.
        label_names: ``{label: name}`` where known.
        match: matched pairs and unmatched case names.
        tolerance_mm: NSD tolerance, mm.
        resampled: cases whose prediction was resampled onto the reference grid.
    """

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    labels: list[int]
    label_names: dict[int, str]
    match: CaseMatch
    tolerance_mm: float
    resampled: list[str] = field(default_factory=list)


def _evaluate_pair(
    case: str,
    pred_path: Path,
    gt_path: Path,
    labels: list[int] | None,
    tolerance_mm: float,
    resample_pred: bool,
    source: tuple[Path, str] | None = None,
    label_names: dict[int, str] | None = None,
) -> tuple[str, list[dict[str, Any]], bool]:
    """Worker: read one pair of masks and compute its metrics (runs in a child process)."""
    pred, ref, _ = read_pair(pred_path, gt_path, source, label_names)
    resampled = not pred.same_grid(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the parent logs one warning per resampled case
        metrics = evaluate_case_metrics(pred, ref, labels, tolerance_mm, resample_pred)
    return case, [m.to_dict() for m in metrics], resampled and resample_pred


def evaluate_folders(
    pred_dir: str | os.PathLike[str],
    gt_dir: str | os.PathLike[str],
    labels: list[int] | None = None,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    resample_pred: bool = False,
    label_names: dict[int, str] | None = None,
    workers: int | None = None,
    images_dir: str | os.PathLike[str] | None = None,
) -> Evaluation:
    """Evaluate every case present in both folders, in parallel over cases.

    Cases are matched by :func:`resunet.evaluation.cases.match_cases` (``<case>.nii.gz``; DICOM SEG by
    name or referenced series).

    Args:
        pred_dir: folder of predicted label masks.
        gt_dir: folder of reference label masks.
        labels: label values; default the union of non-zero values over all masks (a label absent from
            both masks of a case is a ``both_empty`` row for that case).
        tolerance_mm: NSD tolerance in mm.
        resample_pred: resample predictions on another grid onto the reference grid (nearest
            neighbour, warned) instead of raising :class:`resunet.errors.GeometryError`.
        label_names: optional ``{label: name}`` for the tables.
        workers: processes; default ``os.cpu_count()`` (1 = in this process).
        images_dir: folder of the DICOM studies that DICOM SEG masks refer to (only needed for SEG).

    Raises:
        resunet.errors.InputError: missing folders, no matched case, unreadable or non-label masks.
        resunet.errors.GeometryError: a prediction is on another grid than its reference.
    """
    match = match_cases(pred_dir, gt_dir, images_dir)
    for c in match.pred_only:
        log.warning("case %s: prediction without reference in %s; not evaluated", c, gt_dir)
    for c in match.gt_only:
        log.warning("case %s: reference without prediction in %s; not evaluated", c, pred_dir)
    n = len(match.pairs)
    workers = max(1, min(workers or os.cpu_count() or 1, n))
    names = {int(k): v for k, v in (label_names or {}).items()}
    jobs = [(c, p, g, labels, tolerance_mm, resample_pred, match.sources.get(c), names) for c, p, g in match.pairs]
    if workers == 1:
        results = [_evaluate_pair(*j) for j in jobs]
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        try:
            futures = [pool.submit(_evaluate_pair, *j) for j in jobs]
            results = [f.result() for f in futures]
        except BrokenProcessPool as err:
            raise ResunetError(
                f"a worker process evaluating {pred_dir} died ({err}); out of memory? rerun with --workers 1"
            ) from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on a bad case, stop at once instead of finishing all

    resampled = [case for case, _, r in results if r]
    for case in resampled:
        log.warning("case %s: prediction resampled onto the reference grid (nearest neighbour)", case)
    all_labels = sorted(labels) if labels is not None else sorted({d["label"] for _, ds, _ in results for d in ds})
    rows: list[dict[str, Any]] = []
    for case, dicts, _ in results:
        by_label = {d["label"]: d for d in dicts}
        for lab in all_labels:
            d = by_label.get(lab) or _both_empty_row(lab, tolerance_mm)
            rows.append({"case": case, "label_name": names.get(lab, ""), **d})
    return Evaluation(
        rows=rows,
        summary=summarize(rows, names),
        labels=all_labels,
        label_names=names,
        match=match,
        tolerance_mm=tolerance_mm,
        resampled=resampled,
    )


def _both_empty_row(label: int, tolerance_mm: float) -> dict[str, Any]:
    """The row of a label that neither mask of a case contains (see the empty-mask rules)."""
    import numpy as np

    from resunet.evaluation.metrics import binary_metrics

    z = np.zeros((1, 1, 1), dtype=bool)
    return binary_metrics(z, z, (1.0, 1.0, 1.0), tolerance_mm, label=label).to_dict()
