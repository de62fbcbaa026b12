"""Optional login for the web UI.

Three modes, chosen from ``.streamlit/secrets.toml`` (never from the repository):

1. OIDC: when an ``[auth]`` section is configured, Streamlit's own ``st.login()`` / ``st.user`` are
   used (Google, Microsoft Entra, Okta, ... ; see Streamlit's docs for the keys).
2. Password: named users in ``[resunet.users]`` (``name = "pbkdf2_sha256$<iterations>$<salt hex>$<hash hex>"``,
   added with ``resunet app --add-user NAME``) and/or one shared password
   ``[resunet] password_hash = "..."`` (``resunet app --hash-password``; signs in as "password login").
   The typed password is hashed the same way and compared with :func:`hmac.compare_digest`. Failed
   logins are rate limited per user name and per client address (:class:`LoginThrottle`).
3. Neither: no login. The server binds to 127.0.0.1 by default, so only this machine can reach it;
   ``resunet app`` refuses any other address without a login unless ``--allow-anonymous`` is given,
   and the page itself refuses too (:func:`anonymous_exposure`) when it was started some other way
   (``streamlit run resunet/webui/streamlit_app.py --server.address 0.0.0.0``, where
   Streamlit's default is every interface).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
import secrets as _secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

log = logging.getLogger("resunet.app")

ALGO = "pbkdf2_sha256"
ITERATIONS = 600_000


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """``pbkdf2_sha256$iterations$salt$hash`` for ``password`` (what goes into secrets.toml)."""
    salt = salt if salt is not None else _secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return f"{ALGO}${iterations}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """True if ``password`` matches ``stored`` (a :func:`hash_password` string). Constant-time compare."""
    try:
        algo, iters, salt_hex, hash_hex = stored.strip().split("$")
        if algo != ALGO:
            return False
        digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), bytes.fromhex(salt_hex), int(iters))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest.hex(), hash_hex.lower())


def _secrets_dict() -> Mapping[str, Any]:
    import streamlit as st

    try:
        return st.secrets.to_dict()
    except Exception:  # no secrets.toml at all (Streamlit raises its own FileNotFound-type errors)
        return {}


def login_mode(secrets: Mapping[str, Any] | None = None) -> str:
    """``"oidc"``, ``"password"`` or ``"none"``."""
    s = _secrets_dict() if secrets is None else secrets
    auth = s.get("auth")
    if isinstance(auth, Mapping) and (auth.get("client_id") or _has_provider(auth)):
        return "oidc"
    if password_users(s):
        return "password"
    return "none"


#: The user name recorded for the single shared password of ``[resunet] password_hash``.
SHARED_PASSWORD_USER = "password login"
#: Accepted user names: letters, digits and ``. _ @ -`` (e-mail addresses work), 1-64 characters.
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def password_users(secrets: Mapping[str, Any]) -> dict[str, str]:
    """``{user name: stored hash}`` from ``[resunet.users]`` plus the shared ``[resunet] password_hash``."""
    section = secrets.get("resunet")
    if not isinstance(section, Mapping):
        return {}
    users = {str(k): str(v) for k, v in (section.get("users") or {}).items() if isinstance(v, str) and v}
    if section.get("password_hash"):
        users.setdefault(SHARED_PASSWORD_USER, str(section["password_hash"]))
    return users


@dataclass
class LoginThrottle:
    """Rate limit of failed logins, per key (``user:<name>`` and ``client:<address>``).

    After ``free_failures`` failures in a row for a key, every further attempt for that key must wait
    ``base_delay_s * 2 ** (failures - free_failures)`` seconds after the last failure (capped at
    ``max_delay_s``); attempts during the wait are refused without checking the password. A success
    resets the user's and the client's counters. Failures older than ``forget_after_s`` are forgotten.

    Args:
        free_failures: failures allowed before waits begin.
        base_delay_s, max_delay_s: first and longest wait, seconds.
        forget_after_s: a key's count is reset when its last failure is older than this.
        clock: time source (``time.monotonic``); tests pass their own.
    """

    free_failures: int = 5
    base_delay_s: float = 30.0
    max_delay_s: float = 900.0
    forget_after_s: float = 3600.0
    clock: Callable[[], float] = time.monotonic
    _state: dict[str, tuple[int, float]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _delay(self, failures: int) -> float:
        if failures < self.free_failures:
            return 0.0
        return min(self.max_delay_s, self.base_delay_s * 2 ** (failures - self.free_failures))

    def wait_s(self, *keys: str) -> float:
        """Seconds until an attempt for all ``keys`` is allowed (0 = now)."""
        now = self.clock()
        worst = 0.0
        with self._lock:
            for key in keys:
                failures, last = self._state.get(key, (0, 0.0))
                if failures and now - last > self.forget_after_s:
                    self._state.pop(key, None)
                    continue
                worst = max(worst, last + self._delay(failures) - now)
        return max(0.0, worst)

    def failed(self, *keys: str) -> None:
        now = self.clock()
        with self._lock:
            for key in keys:
                failures, last = self._state.get(key, (0, 0.0))
                if failures and now - last > self.forget_after_s:
                    failures = 0
                self._state[key] = (failures + 1, now)

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._state.pop(key, None)

    def failures(self, key: str) -> int:
        with self._lock:
            return self._state.get(key, (0, 0.0))[0]


#: One throttle per server process (module globals outlive page reruns and are shared by all sessions).
THROTTLE = LoginThrottle()


def check_login(
    users: Mapping[str, str], name: str, password: str, client: str, throttle: LoginThrottle | None = None
) -> tuple[bool, str]:
    """Check a login attempt against ``users`` with rate limiting; returns ``(ok, message for the page)``.

    The password is checked only when neither the user name nor the client is waiting out a delay;
    unknown names cost the same hashing time as known ones (a dummy hash is checked) and get the same
    message, so the page does not reveal which names exist.
    """
    throttle = throttle if throttle is not None else THROTTLE
    keys = (f"user:{name.strip().lower()}", f"client:{client or 'unknown'}")
    wait = throttle.wait_s(*keys)
    if wait > 0:
        log.warning("login refused while rate limited (%d failures for this user, %d for this client)",
                    throttle.failures(keys[0]), throttle.failures(keys[1]))
        return False, f"Too many failed logins. Try again in {int(wait) + 1} s."
    stored = users.get(name.strip())
    ok = verify_password(password, stored if stored is not None else _dummy_hash()) and stored is not None
    if ok:
        throttle.succeeded(*keys)
        return True, ""
    throttle.failed(*keys)
    log.warning("failed login (%d failures in a row for this user name)", throttle.failures(keys[0]))
    return False, "Wrong user name or password." if len(users) > 1 or SHARED_PASSWORD_USER not in users else "Wrong password."


def _has_provider(auth: Any) -> bool:
    return isinstance(auth, Mapping) and any(isinstance(v, Mapping) and v.get("client_id") for v in auth.values())


def web_user() -> str | None:
    """Who is signed in, for the audit log: the OIDC e-mail or name, ``"password login"``, or None."""
    import streamlit as st

    if bool(getattr(st.user, "is_logged_in", False)):
        return str(st.user.get("email") or st.user.get("name") or "signed-in user")
    if st.session_state.get("authenticated"):
        return str(st.session_state.get("auth_user") or SHARED_PASSWORD_USER)
    return None


def _client_address() -> str:
    """The browser's address as the server sees it (behind a proxy: the first X-Forwarded-For hop)."""
    import streamlit as st

    try:
        forwarded = (st.context.headers.get("X-Forwarded-For") or "").split(",")[0].strip()
        return forwarded or str(getattr(st.context, "ip_address", None) or "unknown")
    except Exception:  # no request context (AppTest)
        return "unknown"


#: Set by ``resunet app --allow-anonymous``: serving the page without a login off loopback is deliberate.
ENV_ALLOW_ANONYMOUS = "RESUNET_APP_ALLOW_ANONYMOUS"


def anonymous_exposure() -> str | None:
    """Why the page must not be shown without a login, or None: the server listens beyond this machine
    (``server.address`` not a loopback address; unset means every interface) and nobody said
    ``--allow-anonymous``. The same rule as ``resunet app``, for a page started with ``streamlit run``."""
    import os

    import streamlit as st

    from resunet.netaddr import is_loopback_address

    address = st.get_option("server.address") or ""
    if is_loopback_address(address) or os.environ.get(ENV_ALLOW_ANONYMOUS) == "1":
        return None
    where = f"address {address}" if address else "every network interface (no server.address set)"
    return (f"This server listens on {where} but no login is configured, so anyone who can reach it could upload "
            "scans. Start it with `resunet app` (this machine only by default), add a user with "
            "`resunet app --add-user NAME`, or start `resunet app --address ... --allow-anonymous` if anyone who "
            "can reach the port may use it.")


def require_login() -> bool:
    """Show the login UI if one is configured; True when the page may be shown."""
    import streamlit as st

    s = _secrets_dict()
    mode = login_mode(s)
    if mode == "none":
        refusal = anonymous_exposure()
        if refusal:
            st.title("resunet")
            st.error(refusal, icon="🔒")
            log.error("page refused: %s", refusal)
        return refusal is None
    if mode == "oidc":
        # getattr: st.user has no is_logged_in outside a configured server (e.g. in AppTest)
        if bool(getattr(st.user, "is_logged_in", False)):
            with st.sidebar:
                st.caption(f"Signed in as {st.user.get('email') or st.user.get('name') or 'user'}")
                if st.button("Log out"):
                    st.logout()
            return True
        st.title("resunet")
        st.write("This server requires signing in.")
        if st.button("Log in", type="primary"):
            st.login()
        return False
    # password
    if st.session_state.get("authenticated"):
        with st.sidebar:
            st.caption(f"Signed in as {st.session_state.get('auth_user') or SHARED_PASSWORD_USER}")
        return True
    users = password_users(s)
    named = [u for u in users if u != SHARED_PASSWORD_USER]
    st.title("resunet")
    with st.form("login"):
        name = st.text_input("User name") if named else SHARED_PASSWORD_USER
        pw = st.text_input("Password", type="password")
        ok = st.form_submit_button("Log in", type="primary")
    if ok:
        if named and not name.strip() and SHARED_PASSWORD_USER in users:
            name = SHARED_PASSWORD_USER  # the shared password still works with an empty name
        good, message = check_login(users, name, pw, _client_address())
        if good:
            st.session_state["authenticated"] = True
            st.session_state["auth_user"] = name.strip()
            st.rerun()
        else:
            st.error(message)
    return False


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    """Checked for unknown user names so they cost the same time as known ones."""
    return hash_password("not a password", salt=b"\0" * 16)


def _toml_loads(text: str) -> dict[str, Any]:
    """Parse TOML (``tomllib`` on Python 3.11+, else the ``toml`` package Streamlit depends on)."""
    try:
        import tomllib

        return tomllib.loads(text)
    except ModuleNotFoundError:  # Python 3.10
        import toml

        return toml.loads(text)


def add_user(secrets_path: str | Path, name: str, password: str) -> Path:
    """Add (or replace) user ``name`` in ``[resunet.users]`` of ``secrets_path``, keeping everything else.

    The file is edited as text (comments, other sections and their order stay as they were), checked
    to parse as TOML, and written atomically with mode 0600.

    Raises:
        ConfigError: a bad user name, an empty password, or a secrets file that is not valid TOML.
    """
    import os

    from resunet.errors import ConfigError
    from resunet.io.atomic import atomic_path

    if not USER_NAME.match(name or ""):
        raise ConfigError(f"user name {name!r}: use 1-64 letters, digits and . _ @ - (starting with a letter or digit)")
    if not password:
        raise ConfigError(f"empty password for user {name!r}; type a password")
    if name == SHARED_PASSWORD_USER:
        raise ConfigError(f"{name!r} is reserved for the shared password")
    path = Path(secrets_path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    try:
        _toml_loads(text)
    except Exception as err:  # tomllib.TOMLDecodeError / toml.TomlDecodeError
        raise ConfigError(f"{path}: not valid TOML ({err}); fix it before adding users") from None
    line = f'"{name}" = "{hash_password(password)}"'
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if re.match(r"^\s*\[\s*resunet\s*\.\s*users\s*\]\s*(#.*)?$", ln)), None)
    if start is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines += ["[resunet.users]", line]
    else:
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"^\s*\[", lines[i])), len(lines))
        key = re.compile(r'^\s*(?:"' + re.escape(name) + r'"|' + re.escape(name) + r")\s*=")
        same = [i for i in range(start + 1, end) if key.match(lines[i])]
        if same:
            lines[same[0]] = line
        else:
            at = end
            while at > start + 1 and not lines[at - 1].strip():
                at -= 1  # before the blank lines that separate the next table
            lines.insert(at, line)
    new_text = "\n".join(lines) + "\n"
    try:  # never write a file Streamlit cannot read
        ok = bool(_toml_loads(new_text)["resunet"]["users"][name])
    except Exception:
        ok = False
    if not ok:
        raise ConfigError(f"{path}: cannot add {name!r} to it as a [resunet.users] table (are the users written"
                          " inline in [resunet]?); move them to a [resunet.users] table and retry")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_text(new_text, encoding="utf-8")
    return path
