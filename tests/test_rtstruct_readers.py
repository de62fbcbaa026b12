"""RTSTRUCT read by others (issue 26; issue 27 point 1): plastimatch with its default options (it ORs
the contours of a structure, as many planning systems do) and an independent rasteriser (contour
points through the source images' own IPP/IOP with pydicom, scikit-image polygons) fill exactly the
voxels of the mask, holes and islands in holes included; dciodvfy finds no error in the file."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from conftest import EXAMPLE_DIR, make_volume
from dicom_checks import assert_dciodvfy_clean, dice, plastimatch_structures, rasterise_rtstruct

from resunet.io import load_study, write_dicom_series
from resunet.io.contours import keyhole_contours, outlines
from resunet.io.rtstruct import read_rtstruct, write_rtstruct

NAMES = {1: "ring", 2: "core", 3: "speck"}


def oblique_sagittal_affine(spacing=(0.9, 1.1, 2.5), origin=(-30.0, 60.0, 40.0)) -> np.ndarray:
    """Sagittal slices (i: posterior->anterior, j: superior->inferior, k: right->left in RAS terms),
    tilted 15 degrees about the left-right axis and 10 about the vertical one."""
    base = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # columns: i, j, k directions
    a, b = np.radians(15.0), np.radians(10.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ base @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def nested_labels(shape: tuple[int, int, int]) -> np.ndarray:
    """Label 1: a ring with two holes (one holding an island of label 1 and a core of label 2), a
    piece touching the image border, a one-voxel hole, a diagonal bridge; label 3: single voxels."""
    n_i, n_j, n_k = shape
    i, j = np.meshgrid(np.arange(n_i), np.arange(n_j), indexing="ij")
    out = np.zeros(shape, np.uint8)
    for k in range(1, n_k):
        r = np.hypot((i - n_i / 2 + k * 0.3) / (n_i * 0.4), (j - n_j / 2) / (n_j * 0.38))
        plane = out[:, :, k]
        plane[r < 1.0] = 1
        plane[np.hypot(i - n_i * 0.38, j - n_j * 0.5) < n_i * 0.14] = 0  # hole 1
        plane[np.hypot(i - n_i * 0.38, j - n_j * 0.5) < n_i * 0.05] = 1  # island of label 1 in it
        plane[np.hypot(i - n_i * 0.66, j - n_j * 0.45) < n_i * 0.1] = 2  # hole 2: label 2 fills it
        plane[int(n_i * 0.55), int(n_j * 0.75)] = 0  # a one-voxel hole
        plane[0:4, 0:5] = 1  # touches the border
        plane[6, 6] = plane[7, 7] = 1  # two voxels meeting at a corner only
        plane[n_i - 3, n_j - 3] = 3
    return out


@pytest.fixture(scope="module")
def oblique(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sag") / "series"
    write_dicom_series(make_volume(shape=(48, 40, 6), affine=oblique_sagittal_affine()), folder)
    src = load_study(folder)
    labels = nested_labels(src.shape)
    rs = write_rtstruct(src.with_array(labels, is_label=True), src, folder.parent / "rs.dcm", NAMES)
    return folder, src, labels, rs


def test_keyhole_contours_fill_the_plane_by_or_and_by_xor():
    rng = np.random.default_rng(7)
    from skimage.draw import polygon

    for trial in range(60):
        plane = rng.random((int(rng.integers(4, 30)), int(rng.integers(4, 30)))) < rng.uniform(0.3, 0.8)
        contours = keyhole_contours(plane)
        assert len(contours) == sum(1 for c in outlines(plane) if (np.roll(c[:, 0], -1) * c[:, 1]).sum()
                                    < (c[:, 0] * np.roll(c[:, 1], -1)).sum())  # one per region
        by_or, by_xor = np.zeros_like(plane), np.zeros_like(plane)
        for c in contours:
            fill = np.zeros_like(plane)
            fill[polygon(c[:, 0], c[:, 1], shape=plane.shape)] = True
            by_or |= fill
            by_xor ^= fill
        assert np.array_equal(by_or, plane), trial
        assert np.array_equal(by_xor, plane), trial


def test_thousands_of_holes_make_one_contour():
    """2 401 one-voxel holes in rows and columns (every ray meets another hole first: long chains of
    joined holes) and a column of holes one voxel apart: one contour each, exact by OR and XOR."""
    from skimage.draw import polygon

    grid = np.ones((100, 100), bool)
    grid[1:99:2, 1:99:2] = False
    column = np.zeros((60, 20), bool)
    column[2:58, 2:18] = True
    column[4:56:2, 10] = False
    for plane in (grid, column):
        contours = keyhole_contours(plane)
        assert len(contours) == 1
        fill = np.zeros_like(plane)
        fill[polygon(contours[0][:, 0], contours[0][:, 1], shape=plane.shape)] = True
        assert np.array_equal(fill, plane)


def test_oblique_sagittal_series_rasterises_exactly_in_independent_readers(oblique):
    folder, src, labels, rs = oblique
    files = src.meta["dicom_files"]
    for rule in ("or", "xor"):
        ours = rasterise_rtstruct(rs, files, rule=rule)
        for value, name in NAMES.items():
            assert np.array_equal(ours[name], labels == value), (rule, name, int((ours[name] != (labels == value)).sum()))
    back = read_rtstruct(rs, src)
    assert np.array_equal(np.asarray(back.array), labels)
    plast = plastimatch_structures(rs, folder, files)
    for value, name in NAMES.items():
        assert dice(plast[name], labels == value) >= 0.99, (name, dice(plast[name], labels == value))
    assert_dciodvfy_clean(rs)


def test_one_contour_per_region_and_the_frame_of_reference_module(oblique):
    folder, src, labels, rs = oblique
    ds = pydicom.dcmread(rs)
    ref = pydicom.dcmread(src.meta["dicom_files"][0], stop_before_pixels=True)
    assert ds.FrameOfReferenceUID == ref.FrameOfReferenceUID == ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    assert "PositionReferenceIndicator" in ds
    ring = next(rc for rc in ds.ROIContourSequence if rc.ReferencedROINumber == 1)
    on_slice = [c for c in ring.ContourSequence
                if c.ContourImageSequence[0].ReferencedSOPInstanceUID == ref.SOPInstanceUID]
    assert on_slice == []  # slice 0 is empty
    k1 = pydicom.dcmread(src.meta["dicom_files"][1], stop_before_pixels=True).SOPInstanceUID
    on_slice = [c for c in ring.ContourSequence if c.ContourImageSequence[0].ReferencedSOPInstanceUID == k1]
    # the ring (holes joined by cuts), the island in hole 1, the border piece, the two corner voxels
    assert len(on_slice) == 5


@pytest.fixture(scope="module")
def tissue_example(tmp_path_factory):
    """The bundled tissue model's mask of the example DICOM study (3 nested labels) and its RTSTRUCT."""
    from resunet.inference import Predictor
    from resunet.inference.bundled import bundled_path

    series = EXAMPLE_DIR / "colin27_t1_dicom"
    src = load_study(series)
    pred = Predictor(bundled_path("brain_tissue"), device="cpu", tta=False).predict(src)
    labels = {int(v): n for v, n in pred.mask.meta["labels"].items() if int(v)}
    out = write_rtstruct(pred.mask, src, tmp_path_factory.mktemp("tissue") / "rs.dcm", labels)
    return series, src, np.asarray(pred.mask.array), labels, out


def test_tissue_model_rtstruct_in_plastimatch_and_the_independent_rasteriser(tissue_example):
    series, src, mask, labels, rs = tissue_example
    files = src.meta["dicom_files"]
    assert len(labels) == 3 and all((mask == v).any() for v in labels)
    plast = plastimatch_structures(rs, series, files)
    ours = rasterise_rtstruct(rs, files, rule="or")
    for value, name in labels.items():
        truth = mask == value
        assert dice(plast[name], truth) >= 0.99, (name, dice(plast[name], truth))
        assert np.array_equal(ours[name], truth), (name, int((ours[name] != truth).sum()))
    assert np.array_equal(np.asarray(read_rtstruct(rs, src).array), mask)
    assert_dciodvfy_clean(rs)
