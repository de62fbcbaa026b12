"""DICOMweb client (QIDO-RS search, WADO-RS retrieve, STOW-RS store) over the ``dicomweb-client`` package.

:class:`PacsClient` wraps :class:`dicomweb_client.DICOMwebClient` and turns its failures into one
:class:`~resunet.errors.PacsError` line naming the PACS URL and what to do (server unreachable,
credentials refused, study unknown, store rejected). Authentication: HTTP basic (user and password)
or a bearer token, set in :class:`PacsConfig`; :meth:`PacsConfig.from_env` reads them from
``RESUNET_PACS_URL``, ``RESUNET_PACS_USER``, ``RESUNET_PACS_PASSWORD`` and ``RESUNET_PACS_TOKEN``
(secrets never on the command line, where ``ps`` and shell history would show them).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resunet.errors import ConfigError, PacsError
from resunet.io.names import safe_name

if TYPE_CHECKING:
    from resunet.io.memory import MemoryStudy

logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # an INFO line per request otherwise

#: series modalities that hold no images to segment (earlier results, reports); not downloaded
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "SR", "PR", "KO", "RTPLAN", "RTDOSE", "RTRECORD", "DOC", "REG"})

ENV_URL, ENV_USER, ENV_PASSWORD, ENV_TOKEN = (
    "RESUNET_PACS_URL", "RESUNET_PACS_USER", "RESUNET_PACS_PASSWORD", "RESUNET_PACS_TOKEN")


@dataclass
class PacsConfig:
    """Where the DICOMweb service is and how to log in.

    Args:
        url: DICOMweb root, e.g. ``http://pacs:8042/dicom-web`` (Orthanc) — QIDO/WADO/STOW paths
            (``/studies``...) are appended to it.
        username, password: HTTP basic authentication (both or neither).
        token: bearer token (``Authorization: Bearer ...``); exclusive with basic authentication.
        timeout: seconds per HTTP request (connect and read).
        verify: TLS certificate check: True, False, or a CA bundle path.
    """

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    verify: bool | str = True

    def __post_init__(self) -> None:
        self.url = (self.url or "").strip().rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"PACS URL {self.url!r} must start with http:// or https:// (the DICOMweb root, e.g. http://pacs:8042/dicom-web)")
        if (self.username is None) != (self.password is None):
            raise ConfigError(f"PACS {self.url}: basic authentication needs both a user and a password (${ENV_PASSWORD})")
        if self.token and self.username:
            raise ConfigError(f"PACS {self.url}: give either a bearer token or a user and password, not both")

    @classmethod
    def from_env(cls, url: str | None = None, username: str | None = None, **kwargs: Any) -> "PacsConfig":
        """Config from arguments, falling back to ``$RESUNET_PACS_URL/_USER/_PASSWORD/_TOKEN``."""
        url = url or os.environ.get(ENV_URL)
        if not url:
            raise ConfigError(f"no PACS URL: pass --pacs URL or set ${ENV_URL}")
        username = username or os.environ.get(ENV_USER) or None
        password = os.environ.get(ENV_PASSWORD) if username else None
        if username and password is None:
            raise ConfigError(f"PACS user {username!r} given but ${ENV_PASSWORD} is not set")
        return cls(url=url, username=username, password=password, token=os.environ.get(ENV_TOKEN) or None, **kwargs)


@dataclass(frozen=True)
class StudySummary:
    """One study as QIDO-RS lists it."""

    study_uid: str
    patient_name: str
    patient_id: str
    study_date: str
    description: str
    modalities: str
    n_series: int | None
    n_instances: int | None


@dataclass(frozen=True)
class SeriesSummary:
    """One series of a study as QIDO-RS lists it."""

    series_uid: str
    modality: str
    description: str
    number: int | None
    n_instances: int | None


def _value(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    if not values:
        return ""
    v = values[0]
    if isinstance(v, dict):  # person name
        return v.get("Alphabetic", "")
    return v


def _int(item: dict[str, Any], tag: str) -> int | None:
    v = _value(item, tag)
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


#: series retrieved at once by :meth:`PacsClient.fetch` (one HTTP connection each); small, as the
#: archive serves other clients too and the machine decoding them has few cores
FETCH_THREADS = 3


def _as_file(part: bytes | bytearray) -> bytes:
    """One WADO-RS part as the bytes of a DICOM file: as received when it is one (``DICM`` at byte
    128), else (a non-conforming server's bare data set) parsed and written as a file by pydicom."""
    if part[128:132] == b"DICM":
        return bytes(part)
    import pydicom
    from io import BytesIO

    try:
        ds = pydicom.dcmread(BytesIO(part), force=True)
        if "SOPInstanceUID" not in ds:
            raise ValueError("no SOP Instance UID")
        out = BytesIO()
        ds.save_as(out, enforce_file_format=False)
    except Exception as err:  # noqa: BLE001 - pydicom raises many kinds on garbage
        raise PacsError(f"the PACS sent a part that is not DICOM ({type(err).__name__}); check the PACS") from None
    return out.getvalue()


def _write_part(path: Path, part: bytes | bytearray) -> None:
    """Write one WADO-RS part to ``path`` atomically, as a DICOM file (:func:`_as_file`)."""
    from resunet.io.atomic import atomic_write_bytes

    atomic_write_bytes(path, _as_file(part))


class PacsClient:
    """QIDO/WADO/STOW against one DICOMweb service; every failure is a :class:`PacsError` line."""

    def __init__(self, config: PacsConfig) -> None:
        self.config = config
        self._client = self._new_client()

    def _new_client(self) -> Any:
        """A ``DICOMwebClient`` with its own HTTP session, authentication and retry settings."""
        import requests
        from dicomweb_client.api import DICOMwebClient

        config = self.config
        session = requests.Session()
        session.verify = config.verify
        if config.username is not None:
            session.auth = (config.username, config.password or "")
        headers = {"Authorization": f"Bearer {config.token}"} if config.token else None
        try:
            client = DICOMwebClient(url=config.url, session=session, headers=headers, timeout=config.timeout)
        except ValueError as err:
            raise ConfigError(f"PACS URL {config.url!r} is not usable: {err}") from None
        # retry only on 429/503 etc. a couple of times, quickly: an operator waits on the answer
        client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=200)
        return client

    # -- error translation -----------------------------------------------------------------------
    def _fail(self, err: Exception, what: str, study_uid: str | None = None) -> PacsError:
        import requests

        url = self.config.url
        if isinstance(err, requests.exceptions.HTTPError) and err.response is not None:
            code = err.response.status_code
            if code in (401, 403):
                return PacsError(f"PACS {url} refused the credentials ({code}) while {what}; set a user and"
                                 f" ${ENV_PASSWORD}, or ${ENV_TOKEN}, that the PACS accepts")
            if code == 404 and study_uid:
                return PacsError(f"PACS {url} has no study {study_uid} ({what}); check the Study Instance UID"
                                 " (list studies in the web UI's Browse PACS, or with QIDO)")
            if code == 404:
                return PacsError(f"PACS {url} answered 404 while {what}; is {url} the DICOMweb root"
                                 " (e.g. http://host:8042/dicom-web for Orthanc)?")
            return PacsError(f"PACS {url} answered HTTP {code} while {what}: {err.response.text[:200].strip()}")
        if isinstance(err, requests.exceptions.SSLError):
            return PacsError(f"PACS {url}: TLS certificate check failed while {what}; give the CA bundle (verify)")
        if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return PacsError(f"PACS {url} is unreachable while {what} ({type(err).__name__}); check the URL,"
                             " that the server runs, and the network")
        return PacsError(f"PACS {url}: {what} failed ({type(err).__name__}: {err})")

    def _call(self, what: str, fn: Any, *args: Any, study_uid: str | None = None, **kwargs: Any) -> Any:
        import requests

        try:
            return fn(*args, **kwargs)
        except (requests.exceptions.RequestException, ValueError, OSError) as err:
            raise self._fail(err, what, study_uid) from None
        except Exception as err:  # retrying wraps the last failure in RetryError
            inner = getattr(getattr(err, "last_attempt", None), "value", None)
            if isinstance(inner, tuple) and len(inner) > 1 and isinstance(inner[1], Exception):
                raise self._fail(inner[1], what, study_uid) from None
            raise self._fail(err, what, study_uid) from None

    # -- QIDO-RS ---------------------------------------------------------------------------------
    def search_studies(self, limit: int = 100, filters: dict[str, Any] | None = None) -> list[StudySummary]:
        """Studies on the PACS (QIDO-RS ``/studies``), at most ``limit``, newest first when dated."""
        fields = ["StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                  "NumberOfStudyRelatedInstances"]
        items = self._call("searching studies", self._client.search_for_studies, limit=limit, fields=fields,
                           search_filters=filters or None)
        out = [
            StudySummary(
                study_uid=str(_value(it, "0020000D")), patient_name=str(_value(it, "00100010")),
                patient_id=str(_value(it, "00100020")), study_date=str(_value(it, "00080020")),
                description=str(_value(it, "00081030")),
                modalities="/".join(str(v) for v in ((it.get("00080061") or {}).get("Value") or [])),
                n_series=_int(it, "00201206"), n_instances=_int(it, "00201208"),
            )
            for it in items
        ]
        return sorted(out, key=lambda s: s.study_date, reverse=True)

    def search_series(self, study_uid: str) -> list[SeriesSummary]:
        """Series of one study (QIDO-RS); PacsError when the PACS does not have the study.

        One request when the study is there; only an empty answer asks whether the study exists (a
        study without series is not refused as missing)."""
        items = self._call("searching series", self._client.search_for_series, study_uid,
                           fields=["NumberOfSeriesRelatedInstances", "SeriesDescription"], study_uid=study_uid)
        if not items and not self.search_studies(limit=1, filters={"StudyInstanceUID": study_uid}):
            raise PacsError(f"PACS {self.config.url} has no study {study_uid}; check the Study Instance UID"
                            " (list studies in the web UI's Browse PACS, or with QIDO)")
        return [
            SeriesSummary(series_uid=str(_value(it, "0020000E")), modality=str(_value(it, "00080060")),
                          description=str(_value(it, "0008103E")), number=_int(it, "00200011"),
                          n_instances=_int(it, "00201209"))
            for it in items
        ]

    # -- WADO-RS ---------------------------------------------------------------------------------
    def _plan(self, study_uid: str, series_uids: Iterable[str] | None) -> tuple[list[str], dict[str, int | None]]:
        """The series to retrieve (``series_uids``, else every image series: earlier SEG/RTSTRUCT/SR
        are left out) and QIDO-RS's instance count of each (what a complete retrieve brings)."""
        listed = self.search_series(study_uid)
        expected = {s.series_uid: s.n_instances for s in listed}
        series = list(series_uids) if series_uids else None
        if series is None:
            series = [s.series_uid for s in listed if s.modality not in NON_IMAGE_MODALITIES]
        return series, expected

    def _check_complete(self, study_uid: str, series: list[str], expected: dict[str, int | None],
                        received: dict[str, int]) -> None:
        """PacsError when nothing came, or fewer instances of a series than QIDO-RS counted."""
        if not sum(received.values()):
            raise PacsError(f"PACS {self.config.url}: study {study_uid} has no instances to retrieve")
        short = [(uid, received.get(uid, 0), expected[uid]) for uid in series
                 if expected.get(uid) is not None and received.get(uid, 0) < expected[uid]]
        if short:
            detail = "; ".join(f"series {uid}: {got} of {n}" for uid, got, n in short)
            raise PacsError(f"PACS {self.config.url} delivered fewer instances than its QIDO-RS search counted "
                            f"({detail}); nothing was segmented or stored back")

    def _series_files(self, study_uid: str, series_uid: str, client: Any = None) -> list[bytes]:
        """Every instance of one series as DICOM file bytes (one WADO-RS request, streamed)."""
        what = f"retrieving series {series_uid} of study {study_uid}"
        parts = self._call(what, self._series_parts, study_uid, series_uid, client, study_uid=study_uid)
        try:
            return [_as_file(part) for part in parts]
        except PacsError:
            raise
        except Exception as err:  # the stream is read lazily: network failures surface here
            raise self._fail(err, what, study_uid) from None

    def fetch(self, study_uid: str, series_uids: Iterable[str] | None = None) -> "MemoryStudy":
        """A study's instances (or only ``series_uids``'), held in memory: nothing is written to disk.

        One WADO-RS request per series (``multipart/related; type="application/dicom";
        transfer-syntax=*``: the stored syntax, never transcoded), up to :data:`FETCH_THREADS` series
        in flight when the study has several; each part is kept as the PACS sent it (a bare data set
        from a non-conforming server is made a file by pydicom). The result reads with
        :func:`resunet.io.loader.load_study` exactly as the folder :meth:`retrieve` writes would.

        Returns:
            :class:`~resunet.io.memory.MemoryStudy` named ``safe_name(study_uid)``, files
            ``<series>/<n>.dcm`` as :meth:`retrieve` names them.

        Raises:
            PacsError: as :meth:`retrieve` (an incomplete study is refused whole).
        """
        from resunet.io.memory import MemoryStudy

        series, expected = self._plan(study_uid, series_uids)
        if len(series) > 1:
            from concurrent.futures import ThreadPoolExecutor

            # one client (requests session) per thread: a Session is not documented as thread-safe
            with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(series)), thread_name_prefix="resunet-wado") as pool:
                got = list(pool.map(lambda uid: self._series_files(study_uid, uid, self._new_client()), series))
        else:
            got = [self._series_files(study_uid, uid) for uid in series]
        files: dict[str, bytes] = {}
        for uid, parts in zip(series, got):
            for part in parts:
                files[f"{safe_name(uid, 'series')}/{len(files):05d}.dcm"] = part
        self._check_complete(study_uid, series, expected, {uid: len(parts) for uid, parts in zip(series, got)})
        return MemoryStudy(name=safe_name(study_uid, "study"), files=files)

    def retrieve(self, study_uid: str, folder: str | os.PathLike[str], series_uids: Iterable[str] | None = None) -> list[Path]:
        """Download a study's instances (or only ``series_uids``) into ``folder``, one ``.dcm`` per instance.

        One WADO-RS request per series (``multipart/related; type="application/dicom";
        transfer-syntax=*``), streamed: each part is written to ``folder/<series>/<n>.dcm`` exactly
        as the PACS sent it (a DICOM file: preamble, meta, data set in the stored transfer syntax),
        so nothing is parsed or re-encoded on the way; ``resunet.io`` reads the files once. A part
        without the ``DICM`` preamble (a non-conforming server sending a bare data set) is parsed
        and written as a file instead. Files 0600 in the caller's private folder.

        Raises:
            PacsError: the PACS fails, or delivers fewer instances of a series than its QIDO-RS
                search counted (``NumberOfSeriesRelatedInstances``): an incomplete study is not segmented.
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        series, expected = self._plan(study_uid, series_uids)
        paths: list[Path] = []
        received: dict[str, int] = {}
        for uid in series:
            what = f"retrieving series {uid} of study {study_uid}"
            parts = self._call(what, self._series_parts, study_uid, uid, study_uid=study_uid)
            try:
                for part in parts:
                    p = out / safe_name(uid, "series") / f"{len(paths):05d}.dcm"
                    p.parent.mkdir(parents=True, exist_ok=True)
                    _write_part(p, part)
                    paths.append(p)
                    received[uid] = received.get(uid, 0) + 1
            except PacsError:
                raise
            except Exception as err:  # the stream is read lazily: network failures surface here
                raise self._fail(err, what, study_uid) from None
        self._check_complete(study_uid, series, expected, received)
        return paths

    def _series_parts(self, study_uid: str, series_uid: str, client: Any = None) -> Iterator[bytes]:
        """The bytes of each instance of one series (WADO-RS, streamed multipart), as the PACS sent them.

        dicomweb-client's public ``iter_series`` parses every part with pydicom (and the caller then
        had to serialise it again: 70% of a pull's time on the example study); its request and
        multipart decoder are used directly instead, which keep its retries, authentication and
        non-conforming-server handling.
        """
        from dicomweb_client.api import DICOMwebClient

        client: DICOMwebClient = client or self._client
        url = f"{self.config.url}/studies/{study_uid}/series/{series_uid}"
        headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        response = client._http_get(url, headers=headers, stream=True)
        if response.headers.get("Content-Type", "").startswith("application/dicom"):
            return iter([response.content])  # one part sent without the multipart envelope
        return client._decode_multipart_message(response, stream=True)

    # -- STOW-RS ---------------------------------------------------------------------------------
    def store(self, files: Sequence[str | os.PathLike[str]], study_uid: str | None = None) -> int:
        """Store DICOM files (SEG, RTSTRUCT...) with STOW-RS; returns how many the PACS accepted.

        Raises:
            PacsError: the PACS is unreachable, refuses the request, or lists a file as failed.
        """
        import pydicom

        datasets = [pydicom.dcmread(f) for f in files]
        if not datasets:
            return 0
        study = study_uid or str(datasets[0].StudyInstanceUID)
        answer = self._call(f"storing {len(datasets)} file(s) to study {study}", self._client.store_instances,
                            datasets, study)
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reasons = ", ".join(f"{f.get('ReferencedSOPInstanceUID', '?')} (reason {f.get('FailureReason', '?')})"
                                for f in failed)
            raise PacsError(f"PACS {self.config.url} refused to store {reasons}")
        stored = answer.get("ReferencedSOPSequence") if answer is not None else None
        return len(stored) if stored is not None else len(datasets)
