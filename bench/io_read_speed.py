"""DICOM series reading speed: resunet ``load_study`` against SimpleITK's ImageSeriesReader (and dcm2niix).

Series: synthetic CT written with pydicom, 512x512 int16 (PixelRepresentation 1, RescaleIntercept
-1024), shuffled file names, 300 and 1000 slices, uncompressed (explicit VR little endian) and
compressed with pydicom's encoders (JPEG 2000 via pylibjpeg-openjpeg, JPEG-LS via pyjpegls, RLE,
deflate), GDCM's (JPEG lossless process 14 and SV1, JPEG baseline 8-bit) or imagecodecs' libjpeg-turbo
(JPEG extended 12-bit, stored as HU + 1024 clipped to 0..4095). They are written once under ``/tmp/resunet-read-speed`` (several GB; reused by later
runs; delete by hand). Every timing is a fresh read of a warm page cache, in this process:

- ``resunet``: ``load_study(folder)`` (discovery + headers + pixels + geometry checks);
- ``SimpleITK (folder)``: ``ImageSeriesReader.GetGDCMSeriesFileNames`` (reads and sorts the
  headers) plus ``ImageSeriesReader.Execute()``: what reading a folder costs there; ``SimpleITK
  (Execute, list given)``: ``Execute()`` alone on the sorted file list (the stricter comparison:
  resunet's time includes finding and sorting the files);
- ``dcm2niix`` (if installed): ``dcm2niix -z n`` writing an uncompressed NIfTI into a temp folder
  (a separate process that also writes the file: not the same work, listed for scale; the
  Debian build has no JPEG-LS decoder).

The voxels and geometry of resunet and SimpleITK are compared on every series (equal values,
corners within 1e-3 mm). Run by hand (minutes; nothing else heavy should run)::

    nice -n 5 .venv/bin/python bench/io_read_speed.py --sizes 300 1000 --syntaxes raw --repeat 7 --out bench/results/io.md
    nice -n 5 .venv/bin/python bench/io_read_speed.py --sizes 300 1000 --syntaxes jls j2k rle --repeat 3 --out bench/results/io.md
    nice -n 5 .venv/bin/python bench/io_read_speed.py --sizes 300 --enhanced --repeat 3 --out bench/results/io.md
    .venv/bin/python bench/io_read_speed.py --render bench/results/io.json --out bench/results/io.md

``--enhanced``: each syntax as one enhanced CT multi-frame file of the same slices instead of a series
(resunet ``load_study(file)`` against SimpleITK ``ReadImage(file)``).

Every repetition's time is kept; the results file gives each reader's median (min-max) and the
resunet / SimpleITK ratio of each repetition (median, min-max: the readers alternate, so both see the
same load), and says "faster" only where every repetition agrees. ``--out FILE.md`` merges this run's
rows into ``FILE.json`` (a row per series and size, each with its command, time and load) and writes
the whole Markdown file from it, both atomically; ``--render`` rewrites the Markdown from the JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import statistics
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from io_helpers import compare_with_sitk  # noqa: E402

from resunet.dicom_decode import PREFERRED_PLUGIN  # noqa: E402
from resunet.io import load_study  # noqa: E402

ROOT = Path("/tmp/resunet-read-speed")
SYNTAXES = {"raw": ExplicitVRLittleEndian, "j2k": JPEG2000Lossless, "j2k-lossy": JPEG2000, "jls": JPEGLSLossless,
            "jls-near": JPEGLSNearLossless, "jpeg-sv1": JPEGLosslessSV1, "jpeg-14": JPEGLossless,
            "jpeg-baseline": JPEGBaseline8Bit, "jpeg-ext12": JPEGExtended12Bit, "rle": RLELossless,
            "deflate": DeflatedExplicitVRLittleEndian}
NAMES = {"raw": "uncompressed", "j2k": "JPEG 2000 lossless", "j2k-lossy": "JPEG 2000 (lossy, 10:1)",
         "jls": "JPEG-LS lossless", "jls-near": "JPEG-LS near-lossless (3)", "jpeg-sv1": "JPEG lossless SV1",
         "jpeg-14": "JPEG lossless (process 14)", "jpeg-baseline": "JPEG baseline (8-bit)", "jpeg-ext12": "JPEG extended (12-bit)", "rle": "RLE lossless",
         "deflate": "deflated explicit VR LE"}
#: the suffix of the rows of enhanced multi-frame files (``--enhanced``)
ENHANCED = ", enhanced multi-frame"
#: syntaxes pydicom cannot encode: written uncompressed, then re-encoded by GDCM (python-gdcm)
GDCM_ENCODED = {"jpeg-sv1": "JPEGLosslessProcess14_1", "jpeg-14": "JPEGLosslessProcess14",
                "jpeg-baseline": "JPEGBaselineProcess1"}
#: syntaxes neither pydicom nor GDCM encodes correctly: GDCM writes "12-bit" lossy JPEG with 16-bit
#: precision, which pylibjpeg-libjpeg refuses; imagecodecs' libjpeg-turbo 3 writes real 12-bit frames
#: (SOF1, precision 12, quality 95)
IMAGECODECS_ENCODED = {"jpeg-ext12"}


def decoder_name(syntax: str) -> str:
    """The decoder resunet tries first for ``syntax`` (resunet.dicom_decode)."""
    if syntax == "raw":
        return "read in place"
    return PREFERRED_PLUGIN.get(str(SYNTAXES[syntax]), "pydicom")


def gdcm_transcode(path: Path, syntax: str) -> None:
    """Re-encode ``path`` in place with GDCM in the transfer syntax ``GDCM_ENCODED[syntax]``."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise RuntimeError(f"GDCM cannot read {path}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, GDCM_ENCODED[syntax])))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"GDCM cannot encode {path} as {syntax}")
    writer = gdcm.ImageWriter()
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    writer.SetFileName(str(path))
    if not writer.Write():
        raise RuntimeError(f"GDCM cannot write {path}")


def phantom_slice(k: int, n: int, size: int = 512, seed: int = 0) -> np.ndarray:
    """A CT-like slice (stored values, int16): air, an elliptic body with noise, a bone ring."""
    rng = np.random.default_rng(seed + k)
    y, x = np.mgrid[:size, :size].astype(np.float32) / size - 0.5
    r = (x / 0.42) ** 2 + (y / (0.33 + 0.05 * np.sin(np.pi * k / n))) ** 2
    hu = np.full((size, size), -1000.0, np.float32)
    hu[r < 1] = 40.0
    hu[(r > 0.8) & (r < 0.9)] = 700.0
    hu += rng.normal(0, 12, hu.shape).astype(np.float32) * (r < 1)
    return (np.round(hu) + 1024).astype(np.int16)


def legacy_dataset(k: int, n: int, syntax: str, uids: tuple[str, str, str]) -> Dataset:
    """Slice ``k`` of ``n`` as an uncompressed single-frame CT data set (8-bit stored values for JPEG baseline,
    12-bit unsigned for JPEG extended)."""
    study, series, frame = uids
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.Modality = "CT"
    ds.Manufacturer = "bench"
    ds.PatientName = "Bench^Phantom"
    ds.PatientID = "bench"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
    ds.SeriesDescription = f"bench {n} slices"
    ds.SliceThickness = "1.25"
    ds.KVP = "120"
    ds.ImagePositionPatient = ["-250.0", "-250.0", f"{-400 + 1.25 * k:.2f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = ["0.9765625", "0.9765625"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    arr = phantom_slice(k, n)
    if syntax == "jpeg-baseline":  # 8-bit only: stored = (HU + 1024) / 8
        arr = np.clip(arr // 8, 0, 255).astype(np.uint8)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "8"
    elif syntax == "jpeg-ext12":  # 12-bit unsigned: stored = HU + 1024, clipped to 0..4095
        arr = np.clip(arr, 0, 4095).astype(np.uint16)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.tobytes()
    return ds


def encode_and_save(ds: Dataset, path: Path, syntax: str) -> None:
    """Write ``ds`` (uncompressed, one frame or many) to ``path`` in ``syntax``: pydicom's encoders, or GDCM
    for the syntaxes pydicom cannot encode."""
    if syntax == "deflate":
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    elif syntax in IMAGECODECS_ENCODED:
        import imagecodecs
        from pydicom.encaps import encapsulate

        frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
        ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(f, level=95, bitspersample=12) for f in frames])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = SYNTAXES[syntax]
    elif syntax not in ("raw", *GDCM_ENCODED):
        opts = {"j2k-lossy": {"j2k_cr": [10]}, "jls-near": {"jls_error": 3}}.get(syntax, {})
        ds.compress(SYNTAXES[syntax], ds.pixel_array, **opts)
    ds.save_as(path, enforce_file_format=True)
    if syntax in GDCM_ENCODED:
        gdcm_transcode(path, syntax)


def write_series(folder: Path, n: int, syntax: str) -> None:
    """``n`` slices of 512x512 in ``folder`` under shuffled names, in the given transfer syntax."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    uids = (generate_uid(), generate_uid(), generate_uid())
    names = [f"{random.Random(n).getrandbits(64) ^ k:016x}" for k in range(n)]
    random.Random(1).shuffle(names)
    for k in range(n):
        encode_and_save(legacy_dataset(k, n, syntax, uids), tmp / names[k], syntax)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def write_enhanced(path: Path, n: int, syntax: str) -> None:
    """The same ``n`` slices as one enhanced CT multi-frame file (highdicom's legacy conversion), in ``syntax``."""
    import highdicom as hd

    uids = (generate_uid(), generate_uid(), generate_uid())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mf = hd.legacy.LegacyConvertedEnhancedCTImage(
            legacy_datasets=[legacy_dataset(k, n, syntax, uids) for k in range(n)], series_instance_uid=hd.UID(),
            series_number=3, sop_instance_uid=hd.UID(), instance_number=1)
    buf = pydicom.filebase.DicomBytesIO()
    mf.save_as(buf, enforce_file_format=True)
    del mf
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(buf.getvalue()))
    del buf
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encode_and_save(ds, tmp, syntax)
    tmp.rename(path)


def sitk_read_folder(folder: Path) -> sitk.Image:
    if folder.is_file():  # an enhanced multi-frame file: GDCM reads its frames as one 3-D image
        return sitk.ReadImage(str(folder))
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def sitk_execute(files: list[str]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def dcm2niix_read(folder: Path) -> str:
    """dcm2niix's wall time as text ('-' if not installed, 'failed (exit N)' if it wrote nothing)."""
    exe = shutil.which("dcm2niix")
    if exe is None:
        return "-"
    out = Path(tempfile.mkdtemp(prefix="resunet-d2n-"))
    try:
        t0 = time.perf_counter()
        single = ["-s", "y"] if folder.is_file() else []  # one file: only it (not its whole folder)
        proc = subprocess.run([exe, "-z", "n", "-b", "n", *single, "-o", str(out), "-f", "x", str(folder)],
                              capture_output=True, check=False)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0 or not list(out.glob("*.nii")):
            return f"failed (exit {proc.returncode})"
        return f"{seconds:.2f}"
    finally:
        shutil.rmtree(out, ignore_errors=True)


def best_of(fn, repeat: int) -> tuple[float, list[float], object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), times, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--syntaxes", nargs="+", default=list(SYNTAXES), choices=list(SYNTAXES))
    parser.add_argument("--repeat", type=int, default=7, help="repetitions per reader (alternating); all are kept")
    parser.add_argument("--out", type=Path, help="merge the rows into the .json of this name and write this results file whole")
    parser.add_argument("--render", type=Path, metavar="JSON", help="no measuring: write --out from this JSON")
    parser.add_argument("--enhanced", action="store_true",
                        help="read one enhanced CT multi-frame file per syntax and size (highdicom's legacy conversion of "
                        "the series) instead of the series: resunet load_study(file) against SimpleITK ReadImage(file)")
    args = parser.parse_args(argv)
    if args.render:
        if not args.out:
            parser.error("--render needs --out")
        write_results(json.loads(args.render.read_text()), args.out, json_too=False)
        return
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    versions = f"SimpleITK {sitk.Version.VersionString()}, pydicom {pydicom.__version__}"
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min), "
          f"{os.cpu_count()} CPUs; {versions}")
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    run = {"command": f".venv/bin/python bench/io_read_speed.py {argv_text}".strip(),
           "started_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "load_start": os.getloadavg()[0], "cpus": os.cpu_count(), "versions": versions}
    rows = []
    for syntax in args.syntaxes:
        for n in args.sizes:
            folder = ROOT / (f"ct{n}_{syntax}_enhanced.dcm" if args.enhanced else f"ct{n}_{syntax}")
            if not folder.exists():
                t0 = time.perf_counter()
                (write_enhanced if args.enhanced else write_series)(folder, n, syntax)
                print(f"wrote {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
            size_mb = (folder.stat().st_size if folder.is_file() else sum(f.stat().st_size for f in folder.iterdir())) / 1e6
            load_study(folder)  # warm the page cache for everyone
            # alternate the readers so a load change hits both
            sitk_times, our_times, exec_times = [], [], []
            img = vol = None
            files = [] if args.enhanced else list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
            for _ in range(args.repeat):
                t, _, img = best_of(lambda: sitk_read_folder(folder), 1)
                sitk_times.append(t)
                t, _, vol = best_of(lambda: load_study(folder), 1)
                our_times.append(t)
                if syntax == "raw" and not args.enhanced:  # compressed: decoding dominates, the file listing is negligible
                    t, _, _ = best_of(lambda: sitk_execute(files), 1)
                    exec_times.append(t)
            same, dist, _ = compare_with_sitk(vol, img)
            t_d2n = dcm2niix_read(folder)
            del img, vol
            row = {"series": NAMES[syntax] + (ENHANCED if args.enhanced else ""), "decoder": decoder_name(syntax), "slices": n, "mb": size_mb, "resunet_s": our_times,
                   "sitk_folder_s": sitk_times, "sitk_execute_s": exec_times or None, "dcm2niix": t_d2n,
                   "voxels_equal": bool(same), "corners_mm": float(dist), "load": os.getloadavg()[0]}
            rows.append(row)
            print(_row(row, "-"), flush=True)
    run["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M")
    run["load_end"] = os.getloadavg()[0]
    if args.out:
        doc = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").exists() else {"runs": [], "rows": []}
        doc = merge(doc, run, rows)
        write_results(doc, args.out)
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    else:
        print(render(merge({"runs": [], "rows": []}, run, rows)))


def merge(doc: dict, run: dict, rows: list[dict]) -> dict:
    """``doc`` with ``rows`` (of ``run``) replacing the rows of the same series and size; runs no row
    refers to any more are dropped."""
    runs = list(doc["runs"]) + [run]
    rid = len(runs) - 1
    keep = [r for r in doc["rows"] if (r["series"], r["slices"]) not in {(x["series"], x["slices"]) for x in rows}]
    new = keep + [{**r, "run": rid} for r in rows]
    used = sorted({r["run"] for r in new if r.get("run") is not None})  # None: a pending row (no run yet)
    renum = {old: k for k, old in enumerate(used)}
    order = {name: k for k, name in enumerate(NAMES.values())}
    new = sorted(({**r, "run": renum.get(r.get("run"))} for r in new),
                 key=lambda r: (r["series"].endswith(ENHANCED), order.get(r["series"].removesuffix(ENHANCED), 99), r["slices"]))
    return {"runs": [runs[i] for i in used], "rows": new}


def write_results(doc: dict, out: Path, json_too: bool = True) -> None:
    from resunet.io.atomic import atomic_write_text

    if json_too:
        atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=1) + "\n")
    atomic_write_text(out, render(doc))


HEADER = """# DICOM series reading speed: resunet vs SimpleITK (and dcm2niix)

Written whole by `bench/io_read_speed.py --out bench/results/io.md` (its figures as data in
`bench/results/io.json`, one row per series and size, each from the run named in its last column;
`.venv/bin/python bench/io_read_speed.py --render bench/results/io.json --out bench/results/io.md`
rewrites this file from the JSON).

Series: synthetic CT written with pydicom, 512x512 int16 (PixelRepresentation 1, RescaleIntercept
-1024), shuffled file names, in `/tmp/resunet-read-speed`; compressed with pydicom's encoders
(JPEG 2000 lossless and 10:1, JPEG-LS lossless and near-lossless, RLE, deflate) or GDCM (JPEG
lossless SV1 and process 14, JPEG baseline on an 8-bit copy). "resunet decoder": the plugin resunet
tried first for the syntax in the row's run (resunet.dicom_decode.PREFERRED_PLUGIN; since imagecodecs
came, it and pydicom's deflate decode in threads of the reading process, the others in decode worker
processes beside it; before, GDCM decoded JPEG lossless in workers: bench/results/io_decoders.md). Each
reader reads the whole folder from a warm page cache, in the same process, the readers alternating
in each repetition.

- **resunet**: `load_study(folder)`: discovery, header scan, slice sorting and geometry checks, pixels.
- **SimpleITK (folder)**: `ImageSeriesReader.GetGDCMSeriesFileNames(folder)` (reads and sorts the
  headers) + `ImageSeriesReader.Execute()`. **SimpleITK (Execute)**: `Execute()` alone on the
  already sorted file list (uncompressed rows; stricter: resunet's time includes finding and sorting
  the files).
- **dcm2niix** (if installed): `dcm2niix -z n` writing an uncompressed NIfTI (another process, and
  it writes a file: listed for scale only, one run; `-s y` for one multi-frame file).

Rows "enhanced multi-frame" (`--enhanced`): the same slices as one enhanced CT multi-frame file
(highdicom's `LegacyConvertedEnhancedCTImage` of the uncompressed series, then encoded as the row
says); resunet `load_study(file)` against SimpleITK `ReadImage(file)` (GDCM).

Times: median (min-max) over the repetitions, seconds. Ratio: resunet / SimpleITK of each
repetition, median (min-max); below 1 resunet is faster. "Verdict" says faster only where every
repetition agrees; one repetition is not enough to say either. "voxels, corners": resunet's volume
against SimpleITK's (values equal; the largest distance of the eight outer voxel corners).
"""


def _spread(ts: list[float] | None) -> str:
    if not ts:
        return "-"
    if len(ts) == 1:
        return f"{ts[0]:.2f}"
    return f"{statistics.median(ts):.2f} ({min(ts):.2f}-{max(ts):.2f})"


def _ratio(ours: list[float] | None, theirs: list[float] | None) -> tuple[str, str]:
    if not ours or not theirs:
        return "-", "-"
    rs = [a / b for a, b in zip(ours, theirs)]
    text = f"{rs[0]:.2f}" if len(rs) == 1 else f"{statistics.median(rs):.2f} ({min(rs):.2f}-{max(rs):.2f})"
    if len(rs) < 3:
        verdict = f"{len(rs)} repetition{'s' if len(rs) > 1 else ''}: not enough"
    elif max(rs) < 1:
        verdict = f"resunet faster in all {len(rs)}"
    elif min(rs) > 1:
        verdict = f"SimpleITK faster in all {len(rs)}"
    else:
        verdict = f"within the spread ({len(rs)} repetitions)"
    return text, verdict


def _row(r: dict, run: str) -> str:
    if r.get("pending"):
        return f"| {r['series']} | {r['slices']} | pending: {r['pending']} |||||||||| {run} |"
    ratio, verdict = _ratio(r["resunet_s"], r["sitk_folder_s"])
    eratio, _ = _ratio(r["resunet_s"], r["sitk_execute_s"])
    check = f"{'equal' if r['voxels_equal'] else 'DIFFER'}, {r['corners_mm']:.1e} mm"
    return (f"| {r['series']} | {r['slices']} | {r['mb']:.0f} | {r.get('decoder', '-')} | {_spread(r['resunet_s'])} "
            f"| {_spread(r['sitk_folder_s'])} "
            f"| {ratio} | {verdict} | {_spread(r['sitk_execute_s'])} | {eratio} | {r['dcm2niix']} | {check} | {run} |")


def render(doc: dict) -> str:
    """The whole results file for ``doc`` (``{"runs": [...], "rows": [...]}``)."""
    lines = [HEADER, "| series | slices | MB | resunet decoder | resunet s | SimpleITK s (folder) | resunet / SimpleITK | verdict "
             "| SimpleITK s (Execute, list given) | resunet / SimpleITK Execute | dcm2niix s | voxels, corners | run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r, f"run {r['run'] + 1}" if r.get("run") is not None else "-") for r in doc["rows"]]
    lines += ["", "## Runs", ""]
    for k, run in enumerate(doc["runs"]):
        load = f"load average {run['load_start']:.1f} at the start, {run['load_end']:.1f} at the end" \
            if run.get("load_start") is not None else f"load average {run['load']}"
        lines.append(f"{k + 1}. `{run['command']}`: {run['started_utc']}-{run['finished_utc']} UTC, {run['cpus']} CPUs, "
                     f"{load}; {run['versions']}." + (f" {run['note']}" if run.get("note") else ""))
    pending = [r for r in doc["rows"] if r.get("pending")]
    if pending:
        lines += ["", "Pending rows: run their command on an idle machine (`--out bench/results/io.md` merges the rows in)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
