"""Benchmark one WADO-RS pull + read against reading the same series from a local folder (run by hand).

    .venv/bin/python bench/bench_pacs_pull.py [--series FOLDER] [--repeats 3] [--files]

Starts a real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``, as the tests do) on loopback, uploads
the series in FOLDER (default: the example study; e.g. a 300-slice compressed CT written by
``bench/io_read_speed.py`` under ``/tmp/resunet-read-speed/ct300_jls``), then alternates, after one
warm-up:

- **local read**: ``load_study(FOLDER)``;
- **pull + read**: ``load_study(PacsClient.fetch(study))``, the study held in memory as
  ``segment_from_pacs`` reads it (``--files``: ``PacsClient.retrieve`` into a temp folder, then
  ``load_study`` of that folder, the way pulls worked before).

Both produce the same voxels (checked every repetition). Prints the medians and their ratio (the
cost of getting the series from the archive instead of from a local disk) with the load average;
the machine is shared, so compare the two columns of one run only. Nothing is written under bench/results.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
EXAMPLE_DICOM = REPO / "resunet" / "data" / "example" / "colin27_t1_dicom"


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=Path, default=EXAMPLE_DICOM, help="a folder holding one DICOM series (one study)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--files", action="store_true", help="pull into a temp folder and read that (the old way)")
    args = ap.parse_args()

    import numpy as np
    import pydicom
    from orthanc_support import start_orthanc

    from resunet.io import load_study
    from resunet.pacs import PacsClient, PacsConfig

    files = sorted(f for f in args.series.rglob("*") if f.is_file())
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    work = Path(tempfile.mkdtemp(prefix="bench-pacs-pull-"))
    load_start = loadavg()
    orthanc = start_orthanc(work / "orthanc", {})
    try:
        orthanc.upload(files)
        client = PacsClient(PacsConfig(orthanc.dicomweb))
        local, pulled = [], []
        for rep in range(args.repeats + 1):  # the first repetition warms up and is not counted
            t0 = time.perf_counter()
            want = load_study(args.series)
            t1 = time.perf_counter()
            if args.files:
                client.retrieve(study_uid, work / "pulled")
                got = load_study(work / "pulled")
                shutil.rmtree(work / "pulled")
            else:
                got = load_study(client.fetch(study_uid))
            t2 = time.perf_counter()
            if not np.array_equal(np.asarray(got.array), np.asarray(want.array)):
                raise RuntimeError("the pulled series does not read like the local folder")
            if rep:
                local.append(t1 - t0)
                pulled.append(t2 - t1)
    finally:
        orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    how = "retrieve to files + read" if args.files else "fetch in memory + read"
    print(f"{args.series.name}: {len(files)} instances; load average {load_start} at start, {loadavg()} at end")
    print(f"| local read s | pull ({how}) s | ratio |\n| --- | --- | --- |\n"
          f"| {med(local):.2f} | {med(pulled):.2f} | {med(pulled) / med(local):.2f} |")
    print(f"runs: local {', '.join(f'{x:.2f}' for x in local)}; pull {', '.join(f'{x:.2f}' for x in pulled)}")
    return 0


if __name__ == "__main__":  # the guard matters: decode worker processes import this module
    raise SystemExit(main())
