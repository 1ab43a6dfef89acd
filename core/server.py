"""Running the app: one way to start it, for the CLI and the tests alike."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Callable
from pathlib import Path

import structlog
from aiohttp import web

from core.app import create_app
from core.auth import check_exposure
from core.config import Config, ServerConfig
from core.edge import EdgeRunner, default_max_connections
from core.keys import CONFIG, SERVICE
from core.plugins import BUILTIN_PLUGINS, extra_plugins, plugin_manager

log = structlog.get_logger("chatbus.server")
GC_YOUNG_THRESHOLD = 50_000  # allocations between young collections (CPython: 700)
# At shutdown aiohttp waits this long for each handler still running once the app's
# on_shutdown has spent the grace (core/app.py), cancels it, and waits as long again: by then
# a handler has only its last frames to write, to a client that may not read them.
HANDLERS_CLOSE_SECONDS = 0.2


async def start(
    app: web.Application, host: str, port: int, reuse_port: bool = False
) -> web.AppRunner:
    """Start serving `app`; `runner.addresses` tells the bound port when `port` is 0.
    `runner.cleanup()` shuts it down (core/app.py says how, within the configured grace).
    `reuse_port`: share the port with other processes (SO_REUSEPORT; the workers)."""
    limits = app[CONFIG].server if CONFIG in app else ServerConfig()  # a bare app: defaults
    # A client that disconnects cancels its handler at once, which cancels the upstream call.
    runner = EdgeRunner(
        app,
        header_timeout=limits.header_timeout_seconds,
        max_connections=limits.max_connections or default_max_connections(),
        keepalive_timeout=limits.keepalive_timeout_seconds,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=HANDLERS_CLOSE_SECONDS,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=4096, reuse_port=reuse_port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def serve(config: Config, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then stop accepting, let answers finish for the grace,
    cut the rest short and exit, within the grace and a second; a second signal ends the
    grace at once. An OSError while starting to listen (a port in use) propagates.
    `on_ready(url)` is called once listening (default: the "ready" log line); a worker of
    several (`server.workers`) passes its own and shares the port (core/cli/workers.py)."""
    check_exposure(config.server.host, config.auth)
    pm = plugin_manager(config)
    loaded = extra_plugins(pm)  # before the app: built-ins register objects of their own there
    app = create_app(config, pm)
    server = config.server
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before listening: a signal is never lost
        loop.add_signal_handler(sig, _on_signal, stop, app)
    runner = await start(app, server.host, server.port, reuse_port=server.workers > 1)
    host, port = runner.addresses[0][:2]
    _settle_memory()
    log.info("plugins", builtin=len(BUILTIN_PLUGINS), loaded=loaded)
    url = f"http://{host}:{port}"
    if on_ready is None:
        log_ready(config, url)
    else:
        on_ready(url)
    try:
        await stop.wait()
        log.info(
            "stopping",
            grace_seconds=server.shutdown_grace_seconds,
            answers_in_flight=app[SERVICE].cutoff.answers_in_flight,
            hint="Ctrl-C again to cut them short now",
        )
    finally:
        await runner.cleanup()
        log.info("stopped")


def log_ready(config: Config, url: str, **more: object) -> None:
    """The one "ready" line: where chatbus listens, on what model, store and configuration."""
    log.info(
        "ready",
        url=url,
        default_model=config.default_model,
        store=config.history.backend,
        config=_file_of(config),
        **more,
    )


def _file_of(config: Config) -> str:
    """The configuration file read, as an absolute path; else what the defaults say."""
    path = Path(config.source)
    return str(path.resolve()) if path.is_file() else config.source


def _on_signal(stop: asyncio.Event, app: web.Application) -> None:
    """The first signal stops the server within its grace; the next ones end the grace."""
    if not stop.is_set():
        stop.set()
        return
    service = app.get(SERVICE)
    if service is not None:  # else it is still starting: nothing is answering yet
        log.warning("stopping now", answers_cut=service.cutoff.answers_in_flight)
        service.cutoff.end_grace()


def _settle_memory() -> None:
    """Keep the garbage collector off the hot path: what start-up built lives for good, so
    freeze it out of every collection, and collect the young less often (streams make many
    short-lived dicts, almost none of them in cycles)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
