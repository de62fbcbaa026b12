"""Optional login for the web UI.

Three modes, chosen from ``.streamlit/secrets.toml`` (never from the repository):

1. OIDC: when an ``[auth]`` section is configured, Streamlit's own ``st.login()`` / ``st.user`` are
   used (Google, Microsoft Entra, Okta, ... ; see Streamlit's docs for the keys).
2. Password: ``[resunet] password_hash = "pbkdf2_sha256$<iterations>$<salt hex>$<hash hex>"``, made
   with ``resunet app --hash-password``. The typed password is hashed the same way and compared with
   :func:`hmac.compare_digest` (constant time).
3. Neither: no login. The server binds to 127.0.0.1 by default, so only this machine can reach it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets as _secrets
from typing import Any, Mapping

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
    if isinstance(s.get("resunet"), Mapping) and s["resunet"].get("password_hash"):
        return "password"
    return "none"


def _has_provider(auth: Any) -> bool:
    return isinstance(auth, Mapping) and any(isinstance(v, Mapping) and v.get("client_id") for v in auth.values())


def web_user() -> str | None:
    """Who is signed in, for the audit log: the OIDC e-mail or name, ``"password login"``, or None."""
    import streamlit as st

    if bool(getattr(st.user, "is_logged_in", False)):
        return str(st.user.get("email") or st.user.get("name") or "signed-in user")
    if st.session_state.get("authenticated"):
        return "password login"
    return None


def require_login() -> bool:
    """Show the login UI if one is configured; True when the page may be shown."""
    import streamlit as st

    s = _secrets_dict()
    mode = login_mode(s)
    if mode == "none":
        return True
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
        return True
    st.title("resunet")
    with st.form("login"):
        pw = st.text_input("Password", type="password")
        ok = st.form_submit_button("Log in", type="primary")
    if ok:
        if verify_password(pw, str(s["resunet"]["password_hash"])):
            st.session_state["authenticated"] = True
            st.rerun()
        else:
            st.error("Wrong password.")
    return False
