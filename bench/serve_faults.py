"""Fault run of `resunet serve`: N jobs while the service is SIGKILLed K times and restarted (run by hand).

    .venv/bin/python bench/serve_faults.py [--jobs 50] [--kills 3] [--tta] [--tiny | --model M]
        [--out bench/results/serve_faults.md]
    .venv/bin/python bench/serve_faults.py --render bench/results/serve_faults.json --out bench/results/serve_faults.md

- one service (bundled model unless --model; audit log on, in a temp file) on loopback;
- a submitter thread sends the example NIfTI `--jobs` times, one after another; a submit that gets
  no 202 (service down) is retried until one is accepted; "accepted" = a 202 with a job id;
- a killer SIGKILLs the service (no clean shutdown) each time another `jobs/(kills+1)` jobs are done,
  while a job is being segmented (claimed >= KILL_AFTER_CLAIM_S = 0.1 s before: a job of the example takes
  about 0.5 s on an idle machine since stop 31, so a 0.5 s wait never came and the run hung), and restarts it at once on the same state
  folder;
- a prober GETs /healthz every 0.2 s for the whole run (uptime = answered probes / all probes);
- at the end: every accepted job's final state from the queue database; lost = accepted but not
  done at the end (or missing), done twice = more than one `done` event for a job, audit rows per
  job, jobs the database holds that no client got a 202 for (the kill fell between commit and answer).

Prints the results (Markdown) and the machine load (`uptime`); ``--out FILE.md`` writes them as the
whole results file and the figures to ``FILE.json``, atomically; ``--render`` rewrites the Markdown
from the JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

# the paths, the tests' service helper and uptime() as bench_serve.py has them (it puts tests/ on sys.path)
from bench_serve import BUNDLED, EXAMPLE, ServiceProcess, uptime


#: the killer waits until the running job was claimed this long ago (s), so it dies mid-segmentation
KILL_AFTER_CLAIM_S = 0.1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--tta", action="store_true", help="mirror TTA (default off)")
    ap.add_argument("--model", type=Path, default=BUNDLED)
    ap.add_argument("--tiny", action="store_true",
                    help="use the tests' tiny untrained checkpoint (jobs of ~1 s: the run measures the queue, not the model)")
    ap.add_argument("--out", type=Path, help="write the whole results file here (and its figures to the same name .json)")
    ap.add_argument("--render", type=Path, metavar="JSON", help="no measuring: write --out from this JSON")
    args = ap.parse_args()
    if args.render:
        if not args.out:
            ap.error("--render needs --out")
        from resunet.io.atomic import atomic_write_text

        atomic_write_text(args.out, render(json.loads(args.render.read_text())))
        return 0
    argv_text = " ".join(sys.argv[1:])
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    print(f"load before: {uptime()}", flush=True)
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    if args.tiny:
        from test_app_support import make_tiny_model

        args.model = make_tiny_model(root / "tiny.pt")
    state, audit = root / "state", root / "audit.sqlite"
    extra = ["--tta" if args.tta else "--no-tta"]
    svc_box = [ServiceProcess(state, args.model, *extra, audit_db=audit, log_path=root / "serve.log").start(timeout=600)]
    url = svc_box[0].url  # same port after each restart
    body = EXAMPLE.read_bytes()
    accepted: list[str] = []
    submit_retries = [0]
    stop = threading.Event()
    probes = collections.Counter()
    kills_done: list[dict] = []

    def submitter() -> None:
        with httpx.Client(timeout=120) as c:
            while len(accepted) < args.jobs and not stop.is_set():
                try:
                    r = c.post(url + "/v1/jobs", files=[("files", ("colin27_t1.nii.gz", body))])
                    if r.status_code == 202:
                        accepted.append(r.json()["id"])
                        continue
                except httpx.HTTPError:
                    pass
                submit_retries[0] += 1
                time.sleep(0.2)

    def prober() -> None:
        with httpx.Client(timeout=2) as c:
            while not stop.is_set():
                try:
                    probes["up" if c.get(url + "/healthz").status_code == 200 else "down"] += 1
                except httpx.HTTPError:
                    probes["down"] += 1
                stop.wait(0.2)

    def done_count() -> int:
        try:
            with sqlite3.connect(state / "jobs.sqlite", timeout=30) as conn:
                return conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'done'").fetchone()[0]
        except sqlite3.Error:
            return 0

    def running_for() -> float:
        """Seconds since the running job (if any) was claimed; -1 when none runs."""
        try:
            with sqlite3.connect(state / "jobs.sqlite", timeout=30) as conn:
                row = conn.execute("SELECT started_at FROM jobs WHERE state = 'running'").fetchone()
        except sqlite3.Error:
            return -1.0
        return time.time() - row[0] if row else -1.0

    t_start = time.perf_counter()
    threads = [threading.Thread(target=submitter, daemon=True), threading.Thread(target=prober, daemon=True)]
    for t in threads:
        t.start()
    step = args.jobs // (args.kills + 1)
    for k in range(1, args.kills + 1):
        while done_count() < k * step:
            time.sleep(0.1)
        while running_for() < KILL_AFTER_CLAIM_S:  # kill mid-job: a job claimed a moment ago is being segmented
            time.sleep(0.05)
        svc = svc_box[0]
        with sqlite3.connect(state / "jobs.sqlite", timeout=30) as conn:
            before = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        svc.kill()
        t_kill = time.perf_counter()
        print(f"SIGKILL {k} at {t_kill - t_start:.1f} s; queue then: {before}", flush=True)
        new = ServiceProcess(state, args.model, *extra, audit_db=audit, log_path=root / "serve.log")
        new.port, new.url = svc.port, svc.url
        new.cmd[new.cmd.index("--port") + 1] = str(svc.port)
        svc_box[0] = new.start(timeout=600)
        kills_done.append({"at_s": t_kill - t_start, "restart_s": time.perf_counter() - t_kill, "queue": before})
        print(f"  restarted and ready after {kills_done[-1]['restart_s']:.1f} s", flush=True)
    while len(accepted) < args.jobs:
        time.sleep(0.2)
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        with sqlite3.connect(state / "jobs.sqlite", timeout=30) as conn:
            open_jobs = conn.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]
        if open_jobs == 0:
            break
        time.sleep(0.5)
    wall = time.perf_counter() - t_start
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(5)
    svc_box[0].stop()

    with sqlite3.connect(state / "jobs.sqlite") as conn:
        states = dict(conn.execute("SELECT id, state FROM jobs").fetchall())
        attempts = dict(conn.execute("SELECT id, attempts FROM jobs").fetchall())
        done_events = collections.Counter(r[0] for r in conn.execute("SELECT job_id FROM events WHERE event = 'done'"))
    from resunet.reports.audit import read_runs, verify_log

    audit_rows = collections.Counter(r["run_id"] for r in read_runs(audit))
    acc = set(accepted)
    finished = sum(states.get(i) == "done" for i in acc)
    failed = sum(states.get(i) == "failed" for i in acc)
    lost = sum(states.get(i) != "done" and states.get(i) != "failed" for i in acc)
    twice = sum(n > 1 for n in done_events.values())
    redone = sum(attempts.get(i, 0) > 1 for i in acc)
    unknown = len(set(states) - acc)
    audit_once = sum(audit_rows.get(f"serve-{i}") == 1 for i in acc)
    audit_twice = sum(n > 1 for n in audit_rows.values())
    up = probes["up"] / max(1, probes["up"] + probes["down"])
    chain = verify_log(audit)
    run = {
        "command": f".venv/bin/python bench/serve_faults.py {argv_text}".strip(), "started_utc": started,
        "finished_utc": time.strftime("%H:%M", time.gmtime()), "jobs": args.jobs, "kills": args.kills, "tta": args.tta,
        "model": "the tests' tiny checkpoint" if args.tiny else args.model.name, "wall_s": wall, "load_after": uptime(),
        "accepted": len(acc), "done": finished, "failed": failed, "lost": lost, "twice": twice, "redone": redone,
        "unknown": unknown, "audit_once": audit_once, "audit_twice": audit_twice,
        "chain": "intact" if not chain else str(chain[0]), "probes_up": probes["up"],
        "probes_all": probes["up"] + probes["down"], "submit_retries": submit_retries[0], "kill_log": kills_done,
    }
    text = render(run)
    print(text)
    if args.out:
        from resunet.io.atomic import atomic_write_text

        atomic_write_text(args.out.with_suffix(".json"), json.dumps(run, indent=1) + "\n")
        atomic_write_text(args.out, text)
    tmp.cleanup()
    return 0 if lost == 0 and twice == 0 else 1


def render(run: dict) -> str:
    """The whole results file for one run (what ``main`` stores in the ``.json``)."""
    up = 100 * run["probes_up"] / max(1, run["probes_all"])
    lines = [
        "# `resunet serve` under SIGKILL: jobs accepted, finished, lost (bench/serve_faults.py)", "",
        "Written whole by `bench/serve_faults.py --out bench/results/serve_faults.md`, figures in",
        "`bench/results/serve_faults.json` (`--render` rewrites this file from it). A submitter sends the example",
        "NIfTI N times (a submit without a 202 is retried); the service is SIGKILLed while a job is being",
        f"segmented (claimed at least {KILL_AFTER_CLAIM_S} s before) and restarted at once on the same state folder; /healthz is",
        "probed every 0.2 s. Lost = accepted but not done at the end; done twice = more than one `done` event.", "",
        f"## Run {run['started_utc']}-{run['finished_utc']} UTC" if run.get("finished_utc") else f"## Run {run['started_utc']} UTC", "",
        f"Command: `{run['command']}`", "",
        f"{run['jobs']} jobs, {run['kills']} SIGKILLs, TTA {'on' if run['tta'] else 'off'}, model {run['model']}, audit log on; "
        f"wall {run['wall_s']:.0f} s; load after: {run['load_after']}." + (f" {run['note']}" if run.get("note") else ""), "",
        "| accepted (202) | finished done | failed | lost | done twice | redone after a kill | in DB without a 202 "
        "| audit rows exactly once | audit rows twice | audit chain | /healthz uptime | submit retries |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {run['accepted']} | {run['done']} | {run['failed']} | {run['lost']} | {run['twice']} | {run['redone']} | "
        f"{run['unknown']} | {run['audit_once']}/{run['accepted']} | {run['audit_twice']} | {run['chain']} | "
        f"{up:.1f}% ({run['probes_up']}/{run['probes_all']} probes) | {run['submit_retries']} |", "",
    ]
    for i, k in enumerate(run["kill_log"], 1):
        lines.append(f"kill {i}: at {k['at_s']:.0f} s, queue {k['queue']}, restart to ready {k['restart_s']:.1f} s")
    lines += ["", "/healthz uptime counts the restart gaps (the service is down from each kill until it is ready again).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
