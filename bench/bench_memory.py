"""Memory of segmenting a large CT, stage by stage: the measured plan behind ``resunet.io.limits``.

Writes a synthetic 512x512xN int16 CT (0.7 x 0.7 x 0.5 mm, a body-like ellipse in air; N = 2000 by
default: a whole-body scan) as NIfTI (and with ``--dicom`` as a DICOM series written by resunet's
DICOM writer), then in fresh processes:

1. ``stages``: reads it with ``resunet.io.load_study`` and segments it with the ``Predictor`` (bundled
   model, no TTA), sampling the process's resident memory (``/proc/self/statm``) every 5 ms in a
   thread and attributing each sample to the stage the Predictor reports through its ``progress``
   callback (read, prepare = reorient + resample + normalise, windows = sliding-window network and
   blending, restore = probabilities back on the input grid + argmax, postprocess, write mask);
2. ``cli``: the whole ``resunet predict --no-tta`` command, peak RSS from ``getrusage`` (the figure a
   user sees), under the default ``--max-memory-gb`` so the limit's estimate can be compared with it;
3. ``baseline``: nibabel reading the same file and nothing else (the lower bound: the input itself).

Usage: ``.venv/bin/python bench/bench_memory.py [--slices 2000] [--dicom] [--out bench/results/memory.md]``;
``--render bench/results/memory.json --out bench/results/memory.md`` rewrites the results file from its
JSON. ``--out`` writes the whole results file (with the memory plan derived from the figures and the
current ``resunet.io.limits`` estimate) and its figures to the same name ``.json``, atomically.
The machine is shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "resunet" / "data" / "model" / "brain_extraction.pt"
SPACING = (0.7, 0.7, 0.5)  # mm, the synthetic CT's voxel size (write_ct)
PAGE = os.sysconf("SC_PAGE_SIZE")


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def write_ct(path: Path, slices: int) -> Path:
    """512x512xslices int16 CT, 0.7x0.7x0.5 mm, LPS-like axes: an elliptic body of soft tissue in air."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    arr = np.empty((512, 512, slices), dtype=np.int16, order="F")
    yy, xx = np.mgrid[-256:256, -256:256]
    body = (xx / 220.0) ** 2 + (yy / 160.0) ** 2 < 1
    base = np.where(body, 40, -1000).astype(np.int16)
    for k in range(slices):
        arr[:, :, k] = base + rng.integers(-20, 20, size=(512, 512), dtype=np.int16)
    nib.save(nib.Nifti1Image(arr, np.diag([-0.7, -0.7, 0.5, 1.0])), str(path))
    return path


def write_dicom(nifti: Path, folder: Path) -> Path:
    from resunet.io import load_study, write_dicom_series

    write_dicom_series(load_study(nifti), folder, modality="CT")
    return folder


STAGES_CODE = r"""
import json, os, sys, threading, time
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE
stage = ["start"]
peaks = {}
order = []
stop = [False]
def sample():
    while not stop[0]:
        r = rss(); s = stage[0]
        if s not in peaks:
            peaks[s] = 0; order.append(s)
        peaks[s] = max(peaks[s], r)
        time.sleep(0.005)
t = threading.Thread(target=sample, daemon=True); t.start()
def enter(name):
    time.sleep(0.02); stage[0] = name
enter("imports + model")
import numpy as np
from resunet.inference import Predictor
from resunet.io import load_study, write_mask_nifti
pred = Predictor(sys.argv[2], device="cpu", tta=False)
enter("read")
t0 = time.perf_counter()
vol = load_study(sys.argv[1])
times = {"read": time.perf_counter() - t0}
def progress(name, done, total):
    if done == 0 and stage[0] != name:
        enter(name)
t0 = time.perf_counter()
out = pred.predict(vol, progress=progress)
times.update(out.timings)
enter("write mask")
t0 = time.perf_counter()
write_mask_nifti(out.mask, sys.argv[3])
times["write"] = time.perf_counter() - t0
enter("end")
time.sleep(0.05)
stop[0] = True; t.join()
print("RESULT", json.dumps({"order": order, "peaks": peaks, "times": times,
      "input_bytes": int(vol.array.nbytes), "shape": list(vol.shape), "dtype": str(vol.array.dtype),
      "brain_ml": out.volumes_ml}))
"""

CLI_CODE = (
    "import resource, sys; from resunet.cli import main; code = main(sys.argv[1:]); "
    "print('PEAK_RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024); sys.exit(code)"
)

BASELINE_CODE = (
    "import resource, sys, numpy as np, nibabel as nib; a = np.asanyarray(nib.load(sys.argv[1]).dataobj); "
    "print('PEAK_RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
)


def run_py(code: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return res, time.perf_counter() - t0


def gb(n: float) -> str:
    return f"{n / 2**30:.2f}"


def measure(label: str, study: Path, model: Path, tmp: Path) -> dict:
    """Run the three measurements on ``study``; the figures as a dict (rendered by :func:`render_input`)."""
    from resunet.io.limits import WORK_BYTES_PER_VOXEL, Limits

    rec: dict = {"label": label, "work_bytes_per_voxel": WORK_BYTES_PER_VOXEL}
    res, wall = run_py(STAGES_CODE, str(study), str(model), str(tmp / f"mask-{label}.nii.gz"))
    data = next((json.loads(ln[7:]) for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if data is None:
        rec["failed"] = f"stages run failed (exit {res.returncode}): `{res.stderr.strip()[-800:]}`"
        return rec
    n_vox = int(np.prod(data["shape"]))
    top = max(data["peaks"].values())
    rec.update(data)
    rec.update(wall_s=wall, load_after=loadavg(),
               per_voxel=(top - data["input_bytes"] - data["peaks"].get("imports + model", 0)) / n_vox)
    out = tmp / f"cli-{label}"
    res, wall = run_py(CLI_CODE, "predict", str(study), "--out", str(out), "--model", str(model), "--no-audit",
                       "--no-progress", "--no-tta")
    peak = next((int(ln.split()[1]) for ln in res.stdout.splitlines() if ln.startswith("PEAK_RSS")), None)
    rec["cli"] = {"name": study.name, "code": res.returncode, "peak": peak, "wall_s": wall,
                  "limit_gb": Limits().max_memory_gb,
                  "est_bytes": Limits().estimate_bytes(n_vox, np.dtype(data["dtype"]).itemsize),
                  "stderr": res.stderr.strip()[-600:] if res.returncode != 0 else None}
    if study.suffix == ".nii":
        res, _ = run_py(BASELINE_CODE, str(study))
        rec["baseline_peak"] = next((int(ln.split()[1]) for ln in res.stdout.splitlines() if ln.startswith("PEAK_RSS")), None)
    return rec


TKEY = {"read": "read", "prepare": "prepare", "windows": "sliding_window", "restore": "restore",
        "postprocess": "postprocess", "write mask": "write"}
#: what each stage holds at its peak, for the memory plan (written from the Predictor's code, not measured)
ALIVE = {
    "read": "the input; DICOM also the decoded slices while stacking",
    "prepare": "input + the interpolation's float buffers + the model-grid volume",
    "windows": "input + model-grid input, class probabilities, blending weights + torch workspaces",
    "restore": "input + one float32 input-sized channel + uint8 mask",
    "postprocess": "input + mask + int32 component labels of the mask's bounding box",
    "write mask": "input + mask + gzip buffers",
}


def render_input(rec: dict) -> list[str]:
    lines = [f"### {rec['label']}", ""]
    if rec.get("failed"):
        return lines + [rec["failed"], ""]
    n_vox = int(np.prod(rec["shape"]))
    lines += [
        f"Input {'x'.join(map(str, rec['shape']))} {rec['dtype']} ({gb(rec['input_bytes'])} GB of voxels, "
        f"{n_vox / 1e6:.0f} M voxels); stage run {rec['wall_s']:.0f} s wall, load average after {rec['load_after']}.",
        "",
        "| stage | peak RSS GB | seconds |",
        "|---|---|---|",
    ]
    for s in rec["order"]:
        if s in ("start", "end"):
            continue
        sec = rec["times"].get(TKEY.get(s, ""), "")
        lines.append(f"| {s} | {gb(rec['peaks'][s])} | {sec if sec == '' else f'{sec:.1f}'} |")
    top = max(rec["peaks"].values())
    cli = rec["cli"]
    lines += [
        "",
        f"Peak {gb(top)} GB; above the input and the imported libraries + model "
        f"({gb(rec['peaks'].get('imports + model', 0))} GB) that is {rec['per_voxel']:.1f} bytes per input voxel "
        f"(resunet.io.limits counted {rec['work_bytes_per_voxel']} + itemsize when this ran).",
        "",
        f"`resunet predict {cli['name']} --no-tta` (fresh process, default limit {cli['limit_gb']:g} GB): "
        f"exit {cli['code']}, peak RSS **{gb(cli['peak']) if cli['peak'] else '?'} GB**, {cli['wall_s']:.0f} s wall; "
        f"the limit's estimate for this input when this ran: {gb(cli['est_bytes'])} GB.",
        "",
    ]
    if cli.get("stderr"):
        lines += [f"stderr: `{cli['stderr']}`", ""]
    if rec.get("baseline_peak") is not None:
        lines += [f"Baseline, nibabel reading the file and nothing else: peak RSS {gb(rec['baseline_peak'])} GB.", ""]
    return lines


def render(doc: dict) -> str:
    """The whole results file for ``doc`` (what ``main`` stores in the ``.json``)."""
    from resunet.io.limits import BASE_BYTES, WORK_BYTES_PER_VOXEL, Limits

    lines = [
        "# Memory of one large case (bench/bench_memory.py)", "",
        "Written whole by `bench/bench_memory.py --out`, figures in the `.json` of the same name (`--render JSON",
        "--out MD` rewrites this file from it; the last section uses the current `resunet.io.limits`).", "",
        f"Command: `{doc['command']}`",
        f"Machine: {doc['machine']}, {doc['cpus']} CPUs, {doc['ram_gb']:.0f} GB RAM; load average at start "
        f"{doc['load_start']} (shared machine); model {doc['model']}; 2 torch threads.", "",
        f"Synthetic CT written in {doc['ct_written_s']:.0f} s.", "",
    ]
    for rec in doc["inputs"]:
        if rec.get("written_s") is not None:
            lines += [f"DICOM series ({rec['files']} files) written in {rec['written_s']:.0f} s.", ""]
        lines += render_input(rec)
    lines += [f"Load average at end: {doc['load_end']}", ""]
    ok = [r for r in doc["inputs"] if not r.get("failed")]
    if not ok:
        return "\n".join(lines)
    first = ok[0]
    n_vox = int(np.prod(first["shape"]))
    itemsize = np.dtype(first["dtype"]).itemsize
    ext = " x ".join(f"{n * s:.0f}" for n, s in zip(first["shape"], SPACING))
    peaks = lambda stage: " ".join(f"{gb(r['peaks'][stage])}" if k == 0 else f"[{gb(r['peaks'][stage])}]"  # noqa: E731
                                   for k, r in enumerate(ok) if stage in r["peaks"])
    lines += [
        f"## Memory plan for a {'x'.join(map(str, first['shape']))} CT (from the figures above)", "",
        f"Input: {n_vox / 1e6:.0f} M voxels, {first['dtype']} = {gb(first['input_bytes'])} GB (GB = 2^30 bytes), "
        f"{' x '.join(f'{s:g}' for s in SPACING)} mm, i.e. {ext} mm. Peak RSS per stage, process included "
        f"({gb(first['peaks'].get('imports + model', 0))} GB of Python, torch and the model); "
        + " and ".join(r["label"] for r in ok[:1]) + (f" [{', '.join(r['label'] for r in ok[1:])} in brackets]" if ok[1:] else "") + ":", "",
        "| stage | what is alive | peak RSS GB |", "|---|---|---|",
    ]
    for stage, alive in ALIVE.items():
        lines.append(f"| {stage} | {alive} | {peaks(stage)} |")
    cli_peaks = [r["cli"]["peak"] for r in ok if r["cli"].get("peak")]
    lines.append("| whole `resunet predict` (fresh process; DICOM: + DICOM SEG output) | the above, plus the SEG's frames "
                 "for DICOM input | " + " ".join(gb(p) if k == 0 else f"[{gb(p)}]" for k, p in enumerate(cli_peaks)) + " |")
    est = Limits().estimate_bytes(n_vox, itemsize)
    worst = max(cli_peaks + [max(r["peaks"].values()) for r in ok])
    limit = Limits().max_memory_gb
    lines += [
        "",
        f"The limit (`resunet/io/limits.py`) now estimates `voxels x (itemsize + {WORK_BYTES_PER_VOXEL}) + "
        f"{BASE_BYTES / 2**30:g} GiB` = {gb(est)} GB for this scan, "
        + ("above" if est >= worst else "BELOW") + f" the worst measured peak ({gb(worst)} GB) and "
        + ("under" if est <= limit * 2**30 else "over") + f" the {limit:g} GB default. The seconds depend on the load "
        "(the load averages above); the memory figures do not.", "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=2000)
    ap.add_argument("--model", default=str(BUNDLED))
    ap.add_argument("--dicom", action="store_true", help="also measure the same CT as a DICOM series")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "memory.md"))
    ap.add_argument("--render", type=Path, metavar="JSON", help="no measuring: write --out from this JSON")
    args = ap.parse_args()
    from resunet.io.atomic import atomic_write_text

    if args.render:
        atomic_write_text(args.out, render(json.loads(args.render.read_text())))
        return 0
    doc = {
        "command": shlex.join([".venv/bin/python", "bench/bench_memory.py", *sys.argv[1:]]),
        "machine": platform.machine(), "cpus": os.cpu_count(), "ram_gb": os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30,
        "load_start": loadavg(), "model": args.model, "inputs": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmpd:
        tmp = Path(tmpd)
        t0 = time.perf_counter()
        ct = write_ct(tmp / f"ct512x512x{args.slices}.nii", args.slices)
        doc["ct_written_s"] = time.perf_counter() - t0
        doc["inputs"].append(measure(f"NIfTI 512x512x{args.slices}", ct, Path(args.model), tmp))
        if args.dicom:
            t0 = time.perf_counter()
            folder = write_dicom(ct, tmp / "dicom")
            ct.unlink()
            written = time.perf_counter() - t0
            rec = measure(f"DICOM 512x512x{args.slices}", folder, Path(args.model), tmp)
            doc["inputs"].append({**rec, "written_s": written, "files": args.slices})
    doc["load_end"] = loadavg()
    text = render(doc)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=1) + "\n")
    atomic_write_text(out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
