"""Warm `resunet serve` vs the `resunet predict` command on the example study (run by hand).

    .venv/bin/python bench/bench_serve.py [--requests 50] [--concurrency 1,4,8] [--tta] [--cli-runs 3]
        [--out bench/results/serve.md]
    .venv/bin/python bench/bench_serve.py --render bench/results/serve.json --out bench/results/serve.md

What is measured, in one run on this machine:

- CLI: the whole `resunet predict resunet/data/example/colin27_t1.nii.gz --out TMP --model M [--no-tta]
  --no-audit --no-progress` command (a fresh process: imports, model load, read, predict, write),
  wall time per run;
- service: one `resunet serve` process (same model, same TTA/overlap/sw-batch settings, audit off
  like the CLI runs) started once and warmed; then for each concurrency C, C client threads on
  loopback each loop "submit the study -> poll every 50 ms until done -> download the mask" until
  `--requests` round trips are done; latency = submit to mask downloaded, per request;
- while the clients run: the service's queue depth (queued + running, from /metrics) and resident
  memory (VmRSS of the service process) every 0.25 s;
- failed requests: any non-2xx answer or a job that did not end `done`.

Prints the results (Markdown) and the machine load (`uptime`); ``--out FILE.md`` writes them as the
whole results file and the figures to ``FILE.json``, atomically; ``--render`` rewrites the Markdown
from the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from serve_support import ServiceProcess  # noqa: E402

EXAMPLE = REPO / "resunet" / "data" / "example" / "colin27_t1.nii.gz"
BUNDLED = REPO / "resunet" / "data" / "model" / "brain_extraction.pt"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def pct(values: list[float], q: float) -> float:
    """Percentile by linear interpolation (numpy's default), q in 0..100."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def cli_runs(n: int, model: Path, tta: bool) -> list[float]:
    times = []
    for i in range(n):
        with tempfile.TemporaryDirectory() as out:
            # the venv's `resunet` entry point beside this interpreter (a worktree may have no .venv of its own)
            exe = Path(sys.executable).parent / "resunet"
            cmd = [*([str(exe)] if exe.exists() else [sys.executable, "-m", "resunet"]),
                   "predict", str(EXAMPLE), "--out", out, "--model", str(model), "--tta" if tta else "--no-tta",
                   "--no-audit", "--no-progress"]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            dt = time.perf_counter() - t0
            if r.returncode != 0:
                raise SystemExit(f"CLI run failed ({r.returncode}): {r.stderr[-2000:]}")
            times.append(dt)
            print(f"  CLI run {i + 1}: {dt:.2f} s", flush=True)
    return times


class Sampler(threading.Thread):
    """Queue depth (queued + running) and service RSS every ``period`` s."""

    def __init__(self, url: str, pid: int, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.url, self.pid, self.period = url, pid, period
        self.depth: list[int] = []
        self.rss_mb: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as c:
            while not self.halt.is_set():
                try:
                    text = c.get(self.url + "/metrics").text
                    d = 0
                    for line in text.splitlines():
                        if line.startswith('resunet_queue_depth{state="queued"}') or line.startswith('resunet_queue_depth{state="running"}'):
                            d += int(float(line.split()[-1]))
                    self.depth.append(d)
                except httpx.HTTPError:
                    pass
                try:
                    for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            self.rss_mb.append(int(line.split()[1]) / 1024.0)
                except OSError:
                    pass
                self.halt.wait(self.period)


def client_loop(url: str, body: bytes, todo: list[int], lock: threading.Lock, lat: list[float], fails: list[str]) -> None:
    with httpx.Client(timeout=600) as c:
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            t0 = time.perf_counter()
            try:
                r = c.post(url + "/v1/jobs", files=[("files", ("colin27_t1.nii.gz", body))])
                if r.status_code != 202:
                    fails.append(f"submit {r.status_code}: {r.text[:200]}")
                    continue
                jid = r.json()["id"]
                while True:
                    j = c.get(f"{url}/v1/jobs/{jid}")
                    if j.status_code != 200:
                        fails.append(f"poll {j.status_code}")
                        break
                    state = j.json()["state"]
                    if state in ("done", "failed"):
                        break
                    time.sleep(0.05)
                if state != "done":
                    fails.append(f"job {jid} {state}: {j.json().get('error')}")
                    continue
                m = c.get(f"{url}/v1/jobs/{jid}/outputs/mask")
                if m.status_code != 200 or not m.content:
                    fails.append(f"mask {m.status_code}")
                    continue
                lat.append(time.perf_counter() - t0)
            except httpx.HTTPError as err:
                fails.append(f"{type(err).__name__}: {err}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=50, help="round trips per concurrency level (default 50)")
    ap.add_argument("--concurrency", default="1,4,8", help="client threads per level (default 1,4,8)")
    ap.add_argument("--tta", action="store_true", help="mirror TTA in both CLI and service (default off in both)")
    ap.add_argument("--cli-runs", type=int, default=3, help="whole-command CLI runs (default 3)")
    ap.add_argument("--model", type=Path, default=BUNDLED)
    ap.add_argument("--state-dir", type=Path, default=None, help="service state folder (default a temp folder)")
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
    levels = [int(x) for x in args.concurrency.split(",")]
    body = EXAMPLE.read_bytes()
    tta_flag = "--tta" if args.tta else "--no-tta"
    print(f"load before: {uptime()}", flush=True)
    print(f"settings: model {args.model.name}, TTA {'on' if args.tta else 'off'}, overlap 0.5, sw-batch 2, CPU "
          f"(torch threads default), audit off in both", flush=True)

    print("CLI (whole command):", flush=True)
    cli = cli_runs(args.cli_runs, args.model, args.tta)
    load_cli = uptime()

    tmp = tempfile.TemporaryDirectory()
    state = args.state_dir or Path(tmp.name) / "state"
    t0 = time.perf_counter()
    svc = ServiceProcess(state, args.model, tta_flag, "--retention-hours", "1", log_path=Path(tmp.name) / "serve.log").start(timeout=600)
    ready_s = time.perf_counter() - t0
    rows = []
    try:
        metrics = httpx.get(svc.url + "/metrics").text
        model_load = next(float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("resunet_model_load_seconds "))
        print(f"service ready in {ready_s:.1f} s (model load + warm-up {model_load:.1f} s)", flush=True)
        for c in levels:
            todo = list(range(args.requests))
            lock = threading.Lock()
            lat: list[float] = []
            fails: list[str] = []
            sampler = Sampler(svc.url, svc.proc.pid)
            sampler.start()
            t_level = time.perf_counter()
            threads = [threading.Thread(target=client_loop, args=(svc.url, body, todo, lock, lat, fails)) for _ in range(c)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t_level
            sampler.halt.set()
            sampler.join()
            row = {
                "c": c, "n": len(lat), "fails": len(fails), "p50": pct(lat, 50), "p95": pct(lat, 95),
                "mean": statistics.fmean(lat) if lat else float("nan"), "thr": len(lat) / wall * 60.0,
                "depth_max": max(sampler.depth or [0]), "depth_mean": statistics.fmean(sampler.depth or [0]),
                "rss_min": min(sampler.rss_mb or [0]), "rss_max": max(sampler.rss_mb or [0]), "load": uptime(),
            }
            rows.append(row)
            print(f"  c={c}: {row['n']} ok, {row['fails']} failed, p50 {row['p50']:.2f} s, p95 {row['p95']:.2f} s, "
                  f"{row['thr']:.1f}/min, queue depth max {row['depth_max']}, RSS {row['rss_min']:.0f}-{row['rss_max']:.0f} MB",
                  flush=True)
            for f in fails[:5]:
                print(f"    failure: {f}", flush=True)
    finally:
        svc.stop()
        tmp.cleanup()

    run = {
        "command": f".venv/bin/python bench/bench_serve.py {argv_text}".strip(), "started_utc": started,
        "finished_utc": time.strftime("%H:%M", time.gmtime()), "model": args.model.name, "tta": args.tta,
        "cli_s": cli, "load_cli": load_cli, "ready_s": ready_s, "model_load_s": model_load,
        "rows": [{**r, "ratio": statistics.median(cli) / r["p50"]} for r in rows],
    }
    text = render(run)
    print(text)
    if args.out:
        from resunet.io.atomic import atomic_write_text

        atomic_write_text(args.out.with_suffix(".json"), json.dumps(run, indent=1) + "\n")
        atomic_write_text(args.out, text)
    return 0


GOAL = 5.0  # warm p50 at least this many times faster than a CLI call


def render(run: dict) -> str:
    """The whole results file for one run (what ``main`` stores in the ``.json``)."""
    cli = run["cli_s"]
    med = statistics.median(cli)
    lines = [
        "# `resunet serve`: warm-service latency vs the CLI (bench/bench_serve.py)", "",
        "Written whole by `bench/bench_serve.py --out bench/results/serve.md`, figures in `bench/results/serve.json`",
        "(`--render bench/results/serve.json --out bench/results/serve.md` rewrites this file from it). SIGKILL",
        "faults: [serve_faults.md](serve_faults.md); hostile clients: `bench/serve_hostile.py` (writes serve_hostile.md).", "",
        "CLI = wall time of the whole `resunet predict resunet/data/example/colin27_t1.nii.gz ... --no-audit --no-progress`",
        "command (fresh process: imports, model load, read, predict, write). Service = one `resunet serve`",
        "started once and warmed; C client threads on loopback each loop submit (multipart upload) -> poll",
        "every 50 ms -> mask downloaded; latency per request. Queue depth (queued + running, from /metrics)",
        "and the service's resident memory sampled every 0.25 s. Same settings in both: overlap 0.5,",
        "sw-batch 2, CPU, torch's default threads, audit log off.", "",
        f"## Run {run['started_utc']}-{run['finished_utc']} UTC", "",
        f"Command: `{run['command']}`", "",
        f"Model {run['model']}, TTA {'on' if run['tta'] else 'off'}. CLI whole command: "
        f"{' / '.join(f'{x:.2f}' for x in cli)} s (median {med:.2f} s; load after the CLI runs {run['load_cli']}); "
        f"service ready {run['ready_s']:.1f} s after start (model load + warm-up {run['model_load_s']:.1f} s)."
        + (f" {run['note']}" if run.get("note") else ""), "",
        "| clients | requests ok | failed | p50 s | p95 s | mean s | CLI median / p50 | jobs/min | queue depth max (mean) | service RSS MB min-max | load after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in run["rows"]:
        lines.append(f"| {r['c']} | {r['n']} | {r['fails']} | {r['p50']:.2f} | {r['p95']:.2f} | {r['mean']:.2f} | "
                     f"{r['ratio']:.1f}x | {r['thr']:.1f} | {r['depth_max']} ({r['depth_mean']:.1f}) | "
                     f"{r['rss_min']:.0f}-{r['rss_max']:.0f} | {r.get('load') or '-'} |")
    met = [r["c"] for r in run["rows"] if r["ratio"] >= GOAL]
    lines += ["", f"Goal (warm p50 at least {GOAL:g}x faster than a CLI call): "
              + (f"met with {', '.join(map(str, met))} client(s)" if met else "not met") + "; "
              + ", ".join(f"{r['ratio']:.1f}x with {r['c']}" for r in run["rows"])
              + ". The service runs one job at a time, so with more clients the latency includes the queue wait.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
