"""The bundled multi-label model ``brain_tissue`` (resunet/data/model/brain_tissue.pt) picked by name, on the
example study: three labels through the NIfTI mask, a DICOM SEG with three segments, per-label rows
of ``resunet evaluate``, ``resunet info`` and the web UI's picker and legend.

One ``resunet predict`` call (NIfTI example + its DICOM series, no TTA, ~10 s on 2 cores) serves the
module; the web UI test runs the real page with the real model.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from streamlit.testing.v1 import AppTest

from test_app_support import APP_SCRIPT, EXAMPLE_DICOM, EXAMPLE_MASK, EXAMPLE_T1

from resunet.cli import main
from resunet.errors import ModelError
from resunet.inference import load_model
from resunet.inference.bundled import BUNDLED_DIR, bundled_models, resolve_model
from resunet.io import load_study
from resunet.io.seg import read_dicom_seg

TISSUE = {1: "CSF", 2: "grey matter", 3: "white matter"}


@pytest.fixture(scope="module")
def predicted(tmp_path_factory) -> Path:
    """``resunet predict`` with ``--model brain_tissue --no-tta`` on the example as NIfTI, as its DICOM
    series, and skull-stripped with its brain mask (the model's intended input); returns --out."""
    root = tmp_path_factory.mktemp("tissue")
    t1 = nib.load(EXAMPLE_T1)
    brain = np.asarray(nib.load(EXAMPLE_MASK).dataobj) > 0
    stripped = np.where(brain, np.asarray(t1.dataobj), 0).astype(np.int16)
    nib.save(nib.Nifti1Image(stripped, t1.affine, t1.header), root / "colin27_stripped.nii.gz")
    out = root / "out"
    code = main(["predict", str(EXAMPLE_T1), str(EXAMPLE_DICOM), str(root / "colin27_stripped.nii.gz"), "--model",
                 "brain_tissue", "--out", str(out), "--no-tta", "--no-progress", "--no-audit"])
    assert code == 0
    return out


def test_bundled_names_resolve_to_the_shipped_checkpoints_and_paths_stay_paths(tmp_path, monkeypatch):
    assert set(bundled_models()) == {"brain_extraction", "brain_tissue"}
    assert resolve_model("brain_tissue") == BUNDLED_DIR / "brain_tissue.pt"
    assert load_model("brain_extraction").meta["labels"] == {"0": "background", "1": "brain"}
    monkeypatch.chdir(tmp_path)
    Path("brain_tissue").write_bytes(b"not a model")  # a local file of that name wins over the bundled one
    assert resolve_model("brain_tissue") == Path("brain_tissue")
    assert resolve_model("models/brain_tissue.pt") == Path("models/brain_tissue.pt")
    with pytest.raises(ModelError, match="bundled model name .*brain_extraction, brain_tissue"):
        load_model("brain_tisue")


def test_tissue_model_labels_grey_and_white_matter_on_the_example(predicted):
    mask = nib.load(predicted / "colin27_t1.nii.gz")
    src = nib.load(EXAMPLE_T1)
    assert mask.shape == src.shape and np.array_equal(mask.affine, src.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) == {0, 1, 2, 3}
    # on the skull-stripped example (the intended input): plausible volumes, all inside the brain
    labels = np.asarray(nib.load(predicted / "colin27_stripped.nii.gz").dataobj)
    brain = np.asarray(nib.load(EXAMPLE_MASK).dataobj) > 0
    ml = {k: float(np.count_nonzero(labels == k)) * 8 / 1000 for k in TISSUE}  # 2 mm voxels: 8 uL
    assert ml[2] > 400 and ml[3] > 300, ml
    tissue = labels > 0
    assert np.count_nonzero(tissue & brain) / np.count_nonzero(tissue) > 0.95
    assert np.count_nonzero(tissue & brain) / np.count_nonzero(brain) > 0.8
    # white matter is enclosed by grey matter: WM voxels lie deeper inside the brain than GM voxels
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(brain)
    assert depth[labels == 3].mean() > depth[labels == 2].mean() + 2
    doc = json.loads((predicted / "predictions.json").read_text())
    assert doc["model"]["path"].endswith("brain_tissue.pt")
    rec = {r["case"]: r for r in doc["cases"]}["colin27_stripped"]
    assert set(rec["volumes_ml"]) == set(TISSUE.values())
    assert rec["volumes_ml"]["grey matter"] == pytest.approx(ml[2], rel=1e-6)


def test_tissue_model_predicts_all_three_labels_on_the_example(predicted):
    for case in ("colin27_t1", "colin27_stripped"):
        labels = np.asarray(nib.load(predicted / f"{case}.nii.gz").dataobj)
        assert set(np.unique(labels)) == {0, 1, 2, 3}, case
    # skull-stripped: a CSF volume of an adult brain (the MNI152 labels have 158 mL), mostly in the mask
    labels = np.asarray(nib.load(predicted / "colin27_stripped.nii.gz").dataobj)
    brain = np.asarray(nib.load(EXAMPLE_MASK).dataobj) > 0
    csf = labels == 1
    assert 40 < np.count_nonzero(csf) * 8 / 1000 < 400
    assert np.count_nonzero(csf & brain) / np.count_nonzero(csf) > 0.6


def test_dicom_seg_holds_three_segments_that_read_back_onto_the_mask(predicted):
    ds = pydicom.dcmread(predicted / "colin27_t1_dicom.seg.dcm")
    assert ds.Modality == "SEG"
    assert [s.SegmentLabel for s in ds.SegmentSequence] == list(TISSUE.values())
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == [1, 2, 3]
    source = load_study(EXAMPLE_DICOM)
    seg = read_dicom_seg(predicted / "colin27_t1_dicom.seg.dcm", source)
    nifti = np.asarray(nib.load(predicted / "colin27_t1_dicom.nii.gz").dataobj)
    assert set(np.unique(np.asarray(seg.array))) == {0, 1, 2, 3}
    assert np.array_equal(np.asarray(seg.array), nifti)


def test_evaluate_writes_one_named_row_per_tissue_label(predicted, tmp_path):
    """The DICOM series' mask scored against the NIfTI example's mask (same scan, two readers)."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    shutil.copy(predicted / "colin27_t1_dicom.nii.gz", pred / "colin27.nii.gz")
    shutil.copy(predicted / "colin27_t1.nii.gz", gt / "colin27.nii.gz")
    code = main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "eval"), "--predictions",
                 str(predicted / "predictions.json"), "--resample-pred", "--labels", "1,2,3",
                 "--audit-db", str(tmp_path / "audit.sqlite")])
    assert code == 0
    rows = list(csv.DictReader((tmp_path / "eval" / "metrics.csv").open()))
    assert [(int(r["label"]), r["label_name"]) for r in rows] == list(TISSUE.items())
    for r in rows:  # the same scan through the DICOM and the NIfTI reader gives the same labels, CSF included
        assert r["situation"] == "both_present" and int(r["n_pred"]) > 0 and float(r["dice"]) > 0.99, r


def test_info_lists_the_bundled_models_and_prints_the_tissue_card(capsys):
    assert main(["info", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "brain_extraction" in listing and "1=brain" in listing
    assert "brain_tissue" in listing and "1=CSF, 2=grey matter, 3=white matter" in listing
    assert main(["info", "brain_tissue"]) == 0
    card = capsys.readouterr().out
    assert "labels     0=background, 1=CSF, 2=grey matter, 3=white matter" in card
    assert "held_out_mni152" in card


def test_web_ui_picks_the_tissue_model_by_its_labels_and_its_legend_lists_all_three(tmp_path, monkeypatch):
    monkeypatch.setenv("RESUNET_APP_MODEL_DIR", str(BUNDLED_DIR))
    monkeypatch.setenv("RESUNET_APP_TEMP_DIR", str(tmp_path / "sessions"))
    monkeypatch.setenv("RESUNET_AUDIT_DB", str(tmp_path / "audit.sqlite"))
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=180)
    at.run()
    assert not at.exception, at.exception
    picker = at.selectbox(key="model")
    assert "brain_extraction.pt: brain" in picker.options
    assert "brain_tissue.pt: CSF, grey matter, white matter" in picker.options
    picker.select(BUNDLED_DIR / "brain_tissue.pt").run()
    assert not at.exception, at.exception
    at.button(key="example").click().run()
    assert not at.exception, at.exception
    assert [e.value for e in at.error] == []
    (result,) = at.session_state["results"].values()
    assert set(np.unique(result.mask.array)) == {0, 1, 2, 3}
    volumes = next(df.value for df in at.dataframe if "Volume (mL)" in df.value.columns)
    assert list(volumes["Name"]) == list(TISSUE.values())
    legend = next(m.value for m in at.markdown if "■" in m.value)
    assert all(f"</span> {name}" in legend for name in TISSUE.values())
