"""Hostile-input corpus: bad scans, archives and label maps through convert, predict and evaluate.

Generates the inputs in a temp folder (``--work``, default under /tmp), then runs, in fresh processes:

- ``resunet convert INPUT out.nii.gz`` on every scan input (one run each);
- ``resunet predict`` on each bomb-like input alone (peak memory of the worst cases, model load
  included) and once on the whole corpus folder (every case recorded in predictions.json);
- ``resunet evaluate`` on each bad prediction folder against a good reference.

Each run is classified: ``accepted`` (exit 0), ``clean refusal`` (exit 2, every stderr line of the
form ``resunet <cmd>: ...``, no traceback, no "internal error"), ``traceback``/``internal error``, or
``timeout``. Peak memory is the child's ``ru_maxrss`` (``os.wait4``). The table and the counts go to
``bench/results/hardening.md``. Usage: ``.venv/bin/python bench/hostile_inputs.py [--timeout 300]``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "resunet" / "data" / "model" / "brain_extraction.pt"
EXAMPLE = REPO / "resunet" / "data" / "example" / "colin27_t1.nii.gz"
EXAMPLE_DICOM = REPO / "resunet" / "data" / "example" / "colin27_t1_dicom"


# -- the corpus ---------------------------------------------------------------------------------------
def _header(shape, dtype=np.uint8, zooms=None) -> nib.Nifti1Header:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    zooms = zooms or (1.0,) * len(shape)
    hdr.set_zooms(zooms)
    hdr.set_sform(np.diag(list(zooms[:3]) + [1.0]), code=1)
    return hdr


def gz_bomb(path: Path, n: int = 1100) -> Path:
    """A real .nii.gz of n^3 uint8 zeros (about 1.3 MB for 1100^3), written in chunks."""
    hdr = _header((n, n, n))
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(hdr.binaryblock + b"\0\0\0\0")
        zeros = bytes(n * n * 16)
        left = n * n * n
        while left > 0:
            chunk = zeros[: min(len(zeros), left)]
            fh.write(chunk)
            left -= len(chunk)
    return path


def nifti(path: Path, array: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def nifti_raw_sform(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """A .nii.gz whose sform rows are written as given (nibabel refuses to build singular/NaN qforms)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(array.shape)
    hdr.set_data_dtype(array.dtype)
    hdr["vox_offset"] = 352
    hdr["qform_code"] = 0
    hdr["sform_code"] = 1
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[0], affine[1], affine[2]
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + np.asarray(array).tobytes(order="F")))
    return path


def dicom_file(path: Path, **overrides) -> Path:
    """One CT slice written with pydicom, attributes overridden (e.g. Rows=65535)."""
    import pydicom

    src = sorted(EXAMPLE_DICOM.iterdir())[0]
    ds = pydicom.dcmread(str(src))
    for k, v in overrides.items():
        if v is None:
            delattr(ds, k) if hasattr(ds, k) else None
        else:
            setattr(ds, k, v)
    ds.save_as(str(path))
    return path


def zip_of(path: Path, entries: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return path


def make_scans(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    good = nib.load(str(EXAMPLE))
    raw = EXAMPLE.read_bytes()
    arr = np.asarray(good.dataobj)
    out: dict[str, Path] = {}
    out["gzbomb_1100cubed"] = gz_bomb(d / "gzbomb.nii.gz")
    hdr = _header((4000, 4000, 4000))
    (d / "hdrbomb.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4))
    out["header_claims_64G"] = d / "hdrbomb.nii.gz"
    hdr = _header((32767, 32767, 32767), np.int16)
    (d / "hdrbomb_raw.nii").write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 4096)
    out["uncompressed_header_claims_70T"] = d / "hdrbomb_raw.nii"
    (d / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    out["truncated_gz"] = d / "truncated.nii.gz"
    (d / "text.nii.gz").write_text("this is not a scan\n")
    out["text_named_nii_gz"] = d / "text.nii.gz"
    (d / "empty.nii.gz").write_bytes(b"")
    out["empty_file"] = d / "empty.nii.gz"
    out["4d_5_volumes"] = nifti(d / "fourd.nii.gz", np.zeros((16, 16, 16, 5), np.int16))
    out["5d"] = nifti(d / "fived.nii.gz", np.zeros((8, 8, 8, 2, 2), np.int16))
    out["one_voxel"] = nifti(d / "one.nii.gz", np.ones((1, 1, 1), np.int16))
    out["2x2x2"] = nifti(d / "tiny.nii.gz", np.ones((2, 2, 2), np.int16))
    out["spacing_1e6_mm"] = nifti(d / "huge_spacing.nii.gz", arr, np.diag([1e6, 1e6, 1e6, 1.0]))
    out["spacing_500_mm"] = nifti(d / "coarse_spacing.nii.gz", arr, np.diag([500.0, 500.0, 500.0, 1.0]))
    out["spacing_1e-5_mm"] = nifti(d / "fine_spacing.nii.gz", arr, np.diag([1e-5, 1e-5, 1e-5, 1.0]))
    sing = np.eye(4)
    sing[2, 2] = 0
    out["singular_affine"] = nifti_raw_sform(d / "singular.nii.gz", arr, sing)
    nanaff = np.eye(4)
    nanaff[0, 3] = np.nan
    out["nan_affine"] = nifti_raw_sform(d / "nan_affine.nii.gz", arr, nanaff)
    nanvox = arr.astype(np.float32)
    nanvox[::7] = np.nan
    out["nan_voxels_image"] = nifti(d / "nan_voxels.nii.gz", nanvox, good.affine)
    inf = arr.astype(np.float32)
    inf[10:20] = np.inf
    out["inf_voxels_image"] = nifti(d / "inf_voxels.nii.gz", inf, good.affine)
    out["bool_image"] = nifti(d / "boolimg.nii.gz", (arr > 50).astype(np.uint8), good.affine)
    out["float64_image"] = nifti(d / "f64.nii.gz", arr.astype(np.float64), good.affine)
    out["zero_image"] = nifti(d / "zeros.nii.gz", np.zeros_like(arr), good.affine)
    # DICOM
    dd = d / "dicom_random"
    dd.mkdir()
    (dd / "IM0001.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    out["random_bytes_dcm"] = dd
    out["dicom_rows_65535"] = dicom_file(d / "rows65535.dcm", Rows=65535, Columns=65535)
    out["dicom_100000_frames"] = dicom_file(d / "frames.dcm", NumberOfFrames=100000)
    out["dicom_no_pixels"] = dicom_file(d / "nopix.dcm", PixelData=None)
    out["dicom_rgb"] = dicom_file(d / "rgb.dcm", SamplesPerPixel=3, PhotometricInterpretation="RGB")
    gap = d / "dicom_gap"
    shutil.copytree(EXAMPLE_DICOM, gap)
    files = sorted(gap.iterdir())
    files[len(files) // 2].unlink()
    out["dicom_missing_slice"] = gap
    # archives
    out["zip_slip"] = zip_of(d / "slip.zip", {"../../evil.dcm": b"x" * 10, "ok/a.dcm": b"y"})
    out["zip_ratio_bomb"] = zip_of(d / "ratio.zip", {"a.dcm": bytes(300 * 2**20)})
    out["zip_symlink"] = zip_of(d / "link.zip", {"a.dcm": b"x"}, symlink="b.dcm")
    out["zip_empty"] = zip_of(d / "emptyzip.zip", {})  # case ids must differ from empty.nii.gz's
    out["zip_with_gzbomb_nifti"] = zip_of(d / "nested.zip", {"scan.nii.gz": out["gzbomb_1100cubed"].read_bytes()})
    out["zip_truncated"] = d / "cut.zip"
    out["zip_truncated"].write_bytes(zip_of(d / "whole.zip", {"a.dcm": b"z" * 5000}).read_bytes()[:100])
    return out


def make_label_cases(d: Path) -> dict[str, Path]:
    """Prediction folders with one bad mask each, for evaluate against the reference in d/gt."""
    d.mkdir(parents=True, exist_ok=True)
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:15, 5:15, 5:15] = 1
    gt = d / "gt"
    gt.mkdir()
    img = nib.Nifti1Image(ref, np.eye(4))
    img.header.set_intent("label")
    nib.save(img, str(gt / "c1.nii.gz"))
    cases = {}

    def pred(name: str, array: np.ndarray, affine=None) -> None:
        p = d / name
        p.mkdir()
        nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(p / "c1.nii.gz"))
        cases[name] = p

    nan = ref.astype(np.float32)
    nan[0, 0, :3] = np.nan
    pred("nan_labels", nan)
    pred("float_labels", ref.astype(np.float32) * 0.5)
    pred("negative_labels", ref.astype(np.int16) * -1)
    pred("other_grid", ref, np.diag([2.0, 2.0, 2.0, 1.0]))
    pred("other_shape", np.zeros((10, 10, 10), np.uint8))
    pred("4d_labels", np.zeros((20, 20, 20, 2), np.uint8))
    bomb = d / "gzbomb_labels"
    bomb.mkdir()
    gz_bomb(bomb / "c1.nii.gz", 1100)
    cases["gzbomb_labels"] = bomb
    empty = d / "no_masks"
    empty.mkdir()
    cases["empty_folder"] = empty
    return cases


def pickle_model(path: Path) -> Path:
    """A checkpoint whose unpickling would run code (writes a marker file if it ever executes)."""
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'PWNED'}",))

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "resunet-checkpoint/1", "state_dict": Evil()}, str(path))
    return path


# -- running ------------------------------------------------------------------------------------------
def run(argv: list[str], timeout: float) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "resunet", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        timed_out = True
    rss = getattr(proc, "maxrss", None)
    return {"argv": argv, "code": proc.returncode, "stderr": err.decode(errors="replace"),
            "stdout": out.decode(errors="replace"), "seconds": time.perf_counter() - t0, "timeout": timed_out,
            "maxrss": rss}


class _Popen(subprocess.Popen):
    """Popen that keeps the child's peak RSS (ru_maxrss, bytes) from wait4."""

    maxrss: int | None = None

    def _try_wait(self, wait_flags):  # noqa: D401 - CPython's hook around os.waitpid
        try:
            pid, sts, usage = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            pid, sts = self.pid, 0
            usage = None
        if pid == self.pid and usage is not None:
            self.maxrss = usage.ru_maxrss * 1024
        return pid, sts


subprocess.Popen = _Popen  # type: ignore[misc]


def classify(res: dict) -> str:
    text = res["stderr"]
    if res["timeout"]:
        return "timeout"
    if "Traceback" in text:
        return "traceback"
    if "internal error" in text:
        return "internal error"
    if res["code"] == 0:
        return "accepted"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    cmd = res["argv"][0]
    if res["code"] in (1, 2) and lines and all(ln.startswith(("resunet ", "INFO:", "WARNING:")) for ln in lines):
        if any(ln.startswith(f"resunet {cmd}:") for ln in lines):
            return "clean refusal"
    return f"unclear (exit {res['code']})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="folder for the corpus (default: a new temp folder)")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--model", default=str(BUNDLED))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "hardening.md"))
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="resunet-hostile-"))
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    scans = make_scans(work / "scans")
    labels = make_label_cases(work / "labels")
    evil = pickle_model(work / "evil" / "evil.pt")
    rows: list[tuple[str, str, dict]] = []

    for name, path in scans.items():
        rows.append(("convert", name, run(["convert", str(path), str(work / "conv" / f"{name}.nii.gz")], args.timeout)))
    for name in ("gzbomb_1100cubed", "header_claims_64G", "dicom_100000_frames", "zip_with_gzbomb_nifti", "spacing_1e6_mm",
                 "one_voxel", "spacing_500_mm"):
        rows.append(("predict", name, run(["predict", str(scans[name]), "--out", str(work / "pred" / name),
                                           "--model", args.model, "--no-progress", "--no-audit", "--no-tta"],
                                          args.timeout)))
    whole = run(["predict", str(work / "scans"), "--out", str(work / "pred_all"), "--model", args.model,
                 "--no-progress", "--no-audit", "--no-tta"], args.timeout * 4)
    rows.append(("predict", "whole corpus folder", whole))
    rows.append(("predict", "code-executing pickle as --model", run(
        ["predict", str(EXAMPLE), "--out", str(work / "pred_evil"), "--model", str(evil), "--no-progress",
         "--no-audit"], args.timeout)))
    for name, folder in labels.items():
        rows.append(("evaluate", name, run(["evaluate", "--pred", str(folder), "--gt", str(work / "labels" / "gt"),
                                             "--out", str(work / "eval" / name), "--workers", "1"], args.timeout)))

    counts: dict[str, int] = {}
    for _, _, res in rows:
        c = classify(res)
        counts[c] = counts.get(c, 0) + 1
    worst = max(rows, key=lambda r: r[2]["maxrss"] or 0)
    case_records = []
    summary = work / "pred_all" / "predictions.json"
    if summary.exists():
        case_records = json.loads(summary.read_text()).get("cases", [])
    internal = [r for r in case_records if "internal error" in (r.get("reason") or "")]
    lines = [
        "# Hostile inputs: convert, predict, evaluate",
        "",
        f"Command: `{shlex.join(['.venv/bin/python', 'bench/hostile_inputs.py', *sys.argv[1:]])}`; "
        f"corpus in {work}; load average {load0} at start, "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at end (shared 2-core machine); model {args.model}.",
        "",
        f"**{len(scans)} scan inputs + {len(labels)} label folders + 1 malicious checkpoint; {len(rows)} runs**: "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ". "
        f"The whole-corpus predict recorded {len(case_records)} cases "
        f"({sum(r.get('status') == 'ok' for r in case_records)} ok, "
        f"{sum(r.get('status') == 'failed' for r in case_records)} failed, {len(internal)} 'internal error'). "
        f"Worst peak memory: **{(worst[2]['maxrss'] or 0) / 2**30:.2f} GB** (`{worst[0]}` on {worst[1]}). "
        f"Code from the pickle executed: {'YES' if (work / 'evil' / 'PWNED').exists() else 'no'}.",
        "",
        "| command | input | result | exit | s | peak RSS GB | message (first line, paths shortened) |",
        "|---|---|---|---|---|---|---|",
    ]
    for cmd, name, res in rows:
        msg = (res["stderr"].strip().splitlines() or [""])[-1].replace(str(work), "…")[:220].replace("|", "\\|")
        lines.append(f"| {cmd} | {name} | {classify(res)} | {res['code']} | {res['seconds']:.1f} | "
                     f"{(res['maxrss'] or 0) / 2**30:.2f} | {msg} |")
    lines += ["", "Per case of the whole-corpus predict run (reason as recorded in predictions.json):", "",
              "| case | status | reason |", "|---|---|---|"]
    for r in case_records:
        lines.append(f"| {r['case']} | {r['status']} | {(r.get('reason') or '').replace(str(work), '…')[:200].replace('|', '/')} |")
    text = "\n".join(lines) + "\n"
    print(text)
    from resunet.io.atomic import atomic_write_text

    atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
