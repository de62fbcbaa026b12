"""DICOM networking (DIMSE) with pynetdicom: the transport only, a C-STORE listener and a C-STORE sender.

- :class:`StoreListener` is a C-STORE SCP (AE title, host and port set by the operator). Each
  received instance is written atomically to ``incoming/<study>/<series>/<SOP>.dcm``. A series is
  *complete* when no new instance of it arrived for ``settle_seconds`` (DICOM has no "end of
  series" message; PACS gateways such as MONAI Deploy's Informatics Gateway and Orthanc's
  ``StableAge`` use the same timeout rule). The folder of a complete series is handed to a callback.
- :func:`send_files` is the C-STORE SCU (results back to a node, tests that send a study).

Segmenting what arrives is not done here: ``resunet serve --dicom-port`` queues each complete series
as a ``dicom-series`` job (:mod:`resunet.serve.pacs_jobs`), which runs the one segment-and-send step,
:func:`resunet.pacs.segment.segment_and_send`, with :func:`send_files` as its transport.

- :func:`tls_client_context` / :func:`tls_server_context` build the one TLS set-up (PS3.15 B.1) of
  every DIMSE association over TLS (``dimses://``): the archive's certificate is checked against the
  operator's CA file with the hostname check on, never a plaintext fallback; :func:`tls_failure`
  says why a handshake failed (wrong CA, expired certificate, hostname, client certificate).

DIMSE has no authentication; restrict who may send with ``allowed_calling_aets`` and the network
(or TLS with client certificates).
Non-image objects that arrive (SEG, RTSTRUCT, SR, ...) are accepted and dropped: only image series
are segmented.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resunet.errors import ConfigError, PacsError
from resunet.io.names import safe_name
from resunet.pacs.dicomweb import NON_IMAGE_MODALITIES

log = logging.getLogger(__name__)
logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # one INFO line per PDU otherwise


def _readable(path: str | None, what: str, flag: str) -> str | None:
    """``path`` if it is a readable file; ConfigError naming the file and the option otherwise."""
    if not path:
        return None
    f = Path(path).expanduser()
    try:
        with open(f, "rb") as fh:
            fh.read(1)
    except OSError as err:
        raise ConfigError(f"TLS: cannot read the {what} {f} ({flag}): {err.strerror or err}; "
                          "give a readable PEM file") from None
    return str(f)


def _warn_if_key_readable(key: str) -> None:
    mode = os.stat(key).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("TLS private key %s can be read by group/others (mode %03o): chmod 600 it", key, mode & 0o777)


def _load_pair(ctx: ssl.SSLContext, cert: str | None, key: str | None) -> None:
    cert = _readable(cert, "certificate", "--tls-cert")
    key = _readable(key, "private key", "--tls-key")
    if key and not cert:
        raise ConfigError("TLS: --tls-key needs its certificate (--tls-cert)")
    if not cert:
        return
    if key:
        _warn_if_key_readable(key)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as err:
        why = ("the private key does not match the certificate" if "KEY_VALUES_MISMATCH" in str(err)
               else f"not a PEM certificate and unencrypted key ({err.reason or err})")
        raise ConfigError(f"TLS: cannot use --tls-cert {cert} with --tls-key {key or cert}: {why}") from None


def tls_client_context(ca: str | None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """The client TLS context: the peer's certificate verified against ``ca`` (the system CAs when None),
    hostname check on, TLS 1.2 or later; ``cert``/``key`` (PEM) for archives that check clients.

    Raises:
        ConfigError: a file is missing or unreadable, not PEM, or key and certificate do not match.
    """
    ca = _readable(ca, "CA file", "--tls-ca")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as err:
            raise ConfigError(f"TLS: --tls-ca {ca} holds no PEM certificate ({err.reason or err})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname, ctx.verify_mode = True, ssl.CERT_REQUIRED
    _load_pair(ctx, cert, key)
    return ctx


def tls_server_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """The listener's TLS context (our Storage SCP for C-MOVE, ``StoreListener``): our certificate and
    key (required); with ``ca``, peers must present a certificate signed by it.

    Raises:
        ConfigError: as :func:`tls_client_context`, or no certificate given.
    """
    if not cert:
        raise ConfigError("TLS: a listener over TLS needs our certificate and key (--tls-cert, --tls-key)")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ca = _readable(ca, "CA file", "--tls-ca")
    if ca:
        ctx.load_verify_locations(cafile=ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    _load_pair(ctx, cert, key)
    return ctx


_UNKNOWN_CA = {18, 19, 20, 21, 2}  # self-signed, self-signed in chain, no local issuer, leaf unverifiable, no issuer cert


def tls_failure(host: str, port: int, ctx: ssl.SSLContext, timeout: float, ca: str | None) -> str | None:
    """Why a TLS handshake with ``host:port`` fails, as one line for the user (None: it succeeds).

    Hand-written probe: pynetdicom logs the ``ssl`` error of a failed association and returns an
    unestablished association, so the reason (wrong CA, expired, hostname) is only seen by redoing
    the handshake here.
    """
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 15.0)) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                tls.settimeout(2.0)
                try:  # TLS 1.3: a refused client certificate shows on the first read
                    tls.recv(1)
                except (TimeoutError, socket.timeout):
                    pass
    except ssl.SSLCertVerificationError as err:
        code = err.verify_code
        trusted = f"the CA file {ca}" if ca else "the system's CAs (give --tls-ca)"
        if code == 10:
            return "its TLS certificate has expired (renew it on the archive)"
        if code == 9:
            return "its TLS certificate is not valid yet (check the clocks)"
        if code in _UNKNOWN_CA:
            return f"its TLS certificate is not signed by {trusted}"
        if code == 62:
            return f"its TLS certificate is not issued for {host} (hostname check; address it by a name in the certificate)"
        return f"its TLS certificate was refused ({err.verify_message})"
    except ssl.SSLError as err:
        reason = err.reason or str(err)
        if "CERTIFICATE_REQUIRED" in reason.upper() or "UNKNOWN_CA" in reason.upper() or "BAD_CERTIFICATE" in reason.upper():
            return (f"it refused our client certificate ({reason}): give --tls-cert/--tls-key signed by a CA it "
                    "trusts (e.g. Orthanc's DicomTlsTrustedCertificates)")
        if "WRONG_VERSION_NUMBER" in reason.upper() or "RECORD_LAYER" in reason.upper():
            return "it does not speak TLS on this port (use dimse:// or the archive's TLS port)"
        return f"the TLS handshake failed ({reason})"
    except OSError:
        return None  # not a TLS problem: the caller's own message (unreachable) stands
    return None


#: how long pynetdicom's DUL reactor sleeps when it found nothing to do, seconds (its default 1 ms).
#: Each C-STORE sub-operation of a retrieve waits on that loop several times: a C-GET of the 91-instance
#: example from Orthanc took 0.33 s with 1 ms and 0.23 s with 0.1 ms (C-MOVE 0.37 -> 0.31 s), the CPU
#: time the same (0.20-0.27 s; the loop is busy decoding PDUs then), medians of 5 alternating runs.
#: Shorter than 0.1 ms gained nothing more. Set on each association's DUL when its connection opens
#: (pynetdicom has no public setting for it; an unknown attribute is harmless if it goes away).
DUL_POLL_S = 0.0001


def _no_nagle(event: Any) -> None:
    """EVT_CONN_OPEN: TCP_NODELAY on the association's socket (our small PDUs go out at once), and
    the association's reactor polled every :data:`DUL_POLL_S`."""
    if hasattr(event.assoc.dul, "_run_loop_delay"):
        event.assoc.dul._run_loop_delay = DUL_POLL_S  # noqa: SLF001 - see DUL_POLL_S
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # a socket closed under us: nothing to tune
            pass


def _quick_ack(event: Any) -> None:
    """EVT_DATA_SENT: leave Linux's delayed-ACK ("pingpong") mode after each PDU we send."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)  # type: ignore[attr-defined]
        except OSError:
            pass


def tcp_handlers() -> list[tuple[Any, Callable[[Any], None]]]:
    """pynetdicom event handlers that take the Nagle + delayed-ACK stall out of every association
    resunet opens or accepts (C-FIND/C-GET/C-MOVE SCU, our Storage SCPs, the C-STORE sender).

    Measured on a C-GET of the 91-instance example from Orthanc 1.10: 45-48 ms between instances,
    4.4 s in all. The archive's DCMTK keeps Nagle's algorithm on by default (DCMTK >= 3.6.5 disables
    it only when built with ``DISABLE_NAGLE_ALGORITHM`` or run with ``TCP_NODELAY=1``), so after our
    C-STORE-RSP it sends the first bytes of its next PDU and holds the rest until they are ACKed, while
    our kernel, having just sent data, delays that ACK by its 40 ms minimum. TCP_QUICKACK after each PDU
    we send makes our side ACK at once (it also flushes an ACK already pending); TCP_NODELAY does the
    same for the PDUs we send (C-STORE of results: command and dataset are separate writes).
    pynetdicom has no socket-option setting, so its documented notification events carry them
    (``EVT_CONN_OPEN`` for both requestor and acceptor sockets, ``EVT_DATA_SENT`` after each PDU).
    TCP_QUICKACK is Linux-only; elsewhere only TCP_NODELAY is set. ``EVT_CONN_OPEN`` also shortens
    the reactor's idle sleep (:data:`DUL_POLL_S`).
    """
    from pynetdicom import evt

    handlers: list[tuple[Any, Callable[[Any], None]]] = [(evt.EVT_CONN_OPEN, _no_nagle)]
    if hasattr(socket, "TCP_QUICKACK"):
        handlers.append((evt.EVT_DATA_SENT, _quick_ack))
    return handlers


#: the storage SOP classes a retrieve accepts (C-GET's Storage SCP role, C-MOVE's Storage SCP): the
#: images resunet reads, and results for --series UID (pynetdicom allows 128 requested contexts in all)
RETRIEVE_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.2",      # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",    # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4",      # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",    # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.128",    # PET Image
    "1.2.840.10008.5.1.4.1.1.130",    # Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.20",     # NM Image
    "1.2.840.10008.5.1.4.1.1.7",      # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
    "1.2.840.10008.5.1.4.1.1.66.4",   # Segmentation
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.6.1",    # US Image
    "1.2.840.10008.5.1.4.1.1.1",      # CR Image
    "1.2.840.10008.5.1.4.1.1.1.1",    # DX Image
    "1.2.840.10008.5.1.4.1.1.2.2",    # Legacy Converted Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4.4",    # Legacy Converted Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image
)

_STORAGE_CONTEXTS: dict[tuple[str, ...] | None, list[Any]] = {}
_CONTEXTS_LOCK = threading.Lock()


def storage_contexts(sop_classes: tuple[str, ...] | None = None) -> list[Any]:
    """Storage presentation contexts with every transfer syntax, built once per process: every
    storage SOP class (the DICOM node's offer), or only ``sop_classes`` (e.g. :data:`RETRIEVE_STORAGE`).

    Building ~150 presentation contexts with pynetdicom's ``add_supported_context`` took 0.1-0.3 s per
    C-MOVE (measured); the contexts are immutable here, so one list serves every listener.
    """
    with _CONTEXTS_LOCK:
        if sop_classes not in _STORAGE_CONTEXTS:
            from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context
            from pynetdicom.sop_class import Verification

            uids = sop_classes if sop_classes is not None else [cx.abstract_syntax for cx in AllStoragePresentationContexts]
            built = [build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in uids] + [build_context(Verification)]
            for cx in built:
                cx.__class__ = _cheap_copy_context_class()
            _STORAGE_CONTEXTS[sop_classes] = built
        return _STORAGE_CONTEXTS[sop_classes]


_CHEAP_COPY: list[type] = []


def _cheap_copy_context_class() -> type:
    """pynetdicom's PresentationContext with a fast ``__deepcopy__``.

    pynetdicom deep-copies an acceptor's supported contexts for every association it accepts
    (``RequestHandler._create_association``): 0.12 s for the 171 storage classes at load 7 on 2 cores,
    paid by every C-MOVE retrieve and every association to the DICOM node before its first instance.
    A context holds plain values (ints, bools, None), immutable UIDs and one list of transfer-syntax
    UIDs, so a copy of its ``__dict__`` with a new list is the same deep copy. Written by hand because
    pynetdicom has no setting for it; the class is made once, on first use (pynetdicom is imported late).
    """
    if not _CHEAP_COPY:
        from pynetdicom.presentation import PresentationContext

        class _Context(PresentationContext):
            def __deepcopy__(self, memo: dict) -> "_Context":
                new = object.__new__(type(self))
                new.__dict__.update(self.__dict__)
                new._transfer_syntax = list(self._transfer_syntax)
                return new

        _CHEAP_COPY.append(_Context)
    return _CHEAP_COPY[0]


#: seconds between the checks of a listener's accept loop for a stop request (socketserver's default: 0.5)
SCP_POLL_SECONDS = 0.05


def start_scp(ae: Any, host: str, port: int, handlers: list[tuple[Any, Callable[..., Any]]],
              ssl_context: ssl.SSLContext | None = None, contexts: list[Any] | None = None) -> Any:
    """Start a Storage SCP (non-blocking) with ``contexts`` (default: every storage class,
    :func:`storage_contexts`), ``handlers`` plus :func:`tcp_handlers`.

    pynetdicom's ``start_server(block=False)`` runs socketserver's accept loop with its 0.5 s poll, so
    each ``shutdown()`` waited up to 0.5 s (0.14-0.23 s measured per C-MOVE); the same server from
    ``make_server`` is run here with a 50 ms poll. Stop it with ``server.shutdown()``.

    Raises:
        OSError: the address cannot be bound.
    """
    from pynetdicom.transport import ThreadedAssociationServer

    server = ae.make_server((host, int(port)), contexts=contexts or storage_contexts(), ssl_context=ssl_context,
                            evt_handlers=[*handlers, *tcp_handlers()], server_class=ThreadedAssociationServer)
    ae._servers.append(server)  # pynetdicom's AssociationServer.shutdown() removes it from this list
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": SCP_POLL_SECONDS},
                     name="resunet-dicom-scp", daemon=True).start()
    return server


@dataclass(frozen=True)
class Destination:
    """A DICOM node to send results to: ``host``, ``port``, called ``ae_title``."""

    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """``"HOST:PORT:AET"`` (e.g. ``pacs.local:4242:ORTHANC``) -> Destination."""
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[0] or not parts[2]:
            raise ConfigError(f"destination {text!r} must look like HOST:PORT:AET, e.g. 127.0.0.1:4242:ORTHANC")
        try:
            port = int(parts[1])
        except ValueError:
            raise ConfigError(f"destination {text!r}: the port {parts[1]!r} is not a number") from None
        return cls(parts[0], port, _aet(parts[2], "destination AE title"))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _aet(value: str, what: str) -> str:
    v = str(value).strip()
    if not 1 <= len(v) <= 16 or "\\" in v or not v.isprintable():
        raise ConfigError(f"{what} {value!r} must be 1-16 printable characters without a backslash")
    return v


@dataclass
class ListenerConfig:
    """How the DICOM node listens.

    Args:
        ae_title: our AE title (what senders call).
        port: TCP port (11112 is the registered DICOM port; 104 needs root).
        host: address to listen on (``127.0.0.1``: this machine only; ``0.0.0.0``: every interface).
        incoming_dir: where received instances are written (per study/series folders).
        settle_seconds: a series is complete after this long without a new instance.
        allowed_calling_aets: AE titles allowed to send; empty = any.
        association_timeout: seconds a new connection may take to send its association request (and
            the ACSE replies), after which it is dropped (pynetdicom's ARTIM timer; its default is 30 s).
        network_timeout: seconds an association may stay silent before it is closed.
        max_associations: associations (and connections not yet associated) at once, over all peers.
        max_per_peer: connections at once from one IP address: a host that opens idle sockets takes
            its own slots, not those of the PACS.
    """

    ae_title: str = "RESUNET"
    port: int = 11112
    host: str = "127.0.0.1"
    incoming_dir: Path = field(default_factory=lambda: Path("incoming"))
    settle_seconds: float = 5.0
    allowed_calling_aets: tuple[str, ...] = ()
    association_timeout: float = 5.0
    network_timeout: float = 60.0
    max_associations: int = 32
    max_per_peer: int = 8

    def __post_init__(self) -> None:
        self.ae_title = _aet(self.ae_title, "AE title")
        self.incoming_dir = Path(self.incoming_dir)
        if not 0 < int(self.port) < 65536:
            raise ConfigError(f"DICOM port must be 1..65535, got {self.port}")
        if self.settle_seconds <= 0:
            raise ConfigError(f"settle time must be > 0 s, got {self.settle_seconds}")
        if not (self.association_timeout > 0 and self.network_timeout > 0):
            raise ConfigError("DICOM association and network timeouts must be > 0 s")
        if not 1 <= self.max_per_peer <= self.max_associations:
            raise ConfigError(f"DICOM connection limits: need 1 <= per peer ({self.max_per_peer}) <= "
                              f"in all ({self.max_associations})")


@dataclass(frozen=True)
class ReceivedSeries:
    """A complete series: its folder (one file per instance) and identifiers."""

    folder: Path
    study_uid: str
    series_uid: str
    n_instances: int
    calling_aet: str


#: folder under incoming_dir holding, per received series, the calling AE title of its sender
_SENDERS = ".senders"


class StoreListener:
    """C-STORE SCP that hands each complete series to ``on_series`` (see the module docstring).

    With ``ssl_context`` (:func:`tls_server_context`) it speaks DICOM over TLS only: senders must
    handshake first (with a CA in that context, also present a certificate signed by it).
    """

    def __init__(self, config: ListenerConfig, on_series: Callable[[ReceivedSeries], Any],
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.on_series = on_series
        self.ssl_context = ssl_context
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], dict[str, Any]] = {}  # (study, series) -> last, count, aet
        self._conns: list[tuple[Any, str]] = []  # (socket, peer IP) of the open connections
        self._refused: dict[str, int] = {}  # peer IP -> connections refused by the per-peer limit
        self._server: Any = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.received = 0

    # -- pynetdicom handlers ---------------------------------------------------------------------
    def _on_store(self, event: Any) -> int:
        from resunet.io.atomic import atomic_write_bytes

        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as err:  # undecodable dataset
            log.warning("C-STORE from %s: cannot decode the dataset (%s)", event.assoc.requestor.ae_title, err)
            return 0xC210
        if str(ds.get("Modality", "")).upper() in NON_IMAGE_MODALITIES:
            return 0x0000
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        sop = str(ds.get("SOPInstanceUID", "")) or f"instance{self.received}"
        if not study or not series:
            return 0xC211  # cannot place it in a series
        path = self.config.incoming_dir / safe_name(study) / safe_name(series) / f"{safe_name(sop)}.dcm"
        aet = str(event.assoc.requestor.ae_title).strip()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, event.encoded_dataset())
            sender = self._sender_file(path.parent)
            if not sender.exists():  # who sent it survives a restart of the node (the job records it)
                atomic_write_bytes(sender, aet.encode())
        except OSError as err:
            log.error("C-STORE: cannot write %s (%s)", path, err)
            return 0xA700  # out of resources
        with self._lock:
            entry = self._pending.setdefault((study, series), {"count": 0})
            entry["last"] = time.monotonic()
            entry["count"] += 1
            entry["aet"] = aet
            self.received += 1
        return 0x0000

    def _watch(self) -> None:
        tick = min(0.2, self.config.settle_seconds / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                done = [(k, v) for k, v in self._pending.items() if now - v["last"] >= self.config.settle_seconds]
                for k, _ in done:
                    del self._pending[k]
            for (study, series), v in done:
                folder = self.config.incoming_dir / safe_name(study) / safe_name(series)
                item = ReceivedSeries(folder=folder, study_uid=study, series_uid=series,
                                      n_instances=v["count"], calling_aet=v["aet"])
                log.info("series %s of study %s complete (%d instances from %s)", series, study, v["count"], v["aet"])
                try:
                    self.on_series(item)
                    self._sender_file(folder).unlink(missing_ok=True)
                except Exception:  # a failing callback must not stop the listener
                    log.exception("handling series %s failed", series)

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> "StoreListener":
        """Listen (non-blocking). Raises PacsError when the port cannot be opened."""
        from pynetdicom import AE, evt

        self.config.incoming_dir.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        if self.config.allowed_calling_aets:
            ae.require_calling_aet = list(self.config.allowed_calling_aets)
        ae.maximum_pdu_size = 0  # no limit on what senders may send per PDU
        # A connection that never sends an A-ASSOCIATE-RQ held a slot for pynetdicom's 30 s ARTIM
        # default, and 10 of them ("Local Limit Exceeded" for everyone) blocked the node.
        ae.acse_timeout = self.config.association_timeout
        ae.network_timeout = self.config.network_timeout
        ae.maximum_associations = self.config.max_associations
        try:
            self._server = start_scp(ae, self.config.host, self.config.port, [(evt.EVT_C_STORE, self._on_store)],
                                     ssl_context=self.ssl_context)
        except OSError as err:
            raise PacsError(f"cannot listen for DICOM on {self.config.host}:{self.config.port} ({err.strerror or err});"
                            " choose another port or stop what uses it") from None
        # socketserver's own admission hook, called for each accepted socket before a thread is started
        self._server.verify_request = self._admit  # type: ignore[method-assign]
        self._recover()
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="resunet-dicom-series", daemon=True)
        self._watcher.start()
        log.info("DICOM node %s listening on %s:%d%s", self.config.ae_title, self.config.host, self.config.port,
                 " (TLS)" if self.ssl_context is not None else "")
        return self

    def _sender_file(self, series_folder: Path) -> Path:
        """Where the sender's AE title of a series folder is kept (beside the series, not in it: the
        series folder becomes the job's input as it is)."""
        return self.config.incoming_dir / _SENDERS / f"{series_folder.parent.name}__{series_folder.name}"

    def _admit(self, request: Any, client_address: Any) -> bool:
        """Refuse a connection from a peer that already holds ``max_per_peer`` open connections.

        Connections are tracked by their socket (closed ones, ``fileno() == -1``, are dropped), because
        pynetdicom's associations do not expose their peer before the association request arrives.
        """
        peer = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        with self._lock:
            self._conns = [(sock, ip) for sock, ip in self._conns if sock.fileno() != -1]
            if sum(1 for _, ip in self._conns if ip == peer) >= self.config.max_per_peer:
                refused = self._refused.get(peer, 0)
                self._refused[peer] = refused + 1
                if refused == 0:  # once per peer: a flood must not flood the log too
                    log.warning("DICOM node: refusing connections from a peer holding %d open connections "
                                "(max_per_peer)", self.config.max_per_peer)
                return False
            self._conns.append((request, peer))
        return True

    def _recover(self) -> None:
        """Series folders left by a stopped listener are handed over after the settle time, not lost."""
        now = time.monotonic()
        for part in self.config.incoming_dir.glob("*/*/.*.part*"):  # temp files of writes cut by a kill
            part.unlink(missing_ok=True)
        for folder in sorted(self.config.incoming_dir.glob("*/*")):
            n = sum(1 for f in folder.iterdir() if f.suffix == ".dcm") if folder.is_dir() else 0
            if n:
                with self._lock:
                    try:
                        aet = self._sender_file(folder).read_text(encoding="ascii").strip() or "?"
                    except (OSError, UnicodeDecodeError):
                        aet = "? (received before a restart, sender not recorded)"
                    self._pending[(folder.parent.name, folder.name)] = {"last": now, "count": n, "aet": aet}

    @property
    def port(self) -> int:
        """The port actually listened on (useful with port 0 in tests)."""
        return int(self._server.server_address[1]) if self._server is not None else int(self.config.port)

    def stop(self) -> None:
        """Stop listening; series still settling are not handed over."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def __enter__(self) -> "StoreListener":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def send_files(files: Sequence[str | Path], destination: Destination, calling_aet: str = "RESUNET",
               timeout: float = 60.0, ssl_context: Any = None) -> int:
    """Send DICOM files with C-STORE to ``destination``; returns how many were stored.

    Raises:
        PacsError: the node is unreachable, rejects the association, or refuses an instance.
    """
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    if not datasets:
        return 0
    ae = AE(ae_title=_aet(calling_aet, "calling AE title"))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    wanted: dict[str, set[str]] = {}
    for ds in datasets:
        wanted.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    for sop_class, syntaxes in wanted.items():
        # the files' own syntaxes first (the acceptor takes the first it supports): sent as written, no conversion
        ae.add_requested_context(sop_class, [*sorted(syntaxes), *(s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
                                                                  if s not in syntaxes)])
    kwargs = {"tls_args": (ssl_context, destination.host)} if ssl_context is not None else {}
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             evt_handlers=tcp_handlers(), **kwargs)
    except OSError as err:  # TLS handshake failures are OSErrors (ssl.SSLError)
        raise PacsError(f"DICOM node {destination} is unreachable ({err})") from None
    if not assoc.is_established:
        if ssl_context is not None and not assoc.is_rejected:
            why = tls_failure(destination.host, destination.port, ssl_context, timeout, None)
            if why:
                raise PacsError(f"DICOM node {destination}: {why}; nothing was sent over plaintext")
        why = "rejected the association (check our AE title is known there)" if assoc.is_rejected else \
            "is unreachable or aborted the association (check host, port and that it runs)"
        raise PacsError(f"DICOM node {destination} {why}")
    sent = 0
    try:
        for f, ds in zip(files, datasets):
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):  # success or warning
                raise PacsError(f"DICOM node {destination} refused {f} (C-STORE status 0x{code & 0xFFFF:04X})"
                                if code >= 0 else f"DICOM node {destination} did not answer the C-STORE of {f}")
            sent += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return sent
