"""``resunet app``: start the web UI (Streamlit) on this machine.

Binds to 127.0.0.1 by default, so only this machine can open the page; pass ``--address 0.0.0.0``
to serve a network, and then configure a login (see ``docs/webui.md``): without one, a non-loopback
address is refused unless ``--allow-anonymous`` says it is deliberate (then a warning is printed and
logged at every start). ``--add-user NAME`` adds a named user to the secrets file. Settings reach the page as
``RESUNET_APP_*`` environment variables (``resunet/webui/config.py``) because Streamlit runs the page in
its own process. The page and its Streamlit settings (``resunet/webui/streamlit_config.toml``, passed on
Streamlit's command line) ship inside the package; Streamlit runs in the current working directory, so
its ``.streamlit/secrets.toml`` there (and ``~/.streamlit/secrets.toml``) hold the logins.
"""

from __future__ import annotations

import argparse
import getpass
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from resunet.errors import ConfigError
from resunet.io.limits import ENV_MAX_MEMORY_GB, add_limit_argument, limits_from_args
from resunet.netaddr import is_loopback_address


def app_script() -> Path:
    """The page's entry point, ``resunet/webui/streamlit_app.py`` inside the installed package."""
    import resunet.webui  # light: the package's __init__ imports nothing

    return Path(resunet.webui.__file__).resolve().parent / "streamlit_app.py"


def streamlit_options() -> dict[str, str]:
    """The page's Streamlit settings (``resunet/webui/streamlit_config.toml``) as ``{"section.key": value}``,
    passed as ``--section.key value`` to ``streamlit run`` so that they apply wherever ``resunet app`` is
    started (Streamlit reads a config file only from the working directory and ``~/.streamlit``)."""
    text = (app_script().parent / "streamlit_config.toml").read_text(encoding="utf-8")
    return {f"{section}.{key}": str(value).lower() if isinstance(value, bool) else str(value)
            for section, values in tomllib.loads(text).items() for key, value in values.items()}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "app",
        help="start the web UI (Streamlit) on http://127.0.0.1:8501",
        description="Start the web UI. Binds to 127.0.0.1 unless --address says otherwise.",
    )
    p.add_argument("--port", type=int, default=8501, help="TCP port (default 8501)")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 serves the network)")
    p.add_argument("--model-dir", type=Path, help="folder of *.pt checkpoints for the model picker (default: the bundled models)")
    p.add_argument("--default-model", help="file name in --model-dir selected at start (default brain_extraction.pt)")
    p.add_argument("--max-upload-mb", type=int, help="largest accepted upload in MB (default 1024)")
    p.add_argument("--session-ttl-min", type=float,
                   help="delete a session's uploads and results after this many idle minutes (default 60)")
    p.add_argument("--session-close-s", type=float,
                   help="delete a session's uploads and results this many seconds after its browser tab closed"
                   " (default 120)")
    p.add_argument("--temp-dir", type=Path, help="parent folder of the per-session temp folders")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="inference device (default auto)")
    p.add_argument("--pacs", dest="pacs_url", metavar="URL",
                   help="the archive for the page's Browse PACS list: a DICOMweb root (credentials: docs/pacs.md)"
                   " or dimse://AET@HOST:PORT (C-FIND, C-GET/C-MOVE, C-STORE)")
    p.add_argument("--service", dest="service_url", metavar="URL",
                   help="base URL of a `resunet serve --require-review` whose held jobs the page lists under"
                   " To review (its token: RESUNET_SERVICE_TOKEN or [resunet] service_token in the secrets file;"
                   " docs/webui.md)")
    p.add_argument("--pacs-ae-title", metavar="AET",
                   help="our AE title towards a dimse:// archive, which must know it (default RESUNET)")
    p.add_argument("--pacs-move-port", type=int, metavar="PORT",
                   help="dimse:// archive: retrieve with C-MOVE to our AE title on this port, which the archive"
                   " has as our address (default: C-GET)")
    p.add_argument("--config", type=Path, help="YAML file with any of the settings above")
    p.add_argument("--headless", action="store_true", help="do not open a browser window")
    p.add_argument("--hash-password", action="store_true",
                   help="print a password hash for .streamlit/secrets.toml ([resunet] password_hash) and exit")
    p.add_argument("--add-user", metavar="NAME",
                   help="add (or change the password of) user NAME in the secrets file and exit; the password is"
                   " asked twice on a terminal, else read from the first line of stdin")
    p.add_argument("--secrets", type=Path, default=None, metavar="FILE",
                   help="secrets file --add-user writes (default .streamlit/secrets.toml in the current folder)")
    p.add_argument("--allow-anonymous", action="store_true",
                   help="serve a non-loopback --address without any login configured (anyone who reaches the"
                   " port can upload scans and run models); refused otherwise")
    add_limit_argument(p)
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> dict[str, str]:
    env: dict[str, str] = {}
    mapping = {
        "model_dir": args.model_dir,
        "default_model": args.default_model,
        "max_upload_mb": args.max_upload_mb,
        "session_ttl_min": args.session_ttl_min,
        "session_close_s": args.session_close_s,
        "temp_dir": args.temp_dir,
        "device": args.device,
        "pacs_url": getattr(args, "pacs_url", None),
        "service_url": getattr(args, "service_url", None),
        "pacs_ae_title": getattr(args, "pacs_ae_title", None),
        "pacs_move_port": getattr(args, "pacs_move_port", None),
    }
    for name, value in mapping.items():
        if value is not None:
            env[f"RESUNET_APP_{name.upper()}"] = str(Path(value).resolve()) if isinstance(value, Path) else str(value)
    if getattr(args, "allow_anonymous", False):
        env["RESUNET_APP_ALLOW_ANONYMOUS"] = "1"  # the page's own check (webui.auth.anonymous_exposure) agrees
    if getattr(args, "max_memory_gb", None) is not None:
        env[ENV_MAX_MEMORY_GB] = repr(limits_from_args(args).max_memory_gb)
    if args.config is not None:
        if not args.config.is_file():
            raise ConfigError(f"--config {args.config}: no such file")
        env["RESUNET_APP_CONFIG"] = str(args.config.resolve())
    return env


def command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The ``streamlit run`` command line and the extra environment variables for the page."""
    script = app_script()
    if not script.is_file():
        raise ConfigError(f"the web UI is not part of this installation ({script} is missing)")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be 1..65535, got {args.port}")
    if args.max_upload_mb is not None and args.max_upload_mb < 1:
        raise ConfigError(f"--max-upload-mb must be at least 1, got {args.max_upload_mb}")
    max_mb = args.max_upload_mb
    if max_mb is None and args.config is not None and args.config.is_file():
        import yaml

        max_mb = (yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}).get("max_upload_mb")
    options = {
        **streamlit_options(),
        "server.port": str(args.port),
        "server.address": args.address,
        "server.maxUploadSize": str(int(max_mb or 1024)),
        "browser.gatherUsageStats": "false",
        # Streamlit 1.67's "install agent skills" toast (shown to loopback browsers, its button acts on the
        # server) and console advert: the one option that removes both (streamlit/web/skills.py); also in
        # streamlit_config.toml, kept here so that no edit of that file brings the advert back
        "logger.hideWelcomeMessage": "true",
        "server.headless": "true" if args.headless else "false",
    }
    cmd = [sys.executable, "-m", "streamlit", "run", str(script)]
    for key, value in options.items():
        cmd += [f"--{key}", value]
    return cmd, _settings(args)


def secrets_files() -> list[Path]:
    """The secrets files Streamlit reads for the page, lowest priority first (its ``secrets.files`` default:
    the user's ``~/.streamlit/secrets.toml``, then the working directory's: ``resunet app`` runs Streamlit
    where it was started)."""
    return [Path.home() / ".streamlit" / "secrets.toml", Path.cwd() / ".streamlit" / "secrets.toml"]


def configured_login() -> str:
    """``"oidc"``, ``"password"`` or ``"none"``: the login the page will ask for, from the secrets files."""
    from resunet.webui.auth import login_mode

    merged: dict = {}
    for f in secrets_files():
        if f.is_file():
            try:
                merged.update(tomllib.loads(f.read_text(encoding="utf-8")))
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"{f}: not valid TOML ({err}); Streamlit could not read it either") from None
    return login_mode(merged)


def check_exposure(args: argparse.Namespace) -> str | None:
    """Refuse a non-loopback ``--address`` without a login unless ``--allow-anonymous``; returns a warning
    line to print when anonymous access is allowed deliberately, else None."""
    if is_loopback_address(args.address):
        return None
    mode = configured_login()
    if mode != "none":
        return None
    if not args.allow_anonymous:
        raise ConfigError(
            f"--address {args.address} serves other machines but no login is configured; add a user with"
            " `resunet app --add-user NAME` (or an [auth] OIDC section in .streamlit/secrets.toml), or pass"
            " --allow-anonymous if anyone who can reach the port may use it"
        )
    return (f"WARNING: serving {args.address}:{args.port} to the network WITHOUT A LOGIN (--allow-anonymous):"
            " anyone who can reach this port can upload scans and run the models")


def _read_new_password(name: str) -> str:
    if sys.stdin is not None and sys.stdin.isatty():
        pw = getpass.getpass(f"Password for {name}: ")
        if pw != getpass.getpass("Again: "):
            raise ConfigError("the two passwords differ")
        return pw
    line = sys.stdin.readline() if sys.stdin is not None else ""
    return line.rstrip("\r\n")


def run(args: argparse.Namespace) -> int:
    if args.add_user:
        from resunet.webui.auth import add_user

        target = args.secrets or secrets_files()[-1]
        path = add_user(target, args.add_user, _read_new_password(args.add_user))
        print(f"resunet app: user {args.add_user} saved in {path} (restart the app to use it)", file=sys.stderr)
        return 0
    if args.hash_password:
        from resunet.webui.auth import hash_password

        pw = getpass.getpass("Password: ")
        if pw != getpass.getpass("Again: "):
            raise ConfigError("the two passwords differ")
        print("[resunet]")
        print(f'password_hash = "{hash_password(pw)}"')
        return 0
    cmd, extra = command(args)
    warning = check_exposure(args)
    if warning:
        import logging

        logging.getLogger("resunet.app").warning("%s", warning)
        print(f"resunet app: {warning}", file=sys.stderr)
    # Streamlit asks for an e-mail address on its first run on a machine (no ~/.streamlit/credentials.toml)
    # unless headless, and waits at that prompt: switch it off (an environment variable, so Streamlit
    # versions without the option ignore it instead of refusing a command-line flag).
    env = {**os.environ, "STREAMLIT_SERVER_SHOW_EMAIL_PROMPT": "false", **extra}
    print(f"resunet app: serving on http://{args.address}:{args.port} (Ctrl+C to stop)", file=sys.stderr)
    sys.stderr.flush()
    if os.name == "posix":
        # replace this process, so signals (Ctrl+C, docker stop) reach Streamlit directly
        os.execve(cmd[0], cmd, env)
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130
