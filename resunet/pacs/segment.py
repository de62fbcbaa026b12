"""Pull a study from an archive, segment it with the batch runner, send the results back: one step.

:func:`segment_and_send` is the step; :func:`segment_from_pacs` (DICOMweb: WADO-RS in, STOW-RS out)
and :func:`segment_from_dimse` (DIMSE: C-GET/C-MOVE in, C-STORE out) give it their transports, and
the service's ``pacs-pull`` and ``dicom-series`` jobs (:mod:`resunet.serve.pacs_jobs`) theirs.
The study is pulled into memory (DICOMweb: :meth:`PacsClient.fetch`, a
:class:`~resunet.io.memory.MemoryStudy`; nothing is written to disk) or retrieved into a folder (DIMSE,
the service's jobs), segmented by :func:`resunet.inference.batch.run_batch` exactly as ``resunet
predict FOLDER`` would (same reader, Predictor, writers, ``predictions.json`` and audit record), and
the DICOM outputs (SEG, RTSTRUCT, SR) are stored into the same study. Pulled images are dropped (or
their temp folder deleted) afterwards; the predictions record keeps their SHA-256.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resunet.errors import PacsError
from resunet.inference.batch import BatchOptions, BatchResult, run_batch
from resunet.inference.cases import Case
from resunet.inference.predictor import Predictor
from resunet.io.memory import MemoryStudy
from resunet.io.names import safe_name
from resunet.io.scratch import private_temp_dir
from resunet.pacs.dicomweb import PacsClient
from resunet.pacs.dimse_qr import DimseSource, QueryConfig

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


def segment_and_send(
    study_uid: str,
    fetch: Callable[[Path], None] | None,
    send: Callable[[list[Path]], Any] | None,
    predictor: Predictor,
    options: BatchOptions,
    *,
    source: str,
    command: Sequence[str] | None = None,
    folder: Path | None = None,
    failure: Callable[[BatchResult], Exception] | None = None,
    pull: Callable[[], MemoryStudy] | None = None,
) -> PacsRun:
    """The one "segment a study from an archive and send the results back" step; transports are arguments.

    ``resunet predict --pacs`` (DICOMweb and DIMSE) and the service's ``pacs-pull`` and
    ``dicom-series`` jobs all run this step; only ``fetch`` and ``send`` differ.

    Args:
        study_uid: the study (its UID names the case and the outputs when ``folder`` is not given).
        fetch: writes the study's instances into the folder it is given (WADO-RS, C-GET, C-MOVE);
            raises PacsError when the archive fails or delivers less than it listed. None: the
            instances are in ``folder`` already (received with C-STORE).
        send: stores the DICOM outputs (:data:`DICOM_OUTPUTS`) back (STOW-RS, C-STORE); None keeps them local.
        source: the archive, for messages.
        folder: where the study is (or is fetched to; emptied first); its name is the case id. It is
            kept afterwards. Default: a private temp folder named after the study, removed afterwards
            (a killed process's by the next one).
        failure: builds the error raised when the case was not segmented (default: a PacsError
            naming the study, the archive and the reason).
        pull: instead of ``fetch``: returns the study's instances held in memory (WADO-RS,
            :meth:`PacsClient.fetch`; raises PacsError as ``fetch`` does); they are read from there
            (:func:`resunet.io.loader.load_memory_study`) and no folder is made. The case id is the
            study's name (``safe_name(study_uid)``, as the default folder's).

    The study is segmented by :func:`resunet.inference.batch.run_batch` as ``resunet predict FOLDER``
    would, and only a case that succeeded is sent: nothing partial goes back.
    """
    if pull is not None and fetch is not None:
        raise ValueError("segment_and_send: give fetch (into a folder) or pull (into memory), not both")
    run = PacsRun(study_uid=study_uid, batch=BatchResult(records=[]))
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        if pull is not None:
            study = pull()
            case = Case(case_id=safe_name(study_uid, "study"), path=Path(study.name), kind="dicom", memory=study)
        else:
            if folder is None:  # removed after; a killed process's by the next one
                folder = stack.enter_context(private_temp_dir("pacs")) / safe_name(study_uid, "study")
            if fetch is not None:
                shutil.rmtree(folder, ignore_errors=True)  # a half-done earlier attempt
                fetch(folder)
            case = Case(case_id=folder.name, path=folder, kind="dicom")
        run.timings["pull"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run.batch = run_batch([case], predictor, options, command=command)
        run.timings["segment"] = time.perf_counter() - t0
    failed = [r for r in run.batch.records if r.get("status") != "ok"]
    if failed or not run.batch.records:
        if failure is not None:
            raise failure(run.batch)
        reason = failed[0].get("reason") if failed else "no case was segmented"
        raise PacsError(f"study {study_uid} from {source} could not be segmented: {reason}")
    if send is not None:
        files = dicom_outputs(run.batch, options.out_dir)
        t0 = time.perf_counter()
        if files:
            send(files)
        run.timings["store"] = time.perf_counter() - t0
        run.stored = files
    return run


def dicom_outputs(batch: BatchResult, out_dir: Path) -> list[Path]:
    """The DICOM output files (:data:`DICOM_OUTPUTS`) of a batch's records, as paths under ``out_dir``."""
    return [Path(out_dir) / o["path"] for r in batch.records
            for key, o in (r.get("outputs") or {}).items() if key in DICOM_OUTPUTS]


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
    """DICOMweb: pull ``study_uid`` into memory (WADO-RS, :meth:`PacsClient.fetch`), segment it into
    ``options.out_dir``, STOW its DICOM outputs back. No image is written to disk.

    Args:
        series_uid: retrieve and segment only this series (default: every image series is
            retrieved and the largest is segmented, as ``resunet predict`` does for a folder).
        store: STOW the DICOM outputs back into the study.

    Raises:
        PacsError: the PACS is unreachable, lacks the study, or refuses the results; or the case failed.
    """
    if series_uid:
        options.series_uid = series_uid
    return segment_and_send(
        study_uid, None, (lambda files: client.store(files, study_uid)) if store else None,
        predictor, options, source=client.config.url, command=command,
        pull=lambda: client.fetch(study_uid, [series_uid] if series_uid else None))


def segment_from_dimse(
    source: DimseSource,
    cfg: QueryConfig,
    study_uid: str,
    predictor: Predictor,
    options: BatchOptions,
    *,
    series_uid: str | None = None,
    store: bool = True,
    command: Sequence[str] | None = None,
    folder: Path | None = None,
    failure: Callable[[BatchResult], Exception] | None = None,
) -> PacsRun:
    """DIMSE: C-FIND the study's series, C-GET/C-MOVE them (complete or PacsError), segment, C-STORE back.

    Args:
        source, cfg: the archive and how to talk to it (:mod:`resunet.pacs.dimse_qr`).
        series_uid: retrieve only this series (default: every image series, earlier SEG/SR/RTSTRUCT left
            out; the largest is segmented).
        folder, failure: as for :func:`segment_and_send` (the service's job folder and failure message).
            Without a folder the study is retrieved into memory (no image written to disk).
    """
    from resunet.pacs.dimse import Destination, send_files
    from resunet.pacs.dimse_qr import retrieve_study, series_to_retrieve

    series = series_to_retrieve(source, cfg, study_uid, series_uid)
    if series_uid:
        options.series_uid = series_uid
    dest = Destination(source.host, source.port, source.ae_title)
    send = (lambda files: send_files(files, dest, calling_aet=cfg.calling_aet, timeout=cfg.timeout,
                                     ssl_context=cfg.ssl_context(source))) if store else None
    if folder is None:  # held in memory as received and read from there, as segment_from_pacs does
        return segment_and_send(study_uid, None, send, predictor, options, source=str(source), command=command,
                                failure=failure, pull=lambda: retrieve_study(source, cfg, study_uid, None, series).study)
    return segment_and_send(
        study_uid, lambda folder: retrieve_study(source, cfg, study_uid, folder, series),
        send, predictor, options, source=str(source), command=command, folder=folder, failure=failure)


@dataclass
class RoutedRun:
    """What :func:`segment_routed` did: per series a rule took, its rule name and :class:`PacsRun`;
    the series no rule took, as ``{series_uid: SeriesFacts}``; ``pull`` seconds."""

    study_uid: str
    runs: list[tuple[str, str, PacsRun]] = field(default_factory=list)  # (series uid, rule name, run)
    unrouted: dict[str, Any] = field(default_factory=dict)
    pull_seconds: float = 0.0


def segment_routed(
    study_uid: str,
    fetch: Callable[[Path], None],
    send: Callable[[list[Path]], Any] | None,
    routes: Any,
    predictor_for: Callable[[Any], Any],
    options: BatchOptions,
    *,
    source: str,
    command: Sequence[str] | None = None,
    log: Any = None,
) -> RoutedRun:
    """A study from an archive, each of its image series segmented by the model its routing rule picks.

    ``fetch`` pulls the whole study (WADO-RS, C-GET/C-MOVE) into a private temp folder; each image
    series (:func:`resunet.io.loader.list_series`, headers only) is routed on the facts of its largest
    stack (:class:`resunet.pacs.routing.SeriesFacts`); the series of a rule are segmented, one case per
    series (case id = its Series Instance UID), into ``options.out_dir / <rule name>`` with the rule's
    model (``predictor_for(rule)``, built once per rule) through :func:`segment_and_send`, so the rule is
    in each record (``route``) and the audit provenance, and the DICOM outputs go back with ``send``.
    Series no rule takes are left alone, logged once (modality and size only: descriptions may hold PHI).

    Raises:
        PacsError: the pull failed, or a series that a rule took could not be segmented or sent (the
            series before it are done and sent; the message names the series).
    """
    import dataclasses
    import logging
    import os

    import pydicom

    from resunet.io.loader import list_series
    from resunet.pacs.routing import SeriesFacts

    log = log or logging.getLogger(__name__)
    out = RoutedRun(study_uid=study_uid)
    predictors: dict[str, Any] = {}
    with private_temp_dir("pacs") as tmp:
        pulled = tmp / "pulled"
        t0 = time.perf_counter()
        fetch(pulled)
        out.pull_seconds = time.perf_counter() - t0
        by_series: dict[str, list[Any]] = {}
        for s in list_series(pulled):  # largest stack first; a split series gives several stacks
            by_series.setdefault(s.series_instance_uid or s.uid, []).append(s)
        for series_uid, stacks in by_series.items():
            first = sorted(stacks[0].files)[0]
            facts = SeriesFacts.from_dataset(pydicom.dcmread(first, stop_before_pixels=True), stacks[0].n_slices)
            rule = routes.route(facts)
            if rule is None:
                routes.log_unrouted(log, series_uid, facts)
                out.unrouted[series_uid] = facts
                continue
            folder = tmp / "series" / safe_name(series_uid, "series")
            folder.mkdir(parents=True, exist_ok=True)
            for st in stacks:  # the series' own folder: its case id is the series UID
                for f in st.files:
                    os.replace(f, folder / Path(f).name)
            if rule.name not in predictors:
                predictors[rule.name] = predictor_for(rule)
            opts = dataclasses.replace(options, out_dir=Path(options.out_dir) / safe_name(rule.name, "rule"),
                                       route=rule.name, series_uid=None, refused={})
            log.info("routing: series %s -> rule '%s' (model %s)", series_uid, rule.name, " -> ".join(rule.models))
            run = segment_and_send(study_uid, None, send, predictors[rule.name], opts, source=source,
                                   command=command, folder=folder)
            out.runs.append((series_uid, rule.name, run))
    return out
