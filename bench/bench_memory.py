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

Usage: ``.venv/bin/python bench/bench_memory.py [--slices 2000] [--dicom] [--out bench/results/memory.md]``.
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


def measure(label: str, study: Path, model: Path, tmp: Path) -> list[str]:
    from resunet.io.limits import Limits

    lines = [f"### {label}", ""]
    res, wall = run_py(STAGES_CODE, str(study), str(model), str(tmp / f"mask-{label}.nii.gz"))
    data = next((json.loads(ln[7:]) for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if data is None:
        return lines + [f"stages run failed (exit {res.returncode}): `{res.stderr.strip()[-800:]}`", ""]
    n_vox = int(np.prod(data["shape"]))
    est = Limits().estimate_bytes(n_vox, np.dtype(data["dtype"]).itemsize)
    lines += [
        f"Input {'x'.join(map(str, data['shape']))} {data['dtype']} ({gb(data['input_bytes'])} GB of voxels, "
        f"{n_vox / 1e6:.0f} M voxels); stage run {wall:.0f} s wall, load average after {loadavg()}.",
        "",
        "| stage | peak RSS GB | seconds |",
        "|---|---|---|",
    ]
    times = data["times"]
    tkey = {"read": "read", "prepare": "prepare", "windows": "sliding_window", "restore": "restore",
            "postprocess": "postprocess", "write mask": "write"}
    for s in data["order"]:
        if s in ("start", "end"):
            continue
        sec = times.get(tkey.get(s, ""), "")
        lines.append(f"| {s} | {gb(data['peaks'][s])} | {sec if sec == '' else f'{sec:.1f}'} |")
    top = max(data["peaks"].values())
    per_voxel = (top - data["input_bytes"] - data["peaks"].get("imports + model", 0)) / n_vox
    lines += [
        "",
        f"Peak {gb(top)} GB; above the input and the imported libraries + model "
        f"({gb(data['peaks'].get('imports + model', 0))} GB) that is {per_voxel:.1f} bytes per input voxel "
        f"(resunet.io.limits counts {Limits().estimate_bytes(1, 0) - Limits().estimate_bytes(0, 0)} + itemsize).",
        "",
    ]
    out = tmp / f"cli-{label}"
    res, wall = run_py(CLI_CODE, "predict", str(study), "--out", str(out), "--model", str(model), "--no-audit",
                       "--no-progress", "--no-tta")
    peak = next((int(ln.split()[1]) for ln in res.stdout.splitlines() if ln.startswith("PEAK_RSS")), None)
    lines += [
        f"`resunet predict {study.name} --no-tta` (fresh process, default limit {Limits().max_memory_gb:g} GB): "
        f"exit {res.returncode}, peak RSS **{gb(peak) if peak else '?'} GB**, {wall:.0f} s wall; "
        f"the limit's estimate for this input: {gb(est)} GB.",
        "",
    ]
    if res.returncode != 0:
        lines += [f"stderr: `{res.stderr.strip()[-600:]}`", ""]
    if study.suffix == ".nii":
        res, _ = run_py(BASELINE_CODE, str(study))
        peak = next((int(ln.split()[1]) for ln in res.stdout.splitlines() if ln.startswith("PEAK_RSS")), None)
        lines += [f"Baseline, nibabel reading the file and nothing else: peak RSS {gb(peak) if peak else '?'} GB.", ""]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=2000)
    ap.add_argument("--model", default=str(BUNDLED))
    ap.add_argument("--dicom", action="store_true", help="also measure the same CT as a DICOM series")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "memory.md"))
    args = ap.parse_args()
    lines = [
        "# Memory of one large case",
        "",
        f"Command: `{shlex.join(['.venv/bin/python', 'bench/bench_memory.py', *sys.argv[1:]])}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PHYS_PAGES') * PAGE / 2**30:.0f} GB RAM; load average at start {loadavg()} (shared machine); "
        f"model {args.model}; 2 torch threads.",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmpd:
        tmp = Path(tmpd)
        t0 = time.perf_counter()
        ct = write_ct(tmp / f"ct512x512x{args.slices}.nii", args.slices)
        lines += [f"Synthetic CT written in {time.perf_counter() - t0:.0f} s.", ""]
        lines += measure(f"NIfTI 512x512x{args.slices}", ct, Path(args.model), tmp)
        if args.dicom:
            t0 = time.perf_counter()
            folder = write_dicom(ct, tmp / "dicom")
            ct.unlink()
            lines += [f"DICOM series ({args.slices} files) written in {time.perf_counter() - t0:.0f} s.", ""]
            lines += measure(f"DICOM 512x512x{args.slices}", folder, Path(args.model), tmp)
    lines += [f"Load average at end: {loadavg()}", ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
