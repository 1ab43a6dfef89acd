"""`chatbus serve`, and why it could not start, in one line."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable

from core.cli.running import config_problem, run
from core.config import Config, ConfigError

CHATCHAT_PORT = 7861  # Langchain-Chatchat's API port, chatbus's default


def serve_command(config: Config, args: argparse.Namespace) -> int:
    given = (("host", args.host), ("port", args.port), ("workers", args.workers))
    server = config.server.model_copy(
        update={key: value for key, value in given if value is not None}
    )
    config = config.model_copy(update={"server": server})
    if server.workers == 1:
        return serve_one(config)
    return serve_workers(config)


def serve_one(config: Config, on_ready: Callable[[str], None] | None = None) -> int:
    """One process serving until stopped, alone or as a worker; its exit code."""
    from core.server import serve

    server = config.server
    try:
        run(serve(config, on_ready))
    except OSError as exc:  # a port in use, an address not on this host, a file not allowed
        print(f"chatbus: {start_problem(exc, server.host, server.port)}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # found while building what the config names
        if server.workers == 1:
            raise  # the command says it, as every command does
        print(config_problem(config, exc), file=sys.stderr)
        return 2
    return 0


def serve_workers(config: Config) -> int:
    """`server.workers` processes on one port, supervised (core/cli/workers.py)."""
    from core.cli.workers import Supervisor, hold_port, reuse_port_problem

    server = config.server
    problem = reuse_port_problem()
    if problem is not None:
        print(f"chatbus: {problem}", file=sys.stderr)
        return 2
    try:
        held = hold_port(server.host, server.port)
    except OSError as exc:
        print(f"chatbus: {start_problem(exc, server.host, server.port)}", file=sys.stderr)
        return 2
    port = held.getsockname()[1]  # port 0: the one every worker listens on
    shared = config.model_copy(update={"server": server.model_copy(update={"port": port})})
    return Supervisor(shared, server.workers, serve_one, held).run()


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
