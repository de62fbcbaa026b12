"""Ensemble prediction vs separate calls: `resunet predict --model A B C` against `resunet predict --model A`
and against three separate calls (A, then B, then C), fresh processes, on the bundled example study.

The three members are the bundled model and two copies of it whose floating-point weights carry a
little Gaussian noise (5% of each tensor's standard deviation, seeds 1 and 2), saved with
``save_checkpoint`` as valid checkpoints of their own (other hashes, same plan and labels). The
ensemble's probability map is also checked against the mean of the three separate runs' maps.

    .venv/bin/python bench/bench_ensemble.py --repeats 3 --out bench/results/predict.md

The section is written between ``<!-- ensemble -->`` markers in ``--out`` (appended the first time).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "resunet" / "data" / "example" / "colin27_t1.nii.gz"
BUNDLED = REPO / "resunet" / "data" / "model" / "brain_extraction.pt"
BEGIN, END = "<!-- ensemble -->", "<!-- /ensemble -->"


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_members(tmp: Path) -> list[Path]:
    from resunet.training.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(BUNDLED)
    paths = [BUNDLED]
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for k, v in ck.state_dict.items():
            if v.is_floating_point() and v.numel() > 1:
                v = v + torch.randn(v.shape, generator=g) * 0.05 * float(v.std())
            sd[k] = v
        card = dict(ck.model_card, name=f"{ck.model_card.get('name', 'bundled')}-perturbed-{seed}")
        path = tmp / f"member{seed}.pt"
        save_checkpoint(path, state_dict=sd, network=ck.network, plan=ck.plan, labels=ck.labels, channels=ck.channels,
                        postprocess=ck.postprocess, model_card=card, fingerprint=ck.fingerprint, versions=ck.versions)
        paths.append(path)
    return paths


def predict(models: list[Path], out: Path, extra: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "resunet", "predict", str(EXAMPLE), "--out", str(out), "--model",
           *map(str, models), "--no-audit", "--no-progress", *extra]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({res.returncode}): {res.stderr[-400:]}")
    rec = json.loads((out / "predictions.json").read_text())["cases"][0]
    return wall, rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "predict.md"))
    args = ap.parse_args()
    load_start = loadavg()
    lines = [BEGIN, "## 5. Ensemble of 3 vs 3 separate calls (example study, fresh processes)", "",
             f"Command: `{shlex.join(['.venv/bin/python', 'bench/bench_ensemble.py', *sys.argv[1:]])}`; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads); load average at start {load_start} (the machine is shared with "
             "other jobs; run-to-run noise about +-20%).",
             "Members: the bundled model and two copies with 5% Gaussian weight noise (seeds 1, 2), saved as "
             "checkpoints of their own. Each run writes to a fresh folder (no resume); wall = the whole command "
             "(interpreter start, imports, model loading, read, predict, write).", ""]
    with tempfile.TemporaryDirectory(prefix="bench-ensemble-") as d:
        tmp = Path(d)
        members = make_members(tmp)
        n = [0]

        def fresh() -> Path:
            n[0] += 1
            return tmp / f"out{n[0]}"

        for label, extra in (("TTA on (default, 8 flips)", ["--save-probabilities"]),
                             ("TTA off", ["--no-tta", "--save-probabilities"])):
            single, three, ens = [], [], []
            case_single, case_ens = [], []
            probs_sep: list[Path] = []
            prob_ens = None
            for r in range(args.repeats):
                print(f"{label}: repeat {r + 1}/{args.repeats} ...", flush=True)
                w, rec = predict(members[:1], fresh(), extra)
                single.append(w)
                case_single.append(rec["seconds"])
                total = 0.0
                probs_sep = []
                for m in members:
                    out = fresh()
                    w, _ = predict([m], out, extra)
                    total += w
                    probs_sep.append(out / "colin27_t1.prob.nii.gz")
                three.append(total)
                out = fresh()
                w, rec = predict(members, out, extra)
                ens.append(w)
                case_ens.append(rec["seconds"])
                prob_ens = out / "colin27_t1.prob.nii.gz"
            mean = np.mean([np.asarray(nib.load(p).dataobj, dtype=np.float64) for p in probs_sep], axis=0)
            got = np.asarray(nib.load(prob_ens).dataobj, dtype=np.float64)
            b1, b3, be = min(single), min(three), min(ens)
            fmt = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
            lines += [f"### {label}", "",
                      "| run | best wall s | all runs s | per-case s in predictions.json (best) | vs one model's call |",
                      "|---|---|---|---|---|",
                      f"| one model (`--model A`) | {b1:.1f} | {fmt(single)} | {min(case_single):.2f} | 1.00x |",
                      f"| three separate calls (A, B, C) | {b3:.1f} | {fmt(three)} | | {b3 / b1:.2f}x |",
                      f"| ensemble (`--model A B C`) | {be:.1f} | {fmt(ens)} | {min(case_ens):.2f} | **{be / b1:.2f}x** |",
                      "",
                      f"Ensemble vs three calls: {be / b3:.2f}x the time. Ensemble probabilities vs the mean of the three "
                      f"separate runs' probability maps: max abs difference {np.abs(got - mean).max():.2e} over "
                      f"{got.size} voxels.", ""]
    lines += [f"Load average at end: {loadavg()}", END, ""]
    text = "\n".join(lines)
    write_section(Path(args.out), text, BEGIN, END)
    print(text)
    return 0


def write_section(out: Path, text: str, begin: str, end: str) -> None:
    """Put ``text`` (which starts with ``begin`` and ends with ``end``) in place of the section
    between those markers in ``out``, or append it; written to a temp file, then renamed."""
    old = out.read_text(encoding="utf-8") if out.exists() else ""
    if begin in old and end in old:
        new = old[: old.index(begin)] + text + old[old.index(end) + len(end) + 1 :]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    tmp = out.with_name(out.name + ".part")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(out)


if __name__ == "__main__":
    raise SystemExit(main())
