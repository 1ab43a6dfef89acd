"""Host names as configured and as requested: `host`, `host:port`, `[v6]`, `[v6]:port`
(a Host header, an allowlist entry), and the origins CORS names."""

from __future__ import annotations

import re

_AUTHORITY = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<name>[^:\[\]]*))(?::(?P<port>[0-9]*))?")


ORIGIN = re.compile(r"https?://[^/?#\s]+")


def split_authority(text: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` (a Host header, an allowlist entry) as
    (host lower-cased, without brackets or a trailing dot; port or None). ValueError when
    it is none of these or the port is not 1 to 65535."""
    match = _AUTHORITY.fullmatch(text)
    if match is None:
        raise ValueError(f"'{text}' is not a host or host:port")
    host = match["v6"] if match["v6"] is not None else match["name"]
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 0 < port <= 65535:
        raise ValueError(f"'{text}': the port must be 1 to 65535")
    return host.rstrip(".").lower(), port


def check_authorities(entries: list[str]) -> list[str]:
    """Entries of a host allowlist (see split_authority), each naming a host."""
    for entry in entries:
        if not split_authority(entry)[0]:
            raise ValueError(f"'{entry}' names no host")
    return entries
