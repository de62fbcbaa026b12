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
