"""Which URLs an async chat may be called back on: http(s), no credentials, a host and port
of `[plugins.webhooks] callback_hosts` (a chat must not make chatbus call anything else:
server-side request forgery)."""

from __future__ import annotations

from urllib.parse import urlsplit

from core.hosts import split_authority

DEFAULT_PORTS = {"http": 80, "https": 443}
REQUIRED = "an http(s) URL on an allowed host and port is required"


def callback_problem(url: str, hosts: list[str]) -> str | None:
    """What keeps `url` from being called back, given the allowed hosts; None if nothing."""
    problem = _problem(url, {split_authority(entry) for entry in hosts})
    if problem is None:
        return None
    allowed = ", ".join(hosts) or "none: set [plugins.webhooks] callback_hosts"
    return f"{problem}; {REQUIRED} (allowed: {allowed})"


def _problem(url: str, allowed: set[tuple[str, int | None]]) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a valid URL"
    default_port = DEFAULT_PORTS.get(parts.scheme)
    if default_port is None or not parts.hostname:
        return "not an http(s) URL"
    if parts.username is not None or parts.password is not None:
        return "credentials (user:pass@) are not allowed in it"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return "its port is not valid"
    host = parts.hostname.rstrip(".")
    port = port or default_port
    if (host, port) in allowed or (port == default_port and (host, None) in allowed):
        return None
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port} is not allowed"
