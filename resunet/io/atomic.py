"""Writing files so that a crash never leaves a half-written output behind.

Every writer in resunet writes to a temporary name in the destination folder and renames it over the
final name only when the content is complete (``os.replace`` is atomic on POSIX within one
filesystem). A reader therefore sees either the old file, the new file, or no file.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

# Read once at import: os.umask can only be read by setting it, which is not thread-safe later.
_UMASK = os.umask(0)
os.umask(_UMASK)


_HELD = {signal.SIGTERM, signal.SIGINT}


def _hold_signals() -> set | None:
    """Block SIGTERM/SIGINT in this thread (the main thread: where Python runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)


def _release_signals(previous: set | None) -> None:
    """Restore the mask (None: nothing held); a signal that came meanwhile is handled now. Returns None."""
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return None


def use_private_files() -> None:
    """From now on this process creates files 0600 and folders 0700, whatever umask it was started with.

    For the processes that hold patient data in folders of their own (``resunet serve`` and its
    workers, the DICOM node, the web UI): a umask of 022 would otherwise leave inputs, outputs, the
    job database and received DICOM readable by every user of the machine. Every file the process
    creates afterwards (SQLite's journals, temp files, atomic_path's outputs) follows. The CLI's
    batch outputs keep the caller's umask: they go to a folder the user chose.
    """
    global _UMASK
    _UMASK = _UMASK | 0o077
    os.umask(_UMASK)


def make_private(root: str | os.PathLike[str]) -> Path:
    """Create ``root`` (0700) if missing and tighten what is already in it: folders 0700, files 0600.

    Run once at start-up on a state folder, so that files written by an older version (or under a
    looser umask) are no longer readable by others either. Entries the process does not own are left
    as they are (chmod would fail on them).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(PermissionError):
        os.chmod(root, 0o700)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(dirpath, name), 0o700, follow_symlinks=False)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o600)
    return root


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it to ``final`` if the block succeeds.

    The temporary name keeps the final name's suffixes (``.nii.gz``, ``.dcm``, ...) so libraries that
    choose a format from the extension still do the right thing. On error the temporary file is
    removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes) or ".tmp"
    # SIGTERM/SIGINT are held until the temp file's name is kept: a signal that arrived between its
    # creation and ``try`` left the temp file behind. Released inside ``try``, so the handler's
    # exception (raised at once if a signal came meanwhile) finds ``tmp`` set and removes it.
    held = _hold_signals()
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(final), suffix=".part" + suffix, dir=final.parent)
        tmp = Path(tmp_name)
        os.close(fd)
        held = _release_signals(held)
        # mkstemp creates 0600; give the output the permissions a plain open() would (0666 minus umask)
        os.chmod(tmp, 0o666 & ~_UMASK)
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    finally:
        _release_signals(held)


def atomic_write_bytes(final: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``final`` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``final`` atomically."""
    atomic_write_bytes(final, text.encode("utf-8"))


def temp_prefix(final: str | os.PathLike[str]) -> str:
    """The name prefix of :func:`atomic_path`'s temporary files for ``final`` (``.<name up to the first dot>.``)."""
    return f".{Path(final).name.split('.')[0]}."


def remove_stale_temps(folder: str | os.PathLike[str], stems: Iterable[str] | None = None) -> list[Path]:
    """Delete temporary files that a killed writer left in ``folder`` (``.<stem>.<random>.part<suffix>``).

    A SIGKILL (or power loss) skips the clean-up of :func:`atomic_path`; the next run calls this on
    start. With ``stems``, only temps of outputs whose name starts ``<stem>.`` are removed (for a run
    that shares the folder with others, e.g. one shard of a batch). Returns the removed paths.
    """
    d = Path(folder)
    if not d.is_dir():
        return []
    if stems is None:
        candidates = list(d.glob(".*.part*"))
    else:
        candidates = [p for stem in stems for p in d.glob(glob.escape(temp_prefix(stem + ".x")) + "*.part*")]
    removed = []
    for p in candidates:
        if p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed
