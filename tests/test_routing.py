"""Routing rules (issue 24 point 2): the rules file is checked at start with the rule and the reason;
the DICOM node of a real `resunet serve` segments a received series with the model of the first rule
it matches (recorded in the job and the audit log) and leaves unmatched series alone, logged once."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from serve_support import ServiceProcess
from test_app_support import EXAMPLE_DICOM, REPO, free_port, make_tiny_model

from resunet.errors import ConfigError
from resunet.pacs.routing import SeriesFacts, load_routes


def _write(tmp_path, text: str):
    p = tmp_path / "routes.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, message", [
    ("rules: [", "not valid YAML at line 1"),
    ("rules:\n  - name: a\n    match: {modality: MR, colour: red}\n    model: x\n", "rule 1 (a): unknown condition(s) colour"),
    ("rules:\n  - match: {series_description: '(t1'}\n    model: x\n", "rule 1 (rule 1): series_description '(t1' is not a valid regular expression"),
    ("rules:\n  - {match: {}, model: x}\n  - {match: {min_slices: -3}, model: y}\n", "rule 2 (rule 2): min_slices must be a whole number"),
    ("rules:\n  - name: both\n    match: {}\n", "rule 1 (both): give either 'model: NAME' (or a chain, 'model: [NAME, NAME]') or 'skip: true'"),
    ("rules:\n  - name: c\n    match: {}\n    model: [a, 3]\n", "rule 1 (c): 'model' as a list (a chain) needs one or more model names"),
    ("other: 1\n", "expected a mapping with a non-empty list 'rules:'"),
])
def test_bad_rules_files_are_refused_with_the_rule_and_the_reason(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_routes(_write(tmp_path, text))


def test_first_matching_rule_wins(tmp_path):
    routes = load_routes(_write(tmp_path, """
rules:
  - name: head T1
    match: {modality: [MR, PT], body_part: "head|brain", series_description: "t1", image_type: ORIGINAL, min_slices: 20}
    model: brain_extraction
  - name: small
    match: {max_slices: 5}
    skip: true
  - name: any MR
    match: {modality: mr}
    model: other.pt
"""))
    t1 = SeriesFacts("MR", "BRAIN", "sag T1 mprage", ("ORIGINAL", "PRIMARY"), 176)
    assert routes.route(t1).name == "head T1"
    assert routes.route(SeriesFacts("MR", "BRAIN", "sag T1", ("DERIVED",), 176)).name == "any MR"
    assert routes.route(SeriesFacts("MR", "", "loc", (), 3)) is None  # skip rule
    assert routes.route(SeriesFacts("CT", "CHEST", "", (), 300)) is None  # no rule
    chain = load_routes(_write(tmp_path, "rules:\n  - {name: tissue, match: {}, model: [brain_extraction, brain_tissue]}\n"))
    assert chain.rules[0].models == ("brain_extraction", "brain_tissue") and chain.rules[0].model == "brain_extraction"


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed (scripts/setup-system.sh)")
def test_a_rule_with_a_chain_segments_tissue_inside_the_extracted_brain(tmp_path):
    """model: [brain_extraction, brain_tissue]: the node's job writes tissue labels only inside the brain."""
    import nibabel as nib
    import numpy as np

    routes = _write(tmp_path, "rules:\n  - name: head T1 tissue\n    match: {modality: MR}\n"
                              "    model: [brain_extraction, brain_tissue]\n")
    port = free_port()
    svc = ServiceProcess(tmp_path / "state", None, "--no-tta", "--format", "nifti", "--dicom-port", str(port),
                         "--settle-seconds", "1", "--routes", str(routes))
    with svc:
        subprocess.run(["storescu", "-aet", "SCANNER", "-aec", "RESUNET", "+sd", "127.0.0.1", str(port), str(EXAMPLE_DICOM)],
                       check=True, capture_output=True, timeout=120)
        deadline = time.monotonic() + 300
        jobs: list = []
        while time.monotonic() < deadline and not (jobs and jobs[0]["state"] in ("done", "failed")):
            jobs = httpx.get(f"{svc.url}/v1/jobs", timeout=30).json()["jobs"]
            time.sleep(0.3)
        job = jobs[0]
        assert job["state"] == "done" and job["result"]["route"] == "head T1 tissue", job
        assert job["result"]["model"]["name"] == "brain_extraction -> brain_tissue"
        mask_url = f"{svc.url}/v1/jobs/{job['id']}/outputs/mask"
        data = httpx.get(mask_url, timeout=60).content
    (tmp_path / "mask.nii.gz").write_bytes(data)
    mask = np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj)
    assert set(np.unique(mask)) == {0, 1, 2, 3}
    # tissue stays inside the head's brain: far less than the ~3.6 L brain_tissue labels on the whole head
    assert 1200 < (mask > 0).sum() * 8 / 1000 < 2200


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed (scripts/setup-system.sh)")
def test_the_dicom_node_routes_series_to_models(tmp_path):
    model = make_tiny_model(tmp_path / "tiny.pt")
    routes = _write(tmp_path, f"""
rules:
  - name: MR volumes
    match: {{modality: MR, min_slices: 50}}
    model: {model}
  - name: the rest
    match: {{}}
    skip: true
""")
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = subprocess.run([sys.executable, "-m", "resunet", "serve", "--state-dir", str(tmp_path / "s0"),
                          "--routes", str(_write(bad_dir, "rules:\n  - {match: {}, model: nosuch}\n"))],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "names model 'nosuch', which is neither a bundled model nor a file" in bad.stderr
    short = tmp_path / "short"  # 40 slices of the example as another series: no rule segments it
    short.mkdir()
    uid = generate_uid()
    for f in sorted(EXAMPLE_DICOM.glob("*.dcm"))[:40]:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        ds.save_as(short / f.name, enforce_file_format=True)
    port = free_port()
    svc = ServiceProcess(tmp_path / "state", None, "--no-tta", "--format", "nifti,seg", "--dicom-port", str(port),
                         "--settle-seconds", "1", "--routes", str(routes), audit_db=tmp_path / "audit.sqlite")
    with svc:
        for folder in (EXAMPLE_DICOM, short):
            subprocess.run(["storescu", "-aet", "SCANNER", "-aec", "RESUNET", "+sd", "127.0.0.1", str(port), str(folder)],
                           check=True, capture_output=True, timeout=120)
        deadline = time.monotonic() + 180
        jobs: list = []
        while time.monotonic() < deadline and not (jobs and jobs[0]["state"] in ("done", "failed")):
            jobs = httpx.get(f"{svc.url}/v1/jobs", timeout=30).json()["jobs"]
            time.sleep(0.3)
        time.sleep(2)  # the short series settles too
        jobs = httpx.get(f"{svc.url}/v1/jobs", timeout=30).json()["jobs"]
        assert len(jobs) == 1, jobs  # the 40-slice series made no job
        job = jobs[0]
        assert job["state"] == "done" and job["result"]["route"] == "MR volumes", job
        assert job["result"]["model"]["name"] == "tiny-untrained"  # the rule's model, not the bundled default
        assert svc.log().count("no rule segments series") == 1
        assert not list((tmp_path / "state" / "dicom-incoming").glob("*/*/*.dcm"))  # left alone = not kept
    from resunet.reports.audit import read_runs

    run = [r for r in read_runs(tmp_path / "audit.sqlite") if r["run_id"] == f"serve-{job['id']}"][0]
    assert run["provenance"]["route"] == "MR volumes" and run["provenance"]["model"]["path"] == str(model)


def _series(src_files, out, **tags):
    """A copy of ``src_files`` as a new series (pydicom), with ``tags`` set on every instance."""
    out.mkdir(parents=True)
    series_uid = generate_uid()
    for i, f in enumerate(src_files):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(out / f"{i:04d}.dcm", enforce_file_format=True)
    return out


def test_predict_routes_each_dicom_input_to_its_rule(tmp_path, capsys):
    """`resunet predict --routes`: an MR head T1 series goes to the rule's model (the rule is in its
    case record and the audit log), a CT that no rule matches is left alone and named by case id only
    (its description, which may hold PHI, is not printed); a bad file and --model are refused."""
    from resunet.cli import main
    from resunet.reports.audit import read_runs

    model = make_tiny_model(tmp_path / "tiny.pt")
    files = sorted(EXAMPLE_DICOM.glob("*.dcm"))
    mr = _series(files, tmp_path / "in" / "mr_head", Modality="MR", BodyPartExamined="HEAD",
                 SeriesDescription="T1 MPRAGE sag")
    ct = _series(files[:12], tmp_path / "in" / "ct_chest", Modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                 BodyPartExamined="CHEST", SeriesDescription="DOE^JANE chest", RescaleIntercept=-1024,
                 RescaleSlope=1)
    routes = _write(tmp_path, f"""
rules:
  - name: head MR T1
    match: {{modality: MR, body_part: head, series_description: t1, min_slices: 20}}
    model: {model}
""")
    out = tmp_path / "out"
    code = main(["predict", str(mr), str(ct), "--routes", str(routes), "--out", str(out), "--no-tta", "--no-progress",
                 "--format", "nifti", "--audit-db", str(tmp_path / "audit.sqlite")])
    err = capsys.readouterr().err
    assert code == 0, err
    summary = json.loads((out / "head_MR_T1" / "predictions.json").read_text())
    assert [(c["case"], c["status"], c["route"]) for c in summary["cases"]] == [("mr_head", "ok", "head MR T1")]
    assert "case ct_chest: no routing rule matches (CT, 12 slices); left alone" in err
    assert "DOE^JANE" not in err
    assert not list(out.rglob("ct_chest*"))
    run = [r for r in read_runs(tmp_path / "audit.sqlite") if r["run_id"] == summary["provenance"]["run_id"]][0]
    assert run["provenance"]["route"] == "head MR T1"

    code = main(["predict", str(mr), "--routes", str(routes), "--model", str(model), "--out", str(tmp_path / "o2")])
    assert code == 2 and "--routes picks the model of each series: leave out --model" in capsys.readouterr().err
    bad = _write(tmp_path / "in", "rules:\n  - {match: {}, model: x}\n  - name: neg\n    match: {min_slices: -3}\n"
                                  "    model: y\n")
    code = main(["predict", str(mr), "--routes", str(bad), "--out", str(tmp_path / "o3")])
    err = capsys.readouterr().err
    assert code == 2 and f"--routes {bad}, line 3: rule 2 (neg): min_slices must be a whole number" in err, err
    assert not (tmp_path / "o3").exists()
