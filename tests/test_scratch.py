"""No patient data left in temp folders after a SIGKILL (issue 22 point 6).

Real processes killed with SIGKILL while they hold an extracted zip of the example DICOM series; the
next resunet process (or service start) removes what they left, and never a live process's folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from serve_support import ServiceProcess, submit
from test_app_support import EXAMPLE_DICOM, make_tiny_model

from resunet.io.scratch import private_temp_dir, remove_stale

HOLD = """
import sys, time
from resunet.io.archive import extract_zip
with extract_zip(sys.argv[1]) as folder:
    print(folder, flush=True)
    time.sleep(600)
"""


@pytest.fixture(scope="module")
def series_zip(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("zip") / "series.zip"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(EXAMPLE_DICOM.iterdir()):
            zf.write(f, f"series/{f.name}")
    return p


def _holder(series_zip: Path, tmpdir: Path) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ, TMPDIR=str(tmpdir))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(series_zip)], stdout=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    line = proc.stdout.readline().strip()
    assert line, "the holder process did not extract the zip"
    return proc, Path(line)


def test_folders_of_killed_processes_are_removed_and_live_ones_kept(tmp_path, series_zip):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    killed, killed_dir = _holder(series_zip, tmpdir)
    alive, alive_dir = _holder(series_zip, tmpdir)
    try:
        assert killed_dir.parent == tmpdir and len(list(killed_dir.rglob("*.dcm"))) == 91
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        assert killed_dir.exists()  # SIGKILL skipped the clean-up: a full copy of the series is on disk
        unrelated = tmpdir / "resunet-notes"  # not one of ours by name: left alone
        unrelated.mkdir()
        assert remove_stale(tmpdir) == [killed_dir]
        assert not killed_dir.exists() and alive_dir.exists() and unrelated.exists()
        # the next extraction of any resunet process sweeps too
        killed2, killed2_dir = _holder(series_zip, tmpdir)
        killed2.send_signal(signal.SIGKILL)
        killed2.wait(30)
        saved = tempfile.tempdir
        tempfile.tempdir = str(tmpdir)
        try:
            with private_temp_dir("zip") as mine:
                assert mine.parent == tmpdir and not killed2_dir.exists() and alive_dir.exists()
            assert not mine.exists()
        finally:
            tempfile.tempdir = saved
    finally:
        alive.kill()
        alive.wait(30)


def test_service_keeps_extractions_in_its_state_folder_and_cleans_them_after_a_kill(tmp_path, series_zip, monkeypatch):
    """16 parallel zip uploads, SIGKILL while an extraction is on disk: nothing in the machine's temp
    folder, and the state folder's tmp/ is empty once the service is back."""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(systmp))
    state = tmp_path / "state"
    model = make_tiny_model(tmp_path / "tiny.pt")
    body = series_zip.read_bytes()
    svc = ServiceProcess(state, model, "--no-tta").start()
    seen: list[Path] = []
    try:
        threads = [threading.Thread(target=lambda: _quiet_submit(svc.url, body)) for _ in range(16)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not seen:
            seen = [p for root in (systmp, state / "tmp") if root.exists() for p in root.glob("resunet-zip-*")]
            time.sleep(0.002)
        svc.kill()
        for t in threads:
            t.join(60)
    finally:
        svc.stop()
    assert seen, "no extraction was on disk when the service was killed"
    assert all(p.parent == state / "tmp" for p in seen)  # never the machine's temp folder
    assert list(systmp.iterdir()) == []
    assert any((state / "tmp").iterdir())  # the kill left a copy of a series...
    with ServiceProcess(state, model, "--no-tta"):
        assert list((state / "tmp").iterdir()) == []  # ...which the next start removed
    assert list(systmp.iterdir()) == []


def _quiet_submit(url: str, body: bytes) -> None:
    try:
        submit(url, [("series.zip", body)])
    except Exception:  # noqa: BLE001 - the server is killed under the uploads on purpose
        pass
