"""RTSTRUCT: contours written for a DICOM series reference it and rasterise back onto the same voxels."""

from __future__ import annotations

import zipfile

import numpy as np
import pydicom
import pytest
from conftest import make_volume, oblique_affine
from pydicom.data import get_testdata_file

from resunet.errors import GeometryError, InputError
from resunet.evaluation.metrics import resample_nearest
from resunet.io import load_study, read_nifti, write_dicom_seg, write_dicom_series
from resunet.io.hashing import sha256_path
from resunet.io.rtstruct import RTSTRUCT_STORAGE, read_rtstruct, write_rtstruct

LPS = np.diag([-1.0, -1.0, 1.0])


def _check_points_on_slices(path, source):
    """Independent of read_rtstruct: every contour point lies in the plane of the image it references."""
    ds = pydicom.dcmread(path)
    files = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in dict.fromkeys(source.meta["dicom_files"])}
    n = 0
    for rc in ds.ROIContourSequence:
        for c in rc.get("ContourSequence", []):
            img = pydicom.dcmread(files[c.ContourImageSequence[0].ReferencedSOPInstanceUID], stop_before_pixels=True)
            iop = np.array(img.ImageOrientationPatient, dtype=float)
            normal = np.cross(iop[:3], iop[3:])
            pts = np.array(c.ContourData, dtype=float).reshape(-1, 3)
            assert np.allclose(pts @ normal, np.dot(np.array(img.ImagePositionPatient, dtype=float), normal), atol=1e-3)
            n += 1
    assert n > 0


def test_example_brain_mask_two_labels_round_trip(tmp_path, example_dir):
    src = load_study(example_dir / "colin27_t1_dicom")
    brain = np.asarray(resample_nearest(read_nifti(example_dir / "colin27_brainmask.nii.gz"), src).array) > 0
    labels = np.zeros(src.shape, np.uint8)
    half = src.shape[0] // 2
    labels[:half][brain[:half]] = 1
    labels[half:][brain[half:]] = 2
    mask = src.with_array(labels, is_label=True)
    before = sha256_path(example_dir / "colin27_t1_dicom")
    out = write_rtstruct(mask, src, tmp_path / "rs.dcm", {1: "left part", 2: "right part"},
                         algorithm_name="resunet test", model_sha256="ab" * 32)
    assert sha256_path(example_dir / "colin27_t1_dicom") == before  # sources never modified
    back = read_rtstruct(out, src)
    assert back.same_grid(src)
    assert back.meta["labels"] == {1: "left part", 2: "right part"}
    assert np.array_equal(np.asarray(back.array), labels)  # voxel for voxel

    ds = pydicom.dcmread(out)
    ref0 = pydicom.dcmread(src.meta["dicom_files"][0], stop_before_pixels=True)
    assert ds.SOPClassUID == RTSTRUCT_STORAGE and ds.Modality == "RTSTRUCT"
    assert ds.StudyInstanceUID == ref0.StudyInstanceUID and ds.PatientID == ref0.PatientID
    assert ds.PatientName == ref0.PatientName
    for_item = ds.ReferencedFrameOfReferenceSequence[0]
    assert for_item.FrameOfReferenceUID == ref0.FrameOfReferenceUID
    series = for_item.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == src.meta["series_uid"]
    assert len(series.ContourImageSequence) == src.shape[2]
    assert [r.ROIGenerationAlgorithm for r in ds.StructureSetROISequence] == ["AUTOMATIC"] * 2
    equipment = ds.ContributingEquipmentSequence[0]
    assert equipment.Manufacturer == "resunet" and "ab" * 32 in equipment.ContributionDescription
    _check_points_on_slices(out, src)


def test_oblique_series_with_a_hole(tmp_path):
    """Rotated axes and anisotropic spacing; label 2 sits in a hole of label 1 (a keyhole contour)."""
    vol = make_volume(shape=(40, 36, 7), affine=oblique_affine())
    write_dicom_series(vol, tmp_path / "s")
    src = load_study(tmp_path / "s")
    i, j = np.meshgrid(np.arange(40), np.arange(36), indexing="ij")
    r = np.hypot((i - 19.5) / 15.0, (j - 17.0) / 12.0)
    labels = np.zeros(src.shape, np.uint8)
    for k in range(1, 6):
        labels[:, :, k][r < 1.0] = 1
        labels[:, :, k][r < 0.45] = 2  # a hole in label 1, filled by label 2
    labels[0:6, 0:5, 6] = 1  # touches the border of the image
    mask = src.with_array(labels, is_label=True)
    out = write_rtstruct(mask, src, tmp_path / "rs.dcm", {1: "ring", 2: "core"})
    back = read_rtstruct(out, src)
    assert np.array_equal(np.asarray(back.array), labels)  # voxel for voxel, the empty slice too
    _check_points_on_slices(out, src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rs.dcm", "s"]  # nothing half-written


def test_anonymised_source_from_zip_lacking_type2_attributes(tmp_path):
    vol = make_volume(shape=(16, 16, 4))
    paths = write_dicom_series(vol, tmp_path / "s")
    for p in paths:  # an anonymiser that drops Type 2 patient/study attributes
        ds = pydicom.dcmread(p)
        for key in ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "AccessionNumber", "StudyID"):
            if key in ds:
                delattr(ds, key)
        ds.save_as(p)
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as zf:
        for p in paths:
            zf.write(p, f"x/{p.name}")
    src = load_study(tmp_path / "s.zip")  # headers kept, extracted files gone
    labels = np.zeros(src.shape, np.uint8)
    labels[3:12, 4:10, 1:3] = 1
    out = write_rtstruct(src.with_array(labels), src, tmp_path / "rs.dcm", {1: "tissue"})
    ds = pydicom.dcmread(out)
    assert ds.PatientName == "" and ds.StudyDate == "" and ds.PatientID == "RESUNET0001"
    assert np.array_equal(np.asarray(read_rtstruct(out, src).array), labels)


def test_multiframe_source(tmp_path):
    src = load_study(get_testdata_file("eCT_Supplemental.dcm"))  # frames stored in reverse k order
    arr = np.zeros(src.shape, dtype=np.uint8)
    arr[100:200, 50:120, 0] = 1
    out = write_rtstruct(src.with_array(arr), src, tmp_path / "rs.dcm", {1: "bone"})
    item = pydicom.dcmread(out).ROIContourSequence[0].ContourSequence[0].ContourImageSequence[0]
    assert int(item.ReferencedFrameNumber) == src.meta["frames"][0] + 1
    assert np.array_equal(read_rtstruct(out, src).array, arr)


def test_refusals(tmp_path, example_dir):
    write_dicom_series(make_volume(shape=(8, 8, 3)), tmp_path / "s")
    src = load_study(tmp_path / "s")
    other = make_volume(shape=(8, 8, 3), affine=oblique_affine())
    with pytest.raises(GeometryError, match="not on the source grid"):
        write_rtstruct(other.with_array(np.ones((8, 8, 3), np.uint8)), src, tmp_path / "x.dcm", {1: "a"})
    with pytest.raises(InputError, match="no name"):
        write_rtstruct(src.with_array(np.full((8, 8, 3), 3, np.uint8)), src, tmp_path / "x.dcm", {1: "a"})
    nifti = read_nifti(example_dir / "colin27_t1.nii.gz")
    with pytest.raises(InputError, match="DICOM"):
        write_rtstruct(nifti.with_array(np.zeros(nifti.shape, np.uint8)), nifti, tmp_path / "x.dcm", {1: "a"})
    seg = write_dicom_seg(src.with_array(np.zeros((8, 8, 3), np.uint8)), src, tmp_path / "seg.dcm", {1: "a"})
    with pytest.raises(InputError, match="not a DICOM RT Structure Set"):
        read_rtstruct(seg, src)
    assert not (tmp_path / "x.dcm").exists()


def test_seg_records_the_algorithm_ihe_ai_results(tmp_path):
    write_dicom_series(make_volume(shape=(8, 8, 3)), tmp_path / "s")
    src = load_study(tmp_path / "s")
    arr = np.zeros(src.shape, np.uint8)
    arr[2:5, 2:5, 1] = 1
    out = write_dicom_seg(src.with_array(arr), src, tmp_path / "seg.dcm", {1: "brain"},
                          algorithm_name="resunet tiny", algorithm_version="9.9", model_sha256="cd" * 32)
    ds = pydicom.dcmread(out)
    seg = ds.SegmentSequence[0]
    assert seg.SegmentAlgorithmType == "AUTOMATIC" and seg.SegmentAlgorithmName == "resunet tiny"
    alg = seg.SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName == "resunet tiny" and alg.AlgorithmVersion == "9.9" and "cd" * 32 in alg.AlgorithmParameters
    eq = ds.ContributingEquipmentSequence[0]
    assert eq.Manufacturer == "resunet" and eq.ManufacturerModelName == "resunet tiny" and eq.SoftwareVersions == "9.9"
    assert eq.PurposeOfReferenceCodeSequence[0].CodeValue == "109102" and "cd" * 32 in eq.ContributionDescription


def test_predict_format_rtstruct_matches_the_nifti_mask(tmp_path, example_dir):
    from test_app_support import make_tiny_model

    from resunet.cli import main

    model = make_tiny_model(tmp_path / "tiny.pt", all_foreground=True)
    rc = main(["predict", str(example_dir / "colin27_t1_dicom"), "--out", str(tmp_path / "out"), "--model", str(model),
               "--format", "nifti,rtstruct", "--no-tta", "--no-audit", "--no-progress"])
    assert rc == 0
    src = load_study(example_dir / "colin27_t1_dicom")
    mask = np.asarray(read_nifti(tmp_path / "out" / "colin27_t1_dicom.nii.gz").array)
    back = read_rtstruct(tmp_path / "out" / "colin27_t1_dicom.rtstruct.dcm", src)
    assert mask.any() and np.array_equal(np.asarray(back.array), mask)
    ds = pydicom.dcmread(tmp_path / "out" / "colin27_t1_dicom.rtstruct.dcm", stop_before_pixels=True)
    assert ds.StructureSetROISequence[0].ROIName == "brain"
    assert ds.ContributingEquipmentSequence[0].ManufacturerModelName.startswith("resunet ")
