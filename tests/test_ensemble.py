"""Ensembles: `Predictor([A, B, C])` / `resunet predict --model A B C` average the members' softmax
probabilities window by window; checked against each member run alone with the same settings."""

from __future__ import annotations

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest

from resunet.cli import main
from resunet.errors import ModelError
from resunet.inference import Predictor
from resunet.inference.ensemble import ensemble_sha256, expand_model_args
from resunet.io.hashing import sha256_file
from test_inference_support import single_torch_thread  # noqa: F401  (autouse fixture)
from test_inference_support import make_checkpoint, synthetic_scan


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan()


@pytest.fixture(scope="module")
def members(tmp_path_factory, scan):
    """Three tiny checkpoints with different random weights (same plan and labels)."""
    d = tmp_path_factory.mktemp("members")
    return [make_checkpoint(d / f"m{i}.pt", scan, seed=i) for i in range(3)]


def test_ensemble_probabilities_are_the_mean_of_each_models_probabilities(members, scan):
    alone = [Predictor(m, tta=True, overlap=0.5).predict(scan, probabilities=True) for m in members]
    probs = [p.probabilities["object"].array.astype(np.float64) for p in alone]
    ens = Predictor(members, tta=True, overlap=0.5).predict(scan, probabilities=True)
    mean = np.mean(probs, axis=0)
    got = ens.probabilities["object"].array
    assert got.shape == scan.shape and np.array_equal(ens.mask.affine, scan.affine)
    np.testing.assert_allclose(got, mean, atol=2e-6)
    # the members really differ, so the test would notice a single member or a wrong weight
    assert min(np.abs(probs[0] - probs[i]).max() for i in (1, 2)) > 0.05
    assert np.abs(got - probs[0]).max() > 0.01
    # the mask is the mean thresholded (not a vote of the masks); ties at 0.5 aside
    sure = np.abs(mean - 0.5) > 1e-4
    assert np.array_equal(ens.mask.array[sure], (mean > 0.5)[sure])
    assert ens.passes == 8 * 3 and ens.windows == alone[0].windows  # one sliding-window pass, 3 members
    assert [m["sha256"] for m in ens.models] == [sha256_file(m) for m in members]
    assert ens.model_sha256 == ensemble_sha256([sha256_file(m) for m in members])
    assert ens.settings["ensemble"] == [sha256_file(m) for m in members]


def test_disagreement_is_zero_for_identical_members_and_positive_for_different_ones(members, scan):
    one = Predictor(members[0], tta=True, uncertainty="tta").predict(scan)
    same = Predictor([members[0], members[0]], tta=True, uncertainty="tta").predict(scan)
    np.testing.assert_allclose(same.uncertainty.array, one.uncertainty.array, atol=2e-6)
    assert same.disagreement is not None and float(same.disagreement.array.max()) < 1e-5
    assert one.disagreement is None
    diff = Predictor(members, tta=True, uncertainty="tta").predict(scan)
    dis, unc = diff.disagreement.array, diff.uncertainty.array
    assert dis.shape == scan.shape and 0.0 <= float(dis.min()) and float(dis.max()) <= 1.0
    assert float(dis.max()) > 0.01
    # the disagreement is a part of the total entropy (up to how differently the two maps blend)
    assert float((dis - unc).max()) < 1e-4


def test_members_with_another_plan_are_refused_naming_the_model(tmp_path, members, scan):
    other = make_checkpoint(tmp_path / "coarse.pt", scan, spacing=(2.0, 2.0, 2.0))
    with pytest.raises(ModelError, match=r"coarse\.pt cannot join an ensemble .*spacing"):
        Predictor([members[0], other])


def test_run_folder_of_folds_expands_to_its_checkpoints(tmp_path, members):
    run = tmp_path / "run"
    for k in (1, 0, 10):
        (run / f"fold_{k}").mkdir(parents=True)
        shutil.copy(members[k % 3], run / f"fold_{k}" / "best.pt")
    assert expand_model_args([run]) == [run / "fold_0/best.pt", run / "fold_1/best.pt", run / "fold_10/best.pt"]
    (tmp_path / "single").mkdir()
    shutil.copy(members[0], tmp_path / "single" / "best.pt")
    assert expand_model_args([tmp_path / "single"]) == [tmp_path / "single" / "best.pt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="fold_"):
        expand_model_args([tmp_path / "empty"])


def test_cli_ensemble_records_every_model_hash_and_resumes(tmp_path, members, scan, monkeypatch):
    from resunet.reports.audit import read_runs

    db = tmp_path / "audit.sqlite"
    monkeypatch.setenv("RESUNET_AUDIT_DB", str(db))
    nii = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(scan.array, scan.affine), nii)
    out = tmp_path / "out"
    args = ["predict", str(nii), "--out", str(out), "--model", *map(str, members), "--uncertainty",
            "--save-probabilities", "--no-progress"]
    assert main(args) == 0
    doc = json.loads((out / "predictions.json").read_text())
    hashes = [sha256_file(m) for m in members]
    assert [m["sha256"] for m in doc["model"]["members"]] == hashes
    assert doc["model"]["sha256"] == ensemble_sha256(hashes)
    assert [m["sha256"] for m in doc["provenance"]["model"]["members"]] == hashes
    rec = doc["cases"][0]
    assert rec["status"] == "ok" and rec["model"]["members"] == hashes
    assert set(rec["outputs"]) == {"mask", "probabilities", "uncertainty", "disagreement"}
    assert (out / "scan.uncertainty-models.nii.gz").is_file()
    ref = Predictor(members, tta=True).predict(scan, probabilities=True)
    written = np.asarray(nib.load(out / "scan.prob.nii.gz").dataobj)
    np.testing.assert_allclose(written, ref.probabilities["object"].array, atol=1e-6)
    runs = read_runs(db)
    assert len(runs) == 1 and runs[0]["model_sha256"] == ensemble_sha256(hashes)
    assert [m["sha256"] for m in runs[0]["provenance"]["model"]["members"]] == hashes
    # the same models again: skipped; in another order: a different ensemble identity, recomputed
    assert main(args) == 0
    assert json.loads((out / "predictions.json").read_text())["cases"][0]["finished_utc"] == rec["finished_utc"]
    swapped = args[: args.index("--model") + 1] + [str(members[1]), str(members[0]), str(members[2])] + args[-3:]
    assert main(swapped) == 0
    assert json.loads((out / "predictions.json").read_text())["cases"][0]["finished_utc"] != rec["finished_utc"]
    assert math.isfinite(float(np.asarray(nib.load(out / "scan.uncertainty-models.nii.gz").dataobj).max()))


def test_inputs_written_after_model_are_inputs_not_models(tmp_path, members, scan):
    """``--model`` takes several values; ``--model A.pt B.pt scan.nii.gz`` must not load the scan as a model."""
    nii = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(scan.array, scan.affine), nii)
    out = tmp_path / "out"
    rc = main(["predict", "--out", str(out), "--no-audit", "--no-progress", "--no-tta", "--model", str(members[0]),
               str(members[1]), str(nii)])
    assert rc == 0
    doc = json.loads((out / "predictions.json").read_text())
    assert [m["sha256"] for m in doc["model"]["members"]] == [sha256_file(m) for m in members[:2]]
    assert [c["case"] for c in doc["cases"]] == ["scan"] and (out / "scan.nii.gz").is_file()
