"""PostgreSQL connections for the service's shared queue and audit log (psycopg 3, optional extra ``postgres``).

A database is named by a libpq URL, ``postgresql://USER@HOST[:PORT]/DB`` (query parameters such as
``?sslmode=verify-full`` pass through to libpq). The password never goes on the command line, where
``ps`` and shell histories show it: a URL that holds one is refused. It comes, in libpq's own order,
from ``$PGPASSWORD``, from ``$PGPASSFILE`` (or ``~/.pgpass``), or from a file that holds only the password
(``$RESUNET_PG_PASSWORD_FILE``, what ``resunet serve --queue-password-file`` sets; a Docker/Kubernetes
secret mounted as a file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from resunet.errors import ConfigError, ServerError

#: environment variable naming a file that holds only the database password
PASSWORD_FILE_ENV = "RESUNET_PG_PASSWORD_FILE"
SCHEMES = ("postgresql", "postgres")


def is_pg_url(value: Any) -> bool:
    """True when ``value`` is a ``postgresql://`` (or ``postgres://``) URL."""
    return isinstance(value, str) and value.split("://", 1)[0].lower() in SCHEMES and "://" in value


def check_url(url: str) -> str:
    """``url`` if it is a PostgreSQL URL without a password; ConfigError naming the fix otherwise."""
    if not is_pg_url(url):
        raise ConfigError(f"--queue {url!r}: use postgresql://USER@HOST[:PORT]/DB (or leave it out for the SQLite queue)")
    parts = urlsplit(url)
    if parts.password is not None:
        raise ConfigError("--queue: the URL holds a password, which would show in the process list; remove it and put it in "
                          f"$PGPASSWORD, $PGPASSFILE or a file named by --queue-password-file (${PASSWORD_FILE_ENV})")
    if not parts.path.strip("/"):
        raise ConfigError(f"--queue {redact(url)}: name the database, e.g. postgresql://resunet@db.example.org/resunet")
    return url


def redact(url: str) -> str:
    """The URL without any password (for messages and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://?"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def _password_from_file() -> str | None:
    name = os.environ.get(PASSWORD_FILE_ENV)
    if not name:
        return None
    try:
        return Path(name).read_text(encoding="utf-8").strip("\r\n")
    except OSError as err:
        raise ConfigError(f"cannot read the database password file {name} (${PASSWORD_FILE_ENV}): {err.strerror}") from None


def connect(url: str, *, connect_timeout: float = 5.0) -> Any:
    """An autocommit psycopg connection to ``url`` (transactions with ``conn.transaction()``).

    Raises:
        ConfigError: psycopg is not installed (``pip install 'resunet[postgres]'``).
        ServerError: the database cannot be reached (the message names it without a password).
    """
    try:
        import psycopg
    except ImportError:
        raise ConfigError("--queue postgresql://... needs psycopg 3: pip install 'resunet[postgres]'") from None
    kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": max(1, int(connect_timeout)),
                              "application_name": "resunet"}
    password = _password_from_file()
    if password is not None and not os.environ.get("PGPASSWORD"):
        kwargs["password"] = password
    try:
        return psycopg.connect(url, **kwargs)
    except psycopg.OperationalError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ServerError(f"cannot reach the database {redact(url)}: {first}") from None
