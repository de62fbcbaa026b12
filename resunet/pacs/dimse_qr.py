"""Query/retrieve over classic DICOM networking (DIMSE) with pynetdicom: C-FIND, C-GET, C-MOVE.

Most hospital archives offer DIMSE only. This module finds a study (by accession number, Study
Instance UID, or patient ID and a date range) with C-FIND at study and series level (Study Root
information model), and fetches it into a folder with

- **C-GET** (``method="get"``): the archive sends the instances back on the same association; we
  take the Storage SCP role for the usual image storage classes. No port to open, but some
  archives do not offer it;
- **C-MOVE** (``method="move"``): the archive opens an association to *our* AE (``move_ae`` on
  ``move_port``, which it must know as a modality: Orthanc's ``DicomModalities``, a PACS's AE
  table); a Storage SCP is started here for the retrieve.

The retrieve is complete only when every instance the C-FIND counted arrived
(``NumberOfSeriesRelatedInstances``); otherwise (fewer instances, failed sub-operations, a
timeout) :class:`~resunet.errors.PacsError` says what was missing, and the caller stores nothing back.

TLS: a source URL ``dimses://AET@HOST:PORT`` (or ``tls=True``) speaks DICOM over TLS (PS3.15 B.1)
with the operator's CA file (hostname check on, no plaintext fallback) and, when the archive asks
for it, our certificate and key; a C-MOVE over TLS listens with TLS too. The contexts come from
:mod:`resunet.pacs.dimse` (one home); a failed handshake is explained (wrong CA, expired, hostname).
Written on pynetdicom's primitives; the only hand-written part is the bookkeeping of what arrived.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resunet.errors import ConfigError, PacsError

log = logging.getLogger(__name__)

_URL = re.compile(r"^(?P<scheme>dimses?)://(?P<aet>[^@/]{1,16})@(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>\d{1,5})/?$")

@dataclass(frozen=True)
class DimseSource:
    """A DIMSE archive: its AE title, host, port, and whether it speaks TLS."""

    ae_title: str
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> "DimseSource":
        """``dimse://AET@HOST:PORT`` or ``dimses://AET@HOST:PORT`` (TLS); ConfigError otherwise."""
        m = _URL.match(str(url).strip())
        if not m or not 0 < int(m["port"]) < 65536:
            raise ConfigError(f"{url!r}: a DIMSE archive is written dimse://AET@HOST:PORT (dimses:// for TLS), "
                              "e.g. dimse://ORTHANC@pacs.hospital:4242")
        return cls(m["aet"].strip(), m["host"].strip("[]"), int(m["port"]), m["scheme"] == "dimses")

    def __str__(self) -> str:
        return f"{'dimses' if self.tls else 'dimse'}://{self.ae_title}@{self.host}:{self.port}"


@dataclass
class QueryConfig:
    """How we talk to the archive.

    Args:
        calling_aet: our AE title (the archive must know it; for C-MOVE it is also the destination).
        method: ``get`` (C-GET) or ``move`` (C-MOVE to ``calling_aet`` on ``move_port``).
        move_port: the port our Storage SCP listens on during a C-MOVE (the archive's modality entry).
        move_host: address it listens on.
        timeout: seconds for the association, each DIMSE answer and network silence.
        tls_ca: CA file that signed the archive's certificate (TLS).
        tls_cert, tls_key: our certificate and key, when the archive checks clients (TLS).
        parallel: series of a study retrieved at once, one association each (1: one after the other).
    """

    calling_aet: str = "RESUNET"
    method: str = "get"
    move_port: int = 0
    move_host: str = "127.0.0.1"
    timeout: float = 60.0
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    parallel: int = 3

    def __post_init__(self) -> None:
        if int(self.parallel) < 1:
            raise ConfigError(f"parallel retrieves must be 1 or more; got {self.parallel}")
        if self.method not in ("get", "move"):
            raise ConfigError(f"retrieve method {self.method!r}: use get (C-GET) or move (C-MOVE)")
        if self.method == "move" and not 0 < int(self.move_port) < 65536:
            raise ConfigError("C-MOVE needs the port our node listens on (--move-port), as the archive knows it")

    def ssl_context(self, source: DimseSource) -> ssl.SSLContext | None:
        """The client TLS context for ``source`` (None without TLS): its certificate checked against
        ``tls_ca`` with the hostname check on (:func:`resunet.pacs.dimse.tls_client_context`).

        Raises:
            ConfigError: a CA/certificate/key file is missing, unreadable or unusable.
        """
        if not source.tls:
            return None
        from resunet.pacs.dimse import tls_client_context

        return tls_client_context(self.tls_ca, self.tls_cert, self.tls_key)

    def tls_refusal(self, source: DimseSource, ctx: ssl.SSLContext | None) -> PacsError | None:
        """Why the TLS handshake with ``source`` fails (wrong CA, expired, ...), or None."""
        if ctx is None:
            return None
        from resunet.pacs.dimse import tls_failure

        why = tls_failure(source.host, source.port, ctx, self.timeout, self.tls_ca)
        return PacsError(f"DICOM archive {source}: {why}; no plaintext fallback") if why else None


@dataclass
class StudyMatch:
    """One study C-FIND found."""

    study_uid: str
    accession: str = ""
    patient_id: str = ""
    study_date: str = ""
    description: str = ""
    modalities: str = ""
    n_instances: int | None = None


@dataclass
class SeriesMatch:
    """One series of a study."""

    series_uid: str
    modality: str = ""
    description: str = ""
    body_part: str = ""
    n_instances: int | None = None
    number: int | None = None


@dataclass
class Retrieved:
    """What a retrieve brought: the files (or, retrieved into memory, ``study``), per series what was
    expected and what came."""

    folder: Path | None
    files: list[Path] = field(default_factory=list)
    expected: dict[str, int | None] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    study: Any = None  # resunet.io.memory.MemoryStudy when retrieved into memory


def _associate(ae: Any, source: DimseSource, cfg: QueryConfig, what: str) -> Any:
    from resunet.pacs.dimse import tcp_handlers

    ctx = cfg.ssl_context(source)
    kwargs: dict[str, Any] = {"tls_args": (ctx, source.host)} if ctx is not None else {}
    kwargs["evt_handlers"] = tcp_handlers()
    try:
        assoc = ae.associate(source.host, source.port, ae_title=source.ae_title, **kwargs)
    except (OSError, ssl.SSLError) as err:
        raise PacsError(f"DICOM archive {source} is unreachable ({err})") from None
    if not assoc.is_established:
        refusal = None if assoc.is_rejected else cfg.tls_refusal(source, ctx)
        if refusal is not None:
            raise refusal
        why = ("rejected the association (check that it knows our AE title "
               f"{cfg.calling_aet!r} and offers {what})" if assoc.is_rejected
               else "is unreachable or aborted the association (check host, port, TLS, and that it runs)")
        raise PacsError(f"DICOM archive {source} {why}")
    return assoc


def _ae(cfg: QueryConfig) -> Any:
    from pynetdicom import AE

    from resunet.pacs.dimse import _aet

    ae = AE(ae_title=_aet(cfg.calling_aet, "calling AE title"))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = cfg.timeout
    # no limit on the PDUs the archive sends us (C-GET's and C-MOVE's C-STOREs), as the DICOM node
    # allows: pynetdicom's 16 KiB default cut each instance into several PDUs, each one more wait
    ae.maximum_pdu_size = 0
    return ae


def _find(source: DimseSource, cfg: QueryConfig, query: Any) -> list[Any]:
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    ae = _ae(cfg)
    ae.add_requested_context(FIND)
    assoc = _associate(ae, source, cfg, "Study Root C-FIND")
    out = []
    try:
        for status, identifier in assoc.send_c_find(query, FIND):
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in (0xFF00, 0xFF01) and identifier is not None:
                out.append(identifier)
            elif code == 0x0000:
                break
            else:
                raise PacsError(f"DICOM archive {source} " + (
                    f"answered the C-FIND with status 0x{code & 0xFFFF:04X}" if code >= 0 else
                    f"aborted the C-FIND or did not answer within {cfg.timeout:g} s (check that it lets our AE title "
                    f"{cfg.calling_aet!r} query: e.g. Orthanc's DicomModalities)"))
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def find_studies(source: DimseSource, cfg: QueryConfig, *, accession: str | None = None, study_uid: str | None = None,
                 patient_id: str | None = None, date_range: str | None = None) -> list[StudyMatch]:
    """C-FIND at STUDY level; ``date_range`` is DICOM's ``YYYYMMDD-YYYYMMDD`` (either end may be open)."""
    from pydicom.dataset import Dataset

    if not (accession or study_uid or patient_id):
        raise ConfigError("find a study by --accession, --study or --patient-id")
    # (``\d{8}?`` would be a lazy quantifier, not an optional end: open ranges were refused before)
    if date_range and (date_range == "-" or not re.fullmatch(r"(?:\d{8})?-(?:\d{8})?|\d{8}", date_range)):
        raise ConfigError(f"--date-range {date_range!r}: use YYYYMMDD-YYYYMMDD (an end may be left open)")
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid or ""
    q.AccessionNumber = accession or ""
    q.PatientID = patient_id or ""
    q.StudyDate = date_range or ""
    q.StudyDescription = ""
    q.ModalitiesInStudy = ""
    q.NumberOfStudyRelatedInstances = ""
    out = []
    for ds in _find(source, cfg, q):
        n = ds.get("NumberOfStudyRelatedInstances")
        mods = ds.get("ModalitiesInStudy", "")
        out.append(StudyMatch(str(ds.get("StudyInstanceUID", "")), str(ds.get("AccessionNumber", "") or ""),
                              str(ds.get("PatientID", "") or ""), str(ds.get("StudyDate", "") or ""),
                              str(ds.get("StudyDescription", "") or ""),
                              mods if isinstance(mods, str) else "\\".join(str(m) for m in mods),
                              int(n) if n not in (None, "") else None))
    return [s for s in out if s.study_uid]


def find_series(source: DimseSource, cfg: QueryConfig, study_uid: str) -> list[SeriesMatch]:
    """C-FIND at SERIES level in ``study_uid``, with each series' instance count."""
    from pydicom.dataset import Dataset

    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = ""
    q.Modality = ""
    q.SeriesDescription = ""
    q.BodyPartExamined = ""
    q.SeriesNumber = ""
    q.NumberOfSeriesRelatedInstances = ""
    out = []
    for ds in _find(source, cfg, q):
        n, num = ds.get("NumberOfSeriesRelatedInstances"), ds.get("SeriesNumber")
        out.append(SeriesMatch(str(ds.get("SeriesInstanceUID", "")), str(ds.get("Modality", "") or ""),
                               str(ds.get("SeriesDescription", "") or ""), str(ds.get("BodyPartExamined", "") or ""),
                               int(n) if n not in (None, "") else None, int(num) if num not in (None, "") else None))
    return [s for s in out if s.series_uid]


def series_to_retrieve(source: DimseSource, cfg: QueryConfig, study_uid: str,
                       series_uid: str | None = None) -> list[SeriesMatch]:
    """The series of ``study_uid`` worth retrieving (C-FIND at SERIES level): ``series_uid`` alone
    when given, else every image series. Results already in the study (SEG, RTSTRUCT, SR, KO, PR of
    an earlier run or another tool: :data:`~resunet.pacs.dicomweb.NON_IMAGE_MODALITIES`) are left
    out, as the DICOMweb pull leaves them out: they are never segmented, and each earlier run's SEG
    would otherwise travel with every later retrieve.

    Raises:
        PacsError: the archive lists no such series, or no image series in the study.
    """
    from resunet.pacs.dicomweb import NON_IMAGE_MODALITIES

    listed = find_series(source, cfg, study_uid)
    if series_uid:
        chosen = [s for s in listed if s.series_uid == series_uid]
        if not chosen:
            raise PacsError(f"DICOM archive {source} has no series {series_uid} in study {study_uid}")
        return chosen
    chosen = [s for s in listed if s.modality.upper() not in NON_IMAGE_MODALITIES]
    if not chosen:
        raise PacsError(f"DICOM archive {source} has no study {study_uid}" if not listed else
                        f"DICOM archive {source} lists no image series in study {study_uid} (only "
                        + ", ".join(sorted({s.modality or "?" for s in listed})) + ")")
    return chosen


class _Sink:
    """Storage SCP handler: keeps each received instance as received (no decode and re-encode).

    With a folder, as ``folder/<series>/<sop>.dcm`` (written atomically); without one, in memory
    under the same relative name (``memory``: the bytes of a DICOM file, ready for
    :class:`resunet.io.memory.MemoryStudy`).
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.files: list[Path] = []
        self.memory: dict[str, bytes] = {}
        self.per_series: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, event: Any) -> int:
        from resunet.io.atomic import atomic_write_bytes
        from resunet.io.names import safe_name

        try:
            ds = event.dataset
            series, sop = str(ds.get("SeriesInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
            rel = f"{safe_name(series)}/{safe_name(sop)}.dcm"
            data = event.encoded_dataset()  # as received: no re-encode
            if self.folder is not None:
                path = self.folder / rel
                atomic_write_bytes(path, data)
        except OSError as err:
            log.error("retrieve: cannot write an instance (%s)", err)
            return 0xA700
        except Exception as err:  # noqa: BLE001 - an undecodable instance is refused, the rest goes on
            log.warning("retrieve: cannot decode an instance (%s)", err)
            return 0xC210
        with self.lock:
            if self.folder is not None:
                self.files.append(path)
            else:
                again = rel in self.memory
                self.memory[rel] = data
                if again:  # the same instance sent twice: kept once, as a folder would, and counted once
                    return 0x0000
            self.per_series[series] = self.per_series.get(series, 0) + 1
        return 0x0000


#: C-MOVE/C-GET failure statuses worth a sentence of their own (PS3.4 C.4.2.1.5, C.4.3.1.4)
_RETRIEVE_FAILURES = {
    0xA701: "is out of resources for the sub-operations",
    0xA702: "is out of resources for the sub-operations",
    0xA801: "does not know the C-MOVE destination {aet!r} (add it to the archive's modalities, e.g. Orthanc's "
            "DicomModalities, with our host and --move-port)",
    0xA900: "found the request not matching its SOP class",
    0xC000: "could not process the request",
    0xFE00: "cancelled the retrieve",
}


def _check_retrieve_status(source: DimseSource, cfg: QueryConfig, series_uid: str, final: Any) -> None:
    """Raise PacsError unless the final C-GET/C-MOVE answer says every sub-operation succeeded (0x0000).

    0xB000 ("sub-operations complete, one or more failures or warnings") is an incomplete delivery
    too: the archive itself says that some instances did not arrive intact.
    """
    code = int(getattr(final, "Status", -1)) if final else -1
    what = "C-GET" if cfg.method == "get" else "C-MOVE"
    if code < 0:
        raise PacsError(f"DICOM archive {source} did not finish the {what} of series {series_uid} within "
                        f"{cfg.timeout:g} s; nothing was segmented or stored back")
    if code == 0x0000:
        return
    counts = ", ".join(f"{n} {label}" for label, n in (
        ("completed", final.get("NumberOfCompletedSuboperations")),
        ("failed", final.get("NumberOfFailedSuboperations")),
        ("with warnings", final.get("NumberOfWarningSuboperations"))) if n not in (None, ""))
    counts = f"; sub-operations: {counts}" if counts else ""
    if code == 0xB000:
        raise PacsError(f"DICOM archive {source} delivered series {series_uid} incompletely ({what} status 0xB000: "
                        f"one or more sub-operations failed or had warnings{counts}); nothing was segmented or stored back")
    why = _RETRIEVE_FAILURES.get(code, "failed the retrieve").format(aet=cfg.calling_aet)
    raise PacsError(f"DICOM archive {source} {why}: {what} of series {series_uid} ended with status "
                    f"0x{code & 0xFFFF:04X}{counts}; nothing was segmented or stored back")


def retrieve_study(source: DimseSource, cfg: QueryConfig, study_uid: str, folder: str | Path | None,
                   series: Sequence[SeriesMatch] | None = None) -> Retrieved:
    """Fetch ``series`` of ``study_uid`` (default: its image series, :func:`series_to_retrieve`) into ``folder``.

    ``folder`` None keeps the instances in memory, as received (``Retrieved.study``, a
    :class:`~resunet.io.memory.MemoryStudy` named ``safe_name(study_uid)`` that
    :func:`resunet.io.loader.load_study` reads as it would the folder): nothing touches the disk.

    Raises:
        PacsError: the archive refused or timed out, reported failed or warning sub-operations
            (status 0xB000), or fewer instances arrived than C-FIND counted (the message names the
            series and both counts).
    """
    from pydicom.dataset import Dataset
    from pynetdicom import build_context, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    from resunet.pacs.dimse import RETRIEVE_STORAGE, storage_contexts, tcp_handlers

    t0 = time.perf_counter()
    if folder is not None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
    todo = list(series) if series is not None else series_to_retrieve(source, cfg, study_uid)
    if not todo:
        raise PacsError(f"DICOM archive {source} lists no series in study {study_uid}")
    sink = _Sink(folder)
    ae = _ae(cfg)
    server = None
    if cfg.method == "get":
        # the storage contexts built once per process (storage_contexts), not 18 add_requested_context calls
        # per retrieve; the Verification context that list ends with is left out
        roles = [build_role(uid, scp_role=True) for uid in RETRIEVE_STORAGE]
        assoc_kwargs: dict[str, Any] = {
            "ext_neg": roles, "evt_handlers": [(evt.EVT_C_STORE, sink), *tcp_handlers()],
            "contexts": [build_context(GET), *storage_contexts(RETRIEVE_STORAGE)[:-1]]}
        model = GET
    else:
        from resunet.pacs.dimse import start_scp

        scp = _ae(cfg)
        # over TLS the archive's C-MOVE association to us is TLS too: our certificate, peers checked against the CA
        scp_tls = None
        if source.tls:
            from resunet.pacs.dimse import tls_server_context

            scp_tls = tls_server_context(cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
        try:
            # the storage classes C-GET takes too: pynetdicom deep-copies an acceptor's contexts for each
            # association, 0.05-0.15 s for all 171, paid by every C-MOVE (the node keeps them all)
            server = start_scp(scp, cfg.move_host, cfg.move_port, [(evt.EVT_C_STORE, sink)], ssl_context=scp_tls,
                               contexts=storage_contexts(RETRIEVE_STORAGE))
        except OSError as err:
            raise PacsError(f"cannot listen on {cfg.move_host}:{cfg.move_port} for the C-MOVE ({err.strerror or err})") from None
        assoc_kwargs = {"evt_handlers": tcp_handlers(), "contexts": [build_context(MOVE)]}
        model = MOVE
    ctx = cfg.ssl_context(source)
    if ctx is not None:
        assoc_kwargs["tls_args"] = (ctx, source.host)

    def one(batch: Sequence[SeriesMatch], ae: Any) -> None:
        """One association: C-GET/C-MOVE each series of ``batch`` in turn, each checked complete."""
        try:
            assoc = ae.associate(source.host, source.port, ae_title=source.ae_title, **assoc_kwargs)
        except (OSError, ssl.SSLError) as err:
            raise PacsError(f"DICOM archive {source} is unreachable ({err})") from None
        if not assoc.is_established:
            refusal = None if assoc.is_rejected else cfg.tls_refusal(source, ctx)
            if refusal is not None:
                raise refusal
            raise PacsError(f"DICOM archive {source} rejected the {'C-GET' if cfg.method == 'get' else 'C-MOVE'} "
                            f"association (check that it knows our AE title {cfg.calling_aet!r})")
        try:
            for s in batch:
                q = Dataset()
                q.QueryRetrieveLevel = "SERIES"
                q.StudyInstanceUID = study_uid
                q.SeriesInstanceUID = s.series_uid
                answers = (assoc.send_c_get(q, model) if cfg.method == "get"
                           else assoc.send_c_move(q, cfg.calling_aet, model))
                final = None
                for status, _ in answers:
                    final = status
                _check_retrieve_status(source, cfg, s.series_uid, final)
        finally:
            if assoc.is_established:
                assoc.release()

    try:
        if len(todo) > 1 and cfg.parallel > 1:
            # several retrieves in flight, one association each (a series' sub-operations are one at a
            # time on an association, so the archive's and our per-instance waits overlap across series);
            # the largest series first, the others dealt round-robin
            from concurrent.futures import ThreadPoolExecutor

            ranked = sorted(todo, key=lambda s: -(s.n_instances or 0))
            n = min(cfg.parallel, len(ranked))
            batches = [ranked[k::n] for k in range(n)]
            with ThreadPoolExecutor(max_workers=n, thread_name_prefix="resunet-retrieve") as pool:
                futures = [pool.submit(one, b, ae if k == 0 else _ae(cfg)) for k, b in enumerate(batches)]
                for f in futures:
                    f.result()
        else:
            one(todo, ae)
        if server is not None:  # C-MOVE: the archive's own association may still be finishing
            deadline = time.monotonic() + cfg.timeout
            while time.monotonic() < deadline and any(
                    sink.per_series.get(s.series_uid, 0) < (s.n_instances or 0) for s in todo):
                time.sleep(0.01)
    finally:
        if server is not None:
            server.shutdown()
    got = Retrieved(folder=folder, files=list(sink.files), seconds=time.perf_counter() - t0)
    for s in todo:
        got.expected[s.series_uid] = s.n_instances
        got.received[s.series_uid] = sink.per_series.get(s.series_uid, 0)
    short = [s for s in todo if s.n_instances is not None and got.received[s.series_uid] < s.n_instances]
    if short:
        parts = "; ".join(f"series {s.series_uid}: {got.received[s.series_uid]} of {s.n_instances}" for s in short)
        raise PacsError(f"DICOM archive {source} delivered fewer instances than its C-FIND counted ({parts}); "
                        "nothing was segmented or stored back")
    if folder is None:
        from resunet.io.memory import MemoryStudy
        from resunet.io.names import safe_name

        got.study = MemoryStudy(name=safe_name(study_uid, "study"), files=dict(sink.memory))
    return got
