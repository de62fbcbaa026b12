"""Benchmark ``resunet predict`` (run by hand; every comparison is measured in the same run).

    .venv/bin/python bench/bench_predict.py [--model resunet/data/model/brain_extraction.pt] [--repeats 2]
        [--skip-memory] [--out bench/results/predict.md]

Sections (all on the CPU unless CUDA is available):

1. Overhead: end-to-end time per case (read the study, predict, write the mask) on the example study
   versus the network's own time over the same windows (same count, size and batch, run bare).
   Target: overhead <= 25% of the total.
2. Plain MONAI pipeline with the same network, window size, overlap, blending and batch:
   LoadImaged + EnsureChannelFirstd + Orientationd(RAS) + Spacingd(plan spacing) +
   NormalizeIntensityd + sliding_window_inference + Invertd + SaveImaged. Both without TTA and
   without post-processing; times, and voxels that differ between the two masks. Both pipelines blend
   window probabilities (softmax inside the window function, as resunet and nnU-Net do); the count
   for MONAI blending logits instead (softmax after stitching) is given too. Inputs: the example
   study (2 mm RAS), the same voxels flipped to LPS (orientation only), and Colin27 at 1 mm in LPS
   (resampled: there the two grids differ by convention, see the table's note).
3. The bundled model with its defaults (mirror TTA on) on resunet/data/example/colin27_t1.nii.gz through
   ``resunet predict`` in a fresh process (target < 20 s on 2 cores).
4. Peak RSS of ``resunet predict`` on a synthetic 512x512x600 int16 CT (0.7 x 0.7 x 0.8 mm).

The machine is shared with other developers: the load average is printed with the results, and
run-to-run noise between processes was about +-20%.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from resunet.inference import Predictor  # noqa: E402
from resunet.io.hashing import sha256_file  # noqa: E402
from resunet.io.loader import load_study  # noqa: E402
from resunet.io.nifti import write_mask_nifti  # noqa: E402

EXAMPLE = REPO / "resunet" / "data" / "example" / "colin27_t1.nii.gz"
BUNDLED = REPO / "resunet" / "data" / "model" / "brain_extraction.pt"


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * np.logical_and(a, b).sum() / s)


def end_to_end(predictor: Predictor, path: Path, out: Path) -> tuple[float, object]:
    t0 = time.perf_counter()
    vol = load_study(path)
    pred = predictor.predict(vol)
    write_mask_nifti(pred.mask, out)
    return time.perf_counter() - t0, pred


def bare_network_time(predictor: Predictor, windows: int, passes: int, roi: tuple[int, ...]) -> float:
    """The network alone over the same windows in the same calls the Predictor makes.

    Per sliding-window step of ``sw_batch`` windows (the last step may hold fewer), the Predictor
    runs its ``passes`` (TTA flips x MC samples) in calls of up to ``max(max_batch, sw_batch)`` windows.
    """
    forward = predictor.model.forward_fn()
    c = len(predictor.model.channels)
    b = predictor.sw_batch
    steps = [b] * (windows // b) + ([windows % b] if windows % b else [])
    calls = []
    for n in steps:
        per_call = max(1, max(predictor.max_batch, n) // n)
        for g in range(0, passes, per_call):
            calls.append(n * min(per_call, passes - g))
    x = torch.randn((max(calls), c, *roi), device=predictor.device)
    with torch.inference_mode():
        for n in sorted(set(calls)):
            forward(x[:n])  # warm-up, one per batch size (the Predictor's first calls pay this too)
        t0 = time.perf_counter()
        for n in calls:
            forward(x[:n])
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - t0


def section_overhead(model: Path, repeats: int, tmp: Path) -> list[str]:
    rows = ["| run | end-to-end s (read + predict + write) | Predictor stages (s) | network time inside predict s "
            "| overhead vs network inside | bare network, same windows and calls, s | overhead vs bare |",
            "|---|---|---|---|---|---|---|"]
    for tta in (False, True):
        p = Predictor(model, tta=tta)
        best = None
        for _ in range(repeats):
            total, pred = end_to_end(p, EXAMPLE, tmp / "mask.nii.gz")
            if best is None or total < best[0]:
                best = (total, pred)
        total, pred = best
        shape = load_study(EXAMPLE).shape
        from resunet.preprocess import prepare

        grid = prepare(load_study(EXAMPLE), p.plan).shape
        roi = p.roi_for(grid)
        bare = min(bare_network_time(p, pred.windows, pred.passes, roi) for _ in range(repeats))
        stages = ", ".join(f"{k} {v:.2f}" for k, v in pred.timings.items() if k != "network")
        rows.append(
            f"| TTA {'on (8 flips)' if tta else 'off'}, {pred.windows} windows of {roi} x {pred.passes} passes, "
            f"input {shape}, grid {grid} | {total:.2f} | {stages} | {pred.timings['network']:.2f} | "
            f"{100 * (total - pred.timings['network']) / total:.1f}% | {bare:.2f} | {100 * (total - bare) / total:.1f}% |"
        )
    return rows


def lps_1mm_input(tmp: Path) -> Path | None:
    """Colin27 at 1 mm (mricron-data's ch2.nii.gz, 181x217x181) with the voxel axes flipped to LPS, or None."""
    src = Path("/usr/share/mricron/templates/ch2.nii.gz")
    if not src.exists():
        return None
    return lps_input(tmp, src, "colin27_1mm_lps.nii.gz")


def lps_input(tmp: Path, src: Path, name: str) -> Path:
    """``src`` with its voxel axes flipped to LPS (same voxels, same world positions)."""
    import nibabel as nib
    from nibabel import orientations as nio

    img = nib.load(str(src))
    t = nio.ornt_transform(nio.io_orientation(img.affine), nio.axcodes2ornt(("L", "P", "S")))
    data = np.asanyarray(img.dataobj)
    out = tmp / name
    nib.save(nib.Nifti1Image(nio.apply_orientation(data, t), img.affine @ nio.inv_ornt_aff(t, img.shape)), str(out))
    return out


def section_monai(model: Path, repeats: int, tmp: Path, image: Path = EXAMPLE) -> list[str]:
    from monai.data import decollate_batch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (AsDiscreted, Compose, EnsureChannelFirstd, Invertd, LoadImaged,
                                  NormalizeIntensityd, Orientationd, SaveImaged, Spacingd)

    p = Predictor(model, tta=False, postprocess=False)
    spacing = p.plan.spacing
    net = p.model.module
    pre = Compose([
        LoadImaged(keys="image", image_only=False),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=spacing, mode="bilinear"),
        NormalizeIntensityd(keys="image"),
    ])
    post = Compose([
        Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted(keys="pred", argmax=True),
        SaveImaged(keys="pred", output_dir=str(tmp / "monai"), output_postfix="seg", separate_folder=False,
                   output_dtype=np.uint8, resample=False, print_log=False),
    ])

    forward = p.model.forward_fn()

    def run_monai(blend_probabilities: bool = True) -> tuple[float, np.ndarray, tuple[int, ...]]:
        """(seconds, mask on the input grid, network grid) of the plain MONAI pipeline."""
        t0 = time.perf_counter()
        data = pre({"image": str(image)})
        img = data["image"]
        grid = tuple(img.shape[1:])
        window = (lambda x: torch.softmax(forward(x), 1)) if blend_probabilities else forward
        with torch.inference_mode():
            out = sliding_window_inference(img[None].float().to(p.device), p.roi_for(grid), p.sw_batch, window,
                                           overlap=p.overlap, mode="gaussian")
        data["pred"] = out[0].cpu()
        data["pred"].applied_operations = img.applied_operations
        data["pred"].meta = img.meta
        arr = np.asarray(post(data)["pred"][0])
        return time.perf_counter() - t0, arr, grid

    ours_t, monai_t = [], []
    ours_mask = monai_mask = None
    for _ in range(repeats):  # interleaved so that load changes hit both
        t, pred = end_to_end(p, image, tmp / "ours.nii.gz")
        ours_t.append(t)
        ours_mask = pred.mask.array
        t, monai_mask, monai_grid = run_monai()
        monai_t.append(t)
    _, logits_mask, _ = run_monai(blend_probabilities=False)  # untimed: MONAI's other common choice
    del decollate_batch, net
    d = dice(ours_mask, monai_mask)
    differ = int((ours_mask != monai_mask).sum())
    differ_logits = int((ours_mask != logits_mask).sum())
    vol = load_study(image)
    shape = vol.shape
    from resunet.preprocess import prepare

    ours_grid = prepare(vol, p.plan).shape
    return [
        f"Input `{image.name}` {shape}:",
        "",
        "| pipeline (TTA off, no post-processing) | best end-to-end s | all runs s |",
        "|---|---|---|",
        f"| resunet Predictor (+ load + write) | {min(ours_t):.2f} | {', '.join(f'{t:.2f}' for t in ours_t)} |",
        f"| plain MONAI (LoadImaged..Spacingd, sliding_window_inference, Invertd, SaveImaged) | {min(monai_t):.2f} | "
        f"{', '.join(f'{t:.2f}' for t in monai_t)} |",
        "",
        f"Masks: **{differ} of {ours_mask.size} voxels differ** (Dice {d:.4f}); network grids: MONAI "
        f"{monai_grid}, resunet {ours_grid}"
        + (" (the same grid)." if monai_grid == ours_grid else
           ": where the input needs resampling the grids differ by up to half a voxel by convention (MONAI's "
           "Spacingd keeps the first voxel's centre, resunet keeps the grid's outer corners), so masks differ "
           "along the boundary.")
        + f" With MONAI blending logits instead of probabilities: {differ_logits} voxels differ.",
    ]


def first_case(out: Path) -> dict[str, Any]:
    """The first case record of ``out/predictions.json`` (empty when the run wrote none)."""
    import json

    doc = json.loads((out / "predictions.json").read_text()) if (out / "predictions.json").exists() else {}
    return (doc.get("cases") or [{}])[0]


def write_synthetic_ct(path: Path) -> Path:
    """A 512x512x600 int16 CT (0.7x0.7x0.8 mm, LPS): a body-like ellipse of soft tissue in air, plus noise."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    arr = np.empty((512, 512, 600), dtype=np.int16, order="F")
    yy, xx = np.mgrid[-256:256, -256:256]
    body = (xx / 220.0) ** 2 + (yy / 160.0) ** 2 < 1
    for k in range(600):
        arr[:, :, k] = np.where(body, 40, -1000) + rng.integers(-20, 20, size=(512, 512), dtype=np.int16)
    nib.save(nib.Nifti1Image(arr, np.diag([-0.7, -0.7, 0.8, 1.0])), str(path))
    return path


def section_cli(model: Path, tmp: Path, extra: list[str]) -> list[str]:
    out = tmp / "cli"
    cmd = [sys.executable, "-m", "resunet", "predict", str(EXAMPLE), "--out", str(out), "--model", str(model),
           "--no-audit", "--no-progress", *extra]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    case = first_case(out)
    return [
        f"`{shlex.join(['resunet', *cmd[3:]])}` (exit {res.returncode}): whole command {wall:.1f} s "
        f"(interpreter start and imports included), case {case.get('seconds')} s, "
        f"stages {case.get('timings')}, volume {case.get('volumes_ml')} mL",
    ]


def section_memory(model: Path, tmp: Path) -> list[str]:
    path = write_synthetic_ct(tmp / "ct512.nii")
    out = tmp / "mem"
    cmd = [sys.executable, "-c",
           "import resource, sys; from resunet.cli import main; code = main(sys.argv[1:]); "
           "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(code)",
           "predict", str(path), "--out", str(out), "--model", str(model), "--no-audit", "--no-progress", "--no-tta"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = next((ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("PEAK_RSS_MB")), "?")
    case = first_case(out)
    return [
        f"Synthetic CT 512x512x600 int16 (0.7x0.7x0.8 mm, {512 * 512 * 600 * 2 / 2**20:.0f} MiB of voxels) through "
        f"`resunet predict --no-tta` (TTA multiplies the window count, not the memory): peak RSS **{float(peak):.0f} MB** (whole process, torch included), "
        f"exit {res.returncode}, {wall:.1f} s wall, case stages {case.get('timings')}",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(BUNDLED))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "predict.md"))
    args = ap.parse_args()
    model = Path(args.model)
    lines = [
        "# resunet predict benchmark",
        "",
        f"Command: `{shlex.join(['.venv/bin/python', 'bench/bench_predict.py', *sys.argv[1:]])}`",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, device "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}; model {model} (sha256 {sha256_file(model)[:16]}...); "
        f"load average at start {loadavg()} "
        "(the machine is shared; run-to-run noise about +-20%)",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as d:
        tmp = Path(d)
        print("overhead ...", flush=True)
        lines += ["## 1. Overhead: end-to-end vs the network alone (example study)", ""]
        lines += section_overhead(model, args.repeats, tmp) + [""]
        print("monai ...", flush=True)
        lines += ["## 2. Versus a plain MONAI pipeline (same network, windows, overlap, blending, batch)", ""]
        lines += section_monai(model, args.repeats, tmp) + [""]
        lines += section_monai(model, args.repeats, tmp, lps_input(tmp, EXAMPLE, "colin27_t1_lps.nii.gz")) + [""]
        lps = lps_1mm_input(tmp)
        if lps is not None:
            lines += section_monai(model, args.repeats, tmp, lps) + [""]
        print("cli ...", flush=True)
        lines += ["## 3. Bundled model, defaults, example study, fresh process", ""]
        lines += section_cli(model, tmp, []) + [""]
        if not args.skip_memory:
            print("memory ...", flush=True)
            lines += ["## 4. Memory on a big CT", ""]
            lines += section_memory(model, tmp) + [""]
    lines += [f"Load average at end: {loadavg()}", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from resunet.io.atomic import atomic_write_text

    # the sections other scripts write between <!-- name --> markers (bench_ensemble, bench_memory_format) stay
    kept = marked_sections(out.read_text(encoding="utf-8")) if out.exists() else []
    atomic_write_text(out, "\n".join(lines) + "".join("\n" + k + "\n" for k in kept))
    print("\n".join(lines))
    return 0


def marked_sections(text: str) -> list[str]:
    """The ``<!-- name -->`` ... ``<!-- /name -->`` blocks of ``text``, markers included, in order."""
    return [m.group(0) for m in re.finditer(r"<!-- ([\w-]+) -->\n.*?<!-- /\1 -->", text, flags=re.S)]


if __name__ == "__main__":
    raise SystemExit(main())
