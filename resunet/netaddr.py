"""Is a listen address loopback-only? The one rule that `resunet serve` and `resunet app` share.

A service bound to a loopback address can only be reached from the same machine, so it may run
without authentication; anything else (a LAN address, ``0.0.0.0``, ``::``, a host name) can be
reached by others and needs tokens or named users.
"""

from __future__ import annotations

import ipaddress

#: Host names that always mean this machine only (RFC 6761 reserves ``localhost``).
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def is_loopback_address(host: str) -> bool:
    """True when ``host`` (an IP literal or host name, as given to ``--host``) is loopback only.

    ``127.0.0.0/8``, ``::1``, ``::ffff:127.x.x.x`` and the names in :data:`LOOPBACK_NAMES` are
    loopback. ``0.0.0.0``/``::`` (every interface), the empty string, LAN addresses and any other
    host name are not: a name is never resolved here, because what it resolves to can change after
    the check, so an unknown name counts as reachable from outside.
    """
    text = (host or "").strip().lower()
    if text.startswith("[") and text.endswith("]"):  # "[::1]" as written in URLs
        text = text[1:-1]
    if text.endswith("."):
        text = text[:-1]
    if text in LOOPBACK_NAMES:
        return True
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id ("::1%lo")
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback
