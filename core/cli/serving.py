"""`chatbus serve`, and why it could not start, in one line."""

from __future__ import annotations

import argparse
import errno
import sys

from core.cli.running import run
from core.config import Config

CHATCHAT_PORT = 7861  # Langchain-Chatchat's API port, chatbus's default


def serve_command(config: Config, args: argparse.Namespace) -> int:
    from core.server import serve

    server = config.server.model_copy(
        update={
            key: value
            for key, value in (("host", args.host), ("port", args.port))
            if value is not None
        }
    )
    try:
        run(serve(config.model_copy(update={"server": server})))
    except OSError as exc:  # a port in use, an address not on this host, a file not allowed
        print(f"chatbus: {start_problem(exc, server.host, server.port)}", file=sys.stderr)
        return 2
    return 0


def start_problem(exc: OSError, host: str, port: int) -> str:
    """Why `chatbus serve` could not start, in one line, with what to change."""
    if exc.filename is not None:  # a file or folder, not the socket
        return f"cannot start: {exc.strerror or exc}: {exc.filename}"
    change = "set --port or CHATBUS_SERVER__PORT"
    if exc.errno == errno.EADDRINUSE:
        whose = " (Langchain-Chatchat's API port)" if port == CHATCHAT_PORT else ""
        return f"port {port} is in use{whose}: {change}"
    if exc.errno == errno.EACCES:
        return f"not allowed to listen on port {port} (below 1024?): {change}"
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"cannot listen on {host}:{port}: {reason} (set --host or CHATBUS_SERVER__HOST)"
