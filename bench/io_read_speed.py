"""DICOM series reading speed: resunet ``load_study`` against SimpleITK's ImageSeriesReader (and dcm2niix).

Series: synthetic CT written with pydicom, 512x512 int16 (PixelRepresentation 1, RescaleIntercept
-1024), shuffled file names, 300 and 1000 slices, uncompressed (explicit VR little endian) and
compressed with pydicom's encoders (JPEG 2000 lossless and 10:1 via pylibjpeg-openjpeg, JPEG-LS
lossless and near-lossless via pyjpegls, RLE, deflate) or GDCM (python-gdcm: JPEG lossless SV1 and
process 14, JPEG baseline on an 8-bit version). The table names the decoder resunet uses per
syntax (resunet.dicom_decode.PREFERRED_PLUGIN). They are written once under ``/tmp/resunet-read-speed`` (several GB; reused by later
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
corners within 1e-3 mm). Run by hand (minutes; nothing else heavy should run):
``nice -n 5 .venv/bin/python bench/io_read_speed.py [--sizes 300 1000] [--syntaxes raw j2k jls ...] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import logging
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

from resunet.dicom_decode import decoder_plugin  # noqa: E402
from resunet.io import load_study  # noqa: E402

ROOT = Path("/tmp/resunet-read-speed")
SYNTAXES = {"raw": ExplicitVRLittleEndian, "j2k": JPEG2000Lossless, "j2k-lossy": JPEG2000, "jls": JPEGLSLossless,
            "jls-near": JPEGLSNearLossless, "jpeg-sv1": JPEGLosslessSV1, "jpeg-14": JPEGLossless,
            "jpeg-baseline": JPEGBaseline8Bit, "rle": RLELossless, "deflate": DeflatedExplicitVRLittleEndian}
NAMES = {"raw": "uncompressed", "j2k": "JPEG 2000 lossless", "j2k-lossy": "JPEG 2000 (lossy, 10:1)",
         "jls": "JPEG-LS lossless", "jls-near": "JPEG-LS near-lossless (3)", "jpeg-sv1": "JPEG lossless SV1",
         "jpeg-14": "JPEG lossless (process 14)", "jpeg-baseline": "JPEG baseline (8-bit)", "rle": "RLE lossless",
         "deflate": "deflated explicit VR LE"}
#: syntaxes pydicom cannot encode: written uncompressed, then re-encoded by GDCM (python-gdcm)
GDCM_ENCODED = {"jpeg-sv1": "JPEGLosslessProcess14_1", "jpeg-14": "JPEGLosslessProcess14",
                "jpeg-baseline": "JPEGBaselineProcess1"}


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


def write_series(folder: Path, n: int, syntax: str) -> None:
    """``n`` slices of 512x512 in ``folder`` under shuffled names, in the given transfer syntax."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    names = [f"{random.Random(n).getrandbits(64) ^ k:016x}" for k in range(n)]
    random.Random(1).shuffle(names)
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = "20240101"
        ds.StudyTime = ds.SeriesTime = "120000"
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
        ds.PixelData = arr.tobytes()
        if syntax == "deflate":
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        elif syntax not in ("raw", *GDCM_ENCODED):
            opts = {"j2k-lossy": {"j2k_cr": [10]}, "jls-near": {"jls_error": 3}}.get(syntax, {})
            ds.compress(SYNTAXES[syntax], arr, **opts)
        ds.save_as(tmp / names[k], enforce_file_format=True)
        if syntax in GDCM_ENCODED:
            gdcm_transcode(tmp / names[k], syntax)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def sitk_read_folder(folder: Path) -> sitk.Image:
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
        proc = subprocess.run([exe, "-z", "n", "-b", "n", "-o", str(out), "-f", "x", str(folder)],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--syntaxes", nargs="+", default=list(SYNTAXES), choices=list(SYNTAXES))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min), "
          f"{os.cpu_count()} CPUs; SimpleITK {sitk.Version.VersionString()}, pydicom {pydicom.__version__}")
    rows = []
    for syntax in args.syntaxes:
        for n in args.sizes:
            folder = ROOT / f"ct{n}_{syntax}"
            if not folder.exists():
                t0 = time.perf_counter()
                write_series(folder, n, syntax)
                print(f"wrote {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
            size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
            load_study(folder)  # warm the page cache for everyone
            # alternate the readers so a load change hits both
            sitk_times, our_times, exec_times = [], [], []
            img = vol = None
            files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
            for _ in range(args.repeat):
                t, _, img = best_of(lambda: sitk_read_folder(folder), 1)
                sitk_times.append(t)
                t, _, vol = best_of(lambda: load_study(folder), 1)
                our_times.append(t)
                if syntax == "raw":  # compressed: decoding dominates, the file listing is negligible
                    t, _, _ = best_of(lambda: sitk_execute(files), 1)
                    exec_times.append(t)
            t_sitk, t_ours = min(sitk_times), min(our_times)
            t_exec = min(exec_times) if exec_times else None
            same, dist, _ = compare_with_sitk(vol, img)
            t_d2n = dcm2niix_read(folder)
            del img, vol
            plugin = decoder_plugin(SYNTAXES[syntax]) or ("in place" if syntax == "raw" else "pydicom")
            rows.append((NAMES[syntax], n, size_mb, t_ours, t_sitk, t_exec, t_d2n, same, dist, plugin))
            print(
                f"{NAMES[syntax]:>20} {n:5d} slices {size_mb:7.0f} MB: resunet {t_ours:.3f} s"
                f" ({' '.join(f'{t:.2f}' for t in our_times)}), SimpleITK {t_sitk:.3f} s"
                f" ({' '.join(f'{t:.2f}' for t in sitk_times)}), ratio {t_ours / t_sitk:.2f},"
                + (f" SimpleITK Execute only {t_exec:.3f} s (ratio {t_ours / t_exec:.2f})," if t_exec else "") +
                f" dcm2niix {t_d2n}; voxels {'equal' if same else 'DIFFER'},"
                f" corners {dist:.1e} mm; load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    print()
    print("| series | slices | MB | resunet decoder | resunet s | SimpleITK s (folder) | ratio |"
          " SimpleITK s (Execute, list given) | ratio | dcm2niix s | voxels, corners |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, n, mb, t_o, t_s, t_e, t_d, same, dist, plugin in rows:
        exe = f"{t_e:.2f} | {t_o / t_e:.2f}" if t_e else "- | -"
        print(f"| {name} | {n} | {mb:.0f} | {plugin} | {t_o:.2f} | {t_s:.2f} | {t_o / t_s:.2f} | {exe} |"
              f" {t_d} | {'equal' if same else 'DIFFER'}, {dist:.1e} mm |")
    print(f"\nload after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
