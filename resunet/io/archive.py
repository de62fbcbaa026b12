"""Safe extraction of a .zip of DICOM files into a private temporary folder.

Hand-written checks on top of :mod:`zipfile` because ``ZipFile.extractall`` only sanitises names;
it does not cap sizes, and a zip bomb or a huge upload would fill the disk. Refused, before anything
is written: entries with absolute paths, drive letters or ``..`` components (zip-slip), symlink
entries, more than ``max_entries`` entries, a declared total above ``max_total_bytes``, and entries
whose compression ratio exceeds ``max_ratio``. While extracting, the bytes actually written are
counted too (declared sizes can lie). The temporary folder is created by
:func:`resunet.io.scratch.private_temp_dir` (mode 0700) and removed when the context manager exits,
also on error; one that a killed process left is removed by the next resunet process.
A full disk while extracting is the server's fault (:class:`~resunet.errors.ServerError`), not a damaged zip.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from resunet.errors import DiskFullError, InputError
from resunet.io.scratch import private_temp_dir

#: Defaults: a large CT study is ~1-2 GB uncompressed; DICOM compresses at most ~10-20x in a zip.
MAX_TOTAL_BYTES = 4 * 1024**3
MAX_ENTRIES = 100_000
MAX_RATIO = 200.0
_CHUNK = 1 << 20


def _safe_name(name: str) -> PurePosixPath | None:
    """The entry's relative path if it stays inside the extraction folder, else None."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return None
    parts = [p for p in PurePosixPath(norm).parts if p not in ("", ".")]
    if any(p == ".." for p in parts) or not parts:
        return None
    return PurePosixPath(*parts)


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


@contextlib.contextmanager
def extract_zip(
    path: str | os.PathLike[str],
    *,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_entries: int = MAX_ENTRIES,
    max_ratio: float = MAX_RATIO,
) -> Iterator[Path]:
    """Extract the zip at ``path`` into a new private temp folder; yield that folder; remove it after.

    Args:
        path: the .zip file.
        max_total_bytes: cap on the total uncompressed size (bytes).
        max_entries: cap on the number of entries.
        max_ratio: cap on uncompressed/compressed size per entry (entries under 1 MiB are exempt).

    Raises:
        InputError: not a zip file, unsafe entry names, symlinks, or a cap exceeded.
    """
    p = Path(path)
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as err:
        raise InputError(f"{p}: not a readable .zip file ({err})") from None
    with private_temp_dir("zip") as tmp:
        try:
            with zf:
                _extract_all(p, zf, tmp, max_total_bytes, max_entries, max_ratio)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(f"no space left on the disk of {tmp.parent} while extracting a zip upload ({err});"
                                  " free space there (or point TMPDIR elsewhere) and retry") from None
            raise InputError(f"{p}: the zip is damaged or uses an unsupported feature ({err})") from None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError) as err:
            raise InputError(f"{p}: the zip is damaged or uses an unsupported feature ({err})") from None
        yield tmp


def check_zip(
    path: str | os.PathLike[str],
    *,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_entries: int = MAX_ENTRIES,
    max_ratio: float = MAX_RATIO,
) -> int:
    """Check a zip's directory (names, symlinks, entry count, sizes, ratios) without extracting anything.

    Returns the number of file entries. Raises :class:`InputError` as :func:`extract_zip` would.
    """
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as zf:
            return len(_plan(p, zf, max_total_bytes, max_entries, max_ratio))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as err:
        raise InputError(f"{p}: not a readable .zip file ({err})") from None


def _plan(
    p: Path, zf: zipfile.ZipFile, max_total_bytes: int, max_entries: int, max_ratio: float
) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The file entries to extract with their safe relative paths; InputError on any cap or unsafe name."""
    infos = zf.infolist()
    if len(infos) > max_entries:
        raise InputError(f"{p}: has {len(infos)} entries, more than the limit of {max_entries}")
    total = 0
    plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    for info in infos:
        rel = _safe_name(info.filename)
        if rel is None:
            raise InputError(
                f"{p}: entry {info.filename!r} would be written outside the extraction folder"
                " (absolute path or '..'); refusing this zip"
            )
        if _is_symlink(info):
            raise InputError(f"{p}: entry {info.filename!r} is a symbolic link; refusing this zip")
        if info.is_dir():
            continue
        total += info.file_size
        if total > max_total_bytes:
            raise InputError(
                f"{p}: would extract to more than {max_total_bytes / 1024**2:.0f} MiB; refusing"
                " (zip bomb or too large a study: unzip it yourself and pass the folder)"
            )
        if info.file_size > _CHUNK and info.file_size > max_ratio * max(info.compress_size, 1):
            raise InputError(
                f"{p}: entry {info.filename!r} expands {info.file_size / max(info.compress_size, 1):.0f}x"
                f" (limit {max_ratio:.0f}x); refusing a likely zip bomb"
            )
        plan.append((info, rel))
    return plan


def _extract_all(
    p: Path, zf: zipfile.ZipFile, tmp: Path, max_total_bytes: int, max_entries: int, max_ratio: float
) -> None:
    plan = _plan(p, zf, max_total_bytes, max_entries, max_ratio)
    written = 0
    for info, rel in plan:
        dest = tmp.joinpath(*rel.parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(dest, "wb") as dst:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if written > max_total_bytes:
                    raise InputError(
                        f"{p}: extracted data exceed {max_total_bytes / 1024**2:.0f} MiB (sizes in the"
                        " zip are wrong); refusing a likely zip bomb"
                    )
                dst.write(chunk)
