"""``resunet serve --workers N``: N worker processes, each with its own warm model, on the service's queue.

The HTTP process (uploads, polls, downloads, the retention sweep, leases) never runs a job itself;
:class:`WorkerPool` starts ``python -m resunet.serve.workers NAME DEVICE`` N times. Each worker opens the
same queue (the SQLite file, or the PostgreSQL database) and claims jobs as ``NODE/wK``, so:

- two workers never run the same job (the queue's claim is atomic in both databases);
- a worker that dies (SIGKILL, out of memory, a crash in a native library) is noticed by the pool within a
  second: the jobs claimed as ``NODE/wK`` go back to the queue (:meth:`requeue_node`), and the worker is
  started again (after 1 s, longer while it keeps dying at once); the claim token still makes "finished"
  happen once;
- ``--devices cuda:0,cuda:1`` gives worker K device K modulo the list (one worker per GPU, or two per
  GPU with ``--workers 4``); ``--worker-threads T`` pins each worker's torch/OpenMP threads.

A worker says it is warm by writing ``STATE/workers/NODE/wK.json`` (its pid, model and device); /readyz
answers 200 once one worker is warm. Worker metrics reach /metrics through prometheus_client's
multiprocess mode (:mod:`resunet.serve.metrics`). Written on :mod:`subprocess` rather than
:mod:`multiprocessing` so that a worker is a plain ``python -m`` process (its own interpreter, no state
forked from the HTTP process's threads) that the pool can watch, kill and restart by pid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("resunet.serve")

#: environment variable that carries the service's settings (JSON) to a worker process
CONFIG_ENV = "RESUNET_SERVE_WORKER_CONFIG"
_PATH_FIELDS = ("state_dir", "model", "routes", "queue_password_file")


def config_to_json(config: Any) -> str:
    d = dataclasses.asdict(config)
    return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()})


def config_from_json(text: str) -> Any:
    from resunet.serve.config import ServeConfig

    d = json.loads(text)
    for k in _PATH_FIELDS:
        if d.get(k) is not None:
            d[k] = Path(d[k])
    if isinstance(d.get("audit_db"), str):
        from resunet.pgdb import is_pg_url

        d["audit_db"] = d["audit_db"] if is_pg_url(d["audit_db"]) else Path(d["audit_db"])
    for k in ("formats", "allowed_aets", "devices"):
        if k in d:
            d[k] = tuple(d[k])
    return ServeConfig(**d)


class WorkerPool:
    """The worker processes of one service (node); :meth:`start`, then :meth:`stop` at shutdown."""

    def __init__(self, service: Any) -> None:
        self.service = service
        c = service.config
        self.folder = service.state_dir / "workers" / service.node
        self.metrics_dir = self.folder / "metrics"
        self.names = [f"{service.node}/w{k}" for k in range(c.workers)]
        devices = list(c.devices) or [c.device]
        self.devices = {n: devices[k % len(devices)] for k, n in enumerate(self.names)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {n: 0 for n in self.names}
        self._quick_deaths: dict[str, int] = {n: 0 for n in self.names}
        self._started_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def prepare(self) -> None:
        """Empty this node's worker folder (ready files and metric files of a previous run)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True, exist_ok=True)

    def ready_file(self, name: str) -> Path:
        return self.folder / f"{name.rsplit('/', 1)[1]}.json"

    def _spawn(self, name: str) -> None:
        c = self.service.config
        env = dict(os.environ, **{CONFIG_ENV: config_to_json(c), "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
                                  "PYTHONUNBUFFERED": "1"})
        if c.worker_threads:
            env.update(OMP_NUM_THREADS=str(c.worker_threads), MKL_NUM_THREADS=str(c.worker_threads))
        with_path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")) if p)
        env["PYTHONPATH"] = with_path  # the same resunet as this process, installed or not
        self.ready_file(name).unlink(missing_ok=True)
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "resunet.serve.workers", name, self.devices[name]],
                                            env=env, stdin=subprocess.DEVNULL)
        self._started_at[name] = time.monotonic()
        log.info("worker %s started (pid %d, device %s)", name, self.procs[name].pid, self.devices[name])

    def start(self) -> None:
        for name in self.names:
            self._spawn(name)
        self._thread = threading.Thread(target=self._watch, name="resunet-serve-workers", daemon=True)
        self._thread.start()

    def alive(self) -> int:
        return sum(p.poll() is None for p in self.procs.values())

    def warm(self) -> dict[str, Any] | None:
        """The ready record of a live worker whose model is warm (pid matching), or None."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                continue
            try:
                rec = json.loads(self.ready_file(name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if rec.get("pid") == proc.pid:
                return rec
        return None

    def _watch(self) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        while not self._stop.wait(0.5):
            for name, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None or self._stop.is_set():
                    continue
                mark_process_dead(proc.pid, str(self.metrics_dir))  # its live gauges leave /metrics
                try:
                    again = self.service.queue.requeue_node(name)
                except Exception as err:  # noqa: BLE001 - the database is away: its lease / the next start re-queues
                    log.error("worker %s died; cannot re-queue its job now: %s", name, err)
                    again = []
                quick = time.monotonic() - self._started_at.get(name, 0) < 30
                self._quick_deaths[name] = self._quick_deaths[name] + 1 if quick else 0
                delay = min(60.0, 2.0 ** self._quick_deaths[name])  # 2 s, 4 s, ... while it dies at once
                log.warning("worker %s (pid %d) exited with %s; re-queued %s; restarting in %.0f s", name, proc.pid, code,
                            ", ".join(again) if again else "no job", delay)
                self.restarts[name] += 1
                metrics = self.service.metrics
                if metrics is not None and hasattr(metrics, "worker_restarts"):
                    metrics.worker_restarts.labels(name).inc()
                if again:
                    self.service.wake()
                if self._stop.wait(delay):
                    return
                self._spawn(name)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every worker (a job being segmented is redone at the next start), SIGKILL after ``timeout``."""
        self._stop.set()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def worker_main(argv: list[str]) -> int:
    """``python -m resunet.serve.workers NAME DEVICE``: one worker process (started by :class:`WorkerPool`)."""
    from resunet.serve.app import install_access_log_redaction
    from resunet.serve.service import Service

    name, device = argv[0], argv[1]
    config = config_from_json(os.environ[CONFIG_ENV])
    config.device = device
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s: [{name}] %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    install_access_log_redaction()  # DICOM UIDs hashed in this process's log lines too
    if config.worker_threads:
        import torch

        torch.set_num_threads(config.worker_threads)
    service = Service(config).open_worker(name)

    def on_term(*_: Any) -> None:
        service._stop.set()
        service._wake.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    service.work()
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
