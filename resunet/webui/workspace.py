"""Per-session temp folders for uploaded studies and results, deleted when the session ends or expires.

Each browser session gets a private folder (mode 0700) under ``AppConfig.temp_dir``. It is removed

- when the browser tab closes: an open page touches the folder's heartbeat file every
  ``session_close_s / 4`` seconds (a Streamlit fragment with ``run_every``); a janitor thread in the
  server (:func:`start_janitor`) deletes folders whose heartbeat is older than ``session_close_s``
  (default 120 s) and that no page run is using (``.running`` marker), so a closed tab's uploads are
  gone within ``session_close_s`` plus one janitor interval;
- when Streamlit drops a closed session: its state is garbage-collected and a
  :func:`weakref.finalize` callback deletes the folder (also at interpreter exit);
- after ``session_ttl_min`` minutes without activity: every page run calls :func:`sweep_expired`,
  which deletes other sessions' folders whose activity stamp is older than that, and a session that
  comes back after expiry finds its data gone (:meth:`SessionWorkspace.expired`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_PREFIX = "session-"
_STAMP = ".last-active"
_HEARTBEAT = ".heartbeat"
_RUNNING = ".running"
_MARKERS = (_STAMP, _HEARTBEAT, _RUNNING)


class SessionWorkspace:
    """A private temp folder for one browser session.

    Args:
        root: parent folder (created if missing).
        ttl_s: seconds of inactivity after which the folder counts as expired.
    """

    def __init__(self, root: str | os.PathLike[str], ttl_s: float) -> None:
        from resunet.io.atomic import use_private_files

        use_private_files()  # uploads, masks, reports of this page: 0600/0700 whatever the umask
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(PermissionError):  # the app's own parent folder (default /tmp/resunet-app)
            os.chmod(root, 0o700)
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
        self.heartbeat()

    def heartbeat(self) -> None:
        """Record that the browser tab is still open (called every few seconds by the open page)."""
        if self.path.exists():
            (self.path / _HEARTBEAT).touch()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Mark the folder in use by a page run (a long prediction), so the janitor never deletes it meanwhile."""
        marker = self.path / _RUNNING
        marker.touch()
        try:
            yield
        finally:
            self.heartbeat()  # the page's heartbeats waited for this run: count its end as one
            marker.unlink(missing_ok=True)

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
            if child.name in _MARKERS:
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


def sweep_expired(
    root: str | os.PathLike[str], ttl_s: float, now: float | None = None, closed_after_s: float | None = None
) -> list[Path]:
    """Delete session folders under ``root`` whose last activity is older than ``ttl_s`` seconds, or (with
    ``closed_after_s``) whose tab stopped sending heartbeats that long ago and no page run is using them.

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
        closed = False
        if closed_after_s is not None and not (d / _RUNNING).exists():
            try:
                closed = now - (d / _HEARTBEAT).stat().st_mtime > closed_after_s
            except OSError:
                closed = False  # no heartbeat yet: the page has not finished its first run
        if now - last > ttl_s or closed:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    if removed:
        log.info("removed %d expired session folder(s)", len(removed))
    return removed


_JANITORS: dict[str, threading.Thread] = {}
_JANITORS_LOCK = threading.Lock()


def start_janitor(root: str | os.PathLike[str], ttl_s: float, closed_after_s: float, interval_s: float) -> None:
    """Start (once per ``root`` and process) a daemon thread calling :func:`sweep_expired` every ``interval_s``.

    It runs in the Streamlit server process whether or not any page is open, so closed tabs' folders go
    away even when nobody else uses the server.
    """
    key = str(Path(root).resolve())
    with _JANITORS_LOCK:
        if key in _JANITORS and _JANITORS[key].is_alive():
            return

        def loop() -> None:
            while True:
                time.sleep(interval_s)
                try:
                    sweep_expired(root, ttl_s, closed_after_s=closed_after_s)
                except Exception as err:  # noqa: BLE001 - the janitor must keep running
                    log.warning("session folder sweep failed: %s", err)

        t = threading.Thread(target=loop, name="resunet-session-janitor", daemon=True)
        t.start()
        _JANITORS[key] = t
