"""Prometheus metrics of the service (prometheus-client), on ``GET /metrics``.

Names (all prefixed ``resunet_``):

- ``resunet_http_requests_total{method,route,status}``: requests answered;
- ``resunet_http_request_duration_seconds{method,route}``: latency histogram, s;
- ``resunet_queue_depth{state}``: jobs per state (queued, running, done, failed), read from the queue
  database at scrape time; ``resunet_queue_up``: 0 when that database did not answer the scrape;
- ``resunet_jobs_finished_total{outcome}`` (done/failed) and ``resunet_job_failures_total``;
- ``resunet_job_duration_seconds``: claim-to-finish time of a job, s;
- ``resunet_model_load_seconds``: time to load and warm up the model at start-up, s;
- ``resunet_model_ready``: 1 once the model is loaded;
- ``resunet_lease_expiries_total``: jobs this node re-queued because their node stopped renewing its lease
  (taken over from a dead node; PostgreSQL queue only);
- ``resunet_node_info{node}``: 1, naming the node (``--node-name``) whose metrics these are; with
  several nodes on one queue, ``resunet_queue_depth`` is the shared queue's and the counters are this node's;
- the standard ``process_*`` metrics (resident memory, CPU seconds, open files).

With ``--workers N`` the jobs run in worker processes, whose metrics carry a ``worker`` label
(``NODE/wK``) and reach ``/metrics`` through prometheus_client's multiprocess mode (each worker writes
its values to files under ``STATE/workers/NODE/metrics``; the HTTP process reads them at scrape time):

- ``resunet_worker_jobs_finished_total{worker,outcome}``, ``resunet_worker_job_failures_total{worker}``,
  ``resunet_worker_job_duration_seconds{worker}``, ``resunet_worker_model_ready{worker}`` and
  ``resunet_worker_model_load_seconds{worker}`` (live workers only);
- ``resunet_worker_restarts_total{worker}``: worker processes that died and were restarted (their job
  re-queued), and ``resunet_workers_alive``.

Each service has its own registry, so tests can run several in one process.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Latency buckets, s: from a health check (ms) to a large study on CPU (minutes).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _QueueCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from resunet.errors import ResunetError

        try:
            counts = self._counts()
        except ResunetError:  # the queue's database is away (PostgreSQL restarting): no depth this scrape
            counts = {}
        up = GaugeMetricFamily("resunet_queue_up", "1 when the queue database answered this scrape")
        up.add_metric([], 1 if counts else 0)
        yield up
        g = GaugeMetricFamily("resunet_queue_depth", "Jobs in the queue database per state", labels=["state"])
        for state, n in counts.items():
            g.add_metric([state], n)
        yield g


class _AliveCollector(Collector):
    def __init__(self, alive: Callable[[], int]) -> None:
        self._alive = alive

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("resunet_workers_alive", "Worker processes running now")
        g.add_metric([], self._alive())
        yield g


class _Bound:
    """A labelled metric with the worker label filled in: ``labels(*rest)``, or ``inc/observe/set`` directly."""

    def __init__(self, metric: Any, worker: str) -> None:
        self._metric, self._worker = metric, worker

    def labels(self, *rest: str) -> Any:
        return self._metric.labels(self._worker, *rest)

    def __getattr__(self, name: str) -> Any:  # inc, observe, set on the worker's child
        return getattr(self._metric.labels(self._worker), name)


class WorkerMetrics:
    """The job metrics of one worker process (``--workers N``), the same attributes :class:`Metrics` offers
    the worker loop. Run with ``PROMETHEUS_MULTIPROC_DIR`` set (the pool does), the values go to files
    the HTTP process exports; the registry here is never rendered."""

    def __init__(self, worker: str) -> None:
        r = CollectorRegistry()
        self.jobs_finished = _Bound(Counter("resunet_worker_jobs_finished", "Jobs finished by a worker process, by outcome",
                                            ["worker", "outcome"], registry=r), worker)
        self.job_failures = _Bound(Counter("resunet_worker_job_failures", "Jobs that failed in a worker process",
                                           ["worker"], registry=r), worker)
        self.job_duration = _Bound(Histogram("resunet_worker_job_duration_seconds", "Job run time in a worker process, s",
                                             ["worker"], buckets=BUCKETS, registry=r), worker)
        self.model_load = _Bound(Gauge("resunet_worker_model_load_seconds", "Time to load and warm the model, s", ["worker"],
                                       registry=r, multiprocess_mode="livemax"), worker)
        self.model_ready = _Bound(Gauge("resunet_worker_model_ready", "1 once the worker's model is warm", ["worker"],
                                        registry=r, multiprocess_mode="livemax"), worker)
        self.lease_expiries = _Bound(Counter("resunet_worker_lease_expiries", "Jobs re-queued by a worker (unused)",
                                             ["worker"], registry=r), worker)


class Metrics:
    """The service's metrics; ``counts`` returns jobs per state (JobQueue.counts)."""

    def __init__(self, counts: Callable[[], dict[str, int]], node: str = "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("resunet_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r)
        self.latency = Histogram("resunet_http_request_duration_seconds", "HTTP request latency, s",
                                 ["method", "route"], buckets=BUCKETS, registry=r)
        self.jobs_finished = Counter("resunet_jobs_finished", "Jobs finished, by outcome", ["outcome"], registry=r)
        self.job_failures = Counter("resunet_job_failures", "Jobs that failed", registry=r)
        self.job_duration = Histogram("resunet_job_duration_seconds", "Job run time (claim to finish), s",
                                      buckets=BUCKETS, registry=r)
        self.model_load = Gauge("resunet_model_load_seconds", "Time to load and warm up the model, s", registry=r)
        self.model_ready = Gauge("resunet_model_ready", "1 once the model is loaded and warm", registry=r)
        self.lease_expiries = Counter("resunet_lease_expiries", "Jobs re-queued after their node's lease expired",
                                      registry=r)
        Gauge("resunet_node_info", "This node's name", ["node"], registry=r).labels(node or "").set(1)
        r.register(_QueueCollector(counts))
        ProcessCollector(registry=r)

    def add_workers(self, folder: str, alive: Callable[[], int]) -> None:
        """Export the worker processes' metrics (multiprocess files in ``folder``) and the pool's own."""
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(self.registry, path=folder)
        self.worker_restarts = Counter("resunet_worker_restarts", "Worker processes restarted after they died",
                                       ["worker"], registry=self.registry)
        self.registry.register(_AliveCollector(alive))

    def render(self) -> bytes:
        """The exposition text for ``GET /metrics``."""
        return generate_latest(self.registry)
