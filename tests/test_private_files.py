"""Patient files owner-only whatever the umask (issue 22 point 4).

A real ``resunet serve`` (with its DICOM node) started under umask 022 on a state folder an older
version left world-readable; uploads over HTTP and a series over C-STORE (dcmtk's storescu); then
every folder under the state folder must be 0700 and every file 0600, the audit log too. The web UI's
session workspace and the CLI's audit log the same.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from serve_support import ServiceProcess, submit, wait_job
from test_app_support import EXAMPLE_DICOM, EXAMPLE_T1, free_port, make_tiny_model


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _loose(root: Path) -> list[str]:
    """Entries under ``root`` (root included) that others could read: folders not 0700, files not 0600."""
    bad = []
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        mode = stat.S_IMODE(p.lstat().st_mode)
        want = 0o700 if p.is_dir() else 0o600
        if mode != want:
            bad.append(f"{p.relative_to(root.parent)} {oct(mode)}")
    return bad


def test_service_state_is_owner_only_under_umask_022(tmp_path, umask_022):
    if shutil.which("storescu") is None:
        pytest.skip("dcmtk's storescu is missing (scripts/setup-system.sh installs it)")
    state = tmp_path / "state"
    (state / "jobs").mkdir(parents=True)
    old = state / "jobs" / "left-by-an-older-version.json"
    old.write_text("{}")
    os.chmod(state, 0o755)
    os.chmod(old, 0o644)
    model = make_tiny_model(tmp_path / "tiny.pt")
    audit = tmp_path / "audit" / "audit.sqlite"
    port = free_port()
    svc = ServiceProcess(state, model, "--no-tta", "--format", "nifti,seg", "--dicom-port", str(port),
                         "--settle-seconds", "1", audit_db=audit)
    with svc:
        r = submit(svc.url, [("scan.nii.gz", EXAMPLE_T1.read_bytes())])
        assert r.status_code == 202, r.text
        job = wait_job(svc.url, r.json()["id"])
        assert job["state"] == "done", job
        subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "RESUNET", "+sd", "127.0.0.1", str(port),
                        str(EXAMPLE_DICOM)], check=True, capture_output=True, timeout=120)
        deadline = time.monotonic() + 180
        node_jobs: list = []
        while time.monotonic() < deadline and not node_jobs:
            jobs = httpx.get(f"{svc.url}/v1/jobs", timeout=30).json()["jobs"]
            node_jobs = [j for j in jobs if j["kind"] == "dicom-series" and j["state"] in ("done", "failed")]
            time.sleep(0.3)
        assert node_jobs and node_jobs[0]["state"] == "done", node_jobs or svc.log()[-3000:]
        files = [p for p in state.rglob("*") if p.is_file()]
        assert any(p.suffix == ".dcm" for p in files) and any(p.name.endswith(".nii.gz") for p in files)
        assert any(p.name == "jobs.sqlite" for p in files)
        assert _loose(state) == []
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    assert stat.S_IMODE(audit.parent.stat().st_mode) == 0o700


def test_cli_audit_log_is_owner_only(tmp_path, umask_022):
    from resunet.cli import main

    audit = tmp_path / "home" / ".resunet" / "audit.sqlite"
    out = tmp_path / "out"
    model = make_tiny_model(tmp_path / "tiny.pt")
    assert main(["predict", str(EXAMPLE_T1), "--out", str(out), "--model", str(model), "--no-tta",
                 "--audit-db", str(audit)]) == 0
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    assert stat.S_IMODE(audit.parent.stat().st_mode) == 0o700
    os.chmod(audit, 0o644)  # a log written by an older version is tightened at the next run
    assert main(["predict", str(EXAMPLE_T1), "--out", str(out), "--model", str(model), "--no-tta",
                 "--audit-db", str(audit)]) == 0
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600


def test_web_ui_workspace_is_owner_only(tmp_path, umask_022):
    import subprocess
    import sys

    # In a child process: use_private_files changes the process umask for good (the app's own process).
    code = f"""
import os, stat, sys
from resunet.webui.workspace import SessionWorkspace
ws = SessionWorkspace({str(tmp_path / 'app')!r}, 60)
d = ws.subdir("upload")
(d / "scan.nii.gz").write_bytes(b"x")
from resunet.io.atomic import atomic_write_bytes
atomic_write_bytes(d / "mask.nii.gz", b"y")
for p in [ws.path.parent, ws.path, d, d / "scan.nii.gz", d / "mask.nii.gz"]:
    print(p.name, oct(stat.S_IMODE(p.stat().st_mode)))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    modes = dict(line.split() for line in res.stdout.splitlines())
    assert modes.pop("scan.nii.gz") == "0o600" and modes.pop("mask.nii.gz") == "0o600"
    assert set(modes.values()) == {"0o700"}, modes
