"""Two real ``resunet serve`` nodes on one real PostgreSQL queue and one shared state folder.

Jobs are submitted to both nodes; node A is SIGKILLed while it runs one; node B takes A's jobs over
once their lease expires and every job ends ``done`` exactly once (one ``done`` event), with outputs
byte-identical from either node and one audit record per job in a chain that verifies. Also: a node
whose state folder is not the shared one is refused, tokens hold on every node at once, and a
PostgreSQL restart makes /readyz fail while jobs wait, then the node recovers by itself.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import httpx
import psycopg
import pytest

from serve_support import ServiceProcess, submit, wait_job
from test_app_support import EXAMPLE_T1, REPO, make_tiny_model

from resunet.cli import main as cli_main

LEASE = 6.0  # s: short, so the test waits seconds, not the default minute


def _node(state, model, url, name, *extra, audit=None):
    return ServiceProcess(state, model, "--no-tta", "--format", "nifti", "--queue", url, "--lease", str(LEASE),
                          "--node-name", name, "--sweep-interval", "5", *extra, audit_db=audit,
                          log_path=state.parent / f"{name}.log")


def _rows(url: str, sql: str, *params):
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def _auth(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.slow
def test_two_nodes_share_one_queue_and_a_killed_nodes_jobs_finish_once_on_the_other(postgres, tmp_path):
    url = postgres.create_database()
    model = make_tiny_model(tmp_path / "tiny.pt")
    state = tmp_path / "state"  # the folder every node mounts
    token_cmd = ["serve", "--queue", url, "--state-dir", str(state)]
    token = _new_token(url, state, "pacs")  # written to the database, not to a tokens.json
    assert _rows(url, "SELECT name FROM resunet_tokens") == [("pacs",)] and not (state / "tokens.json").exists()
    a = _node(state, model, url, "node-a", "--require-token", audit=url)
    b = _node(state, model, url, "node-b", "--require-token", audit=url)
    a.start()
    b.start()
    try:
        for n in (a, b):
            assert httpx.get(n.url + "/v1/jobs", headers=_auth(token), timeout=60).status_code == 200
        data = EXAMPLE_T1.read_bytes()
        ids, via = [], {}
        for i in range(30):
            node = a if i % 2 == 0 else b
            r = submit(node.url, [("colin27_t1.nii.gz", data)], token=token)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
            via[r.json()["id"]] = node
        # SIGKILL node A while it runs a job
        deadline = time.monotonic() + 300
        running_on_a: list[str] = []
        while time.monotonic() < deadline and not running_on_a:
            running_on_a = [r[0] for r in _rows(url, "SELECT id FROM resunet_jobs WHERE state = 'running' AND node = 'node-a'")]
            if not running_on_a:
                time.sleep(0.05)
        assert running_on_a, "node A never ran a job"
        a.kill()
        killed_at = time.time()
        jobs = {i: wait_job(b.url, i, timeout=600, token=token) for i in ids}
        assert {j["state"] for j in jobs.values()} == {"done"}, [j["error"] for j in jobs.values() if j["state"] != "done"]

        done_events = _rows(url, "SELECT job_id, COUNT(*) FROM resunet_events WHERE event = 'done' GROUP BY job_id")
        assert sorted(done_events) == sorted((i, 1) for i in ids)  # every job done, none twice
        for jid in running_on_a:  # A's job: its lease expired, B claimed and finished it
            events = _rows(url, "SELECT event, detail, at FROM resunet_events WHERE job_id = %s ORDER BY seq", jid)
            kinds = [e[0] for e in events]
            assert "lease-expired" in kinds, kinds
            expired = [e for e in events if e[0] == "lease-expired"]
            assert expired[0][1] == "node-a"
            last_claim = [e for e in events if e[0] == "claimed"][-1]
            assert last_claim[1].endswith(" node-b")
            print(f"job {jid[:8]}: taken over {last_claim[2] - killed_at:.1f} s after the SIGKILL (lease {LEASE:g} s)")
        m = httpx.get(b.url + "/metrics", headers=_auth(token), timeout=60).text
        assert 'resunet_node_info{node="node-b"} 1.0' in m
        expiries = [float(line.split()[-1]) for line in m.splitlines() if line.startswith("resunet_lease_expiries_total")]
        assert expiries and expiries[0] >= 1
        assert 'resunet_queue_depth{state="done"} 30.0' in m

        # node A comes back under its name; outputs are the same bytes from either node
        a2 = _node(state, model, url, "node-a", "--require-token", audit=url).start()
        try:
            for jid in (ids[0], ids[1], running_on_a[0]):
                got = [httpx.get(f"{n.url}/v1/jobs/{jid}/outputs/mask", headers=_auth(token), timeout=60) for n in (a2, b)]
                assert [g.status_code for g in got] == [200, 200]
                assert got[0].content == got[1].content
                assert hashlib.sha256(got[0].content).hexdigest() == jobs[jid]["outputs"]["mask"]["sha256"]
            # a token revoked through one node's database is refused by every node at once
            assert cli_main([*token_cmd, "--remove-token", "pacs"]) == 0
            for n in (a2, b):
                assert httpx.get(n.url + "/v1/jobs", headers=_auth(token), timeout=60).status_code == 401
        finally:
            a2.stop()

        # one audit record per job, from both nodes, in one chain that verifies
        from resunet.reports.audit import read_runs, verify_log

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = [r for r in read_runs(url) if r["run_id"].startswith("serve-")]
            if len(runs) >= 30:
                break
            time.sleep(0.5)
        assert sorted(r["run_id"] for r in runs) == sorted(f"serve-{i}" for i in ids)
        assert verify_log(url) == []
        hosts = {r["provenance"]["job"]["id"] for r in runs}
        assert hosts == set(ids)
        res = subprocess.run([sys.executable, "-m", "resunet", "audit", "log", "--audit-db", url, "--last", "0"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and "hash chain intact" in res.stdout, res.stdout + res.stderr
    finally:
        for n in (a, b):
            n.stop()


def _new_token(url, state, name):
    """``resunet serve --add-token NAME --queue URL`` in a subprocess; the printed token."""
    res = subprocess.run([sys.executable, "-m", "resunet", "serve", "--queue", url, "--state-dir", str(state),
                          "--add-token", name], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def test_a_node_without_the_shared_state_folder_is_refused(postgres, tmp_path):
    url = postgres.create_database()
    model = make_tiny_model(tmp_path / "tiny.pt")
    shared = tmp_path / "shared"
    first = _node(shared, model, url, "node-a")
    first.start()
    first.stop()
    assert (shared / "cluster.json").is_file()

    def serve(state):
        return subprocess.run([sys.executable, "-m", "resunet", "serve", "--queue", url, "--state-dir", str(state),
                               "--model", str(model), "--port", "1", "--node-name", "node-x", "--no-audit"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)

    local = tmp_path / "local"  # a node that did not mount the shared folder: empty folder at another path
    res = serve(local)
    assert res.returncode == 2
    assert f"names the state folder {shared}, not {local}" in res.stderr and "Traceback" not in res.stderr
    # the same path, but not the shared filesystem (no cluster.json of this database)
    other = tmp_path / "other"
    other.mkdir()
    (shared / "cluster.json").rename(other / "cluster.json.bak")
    res = serve(shared)
    assert res.returncode == 2 and "has no cluster.json" in res.stderr, res.stderr
    # a folder that belongs to another database
    (other / "cluster.json.bak").rename(shared / "cluster.json")
    url2 = postgres.create_database()
    res = subprocess.run([sys.executable, "-m", "resunet", "serve", "--queue", url2, "--state-dir", str(shared),
                          "--model", str(model), "--port", "1", "--no-audit"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "belongs to another job database" in res.stderr, res.stderr
    res = subprocess.run([sys.executable, "-m", "resunet", "serve", "--queue", "postgresql://u:pw@127.0.0.1/db",
                          "--state-dir", str(shared)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "holds a password" in res.stderr and "pw@" not in res.stderr


@pytest.mark.slow
def test_database_restart_fails_readyz_jobs_wait_and_the_node_recovers(postgres, tmp_path):
    url = postgres.create_database()
    model = make_tiny_model(tmp_path / "tiny.pt")
    node = _node(tmp_path / "state", model, url, "node-a").start()
    try:
        data = EXAMPLE_T1.read_bytes()
        accepted = submit(node.url, [("t1.nii.gz", data)]).json()["id"]
        assert wait_job(node.url, accepted)["state"] == "done"
        postgres.stop()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                ready = httpx.get(node.url + "/readyz", timeout=60)
                if ready.status_code == 503:
                    break
                time.sleep(0.2)
            assert ready.status_code == 503 and "job database" in ready.json()["error"]
            r = submit(node.url, [("t1.nii.gz", data)])
            assert r.status_code == 503 and "Traceback" not in r.text  # not accepted: nothing to lose
            assert httpx.get(node.url + "/healthz", timeout=60).status_code == 200
        finally:
            postgres.start()
        deadline = time.monotonic() + 120
        while httpx.get(node.url + "/readyz", timeout=60).status_code != 200:
            assert time.monotonic() < deadline, node.log()
            time.sleep(0.2)
        again = submit(node.url, [("t1.nii.gz", data)])
        assert again.status_code == 202
        assert wait_job(node.url, again.json()["id"])["state"] == "done"
        assert httpx.get(f"{node.url}/v1/jobs/{accepted}", timeout=60).json()["state"] == "done"
        assert "Traceback" not in node.log()
    finally:
        node.stop()
