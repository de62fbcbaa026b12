"""``resunet serve``: the REST inference service (FastAPI + uvicorn), model loaded once and kept warm.

Binds to 127.0.0.1 by default. On any other address every request needs a bearer token
(``resunet serve --add-token NAME``); with no token stored the service refuses to start there unless
``--allow-anonymous``. See docs/serve.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from resunet.cli.predict_cmd import add_tls_arguments
from resunet.errors import ConfigError

log = logging.getLogger("resunet.serve")


def register(subparsers: argparse._SubParsersAction) -> None:
    from resunet.serve.config import DEFAULT_STATE_DIR, STATE_ENV, ServeConfig

    d = ServeConfig.__dataclass_fields__
    p = subparsers.add_parser(
        "serve",
        help="run the REST inference service (submit studies over HTTP, poll, fetch masks)",
        description="Start the HTTP inference service with the model loaded once. Jobs persist in "
        "STATE/jobs.sqlite (or, with --queue, in PostgreSQL shared by several nodes) and survive a restart; "
        "--workers N runs N worker processes. Token commands (--add-token, --remove-token, --list-tokens) "
        "change STATE/tokens.json and exit. API and reverse-proxy set-up: docs/serve.md.",
    )
    p.add_argument("--host", default=d["host"].default,
                   help="address to listen on (default 127.0.0.1: this machine only; anything else needs tokens)")
    p.add_argument("--port", type=int, default=d["port"].default, help="TCP port (default 8000)")
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                   help=f"job database, tokens, uploads and results (default ${STATE_ENV} or {DEFAULT_STATE_DIR})")
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="checkpoint (.pt) or export (.onnx, TorchScript); default: the bundled model")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--tta", dest="tta", action=argparse.BooleanOptionalAction, default=True,
                   help="mirror test-time augmentation, as resunet predict (default on)")
    p.add_argument("--overlap", type=float, default=d["overlap"].default, help="sliding-window overlap (default 0.5)")
    p.add_argument("--sw-batch", type=int, default=d["sw_batch"].default, metavar="N", help="windows per network call (default 2)")
    p.add_argument("--format", default="nifti,seg", metavar="LIST",
                   help="outputs of a job that names none (default nifti,seg; as resunet predict --format)")
    p.add_argument("--max-upload-mb", type=float, default=d["max_upload_mb"].default, metavar="MB",
                   help="largest upload accepted, MB (default 2000); larger gets HTTP 413")
    p.add_argument("--retention-hours", type=float, default=d["retention_hours"].default, metavar="H",
                   help="delete uploads and results this many hours after a job finishes (default 72)")
    p.add_argument("--sweep-interval", type=float, default=d["sweep_interval_s"].default, metavar="S",
                   help="seconds between retention sweeps (default 60)")
    p.add_argument("--require-token", action="store_true", help="ask for a bearer token on loopback too")
    p.add_argument("--allow-anonymous", action="store_true",
                   help="serve a non-loopback address without tokens (anyone who reaches it can submit; not for hospitals)")
    p.add_argument("--root-path", default="", metavar="PREFIX",
                   help="URL prefix the reverse proxy serves this under (e.g. /resunet)")
    p.add_argument("--forwarded-allow-ips", default=d["forwarded_allow_ips"].default, metavar="IPS",
                   help="proxies whose X-Forwarded-For/-Proto headers are trusted (comma list; default 127.0.0.1)")
    p.add_argument("--max-memory-gb", type=float, default=None, metavar="GB",
                   help="memory budget for segmenting, for the whole node: studies whose estimate is above it are "
                   "refused on upload from their headers, and with --workers N a worker starts a case only when "
                   "the cases the other workers run leave room for its estimate (default $RESUNET_MAX_MEMORY_GB "
                   "or the library default)")
    p.add_argument("--min-free-gb", type=float, default=d["min_free_gb"].default, metavar="GB",
                   help="free space the state folder's disk must keep: below it uploads get 507 and jobs wait; jobs "
                   "failed for a full disk are retried once it is back (default 1; 0 = no floor)")
    p.add_argument("--keep-upload-names", action="store_true",
                   help="keep the client's upload file names in the job database, the job JSON and the output names "
                   "(default: the job id names them; upload names often carry the patient's name and MRN)")
    p.add_argument("--min-slices", type=int, default=d["min_slices"].default, metavar="N",
                   help="refuse DICOM series with fewer slices, e.g. localisers (default 3)")
    p.add_argument("--allow-split-series", action="store_true",
                   help="segment the largest stack of a series whose images disagree in size or orientation "
                   "(default: refuse it, naming the counts)")
    p.add_argument("--audit-db", default=None, metavar="FILE",
                   help="audit log (default $RESUNET_AUDIT_DB or ~/.resunet/audit.sqlite)")
    p.add_argument("--no-audit", action="store_true", help="do not record jobs in the audit log")
    pacs = p.add_argument_group("PACS (docs/pacs.md)")
    pacs.add_argument("--pacs", dest="pacs_url", default="", metavar="URL",
                      help="the PACS of POST /v1/pacs/jobs: a DICOMweb root (credentials from $RESUNET_PACS_USER/"
                      "$RESUNET_PACS_PASSWORD or $RESUNET_PACS_TOKEN), or dimse://AET@HOST:PORT (C-FIND + C-GET "
                      "as --ae-title, results stored back with C-STORE); dimses:// speaks DIMSE over TLS with --tls-*")
    add_tls_arguments(pacs)
    pacs.add_argument("--dicom-port", type=int, default=0, metavar="PORT",
                      help="also listen as a DICOM node (C-STORE SCP) on this port; complete series become jobs")
    pacs.add_argument("--dicom-host", default=d["dicom_host"].default, metavar="HOST",
                      help="address of the DICOM node (default 127.0.0.1; DIMSE has no authentication)")
    pacs.add_argument("--ae-title", default=d["ae_title"].default, help="AE title of the DICOM node (default RESUNET)")
    pacs.add_argument("--store-to", default="", metavar="HOST:PORT:AET",
                      help="send each SEG/RTSTRUCT of a received series there with C-STORE")
    pacs.add_argument("--dicom-tls", action="store_true",
                      help="the DICOM node speaks DICOM over TLS only, with --tls-cert/--tls-key (required) and, with "
                      "--tls-ca, only senders whose certificate that CA signed; --store-to then gets the results over "
                      "TLS too (its certificate checked against --tls-ca)")
    pacs.add_argument("--settle-seconds", type=float, default=d["settle_seconds"].default, metavar="S",
                      help="a received series is complete after S seconds without a new instance (default 5)")
    pacs.add_argument("--routes", type=Path, default=None, metavar="FILE",
                      help="routing rules (YAML, docs/pacs.md): the DICOM node segments each received series with "
                      "the model of the first rule it matches; series no rule matches are left alone")
    pacs.add_argument("--require-review", action="store_true",
                      help="hold the SEG/RTSTRUCT of PACS jobs (pull and DICOM node) until a person approves them with "
                      "POST /v1/jobs/{id}/review (optionally with a corrected mask); nothing is sent before "
                      "(docs/serve.md, 'The review loop')")
    pacs.add_argument("--allow-aet", action="append", default=[], metavar="AET",
                      help="AE title allowed to send to the node (repeat; default: any)")
    scale = p.add_argument_group("several workers and nodes (docs/deploy.md)")
    scale.add_argument("--workers", type=int, default=d["workers"].default, metavar="N",
                       help="worker processes, each with its own warm model, taking jobs from the queue; a worker that "
                       "dies is restarted and its job re-queued (default 1: jobs run in a thread of the service)")
    scale.add_argument("--devices", default="", metavar="LIST",
                       help="devices of the workers, e.g. cuda:0,cuda:1 (worker K on device K modulo the list; without "
                       "--workers one worker per device)")
    scale.add_argument("--worker-threads", type=int, default=d["worker_threads"].default, metavar="T",
                       help="torch threads of each worker (processes, or the one in-process worker of --workers 1; default 0: "
                       "torch's default, every core)")
    scale.add_argument("--queue", dest="queue_url", default="", metavar="URL",
                       help="postgresql://USER@HOST[:PORT]/DB: keep jobs, tokens and the audit log in PostgreSQL, shared "
                       "by every node on the same shared --state-dir (default: STATE/jobs.sqlite, one node). No password "
                       "in the URL: $PGPASSWORD, $PGPASSFILE or --queue-password-file")
    scale.add_argument("--queue-password-file", type=Path, default=None, metavar="FILE",
                       help="file holding only the database password (e.g. a mounted secret)")
    scale.add_argument("--lease", dest="lease_s", type=float, default=d["lease_s"].default, metavar="S",
                       help="PostgreSQL queue: a running job whose node stops renewing its lease for S seconds is taken "
                       "over by another node (default 60)")
    scale.add_argument("--node-name", default="", metavar="NAME",
                       help="this node's name in a shared queue (default HOST-PORT); unique per node")
    p.add_argument("--add-token", metavar="NAME", help="make a token for NAME, print it once, store its hash, and exit")
    p.add_argument("--scope", choices=("submit", "admin"), default="submit",
                   help="with --add-token: submit (sees its own and its group's jobs; default) or admin (every job)")
    p.add_argument("--group", default="", metavar="GROUP",
                   help="with --add-token: department or group whose submit tokens see each other's jobs")
    p.add_argument("--remove-token", metavar="NAME", help="delete the token NAME and exit")
    p.add_argument("--list-tokens", action="store_true", help="print the names of the stored tokens and exit")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> "ServeConfig":  # noqa: F821
    from resunet.serve.config import ServeConfig

    kwargs = dict(
        host=args.host, port=args.port, model=Path(args.model) if args.model else None, device=args.device,
        tta=args.tta, overlap=args.overlap, sw_batch=args.sw_batch,
        formats=tuple(f.strip().lower() for f in args.format.split(",") if f.strip()),
        max_upload_mb=args.max_upload_mb, retention_hours=args.retention_hours, sweep_interval_s=args.sweep_interval,
        require_token=args.require_token, allow_anonymous=args.allow_anonymous, root_path=args.root_path,
        forwarded_allow_ips=args.forwarded_allow_ips,
        pacs_url=getattr(args, "pacs_url", ""), dicom_port=getattr(args, "dicom_port", 0),
        dicom_host=getattr(args, "dicom_host", "127.0.0.1"), ae_title=getattr(args, "ae_title", "RESUNET"),
        min_slices=args.min_slices, allow_split_series=args.allow_split_series, max_memory_gb=args.max_memory_gb,
        keep_upload_names=args.keep_upload_names, min_free_gb=args.min_free_gb,
        routes=getattr(args, "routes", None),
        store_to=getattr(args, "store_to", ""), settle_seconds=getattr(args, "settle_seconds", 5.0),
        allowed_aets=tuple(getattr(args, "allow_aet", []) or ()),
        audit_db=False if args.no_audit else (_audit_target(args.audit_db) if args.audit_db else None),
        queue_url=getattr(args, "queue_url", "") or "", queue_password_file=getattr(args, "queue_password_file", None),
        lease_s=getattr(args, "lease_s", 60.0), node_name=getattr(args, "node_name", "") or "",
        workers=getattr(args, "workers", 1),
        devices=tuple(x.strip() for x in (getattr(args, "devices", "") or "").split(",") if x.strip()),
        worker_threads=getattr(args, "worker_threads", 0),
        require_review=bool(getattr(args, "require_review", False)),
        tls_ca=getattr(args, "tls_ca", None) or "", tls_cert=getattr(args, "tls_cert", None) or "",
        tls_key=getattr(args, "tls_key", None) or "", dicom_tls=bool(getattr(args, "dicom_tls", False)),
    )
    if args.state_dir is not None:
        kwargs["state_dir"] = args.state_dir
    return ServeConfig(**kwargs)


def _audit_target(value: str) -> "Path | str":
    from resunet.pgdb import is_pg_url

    return value if is_pg_url(value) else Path(value)


def token_store(config: "ServeConfig") -> "TokenStore":  # noqa: F821
    """The tokens of this service: STATE/tokens.json, or the PostgreSQL queue's table (every node's)."""
    from resunet.serve.tokens import TOKENS_FILE, PgTokenStore, TokenStore

    if config.queue_url:
        import os

        from resunet.pgdb import PASSWORD_FILE_ENV
        from resunet.serve.queue_pg import PgJobQueue

        if config.queue_password_file:
            os.environ[PASSWORD_FILE_ENV] = str(config.queue_password_file)
        return PgTokenStore(PgJobQueue(config.queue_url, node=config.node_name, lease_s=config.lease_s))
    return TokenStore(config.state_dir / TOKENS_FILE)


def run(args: argparse.Namespace) -> int:
    from resunet.serve.jobs import segment_options

    config = config_from_args(args)
    tokens = token_store(config)
    if args.add_token:
        token = tokens.add(args.add_token, scope=args.scope, group=args.group or "")
        print(f"token for {args.add_token} (shown once; only its SHA-256 is stored in {tokens.path}):", file=sys.stderr)
        print(token)
        return 0
    if args.remove_token:
        tokens.remove(args.remove_token)
        print(f"removed token {args.remove_token} from {tokens.path}", file=sys.stderr)
        return 0
    if args.list_tokens:
        for name in tokens.names():
            print(name)
        return 0
    n_tokens = len(tokens)
    if not config.loopback:
        if n_tokens == 0 and not config.allow_anonymous:
            raise ConfigError(
                f"--host {config.host} can be reached from other machines, but {tokens.path} holds no token; add one with "
                f"`resunet serve --add-token NAME --state-dir {config.state_dir}` (or pass --allow-anonymous, not for patient data)"
            )
        if config.allow_anonymous:
            log.warning("!" * 78)
            log.warning("ANONYMOUS ACCESS: --allow-anonymous on %s: anyone who can reach this port can submit studies "
                        "and download results. Use tokens for patient data.", config.host)
            log.warning("!" * 78)
    if config.auth_required and n_tokens == 0:
        raise ConfigError(f"--require-token but {tokens.path} holds no token; add one with `resunet serve --add-token NAME`")
    segment_options({"formats": list(config.formats)}, ())  # a bad --format is a start-up error
    # The port is bound first, before FastAPI and uvicorn are imported (about a second on a loaded
    # machine): a taken port is an error at once, and probes that connect meanwhile wait in the listen
    # backlog instead of being refused. The model loads behind /healthz (Service.start); /readyz says when.
    sock = bind_listen_socket(config.host, config.port)

    import uvicorn

    from resunet.serve.app import create_app
    from resunet.serve.service import Service

    logging.getLogger("highdicom").setLevel(logging.WARNING)
    service = Service(config).open()
    app = create_app(service)
    log.info("resunet serve on http://%s:%d%s (state %s, auth %s, retention %g h, uploads up to %g MB)",
             config.host, config.port, config.root_path, config.state_dir,
             "bearer token" if config.auth_required else "none (loopback)" if config.loopback else "NONE (anonymous)",
             config.retention_hours, config.max_upload_mb)
    from resunet.pgdb import redact

    log.info("node %s, queue %s, %d worker%s%s", config.node_name,
             redact(config.queue_url) if config.queue_url else f"{config.state_dir}/jobs.sqlite",
             config.workers, "" if config.workers == 1 else " processes",
             f" on {','.join(config.devices)}" if config.devices else "")
    from resunet.serve.pacs_jobs import start_node

    node = start_node(service)  # before uvicorn: a taken DICOM port is a start-up error
    if node is not None:
        log.info("DICOM node %s on %s:%d%s%s", config.ae_title, config.dicom_host, config.dicom_port,
                 " over TLS" if config.dicom_tls else "", f", results to {config.store_to}" if config.store_to else "")
    try:
        server = uvicorn.Server(uvicorn.Config(
            app, host=config.host, port=config.port, root_path=config.root_path, proxy_headers=True,
            forwarded_allow_ips=config.forwarded_allow_ips, log_level="info", timeout_keep_alive=30))
        server.run(sockets=[sock])
    finally:
        sock.close()
        if node is not None:
            node.stop()
    return 0


def bind_listen_socket(host: str, port: int) -> "socket.socket":  # noqa: F821
    """A listening TCP socket on ``host:port``, bound as uvicorn binds one (IPv6 when ``host`` has a colon);
    ConfigError when the port is taken or the address is not this machine's."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as err:  # also socket.gaierror for a host name that does not resolve
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror or err}); stop what uses the port, or "
                          "pass another --port or --host") from None
    sock.set_inheritable(True)
    return sock
