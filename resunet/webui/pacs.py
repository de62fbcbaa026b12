"""The web UI's "Browse PACS": list studies of a DICOMweb or a DIMSE archive, open one, send the results back.

No PACS logic of its own: :class:`resunet.pacs.PacsClient` does QIDO/WADO/STOW and
:mod:`resunet.pacs.dimse_qr` / :mod:`resunet.pacs.dimse` do C-FIND, C-GET/C-MOVE and C-STORE. The
archive is the app setting ``pacs_url`` (``RESUNET_APP_PACS_URL`` or ``resunet app --pacs URL``):

- ``http(s)://.../dicom-web``: DICOMweb; credentials from ``RESUNET_PACS_USER`` /
  ``RESUNET_PACS_PASSWORD`` or ``RESUNET_PACS_TOKEN`` in the server's environment (never from the page);
- ``dimse://AET@HOST:PORT``: DIMSE, as the CLI's ``--pacs``; the page calls as ``pacs_ae_title``
  (``RESUNET_APP_PACS_AE_TITLE``, default RESUNET; the archive must know it) and retrieves with
  C-GET, or with C-MOVE to that AE title on ``pacs_move_port`` (``RESUNET_APP_PACS_MOVE_PORT``; 0 =
  C-GET) when the archive is configured to send there.

Either way a retrieve that brings fewer instances than the archive counted fails (PacsError), so
an incomplete study is never opened, segmented or sent back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resunet.io.hashing import sha256_path
from resunet.webui.inputs import StagedStudy


def client_for(url: str) -> Any:
    """A :class:`resunet.pacs.PacsClient` for ``url`` with the server's credentials (ConfigError if bad)."""
    from resunet.pacs import PacsClient, PacsConfig

    return PacsClient(PacsConfig.from_env(url))


def is_dimse(url: str) -> bool:
    """True for a ``dimse://`` / ``dimses://`` archive URL."""
    return str(url).strip().lower().startswith(("dimse://", "dimses://"))


@dataclass
class PageArchive:
    """The page's archive, whichever kind: ``search``, ``retrieve`` and ``store`` raise ResunetError only.

    Attributes:
        url: the configured ``pacs_url``.
        ae_title: our calling AE title (DIMSE).
        move_port: C-MOVE listener port (DIMSE; 0 = C-GET).
        timeout: seconds per DIMSE answer.
    """

    url: str
    ae_title: str = "RESUNET"
    move_port: int = 0
    timeout: float = 60.0

    @property
    def dimse(self) -> bool:
        return is_dimse(self.url)

    def _dimse(self) -> tuple[Any, Any]:
        from resunet.pacs.dimse_qr import DimseSource, QueryConfig

        method = "move" if int(self.move_port or 0) else "get"
        return DimseSource.parse(self.url), QueryConfig(calling_aet=self.ae_title, method=method,
                                                        move_port=int(self.move_port or 0), timeout=self.timeout)

    def search(self, accession: str = "", patient_id: str = "", date_range: str = "", limit: int = 200) -> list[Any]:
        """Studies matching the filters (all empty: every study, at most ``limit``).

        ``date_range`` is ``YYYYMMDD``, ``YYYYMMDD-YYYYMMDD`` or an open range (``YYYYMMDD-``).
        Each study has ``study_uid``, ``study_date``, ``description``, ``modalities``, ``n_instances``,
        ``patient_id``.
        """
        accession, patient_id, date_range = (str(v or "").strip() for v in (accession, patient_id, date_range))
        if self.dimse:
            from resunet.pacs.dimse_qr import find_studies

            source, cfg = self._dimse()
            # C-FIND needs one key to match on; "*" (a wildcard on PatientID) lists every study
            found = find_studies(source, cfg, accession=accession or None,
                                 patient_id=patient_id or (None if accession else "*"), date_range=date_range or None)
            return found[:limit]
        filters = {k: v for k, v in (("AccessionNumber", accession), ("PatientID", patient_id),
                                     ("StudyDate", date_range)) if v}
        return client_for(self.url).search_studies(limit=limit, filters=filters or None)

    def retrieve(self, study_uid: str, dest: Path) -> None:
        """The study's image series into ``dest`` (C-GET/C-MOVE or WADO-RS); PacsError if incomplete."""
        if self.dimse:
            from resunet.pacs.dimse_qr import retrieve_study

            source, cfg = self._dimse()
            retrieve_study(source, cfg, study_uid, dest)  # its image series (series_to_retrieve)
        else:
            client_for(self.url).retrieve(study_uid, dest)

    def store(self, files: list[Path], study_uid: str) -> None:
        """Store result files into the study (C-STORE to the archive's AE, or STOW-RS)."""
        if self.dimse:
            from resunet.pacs.dimse import Destination, send_files

            source, cfg = self._dimse()
            send_files(files, Destination(source.host, source.port, source.ae_title), calling_aet=cfg.calling_aet,
                       timeout=cfg.timeout, ssl_context=cfg.ssl_context(source))
        else:
            client_for(self.url).store(files, study_uid)


def archive_for(cfg: Any) -> PageArchive:
    """The page's archive from the app config (``pacs_url``, ``pacs_ae_title``, ``pacs_move_port``)."""
    return PageArchive(cfg.pacs_url, getattr(cfg, "pacs_ae_title", "RESUNET") or "RESUNET",
                       int(getattr(cfg, "pacs_move_port", 0) or 0))


def study_label(study: Any) -> str:
    """How a study shows in the list: date, description, modalities, instance count (no UID noise)."""
    date = study.study_date
    if len(date) == 8 and date.isdigit():
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    parts = [date or "no date", study.description or "(no description)", study.modalities or "?"]
    if study.n_instances is not None:
        parts.append(f"{study.n_instances} images")
    return " · ".join(parts) + f" · {study.patient_id or 'no patient id'}"


def filter_inputs(st: Any) -> tuple[str, str, str]:
    """The page's study filters (accession number, patient ID, study date range) as three text boxes."""
    a, p, d = st.columns(3)
    return (a.text_input("Accession number", key="pacs_accession"),
            p.text_input("Patient ID", key="pacs_patient_id"),
            d.text_input("Study date (YYYYMMDD or YYYYMMDD-YYYYMMDD)", key="pacs_dates"))


def stage_from_pacs(archive: Any, study_uid: str, dest: Path, label: str) -> StagedStudy:
    """Retrieve a study's image series into ``dest`` (replaced) and stage it like an upload.

    ``archive``: a :class:`PageArchive` (or a :class:`resunet.pacs.PacsClient`, which has ``retrieve`` too).
    """
    import shutil

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    try:
        archive.retrieve(study_uid, dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)  # nothing partial is left to open
        raise
    return StagedStudy(path=dest, kind="dicom", sha256=sha256_path(dest), label=f"PACS study {label}")
