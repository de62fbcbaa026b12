"""Predictor: masks on exactly the input grid, orientation invariance, TTA, 2D, uncertainty, post-processing."""

from __future__ import annotations

import numpy as np
import pytest

from resunet.errors import InputError, ModelError
from resunet.inference import PostProcess, Predictor
from resunet.io import Volume
from resunet.preprocess import PreprocessPlan, prepare
from test_inference_support import single_torch_thread  # noqa: F401  (autouse fixture)
from test_inference_support import make_checkpoint, reorient, rotated, synthetic_scan, to_orientation_of


@pytest.fixture(scope="module")
def scan() -> Volume:
    return synthetic_scan()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, scan):
    return make_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", scan)


@pytest.fixture(scope="module")
def reference(ckpt, scan):
    """Mask of the RAS scan with mirror TTA."""
    return Predictor(ckpt, tta=True).predict(scan)


def _nontrivial(mask: np.ndarray) -> None:
    frac = float((mask > 0).mean())
    assert 0.05 < frac < 0.95, f"foreground fraction {frac}: the test model's mask is degenerate"
    for axis in range(3):  # a mirror-symmetric mask would hide flips
        assert not np.array_equal(mask, np.flip(mask, axis))


def test_mask_on_input_grid_with_tta(reference, scan):
    m = reference.mask
    assert m.shape == scan.shape and np.array_equal(m.affine, scan.affine)
    assert m.array.dtype == np.uint8 and m.meta["is_label"] and m.meta["source"] == "synthetic"
    _nontrivial(m.array)
    assert reference.passes == 8 and reference.windows >= 1
    count = int((m.array == 1).sum())
    assert reference.voxel_counts == {"object": count}
    assert reference.volumes_ml["object"] == pytest.approx(count * 1.2 * 1.0 * 2.0 / 1000, rel=1e-6)
    assert set(reference.timings) >= {"prepare", "sliding_window", "network", "restore", "postprocess", "total"}
    assert reference.model_name == "tiny-test" and len(reference.model_sha256) == 64


def test_mirror_tta_on_las_scan_gives_the_same_mask_in_world(ckpt, scan, reference):
    vol = reorient(scan, "LAS")
    pred = Predictor(ckpt, tta=True).predict(vol)
    assert pred.mask.shape == vol.shape and np.array_equal(pred.mask.affine, vol.affine)
    assert np.array_equal(to_orientation_of(pred.mask.array, vol.affine, scan.affine), reference.mask.array)


def test_other_axis_orders_and_oblique_affine_give_the_same_mask_in_world(ckpt, scan, reference):
    predictor = Predictor(ckpt, tta=False, overlap=0.25)
    single = predictor.predict(scan, probabilities=True)
    _nontrivial(single.mask.array)
    assert not np.array_equal(single.mask.array, reference.mask.array)  # the 8 flips did change something
    for codes in ("LSA", "PIR"):
        vol = reorient(scan, codes)
        pred = predictor.predict(vol)
        assert pred.mask.shape == vol.shape and np.array_equal(pred.mask.affine, vol.affine), codes
        assert np.array_equal(to_orientation_of(pred.mask.array, vol.affine, scan.affine), single.mask.array), codes
    vol = rotated(scan)
    pred = predictor.predict(vol)
    assert np.array_equal(pred.mask.affine, vol.affine) and pred.mask.shape == vol.shape
    # same voxels, slightly rotated world frame: the closest-RAS axes are the same, so the same mask
    assert np.array_equal(pred.mask.array, single.mask.array)
    # probabilities restored onto the input grid agree with the mask
    prob = single.probabilities["object"]
    assert single.passes == 1 and prob.same_grid(scan) and prob.array.dtype == np.float32
    assert 0.0 <= prob.array.min() and prob.array.max() <= 1.0
    clear = np.abs(prob.array - 0.5) > 1e-5  # argmax of restored p0/p1 equals p1 > 0.5 away from ties
    assert np.array_equal(single.mask.array[clear], (prob.array[clear] > 0.5).astype(np.uint8))


def test_2d_model_runs_slicewise_on_input_grid(tmp_path, scan):
    ck = make_checkpoint(tmp_path / "tiny2d.pt", scan, spatial_dims=2, spacing=(1.5, 1.5, None), patch=(16, 16))
    p = Predictor(ck, tta=False)
    ras = p.predict(scan)
    assert Predictor(ck, tta=True).flips == [(), (2,), (3,), (2, 3)]  # mirror TTA over the 2 slice axes
    assert ras.windows % scan.shape[2] == 0  # windows per slice x slices of k
    assert ras.mask.shape == scan.shape and np.array_equal(ras.mask.affine, scan.affine)
    _nontrivial(ras.mask.array)
    lps = reorient(scan, "LPI")
    other = p.predict(lps)
    assert np.array_equal(to_orientation_of(other.mask.array, lps.affine, scan.affine), ras.mask.array)


def test_2d_model_slices_along_the_axis_its_plan_names(tmp_path, scan):
    """A 2D model trained on slices of reoriented axis 0 (plan slice_axis) is run on those slices."""
    ck = make_checkpoint(tmp_path / "tiny2d_sag.pt", scan, spatial_dims=2, spacing=(None, 1.5, 1.5),
                         patch=(16, 16), slice_axis=0)
    res = Predictor(ck, tta=False).predict(scan)
    n_slices = prepare(scan, PreprocessPlan(spacing=(None, 1.5, 1.5))).shape[0]
    assert res.windows % n_slices == 0 and res.windows >= n_slices
    assert res.mask.shape == scan.shape and np.array_equal(res.mask.affine, scan.affine)
    _nontrivial(res.mask.array)


def test_uncertainty_mc_dropout(tmp_path, scan):
    ck = make_checkpoint(tmp_path / "drop.pt", scan, dropout=0.3)
    mc = Predictor(ck, tta=False, uncertainty="mc", mc_samples=2).predict(scan)
    u = mc.uncertainty
    assert u is not None and u.same_grid(scan) and u.array.dtype == np.float32
    assert 0.0 <= u.array.min() and u.array.max() <= 1.0 and u.array.max() > 0.1
    assert mc.passes == 2
    again = Predictor(ck, tta=False, uncertainty="mc", mc_samples=2).predict(scan)
    assert not np.array_equal(again.uncertainty.array, u.array)  # dropout samples differ run to run
    b = Predictor(ck, tta=False).predict(scan)  # without MC, dropout is off: deterministic
    c = Predictor(ck, tta=False).predict(scan)
    assert np.array_equal(b.mask.array, c.mask.array) and b.uncertainty is None


def test_tta_flips_and_tta_uncertainty_setting(ckpt):
    p = Predictor(ckpt, tta=False, uncertainty="tta")
    assert p.tta and len(p.flips) == 8 and p.flips[0] == ()


def test_mc_dropout_without_dropout_layers_is_a_model_error(ckpt):
    with pytest.raises(ModelError, match="no dropout"):
        Predictor(ckpt, uncertainty="mc")


def test_wrong_channel_count_is_an_input_error(ckpt, scan):
    with pytest.raises(InputError, match="expects 1 input channel"):
        Predictor(ckpt, tta=False).predict([scan, scan])


def test_postprocess_largest_component_islands_and_holes():
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[1:8, 1:8, 1:8] = 1
    lab[3:5, 3:5, 3:5] = 0  # a hole
    lab[10, 10, 10] = 1  # an island of 1 voxel
    lab[9:12, 0:3, 9:12] = 2  # a second label: 27 voxels
    lab[0, 11, 0] = 2  # its island
    out = PostProcess(largest_component=True, fill_holes=True).apply(lab.copy(), [1, 2])
    assert out[10, 10, 10] == 0 and out[0, 11, 0] == 0
    assert (out == 1).sum() == 7**3 and (out == 2).sum() == 27
    islands = PostProcess(min_island_voxels=2).apply(lab.copy(), [1, 2])
    assert islands[10, 10, 10] == 0 and islands[3, 3, 3] == 0 and (islands == 2).sum() == 27
    untouched = PostProcess().apply(lab.copy())
    assert np.array_equal(untouched, lab)
