"""The error raised for a bad network argument or config."""

from __future__ import annotations

from resunet.errors import ConfigError


class NetConfigError(ConfigError, ValueError):
    """A network argument or config value is wrong.

    A :class:`resunet.errors.ConfigError` (so the CLI prints one line and exits with code 2) and a
    ``ValueError`` (what Python code constructing a network with a bad argument expects).
    """
