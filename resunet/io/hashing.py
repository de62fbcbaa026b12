"""SHA-256 fingerprints of files and folders, for provenance and resume checks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, or of a folder: every regular file's relative path and bytes, sorted.

    Renaming the folder itself does not change the hash; renaming, adding or editing a file inside does.
    """
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        h.update(f.relative_to(p).as_posix().encode("utf-8") + b"\0")
        h.update(sha256_file(f).encode("ascii"))
    return h.hexdigest()
