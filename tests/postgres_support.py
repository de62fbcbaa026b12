"""A real PostgreSQL on loopback for the shared-queue tests and ``bench/serve_scale.py`` (no tests here).

Debian's ``postgresql`` (15; ``scripts/setup-system.sh`` / ``.ci/run`` install it): ``initdb`` into a
temp folder, ``pg_ctl start`` on a free 127.0.0.1 port with trust authentication for loopback, stopped
(and the folder removed) afterwards. PostgreSQL refuses to run as root, so as root the server runs as
the ``postgres`` user in a folder owned by it (``/tmp``, not pytest's 0700 tmp_path). Each test gets a
fresh database from :meth:`Postgres.create_database`. Nothing is mocked: the queue talks to the server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from test_app_support import free_port

PG_BIN_CANDIDATES = tuple(Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15, 14, 13))


def pg_bin() -> Path | None:
    """Folder of ``initdb``/``pg_ctl`` (Debian's versioned folder, else the PATH), or None."""
    for folder in PG_BIN_CANDIDATES:
        if (folder / "pg_ctl").exists() and (folder / "initdb").exists():
            return folder
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and shutil.which("initdb") else None


def require_postgres() -> Path:
    """The binaries folder; ``pytest.fail`` under CI when PostgreSQL or psycopg is missing, skip otherwise."""
    import pytest

    folder = pg_bin()
    missing = []
    if folder is None:
        missing.append("PostgreSQL (Debian postgresql; scripts/setup-system.sh installs it)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing.append("psycopg (pip install -e '.[test]')")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{' and '.join(missing)} missing")
        pytest.skip(f"{' and '.join(missing)} not installed")
    assert folder is not None
    return folder


@dataclass
class Postgres:
    """A running PostgreSQL: ``port`` on 127.0.0.1, superuser ``postgres`` (trust on loopback)."""

    bin: Path
    folder: Path
    port: int
    as_postgres: bool

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_postgres:  # PostgreSQL refuses root
            import shlex

            cmd = ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(shlex.quote(c) for c in cmd)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({res.returncode}): {res.stdout}{res.stderr}")
        return res

    def start(self) -> "Postgres":
        opts = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.folder / "server.log"), "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        p = self.folder / "server.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def close(self) -> None:
        try:
            self.stop("immediate")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres(bin_folder: Path) -> Postgres:
    """initdb + pg_ctl start in a new temp folder; the caller closes it."""
    folder = Path(tempfile.mkdtemp(prefix="resunet-pg-", dir="/tmp"))
    as_postgres = os.geteuid() == 0
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")
    pg = Postgres(bin_folder, folder, free_port(), as_postgres)
    try:
        pg._run("initdb", "-D", str(pg.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        pg.start()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return pg
