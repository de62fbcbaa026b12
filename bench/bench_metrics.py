"""Benchmark: resunet's metrics against MONAI's and medpy's on the same synthetic masks, one run.

Cases: ``--cases`` pairs of ``--size``^3 binary masks (noisy ellipsoids; the prediction is the
reference's ellipsoid shifted, rescaled and re-noised) with anisotropic spacing 0.7 x 0.8 x 2.0 mm.

Timed, each on the same data in the same process:

- ``resunet binary_metrics``: dice/iou/precision/recall/hd95/assd/nsd/volumes from in-memory arrays,
  one process.
- ``resunet evaluate_folders (2 proc)``: the library path of ``resunet evaluate`` (reads the NIfTI
  files too, cases spread over 2 processes); no report rendering.
- ``MONAI``: ``compute_hausdorff_distance(percentile=95)``, ``compute_average_surface_distance
  (symmetric=True)``, ``compute_surface_dice`` and ``compute_dice``, with ``spacing``.
- ``medpy``: ``hd95``, ``assd`` and ``dc`` with ``voxelspacing`` (medpy has no NSD). Note that medpy's
  hd95 is the 95th percentile of both directions pooled, not the larger of the two directed
  percentiles, so its hd95 differs from MONAI's and ours by definition.

Usage::

    .venv/bin/python bench/bench_metrics.py --cases 20 --size 256 --out bench/results/metrics.md
    .venv/bin/python bench/bench_metrics.py --render bench/results/metrics.json --out bench/results/metrics.md

``--out`` writes the whole results file and its figures as JSON beside it (both atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

SPACING = (0.7, 0.8, 2.0)


def make_case(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, reference) boolean masks of shape (n, n, n)."""
    rng = np.random.default_rng(seed)
    axes = [np.arange(n, dtype=np.float32) for _ in range(3)]

    # linear interpolation from a 16^3 grid to n^3, one axis at a time as a matrix product (separable
    # trilinear upsampling; ndi.zoom takes seconds per case at 256^3)
    pos = np.linspace(0, 15, n)
    lo = np.minimum(pos.astype(int), 14)
    w = np.zeros((n, 16), np.float32)
    w[np.arange(n), lo] = 1 - (pos - lo)
    w[np.arange(n), lo + 1] = pos - lo

    def ellipsoid(centre, radii, noise_seed):
        nrng = np.random.default_rng(noise_seed)
        coarse = ndi.gaussian_filter(nrng.standard_normal((16, 16, 16)).astype(np.float32), 1.5)
        part = np.ascontiguousarray(np.moveaxis(np.tensordot(np.tensordot(w, coarse, axes=(1, 0)), w, axes=(1, 1)), 2, 1))
        noise = (part.reshape(n * n, 16) @ w.T).reshape(n, n, n)  # one GEMM
        sq = [((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii)]
        noise *= 0.6
        noise += sq[0][:, None, None]
        noise += sq[1][None, :, None]
        noise += sq[2][None, None, :]
        return noise < 1.0

    centre = rng.uniform(0.4 * n, 0.6 * n, 3)
    radii = np.array([rng.uniform(0.12, 0.3) * n, rng.uniform(0.12, 0.3) * n, rng.uniform(0.06, 0.15) * n])
    ref = ellipsoid(centre, radii, seed * 2 + 1)
    pred = ellipsoid(centre + rng.normal(0, 0.01 * n, 3), radii * rng.uniform(0.9, 1.1, 3), seed * 2 + 2)
    return pred, ref


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--tolerance-mm", type=float, default=2.0)
    ap.add_argument("--skip-medpy", action="store_true")
    ap.add_argument("--out", type=Path, help="write the whole results file here (Markdown) and its figures to the same name .json")
    ap.add_argument("--render", type=Path, metavar="JSON", help="no measuring: write --out from this JSON of an earlier run")
    args = ap.parse_args(argv)
    if args.render:
        if not args.out:
            ap.error("--render needs --out")
        from resunet.io.atomic import atomic_write_text

        atomic_write_text(args.out, render(json.loads(args.render.read_text())))
        return 0

    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    from resunet.evaluation import binary_metrics, evaluate_folders

    medpy = None
    if not args.skip_medpy:
        from medpy.metric import binary as medpy

    warnings.simplefilter("ignore")
    times = {"resunet": 0.0, "monai": 0.0, "medpy": 0.0}
    diffs = {k: [] for k in ("monai_hd95", "monai_assd", "monai_nsd", "monai_dice", "medpy_assd", "medpy_hd95")}
    tmp = Path(tempfile.mkdtemp(prefix="bench_metrics_"))
    (tmp / "pred").mkdir()
    (tmp / "gt").mkdir()
    aff = np.diag([*SPACING, 1.0])
    t_gen = time.perf_counter()
    voxels = []
    for c in range(args.cases):
        pred, ref = make_case(c, args.size)
        voxels.append(int(ref.sum()))
        nib.save(nib.Nifti1Image(pred.astype(np.uint8), aff), str(tmp / "pred" / f"case{c:02d}.nii.gz"))
        nib.save(nib.Nifti1Image(ref.astype(np.uint8), aff), str(tmp / "gt" / f"case{c:02d}.nii.gz"))

        t = time.perf_counter()
        ours = binary_metrics(pred, ref, SPACING, tolerance_mm=args.tolerance_mm)
        times["resunet"] += time.perf_counter() - t

        p_t = torch.from_numpy(pred)[None, None].float()
        r_t = torch.from_numpy(ref)[None, None].float()
        t = time.perf_counter()
        m_hd = compute_hausdorff_distance(p_t, r_t, percentile=95, spacing=list(SPACING)).item()
        m_asd = compute_average_surface_distance(p_t, r_t, symmetric=True, spacing=list(SPACING)).item()
        m_nsd = compute_surface_dice(p_t, r_t, class_thresholds=[args.tolerance_mm], spacing=list(SPACING)).item()
        m_dice = compute_dice(p_t, r_t).item()
        times["monai"] += time.perf_counter() - t
        diffs["monai_hd95"].append(abs(ours.hd95 - m_hd) / m_hd)
        diffs["monai_assd"].append(abs(ours.assd - m_asd) / m_asd)
        diffs["monai_nsd"].append(abs(ours.nsd - m_nsd) / m_nsd)
        diffs["monai_dice"].append(abs(ours.dice - m_dice) / m_dice)

        if medpy is not None:
            t = time.perf_counter()
            md_hd = medpy.hd95(pred, ref, voxelspacing=SPACING)
            md_asd = medpy.assd(pred, ref, voxelspacing=SPACING)
            medpy.dc(pred, ref)
            times["medpy"] += time.perf_counter() - t
            diffs["medpy_assd"].append(abs(ours.assd - md_asd) / md_asd)
            diffs["medpy_hd95"].append(abs(ours.hd95 - md_hd) / md_hd)
        print(f"case {c}: {ref.sum()} ref voxels, hd95 {ours.hd95:.3f} mm, dice {ours.dice:.3f}", file=sys.stderr)
    t_gen = time.perf_counter() - t_gen

    t = time.perf_counter()
    ev = evaluate_folders(tmp / "pred", tmp / "gt", tolerance_mm=args.tolerance_mm, workers=2)
    t_folder = time.perf_counter() - t
    assert len(ev.rows) == args.cases

    result = {
        "cases": args.cases, "size": args.size, "tolerance_mm": args.tolerance_mm, "medpy": medpy is not None,
        "out": str(args.out) if args.out else None,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cpus": os.cpu_count(),
        "load_end": list(os.getloadavg()),
        "versions": f"Python {platform.python_version()}, torch {torch.__version__}, "
                    f"monai {__import__('monai').__version__}, numpy {np.__version__}, scipy {__import__('scipy').__version__}"
                    + (f", medpy {__import__('importlib.metadata').metadata.version('medpy')}" if medpy is not None else ""),
        "ref_voxels": [min(voxels), max(voxels)],
        "total_s": {"resunet": times["resunet"], "folders": t_folder, "monai": times["monai"],
                    **({"medpy": times["medpy"]} if medpy is not None else {})},
        "max_rel_diff": {k: max(v) for k, v in diffs.items() if v},
    }
    text = render(result)
    print(text)
    if args.out:
        from resunet.io.atomic import atomic_write_text

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
        atomic_write_text(args.out, text)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def render(r: dict) -> str:
    """The whole results file for one run's ``r`` (what ``main`` stores in the ``.json``)."""
    n = r["cases"]
    t = r["total_s"]
    rows = [
        ("resunet `binary_metrics` (1 process, arrays in memory)", "dice, iou, precision, recall, hd95, assd, nsd, volumes", t["resunet"]),
        ("resunet `evaluate_folders` (2 processes, reads the NIfTI files)", "the same + reading 2 files per case", t["folders"]),
        ("MONAI 1.x metric functions (arrays in memory)", "hd95, assd, nsd, dice", t["monai"]),
    ]
    if r["medpy"]:
        rows.append(("medpy `hd95` + `assd` + `dc` (arrays in memory)", "hd95 (pooled), assd, dice", t["medpy"]))
    base = t["monai"]
    lines = [
        f"# Metrics benchmark: {n} cases of {r['size']}^3 masks, spacing {' x '.join(map(str, SPACING))} mm",
        "",
        "Written whole by `bench/bench_metrics.py --out`, its figures as data in the `.json` of the same name "
        "(`--render JSON --out MD` rewrites this file from it).",
        "",
        f"Command: `.venv/bin/python bench/bench_metrics.py --cases {n} --size {r['size']}"
        + ("" if r["medpy"] else " --skip-medpy") + (f" --out {r['out']}" if r["out"] else "") + "`",
        f"Date (UTC): {r['date_utc']}; host CPUs: {r['cpus']}; "
        f"load average at the end: {', '.join(f'{x:.1f}' for x in r['load_end'])} (machine shared with other work)",
        r["versions"],
        f"Reference mask sizes: {r['ref_voxels'][0]} to {r['ref_voxels'][1]} voxels. NSD tolerance {r['tolerance_mm']:g} mm.",
        "",
        "| method | computes | total s | s per case | vs MONAI |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, what, secs in rows:
        rel = "baseline" if secs == base else (f"{base / secs:.1f}x faster" if secs < base else f"{secs / base:.1f}x slower")
        lines.append(f"| {name} | {what} | {secs:.2f} | {secs / n:.3f} | {rel} |")
    lines += ["", "Agreement with resunet (largest relative difference over the cases):", ""]
    for k, v in r["max_rel_diff"].items():
        lines.append(f"- {k.replace('_', ' ')}: {v:.2e}")
    if r["medpy"]:
        lines.append("  (medpy's hd95 pools both directions before taking the 95th percentile, so it differs by "
                     "definition; its assd matches.)")  # fmt: skip
    lines += ["", "Notes: all rows ran in the same process on the same masks, one after the other per case. The "
              f"`evaluate_folders` row includes decompressing and reading the {2 * n} `.nii.gz` files and starting 2 worker "
              "processes; the other rows start from arrays in memory.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
