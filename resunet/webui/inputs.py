"""Turning what the browser uploaded into a path that :func:`resunet.io.load_study` reads.

Accepted: one NIfTI file (``.nii``/``.nii.gz``), one ``.zip`` of DICOM files, or several DICOM files
at once. Everything is written into the session's private folder under neutral names (uploaded
file names can contain patient names; they are shown on the page but never logged or used as
paths). A zip is extracted with :func:`resunet.io.archive.extract_zip` (zip-slip and zip-bomb
checks) and the extracted folder moved into the session folder, so the DICOM files stay available
for writing a DICOM SEG and are deleted with the session.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Sequence, TypeVar

from resunet.errors import InputError
from resunet.io.archive import extract_zip
from resunet.io.nifti import is_nifti_path


@dataclass
class StagedStudy:
    """An uploaded (or bundled) study ready for :func:`resunet.io.load_study`.

    Attributes:
        path: a NIfTI file or a folder of DICOM files.
        kind: ``"nifti"`` or ``"dicom"``.
        sha256: hash of the uploaded bytes (one file: its SHA-256; several: SHA-256 of their sorted
            SHA-256s), the cache key of results.
        label: what to call it on the page (the uploaded file name or "3 DICOM files").
    """

    path: Path
    kind: str
    sha256: str
    label: str


def _too_big(total: int, max_bytes: int) -> InputError:
    return InputError(
        f"the upload is {total / 1024**2:.1f} MB, above this server's limit of {max_bytes / 1024**2:.0f} MB; "
        "ask the administrator to raise it (resunet app --max-upload-mb) or use `resunet predict` on the command line"
    )


def stage_uploads(files: Sequence[tuple[str, bytes]], dest: Path, max_bytes: int) -> StagedStudy:
    """Write uploaded files into ``dest`` (an empty private folder) and say how to read them.

    Args:
        files: ``(original file name, bytes)`` per uploaded file.
        dest: the folder to write into.
        max_bytes: upload size limit (sum of all files), bytes.

    Raises:
        InputError: nothing uploaded, too large, empty files, a mix of NIfTI/zip with other files,
            or an unsafe/damaged zip.
    """
    if not files:
        raise InputError("no file uploaded; choose a NIfTI file, a DICOM .zip or DICOM files")
    total = sum(len(b) for _, b in files)
    if total > max_bytes:
        raise _too_big(total, max_bytes)
    empty = [name for name, b in files if len(b) == 0]
    if empty:
        raise InputError(f"{empty[0]}: the file is empty (0 bytes); upload the scan again")
    names = [name for name, _ in files]
    special = [n for n in names if is_nifti_path(n) or n.lower().endswith(".zip")]
    if special and len(files) > 1:
        raise InputError(
            f"{special[0]} was uploaded together with {len(files) - 1} other file(s); upload one NIfTI file, "
            "one .zip, or several DICOM files, not a mix"
        )
    if len(files) == 1:
        name, data = files[0]
        digest = hashlib.sha256(data).hexdigest()
        lower = name.lower()
        if is_nifti_path(lower):
            suffix = ".nii.gz" if lower.endswith(".nii.gz") else ".nii"
            path = dest / f"study{suffix}"
            path.write_bytes(data)
            return StagedStudy(path=path, kind="nifti", sha256=digest, label=name)
        if lower.endswith(".zip"):
            zpath = dest / "upload.zip"
            zpath.write_bytes(data)
            folder = dest / "dicom"
            try:
                with extract_zip(zpath, max_total_bytes=max(4 * max_bytes, 1 << 30)) as tmp:
                    shutil.move(str(tmp), str(folder))
            except InputError as err:
                raise InputError(str(err).replace(str(zpath), name)) from None
            finally:
                zpath.unlink(missing_ok=True)
            if not any(p.is_file() for p in folder.rglob("*")):
                raise InputError(f"{name}: the zip holds no files; zip the folder of DICOM images of the study")
            return StagedStudy(path=folder, kind="dicom", sha256=digest, label=name)
    # one or several DICOM files under neutral names
    folder = dest / "dicom"
    folder.mkdir(parents=True, exist_ok=True)
    hashes = []
    for i, (_name, data) in enumerate(files):
        (folder / f"{i:05d}.dcm").write_bytes(data)
        hashes.append(hashlib.sha256(data).hexdigest())
    digest = hashlib.sha256("".join(sorted(hashes)).encode()).hexdigest()
    label = names[0] if len(files) == 1 else f"{len(files)} DICOM files"
    return StagedStudy(path=folder, kind="dicom", sha256=digest, label=label)


_F = TypeVar("_F")


def newest_upload(
    files: Sequence[_F], seen_ids: Collection[str], id_of: Callable[[_F], str] = lambda f: f.file_id  # type: ignore[attr-defined]
) -> list[_F]:
    """The files of the newest upload in the uploader's list (newest upload wins).

    The uploader keeps every file dropped on it (it must accept several files for a DICOM series), so a
    second study dropped on it is appended to the first. The newest upload is the files whose id was
    not in the list before (``seen_ids``): one NIfTI file, one zip or one drop of DICOM files. When no
    file is new (a file was removed with its x), the files left are the study.

    Args:
        files: the uploader's files, in its order.
        seen_ids: the ids of the files it held at the previous run of the page.
        id_of: a file's id (Streamlit's ``UploadedFile.file_id``).
    """
    new = [f for f in files if id_of(f) not in seen_ids]
    return new or list(files)


def stage_bundled(path: Path) -> StagedStudy:
    """The bundled example study (read in place; nothing copied)."""
    from resunet.io.hashing import sha256_path

    if not path.exists():
        raise InputError(f"the example study {path} is missing from this installation")
    kind = "nifti" if is_nifti_path(path) else "dicom"
    return StagedStudy(path=path, kind=kind, sha256=sha256_path(path), label=f"Example study ({path.name})")


def friendly_path_message(message: str, staged: StagedStudy) -> str:
    """Replace the private temp paths in an error message with the uploaded name."""
    out = message
    for p in sorted({str(staged.path), str(staged.path.parent)}, key=len, reverse=True):
        out = out.replace(p + "/", "").replace(p, staged.label)
    return out
