"""Finding the cases behind ``resunet predict INPUT...``.

Each INPUT is one of:

- a NIfTI file (``.nii``/``.nii.gz``): one case, id = file name without the suffix;
- a ``.zip`` (of a DICOM folder): one case, id = file name without ``.zip``;
- a DICOM folder (DICOM files directly inside, or only DICOM below it): one case, id = folder name;
- a single DICOM file (e.g. enhanced multi-frame): one case, id = file name without ``.dcm``;
- a folder holding many cases: each NIfTI file and zip in it is a case, each sub-folder holding
  DICOM (and no NIfTI/zip) is one case, other sub-folders are searched the same way;
- a list file (``.txt``: one path per line, ``#`` comments; ``.csv``: a column named ``path``,
  ``input`` or ``image``, else the first column): each entry is handled as above, relative paths
  are relative to the list file's folder.

Case ids must be unique in the output folder: when two inputs in one folder share an id (``a.nii.gz``
and ``a.zip``, or ``a.nii.gz`` and the DICOM folder ``a``), each takes its kind as a suffix
(``a_nii_gz``, ``a_zip``, ``a_dicom``); when inputs in different folders share an id, the parent
folder names are prepended (``siteA__T1``) until they differ.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from resunet.errors import InputError
from resunet.io.memory import MemoryStudy
from resunet.io.nifti import is_nifti_path

LIST_SUFFIXES = (".txt", ".csv", ".lst")


@dataclass(frozen=True)
class Case:
    """One study to segment.

    Attributes:
        case_id: name of the outputs (``<case_id>.nii.gz``, ...).
        path: the input file or folder (absolute).
        kind: ``"nifti"``, ``"dicom"`` (folder or single file) or ``"zip"``.
        memory: the DICOM files themselves, held in memory (a PACS pull,
            :mod:`resunet.pacs.segment`): read from there instead of ``path``, which then only
            names the case in records and messages.
    """

    case_id: str
    path: Path
    kind: str
    memory: MemoryStudy | None = field(default=None, compare=False, repr=False)

    @property
    def is_dicom(self) -> bool:
        return self.kind in ("dicom", "zip")


def case_id_for(path: Path) -> str:
    """The case id of one input: file name without ``.nii``/``.nii.gz``/``.zip``/``.dcm``, or folder name."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".zip", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def discover_cases(inputs: list[str | os.PathLike[str]]) -> list[Case]:
    """Expand INPUT arguments into cases (order: as given, folder contents sorted by name).

    Raises:
        InputError: an input does not exist, a list file names a missing path, or nothing was found.
    """
    found: list[tuple[Path, str]] = []
    for item in inputs:
        _expand(Path(item), found, depth=0)
    if not found:
        raise InputError(
            f"no cases found in {', '.join(str(i) for i in inputs)}; expected NIfTI files, DICOM folders, "
            ".zip files, or folders/lists of them"
        )
    seen: set[Path] = set()
    unique = []
    for path, kind in found:
        rp = path.resolve()
        if rp not in seen:
            seen.add(rp)
            unique.append((rp, kind))
    return _with_unique_ids(unique)


def _expand(path: Path, out: list[tuple[Path, str]], depth: int) -> None:
    if depth > 8:
        raise InputError(f"{path}: lists/folders nested too deeply")
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        low = path.name.lower()
        if is_nifti_path(path):
            out.append((path, "nifti"))
        elif low.endswith(".zip"):
            out.append((path, "zip"))
        elif low.endswith(LIST_SUFFIXES):
            for entry in _read_list(path):
                _expand(entry, out, depth + 1)
        else:
            out.append((path, "dicom"))  # load_study reports it clearly if it is not DICOM
        return
    _expand_folder(path, out, depth)


def _expand_folder(folder: Path, out: list[tuple[Path, str]], depth: int) -> None:
    before = len(out)
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file()]
    dirs = [p for p in entries if p.is_dir()]
    cases = [p for p in files if is_nifti_path(p) or p.name.lower().endswith(".zip")]
    if not cases and any(_is_dicom_file(p) for p in files):
        out.append((folder, "dicom"))  # a DICOM folder (nested series included)
        return
    for p in cases:
        out.append((p, "nifti" if is_nifti_path(p) else "zip"))
    for d in dirs:
        if _only_dicom_below(d):
            out.append((d, "dicom"))
        else:
            _expand_folder(d, out, depth + 1)
    if depth == 0 and len(out) == before and files:
        out.append((folder, "dicom"))  # named on the command line: load_study says what is wrong with it


def _only_dicom_below(folder: Path) -> bool:
    """True if ``folder`` holds DICOM files somewhere below and no NIfTI or zip files."""
    has_dicom = False
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            p = Path(root) / name
            if is_nifti_path(p) or name.lower().endswith(".zip"):
                return False
            if not has_dicom and _is_dicom_file(p):
                has_dicom = True
    return has_dicom


def _is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 preamble check (``DICM`` at byte 128), a ``.dcm`` name, or a file without
    preamble (old ACR-NEMA style) that starts with a group 0002/0008 tag (either byte order)."""
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x08")


def _read_list(path: Path) -> list[Path]:
    base = path.parent
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the case list ({err})") from None
    entries: list[str] = []
    if path.name.lower().endswith(".csv"):
        rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
        if not rows:
            return []
        header = [c.strip().lower() for c in rows[0]]
        col = next((header.index(n) for n in ("path", "input", "image") if n in header), None)
        if col is not None:
            rows = rows[1:]
        else:
            col = 0
            if not Path(rows[0][0].strip()).exists() and not (base / rows[0][0].strip()).exists():
                rows = rows[1:]  # an unnamed header line
        entries = [r[col].strip() for r in rows if len(r) > col and r[col].strip()]
    else:
        entries = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    out = []
    for e in entries:
        p = Path(e).expanduser()
        if not p.is_absolute():
            p = base / p
        if not p.exists():
            raise InputError(f"{path}: lists {e}, which does not exist")
        out.append(p)
    return out


def _kind_tag(path: Path, kind: str) -> str:
    """``nii`` / ``nii_gz`` / ``zip`` / ``dcm`` (a single DICOM file) / ``dicom`` (a folder): what tells apart two
    inputs of one folder that share a case id."""
    if kind == "dicom":
        return "dcm" if path.is_file() else "dicom"
    if kind == "nifti":
        return "nii_gz" if path.name.lower().endswith(".gz") else "nii"
    return kind


def _with_unique_ids(items: list[tuple[Path, str]]) -> list[Case]:
    names = {p: case_id_for(p) for p, _ in items}
    # Same folder, same id: parent names cannot separate them, their kinds can.
    siblings: dict[tuple[Path, str], list[tuple[Path, str]]] = {}
    for p, k in items:
        siblings.setdefault((p.parent, names[p]), []).append((p, k))
    for group in siblings.values():
        if len(group) > 1:
            for p, k in group:
                names[p] = f"{names[p]}_{_kind_tag(p, k)}"
    base = dict(names)
    level = {p: 0 for p, _ in items}
    for _ in range(16):
        groups: dict[str, list[Path]] = {}
        for p, _k in items:
            groups.setdefault(names[p], []).append(p)
        clashes = [ps for ps in groups.values() if len(ps) > 1]
        if not clashes:
            break
        for ps in clashes:
            for p in ps:
                level[p] += 1
                parents = [a.name for a in list(p.parents)[: level[p]] if a.name]
                names[p] = "__".join([*reversed(parents), base[p]])
    else:
        dup = [n for n in names.values() if list(names.values()).count(n) > 1]
        raise InputError(f"cannot give unique case ids to inputs named {sorted(set(dup))}")
    return [Case(case_id=names[p], path=p, kind=k) for p, k in items]
