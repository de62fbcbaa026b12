"""Start-up costs of the resunet command and service (issue 23 point 3; run by hand on an idle machine).

    .venv/bin/python bench/bench_startup.py [--runs 3] [--model M] [--out bench/results/startup.md]

Rows, each the median of --runs fresh processes, all in one run (the machine load is printed):
- import time per module: ``python -X importtime -m resunet predict --help`` and the imports of a real
  one-case predict, the top modules by cumulative time;
- ``resunet --help`` and every ``resunet <command> --help``: wall time of the process;
- ``resunet serve``: seconds from the process start to the first 200 of /healthz and of /readyz, after a
  clean start and after a SIGKILL restart on the same state folder (the bundled model, TTA off);
- one-case ``resunet predict`` (the example NIfTI, TTA off): wall time, and the split into imports /
  model load / read / network / write measured in-process along the same library calls the command
  makes (``validate_cases``, ``Predictor``, ``run_batch``'s reader, ``Predictor.predict``, the writers).

Goals (issue 23): /healthz within 1 s of start; --help under 0.5 s; a one-case predict's time before
the first read under half of the 7 s measured before this change.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_app_support import free_port  # noqa: E402

EXAMPLE = REPO / "resunet" / "data" / "example" / "colin27_t1.nii.gz"
BUNDLED = REPO / "resunet" / "data" / "model" / "brain_extraction.pt"
COMMANDS = ["", "convert", "train", "predict", "export", "info", "evaluate", "audit", "app", "serve"]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def import_table(cmd: list[str], top: int = 15) -> list[tuple[str, float, float]]:
    """(module, self s, cumulative s) of ``python -X importtime`` + cmd, the ``top`` slowest top-level imports
    and their biggest children."""
    res = subprocess.run([sys.executable, "-X", "importtime", *cmd], cwd=REPO, capture_output=True, text=True)
    rows = []
    for line in res.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum_us, name = line.replace("import time:", "").split("|", 2)
        depth = (len(name) - len(name.lstrip())) // 2
        if depth <= 1:  # the modules imported directly and their own imports
            rows.append(("  " * depth + name.strip(), int(self_us) / 1e6, int(cum_us) / 1e6))
    rows.sort(key=lambda r: -r[2])
    return rows[:top]


def serve_times(model: Path, state: Path) -> tuple[float, float, subprocess.Popen]:
    """(s to /healthz, s to /readyz) of a fresh ``resunet serve`` on ``state``; the process keeps running."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "resunet", "serve", "--port", str(port), "--state-dir", str(state),
                             "--model", str(model), "--no-tta", "--no-audit"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    health = ready = None
    while ready is None and time.perf_counter() - t0 < 600:
        if proc.poll() is not None:
            raise SystemExit(f"resunet serve exited with {proc.returncode}: {' '.join(proc.args)}")
        try:
            if health is None and httpx.get(url + "/healthz", timeout=5).status_code == 200:
                health = time.perf_counter() - t0
            if health is not None and httpx.get(url + "/readyz", timeout=5).status_code == 200:
                ready = time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        # probes at 20 Hz, then 5 Hz: faster polling takes the GIL from the model load it times
        time.sleep(0.05 if health is None else 0.2)
    return health or float("nan"), ready or float("nan"), proc


PREDICT_SPLIT = r"""
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from resunet.inference.batch import BatchOptions, run_batch
from resunet.inference.cases import discover_cases
from resunet.inference.predictor import Predictor
from resunet.inference.validate import validate_cases
from resunet.io.loader import load_study
from resunet.io.nifti import write_mask_nifti
t_imports = time.perf_counter() - t0
t = time.perf_counter(); cases = discover_cases([sys.argv[1]]); validate_cases(cases, None, None)
pred = Predictor(sys.argv[2], tta=False); t_model = time.perf_counter() - t
t = time.perf_counter(); vol = load_study(sys.argv[1]); t_read = time.perf_counter() - t
t = time.perf_counter(); p = pred.predict(vol); t_predict = time.perf_counter() - t
t = time.perf_counter(); write_mask_nifti(p.mask, Path(sys.argv[3]) / "mask.nii.gz"); t_write = time.perf_counter() - t
print(json.dumps({"imports": t_imports, "model load": t_model, "read": t_read,
                  "network": p.timings.get("network", float("nan")),
                  "predict (all)": t_predict, "write": t_write}))
"""


class _Printed(list):
    """A list of output lines that prints each line as it is added (a slow run shows its progress)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self += lines

    def __iadd__(self, lines):  # type: ignore[override]
        for line in lines:
            print(line, flush=True)
        self.extend(lines)
        return self

    def append(self, line: str) -> None:  # type: ignore[override]
        print(line, flush=True)
        super().append(line)


def med(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model", type=Path, default=BUNDLED)
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = ap.parse_args()
    out = _Printed([f"machine load before: {uptime()}", ""])

    out += ["## --help (s, wall time of the process, median of %d)" % args.runs, "", "| command | s |", "|---|---:|"]
    for c in COMMANDS:
        cmd = [sys.executable, "-m", "resunet", *([c] if c else []), "--help"]
        out.append(f"| resunet {c + ' ' if c else ''}--help | {med([wall(cmd) for _ in range(args.runs)])} |")

    out += ["", "## resunet serve (s from the process start, median of %d)" % args.runs, "",
            "| start | /healthz | /readyz |", "|---|---:|---:|"]
    clean: list[tuple[float, float]] = []
    killed: list[tuple[float, float]] = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            h, r, proc = serve_times(args.model, Path(d) / "state")
            clean.append((h, r))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            h, r, proc = serve_times(args.model, Path(d) / "state")
            killed.append((h, r))
            proc.terminate()
            proc.wait(timeout=30)
    for name, rows in (("clean start", clean), ("after SIGKILL", killed)):
        out.append(f"| {name} | {med([h for h, _ in rows])} | {med([r for _, r in rows])} |")

    out += ["", "## one-case resunet predict (example NIfTI, TTA off; s, median of %d)" % args.runs, ""]
    walls, splits = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            walls.append(wall([sys.executable, "-m", "resunet", "predict", str(EXAMPLE), "--out", d, "--model",
                               str(args.model), "--no-tta", "--no-audit", "--no-progress"]))
            res = subprocess.run([sys.executable, "-c", PREDICT_SPLIT, str(EXAMPLE), str(args.model), d], cwd=REPO,
                                 capture_output=True, text=True, check=True)
            splits.append(json.loads(res.stdout.splitlines()[-1]))
    out += ["| part | s |", "|---|---:|", f"| `resunet predict` wall time | {med(walls)} |"]
    for key in splits[0]:
        out.append(f"| {key} | {med([s[key] for s in splits])} |")

    for title, cmd in (("resunet predict --help", ["-m", "resunet", "predict", "--help"]),
                       ("a one-case predict's imports", ["-c", PREDICT_SPLIT.split("t_imports")[0]])):
        out += ["", f"## import time per module: {title} (one run; top-level imports and their children)", "",
                "| module | self s | cumulative s |", "|---|---:|---:|"]
        out += [f"| {m} | {s:.3f} | {c:.3f} |" for m, s, c in import_table(cmd)]
    out += ["", f"machine load after: {uptime()}"]
    text = "\n".join(out) + "\n"
    if args.out:
        from resunet.io.atomic import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
