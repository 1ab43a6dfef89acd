"""Guards every request passes before a route runs: the Host it names, and its body.

A chatbus without API keys on loopback is still reachable from a browser: a page can POST
to it (a form or a `text/plain` fetch needs no CORS preflight), and DNS rebinding lets a
page on `attacker.example` read its answers. So without keys only loopback Host headers
(or `[server] allowed_hosts`) are served, and a body must be JSON, which a browser sends
cross-origin only after a preflight chatbus never grants. The body is read here, within
`[server] body_timeout_seconds`; routes find it read (`request.read()` returns it again).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import hdrs, web

from core.auth import is_loopback
from core.config import Config
from core.hosts import split_authority
from core.web import BODY_METHODS, ApiError

ANY_HOST = "*"


def host_guard(config: Config) -> Any:
    """Without [auth] keys, answer only requests naming a loopback or an allowed host."""
    check = not config.auth.keys
    allowed = {split_authority(entry)[0] for entry in config.server.allowed_hosts}

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        host = request.headers.get(hdrs.HOST)
        # No Host at all is an HTTP/1.0 tool, never a browser.
        if check and host is not None and not _served(host, allowed):
            raise ApiError(
                421,
                "misdirected_request",
                "this chatbus has no [auth] keys, so it answers only requests to loopback hosts"
                " (localhost, 127.0.0.1, [::1]); add the name clients use to"
                " [server] allowed_hosts",
            )
        return await handler(request)

    return guard


def body_guard(config: Config) -> Any:
    """A body must be JSON (a POST with none and no Content-Type is fine: chatchat's webui
    sends those), and must arrive within the body timeout."""
    timeout = config.server.body_timeout_seconds

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method in BODY_METHODS:
            _require_json(request)
            await _read_body(request, timeout)
        return await handler(request)

    return guard


def _served(host: str, allowed: set[str]) -> bool:
    try:
        name, _ = split_authority(host)
    except ValueError:
        return False
    return is_loopback(name) or name in allowed or ANY_HOST in allowed


def _require_json(request: web.Request) -> None:
    if hdrs.CONTENT_TYPE not in request.headers and not request.body_exists:
        return
    if request.content_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            "the body must be JSON, sent with Content-Type: application/json",
        )


async def _read_body(request: web.Request, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await request.read()
    except TimeoutError:
        raise ApiError(
            408, "request_timeout", f"the request body did not arrive within {seconds:g} s"
        ) from None
    except web.RequestPayloadError:
        raise ApiError(
            400,
            "invalid_body",
            "the request body could not be read: its Content-Encoding or chunked framing"
            " is not valid",
        ) from None
