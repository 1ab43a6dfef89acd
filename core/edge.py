"""The HTTP edge: slow and idle clients, the connection cap, malformed requests.

aiohttp bounds idle keep-alive (`keepalive_timeout`, armed from the connection's start too)
but has no time limit on the request line and headers, no cap on open connections, and
logs a malformed request's raw line, headers included, with a traceback. Its request
handler (the per-connection protocol) cannot be chosen by a keyword argument, so
`EdgeRunner` builds an `EdgeServer` whose connections are `EdgeRequestHandler`s:

- headers must be complete `header_timeout` seconds after the connection opened or, on a
  kept-alive connection, after the next request's first byte; else the socket is closed;
- at most `max_connections` are open: one more closes the oldest idle connection (waiting
  for a request, or for the rest of its headers), or is answered 503 when none is idle;
- a malformed request is answered with a JSON 400 and logged as one line that names the
  problem, never the bytes sent, at most once a second.

Nothing here touches a request being handled: a response streams for as long as it takes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from core.web import ApiError, chatbus_error

try:
    import resource
except ImportError:  # Windows: no file-descriptor limit to derive a cap from
    resource = None  # type: ignore[assignment]

log = structlog.get_logger("chatbus.edge")
REQUEST_TIMEOUT = 408
CLIENT_ERRORS = (HttpProcessingError, web.RequestPayloadError)
# File descriptors kept for what is not a client: the store, log files, the listener,
# webhook deliveries.
FD_RESERVE = 64
REFUSED_BODY = orjson.dumps(
    {"error": {"type": "too_many_connections", "message": "too many open connections"}}
)
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
    % (len(REFUSED_BODY), REFUSED_BODY)
)


class RateLimitedLog:
    """One warning line per `interval` seconds at most; each says how many were suppressed
    since the last, so a flood of bad clients cannot flood the log."""

    def __init__(self, event: str, interval: float = 1.0) -> None:
        self.event, self.interval = event, interval
        self._next_at = 0.0
        self._suppressed = 0

    def __call__(self, **fields: Any) -> None:
        now = time.monotonic()
        if now < self._next_at:
            self._suppressed += 1
            return
        self._next_at = now + self.interval
        log.warning(self.event, suppressed=self._suppressed, **fields)
        self._suppressed = 0


def default_max_connections() -> int | None:
    """Half of what the file-descriptor limit leaves after the reserve: a busy connection
    may hold an upstream socket as well. None when the limit is unknown or unlimited."""
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(1, (soft - FD_RESERVE) // 2)


class ConnectionGuard:
    """One server's connections: counts the open ones, knows the idle ones (oldest first),
    and says, rate-limited, what it did to them."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._open: set[EdgeRequestHandler] = set()
        self._idle: dict[EdgeRequestHandler, None] = {}  # insertion order: idle the longest first
        self._warn_full = RateLimitedLog("connection limit reached")
        self.log_malformed = RateLimitedLog("malformed request")
        self.log_headers_late = RateLimitedLog("closed a connection: no complete headers in time")

    def admit(self, handler: EdgeRequestHandler) -> bool:
        """Count a new connection; past the limit, close the oldest idle one to make room,
        or refuse this one (False) when every other is busy."""
        self._open.add(handler)
        self.idle(handler)
        if self.limit is None or len(self._open) <= self.limit:
            return True
        oldest = next(iter(self._idle))
        self.closed(oldest)
        if oldest is handler:
            self._warn_full(limit=self.limit, action="refused the new connection")
            return False
        self._warn_full(limit=self.limit, action="closed the oldest idle connection")
        oldest.force_close()
        return True

    def idle(self, handler: EdgeRequestHandler) -> None:
        self._idle.pop(handler, None)
        self._idle[handler] = None

    def busy(self, handler: EdgeRequestHandler) -> None:
        self._idle.pop(handler, None)

    def closed(self, handler: EdgeRequestHandler) -> None:
        self._open.discard(handler)
        self._idle.pop(handler, None)


class EdgeRequestHandler(web.RequestHandler):
    """aiohttp's connection protocol, with a header deadline, the guard and quiet errors.

    A connection is idle when every request whose headers arrived has been answered;
    only then can the header deadline run or the guard close it."""

    def __init__(
        self, manager: EdgeServer, *, header_timeout: float, guard: ConnectionGuard, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._guard = guard
        self._header_deadline: asyncio.TimerHandle | None = None
        self._answered = 0  # compared with aiohttp's count of requests parsed
        self._partial = False  # some of the next request has arrived

    @property
    def _is_idle(self) -> bool:
        return self._answered == self._request_count

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._guard.admit(self):
            self._start_header_deadline()
        else:
            self._refuse()

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:  # headers complete (or malformed: answered 400)
            self._partial = False
            self._stop_header_deadline()
            self._guard.busy(self)
        elif data and self._is_idle:
            self._partial = True
            if self._header_deadline is None:
                self._start_header_deadline()  # the first bytes of the next request

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._answered += 1
            if getattr(resp, "status", None) == REQUEST_TIMEOUT:  # None: aiohttp answers 500
                # Close at once (RFC 9110 15.5.9): aiohttp would linger, reading what is
                # left of the body that did not arrive in time, for 10 s more.
                self.force_close()
            elif self._is_idle:
                self._guard.idle(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_header_deadline()
        self._guard.closed(self)
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse: one log line naming the problem (its message
        quotes the raw bytes, an API key among them), and a JSON answer that quotes nothing."""
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        problem = type(exc).__name__
        self._guard.log_malformed(problem=problem, status=status, remote=request.remote)
        response = chatbus_error(
            ApiError(status, "bad_request", f"malformed HTTP request ({problem})")
        )
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """A body that cannot be decoded, found while aiohttp discards what a route left
        unread, is the client's doing: a malformed request, not a traceback."""
        if isinstance(kw.get("exc_info"), CLIENT_ERRORS):
            self._guard.log_malformed(problem=type(kw["exc_info"]).__name__, status=400)
            return
        super().log_exception(*args, **kw)

    def _start_header_deadline(self) -> None:
        self._header_deadline = self._loop.call_later(self._header_timeout, self._headers_late)

    def _stop_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self._is_idle:
            if self._partial:  # a socket opened and never used (a browser's preconnect) is no news
                self._guard.log_headers_late(timeout_seconds=self._header_timeout)
            self.force_close()

    def _refuse(self) -> None:
        if self.transport is not None:
            self.transport.write(REFUSED)
        self.force_close()


class EdgeServer(web.Server):
    """aiohttp's server, making `EdgeRequestHandler` connections."""

    def __init__(self, *args: Any, header_timeout: float, guard: ConnectionGuard, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._guard = guard

    def __call__(self) -> EdgeRequestHandler:
        return EdgeRequestHandler(
            self,
            loop=self._loop,
            header_timeout=self._header_timeout,
            guard=self._guard,
            **self._kwargs,
        )


class EdgeRunner(web.AppRunner):
    """`web.AppRunner` serving through an `EdgeServer`."""

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout: float,
        max_connections: int | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        # The app's own server carries its handler and every protocol option (from the
        # runner and the app's handler_args): rebuilt as an EdgeServer with the same ones.
        server = await super()._make_server()
        return EdgeServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            header_timeout=self._header_timeout,
            guard=ConnectionGuard(self._max_connections),
            **server._kwargs,
        )
