"""A rehearsal dataset from the bundled brain_extraction model's real training set, for
``bench/bench_review.py --set finetune.rehearse=FOLDER`` (issue 21 variants; docs/training.md). Run by hand:

    .venv/bin/python bench/parent_sample.py 7 /tmp/sample7                # colin_orig + colin_v00..v06
    .venv/bin/python bench/parent_sample.py 3 /tmp/sample3s --stripped    # + a skull-stripped copy of each

The cases are regenerated offline in a few seconds: ``colin_orig`` (the example study) and the first K simulated
acquisitions drawn from data/model/reproduce.py's TRAIN_SEED stream, so they equal the model's
``colin_v00..`` training cases. ``--stripped`` adds each case not already stripped with the voxels outside its
brain mask set to 0 (as resunet.training.rehearsal's ``parent`` recipe does for the example study).
Not patient data (Colin27, mricron-data, BSD-3).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "data" / "model"))

import reproduce  # noqa: E402
from simulate import random_acquisition, simulate  # noqa: E402

from resunet.io import read_nifti  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("k", type=int, help="how many of the model's simulated training acquisitions (colin_v00..)")
    ap.add_argument("out", type=Path, help="dataset folder to write (MSD layout; must not exist)")
    ap.add_argument("--stripped", action="store_true", help="add a skull-stripped copy of each case")
    args = ap.parse_args(argv)
    if args.out.exists():
        print(f"{args.out} exists; name a new folder", file=sys.stderr)
        return 2
    image = read_nifti(REPO / "resunet/data/example/colin27_t1.nii.gz")
    mask = read_nifti(REPO / "resunet/data/example/colin27_brainmask.nii.gz")
    rng = np.random.default_rng(reproduce.TRAIN_SEED)
    base = [("colin_orig", image, mask, {"original": True})]
    for i in range(args.k):  # the same draws, in the same order, as reproduce.make_training_data
        acq = random_acquisition(rng)
        v, m = simulate(image, mask, acq, rng)
        base.append((f"colin_v{i:02d}", v, m, acq.to_dict()))
    cases = []
    for name, v, m, acq_d in base:
        cases.append((name, v, m, acq_d))
        if args.stripped and not acq_d.get("strip_skull"):
            arr = np.asarray(v.array)
            s = v.with_array(np.where(np.asarray(m.array) > 0, arr, 0).astype(arr.dtype))
            cases.append((f"{name}_stripped", s, m, dict(acq_d, strip_skull=True)))
    reproduce.write_training_set(args.out, cases, {
        "name": "brain_extraction_parent_sample",
        "description": "a sample of the bundled brain_extraction model's training set (data/model/reproduce.py)",
        "labels": {"0": "background", "1": "brain"}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
