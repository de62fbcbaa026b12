"""The ``resunet`` command: one sub-module per subcommand, each a few lines over the library.

Every sub-module defines ``register(subparsers)``, which adds its parser and sets
``func=<callable(args) -> int>``. Library errors (:class:`resunet.errors.ResunetError`) become one
line on stderr and a non-zero exit code here, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from resunet.errors import ResunetError

# Order is the order shown in ``resunet --help``.
SUBCOMMANDS = ["convert", "train", "corrections", "predict", "export", "info", "evaluate", "audit", "app", "serve"]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, just that subcommand's module is imported.

    Importing every subcommand pulls in pydicom, scipy, matplotlib and torch (seconds at start-up),
    so ``main`` registers only the subcommand being run; ``resunet --help`` still lists them all.
    """
    parser = argparse.ArgumentParser(
        prog="resunet",
        description="Residual U-Net segmentation of DICOM and NIfTI scans: convert, train, predict, "
        "evaluate, audit, and the web UI.",
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in [only] if only else SUBCOMMANDS:
        try:
            module = importlib.import_module(f"resunet.cli.{name}_cmd")
        except ModuleNotFoundError as err:
            if err.name != f"resunet.cli.{name}_cmd":
                raise
            continue  # subcommand not part of this build
        module.register(sub)
    return parser


class _VersionAction(argparse.Action):
    """``--version``, looking the version up only when asked (importlib.metadata costs 0.1-0.4 s)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        import resunet

        print(f"resunet {resunet.__version__}")  # stdout, as argparse's own version action
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _exit_cleanly_on_sigterm()
    try:
        return int(args.func(args) or 0)
    except ResunetError as err:
        print(f"resunet {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except MemoryError:
        print(f"resunet {args.command}: error: ran out of memory; lower --max-memory-gb so that such inputs are"
              " refused up front, or use a machine with more memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"resunet {args.command}: interrupted", file=sys.stderr)
        return 130


def _exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (``kill``, ``timeout``, ``docker stop``) into ``SystemExit(143)`` in the main thread, so
    ``finally`` blocks run: temporary ``.part`` files of atomic writes are removed instead of left behind."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise SystemExit(128 + signum)

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, handler)
