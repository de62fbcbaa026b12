"""A real two-node Ray cluster on loopback for the tests: ``ray start --head`` plus ``ray start --address``.

Both nodes run on this machine (two raylets = two nodes), 1 CPU each. Every process the cluster
starts carries a marker in its environment (``RESUNET_TEST_RAY=<id>:<node>``), so the tests find
and end exactly their own processes by pid (never ``ray stop``, which would stop every Ray on the
machine). HOME and the temp dir are private: Ray 2.60 writes its auth token under ``~/.ray``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "RESUNET_TEST_RAY"


def ray_bin() -> Path:
    """The ``ray`` command of this Python; pytest.fail under CI and skip otherwise when Ray is missing."""
    exe = Path(sys.executable).parent / "ray"
    try:
        import ray  # noqa: F401
    except ImportError:
        exe = Path("/nonexistent")
    if not exe.exists():
        msg = "Ray is not installed (pip install -e '.[test]' installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked_pids(marker: str) -> list[int]:
    """Pids of this user's processes whose environment holds ``marker``."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if any(item.startswith(needle) for item in env.split(b"\0")):
            pids.append(int(d.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class RayCluster:
    """``with RayCluster(tmp) as c:`` starts the head and a second node; ``c.address``, ``c.env``."""

    def __init__(self, nodes: int = 2, cpus: int = 1) -> None:
        self.id = uuid.uuid4().hex[:8]
        # short path: Ray's unix sockets live under the temp dir (107-character limit)
        self.root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.home = self.root / "home"
        self.home.mkdir()
        self.nodes = nodes
        self.cpus = cpus
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def env(self, node: str = "driver") -> dict[str, str]:
        env = dict(os.environ, HOME=str(self.home), RAY_TMPDIR=str(self.root), PYTHONPATH=str(REPO),
                   OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS=self.address)
        env[MARKER] = f"{self.id}:{node}"
        env.pop("CUDA_VISIBLE_DEVICES", None)
        return env

    def _start(self, node: str, args: list[str]) -> None:
        env = self.env(node)
        if node == "head":
            env.pop("RAY_ADDRESS")
        # every port of its own: other Ray clusters may run on this machine (the defaults would collide)
        ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                 "--metrics-export-port", "--node-manager-port", "--object-manager-port"]
        if node == "head":
            ports += ["--dashboard-port"]
        common = ["--num-cpus", str(self.cpus), "--num-gpus", "0", "--node-ip-address", "127.0.0.1",
                  "--disable-usage-stats", *[x for flag in ports for x in (flag, str(free_port()))]]
        res = subprocess.run([str(ray_bin()), "start", *args, *common], env=env, cwd=self.root,
                             capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"ray start ({node}) failed: {res.stdout[-2000:]} {res.stderr[-2000:]}")

    def __enter__(self) -> "RayCluster":
        try:
            self._start("head", ["--head", "--port", str(self.port), "--include-dashboard", "false",
                                 "--temp-dir", str(self.root)])
            for i in range(1, self.nodes):
                self._start(f"node{i}", ["--address", self.address])
            self.wait_nodes(self.nodes)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_nodes(self, n: int, deadline_s: float = 120.0) -> None:
        """Until ``ray status`` (through the CLI, not this process) lists ``n`` alive nodes."""
        deadline = time.monotonic() + deadline_s
        out = ""
        while time.monotonic() < deadline:
            res = subprocess.run([str(ray_bin()), "status", "--address", self.address], env=self.env("status"),
                                 capture_output=True, text=True, timeout=120)
            out = res.stdout
            if out.count("node_") >= n:
                return
            time.sleep(1)
        raise RuntimeError(f"the Ray cluster did not reach {n} nodes: {out[-2000:]}")

    def raylet_pid(self, node: str) -> int:
        pids = [p for p in _marked_pids(f"{self.id}:{node}") if "/raylet/raylet" in _cmdline(p).split(" ")[0]]
        assert len(pids) == 1, f"raylet of {node}: {pids}"
        return pids[0]

    def busy_workers(self, node: str, task_name: str) -> list[int]:
        """Pids of the node's worker processes running a task named ``task_name`` now (Ray's process title)."""
        return [p for p in _marked_pids(f"{self.id}:{node}") if _cmdline(p).startswith(f"ray::{task_name}")]

    def kill_node(self, node: str) -> None:
        """SIGKILL the node's raylet (its workers then exit on their own)."""
        os.kill(self.raylet_pid(node), signal.SIGKILL)

    def stop(self) -> None:
        """End every process of this cluster (by pid, SIGTERM then SIGKILL) and remove its folders."""
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            pids = _marked_pids(f"{self.id}:")
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
                time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True
