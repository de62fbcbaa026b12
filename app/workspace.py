"""Per-session temp folders for uploaded studies and results, deleted when the session ends or expires.

Each browser session gets a private folder (mode 0700) under ``AppConfig.temp_dir``. It is removed

- when the session ends: the :class:`SessionWorkspace` lives in ``st.session_state``; when Streamlit
  drops a closed session its state is garbage-collected and a :func:`weakref.finalize` callback
  deletes the folder (also at interpreter exit);
- after ``session_ttl_min`` minutes without activity: every page run calls :func:`sweep_expired`,
  which deletes other sessions' folders whose activity stamp is older than that, and a session that
  comes back after expiry finds its data gone (:meth:`SessionWorkspace.expired`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

_PREFIX = "session-"
_STAMP = ".last-active"


class SessionWorkspace:
    """A private temp folder for one browser session.

    Args:
        root: parent folder (created if missing).
        ttl_s: seconds of inactivity after which the folder counts as expired.
    """

    def __init__(self, root: str | os.PathLike[str], ttl_s: float) -> None:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=root))  # mode 0700
        self.ttl_s = float(ttl_s)
        self.last_active = time.time()
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)
        self.touch()

    def touch(self) -> None:
        """Record activity now (the sweep of other sessions reads the stamp file's mtime)."""
        self.last_active = time.time()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / _STAMP).touch()

    def expired(self, now: float | None = None) -> bool:
        """True when the session was idle longer than the TTL or its folder was swept away."""
        now = time.time() if now is None else now
        return (now - self.last_active) > self.ttl_s or not self.path.exists()

    def subdir(self, name: str) -> Path:
        """A fresh, empty sub-folder (an earlier one of the same name is deleted)."""
        d = self.path / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def clear(self) -> None:
        """Delete everything in the folder (the folder itself stays)."""
        for child in self.path.iterdir() if self.path.exists() else []:
            if child.name == _STAMP:
                continue
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)

    def close(self) -> None:
        """Delete the folder now."""
        self._finalizer()

    @property
    def alive(self) -> bool:
        return self._finalizer.alive


def sweep_expired(root: str | os.PathLike[str], ttl_s: float, now: float | None = None) -> list[Path]:
    """Delete session folders under ``root`` whose last activity is older than ``ttl_s`` seconds.

    Returns the deleted folders. Only folders named ``session-*`` are touched.
    """
    root = Path(root)
    now = time.time() if now is None else now
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for d in root.glob(_PREFIX + "*"):
        if not d.is_dir():
            continue
        stamp = d / _STAMP
        try:
            last = stamp.stat().st_mtime if stamp.exists() else d.stat().st_mtime
        except OSError:
            continue
        if now - last > ttl_s:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    if removed:
        log.info("removed %d expired session folder(s)", len(removed))
    return removed
