"""Reproduce the bundled brain-tissue model (CSF / grey matter / white matter) from nilearn's MNI152.

    .venv/bin/pip install -c constraints.txt -e '.[data]'     # nilearn: MNI152 template + tissue maps
    .venv/bin/python data/model/reproduce_tissue.py --work /tmp/resunet-tissue

Same pipeline as the brain-extraction model (``reproduce.py``: its training call and its simulated
acquisitions, ``simulate.py``), on another head and task:

1. **Labels**: nilearn's MNI152 2009 template (ICBM 2009a nonlinear symmetric, skull-stripped) with
   its grey- and white-matter probability maps and brain mask. Inside the brain mask every voxel
   takes the largest of (CSF = 1 - GM - WM clipped to [0, 1], GM, WM): label 1 = CSF, 2 = grey
   matter, 3 = white matter; outside the mask 0. (Colin27 ships no tissue maps, so it is not used.)
2. **Training data** (``WORK/train_data``): the 2 mm template as it is plus simulated acquisitions
   of it (1-4 mm voxels incl. thick slices along any axis, any axis order, oblique position,
   cropped field of view, intensity remapping, bias field, Rician noise; ``TRAIN_SEED``); two more
   are the validation cases. Labels are resampled label by label (largest wins).
3. **Training**: ``python -m resunet train --data WORK/train_data --out WORK/run --config
   data/model/train_config_tissue.yaml``.
4. **Held-out evaluation**: other acquisitions of the 1 mm template, drawn from another random
   stream (``TEST_SEED``) and a fixed list of grids never used in training, scored per label with
   :func:`resunet.evaluation.evaluate_case` on the acquisition's own grid (Dice, HD95 in mm).
5. **Ship**: ``resunet/data/model/brain_tissue.pt``, ``metrics_tissue.json``, ``MODEL_CARD_tissue.md``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
#: where the shipped files go: the checkpoint, its metrics and model card are package data
SHIP = REPO / "resunet" / "data" / "model"
sys.path.insert(0, str(HERE))

from reproduce import (  # noqa: E402  (command line, data writing, test grids, training call, shipping: shared with the brain model)
    data_and_training, held_out_grids, save_with_card, write_training_set)
from simulate import Acquisition, random_acquisition, simulate  # noqa: E402

from resunet.io import Volume, read_nifti, write_nifti  # noqa: E402

LABELS = {0: "background", 1: "CSF", 2: "grey matter", 3: "white matter"}
N_TRAIN_VARIANTS = 30
N_VAL_VARIANTS = 2
TRAIN_SEED = 20261203
TEST_SEED = 777  # another stream than training: no held-out acquisition equals a training one


def tissue_labels(resolution: int) -> tuple[Volume, Volume]:
    """nilearn's MNI152 template and its tissue label map (0 bg, 1 CSF, 2 GM, 3 WM) at 1 or 2 mm."""
    from nilearn import datasets  # the `data` extra

    t = datasets.load_mni152_template(resolution=resolution)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=resolution).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=resolution).get_fdata(), dtype=np.float32)
    inside = np.asarray(datasets.load_mni152_brain_mask(resolution=resolution).get_fdata()) > 0
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    lab = (np.argmax(np.stack([csf, gm, wm]), 0) + 1).astype(np.uint8)
    lab[~inside] = 0
    affine = t.affine.astype(float)
    image = Volume(np.asarray(t.get_fdata(), dtype=np.float32), affine, {"source": "nilearn MNI152"})
    return image, Volume(lab, affine, {"is_label": True, "source": "nilearn MNI152 GM/WM maps"})


def _acquisition(rng: np.random.Generator, **kw) -> Acquisition:
    acq = random_acquisition(rng, **kw)
    acq.strip_skull = False  # the template has no skull already
    return acq


def make_training_data(work: Path) -> Path:
    """Write the MSD-layout training set under ``work/train_data``; returns the folder."""
    root = work / "train_data"
    if (root / "dataset.json").exists():
        print(f"training data exists: {root}")
        return root
    image, lab = tissue_labels(2)
    rng = np.random.default_rng(TRAIN_SEED)
    cases: list[tuple[str, Volume, Volume, dict]] = [("mni_orig", image, lab, {"original": True})]
    specs = [(f"mni_v{i:02d}", _acquisition(rng)) for i in range(N_TRAIN_VARIANTS)]
    specs += [(f"mni_val{i:02d}", _acquisition(rng, thick=bool(i % 2 == 0))) for i in range(N_VAL_VARIANTS)]
    for name, acq in specs:
        v, m = simulate(image, lab, acq, rng)
        cases.append((name, v, m, acq.to_dict()))
    return write_training_set(root, cases, {
        "name": "mni152_brain_tissue_simulated",
        "description": "nilearn MNI152 2009 template (2 mm) and simulated acquisitions of it; labels from its "
                       "GM/WM probability maps inside its brain mask",
        "labels": {str(k): v for k, v in LABELS.items()},
    })


def make_test_data(work: Path) -> list[tuple[str, Path, Path, dict]]:
    """Held-out acquisitions of the 1 mm template; returns ``[(name, image, labels, acquisition)]``."""
    root = work / "test_data"
    root.mkdir(parents=True, exist_ok=True)
    named = held_out_grids()
    rng = np.random.default_rng(TEST_SEED)
    # every grid is drawn before any simulation; noise and bias fields follow in case order (so a
    # case is regenerated identically only when the whole test_data folder is regenerated)
    named += [(f"mni_random{i:02d}", _acquisition(rng)) for i in range(3)]
    sources: dict[int, tuple[Volume, Volume]] = {}
    out = []
    for name, acq in named:
        ip, lp = root / f"{name}.nii.gz", root / f"{name}_labels.nii.gz"
        if not ip.exists():
            res = 2 if acq is None else 1
            if res not in sources:
                sources[res] = tissue_labels(res)
            v, m = sources[res] if acq is None else simulate(*sources[res], acq, rng)
            write_nifti(m, lp)
            write_nifti(v, ip)
            print(f"  {name}: {v.describe_grid()}", flush=True)
        out.append((name, ip, lp, acq.to_dict() if acq else {"original": True}))
    return out


def evaluate(model: Path, cases: list[tuple[str, Path, Path, dict]]) -> list[dict]:
    """Per-label metrics of each case on its own grid (no TTA, overlap 0.25, as the brain model's card)."""
    from resunet.evaluation import evaluate_case
    from resunet.inference import Predictor

    predictor = Predictor(model, device="cpu", tta=False, overlap=0.25, sw_batch=2)
    rows = []
    for name, ip, lp, acq in cases:
        image, ref = read_nifti(ip), read_nifti(lp)
        t0 = time.time()
        pred = predictor.predict(image)
        seconds = time.time() - t0
        per_label = {}
        for m in evaluate_case(pred.mask, ref, labels=[1, 2, 3]):
            per_label[LABELS[m["label"]]] = {"dice": m["dice"], "hd95_mm": m["hd95"], "volume_ref_ml": round(m["vol_gt_ml"], 1),
                                             "volume_pred_ml": round(m["vol_pred_ml"], 1), "nsd": m["nsd"]}
        row = {"case": name, "grid": image.describe_grid(), "labels": per_label, "seconds": round(seconds, 1),
               "acquisition": acq}
        rows.append(row)
        print(f"  {name:26s} " + "  ".join(f"{k} dice {_num(v['dice'], 4)} hd95 {_num(v['hd95_mm'], 2)}"
                                            for k, v in per_label.items()) + f"  ({seconds:.1f} s)", flush=True)
    return rows


def _num(x: float | None, digits: int) -> str:
    """``x`` with ``digits`` decimals, or ``n/a`` for an undefined metric (e.g. HD95 of an empty mask)."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def evaluate_colin27_extent(model: Path) -> dict:
    """Another head, extent only: the union of the predicted tissue labels against Colin27's brain mask.

    Colin27 has no tissue maps, so only where the model puts brain tissue at all can be scored: on
    the example as shipped (with its skull; the training template had none) and skull-stripped with
    that mask (the intended input; the mask then bounds the prediction, so that figure mostly shows
    how much of the brain the model leaves unlabelled)."""
    from resunet.evaluation import evaluate_case
    from resunet.inference import Predictor

    image = read_nifti(REPO / "resunet/data/example/colin27_t1.nii.gz")
    ref = read_nifti(REPO / "resunet/data/example/colin27_brainmask.nii.gz")
    brain = np.asarray(ref.array) > 0
    predictor = Predictor(model, device="cpu", tta=False, overlap=0.25, sw_batch=2)
    out = {"case": "colin27_example"}
    for key, vol in (("", image), ("stripped_", image.with_array(np.where(brain, np.asarray(image.array), 0)))):
        pred = predictor.predict(vol).mask
        union = Volume((np.asarray(pred.array) > 0).astype(np.uint8), pred.affine, {"is_label": True})
        m = evaluate_case(union, Volume(brain.astype(np.uint8), ref.affine, {}), labels=[1])[0]
        out[f"{key}brain_extent_dice"] = m["dice"]
        out[f"{key}brain_extent_hd95_mm"] = m["hd95"]
        out[f"{key}predicted_ml"] = {LABELS[k]: round(float(np.count_nonzero(np.asarray(pred.array) == k)) * image.voxel_volume_ml, 1)
                                     for k in (1, 2, 3)}
    return out


def summarise(rows: list[dict]) -> dict:
    """Per label: Dice mean/min and HD95 mean/max (mm) over the held-out cases."""
    out = {"n": len(rows)}
    for name in (LABELS[k] for k in (1, 2, 3)):
        d = np.array([r["labels"][name]["dice"] or 0.0 for r in rows], dtype=float)  # None: both empty, not here
        h = np.array([r["labels"][name]["hd95_mm"] for r in rows if r["labels"][name]["hd95_mm"] is not None], dtype=float)
        worst = rows[int(np.argmin(d))]["case"]
        out[name] = {"dice_mean": float(d.mean()), "dice_min": float(d.min()), "dice_min_case": worst,
                     "hd95_mm_mean": float(h.mean()) if h.size else None, "hd95_mm_max": float(h.max()) if h.size else None,
                     "hd95_undefined_cases": len(rows) - int(h.size)}
    return out


def main(argv: list[str] | None = None) -> int:
    work, model, config = data_and_training(argv, __doc__, "/tmp/resunet-tissue", HERE / "train_config_tissue.yaml",
                                            make_training_data)
    print("held-out evaluation (simulated acquisitions never used in training):", flush=True)
    rows = evaluate(model, make_test_data(work))
    print("Colin27 example (another head; brain extent only, it has no tissue maps):", flush=True)
    colin = evaluate_colin27_extent(model)
    for key, what in (("", "as shipped (skull)"), ("stripped_", "skull-stripped")):
        print(f"  {what}: brain extent dice {_num(colin[key + 'brain_extent_dice'], 4)}, predicted {colin[key + 'predicted_ml']}",
              flush=True)
    held_out = [r for r in rows if not r["acquisition"].get("original")]  # the 2 mm original is a training case
    metrics = {"held_out_mni152": {"summary": summarise(held_out), "cases": rows}, "colin27_extent": colin}
    ship(model, work, metrics, config)
    return 0


def ship(model: Path, work: Path, metrics: dict, config: Path) -> None:
    """Copy the checkpoint to resunet/data/model/brain_tissue.pt with the metrics in its card; write the card."""
    from resunet.training.checkpoint import load_checkpoint

    ck = load_checkpoint(model)
    seconds = (work / "train_seconds.txt").read_text().strip() if (work / "train_seconds.txt").exists() else "unknown"
    s = metrics["held_out_mni152"]["summary"]
    card = dict(ck.model_card)
    card.update({
        "name": "brain_tissue",
        "task": "brain tissue classes of (skull-stripped) T1-weighted MRI: 1 = CSF, 2 = grey matter, 3 = white matter",
        "intended_use": "research and teaching demos of resunet's multi-label paths (several segments, ROIs, "
                        "report rows). NOT FOR CLINICAL USE.",
        "training_data": {**card.get("training_data", {}),
                          "source": "nilearn MNI152 2009 template (2 mm) with labels from its GM/WM maps and brain mask, "
                                    f"and {N_TRAIN_VARIANTS} simulated acquisitions of it"},
        "training": {"command": "python data/model/reproduce_tissue.py", "config": config.name, "seconds": seconds,
                     "best_epoch": (ck.model_card.get("metrics") or {}).get("epoch"),
                     "hardware": "2 CPU cores, no GPU (a shared machine, mostly idle during the run)",
                     "schedule": _schedule(model.parent / "config.yaml" if (model.parent / "config.yaml").exists() else config)},
        "metrics": {"validation": ck.model_card.get("metrics"), "held_out_mni152": s,
                    "colin27_extent": metrics["colin27_extent"]},
        "limitations": "one head (the MNI152 average template, skull-stripped) for training AND testing: held-out means "
                       "unseen acquisitions of that head, not unseen anatomy; labels are the template's tissue "
                       "probabilities, not a manual segmentation; adult T1 only; trained at 2 mm.",
        "licence": "model weights: Apache-2.0 (resunet); MNI152 template: ICBM licence (free use with attribution)",
    })
    dest = SHIP / "brain_tissue.pt"
    save_with_card(ck, card, dest)
    (SHIP / "metrics_tissue.json").write_text(json.dumps(metrics, indent=1) + "\n")
    for name, shipped in (("plan.json", "plan_tissue.json"), ("log.csv", "train_log_tissue.csv")):  # the run's own
        if (model.parent / name).exists():
            shutil.copy(model.parent / name, HERE / shipped)
    write_card(card, metrics)
    print(f"shipped {dest} ({dest.stat().st_size / 1e6:.1f} MB); held-out Dice mean "
          + ", ".join(f"{k} {s[k]['dice_mean']:.4f}" for k in ("CSF", "grey matter", "white matter")))


def write_card(card: dict, metrics: dict) -> None:
    """resunet/data/model/MODEL_CARD_tissue.md from the shipped card and the held-out metrics."""
    rows = metrics["held_out_mni152"]["cases"]
    s = metrics["held_out_mni152"]["summary"]
    colin = metrics["colin27_extent"]
    names = [LABELS[k] for k in (1, 2, 3)]
    val = (card["metrics"].get("validation") or {}).get("val_dice") or {}

    def cell(r: dict, name: str) -> str:
        m = r["labels"][name]
        return f"{_num(m['dice'], 4)} / {_num(m['hd95_mm'], 2)}"

    table = "\n".join(f"| {r['case']} | {r['grid'].split(', origin')[0]} | " + " | ".join(cell(r, n) for n in names) + " |"
                      for r in rows)
    summary = "\n".join(
        f"| {n} | {s[n]['dice_mean']:.4f} | {s[n]['dice_min']:.4f} ({s[n]['dice_min_case']}) | {_num(s[n]['hd95_mm_mean'], 2)} | "
        f"{_num(s[n]['hd95_mm_max'], 2)} |" for n in names)
    val_names = {f"dice_{k}": v for k, v in LABELS.items()} | {"dice_mean": "mean"}
    val_text = ", ".join(f"{val_names.get(k, k)} {v:.4f}" for k, v in val.items() if isinstance(v, float)) or "n/a"
    text = f"""# Model card: brain_tissue (bundled resunet model)

**Not for clinical use.** A demonstration model of resunet's multi-label paths, trained and tested on
one head (an average template).

| | |
|---|---|
| file | `resunet/data/model/brain_tissue.pt` (resunet-checkpoint/1, loads with `torch.load(weights_only=True)`); pick it by name: `resunet predict --model brain_tissue`, `resunet info brain_tissue`, the web UI's model picker |
| task | brain tissue of skull-stripped T1-weighted MRI: 0 = background, 1 = CSF, 2 = grey matter, 3 = white matter |
| input | one T1 volume (NIfTI or DICOM), any orientation and voxel size; resampled to 2 mm RAS internally |
| network | ResUNet `small` preset with halved widths (8..128 channels, {_nparams()} parameters), 3D, deep supervision; same architecture as `brain_extraction` |
| post-processing | none (tissue classes are not single connected blobs) |
| training time | {card['training']['seconds']} s on {card['training']['hardware']}; best epoch {card['training']['best_epoch']} of the run ({card['training']['schedule']}) |

## Intended use
Research, teaching and demos: a real model with several labels for DICOM SEG with several segments,
RTSTRUCT with several ROIs, per-label rows of `resunet evaluate` and the web UI legend. Input should
be a skull-stripped adult T1 (e.g. masked with the `brain_extraction` model). It is not a medical
device and must not be used for diagnosis or treatment.

## Labels and training data
- nilearn's **MNI152** 2009 template (ICBM 2009a nonlinear symmetric, average of 152 adults,
  skull-stripped; copyright McConnell Brain Imaging Centre, free use with attribution, see the ICBM
  licence notice in nilearn) with its grey- and white-matter probability maps and brain mask.
- Labels: inside the brain mask each voxel takes the largest of CSF = clip(1 - GM - WM, 0, 1), GM and
  WM; outside the mask 0. CSF is therefore the brain mask's non-tissue part (ventricles, sulci, the
  rim of the mask). Colin27 (the example study) ships no tissue maps and is not used for training.
- Training set: the 2 mm template as it is plus {N_TRAIN_VARIANTS} simulated acquisitions of it
  (`data/model/simulate.py`, seed {TRAIN_SEED}): voxel sizes 0.9-4 mm including thick slices along any
  axis, orientations RAS/LPS/LSA/PIR/LAS/RPI/ASL/IPL/SAR, oblique positions (+-12 degrees), cropped
  fields of view, intensity remapping (gamma 0.6-1.6, scale 50-4000, int16 or float), bias fields,
  Rician noise; labels resampled label by label (largest wins). On-the-fly augmentation as the
  brain-extraction model (`train_config_tissue.yaml`).
- Validation during training: {N_VAL_VARIANTS} further simulated acquisitions; Dice at the best epoch: {val_text}.

## Held-out evaluation (acquisitions never used in training)
{s['n']} acquisitions of the **1 mm** template from a different random stream (seed {TEST_SEED}) and a
fixed list of grids, plus the original 2 mm template (also the first training case: listed for
reference, it is not held out and not in the summary). Labels of each acquisition are the 1 mm labels resampled to its
grid. Prediction with `resunet.inference.Predictor` (no TTA, overlap 0.25), metrics on the
acquisition's own grid with `resunet.evaluation.evaluate_case`. Cells: Dice / HD95 (mm).

| case | grid | CSF | grey matter | white matter |
|---|---|---|---|---|
{table}

| label | Dice mean | Dice min (case) | HD95 mean (mm) | HD95 max (mm) |
|---|---|---|---|---|
{summary}

What "held out" means here: new grids, orientations, intensities, bias and noise of the **same
head**; it is not a measure on unseen anatomy. The reference is the template's own tissue maps;
working at 2 mm caps the agreement with a 1 mm reference (re-sampling the 1 mm labels to 2 mm and
back gives Dice 0.955 GM, 0.956 WM, 0.68 CSF: thin sulcal CSF does not survive 2 mm voxels).

Another head, extent only (no tissue maps exist for Colin27, the example study): the union of the
three predicted labels against Colin27's brain mask. Skull-stripped with that mask (the intended
input): Dice {_num(colin.get('stripped_brain_extent_dice'), 4)}, predicted volumes
{", ".join(f"{k} {v} mL" for k, v in (colin.get('stripped_predicted_ml') or {}).items())}. As shipped, with its skull:
Dice {_num(colin['brain_extent_dice'], 4)} (HD95 {_num(colin['brain_extent_hd95_mm'], 2)} mm), predicted volumes
{", ".join(f"{k} {v} mL" for k, v in colin['predicted_ml'].items())}: scalp and skull are labelled as tissue (strip the skull first).

## Limitations
- **One head** for training and testing (an average template: smoother, more symmetric and with
  more contrast than any single scan). Accuracy on individual scans is unknown and lower.
- Trained on skull-stripped input only: on a scan with skull, scalp and skull may be labelled as
  tissue. Strip the skull first.
- Labels come from probability maps of the template, not from a manual segmentation; CSF is defined
  as the brain mask's non-GM/WM rest, so its boundary is the mask's.
- Trained at 2 mm: boundaries are no finer than about 2 mm on any input.

## Reproduce
```
.venv/bin/pip install -c constraints.txt -e '.[data]'
.venv/bin/python data/model/reproduce_tissue.py --work /tmp/resunet-tissue
```
which runs `python -m resunet train --data WORK/train_data --out WORK/run --config data/model/train_config_tissue.yaml`,
evaluates as above and writes this card, `metrics_tissue.json`, `plan_tissue.json`,
`train_log_tissue.csv` and `brain_tissue.pt`. Training is seeded but not bit-for-bit deterministic
across machines.
"""
    (SHIP / "MODEL_CARD_tissue.md").write_text(text)


def _schedule(config: Path) -> str:
    """``"E epochs of S steps, batch B"`` from a training config: the run's own resolved
    ``config.yaml`` (``--set`` overrides included) when it is there, else the one given."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    return f"{cfg['epochs']} epochs of {cfg['iterations_per_epoch']} steps, batch {cfg['plan']['batch_size']}"


def _nparams() -> str:
    import torch

    ck = torch.load(SHIP / "brain_tissue.pt", weights_only=True)
    n = sum(v.numel() for v in ck["state_dict"].values() if v.is_floating_point())
    return f"{n / 1e6:.2f} M"


if __name__ == "__main__":
    raise SystemExit(main())
