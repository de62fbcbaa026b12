"""The JobQueue contract on both databases (a real SQLite file, a real PostgreSQL server), and what the
shared PostgreSQL queue adds: leases taken over from a dead node, tokens and the audit chain shared by
every node, a database restart survived, the state-folder check.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest

from resunet.errors import ConfigError, InputError, ServerError
from resunet.serve.queue import JobQueue


@pytest.fixture(params=["sqlite", "postgresql"])
def make_queue(request, tmp_path):
    """``make_queue(node=...)``: a new queue object on one database (each call: its own connections)."""
    if request.param == "sqlite":
        db = tmp_path / "jobs.sqlite"
        return lambda node="a", lease_s=60.0: JobQueue(db, node=node)
    from resunet.serve.queue_pg import PgJobQueue

    url = request.getfixturevalue("postgres").create_database()
    return lambda node="a", lease_s=60.0: PgJobQueue(url, node=node, lease_s=lease_s)


def _events(q, job_id):
    return [e["event"] for e in q.events(job_id)]


def test_concurrent_claims_take_every_job_exactly_once(make_queue):
    q = make_queue()
    ids = [q.enqueue("segment", input_name=f"case{i}", options={"formats": ["nifti"]}).id for i in range(40)]
    claimed: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            mine = make_queue(node=f"n{n}")  # its own connections, as another node would have
            while (job := mine.claim()) is not None:
                assert mine.finish(job, {"mask": {"path": "out/m.nii.gz", "sha256": job.id}})
                with lock:
                    claimed.append(job.id)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(claimed) == sorted(ids)
    assert q.counts() == {"queued": 0, "running": 0, "done": 40, "failed": 0}
    done = [e["job_id"] for e in q.events() if e["event"] == "done"]
    assert sorted(done) == sorted(ids)  # one done event per job
    assert [j.id for j in q.jobs()][::-1] == ids  # newest first


def test_stale_claim_cannot_finish_and_listings(make_queue):
    q = make_queue()
    a = q.enqueue("segment", input_name="a", submitted_by="alice")
    first = q.claim()
    assert first.id == a.id and first.state == "running" and first.attempts == 1
    assert q.renew(first)
    assert q.requeue_running() == [a.id]
    assert not q.renew(first)  # the claim is gone
    second = q.claim()
    assert second.attempts == 2 and second.claim != first.claim
    assert not q.finish(first, {"mask": {"path": "x", "sha256": "0"}})
    assert not q.fail(first, "late failure")
    assert q.finish(second, {"mask": {"path": "out/a.nii.gz", "sha256": "ab"}}, {"volumes_ml": {"brain": 1.0}})
    assert not q.finish(second, {"mask": {"path": "out/a.nii.gz", "sha256": "ab"}})
    done = q.get(a.id)
    assert done.state == "done" and done.outputs["mask"]["sha256"] == "ab" and done.result == {"volumes_ml": {"brain": 1.0}}
    assert done.claim is None and done.submitted_by == "alice"
    assert _events(q, a.id) == ["queued", "claimed", "requeued", "claimed", "done"]
    assert [j.id for j in q.unaudited()] == [a.id]
    q.mark_audited(a.id, "serve-" + a.id)
    assert q.unaudited() == [] and q.get(a.id).audit_run_id == "serve-" + a.id
    assert q.finished_before(time.time() + 1)[0].id == a.id and q.finished_before(0) == []
    q.mark_purged(a.id)
    assert q.get(a.id).purged_at is not None and q.finished_before(time.time() + 1) == []
    assert q.known_ids() == {a.id}


def test_fail_retry_and_erase(make_queue):
    q = make_queue()
    a = q.enqueue("segment", input_name="a")
    b = q.enqueue("segment", input_name="b")
    ja = q.claim()
    assert q.fail(ja, "server fault: disk full")
    assert [j.id for j in q.failed_with("server fault:", 5)] == [a.id]
    assert q.failed_with("server fault:", 1) == []  # attempts 1 is not < 1
    assert q.retry(a.id, "ops") and not q.retry(a.id, "ops")
    assert q.get(a.id).state == "queued" and q.get(a.id).error is None
    assert q.erase(b.id, "alice")  # queued: failed with "deleted by"
    gone = q.get(b.id)
    assert gone.state == "failed" and gone.error == "deleted by alice before it ran" and gone.purged_at is not None
    running = q.claim()
    assert running.id == a.id and not q.erase(a.id, "alice")  # a running job cannot be erased
    assert q.counts() == {"queued": 0, "running": 1, "done": 0, "failed": 1}


def test_requeue_node_takes_back_that_node_and_its_workers_jobs_only(make_queue):
    q = make_queue()
    ids = [q.enqueue("segment").id for _ in range(4)]
    claims = {}
    for node in ("n1/w0", "n1/w1", "n1", "n10/w0"):  # n10/w0 shares a prefix with n1 but is another node
        claims[node] = make_queue(node=node).claim().id
    assert q.requeue_node("n1/w0") == [claims["n1/w0"]]  # a dead worker: its job only
    assert sorted(q.requeue_node("n1")) == sorted([claims["n1/w1"], claims["n1"]])  # a restarted node and its workers
    assert q.get(claims["n10/w0"]).state == "running"
    assert [e["event"] for e in q.events(claims["n1/w0"])] == ["queued", "claimed", "requeued"]
    assert sorted(ids) == sorted(claims.values())


# -- PostgreSQL only ------------------------------------------------------------------------------------


@pytest.fixture
def pg_url(postgres):
    return postgres.create_database()


def test_dead_nodes_lease_expires_and_another_node_takes_the_job(pg_url):
    from resunet.serve.queue_pg import PgJobQueue

    a = PgJobQueue(pg_url, node="node-a", lease_s=1.0)
    b = PgJobQueue(pg_url, node="node-b", lease_s=1.0)
    job = a.enqueue("segment", input_name="x")
    taken = a.claim()
    assert b.claim() is None  # SKIP LOCKED / state: the running job is not offered twice
    assert b.requeue_expired() == []  # the lease still holds
    assert a.renew(taken)
    time.sleep(0.6)
    assert a.renew(taken)  # renewed: still not expired 1.2 s after the claim
    time.sleep(0.6)
    assert b.requeue_expired() == []
    time.sleep(1.3)  # node a stopped renewing (it "died")
    assert b.requeue_expired() == [job.id]
    again = b.claim()
    assert again.id == job.id and again.attempts == 2
    assert not a.renew(taken) and not a.finish(taken, {})  # node a's late result is refused
    assert b.finish(again, {"mask": {"path": "m", "sha256": "1"}})
    assert _events(b, job.id) == ["queued", "claimed", "lease-expired", "claimed", "done"]
    assert [e["detail"] for e in b.events(job.id) if e["event"] == "lease-expired"] == ["node-a"]


def test_restarted_node_requeues_only_its_own_running_jobs(pg_url):
    from resunet.serve.queue_pg import PgJobQueue

    a = PgJobQueue(pg_url, node="node-a")
    b = PgJobQueue(pg_url, node="node-b")
    j1 = a.enqueue("segment")
    j2 = a.enqueue("segment")
    assert a.claim().id == j1.id and b.claim().id == j2.id
    assert PgJobQueue(pg_url, node="node-a").requeue_node() == [j1.id]
    assert a.get(j2.id).state == "running"


def _claim_in_process(url: str, node: str, out) -> None:
    from resunet.serve.queue_pg import PgJobQueue

    q = PgJobQueue(url, node=node)
    got = []
    while (job := q.claim()) is not None:
        got.append(job.id)
        q.finish(job, {})
    out.put(got)


def test_processes_on_one_pg_queue_split_the_jobs(pg_url):
    from resunet.serve.queue_pg import PgJobQueue

    q = PgJobQueue(pg_url)
    ids = [q.enqueue("segment").id for _ in range(60)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(pg_url, f"p{i}", out)) for i in range(3)]
    for p in procs:
        p.start()
    got = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    flat = [i for g in got for i in g]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))


def test_pg_tokens_hold_on_every_node_at_once(pg_url):
    from resunet.serve.queue_pg import PgJobQueue
    from resunet.serve.tokens import PgTokenStore

    one, two = PgTokenStore(PgJobQueue(pg_url, node="a")), PgTokenStore(PgJobQueue(pg_url, node="b"))
    tok = one.add("ris", scope="submit", group="radiology")
    assert two.lookup(tok).name == "ris" and two.lookup(tok).group == "radiology" and two.group_of("ris") == "radiology"
    with pytest.raises(ConfigError, match="exists"):
        two.add("ris")
    with pytest.raises(ConfigError, match="token name"):
        two.add("bad name")
    assert len(two) == 1 and two.names() == ["ris"]
    two.remove("ris")
    assert one.lookup(tok) is None and one.check(tok) is None
    with pytest.raises(ConfigError, match="no token named"):
        one.remove("ris")


def _append_runs(url: str, prefix: str, n: int) -> None:
    from resunet.reports.audit import record_run

    for i in range(n):
        record_run("serve", {"run_id": f"{prefix}-{i}", "user": prefix, "host": "h"}, [], db_path=url)


def test_pg_audit_chain_verifies_after_concurrent_appends_from_processes(pg_url):
    from resunet.cli import main
    from resunet.reports.audit import read_runs, run_recorded, verify_log

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_runs, args=(pg_url, f"node{i}", 15)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    runs = read_runs(pg_url)
    assert len(runs) == 45 and {r["user"] for r in runs} == {"node0", "node1", "node2"}
    assert verify_log(pg_url) == []
    assert run_recorded("node1-3", pg_url) and not run_recorded("node1-99", pg_url)
    from resunet.reports.audit import RunAlreadyRecorded

    with pytest.raises(RunAlreadyRecorded, match="node0-0") as dup:
        _append_runs(pg_url, "node0", 1)  # a run id is recorded once
    assert "127.0.0.1" not in str(dup.value)  # the run, not the database, as the SQLite log says it
    assert main(["audit", "log", "--audit-db", pg_url, "--last", "0"]) == 0
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("UPDATE resunet_audit SET user_name = 'x' WHERE run_id = 'node0-1'")
        # a superuser can still drop the trigger and edit a row: the chain shows it
        conn.execute("ALTER TABLE resunet_audit DISABLE TRIGGER resunet_audit_no_change")
        conn.execute("UPDATE resunet_audit SET user_name = 'mallory' WHERE run_id = 'node0-1'")
    problems = verify_log(pg_url)
    assert len(problems) == 1 and "node0-1" in problems[0]
    assert main(["audit", "log", "--audit-db", pg_url, "--last", "0"]) == 1


def test_database_restart_is_a_server_error_then_recovers(postgres, pg_url):
    from resunet.serve.queue_pg import PgJobQueue

    q = PgJobQueue(pg_url)
    job = q.enqueue("segment")
    postgres.stop()
    try:
        with pytest.raises(ServerError, match="unreachable|cannot reach"):
            q.counts()
        with pytest.raises(ServerError):
            q.ping()
    finally:
        postgres.start()
    assert q.get(job.id).state == "queued"  # a new connection, nothing lost
    assert q.claim().id == job.id


def test_pg_url_rules():
    from resunet.pgdb import check_url, redact

    with pytest.raises(ConfigError, match="holds a password"):
        check_url("postgresql://resunet:secret@db/resunet")
    with pytest.raises(ConfigError, match="name the database"):
        check_url("postgresql://resunet@db")
    with pytest.raises(ConfigError, match="use postgresql://"):
        check_url("mysql://resunet@db/x")
    assert check_url("postgresql://resunet@db:5433/resunet?sslmode=verify-full")
    assert "secret" not in redact("postgresql://resunet:secret@db:5433/resunet")


def test_password_file_is_used(postgres, tmp_path, monkeypatch):
    """A role with a password: refused without it, let in with RESUNET_PG_PASSWORD_FILE (scram over TCP)."""
    import psycopg

    from resunet.pgdb import PASSWORD_FILE_ENV, connect

    url = postgres.create_database()
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE r_{name} LOGIN PASSWORD 's3cret-pw'")
    hba = postgres.data / "pg_hba.conf"
    original = hba.read_text()
    # role-specific line first: md5/scram for this role, trust for the rest (postgres) as before
    hba.write_text(f"host all r_{name} 127.0.0.1/32 scram-sha-256\n" + original)
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
    try:
        role_url = f"postgresql://r_{name}@127.0.0.1:{postgres.port}/{name}"
        monkeypatch.delenv("PGPASSWORD", raising=False)
        monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
        with pytest.raises(ServerError, match="password"):
            connect(role_url)
        pw = tmp_path / "pw"
        pw.write_text("s3cret-pw\n")
        monkeypatch.setenv(PASSWORD_FILE_ENV, str(pw))
        assert connect(role_url).execute("SELECT current_user").fetchone()[0] == f"r_{name}"
    finally:
        hba.write_text(original)
        with psycopg.connect(postgres.url(), autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
