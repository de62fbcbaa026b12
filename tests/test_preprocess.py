"""The shared preprocessing: geometry of the prepared grid and the exactness of its inverse."""

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from resunet.errors import ConfigError, GeometryError
from resunet.io import Volume
from resunet.preprocess import Normalization, PreprocessPlan, prepare, prepare_label, restore


def _oblique_affine(axes: np.ndarray, spacing=(0.9, 1.3, 3.0)) -> np.ndarray:
    rot = Rotation.from_euler("xyz", [10, -20, 30], degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rot @ axes @ np.diag(spacing)
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return affine


def _world(shape, affine):
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


AXES = {
    "RAS": np.eye(3),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "PIR-ish": np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], float),
}


@pytest.mark.parametrize("axes", list(AXES))
def test_prepared_grid_keeps_world_positions(axes):
    """Values that are a linear function of world x stay so on the prepared grid (interior voxels)."""
    affine = _oblique_affine(AXES[axes])
    shape = (20, 25, 30)
    vol = Volume(_world(shape, affine)[..., 0].astype(np.float32), affine)
    case = prepare(vol, PreprocessPlan(spacing=(1.5, 1.5, 1.5), normalization=[Normalization("none")]))
    assert np.allclose(case.spacing, 1.5, atol=0.1)
    assert "".join(nib.aff2axcodes(case.affine)) == "RAS"
    expected = _world(case.shape, case.affine)[..., 0]
    inner = (slice(2, -2),) * 3
    np.testing.assert_allclose(case.array[0][inner], expected[inner], atol=1e-3)


@pytest.mark.parametrize("axes", list(AXES))
def test_restore_is_exact_inverse_without_resampling(axes):
    affine = _oblique_affine(AXES[axes])
    rng = np.random.default_rng(0)
    vol = Volume(rng.normal(size=(7, 9, 11)).astype(np.float32), affine)
    case = prepare(vol, PreprocessPlan(spacing=None, normalization=[Normalization("none")]))
    assert np.array_equal(restore(case.array, case)[0], vol.array)
    label = vol.with_array((vol.array > 0.5).astype(np.uint8))
    on_grid = prepare_label(label, case)
    assert np.array_equal(restore(on_grid[None], case, label=True)[0], label.array)


def test_restore_lands_on_input_grid_after_resampling():
    affine = _oblique_affine(AXES["LPS"])
    shape = (20, 25, 30)
    vol = Volume(_world(shape, affine)[..., 1].astype(np.float32), affine)
    case = prepare(vol, PreprocessPlan(spacing=(2.0, 2.0, 2.0), normalization=[Normalization("none")]))
    back = restore(case.array, case)
    assert back.shape == (1, *shape)
    inner = (slice(3, -3),) * 3
    np.testing.assert_allclose(back[0][inner], vol.array[inner], atol=1e-3)


def test_normalization_schemes():
    x = np.array([[[-2000.0, 0.0, 50.0, 4000.0]]])
    ct = Normalization("ct", clip=(-100, 100), mean=10.0, std=20.0).apply(x)
    np.testing.assert_allclose(ct.ravel(), [(-100 - 10) / 20, (0 - 10) / 20, (50 - 10) / 20, (100 - 10) / 20])
    z = Normalization("zscore").apply(x)
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5
    with pytest.raises(ConfigError, match="needs clip"):
        Normalization("ct")
    plan = PreprocessPlan(spacing=(1.0, None, 2.0), normalization=[Normalization("ct", (-1, 1), 0.0, 1.0)])
    assert PreprocessPlan.from_dict(plan.to_dict()) == plan


def test_channels_on_different_grids_are_refused():
    a = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4))
    b = Volume(np.zeros((4, 4, 4), np.float32), np.diag([2.0, 1, 1, 1]), meta={"source": "t2.nii.gz"})
    with pytest.raises(GeometryError, match="t2.nii.gz"):
        prepare([a, b], PreprocessPlan())
