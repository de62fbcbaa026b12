"""``resunet serve --workers 2``: two real worker processes on one SQLite queue; one is SIGKILLed mid-job,
restarted by the service, its job re-queued and finished once; the HTTP side answers throughout.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import httpx
import nibabel as nib
import numpy as np
import pytest

from serve_support import ServiceProcess, submit, wait_job
from test_app_support import EXAMPLE_T1, make_tiny_model


def _query(db, sql: str, *params):
    """Rows of ``sql`` on the service's queue: the SQLite file, or the PostgreSQL URL (tables resunet_*)."""
    if isinstance(db, str):
        import psycopg

        sql = sql.replace("FROM jobs", "FROM resunet_jobs").replace("FROM events", "FROM resunet_events").replace("?", "%s")
        with psycopg.connect(db, autocommit=True) as conn:
            return [tuple(r) for r in conn.execute(sql, params).fetchall()]
    with sqlite3.connect(db, timeout=30) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.mark.slow
@pytest.mark.parametrize("queue", ["sqlite", "postgresql"])
def test_two_worker_processes_and_a_killed_worker(tmp_path, request, queue):
    model = make_tiny_model(tmp_path / "tiny.pt")
    state = tmp_path / "state"
    if queue == "sqlite":
        db = state / "jobs.sqlite"
        audit = tmp_path / "audit.sqlite"
        extra: tuple[str, ...] = ()
    else:
        db = audit = request.getfixturevalue("postgres").create_database()
        extra = ("--queue", db, "--lease", "30")  # the worker's job is re-queued at once, not after the lease
    svc = ServiceProcess(state, model, "--no-tta", "--format", "nifti", "--workers", "2", "--worker-threads", "1",
                         "--node-name", "n1", *extra, audit_db=audit)
    with svc:
        m = httpx.get(svc.url + "/metrics", timeout=60).text
        assert "resunet_workers_alive 2.0" in m
        files = [state / "workers" / "n1" / f"w{k}.json" for k in (0, 1)]
        deadline = time.monotonic() + 300
        while not all(f.exists() for f in files):  # /readyz: one warm worker; wait for the second
            assert time.monotonic() < deadline, svc.log()
            time.sleep(0.2)
        ready = {json.loads(f.read_text())["pid"] for f in files}
        assert len(ready) == 2 and svc.proc.pid not in ready  # two processes, neither the HTTP one
        data = EXAMPLE_T1.read_bytes()
        ids = []
        for _ in range(8):
            r = submit(svc.url, [("t1.nii.gz", data)])
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        deadline = time.monotonic() + 300
        victim = None
        while time.monotonic() < deadline and victim is None:
            rows = [r for r in _query(db, "SELECT id, node FROM jobs WHERE state = 'running'") if r[1] and r[1].startswith("n1/w")]
            if rows:
                victim = rows[0]
            else:
                time.sleep(0.05)
        assert victim is not None, svc.log()
        job_id, worker = victim
        pid = json.loads((state / "workers" / "n1" / f"{worker.split('/')[1]}.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        assert httpx.get(svc.url + "/healthz", timeout=60).status_code == 200  # the HTTP side does not wait on workers
        jobs = [wait_job(svc.url, i, timeout=600) for i in ids]
        assert [j["state"] for j in jobs] == ["done"] * 8, [j["error"] for j in jobs]
        done = _query(db, "SELECT job_id, COUNT(*) FROM events WHERE event = 'done' GROUP BY job_id")
        events = [e for (e,) in _query(db, "SELECT event FROM events WHERE job_id = ? ORDER BY seq", job_id)]
        nodes = {n for (n,) in _query(db, "SELECT DISTINCT node FROM jobs")}
        assert sorted(done) == sorted((i, 1) for i in ids)  # every job done once
        assert events[:3] == ["queued", "claimed", "requeued"] and events[-1] == "done", events
        # both workers took jobs: the victim's worker took the killed one; whichever finished the rest (under
        # load the restarted worker may still be warming up while the other drains the queue)
        assert nodes <= {"n1/w0", "n1/w1"} and len(nodes | {worker}) == 2, (nodes, worker)
        masks = []
        for j in (jobs[0], next(j for j in jobs if j["id"] == job_id)):
            r = httpx.get(f"{svc.url}/v1/jobs/{j['id']}/outputs/mask", timeout=60)
            masks.append(np.asarray(nib.Nifti1Image.from_bytes(_gunzip(r.content)).dataobj))
        assert np.array_equal(masks[0], masks[1])  # the redone job gives the same mask
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            m = httpx.get(svc.url + "/metrics", timeout=60).text
            if "resunet_workers_alive 2.0" in m:
                break
            time.sleep(0.5)
        assert "resunet_workers_alive 2.0" in m  # restarted
        assert f'resunet_worker_restarts_total{{worker="{worker}"}} 1.0' in m
        finished = {line.split()[0]: float(line.split()[-1]) for line in m.splitlines()
                    if line.startswith("resunet_worker_jobs_finished_total{")}
        assert sum(finished.values()) == 8 and 1 <= len(finished) <= 2, finished
        assert "Traceback" not in svc.log()
    from resunet.reports.audit import read_runs, verify_log

    runs = [r for r in read_runs(audit) if r["run_id"].startswith("serve-")]
    assert sorted(r["run_id"] for r in runs) == sorted(f"serve-{i}" for i in ids) and verify_log(audit) == []


def _gunzip(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def test_worker_settings_are_checked():
    from resunet.errors import ConfigError
    from resunet.serve.config import ServeConfig

    with pytest.raises(ConfigError, match="--workers"):
        ServeConfig(workers=0)
    assert ServeConfig(devices=("cuda:0", "cuda:1")).workers == 2
    from resunet.serve.workers import config_from_json, config_to_json

    c = ServeConfig(workers=3, devices=("cpu",), formats=("nifti",), state_dir="/tmp/x", audit_db=False)
    back = config_from_json(config_to_json(c))
    assert back == c
