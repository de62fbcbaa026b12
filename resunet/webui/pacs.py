"""The web UI's "Browse PACS": list studies over DICOMweb, open one, send the SEG back.

No PACS logic of its own: :class:`resunet.pacs.PacsClient` does QIDO/WADO/STOW. The PACS URL is the
app setting ``pacs_url`` (``RESUNET_APP_PACS_URL`` or ``resunet app --pacs URL``); credentials come
from ``RESUNET_PACS_USER`` / ``RESUNET_PACS_PASSWORD`` or ``RESUNET_PACS_TOKEN`` in the server's
environment (never from the page).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resunet.webui.inputs import StagedStudy
from resunet.io.hashing import sha256_path


def client_for(url: str) -> Any:
    """A :class:`resunet.pacs.PacsClient` for ``url`` with the server's credentials (ConfigError if bad)."""
    from resunet.pacs import PacsClient, PacsConfig

    return PacsClient(PacsConfig.from_env(url))


def study_label(study: Any) -> str:
    """How a study shows in the list: date, description, modalities, instance count (no UID noise)."""
    date = study.study_date
    if len(date) == 8 and date.isdigit():
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    parts = [date or "no date", study.description or "(no description)", study.modalities or "?"]
    if study.n_instances is not None:
        parts.append(f"{study.n_instances} images")
    return " · ".join(parts) + f" · {study.patient_id or 'no patient id'}"


def stage_from_pacs(client: Any, study_uid: str, dest: Path, label: str) -> StagedStudy:
    """Retrieve a study's image series into ``dest`` (replaced) and stage it like an upload."""
    import shutil

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    client.retrieve(study_uid, dest)
    return StagedStudy(path=dest, kind="dicom", sha256=sha256_path(dest), label=f"PACS study {label}")
