"""The page's "Correct and sign off" (issue 21 points 2-3): comparison, approve/reject records, the canvas files.

AppTest runs the real page with the tiny model on the bundled example; the canvas's stroke is fed the
way the browser sends it (the component's value under its key), so the page's own event handling,
editor, comparison and sign-off run. The records are read back from the real audit log and files.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from test_app_support import make_tiny_model, open_page

from resunet.cli import main as cli_main
from resunet.evaluation import evaluate_case
from resunet.inference.review import mask_sha256
from resunet.io.nifti import read_nifti
from resunet.reports.audit import read_runs
from resunet.webui.canvas import FRONTEND_DIR
from resunet.webui.edit_panel import comparison_rows, sign_off


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models")
    make_tiny_model(d / "tiny.pt")
    return d


@pytest.fixture
def app(model_dir, tmp_path, monkeypatch) -> AppTest:
    at = open_page(model_dir, tmp_path, monkeypatch)
    at.button(key="example").click().run()
    assert not at.exception, at.exception
    return at


def _stroke(at: AppTest, seq: int = 1) -> None:
    ed = at.session_state["edit_state"]["editor"]
    w, h = ed.image_size("axial")
    at.session_state["edit_canvas_axial"] = {"seq": seq, "kind": "stroke",
                                             "points": [[w * 0.2, h * 0.3], [w * 0.5, h * 0.35], [w * 0.6, h * 0.6]]}


def test_edit_then_approve_records_the_corrected_mask(app, tmp_path):
    at = app
    at.toggle(key="edit_mode").set_value(True).run()
    assert not at.exception, at.exception
    at.radio(key="edit_tool").set_value("paint").run()
    at.number_input(key="edit_radius").set_value(4.0).run()
    _stroke(at)
    at.run()
    assert not at.exception, at.exception
    state = at.session_state["edit_state"]
    ed = state["editor"]
    changed = ed.voxels_changed()
    assert changed > 0
    result = next(iter(at.session_state["results"].values()))
    # the same event is applied once, however often the page reruns
    at.run()
    assert ed.voxels_changed() == changed
    # the comparison table is the evaluation package's numbers
    shown = [df.value for df in at.dataframe if "corrected_ml" in df.value.columns][0]
    expected = evaluate_case(result.mask, ed.corrected, labels=[1])[0]
    assert float(shown["dice"][0]) == pytest.approx(expected["dice"], abs=1e-4)
    assert float(shown["corrected_ml"][0]) == pytest.approx(expected["vol_gt_ml"], abs=1e-3)
    # anonymous on loopback: a name is required
    at.button(key="review_approve").click().run()
    assert any("Enter your name" in e.value for e in at.error)
    at.text_input(key="review_name").set_value("Dr Test").run()
    at.text_input(key="review_comment").set_value("left frontal fixed").run()
    at.button(key="review_approve").click().run()
    assert not at.exception, at.exception
    decided = at.session_state["edit_state"]["decided"]
    review_json = Path(decided["review_json"])
    doc = json.loads(review_json.read_text())["review"]
    assert doc["decision"] == "approve" and doc["reviewer"] == "Dr Test" and doc["comment"] == "left frontal fixed"
    saved = read_nifti(review_json.parent / "corrected.nii.gz")
    assert np.array_equal(saved.array, ed.corrected.array)
    assert doc["corrected_mask_sha256"] == mask_sha256(saved)
    assert doc["model_mask_sha256"] == mask_sha256(result.mask)
    assert sum(doc["voxels_changed"].values()) == changed
    runs = [r for r in read_runs(tmp_path / "audit.sqlite") if r["kind"] == "review"]
    assert len(runs) == 1 and runs[0]["run_id"] == f"review-web-{result.audit_run_id}"
    assert cli_main(["audit", "verify", str(review_json.parent)]) == 0
    assert any(b.label == "Download corrected.nii.gz" for b in at.get("download_button"))


def test_reject_without_edits_records_the_model_mask(app, tmp_path):
    at = app
    at.text_input(key="review_name").set_value("Dr Reject").run()
    at.button(key="review_reject").click().run()
    assert not at.exception, at.exception
    doc = json.loads(Path(at.session_state["edit_state"]["decided"]["review_json"]).read_text())["review"]
    assert doc["decision"] == "reject" and doc["corrected_mask_sha256"] is None
    assert set(doc["voxels_changed"].values()) == {0}
    (run,) = [r for r in read_runs(tmp_path / "audit.sqlite") if r["kind"] == "review"]
    assert run["provenance"]["user"] == "Dr Reject"


def _ras_mask(tmp_path: Path, arr: np.ndarray) -> Path:
    p = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), np.diag([1.0, 1.5, 2.0, 1.0])), str(p))
    return p


def test_sign_off_twice_is_refused_with_a_message(tmp_path):
    arr = np.zeros((12, 10, 8), np.uint8)
    arr[3:8, 3:7, 2:6] = 1
    model = read_nifti(_ras_mask(tmp_path, arr))
    corrected = model.with_array(np.where(np.arange(12)[:, None, None] < 5, arr, 0).astype(np.uint8), is_label=True)
    rows = comparison_rows(model, corrected, {0: "bg", 1: "lesion"})
    assert rows[0]["name"] == "lesion" and rows[0]["corrected_ml"] < rows[0]["model_ml"]
    kw = dict(reviewer="A", comment="", subject="case1", source=model, input_path=tmp_path / "m.nii.gz",
              model_mask=model, corrected=corrected, labels={0: "bg", 1: "lesion"}, folder=tmp_path / "rev",
              model_path=None, model_name="tiny", model_sha256=None, db_path=tmp_path / "a.sqlite")
    sign_off(decision="approve", **kw)
    from resunet.inference.review import AlreadyDecided, Decision, record_decision
    from resunet.reports.audit import RunAlreadyRecorded, record_run

    # the second decision: what happened and what to do, for a clinician: no audit database path, no folder
    with pytest.raises(AlreadyDecided) as second:
        sign_off(decision="reject", **{**kw, "folder": tmp_path / "rev2"})
    msg = str(second.value)
    assert "already approved or rejected" in msg and "review-case1" in msg and "review the new result" in msg
    assert str(tmp_path) not in msg and "sqlite" not in msg
    assert not (tmp_path / "rev2").exists()  # refused before any file was written
    (run,) = [r for r in read_runs(tmp_path / "a.sqlite") if r["kind"] == "review"]
    assert run["provenance"]["review"]["decision"] == "approve"  # the first decision stands
    # a decision recorded by another session between the check and the append: the same message
    with pytest.raises(RunAlreadyRecorded) as dup:
        record_run("review", {**run["provenance"]}, [], db_path=tmp_path / "a.sqlite")
    assert "review-case1" in str(dup.value) and str(tmp_path) not in str(dup.value)
    late = Decision(subject="case1", decision="reject", reviewer="B", comment="", input_sha256="0" * 64,
                    model_mask_sha256="0" * 64, corrected_mask_sha256=None, voxels_changed={})
    with pytest.raises(AlreadyDecided, match="already approved or rejected"):
        record_decision(late, tmp_path / "rev3", {"command": ["test"]}, db_path=tmp_path / "a.sqlite")
    assert not (tmp_path / "rev3" / "review.json").exists()


def test_canvas_frontend_ships_as_package_data():
    html = (FRONTEND_DIR / "index.html").read_text()
    assert "streamlit:componentReady" in html and "http" not in html.replace("http-equiv", "")
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"canvas_frontend/*.html"' in pyproject


def test_sign_off_of_a_dicom_study_writes_seg_and_rtstruct_by_the_reviewer(tmp_path):
    import pydicom

    from resunet.io import load_study
    from test_app_support import EXAMPLE_DICOM
    from resunet.webui.editor import MaskEditor

    source = load_study(EXAMPLE_DICOM)
    arr = np.zeros(source.shape, np.uint8)
    i, j, k = (s // 2 for s in source.shape)
    arr[i - 8:i + 8, j - 8:j + 8, k - 3:k + 3] = 1
    model = source.with_array(arr, is_label=True)
    ed = MaskEditor(model)
    w, h = ed.image_size("axial")
    assert ed.brush("axial", ed.display.n_slices("axial") // 2, [(w * 0.2, h * 0.2), (w * 0.3, h * 0.3)], 4.0, 1)
    path = sign_off(decision="approve", reviewer="alice", comment="", subject="dicom-case", source=source,
                    input_path=EXAMPLE_DICOM, model_mask=model, corrected=ed.corrected, labels={1: "brain"},
                    folder=tmp_path / "review", model_path=None, model_name="tiny", model_sha256=None,
                    db_path=tmp_path / "audit.sqlite")
    doc = json.loads(path.read_text())["review"]
    assert set(doc["outputs"]) == {"mask", "seg", "rtstruct", "comparison"}
    import csv

    (row,) = list(csv.DictReader((path.parent / "comparison.csv").open()))
    shown = comparison_rows(model, ed.corrected, {1: "brain"})[0]
    assert row["name"] == "brain" and float(row["dice"]) == shown["dice"] < 1
    assert float(row["corrected_ml"]) == shown["corrected_ml"] > float(row["model_ml"])
    seg = pydicom.dcmread(path.parent / doc["outputs"]["seg"]["path"])
    assert str(seg.ContentCreatorName).rstrip("^") == "alice"  # a PN: highdicom writes family^given
    assert {str(s.SegmentAlgorithmType) for s in seg.SegmentSequence} == {"SEMIAUTOMATIC"}
    rt = pydicom.dcmread(path.parent / doc["outputs"]["rtstruct"]["path"])
    assert rt.ApprovalStatus == "APPROVED" and str(rt.ReviewerName).rstrip("^") == "alice"
    assert doc["voxels_changed"]["brain"] == ed.voxels_changed() > 0
    assert cli_main(["audit", "verify", str(path.parent), "--audit-db", str(tmp_path / "audit.sqlite")]) == 0
