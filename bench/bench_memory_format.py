"""CPU inference in channels-last vs contiguous memory (what `LoadedModel.channels_last` decides).

Two measurements, both formats alternated in one process so machine load hits them alike:

1. the network alone: the bundled model's forward on B random windows of 64^3 (B = 2, 4, 8, 16: a
   call of sw_batch windows without TTA, and the calls that carry the TTA flips), best of N;
2. the Predictor on the example study (warm: one untimed prediction first), network time as
   ``Prediction.timings["network"]``, TTA off and on, best of N; masks of the two formats compared.

    .venv/bin/python bench/bench_memory_format.py --repeats 5

The section is written between ``<!-- memory-format -->`` markers in ``--out`` (appended the first time).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from bench_ensemble import write_section  # noqa: E402  (the results-section writer both benches share)
BUNDLED = REPO / "resunet" / "data" / "model" / "brain_extraction.pt"
EXAMPLE = REPO / "resunet" / "data" / "example" / "colin27_t1.nii.gz"
BEGIN, END = "<!-- memory-format -->", "<!-- /memory-format -->"


def forward_rows(repeats: int) -> list[str]:
    from resunet.inference import load_model

    module = load_model(BUNDLED).module.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        out = module(x)
        return out[0] if isinstance(out, (list, tuple)) else out

    rows = []
    for b in (2, 4, 8, 16):
        x = torch.randn(b, 1, 64, 64, 64, generator=torch.Generator().manual_seed(b))
        times: dict[str, list[float]] = {"contiguous": [], "channels_last_3d": []}
        with torch.inference_mode():
            outs = {}
            for _ in range(repeats + 1):  # the first round warms both formats up, untimed
                for fmt, mem in (("contiguous", torch.contiguous_format), ("channels_last_3d", torch.channels_last_3d)):
                    module.to(memory_format=mem)
                    xin = x.contiguous(memory_format=mem)
                    t0 = time.perf_counter()
                    outs[fmt] = run(xin)
                    times[fmt].append(time.perf_counter() - t0)
        c, cl = min(times["contiguous"][1:]), min(times["channels_last_3d"][1:])
        diff = float((outs["contiguous"] - outs["channels_last_3d"]).abs().max())
        rows.append(f"| {b} | {c * 1000:.0f} | {cl * 1000:.0f} | {c / b * 1000:.1f} | {cl / b * 1000:.1f} | "
                    f"**{c / cl:.2f}x** | {diff:.1e} |")
    return rows


def predictor_rows(repeats: int) -> list[str]:
    import resunet.inference.model as model_mod
    from resunet.inference import Predictor
    from resunet.io import read_nifti

    image = read_nifti(EXAMPLE)
    auto = model_mod.LoadedModel.channels_last
    rows = []
    try:
        for tta in (False, True):
            net: dict[bool, list[float]] = {False: [], True: []}
            masks: dict[bool, np.ndarray] = {}
            for r in range(repeats + 1):
                for cl in (False, True):
                    # the property decides the format when the Predictor moves the model to the CPU
                    model_mod.LoadedModel.channels_last = property(lambda self, cl=cl: cl and auto.fget(self))
                    pred = Predictor(BUNDLED, device="cpu", tta=tta).predict(image)
                    if r:  # round 0 warms up (oneDNN primitives), untimed
                        net[cl].append(pred.timings["network"])
                    masks[cl] = np.asarray(pred.mask.array)
            c, cl = min(net[False]), min(net[True])
            rows.append(f"| {'on (8 flips)' if tta else 'off'} | {c:.2f} | {cl:.2f} | **{c / cl:.2f}x** | "
                        f"{int((masks[False] != masks[True]).sum())} of {masks[True].size} |")
    finally:
        model_mod.LoadedModel.channels_last = auto
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "predict.md"))
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [BEGIN, "## 6. CPU inference: channels-last vs contiguous memory", "",
             f"Command: `{shlex.join(['.venv/bin/python', 'bench/bench_memory_format.py', *sys.argv[1:]])}`; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads); load average at start {load}. Bundled model "
             "(1.05 M parameters); both formats alternated in one process, best of "
             f"{args.repeats} after an untimed warm-up round.", "",
             "### Network forward, B windows of 64^3", "",
             "| B | contiguous ms | channels-last ms | per window contiguous ms | per window channels-last ms | "
             "speed-up | max abs logit difference |", "|---|---|---|---|---|---|---|"]
    lines += forward_rows(args.repeats)
    lines += ["", "### Predictor on the example study (network time, warm)", "",
              "| TTA | contiguous s | channels-last s | speed-up | mask voxels that differ |", "|---|---|---|---|---|"]
    lines += predictor_rows(args.repeats)
    lines += ["", f"Load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", END, ""]
    text = "\n".join(lines)
    print(text)
    write_section(Path(args.out), text, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
