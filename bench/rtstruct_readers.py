"""RTSTRUCT holes in other readers: plastimatch (default options: it ORs a structure's contours) and
an independent XOR rasteriser, on the bundled tissue model's mask of the example DICOM study, for
holes written as keyholes (resunet's writer) and as separate inner contours (the writer before
issue 26, which relied on the even-odd rule).

    .venv/bin/python bench/rtstruct_readers.py --out bench/results/rtstruct.md
    .venv/bin/python bench/rtstruct_readers.py --time 5 --out bench/results/rtstruct.md   # idle machine

The agreement needs no idle machine; ``--time N`` adds the writing time of each encoding (median
and range of N writes, in one process), which does. The results file is this script's output.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from dicom_checks import dice, plastimatch_structures, rasterise_rtstruct  # noqa: E402

import resunet.io.rtstruct as rtstruct  # noqa: E402
from resunet.inference import Predictor  # noqa: E402
from resunet.inference.bundled import bundled_path  # noqa: E402
from resunet.io import load_study  # noqa: E402
from resunet.io.contours import outlines  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here (default: print)")
    ap.add_argument("--time", type=int, default=0, metavar="N", help="also time N writes per encoding (idle machine)")
    args = ap.parse_args()

    from conftest import EXAMPLE_DIR

    series = EXAMPLE_DIR / "colin27_t1_dicom"
    src = load_study(series)
    pred = Predictor(bundled_path("brain_tissue"), device="cpu", tta=False).predict(src)
    mask = np.asarray(pred.mask.array)
    labels = {int(v): n for v, n in pred.mask.meta["labels"].items() if int(v)}
    files = src.meta["dicom_files"]
    rows = []
    timings: dict[str, list[float]] = {}
    counts: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for encoding, contours in (("separate hole contours", outlines), ("keyholes", rtstruct.keyhole_contours)):
            saved = rtstruct.keyhole_contours
            rtstruct.keyhole_contours = contours  # the writer's one contour step, swapped for the comparison
            try:
                rs = rtstruct.write_rtstruct(pred.mask, src, Path(tmp) / f"{len(rows)}.dcm", labels)
                for _ in range(args.time):
                    t = time.perf_counter()
                    rtstruct.write_rtstruct(pred.mask, src, Path(tmp) / "timed.dcm", labels)
                    timings.setdefault(encoding, []).append(time.perf_counter() - t)
            finally:
                rtstruct.keyhole_contours = saved
            ds = pydicom.dcmread(rs)
            counts[encoding] = (sum(len(rc.get("ContourSequence", [])) for rc in ds.ROIContourSequence), rs.stat().st_size)
            plast = plastimatch_structures(rs, series, files)
            xor = rasterise_rtstruct(rs, files, rule="xor")
            for value, name in labels.items():
                truth = mask == value
                rows.append((encoding, name, int(truth.sum()), int(plast[name].sum()), dice(plast[name], truth),
                             int((plast[name] != truth).sum()), dice(xor[name], truth)))
    lines = [
        "# RTSTRUCT holes in other readers",
        "",
        "`.venv/bin/python bench/rtstruct_readers.py --out bench/results/rtstruct.md`: the bundled `brain_tissue`",
        "model's mask (no TTA) of `colin27_t1_dicom`, written as an RTSTRUCT with each hole encoding, converted by",
        "plastimatch (`plastimatch convert --referenced-ct`, default options) and by an independent even-odd",
        "rasteriser (`tests/dicom_checks.py`), each compared with the mask voxel by voxel.",
        "",
        "| holes written as | structure | mask voxels | plastimatch voxels | plastimatch Dice | voxels differ | even-odd Dice |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {e} | {n} | {m} | {p} | {d:.3f} | {x} | {dx:.3f} |" for e, n, m, p, d, x, dx in rows]
    if timings:
        lines += ["", f"Writing the RTSTRUCT (`write_rtstruct`, {args.time} writes each, one process, load average"
                  f" {os.getloadavg()[0]:.1f} at the end):", "",
                  "| holes written as | median s | min s | max s | contours | file bytes |", "|---|---|---|---|---|---|"]
        for encoding, ts in timings.items():
            lines.append(f"| {encoding} | {statistics.median(ts):.2f} | {min(ts):.2f} | {max(ts):.2f} |"
                         f" {counts[encoding][0]} | {counts[encoding][1]} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
