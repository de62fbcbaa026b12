"""DICOM SR (TID 1500 Measurement Report) beside the SEG (issue 24 point 3): written by `resunet predict
--format seg,sr`, read back with highdicom, the same volumes as predictions.json, references to the
SEG's segments and the source series, and clean for dicom3tools' dciodvfy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import highdicom as hd
import pydicom
import pytest

from test_app_support import EXAMPLE_DICOM, make_tiny_model

from resunet.cli import main
from resunet.io.sr import read_sr_volumes


def test_predict_writes_a_measurement_report_of_the_seg(tmp_path, capsys):
    model = make_tiny_model(tmp_path / "tiny.pt")
    out = tmp_path / "out"
    assert main(["predict", str(EXAMPLE_DICOM), "--out", str(out), "--model", str(model), "--no-tta",
                 "--format", "seg,sr", "--no-audit", "--no-progress"]) == 0
    case = json.loads((out / "predictions.json").read_text())["cases"][0]
    assert set(case["outputs"]) == {"seg", "sr"}
    sr_path = out / case["outputs"]["sr"]["path"]
    seg = pydicom.dcmread(out / case["outputs"]["seg"]["path"], stop_before_pixels=True)
    src = pydicom.dcmread(next(EXAMPLE_DICOM.glob("*.dcm")), stop_before_pixels=True)

    assert read_sr_volumes(sr_path) == pytest.approx(case["volumes_ml"], abs=1e-6)
    assert case["volumes_ml"] and all(v > 0 for v in case["volumes_ml"].values())
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(sr_path))
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(seg.SegmentSequence)
    ref = groups[0].referenced_segment
    assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID and ref.referenced_segment_numbers == [1]
    seg_item = seg.SegmentSequence[0]
    assert groups[0].finding_type.value == seg_item.SegmentedPropertyTypeCodeSequence[0].CodeValue
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence and src.SOPInstanceUID in evidence

    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dciodvfy (Debian dicom3tools) is missing; scripts/setup-system.sh installs it")
        pytest.skip("dciodvfy not installed")
    res = subprocess.run(["dciodvfy", str(sr_path)], capture_output=True, text=True, timeout=120)
    errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], errors


def test_sr_without_seg_is_refused_with_the_fix(tmp_path, capsys):
    model = make_tiny_model(tmp_path / "tiny.pt")
    code = main(["predict", str(EXAMPLE_DICOM), "--out", str(tmp_path / "o"), "--model", str(model), "--format", "sr",
                 "--no-audit"])
    assert code == 2 and "--format sr needs seg too" in capsys.readouterr().err


def _texts(item, code: str) -> list[str]:
    """TextValue of every content item under ``item`` whose concept name has code value ``code``."""
    out = []
    for child in item.get("ContentSequence", []) if hasattr(item, "get") else item:
        if child.get("ConceptNameCodeSequence") and child.ConceptNameCodeSequence[0].CodeValue == code:
            out.append(str(child.get("TextValue", "")))
        out += _texts(child, code)
    return out


def _lesion_mask(source):
    """Label 1 "brain" (a box) and label 2 "lesion" in three separate blobs, one of them two cubes that
    touch only at a corner (one lesion at 26-connectivity, two at 6)."""
    import numpy as np

    arr = np.zeros(source.shape, np.uint8)
    arr[10:50, 10:50, 20:60] = 1
    arr[60:64, 60:64, 10:14] = 2            # 64 voxels
    arr[70:73, 20:23, 40:43] = 2            # 27 voxels
    arr[20:22, 70:72, 70:72] = 2            # 8 voxels ...
    arr[22:24, 72:74, 72:74] = 2            # ... + 8 touching it only at a corner
    return source.with_array(arr, is_label=True, labels={"1": "brain", "2": "lesion"}, lesion_labels=["lesion"])


def test_sr_reports_each_connected_lesion_of_a_lesion_label(tmp_path):
    """A real SEG + SR of a mask with 3 lesions: highdicom reads back one group per lesion, each
    referencing the lesion label's segment and the source series with the SEG's algorithm, and the
    volumes equal a skimage count on the mask; the per-label groups stay as they were."""
    import numpy as np
    from skimage.measure import label as connected

    from dicom_checks import dciodvfy
    from resunet.io import load_study
    from resunet.io.seg import write_dicom_seg
    from resunet.io.sr import read_sr_lesion_volumes, write_dicom_sr

    source = load_study(EXAMPLE_DICOM)
    mask = _lesion_mask(source)
    arr = np.asarray(mask.array)
    seg_path = write_dicom_seg(mask, source, tmp_path / "case.seg.dcm", {1: "brain", 2: "lesion"},
                               algorithm_name="resunet lesions", model_sha256="ab" * 32)
    per_label = {"brain": float(np.count_nonzero(arr == 1)) * mask.voxel_volume_ml,
                 "lesion": float(np.count_nonzero(arr == 2)) * mask.voxel_volume_ml}
    sr_path = write_dicom_sr(seg_path, source, tmp_path / "case.sr.dcm", per_label, mask=mask,
                             algorithm_name="resunet lesions", model_sha256="ab" * 32)

    components = connected(arr == 2, connectivity=3)
    assert components.max() == 3  # the corner-touching cubes are one lesion
    expected = [float(n) * mask.voxel_volume_ml for n in np.bincount(components.ravel())[1:]]
    assert read_sr_lesion_volumes(sr_path) == {"lesion": pytest.approx(expected, abs=1e-6)}
    assert sorted(expected) == pytest.approx(sorted(v * mask.voxel_volume_ml for v in (64, 27, 16)))
    assert read_sr_volumes(sr_path) == pytest.approx(per_label, abs=1e-6)

    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    lesion_segment = next(int(s.SegmentNumber) for s in seg.SegmentSequence if s.SegmentLabel == "lesion")
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(sr_path))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    lesion_groups = [g for g in groups if " lesion " in str(g.tracking_identifier)]
    assert [str(g.tracking_identifier) for g in lesion_groups] == [
        f"lesion lesion {n} (segment {lesion_segment})" for n in (1, 2, 3)]
    assert len(groups) == 2 + 3
    for g in lesion_groups:
        ref = g.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [lesion_segment]
        series = [str(i.UID) for i in ref if i.ConceptNameCodeSequence[0].CodeValue == "121232"]
        assert series == [str(source.meta["series_uid"])]  # DCM 121232 "Source series for segmentation"
        # TID 4019 Algorithm Identification: DCM 111001 name, 111002 parameters (walked by hand: no getter)
        assert set(_texts(g, "111001")) == {"resunet lesions"}
        assert set(_texts(g, "111002")) == {f"model_sha256={'ab' * 32}"}
    assert len({g.tracking_uid for g in groups}) == len(groups)

    errors, _ = dciodvfy(sr_path)
    assert errors == [], errors


def test_predict_reports_lesions_where_the_model_card_says_so(tmp_path):
    """`resunet predict --format nifti,seg,sr` with a model card whose lesion_labels names "brain":
    the SR's per-label volumes are predictions.json's, its per-lesion volumes a skimage count on the
    NIfTI mask the same run wrote; a lesion label the model lacks is refused with the fix."""
    import nibabel as nib
    import numpy as np
    import torch
    from skimage.measure import label as connected

    from resunet.io.sr import read_sr_lesion_volumes

    model = make_tiny_model(tmp_path / "tiny.pt")
    ckpt = torch.load(model, weights_only=True)
    ckpt["model_card"]["lesion_labels"] = ["brain"]
    torch.save(ckpt, model)
    out = tmp_path / "out"
    assert main(["predict", str(EXAMPLE_DICOM), "--out", str(out), "--model", str(model), "--no-tta",
                 "--format", "nifti,seg,sr", "--no-audit", "--no-progress"]) == 0
    case = json.loads((out / "predictions.json").read_text())["cases"][0]
    sr_path = out / case["outputs"]["sr"]["path"]
    assert read_sr_volumes(sr_path) == pytest.approx(case["volumes_ml"], abs=1e-6)
    img = nib.load(out / case["outputs"]["mask"]["path"])
    arr = np.asarray(img.dataobj) == 1
    voxel_ml = float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0
    counts = np.bincount(connected(arr, connectivity=3).ravel())[1:]
    lesions = read_sr_lesion_volumes(sr_path)
    assert len(counts) >= 1 and lesions == {"brain": pytest.approx([c * voxel_ml for c in counts], abs=1e-5)}
    assert sum(lesions["brain"]) == pytest.approx(case["volumes_ml"]["brain"], abs=1e-4)

    ckpt["model_card"]["lesion_labels"] = ["tumour"]
    torch.save(ckpt, model)
    assert main(["predict", str(EXAMPLE_DICOM), "--out", str(tmp_path / "bad"), "--model", str(model), "--no-tta",
                 "--format", "seg,sr", "--no-audit", "--no-progress"]) != 0
    bad = json.loads((tmp_path / "bad" / "predictions.json").read_text())["cases"][0]
    assert bad["status"] == "failed" and "lesion_labels names ['tumour']" in bad["reason"]


def test_a_malformed_lesion_labels_entry_is_a_model_card_error():
    from resunet.errors import ModelError
    from resunet.io.dicom_codes import lesion_labels_from_model_card

    assert lesion_labels_from_model_card({"name": "m"}, ["brain"]) == ()
    assert lesion_labels_from_model_card({"lesion_labels": ["met", "met"]}, ["met", "edema"]) == ("met",)
    with pytest.raises(ModelError, match="must be a list of label names"):
        lesion_labels_from_model_card({"lesion_labels": "met"}, ["met"])
    with pytest.raises(ModelError, match=r"names \['tumour'\] but the model's labels are \['brain'\]"):
        lesion_labels_from_model_card({"lesion_labels": ["tumour"]}, ["brain"])
