"""Metric definitions pinned against hand-computed examples and against MONAI."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage as ndi

from resunet.errors import GeometryError, InputError
from resunet.evaluation import binary_metrics, evaluate_case
from resunet.io import Volume


def _vol(arr: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), source="mask") -> Volume:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return Volume(array=arr, affine=aff, meta={"source": source})


def _cubes_shifted_along_k():
    """Two 4x4x4 cubes, the prediction shifted by one voxel (2.5 mm) along k; spacing 1 x 1 x 2.5 mm."""
    ref = np.zeros((8, 8, 9), np.uint8)
    pred = np.zeros_like(ref)
    ref[2:6, 2:6, 2:6] = 1
    pred[2:6, 2:6, 3:7] = 1
    return pred, ref, (1.0, 1.0, 2.5)


@pytest.mark.parametrize("method", ["edt", "kdtree", "auto"])
def test_shifted_cubes_hand_computed(method):
    # Each 4x4x4 cube has 56 boundary voxels (64 minus the 2x2x2 core). Pred -> ref: the 16 voxels of
    # the pred's top face (k=6) are 2.5 mm from the ref's top face; the 4 core voxels of the pred's
    # bottom face (k=3) lie inside the ref, 1 mm (one in-plane voxel) from the ref's side faces; the
    # other 36 are ref boundary voxels too (0 mm). The reverse direction is symmetric.
    pred, ref, sp = _cubes_shifted_along_k()
    m = binary_metrics(pred, ref, sp, tolerance_mm=2.0, distance_method=method)
    assert m.situation == "both_present"
    assert m.tp == 48 and m.n_pred == 64 and m.n_gt == 64
    assert m.dice == pytest.approx(0.75)
    assert m.iou == pytest.approx(0.6)
    assert m.precision == pytest.approx(0.75) and m.recall == pytest.approx(0.75)
    assert m.hd95 == pytest.approx(2.5)
    assert m.assd == pytest.approx((32 * 2.5 + 8 * 1.0) / 112)
    assert m.nsd == pytest.approx(80 / 112)
    assert m.vol_pred_ml == pytest.approx(64 * 2.5 / 1000) and m.vol_diff_ml == pytest.approx(0.0)
    # tolerance is inclusive and in mm
    assert binary_metrics(pred, ref, sp, tolerance_mm=2.5).nsd == pytest.approx(1.0)
    assert binary_metrics(pred, ref, sp, tolerance_mm=0.5).nsd == pytest.approx(72 / 112)


def test_distances_use_anisotropic_spacing_in_mm():
    pred = np.zeros((6, 7, 4), bool)
    ref = np.zeros_like(pred)
    pred[1, 1, 1] = True
    ref[4, 5, 2] = True
    m = binary_metrics(pred, ref, (1.0, 1.0, 2.0))
    assert m.hd95 == pytest.approx(math.sqrt(9 + 16 + 4))
    assert m.assd == pytest.approx(math.sqrt(29))
    assert m.nsd == 0.0
    # the same masks in voxel units would give sqrt(26): spacing must matter
    assert binary_metrics(pred, ref, (1.0, 1.0, 1.0)).hd95 == pytest.approx(math.sqrt(26))


def test_hd95_is_max_of_directed_percentiles_with_interpolation():
    # 2D (K = 1): ref is a 1-voxel-thick line of 10 voxels along i; pred the same line plus one voxel
    ref = np.zeros((30, 30, 1), bool)
    ref[0:10, 0, 0] = True
    pred = ref.copy()
    pred[0, 20, 0] = True  # 20 mm from the nearest ref voxel (0, 0)
    m = binary_metrics(pred, ref, (1.0, 1.0, 1.0))
    # pred -> ref: 10 zeros and one 20 mm; p95 at sorted position 0.95 * 10 = 9.5 -> halfway from 0 to
    # 20 = 10 mm. ref -> pred: all 0. hd95 = max(10, 0); assd = 20 mm / 21 distances.
    assert m.hd95 == pytest.approx(10.0)
    assert m.assd == pytest.approx(20 / 21)


def test_empty_mask_rules():
    z = np.zeros((5, 5, 5), bool)
    a = z.copy()
    a[1:3, 1:3, 1:3] = True
    both = binary_metrics(z, z, (1, 1, 1))
    assert both.situation == "both_empty"
    assert (both.dice, both.iou, both.precision, both.recall, both.nsd) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert (both.hd95, both.assd) == (0.0, 0.0)

    ref_empty = binary_metrics(a, z, (1, 1, 1))
    assert ref_empty.situation == "ref_empty"
    assert (ref_empty.dice, ref_empty.iou, ref_empty.precision) == (0.0, 0.0, 0.0)
    assert ref_empty.recall is None and ref_empty.hd95 is None and ref_empty.assd is None
    assert ref_empty.nsd == 0.0

    pred_empty = binary_metrics(z, a, (1, 1, 1))
    assert pred_empty.situation == "pred_empty"
    assert (pred_empty.dice, pred_empty.iou, pred_empty.recall) == (0.0, 0.0, 0.0)
    assert pred_empty.precision is None and pred_empty.hd95 is None and pred_empty.assd is None
    assert pred_empty.vol_gt_ml == pytest.approx(8 / 1000)


def _blob(rng, shape, thr=0.1):
    return ndi.gaussian_filter(rng.standard_normal(shape), 2) > thr


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_monai_on_random_blobs(seed):
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(seed)
    two_d = seed % 3 == 2
    shape = (40, 33, 1) if two_d else (28, 24, 14)
    spacing = (0.7, 1.3, 3.0)
    pred, ref = _blob(rng, shape), _blob(rng, shape)
    # pin MONAI's inputs: 2D images go to MONAI as 2D, spacing in mm
    p_t = torch.from_numpy(pred[..., 0] if two_d else pred)[None, None].float()
    r_t = torch.from_numpy(ref[..., 0] if two_d else ref)[None, None].float()
    sp = list(spacing[:2]) if two_d else list(spacing)
    tol = 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p_t, r_t, percentile=95, spacing=sp).item()
        asd = compute_average_surface_distance(p_t, r_t, symmetric=True, spacing=sp).item()
        nsd = compute_surface_dice(p_t, r_t, class_thresholds=[tol], spacing=sp).item()
    for method in ("edt", "kdtree"):
        m = binary_metrics(pred, ref, spacing, tolerance_mm=tol, distance_method=method)
        assert m.hd95 == pytest.approx(hd, rel=1e-3)
        assert m.assd == pytest.approx(asd, rel=1e-3)
        assert m.nsd == pytest.approx(nsd, rel=1e-3)


def test_evaluate_case_labels_and_volumes():
    ref = np.zeros((10, 10, 10), np.int16)
    pred = np.zeros_like(ref)
    ref[1:4, 1:4, 1:4] = 1
    pred[1:4, 1:4, 1:4] = 1
    pred[6:8, 6:8, 6:8] = 2  # label 2 only predicted
    sp = (0.5, 0.5, 2.0)
    rows = evaluate_case(_vol(pred, sp), _vol(ref, sp))
    assert [r["label"] for r in rows] == [1, 2]
    assert rows[0]["dice"] == 1.0 and rows[0]["hd95"] == 0.0
    assert rows[0]["vol_gt_ml"] == pytest.approx(27 * 0.5 / 1000)
    assert rows[1]["situation"] == "ref_empty" and rows[1]["recall"] is None
    only3 = evaluate_case(_vol(pred, sp), _vol(ref, sp), labels=[3])
    assert only3[0]["situation"] == "both_empty" and only3[0]["dice"] == 1.0


def test_different_grids_refused_naming_both_unless_resampled():
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    # the same mask on a grid twice as fine: voxel centres of the coarse grid fall inside fine voxels
    fine = np.repeat(np.repeat(np.repeat(ref, 2, 0), 2, 1), 2, 2)
    pred = _vol(fine, (0.5, 0.5, 0.5), origin=(-0.25, -0.25, -0.25), source="pred.nii.gz")
    refv = _vol(ref, source="ref.nii.gz")
    with pytest.raises(GeometryError) as exc:
        evaluate_case(pred, refv)
    msg = str(exc.value)
    assert "pred.nii.gz" in msg and "ref.nii.gz" in msg
    assert pred.describe_grid() in msg and refv.describe_grid() in msg and "\n" not in msg
    with pytest.warns(UserWarning, match="nearest-neighbour"):
        rows = evaluate_case(pred, refv, resample_pred=True)
    assert rows[0]["dice"] == 1.0


def test_non_integer_mask_refused():
    a = np.zeros((4, 4, 4), np.float32)
    a[1, 1, 1] = 0.5
    with pytest.raises(InputError, match="non-integer"):
        evaluate_case(_vol(a), _vol(a))


def test_sheared_grid_refused():
    a = np.zeros((4, 4, 4), np.uint8)
    a[1:3, 1:3, 1:3] = 1
    aff = np.eye(4)
    aff[0, 2] = 0.5  # k axis leans along x: voxel axes not orthogonal
    v = Volume(a, aff, {"source": "sheared.nii.gz"})
    with pytest.raises(GeometryError, match="non-orthogonal"):
        evaluate_case(v, v)


def test_labels_found_in_either_mask_with_any_dtype():
    a = np.zeros((5, 5, 5), np.int16)
    a[0, 0, 0] = 3
    b = np.zeros((5, 5, 5), np.uint8)
    b[1, 1, 1] = 1
    rows = evaluate_case(_vol(a), _vol(b))
    assert [(r["label"], r["situation"]) for r in rows] == [(1, "pred_empty"), (3, "ref_empty")]
    neg = np.zeros((5, 5, 5), np.int16)
    neg[2, 2, 2] = -1  # no label is negative (nnU-Net's rule too): refused, not a made-up row "-1"
    with pytest.raises(InputError, match="1 voxels hold negative values"):
        evaluate_case(_vol(neg), _vol(b))
    with pytest.raises(InputError, match="1 voxels hold negative values"):
        evaluate_case(_vol(b), _vol(neg.astype(np.float32)))
