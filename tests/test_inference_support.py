"""Helpers for the inference and predict tests: a tiny real ResUNet checkpoint and synthetic scans.

The checkpoint is a real ``tiny`` ResUNet with random weights saved by ``save_checkpoint``; its
head bias is shifted so that about half of the test scan is foreground, which makes the masks
spatially structured (and not mirror-symmetric), so geometry mistakes change them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import orientations as nio

from resunet.io import Volume

PATCH3D = (16, 16, 16)


def synthetic_scan(shape=(22, 19, 13), spacing=(1.2, 1.0, 2.0), seed: int = 0) -> Volume:
    """An int16 'scan' in RAS: an off-centre bright ellipsoid on a smooth gradient plus noise."""
    rng = np.random.default_rng(seed)
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    centre = np.array([0.6, 0.4, 0.55]) * (np.array(shape) - 1)
    radii = np.array([0.3, 0.25, 0.3]) * np.array(shape)
    blob = (((idx - centre) / radii) ** 2).sum(-1) < 1.0
    data = 200 * blob + 3.0 * idx[..., 0] + 2.0 * idx[..., 1] - idx[..., 2] + rng.normal(0, 10, shape)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-12.0, 8.0, -5.0)
    return Volume(array=np.round(data).astype(np.int16), affine=affine, meta={"source": "synthetic"})


def reorient(vol: Volume, codes: str) -> Volume:
    """The same scan with its voxel axes permuted/flipped to ``codes`` (e.g. "LSA"): same world content."""
    t = nio.ornt_transform(nio.io_orientation(vol.affine), nio.axcodes2ornt(tuple(codes)))
    data = np.ascontiguousarray(nio.apply_orientation(vol.array, t))
    affine = vol.affine @ nio.inv_ornt_aff(t, vol.shape)
    return Volume(array=data, affine=affine, meta=dict(vol.meta))


def to_orientation_of(mask: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """Permute/flip ``mask`` from the axes of ``src_affine`` onto those of ``dst_affine`` (same world grid)."""
    t = nio.ornt_transform(nio.io_orientation(src_affine), nio.io_orientation(dst_affine))
    return np.ascontiguousarray(nio.apply_orientation(mask, t))


def rotated(vol: Volume, degrees=(8.0, -6.0, 10.0)) -> Volume:
    """The same voxels with an oblique affine (small rotation about the grid centre; same closest axes)."""
    from scipy.spatial.transform import Rotation

    rot = np.eye(4)
    rot[:3, :3] = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()
    centre = vol.affine @ np.array([*(np.array(vol.shape) - 1) / 2.0, 1.0])
    shift = np.eye(4)
    shift[:3, 3] = centre[:3]
    affine = shift @ rot @ np.linalg.inv(shift) @ vol.affine
    return Volume(array=vol.array.copy(), affine=affine, meta=dict(vol.meta))


def make_checkpoint(
    path: Path,
    calibrate_on: Volume,
    *,
    spatial_dims: int = 3,
    spacing: Any = (1.5, 1.5, 1.5),
    patch: Any = PATCH3D,
    postprocess: dict | None = None,
    dropout: float = 0.0,
    seed: int = 0,
    slice_axis: int | None = None,
) -> Path:
    """Save a tiny random ResUNet checkpoint whose mask covers about half of ``calibrate_on``."""
    from resunet.inference import Predictor
    from resunet.nets import ResUNet
    from resunet.training.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    kwargs = {"decoder_dropout": dropout} if dropout else {}
    net = ResUNet.from_preset("tiny", spatial_dims=spatial_dims, in_channels=1, out_channels=2, **kwargs)
    plan = {
        "spacing": list(spacing) if spacing is not None else None,
        "normalization": [{"scheme": "zscore"}],
        "patch_size": list(patch),
        "spatial_dims": spatial_dims,
        "batch_size": 2,
        "modality": "MR",
    }
    if slice_axis is not None:
        plan["slice_axis"] = slice_axis
    fields = dict(
        network=net.config, plan=plan, labels={0: "background", 1: "object"}, channels=["T1"],
        postprocess=postprocess or {"largest_component": False, "fill_holes": False, "min_island_voxels": 0},
        model_card={"name": "tiny-test", "intended_use": "tests only", "metrics": {"dice": None}},
    )
    save_checkpoint(path, state_dict=net.state_dict(), **fields)
    pred = Predictor(path, tta=False, postprocess=False).predict(calibrate_on, probabilities=True)
    p = np.clip(pred.probabilities["object"].array.astype(np.float64), 1e-6, 1 - 1e-6)
    shift = float(np.median(np.log(p / (1 - p))))
    state = net.state_dict()
    state["head.bias"][1] -= shift
    save_checkpoint(path, state_dict=state, **fields)
    return path


def read_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Run torch on one thread in these tests: on a shared 2-core machine, two OpenMP threads
    competing with other processes made tiny convolutions 10-25x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
