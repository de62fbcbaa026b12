"""Benchmark the PACS round trip (run by hand; both sides measured in the same run).

    .venv/bin/python bench/bench_pacs.py [--repeats 5] [--model resunet/data/model/brain_extraction.pt]
        [--out bench/results/pacs.md]

Starts a real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``, as the tests do) on loopback with
the example DICOM study (91 slices, 91x109 pixels), loads the model once, and alternates:

- **segment alone**: ``run_batch`` on a local copy of the study folder (read + predict + write SEG),
  i.e. what ``resunet predict FOLDER --format seg`` does after start-up;
- **PACS round trip**: ``segment_from_pacs`` = WADO-RS pull of the study + the same ``run_batch`` +
  STOW-RS of the SEG into the study (what ``resunet predict --pacs URL --study UID`` does after start-up);
- **DIMSE node**: Orthanc sends the study with C-STORE to a resunet ``DicomNode`` ("send to
  modality"), which segments the complete series and C-STOREs the SEG back; timed from the send
  request to the SEG's arrival, minus the node's settle time (the wait that declares a series complete).

with mirror TTA on (the CLI default) and off. Overhead = (round trip - segment alone) / segment
alone, medians over the repeats. Goal: <= 25%. The machine is shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from orthanc_support import ORTHANC_AET, start_orthanc  # noqa: E402
from test_app_support import free_port  # noqa: E402

from resunet.inference.batch import BatchOptions, run_batch  # noqa: E402
from resunet.inference.cases import Case  # noqa: E402
from resunet.inference.predictor import Predictor  # noqa: E402
from resunet.pacs import Destination, DicomNode, ListenerConfig, PacsClient, PacsConfig, segment_from_pacs  # noqa: E402

EXAMPLE_DICOM = REPO / "resunet" / "data" / "example" / "colin27_t1_dicom"
BUNDLED = REPO / "resunet" / "data" / "model" / "brain_extraction.pt"
SETTLE_S = 1.0


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def seg_count(orthanc, study_uid: str) -> int:
    with urllib.request.urlopen(f"{orthanc.dicomweb}/studies/{study_uid}/series?Modality=SEG", timeout=30) as r:
        body = r.read()
    return len(json.loads(body)) if body.strip() else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default=str(BUNDLED))
    ap.add_argument("--out", default=None, help="write the Markdown table here too")
    args = ap.parse_args()

    import pydicom
    import torch

    study_uid = str(pydicom.dcmread(next(EXAMPLE_DICOM.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    work = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    load_start = loadavg()
    node_port = free_port()
    orthanc = start_orthanc(work / "orthanc", {"resunet": ("RESUNET", "127.0.0.1", node_port)})
    rows = []
    try:
        orthanc.upload(sorted(EXAMPLE_DICOM.glob("*.dcm")))
        with urllib.request.urlopen(urllib.request.Request(f"{orthanc.url}/tools/lookup", data=study_uid.encode(),
                                                           method="POST"), timeout=30) as r:
            orthanc_id = next(x["ID"] for x in json.loads(r.read()) if x["Type"] == "Study")
        client = PacsClient(PacsConfig(orthanc.dicomweb))
        local = work / "local" / EXAMPLE_DICOM.name
        shutil.copytree(EXAMPLE_DICOM, local)
        for tta in (True, False):
            predictor = Predictor(args.model, tta=tta)
            alone, trip, node_s = [], [], []
            parts: dict[str, list[float]] = {"pull": [], "segment": [], "store": []}
            dest = Destination("127.0.0.1", orthanc.port, ORTHANC_AET)
            config = ListenerConfig(ae_title="RESUNET", port=node_port, incoming_dir=work / "incoming",
                                    settle_seconds=SETTLE_S)
            with DicomNode(config, predictor, work / f"node-{tta}", destination=dest, audit_db=False) as node:
                for rep in range(args.repeats + 1):  # the first repetition warms up and is not counted
                    opts = dict(formats=("seg",), progress=False, audit_db=False, resume=False)
                    t0 = time.perf_counter()
                    run_batch([Case(local.name, local, "dicom")], predictor, BatchOptions(out_dir=work / f"a{tta}{rep}", **opts))
                    t_alone = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    run = segment_from_pacs(client, study_uid, predictor, BatchOptions(out_dir=work / f"p{tta}{rep}", **opts))
                    t_trip = time.perf_counter() - t0
                    n_before = seg_count(orthanc, study_uid)
                    t0 = time.perf_counter()
                    req = urllib.request.Request(f"{orthanc.url}/modalities/resunet/store", data=orthanc_id.encode(),
                                                 method="POST")
                    urllib.request.urlopen(req, timeout=300).read()
                    node.wait_for(rep + 1, timeout=300)
                    while seg_count(orthanc, study_uid) <= n_before and time.perf_counter() - t0 < 300:
                        time.sleep(0.05)
                    t_node = time.perf_counter() - t0 - SETTLE_S
                    assert node.results[-1].error is None, node.results[-1].error
                    if rep == 0:
                        continue
                    alone.append(t_alone)
                    trip.append(t_trip)
                    node_s.append(t_node)
                    for k in parts:
                        parts[k].append(run.timings.get(k, 0.0))
            med = statistics.median
            rows.append({
                "tta": "on (8 flips)" if tta else "off", "alone": med(alone), "trip": med(trip),
                "pull": med(parts["pull"]), "segment": med(parts["segment"]), "store": med(parts["store"]),
                "node": med(node_s), "runs_alone": alone, "runs_trip": trip, "runs_node": node_s,
            })
    finally:
        orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "# PACS round trip (bench/bench_pacs.py)",
        "",
        f"Command: `.venv/bin/python bench/bench_pacs.py --repeats {args.repeats}" + (f" --out {args.out}`" if args.out else "`"),
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads, CPU; model {Path(args.model).name}; Orthanc 1.10 + DICOMweb plugin 1.7 on loopback; example "
        f"study (91 MR slices of 91x109). Load average at start {load_start} (the machine is shared; 6 agents).",
        "",
        f"Medians of {args.repeats} repetitions after one warm-up, model loaded once (start-up excluded on both sides).",
        "",
        "| TTA | segment alone s (read + predict + write SEG) | PACS round trip s (pull + segment + STOW) | pull s | segment s | STOW s | overhead | DIMSE node s (C-STORE in, segment, C-STORE SEG out; settle excluded) | overhead |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['tta']} | {r['alone']:.2f} | {r['trip']:.2f} | {r['pull']:.2f} | {r['segment']:.2f} | {r['store']:.2f} "
            f"| {100 * (r['trip'] - r['alone']) / r['alone']:+.0f}% | {r['node']:.2f} | {100 * (r['node'] - r['alone']) / r['alone']:+.0f}% |")
    lines += ["", "All runs (s):", ""]
    for r in rows:
        lines.append(f"- TTA {r['tta']}: alone {', '.join(f'{x:.2f}' for x in r['runs_alone'])}; round trip "
                     f"{', '.join(f'{x:.2f}' for x in r['runs_trip'])}; DIMSE node {', '.join(f'{x:.2f}' for x in r['runs_node'])}")
    lines += ["", f"Load average at end: {loadavg()}", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
