"""Hostile clients against `resunet serve` (issue 22), run by hand; writes bench/results/serve_hostile.md whole.

    .venv/bin/python bench/serve_hostile.py [--model M | --tiny] [--kills 3] [--parallel 8]

One service on loopback (TTA off; its DICOM node on too), then, in this order:

1. **bad uploads**: every input of the corpus below, one request each; classified ``clean 4xx``
   (one-line JSON ``detail``, no traceback, no server path), ``accepted`` (202; the job's end state
   is waited for and reported: a bad input may only be refused by the worker), ``5xx`` or ``other``;
   the service log is searched for tracebacks afterwards.
2. **memory** (run first, on the fresh service): ``--parallel`` concurrent uploads of a 600^3 all-zero volume (216 MB of voxels, about
   210 KB gzipped): the service's peak RSS (``VmHWM`` of /proc) before and after.
3. **kills**: 16 parallel zip uploads with a SIGKILL of the service while an extraction is on disk,
   ``--kills`` times, restarting it each time: files left in the machine's temp folder (the service
   runs with ``TMPDIR`` pointing to a folder of its own) and in ``STATE/tmp`` after the last restart.
4. **DICOM node flood**: 40 idle TCP connections from 127.0.0.2, then a real C-STORE of the example
   series from 127.0.0.1 (pynetdicom): stored or not, and how long it took.
5. **permissions**: entries under the state folder readable by others (folders not 0700, files not 0600).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import io
import json
import os
import platform
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np

from bench_serve import BUNDLED, EXAMPLE, REPO, ServiceProcess, uptime

from resunet.io.atomic import atomic_write_text

EXAMPLE_DICOM = REPO / "resunet" / "data" / "example" / "colin27_t1_dicom"
RESULTS = REPO / "bench" / "results" / "serve_hostile.md"


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _nii_gz(arr: np.ndarray, affine: np.ndarray | None = None) -> bytes:
    return gzip.compress(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine).to_bytes(), 6)


def corpus() -> dict[str, list[tuple[str, bytes]]]:
    """name -> files of one request."""
    import pydicom

    t1 = EXAMPLE.read_bytes()
    img = nib.load(str(EXAMPLE))
    data = np.asarray(img.dataobj).astype(np.float32)
    part = data.copy()
    part[:, :, :5] = np.nan
    dicom = {p.name: p.read_bytes() for p in sorted(EXAMPLE_DICOM.glob("*.dcm"))}
    split = {}
    for i, (name, raw) in enumerate(dicom.items()):
        ds = pydicom.dcmread(io.BytesIO(raw))
        if i % 2:
            small = np.ascontiguousarray(ds.pixel_array[:64, :64])
            ds.Rows, ds.Columns = small.shape
            ds.PixelData = small.tobytes()
        b = io.BytesIO()
        ds.save_as(b, enforce_file_format=True)
        split[name] = b.getvalue()
    rng = np.random.default_rng(0)
    return {
        "truncated .nii.gz": [("t1.nii.gz", t1[: len(t1) // 2])],
        "text named .nii.gz": [("notes.nii.gz", b"not a scan\n" * 50)],
        "4D NIfTI": [("fmri.nii.gz", _nii_gz(np.zeros((4, 4, 4, 3), np.int16)))],
        "all-NaN NIfTI": [("nan.nii.gz", _nii_gz(np.full(data.shape, np.nan, np.float32), img.affine))],
        "constant NIfTI": [("flat.nii.gz", _nii_gz(np.full(data.shape, 7, np.int16), img.affine))],
        "partly NaN NIfTI (accepted, warning)": [("fov.nii.gz", _nii_gz(part, img.affine))],
        "empty zip": [("empty.zip", _zip({}))],
        "zip-slip": [("evil.zip", _zip({"../../x.dcm": b"x" * 100, "ok/a.dcm": b"y" * 100}))],
        "random bytes .dcm": [("IM0001.dcm", rng.bytes(4096))],
        "empty file": [("empty.dcm", b"")],
        "NIfTI + DICOM mixed": [("t1.nii.gz", t1), ("IM0001.dcm", rng.bytes(512))],
        "series of two sizes": [("split.zip", _zip(split))],
        "2-slice series": [("two.zip", _zip(dict(list(dicom.items())[40:42])))],
        "600^3 zeros (gzip bomb)": [("bomb.nii.gz", _nii_gz(np.zeros((600, 600, 600), np.uint8)))],
        "PHI-named upload (accepted)": [("Doe_John_MRN0012345_DOB19600101.nii.gz", t1)],
    }


def classify(r: httpx.Response, root: Path) -> str:
    if r.status_code == 202:
        return "accepted"
    try:
        detail = r.json().get("detail")
    except ValueError:
        detail = None
    if 400 <= r.status_code < 500 and isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail \
            and str(root) not in detail:
        return "clean 4xx"
    return "5xx" if r.status_code >= 500 else "other"


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_state(url: str, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=60).json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.3)
    return {"state": "timeout"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=BUNDLED)
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny untrained checkpoint (a smoke run)")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    load_before = uptime()
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    systmp = root / "systmp"
    systmp.mkdir()
    os.environ["TMPDIR"] = str(systmp)  # the service's children inherit it: what is left there is counted
    if args.tiny:
        from test_app_support import make_tiny_model

        args.model = make_tiny_model(root / "tiny.pt")
    from test_app_support import free_port

    state = root / "state"
    dicom_port = free_port()
    extra = ["--no-tta", "--max-upload-mb", "100", "--dicom-port", str(dicom_port), "--settle-seconds", "1"]
    os.umask(0o022)
    svc = ServiceProcess(state, args.model, *extra, audit_db=root / "audit.sqlite", log_path=root / "serve.log")
    svc.start(timeout=600)
    url = svc.url
    lines: list[str] = []

    # 2. memory: parallel 600^3 zero uploads
    bomb = _nii_gz(np.zeros((600, 600, 600), np.uint8))
    rss_before = vm_hwm_mb(svc.proc.pid)
    codes: list[int] = []

    def send() -> None:
        codes.append(httpx.post(url + "/v1/jobs", files=[("files", ("zeros.nii.gz", bomb))], timeout=600).status_code)

    threads = [threading.Thread(target=send) for _ in range(args.parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rss_after = vm_hwm_mb(svc.proc.pid)
    for j in httpx.get(url + "/v1/jobs", timeout=60).json()["jobs"]:  # the worker runs them one at a time
        wait_state(url, j["id"])
    rss_jobs = vm_hwm_mb(svc.proc.pid)

    # 1. bad uploads
    rows = []
    counts: dict[str, int] = {}
    for name, files in corpus().items():
        r = httpx.post(url + "/v1/jobs", files=[("files", (n, b)) for n, b in files], timeout=600)
        kind = classify(r, root)
        end = ""
        if kind == "accepted":
            job = wait_state(url, r.json()["id"])
            end = job["state"] + (f": {job.get('error')}" if job["state"] == "failed" else "")
            if job.get("result", {}).get("warnings"):
                end += f" (warning: {job['result']['warnings'][0][:80]}...)"
        detail = r.json().get("detail", "") if r.headers.get("content-type", "").startswith("application/json") else r.text
        counts[kind] = counts.get(kind, 0) + 1
        rows.append(f"| {name} | {r.status_code} | {kind} | {str(detail)[:110] if kind != 'accepted' else end[:110]} |")
    tracebacks = svc.log().count("Traceback")

    # 3. kills during parallel zip uploads
    zbody = _zip({p.name: p.read_bytes() for p in sorted(EXAMPLE_DICOM.glob("*.dcm"))})
    caught = 0
    for _ in range(args.kills):
        seen: list[Path] = []
        ts = [threading.Thread(target=lambda: _quiet(url, zbody)) for _ in range(16)]
        for t in ts:
            t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not seen:
            seen = [p for d in (systmp, state / "tmp") if d.exists() for p in d.glob("resunet-*")]
            time.sleep(0.002)
        caught += bool(seen)
        svc.kill()
        for t in ts:
            t.join(60)
        svc.stop()
        svc = ServiceProcess(state, args.model, *extra, audit_db=root / "audit.sqlite", log_path=root / "serve.log")
        svc.start(timeout=600)
    left_sys = sum(1 for _ in systmp.rglob("*"))
    left_state = sum(1 for _ in (state / "tmp").rglob("*")) if (state / "tmp").exists() else 0

    # 4. DICOM node flood
    from resunet.pacs.dimse import Destination, send_files

    idle = []
    for _ in range(40):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", dicom_port))
        idle.append(s)
    t0 = time.monotonic()
    try:
        send_files(sorted(EXAMPLE_DICOM.glob("*.dcm")), Destination("127.0.0.1", dicom_port, "RESUNET"), timeout=30)
        flood = f"stored 91 instances in {time.monotonic() - t0:.1f} s"
    except Exception as err:  # noqa: BLE001 - the result is the measurement
        flood = f"NOT stored ({type(err).__name__}: {err})"
    for s in idle:
        s.close()

    # 5. permissions
    loose = [p for p in [state, *state.rglob("*")] if not p.is_symlink()
             and (p.stat().st_mode & 0o777) != (0o700 if p.is_dir() else 0o600)]
    svc.stop()

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += [
        "# `resunet serve` against hostile clients (issue 22)",
        "",
        f"Written by `{shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}` on {when}, "
        f"{platform.node()} ({os.cpu_count()} CPUs), load before: {load_before}, after: {uptime()}. "
        f"Model: {'tiny untrained (smoke run)' if args.tiny else args.model.name}, TTA off.",
        "",
        "## 1. Bad uploads, one request each",
        "",
        "| input | HTTP | class | detail (cut) / end state of an accepted job |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Inputs tried: {len(rows)}; " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        + f"; tracebacks in the service log: {tracebacks}.",
        "",
        "## 2. Memory, 3. kills, 4. DICOM flood, 5. permissions",
        "",
        "| check | result |",
        "|---|---|",
        f"| {args.parallel} parallel uploads of a 600^3 zero volume (210 KB gzipped) | HTTP {sorted(set(codes))}; "
        f"service peak RSS {rss_before:.0f} MB before, {rss_after:.0f} MB once every upload was answered, "
        f"{rss_jobs:.0f} MB after the worker ran the jobs (one at a time) |",
        f"| {args.kills} SIGKILLs during 16 parallel zip uploads ({caught} with an extraction on disk) | files left: "
        f"{left_sys} in the machine's temp folder, {left_state} in STATE/tmp after the restart |",
        f"| 40 idle sockets from 127.0.0.2, then a C-STORE of the example (91 instances) | {flood} |",
        f"| state folder entries readable by others (umask 022) | {len(loose)} |",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "\n".join(lines))
    print("\n".join(lines))
    return 0


def _quiet(url: str, body: bytes) -> None:
    try:
        httpx.post(url + "/v1/jobs", files=[("files", ("series.zip", body))], timeout=120)
    except Exception:  # noqa: BLE001 - the service is killed under the uploads on purpose
        pass


if __name__ == "__main__":
    sys.exit(main())
