"""Provenance: which software, model, files, command, user, host and time produced a result.

:func:`collect_provenance` returns a JSON-able dict that evaluation reports (``metrics.json``) and
prediction summaries (``predictions.json``) embed under the key ``"provenance"``. Format
(``"schema": "resunet-provenance/1"``)::

    {
      "schema": "resunet-provenance/1",
      "run_id": "6f1c...",                        # uuid4 hex, also the audit-log key
      "command": ["resunet", "evaluate", ...],    # argv as given
      "command_line": "resunet evaluate ...",     # shell-quoted
      "cwd": "/abs/path",
      "user": "alice", "host": "ws01",
      "started_utc": "2026-11-27T04:01:02.123456Z",  # when the run started (caller's value or now)
      "finished_utc": "2026-11-27T04:01:09.654321Z", # when this dict was made
      "software": {"resunet": "0.1.0", "python": "3.11.7", "torch": "2.13.0+cpu", "monai": "1.6.1",
                   "numpy": ..., "scipy": ..., "nibabel": ..., "platform": "Linux-..."},
      "model": {"name": "brain-resunet18", "path": "/abs/model.pt", "sha256": "...", "size_bytes": 123}
               | null,
      "files": {"prediction": [{"path": "/abs/a.nii.gz", "sha256": "...", "size_bytes": 123}, ...],
                "reference": [...], ...}       # roles are the caller's choice
    }

Every object with ``"path"`` and ``"sha256"`` keys anywhere in a ``metrics.json`` or
``predictions.json`` is re-hashed by ``resunet audit verify`` (:func:`resunet.reports.audit.verify`);
relative paths are resolved against the folder holding the JSON file. Paths are stored absolute.
Versions are read from the installed package metadata, so torch is not imported.
"""

from __future__ import annotations

import getpass
import os
import platform
import shlex
import socket
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from resunet.errors import InputError
from resunet.io.hashing import sha256_path

SCHEMA = "resunet-provenance/1"
_PACKAGES = ("resunet", "torch", "monai", "numpy", "scipy", "nibabel", "pydicom", "highdicom")


def utc_now() -> str:
    """Current UTC time as ISO 8601 with a ``Z`` suffix, microseconds."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def software_versions() -> dict[str, str | None]:
    """Installed versions of resunet, Python and the libraries that shape the numbers (None if absent)."""
    out: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    if out.get("resunet") is None:
        from resunet import __version__

        out["resunet"] = __version__
    return out


def file_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"path": absolute path, "sha256": hex, "size_bytes": int}`` for a file (or a folder: hash of its files).

    Raises:
        InputError: the path does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"cannot record provenance of {p}: it does not exist")
    size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return {"path": str(p.resolve()), "sha256": sha256_path(p), "size_bytes": int(size)}


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def collect_provenance(
    command: Sequence[str] | None = None,
    files: Mapping[str, Iterable[str | os.PathLike[str]]] | None = None,
    model_path: str | os.PathLike[str] | None = None,
    model_name: str | None = None,
    started_utc: str | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Provenance of a run as a JSON-able dict (format in the module docstring).

    Args:
        command: the full command; default ``sys.argv`` (with ``argv[0]`` shortened to ``resunet``
            when it is the console script).
        files: ``{role: [paths]}``, e.g. ``{"image": [...], "prediction": [...]}``; each file is hashed
            (SHA-256) and its absolute path and size recorded.
        model_path: checkpoint file or exported-model folder; hashed when given.
        model_name: name to record for the model; default the file name without suffixes.
        started_utc: ISO UTC start time (see :func:`utc_now`); default now.
        run_id: identifier of the run; default a new uuid4 hex.

    Raises:
        InputError: a listed file or the model does not exist.
    """
    if command is None:
        command = list(sys.argv)
        if command and Path(command[0]).name == "resunet":
            command[0] = "resunet"
    model = None
    if model_path is not None:
        rec = file_record(model_path)
        name = model_name or Path(model_path).name.split(".")[0]
        model = {"name": name, **rec}
    elif model_name is not None:
        model = {"name": model_name, "path": None, "sha256": None, "size_bytes": None}
    return {
        "schema": SCHEMA,
        "run_id": run_id or uuid.uuid4().hex,
        "command": [str(c) for c in command],
        "command_line": shlex.join(str(c) for c in command),
        "cwd": os.getcwd(),
        "user": _user(),
        "host": socket.gethostname(),
        "started_utc": started_utc or utc_now(),
        "finished_utc": utc_now(),
        "software": software_versions(),
        "model": model,
        "files": {role: [file_record(p) for p in paths] for role, paths in (files or {}).items()},
    }
