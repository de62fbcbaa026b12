"""DICOM SEG predictions: read onto their source series, matched by name or by the referenced series."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from resunet.cli import main
from resunet.io import Volume
from resunet.io.dicom_writer import write_dicom_series
from resunet.io.loader import load_study
from resunet.io.seg import write_dicom_seg


def _study(folder, seed):
    rng = np.random.default_rng(seed)
    aff = np.diag([0.9, 0.9, 3.0, 1.0])
    arr = (rng.normal(100, 10, (20, 18, 6))).astype(np.int16)
    write_dicom_series(Volume(arr, aff), folder, modality="MR")
    return load_study(folder)


def _mask(shape, shift):
    m = np.zeros(shape, np.uint8)
    m[5 + shift : 13 + shift, 4:12, 1:5] = 1
    return m


def test_seg_predictions_matched_by_name_and_by_series(tmp_path, capsys):
    images, pred, gt = tmp_path / "images", tmp_path / "pred", tmp_path / "gt"
    for d in (pred, gt):
        d.mkdir()
    src1 = _study(images / "case1", 1)
    src2 = _study(images / "case2", 2)
    # case1: SEG prediction, NIfTI reference with the same name; label value 2, which DICOM stores as
    # segment 1: predictions.json's label names map it back
    write_dicom_seg(src1.with_array(_mask(src1.shape, 1) * 2), src1, pred / "case1.seg.dcm", {2: "tumour"})
    nib.save(nib.Nifti1Image(_mask(src1.shape, 0) * 2, src1.affine), str(gt / "case1.nii.gz"))
    (pred / "predictions.json").write_text(json.dumps({"model": {"labels": {"1": "lesion", "2": "tumour"}}}))
    # case2: SEG prediction and a SEG reference with another file name, same referenced series
    write_dicom_seg(src2.with_array(_mask(src2.shape, 0)), src2, pred / "case2.seg.dcm", {1: "lesion"})
    write_dicom_seg(src2.with_array(_mask(src2.shape, 0)), src2, gt / "reader_A.dcm", {1: "lesion"})
    out = tmp_path / "out"
    base = ["evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(out), "--workers", "1",
            "--worst-cases", "1", "--audit-db", str(tmp_path / "db")]  # fmt: skip
    assert main(base) == 2  # the SEG files cannot be placed without their series
    assert "--images" in capsys.readouterr().err
    assert main(base + ["--images", str(images)]) == 0  # pred/predictions.json is found without --predictions
    with open(out / "metrics.csv", newline="") as fh:
        rows = {(r["case"], r["label"]): r for r in csv.DictReader(fh)}
    assert {c for c, _ in rows} == {"case1", "reader_A"}
    assert rows["case1", "1"]["situation"] == "both_empty" and rows["reader_A", "2"]["situation"] == "both_empty"
    rows = {c: r for (c, lab), r in rows.items() if r["situation"] == "both_present"}
    assert float(rows["reader_A"]["dice"]) == 1.0
    # one-voxel shift along i (0.9 mm) of an 8x8x4 block: Dice 7/8, HD95 0.9 mm
    assert float(rows["case1"]["dice"]) == pytest.approx(7 / 8)
    assert float(rows["case1"]["hd95"]) == pytest.approx(0.9, rel=1e-5)
