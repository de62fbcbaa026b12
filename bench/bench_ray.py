"""Benchmark ``resunet predict --ray`` against the local batch (run by hand, on an idle machine; one run).

    .venv/bin/python bench/bench_ray.py [--cases 8] [--model resunet/data/model/brain_extraction.pt]
        [--out bench/results/ray.md]

Cases: ``--cases`` copies of the example study (resunet/data/example/colin27_t1.nii.gz) in different
orientations (same voxels, same work per case). TTA off, one torch thread per process. Each row is
``resunet predict`` in a fresh process, as a user runs it:

1. local batch (``--workers 1``);
2. Ray, 1 actor, on a real two-node loopback cluster (``ray start --head`` + ``ray start --address``,
   1 CPU each; started once for rows 2-4, not timed);
3. Ray, 2 actors on the same cluster;
4. Ray, 2 actors, with the second node's raylet SIGKILLed once its first case is done: cases
   retried (records with ``attempt`` > 1), cases lost (not ``ok`` in ``predictions.json``; goal 0),
   time to finish vs row 3.

Columns: wall time of the command; steady-state cases/min = (cases - 1) / (last - first record's
finish time), which leaves out start-up (Python, Ray connection, model load per worker) that an
archive-scale run pays once. Goals on a 2-core machine: Ray 1 actor within 10% of the local batch
(steady state), 2 actors >= 1.6x one. The load average is printed: on a shared machine run-to-run
noise between processes was about +-20%.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from ray_support import RayCluster  # noqa: E402

EXAMPLE = REPO / "resunet" / "data" / "example" / "colin27_t1.nii.gz"
BUNDLED = REPO / "resunet" / "data" / "model" / "brain_extraction.pt"
ORIENTATIONS = ["RAS", "LPS", "LAS", "RPS", "RAI", "LPI", "ASR", "PIR", "SRA", "IPL", "RSA", "PSL"]


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_cases(folder: Path, n: int) -> None:
    import nibabel as nib

    img = nib.load(str(EXAMPLE))
    folder.mkdir(parents=True)
    start = nib.orientations.io_orientation(img.affine)
    for i in range(n):
        codes = ORIENTATIONS[i % len(ORIENTATIONS)]
        target = nib.orientations.axcodes2ornt(tuple(codes))
        out = img.as_reoriented(nib.orientations.ornt_transform(start, target))
        nib.save(out, str(folder / f"case{i:03d}.nii.gz"))


def records(out: Path) -> list[dict]:
    recs = []
    p = out / "predictions.jsonl"
    for line in p.read_text().splitlines() if p.exists() else []:
        try:
            recs.append(json.loads(line))
        except ValueError:
            pass
    return recs


def steady_rate(recs: list[dict]) -> float | None:
    stamps = sorted(dt.datetime.fromisoformat(r["finished_utc"].replace("Z", "+00:00")) for r in recs)
    if len(stamps) < 2:
        return None
    span = (stamps[-1] - stamps[0]).total_seconds()
    return (len(stamps) - 1) / span * 60 if span > 0 else None


def run(cmd: list[str], env: dict[str, str], kill=None) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill is not None:
        kill(proc)
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}", file=sys.stderr)
    return wall, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--model", default=str(BUNDLED))
    ap.add_argument("--out", default=None, help="write the Markdown table here too")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    inputs = work / "inputs"
    make_cases(inputs, args.cases)
    base = [sys.executable, "-m", "resunet", "predict", str(inputs), "--model", args.model, "--no-tta",
            "--no-progress", "--no-audit"]
    load_start = loadavg()
    rows: list[dict] = []
    try:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        wall, code = run([*base, "--out", str(work / "local")], env)
        rows.append({"name": "local batch", "wall": wall, "recs": records(work / "local"), "code": code})
        with RayCluster(nodes=2, cpus=1) as cluster:
            renv = cluster.env()
            for actors in (1, 2):
                out = work / f"ray{actors}"
                wall, code = run([*base, "--out", str(out), "--ray", cluster.address, "--ray-actors", str(actors)], renv)
                rows.append({"name": f"Ray, {actors} actor(s)", "wall": wall, "recs": records(out), "code": code})

            out = work / "ray-kill"
            killed: dict = {}

            def kill(proc: subprocess.Popen) -> None:
                deadline = time.monotonic() + 1800
                while time.monotonic() < deadline and proc.poll() is None:
                    recs = records(out)
                    if len({r.get("node") for r in recs}) >= 2:
                        time.sleep(min(r["seconds"] for r in recs) / 2)  # the node is midway through its next case
                        cluster.kill_node("node1")
                        killed["after"] = len(recs)
                        return
                    time.sleep(0.05)

            wall, code = run([*base, "--out", str(out), "--ray", cluster.address, "--ray-actors", "2"], renv, kill)
            rows.append({"name": "Ray, 2 actors, node killed", "wall": wall, "recs": records(out), "code": code,
                         "killed_after": killed.get("after")})
    finally:
        load_end = loadavg()

    n = args.cases
    lines = [f"# bench_ray: {n} cases (example study, TTA off, 1 thread per process)", "",
             f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; load average "
             f"{load_start} at start, {load_end} at end", "",
             "| run | wall s | cases/min (wall) | cases/min (steady) | ok | retried | lost |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        summary_path = work / {"local batch": "local", "Ray, 1 actor(s)": "ray1", "Ray, 2 actor(s)": "ray2",
                               "Ray, 2 actors, node killed": "ray-kill"}[r["name"]] / "predictions.json"
        doc = json.loads(summary_path.read_text()) if summary_path.exists() else {"cases": []}
        ok = sum(c["status"] == "ok" for c in doc["cases"])
        retried = sum((c.get("attempt") or 1) > 1 for c in r["recs"])
        rate = steady_rate(r["recs"])
        r.update(ok=ok, lost=n - ok, retried=retried, rate=rate)
        lines.append(f"| {r['name']} | {r['wall']:.1f} | {n / r['wall'] * 60:.1f} | "
                     f"{'-' if rate is None else f'{rate:.1f}'} | {ok} | {retried} | {n - ok} |")
    by = {r["name"]: r for r in rows}
    lines.append("")
    loc, one, two, kil = (by.get(k) for k in ("local batch", "Ray, 1 actor(s)", "Ray, 2 actor(s)",
                                               "Ray, 2 actors, node killed"))
    if loc and one and loc["rate"] and one["rate"]:
        lines.append(f"- Ray 1 actor vs local batch (steady state): {one['rate'] / loc['rate']:.2f}x (goal >= 0.90)")
    if one and two and one["rate"] and two["rate"]:
        lines.append(f"- Ray 2 actors vs 1 actor (steady state): {two['rate'] / one['rate']:.2f}x (goal >= 1.6)")
    if two and kil:
        lines.append(f"- node killed after {kil.get('killed_after')} case(s): {kil['retried']} retried, {kil['lost']} lost "
                     f"(goal 0), finished in {kil['wall']:.1f} s vs {two['wall']:.1f} s undisturbed "
                     f"({kil['wall'] / two['wall']:.2f}x; includes Ray's node-death detection)")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["code"] in (0, None) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
