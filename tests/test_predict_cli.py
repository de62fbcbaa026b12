"""``resunet predict``: NIfTI and DICOM (folder, zip) inputs, summaries, shards, resume after SIGKILL, bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from resunet.cli import main
from resunet.io.dicom_writer import write_dicom_series
from resunet.io.loader import load_study
from resunet.io.nifti import write_nifti
from resunet.io.seg import read_dicom_seg
from test_inference_support import single_torch_thread  # noqa: F401  (autouse fixture)
from test_inference_support import make_checkpoint, read_mask, reorient, synthetic_scan

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny model plus the same scan as NIfTI (RAS and LAS), DICOM folder, DICOM zip."""
    root = tmp_path_factory.mktemp("predict")
    scan = synthetic_scan()
    ckpt = make_checkpoint(root / "tiny.pt", scan)
    inputs = root / "inputs"
    write_nifti(scan, inputs / "scan.nii.gz")
    write_nifti(reorient(scan, "LAS"), inputs / "scan_las.nii.gz")
    write_dicom_series(scan, inputs / "scan_dicom", modality="MR")
    with zipfile.ZipFile(root / "scan_zip.zip", "w") as zf:
        for f in sorted((inputs / "scan_dicom").iterdir()):
            zf.write(f, f"series/{f.name}")
    return {"root": root, "ckpt": ckpt, "scan": scan, "inputs": inputs, "zip": root / "scan_zip.zip"}


@pytest.fixture(autouse=True)
def audit_db(tmp_path, monkeypatch):
    db = tmp_path / "audit.sqlite"
    monkeypatch.setenv("RESUNET_AUDIT_DB", str(db))
    return db


def test_nifti_dicom_folder_and_zip_give_masks_on_their_grids_and_the_same_mask(study, tmp_path, audit_db, capsys):
    out = tmp_path / "out"
    code = main(["predict", str(study["inputs"]), str(study["zip"]), "--out", str(out), "--model",
                 str(study["ckpt"]), "--no-tta", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    sources = {"scan": study["inputs"] / "scan.nii.gz", "scan_las": study["inputs"] / "scan_las.nii.gz",
               "scan_dicom": study["inputs"] / "scan_dicom", "scan_zip": study["zip"]}
    ids = set(sources)
    masks = {}
    for case, path in sources.items():
        data, affine = read_mask(out / f"{case}.nii.gz")
        vol = load_study(path)
        src = path if path.name.endswith(".nii.gz") else None
        assert data.shape == vol.shape, case
        np.testing.assert_allclose(affine, vol.affine, atol=1e-5, err_msg=case)
        if src is not None:
            assert np.array_equal(affine, nib.load(str(src)).affine), case  # NIfTI: bit-exact affine
        masks[case] = (data, affine, vol)
    ras = masks["scan"][0]
    assert 0.05 < (ras > 0).mean() < 0.95
    assert np.array_equal(masks["scan_dicom"][0], ras) and np.array_equal(masks["scan_zip"][0], ras)
    las = masks["scan_las"][0]
    assert np.array_equal(np.flip(las, 0), ras)  # LAS = RAS with the first axis flipped
    for case in ("scan_dicom", "scan_zip"):  # DICOM SEG lands on the same voxels
        seg = read_dicom_seg(out / f"{case}.seg.dcm", masks[case][2])
        assert np.array_equal(np.asarray(seg.array), ras), case
    assert not (out / "scan.seg.dcm").exists()

    doc = json.loads((out / "predictions.json").read_text())
    assert doc["counts"] == {"cases": 4, "ok": 4, "failed": 0}
    rec = {r["case"]: r for r in doc["cases"]}
    assert set(rec) == ids
    assert rec["scan"]["input"]["path"] == str((study["inputs"] / "scan.nii.gz").resolve())
    assert len(rec["scan"]["input"]["sha256"]) == 64 and rec["scan"]["model"]["sha256"] == doc["model"]["sha256"]
    count = int((ras > 0).sum())
    assert rec["scan_zip"]["volumes_ml"]["object"] == pytest.approx(count * 1.2 * 2.0 / 1000, rel=1e-4)
    assert rec["scan_zip"]["outputs"]["seg"]["path"] == "scan_zip.seg.dcm"
    assert doc["provenance"]["model"]["sha256"] == doc["model"]["sha256"]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert {r["case"] for r in rows} == ids and all(r["status"] == "ok" for r in rows)
    from resunet.reports.audit import read_runs

    runs = read_runs(audit_db)
    assert len(runs) == 1 and runs[0]["kind"] == "predict"


def test_inputs_of_one_folder_sharing_a_name_get_their_kind_as_suffix_and_all_masks(study, tmp_path, capsys):
    """`a.nii.gz`, `a.zip` and the DICOM folder `a/` side by side: three cases, three masks (the ids
    once refused the whole batch); in two folders the parent names still tell `T1` apart."""
    inputs = tmp_path / "in"
    shutil.copy(study["inputs"] / "scan.nii.gz", inputs.mkdir() or inputs / "a.nii.gz")
    shutil.copy(study["zip"], inputs / "a.zip")
    shutil.copytree(study["inputs"] / "scan_dicom", inputs / "a")
    for site in ("siteA", "siteB"):
        (tmp_path / site).mkdir()
        shutil.copy(study["inputs"] / "scan.nii.gz", tmp_path / site / "T1.nii.gz")
    out = tmp_path / "out"
    code = main(["predict", str(inputs), str(tmp_path / "siteA"), str(tmp_path / "siteB"), "--out", str(out),
                 "--model", str(study["ckpt"]), "--no-tta", "--no-progress", "--no-audit"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "predictions.json").read_text())
    rec = {r["case"]: r for r in doc["cases"]}
    assert set(rec) == {"a_nii_gz", "a_zip", "a_dicom", "siteA__T1", "siteB__T1"}
    assert rec["a_zip"]["input"]["path"] == str((inputs / "a.zip").resolve())
    assert rec["a_dicom"]["input"]["path"] == str((inputs / "a").resolve())
    ref = read_mask(out / "a_nii_gz.nii.gz")[0]
    for case in rec:
        assert np.array_equal(read_mask(out / f"{case}.nii.gz")[0], ref), case


def test_shards_merge_into_one_summary(study, tmp_path):
    out = tmp_path / "sharded"
    args = ["predict", str(study["inputs"] / "scan.nii.gz"), str(study["inputs"] / "scan_las.nii.gz"),
            str(study["zip"]), "--out", str(out), "--model", str(study["ckpt"]), "--no-tta", "--no-progress",
            "--format", "nifti"]
    assert main([*args, "--shard", "1/2"]) == 0
    first = json.loads((out / "predictions.json").read_text())
    assert {r["case"] for r in first["cases"]} == {"scan_las"}  # sorted ids: scan, scan_las, scan_zip
    assert main([*args, "--shard", "0/2"]) == 0
    doc = json.loads((out / "predictions.json").read_text())
    assert {r["case"] for r in doc["cases"]} == {"scan", "scan_las", "scan_zip"}
    assert {r["shard"] for r in doc["cases"]} == {"0/2", "1/2"} and len(doc["runs"]) == 2
    assert not (out / "scan_zip.seg.dcm").exists()  # --format nifti only


def _records(journal: Path) -> list[dict]:
    out = []
    if journal.exists():
        for line in journal.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def test_sigkill_mid_run_then_rerun_resumes_without_recomputing(study, tmp_path):
    inputs = tmp_path / "cases"
    inputs.mkdir()
    scan = study["scan"]
    for i, codes in enumerate(["RAS", "LPS", "RSA", "PIR"]):
        write_nifti(reorient(scan, codes), inputs / f"case{i}.nii.gz")
    good = (inputs / "case0.nii.gz").read_bytes()
    (inputs / "a_broken.nii.gz").write_bytes(good[: len(good) // 2])  # truncated gzip
    out = tmp_path / "out"
    args = ["predict", str(inputs), "--out", str(out), "--model", str(study["ckpt"]), "--tta", "--no-progress",
            "--no-audit"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "resunet", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / "predictions.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any(r["status"] == "ok" for r in _records(journal)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()

    recs = _records(journal)
    done = {r["case"] for r in recs if r["status"] == "ok"}
    failed = {r["case"] for r in recs if r["status"] == "failed"}
    assert failed == {"a_broken"} and 1 <= len(done) < 4
    assert "a_broken.nii.gz" in next(r["reason"] for r in recs if r["case"] == "a_broken")
    for f in out.glob("*.nii.gz"):  # whatever has a final name is complete
        np.asarray(nib.load(str(f)).dataobj)
    stamps = {c: (out / f"{c}.nii.gz").stat().st_mtime_ns for c in done}

    code = main(args)
    assert code == 1  # one case failed, the rest are ok
    doc = json.loads((out / "predictions.json").read_text())
    rec = {r["case"]: r for r in doc["cases"]}
    assert set(rec) == {f"case{i}" for i in range(4)} | {"a_broken"}
    assert rec["a_broken"]["status"] == "failed" and "truncated" in rec["a_broken"]["reason"]
    assert all(rec[f"case{i}"]["status"] == "ok" for i in range(4))
    for c in done:  # not recomputed
        assert (out / f"{c}.nii.gz").stat().st_mtime_ns == stamps[c]
        assert rec[c]["run_id"] == next(r["run_id"] for r in recs if r["case"] == c)
    assert not list(out.glob(".*.part*"))
    ref = read_mask(out / "case0.nii.gz")[0]
    for i, codes in enumerate(["RAS", "LPS", "RSA", "PIR"]):
        data, affine = read_mask(out / f"case{i}.nii.gz")
        src = nib.load(str(inputs / f"case{i}.nii.gz"))
        assert data.shape == src.shape and np.array_equal(affine, src.affine)
        from test_inference_support import to_orientation_of

        assert np.array_equal(to_orientation_of(data, affine, scan.affine), ref), codes


def test_bad_inputs_exit_2_with_one_line(study, tmp_path, capsys):
    ck = str(study["ckpt"])
    cases = [
        (["predict", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "o"), "--model", ck], "no such file"),
        (["predict", str(study["inputs"] / "scan.nii.gz"), "--out", str(tmp_path / "o"), "--model",
          str(tmp_path / "nope.pt")], "no such model file"),
        (["predict", str(study["inputs"] / "scan.nii.gz"), "--out", str(tmp_path / "o"), "--model", ck,
          "--shard", "2/2"], "--shard"),
        (["predict", str(study["inputs"] / "scan.nii.gz"), "--out", str(tmp_path / "o"), "--model", ck,
          "--format", "png"], "--format"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
    text = tmp_path / "notes.nii.gz"
    text.write_text("this is not a scan")
    assert main(["predict", str(text), "--out", str(tmp_path / "o2"), "--model", ck, "--no-progress",
                 "--no-audit"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "notes.nii.gz" in err
    assert not list((tmp_path / "o2").glob("*.nii.gz"))
    doc = json.loads((tmp_path / "o2" / "predictions.json").read_text())
    assert doc["cases"][0]["status"] == "failed"


def test_info_prints_the_model_card(study, capsys):
    assert main(["info", str(study["ckpt"])]) == 0
    out = capsys.readouterr().out
    assert "tiny-test" in out and "0=background, 1=object" in out and "1.5 x 1.5 x 1.5 mm" in out
    assert "tests only" in out
    from resunet.io.hashing import sha256_file

    assert sha256_file(study["ckpt"]) in out


def test_a_journal_line_cut_by_a_kill_does_not_swallow_the_next_record(study, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = {"case": "earlier", "status": "ok", "finished_utc": "2026-01-01T00:00:00Z", "input": {}, "outputs": {}}
    (out / "predictions.jsonl").write_text(json.dumps(old) + "\n" + '{"case": "cut", "sta')
    assert main(["predict", str(study["inputs"] / "scan.nii.gz"), "--out", str(out), "--model", str(study["ckpt"]),
                 "--no-tta", "--no-progress", "--no-audit"]) == 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert lines[1] == '{"case": "cut", "sta' and json.loads(lines[2])["case"] == "scan"
    doc = json.loads((out / "predictions.json").read_text())
    assert {r["case"] for r in doc["cases"]} == {"earlier", "scan"}


def test_several_loader_threads_give_the_same_masks_and_records_as_one(study, tmp_path):
    # --workers 3 reads cases ahead on three threads: results, order of records and the isolated
    # failure must not depend on it.
    inputs = tmp_path / "cases"
    inputs.mkdir()
    for i, codes in enumerate(["RAS", "LPS", "RSA", "PIR", "LAS"]):
        write_nifti(reorient(study["scan"], codes), inputs / f"case{i}.nii.gz")
    (inputs / "case9_bad.nii.gz").write_bytes(b"not a nifti file")
    docs, masks = {}, {}
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        code = main(["predict", str(inputs), "--out", str(out), "--model", str(study["ckpt"]), "--no-tta",
                     "--no-progress", "--workers", str(workers)])
        assert code == 1  # one case failed
        docs[workers] = json.loads((out / "predictions.json").read_text())
        masks[workers] = {i: read_mask(out / f"case{i}.nii.gz")[0] for i in range(5)}
    for workers, doc in docs.items():
        assert doc["counts"] == {"cases": 6, "ok": 5, "failed": 1}, workers
        bad = next(r for r in doc["cases"] if r["case"] == "case9_bad")
        assert bad["status"] == "failed" and "case9_bad.nii.gz" in bad["reason"], workers
    assert [r["case"] for r in docs[1]["cases"]] == [r["case"] for r in docs[3]["cases"]]
    for i in range(5):
        assert np.array_equal(masks[1][i], masks[3][i]), i
        assert 0 < (masks[3][i] > 0).sum()
