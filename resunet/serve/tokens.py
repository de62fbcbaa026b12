"""Bearer tokens of the service: made by ``resunet serve --add-token NAME``, stored hashed.

The tokens file (``<state>/tokens.json``) maps a name to the SHA-256 of its token; the token itself
is printed once and never stored. A token is 32 random bytes (``secrets.token_urlsafe``), so a plain
SHA-256 is enough (no password stretching needed: nothing to guess). Checking compares every stored
hash with :func:`hmac.compare_digest`. The file is rewritten atomically (temp + rename) and made
readable by its owner only.

Each token has a scope: ``submit`` (the default) submits jobs and sees its own jobs and those of
tokens of its group (``--group``, e.g. a department), ``admin`` sees every job. Tokens made before
scopes existed count as ``submit``. On loopback without tokens the caller is the machine itself and
sees everything, as before.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resunet.errors import ConfigError, ServerError
from resunet.io.atomic import atomic_path
from resunet.reports.provenance import utc_now

TOKENS_FILE = "tokens.json"
SCHEMA = "resunet-serve-tokens/1"
#: Token names: recorded in the audit log as "who", so keep them plain.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
PREFIX = "rsu_"
SCOPES = ("submit", "admin")


@dataclass(frozen=True)
class Caller:
    """Who calls the API: a token's name, scope and group (``anonymous`` on loopback: every job)."""

    name: str
    scope: str = "admin"
    group: str = ""

    def sees(self, submitted_by: str | None, group_of_submitter: str) -> bool:
        """May this caller see (and delete) a job submitted by ``submitted_by`` of that group?"""
        if self.scope == "admin":
            return True
        return submitted_by == self.name or bool(self.group and group_of_submitter == self.group)


def token_sha256(token: str) -> str:
    """Hex SHA-256 of a token (what the tokens file stores)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """The tokens file of a state folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, dict[str, str]]:
        if not self.path.exists():
            return {}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            tokens = doc["tokens"]
            if not isinstance(tokens, dict):
                raise TypeError("tokens is not an object")
            return {str(k): dict(v) for k, v in tokens.items()}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ServerError(f"{self.path}: unreadable tokens file ({err}); fix or remove it and add tokens again") from None

    def names(self) -> list[str]:
        """Names of the stored tokens, sorted."""
        return sorted(self._read())

    def __len__(self) -> int:
        return len(self._read())

    def add(self, name: str, scope: str = "submit", group: str = "") -> str:
        """Make a token for ``name``, store its hash and return the token (shown to the operator once).

        Args:
            scope: ``submit`` (own and group's jobs) or ``admin`` (every job).
            group: department or group whose ``submit`` tokens see each other's jobs ('' = none).

        Raises:
            ConfigError: bad name, scope or group, or a token of that name exists (remove it first).
        """
        self._check_new(name, scope, group)
        tokens = self._read()
        if name in tokens:
            raise ConfigError(f"a token named {name!r} exists in {self.path}; remove it with --remove-token {name} first")
        token = PREFIX + secrets.token_urlsafe(32)
        tokens[name] = {"sha256": token_sha256(token), "created_utc": utc_now(), "scope": scope, "group": group}
        self._write(tokens)
        return token

    @staticmethod
    def _check_new(name: str, scope: str, group: str) -> None:
        if not NAME_RE.match(name or ""):
            raise ConfigError(f"token name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
        if scope not in SCOPES:
            raise ConfigError(f"token scope {scope!r}: use one of {', '.join(SCOPES)}")
        if group and not NAME_RE.match(group):
            raise ConfigError(f"token group {group!r}: use 1-64 letters, digits, '.', '_', '@' or '-'")

    def remove(self, name: str) -> None:
        """Delete the token ``name`` (ConfigError if there is none)."""
        tokens = self._read()
        if name not in tokens:
            raise ConfigError(f"no token named {name!r} in {self.path}; known: {', '.join(sorted(tokens)) or 'none'}")
        del tokens[name]
        self._write(tokens)

    def check(self, token: str) -> str | None:
        """The name of ``token``, or None when it matches no stored hash."""
        caller = self.lookup(token)
        return caller.name if caller is not None else None

    def lookup(self, token: str) -> Caller | None:
        """The :class:`Caller` of ``token`` (name, scope, group), or None when it matches no stored hash."""
        if not token:
            return None
        digest = token_sha256(token)
        found = None
        for name, rec in self._read().items():  # every hash compared: no early exit to time
            if hmac.compare_digest(digest, str(rec.get("sha256", ""))):
                found = Caller(name, str(rec.get("scope") or "submit"), str(rec.get("group") or ""))
        return found

    def group_of(self, name: str | None) -> str:
        """The group of the token ``name`` ('' when none, or when the token is gone)."""
        rec = self._read().get(name or "")
        return str(rec.get("group") or "") if rec else ""

    def _write(self, tokens: dict[str, dict[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"schema": SCHEMA, "tokens": tokens}, indent=1, sort_keys=True) + "\n"
        with atomic_path(self.path) as tmp:
            tmp.write_text(text, encoding="utf-8")
            os.chmod(tmp, 0o600)  # owner only, before the rename makes it visible


class PgTokenStore(TokenStore):
    """The tokens of a PostgreSQL queue (table ``resunet_tokens``): shared by every node at once.

    The same API and rules as the tokens file; a token added or removed on one node holds on every node
    from its next request, since each lookup reads the table (a primary-key read, well under a millisecond).
    ``path`` is what messages call the store (the database URL without a password).
    """

    def __init__(self, queue: Any) -> None:  # a resunet.serve.queue_pg.PgJobQueue (tables made there)
        self.queue = queue
        self.path = f"the tokens table of {queue.path}"  # type: ignore[assignment]

    def _read(self) -> dict[str, dict[str, str]]:
        rows = self.queue._run(lambda c: c.execute("SELECT name, sha256, created_utc, scope, grp FROM resunet_tokens").fetchall())
        return {r["name"]: {"sha256": r["sha256"], "created_utc": r["created_utc"], "scope": r["scope"], "group": r["grp"]}
                for r in rows}

    def _write(self, tokens: dict[str, dict[str, str]]) -> None:
        raise AssertionError("PgTokenStore writes rows, not a file")

    def add(self, name: str, scope: str = "submit", group: str = "") -> str:
        import psycopg

        TokenStore._check_new(name, scope, group)
        token = PREFIX + secrets.token_urlsafe(32)
        try:
            self.queue._run(lambda c: c.execute(
                "INSERT INTO resunet_tokens (name, sha256, created_utc, scope, grp) VALUES (%s, %s, %s, %s, %s)",
                (name, token_sha256(token), utc_now(), scope, group)))
        except psycopg.errors.UniqueViolation:
            raise ConfigError(f"a token named {name!r} exists in {self.path}; remove it with --remove-token {name} first") from None
        return token

    def remove(self, name: str) -> None:
        cur = self.queue._run(lambda c: c.execute("DELETE FROM resunet_tokens WHERE name = %s", (name,)))
        if cur.rowcount != 1:
            raise ConfigError(f"no token named {name!r} in {self.path}; known: {', '.join(self.names()) or 'none'}")
