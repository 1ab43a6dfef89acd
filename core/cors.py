"""CORS for the origins `[server] cors_origins` names (none by default: a browser page on
another origin then reads nothing). A preflight from an allowed origin is answered here,
before the API-key check (browsers send no key with it); every response to an allowed
origin, streamed ones too, carries its `Access-Control-*` headers. Credentials (cookies,
which chatbus does not use) are allowed only to origins named one by one, never with `*`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import hdrs, web

from core.config import Config
from core.web import ApiError

ANY_ORIGIN = "*"
METHODS = "GET, POST, DELETE, OPTIONS"
MAX_AGE = "600"  # seconds a browser may keep a preflight's answer
EXPOSED = "X-Request-Id"


class Cors:
    def __init__(self, config: Config) -> None:
        origins = [origin.rstrip("/") for origin in config.server.cors_origins]
        self._any = ANY_ORIGIN in origins
        self._origins = frozenset(origins) - {ANY_ORIGIN}

    def allowed(self, origin: str) -> bool:
        return self._any or origin in self._origins

    @web.middleware
    async def preflight(self, request: web.Request, handler: Any) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        asked = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_METHOD)
        if request.method != hdrs.METH_OPTIONS or origin is None or asked is None:
            return await handler(request)
        if not self.allowed(origin):
            raise ApiError(
                403,
                "cors_origin_not_allowed",
                f"origin {origin[:200]} is not in [server] cors_origins",
            )
        response = web.Response(status=204)
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = METHODS
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = request.headers.get(
            hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "Authorization, Content-Type"
        )
        response.headers[hdrs.ACCESS_CONTROL_MAX_AGE] = MAX_AGE
        return response

    async def add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """`on_response_prepare`: the headers every answer to an allowed origin carries."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or not self.allowed(origin):
            return
        named = origin in self._origins
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin if named else ANY_ORIGIN
        if named:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
        response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED
        response.headers.add(hdrs.VARY, hdrs.ORIGIN)
