"""Helpers for the service tests (test_serve*.py) and bench/bench_serve.py: start ``resunet serve`` for real.

No tests here. :class:`ServiceProcess` runs ``python -m resunet serve`` in a subprocess on a free
loopback port (uvicorn, the real app), waits for /readyz, and stops or SIGKILLs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from test_app_support import REPO, free_port, stop, wait_http


class ServiceProcess:
    """``resunet serve`` in a subprocess; ``url`` is its base URL."""

    def __init__(self, state_dir: Path, model: Path | None, *extra: str, host: str = "127.0.0.1",
                 audit_db: Path | None = None, log_path: Path | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.port = free_port()
        self.host = host
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "resunet", "serve", "--host", host, "--port", str(self.port),
               "--state-dir", str(self.state_dir)]
        if model is not None:
            cmd += ["--model", str(model)]
        cmd += ["--audit-db", str(audit_db)] if audit_db else ["--no-audit"]
        cmd += list(extra)
        self.cmd = cmd
        self.log_path = Path(log_path or self.state_dir.parent / f"serve-{self.port}.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> "ServiceProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        try:
            wait_http(self.url + "/healthz", timeout, self.proc)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return self
                if self.proc.poll() is not None:
                    break
                time.sleep(0.2)
            raise RuntimeError(f"service did not get ready; log:\n{self.log()}")
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL (no clean shutdown), then reap."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop(self.proc)

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def submit(url: str, files: list[tuple[str, bytes]], token: str | None = None, **form: Any) -> httpx.Response:
    """POST /v1/jobs with ``files`` (name, bytes) and form fields."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in form.items()}
    return httpx.post(url + "/v1/jobs", files=[("files", (n, b)) for n, b in files], data=data,
                      headers=headers, timeout=120)


def wait_job(url: str, job_id: str, timeout: float = 300.0, token: str | None = None, *,
             until: tuple[str, ...] = ("done", "failed")) -> dict[str, Any]:
    """Poll the job until its state is one of ``until`` (``review``: held for a person, --require-review);
    returns its JSON."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers, timeout=120)
        r.raise_for_status()
        job = r.json()
        if job["state"] in until:
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} not finished within {timeout} s")


def held_pacs_jobs(svc: Any, study_uid: str, n: int, token: str) -> list[dict[str, Any]]:
    """Submit ``n`` pacs-pull jobs of ``study_uid`` to a ``--require-review`` service as ``token`` and wait
    until each is held for review; returns their JSON (asserts they were held, else shows the log)."""
    auth = {"Authorization": f"Bearer {token}"}
    ids = []
    for _ in range(n):
        r = httpx.post(f"{svc.url}/v1/pacs/jobs", data={"study_uid": study_uid}, headers=auth, timeout=60)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    held = [wait_job(svc.url, j, token=token, until=("review", "done", "failed")) for j in ids]
    assert [j["state"] for j in held] == ["review"] * n, held[0].get("error") or svc.log()[-3000:]
    return held
