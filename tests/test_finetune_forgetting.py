"""Fine-tuning without forgetting (issue 21): ``resunet train --init-from`` with rehearsal, a frozen
encoder, the parent as epoch 0 of the epoch choice, averaging with the parent; and ``--set finetune.*``.

A tiny parent trained by the real loop on real NIfTI files (nibabel), fine-tuned by the real loop for a
few steps on 2 cores; every claim is checked on the weights, the sampler's draws or the log it wrote.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from test_training import FAST, make_msd

from resunet.cli import build_parser, main
from resunet.cli.train_cmd import build_config
from resunet.io.nifti import read_nifti
from resunet.package_data import EXAMPLE_BRAINMASK
from resunet.training.checkpoint import load_checkpoint
from resunet.training.config import FineTuneConfig, TrainConfig
from resunet.errors import ConfigError
from resunet.training.dataset import load_dataset
from resunet.training.loop import _distill_loss, set_up
from resunet.training.rehearsal import mixed_draws, regenerate_parent_data

#: one fine-tuning run: tiny sizes, no rehearsal / hold-out unless a test turns them on; each test says which
#: of the forgetting remedies it checks (masked copies and train_only off unless a test turns them on)
OFF = ["finetune.masked_copies=0", "finetune.train_only=null"]
QUICK = ["--device", "cpu", "--set", "dataset.num_workers=0", "--set", "iterations_per_epoch=2",
         "--set", "progress=false", "--set", "threads=1", "--set", "tensorboard=false",
         "--set", "validation.overlap=0.25", *(a for o in OFF for a in ("--set", o))]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A tiny model trained by the real loop (6 epochs x 4 steps, Adam): it finds the spheres."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("parent")
    data = make_msd(root / "data", n_cases=3)
    assert main(["train", "--data", str(data), "--out", str(root / "run"), "--epochs", "6", *FAST,
                 "--set", "optim.optimizer=adam", "--set", "optim.lr=0.003",
                 "--set", "iterations_per_epoch=4", "--set", "dataset.folds=1"]) == 0
    return root / "run" / "best.pt"


def _args(*argv: str):
    return build_parser().parse_args(["train", "--data", "D", "--out", "R", *argv])


def test_set_finetune_epochs_and_lr_win_and_explicit_flags_win_over_them():
    cfg = build_config(_args("--init-from", "p.pt", "--set", "finetune.epochs=3", "--set", "finetune.lr=0.004"))
    assert (cfg.epochs, cfg.optim.lr) == (3, 0.004) and cfg.finetune.epochs == 3
    default = build_config(_args("--init-from", "p.pt"))
    assert (default.epochs, default.optim.lr) == (FineTuneConfig().epochs, FineTuneConfig().lr)
    explicit = build_config(_args("--init-from", "p.pt", "--set", "finetune.epochs=3", "--epochs", "7",
                                  "--set", "finetune.lr=0.004", "--set", "optim.lr=0.02"))
    assert (explicit.epochs, explicit.optim.lr) == (7, 0.02)
    scratch = build_config(_args("--set", "finetune.epochs=3"))  # no --init-from: from-scratch defaults
    assert scratch.epochs == TrainConfig().epochs and scratch.optim.lr == TrainConfig().optim.lr
    assert build_config(_args("--init-from", "p.pt", "--rehearse", "none")).finetune.rehearse is None


def test_mixed_draws_take_the_asked_share_from_the_rehearsal_cases_in_turn():
    draws = mixed_draws(n_cases=3, n_rehearse=2, fraction=0.5, total=12)
    rehearsal = [i for i in draws if i >= 3]
    assert len(rehearsal) == 6 and rehearsal == [3, 4, 3, 4, 3, 4]
    assert [i for i in draws if i < 3] == [0, 1, 2, 0, 1, 2]
    assert mixed_draws(3, 2, 0.0, 5) == [0, 1, 2, 0, 1]
    # fewer draws per epoch than cases: the cycle goes on in the next epoch, so every case is drawn
    e0, e1 = (mixed_draws(n_cases=4, n_rehearse=8, fraction=0.5, total=10, epoch=e) for e in (0, 1))
    assert sorted(i for i in e0 + e1 if i >= 4) == sorted([*range(4, 12), 4, 5])
    assert sorted(i for i in e0 if i < 4) == [0, 0, 1, 2, 3] and sorted(i for i in e1 if i < 4) == [0, 1, 1, 2, 3]
    assert {i for e in range(3) for i in mixed_draws(7, 0, 0.0, 3, epoch=e)} == set(range(7))
    # masked copies (indices after the cases, rehearsal after them): their share of the non-rehearsal draws
    draws = mixed_draws(n_cases=4, n_rehearse=2, fraction=0.5, total=16, n_masked=4, masked_fraction=0.25)
    assert sorted(i for i in draws if i >= 8) == [8, 8, 8, 8, 9, 9, 9, 9]
    assert [i for i in draws if 4 <= i < 8] == [4, 5] and sorted(i for i in draws if i < 4) == [0, 0, 1, 1, 2, 3]
    # a share below one draw an epoch: counted over the epochs (0.1 of 5 draws = one copy every 2nd epoch)
    per_epoch = [sum(4 <= i < 8 for i in mixed_draws(4, 2, 0.5, 10, epoch=e, n_masked=4, masked_fraction=0.1))
                 for e in range(6)]
    assert per_epoch == [0, 1, 0, 1, 0, 1]


def _rehearsal_run(parent, tmp_path, n_old: int, iterations: int, *settings: str):
    """A set-up fine-tune of ``parent`` on 2 corrections, rehearsing an ``n_old``-case dataset (no
    holdout, one fold; masked copies and train_only off), with ``settings``; returns (run, the corrections,
    the rehearsed dataset)."""
    data = make_msd(tmp_path / "corr", n_cases=2, seed=5)
    other = make_msd(tmp_path / "old", n_cases=n_old, seed=9)
    cfg = TrainConfig().override(["device=cpu", "dataset.num_workers=0", "progress=false", "threads=1",
                                  "tensorboard=false", f"iterations_per_epoch={iterations}", "finetune.holdout=0",
                                  "dataset.folds=1", f"finetune.rehearse={other}", *settings, *OFF])
    cfg.data, cfg.out, cfg.finetune.init_from = str(data), str(tmp_path / "run"), str(parent)
    return set_up(cfg), data, other


def test_rehearsal_cases_are_drawn_and_named_in_the_card(parent, tmp_path):
    run, data, other = _rehearsal_run(parent, tmp_path, 3, 6, "finetune.rehearse_fraction=0.5")
    drawn = list(run.sampler)
    assert len(run.train_ds) == 5 and sum(i >= 2 for i in drawn) == len(drawn) // 2
    patches = run.train_ds[next(i for i in drawn if i >= 2)]
    patch = patches[0] if isinstance(patches, list) else patches
    assert patch["case_id"] in {"case0", "case1", "case2"}
    # the rehearsal case is the other dataset's: its image differs from every correction's
    corr = [np.asarray(nib.load(data / f"imagesTr/case{i}.nii.gz").dataobj) for i in range(2)]
    old = np.asarray(nib.load(other / f"imagesTr/{patch['case_id']}.nii.gz").dataobj)
    assert all(not np.array_equal(old, c) for c in corr)
    assert run.rehearsal["dataset_root"] == str(other) and run.rehearsal["cases"] == ["case0", "case1", "case2"]


def test_parent_rehearsal_unknown_parent_says_none_is_used(parent, tmp_path, caplog):
    data = make_msd(tmp_path / "corr", n_cases=2, seed=5)
    caplog.set_level(logging.INFO, logger="resunet.training.loop")
    rc = main(["train", "--init-from", str(parent), "--data", str(data), "--out", str(tmp_path / "run"), *QUICK,
               "--epochs", "1", "--rehearse", "parent"])
    assert rc == 0
    assert "no rehearsal: the parent's training data is not known" in caplog.text and "--rehearse DATASET" in caplog.text
    card = load_checkpoint(tmp_path / "run" / "best.pt").model_card
    assert card["rehearsal"]["setting"] == "parent" and "dataset" not in card["rehearsal"]


def test_bundled_model_rehearsal_set_is_the_example_as_is_and_skull_stripped(tmp_path):
    spec = regenerate_parent_data(tmp_path / "rehearsal")
    assert [c.case_id for c in spec.cases] == ["colin_orig", "colin_stripped"] and spec.labels == {0: "background", 1: "brain"}
    orig = read_nifti(spec.case("colin_orig").images[0]).array
    stripped = read_nifti(spec.case("colin_stripped").images[0]).array
    brain = np.asarray(read_nifti(EXAMPLE_BRAINMASK).array) > 0
    assert np.all(stripped[~brain] == 0) and np.array_equal(stripped[brain], orig[brain]) and np.any(orig[~brain] != 0)


def test_frozen_encoder_keeps_the_parents_encoder_and_trains_the_decoder(parent, tmp_path):
    assert FineTuneConfig().freeze_encoder  # the default (bench/results/review.md)
    data = make_msd(tmp_path / "corr", n_cases=2, seed=5)
    out = tmp_path / "run"
    assert main(["train", "--init-from", str(parent), "--data", str(data), "--out", str(out), *QUICK, "--epochs", "2",
                 "--rehearse", "none", "--set", "optim.lr=0.01"]) == 0
    before, after = load_checkpoint(parent).state_dict, load_checkpoint(out / "last.pt").state_dict
    enc = [k for k in after if k.startswith("encoder.")]
    dec = [k for k in after if k.startswith("decoder.")]
    assert enc and dec
    assert all(torch.equal(after[k], before[k]) for k in enc)
    assert any(not torch.equal(after[k], before[k]) for k in dec)
    assert load_checkpoint(out / "best.pt").model_card["finetune"]["freeze_encoder"] is True


def test_freeze_decoder_levels_keeps_the_coarsest_decoder_levels_and_trains_the_finer_ones(parent, tmp_path, capsys):
    assert FineTuneConfig().freeze_decoder_levels == 0  # the default: the whole decoder learns
    data = make_msd(tmp_path / "corr", n_cases=2, seed=5)
    out = tmp_path / "run"
    assert main(["train", "--init-from", str(parent), "--data", str(data), "--out", str(out), *QUICK, "--epochs", "2",
                 "--rehearse", "none", "--set", "optim.lr=0.01", "--set", "finetune.freeze_decoder_levels=1"]) == 0
    before, after = load_checkpoint(parent).state_dict, load_checkpoint(out / "last.pt").state_dict
    frozen = [k for k in after if k.startswith(("encoder.", "decoder.0."))]
    learning = [k for k in after if k.startswith("decoder.") and not k.startswith("decoder.0.")]
    assert frozen and learning
    assert all(torch.equal(after[k], before[k]) for k in frozen)  # weights and norm statistics
    assert any(not torch.equal(after[k], before[k]) for k in learning)
    assert load_checkpoint(out / "best.pt").model_card["finetune"]["freeze_decoder_levels"] == 1
    levels = sum(1 for k in after if k.startswith("decoder.") and k.endswith(".up.weight"))
    rc = main(["train", "--init-from", str(parent), "--data", str(data), "--out", str(tmp_path / "all"), *QUICK,
               "--epochs", "1", "--rehearse", "none", "--set", f"finetune.freeze_decoder_levels={levels}"])
    err = capsys.readouterr().err
    assert rc != 0 and "freeze_decoder_levels" in err and "Traceback" not in err  # nothing would learn: refused


def test_encoder_lr_scale_zero_keeps_the_encoder_and_one_moves_it(parent, tmp_path):
    data = make_msd(tmp_path / "corr", n_cases=2, seed=5)
    before = load_checkpoint(parent).state_dict
    moved = {}
    for scale in (0.0, 1.0):
        out = tmp_path / f"run{scale}"
        assert main(["train", "--init-from", str(parent), "--data", str(data), "--out", str(out), *QUICK, "--epochs",
                     "1", "--rehearse", "none", "--set", f"finetune.encoder_lr_scale={scale}",
                     "--set", "finetune.freeze_encoder=false",
                     "--set", "optim.weight_decay=0"]) == 0
        after = load_checkpoint(out / "last.pt").state_dict
        moved[scale] = any(not torch.equal(after[k], before[k]) for k in after if k.startswith("encoder."))
    assert moved == {0.0: False, 1.0: True}


def test_best_epoch_keeps_the_parent_when_fine_tuning_makes_the_held_out_case_worse(parent, tmp_path):
    """Corrections whose masks are wrong (inverted: the sphere is 'background') at a high learning rate
    make the held-out correction (a true mask) worse: best.pt must stay the parent."""
    data = make_msd(tmp_path / "corr", n_cases=4, seed=5)
    meta = json.loads((data / "dataset.json").read_text())
    held = "case2"  # the one finetune.holdout picks with the default split seed (checked below)
    for i in range(4):
        path = data / f"labelsTr/case{i}.nii.gz"
        img = nib.load(path)
        if f"case{i}" != held:
            nib.save(nib.Nifti1Image((np.asarray(img.dataobj) == 0).astype(np.uint8), img.affine), path)
    assert meta["labels"] == {"0": "background", "1": "sphere"}
    out = tmp_path / "run"
    assert main(["train", "--init-from", str(parent), "--data", str(data), "--out", str(out), *QUICK, "--epochs", "2",
                 "--rehearse", "none", "--set", "optim.lr=0.05", "--set", "finetune.holdout_min_cases=4",
                 "--set", "finetune.parent_weight=0"]) == 0  # a hold-out from 4 cases; best.pt exactly one epoch's
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    dice = [float(r["val_dice"]) for r in rows]
    assert dice[0] > 0.3 and max(dice[1:]) < dice[0]  # the case does make things worse
    best = load_checkpoint(out / "best.pt")
    parent_sd = load_checkpoint(parent).state_dict
    assert all(torch.equal(best.state_dict[k], parent_sd[k]) for k in parent_sd)
    assert best.model_card["finetune"]["holdout_cases"] == [held] and best.model_card["finetune"]["best_epoch"] == 0
    last = load_checkpoint(out / "last.pt").state_dict
    assert any(not torch.equal(last[k], parent_sd[k]) for k in parent_sd)


def test_parent_weight_averages_the_fine_tuned_weights_with_the_parents(parent, tmp_path):
    data = make_msd(tmp_path / "corr", n_cases=2, seed=5)
    out = tmp_path / "run"
    assert main(["train", "--init-from", str(parent), "--data", str(data), "--out", str(out), *QUICK, "--epochs", "1",
                 "--rehearse", "none", "--set", "finetune.parent_weight=0.25"]) == 0
    p, last, best = (load_checkpoint(f).state_dict for f in (parent, out / "last.pt", out / "best.pt"))
    for k in p:
        if p[k].is_floating_point():
            torch.testing.assert_close(best[k], 0.25 * p[k] + 0.75 * last[k])
    assert any(not torch.equal(best[k], last[k]) for k in p if p[k].is_floating_point())


def test_masked_copies_are_the_training_corrections_masked_with_their_label_and_drawn(parent, tmp_path, caplog):
    data = make_msd(tmp_path / "corr", n_cases=4, seed=5)
    caplog.set_level(logging.INFO, logger="resunet.training.loop")
    cfg = TrainConfig().override(["device=cpu", "dataset.num_workers=0", "progress=false", "threads=1",
                                  "tensorboard=false", "iterations_per_epoch=8", "finetune.rehearse=null", *OFF,
                                  "finetune.masked_copies=0.5", "finetune.holdout=1", "finetune.holdout_min_cases=4"])
    cfg.data, cfg.out, cfg.finetune.init_from = str(data), str(tmp_path / "run"), str(parent)
    run = set_up(cfg)
    assert len(run.val_ids) == 1 and len(run.train_ids) == 3
    copies = load_dataset(tmp_path / "run" / "masked_corrections")
    assert [c.case_id for c in copies.cases] == [f"{c}_masked" for c in sorted(run.train_ids + run.val_ids)]
    # the held-out correction's copy is validated on (after the correction itself), never trained on
    assert len(run.val_ds) == 2
    val_masked = np.asarray(run.val_ds[1]["image"])
    assert not np.array_equal(val_masked, np.asarray(run.val_ds[0]["image"]))
    assert all(run.train_ds[i]["case_id"] != f"{run.val_ids[0]}_masked" if not isinstance(run.train_ds[i], list) else
               all(p["case_id"] != f"{run.val_ids[0]}_masked" for p in run.train_ds[i]) for i in range(len(run.train_ds)))
    for case_id in run.train_ids + run.val_ids:
        image = np.asarray(nib.load(data / f"imagesTr/{case_id}.nii.gz").dataobj)
        label = np.asarray(nib.load(data / f"labelsTr/{case_id}.nii.gz").dataobj) > 0
        masked = np.asarray(nib.load(tmp_path / f"run/masked_corrections/imagesTr/{case_id}_masked.nii.gz").dataobj)
        copy_label = np.asarray(nib.load(tmp_path / f"run/masked_corrections/labelsTr/{case_id}_masked.nii.gz").dataobj)
        faces = np.concatenate([image[0].ravel(), image[-1].ravel(), image[:, 0].ravel(), image[:, -1].ravel(),
                                image[:, :, 0].ravel(), image[:, :, -1].ravel()])
        assert np.array_equal(copy_label > 0, label)
        assert np.array_equal(masked[label], image[label])
        assert np.all(masked[~label] == np.median(faces).astype(image.dtype)) and np.any(image[~label] != masked[~label])
    # drawn as corrections: the sampler's indices reach the copies (after the 3 corrections), half the draws
    # over 3 epochs of 8 draws (4 cycles of the 6 cases)
    drawn = [i for e in range(3) for i in (run.sampler.set_epoch(e) or list(run.sampler))]
    assert len(run.train_ds) == 6 and {i for i in drawn if i >= 3} == {3, 4, 5} and sum(i >= 3 for i in drawn) == len(drawn) // 2
    patches = run.train_ds[3]
    assert (patches[0] if isinstance(patches, list) else patches)["case_id"].endswith("_masked")
    assert "of the 3 training corrections (trained on) and of the 1 held-out one(s)" in caplog.text


def test_train_only_norm_and_stem_change_only_those_parameters(parent, tmp_path):
    data = make_msd(tmp_path / "corr", n_cases=2, seed=5)
    before = load_checkpoint(parent).state_dict
    for which, learns in (("norm", lambda k: ".bn" in k or "downsample.1." in k or ".norm" in k),
                          ("stem", lambda k: k.startswith(("encoder.conv1.", "encoder.bn1.", "encoder.layer1.")))):
        out = tmp_path / which
        assert main(["train", "--init-from", str(parent), "--data", str(data), "--out", str(out), *QUICK, "--epochs", "2",
                     "--rehearse", "none", "--set", "optim.lr=0.01", "--set", f"finetune.train_only={which}"]) == 0
        after = load_checkpoint(out / "last.pt").state_dict
        params = {n for n, _ in load_checkpoint(parent).build_network().named_parameters()}
        moved = {k for k in params if not torch.equal(after[k], before[k])}
        assert moved and all(learns(k) for k in moved), (which, sorted(moved))
        assert all(torch.equal(after[k], before[k]) for k in params if not learns(k))
        assert load_checkpoint(out / "best.pt").model_card["finetune"]["train_only"] == which
    with pytest.raises(ConfigError, match="masked_copies must be in 0..1"):
        TrainConfig().override(["finetune.masked_copies=1"]).check()
    with pytest.raises(ConfigError, match="train_only"):
        TrainConfig().override(["finetune.train_only=bias"]).check()


def test_distillation_marks_rehearsal_draws_and_its_term_is_zero_for_the_parent_itself(parent, tmp_path):
    run, data, other = _rehearsal_run(parent, tmp_path, 2, 4, "finetune.distill_weight=1.0")
    assert run.teacher is not None and not any(p.requires_grad for p in run.teacher.parameters())
    for i, is_rehearsal in ((0, False), (1, False), (2, True), (3, True)):
        item = run.train_ds[i]
        assert all(bool(s["rehearsal"]) is is_rehearsal for s in (item if isinstance(item, list) else [item]))
    x = torch.stack([s["image"] for s in run.train_ds[2]])[:, :, :16, :16, :16]
    flags = torch.tensor([True, False])
    with torch.no_grad():
        same = _distill_loss(run.teacher, x, run.teacher(x), flags, contextlib.nullcontext())
        other_net = load_checkpoint(parent).build_network().eval()
        for p in other_net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        differs = _distill_loss(run.teacher, x, other_net(x), flags, contextlib.nullcontext())
    assert float(same) == pytest.approx(0.0, abs=1e-6) and float(differs) > 1e-4
    out = tmp_path / "cli"
    assert main(["train", "--init-from", str(parent), "--data", str(data), "--out", str(out), *QUICK, "--epochs", "1",
                 "--rehearse", str(other), "--set", "finetune.distill_weight=0.5"]) == 0
    assert load_checkpoint(out / "best.pt").model_card["finetune"]["distill_weight"] == 0.5


def test_set_accepts_exponent_numbers_that_yaml_1_1_reads_as_strings():
    cfg = TrainConfig().override(["finetune.lr=5e-4", "optim.lr=1E-2", "optim.min_lr=-1e+3"])
    assert (cfg.finetune.lr, cfg.optim.lr, cfg.optim.min_lr) == (5e-4, 1e-2, -1e3)
    with pytest.raises(ConfigError, match="finetune.lr must be a number"):
        TrainConfig().override(["finetune.lr=5e-4x"])
    assert build_config(_args("--init-from", "p.pt", "--set", "finetune.lr=5e-4")).optim.lr == 5e-4
