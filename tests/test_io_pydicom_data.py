"""Real DICOM files nobody here wrote (pydicom + pydicom-data test files) against SimpleITK.

Every transfer syntax pydicom decodes is covered by at least one file. bench/io_pydicom_data.py
runs the same comparison over every file and writes the table in docs/io.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from io_helpers import compare_with_sitk
from pydicom.data import get_testdata_file

from resunet.errors import GeometryError, InputError
from resunet.io import list_series, load_study
from resunet.io.dicom import read_series

# file -> largest allowed voxel difference (decoders of lossy JPEG round the IDCT differently)
MATCH_SITK = {
    "CT_small.dcm": 0,  # explicit VR little endian, CT with rescale
    "MR_small.dcm": 0,
    "MR_small_implicit.dcm": 0,
    "MR_small_bigendian.dcm": 0,  # explicit VR big endian
    "MR_small_RLE.dcm": 0,
    "MR_small_jp2klossless.dcm": 0,  # JPEG 2000 lossless
    "MR_small_jpeg_ls_lossless.dcm": 0,  # JPEG-LS lossless
    "JPEGLSNearLossless_16.dcm": 0,  # JPEG-LS near-lossless
    "JPEG-LL.dcm": 0,  # JPEG lossless process 14 SV1
    "JPEG2000.dcm": 0,  # JPEG 2000
    # JPEG extended 12-bit (lossy) through libjpeg-turbo: the same IDCT as GDCM's, so the same values
    # (pylibjpeg-libjpeg, the plugin before imagecodecs took 12-bit, differed by 1 in ~1% of pixels)
    "JPGExtended.dcm": 0,
    "JPEG-lossy.dcm": 0,  # a 12-bit scan header that breaks the standard: libjpeg-turbo and GDCM tolerate it
    "image_dfl.dcm": 0,  # deflated explicit VR little endian
    "MR2_J2KR.dcm": 0,  # float rescale
    "eCT_Supplemental.dcm": 0,  # enhanced CT multi-frame
    "rtdose.dcm": 0,  # classic multi-frame with GridFrameOffsetVector (values scaled by DoseGridScaling)
    "rtdose_rle.dcm": 0,
}


@pytest.mark.parametrize("name", sorted(MATCH_SITK))
def test_same_voxels_and_geometry_as_simpleitk(name):
    path = get_testdata_file(name)
    vol = load_study(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    scale = float(ds.DoseGridScaling) if ds.get("Modality") == "RTDOSE" else 1.0
    same, dist, note = compare_with_sitk(vol, sitk.ReadImage(path), scale=scale, max_abs_diff=MATCH_SITK[name])
    assert same, f"{name}: voxels differ from SimpleITK ({note})"
    assert dist < 1e-3, f"{name}: corners {dist} mm apart"


def test_big_endian_rtdose_equals_little_endian_one():
    # SimpleITK (GDCM) misreads this big-endian 32-bit dose grid; ours equals the little-endian file
    a = load_study(get_testdata_file("rtdose_expb.dcm"))
    b = load_study(get_testdata_file("rtdose.dcm"))
    assert np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine)


def test_enhanced_mr_without_positions_reads_frames_in_file_order():
    # emri_small has no functional groups at all: no patient geometry; frames in file order,
    # SpacingBetweenSlices (1.2 mm) kept (SimpleITK uses 1 mm), flagged as unknown geometry
    variants = ["emri_small.dcm", "emri_small_big_endian.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm"]
    vols = [load_study(get_testdata_file(n)) for n in variants]
    ref = sitk.GetArrayFromImage(sitk.ReadImage(get_testdata_file("emri_small.dcm"))).transpose(2, 1, 0)
    for v in vols:
        assert v.meta["geometry"] == "unknown" and v.shape == (64, 64, 10)
        assert np.array_equal(v.array, ref)
        assert np.isclose(v.spacing[2], 1.2)


def test_dicomdir_test_folder_mixed_series():
    folder = Path(get_testdata_file("DICOMDIR")).parent
    # five CT slices of one series, among CR, MR and stub files in nested folders
    ct = load_study(folder / "98892001" / "CT5N")
    assert ct.shape == (16, 16, 5) and ct.meta["modality"] == "CT"
    # real data with slices removed from the series: refused, not stacked with a wrong spacing
    with pytest.raises(GeometryError, match="uneven slice spacing: gap of 202.5 mm"):
        load_study(folder / "77654033" / "CT2")
    with pytest.raises(InputError, match=r"no image series, only .*truncated or empty images \(no pixel data\) \(52 files.* 50 truncated"):
        load_study(folder / "TINY_ALPHA")


@pytest.mark.parametrize(
    "name, message",
    [
        ("SC_rgb.dcm", "is a colour image \\(RGB"),
        ("examples_palette.dcm", "is a colour image \\(PALETTE COLOR"),
        ("liver.dcm", "only Segmentation \\(SEG\\) \\(1 files"),
        ("test-SR.dcm", "only Structured Report \\(SR\\) \\(1 files"),
        ("rtstruct.dcm", "only RT Structure Set \\(1 files"),
        ("waveform_ecg.dcm", "only Waveform \\(1 files"),
        ("MR_truncated.dcm", "pixel data cannot be decoded .* less than expected"),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", "ends early"),
        ("JPEG2000-embedded-sequence-delimiter.dcm", "pixel data cannot be decoded \\(transfer syntax JPEG 2000"),
        ("no_meta.dcm", "not a DICOM file"),
    ],
)
def test_refused_files_say_why(name, message):
    with pytest.raises(InputError, match=message):
        load_study(get_testdata_file(name))


def test_every_series_in_dicomdirtests_matches_simpleitk_series_reader():
    folder = Path(get_testdata_file("DICOMDIR")).parent
    compared = 0
    for info in list_series(folder):
        try:
            vol = read_series(info)  # what load_study(folder, series_uid=info.uid) reads, without rescanning
        except GeometryError:
            continue  # the CT2 series with slices removed (tested above)
        parents = {str(Path(f).parent) for f in info.files}
        if "#" in info.uid or len(parents) > 1:
            files = info.files  # a split series: SimpleITK's reader gets exactly this stack
        else:  # GDCM's own grouping and ordering
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(parents.pop(), info.uid)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(list(files))
        same, dist, note = compare_with_sitk(vol, reader.Execute())
        assert same and dist < 1e-3, f"{info.describe()}: {note} {dist}"
        compared += 1
    assert compared >= 20


def test_dicomdir_file_reads_its_folder():
    dicomdir = Path(get_testdata_file("DICOMDIR"))
    assert load_study(dicomdir).shape == load_study(dicomdir.parent).shape == (16, 16, 5)
    assert len(list_series(dicomdir)) == len(list_series(dicomdir.parent))
