"""``resunet predict --ray``: a real two-node Ray cluster on loopback, a node killed mid-run, masks
equal to a local run's, every case recorded once, resume; Ray missing; the start check."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from resunet.cli import main
from resunet.io.dicom_writer import write_dicom_series
from resunet.io.nifti import write_nifti
from ray_support import RayCluster, ray_bin
from test_inference_support import single_torch_thread  # noqa: F401  (autouse fixture)
from test_inference_support import make_checkpoint, reorient, synthetic_scan

REPO = Path(__file__).resolve().parents[1]
ORIENTATIONS = ["RAS", "LPS", "RSA", "PIR", "LAS", "RAI", "ASR"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """A tiny model and 8 small real studies: 7 NIfTI files in different orientations and a DICOM series.
    Large enough (with TTA) that a case takes a moment, so a node can be killed while it holds one."""
    root = tmp_path_factory.mktemp("ray")
    scan = synthetic_scan(shape=(40, 36, 24))
    ckpt = make_checkpoint(root / "tiny.pt", scan)
    inputs = root / "inputs"
    for i, codes in enumerate(ORIENTATIONS):
        write_nifti(reorient(scan, codes), inputs / f"case{i}.nii.gz")
    write_dicom_series(scan, inputs / "dicom", modality="MR")
    return {"root": root, "ckpt": ckpt, "inputs": inputs, "names": [f"case{i}" for i in range(7)] + ["dicom"]}


def _lines(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def _mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


@pytest.mark.slow
def test_two_node_cluster_survives_a_killed_node_with_every_case_done_once_and_local_masks(cases, tmp_path):
    ray_bin()
    local = tmp_path / "local"
    args = [str(cases["inputs"]), "--model", str(cases["ckpt"]), "--no-progress", "--no-audit"]
    assert main(["predict", *args, "--out", str(local)]) == 0

    retried: list = []
    for attempt in range(3):
        audit = tmp_path / f"audit-try{attempt}.sqlite"
        stack = contextlib.ExitStack()
        cluster = stack.enter_context(RayCluster(nodes=2, cpus=1))
        out = tmp_path / f"ray-try{attempt}"
        try:
            env = cluster.env()
            env["RESUNET_AUDIT_DB"] = str(audit)
            cmd = [sys.executable, "-m", "resunet", "predict", *args[:-1], "--out", str(out), "--ray", cluster.address,
                   "--ray-actors", "2", "--ray-retries", "2"]
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            journal = out / "predictions.jsonl"
            deadline = time.monotonic() + 600
            killed_after = None
            while time.monotonic() < deadline and proc.poll() is None:
                recs = _lines(journal)
                nodes = {r["node"] for r in recs if r.get("node")}
                if len(nodes) >= 2:  # both nodes have finished a case and hold the next one: kill the second
                    time.sleep(min(r["seconds"] for r in recs) / 2)
                    cluster.kill_node("node1")
                    killed_after = len(recs)
                    break
                time.sleep(0.05)
            assert killed_after is not None, f"the run ended before a node could be killed: {proc.communicate()[1][-3000:]}"
            assert killed_after < len(cases["names"]), "every case was done before the kill; make the cases slower"
            try:
                _, err = proc.communicate(timeout=max(60.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            assert proc.returncode == 0, err[-3000:]

            recs = _lines(journal)
            assert sorted(r["case"] for r in recs) == sorted(cases["names"])  # each case recorded exactly once
            assert all(r["status"] == "ok" for r in recs), [r["reason"] for r in recs]
            assert len({r["node"] for r in recs}) == 2
            retried = [r["case"] for r in recs if (r.get("attempt") or 1) > 1]
            if retried:  # the kill hit a case in flight: the retry path was exercised
                assert f"{len(retried)} retried" in err
                break
            # the kill landed between two of node1's cases (timing under load): every case is still done
            # exactly once, but nothing was retried; try again on a fresh cluster
            stack.close()
        except BaseException:
            stack.close()
            raise
    assert retried, "in 3 tries no case was in flight on the killed node"
    with stack:
        doc = json.loads((out / "predictions.json").read_text())
        ref = json.loads((local / "predictions.json").read_text())
        assert [r["case"] for r in doc["cases"]] == [r["case"] for r in ref["cases"]]
        assert doc["counts"] == ref["counts"] and doc["settings"] == ref["settings"]
        assert doc["model"]["sha256"] == ref["model"]["sha256"]
        for mine, theirs in zip(doc["cases"], ref["cases"]):
            assert mine["volumes_ml"] == theirs["volumes_ml"] and mine["input"] == theirs["input"]
            a, aff_a = _mask(out / mine["outputs"]["mask"]["path"])
            b, aff_b = _mask(local / theirs["outputs"]["mask"]["path"])
            assert np.array_equal(a, b) and np.array_equal(aff_a, aff_b), mine["case"]
        from resunet.io.seg import read_dicom_seg
        from resunet.io.loader import load_study

        src = load_study(cases["inputs"] / "dicom")
        assert np.array_equal(read_dicom_seg(out / "dicom.seg.dcm", src).array,
                              read_dicom_seg(local / "dicom.seg.dcm", src).array)
        assert not list(out.glob(".*.part*"))

        # the audit log names every case's node
        import sqlite3

        with sqlite3.connect(audit) as db:
            (outputs_json,) = db.execute("SELECT outputs_json FROM runs").fetchone()
        per_case = {o["case"]: o["node"] for o in json.loads(outputs_json) if o.get("case")}
        assert set(per_case) == set(cases["names"]) and all(per_case.values())

        # re-running on the one node left skips every case and rewrites nothing
        stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"{len(cases['names'])} ok ({len(cases['names'])} skipped" in res.stderr
        assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}

        # retries are bounded: with --ray-retries 0 a case whose worker is killed is recorded failed with
        # the reason, nothing of it is left, and the other cases go on
        # (--out and --model relative to the driver's folder: the workers have another one)
        out0 = tmp_path / "ray0"
        shutil.copy(cases["ckpt"], tmp_path / "model.pt")
        cmd0 = [sys.executable, "-m", "resunet", "predict", str(cases["inputs"]), "--model", "model.pt", "--no-progress",
                "--out", "ray0", "--ray", cluster.address, "--ray-actors", "1", "--ray-retries", "0"]
        proc = subprocess.Popen(cmd0, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        victim = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None and victim is None:
            busy = cluster.busy_workers("head", "resunet-case") if _lines(out0 / "predictions.jsonl") else []
            if busy:
                os.kill(busy[0], 9)
                victim = busy[0]
            time.sleep(0.05)
        assert victim is not None, f"no worker could be killed: {proc.communicate()[1][-3000:]}"
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 1, err[-3000:]
        recs = _lines(out0 / "predictions.jsonl")
        assert sorted(r["case"] for r in recs) == sorted(cases["names"])
        lost = [r for r in recs if r["status"] == "failed"]
        assert len(lost) == 1 and "lost 1 time(s)" in lost[0]["reason"] and "--ray-retries" in lost[0]["reason"]
        assert lost[0]["case"] in err and "Traceback" not in err
        assert not list(out0.glob(f"{lost[0]['case']}.*")) and not list(out0.glob(".*.part*"))
        with sqlite3.connect(audit) as db:  # the audit record lists every case, the lost one too
            (prov,) = db.execute("SELECT provenance_json FROM runs ORDER BY seq DESC LIMIT 1").fetchone()
        audited = {c["case"]: c for c in json.loads(prov)["cases"]}
        assert set(audited) == set(cases["names"]) and audited[lost[0]["case"]]["status"] == "failed"
        assert all(c["node"] for k, c in audited.items() if k != lost[0]["case"])
    assert not cluster.root.exists()


def test_ray_missing_says_how_to_install_it(cases, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray sees: ImportError
    code = main(["predict", str(cases["inputs"]), "--out", str(tmp_path / "out"), "--model", str(cases["ckpt"]),
                 "--ray", "--no-progress", "--no-audit"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'resunet[ray]'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_an_address_where_no_cluster_listens_is_refused_at_once(cases, tmp_path, capsys):
    ray_bin()
    from ray_support import free_port

    port = free_port()  # nothing listens on it
    code = main(["predict", str(cases["inputs"]), "--out", str(tmp_path / "out"), "--model", str(cases["ckpt"]),
                 "--ray", f"127.0.0.1:{port}", "--no-progress", "--no-audit"])
    err = capsys.readouterr().err
    assert code == 2 and f"--ray 127.0.0.1:{port}: nothing answers there" in err and "ray start --head" in err


def test_ray_refuses_shards(cases, tmp_path, capsys):
    code = main(["predict", str(cases["inputs"]), "--out", str(tmp_path / "out"), "--model", str(cases["ckpt"]),
                 "--ray", "--shard", "0/2", "--no-progress", "--no-audit"])
    assert code == 2 and "--shard" in capsys.readouterr().err


def test_the_start_probe_names_what_a_node_cannot_see_or_write(tmp_path):
    ray_bin()
    from resunet.inference.ray_batch import probe_node

    ok = tmp_path / "in.nii.gz"
    ok.write_bytes(b"x")
    missing = tmp_path / "elsewhere" / "case.nii.gz"
    out_missing = tmp_path / "not-mounted"
    p = probe_node([str(ok), str(missing)], str(out_missing), [])
    assert p["problems"] == [f"cannot see {missing}", f"cannot write {out_missing} (No such file or directory)"]
    assert probe_node([str(ok)], str(tmp_path), [])["problems"] == []
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".resunet-ray-check")]
