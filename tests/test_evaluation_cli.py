"""`resunet evaluate` end to end on real NIfTI files, and its one-line errors (exit 2) on bad input."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from resunet.cli import main
from resunet.evaluation import evaluate_folders
from resunet.reports.audit import read_runs

AFFINE = np.diag([1.0, 1.2, 3.0, 1.0])


def _save(arr, path, affine=AFFINE):
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def _cube(shift=0, shape=(16, 16, 6)):
    a = np.zeros(shape, np.uint8)
    a[4 + shift : 10 + shift, 4:11, 1:5] = 1
    return a


@pytest.fixture
def folders(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    _save(_cube(0), gt / "a.nii.gz")
    _save(_cube(1), pred / "a.nii.gz")
    b = _cube(0)
    b[12:14, 12:14, 2:4] = 2  # label 2 only in case b's reference
    _save(b, gt / "b.nii.gz")
    _save(_cube(0), pred / "b.nii.gz")
    _save(_cube(0), pred / "orphan.nii.gz")  # prediction without reference
    _save(_cube(0).astype(np.float32) * 0.7, pred / "a.prob.nii.gz")  # predict's probability map: not a case
    _save(_cube(0).astype(np.float32) * 0.3, pred / "b.prob-grey_matter.nii.gz")  # a named label's map: not a case
    return tmp_path


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("resunet evaluate: error:")
    assert "Traceback" not in err[0]
    return err[0]


def test_evaluate_end_to_end(folders, capsys):
    out, db = folders / "out", folders / "audit.sqlite"
    rc = main(["evaluate", "--pred", str(folders / "pred"), "--gt", str(folders / "gt"), "--out", str(out),
               "--audit-db", str(db), "--workers", "2", "--worst-cases", "1"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "NOT EVALUATED: prediction orphan has no reference" in text and "a.prob" not in text
    assert "prob-grey_matter" not in text
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # label 2 is absent from both masks of case a: a both_empty row, not a missing one
    assert [(r["case"], r["label"], r["situation"]) for r in rows] == [
        ("a", "1", "both_present"), ("a", "2", "both_empty"), ("b", "1", "both_present"), ("b", "2", "pred_empty")]  # fmt: skip
    assert rows[0]["hd95"] == "1.0" and rows[3]["hd95"] == ""
    # the process pool gives the same numbers as one process
    ev = evaluate_folders(folders / "pred", folders / "gt", workers=1)
    assert [float(r["dice"]) for r in rows] == [r["dice"] for r in ev.rows]
    runs = read_runs(db)
    assert len(runs) == 1 and runs[0]["kind"] == "evaluate"
    doc = json.loads((out / "metrics.json").read_text())
    assert runs[0]["run_id"] == doc["provenance"]["run_id"]
    assert doc["unmatched"] == {"pred_only": ["orphan"], "gt_only": []}
    assert doc["provenance"]["command"][:2] != []
    assert (out / "report.html").is_file() and not (out / "report.pdf").exists()
    assert main(["audit", "verify", str(out), "--audit-db", str(db)]) == 0


def test_labels_option_and_predictions_json(folders, capsys):
    out = folders / "out"
    model = folders / "model.pt"
    model.write_bytes(b"not really weights")
    from resunet.reports import collect_provenance

    pj = folders / "pred" / "predictions.json"
    pj.write_text(json.dumps({"labels": {"0": "background", "1": "tumour"},
                              "provenance": collect_provenance(command=["resunet", "predict"], model_path=model)}))  # fmt: skip
    rc = main(["evaluate", "--pred", str(folders / "pred"), "--gt", str(folders / "gt"), "--out", str(out),
               "--labels", "1", "--predictions", str(pj), "--audit-db", str(folders / "db.sqlite"), "--workers", "1", "--worst-cases", "0"])  # fmt: skip
    assert rc == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["labels"] == [1] and {r["label"] for r in doc["rows"]} == {1}
    assert doc["rows"][0]["label_name"] == "tumour"
    assert doc["provenance"]["model"]["name"] == "model"
    assert doc["provenance"]["files"]["predictions_summary"][0]["path"] == str(pj.resolve())
    assert "tumour" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--labels", "one"], "--labels"),
        (["--labels", "0"], "--labels"),
        (["--tolerance-mm", "-1"], "--tolerance-mm"),
        (["--tolerance-mm", "nan"], "--tolerance-mm"),
        (["--format", "docx"], "format"),
        (["--predictions", "/nonexistent/predictions.json"], "predictions"),
    ],
)
def test_bad_options_one_line_exit_2(folders, capsys, extra, match):
    args = ["evaluate", "--pred", str(folders / "pred"), "--gt", str(folders / "gt"), "--out", str(folders / "o")]
    assert main(args + extra + ["--audit-db", str(folders / "db.sqlite")]) == 2
    assert match in _err_line(capsys)
    assert not (folders / "o" / "metrics.csv").exists()


def test_missing_folder_and_no_matching_case(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    _save(_cube(), tmp_path / "p" / "x.nii.gz")
    _save(_cube(), tmp_path / "g" / "y.nii.gz")
    base = ["evaluate", "--out", str(tmp_path / "o"), "--audit-db", str(tmp_path / "db")]
    assert main(base + ["--pred", str(tmp_path / "nope"), "--gt", str(tmp_path / "g")]) == 2
    assert "nope" in _err_line(capsys)
    assert main(base + ["--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "g")]) == 2
    assert "no case is in both" in _err_line(capsys)


def test_grid_mismatch_refused_unless_resample_pred(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    _save(_cube(), tmp_path / "g" / "c.nii.gz")
    shifted = AFFINE.copy()
    shifted[0, 3] = 1.0  # the prediction's grid is shifted by one voxel (1 mm) along x
    _save(np.roll(_cube(), -1, axis=0), tmp_path / "p" / "c.nii.gz", shifted)
    base = ["evaluate", "--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "g"), "--out", str(tmp_path / "o"),
            "--audit-db", str(tmp_path / "db"), "--workers", "1", "--worst-cases", "0"]  # fmt: skip
    assert main(base) == 2
    line = _err_line(capsys)
    assert "different voxel grids" in line and "--resample-pred" in line and line.count("spacing") == 2
    assert main(base + ["--resample-pred"]) == 0
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["resampled_cases"] == ["c"] and doc["rows"][0]["dice"] == 1.0


@pytest.mark.parametrize("kind", ["float_mask", "corrupt"])
def test_unusable_mask_files(tmp_path, capsys, kind):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    _save(_cube(), tmp_path / "g" / "c.nii.gz")
    if kind == "float_mask":
        _save(_cube().astype(np.float32) * 0.5, tmp_path / "p" / "c.nii.gz")  # probabilities, not labels
    else:
        (tmp_path / "p" / "c.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    args = ["evaluate", "--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "g"), "--out", str(tmp_path / "o"),
            "--audit-db", str(tmp_path / "db"), "--workers", "1"]  # fmt: skip
    assert main(args) == 2
    assert "c.nii.gz" in _err_line(capsys)


def test_bad_case_in_process_pool_is_one_line(folders, capsys):
    (folders / "gt" / "b.nii.gz").write_bytes(b"garbage")
    args = ["evaluate", "--pred", str(folders / "pred"), "--gt", str(folders / "gt"), "--out", str(folders / "o"),
            "--audit-db", str(folders / "db"), "--workers", "2"]  # fmt: skip
    assert main(args) == 2
    assert "b.nii.gz" in _err_line(capsys)


def test_a_scan_given_as_the_reference_is_refused(tmp_path, capsys):
    """Issue 25 point 7: `--gt data/example` holds the T1 scan under the prediction's case name: refused at
    once with a line naming it (it was scored as 244 labels with Dice 0, exit 0, after minutes), no report,
    no audit entry; --labels says the many values are meant."""
    from test_app_support import EXAMPLE_MASK, EXAMPLE_T1

    pred = tmp_path / "pred"
    pred.mkdir()
    mask = nib.load(str(EXAMPLE_MASK))
    nib.save(mask, str(pred / "colin27_t1.nii.gz"))  # a real label map (label intent) under the case's name
    db = tmp_path / "db"
    args = ["evaluate", "--pred", str(pred), "--gt", str(EXAMPLE_T1.parent), "--out", str(tmp_path / "o"),
            "--audit-db", str(db), "--workers", "1"]  # fmt: skip
    assert main(args) == 2
    line = _err_line(capsys)
    assert "colin27_t1.nii.gz looks like an image, not a label mask" in line, line
    assert "244 distinct non-zero values" in line or "distinct non-zero values" in line
    assert not (tmp_path / "o" / "metrics.json").exists()
    assert not db.exists() or read_runs(db) == []
    # the prediction side is checked too, and a NIfTI label intent or --labels lets a label map through
    nib.save(nib.load(str(EXAMPLE_T1)), str(pred / "colin27_t1.nii.gz"))
    gt = tmp_path / "gt"
    gt.mkdir()
    nib.save(mask, str(gt / "colin27_t1.nii.gz"))
    assert main(args[:4] + [str(gt)] + args[5:]) == 2
    assert "prediction" in (line := _err_line(capsys)) and "looks like an image" in line
    many = nib.Nifti1Image(np.asarray(nib.load(str(EXAMPLE_T1)).dataobj), mask.affine)
    many.header.set_intent("label")
    nib.save(many, str(gt / "colin27_t1.nii.gz"))
    nib.save(many, str(pred / "colin27_t1.nii.gz"))
    assert main(args[:4] + [str(gt)] + args[5:] + ["--labels", "1,2", "--worst-cases", "0"]) == 0


def test_readme_evaluate_example_runs(tmp_path, monkeypatch, capsys):
    """The README's worked evaluate example, line by line, in an empty folder that sees the checkout's resunet/."""
    import re
    import shlex
    import subprocess

    from test_app_support import REPO

    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- evaluate-example -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no evaluate-example block"
    (tmp_path / "resunet").symlink_to(REPO / "resunet")  # the README runs from a checkout
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESUNET_AUDIT_DB", str(tmp_path / "audit.sqlite"))
    for line in block.group(1).strip().splitlines():
        command = line.split("  #")[0].strip()
        if command.startswith("resunet "):
            assert main(shlex.split(command)[1:]) == 0, command
        else:
            subprocess.run(["bash", "-c", command], check=True, cwd=tmp_path, timeout=60)
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = [r for r in doc["rows"] if r["case"] == "colin27_t1"]
    assert [r["label"] for r in rows] == [1] and rows[0]["dice"] > 0.9, rows
    assert (tmp_path / "eval" / "report.html").is_file()
