"""`resunet train` on small datasets, `--fold all` (every fold, validation predictions, ensemble of the
folds) and `--pretrained FILE` (torchvision ResNet weights from a local .pth), on generated NIfTI data."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from resunet.cli import main
from resunet.errors import ModelError
from resunet.nets import ResUNet
from resunet.nets.pretrained import inflate, load_pretrained_file
from resunet.training.checkpoint import load_checkpoint
from test_nets import FC_PARAMS, TORCHVISION_NUM_PARAMS
from test_nets_transfer_export import torchvision_resnet_state_dict
from test_training import FAST, make_msd


def test_four_cases_with_five_folds_fall_back_to_four_folds(tmp_path, capsys, caplog):
    data = make_msd(tmp_path / "msd", n_cases=4)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", *FAST]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["dataset"]["folds"] == 4
    notes = [r.getMessage() for r in caplog.records if "cannot be split" in r.getMessage()]
    assert notes == ["4 cases cannot be split into 5 folds: using 4 folds instead (one case held out for validation "
                     "per fold); dataset.folds=4 is recorded in config.yaml"]
    td = load_checkpoint(run / "best.pt").model_card["training_data"]
    assert len(td["val_cases"]) == 1 and len(td["train_cases"]) == 3
    assert load_checkpoint(run / "best.pt").model_card["cross_validation"]["folds"] == 4


def test_one_case_trains_without_validation_and_a_fold_beyond_the_cases_is_refused(tmp_path, capsys):
    data = make_msd(tmp_path / "one", n_cases=1)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r1"), "--epochs", "1", *FAST]) == 0
    assert yaml.safe_load((tmp_path / "r1" / "config.yaml").read_text())["dataset"]["folds"] == 1
    assert load_checkpoint(tmp_path / "r1" / "best.pt").model_card["training_data"]["val_cases"] == []
    data3 = make_msd(tmp_path / "three", n_cases=3)
    assert main(["train", "--data", str(data3), "--out", str(tmp_path / "r3"), "--epochs", "1", "--fold", "4",
                 *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("resunet train: error: dataset.fold=4, but 3 case(s) allow only 3 fold(s); "
                       "choose a fold in 0..2")


def test_fold_all_trains_every_fold_writes_validation_predictions_and_ensembles(tmp_path, capsys):
    data = make_msd(tmp_path / "msd", n_cases=3)
    run = tmp_path / "cv"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--fold", "all", *FAST,
                 "--set", "validation.tta=false"]) == 0
    folds = json.loads((run / "folds.json").read_text())["folds"]
    assert [f["fold"] for f in folds] == [0, 1, 2]
    held = [c for f in folds for c in f["val_cases"]]
    assert sorted(held) == ["case0", "case1", "case2"]  # every case held out exactly once
    plan = json.loads((run / "plan.json").read_text())
    for f in folds:
        fold_dir = run / f["out"]
        assert load_checkpoint(fold_dir / "best.pt").plan == plan  # one shared plan
        assert yaml.safe_load((fold_dir / "config.yaml").read_text())["dataset"]["fold"] == f["fold"]
        (case,) = f["val_cases"]
        pred = nib.load(fold_dir / "validation" / f"{case}.nii.gz")
        ref = nib.load(data / "labelsTr" / f"{case}.nii.gz")
        assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)  # on the case's own grid
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}
        assert (run / "crossval" / f"{case}.nii.gz").read_bytes() == (fold_dir / "validation" / f"{case}.nii.gz").read_bytes()
    # each fold and the cross-validation union evaluate against the dataset's labels
    rep = tmp_path / "rep"
    assert main(["evaluate", "--pred", str(run / "crossval"), "--gt", str(data / "labelsTr"), "--out", str(rep),
                 "--audit-db", str(tmp_path / "audit.sqlite"), "--workers", "1"]) == 0
    rows = list(csv.DictReader((rep / "metrics.csv").open()))
    assert sorted(r["case"] for r in rows) == ["case0", "case1", "case2"]
    # the run folder is an ensemble of its folds for `resunet predict`
    out = tmp_path / "pred"
    assert main(["predict", str(data / "imagesTr" / "case0.nii.gz"), "--out", str(out), "--model", str(run),
                 "--no-progress", "--no-audit", "--no-tta"]) == 0
    doc = json.loads((out / "predictions.json").read_text())
    assert [m["sha256"] for m in doc["model"]["members"]] == [f["best_sha256"] for f in folds]


def _fits_preset_counts(sd: dict[str, torch.Tensor], name: str) -> int:
    block = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    n = sum(v.numel() for k, v in sd.items() if not k.startswith("fc.") and not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert n == TORCHVISION_NUM_PARAMS[name] - FC_PARAMS[block]
    return n


def test_pretrained_flag_starts_a_2d_run_from_the_file_and_records_it(tmp_path, capsys):
    sd = torchvision_resnet_state_dict([2, 2, 2, 2], bottleneck=False, seed=3)
    n_file = _fits_preset_counts(sd, "resnet18")
    pth = tmp_path / "resnet18-imagenet.pth"
    torch.save(sd, pth)
    data = make_msd(tmp_path / "msd", n_cases=2)
    run = tmp_path / "run"
    # lr 0: one real training step leaves the weights as loaded, so they can be compared with the file
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", *FAST, "--preset", "resnet18",
                 "--spatial-dims", "2", "--pretrained", str(pth), "--set", "optim.lr=0",
                 "--set", "iterations_per_epoch=1", "--set", "plan.patch_size=[64,64]"]) == 0
    ck = load_checkpoint(run / "best.pt")
    import hashlib

    sha = hashlib.sha256(pth.read_bytes()).hexdigest()
    rec = ck.model_card["pretrained"]
    assert rec["file"] == "resnet18-imagenet.pth" and rec["sha256"] == sha and rec["arch"] == "resnet18"
    used = [k for k in sd if not k.startswith("fc.") and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert rec["parameters"] == n_file and rec["loaded"] + rec["adapted"] == len(used) == 60
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["pretrained"] == str(pth) and cfg["model"]["pretrained_sha256"] == sha
    enc = {k[len("encoder."):]: v for k, v in ck.state_dict.items() if k.startswith("encoder.")}
    assert torch.equal(enc["layer3.1.conv2.weight"], sd["layer3.1.conv2.weight"])
    assert torch.equal(enc["layer2.0.downsample.0.weight"], sd["layer2.0.downsample.0.weight"])
    assert torch.allclose(enc["conv1.weight"], sd["conv1.weight"].sum(1, keepdim=True))  # grey = R + G + B
    # the 2D encoder is torchvision's: its parameters = the file's, less the two RGB planes of conv1
    net = ck.build_network()
    assert sum(p.numel() for p in net.encoder.parameters()) == n_file - 2 * 64 * 7 * 7


def test_pretrained_loads_into_a_3d_preset_by_inflation_with_torchvisions_counts(tmp_path):
    sd = torchvision_resnet_state_dict([3, 4, 6, 3], bottleneck=True, seed=4)
    n_file = _fits_preset_counts(sd, "resnet50")
    pth = tmp_path / "resnet50.pth"
    torch.save(sd, pth)
    net = ResUNet.from_preset("resnet50", spatial_dims=3, in_channels=3, out_channels=2)
    rec = load_pretrained_file(net, pth)
    assert rec["arch"] == "resnet50" and rec["parameters"] == n_file
    w = net.encoder.state_dict()["layer2.0.conv2.weight"]
    assert torch.equal(w, inflate(sd["layer2.0.conv2.weight"], (3, 3, 3)))
    # 3D: every 2D k x k kernel becomes k x k x k, so each conv holds k times the file's values
    kernel_k = {k: v.shape[-1] for k, v in sd.items() if k.endswith("weight") and v.dim() == 4}
    expected = n_file + sum(sd[k].numel() * (kk - 1) for k, kk in kernel_k.items())
    assert sum(p.numel() for p in net.encoder.parameters()) == expected


def test_pretrained_file_that_does_not_fit_the_preset_is_one_clear_line(tmp_path, capsys):
    pth = tmp_path / "r50.pth"
    torch.save(torchvision_resnet_state_dict([3, 4, 6, 3], bottleneck=True), pth)
    with pytest.raises(ModelError, match=r"holds torchvision resnet50 weights, which do not fit preset 'resnet18'; "
                                         r"use --preset resnet50"):
        load_pretrained_file(ResUNet.from_preset("resnet18", spatial_dims=2), pth)
    data = make_msd(tmp_path / "msd", n_cases=2)
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", *FAST,
                 "--pretrained", str(pth)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) >= 1 and err[-1].startswith("resunet train: error: --pretrained ")
    assert "preset 'tiny' has no torchvision encoder" in err[-1] and "use --preset resnet50" in err[-1]
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state dict")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run2"), "--epochs", "1", *FAST,
                 "--preset", "resnet18", "--spatial-dims", "2", "--pretrained", str(junk)]) == 2
    assert "junk.pth: cannot be read" in capsys.readouterr().err
