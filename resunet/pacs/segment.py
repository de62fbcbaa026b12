"""Pull a study from a DICOMweb PACS, segment it with the batch runner, store the results back.

The study is retrieved (WADO-RS) into a private temp folder, segmented by
:func:`resunet.inference.batch.run_batch` exactly as ``resunet predict FOLDER`` would (same
Predictor, writers, ``predictions.json`` and audit record), and the DICOM outputs (SEG, RTSTRUCT)
are stored into the same study with STOW-RS. The pulled images are deleted afterwards; the
predictions record keeps their SHA-256.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from resunet.errors import PacsError
from resunet.inference.batch import BatchOptions, BatchResult, run_batch
from resunet.inference.cases import Case
from resunet.inference.predictor import Predictor
from resunet.io.scratch import private_temp_dir
from resunet.pacs.dicomweb import PacsClient

#: outputs of a case that go back to the PACS (the NIfTI mask stays local)
DICOM_OUTPUTS = ("seg", "rtstruct", "sr")


@dataclass
class PacsRun:
    """What :func:`segment_from_pacs` did.

    Attributes:
        study_uid: the study segmented.
        batch: the batch runner's result (one case, id = the study UID).
        stored: output files stored back to the PACS.
        timings: seconds for ``pull`` (WADO-RS), ``segment`` (load + predict + write) and ``store`` (STOW-RS).
    """

    study_uid: str
    batch: BatchResult
    stored: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _case_id(study_uid: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-_" else "_" for ch in study_uid) or "study"


def segment_from_pacs(
    client: PacsClient,
    study_uid: str,
    predictor: Predictor,
    options: BatchOptions,
    *,
    series_uid: str | None = None,
    store: bool = True,
    command: Sequence[str] | None = None,
) -> PacsRun:
    """Retrieve ``study_uid``, segment it into ``options.out_dir``, STOW its SEG/RTSTRUCT back.

    Args:
        client: the PACS.
        study_uid: Study Instance UID.
        predictor: the loaded model.
        options: as for ``resunet predict`` (formats, out_dir, audit...); ``series_uid`` overrides
            ``options.series_uid``. Outputs are named after the study UID.
        series_uid: retrieve and segment only this series (default: every image series is
            retrieved and the largest is segmented, as ``resunet predict`` does for a folder).
        store: STOW the DICOM outputs back into the study.

    Raises:
        PacsError: the PACS is unreachable, lacks the study, or refuses the results; or the case failed.
    """
    if series_uid:
        options.series_uid = series_uid
    run = PacsRun(study_uid=study_uid, batch=BatchResult(records=[]))
    with private_temp_dir("pacs") as tmp:  # removed after; a killed process's by the next one
        folder = tmp / _case_id(study_uid)
        t0 = time.perf_counter()
        client.retrieve(study_uid, folder, [series_uid] if series_uid else None)
        run.timings["pull"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run.batch = run_batch([Case(case_id=_case_id(study_uid), path=folder, kind="dicom")], predictor, options,
                              command=command)
        run.timings["segment"] = time.perf_counter() - t0
    failed = [r for r in run.batch.records if r.get("status") != "ok"]
    if failed:
        raise PacsError(f"study {study_uid} from {client.config.url} could not be segmented: {failed[0].get('reason')}")
    if store:
        files = [options.out_dir / o["path"] for r in run.batch.records
                 for key, o in (r.get("outputs") or {}).items() if key in DICOM_OUTPUTS]
        t0 = time.perf_counter()
        if files:
            client.store(files, study_uid)
        run.timings["store"] = time.perf_counter() - t0
        run.stored = files
    return run
