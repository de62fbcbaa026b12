"""NIfTI reading/writing: bit-exact round trips, nibabel's own test files, label-map masks."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_volume, oblique_affine
from nibabel.testing import data_path

from resunet.errors import InputError
from resunet.io import load_study, read_nifti, write_mask_nifti, write_nifti

NIB = Path(data_path)


@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32", "int32"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_is_bit_exact(tmp_path, dtype, suffix):
    vol = make_volume(dtype=dtype, affine=oblique_affine())
    out = write_nifti(vol, tmp_path / f"v{suffix}")
    back = read_nifti(out)
    assert back.array.dtype == np.dtype(dtype)
    assert np.array_equal(back.array, vol.array)
    # NIfTI-1 stores the sform as float32: a float64 affine is rounded once, to < 1e-5 mm here
    assert np.allclose(back.affine, vol.affine, atol=1e-5)
    assert np.array_equal(back.affine, vol.affine.astype(np.float32).astype(np.float64))
    # NIfTI -> NIfTI: bit-exact in data and affine
    again = read_nifti(write_nifti(back, tmp_path / f"w{suffix}"))
    assert np.array_equal(again.array, back.array) and again.array.dtype == back.array.dtype
    assert np.array_equal(again.affine, back.affine)


def test_nifti_written_by_nibabel_reads_with_sform(tmp_path):
    # sform and qform disagree: nibabel (and we) use the sform when its code is > 0
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    sform = np.diag([-1.5, 2.0, 3.0, 1.0])
    sform[:3, 3] = (5, 6, 7)
    img = nib.Nifti1Image(arr, sform)
    img.set_qform(np.eye(4), code=1)
    img.set_sform(sform, code=2)
    nib.save(img, tmp_path / "a.nii.gz")
    vol = load_study(tmp_path / "a.nii.gz")
    assert np.array_equal(vol.affine, sform)
    assert vol.orientation == "LAS"
    assert np.array_equal(vol.array, arr)


def test_nibabel_big_endian_las_file_round_trip(tmp_path):
    src = NIB / "anatomical.nii"  # big-endian int16, LAS
    img = nib.load(src)
    vol = read_nifti(src)
    assert vol.orientation == "LAS"
    assert np.array_equal(vol.array, np.asanyarray(img.dataobj))
    assert np.array_equal(vol.affine, img.affine)
    back = nib.load(write_nifti(vol, tmp_path / "anat.nii.gz"))
    assert np.array_equal(np.asanyarray(back.dataobj), np.asanyarray(img.dataobj))
    assert np.array_equal(back.affine, img.affine)
    assert int(back.header["sform_code"]) == int(img.header["sform_code"]) or int(img.header["sform_code"]) == 0


def test_nifti2_file(tmp_path):
    # nibabel's NIfTI-2 example is 4D with 2 volumes: refused with advice; its first volume reads
    with pytest.raises(InputError, match=r"4D with 2 volumes.*extract one 3D volume"):
        read_nifti(NIB / "example_nifti2.nii.gz")
    img = nib.load(NIB / "example_nifti2.nii.gz")
    first = nib.Nifti2Image(np.asanyarray(img.dataobj)[..., 0], img.affine, img.header)
    nib.save(first, tmp_path / "n2.nii.gz")
    vol = read_nifti(tmp_path / "n2.nii.gz")
    assert isinstance(nib.load(tmp_path / "n2.nii.gz"), nib.Nifti2Image)
    assert np.array_equal(vol.array, np.asanyarray(img.dataobj)[..., 0])
    assert np.allclose(vol.affine, img.affine)
    out = nib.load(write_nifti(vol, tmp_path / "out.nii.gz"))
    assert np.array_equal(np.asanyarray(out.dataobj), vol.array) and np.allclose(out.affine, img.affine)


def test_4d_with_one_volume_is_squeezed(tmp_path):
    arr = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5, 1)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "one.nii.gz")
    assert read_nifti(tmp_path / "one.nii.gz").shape == (3, 4, 5)


def test_scaled_nifti_reads_as_float(tmp_path):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(arr, np.eye(4))
    img.header.set_slope_inter(0.5, -3.0)
    nib.save(img, tmp_path / "s.nii")
    vol = read_nifti(tmp_path / "s.nii")
    assert vol.array.dtype == np.float32
    assert np.allclose(vol.array, arr * 0.5 - 3.0)


def test_nan_voxels_warn_and_become_zero(tmp_path, caplog):
    arr = np.ones((3, 3, 3), dtype=np.float32)
    arr[0, 0, 0] = np.nan
    arr[1, 1, 1] = np.inf
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "nan.nii.gz")
    with caplog.at_level(logging.WARNING):
        vol = read_nifti(tmp_path / "nan.nii.gz")
    assert vol.array[0, 0, 0] == 0 and vol.array[1, 1, 1] == 0 and vol.array[2, 2, 2] == 1
    assert vol.meta["nonfinite_voxels"] == 2
    assert "2 NaN/inf voxels set to 0" in caplog.text


def test_mask_nifti_has_input_grid_and_label_intent(tmp_path):
    scan = read_nifti(NIB / "anatomical.nii")
    labels = (scan.array > np.median(scan.array)).astype(np.int64)
    out = write_mask_nifti(scan.with_array(labels), tmp_path / "mask.nii.gz")
    img = nib.load(out)
    assert img.shape == scan.shape
    assert np.array_equal(img.affine, scan.affine)
    assert img.get_data_dtype() == np.uint8
    assert img.header.get_intent()[0] == "label"
    assert int(img.header["sform_code"]) == int(scan.meta["nifti_header"]["sform_code"])
    assert int(img.header["qform_code"]) == int(scan.meta["nifti_header"]["qform_code"])
    assert np.array_equal(np.asanyarray(img.dataobj), labels)
    # read back, it is known as a label map; an image written on its header is not
    mask = read_nifti(out)
    assert mask.meta["is_label"] and not scan.meta["is_label"]
    assert nib.load(write_nifti(mask, tmp_path / "again.nii.gz")).header.get_intent()[0] == "label"
    img2 = nib.load(write_nifti(mask.with_array(scan.array, is_label=False), tmp_path / "img.nii.gz"))
    assert img2.header.get_intent()[0] == "none"


def test_mask_nifti_uint16_and_refusals(tmp_path):
    vol = make_volume(shape=(4, 4, 4), dtype="int32")
    many = vol.with_array(np.full((4, 4, 4), 300, dtype=np.int32))
    assert nib.load(write_mask_nifti(many, tmp_path / "m.nii.gz")).get_data_dtype() == np.uint16
    with pytest.raises(InputError, match="negative"):
        write_mask_nifti(vol.with_array(np.full((4, 4, 4), -1, dtype=np.int32)), tmp_path / "neg.nii.gz")
    with pytest.raises(InputError, match="whole numbers"):
        write_mask_nifti(vol.with_array(np.full((4, 4, 4), 0.5, dtype=np.float32)), tmp_path / "f.nii.gz")
    assert not (tmp_path / "neg.nii.gz").exists() and not (tmp_path / "f.nii.gz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nii.gz"]  # no temp files left


def test_example_study_files(example_dir):
    t1 = read_nifti(example_dir / "colin27_t1.nii.gz")
    mask = read_nifti(example_dir / "colin27_brainmask.nii.gz")
    assert t1.shape == mask.shape == (91, 109, 91)
    assert t1.same_grid(mask) and t1.orientation == "RAS" and t1.spacing == (2.0, 2.0, 2.0)
    assert set(np.unique(mask.array)) == {0, 1}
    brain_ml = mask.array.sum() * mask.voxel_volume_ml
    assert 1400 < brain_ml < 1900  # Colin27 brain (MNI-sized), mL
    # the brain is brighter than the background outside the head on T1
    assert t1.array[mask.array == 1].mean() > 3 * t1.array[:5, :5, :5].mean() + 10
    dicom = load_study(example_dir / "colin27_t1_dicom")
    assert dicom.same_grid(t1, atol=1e-6) and np.array_equal(dicom.array, t1.array)
