"""Start-up: ``resunet --help`` imports no heavy library, and ``resunet serve`` answers /healthz while
its model is still loading (/readyz 503, jobs wait), then gets ready (issue 23 point 3).

No timings are asserted (the machine is shared); what is checked is what gets imported and in what
order things happen. bench/bench_startup.py measures the times.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serve_support import submit, wait_job
from test_app_support import EXAMPLE_T1, REPO, free_port, make_tiny_model, stop

from resunet.cli import SUBCOMMANDS

#: libraries that cost from 0.1 s (numpy) to several seconds (torch, monai) to import
HEAVY = ("torch", "monai", "highdicom", "pynetdicom", "streamlit", "fastapi", "uvicorn", "scipy", "matplotlib",
         "pydicom", "nibabel", "numpy", "skimage", "SimpleITK", "dicomweb_client", "onnxruntime")


def imported_modules(*args: str) -> set[str]:
    """Top-level names of the modules ``python -X importtime -m resunet ARGS`` imported."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "resunet", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage: resunet" in res.stdout
    return {line.split("|")[-1].strip().split(".")[0] for line in res.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


@pytest.mark.parametrize("command", ["", *SUBCOMMANDS])
def test_help_imports_no_heavy_library(command):
    args = [command, "--help"] if command else ["--help"]
    found = imported_modules(*args)
    assert "resunet" in found  # the measurement sees our imports
    assert not found & set(HEAVY), f"resunet {' '.join(args)} imported {sorted(found & set(HEAVY))}"


def test_version_is_printed():
    res = subprocess.run([sys.executable, "-m", "resunet", "--version"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("resunet "), (res.stdout, res.stderr)


def test_light_package_imports_stay_light():
    """The modules the service imports before it binds its port pull in no torch, MONAI or pydicom."""
    code = ("import sys, resunet.io.atomic, resunet.inference.bundled, resunet.evaluation, resunet.serve.jobs, "
            "resunet.serve.pacs_jobs, resunet.serve.tokens; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    found = set(res.stdout.split())
    assert not found & set(HEAVY), sorted(found & set(HEAVY))


# The model load is held at a gate the test opens: Service._load_model waits for a file. This is the
# test's wrapper around the real service, not product code; it also records which libraries were
# imported when the load began (the port is bound and the app built by then).
GATED_SERVE = """
import json, sys, time
from pathlib import Path
import resunet.serve.service as service

gate, seen = Path(sys.argv[1]), Path(sys.argv[2])
load = service.Service._load_model

def gated(self):
    seen.write_text(json.dumps(sorted({m.split('.')[0] for m in list(sys.modules)})))
    while not gate.exists():
        time.sleep(0.05)
    load(self)

service.Service._load_model = gated
from resunet.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_serve_answers_healthz_while_the_model_loads_and_jobs_wait(tmp_path):
    model = make_tiny_model(tmp_path / "tiny.pt")
    script = tmp_path / "gated_serve.py"
    script.write_text(GATED_SERVE)
    gate, seen = tmp_path / "gate", tmp_path / "seen.json"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, str(script), str(gate), str(seen), "serve", "--port", str(port),
                             "--state-dir", str(tmp_path / "state"), "--model", str(model), "--no-tta", "--no-audit"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "no /healthz within 300 s"
            try:
                if httpx.get(url + "/healthz", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        ready = httpx.get(url + "/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["ready"] is False, ready.text
        # a job submitted now is accepted and waits: the worker starts after the model is warm
        job = submit(url, [("t1.nii.gz", EXAMPLE_T1.read_bytes())])
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        assert httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()["state"] == "queued"
        # the model load began after the port was bound, with no model library imported yet
        assert seen.exists()
        early = set(json.loads(seen.read_text()))
        assert {"fastapi", "uvicorn"} <= early
        assert not early & {"torch", "monai", "highdicom", "pynetdicom", "streamlit"}, sorted(early)
        assert httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()["state"] == "queued"
        gate.write_text("go")
        deadline = time.monotonic() + 300
        while httpx.get(url + "/readyz", timeout=30).status_code != 200:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        assert wait_job(url, job_id)["state"] == "done"
    finally:
        stop(proc)
        log.close()


def test_serve_on_a_taken_port_is_a_one_line_error_before_any_import(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        res = subprocess.run([sys.executable, "-X", "importtime", "-m", "resunet", "serve", "--port", str(port),
                              "--state-dir", str(tmp_path / "state"), "--no-audit"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if not ln.startswith("import time:")]
    assert lines == [f"resunet serve: error: cannot listen on 127.0.0.1:{port} (Address already in use); stop what "
                     "uses the port, or pass another --port or --host"], lines
    found = {ln.split("|")[-1].strip().split(".")[0] for ln in res.stderr.splitlines() if ln.startswith("import time:")}
    assert not found & {"torch", "monai", "fastapi", "uvicorn", "pydicom"}, sorted(found & set(HEAVY))
    assert not Path(tmp_path / "state" / "service.lock").exists()  # refused before the state folder was taken


# ``resunet predict`` with the first read recorded: which libraries were imported when the batch
# runner's reader started on the case (the wrapper is the test's, around the real command).
FIRST_READ = """
import json, sys
from pathlib import Path
import resunet.io.loader as loader

seen = Path(sys.argv[1])
load = loader.load_study

def first_read(*args, **kwargs):
    if not seen.exists():
        seen.write_text(json.dumps(sorted({m.split('.')[0] for m in list(sys.modules)})))
    return load(*args, **kwargs)

loader.load_study = first_read  # run_batch imports it from there when it starts
from resunet.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_predict_reads_its_first_case_before_importing_monai(tmp_path):
    model = make_tiny_model(tmp_path / "tiny.pt")
    script = tmp_path / "first_read.py"
    script.write_text(FIRST_READ)
    seen = tmp_path / "seen.json"
    res = subprocess.run([sys.executable, str(script), str(seen), "predict", str(EXAMPLE_T1), "--out",
                          str(tmp_path / "out"), "--model", str(model), "--no-tta", "--no-audit", "--no-progress"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    early = set(json.loads(seen.read_text()))
    assert "torch" in early  # the model is loaded before the read
    assert not early & {"monai", "highdicom", "matplotlib", "streamlit", "fastapi", "pynetdicom"}, sorted(early)
    assert (tmp_path / "out" / "predictions.json").exists()
