"""resunet's own temporary folders, and removing the ones a killed process left behind.

A zip upload or a PACS pull is a full copy of a patient's series, written to a temporary folder that
is removed when the work ends; a SIGKILL (OOM killer, ``kill -9``, power loss) skips that clean-up
and leaves the copy on disk. ``tempfile`` cannot know which folders are stale, so the folders are
named ``resunet-<kind>-<host>-<pid>-<random>``: any later resunet process on the same host removes
the ones whose process is gone (checked with ``os.kill(pid, 0)``), owned by the same user. A pid
that the system reused for another process only postpones the clean-up; a folder is never removed
while its process lives. ``resunet serve`` also keeps all its temporary files under its own state
folder (``STATE/tmp``, 0700), see :func:`use_temp_root`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
_NAME = re.compile(r"^resunet-(?P<kind>[a-z]+)-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale(parent: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove resunet temp folders under ``parent`` (default: the temp folder) whose process is gone.

    Only folders of this host and this user are touched. Returns what was removed.
    """
    root = Path(parent or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    uid = os.getuid()
    for e in entries:
        m = _NAME.match(e.name)
        if not m or m["host"] != _HOST or int(m["pid"]) == os.getpid() or process_alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            if e.is_dir(follow_symlinks=False) and e.stat(follow_symlinks=False).st_uid == uid:
                shutil.rmtree(e.path, ignore_errors=True)
                removed.append(Path(e.path))
    if removed:
        log.warning("removed %d temporary folder(s) left by killed resunet processes in %s", len(removed), root)
    return removed


@contextlib.contextmanager
def private_temp_dir(kind: str) -> Iterator[Path]:
    """A new 0700 folder ``resunet-<kind>-<host>-<pid>-*`` in the temp folder, removed on exit.

    Stale folders of killed processes are removed first (:func:`remove_stale`).
    """
    if not kind.isalpha() or not kind.islower():
        raise ValueError(f"temp folder kind {kind!r}: lower-case letters only")
    remove_stale()
    tmp = Path(tempfile.mkdtemp(prefix=f"resunet-{kind}-{_HOST}-{os.getpid()}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def use_temp_root(folder: str | os.PathLike[str]) -> Path:
    """Make ``folder`` (created 0700) this process's temp folder, and its children's (``TMPDIR``).

    For ``resunet serve``: its uploads' extractions and PACS pulls then stay inside its state folder,
    which only it can read, instead of the machine's shared temp folder. Stale folders in it are
    removed at once.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(PermissionError):
        os.chmod(root, 0o700)
    tempfile.tempdir = str(root)
    os.environ["TMPDIR"] = str(root)
    remove_stale(root)
    return root
