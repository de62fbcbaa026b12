"""Dataset reading and checks, and the planner's rules, on small real NIfTI files."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from test_training import make_msd, make_nnunet

from resunet.cli import main as cli_main
from resunet.errors import DatasetError
from resunet.nets.presets import preset_kwargs
from resunet.training.config import PlanConfig
from resunet.training.dataset import load_dataset, read_case
from resunet.training.loop import split_cases
from resunet.training.plan import collect_stats, ct_normalization, make_plan, plan_strides, target_spacing


def test_layouts_are_recognised(tmp_path):
    msd = load_dataset(make_msd(tmp_path / "msd", n_cases=2))
    assert msd.layout == "msd" and msd.channels == ["MRI"] and msd.modality == "MR"
    assert [c.case_id for c in msd.cases] == ["case0", "case1"] and msd.labels == {0: "background", 1: "sphere"}
    nn = load_dataset(make_nnunet(tmp_path / "nn", n_cases=2))
    assert nn.layout == "nnunet" and nn.channels == ["T1", "T2"]
    assert [len(c.images) for c in nn.cases] == [2, 2]
    images, label = read_case(nn, nn.cases[0])
    assert len(images) == 2 and images[0].same_grid(label) and set(np.unique(label.array)) <= {0, 1}
    assert msd.fingerprint() == load_dataset(tmp_path / "msd").fingerprint() != nn.fingerprint()


def test_msd_4d_multichannel_image_is_split(tmp_path):
    root = make_msd(tmp_path / "msd", n_cases=1)
    img = nib.load(root / "imagesTr/case0.nii.gz")
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, -data], -1), img.affine), root / "imagesTr/case0.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "FLAIR", "1": "T1w"}
    (root / "dataset.json").write_text(json.dumps(meta))
    spec = load_dataset(root)
    images, _ = read_case(spec, spec.cases[0])
    assert len(images) == 2 and np.array_equal(images[1].array, -images[0].array)


def _edit_label(root, fn):
    p = root / "labelsTr/case0.nii.gz"
    img = nib.load(p)
    new = fn(np.asarray(img.dataobj), img.affine)
    nib.save(new, p)


@pytest.mark.parametrize("problem, message", [
    ("shape", "has shape"),
    ("geometry", "different geometry"),
    ("value", r"value\(s\) \[7\] not declared"),
])
def test_case_errors(tmp_path, problem, message):
    root = make_msd(tmp_path / "msd", n_cases=1)
    if problem == "shape":
        _edit_label(root, lambda a, aff: nib.Nifti1Image(a[:-1], aff))
    elif problem == "geometry":
        _edit_label(root, lambda a, aff: nib.Nifti1Image(a, aff @ np.diag([1, 1, 1.3, 1])))
    else:
        _edit_label(root, lambda a, aff: nib.Nifti1Image(np.where(a == 1, 7, 0).astype(np.uint8), aff))
    spec = load_dataset(root)
    with pytest.raises(DatasetError, match=message) as info:
        read_case(spec, spec.cases[0])
    assert "case0" in str(info.value)


def test_folder_errors(tmp_path, capsys):
    with pytest.raises(DatasetError, match="no dataset.json"):
        load_dataset(tmp_path)
    root = make_msd(tmp_path / "msd", n_cases=2)
    (root / "imagesTr/case1.nii.gz").unlink()
    with pytest.raises(DatasetError, match="case1: file .*case1.nii.gz is missing"):
        load_dataset(root)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] = []
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="no training cases"):
        load_dataset(root)
    nn = make_nnunet(tmp_path / "nn", n_cases=1)
    (nn / "imagesTr/sph_000_0001.nii.gz").unlink()
    with pytest.raises(DatasetError, match="lacks channel file.*sph_000_0001.nii.gz"):
        load_dataset(nn)
    # the CLI turns it into exit code 2 and one line, no traceback
    assert cli_main(["train", "--data", str(root), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resunet train: error:") and "Traceback" not in err


def test_plan_rules():
    # median spacing; a thick axis (ratio > 3) takes the 10th percentile
    assert target_spacing([(1, 1, 1), (1, 1, 1.2), (1, 1, 1.4)]) == [1.0, 1.0, 1.2]
    assert target_spacing([(0.8, 0.8, 5), (0.8, 0.8, 5), (0.8, 0.8, 5), (0.8, 0.8, 1.5)])[2] == pytest.approx(2.55)
    # CT: clip at the foreground's 0.5/99.5 percentiles, z-score with the clipped statistics
    vals = np.random.default_rng(0).normal(40, 10, 20000)
    n = ct_normalization([vals[:10000], vals[10000:]])
    assert n.scheme == "ct" and n.clip[0] == pytest.approx(np.percentile(vals, 0.5))
    assert n.mean == pytest.approx(40, abs=0.5) and n.std == pytest.approx(10, abs=0.5)
    # strides: thick axis not downsampled until in-plane catches up; stop at min feature size
    overrides, divisor = plan_strides([64, 64, 16], [1.0, 1.0, 4.0], preset_kwargs("tiny"), min_feature_size=4)
    assert overrides["strides"] == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]] and divisor == [8, 8, 4]
    overrides, divisor = plan_strides([16, 16, 16], [1, 1, 1], preset_kwargs("tiny"), min_feature_size=4)
    assert divisor == [4, 4, 4] and overrides["strides"][-1] == [1, 1, 1]


def test_plan_from_data_and_memory_budget(tmp_path):
    spec = load_dataset(make_nnunet(tmp_path / "nn", n_cases=2, channels=1))
    stats = collect_stats(spec)
    plan = make_plan(spec, stats, PlanConfig(), preset=preset_kwargs("tiny"))
    assert plan.spacing == [1.2, 1.2, 3.0] and plan.modality == "MR"  # channel "T1" means MR
    assert all(p % d == 0 for p, d in zip(plan.patch_size, plan.size_divisor))
    small = make_plan(spec, stats, PlanConfig(memory_budget_mb=0.5, min_batch_size=2), preset=preset_kwargs("tiny"))
    assert np.prod(small.patch_size) < np.prod(plan.patch_size)  # shrunk to fit the budget
    ct = make_plan(spec, stats, PlanConfig(normalization="ct", patch_size=[16, 16, 8], batch_size=3),
                   preset=preset_kwargs("tiny"))
    assert ct.normalization[0].scheme == "ct" and ct.patch_size == [16, 16, 8] and ct.batch_size == 3
    d = ct.to_dict()
    assert {"spacing", "normalization", "patch_size", "batch_size", "spatial_dims", "modality"} <= set(d)


def test_kfold_split_is_by_case_and_fixed():
    ids = [f"c{i}" for i in range(10)]
    folds = [split_cases(ids, 5, k, seed=7) for k in range(5)]
    vals = [v for _, v in folds]
    assert sorted(sum(vals, [])) == sorted(ids)  # every case validated exactly once
    assert all(len(v) == 2 and not set(v) & set(t) for t, v in folds)
    assert split_cases(ids, 5, 2, seed=7) == folds[2]
    assert split_cases(ids, 1, 0, seed=7) == (sorted(ids), [])
    with pytest.raises(DatasetError, match="cannot be split into 5 folds"):
        split_cases(ids[:3], 5, 0, seed=7)


def test_msd_case_image_may_be_a_dicom_folder(tmp_path):
    """dataset.json may list a DICOM series folder as a case's image; its label is a NIfTI on that grid."""
    from resunet.io import Volume, write_dicom_series

    root = make_msd(tmp_path / "msd", n_cases=2)
    img = nib.load(root / "imagesTr/case1.nii.gz")
    vol = Volume(np.round(np.asarray(img.dataobj)).astype(np.int16), img.affine)
    write_dicom_series(vol, root / "imagesTr/case1_dicom")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][1]["image"] = "./imagesTr/case1_dicom"
    (root / "dataset.json").write_text(json.dumps(meta))
    spec = load_dataset(root)
    case = [c for c in spec.cases if c.images[0].endswith("case1_dicom")][0]
    images, label = read_case(spec, case)
    assert images[0].meta["format"] == "dicom" and images[0].shape == label.shape
    assert np.array_equal(images[0].array, vol.array)
