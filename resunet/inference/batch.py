"""The batch runner behind ``resunet predict``: many studies, one summary, safe to kill and re-run.

For each case (see :mod:`resunet.inference.cases`) the runner hashes the input, loads it
(``resunet.io.load_study``) in a background thread while the previous case runs, predicts with one
:class:`~resunet.inference.predictor.Predictor`, writes the outputs atomically (temp name + rename)
and then records the case. Output files per case, in ``OUT``:

- ``<case>.nii.gz``: label map on exactly the input's grid and affine (``format`` ``nifti``);
- ``<case>.seg.dcm``: DICOM SEG referencing the source series, DICOM inputs only (``format`` ``seg``);
- ``<case>.rtstruct.dcm``: RTSTRUCT (contours per label and slice) referencing the source series,
  DICOM inputs only (``format`` ``rtstruct``);
- ``<case>.prob.nii.gz`` (one foreground label) or ``<case>.prob-<label>.nii.gz`` (several):
  float32 probabilities, with ``save_probabilities``;
- ``<case>.uncertainty.nii.gz``: normalised predictive entropy (0..1), with ``save_uncertainty``;
- ``<case>.uncertainty-models.nii.gz``: an ensemble's disagreement (normalised mutual information,
  0..1), with ``save_uncertainty`` and several models.

Records and summaries (:mod:`resunet.inference.records`, the record store):

- every finished case appends one JSON line to the journal ``predictions.jsonl`` (flushed and
  fsynced), then ``predictions.json`` and ``predictions.csv`` are rewritten atomically (see
  :mod:`~resunet.inference.records` for when). A SIGKILL therefore loses at most the case in
  flight; its outputs are either complete files or absent.
- re-running the same command skips a case whose record says ``ok`` with the same input SHA-256 and
  model SHA-256 and whose outputs are all present with their recorded SHA-256.
- sharding (``shard=(i, n)``, or ``torchrun``'s ``RANK``/``WORLD_SIZE``): shard ``i`` takes cases
  ``i, i+n, i+2n, ...`` of the sorted case list, writes its own journal and summary
  ``predictions.shard-<i>-of-<n>.jsonl/.json``, and when it finishes merges every journal and summary
  in ``OUT`` into ``predictions.json``/``.csv`` under a file lock; the last shard to finish leaves
  the complete summary (latest record per case wins). :func:`resunet.inference.records.merge_summaries`
  does the same by hand.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from resunet.errors import ConfigError, DiskFullError, ResunetError, ServerError
from resunet.inference import OUTPUT_FORMATS, records
from resunet.inference.cases import Case
from resunet.inference.predictor import Prediction, Predictor
from resunet.io.hashing import sha256_file, sha256_path
from resunet.io.names import safe_name

log = logging.getLogger(__name__)

FORMATS = OUTPUT_FORMATS
STATUS_LOG_INTERVAL_S = 30.0


@dataclass
class BatchOptions:
    """How ``resunet predict`` runs a batch.

    Args:
        out_dir: output folder (created).
        formats: ``nifti``, ``seg`` and/or ``rtstruct`` (SEG and RTSTRUCT for DICOM inputs only).
        save_probabilities: write per-label probability NIfTIs.
        save_uncertainty: write the uncertainty NIfTI (the Predictor needs ``uncertainty`` set).
        workers: background threads loading upcoming cases (cases read ahead = workers).
        shard: ``(index, count)``, 0-based index; ``(0, 1)`` = everything.
        series_uid: DICOM series to read in every DICOM case (default: the largest series).
        progress: show a progress bar (on a terminal).
        audit_db: audit-log database (default ``$RESUNET_AUDIT_DB`` or ``~/.resunet/audit.sqlite``);
            ``False`` disables the audit record.
        resume: skip cases already done with the same input and model.
        save_disagreement: with ``save_uncertainty`` and an ensemble, also write the members'
            disagreement ``<case>.uncertainty-models.nii.gz``.
        limits: per-case limits checked from the headers before reading (default from the environment).
        refused: ``{case_id: reason}`` of cases refused by a header check (recorded as failed, not read).
        uid_seed: SEG/RTSTRUCT UIDs follow from this seed, the case and the result (a service job's id:
            a job redone after a kill writes the same instances, so the archive stores it once);
            None: new random UIDs per object.
        route: the routing rule that picked this run's model (``resunet predict --routes``): in every
            case record (``route``) and the audit record's provenance.
        min_slices: DICOM series with fewer slices are refused (:func:`resunet.io.loader.check_series_complete`).
        allow_split_series: False: a DICOM series whose images disagree (only one stack of it could be
            read) is refused instead of segmented in part (the service and the DICOM node).
    """

    out_dir: Path
    formats: tuple[str, ...] = ("nifti", "seg")
    save_probabilities: bool = False
    save_uncertainty: bool = False
    workers: int = 1
    shard: tuple[int, int] = (0, 1)
    series_uid: str | None = None
    progress: bool = True
    audit_db: str | os.PathLike[str] | bool | None = None
    resume: bool = True
    save_disagreement: bool = False
    limits: Any = None
    refused: dict[str, str] = field(default_factory=dict)
    uid_seed: str | None = None
    route: str | None = None
    min_slices: int = 1
    allow_split_series: bool = True

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ConfigError(f"--format takes a comma-separated list of {', '.join(FORMATS)}; got {','.join(self.formats)}")
        if "sr" in self.formats and "seg" not in self.formats:
            raise ConfigError("--format sr needs seg too (the structured report references the SEG's segments): "
                              f"use --format {','.join(self.formats)},seg")
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise ConfigError(f"shard index must be in 0..{n - 1} for {n} shards, got {i}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")

    @property
    def sharded(self) -> bool:
        return self.shard[1] > 1

    @property
    def journal_name(self) -> str:
        return records.journal_name(self.shard)

    @property
    def summary_name(self) -> str:
        return records.summary_name(self.shard)


@dataclass
class BatchResult:
    """What :func:`run_batch` did: records of this shard's cases and the counts."""

    records: list[dict[str, Any]]
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    summary_path: Path | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 all ok; 1 some cases failed; 2 every case failed."""
        if not self.failed:
            return 0
        return 2 if self.failed == len(self.records) else 1


def shard_from_env() -> tuple[int, int] | None:
    """``(RANK, WORLD_SIZE)`` when launched by ``torchrun`` with more than one process, else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    return (rank, world) if world > 1 else None


def select_shard(cases: Sequence[Case], shard: tuple[int, int]) -> list[Case]:
    """Cases of shard ``(i, n)``: every n-th case of the list sorted by case id, starting at i."""
    ordered = sorted(cases, key=lambda c: c.case_id)
    return ordered[shard[0] :: shard[1]]


# -- the runner ---------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    case: Case
    input_record: dict[str, Any] | None = None
    volume: Any = None
    skip_record: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0


def _uid_seed(opts: BatchOptions, case: Case) -> str | None:
    """The seed of a case's SEG/RTSTRUCT UIDs (the batch's seed and the case id), or None for random UIDs."""
    return None if opts.uid_seed is None else f"{opts.uid_seed} case {case.case_id}"


def _output_paths(case: Case, opts: BatchOptions, prob_labels: Sequence[str]) -> dict[str, Path]:
    out = opts.out_dir
    paths: dict[str, Path] = {}
    if "nifti" in opts.formats or not case.is_dicom:
        paths["mask"] = out / f"{case.case_id}.nii.gz"
    if "seg" in opts.formats and case.is_dicom:
        paths["seg"] = out / f"{case.case_id}.seg.dcm"
    if "rtstruct" in opts.formats and case.is_dicom:
        paths["rtstruct"] = out / f"{case.case_id}.rtstruct.dcm"
    if "sr" in opts.formats and case.is_dicom:  # after "seg": the report references the SEG just written
        paths["sr"] = out / f"{case.case_id}.sr.dcm"
    if opts.save_probabilities:
        if len(prob_labels) == 1:
            paths["probabilities"] = out / f"{case.case_id}.prob.nii.gz"
        else:
            for name in prob_labels:
                paths[f"probabilities:{name}"] = out / f"{case.case_id}.prob-{safe_name(name, '', dots=False)}.nii.gz"
    if opts.save_uncertainty:
        paths["uncertainty"] = out / f"{case.case_id}.uncertainty.nii.gz"
    if opts.save_uncertainty and opts.save_disagreement:
        paths["disagreement"] = out / f"{case.case_id}.uncertainty-models.nii.gz"
    return paths


def _resumable(prev: dict[str, Any] | None, input_sha: str, model_sha: str, wanted: dict[str, Path], out_dir: Path) -> bool:
    if not prev or prev.get("status") != "ok":
        return False
    if (prev.get("input") or {}).get("sha256") != input_sha or (prev.get("model") or {}).get("sha256") != model_sha:
        return False
    outs = prev.get("outputs") or {}
    for key, path in wanted.items():
        rec = outs.get(key)
        if not rec or Path(rec.get("path", "")).name != path.name:
            return False
        f = out_dir / rec["path"]
        if not f.is_file() or sha256_file(f) != rec.get("sha256"):
            return False
    return True


@dataclass
class CaseContext:
    """What every case of one run shares with the per-case step (picklable: Ray workers get it too).

    Args:
        model_name: the model's name (records' ``model.name``).
        model_sha256: the model's (or ensemble's) hash; a case is resumed only with the same hash.
        members: ensemble member hashes (empty for one model).
        run_id: the run's provenance id (records' ``run_id``).
        fg_labels: foreground label names (names the probability outputs).
    """

    model_name: str
    model_sha256: str
    members: list[str]
    run_id: str
    fg_labels: list[str]


def node_name() -> str:
    """The machine's name as records and the audit log show it (the host name)."""
    import socket

    return socket.gethostname()


def load_case(case: Case, opts: BatchOptions, prev: dict[str, Any] | None, ctx: CaseContext) -> _Loaded:
    """Hash ``case``'s input and, unless its previous record ``prev`` lets it be skipped or a header
    check refused it, read it. Never raises for a bad case: the reason goes to ``error``."""
    from resunet.io.loader import load_study

    t0 = time.perf_counter()
    item = _Loaded(case=case)
    try:
        digest = case.memory.sha256() if case.memory is not None else sha256_path(case.path)
        item.input_record = {"path": str(case.path), "sha256": digest, "kind": case.kind}
        wanted = _output_paths(case, opts, ctx.fg_labels)
        if opts.resume and _resumable(prev, item.input_record["sha256"], ctx.model_sha256, wanted, opts.out_dir):
            item.skip_record = prev
        elif case.case_id in opts.refused:
            item.error = opts.refused[case.case_id]
        else:
            item.volume = load_study(case.memory if case.memory is not None else case.path,
                                     series_uid=opts.series_uid if case.is_dicom else None,
                                     limits=opts.limits)
    except ResunetError as err:
        item.error = str(err)
    except MemoryError:
        item.error = f"{case.path}: ran out of memory while reading it; lower --workers or --max-memory-gb"
    except Exception as err:  # an unexpected failure of one case must not stop the batch
        log.debug("loading %s failed:\n%s", case.path, traceback.format_exc())
        item.error = f"internal error while reading the input ({type(err).__name__}: {err})"
    item.seconds = time.perf_counter() - t0
    return item


def segment_case(item: _Loaded, predictor: Predictor, opts: BatchOptions, ctx: CaseContext,
                 progress: Any = None) -> dict[str, Any]:
    """The per-case step of every batch (local, sharded and Ray): predict a loaded case, write its
    outputs atomically and return its record. A failure is recorded with its reason (outputs of a
    failed case are removed); it never raises for a bad case."""
    from resunet.io.loader import check_series_complete
    from resunet.reports.provenance import utc_now

    case = item.case
    t0 = time.perf_counter()
    rec = records.case_record(case.case_id, item.input_record or {"path": str(case.path), "kind": case.kind},
                              device=str(predictor.device), model={"name": ctx.model_name, "sha256": ctx.model_sha256},
                              run_id=ctx.run_id)
    if opts.route:
        rec["route"] = opts.route
    if ctx.members:
        rec["model"]["members"] = list(ctx.members)
    written: list[Path] = []
    if item.error is not None:
        rec["reason"] = item.error
    else:
        try:
            check_series_complete(item.volume, min_slices=opts.min_slices, allow_split=opts.allow_split_series)
            pred = predictor.predict(item.volume, probabilities=opts.save_probabilities, progress=progress)
            rec["outputs"] = _write_outputs(case, item.volume, pred, opts, ctx.fg_labels, written)
            rec.update(
                status="ok",
                volumes_ml=pred.volumes_ml,
                voxel_counts=pred.voxel_counts,
                timings=pred.timings,
                grid=item.volume.describe_grid(),
                series_uid=item.volume.meta.get("series_uid"),
                warnings=list(pred.warnings),
            )
        except ServerError as err:  # not the input's fault: a caller (the service) may retry it
            rec["reason"] = str(err)
            rec["server_fault"] = "disk_full" if isinstance(err, DiskFullError) else "server"
        except ResunetError as err:
            rec["reason"] = str(err)
        except MemoryError:
            rec["reason"] = (f"{case.path}: ran out of memory while segmenting it ({item.volume.describe_grid()});"
                             " use a machine with more memory or lower --max-memory-gb to refuse such cases early")
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.debug("case %s failed:\n%s", case.case_id, traceback.format_exc())
                rec["reason"] = f"internal error ({type(err).__name__}: {err})"
            else:  # the disk of the outputs is full: the server's fault, retried once there is space
                rec["reason"] = f"no space left on the disk of {opts.out_dir} while writing the outputs ({err.strerror})"
                rec["server_fault"] = "disk_full"
        except Exception as err:  # isolate the case; the traceback goes to the debug log
            log.debug("case %s failed:\n%s", case.case_id, traceback.format_exc())
            rec["reason"] = f"internal error ({type(err).__name__}: {err})"
        if rec["status"] != "ok":
            for p in written:  # no outputs of a failed case are left behind
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            rec["outputs"] = {}
    item.volume = None
    rec["seconds"] = round(time.perf_counter() - t0 + item.seconds, 3)
    rec["finished_utc"] = utc_now()
    rec["node"] = node_name()
    if opts.sharded:
        rec["shard"] = f"{opts.shard[0]}/{opts.shard[1]}"
    return rec


#: one finished case from an engine: (case, "skip" with its kept record | "done" with its new record,
#: the inference settings of the predictor that ran it or None)
Outcome = tuple[Case, str, dict[str, Any], "dict[str, Any] | None"]


def _local_outcomes(mine: Sequence[Case], predictor: Predictor, opts: BatchOptions,
                    previous: dict[str, dict[str, Any]], ctx: CaseContext, bar: "_Bar") -> Iterator[Outcome]:
    """The local engine: ``opts.workers`` threads read ahead while this process predicts case by case."""
    with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="resunet-load") as pool:
        pending: list[Future[_Loaded]] = []
        queue = list(mine)

        def submit() -> None:
            case = queue.pop(0)
            pending.append(pool.submit(load_case, case, opts, previous.get(case.case_id), ctx))

        while queue and len(pending) < opts.workers:
            submit()
        while pending:
            item = pending.pop(0).result()
            if queue:
                submit()
            bar.start_case(item.case.case_id)
            if item.skip_record is not None:
                yield item.case, "skip", item.skip_record, None
                continue
            yield item.case, "done", segment_case(item, predictor, opts, ctx, progress=bar.windows), None


def run_batch(
    cases: Sequence[Case],
    predictor: Predictor,
    options: BatchOptions,
    command: Sequence[str] | None = None,
    engine: Any = None,
) -> BatchResult:
    """Segment ``cases`` (this shard's share) into ``options.out_dir``; see the module docstring.

    Failures of single cases (unreadable input, geometry refused, ...) are recorded with their reason
    and the run goes on. ``engine``: None runs the cases in this process; an engine such as
    :class:`resunet.inference.ray_batch.RayEngine` runs the same per-case step (:func:`load_case` +
    :func:`segment_case`) elsewhere, and this process keeps the journal, summaries and audit record.
    Returns a :class:`BatchResult`; its ``exit_code`` is what the CLI returns.
    """
    opts = options
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    mine = select_shard(cases, opts.shard)
    if not opts.sharded:
        _remove_stale_temps(opts.out_dir)
    else:  # other shards may be writing: only temps of this shard's cases (names no other case shares)
        others = {c.case_id.split(".")[0] for c in cases} - {c.case_id.split(".")[0] for c in mine}
        _remove_stale_temps(opts.out_dir, sorted({c.case_id.split(".")[0] for c in mine} - others - {"predictions"}))
    model = predictor.model
    header = _run_header(predictor, command)
    members = header["model"].get("members") or []
    previous = records.read_records(opts.out_dir) if opts.resume else {}
    ctx = CaseContext(model_name=model.name, model_sha256=model.sha256,
                      members=[m["sha256"] for m in members] if len(members) > 1 else [],
                      run_id=header["provenance"]["run_id"], fg_labels=[n for v, n in model.labels.items() if v != 0])
    store = records.RecordStore(opts.out_dir, header, shard=opts.shard, previous=previous)
    store.kept = {c.case_id: previous[c.case_id] for c in mine if c.case_id in previous}
    result = BatchResult(records=[])
    bar = _Bar(enabled=opts.progress, total=len(mine))
    settings_seen = False
    with bar, store:
        if engine is None:
            outcomes = _local_outcomes(mine, predictor, opts, previous, ctx, bar)
        else:
            outcomes = engine.outcomes(mine, opts, previous, ctx, bar)
        for case, kind, rec, settings in outcomes:
            if settings is not None and not settings_seen:  # the settings the cases ran with (a remote device)
                header["settings"] = settings
                settings_seen = True
            if kind == "skip":
                result.skipped += 1
                result.ok += 1
                store.keep(rec)
                bar.message(f"{case.case_id}: skipped (already done with this input and model)")
                bar.advance(ok=True)
                continue
            for w in rec.get("warnings") or []:
                bar.warn(f"case {case.case_id}: {w}")
            store.add(rec, save=False)
            where = f" on {rec['node']}" if engine is not None and rec.get("node") else ""
            if rec["status"] == "ok":
                result.ok += 1
                bar.message(f"{case.case_id}: ok in {rec['seconds']:.1f} s{where}")
            else:
                result.failed += 1
                result.failures.append((case.case_id, rec["reason"]))
                bar.error(f"case {case.case_id} ({case.path}) failed{where}: {rec['reason']}")
            store.save(force=False)
            bar.advance(ok=rec["status"] == "ok")
    result.summary_path = store.finish()
    all_mine = store.mine()
    result.records = [all_mine[c.case_id] for c in mine if c.case_id in all_mine]
    if opts.audit_db is not False:
        provenance = header["provenance"]
        if opts.route:
            provenance = {**provenance, "route": opts.route}
        if engine is not None:  # a cluster run: every case of this run with its status and node, failed ones too
            provenance = {**provenance, "cases": [{"case": r["case"], "status": r.get("status"), "node": r.get("node"),
                                                   "attempt": r.get("attempt")} for r in store.records.values()]}
        _record_audit(provenance, store.records, result.summary_path, opts)
    return result


def _run_header(predictor: Predictor, command: Sequence[str] | None) -> dict[str, Any]:
    """The summary's ``model``, ``settings`` and ``provenance`` for a run of ``predictor``."""
    from resunet.reports.provenance import collect_provenance, utc_now

    started = utc_now()
    model = predictor.model
    provenance = collect_provenance(
        command=command, model_path=model.path, model_name=model.name, started_utc=started
    ) if model.path is not None else collect_provenance(command=command, model_name=model.name, started_utc=started)
    model_rec = {"name": model.name, "sha256": model.sha256, "path": str(model.path) if model.path else None,
                 "kind": model.kind, "labels": {str(k): v for k, v in model.labels.items()}}
    members = predictor.model_records()
    if len(members) > 1:  # an ensemble: its hash names the set; every member's hash is recorded too
        model_rec["members"] = members
        provenance["model"] = {"name": model.name, "path": None, "sha256": model.sha256, "size_bytes": None,
                               "members": members}
    return {"model": model_rec, "settings": predictor.settings(), "provenance": provenance}


def _record_audit(provenance: dict[str, Any], run_records: dict[str, dict[str, Any]], summary: Path,
                  opts: BatchOptions) -> None:
    """Append the run (its outputs, each naming its case and the node that wrote it, and the summary) to the audit log."""
    from resunet.reports.audit import record_run

    outputs = [
        {**o, "path": str((opts.out_dir / o["path"]).resolve()), "case": r["case"], "node": r.get("node")}
        for r in run_records.values() for o in (r.get("outputs") or {}).values()
    ]
    outputs.append({"path": str(summary.resolve()), "sha256": sha256_file(summary)})
    record_run("predict", provenance, outputs, db_path=opts.audit_db or None)


def _write_outputs(
    case: Case, volume: Any, pred: Prediction, opts: BatchOptions, fg_labels: Sequence[str], written: list[Path]
) -> dict[str, dict[str, Any]]:
    """Write the case's files atomically; returns ``{kind: {"path": name relative to OUT, "sha256"}}``."""
    from resunet.io.nifti import write_mask_nifti, write_nifti

    paths = _output_paths(case, opts, fg_labels)
    outputs: dict[str, dict[str, Any]] = {}
    for key, path in paths.items():
        if key == "mask":
            write_mask_nifti(pred.mask, path)
        elif key == "seg":
            from resunet.io.seg import write_dicom_seg

            labels = {int(v): n for v, n in pred.mask.meta.get("labels", {}).items() if int(v) != 0}
            write_dicom_seg(pred.mask, volume, path, labels, algorithm_name=f"resunet {pred.model_name}"[:64],
                            model_sha256=pred.model_sha256, uid_seed=_uid_seed(opts, case))
        elif key == "rtstruct":
            from resunet.io.rtstruct import write_rtstruct

            labels = {int(v): n for v, n in pred.mask.meta.get("labels", {}).items() if int(v) != 0}
            write_rtstruct(pred.mask, volume, path, labels, algorithm_name=f"resunet {pred.model_name}"[:64],
                           model_sha256=pred.model_sha256, uid_seed=_uid_seed(opts, case))
        elif key == "sr":
            from resunet.io.sr import write_dicom_sr

            write_dicom_sr(paths["seg"], volume, path, pred.volumes_ml, algorithm_name=f"resunet {pred.model_name}"[:64],
                           model_sha256=pred.model_sha256, uid_seed=_uid_seed(opts, case), mask=pred.mask)
        elif key.startswith("probabilities"):
            assert pred.probabilities is not None
            name = key.split(":", 1)[1] if ":" in key else fg_labels[0]
            write_nifti(pred.probabilities[name], path)
        elif key == "uncertainty":
            if pred.uncertainty is None:
                raise ConfigError("--uncertainty output asked for but the predictor computes no uncertainty")
            write_nifti(pred.uncertainty, path)
        elif key == "disagreement":
            if pred.disagreement is None:
                raise ConfigError("the ensemble disagreement output asked for but the predictor computes none")
            write_nifti(pred.disagreement, path)
        written.append(path)
        outputs[key] = {"path": path.name, "sha256": sha256_file(path), "size_bytes": path.stat().st_size}
    return outputs


def _remove_stale_temps(out_dir: Path, stems: Sequence[str] | None = None) -> None:
    """Remove temp files a killed run left (``.<name>.<random>.part<suffix>`` from resunet.io.atomic);
    with ``stems``, only those of outputs named ``<stem>.*`` (a shard's own cases)."""
    from resunet.io.atomic import remove_stale_temps

    remove_stale_temps(out_dir, stems)


class _Bar:
    """Progress over cases (and windows of the current case) with rich, on a terminal; log lines otherwise."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = bool(enabled) and sys.stderr.isatty()
        self.total = total
        self._progress: Any = None
        self._cases: Any = None
        self._windows: Any = None
        self._last_status = 0.0

    def __enter__(self) -> "_Bar":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=Console(stderr=True), transient=False,
            )
            self._progress.__enter__()
            self._cases = self._progress.add_task("cases", total=self.total, info="")
            self._windows = self._progress.add_task("windows", total=1, visible=False, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start_case(self, case_id: str) -> None:
        if self._progress is not None:
            self._progress.update(self._cases, description=f"cases ({case_id})")

    def windows(self, stage: str, done: int, total: int) -> None:
        if self._progress is not None and stage == "windows":
            self._progress.update(self._windows, completed=done, total=max(total, 1), visible=total > 1)

    def advance(self, ok: bool = True) -> None:
        if self._progress is not None:
            self._progress.advance(self._cases)

    def status(self, text: str) -> None:
        """Run-wide figures beside the bar (a cluster run: done / failed / running, rate, nodes alive);
        without a terminal, logged at most every :data:`STATUS_LOG_INTERVAL_S` seconds."""
        if self._progress is not None:
            self._progress.update(self._cases, info=text)
        elif time.monotonic() - self._last_status >= STATUS_LOG_INTERVAL_S:
            self._last_status = time.monotonic()
            log.info("%s", text)

    def message(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            log.info("%s", text)

    def warn(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(f"[yellow]WARNING {text}[/yellow]")
        else:
            print(f"resunet predict: WARNING {text}", file=sys.stderr)

    def error(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(f"[red]{text}[/red]")
        else:
            print(f"resunet predict: {text}", file=sys.stderr)
