"""What the worker does with each kind of job; the ``segment`` kind and the registry for more.

A handler takes the claimed :class:`~resunet.serve.queue.Job` and a :class:`JobEnv` (the warm
predictors, the job's folder) and returns a :class:`JobOutcome` (output files relative to the job
folder with their SHA-256, plus a JSON-able result). It raises a :class:`resunet.errors.ResunetError`
with the user's one-line message when the job cannot be done; the worker then marks the job failed and
goes on with the next one. A handler must be safe to run again from the start: a job whose service
was killed mid-run is re-queued and redone (``segment`` deletes its half-written ``out/`` first).

Adding a kind (e.g. "pull a study from PACS, then segment")::

    from resunet.serve.jobs import register_kind, run_segmentation

    def pacs_pull(job, env):
        folder = env.job_dir(job.id) / "input"          # fetch the study here
        ...
        return run_segmentation(job, env, folder)

    register_kind("pacs-pull", pacs_pull)
    queue.enqueue("pacs-pull", options={"study_uid": ..., "formats": ["seg"]}, submitted_by="PACS")

Outputs of ``segment`` are written by :func:`resunet.inference.batch.run_batch`, the same code as
``resunet predict``, so every format in :data:`resunet.inference.batch.FORMATS` is available per job.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from resunet.errors import ConfigError, DiskFullError, InputError, ResunetError, ServerError
from resunet.inference.records import SUMMARY as PREDICTIONS  # the predictions JSON in a job's ``out/``
from resunet.serve.queue import Job


class JobEnv(Protocol):
    """What a handler may use from the service."""

    def job_dir(self, job_id: str) -> Path:
        """The job's own folder (``<state>/jobs/<id>``): ``input/`` and ``out/`` live there."""

    def predictor(self, uncertainty: bool = False) -> Any:
        """The warm :class:`resunet.inference.Predictor` (with TTA uncertainty when asked)."""

    def default_formats(self) -> tuple[str, ...]:
        """Output formats used when a job names none."""

    def input_rules(self) -> dict[str, Any]:
        """``min_slices`` and ``allow_split_series`` for :class:`resunet.inference.batch.BatchOptions`."""


@dataclass
class JobOutcome:
    """What a finished job produced.

    Attributes:
        outputs: ``{key: {"path": relative to the job folder, "sha256", "size_bytes"}}``; keys are the
            names clients fetch (``mask``, ``seg``, ``uncertainty``, ``predictions``, ...).
        result: JSON-able summary shown in the job status (volumes per label, model, timings).
        review: hold the outputs for a person's decision (``--require-review``): ``{"state": "pending",
            "send": what to send where once approved, or None}`` (:mod:`resunet.serve.review`); None: not held.
    """

    outputs: dict[str, dict[str, Any]]
    result: dict[str, Any] = field(default_factory=dict)
    review: dict[str, Any] | None = None


Handler = Callable[[Job, JobEnv], JobOutcome]
KINDS: dict[str, Handler] = {}


def register_kind(kind: str, handler: Handler) -> None:
    """Let the worker run jobs of ``kind`` with ``handler(job, env) -> JobOutcome``."""
    KINDS[kind] = handler


def segment_options(raw: dict[str, Any], default_formats: tuple[str, ...]) -> dict[str, Any]:
    """Check and complete the options of a ``segment`` job (ConfigError with the bad option named).

    Keys: ``formats`` (list of :data:`resunet.inference.batch.FORMATS`), ``uncertainty`` (bool),
    ``probabilities`` (bool), ``series_uid`` (str or None).
    """
    from resunet.inference import OUTPUT_FORMATS as FORMATS  # not .batch: that imports torch

    formats = raw.get("formats") or list(default_formats)
    if isinstance(formats, str):
        formats = [f for f in formats.split(",")]
    formats = [str(f).strip().lower() for f in formats if str(f).strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"formats takes a comma-separated list of {', '.join(FORMATS)}; got {','.join(formats) or 'nothing'}")
    series = raw.get("series_uid") or None
    return {
        "formats": formats,
        "uncertainty": bool(raw.get("uncertainty", False)),
        "probabilities": bool(raw.get("probabilities", False)),
        "series_uid": str(series) if series else None,
    }


def run_segmentation(job: Job, env: JobEnv, input_path: str | Path) -> JobOutcome:
    """Segment the study at ``input_path`` into ``<job>/out`` with the batch runner of ``resunet predict``.

    The three parts (:func:`job_batch`, :func:`job_failure`, :func:`job_outcome`) are also what the
    PACS job kinds give :func:`resunet.pacs.segment.segment_and_send`.

    Raises:
        InputError (or another ResunetError): the study could not be segmented; the message names the
        input as the client called it, not the server's path.
    """
    from resunet.inference.batch import run_batch
    from resunet.inference.cases import discover_cases

    predictor, batch = job_batch(job, env)
    res = run_batch(discover_cases([input_path]), predictor, batch, command=job_command(job))
    if res.failed or not res.records:
        raise job_failure(job, env, input_path)(res)
    return job_outcome(job, env, res, predictor, input_path)


def job_command(job: Job) -> list[str]:
    """The command recorded in a job's ``predictions.json`` provenance."""
    return ["resunet", "serve", "job", job.id]


def job_batch(job: Job, env: JobEnv) -> tuple[Any, Any]:
    """The warm predictor and :class:`~resunet.inference.batch.BatchOptions` of a job (``out_dir`` =
    ``<job>/out``, emptied: a half-done earlier attempt is redone from scratch)."""
    from resunet.inference.batch import BatchOptions

    out = env.job_dir(job.id) / "out"
    if out.exists():  # a half-done earlier attempt (service killed): redo from scratch
        shutil.rmtree(out)
    opts = segment_options(job.options, env.default_formats())
    routed = job.options.get("model")  # picked by a routing rule (resunet.pacs.routing)
    predictor = env.predictor(uncertainty=opts["uncertainty"],
                              **({"model": routed, "then": job.options.get("then") or ()} if routed else {}))
    batch = BatchOptions(
        out_dir=out, formats=tuple(opts["formats"]), save_probabilities=opts["probabilities"],
        save_uncertainty=opts["uncertainty"], series_uid=opts["series_uid"], progress=False,
        audit_db=False,  # the service records the job itself (who = token name), see service.record_audit
        resume=False,
        uid_seed=f"resunet serve job {job.id}",  # redone after a kill: the same SEG/RTSTRUCT, stored once
        **env.input_rules(),  # part of a series, or a 2-slice localiser: refused with the counts
    )
    return predictor, batch


def job_failure(job: Job, env: JobEnv, input_path: str | Path) -> Callable[[Any], ResunetError]:
    """What a job whose case failed raises: the reason in the client's words; a full disk (or another
    server fault, not the study's) is a server fault, retried once there is space."""
    job_dir = env.job_dir(job.id)

    def error(res: Any) -> ResunetError:
        reason = res.failures[0][1] if res.failures else "no case was segmented"
        faults = {r.get("server_fault") for r in res.records} - {None}
        if faults:
            cls = DiskFullError if "disk_full" in faults else ServerError
            return cls(client_message(reason, job_dir, job.input_name, input_path))
        return InputError(client_message(reason, job_dir, job.input_name, input_path))

    return error


def job_outcome(job: Job, env: JobEnv, res: Any, predictor: Any, input_path: str | Path) -> JobOutcome:
    """The :class:`JobOutcome` of a segmented job: its outputs (paths relative to the job folder, plus
    ``predictions``) and the result clients see."""
    from resunet.io.hashing import sha256_file

    job_dir = env.job_dir(job.id)
    rec = res.records[0]
    outputs = {k: {**v, "path": f"out/{v['path']}"} for k, v in (rec.get("outputs") or {}).items()}
    pj = job_dir / "out" / PREDICTIONS
    outputs["predictions"] = {"path": f"out/{PREDICTIONS}", "sha256": sha256_file(pj), "size_bytes": pj.stat().st_size}
    model = rec.get("model") or {}
    result = {
        "volumes_ml": rec.get("volumes_ml"),
        "voxel_counts": rec.get("voxel_counts"),
        "model": {"name": model.get("name"), "sha256": model.get("sha256")},
        "settings": predictor.settings(),
        "seconds": rec.get("seconds"),
        "series_uid": rec.get("series_uid"),
        "grid": rec.get("grid"),
        "warnings": [client_message(w, job_dir, job.input_name, input_path) for w in rec.get("warnings") or []],
        **({"route": job.options["route"]} if job.options.get("route") else {}),
    }
    return JobOutcome(outputs=outputs, result=result)


def _segment(job: Job, env: JobEnv) -> JobOutcome:
    if not job.input_path:
        raise InputError(f"job {job.id} has no input to segment")
    return run_segmentation(job, env, job.input_path)


def client_message(message: str, job_dir: Path, input_name: str | None, input_path: str | Path | None = None) -> str:
    """``message`` with the server's paths replaced by the name the client gave the input."""
    text = str(message)
    if input_path:
        text = text.replace(str(input_path) + "/", "").replace(str(input_path), input_name or "input")
    for folder in (job_dir / "input", job_dir):
        text = text.replace(str(folder) + "/", "").replace(str(folder), input_name or "input")
    return text


register_kind("segment", _segment)
