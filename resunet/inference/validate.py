"""Checking every input of a batch from its headers before the model is loaded.

``resunet predict`` calls :func:`validate_cases` on its shard's cases first: a header read refuses a
truncated file, a 4D volume, a decompression bomb or a folder without images in milliseconds, while
loading a model takes seconds and a gigabyte. Every refused case is reported at once; the model is
then loaded once for the others (refused cases are recorded as failed with their reason, unread).
When every case is refused the model is not loaded at all (:func:`write_refused_summary`).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from resunet.errors import ResunetError
from resunet.inference.cases import Case
from resunet.io.limits import Limits

log = logging.getLogger(__name__)


def validate_cases(
    cases: Sequence[Case], series_uid: str | None = None, limits: Limits | None = None, workers: int = 1
) -> dict[str, str]:
    """``{case_id: reason}`` for every case whose headers already show it cannot be segmented.

    Args:
        cases: the cases (one shard's).
        series_uid: the DICOM series ``--series`` asks for (DICOM cases only).
        limits: per-case limits (default :meth:`Limits.from_env`).
        workers: threads reading headers.
    """
    from resunet.io.precheck import check_study

    limits = limits if limits is not None else Limits.from_env()

    def one(case: Case) -> tuple[str, str | None]:
        try:
            check_study(case.path, series_uid if case.is_dicom else None, limits)
        except ResunetError as err:
            return case.case_id, str(err)
        except MemoryError:
            return case.case_id, f"{case.path}: ran out of memory reading the headers; the file is damaged"
        except Exception as err:  # a header check must never stop the batch; the read reports it again
            log.debug("header check of %s failed: %s: %s", case.path, type(err).__name__, err)
            return case.case_id, None
        return case.case_id, None

    with ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="resunet-check") as pool:
        results = list(pool.map(one, cases))
    return {cid: reason for cid, reason in results if reason is not None}


def write_refused_summary(
    cases: Sequence[Case], refused: dict[str, str], out_dir: str | os.PathLike[str], model_path: str | os.PathLike[str],
    shard: tuple[int, int] = (0, 1), command: Sequence[str] | None = None,
) -> Path:
    """Record the refused cases (all of them: no model was loaded) in the journal and summary of ``out_dir``
    (shard ``(i, n)``'s own when sharded), through :class:`resunet.inference.records.RecordStore`.

    Returns the summary path. Unsharded, earlier records of other cases in the folder are kept (as a
    normal run does).
    """
    from resunet.inference.records import RecordStore, case_record, read_records
    from resunet.io.hashing import sha256_file
    from resunet.reports.provenance import collect_provenance, utc_now

    out = Path(out_dir)
    model = Path(model_path)
    sha = sha256_file(model) if model.is_file() else None
    provenance = collect_provenance(command=command, started_utc=utc_now())
    header: dict[str, Any] = {"model": {"name": None, "sha256": sha, "path": str(model), "loaded": False},
                              "settings": {}, "provenance": provenance}
    previous = read_records(out) if shard[1] == 1 else {}
    with RecordStore(out, header, shard=shard, previous=previous) as store:
        for case in cases:
            if case.case_id in refused:
                rec = case_record(case.case_id, {"path": str(case.path), "kind": case.kind}, device=None,
                                  model={"name": None, "sha256": sha}, run_id=provenance["run_id"],
                                  reason=refused[case.case_id], seconds=0.0)
                rec["finished_utc"] = utc_now()
                store.add(rec, save=False)
        return store.save(force=True)
