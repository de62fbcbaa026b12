"""Blank and non-finite input (issue 22 point 2): refused with the reason, or segmented with a warning
that travels with the result (predictions.json/.csv, the evaluation report).

Real NIfTI files written with nibabel and read back through resunet's reader; a tiny real checkpoint.
"""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from resunet.cli import main
from resunet.errors import InputError
from resunet.inference import Predictor
from resunet.io import load_study
from test_inference_support import single_torch_thread  # noqa: F401  (autouse fixture)
from test_inference_support import make_checkpoint, synthetic_scan


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, scan):
    return make_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", scan)


def _write(path, arr, affine):
    nib.save(nib.Nifti1Image(np.asarray(arr, np.float32), affine), str(path))
    return path


def _partly_nan(scan):
    arr = scan.array.astype(np.float32)
    arr[:, :, :3] = np.nan  # three slices outside the field of view
    arr[0, 0, 5] = np.inf
    return arr


def test_all_nan_scan_is_refused(tmp_path, ckpt, scan):
    vol = load_study(_write(tmp_path / "blank.nii.gz", np.full(scan.shape, np.nan), scan.affine))
    with pytest.raises(InputError, match=r"every voxel is NaN or infinite \(5434 voxels\)"):
        Predictor(ckpt, tta=False).predict(vol)


def test_constant_scan_is_refused(tmp_path, ckpt, scan):
    vol = load_study(_write(tmp_path / "flat.nii.gz", np.full(scan.shape, 7.0), scan.affine))
    with pytest.raises(InputError, match=r"every voxel has the same value \(7\)"):
        Predictor(ckpt, tta=False).predict(vol)


def test_constant_apart_from_nan_is_refused(tmp_path, ckpt, scan):
    arr = np.zeros(scan.shape, np.float32)
    arr[:4] = np.nan
    vol = load_study(_write(tmp_path / "flat_nan.nii.gz", arr, scan.affine))
    with pytest.raises(InputError, match="same value .*apart from NaN/inf"):
        Predictor(ckpt, tta=False).predict(vol)


def test_partly_nan_scan_is_segmented_with_a_warning(tmp_path, ckpt, scan):
    arr = _partly_nan(scan)
    n_bad = int((~np.isfinite(arr)).sum())
    vol = load_study(_write(tmp_path / "fov.nii.gz", arr, scan.affine))
    pred = Predictor(ckpt, tta=False).predict(vol)
    assert pred.mask.shape == scan.shape
    assert len(pred.warnings) == 1
    assert f"{n_bad} of {arr.size} voxels" in pred.warnings[0]
    assert pred.summary()["warnings"] == pred.warnings
    # NaN still in an in-memory array: zero-filled the same way (same mask), the caller's array untouched
    mem = scan.with_array(arr.copy())
    pred_mem = Predictor(ckpt, tta=False).predict(mem)
    assert np.array_equal(pred_mem.mask.array, pred.mask.array)
    assert np.isnan(mem.array).sum() == int(np.isnan(arr).sum())
    assert f"{n_bad} of {arr.size} voxels" in pred_mem.warnings[0]
    # a clean scan carries no warning
    assert Predictor(ckpt, tta=False).predict(scan).warnings == []


def test_batch_records_refusal_and_warning(tmp_path, ckpt, scan, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    _write(inp / "blank.nii.gz", np.full(scan.shape, np.nan), scan.affine)
    _write(inp / "fov.nii.gz", _partly_nan(scan), scan.affine)
    _write(inp / "clean.nii.gz", scan.array, scan.affine)
    out = tmp_path / "out"
    code = main(["predict", str(inp), "--out", str(out), "--model", str(ckpt), "--no-tta",
                 "--audit-db", str(tmp_path / "audit.sqlite")])
    assert code != 0  # one case failed
    text = capsys.readouterr()
    assert "WARNING case fov: " in text.err and "1255 of 5434 voxels" in text.err
    doc = json.loads((out / "predictions.json").read_text())
    cases = {c["case"]: c for c in doc["cases"]}
    assert cases["blank"]["status"] == "failed"
    assert "every voxel is NaN or infinite" in cases["blank"]["reason"]
    assert cases["fov"]["status"] == "ok" and "NaN or infinite" in cases["fov"]["warnings"][0]
    assert cases["clean"]["status"] == "ok" and cases["clean"]["warnings"] == []
    rows = {r["case"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    assert "NaN or infinite" in rows["fov"]["warnings"] and rows["clean"]["warnings"] == ""

    # the evaluation report says which evaluated case had a bad input
    gt = tmp_path / "gt"
    gt.mkdir()
    for c in ("fov", "clean"):
        img = nib.load(str(out / f"{c}.nii.gz"))
        nib.save(img, str(gt / f"{c}.nii.gz"))
    (out / "blank.nii.gz").unlink(missing_ok=True)
    rep = tmp_path / "rep"
    assert main(["evaluate", "--pred", str(out), "--gt", str(gt), "--out", str(rep), "--format", "html,pdf",
                 "--audit-db", str(tmp_path / "audit.sqlite")]) == 0
    html = (rep / "report.html").read_text()
    assert 'id="input-warnings"' in html and "fov: " in html and "clean: " not in html.split('id="input-warnings"')[1].split("</div>")[0]
