"""Learning from corrections (issue 21 point 5): fine-tune the bundled brain_extraction model on 5 corrected
cases of a "new site" and compare held-out Dice before and after, in one run. Run by hand:

    nice -n 5 .venv/bin/python bench/bench_review.py            # writes bench/results/review.md (+ .json)
    nice -n 5 .venv/bin/python bench/bench_review.py --out /tmp/v.md --set finetune.freeze_encoder=false   # a variant
    nice -n 5 .venv/bin/python bench/bench_review.py --out /tmp/v.md --corrected-heads colin   # the unseen-head design

It needs nilearn (the `data` extra, ``pip install -e '.[data]'``) for the MNI152 head; without it the
script stops with exit status 2 before any work, unless ``--colin-only`` asks for a Colin27-only run,
whose report says that it does not judge the goal.

The "new site": T2-like contrast. The bundled model was trained on Colin27 T1 and simulated acquisitions of it
(data/model/simulate.py: any spacing/orientation, *monotone* intensity remaps, bias, noise; its model card).
Here every acquisition has the tissue contrast inverted inside the head (CSF and grey matter bright, white
matter dark, as in T2-weighted MR), which no monotone remap of T1 produces, on top of other spacings, bias
fields and noise drawn with data/model/simulate.py from a seed of its own. Two heads: Colin27 (the example
study, 2 mm; mricron-data, BSD-3), the head the bundled model was trained on, unstripped; and nilearn's
MNI152 2009a template (an average of 152 heads, skull-stripped as nilearn ships it) made T2-like from its
GM/WM probability maps (CSF bright, GM mid, WM dark), a head the bundled model never saw.

The acquisitions are drawn in one seeded order, always the same: Colin27 ``colin_t2_00..08``, then MNI152
``mni_t2_00..``; a design picks which of them are corrections and which are held out
(:data:`DESIGNS`, ``--corrected-heads``):

- ``colin,mni`` (the default: a site's corrections come from several patients): corrections ``colin_t2_00..02`` and
  ``mni_t2_02..03``; held out ``colin_t2_05..08`` and ``mni_t2_00..01``. Every held-out case is a further,
  different acquisition (grid, orientation, bias, noise) **of a head that was also corrected**: the held-out
  acquisitions share subjects with the corrections, as the Colin27 ones always did. ``colin_t2_03..04`` are
  drawn (so the seeded stream, and with it every other case, is the same in both designs) but used in
  neither set.
- ``colin`` (the earlier design, the stricter "unseen head" check): corrections ``colin_t2_00..04``; held
  out ``colin_t2_05..08`` and ``mni_t2_00..01``, a head that is never corrected.

The held-out set is the same 6 cases in both designs, so their rows compare like for like. Corrections go
through the real loop: the bundled model's mask, a review decision written by resunet.inference.review
(approve + the true mask as the corrected mask), ``resunet corrections export``, ``resunet train
--init-from brain_extraction.pt``.

Dice on the input grid with resunet.evaluation.evaluate_case, prediction with resunet.inference.Predictor
(no TTA, overlap 0.25, the checkpoint's post-processing), before (bundled) and after (fine-tuned) in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "data" / "model"))

from simulate import random_acquisition, simulate  # noqa: E402

from resunet.io import Volume, read_nifti, write_nifti  # noqa: E402

BUNDLED = REPO / "resunet" / "data" / "model" / "brain_extraction.pt"
SEED = 2112  # not the model's TRAIN_SEED or TEST_SEED
N_COLIN = 9  # Colin27 acquisitions drawn (colin_t2_00..08), before the MNI152 ones
#: --corrected-heads -> (correction cases, held-out cases), names of the seeded draws (module docstring)
DESIGNS = {
    "colin": ([f"colin_t2_{i:02d}" for i in range(5)],
              [f"colin_t2_{i:02d}" for i in range(5, 9)] + ["mni_t2_00", "mni_t2_01"]),
    "colin,mni": ([f"colin_t2_{i:02d}" for i in range(3)] + ["mni_t2_02", "mni_t2_03"],
                  [f"colin_t2_{i:02d}" for i in range(5, 9)] + ["mni_t2_00", "mni_t2_01"]),
}
NILEARN_MISSING = ("bench_review: nilearn is not installed, and the MNI152 held-out head needs it: "
                   "pip install -e '.[data]' (or --colin-only for a run that does not judge the goal)")
DEFAULT_DESIGN = "colin,mni"  # a site's corrections come from several patients; "colin" = the unseen-head check
#: the parent's own contrast (T1), reported for forgetting and not judged by the goal: acquisitions drawn from a
#: stream of their own (so the T2-like cases above stay the same), Colin27 (the parent's training head) and MNI152
PARENT_SEED = SEED + 1
PARENT_CASES = ["colin_t1_00", "colin_t1_01", "mni_t1_00", "mni_t1_01"]


def t2_like_colin(image: Volume, mask: Volume) -> Volume:
    """Colin27 T1 with the contrast inverted inside the head (background stays dark): T2-like."""
    x = np.asarray(image.array, dtype=np.float32)
    ref = float(np.percentile(x[x > 0], 99))
    x = np.clip(x / ref, 0, 1.2)
    head = x > 0.12  # air is dark in every weighting
    y = np.where(head, np.clip(1.25 - x, 0.05, None), x)
    return Volume(y.astype(np.float32), image.affine, dict(image.meta))


def t2_like_mni() -> tuple[Volume, Volume]:
    """nilearn's MNI152 2009a (2 mm) made T2-like from its GM/WM maps; the brain mask (template > 0.2)."""
    from nilearn import datasets

    gm = datasets.load_mni152_gm_template(resolution=2)
    wm = datasets.load_mni152_wm_template(resolution=2)
    brain = datasets.load_mni152_brain_mask(resolution=2)
    g, w = np.asarray(gm.get_fdata(), np.float32), np.asarray(wm.get_fdata(), np.float32)
    m = np.asarray(brain.get_fdata()) > 0
    csf = np.clip(1 - g - w, 0, 1) * m
    y = (0.55 * g + 0.2 * w + 1.0 * csf) * m
    return Volume(y, gm.affine.astype(float), {"source": "nilearn MNI152 T2-like"}), \
        Volume(m.astype(np.uint8), brain.affine.astype(float), {"is_label": True})


def t1_mni() -> tuple[Volume, Volume]:
    """nilearn's MNI152 2009a T1 template (2 mm, skull-stripped as shipped) and its brain mask."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2)
    brain = datasets.load_mni152_brain_mask(resolution=2)
    return Volume(np.asarray(t1.get_fdata(), np.float32), t1.affine.astype(float), {"source": "nilearn MNI152 T1"}), \
        Volume((np.asarray(brain.get_fdata()) > 0).astype(np.uint8), brain.affine.astype(float), {"is_label": True})


def write_case(work: Path, name: str, image: Volume, mask: Volume, acq) -> tuple:
    """Write one simulated case to ``work/cases``: (name, image path, mask path, acquisition dict)."""
    ip, mp = work / "cases" / f"{name}.nii.gz", work / "cases" / f"{name}_mask.nii.gz"
    ip.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(image, ip)
    write_nifti(mask, mp)
    return name, ip, mp, acq.to_dict()


def make_parent_cases(work: Path, names: list[str]) -> list:
    """Acquisitions in the parent's contrast (T1) from :data:`PARENT_SEED`, in the order of
    :data:`PARENT_CASES`: (name, image, mask, acq), written to ``work/cases``."""
    image = read_nifti(REPO / "resunet/data/example/colin27_t1.nii.gz")
    mask = read_nifti(REPO / "resunet/data/example/colin27_brainmask.nii.gz")
    rng = np.random.default_rng(PARENT_SEED)
    heads = {"colin_t1": (image, mask)}
    last = max((PARENT_CASES.index(n) for n in names), default=-1)
    out = {}
    for name in PARENT_CASES[:last + 1]:  # every draw up to the last named one: the stream stays the same
        acq = random_acquisition(rng)
        acq.strip_skull = False
        head = name.rsplit("_", 1)[0]
        if head not in heads:
            heads[head] = t1_mni()
        v, m = simulate(*heads[head], acq, rng)
        if name not in names:
            continue
        out[name] = write_case(work, name, v, m, acq)
    return [out[n] for n in names]


def design(corrected_heads: str, colin_only: bool = False) -> tuple[list[str], list[str]]:
    """The (correction, held-out) case names of a design (:data:`DESIGNS`); ``colin_only`` drops the MNI152
    held-out cases (a run that cannot judge the goal).

    Raises:
        ValueError: an unknown design, or ``colin_only`` with MNI152 corrections.
    """
    if corrected_heads not in DESIGNS:
        raise ValueError(f"--corrected-heads {corrected_heads!r}: one of {', '.join(DESIGNS)}")
    corr, held = DESIGNS[corrected_heads]
    if colin_only:
        if any(c.startswith("mni") for c in corr):
            raise ValueError(f"--colin-only has no MNI152 cases, but --corrected-heads {corrected_heads} corrects some")
        held = [c for c in held if not c.startswith("mni")]
    return list(corr), list(held)


def nilearn_missing() -> bool:
    """True when nilearn's datasets (the MNI152 template) cannot be imported."""
    try:
        import nilearn.datasets  # noqa: F401
    except ImportError:
        return True
    return False


def make_cases(work: Path, corrections: list[str], held: list[str]) -> tuple[list, list]:
    """Simulate the seeded acquisitions in their fixed order (Colin27 first, then MNI152 as far as a named case
    needs) and write the named ones to ``work/cases``: (corrections, held out) as (name, image, mask, acq)."""
    image = read_nifti(REPO / "resunet/data/example/colin27_t1.nii.gz")
    mask = read_nifti(REPO / "resunet/data/example/colin27_brainmask.nii.gz")
    t2 = t2_like_colin(image, mask)
    rng = np.random.default_rng(SEED)
    wanted = set(corrections) | set(held)
    n_mni = max((int(c.rsplit("_", 1)[1]) + 1 for c in wanted if c.startswith("mni")), default=0)
    heads = [("colin_t2", t2, mask, N_COLIN)]
    if n_mni:
        mv, mm = t2_like_mni()
        heads.append(("mni_t2", mv, mm, n_mni))
    cases = {}
    for prefix, vol, msk, n in heads:
        for i in range(n):
            acq = random_acquisition(rng)
            acq.strip_skull = False
            v, m = simulate(vol, msk, acq, rng)  # drawn even when unused: the stream stays the same
            name = f"{prefix}_{i:02d}"
            if name not in wanted:
                continue
            cases[name] = write_case(work, name, v, m, acq)
    return [cases[c] for c in corrections], [cases[c] for c in held]


def dice_rows(model: Path, cases: list) -> list[dict]:
    from resunet.evaluation import evaluate_case
    from resunet.inference import Predictor

    predictor = Predictor(model, device="cpu", tta=False, overlap=0.25, sw_batch=2)
    rows = []
    for name, ip, mp, _ in cases:
        image, ref = read_nifti(ip), read_nifti(mp)
        pred = predictor.predict(image)
        rows.append({"case": name, "grid": image.describe_grid(), "dice": float(evaluate_case(pred.mask, ref, labels=[1])[0]["dice"]),
                     "mask": pred.mask})
    return rows


def write_decisions(state: Path, cases: list, before: list[dict]) -> None:
    """One approved decision with the true mask as the correction per case, as the service writes them."""
    from resunet.inference.review import Decision, mask_sha256, record_decision, voxels_changed, write_corrected
    from resunet.io.hashing import sha256_file, sha256_path
    from resunet.reports.provenance import collect_provenance

    labels = {1: "brain"}
    model = {"name": "brain_extraction", "sha256": sha256_file(BUNDLED), "labels": {"0": "background", "1": "brain"}}
    for (name, ip, mp, _), row in zip(cases, before):
        folder = state / name / "review"
        source, truth = read_nifti(ip), read_nifti(mp)
        fixed = source.with_array(np.asarray(truth.array).astype(np.uint8), is_label=True)
        model_mask = source.with_array(np.asarray(row["mask"].array).astype(np.uint8), is_label=True)
        files = write_corrected(fixed, source, folder, labels, reviewer="bench", model_name=model["name"],
                                model_sha256=model["sha256"])
        prov = collect_provenance(command=["bench_review"], files={"input": [ip]}, run_id=f"review-{name}")
        prov["model"] = model
        rec = Decision(subject=name, decision="approve", reviewer="bench", comment="true mask",
                       input_sha256=sha256_path(ip), model_mask_sha256=mask_sha256(model_mask),
                       corrected_mask_sha256=mask_sha256(fixed),
                       voxels_changed=voxels_changed(model_mask, fixed, labels))
        record_decision(rec, folder, prov, db_path=False, files=files)


def paired(before: list[dict], after: list[dict]) -> list[dict]:
    """One row per case: Dice before and after the fine-tuning, and the change."""
    return [{"case": b["case"], "grid": b["grid"], "before": b["dice"], "after": a["dice"], "delta": a["dice"] - b["dice"]}
            for b, a in zip(before, after)]


def case_lines(rows: list[dict]) -> list[str]:
    """The report's table lines of :func:`paired` rows."""
    return [f"| {r['case']} | {r['grid']} | {r['before']:.4f} | {r['after']:.4f} | {r['delta']:+.4f} |" for r in rows]


def steps_per_epoch(log: str) -> int:
    """Optimiser steps per epoch, from the training log's "N steps/epoch" line (resunet.training.loop)."""
    import re

    found = re.search(r"(\d+) steps/epoch", log)
    if found is None:
        raise RuntimeError("bench_review: the training log has no 'steps/epoch' line")
    return int(found.group(1))


def resunet(*args: str) -> str:
    """Run the resunet CLI; its output is printed and returned."""
    cmd = [sys.executable, "-m", "resunet", *args]
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(done.stdout, end="", flush=True)
    done.check_returncode()
    return done.stdout


def command_line() -> str:
    """This run's command as typed: its niceness (``os.nice(0)``, not an assumed one) and all its arguments."""
    nice = os.nice(0)
    python = os.path.relpath(sys.executable, Path.cwd()) if not Path(sys.executable).is_relative_to("/usr") else "python"
    words = [python, os.path.relpath(Path(__file__).resolve(), Path.cwd()), *sys.argv[1:]]
    return (f"nice -n {nice} " if nice else "") + shlex.join(words)


def heads_sentence(corrected_heads: str, colin_only: bool, corr: list[str], held: list[str]) -> str:
    """What the held-out cases share with the corrections, in the report's words."""
    n_corr = {h: sum(c.startswith(h) for c in corr) for h in ("colin", "mni")}
    if colin_only:
        return ("Held out: Colin27 acquisitions only (`--colin-only`): other acquisitions of the head the corrections "
                "came from, and no other head, so this run **does not judge the goal**: the gain shown is for a new "
                "contrast on a known head.")
    if n_corr["mni"]:
        return (f"Every held-out case is a further, different acquisition (grid, orientation, bias, noise) of a head "
                f"that was also corrected: Colin27 ({n_corr['colin']} corrections) and MNI152 ({n_corr['mni']} "
                "corrections, skull-stripped). The held-out acquisitions share subjects with the corrections, as a "
                "site's next scans of patients already corrected would; no head is unseen here. The colin-only "
                "design (`--corrected-heads colin`) is the stricter \"unseen head\" check.")
    return ("The Colin27 held-out cases are other acquisitions of the head the corrections came from (they share "
            "its subject); the MNI152 ones are another head (an average template, skull-stripped) that is never "
            "corrected: this is the stricter \"unseen head\" check.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="work folder (default: a temp folder)")
    ap.add_argument("--before-only", action="store_true", help="only the before-Dice of the cases (cheap design check)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "review.md")
    ap.add_argument("--corrected-heads", choices=list(DESIGNS), default=DEFAULT_DESIGN,
                    help="which heads the 5 corrections come from (the module docstring): colin,mni = 3 Colin27 + 2 "
                    "MNI152 acquisitions; colin = 5 Colin27 ones, MNI152 never corrected (the unseen-head check); "
                    f"the held-out cases are the same 6 either way (default {DEFAULT_DESIGN})")
    ap.add_argument("--colin-only", action="store_true",
                    help="no MNI152 case (runs without nilearn); the report then does not judge the goal")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a fine-tuning variant: passed to resunet train as --set KEY=VALUE (repeatable), e.g. "
                    "finetune.freeze_encoder=true; none = the product's defaults (TrainConfig.finetune)")
    args = ap.parse_args(argv)
    try:
        corr_names, held_names = design(args.corrected_heads, args.colin_only)
    except ValueError as err:
        ap.error(str(err))
    if not args.colin_only and nilearn_missing():
        print(NILEARN_MISSING, file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-review-"))
    try:
        return run(args, work, corr_names, held_names)
    finally:
        if args.work is None:  # the temp folder goes; a --work folder is the caller's
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, corr_names: list[str], held_names: list[str]) -> int:
    """Make the cases, fine-tune on the corrections, write the report; ``work`` holds every file of the run."""
    t0 = time.time()
    load0 = os.getloadavg()
    corr, held = make_cases(work, corr_names, held_names)
    parent_names = [c for c in PARENT_CASES if not (args.colin_only and c.startswith("mni"))]
    old = make_parent_cases(work, parent_names)
    before_corr = dice_rows(BUNDLED, corr)
    before_held = dice_rows(BUNDLED, held)
    before_old = dice_rows(BUNDLED, old)
    for r in before_corr + before_held + before_old:
        print(f"before {r['case']}: Dice {r['dice']:.4f}", flush=True)
    if args.before_only:
        return 0
    write_decisions(work / "state", corr, before_corr)
    resunet("corrections", "export", "--from", str(work / "state"), "--out", str(work / "dataset"))
    t_ft = time.time()
    train_log = resunet("train", "--init-from", str(BUNDLED), "--data", str(work / "dataset"), "--out", str(work / "run"),
            "--device", "cpu", "--set", "progress=false", "--set", "tensorboard=false", *(a for o in args.overrides for a in ("--set", o)))
    ft_min = (time.time() - t_ft) / 60
    after_held = dice_rows(work / "run" / "best.pt", held)
    after_old = dice_rows(work / "run" / "best.pt", old)
    total_min = (time.time() - t0) / 60
    load1 = os.getloadavg()
    rows, old_rows = paired(before_held, after_held), paired(before_old, after_old)
    mean_b = float(np.mean([r["before"] for r in rows]))
    mean_a = float(np.mean([r["after"] for r in rows]))
    worst = min(r["delta"] for r in rows)
    met = mean_a - mean_b >= 0.02 and worst >= -0.01
    judged = not args.colin_only
    from resunet.training.checkpoint import load_checkpoint

    card = load_checkpoint(work / "run" / "best.pt").model_card
    import yaml

    run_cfg = yaml.safe_load((work / "run" / "config.yaml").read_text())
    steps = steps_per_epoch(train_log)
    doc = {"rows": rows, "parent_contrast_rows": old_rows, "corrections": [{"case": r["case"], "before": r["dice"]} for r in before_corr],
           "corrected_heads": args.corrected_heads, "colin_only": args.colin_only,
           "mean_before": mean_b, "mean_after": mean_a, "worst_delta": worst, "goal_met": met if judged else None,
           "finetune_minutes": ft_min, "total_minutes": total_min, "load_start": load0, "load_end": load1,
           "epochs": run_cfg["epochs"], "iterations_per_epoch": run_cfg["iterations_per_epoch"], "steps_per_epoch": steps,
           "seed": run_cfg["seed"], "parent": card.get("parent"),
           "corrections_in_card": card.get("corrections"), "variant": args.overrides,
           "rehearsal": card.get("rehearsal"), "finetune": card.get("finetune")}
    variant = " ".join(f"--set {o}" for o in args.overrides)
    ft = card.get("finetune") or {}
    rh = (card.get("rehearsal") or {}).get("summary", "not recorded")
    heads = {"colin": "Colin27", "mni": "MNI152"}
    n_corr = ", ".join(f"{sum(c.startswith(h) for c in corr_names)} {name}" for h, name in heads.items()
                       if any(c.startswith(h) for c in corr_names))
    goal = (f"**{'met' if met else 'not met'}**" if judged else "**not judged** (`--colin-only`: no other head held out)")
    lines = [
        "# Fine-tuning the bundled model on 5 approved corrections (bench/bench_review.py)",
        "",
        f"Command: `{command_line()}` (one run, 2 shared CPU cores; load average "
        f"{load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} at the start, {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} at the end).",
        "",
        "New site: T2-like contrast (inverted inside the head) in simulated acquisitions (data/model/simulate.py, "
        f"seed {SEED}); see the script's docstring. Design `--corrected-heads {args.corrected_heads}`"
        f"{' --colin-only' if args.colin_only else ''}: corrections the true masks of {n_corr} T2-like cases "
        f"({', '.join(corr_names)}), through "
        "review decisions, `resunet corrections export` and `resunet train --init-from brain_extraction.pt"
        f"{' ' + variant if variant else ''}` "
        f"({'the fine-tuning defaults of TrainConfig.finetune' if not variant else 'the other settings: TrainConfig.finetune defaults'}).",
        "",
        f"Fine-tuning as run (the child's model card): lr {ft.get('lr')}, freeze_encoder {ft.get('freeze_encoder')}, "
        f"encoder_lr_scale {ft.get('encoder_lr_scale')}, parent_weight {ft.get('parent_weight')}, masked_copies "
        f"{ft.get('masked_copies')}, held-out correction(s) {ft.get('holdout_cases')}, best epoch {ft.get('best_epoch')} "
        f"(0 = the parent kept); {rh}.",
        "",
        f"Fine-tuning: {run_cfg['epochs']} epochs x {steps} optimiser steps, training seed {run_cfg['seed']}; it took "
        f"{ft_min:.1f} min, the whole run {total_min:.1f} min.",
        "",
        "Bundled model on the 5 correction cases (before): " + ", ".join(f"{r['case']} {r['dice']:.4f}" for r in before_corr),
        "",
        "| held-out case | grid | Dice before | Dice after | change |",
        "|---|---|---|---|---|",
        *case_lines(rows),
        f"| **mean** | | {mean_b:.4f} | {mean_a:.4f} | {mean_a - mean_b:+.4f} |",
        "",
        f"Goal (mean up >= 0.02, no case worse by more than 0.01): {goal} "
        f"(mean change {mean_a - mean_b:+.4f}, worst case {worst:+.4f}).",
        "",
        heads_sentence(args.corrected_heads, args.colin_only, corr_names, held_names),
        "",
        "The parent's own contrast (T1: the site's scans the bundled model was made for), to show what the "
        f"fine-tuning forgets; not judged by the goal (acquisitions drawn with seed {PARENT_SEED}; Colin27 is the "
        "parent's training head, MNI152 the head its model card was evaluated on):",
        "",
        "| T1 case | grid | Dice before | Dice after | change |",
        "|---|---|---|---|---|",
        *case_lines(old_rows),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
