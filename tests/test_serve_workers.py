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
        events = [e for (e,) in _query(db, "SELECT event FROM events WHERE job_id = ? ORDER BY seq", job_id)
                  if not e.startswith("memory")]  # a worker's reservations in the memory budget: not state changes
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


def _hold_and_sleep(folder: str, budget: int, ready) -> None:
    from pathlib import Path

    from resunet.serve.memory import MemoryBudget

    with MemoryBudget(Path(folder), "n1", budget).reserve("held", budget):
        ready.set()
        time.sleep(600)


def test_memory_budget_drops_the_reservation_of_a_killed_worker(tmp_path):
    import multiprocessing as mp

    from resunet.serve.memory import MemoryBudget

    budget = MemoryBudget(tmp_path / "memory", "n1", 1000)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_hold_and_sleep, args=(str(tmp_path / "memory"), 1000, ready))
    child.start()
    try:
        assert ready.wait(120)
        assert budget.in_use() == 1000  # the other process's reservation is seen here
        notes = []
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        with budget.reserve("mine", 600, note=lambda e, d: notes.append((e, d))) as waited:
            assert budget.in_use() == 600  # the dead process's 1000 bytes are gone, not leaked
        assert notes[0][0] == "memory" and notes[0][1]["in_use_before"] == 0 and notes[-1][0] == "memory-released"
        assert budget.in_use() == 0 and waited < 60
        assert oct((tmp_path / "memory").stat().st_mode & 0o777) == "0o700"
        assert oct(budget.path.stat().st_mode & 0o777) == "0o600"
    finally:
        if child.is_alive():
            child.kill()


@pytest.mark.slow
def test_workers_share_one_memory_budget(tmp_path):
    """--workers 2 with a budget that holds one example case but not two: the jobs' reservations never
    add up past it (the events the workers log), and a worker waited for the other's case to end."""
    from resunet.io.limits import GIB
    from resunet.io.precheck import check_study

    need = check_study(EXAMPLE_T1)
    budget = 1.5 * need
    model = make_tiny_model(tmp_path / "tiny.pt")
    state = tmp_path / "state"
    svc = ServiceProcess(state, model, "--no-tta", "--format", "nifti", "--workers", "2", "--worker-threads", "1",
                         "--node-name", "n1", "--max-memory-gb", f"{budget / GIB:.6f}", audit_db=tmp_path / "audit.sqlite")
    with svc:
        files = [state / "workers" / "n1" / f"w{k}.json" for k in (0, 1)]
        deadline = time.monotonic() + 300
        while not all(f.exists() for f in files):
            assert time.monotonic() < deadline, svc.log()
            time.sleep(0.2)
        data = EXAMPLE_T1.read_bytes()
        ids = []
        for _ in range(6):
            r = submit(svc.url, [("t1.nii.gz", data)])
            assert r.status_code == 202, r.text
            assert r.json()["options"]["memory_estimate_bytes"] == need
            ids.append(r.json()["id"])
        jobs = [wait_job(svc.url, i, timeout=600) for i in ids]
        assert [j["state"] for j in jobs] == ["done"] * 6, [j["error"] for j in jobs]
    rows = _query(state / "jobs.sqlite", "SELECT job_id, event, detail FROM events WHERE event LIKE 'memory%' ORDER BY at, seq")
    assert sorted(j for j, e, _ in rows if e == "memory") == sorted(ids)  # one reservation per job
    in_use, peak, waited = 0, 0, []
    for _job, event, detail in rows:
        d = json.loads(detail)
        if event == "memory":
            assert d["reserved"] == need and abs(d["budget"] - budget) < 1e-3 * budget  # (--max-memory-gb rounded)
            in_use += d["reserved"]
            waited.append(d["waited_s"])
        else:
            in_use -= d["released"]
        peak = max(peak, in_use)
    assert peak == need, (peak, need, budget)  # one example case at a time: two would be over the budget
    assert max(waited) > 0, waited  # and one worker did wait for the other's case
