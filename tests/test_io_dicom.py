"""DICOM series read/write geometry on series we write ourselves with known truth."""

from __future__ import annotations

import logging
import random
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import make_volume, oblique_affine
from io_helpers import compare_with_sitk
from pydicom.data import get_testdata_file

from resunet.errors import GeometryError, InputError
from resunet.io import list_series, load_study, write_dicom_series
from resunet.io.volume import Volume


def _axial(sign=(1, 1, 1)) -> np.ndarray:
    aff = np.diag([0.8 * sign[0], 0.9 * sign[1], 2.5 * sign[2], 1.0])
    aff[:3, 3] = (-10.0, 20.0, 30.0)
    return aff


def _flip_k(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels indexed with k reversed, and the matching affine."""
    flip = np.eye(4)
    flip[2, 2] = -1
    flip[2, 3] = vol.shape[2] - 1
    return np.flip(vol.array, axis=2), vol.affine @ flip


@pytest.mark.parametrize(
    "affine",
    [_axial(), _axial((-1, -1, 1)), oblique_affine(), _axial((1, -1, 1)), oblique_affine(angles_deg=(90, 0, 0))],
    ids=["RAS", "LPS", "oblique", "RPS", "coronal"],
)
def test_series_round_trip_geometry(tmp_path, affine):
    vol = make_volume(affine=affine)
    write_dicom_series(vol, tmp_path / "s")
    back = load_study(tmp_path / "s")
    assert back.meta["format"] == "dicom" and back.meta["modality"] == "MR"
    assert back.array.dtype == np.int16
    # the reader indexes k along +(row x column direction): a left-handed grid comes back k-reversed
    arr, aff = (vol.array, vol.affine) if np.linalg.det(affine[:3, :3]) > 0 else _flip_k(vol)
    assert np.array_equal(back.array, arr)
    assert np.allclose(back.affine, aff, atol=1e-6)


def test_k_axis_against_the_normal_reads_in_ascending_order(tmp_path):
    vol = make_volume(affine=_axial((1, 1, -1)))
    write_dicom_series(vol, tmp_path / "s")
    back = load_study(tmp_path / "s")
    arr, aff = _flip_k(vol)
    assert np.array_equal(back.array, arr) and np.allclose(back.affine, aff, atol=1e-6)
    # same voxel, same place: voxel (1, 2, 0) written is voxel (1, 2, K-1) read
    assert back.array[1, 2, -1] == vol.array[1, 2, 0]
    assert np.allclose(back.affine @ [1, 2, vol.shape[2] - 1, 1], vol.affine @ [1, 2, 0, 1])


def test_shuffled_names_nested_folders_and_junk_files(tmp_path, caplog):
    vol = make_volume(affine=oblique_affine())
    rng = random.Random(3)
    names = [f"{rng.choice('abc')}/{rng.choice('xy')}/{rng.getrandbits(40):x}" for _ in range(vol.shape[2])]
    write_dicom_series(vol, tmp_path / "study", file_names=names)
    (tmp_path / "study" / "notes.txt").write_text("not dicom")
    (tmp_path / "study" / "a" / "README").write_bytes(b"\x00" * 300)
    shutil.copy(get_testdata_file("test-SR.dcm"), tmp_path / "study" / "report.dcm")
    with caplog.at_level(logging.INFO):
        back = load_study(tmp_path / "study")
    assert np.array_equal(back.array, vol.array) and np.allclose(back.affine, vol.affine, atol=1e-6)
    assert "2 not DICOM" in caplog.text and "1 Structured Report (SR)" in caplog.text
    # slice order follows position, not names: dicom_files[k] is slice k
    for k, f in enumerate(back.meta["dicom_files"]):
        assert np.allclose(pydicom.dcmread(f).pixel_array.T, vol.array[:, :, k])


def test_matches_simpleitk_on_oblique_series(tmp_path):
    vol = make_volume(affine=oblique_affine())
    write_dicom_series(vol, tmp_path / "s")
    ours = load_study(tmp_path / "s")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "s"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    same, dist, _ = compare_with_sitk(ours, reader.Execute())
    assert same and dist < 1e-3


def test_float_data_use_rescale_slope_intercept(tmp_path):
    vol = make_volume(dtype="float32", affine=_axial())
    write_dicom_series(vol, tmp_path / "s", modality="CT")
    ds = pydicom.dcmread(next((tmp_path / "s").iterdir()))
    slope = float(ds.RescaleSlope)
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and slope != 1.0
    back = load_study(tmp_path / "s")
    assert back.array.dtype == np.float32
    assert np.max(np.abs(back.array - vol.array)) <= slope / 2 + 1e-4


def test_integer_intercept_stays_integer(tmp_path):
    hu = make_volume(dtype="int16", affine=_axial())
    write_dicom_series(hu, tmp_path / "s", modality="CT")
    for f in (tmp_path / "s").iterdir():  # store HU + 1024 with intercept -1024, as CT scanners do
        ds = pydicom.dcmread(f)
        ds.PixelData = (ds.pixel_array.astype(np.int16) + 1024).astype("<i2").tobytes()
        ds.RescaleIntercept = "-1024"
        ds.save_as(f)
    back = load_study(tmp_path / "s")
    assert back.array.dtype == np.int16 and np.array_equal(back.array, hu.array)


@pytest.mark.parametrize("per_slice", [False, True])
def test_rescale_over_many_slices_equals_pydicom_per_file(tmp_path, per_slice):
    """40 slices: the range check and the rescale run in chunks of 16 slices in threads; every slice
    must get its own file's slope and intercept (pydicom's modality LUT as the reference)."""
    def edit(ds, k):
        ds.RescaleSlope = str(1 + (k % 3) if per_slice else 2)
        ds.RescaleIntercept = str(-1024 - 7 * k if per_slice else -1024)

    expected = _edited_ct_series(tmp_path / "s", 40, edit)
    back = load_study(tmp_path / "s")
    assert np.issubdtype(back.array.dtype, np.integer)  # whole slopes and intercepts stay integers
    _assert_equals_per_file(back, expected)


def _edited_ct_series(folder, n_slices: int, edit) -> dict:
    """A 6x5 CT series of ``n_slices`` uint16 slices in ``folder``, each file then changed by
    ``edit(ds, InstanceNumber)`` and saved; returns pydicom's modality LUT of each file, by InstanceNumber."""
    from pydicom.pixels import apply_modality_lut

    write_dicom_series(make_volume(shape=(6, 5, n_slices), dtype="uint16", affine=_axial()), folder, modality="CT")
    expected = {}
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        k = int(ds.InstanceNumber)
        edit(ds, k)
        ds.save_as(f)
        expected[k] = apply_modality_lut(pydicom.dcmread(f).pixel_array, ds)
    return expected


def _assert_equals_per_file(back, expected: dict) -> None:
    """``back`` (a loaded series) holds ``expected[InstanceNumber]`` as slice k, in slice order."""
    ref = np.stack([expected[k] for k in sorted(expected)])  # (K, rows, cols)
    ours = np.transpose(back.array, (2, 1, 0))
    if back.affine[2, 2] < 0:
        ours = ours[::-1]
    assert np.array_equal(ours.astype(np.float64), ref.astype(np.float64))


@pytest.mark.parametrize(("slope", "intercept", "kind"), [("8", "-1024", "i"), ("3", "-200", "i"), ("0.5", "-3", "f")])
def test_8bit_stored_values_are_read_into_the_rescaled_type_and_equal_pydicom(tmp_path, slope, intercept, kind):
    """8-bit stored values (JPEG baseline CT) with whole slopes and intercepts are read straight into
    the integer type of the rescaled range and rescaled in place; a fractional slope ends in float32.
    Every voxel must equal pydicom's modality LUT of its own file."""
    def edit(ds, k):
        stored = ((ds.pixel_array.astype(np.int64) * 37 + 11 * k) % 256).astype(np.uint8)
        stored[0, 0] = 255  # the top of the 8-bit range: 255 x 8 - 1024 does not fit 8 bits
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = stored.tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept

    expected = _edited_ct_series(tmp_path / "s", 20, edit)
    back = load_study(tmp_path / "s")
    assert back.array.dtype.kind == kind and back.array.dtype.itemsize > 1
    _assert_equals_per_file(back, expected)


def test_monochrome1_is_inverted(tmp_path):
    vol = make_volume(dtype="uint16", affine=_axial())
    write_dicom_series(vol, tmp_path / "s")
    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(f)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(f)
    back = load_study(tmp_path / "s")
    assert np.array_equal(back.array.astype(np.int64), 65535 - vol.array.astype(np.int64))


def _positions(folder):
    return sorted(folder.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))


def test_missing_slice_is_refused(tmp_path):
    write_dicom_series(make_volume(affine=_axial()), tmp_path / "s")
    _positions(tmp_path / "s")[3].unlink()
    with pytest.raises(GeometryError, match=r"uneven slice spacing: gap of 5 mm .* where the others are 2.5 mm"):
        load_study(tmp_path / "s")


def test_gantry_tilt_is_refused(tmp_path):
    write_dicom_series(make_volume(affine=_axial()), tmp_path / "s")
    for f in (tmp_path / "s").iterdir():  # shift each slice along y by z * tan(15 deg)
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + (z - 30.0) * np.tan(np.radians(15)), z]
        ds.save_as(f)
    with pytest.raises(GeometryError, match=r"gantry tilt .*about 15.00 deg"):
        load_study(tmp_path / "s")


def test_two_images_at_one_position_are_refused(tmp_path):
    write_dicom_series(make_volume(affine=_axial()), tmp_path / "s")
    write_dicom_series(
        make_volume(affine=_axial(), seed=1),
        tmp_path / "s",
        series_uid=pydicom.dcmread(next((tmp_path / "s").iterdir())).SeriesInstanceUID,
        file_names=[f"echo2_{k}.dcm" for k in range(6)],
    )
    with pytest.raises(GeometryError, match="two images at the same position"):
        load_study(tmp_path / "s")


def test_several_series_pick_most_slices_and_series_option(tmp_path, caplog):
    big = make_volume(shape=(8, 6, 7), affine=_axial())
    small = make_volume(shape=(8, 6, 3), affine=oblique_affine(), seed=2)
    write_dicom_series(big, tmp_path / "study" / "one", series_description="big")
    write_dicom_series(small, tmp_path / "study" / "two", series_description="small", modality="CT")
    found = list_series(tmp_path / "study")
    assert [(s.description, s.n_slices, s.rows, s.cols) for s in found] == [("big", 7, 6, 8), ("small", 3, 6, 8)]
    with caplog.at_level(logging.INFO):
        vol = load_study(tmp_path / "study")
    assert np.array_equal(vol.array, big.array)
    assert "the one with the most slices" in caplog.text and "also found 1 other series" in caplog.text
    assert "small" in caplog.text
    other = load_study(tmp_path / "study", series_uid=found[1].uid)
    assert np.array_equal(other.array, small.array) and other.meta["modality"] == "CT"
    with pytest.raises(InputError, match="no image series 1.2.3; found: .*big"):
        load_study(tmp_path / "study", series_uid="1.2.3")


def test_one_series_uid_with_two_orientations_is_split(tmp_path):
    ax = make_volume(shape=(8, 6, 5), affine=_axial())
    ob = make_volume(shape=(8, 6, 3), affine=oblique_affine(), seed=4)
    paths = write_dicom_series(ax, tmp_path / "s")
    uid = pydicom.dcmread(paths[0]).SeriesInstanceUID
    write_dicom_series(ob, tmp_path / "s", series_uid=uid, file_names=[f"ob{k}.dcm" for k in range(3)])
    found = list_series(tmp_path / "s")
    assert [s.uid for s in found] == [f"{uid}#1", f"{uid}#2"] and [s.n_slices for s in found] == [5, 3]
    assert np.array_equal(load_study(tmp_path / "s").array, ax.array)
    assert np.array_equal(load_study(tmp_path / "s", series_uid=f"{uid}#2").array, ob.array)


def test_writer_refuses_sheared_grid(tmp_path):
    aff = _axial()
    aff[0, 2] = 1.0  # k axis not perpendicular to the slice plane
    with pytest.raises(GeometryError, match="not orthogonal"):
        write_dicom_series(make_volume(affine=aff), tmp_path / "s")
    assert not list((tmp_path / "s").iterdir())


def test_single_multiframe_file_and_enhanced_ct():
    # enhanced CT (PerFrame/Shared functional groups): same grid and voxels as SimpleITK
    path = get_testdata_file("eCT_Supplemental.dcm")
    vol = load_study(path)
    same, dist, _ = compare_with_sitk(vol, sitk.ReadImage(path))
    assert vol.shape == (512, 512, 2) and same and dist < 1e-3
    # frames are stored in descending position in the file; we index k along +normal
    assert vol.meta["frames"] == [1, 0]


def test_duplicate_copies_and_orientation_noise(tmp_path, caplog):
    vol = make_volume(affine=_axial())
    paths = write_dicom_series(vol, tmp_path / "s" / "a")
    (tmp_path / "s" / "copy").mkdir()
    for p in paths[:3]:  # the same images exported twice
        shutil.copy(p, tmp_path / "s" / "copy" / p.name)
    for i, p in enumerate(paths):  # IOP noise around a 3-decimal rounding boundary
        ds = pydicom.dcmread(p)
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0004 if i % 2 else 0.0006]
        ds.save_as(p)
    with caplog.at_level(logging.INFO):
        back = load_study(tmp_path / "s")
    assert len(list_series(tmp_path / "s")) == 1
    assert np.array_equal(back.array, vol.array)
    assert "read 6 files of series" in caplog.text
    assert "left aside 3 of 9 files: 3 duplicate copies of images already read (same SOP Instance UID)" in caplog.text


def test_folder_of_nifti_files_says_pass_the_file(tmp_path):
    from resunet.io import write_nifti

    write_nifti(make_volume(), tmp_path / "d" / "t1.nii.gz")
    with pytest.raises(InputError, match=r"no DICOM images here, but NIfTI files \(t1.nii.gz\)"):
        load_study(tmp_path / "d")


def test_zipped_nifti_is_read(tmp_path):
    import zipfile

    from resunet.io import write_nifti

    vol = make_volume(affine=oblique_affine())
    write_nifti(vol, tmp_path / "t1.nii.gz")
    with zipfile.ZipFile(tmp_path / "up.zip", "w") as zf:
        zf.write(tmp_path / "t1.nii.gz", "case/t1.nii.gz")
    back = load_study(tmp_path / "up.zip")
    assert np.array_equal(back.array, vol.array) and back.meta["source"].endswith("up.zip:case/t1.nii.gz")


def test_example_dicom_series_matches_simpleitk(example_dir):
    ours = load_study(example_dir / "colin27_t1_dicom")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(example_dir / "colin27_t1_dicom")))
    same, dist, _ = compare_with_sitk(ours, reader.Execute())
    assert same and dist < 1e-3


def test_convert_cli_lists_and_picks_series(tmp_path, capsys):
    import nibabel as nib

    from resunet.cli import main

    big = make_volume(shape=(8, 6, 5), affine=_axial())
    small = make_volume(shape=(8, 6, 3), affine=oblique_affine(), seed=2)
    write_dicom_series(big, tmp_path / "st" / "a", series_description="big")
    write_dicom_series(small, tmp_path / "st" / "b", series_description="small")
    assert main(["convert", "--list", str(tmp_path / "st")]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 2 and "'big', 5 slices of 6x8" in listed[0] and "'small', 3 slices" in listed[1]
    uid_small = listed[1].split(" ")[0]
    assert main(["convert", str(tmp_path / "st"), str(tmp_path / "o.nii.gz"), "--series", uid_small]) == 0
    assert f"from series {uid_small}" in capsys.readouterr().out
    img = nib.load(tmp_path / "o.nii.gz")
    assert np.array_equal(np.asanyarray(img.dataobj), small.array)
    assert np.allclose(img.affine, small.affine, atol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_enhanced_mr_from_highdicom_legacy_conversion(tmp_path):
    """An enhanced (multi-frame) MR made by highdicom from our oblique series reads onto the same
    grid as the single-frame series, and matches SimpleITK."""
    import highdicom as hd

    vol = make_volume(affine=oblique_affine())
    paths = write_dicom_series(vol, tmp_path / "s")
    rng = random.Random(1)
    datasets = [pydicom.dcmread(p) for p in paths]
    rng.shuffle(datasets)  # highdicom orders the frames itself (here: descending along the normal)
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=datasets, series_instance_uid=hd.UID(), series_number=5, sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    mf.save_as(tmp_path / "enhanced.dcm")
    back = load_study(tmp_path / "enhanced.dcm")
    assert np.array_equal(back.array, vol.array) and np.allclose(back.affine, vol.affine, atol=1e-6)
    assert sorted(back.meta["frames"]) == list(range(vol.shape[2])) and back.meta["frames"] != list(range(6))
    same, dist, _ = compare_with_sitk(back, sitk.ReadImage(str(tmp_path / "enhanced.dcm")))
    assert same and dist < 1e-3


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_multiframe_file_with_two_echoes_is_refused_with_advice(tmp_path):
    import highdicom as hd

    first = write_dicom_series(make_volume(affine=_axial()), tmp_path / "s")
    ds0 = pydicom.dcmread(first[0])
    second = write_dicom_series(
        make_volume(affine=_axial(), seed=3), tmp_path / "s", series_uid=ds0.SeriesInstanceUID,
        study_uid=ds0.StudyInstanceUID, frame_of_reference_uid=ds0.FrameOfReferenceUID,
        file_names=[f"echo2_{k}.dcm" for k in range(6)],
    )
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=[pydicom.dcmread(p) for p in first + second], series_instance_uid=hd.UID(),
        series_number=5, sop_instance_uid=hd.UID(), instance_number=1,
    )
    mf.save_as(tmp_path / "two_echoes.dcm")
    with pytest.raises(GeometryError, match="multi-frame file holds several stacks .* split it first"):
        load_study(tmp_path / "two_echoes.dcm")


def test_writer_reproducible_uids(tmp_path):
    import datetime

    from resunet.io import sha256_path

    vol = make_volume(shape=(6, 5, 3))
    kw = dict(study_uid="1.2.3.4", series_uid="1.2.3.4.1", frame_of_reference_uid="1.2.3.4.2",
              sop_instance_uid_root="1.2.3.4.1.1", date_time=datetime.datetime(2020, 1, 2, 3, 4, 5))
    paths = write_dicom_series(vol, tmp_path / "a", **kw)
    write_dicom_series(vol, tmp_path / "b", **kw)
    assert sha256_path(tmp_path / "a") == sha256_path(tmp_path / "b")
    ds = pydicom.dcmread(paths[2])
    assert ds.SOPInstanceUID == "1.2.3.4.1.1.3" and ds.StudyDate == "20200102" and ds.SeriesInstanceUID == "1.2.3.4.1"
