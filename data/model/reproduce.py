"""Reproduce the bundled brain-extraction model: data -> training -> held-out evaluation -> ship.

    .venv/bin/pip install -c constraints.txt -e '.[data]'     # nilearn, for the held-out MNI152 head
    .venv/bin/python data/model/reproduce.py --work /tmp/resunet-bundled

Steps (each can be skipped when its output exists, see --help):

1. **Training data** (``WORK/train_data``, MSD layout): the example study
   ``resunet/data/example/colin27_t1.nii.gz`` + ``colin27_brainmask.nii.gz`` (Colin27, one head, 2 mm)
   as it is, plus simulated acquisitions of it (``simulate.py``: 1-3.5 mm voxels incl. thick
   slices, any axis order, oblique head position, cropped field of view, intensity remapping,
   bias field, Rician noise, some skull-stripped). Two more variants are the validation cases.
2. **Training**: ``python -m resunet train --data WORK/train_data --out WORK/run --config
   data/model/train_config.yaml`` (heavy on-the-fly augmentation on top, see the config).
3. **Held-out evaluation** on a head the model never saw: nilearn's MNI152 2009 template (a
   skull-stripped average of 152 heads) with nilearn's brain mask (template > 0.2), in its original
   2 mm form and in simulated acquisitions (1x1x3 and 2x2x3 mm, LPS/LSA/PIR, intensity remap,
   noise, bias field), each predicted with :class:`resunet.inference.Predictor` and scored with
   :func:`resunet.evaluation.evaluate_case` (Dice, HD95 in mm, volume error in mL and %).
4. **Ship**: ``resunet/data/model/brain_extraction.pt`` (best.pt with the metrics in its model card),
   ``resunet/data/model/metrics.json`` and ``resunet/data/model/MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from typing import Any, Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
#: where the shipped files go: the checkpoint, its metrics and model card are package data
SHIP = REPO / "resunet" / "data" / "model"
sys.path.insert(0, str(HERE))

from simulate import Acquisition, random_acquisition, simulate  # noqa: E402

from resunet.io import Volume, read_nifti, write_nifti  # noqa: E402

N_TRAIN_VARIANTS = 30
N_VAL_VARIANTS = 2
TRAIN_SEED = 20261127
TEST_SEED = 4242  # a different stream: no test acquisition equals a training one


def held_out_grids() -> list[tuple[str, Acquisition | None]]:
    """The fixed held-out acquisitions (fresh objects each call) both bundled models are tested on,
    before the random ones each script draws from its TEST_SEED; ``None`` = the 2 mm template as is."""
    return [
        ("mni_original_2mm", None),
        ("mni_1x1x3_RAS", Acquisition(spacing=(1.0, 1.0, 3.0), orientation="RAS")),
        ("mni_2x2x3_LPS", Acquisition(spacing=(2.0, 2.0, 3.0), orientation="LPS")),
        ("mni_1mm_LSA", Acquisition(spacing=(1.0, 1.0, 1.0), orientation="LSA")),
        ("mni_1.5mm_PIR", Acquisition(spacing=(1.5, 1.5, 1.5), orientation="PIR")),
        ("mni_3x1x1_PIR_sagittal", Acquisition(spacing=(3.0, 1.0, 1.0), orientation="PIR")),
        ("mni_remap_int16", Acquisition(spacing=(1.2, 1.2, 1.2), gamma=1.5, scale=3000.0, offset=0.02, dtype="int16")),
        ("mni_noise_bias", Acquisition(spacing=(1.0, 1.0, 1.0), orientation="LPS", bias=0.45, noise=0.05)),
        ("mni_oblique_2x2x3", Acquisition(spacing=(2.0, 2.0, 3.0), orientation="LSA", rotation_deg=(10.0, -8.0, 5.0),
                                          bias=0.3, noise=0.03, gamma=0.8, scale=800.0)),
    ]


def write_training_set(root: Path, cases: list[tuple[str, Volume, Volume, dict]], info: dict[str, Any]) -> Path:
    """Write ``cases`` (name, image, labels, acquisition) as an MSD-layout dataset at ``root``:
    built in ``root.partial`` and renamed when complete; ``info`` gives name, description, labels."""
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir()
    training, acquisitions = [], {}
    for name, v, m, acq_d in cases:
        write_nifti(v, tmp / "imagesTr" / f"{name}.nii.gz")
        write_nifti(m, tmp / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
        acquisitions[name] = acq_d
        print(f"  {name}: {v.describe_grid()}", flush=True)
    (tmp / "dataset.json").write_text(json.dumps({
        "name": info["name"], "description": info["description"], "modality": {"0": "T1"},
        "labels": info["labels"], "training": training, "acquisitions": acquisitions,
    }, indent=1))
    tmp.rename(root)
    return root


def make_training_data(work: Path) -> Path:
    """Write the MSD-layout training set under ``work/train_data``; returns the folder."""
    root = work / "train_data"
    if (root / "dataset.json").exists():
        print(f"training data exists: {root}")
        return root
    image = read_nifti(REPO / "resunet/data/example/colin27_t1.nii.gz")
    mask = read_nifti(REPO / "resunet/data/example/colin27_brainmask.nii.gz")
    rng = np.random.default_rng(TRAIN_SEED)
    cases: list[tuple[str, Volume, Volume, dict]] = [("colin_orig", image, mask, {"original": True})]
    for i in range(N_TRAIN_VARIANTS):
        acq = random_acquisition(rng)
        v, m = simulate(image, mask, acq, rng)
        cases.append((f"colin_v{i:02d}", v, m, acq.to_dict()))
    for i in range(N_VAL_VARIANTS):
        acq = random_acquisition(rng, thick=bool(i % 2 == 0))
        v, m = simulate(image, mask, acq, rng)
        cases.append((f"colin_val{i:02d}", v, m, acq.to_dict()))
    return write_training_set(root, cases, {
        "name": "colin27_brain_extraction_simulated",
        "description": "Colin27 T1 (mricron-data, BSD-3) and simulated acquisitions of it; label 1 = brain",
        "labels": {"0": "background", "1": "brain"},
    })


def make_test_data(work: Path) -> list[tuple[str, Path, Path, dict]]:
    """Held-out cases from nilearn's MNI152 template; returns ``[(name, image, mask, acquisition)]``."""
    from nilearn import datasets  # the `data` extra

    root = work / "test_data"
    root.mkdir(parents=True, exist_ok=True)
    out = []

    def to_volume(img, label: bool) -> Volume:
        arr = np.asarray(img.get_fdata(), dtype=np.float32)
        return Volume((arr > 0).astype(np.uint8) if label else arr, img.affine.astype(float), {"source": "nilearn MNI152"})

    t2, m2 = to_volume(datasets.load_mni152_template(resolution=2), False), to_volume(datasets.load_mni152_brain_mask(resolution=2), True)
    t1, m1 = to_volume(datasets.load_mni152_template(resolution=1), False), to_volume(datasets.load_mni152_brain_mask(resolution=1), True)
    named = held_out_grids()
    rng = np.random.default_rng(TEST_SEED)
    named += [(f"mni_random{i:02d}", random_acquisition(rng)) for i in range(6)]
    for name, acq in named:
        ip, mp = root / f"{name}.nii.gz", root / f"{name}_mask.nii.gz"
        if acq is None:
            v, m = t2, m2
        else:
            acq.strip_skull = False  # the template has no skull already
            v, m = simulate(t1, m1, acq, rng)
        if not ip.exists():
            write_nifti(v, ip)
            write_nifti(m, mp)
        out.append((name, ip, mp, acq.to_dict() if acq else {"original": True}))
    return out


def train(work: Path, config: Path, extra: list[str]) -> Path:
    run = work / "run"
    cmd = [sys.executable, "-m", "resunet", "train", "--data", str(work / "train_data"), "--out", str(run),
           "--config", str(config), *extra]
    if (run / "last.pt").exists():
        cmd.append("--resume")
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    (work / "train_seconds.txt").write_text(f"{time.time() - t0:.0f}\n")
    return run


def evaluate(model: Path, cases: list[tuple[str, Path, Path, dict]]) -> list[dict]:
    from resunet.evaluation import evaluate_case
    from resunet.inference import Predictor

    predictor = Predictor(model, device="cpu", tta=False, overlap=0.25, sw_batch=2)
    rows = []
    for name, ip, mp, acq in cases:
        image, ref = read_nifti(ip), read_nifti(mp)
        t0 = time.time()
        pred = predictor.predict(image)
        seconds = time.time() - t0
        m = evaluate_case(pred.mask, ref, labels=[1])[0]
        ref_ml = float(np.count_nonzero(np.asarray(ref.array))) * ref.voxel_volume_ml
        pred_ml = float(np.count_nonzero(np.asarray(pred.mask.array) == 1)) * ref.voxel_volume_ml
        row = {"case": name, "grid": image.describe_grid(), "dice": m["dice"], "hd95_mm": m["hd95"],
               "volume_ref_ml": round(ref_ml, 1), "volume_pred_ml": round(pred_ml, 1),
               "volume_error_ml": round(pred_ml - ref_ml, 1), "volume_error_pct": round(100 * (pred_ml - ref_ml) / ref_ml, 2),
               "seconds": round(seconds, 1), "acquisition": acq}
        rows.append(row)
        print(f"  {name:28s} dice {row['dice']:.4f}  hd95 {row['hd95_mm']:.2f} mm  vol err {row['volume_error_pct']:+.1f}%  "
              f"({seconds:.1f} s)", flush=True)
    return rows


def _summary(rows: list[dict]) -> dict:
    def stats(key: str) -> dict:
        v = np.array([r[key] for r in rows if r[key] is not None], dtype=float)
        return {"mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}

    return {"n": len(rows), "dice": stats("dice"), "hd95_mm": stats("hd95_mm"),
            "abs_volume_error_pct": stats("abs_volume_error_pct")}


def data_and_training(argv: list[str] | None, description: str, work: str, config: Path,
                      make_data: Callable[[Path], Path]) -> tuple[Path, Path, Path]:
    """The command line every reproduce script shares: make the data in WORK, train (unless
    --skip-train/--model) and return ``(work, model to evaluate, config)``."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=work, help="scratch folder (data, run)")
    ap.add_argument("--config", default=str(config))
    ap.add_argument("--skip-train", action="store_true", help="evaluate/ship WORK/run/best.pt as it is")
    ap.add_argument("--model", help="evaluate/ship this checkpoint instead of WORK/run/best.pt")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra `resunet train --set` overrides")
    args = ap.parse_args(argv)
    work_dir = Path(args.work)
    work_dir.mkdir(parents=True, exist_ok=True)
    make_data(work_dir)
    if not args.skip_train and not args.model:
        train(work_dir, Path(args.config), [x for o in args.overrides for x in ("--set", o)])
    model = Path(args.model) if args.model else work_dir / "run" / "best.pt"
    return work_dir, model, Path(args.config)


def save_with_card(ck: Any, card: dict, dest: Path) -> None:
    """Write checkpoint ``ck`` (a loaded :class:`~resunet.training.checkpoint.Checkpoint`) to ``dest``
    with ``card`` as its model card, everything else unchanged."""
    from resunet.training.checkpoint import save_checkpoint

    save_checkpoint(dest, state_dict=ck.state_dict, network=ck.network, plan=ck.plan, labels=ck.labels,
                    channels=ck.channels, postprocess=ck.postprocess, model_card=card, fingerprint=ck.fingerprint,
                    versions=ck.versions)


def main(argv: list[str] | None = None) -> int:
    work, model, config = data_and_training(argv, __doc__, "/tmp/resunet-bundled", HERE / "train_config.yaml",
                                            make_training_data)
    print("held-out evaluation (MNI152, never seen in training):", flush=True)
    test_rows = evaluate(model, make_test_data(work))
    print("seen head (Colin27 example as shipped; not a generalisation measure):", flush=True)
    seen_rows = evaluate(model, [("colin27_example", REPO / "resunet/data/example/colin27_t1.nii.gz",
                                  REPO / "resunet/data/example/colin27_brainmask.nii.gz", {"original": True})])
    for r in test_rows + seen_rows:
        r["abs_volume_error_pct"] = abs(r["volume_error_pct"])
    metrics = {"held_out_mni152": {"summary": _summary(test_rows), "cases": test_rows},
               "seen_colin27": {"cases": seen_rows}}
    ship(model, work, metrics, config)
    return 0


def ship(model: Path, work: Path, metrics: dict, config: Path) -> None:
    """Copy the checkpoint into data/model with the metrics in its model card; write metrics.json and the card."""
    from resunet.training.checkpoint import load_checkpoint

    ck = load_checkpoint(model)
    seconds = (work / "train_seconds.txt").read_text().strip() if (work / "train_seconds.txt").exists() else "unknown"
    epochs_done = ck.model_card.get("metrics", {}).get("epoch")
    s = metrics["held_out_mni152"]["summary"]
    card = dict(ck.model_card)
    card.update({
        "name": "brain_extraction",
        "task": "brain extraction (skull stripping) of T1-weighted head MRI: label 1 = brain",
        "intended_use": "research and teaching demos of resunet; default model of `resunet predict` and the web UI. "
                        "NOT FOR CLINICAL USE.",
        "training_data": {**card.get("training_data", {}),
                          "source": "Colin27 T1 + brain mask (data/example, from Debian mricron-data, BSD-3-clause) and "
                                    f"{N_TRAIN_VARIANTS} simulated acquisitions of it"},
        "training": {"command": "python data/model/reproduce.py", "config": config.name, "seconds": seconds,
                     "best_epoch": epochs_done, "hardware": "2 shared CPU cores"},
        "metrics": {"validation": ck.model_card.get("metrics"),
                    "held_out_mni152": s,
                    "seen_colin27": metrics["seen_colin27"]["cases"][0]},
        "limitations": "trained on ONE head (Colin27) plus simulations; evaluated on one other head (MNI152 average, "
                       "skull-stripped); adult T1 only; no pathology, no children, no other contrasts.",
        "licence": "model weights: Apache-2.0 (resunet); training data Colin27: BSD-3-clause (mricron-data)",
    })
    dest = SHIP / "brain_extraction.pt"
    save_with_card(ck, card, dest)
    (SHIP / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    write_card(card, metrics, config)
    print(f"shipped {dest} ({dest.stat().st_size / 1e6:.1f} MB); held-out Dice mean {s['dice']['mean']:.4f}")


def write_card(card: dict, metrics: dict, config: Path) -> None:
    rows = metrics["held_out_mni152"]["cases"]
    s = metrics["held_out_mni152"]["summary"]
    seen = metrics["seen_colin27"]["cases"][0]
    val = (card["metrics"].get("validation") or {}).get("val_dice") or {}
    table = "\n".join(
        f"| {r['case']} | {r['grid'].split(', origin')[0]} | {r['dice']:.4f} | {r['hd95_mm']:.2f} | "
        f"{r['volume_error_ml']:+.1f} ({r['volume_error_pct']:+.1f}%) |" for r in rows)
    text = f"""# Model card: brain_extraction (bundled resunet model)

**Not for clinical use.** A demonstration model trained on a single head.

| | |
|---|---|
| file | `resunet/data/model/brain_extraction.pt` (resunet-checkpoint/1, loads with `torch.load(weights_only=True)`) |
| task | brain extraction of T1-weighted head MRI: label 0 = background, 1 = brain |
| input | one T1 volume (NIfTI or DICOM), any orientation and voxel size; resampled to 2 mm RAS internally |
| network | ResUNet `small` preset with halved widths (8..128 channels, {_nparams(card)} parameters), 3D, deep supervision |
| post-processing | largest connected component, holes filled |
| training time | {card['training']['seconds']} s on 2 shared CPU cores, best epoch {card['training']['best_epoch']} |

## Intended use
Research, teaching and demos of resunet (default model of `resunet predict` and the web UI): a
brain mask for adult T1 head MRI, e.g. to check a pipeline end to end. It is not a medical device,
has not been validated on patients, and must not be used for diagnosis or treatment.

## Training data and licence
- **Colin27** T1 (27 averaged scans of one adult male, Holmes et al. 1998) and its brain mask, as
  shipped in `data/example/` (2 mm; from Debian `mricron-data`, MRIcron by Chris Rorden,
  **BSD-3-clause**, see `resunet/data/example/LICENSE-mricron.txt`).
- {N_TRAIN_VARIANTS} simulated acquisitions of that head (`data/model/simulate.py`): voxel sizes 0.9-4 mm
  including thick slices along any axis, orientations RAS/LPS/LSA/PIR/LAS/RPI/ASL/IPL/SAR, oblique
  head positions (+-12 degrees), cropped fields of view, monotone intensity remapping (gamma
  0.6-1.6, scale 50-4000, int16 or float storage), smooth bias fields, Rician noise, and about 15%
  skull-stripped inputs; plus on-the-fly augmentation (rotation, scaling, left-right flips, gamma,
  noise, blur, simulated low resolution, bias field; see `train_config.yaml`).
- Validation during training: {N_VAL_VARIANTS} further simulated Colin27 acquisitions (same head), Dice
  {val.get('dice_mean', float('nan')):.4f} at the best epoch.

## Held-out evaluation (a head the model never saw)
nilearn's **MNI152** 2009 template (ICBM 2009a nonlinear symmetric, average of 152 adults;
nilearn ships it skull-stripped; copyright McConnell Brain Imaging Centre, free use with attribution,
see the ICBM licence notice in nilearn) with nilearn's brain mask (template > 0.2), in its original
2 mm form and in simulated acquisitions of the 1 mm template (different random seed from training).
Metrics on the input grid with `resunet.evaluation.evaluate_case` (HD95 in mm), prediction with
`resunet.inference.Predictor` (no TTA, overlap 0.25, checkpoint post-processing).

| case | grid | Dice | HD95 (mm) | volume error mL (%) |
|---|---|---|---|---|
{table}

Summary over {s['n']} held-out cases: Dice mean {s['dice']['mean']:.4f} (min {s['dice']['min']:.4f}),
HD95 mean {s['hd95_mm']['mean']:.2f} mm (max {s['hd95_mm']['max']:.2f} mm), absolute volume error
mean {s['abs_volume_error_pct']['mean']:.1f}% (max {s['abs_volume_error_pct']['max']:.1f}%).

Seen head (Colin27 example as shipped, part of the training data, not a generalisation measure):
Dice {seen['dice']:.4f}, HD95 {seen['hd95_mm']:.2f} mm, volume error {seen['volume_error_pct']:+.1f}%.

## Limitations
- Trained on **one** head; the held-out test is **one** other head (an average template, smoother
  and more symmetric than any single scan, and already skull-stripped, so it tests the brain
  boundary against background rather than against skull and dura). Real-world accuracy on
  individual scans, other scanners, children, elderly atrophy, lesions, tumours, post-surgical
  anatomy or non-T1 contrasts is unknown and likely lower.
- The reference masks differ by definition: Colin27's is BET-style (`ch2bet` > 0, holes filled);
  MNI152's is an intensity threshold of a stripped template. Part of the measured error is that
  difference.
- Volumes on the MNI152 template tend to be under-estimated, most on its noise-free variants (see
  the volume-error column): a template with a perfectly black background is itself outside the
  training distribution.
- Trained at 2 mm: boundaries are no finer than about 2 mm on any input.

## Reproduce
```
.venv/bin/pip install -c constraints.txt -e '.[data]'
.venv/bin/python data/model/reproduce.py --work /tmp/resunet-bundled
```
which runs `python -m resunet train --data WORK/train_data --out WORK/run --config data/model/train_config.yaml`,
evaluates as above and writes this card, `metrics.json` and `brain_extraction.pt`. Training is
seeded but not bit-for-bit deterministic across machines (thread scheduling, `deterministic: false`).
"""
    (SHIP / "MODEL_CARD.md").write_text(text)


def _nparams(card: dict) -> str:
    import torch

    ck = torch.load(SHIP / "brain_extraction.pt", weights_only=True)
    n = sum(v.numel() for k, v in ck["state_dict"].items() if v.is_floating_point())
    return f"{n / 1e6:.2f} M"


if __name__ == "__main__":
    raise SystemExit(main())
