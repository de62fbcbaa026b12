"""Benchmark the PACS round trip (run by hand; both sides measured in the same run).

    .venv/bin/python bench/bench_pacs.py [--repeats 5] [--model resunet/data/model/brain_extraction.pt]
        [--series FOLDER] [--only dimse] [--tta on|off] [--out bench/results/pacs.md [--append]]
    .venv/bin/python bench/bench_pacs.py --render bench/results/pacs.json --out bench/results/pacs.md

``--out FILE.md`` writes the whole results file (every run in ``FILE.json``, this one replacing them
unless ``--append``) and the JSON, both atomically; ``--render`` rewrites the Markdown from the JSON.

Starts a real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``, as the tests do) on loopback with
the example DICOM study (91 slices, 91x109 pixels; ``--series FOLDER`` another, e.g. the 300-slice
compressed CT of issue 23), loads the model once, and alternates:

- **segment alone**: ``run_batch`` on a local copy of the study folder (read + predict + write SEG),
  i.e. what ``resunet predict FOLDER --format seg`` does after start-up;
- **PACS round trip**: ``segment_from_pacs`` = WADO-RS pull of the study + the same ``run_batch`` +
  STOW-RS of the SEG into the study (what ``resunet predict --pacs URL --study UID`` does after start-up);
- **DIMSE C-GET** and **DIMSE C-MOVE**: ``segment_from_dimse`` = C-FIND (study, series) + C-GET (or
  C-MOVE to our own Storage SCP) + the same ``run_batch`` + C-STORE of the SEG back (what
  ``resunet predict --pacs dimse://AET@HOST:PORT --study UID --retrieve get|move`` does after start-up);
- **DIMSE node**: Orthanc sends the study with C-STORE to a resunet ``StoreListener`` ("send to
  modality"), whose callback runs ``segment_and_send`` on the complete series and C-STOREs the SEG
  back (what the service's dicom-series jobs do); timed from the send request to the SEG's arrival,
  minus the node's settle time (the wait that declares a series complete).

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
from resunet.pacs import Destination, ListenerConfig, PacsClient, PacsConfig, segment_from_pacs  # noqa: E402
from resunet.pacs.dimse import StoreListener, send_files  # noqa: E402
from resunet.pacs.dicomweb import NON_IMAGE_MODALITIES  # noqa: E402
from resunet.pacs.dimse_qr import DimseSource, QueryConfig  # noqa: E402
from resunet.pacs.segment import segment_and_send, segment_from_dimse  # noqa: E402

EXAMPLE_DICOM = REPO / "resunet" / "data" / "example" / "colin27_t1_dicom"
BUNDLED = REPO / "resunet" / "data" / "model" / "brain_extraction.pt"
SETTLE_S = 1.0


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def seg_count(orthanc, study_uid: str) -> int:
    with urllib.request.urlopen(f"{orthanc.dicomweb}/studies/{study_uid}/series?Modality=SEG", timeout=30) as r:
        body = r.read()
    return len(json.loads(body)) if body.strip() else 0


def drop_results(orthanc, orthanc_study_id: str) -> int:
    """Delete the series this run stored back (SEG, SR: every non-image modality) through Orthanc's
    REST API, so that every repetition starts from the study as the modality delivered it: the
    archive's work (QIDO/C-FIND answers, the node's C-STORE of the whole study) would otherwise grow
    with each earlier repetition's results. Returns how many series were deleted."""
    gone = 0
    for series in orthanc.get(f"/studies/{orthanc_study_id}/series"):
        if series["MainDicomTags"].get("Modality") in NON_IMAGE_MODALITIES:
            urllib.request.urlopen(urllib.request.Request(f"{orthanc.url}/series/{series['ID']}", method="DELETE"),
                                   timeout=30).read()
            gone += 1
    return gone


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default=str(BUNDLED))
    ap.add_argument("--series", type=Path, default=EXAMPLE_DICOM, metavar="FOLDER",
                    help="the study to put in Orthanc (default: the example, 91 MR slices); e.g. a 300-slice compressed "
                         "CT that bench/io_read_speed.py wrote under /tmp/resunet-read-speed/ct300_jls")
    ap.add_argument("--out", type=Path, default=None, help="write the whole results file here (and its figures to the same name .json)")
    ap.add_argument("--append", action="store_true", help="keep the earlier runs of the .json (default: this run replaces them)")
    ap.add_argument("--render", type=Path, metavar="JSON", help="no measuring: write --out from this JSON")
    ap.add_argument("--only", choices=("all", "dimse"), default="all",
                    help="dimse: leave out the DICOMweb round trip (segment alone, C-GET, C-MOVE and the node only)")
    ap.add_argument("--tta", choices=("both", "on", "off"), default="both",
                    help="which TTA rows to measure (default both; off is the row the +25%% goal is about)")
    args = ap.parse_args()
    if args.render:
        if not args.out:
            ap.error("--render needs --out")
        from resunet.io.atomic import atomic_write_text

        atomic_write_text(args.out, render(json.loads(args.render.read_text())))
        return 0

    import pydicom
    import torch

    files = sorted(p for p in args.series.rglob("*") if p.is_file())
    if not files:
        ap.error(f"--series {args.series}: no files")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    work = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    load_start = loadavg()
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    node_port, move_port = free_port(), free_port()
    orthanc = start_orthanc(work / "orthanc", {"resunet": ("RESUNET", "127.0.0.1", node_port),
                                               "resunetqr": ("RESUNETQR", "127.0.0.1", move_port)})
    rows = []
    try:
        orthanc.upload(files)
        with urllib.request.urlopen(urllib.request.Request(f"{orthanc.url}/tools/lookup", data=study_uid.encode(),
                                                           method="POST"), timeout=30) as r:
            orthanc_id = next(x["ID"] for x in json.loads(r.read()) if x["Type"] == "Study")
        client = PacsClient(PacsConfig(orthanc.dicomweb))
        source = DimseSource(ORTHANC_AET, "127.0.0.1", orthanc.port)
        qr = {"get": QueryConfig(calling_aet="RESUNETQR", method="get"),
              "move": QueryConfig(calling_aet="RESUNETQR", method="move", move_port=move_port)}
        local = work / "local" / args.series.name
        shutil.copytree(args.series, local)
        for tta in {"both": (True, False), "on": (True,), "off": (False,)}[args.tta]:
            predictor = Predictor(args.model, tta=tta)
            alone, trip, node_s = [], [], []
            dimse_s: dict[str, list[float]] = {"get": [], "move": []}
            dimse_steps: dict[str, list[float]] = {f"{m}_{k}": [] for m in ("get", "move")
                                                   for k in ("pull", "segment", "store")}
            parts: dict[str, list[float]] = {"pull": [], "segment": [], "store": []}
            dest = Destination("127.0.0.1", orthanc.port, ORTHANC_AET)
            config = ListenerConfig(ae_title="RESUNET", port=node_port, incoming_dir=work / "incoming",
                                    settle_seconds=SETTLE_S)
            node_runs: list = []

            def on_series(series, predictor=predictor, tta=tta, node_runs=node_runs):
                out = work / f"node-{tta}-{len(node_runs)}"
                node_runs.append(segment_and_send(
                    series.study_uid, None, lambda files: send_files(files, dest, calling_aet="RESUNET"), predictor,
                    BatchOptions(out_dir=out, formats=("seg",), progress=False, audit_db=False, resume=False,
                                 series_uid=series.series_uid),
                    source=f"C-STORE from {series.calling_aet}", folder=series.folder))

            listener = StoreListener(config, on_series)
            listener.start()
            try:
                for rep in range(args.repeats + 1):  # the first repetition warms up and is not counted
                    opts = dict(formats=("seg",), progress=False, audit_db=False, resume=False)
                    t0 = time.perf_counter()
                    run_batch([Case(local.name, local, "dicom")], predictor, BatchOptions(out_dir=work / f"a{tta}{rep}", **opts))
                    t_alone = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    run = None if args.only == "dimse" else segment_from_pacs(
                        client, study_uid, predictor, BatchOptions(out_dir=work / f"p{tta}{rep}", **opts))
                    t_trip = time.perf_counter() - t0
                    t_dimse, steps = {}, {}
                    for method, cfg in qr.items():
                        t0 = time.perf_counter()
                        d_run = segment_from_dimse(source, cfg, study_uid, predictor,
                                                   BatchOptions(out_dir=work / f"d{method}{tta}{rep}", **opts))
                        t_dimse[method] = time.perf_counter() - t0
                        steps[method] = d_run.timings
                    n_before = seg_count(orthanc, study_uid)
                    t0 = time.perf_counter()
                    req = urllib.request.Request(f"{orthanc.url}/modalities/resunet/store", data=orthanc_id.encode(),
                                                 method="POST")
                    urllib.request.urlopen(req, timeout=300).read()
                    while (len(node_runs) < rep + 1 or seg_count(orthanc, study_uid) <= n_before) \
                            and time.perf_counter() - t0 < 300:
                        time.sleep(0.05)
                    t_node = time.perf_counter() - t0 - SETTLE_S
                    if len(node_runs) < rep + 1:
                        raise RuntimeError("the DICOM node did not segment the series sent to it within 300 s")
                    drop_results(orthanc, orthanc_id)
                    if rep == 0:
                        continue
                    alone.append(t_alone)
                    trip.append(t_trip)
                    node_s.append(t_node)
                    for method in dimse_s:
                        dimse_s[method].append(t_dimse[method])
                        for k in ("pull", "segment", "store"):
                            dimse_steps[f"{method}_{k}"].append(steps[method].get(k, 0.0))
                    for k in parts:
                        if run is not None:
                            parts[k].append(run.timings.get(k, 0.0))
            finally:
                listener.stop()
            med = statistics.median
            row = {
                "tta": "on (8 flips)" if tta else "off", "alone": med(alone),
                "get": med(dimse_s["get"]), "move": med(dimse_s["move"]),
                "node": med(node_s), "runs_alone": alone, "runs_node": node_s,
                "runs_get": dimse_s["get"], "runs_move": dimse_s["move"],
                "dimse_steps": {k: med(v) for k, v in dimse_steps.items()},
            }
            if args.only != "dimse":
                row.update(trip=med(trip), pull=med(parts["pull"]), segment=med(parts["segment"]),
                           store=med(parts["store"]), runs_trip=trip)
            rows.append(row)
    finally:
        orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)

    for r in rows:
        for k in ("trip", "node", "get", "move"):
            if k in r:
                r[f"overhead_{k}_pct"] = 100 * (r[k] - r["alone"]) / r["alone"]
    run = {
        "command": f".venv/bin/python bench/bench_pacs.py --repeats {args.repeats}"
                   + (f" --series {args.series}" if args.series != EXAMPLE_DICOM else "")
                   + (f" --only {args.only}" if args.only != "all" else "") + (f" --tta {args.tta}" if args.tta != "both" else "")
                   + (f" --out {args.out}" if args.out else "") + (" --append" if args.append else ""),
        "started_utc": started, "machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "model": Path(args.model).name, "load_start": load_start,
        "load_end": loadavg(), "repeats": args.repeats, "rows": rows,
        "series": args.series.name, "instances": len(files),
    }
    doc = {"runs": [run]}
    if args.out and args.append and args.out.with_suffix(".json").exists():
        doc = {"runs": json.loads(args.out.with_suffix(".json").read_text())["runs"] + [run]}
    text = render(doc)
    print(text)
    if args.out:
        from resunet.io.atomic import atomic_write_text

        atomic_write_text(args.out.with_suffix(".json"), json.dumps(doc, indent=1) + "\n")
        atomic_write_text(args.out, text)
    return 0


HEADER = """# PACS round trip (bench/bench_pacs.py)

Written whole by `bench/bench_pacs.py --out bench/results/pacs.md`, every run's figures in
`bench/results/pacs.json` (`--render bench/results/pacs.json --out bench/results/pacs.md` rewrites this
file from it). Orthanc 1.10 + DICOMweb plugin 1.7 on loopback; the study named in each run (the example:
91 MR slices of 91x109); the model loaded once, start-up excluded on both sides; medians of the repetitions after one
warm-up. Overhead = (round trip - segment alone) / segment alone, from the medians; the goal is at
most +25%. The DIMSE node's time runs from Orthanc's send request to the SEG's arrival (Orthanc's own
C-STORE job, the node writing each instance, the C-STORE of the SEG back), less the node's settle time.
The C-GET and C-MOVE columns are `resunet predict --pacs dimse://...`'s step after start-up: C-FIND
(study, series), the retrieve (C-GET, or C-MOVE to our own Storage SCP), the same segmentation, C-STORE
of the SEG. The results each repetition stores back (SEG series) are deleted from Orthanc before the
next one, so every repetition pulls the study as the modality sent it (before 2026-12-07 14:30 UTC they
piled up: the node was sent every earlier SEG with the images, and the C-GET/C-MOVE path retrieved
them too, which is why the TTA-off rows, measured after the TTA-on ones, were slower).
"""


def _overhead(r: dict, key: str) -> float:
    """The overhead in %, as stored by the run (from unrounded medians), else from the rounded ones."""
    stored = r.get(f"overhead_{key}_pct")
    return stored if stored is not None else 100 * (r[key] - r["alone"]) / r["alone"]


def _study(run: dict) -> str:
    """Which study a run measured (runs before ``--series`` existed measured the example)."""
    return f"{run.get('series', EXAMPLE_DICOM.name)} ({run.get('instances', 91)} instances)"


def render(doc: dict) -> str:
    """The whole results file for ``doc`` (``{"runs": [run, ...]}``)."""
    lines = [HEADER]
    for k, run in enumerate(doc["runs"]):
        when = f", {run['started_utc']} UTC" if run.get("started_utc") else ""
        lines += [
            f"## Run {k + 1}{when}", "",
            f"Command: `{run['command']}`", "",
            f"{run['machine']}, {run['cpus']} CPUs, torch {run['torch']} with {run['threads']} threads, CPU; model "
            f"{run['model']}; study {_study(run)}; {run['repeats']} repetitions. Load average at start {run['load_start']}, at end "
            f"{run['load_end']}." + (f" {run['note']}" if run.get("note") else ""), "",
            "| TTA | segment alone s (read + predict + write SEG) | DICOMweb round trip s (pull + segment + STOW) | pull s | segment s | STOW s | overhead | DIMSE C-FIND + C-GET + segment + C-STORE s | overhead | DIMSE C-FIND + C-MOVE + segment + C-STORE s | overhead | DIMSE node s (C-STORE in, segment, C-STORE SEG out; settle excluded) | overhead |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]

        def dimse(r: dict, key: str) -> str:  # runs recorded before the C-GET/C-MOVE rows have none
            return f"{r[key]:.2f} | {_overhead(r, key):+.0f}%" if key in r else "not measured | -"

        for r in run["rows"]:
            web = (f"{r['trip']:.2f} | {r['pull']:.2f} | {r['segment']:.2f} | {r['store']:.2f} | {_overhead(r, 'trip'):+.0f}%"
                   if "trip" in r else "not measured | - | - | - | -")
            lines.append(
                f"| {r['tta']} | {r['alone']:.2f} | {web} | {dimse(r, 'get')} | {dimse(r, 'move')} | {r['node']:.2f} | {_overhead(r, 'node'):+.0f}% |")
        lines += ["", "All runs (s):", ""]
        for r in run["rows"]:
            if r.get("dimse_steps"):
                st = r["dimse_steps"]
                lines.append(f"- TTA {r['tta']}, DIMSE steps (medians, s): " + "; ".join(
                    f"{name} pull {st[m + '_pull']:.2f}, segment {st[m + '_segment']:.2f}, C-STORE {st[m + '_store']:.2f}"
                    for name, m in (("C-GET", "get"), ("C-MOVE", "move"))))
        for r in run["rows"]:
            extra = "".join(f"; {name} {', '.join(f'{x:.2f}' for x in r[key])}" for name, key in
                            (("C-GET", "runs_get"), ("C-MOVE", "runs_move")) if key in r)
            web = f"; DICOMweb round trip {', '.join(f'{x:.2f}' for x in r['runs_trip'])}" if "runs_trip" in r else ""
            lines.append(f"- TTA {r['tta']}: alone {', '.join(f'{x:.2f}' for x in r['runs_alone'])}{web}{extra}; DIMSE node "
                         f"{', '.join(f'{x:.2f}' for x in r['runs_node'])}")
        lines.append("")
    lines += ["## Against the goal (from the tables above)", ""]
    for study, tta in dict.fromkeys((_study(run), r["tta"]) for run in doc["runs"] for r in run["rows"]):
        got = [(k + 1, r) for k, run in enumerate(doc["runs"]) for r in run["rows"]
               if r["tta"] == tta and _study(run) == study]
        tta = f"{tta}, {study}"
        qr = "".join(f"; DIMSE {name} " + ", ".join(f"{_overhead(r, key):+.0f}% (run {k})" for k, r in got if key in r)
                     for name, key in (("C-GET", "get"), ("C-MOVE", "move")) if any(key in r for _, r in got))
        node = "; DIMSE node " + ", ".join(f"{_overhead(r, 'node'):+.0f}% (run {k})" for k, r in got) + "."
        if not any("trip" in r for _, r in got):
            lines.append(f"- TTA {tta}: DICOMweb round trip not measured{qr}{node}")
            continue
        web = [(k, r) for k, r in got if "trip" in r]
        over = ", ".join(f"{_overhead(r, 'trip'):+.0f}% (run {k})" for k, r in web)
        verdict = ("inside the +25% goal in every run" if all(_overhead(r, "trip") <= 25 for _, r in web)
                   else "over the +25% goal in every run" if all(_overhead(r, "trip") > 25 for _, r in web)
                   else "on both sides of the +25% goal")
        pulls = [r["pull"] for _, r in web]
        stows = [r["store"] for _, r in web]
        lines.append(f"- TTA {tta}: DICOMweb round trip overhead {over}: {verdict}; pull {min(pulls):.2f}-{max(pulls):.2f} s, "
                     f"STOW {min(stows):.2f}-{max(stows):.2f} s{qr}{node}")
    lines += ["", "Absolute times depend on the load in each run's header; compare columns within one run.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
