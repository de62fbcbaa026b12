"""``resunet serve``: a real uvicorn server in a subprocess, real uploads, masks equal to ``resunet predict``'s.

The server runs the tiny untrained checkpoint of test_app_support (a second per job on 2 cores); the
masks are arbitrary but real outputs of the real Predictor, so "the service's mask equals the CLI's
mask" is a real check of the shared code path.
"""

from __future__ import annotations

import hashlib
import io
import os
import json
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from serve_support import ServiceProcess, submit, wait_job
from test_app_support import EXAMPLE_DICOM, EXAMPLE_T1, REPO, bad_uploads, make_tiny_model

from resunet.cli import main as cli_main
from resunet.errors import InputError
from resunet.netaddr import is_loopback_address
from resunet.serve.tokens import TokenStore, token_sha256


def dicom_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(EXAMPLE_DICOM.iterdir()):
            zf.writestr(f"colin27_t1_dicom/{p.name}", p.read_bytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One service (tiny model, no TTA, 3 MB upload limit) and its folders."""
    root = tmp_path_factory.mktemp("serve")
    model = make_tiny_model(root / "tiny.pt")
    audit = root / "audit.sqlite"
    svc = ServiceProcess(root / "state", model, "--no-tta", "--max-upload-mb", "3", audit_db=audit)
    with svc:
        yield {"svc": svc, "url": svc.url, "model": model, "root": root, "audit": audit}


def fetch(url: str, path: str) -> httpx.Response:
    r = httpx.get(url + path, timeout=60)
    return r


def test_nifti_and_dicom_zip_masks_equal_resunet_predict(served, tmp_path):
    url = served["url"]
    nifti_job = submit(url, [("colin27_t1.nii.gz", EXAMPLE_T1.read_bytes())])
    zip_job = submit(url, [("colin27_t1_dicom.zip", dicom_zip())], uncertainty=True)
    assert nifti_job.status_code == 202 and zip_job.status_code == 202, (nifti_job.text, zip_job.text)
    assert nifti_job.headers["location"].endswith(nifti_job.json()["id"])
    assert nifti_job.json()["state"] == "queued"
    # the same inputs through the CLI, same model and settings
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "colin27_t1_dicom.zip").write_bytes(dicom_zip())
    cli_out = tmp_path / "cli"
    assert cli_main(["predict", str(EXAMPLE_T1), str(inputs / "colin27_t1_dicom.zip"), "--out", str(cli_out),
                     "--model", str(served["model"]), "--no-tta", "--no-audit", "--no-progress"]) == 0

    job = wait_job(url, nifti_job.json()["id"])
    assert job["state"] == "done", job
    assert set(job["outputs"]) == {"mask", "predictions"}  # no SEG for a NIfTI input
    r = fetch(url, f"/v1/jobs/{job['id']}/outputs/mask")
    assert r.status_code == 200
    got = tmp_path / "svc_nifti.nii.gz"
    got.write_bytes(r.content)
    import hashlib

    assert hashlib.sha256(r.content).hexdigest() == job["outputs"]["mask"]["sha256"] == r.headers["x-content-sha256"]
    mine, cli = nib.load(got), nib.load(cli_out / "colin27_t1.nii.gz")
    assert np.array_equal(np.asarray(mine.dataobj), np.asarray(cli.dataobj))
    assert np.allclose(mine.affine, nib.load(EXAMPLE_T1).affine)
    assert mine.shape == nib.load(EXAMPLE_T1).shape

    pred = fetch(url, f"/v1/jobs/{job['id']}/predictions").json()
    case = pred["cases"][0]
    assert case["status"] == "ok" and case["input"]["sha256"] == job["input_sha256"]
    assert pred["model"]["name"] == "tiny-untrained" and pred["model"]["sha256"] == job["result"]["model"]["sha256"]
    assert case["volumes_ml"] == job["result"]["volumes_ml"]
    assert case["outputs"]["mask"]["sha256"] == job["outputs"]["mask"]["sha256"]

    zjob = wait_job(url, zip_job.json()["id"])
    assert zjob["state"] == "done", zjob
    assert set(zjob["outputs"]) == {"mask", "seg", "uncertainty", "predictions"}
    got_zip = tmp_path / "svc_zip.nii.gz"
    got_zip.write_bytes(fetch(url, f"/v1/jobs/{zjob['id']}/outputs/mask").content)
    zip_mask = np.asarray(nib.load(got_zip).dataobj)
    cli_zip = nib.load(cli_out / "colin27_t1_dicom.nii.gz")
    # the uncertainty job ran with TTA (uncertainty needs the flips), the CLI without: same grid, and the
    # SEG must hold exactly the service's own mask on the source DICOM voxels
    assert zip_mask.shape == cli_zip.shape and np.allclose(nib.load(got_zip).affine, cli_zip.affine)
    seg_path = tmp_path / "svc.seg.dcm"
    seg_path.write_bytes(fetch(url, f"/v1/jobs/{zjob['id']}/outputs/seg").content)
    from resunet.io import load_study, read_dicom_seg

    back = read_dicom_seg(seg_path, load_study(EXAMPLE_DICOM))
    assert np.array_equal(np.asarray(back.array) > 0, zip_mask > 0)
    unc = tmp_path / "svc.unc.nii.gz"
    unc.write_bytes(fetch(url, f"/v1/jobs/{zjob['id']}/outputs/uncertainty").content)
    u = np.asarray(nib.load(unc).dataobj)
    assert u.shape == zip_mask.shape and 0.0 <= u.min() and u.max() <= 1.0 and u.max() > 0

    # several DICOM files in one multipart request, no TTA: the CLI's mask of the zip exactly
    files = [(p.name, p.read_bytes()) for p in sorted(EXAMPLE_DICOM.iterdir())]
    many = wait_job(url, submit(url, files, formats="nifti,rtstruct").json()["id"])
    assert many["state"] == "done" and set(many["outputs"]) == {"mask", "rtstruct", "predictions"}, many
    import pydicom

    rt = pydicom.dcmread(io.BytesIO(fetch(url, f"/v1/jobs/{many['id']}/outputs/rtstruct").content))
    src = pydicom.dcmread(sorted(EXAMPLE_DICOM.iterdir())[0], stop_before_pixels=True)
    assert rt.Modality == "RTSTRUCT" and rt.StudyInstanceUID == src.StudyInstanceUID
    assert rt.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == src.FrameOfReferenceUID
    assert many["input"] == f"{len(files)} DICOM files"
    got_many = tmp_path / "svc_many.nii.gz"
    got_many.write_bytes(fetch(url, f"/v1/jobs/{many['id']}/outputs/mask").content)
    assert np.array_equal(np.asarray(nib.load(got_many).dataobj), np.asarray(cli_zip.dataobj))

    # every job in the audit log once, with input, model and output hashes
    from resunet.reports.audit import read_runs, verify_log

    runs = {r["run_id"]: r for r in read_runs(served["audit"])}
    for j in (job, zjob, many):
        r = runs[f"serve-{j['id']}"]
        assert r["kind"] == "serve" and r["user"] == "anonymous"
        assert r["model_sha256"] == j["result"]["model"]["sha256"]
        assert r["provenance"]["files"]["input"][0]["sha256"] == j["input_sha256"]
        assert {o["key"]: o["sha256"] for o in r["outputs"]} == {k: o["sha256"] for k, o in j["outputs"].items()}
    assert verify_log(served["audit"]) == []


def library_message(tmp_path: Path, name: str, data: bytes) -> str:
    """What ``load_study`` (the CLI's reader) says about this file, with the folder cut off."""
    from resunet.io import load_study

    d = tmp_path / "lib"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_bytes(data)
    with pytest.raises(InputError) as err:
        load_study(p)
    return str(err.value).replace(str(d) + "/", "")


def test_bad_uploads_get_4xx_with_the_cli_message(served, tmp_path):
    url = served["url"]
    cases = bad_uploads()
    for case, items in cases.items():
        r = submit(url, [(name, data) for name, data, _ in items])
        assert r.status_code == 422, (case, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and "Traceback" not in detail and str(served["root"]) not in detail, (case, detail)
        if case in ("truncated_nifti", "text_as_nifti", "zip_slip", "random_dcm", "sr_only_zip"):
            name, data, _ = items[0]
            assert detail == library_message(tmp_path, name, data), case
    assert "not a mix" in submit(url, [(n, d) for n, d, _ in cases["mixed"]]).json()["detail"]
    r = submit(url, [("t1.nii.gz", EXAMPLE_T1.read_bytes())], formats="png")
    assert r.status_code == 422 and "png" in r.json()["detail"] and "nifti" in r.json()["detail"]
    r = httpx.post(url + "/v1/jobs", timeout=120)
    assert r.status_code == 422 and r.json()["detail"].startswith("files: Field required")
    big = submit(url, [("big.zip", np.random.default_rng(0).bytes(5_000_000))])
    assert big.status_code == 413 and "--max-upload-mb" in big.json()["detail"]
    assert fetch(url, "/v1/jobs/0123456789abcdef").status_code == 404
    ok = wait_job(url, submit(url, [("t1.nii.gz", EXAMPLE_T1.read_bytes())]).json()["id"])
    missing = fetch(url, f"/v1/jobs/{ok['id']}/outputs/seg")
    assert missing.status_code == 404 and "mask" in missing.json()["detail"]


def test_failing_jobs_are_marked_failed_and_the_worker_goes_on(served, tmp_path):
    """Jobs put straight into the queue with the library call other modules use (JobQueue.enqueue)."""
    from resunet.serve.queue import JobQueue

    url = served["url"]
    r = submit(url, [("colin27_t1_dicom.zip", dicom_zip())], series_uid="1.2.3.4")
    assert r.status_code == 422 and "1.2.3.4" in r.json()["detail"]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(EXAMPLE_T1.read_bytes()[:5000])
    queue = JobQueue(served["svc"].state_dir / "jobs.sqlite")
    bad = queue.enqueue("segment", input_path=broken, input_name="broken.nii.gz", submitted_by="test")
    odd = queue.enqueue("no-such-kind", submitted_by="test")
    good = queue.enqueue("segment", input_path=EXAMPLE_T1, input_name="colin27_t1.nii.gz", options={"formats": ["nifti"]},
                         submitted_by="test")
    a, b, c = (wait_job(url, j.id) for j in (bad, odd, good))
    assert a["state"] == "failed" and a["error"].startswith("broken.nii.gz: ") and "truncated" in a["error"], a
    assert str(tmp_path) not in a["error"]
    assert b["state"] == "failed" and "no-such-kind" in b["error"]
    assert c["state"] == "done" and set(c["outputs"]) == {"mask", "predictions"}
    conflict = fetch(url, f"/v1/jobs/{a['id']}/outputs/mask")
    assert conflict.status_code == 409 and "truncated" in conflict.json()["detail"]
    text = fetch(url, "/metrics").text
    failures = [float(x.split()[-1]) for x in text.splitlines() if x.startswith("resunet_job_failures_total ")]
    assert failures and failures[0] >= 2


def test_blank_input_refused_and_nan_warning_in_the_job(served):
    """Issue 22 point 2: an all-NaN scan is not a 'done' job with litres of brain; a partly-NaN one
    carries its warning in the job JSON."""
    img = nib.load(str(EXAMPLE_T1))
    data = np.asarray(img.dataobj).astype(np.float32)
    blank = nib.Nifti1Image(np.full(data.shape, np.nan, np.float32), img.affine).to_bytes()
    part = data.copy()
    part[:, :, :5] = np.nan
    partly = nib.Nifti1Image(part, img.affine).to_bytes()
    url = served["url"]
    jobs = []
    for name, raw in (("blank.nii", blank), ("partly.nii", partly)):
        r = submit(url, [(name + ".gz", _gz(raw))])
        jobs.append(r)
    rb, rp = jobs
    if rb.status_code == 202:  # refused by the worker (the submit check may refuse it earlier: 422)
        b = wait_job(url, rb.json()["id"])
        assert b["state"] == "failed" and "every voxel is NaN or infinite" in b["error"], b
    else:
        assert rb.status_code == 422 and "every voxel is NaN or infinite" in rb.json()["detail"], rb.text
    assert rp.status_code == 202, rp.text
    p = wait_job(url, rp.json()["id"])
    assert p["state"] == "done", p
    n_bad = int(np.isnan(part).sum())
    assert any(f"{n_bad} of {part.size} voxels" in w for w in p["result"]["warnings"]), p["result"]
    assert all(str(served["root"]) not in w for w in p["result"]["warnings"])  # the client's name, not the server's path


def test_chunked_upload_is_cut_at_the_limit(served):
    """Issue 22 point 3: a chunked body (no Content-Length) over --max-upload-mb (3 MB here) is not
    spooled to disk in full before the 413. What the server process wrote is read from the kernel's
    per-process I/O accounting (/proc/PID/io wchar): 66 MB for a 64 MB body before the fix."""
    boundary = "resunetboundary"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.nii\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        chunk = b"\0" * (1 << 20)
        for _ in range(64):  # 64 MB
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    def written() -> int:
        io_stats = Path(f"/proc/{served['svc'].proc.pid}/io").read_text()
        return int(dict(line.split(": ") for line in io_stats.splitlines())["wchar"])

    before = written()
    r = httpx.post(served["url"] + "/v1/jobs", content=body(), timeout=120,
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "limit of 3 MB" in r.json()["detail"], r.text
    wrote = written() - before
    assert wrote < 12 * (1 << 20), f"the server wrote {wrote / 2**20:.1f} MB of a 64 MB body over a 3 MB limit"
    assert httpx.get(served["url"] + "/healthz", timeout=30).status_code == 200


def _zip_series(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _split_series() -> dict[str, bytes]:
    """The example's 91 instances (one Series Instance UID), every second one cut down to 64x64 pixels."""
    import pydicom

    out = {}
    for i, f in enumerate(sorted(EXAMPLE_DICOM.glob("*.dcm"))):
        ds = pydicom.dcmread(f)
        if i % 2:
            small = np.ascontiguousarray(ds.pixel_array[:64, :64])
            ds.Rows, ds.Columns = small.shape
            ds.PixelData = small.tobytes()
        b = io.BytesIO()
        ds.save_as(b, enforce_file_format=True)
        out[f.name] = b.getvalue()
    return out


def test_part_of_a_series_and_localisers_are_refused(served):
    """Issue 22 point 7: a series whose instances disagree in size is not segmented from half of them,
    and a 2-slice series is not a volume (service default --min-slices 3)."""
    url = served["url"]
    r = submit(url, [("split.zip", _zip_series(_split_series()))])
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "its 91 images disagree in size or orientation (46 of 91x109, 45 of 64x64)" in detail, detail
    assert "--allow-split-series" in detail
    two = {f.name: f.read_bytes() for f in sorted(EXAMPLE_DICOM.glob("*.dcm"))[40:42]}
    r = submit(url, [("two.zip", _zip_series(two))])
    assert r.status_code == 422 and "2 slices, fewer than the 3" in r.json()["detail"], r.text


def test_upload_names_and_uids_stay_out_of_logs_and_databases(served):
    """Issue 22 point 9: a PHI-laden upload name is in no log line, database, job listing or output name;
    DICOM UIDs in the log are hashed."""
    import pydicom

    url = served["url"]
    phi = "Doe_John_MRN0012345_DOB19600101"
    r = submit(url, [(f"{phi}.nii.gz", EXAMPLE_T1.read_bytes())])
    assert r.status_code == 202, r.text
    job = wait_job(url, r.json()["id"])
    assert job["state"] == "done" and job["input"] == "upload.nii.gz", job
    z = wait_job(url, submit(url, [(f"{phi}.zip", dicom_zip())]).json()["id"])
    assert z["state"] == "done", z
    listing = httpx.get(url + "/v1/jobs", timeout=60).text
    assert phi not in listing and "MRN0012345" not in listing
    assert all(phi not in o["file"] for o in job["outputs"].values()), job["outputs"]
    assert job["outputs"]["mask"]["file"] == f"{job['id']}.nii.gz"
    state = served["svc"].state_dir
    for db in [state / "jobs.sqlite", served["audit"]]:
        for f in db.parent.glob(db.name + "*"):  # the database and its WAL/journal
            assert b"MRN0012345" not in f.read_bytes(), f
    assert not [p for p in state.rglob("*") if "MRN" in p.name]
    log_text = served["svc"].log()
    ds = pydicom.dcmread(next(EXAMPLE_DICOM.glob("*.dcm")), stop_before_pixels=True)
    assert "MRN0012345" not in log_text
    assert str(ds.StudyInstanceUID) not in log_text and str(ds.SeriesInstanceUID) not in log_text
    assert f"job {job['id']} queued (input sha256 {job['input_sha256'][:12]})" in log_text


def _gz(raw: bytes) -> bytes:
    import gzip

    return gzip.compress(raw, 6)


def test_health_ready_docs_and_metrics(served):
    url = served["url"]
    assert fetch(url, "/healthz").json()["status"] == "ok"
    ready = fetch(url, "/readyz").json()
    assert ready["ready"] is True and ready["model"]["name"] == "tiny-untrained"
    assert fetch(url, "/docs").status_code == 200
    spec = fetch(url, "/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/outputs/{key}", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    text = fetch(url, "/metrics").text
    for name in ("resunet_http_requests_total", "resunet_http_request_duration_seconds_bucket", "resunet_queue_depth",
                 "resunet_job_failures_total", "resunet_jobs_finished_total", "resunet_model_load_seconds",
                 "process_resident_memory_bytes"):
        assert name in text, name
    load = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("resunet_model_load_seconds ")]
    assert load and load[0] > 0
    assert 'resunet_queue_depth{state="done"}' in text


def test_loopback_rule():
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST.", "::ffff:127.0.0.1"):
        assert is_loopback_address(host), host
    for host in ("0.0.0.0", "::", "", "192.168.1.20", "10.0.0.1", "example.org", "127.0.0.1.example.org", "fe80::1"):
        assert not is_loopback_address(host), host


def test_refuses_a_network_address_without_tokens(tmp_path):
    r = subprocess.run([sys.executable, "-m", "resunet", "serve", "--host", "0.0.0.0", "--state-dir", str(tmp_path / "s")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("resunet serve: error: --host 0.0.0.0 can be reached from other machines")
    assert "--add-token" in r.stderr and "Traceback" not in r.stderr


def test_tokens_auth_off_loopback_and_retention(tmp_path):
    """On 0.0.0.0 every job request needs a token; the job is recorded under the token's name; files expire."""
    state = tmp_path / "state"
    made = subprocess.run([sys.executable, "-m", "resunet", "serve", "--state-dir", str(state), "--add-token", "ris-node1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("rsu_") and len(token) > 40
    stored = (state / "tokens.json").read_text()
    assert token not in stored and token_sha256(token) in stored  # hashed at rest
    assert TokenStore(state / "tokens.json").check(token) == "ris-node1"
    assert (state / "tokens.json").stat().st_mode & 0o077 == 0
    model = make_tiny_model(tmp_path / "tiny.pt")
    audit = tmp_path / "audit.sqlite"
    with ServiceProcess(state, model, "--no-tta", "--retention-hours", "0.0005", "--sweep-interval", "0.5",
                        host="0.0.0.0", audit_db=audit) as svc:
        url = svc.url
        body = [("t1.nii.gz", EXAMPLE_T1.read_bytes())]
        r = submit(url, body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "--add-token" in r.json()["detail"]
        assert submit(url, body, token="rsu_wrong").status_code == 401
        assert httpx.get(url + "/v1/jobs", timeout=120).status_code == 401
        assert httpx.get(url + "/metrics", timeout=120).status_code == 401
        assert httpx.get(url + "/healthz", timeout=120).status_code == 200  # probes stay open
        r = submit(url, body, token=token)
        assert r.status_code == 202, r.text
        job = wait_job(url, r.json()["id"], token=token)
        assert job["state"] == "done" and job["submitted_by"] == "ris-node1"
        assert httpx.get(f"{url}/v1/jobs/{job['id']}", timeout=120).status_code == 401
        from resunet.reports.audit import read_runs

        run = [x for x in read_runs(audit) if x["run_id"] == f"serve-{job['id']}"]
        assert len(run) == 1 and run[0]["user"] == "ris-node1"
        # retention 1.8 s: the job folder (upload and results) goes, the job row stays and says so
        job_dir = state / "jobs" / job["id"]
        import time

        deadline = time.monotonic() + 300
        while job_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not job_dir.exists()
        headers = {"Authorization": f"Bearer {token}"}
        gone = httpx.get(f"{url}/v1/jobs/{job['id']}/outputs/mask", headers=headers, timeout=120)
        assert gone.status_code == 410 and "retention" in gone.json()["detail"]
        assert httpx.get(f"{url}/v1/jobs/{job['id']}", headers=headers, timeout=120).json()["files_deleted_utc"]
        # a token in the query string is not accepted and not written to the access log (issue 22.10)
        leaked = httpx.get(f"{url}/v1/jobs?access_token={token}", timeout=120)
        assert leaked.status_code == 401
        log_text = svc.log()
        assert "GET /v1/jobs?[query redacted]" in log_text and token not in log_text
        # an unreadable tokens file is the server's fault: 503 without the server's path, the path in the log
        (state / "tokens.json").write_text("{not json")
        broken = httpx.get(f"{url}/v1/jobs", headers=headers, timeout=120)
        assert broken.status_code == 503 and broken.headers.get("retry-after"), broken.text
        assert str(state) not in broken.text and "tokens" not in broken.text
        assert f"{state / 'tokens.json'}: unreadable tokens file" in svc.log()


def _wait_running(url: str, ids: list[str], timeout: float = 300.0) -> str:
    """Poll the job API until one of ``ids`` is ``running``; returns its id (fails if all finish first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i in ids:
            state = httpx.get(f"{url}/v1/jobs/{i}", timeout=120).json()["state"]
            if state == "running":
                return i
        if all(httpx.get(f"{url}/v1/jobs/{i}", timeout=120).json()["state"] in ("done", "failed") for i in ids):
            break
        time.sleep(0.02)
    raise AssertionError(f"none of {ids} was seen running")


def test_sigkill_of_a_running_job_then_restart_finishes_every_job_once(tmp_path):
    """SIGKILL while the job API says a job is running (the kill must hit it: the database still says
    ``running`` afterwards), then a restart re-queues it and every job is done exactly once.

    The service runs with TTA (8 flips: several seconds a job), so the kill lands seconds inside the
    job; should the job still finish between the poll and the kill (the database says ``done``),
    the service is restarted and the next job is tried, up to three times, rather than the test
    asserting on a kill that hit nothing.
    """
    model = make_tiny_model(tmp_path / "tiny.pt")
    audit = tmp_path / "audit.sqlite"
    state = tmp_path / "state"
    ids: list[str] = []
    killed: str | None = None
    hit_by_a_miss: list[str] = []  # a job that started between a missed target's end and the kill
    for _ in range(3):
        svc = ServiceProcess(state, model, audit_db=audit).start()
        try:
            if not ids:
                ids = [submit(svc.url, [("t1.nii.gz", EXAMPLE_T1.read_bytes())]).json()["id"] for _ in range(4)]
            pending = [i for i in ids if httpx.get(f"{svc.url}/v1/jobs/{i}", timeout=120).json()["state"]
                       not in ("done", "failed")]
            target = _wait_running(svc.url, pending)
            svc.kill()  # at once: the API said running a moment ago
        finally:
            svc.stop()
        with sqlite3.connect(state / "jobs.sqlite") as conn:
            after_kill = dict(conn.execute("SELECT id, state FROM jobs").fetchall())
            last_event = conn.execute("SELECT MAX(rowid) FROM events").fetchone()[0]
        if after_kill[target] == "running":
            killed = target
            break
        hit_by_a_miss += [i for i, st in after_kill.items() if st == "running"]
    assert killed is not None, "the job seen running finished before each of three kills"
    assert set(after_kill) == set(ids) and list(after_kill.values()).count("running") == 1, after_kill
    with ServiceProcess(state, model, audit_db=audit) as again:
        with sqlite3.connect(state / "jobs.sqlite") as conn:  # start-up put the killed job back in the queue
            requeued = [r[0] for r in conn.execute("SELECT job_id FROM events WHERE event = 'requeued' AND rowid > ?",
                                                   (last_event,))]
        assert requeued == [killed], requeued
        jobs = {i: wait_job(again.url, i, timeout=300) for i in ids}
        assert [j["state"] for j in jobs.values()] == ["done"] * 4, jobs
        runs_of = {i: 1 + (i == killed) + hit_by_a_miss.count(i) for i in ids}
        assert {i: j["attempts"] for i, j in jobs.items()} == runs_of
        for j in jobs.values():  # outputs on disk are the ones recorded
            r = httpx.get(f"{again.url}/v1/jobs/{j['id']}/outputs/mask", timeout=120)
            assert hashlib.sha256(r.content).hexdigest() == j["outputs"]["mask"]["sha256"]
    with sqlite3.connect(state / "jobs.sqlite") as conn:
        done = dict(conn.execute("SELECT job_id, COUNT(*) FROM events WHERE event = 'done' GROUP BY job_id").fetchall())
        claims = dict(conn.execute("SELECT job_id, COUNT(*) FROM events WHERE event = 'claimed' GROUP BY job_id").fetchall())
        leftovers = conn.execute("SELECT COUNT(*) FROM jobs WHERE state != 'done'").fetchone()[0]
    assert done == {i: 1 for i in ids} and leftovers == 0
    assert claims == runs_of, claims
    from resunet.reports.audit import read_runs, verify_log

    runs = [r["run_id"] for r in read_runs(audit)]
    assert sorted(runs) == sorted(f"serve-{i}" for i in ids)  # each job once in the audit log
    assert verify_log(audit) == []
    assert not list((state / "uploads").iterdir())
    assert json.loads((state / "jobs" / killed / "out" / "predictions.json").read_text())["counts"]["ok"] == 1


def test_token_scopes_groups_and_delete(tmp_path):
    """Issue 22 point 10: a submit token sees its own and its group's jobs only, an admin token every
    job; DELETE erases a job's files at once while its row and audit record (hashes) stay."""
    state = tmp_path / "state"
    tokens = {}
    for name, scope, group in (("alice", "submit", "radiology"), ("bob", "submit", "radiology"),
                               ("carol", "submit", "oncology"), ("ops", "admin", "")):
        cmd = [sys.executable, "-m", "resunet", "serve", "--state-dir", str(state), "--add-token", name,
               "--scope", scope] + (["--group", group] if group else [])
        made = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        tokens[name] = made.stdout.strip()
    model = make_tiny_model(tmp_path / "tiny.pt")
    audit = tmp_path / "audit.sqlite"
    with ServiceProcess(state, model, "--no-tta", "--require-token", audit_db=audit) as svc:
        url = svc.url

        def get(path: str, who: str) -> httpx.Response:
            return httpx.get(url + path, headers={"Authorization": f"Bearer {tokens[who]}"}, timeout=60)

        body = [("t1.nii.gz", EXAMPLE_T1.read_bytes())]
        a = wait_job(url, submit(url, body, token=tokens["alice"]).json()["id"], token=tokens["alice"])
        c = wait_job(url, submit(url, body, token=tokens["carol"]).json()["id"], token=tokens["carol"])
        assert a["state"] == c["state"] == "done"
        ids = lambda who: {j["id"] for j in get("/v1/jobs", who).json()["jobs"]}  # noqa: E731
        assert ids("alice") == ids("bob") == {a["id"]} and ids("carol") == {c["id"]}
        assert ids("ops") == {a["id"], c["id"]}
        assert get(f"/v1/jobs/{a['id']}", "carol").status_code == 404  # another group's job: not there
        assert get(f"/v1/jobs/{a['id']}/outputs/mask", "carol").status_code == 404
        assert get(f"/v1/jobs/{a['id']}", "bob").status_code == 200
        assert httpx.delete(f"{url}/v1/jobs/{a['id']}", headers={"Authorization": f"Bearer {tokens['carol']}"},
                            timeout=60).status_code == 404
        gone = httpx.delete(f"{url}/v1/jobs/{a['id']}", headers={"Authorization": f"Bearer {tokens['alice']}"},
                            timeout=60)
        assert gone.status_code == 200 and gone.json()["files_deleted_utc"], gone.text
        assert not (state / "jobs" / a["id"]).exists()
        mask = get(f"/v1/jobs/{a['id']}/outputs/mask", "alice")
        assert mask.status_code == 410 and "DELETE" in mask.json()["detail"]
        from resunet.reports.audit import read_runs, verify_log

        run = [r for r in read_runs(audit) if r["run_id"] == f"serve-{a['id']}"]
        assert len(run) == 1 and run[0]["user"] == "alice"
        assert {o["key"]: o["sha256"] for o in run[0]["outputs"]} == {k: o["sha256"] for k, o in a["outputs"].items()}
        assert verify_log(audit) == []


def _docs_curl_lines() -> list[str]:
    """The curl lines of docs/serve.md's job example (submit, poll, the two -OJ downloads)."""
    text = (REPO / "docs" / "serve.md").read_text(encoding="utf-8")
    lines = [ln.split("  #")[0].strip() for ln in text.splitlines() if ln.startswith('curl -s -H "Authorization: Bearer $TOKEN"')]
    assert len(lines) == 4 and "-OJ" in lines[2] and lines[3].endswith("/outputs/mask"), lines
    return lines


def test_docs_curl_example_downloads_names_that_are_not_the_scans(tmp_path):
    """Issue 25 point 6: docs/serve.md's curl lines, run as written against a real service (a token, names
    kept): every -OJ download succeeds next to the input, and the mask of colin27_t1.nii.gz is saved as
    colin27_t1_mask.nii.gz (it was served as colin27_t1.nii.gz, and curl refused to overwrite: exit 23)."""
    import json
    import shutil

    state = tmp_path / "state"
    made = subprocess.run([sys.executable, "-m", "resunet", "serve", "--state-dir", str(state), "--add-token", "doc"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    model = make_tiny_model(tmp_path / "tiny.pt")
    work = tmp_path / "work"
    work.mkdir()
    (work / "study.zip").write_bytes(dicom_zip())
    shutil.copy(EXAMPLE_T1, work / "colin27_t1.nii.gz")
    submit_line, poll_line, seg_line, mask_line = _docs_curl_lines()
    with ServiceProcess(state, model, "--no-tta", "--keep-upload-names") as svc:
        def sh(line: str, job_id: str = "") -> subprocess.CompletedProcess:
            line = line.replace("http://127.0.0.1:8000", svc.url)
            return subprocess.run(["bash", "-c", line], cwd=work, capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "TOKEN": token, "ID": job_id})

        def run_job(line: str) -> str:
            done = sh(line)
            assert done.returncode == 0, (line, done.stderr)
            job_id = json.loads(done.stdout)["id"]
            wait_job(svc.url, job_id, token=token)
            polled = sh(poll_line, job_id)
            assert polled.returncode == 0 and json.loads(polled.stdout)["state"] == "done", polled.stdout
            return job_id

        zip_job = run_job(submit_line)
        for line in (seg_line, mask_line):
            got = sh(line, zip_job)
            assert got.returncode == 0, (line, got.returncode, got.stderr)
        assert (work / "study_seg.dcm").is_file() and (work / "study_mask.nii.gz").is_file()
        # the NIfTI case: the mask's download next to the scan it was made from
        nifti_job = run_job(submit_line.replace("files=@study.zip", "files=@colin27_t1.nii.gz")
                            .replace("formats=nifti,seg", "formats=nifti"))
        got = sh(mask_line, nifti_job)
        assert got.returncode == 0, (got.returncode, got.stderr)
    assert (work / "colin27_t1.nii.gz").read_bytes() == EXAMPLE_T1.read_bytes()
    saved = nib.load(work / "colin27_t1_mask.nii.gz")
    assert saved.shape == nib.load(EXAMPLE_T1).shape and np.asarray(saved.dataobj).dtype == np.uint8
    assert sorted(p.name for p in work.iterdir()) == ["colin27_t1.nii.gz", "colin27_t1_mask.nii.gz", "study.zip",
                                                      "study_mask.nii.gz", "study_seg.dcm"]


def test_download_names():
    from resunet.inference.output_names import download_name

    assert download_name("mask", "colin27_t1.nii.gz") == "colin27_t1_mask.nii.gz"
    assert download_name("seg", "1.2.840.5.seg.dcm") == "1.2.840.5_seg.dcm"
    assert download_name("rtstruct", "a.rtstruct.dcm") == "a_rtstruct.dcm"
    assert download_name("sr", "a.sr.dcm") == "a_sr.dcm"
    assert download_name("uncertainty", "a.uncertainty.nii.gz") == "a_uncertainty.nii.gz"
    assert download_name("disagreement", "a.uncertainty-models.nii.gz") == "a_uncertainty-models.nii.gz"
    assert download_name("probabilities", "a.prob.nii.gz") == "a_prob.nii.gz"
    assert download_name("probabilities:grey matter", "a.prob-grey_matter.nii.gz") == "a_prob-grey_matter.nii.gz"
    assert download_name("predictions", "predictions.json") == "predictions.json"
