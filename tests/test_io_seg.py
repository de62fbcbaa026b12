"""DICOM SEG (highdicom): written for a series, it references it and reads back onto the same voxels."""

from __future__ import annotations

import random
import zipfile

import highdicom as hd
import numpy as np
import pytest
from conftest import make_volume, oblique_affine
from pydicom.data import get_testdata_file

from resunet.errors import GeometryError, InputError
from resunet.io import load_study, read_dicom_seg, read_nifti, write_dicom_seg, write_dicom_series

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _labels_for(vol):
    arr = np.zeros(vol.shape, dtype=np.uint8)
    arr[2:6, 3:7, 1:4] = 1
    arr[7:10, 1:4, 2:5] = 2
    return vol.with_array(arr, is_label=True)


def _check_with_highdicom_geometry(seg_path, source, mask):
    """Independent of our reader: highdicom's own volume geometry puts each segment voxel on ours."""
    seg_vol = hd.seg.segread(str(seg_path)).get_volume(combine_segments=True)
    idx = np.argwhere(seg_vol.array > 0)  # (slice, row, column)
    world = seg_vol.affine @ np.c_[idx, np.ones(len(idx))].T  # LPS mm
    ours = np.linalg.solve(RAS_FROM_LPS @ source.affine, world)[:3].T
    ijk = np.round(ours).astype(int)
    assert np.allclose(ours, ijk, atol=1e-3)
    assert len(idx) == int((mask.array > 0).sum())
    assert np.array_equal(mask.array[tuple(ijk.T)], seg_vol.array[tuple(idx.T)])


def test_seg_round_trip_on_oblique_series_with_shuffled_names(tmp_path):
    vol = make_volume(shape=(12, 10, 6), affine=oblique_affine())
    rng = random.Random(7)
    write_dicom_series(vol, tmp_path / "s", file_names=[f"{rng.getrandbits(32):08x}" for _ in range(6)])
    src = load_study(tmp_path / "s")
    mask = _labels_for(src)
    out = write_dicom_seg(mask, src, tmp_path / "seg.dcm", {1: "brain", 2: "liver"})
    seg = hd.seg.segread(str(out))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.meta["series_uid"]
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["brain", "liver"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "12738006"  # SCT Brain
    back = read_dicom_seg(out, src)
    assert back.same_grid(src) and np.array_equal(back.array, mask.array)
    assert back.meta["labels"] == {1: "brain", 2: "liver"}
    _check_with_highdicom_geometry(out, src, mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "seg.dcm"]  # nothing half-written


def test_seg_on_enhanced_multiframe_source(tmp_path):
    src = load_study(get_testdata_file("eCT_Supplemental.dcm"))  # frames stored in reverse k order
    arr = np.zeros(src.shape, dtype=np.uint8)
    arr[100:200, 50:120, 0] = 1  # only on slice k=0 (file frame 2)
    mask = src.with_array(arr)
    out = write_dicom_seg(mask, src, tmp_path / "seg.dcm", {1: "bone"})
    back = read_dicom_seg(out, src)
    assert np.array_equal(back.array, arr)
    _check_with_highdicom_geometry(out, src, mask)


def test_seg_for_study_read_from_zip(tmp_path):
    vol = make_volume(shape=(8, 8, 4))
    paths = write_dicom_series(vol, tmp_path / "s")
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as zf:
        for p in paths:
            zf.write(p, f"x/{p.name}")
    src = load_study(tmp_path / "s.zip")  # its temp folder is gone now; headers were kept
    mask = src.with_array((vol.array > 0).astype(np.uint8))
    out = write_dicom_seg(mask, src, tmp_path / "seg.dcm", {1: "tissue"})
    assert np.array_equal(read_dicom_seg(out, src).array, mask.array)


def test_empty_mask_is_written_and_reads_back_empty(tmp_path):
    write_dicom_series(make_volume(shape=(8, 8, 3)), tmp_path / "s")
    src = load_study(tmp_path / "s")
    out = write_dicom_seg(src.with_array(np.zeros(src.shape, np.uint8)), src, tmp_path / "e.dcm", {1: "brain"})
    assert read_dicom_seg(out, src).array.max() == 0


def test_seg_refusals(tmp_path, example_dir):
    write_dicom_series(make_volume(shape=(8, 8, 3)), tmp_path / "s")
    src = load_study(tmp_path / "s")
    other = make_volume(shape=(8, 8, 3), affine=oblique_affine())
    with pytest.raises(GeometryError, match="not on the source grid"):
        write_dicom_seg(other.with_array(np.zeros((8, 8, 3), np.uint8)), src, tmp_path / "x.dcm", {1: "a"})
    with pytest.raises(InputError, match=r"labels \[2\] that have no name"):
        write_dicom_seg(src.with_array(np.full((8, 8, 3), 2, np.uint8)), src, tmp_path / "x.dcm", {1: "a"})
    nifti = read_nifti(example_dir / "colin27_brainmask.nii.gz")
    with pytest.raises(InputError, match="needs a DICOM source series"):
        write_dicom_seg(nifti, nifti, tmp_path / "x.dcm", {1: "brain"})
    assert not (tmp_path / "x.dcm").exists()
    with pytest.raises(InputError, match="not a readable DICOM SEG"):
        read_dicom_seg(src.meta["dicom_files"][0], src)
    # a SEG made for another series does not fit this one
    write_dicom_series(make_volume(shape=(8, 8, 3), seed=5), tmp_path / "t")
    src2 = load_study(tmp_path / "t")
    out = write_dicom_seg(src2.with_array(np.ones((8, 8, 3), np.uint8)), src2, tmp_path / "t.dcm", {1: "a"})
    with pytest.raises(InputError, match="does not fit the given source series"):
        read_dicom_seg(out, src)


def test_seeded_uids_repeat_for_the_same_result_and_differ_otherwise(tmp_path):
    """A service job redone after a kill writes the same SEG/RTSTRUCT instance (UIDs from the job's
    seed and the content); another seed or mask gives new UIDs, no seed gives random ones."""
    import pydicom

    from resunet.io.rtstruct import write_rtstruct

    vol = make_volume(shape=(12, 10, 6), affine=oblique_affine())
    write_dicom_series(vol, tmp_path / "s")
    src = load_study(tmp_path / "s")
    mask = _labels_for(src)
    other = mask.with_array(np.where(mask.array == 2, 0, mask.array).astype(np.uint8), is_label=True)
    labels = {1: "brain", 2: "liver"}

    def uids(writer, m, name, seed):
        ds = pydicom.dcmread(writer(m, src, tmp_path / name, labels, uid_seed=seed), stop_before_pixels=True)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        return ds.SeriesInstanceUID, ds.SOPInstanceUID

    for writer in (write_dicom_seg, write_rtstruct):
        first = uids(writer, mask, "a.dcm", "job 1")
        assert uids(writer, mask, "b.dcm", "job 1") == first  # the redo
        for changed in (uids(writer, mask, "c.dcm", "job 2"), uids(writer, other, "d.dcm", "job 1"),
                        uids(writer, mask, "e.dcm", None)):
            assert changed[0] != first[0] and changed[1] != first[1]
        assert uids(writer, mask, "f.dcm", None) != uids(writer, mask, "g.dcm", None)
        assert all(len(u) <= 64 and pydicom.uid.UID(u).is_valid for u in first)
    seg_uids = uids(write_dicom_seg, mask, "h.dcm", "job 1")
    assert seg_uids != uids(write_rtstruct, mask, "i.dcm", "job 1")  # SEG and RTSTRUCT never collide
