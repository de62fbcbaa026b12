"""Learning from approved corrections (issue 21 point 5): ``resunet corrections export`` and
``resunet train --init-from``.

Real files throughout: inputs and masks written with nibabel, decisions written by
resunet.inference.review (write_corrected + record_decision, the very code the service runs), a parent
checkpoint trained by the real loop (tiny preset, a few steps on 2 cores), the exported set read back
by resunet.training.dataset.
"""

from __future__ import annotations

import json
import stat

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from test_training import FAST, make_msd, sphere_case

from resunet.cli import main
from resunet.errors import DatasetError
from resunet.inference.review import Decision, mask_sha256, record_decision, voxels_changed, write_corrected
from resunet.io.hashing import sha256_file, sha256_path
from resunet.io.nifti import read_nifti
from resunet.reports.provenance import collect_provenance
from resunet.training.checkpoint import load_checkpoint
from resunet.training.config import FineTuneConfig, TrainConfig
from resunet.training.corrections import CORRECTIONS_JSON, export_corrections
from resunet.training.dataset import load_dataset, read_case
from resunet.training.loop import set_up

LABELS = {1: "sphere"}


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A tiny model trained by the real loop for 2 steps: the 'deployed' parent."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("parent")
    data = make_msd(root / "data", n_cases=2)
    assert main(["train", "--data", str(data), "--out", str(root / "run"), "--epochs", "1", *FAST,
                 "--set", "dataset.val_cases=[case1]"]) == 0
    return root / "run" / "best.pt"


def _decide(job_dir, subject, decision, *, corrected=True, service=True, seed=0, model_sha="ab" * 32):
    """One real decision the way resunet.serve.review writes it (service=True: STATE/jobs/<id>/ layout, input in
    input/, labels in out/predictions.json; service=False: the input named in the provenance)."""
    rng = np.random.default_rng(seed)
    img, lab, aff = sphere_case(rng)
    inp = job_dir / "input"
    inp.mkdir(parents=True)
    nib.save(nib.Nifti1Image(img.astype(np.float32), aff), inp / "scan.nii.gz")
    source = read_nifti(inp / "scan.nii.gz")
    model_arr = ndimage.binary_erosion(lab > 0, iterations=2).astype(np.uint8)  # the model's too small mask
    model_mask = source.with_array(model_arr, is_label=True)
    fixed = source.with_array(lab.astype(np.uint8), is_label=True) if corrected else None
    folder = job_dir / "review"
    files = write_corrected(fixed, source, folder, LABELS, reviewer="dr who", model_name="parent",
                            model_sha256=model_sha) if fixed is not None else {}
    model = {"name": "parent", "sha256": model_sha}
    if service:
        (job_dir / "out").mkdir()
        (job_dir / "out" / "predictions.json").write_text(json.dumps(
            {"model": {**model, "labels": {"0": "background", "1": "sphere"}}}))
        prov = collect_provenance(command=["resunet", "serve", "review", subject], run_id=f"review-{subject}")
        prov["files"] = {"input": [{"name": "scan", "sha256": sha256_path(inp)}]}
        input_sha = sha256_path(inp)
    else:
        prov = collect_provenance(command=["resunet", "app"], files={"input": [inp / "scan.nii.gz"]},
                                  run_id=f"review-{subject}")
        input_sha = sha256_path(inp / "scan.nii.gz")
        model["labels"] = {"0": "background", "1": "sphere"}
    prov["model"] = model
    rec = Decision(subject=subject, decision=decision, reviewer="dr who", comment="fixed the rim",
                   input_sha256=input_sha, model_mask_sha256=mask_sha256(model_mask),
                   corrected_mask_sha256=mask_sha256(fixed) if fixed is not None else None,
                   voxels_changed=voxels_changed(model_mask, fixed if fixed is not None else model_mask, LABELS))
    record_decision(rec, folder, prov, db_path=False, files=files)
    return lab


@pytest.fixture()
def state(tmp_path):
    """A service state folder with two approved corrections, one rejected, one approved as it was;
    plus a decision from another front door whose provenance names its input file."""
    st = tmp_path / "state"
    truth = {"review-job1": _decide(st / "jobs" / "job1", "job1", "approve", seed=1),
             "review-job2": _decide(st / "jobs" / "job2", "job2", "approve", seed=2)}
    _decide(st / "jobs" / "job3", "job3", "reject", seed=3)
    _decide(st / "jobs" / "job4", "job4", "approve", corrected=False, seed=4)
    truth["review-web5"] = _decide(tmp_path / "web" / "case5", "web5", "approve", service=False, seed=5)
    return st, tmp_path / "web", truth


def test_export_writes_only_approved_corrections_as_an_msd_set_with_provenance(state, tmp_path):
    st, web, truth = state
    out = tmp_path / "dataset"
    res = export_corrections([st, web], out)
    assert sorted(res.added) == sorted(truth) and res.kept == [], res.skipped
    skipped = dict(res.skipped)
    assert skipped["review-job3"] == "rejected" and "no correction" in skipped["review-job4"]

    spec = load_dataset(out)  # read back by the training code
    assert spec.layout == "msd" and spec.labels == {0: "background", 1: "sphere"}
    assert sorted(c.case_id for c in spec.cases) == sorted(truth)
    for case in spec.cases:
        images, label = read_case(spec, case)
        assert np.array_equal(np.asarray(label.array), truth[case.case_id])  # the corrected mask, voxel for voxel
        assert images[0].same_grid(label)

    prov = {c["case_id"]: c for c in json.loads((out / CORRECTIONS_JSON).read_text())["cases"]}
    job1 = json.loads((st / "jobs" / "job1" / "review" / "review.json").read_text())["review"]
    assert prov["review-job1"]["decision_id"] == "review-job1" and prov["review-job1"]["reviewer"] == "dr who"
    assert prov["review-job1"]["time_utc"] == job1["time_utc"] and prov["review-job1"]["model"]["sha256"] == "ab" * 32
    assert prov["review-job1"]["input_sha256"] == sha256_path(st / "jobs" / "job1" / "input")
    assert prov["review-job1"]["corrected_mask_sha256"] == job1["corrected_mask_sha256"]
    assert prov["review-job1"]["files"]["label"]["sha256"] == sha256_file(out / "labelsTr" / "review-job1.nii.gz")

    for p in [out, *out.rglob("*")]:  # patient data: 0700 folders, 0600 files
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p


def test_re_export_is_idempotent_and_adds_only_new_decisions(state, tmp_path):
    st, web, truth = state
    out = tmp_path / "dataset"
    export_corrections([st], out)
    before = {p.name: sha256_file(p) for p in out.rglob("*.nii.gz")}
    again = export_corrections([st], out)
    assert again.added == [] and sorted(again.kept) == ["review-job1", "review-job2"]
    assert {p.name: sha256_file(p) for p in out.rglob("*.nii.gz")} == before
    more = export_corrections([st, web], out)
    assert more.added == ["review-web5"] and len(load_dataset(out).cases) == 3
    (out / "corrections.json").unlink()  # an export cut short before its last file: done again, not refused
    redo = export_corrections([st, web], out)
    assert sorted(redo.added) == sorted(truth) and len(load_dataset(out).cases) == 3


def test_export_refuses_nothing_approved_and_a_foreign_folder(state, tmp_path, capsys):
    st, _, _ = state
    rc = main(["corrections", "export", "--from", str(st / "jobs" / "job3"), "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc != 0 and "nothing approved to export" in err and "rejected" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    rc = main(["corrections", "export", "--from", str(st), "--out", str(other)])
    err = capsys.readouterr().err
    assert rc != 0 and "not a corrections dataset" in err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    rc = main(["corrections", "export", "--from", str(st), "--model", "another", "--out", str(tmp_path / "d")])
    assert rc != 0 and "another model" in capsys.readouterr().err


def test_fine_tune_starts_from_the_parent_keeps_its_plan_and_names_it(parent, state, tmp_path):
    st, _, truth = state
    data = tmp_path / "dataset"
    export_corrections([st], data)
    parent_ckpt = load_checkpoint(parent)

    cfg = TrainConfig().override(["device=cpu", "dataset.num_workers=0", "progress=false", "threads=1",
                                  "tensorboard=false", "dataset.val_cases=[review-job2]"])
    cfg.data, cfg.out = str(data), str(tmp_path / "setup")
    cfg.finetune.init_from = str(parent)
    run = set_up(cfg)  # step 0: the parent's weights and plan, not a fresh network or plan
    sd = run.net.state_dict()
    assert sd.keys() == parent_ckpt.state_dict.keys()
    assert all(torch.equal(sd[k].cpu(), parent_ckpt.state_dict[k]) for k in sd)
    assert run.plan.to_dict() == parent_ckpt.plan and run.cfg.model.preset == "tiny"

    out = tmp_path / "child"
    rc = main(["train", "--init-from", str(parent), "--data", str(data), "--out", str(out), "--device", "cpu",
               "--set", "dataset.num_workers=0", "--set", "iterations_per_epoch=1", "--set", "progress=false",
               "--set", "threads=1", "--set", "tensorboard=false", "--epochs", "2",
               "--set", "dataset.val_cases=[review-job2]"])
    assert rc == 0
    child = load_checkpoint(out / "last.pt")
    saved = TrainConfig.from_yaml(out / "config.yaml")
    assert saved.optim.lr == FineTuneConfig().lr < TrainConfig().optim.lr  # the fine-tuning default, --epochs wins
    assert saved.finetune.init_from == str(parent) and child.train_state["epoch"] == saved.epochs == 2
    card = child.model_card
    assert card["parent"] == {"name": parent_ckpt.model_card["name"], "sha256": parent_ckpt.sha256, "file": "best.pt"}
    assert card["corrections"] == [{"case_id": "review-job1", "decision_id": "review-job1"},
                                   {"case_id": "review-job2", "decision_id": "review-job2"}]
    assert child.plan == parent_ckpt.plan and child.network == parent_ckpt.network
    assert any(not torch.equal(child.state_dict[k], parent_ckpt.state_dict[k]) for k in child.state_dict)


def test_fine_tune_refuses_a_dataset_with_other_labels(parent, tmp_path, capsys):
    data = make_msd(tmp_path / "two", n_cases=2, labels=2)
    rc = main(["train", "--init-from", str(parent), "--data", str(data), "--out", str(tmp_path / "run"),
               "--device", "cpu", "--set", "dataset.num_workers=0"])
    err = capsys.readouterr().err
    assert rc != 0 and "are not those of the model" in err and "2=dark" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "last.pt").exists()
