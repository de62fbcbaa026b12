"""Web UI flows through Streamlit's AppTest: the real page script, real files, the real Predictor.

Each test starts the page fresh (its own session state and temp folder) with a tiny untrained
checkpoint as the model folder, so the flows run in seconds on 2 CPU cores.
"""

from __future__ import annotations

import csv
import hashlib
import io
import time
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from streamlit.testing.v1 import AppTest

from test_app_support import (
    APP_SCRIPT,
    EXAMPLE_DICOM,
    EXAMPLE_MASK,
    EXAMPLE_T1,
    PATIENT_ID,
    bad_uploads,
    make_tiny_model,
    nifti_gz_bytes,
    open_page,
    two_series_zip,
)

from resunet.cli import main as cli_main
from resunet.evaluation import evaluate_case, read_mask
from resunet.io import load_study
from resunet.reports.audit import read_runs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models")
    make_tiny_model(d / "tiny.pt")
    return d


@pytest.fixture
def app(model_dir, tmp_path, monkeypatch) -> AppTest:
    return open_page(model_dir, tmp_path, monkeypatch)


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def _only_result(at: AppTest):
    results = at.session_state["results"]
    assert len(results) == 1
    return next(iter(results.values()))


def _table(at: AppTest, column: str):
    """The first table on the page that has ``column`` (AppTest does not expose dataframe keys)."""
    for df in at.dataframe:
        if column in df.value.columns:
            return df.value
    raise AssertionError(f"no table with column {column!r}")


def _volume_table(at: AppTest):
    return _table(at, "Volume (mL)")


def test_example_study_shows_three_views_volumes_and_downloads(app, tmp_path):
    at = app
    at.button(key="example").click().run()
    assert not at.exception, at.exception
    assert _errors(at) == []
    # three views at physical aspect (91x109x91 at 2 mm: axial is 182x218 mm -> taller than wide)
    images = at.get("image")
    assert len(images) == 3
    assert [s.label for s in at.slider if s.key and s.key.startswith("slice_")] == [
        "Axial slice", "Coronal slice", "Sagittal slice"]
    # volume table = the Predictor's own numbers
    result = _only_result(at)
    table = _volume_table(at)
    assert list(table["Name"]) == ["brain"]
    assert int(table["Voxels"][0]) == result.prediction.voxel_counts["brain"]
    assert float(table["Volume (mL)"][0]) == pytest.approx(result.prediction.volumes_ml["brain"], abs=0.01)
    # the caption says how the figures were made: model, input, test-time augmentation (off by default)
    caption = " ".join(c.value for c in at.caption)
    assert result.model_sha256[:12] in caption and result.input_sha256[:12] in caption
    assert result.prediction.passes == 1 and "test-time augmentation off" in caption
    # issue 25 point 4: the modality from the model when the NIfTI file does not say; which time is which
    assert "modality unknown" not in caption and "T1 MRI (the file does not say" in caption, caption
    assert f"model run {result.seconds:.1f} s" in caption
    assert result.wait_s is not None and result.wait_s >= result.seconds
    assert f"({result.wait_s:.1f} s in all from the study's arrival to these views)" in caption
    # the mask download is a NIfTI label map on exactly the input's grid
    assert [b.label for b in at.get("download_button")] == ["Download mask.nii.gz"]
    data, _mime = result.downloads["mask"]["mask.nii.gz"]
    img = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(data))
    src = nib.load(EXAMPLE_T1)
    assert img.shape == src.shape
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), result.mask.array)
    # the run is in the audit log with the model, the input and the mask's hash
    (run,) = read_runs(tmp_path / "audit.sqlite")
    assert run["kind"] == "predict" and run["run_id"] == result.audit_run_id
    assert run["model_sha256"] == result.model_sha256
    assert run["provenance"]["files"]["input"][0]["sha256"] == result.input_sha256
    assert run["provenance"]["prediction"]["voxel_counts"] == result.prediction.voxel_counts
    assert {o["sha256"] for o in run["outputs"]} == {hashlib.sha256(data).hexdigest()}
    # moving a slider redraws without running the model again
    at.slider(key="slice_axial").set_value(10).run()
    assert not at.exception
    assert _only_result(at) is result
    captions = [i.proto.imgs[0].caption for i in at.get("image")]
    assert captions[0] == "axial 10/91"


def test_nifti_upload_and_reference_metrics_match_the_cli(app, tmp_path, monkeypatch):
    at = app
    at.file_uploader(key="upload").set_value(("t1.nii.gz", EXAMPLE_T1.read_bytes(), "application/gzip")).run()
    assert not at.exception, at.exception
    assert _errors(at) == []
    result = _only_result(at)
    at.file_uploader(key="reference").set_value(("ref.nii.gz", EXAMPLE_MASK.read_bytes(), "application/gzip")).run()
    assert not at.exception, at.exception
    assert _errors(at) == []
    shown = _table(at, "Dice")
    expected = evaluate_case(result.mask, read_mask(EXAMPLE_MASK), tolerance_mm=2.0)
    assert len(shown) == len(expected) == 1
    for col, key in [("Dice", "dice"), ("IoU", "iou"), ("Precision", "precision"), ("Recall", "recall"),
                     ("HD95 (mm)", "hd95"), ("ASSD (mm)", "assd"), ("NSD@2mm", "nsd")]:
        exp = expected[0][key]
        got = shown[col][0]
        if exp is None:
            assert got is None or (isinstance(got, float) and np.isnan(got))
        else:
            assert got == pytest.approx(exp, rel=1e-9)
    labels = [b.label for b in at.get("download_button")]
    for name in ("mask.nii.gz", "metrics.csv", "summary.csv", "report.html", "report.pdf", "metrics.json"):
        assert f"Download {name}" in labels
    (_rows, files), = at.session_state["evaluations"].values()
    assert files["report.pdf"][0].startswith(b"%PDF")
    assert b"both_empty" in files["report.html"][0]  # the report states the empty-mask rules
    # the same numbers as the command line on the downloaded mask and the same reference
    pred_dir, gt_dir, out_dir = tmp_path / "pred", tmp_path / "gt", tmp_path / "cli"
    pred_dir.mkdir(), gt_dir.mkdir()
    (pred_dir / "case.nii.gz").write_bytes(result.downloads["mask"]["mask.nii.gz"][0])
    (gt_dir / "case.nii.gz").write_bytes(EXAMPLE_MASK.read_bytes())
    monkeypatch.setenv("RESUNET_AUDIT_DB", str(tmp_path / "audit.sqlite"))
    assert cli_main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out_dir)]) == 0
    cli_rows = list(csv.DictReader(io.StringIO((out_dir / "metrics.csv").read_text())))
    app_rows = list(csv.DictReader(io.StringIO(files["metrics.csv"][0].decode())))
    for row in cli_rows + app_rows:
        row.pop("case")
        row.pop("label_name")  # the page knows the model's label names; the bare CLI call does not
    assert app_rows == cli_rows
    # the conventions are stated on the page
    md = " ".join(m.value for m in at.markdown)
    assert "both_empty" in md and "ref_empty" in md and "pred_empty" in md


def test_reference_on_another_grid_is_refused_unless_resampling_is_asked(app):
    at = app
    at.button(key="example").click().run()
    ref = nib.load(EXAMPLE_MASK)
    coarse = nib.Nifti1Image(np.asarray(ref.dataobj)[::2, ::2, ::2].astype(np.uint8), ref.affine @ np.diag([2, 2, 2, 1]))
    at.file_uploader(key="reference").set_value(("coarse.nii.gz", nifti_gz_bytes(coarse), "application/gzip")).run()
    assert not at.exception, at.exception
    (msg,) = _errors(at)
    assert "grid" in msg and "(46, 55, 46)" in msg and "(91, 109, 91)" in msg
    assert "/tmp" not in msg and "\n" not in msg
    at.checkbox(key="resample_pred").check().run()
    assert not at.exception, at.exception
    assert _errors(at) == []
    assert len(_table(at, "Dice")) == 1


def test_dicom_zip_with_two_series_offers_a_picker_and_a_dicom_seg(app, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    at = app
    data, second_uid = two_series_zip(tmp_path)
    at.file_uploader(key="upload").set_value(("study.zip", data, "application/zip")).run()
    assert not at.exception, at.exception
    assert _errors(at) == []
    picker = at.selectbox[[s.label.startswith("This study has 2 image series") for s in at.selectbox].index(True)]
    options = picker.options
    assert len(options) == 2
    assert "91 slices" in options[0] and "MR" in options[0]
    assert "T1 4mm copy" in options[1] and "46 slices" in options[1] and "55×46" in options[1]
    picker.set_value(1).run()
    assert not at.exception, at.exception
    assert _errors(at) == []
    results = at.session_state["results"]
    chosen = [r for k, r in results.items() if k[1] and k[1].startswith(second_uid)]
    assert len(chosen) == 1
    assert chosen[0].mask.shape == (46, 55, 46)
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Download mask.nii.gz", "Download mask.seg.dcm", "Download mask.rtstruct.dcm"]
    seg = pydicom.dcmread(io.BytesIO(chosen[0].downloads["mask"]["mask.seg.dcm"][0]))
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == second_uid
    # patient identifiers: on the page (collapsed panel), never in the logs
    assert any(e.label.startswith("Patient and study") for e in at.expander)
    assert "Doe" in str(at.table[0].value.to_dict())
    assert "Doe" not in caplog.text and PATIENT_ID not in caplog.text and "study.zip" not in caplog.text


def test_several_dicom_files_uploaded_at_once(app):
    at = app
    files = [(p.name, p.read_bytes(), "application/dicom") for p in sorted(EXAMPLE_DICOM.iterdir()) if p.is_file()]
    at.file_uploader(key="upload").set_value(files).run()
    assert not at.exception, at.exception
    assert _errors(at) == []
    result = _only_result(at)
    reference = load_study(EXAMPLE_DICOM)
    assert result.mask.shape == reference.shape and result.mask.same_grid(reference)
    assert [b.label for b in at.get("download_button")] == ["Download mask.nii.gz", "Download mask.seg.dcm",
                                                             "Download mask.rtstruct.dcm"]


@pytest.mark.parametrize("case", sorted(bad_uploads()))
def test_bad_upload_gives_a_readable_error_and_the_app_keeps_working(app, case, tmp_path):
    at = app
    files = bad_uploads()[case]
    at.file_uploader(key="upload").set_value(files).run()
    assert not at.exception, at.exception
    errors = _errors(at)
    assert len(errors) == 1, errors
    msg = errors[0]
    assert "Traceback" not in msg and "\n" not in msg.strip()
    assert str(tmp_path) not in msg  # private temp paths are not shown
    assert not list((tmp_path / "sessions").glob("**/escaped.dcm"))
    assert not (tmp_path / "escaped.dcm").exists()
    # the next action works
    at.button(key="example").click().run()
    assert not at.exception, at.exception
    assert _errors(at) == []
    assert len(at.get("image")) == 3


def test_upload_over_the_size_limit_is_refused_with_the_limit_named(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RESUNET_APP_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("RESUNET_APP_DEFAULT_MODEL", "tiny.pt")
    monkeypatch.setenv("RESUNET_APP_TEMP_DIR", str(tmp_path / "sessions"))
    monkeypatch.setenv("RESUNET_APP_MAX_UPLOAD_MB", "1")
    monkeypatch.setenv("RESUNET_AUDIT_DB", str(tmp_path / "audit.sqlite"))
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=60)
    at.run()
    big = np.random.default_rng(1).bytes(1536 * 1024)
    at.file_uploader(key="upload").set_value(("big.dcm", big, "application/dicom")).run()
    assert not at.exception
    (msg,) = _errors(at)
    assert "1.5 MB" in msg and "limit of 1 MB" in msg


def test_uncertainty_option_runs_tta_and_shows_the_overlay(app):
    at = app
    at.button(key="example").click().run()
    first = _only_result(at)
    assert first.uncertainty is None
    at.checkbox(key="uncertainty").check().run()
    assert not at.exception, at.exception
    results = at.session_state["results"]
    assert len(results) == 2  # a new run for the new options; the first result stays cached
    second = [r for r in results.values() if r is not first][0]
    assert second.uncertainty is not None and second.uncertainty.shape == second.mask.shape
    assert second.prediction.passes == 8  # mirror TTA in 3D
    at.checkbox(key="show_unc").check().run()
    assert not at.exception
    assert len(at.get("image")) == 3
    at.checkbox(key="uncertainty").uncheck().run()
    assert len(at.session_state["results"]) == 2  # switching back re-uses the cached first result
    assert int(_volume_table(at)["Voxels"][0]) == first.rows[0]["voxels"]


def test_idle_session_expires_and_its_folder_is_deleted(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RESUNET_APP_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("RESUNET_APP_DEFAULT_MODEL", "tiny.pt")
    monkeypatch.setenv("RESUNET_APP_TEMP_DIR", str(tmp_path / "sessions"))
    monkeypatch.setenv("RESUNET_APP_SESSION_TTL_MIN", "0.02")  # 1.2 s
    monkeypatch.setenv("RESUNET_AUDIT_DB", str(tmp_path / "audit.sqlite"))
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=120)
    at.run()
    at.file_uploader(key="upload").set_value(("t1.nii.gz", EXAMPLE_T1.read_bytes(), "application/gzip")).run()
    assert not at.exception and _errors(at) == []
    folder = at.session_state["workspace"].path
    assert list(folder.rglob("study.nii.gz"))
    time.sleep(1.5)
    at.run()
    assert not at.exception
    assert any("expired" in i.value for i in at.info)
    assert not folder.exists()
    assert "results" not in at.session_state or not at.session_state["results"]
    assert not at.get("image")


def test_missing_model_folder_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("RESUNET_APP_MODEL_DIR", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("RESUNET_AUDIT_DB", str(tmp_path / "audit.sqlite"))
    monkeypatch.setenv("RESUNET_APP_TEMP_DIR", str(tmp_path / "sessions"))
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=60)
    at.run()
    assert not at.exception
    assert any("No model checkpoint" in e for e in _errors(at))
    # the viewer still opens the study without a model
    at.button(key="example").click().run()
    assert not at.exception
    assert len(at.get("image")) == 3


def test_metric_abbreviations_are_explained_beside_the_table(app):
    """Issue 25 point 4: HD95, ASSD and NSD@2mm have their one-line meaning under the metrics table (not only
    in the collapsed definitions) and as the columns' help."""
    at = app
    at.button(key="example").click().run()
    at.checkbox(key="use_example_ref").check().run()
    assert not at.exception, at.exception
    assert _errors(at) == []
    _table(at, "HD95 (mm)")
    shown = "\n".join(m.value for m in at.markdown)
    assert "**HD95**: 95th-percentile distance between the two outlines, mm" in shown, shown
    assert "**ASSD**: average distance between the two outlines, mm" in shown
    assert "**NSD@2mm**: share of both outlines lying within 2 mm of the other" in shown
