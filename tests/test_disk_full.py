"""A full disk is the server's fault (issue 22 point 8): a real small filesystem (tmpfs mounted by the
test) holds the service's state folder; uploads on a full disk get 507, not "the zip is damaged", the
free-space floor refuses uploads before the disk fills, and a job that failed for a full disk is
re-queued by the service itself once there is space again.

Mounting needs root (CAP_SYS_ADMIN): without it the test skips, saying so.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from serve_support import ServiceProcess, submit, wait_job
from test_app_support import EXAMPLE_T1, make_tiny_model


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves ``leave`` bytes free on ``disk``."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "ab") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


@pytest.mark.ci_may_skip("mounting a tmpfs needs CAP_SYS_ADMIN, which a CI container may not have")
def test_full_disk_is_507_and_jobs_are_retried_once_space_is_back(tmp_path, small_disk):
    model = make_tiny_model(tmp_path / "tiny.pt")
    state = small_disk / "state"
    t1 = EXAMPLE_T1.read_bytes()
    with ServiceProcess(state, model, "--no-tta", "--min-free-gb", "0", "--sweep-interval", "0.5",
                        "--no-audit", log_path=tmp_path / "serve.log") as svc:
        url = svc.url
        filler = _fill(small_disk, 64 * 1024)
        r = submit(url, [("t1.nii.gz", t1)])
        assert r.status_code == 507, r.text
        assert str(small_disk) not in r.text and "damaged" not in r.text
        assert "no space left" in svc.log()
        filler.unlink()

        # room for the upload, not for the outputs (uncertainty + probability maps, ~2 MB gzipped)
        filler = _fill(small_disk, len(t1) + 160 * 1024)
        r = submit(url, [("t1.nii.gz", t1)], uncertainty=True, probabilities=True)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 120
        job = {}
        while time.monotonic() < deadline:
            job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
            if job["state"] == "failed":
                break
            time.sleep(0.1)
        assert job["state"] == "failed" and job["error"].startswith("server fault: no space left"), job
        assert str(small_disk) not in job["error"]
        filler.unlink()  # the operator frees space: the sweep re-queues the job by itself
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()["state"] == "failed":
            time.sleep(0.1)
        done = wait_job(url, job_id, timeout=120)
        assert done["state"] == "done" and {"mask", "uncertainty"} <= set(done["outputs"]), done
        assert done["attempts"] == 2
        again = httpx.post(f"{url}/v1/jobs/{job_id}/retry", timeout=30)
        assert again.status_code == 409 and "only a failed job" in again.json()["detail"]

    # the free-space floor: uploads refused before the disk fills (floor above this disk's size)
    with ServiceProcess(state, model, "--no-tta", "--min-free-gb", "1", "--no-audit",
                        log_path=tmp_path / "serve2.log") as svc:
        r = submit(svc.url, [("t1.nii.gz", t1)])
        assert r.status_code == 507 and r.headers.get("retry-after"), r.text
        assert "below the floor of 1 GB (--min-free-gb)" in svc.log()
