"""The training loop's phases, each run alone (issue 18 point 4): set-up, one epoch, end of epoch, finish.

Real files: a tiny MSD dataset written with nibabel (tests/test_training.py's), the tiny preset, CPU.
"""

from __future__ import annotations

import csv

import pytest
import torch
from test_training import make_msd

from resunet.training.checkpoint import load_checkpoint
from resunet.training.config import TrainConfig
from resunet.training.loop import EpochStats, end_of_epoch, finish, set_up, train_one_epoch


class _NoBar:
    """What the phases need of a rich progress bar (tasks, updates), without drawing."""

    def __init__(self) -> None:
        self.updates: list[dict] = []

    def add_task(self, description: str, total: int, info: str) -> int:
        return len(self.updates)

    def update(self, task: int, **kw) -> None:
        self.updates.append(kw)


@pytest.fixture()
def cfg(tmp_path):
    torch.set_num_threads(1)
    data = make_msd(tmp_path / "data", n_cases=3)
    cfg = TrainConfig().override([
        "model.preset=tiny", "device=cpu", "dataset.num_workers=0", "iterations_per_epoch=2", "progress=false",
        "threads=1", "tensorboard=false", "validation.overlap=0.25", "epochs=2", "dataset.folds=3",
        "validation.save_predictions=true"])
    cfg.data, cfg.out = str(data), str(tmp_path / "run")
    return cfg.check()


def test_set_up_plans_builds_and_loads_without_training(cfg, tmp_path):
    run = set_up(cfg)
    assert run.start_epoch == 0 and run.best_dice is None and run.history == []
    assert len(run.train_ids) == 2 and len(run.val_ids) == 1  # 3 folds of 3 cases
    assert (run.out / "config.yaml").is_file() and (run.out / "plan.json").is_file()
    assert not (run.out / "last.pt").exists()  # nothing trained yet
    assert run.steps == 2 and run.net is run.model  # one process: the model is the network
    assert run.plan.patch_size and sum(p.numel() for p in run.net.parameters()) > 0


def test_one_epoch_steps_the_optimiser_and_reports_a_finite_loss(cfg):
    run = set_up(cfg)
    before = [p.detach().clone() for p in run.net.parameters()]
    bar = _NoBar()
    stats = train_one_epoch(run, 0, bar)
    assert stats.steps == 2 and torch.isfinite(torch.tensor(stats.train_loss)) and stats.lr > 0
    assert len(bar.updates) == 2  # one per step
    assert any(not torch.equal(a, b) for a, b in zip(before, run.net.parameters()))
    assert not (run.out / "last.pt").exists()  # the epoch's end writes files, not the pass


def test_end_of_epoch_validates_logs_and_writes_the_resume_point(cfg):
    run = set_up(cfg)
    row = end_of_epoch(run, 1, EpochStats(train_loss=0.5, seconds=2.0, steps=2, lr=0.01), None)  # the last epoch
    assert row["epoch"] == 2 and row["train_loss"] == 0.5 and row["val_dice"] != ""
    assert run.best_epoch == 2 and abs(run.best_dice - row["val_dice"]) < 1e-5
    last = load_checkpoint(run.out / "last.pt")
    assert last.train_state["epoch"] == 2 and last.train_state["best_epoch"] == 2
    assert load_checkpoint(run.out / "best.pt").train_state is None
    run.logger.close()
    rows = list(csv.DictReader((run.out / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["2"]


def test_finish_predicts_the_held_out_cases_from_best(cfg):
    run = set_up(cfg)
    result = finish(run)  # no epoch ran: best.pt = the weights as they are
    assert (run.out / "best.pt").is_file() and result.epochs == 2 and result.best_dice is None
    assert [p.name for p in (run.out / "validation").iterdir()] == [f"{run.val_ids[0]}.nii.gz"]
