"""resunet.webui.editor: brush/fill/delete/undo/redo/interpolation on real NIfTI masks (issue 21 point 1).

The expected voxels are computed here independently of the editor: a screen point goes to the display
grid by the viewer's documented radiological convention (every view's image is ``slice.T[::-1, ::-1]``),
then to world mm through the display grid's affine (nibabel's orientation transform) and to the source
voxel through the inverse of the file's own affine. The brush is checked against distances measured
in world mm between voxel centres and the stroke.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio

from resunet.errors import InputError
from resunet.io.nifti import read_nifti
from resunet.webui.editor import MaskEditor
from resunet.webui.viewer import VIEW_AXIS

SHAPE = (22, 18, 10)


def _rot_z(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


def _affines() -> dict[str, np.ndarray]:
    ras = np.diag([0.8, 1.2, 3.0, 1.0])
    ras[:3, 3] = (-10, 5, 30)
    permuted = np.eye(4)
    # i -> posterior (-y), j -> superior (z), k -> left (-x): flipped and permuted, anisotropic
    permuted[:3, :3] = np.array([[0, 0, -2.5], [-0.9, 0, 0], [0, 1.1, 0]])
    permuted[:3, 3] = (40, 12, -7)
    oblique = np.eye(4)
    oblique[:3, :3] = _rot_z(20) @ np.diag([-0.7, 1.3, 2.0])
    oblique[:3, 3] = (3, -4, 5)
    return {"anisotropic": ras, "flipped_permuted": permuted, "oblique": oblique}


AFFINES = _affines()


def _mask_file(tmp_path: Path, affine: np.ndarray, array: np.ndarray | None = None) -> Path:
    data = np.zeros(SHAPE, np.uint8) if array is None else array.astype(np.uint8)
    path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _display_affine(affine: np.ndarray) -> np.ndarray:
    ornt = nio.io_orientation(affine)
    return affine @ nio.inv_ornt_aff(ornt, SHAPE)


def _display_shape(affine: np.ndarray) -> tuple[int, int, int]:
    ornt = nio.io_orientation(affine)
    out = [0, 0, 0]
    for src, dst in enumerate(ornt[:, 0].astype(int)):
        out[dst] = SHAPE[src]
    return tuple(out)  # type: ignore[return-value]


def _screen_to_display(view: str, index: int, rc: tuple[float, float], dshape: tuple[int, int, int]) -> np.ndarray:
    """Continuous slice (row, col) -> continuous display voxel (x, y, z): image = slice.T[::-1, ::-1]."""
    axis = VIEW_AXIS[view]
    a0, a1 = [a for a in range(3) if a != axis]
    d = np.zeros(3)
    d[axis] = index
    d[a1] = dshape[a1] - 1 - rc[0]
    d[a0] = dshape[a0] - 1 - rc[1]
    return d


def _screen_point(ed: MaskEditor, view: str, rc: tuple[float, float]) -> tuple[float, float]:
    """Screen pixel position (x, y) of slice position (row, col) (pixel centres at integers)."""
    rows, cols = ed.display.slice2d(view, 0).shape
    w, h = ed.image_size(view)
    return (rc[1] + 0.5) * w / cols, (rc[0] + 0.5) * h / rows


def _source_voxel(affine: np.ndarray, display_voxel: np.ndarray) -> tuple[int, int, int]:
    world = _display_affine(affine) @ np.append(display_voxel, 1.0)
    ijk = np.linalg.inv(affine) @ world
    return tuple(int(v) for v in np.rint(ijk[:3]))  # type: ignore[return-value]


@pytest.mark.parametrize("name", list(AFFINES))
@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_dab_paints_the_voxel_the_geometry_names(tmp_path: Path, name: str, view: str) -> None:
    affine = AFFINES[name]
    ed = MaskEditor(read_nifti(_mask_file(tmp_path, affine)))
    dshape = _display_shape(affine)
    rows, cols = ed.display.slice2d(view, 0).shape
    index = ed.display.n_slices(view) // 3
    for rc in [(0, 0), (rows - 1, cols - 1), (rows // 2, 1), (2, cols - 3)]:
        before = ed.corrected.array.copy()
        point = _screen_point(ed, view, rc)
        assert ed.brush(view, index, [point], radius_mm=0.0, label=3)
        changed = np.argwhere(ed.corrected.array != before)
        expected = _source_voxel(affine, _screen_to_display(view, index, rc, dshape))
        assert [tuple(v) for v in changed] == [expected]
        assert ed.voxel_at(view, index, point) == expected
    assert not np.any(np.asarray(ed.model_mask.array)), "the model's mask must stay untouched"


@pytest.mark.parametrize("name", list(AFFINES))
@pytest.mark.parametrize("view", ["axial", "sagittal"])
def test_stroke_covers_the_voxels_within_radius_mm(tmp_path: Path, name: str, view: str) -> None:
    affine = AFFINES[name]
    ed = MaskEditor(read_nifti(_mask_file(tmp_path, affine)))
    dshape = _display_shape(affine)
    index = ed.display.n_slices(view) // 2
    rows, cols = ed.display.slice2d(view, 0).shape
    stroke_rc = [(2.3, 1.7), (rows * 0.6, cols * 0.5), (rows - 3.2, cols - 2.4)]
    radius = 2.6
    ed.brush(view, index, [_screen_point(ed, view, rc) for rc in stroke_rc], radius_mm=radius, label=2)

    # expected, in world mm: voxel centres of this slice within `radius` of the world-space polyline
    disp_aff = _display_affine(affine)
    world = [(disp_aff @ np.append(_screen_to_display(view, index, rc, dshape), 1.0))[:3] for rc in stroke_rc]
    expected = set()
    axis = VIEW_AXIS[view]
    for ijk in np.ndindex(*dshape):
        if ijk[axis] != index:
            continue
        p = (disp_aff @ np.array([*ijk, 1.0]))[:3]
        dist = np.inf
        for a, b in zip(world[:-1], world[1:]):
            t = np.clip(np.dot(p - a, b - a) / np.dot(b - a, b - a), 0, 1)
            dist = min(dist, float(np.linalg.norm(p - (a + t * (b - a)))))
        if dist <= radius + 1e-9:
            expected.add(_source_voxel(affine, np.array(ijk, float)))
    got = {tuple(int(x) for x in v) for v in np.argwhere(ed.corrected.array == 2)}
    assert len(expected) > 20
    assert got == expected


def test_erase_clears_only_the_chosen_label(tmp_path: Path) -> None:
    arr = np.zeros(SHAPE, np.uint8)
    arr[:, :9, :] = 1
    arr[:, 9:, :] = 2
    ed = MaskEditor(read_nifti(_mask_file(tmp_path, AFFINES["anisotropic"], arr)))
    w, h = ed.image_size("axial")
    ed.brush("axial", 4, [(0, h / 2), (w, h / 2)], radius_mm=3.0, label=1, erase=True)
    corr = ed.corrected.array
    assert np.all(corr[:, 9:, :] == 2), "erasing label 1 must leave label 2 alone"
    assert np.count_nonzero(corr[:, :9, 4] == 0) > 0
    assert np.all(corr[:, :9, [0, 1, 2, 3, 5, 6, 7, 8, 9]] == 1), "only slice 4 changes"


def test_undo_redo_restore_exactly_and_history_is_bounded(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.random(SHAPE) > 0.7).astype(np.uint8)
    ed = MaskEditor(read_nifti(_mask_file(tmp_path, AFFINES["flipped_permuted"], arr)), history=3)
    states = [ed.corrected.array.copy()]
    w, h = ed.image_size("coronal")
    ed.brush("coronal", 3, [(1, 1), (w - 2, h - 2)], radius_mm=2.0, label=4)
    states.append(ed.corrected.array.copy())
    ed.fill("axial", 2, (5, 5), label=5)
    states.append(ed.corrected.array.copy())
    ed.delete("sagittal", 6, _screen_point(ed, "sagittal", tuple(np.argwhere(ed.display.slice2d("sagittal", 6))[0])))
    states.append(ed.corrected.array.copy())
    assert all(not np.array_equal(a, b) for a, b in zip(states[:-1], states[1:]))
    for expected in reversed(states[:-1]):
        assert ed.undo()
        assert np.array_equal(ed.corrected.array, expected)
    assert not ed.undo()
    for expected in states[1:]:
        assert ed.redo()
        assert np.array_equal(ed.corrected.array, expected)
    assert not ed.redo()
    # a fourth edit drops the oldest step: only 3 undos remain
    ed.brush("axial", 0, [(2, 2)], radius_mm=4.0, label=6)
    n = 0
    while ed.undo():
        n += 1
    assert n == 3
    assert np.array_equal(ed.corrected.array, states[1])
    # a new edit clears redo
    ed.brush("axial", 1, [(3, 3)], radius_mm=1.0, label=7)
    assert not ed.can_redo


def _disk(shape: tuple[int, int], centre: tuple[float, float], radius_px: float) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius_px**2


def test_interpolation_fills_the_slices_between_edits(tmp_path: Path) -> None:
    shape = (40, 40, 24)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    path = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), affine), str(path))
    ed = MaskEditor(read_nifti(path))
    rows, cols = ed.display.slice2d("axial", 0).shape
    w, h = ed.image_size("axial")
    # paint a small disk on slice 10 and a larger one on slice 20 (dabs of the brush at the centre)
    centre = ((rows / 2 + 0.5) * w / cols, (rows / 2 + 0.5) * h / rows)
    ed.brush("axial", 10, [centre], radius_mm=4.0, label=1)
    ed.brush("axial", 20, [centre], radius_mm=10.0, label=1)
    ed.brush("axial", 5, [centre], radius_mm=6.0, label=2)  # another label: not interpolated with label 1
    assert ed.edited_slices("axial", 1) == [10, 20]
    areas_before = [int(np.count_nonzero(ed.display.slice2d("axial", k) == 1)) for k in range(shape[2])]
    assert all(a == 0 for k, a in enumerate(areas_before) if k not in (10, 20))
    assert ed.interpolate("axial", 1)
    areas = [int(np.count_nonzero(ed.display.slice2d("axial", k) == 1)) for k in range(shape[2])]
    assert areas[10] == areas_before[10] and areas[20] == areas_before[20]
    inner = areas[10:21]
    assert all(a <= b for a, b in zip(inner[:-1], inner[1:])), inner
    assert areas[10] < areas[15] < areas[20], inner
    small, large = ed.display.slice2d("axial", 10) == 1, ed.display.slice2d("axial", 20) == 1
    for k in range(11, 20):  # nested disks blend into nested disks
        sk = ed.display.slice2d("axial", k) == 1
        assert np.all(sk[small]) and not np.any(sk & ~large), k
    assert all(areas[k] == 0 for k in list(range(10)) + list(range(21, shape[2])))
    assert np.count_nonzero(ed.corrected.array == 2) == np.count_nonzero(ed.display.slice2d("axial", 5) == 2)
    # undo removes exactly the interpolated voxels
    ed.undo()
    assert [int(np.count_nonzero(ed.display.slice2d("axial", k) == 1)) for k in range(shape[2])] == areas_before


def test_interpolating_the_same_shape_reproduces_it(tmp_path: Path) -> None:
    shape = (30, 26, 12)
    arr = np.zeros(shape, np.uint8)
    ring = _disk((30, 26), (14, 12), 8) & ~_disk((30, 26), (14, 12), 3)
    arr[:, :, 2] = ring
    arr[:, :, 9] = ring
    arr[:, :, 5] = _disk((30, 26), (4, 4), 2)  # wrong model output between: replaced by the interpolation
    path = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.diag([0.6, 1.4, 2.5, 1.0])), str(path))
    ed = MaskEditor(read_nifti(path))
    assert ed.interpolate("axial", 1, slices=[2, 9])
    for k in range(2, 10):
        assert np.array_equal(ed.corrected.array[:, :, k] == 1, ring), k


def test_fill_and_delete_act_on_one_component(tmp_path: Path) -> None:
    arr = np.zeros(SHAPE, np.uint8)
    ring = _disk(SHAPE[:2], (6, 6), 5) & ~_disk(SHAPE[:2], (6, 6), 2)
    arr[:, :, 3] = ring * 2
    arr[14:19, 12:16, 3] = 1
    arr[2:6, 14:17, 3] = 1
    arr[:, :, 4] = arr[:, :, 3]
    ed = MaskEditor(read_nifti(_mask_file(tmp_path, AFFINES["anisotropic"], arr)))
    dshape = _display_shape(AFFINES["anisotropic"])

    def click(i: int, j: int) -> tuple[float, float]:
        # source (i, j) on an RAS grid: display == source; screen row = Y-1-j, col = X-1-i
        return _screen_point(ed, "axial", (dshape[1] - 1 - j, dshape[0] - 1 - i))

    assert ed.delete("axial", 3, click(16, 13))
    corr = ed.corrected.array
    assert not corr[14:19, 12:16, 3].any()
    assert np.all(corr[2:6, 14:17, 3] == 1), "the other component of label 1 stays"
    assert np.array_equal(corr[:, :, 4], arr[:, :, 4]), "the next slice stays"
    assert np.array_equal(corr[:, :, 3] == 2, ring)

    assert ed.fill("axial", 3, click(6, 6), label=2)
    hole = _disk(SHAPE[:2], (6, 6), 2)
    assert np.array_equal(ed.corrected.array[:, :, 3] == 2, ring | hole)
    assert np.all(ed.corrected.array[2:6, 14:17, 3] == 1)
    assert np.count_nonzero(ed.corrected.array[:, :, 3] == 0) == np.count_nonzero(arr[:, :, 3] == 0) - hole.sum() + 20
    assert not ed.delete("axial", 3, click(20, 1)), "deleting background changes nothing"
    assert ed.voxels_changed() == 20 + int(hole.sum())


def test_bad_requests_are_clear_errors(tmp_path: Path) -> None:
    ed = MaskEditor(read_nifti(_mask_file(tmp_path, AFFINES["anisotropic"])))
    with pytest.raises(InputError, match="unknown view"):
        ed.brush("oblique", 0, [(1, 1)], 1.0, 1)
    with pytest.raises(InputError, match="outside the axial view"):
        ed.brush("axial", 99, [(1, 1)], 1.0, 1)
    with pytest.raises(InputError, match="label 0"):
        ed.fill("axial", 0, (1, 1), 0)
    with pytest.raises(InputError, match="3D integer label map"):
        from resunet.io.volume import Volume

        MaskEditor(Volume(np.zeros(SHAPE, np.float32), np.eye(4)))
