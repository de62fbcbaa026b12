"""Archive-scale batch segmentation on a Ray cluster: the engine behind ``resunet predict --ray``.

The driver (the ``resunet predict`` process) discovers the cases, checks their headers, and keeps
the journal, ``predictions.json``/``.csv`` and the audit record exactly as the local batch does
(:func:`resunet.inference.batch.run_batch` with ``engine=RayEngine(...)``). Each case is one Ray
task that runs the local batch's per-case step (:func:`~resunet.inference.batch.load_case` +
:func:`~resunet.inference.batch.segment_case`) on a worker process of some node; the worker keeps
its :class:`~resunet.inference.predictor.Predictor` warm between cases (a per-process cache), so
every worker loads the model once.

Why tasks and not actors: Ray retries a task whose worker or node died on any other node that has
the resources (``max_retries``), so a dead node's cases move on by themselves. An actor is pinned:
its restart waits for a free slot and its queued calls wait with it, which on a full cluster is
forever. Tasks plus a warm per-process model give what an actor pool gives (model loaded once per
slot) without that. Placement, resources and retries are Ray's; the driver only bounds how many
cases are in flight (``actors``).

Failure rules:

- a case that fails inside the step (bad input, refused geometry, ...) is a ``failed`` record with
  its reason, as in the local batch; Ray does not retry it;
- a worker process or node lost mid-case: Ray runs the case again elsewhere, up to ``max_retries``
  times; after that the case is recorded ``failed`` with the reason and its outputs removed;
- outputs are written atomically (temp + rename) by whichever attempt finishes; the driver records
  each case once. SEG/RTSTRUCT/SR UIDs are seeded from the run id and the case (unless the caller
  seeds them), so a retried case writes the same instances as the attempt that died.
- inputs, the model and ``--out`` must be on a filesystem every node mounts; :meth:`RayEngine.check`
  runs a probe on every node and refuses to start when one of them cannot read an input or write
  the output folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from resunet.errors import ConfigError, ResunetError
from resunet.inference.batch import BatchOptions, CaseContext, Outcome, _output_paths, load_case, node_name, segment_case
from resunet.inference.cases import Case

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'resunet[ray]'"
#: inputs checked for readability on every node before the run (evenly spread over the case list)
PROBE_INPUTS = 100
PROBE_TIMEOUT_S = 120.0
#: tries of the start check when Ray cannot place it on a node that is starting or stopping
PROBE_ATTEMPTS = 3
NODES_POLL_S = 5.0


def import_ray() -> Any:
    """The ``ray`` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


@dataclass
class RayOptions:
    """How ``resunet predict --ray`` uses the cluster.

    Args:
        address: ``auto`` (``$RAY_ADDRESS`` or the cluster this machine belongs to), ``HOST:PORT`` of
            the head's GCS, ``ray://HOST:10001`` (Ray client), or ``local`` (start a private one-machine
            instance for this run).
        actors: cases in flight at once = warm workers (each holds the model); None: as many as the
            cluster's CPUs (or GPUs) hold at the per-worker resources below.
        cpus_per_actor: CPUs Ray reserves per worker (also its torch threads).
        gpus_per_actor: GPUs per worker (0: CPU inference; fractions share a GPU).
        max_retries: times Ray re-runs a case whose worker or node died before it is recorded failed.
    """

    address: str = "auto"
    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--ray-actors must be >= 1, got {self.actors}")
        if self.cpus_per_actor <= 0:
            raise ConfigError(f"--ray-cpus-per-actor must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor < 0:
            raise ConfigError(f"--ray-gpus-per-actor must be >= 0, got {self.gpus_per_actor}")
        if self.max_retries < 0:
            raise ConfigError(f"--ray-retries must be >= 0, got {self.max_retries}")


@dataclass
class PredictorSpec:
    """How a worker builds its Predictor: ``Predictor(model, **kwargs)`` with ``threads`` torch threads."""

    model: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    threads: int = 1
    umask: int | None = None  # the driver's: outputs get the permissions a local run gives them

    def key(self) -> str:
        return json.dumps([self.model, self.kwargs, self.threads], sort_keys=True, default=repr)


class CaseError(Exception):
    """A case that could not run on its worker for a reason the driver records as is (not retried)."""


# -- what runs on the workers --------------------------------------------------------------------------
_WARM: dict[str, Any] = {}  # per worker process: the predictor of the current spec


def _warm_predictor(spec: PredictorSpec) -> Any:
    key = spec.key()
    if key not in _WARM:
        import torch

        from resunet.inference.predictor import Predictor

        _WARM.clear()
        torch.set_num_threads(max(1, spec.threads))
        _WARM[key] = Predictor(spec.model, **spec.kwargs)
    return _WARM[key]


def _ray_node() -> str:
    """This worker's node: host name and the start of the Ray node id (several nodes may share a host)."""
    import ray

    with contextlib.suppress(Exception):
        return f"{node_name()} (ray node {ray.get_runtime_context().get_node_id()[:12]})"
    return node_name()


def _attempt() -> int | None:
    """1 for a case's first run, 2 for Ray's first retry, ... (Ray's private API; None where it is gone)."""
    with contextlib.suppress(Exception):
        import ray

        return int(ray._private.worker.global_worker.core_worker.get_current_task_attempt_number()) + 1
    return None


def run_case(spec: PredictorSpec, opts: BatchOptions, ctx: CaseContext, case: Case, prev: dict[str, Any] | None,
             refused: str | None) -> dict[str, Any]:
    """One case on a worker: the local batch's step with this worker's warm predictor."""
    if spec.umask is not None:
        os.umask(spec.umask)
    if refused is not None:
        opts = dataclasses.replace(opts, refused={case.case_id: refused})
    item = load_case(case, opts, prev, ctx)
    if item.skip_record is not None:
        return {"kind": "skip", "record": item.skip_record, "settings": None}
    try:
        predictor = _warm_predictor(spec)
    except ResunetError as err:  # e.g. the model file differs or is unreadable on this node
        raise CaseError(f"node {_ray_node()} could not load the model: {err}") from None
    if predictor.model.sha256 != ctx.model_sha256 and item.error is None:
        item.error = (f"the model this node loaded ({spec.model}) has SHA-256 {predictor.model.sha256[:12]}..., not the "
                      f"driver's {ctx.model_sha256[:12]}...: every node must see the same model file")
    rec = segment_case(item, predictor, opts, ctx)
    rec["node"] = _ray_node()
    rec["attempt"] = _attempt()
    return {"kind": "done", "record": rec, "settings": predictor.settings()}


def probe_node(paths: Sequence[str], out_dir: str, models: Sequence[str]) -> dict[str, Any]:
    """What one node sees: the paths it cannot read and whether it can write ``out_dir``."""
    import resunet

    problems: list[str] = []
    for p in list(models) + list(paths):
        if not os.path.exists(p):
            problems.append(f"cannot see {p}")
        elif not os.access(p, os.R_OK):
            problems.append(f"cannot read {p}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".resunet-ray-check.", dir=out_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        problems.append(f"cannot write {out_dir} ({err.strerror or err})")
    return {"node": _ray_node(), "problems": problems, "resunet": resunet.__version__,
            "python": sys.version.split()[0]}


# -- the driver --------------------------------------------------------------------------------------
class RayEngine:
    """Runs a batch's cases as Ray tasks; pass it to :func:`resunet.inference.batch.run_batch` as ``engine``.

    Use as a context manager (connects on enter, disconnects on exit; ``local`` also stops its instance).
    """

    def __init__(self, spec: PredictorSpec, options: RayOptions) -> None:
        self.spec = spec
        self.options = options
        self.ray: Any = None
        self.limit = 1
        self.nodes_alive = 0
        self.retried = 0  # cases that needed more than one attempt (from the records)

    # connection
    def __enter__(self) -> "RayEngine":
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def connect(self) -> None:
        ray = self.ray = import_ray()
        o = self.options
        kw: dict[str, Any] = dict(namespace="resunet", log_to_driver=False, logging_level=logging.WARNING,
                                  include_dashboard=False)
        _check_reachable(o.address)
        try:
            if o.address == "local":
                n = o.actors or max(1, os.cpu_count() or 1)
                ray.init(num_cpus=max(1, int(round(n * o.cpus_per_actor))), num_gpus=None if o.gpus_per_actor else 0,
                         **kw)
            else:
                kw.pop("include_dashboard")
                ray.init(address=o.address, **kw)
        except ConnectionError as err:
            raise ConfigError(f"--ray {o.address}: no Ray cluster found there ({str(err).splitlines()[0]}); start one "
                              "with `ray start --head` (workers: `ray start --address HEAD:6379`), give its address "
                              "(--ray HEAD:6379), or use --ray local for this machine alone") from None
        except Exception as err:  # e.g. a version or token mismatch with the cluster
            raise ConfigError(f"--ray {o.address}: cannot join the Ray cluster ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
        res = ray.cluster_resources()
        if o.gpus_per_actor:
            capacity = int(res.get("GPU", 0) // o.gpus_per_actor)
            if capacity < 1:
                self.shutdown()
                raise ConfigError(f"--ray-gpus-per-actor {o.gpus_per_actor}: the cluster at {o.address} has "
                                  f"{res.get('GPU', 0):g} GPU(s); use --ray-gpus-per-actor 0 for CPU workers")
        else:
            capacity = int(res.get("CPU", 0) // o.cpus_per_actor)
        self.limit = o.actors or max(1, capacity)
        self.nodes_alive = self._count_nodes()
        log.info("ray: %d node(s), %s; %d case(s) in flight", self.nodes_alive, res, self.limit)

    def shutdown(self) -> None:
        if self.ray is not None and self.ray.is_initialized():
            self.ray.shutdown()

    def _count_nodes(self) -> int:
        return sum(1 for n in self.ray.nodes() if n.get("Alive"))

    # the start check
    def check(self, cases: Sequence[Case], out_dir: Path) -> list[dict[str, Any]]:
        """Run :func:`probe_node` on every alive node; raise ConfigError naming the first node that cannot
        read the inputs (up to :data:`PROBE_INPUTS` of them, spread over the list) or the model, or write
        ``out_dir``, or runs another resunet version. Returns the probes."""
        import resunet

        out_dir.mkdir(parents=True, exist_ok=True)
        step = max(1, len(cases) // PROBE_INPUTS)
        paths = sorted({str(Path(c.path).resolve()) for c in list(cases)[::step]} |
                       ({str(Path(cases[-1].path).resolve())} if cases else set()))
        models = [str(Path(m).resolve()) for m in _model_list(self.spec.model) if Path(m).exists()]
        probe = self.ray.remote(probe_node)
        for attempt in range(PROBE_ATTEMPTS):
            unschedulable = []
            probes = self._probe_alive_nodes(probe, paths, out_dir, models, unschedulable)
            if not unschedulable:
                break
            # a node that was starting or stopping as the check went out: ask the cluster again which are alive
            # (Ray answers TaskUnschedulableError for a hard affinity to a node it cannot place on right now)
            if attempt == PROBE_ATTEMPTS - 1:
                raise ConfigError(f"--ray: the start check could not be placed on node {unschedulable[0]} "
                                  f"({PROBE_ATTEMPTS} tries); check `ray status`")
            time.sleep(2.0)
        for p in probes:
            if p["problems"]:
                raise ConfigError(f"--ray: node {p['node']} {p['problems'][0]}"
                                  + (f" (and {len(p['problems']) - 1} more)" if len(p["problems"]) > 1 else "")
                                  + "; inputs, the model and --out must be on a filesystem every node mounts at the "
                                  "same path (docs/inference.md, Running on a cluster)")
            if p["resunet"] != resunet.__version__:
                raise ConfigError(f"--ray: node {p['node']} runs resunet {p['resunet']}, this machine "
                                  f"{resunet.__version__}; install the same version on every node")
        return probes

    def _probe_alive_nodes(self, probe: Any, paths: list[str], out_dir: Path, models: list[str],
                           unschedulable: list[str]) -> list[dict[str, Any]]:
        """One probe per alive node; nodes whose probe Ray could not place are added to ``unschedulable``."""
        ray = self.ray
        from ray.exceptions import TaskUnschedulableError
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        refs = {}
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
            refs[probe.options(num_cpus=0, scheduling_strategy=strategy).remote(paths, str(out_dir.resolve()), models)] = node
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        if late:
            node = refs[late[0]]
            raise ConfigError(f"--ray: node {node.get('NodeManagerAddress')} did not answer the start check within "
                              f"{PROBE_TIMEOUT_S:.0f} s; check `ray status`")
        probes = []
        for ref in ready:
            try:
                probes.append(ray.get(ref))
            except TaskUnschedulableError:
                unschedulable.append(str(refs[ref].get("NodeManagerAddress")))
            except Exception as err:
                raise ConfigError(f"--ray: the start check failed on node {refs[ref].get('NodeManagerAddress')} "
                                  f"({type(err).__name__}); is resunet installed there?") from None
        return probes

    # the run
    def outcomes(self, mine: Sequence[Case], opts: BatchOptions, previous: dict[str, dict[str, Any]],
                 ctx: CaseContext, bar: Any) -> Iterator[Outcome]:
        """Submit the cases (at most :attr:`limit` in flight) and yield them as they finish."""
        ray = self.ray
        o = self.options
        remote_opts = dataclasses.replace(
            opts, refused={}, progress=False, audit_db=False,
            out_dir=opts.out_dir.resolve(),  # the workers' working folder is not the driver's
            # a retried case writes the same SEG/RTSTRUCT/SR instances as the attempt that died
            uid_seed=opts.uid_seed if opts.uid_seed is not None else f"ray run {ctx.run_id}",
        )
        task = ray.remote(max_calls=0)(run_case).options(  # max_calls=0: GPU workers stay warm too
            num_cpus=o.cpus_per_actor, num_gpus=o.gpus_per_actor, max_retries=o.max_retries, retry_exceptions=False,
            name="resunet-case",
        )
        spec_ref, opts_ref = ray.put(self.spec), ray.put(remote_opts)
        queue = list(mine)
        pending: dict[Any, Case] = {}
        started = time.monotonic()
        done = failed = 0
        last_nodes = 0.0
        def fill() -> None:
            while queue and len(pending) < self.limit:
                case = queue.pop(0)
                ref = task.remote(spec_ref, opts_ref, ctx, case, previous.get(case.case_id), opts.refused.get(case.case_id))
                pending[ref] = case

        while queue or pending:
            fill()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            finished = [(ref, pending.pop(ref)) for ref in ready]
            fill()  # the freed slots get their next case before the driver writes records (workers never wait on it)
            for ref, case in finished:
                out = self._result(ref, case, opts, ctx)
                rec = out["record"]
                if out["kind"] == "done":
                    done += rec.get("status") == "ok"
                    failed += rec.get("status") != "ok"
                    if (rec.get("attempt") or 1) > 1:
                        self.retried += 1
                yield case, out["kind"], rec, out.get("settings")
            if time.monotonic() - last_nodes >= NODES_POLL_S:
                with contextlib.suppress(Exception):
                    self.nodes_alive = self._count_nodes()
                last_nodes = time.monotonic()
            minutes = (time.monotonic() - started) / 60
            rate = (done + failed) / minutes if minutes > 0 else 0.0
            bar.status(f"{done} done, {failed} failed, {len(pending)} running, {rate:.1f} cases/min, "
                       f"{self.nodes_alive} node(s) alive")
        from resunet.io.atomic import remove_stale_temps

        remove_stale_temps(opts.out_dir)  # temps of attempts that died (their cases were redone elsewhere)

    def _result(self, ref: Any, case: Case, opts: BatchOptions, ctx: CaseContext) -> dict[str, Any]:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, CaseError):
                reason = str(err.cause)
            else:  # the step catches a case's errors: this is a bug
                reason = f"internal error on the Ray worker ({type(err.cause).__name__}: {err.cause})"
        except ray.exceptions.RayError as err:  # the worker or its node died on every attempt
            reason = (f"the Ray worker running it was lost {self.options.max_retries + 1} time(s) "
                      f"({type(err).__name__}: a node died, or the process was killed, e.g. out of memory); "
                      "re-run the command to try it again, or raise --ray-retries")
        self._remove_outputs(case, opts, ctx)
        from resunet.reports.provenance import utc_now

        rec = {"case": case.case_id, "input": {"path": str(case.path), "kind": case.kind}, "status": "failed",
               "reason": reason, "outputs": {}, "seconds": None, "device": None,
               "model": {"name": ctx.model_name, "sha256": ctx.model_sha256}, "run_id": ctx.run_id,
               "finished_utc": utc_now(), "node": None, "attempt": self.options.max_retries + 1}
        if ctx.members:
            rec["model"]["members"] = list(ctx.members)
        return {"kind": "done", "record": rec, "settings": None}

    @staticmethod
    def _remove_outputs(case: Case, opts: BatchOptions, ctx: CaseContext) -> None:
        """A case given up on leaves nothing behind: the outputs a dead attempt may have finished, and temps."""
        from resunet.io.atomic import remove_stale_temps

        for path in _output_paths(case, opts, ctx.fg_labels).values():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        remove_stale_temps(opts.out_dir, [case.case_id])


def _check_reachable(address: str) -> None:
    """For ``HOST:PORT`` (and ``ray://HOST:PORT``): refuse at once when nothing listens there (Ray's own
    client would retry for minutes, printing a warning every few seconds)."""
    import socket

    target = address.split("://", 1)[-1]
    if address in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        port_n = int(port)
    except ValueError:
        raise ConfigError(f"--ray {address}: expected auto, local, HOST:PORT or ray://HOST:PORT") from None
    try:
        socket.create_connection((host.strip("[]"), port_n), timeout=10).close()
    except OSError as err:
        raise ConfigError(f"--ray {address}: nothing answers there ({err.strerror or err}); start the head with "
                          f"`ray start --head --port {port_n}` or check the address") from None


def _model_list(model: Any) -> list[str]:
    if isinstance(model, (list, tuple)):
        return [str(m) for m in model]
    return [str(model)]
