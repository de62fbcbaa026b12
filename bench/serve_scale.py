"""`resunet serve` past one process: workers and nodes on one queue, and node fail-over (run by hand).

    .venv/bin/python bench/serve_scale.py [--requests 56] [--clients 8] [--cli-runs 3] [--lease 10] [--kills 3] [--out FILE]

Needs PostgreSQL (Debian `postgresql`, started here in a temp folder by tests/postgres_support.py) and
psycopg (`pip install -e '.[test]'`). Run it on an idle machine: the numbers are throughputs.

What is measured, in one run, on the example study (resunet/data/example/colin27_t1.nii.gz), bundled model,
TTA off, audit off (as the CLI runs):

1. CLI: `resunet predict STUDY --out TMP --no-tta --no-audit --no-progress`, a fresh process per study
   (`--cli-runs` times); throughput = 60 / mean seconds (one study at a time, as a script would loop).
2. For each set-up, `--clients` client threads loop "submit -> poll every 50 ms -> download the mask"
   until `--requests` round trips are done; throughput = requests / wall time (jobs/min), latency
   p50/p95 = submit to mask downloaded:
   - 1 node x 1 worker, SQLite (the worker thread pinned to 1 torch thread: `--worker-threads`-like
     `OMP_NUM_THREADS=1`);
   - 1 node x 2 workers, SQLite (`--workers 2 --worker-threads 1`);
   - 2 nodes x 1 worker, PostgreSQL (one shared state folder; clients alternate between the nodes;
     each node pinned to 1 thread);
   - 1 node x 1 worker, PostgreSQL (vs the SQLite 1 x 1: the database's cost).
   Goals on a 2-core machine: 2 workers >= 1.6x the throughput of 1; PostgreSQL within 10% of SQLite.
3. Fail-over: two PostgreSQL nodes (`--lease` s), `--requests` jobs from `--clients` clients, and
   `--kills` SIGKILLs of a node while it runs a job (the killed node restarted after each kill, nodes
   alternating); per kill: the seconds from the SIGKILL until every job it was running had been
   claimed by another node (goal: lease + 5 s); at the end: jobs accepted / done / lost / done twice
   (from the queue's events table; goal 0 lost, 0 twice).

Writes bench/results/serve_scale.md whole (tables, settings, `uptime` before and after).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from bench_serve import BUNDLED, EXAMPLE, cli_runs, pct, uptime  # noqa: E402
from postgres_support import require_postgres, start_postgres  # noqa: E402
from serve_support import ServiceProcess  # noqa: E402

RESULTS = REPO / "bench" / "results" / "serve_scale.md"
FAILOVER_RESULTS = REPO / "bench" / "results" / "serve_failover.md"


def one_request(c: httpx.Client, url: str, body: bytes) -> tuple[float | None, str | None]:
    t0 = time.perf_counter()
    r = c.post(url + "/v1/jobs", files=[("files", ("colin27_t1.nii.gz", body))])
    if r.status_code != 202:
        return None, f"submit {r.status_code}: {r.text[:200]}"
    jid = r.json()["id"]
    while True:
        j = c.get(f"{url}/v1/jobs/{jid}")
        if j.status_code != 200:
            return None, f"poll {j.status_code}"
        state = j.json()["state"]
        if state in ("done", "failed"):
            break
        time.sleep(0.05)
    if state != "done":
        return None, f"job {jid} {state}: {j.json().get('error')}"
    m = c.get(f"{url}/v1/jobs/{jid}/outputs/mask")
    if m.status_code != 200 or not m.content:
        return None, f"mask {m.status_code}"
    return time.perf_counter() - t0, None


def load(urls: list[str], clients: int, requests: int, body: bytes) -> dict:
    todo = list(range(requests))
    lock = threading.Lock()
    lat: list[float] = []
    fails: list[str] = []

    def client(k: int) -> None:
        url = urls[k % len(urls)]
        with httpx.Client(timeout=900) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    todo.pop()
                try:
                    dt, err = one_request(c, url, body)
                except httpx.HTTPError as e:
                    dt, err = None, f"{type(e).__name__}: {e}"
                with lock:
                    (lat.append(dt) if dt is not None else fails.append(err or "?"))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"wall": wall, "per_min": 60.0 * len(lat) / wall, "p50": pct(lat, 50), "p95": pct(lat, 95),
            "done": len(lat), "failed": len(fails), "fails": fails[:3]}


def nodes_up(specs: list[tuple[Path, tuple[str, ...], dict]], root: Path) -> list[ServiceProcess]:
    procs = []
    for state, extra, env in specs:
        svc = ServiceProcess(state, BUNDLED, "--no-tta", "--format", "nifti", *extra, log_path=root / f"{len(procs)}.log")
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            svc.start(timeout=600)
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        procs.append(svc)
    return procs


def failover(pg, root: Path, args: argparse.Namespace, body: bytes) -> dict:
    import psycopg

    url = pg.create_database("failover")
    state = root / "fo-state"
    one = {"OMP_NUM_THREADS": "1"}

    def node(name: str) -> ServiceProcess:
        return nodes_up([(state, ("--queue", url, "--lease", str(args.lease), "--node-name", name), one)], root)[0]

    nodes = {"A": node("A"), "B": node("B")}
    accepted: list[str] = []
    lock = threading.Lock()
    kills_done = threading.Event()

    def wait_done(c: httpx.Client, job_id: str) -> None:
        """Closed loop: a client submits its next job once this one ended (on either node), so the
        queue stays a few jobs deep and the run lasts until every kill was made."""
        for attempt in range(20000):
            target = nodes["A" if attempt % 2 == 0 else "B"]
            try:
                r = c.get(f"{target.url}/v1/jobs/{job_id}")
                if r.status_code == 200 and r.json().get("state") in ("done", "failed"):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    def submitter(k: int) -> None:
        with httpx.Client(timeout=900) as c:
            while True:
                with lock:  # at least --requests jobs, and on until the last kill
                    if len(accepted) >= args.requests and kills_done.is_set():
                        return
                job_id = None
                for attempt in range(100):  # the node this client uses may be down: try the other one
                    target = nodes["A" if (k + attempt) % 2 == 0 else "B"]
                    try:
                        r = c.post(target.url + "/v1/jobs", files=[("files", ("t1.nii.gz", body))])
                        if r.status_code == 202:
                            job_id = r.json()["id"]
                            with lock:
                                accepted.append(job_id)
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.2)
                if job_id is not None:
                    wait_done(c, job_id)

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    kills = []
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(args.kills):
            name = "A" if i % 2 == 0 else "B"
            deadline = time.monotonic() + 600
            running: list[str] = []
            while time.monotonic() < deadline and not running:
                running = [r[0] for r in conn.execute(
                    "SELECT id FROM resunet_jobs WHERE state = 'running' AND node = %s", (name,)).fetchall()]
                time.sleep(0.05)
            if not running:
                break  # reported: fewer kill rows than --kills
            nodes[name].kill()
            killed = time.time()
            give_up = time.monotonic() + 600
            while time.monotonic() < give_up:  # every job it was running claimed by the other node
                rows = conn.execute(
                    "SELECT job_id, MAX(at) FROM resunet_events WHERE event = 'claimed' AND job_id = ANY(%s) AND at > %s"
                    " GROUP BY job_id", (running, killed)).fetchall()
                if len(rows) == len(running):
                    kills.append({"node": name, "jobs": len(running), "seconds": max(r[1] for r in rows) - killed})
                    break
                time.sleep(0.1)
            else:
                kills.append({"node": name, "jobs": len(running), "seconds": float("nan")})  # not taken over in 600 s
            nodes[name] = node(name)  # back, under the same name
        kills_done.set()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            left = conn.execute("SELECT COUNT(*) FROM resunet_jobs WHERE state IN ('queued', 'running')").fetchone()[0]
            if left == 0:
                break
            time.sleep(0.5)
        done_counts = dict(conn.execute("SELECT job_id, COUNT(*) FROM resunet_events WHERE event = 'done' GROUP BY job_id").fetchall())
        states = dict(conn.execute("SELECT id, state FROM resunet_jobs").fetchall())
    for n in nodes.values():
        n.stop()
    return {"accepted": len(accepted), "done": sum(1 for j in accepted if states.get(j) == "done"),
            "lost": sum(1 for j in accepted if states.get(j) != "done"),
            "twice": sum(1 for j in accepted if done_counts.get(j, 0) > 1), "kills": kills}


def failover_lines(fo: dict, args: argparse.Namespace) -> list[str]:
    """The fail-over section of a results file."""
    lines = ["", f"Fail-over: 2 PostgreSQL nodes, lease {args.lease:g} s, {len(fo['kills'])} of {args.kills} SIGKILLs made during a "
              f"{fo['accepted']}-job run from {args.clients} clients (each submits its next job when its last one ended, "
              f"at least {args.requests} jobs and on until the last kill).", "",
              "| kill | node | jobs it ran | s until all claimed elsewhere |", "|---|---|---|---|"]
    for i, k in enumerate(fo["kills"], 1):
        lines.append(f"| {i} | {k['node']} | {k['jobs']} | {k['seconds']:.1f} |")
    lines += ["", f"Jobs accepted {fo['accepted']}, done {fo['done']}, lost {fo['lost']}, done twice {fo['twice']}.", ""]
    return lines


def failover_only(args: argparse.Namespace, body: bytes, before: str) -> int:
    pg = start_postgres(require_postgres())
    try:
        with tempfile.TemporaryDirectory(prefix="serve-failover-") as tmp:
            fo = failover(pg, Path(tmp), args, body)
    finally:
        pg.close()
    lines = ["# resunet serve: node fail-over (bench/serve_scale.py --failover-only)", "",
             f"Example study, bundled model, TTA off. Command: `.venv/bin/python bench/serve_scale.py --failover-only "
             f"--requests {args.requests} --clients {args.clients} --lease {args.lease:g} --kills {args.kills}`.",
             f"Load before: `{before}`; after: `{uptime()}`.", "", *failover_lines(fo, args)]
    write_results(args.out, lines)
    return 0


def write_results(out: Path, lines: list[str]) -> None:
    from resunet.io.atomic import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines))
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=56)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--cli-runs", type=int, default=3)
    ap.add_argument("--lease", type=float, default=10.0)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"results file (default {RESULTS.relative_to(REPO)}; with --failover-only "
                    f"{FAILOVER_RESULTS.relative_to(REPO)})")
    ap.add_argument("--failover-only", action="store_true",
                    help="run only the fail-over part (3.): its figures hardly depend on the load, the throughputs do")
    args = ap.parse_args()
    args.out = args.out or (FAILOVER_RESULTS if args.failover_only else RESULTS)
    body = EXAMPLE.read_bytes()
    before = uptime()
    if args.failover_only:
        return failover_only(args, body, before)
    print("CLI runs", flush=True)
    cli = cli_runs(args.cli_runs, BUNDLED, tta=False)
    pg = start_postgres(require_postgres())
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="serve-scale-") as tmp:
            root = Path(tmp)
            one = {"OMP_NUM_THREADS": "1"}
            setups = [
                ("1 node x 1 worker (SQLite)", [(root / "s1", ("--worker-threads", "1"), one)]),
                ("1 node x 2 workers (SQLite)", [(root / "s2", ("--workers", "2", "--worker-threads", "1"), {})]),
            ]
            url = pg.create_database("scale")
            shared = root / "shared"
            setups.append(("2 nodes x 1 worker (PostgreSQL)",
                           [(shared, ("--queue", url, "--node-name", n), one) for n in ("n1", "n2")]))
            setups.append(("1 node x 1 worker (PostgreSQL)",
                           [(root / "p1", ("--queue", pg.create_database("one"), "--node-name", "p1"), one)]))
            for label, spec in setups:
                print(label, flush=True)
                procs = nodes_up(spec, root)
                try:
                    res = load([p.url for p in procs], args.clients, args.requests, body)
                finally:
                    for p in procs:
                        p.stop()
                print(f"  {res}", flush=True)
                rows.append((label, res))
            print("fail-over", flush=True)
            fo = failover(pg, root, args, body)
            print(f"  {fo}", flush=True)
    finally:
        pg.close()
    after = uptime()
    cli_mean = statistics.mean(cli)
    base = rows[0][1]["per_min"]
    lines = ["# resunet serve: workers, nodes, fail-over (bench/serve_scale.py)", "",
             f"Example study, bundled model, TTA off, {args.clients} clients, {args.requests} requests per set-up.",
             f"Load before: `{before}`; after: `{after}`.", "",
             "| set-up | jobs/min | vs 1x1 SQLite | p50 s | p95 s | failed |", "|---|---|---|---|---|---|",
             f"| CLI, one process per study ({len(cli)} runs) | {60.0 / cli_mean:.1f} | {60.0 / cli_mean / base:.2f}x | "
             f"{statistics.median(cli):.2f} | - | 0 |"]
    for label, r in rows:
        lines.append(f"| {label} | {r['per_min']:.1f} | {r['per_min'] / base:.2f}x | {r['p50']:.2f} | {r['p95']:.2f} | {r['failed']} |")
    lines += failover_lines(fo, args)
    write_results(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
