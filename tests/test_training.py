"""`resunet train` end to end on tiny generated datasets (real NIfTI files written by nibabel).

Covers the MSD and nnU-Net v2 layouts, 3D and 2D, the files a run writes, resume after SIGKILL
(bit-for-bit against an uninterrupted deterministic run) and DDP with two gloo processes.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from resunet.cli import main as cli_main
from resunet.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]

# Small and quick: the tiny preset on 20^3 volumes, 2 steps per epoch, one thread per process.
FAST = ["--preset", "tiny", "--device", "cpu",
        "--set", "dataset.num_workers=0", "--set", "iterations_per_epoch=2", "--set", "progress=false",
        "--set", "threads=1", "--set", "tensorboard=false", "--set", "validation.overlap=0.25"]


def sphere_case(rng: np.random.Generator, n: int = 20, spacing=(1.5, 1.5, 1.5), labels: int = 1):
    """A noisy bright sphere (label 1) and, with ``labels=2``, a smaller dark one (label 2); RAS affine."""
    g = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1)
    lab = np.zeros((n, n, n), np.uint8)
    img = 100 + rng.normal(0, 5, lab.shape)
    c, r = rng.uniform(n * 0.4, n * 0.6, 3), rng.uniform(n * 0.18, n * 0.25)
    lab[np.linalg.norm(g - c, axis=-1) < r] = 1
    if labels == 2:
        c2 = rng.uniform(n * 0.2, n * 0.3, 3)
        lab[np.linalg.norm(g - c2, axis=-1) < n * 0.12] = 2
    img = img + 80 * (lab == 1) - 60 * (lab == 2)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-10, 5, 3)
    return img.astype(np.float32), lab, affine


def make_msd(root: Path, n_cases: int = 4, seed: int = 0, labels: int = 1) -> Path:
    """MSD layout: dataset.json with a `training` list, imagesTr/caseN.nii.gz, labelsTr/caseN.nii.gz."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n_cases):
        img, lab, aff = sphere_case(rng, labels=labels)
        nib.save(nib.Nifti1Image(img, aff), root / f"imagesTr/case{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), root / f"labelsTr/case{i}.nii.gz")
        training.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    names = {"0": "background", "1": "sphere", "2": "dark"} if labels == 2 else {"0": "background", "1": "sphere"}
    (root / "dataset.json").write_text(json.dumps({"name": "spheres", "modality": {"0": "MRI"}, "labels": names,
                                                   "training": training, "numTraining": n_cases}))
    return root


def make_nnunet(root: Path, n_cases: int = 4, seed: int = 1, channels: int = 2) -> Path:
    """nnU-Net v2 raw layout: imagesTr/CASE_000C.nii.gz per channel, labelsTr/CASE.nii.gz."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n_cases):
        img, lab, aff = sphere_case(rng, spacing=(1.2, 1.2, 3.0))
        for c in range(channels):
            nib.save(nib.Nifti1Image(img * (1 + c) + c, aff), root / f"imagesTr/sph_{i:03d}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), root / f"labelsTr/sph_{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(c): ["T1", "T2"][c] for c in range(channels)},
        "labels": {"background": 0, "sphere": 1}, "numTraining": n_cases, "file_ending": ".nii.gz"}))
    return root


def _log(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_msd_3d_run_writes_everything_and_learns(tmp_path):
    data = make_msd(tmp_path / "msd", labels=2)
    run = tmp_path / "run"
    rc = cli_main(["train", "--data", str(data), "--out", str(run), "--epochs", "4", "--spatial-dims", "3",
                   "--fold", "1", *FAST, "--set", "dataset.folds=2", "--set", "optim.optimizer=adamw",
                   "--set", "optim.lr=0.01", "--set", "optim.scheduler=cosine", "--set", "optim.warmup_epochs=1",
                   "--set", "validation.every=2"])
    assert rc == 0
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "plan.json", "log.csv", "best.pt", "last.pt"}
    rows = _log(run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[0]["val_dice"] == "" and rows[1]["val_dice"] != ""  # validation every 2 epochs
    assert {"time_s", "samples_per_s", "lr", "train_loss", "val_dice_sphere", "val_dice_dark"} <= set(rows[0])
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])  # it learns something
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] < lrs[1]  # warm-up, then cosine decay
    assert lrs[1] > lrs[2] > lrs[3]
    plan = json.loads((run / "plan.json").read_text())
    assert plan["spatial_dims"] == 3 and plan["spacing"] == [1.5, 1.5, 1.5] and len(plan["patch_size"]) == 3
    assert all(p % d == 0 for p, d in zip(plan["patch_size"], plan["size_divisor"]))
    best = load_checkpoint(run / "best.pt")
    assert best.labels == {"0": "background", "1": "sphere", "2": "dark"} and best.channels == ["MRI"]
    assert best.train_state is None and best.plan["normalization"][0]["scheme"] == "zscore"
    td = best.model_card["training_data"]
    assert len(td["val_cases"]) == 2 and not set(td["val_cases"]) & set(td["train_cases"])
    net = best.build_network()
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *plan["patch_size"]))
    assert out.shape == (1, 3, *plan["patch_size"])
    last = load_checkpoint(run / "last.pt")
    assert last.train_state["epoch"] == 4 and "optimizer" in last.train_state
    assert float(best.model_card["metrics"]["val_dice"]["dice_mean"]) == pytest.approx(
        max(float(r["val_dice"]) for r in rows if r["val_dice"]), abs=1e-5)
    # a second run into the same folder without --resume is refused (exit code 2, no traceback)
    assert cli_main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", *FAST]) == 2


def test_nnunet_2d_multichannel_on_thick_slices(tmp_path):
    data = make_nnunet(tmp_path / "nnunet")
    run = tmp_path / "run2d"
    rc = cli_main(["train", "--data", str(data), "--out", str(run), "--epochs", "2", "--spatial-dims", "2", *FAST,
                   "--set", "dataset.folds=2", "--set", "model.deep_supervision=false",
                   "--set", "augment.elastic_prob=0.5", "--set", "augment.bias_prob=0.5",
                   "--set", "dataset.cache=disk"])
    assert rc == 0
    assert len(list((run / "cache").glob("*.pt"))) == 4  # every case prepared once, on disk (PersistentDataset)
    plan = json.loads((run / "plan.json").read_text())
    # 1.2 x 1.2 x 3 mm: 2D slices along the thick axis, which keeps its native spacing
    assert plan["spatial_dims"] == 2 and plan["slice_axis"] == 2 and plan["spacing"][2] is None
    assert len(plan["patch_size"]) == 2 and plan["patch_size"][0] >= 16
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt.channels == ["T1", "T2"] and ckpt.network["spatial_dims"] == 2 and ckpt.network["in_channels"] == 2
    assert len(_log(run)) == 2 and _log(run)[-1]["val_dice_sphere"] != ""


def _train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(run), "--epochs", "3", "--seed", "3", *FAST,
            "--set", "deterministic=true", "--set", "dataset.folds=1", *extra]


def test_resume_after_sigkill_is_bit_for_bit(tmp_path):
    """Kill -9 a run after its first checkpoint, resume it: the weights equal an uninterrupted run's."""
    data = make_msd(tmp_path / "msd", n_cases=2)
    ref_run, killed_run = tmp_path / "ref", tmp_path / "killed"
    assert cli_main(_train_args(data, ref_run)) == 0  # in-process: saves a second interpreter start

    proc = subprocess.Popen([sys.executable, "-m", "resunet", *_train_args(data, killed_run)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (killed_run / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    epoch_at_kill = load_checkpoint(killed_run / "last.pt").train_state["epoch"]
    assert 1 <= epoch_at_kill < 3
    assert cli_main(_train_args(data, killed_run, "--resume")) == 0

    ref, resumed = load_checkpoint(ref_run / "last.pt"), load_checkpoint(killed_run / "last.pt")
    assert resumed.train_state["epoch"] == ref.train_state["epoch"] == 3
    assert ref.state_dict.keys() == resumed.state_dict.keys()
    for k in ref.state_dict:
        assert torch.equal(ref.state_dict[k], resumed.state_dict[k]), k
    ref_mom = ref.train_state["optimizer"]["state"]
    res_mom = resumed.train_state["optimizer"]["state"]
    assert all(torch.equal(ref_mom[i]["momentum_buffer"], res_mom[i]["momentum_buffer"]) for i in ref_mom)
    assert [r["train_loss"] for r in _log(ref_run)] == [r["train_loss"] for r in _log(killed_run)]
    assert not torch.are_deterministic_algorithms_enabled()  # the process-wide setting was put back


def test_resume_with_more_epochs_continues_the_schedule_of_the_new_total(tmp_path, caplog):
    """A run planned for 1 epoch, resumed with --epochs 3, follows a 3-epoch schedule from epoch 2 on
    (the saved schedule would have kept the learning rate at 0 after its last epoch)."""
    data = make_msd(tmp_path / "msd", n_cases=2)
    ref_run, short_run = tmp_path / "ref", tmp_path / "short"
    assert cli_main(_train_args(data, ref_run, "--set", "optim.scheduler=poly")) == 0
    assert cli_main([*_train_args(data, short_run, "--set", "optim.scheduler=poly"), "--epochs", "1"]) == 0
    with caplog.at_level("WARNING"):
        assert cli_main(_train_args(data, short_run, "--set", "optim.scheduler=poly", "--resume")) == 0
    assert "recomputed for 3 epochs" in caplog.text
    ref_lr = [float(r["lr"]) for r in _log(ref_run)]
    lr = [float(r["lr"]) for r in _log(short_run)]
    assert len(lr) == 3 and lr[1] > 0
    assert lr[1:] == pytest.approx(ref_lr[1:], rel=1e-9)
    assert load_checkpoint(short_run / "last.pt").model_card["epochs"] == 3


def test_ddp_two_gloo_processes_keep_identical_weights(tmp_path):
    data = make_msd(tmp_path / "msd")
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "resunet", "train", "--data", str(data), "--out", str(run), "--epochs", "2", *FAST,
           "--set", "dataset.folds=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    last = load_checkpoint(run / "last.pt")
    hashes = last.train_state["rank_weight_sha256"]
    assert last.train_state["world_size"] == 2 and len(hashes) == 2 and hashes[0] == hashes[1]
    assert len(_log(run)) == 2  # rank 0 alone writes the log
    assert res.stdout.count("trained 2 epochs") == 1
