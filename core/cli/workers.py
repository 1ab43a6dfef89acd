"""`chatbus serve --workers N`: N processes serving one port together, and their supervisor.

Each worker is a whole chatbus, forked from the supervisor before anything runs: its own
event loop, HTTP sessions, store connection (on SQLite its own writer thread), caches,
/metrics and instance lease. They listen on the same host:port with SO_REUSEPORT, so the
kernel spreads new connections among them (Linux; elsewhere --workers is refused).

The supervisor holds the port (bound, not listening: port 0 becomes one port for all, kept
between restarts), starts the first worker alone (it creates or migrates the store's schema,
and a start-up problem is said once), then the others, and logs "ready" once all are. It
forwards SIGTERM and SIGINT to each worker, which stops as one process does (the grace, then
the drain); the workers are in process groups of their own, so a Ctrl-C at a terminal
reaches them once, through the supervisor, and a second Ctrl-C ends their grace. A worker
that dies otherwise is restarted; one that dies within QUICK_DEATH_SECONDS of its start
QUICK_DEATHS times in a row stops them all, and the supervisor exits 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

import structlog

from core.config import Config
from core.server import log_ready

log = structlog.get_logger("chatbus.workers")
QUICK_DEATH_SECONDS = 5.0  # a worker dead this soon after its start failed to start
QUICK_DEATHS = 5  # in a row, for one worker: it cannot be kept
STOP_SLACK_SECONDS = 10.0  # past the grace, before a worker still running is killed
POLL_SECONDS = 1.0  # the supervisor's longest sleep; a death or a signal wakes it sooner
PR_SET_PDEATHSIG = 1  # prctl(2): a signal for this process when its parent dies

# A worker's body, in the forked process: serve `config`, calling `ready(url)` once
# listening; its exit code.
Work = Callable[[Config, Callable[[str], None]], int]


def reuse_port_problem(platform: str = sys.platform) -> str | None:
    """Why --workers cannot run here, or None. Only Linux spreads the connections of one
    port among the processes listening on it (BSD and macOS give them all to one)."""
    if platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT"):
        return None
    return (
        f"--workers needs SO_REUSEPORT as Linux has it, not {platform}:"
        " run one chatbus a port behind a proxy instead"
    )


def hold_port(host: str, port: int) -> socket.socket:
    """The port the workers will share, bound here: first alone, so that one in use by
    anyone (chatbus with --workers included) is an OSError as without workers, then with
    SO_REUSEPORT, the socket kept open and never listening."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as alone:
        alone.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's listener
        alone.bind(address)
        address = alone.getsockname()  # port 0: the one the system chose
    held = socket.socket(family, kind, proto)
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(address)
    except BaseException:
        held.close()
        raise
    return held


@dataclass
class Worker:
    index: int
    process: BaseProcess
    messages: Connection  # the supervisor's end: the worker's URL once it is listening
    started: float = field(default_factory=time.monotonic)
    url: str | None = None  # once ready

    @property
    def pid(self) -> int | None:
        return self.process.pid


class Supervisor:
    """Start `count` workers running `work` on `config`, keep them, stop them; `run` returns
    the exit code."""

    def __init__(self, config: Config, count: int, work: Work, held: socket.socket) -> None:
        self.config = config
        self.count = count
        self.work = work
        self.held = held
        self.workers: dict[int, Worker] = {}
        self.quick_deaths: dict[int, int] = dict.fromkeys(range(count), 0)
        self.stopping: float | None = None  # monotonic time of the first stop signal
        self.exit_code = 0
        self._fork = multiprocessing.get_context("fork")

    def run(self) -> int:
        with self._signals_forwarded():
            if self._start_all():
                first = self.workers[0].url or ""
                log.info("workers ready", pids=[w.pid for w in self.workers.values()])
                log_ready(self.config, first, workers=self.count)
            self._keep()
        log.info("workers stopped", exit_code=self.exit_code)
        return self.exit_code

    # --- starting

    def _start_all(self) -> bool:
        """The first worker alone, then the others; False when a signal or a death
        stopped it (the exit code says which)."""
        self._start(0)
        if not self._wait_ready():
            return False
        for index in range(1, self.count):
            self._start(index)
        return self._wait_ready()

    def _start(self, index: int) -> None:
        ours, theirs = self._fork.Pipe(duplex=False)
        process = self._fork.Process(
            target=_worker_main,
            args=(self.work, self.config, index, theirs, self.held, os.getpid()),
            name=f"chatbus-worker-{index}",
        )
        # Blocked across the fork: a stop signal now reaches the worker once it is listed
        # here, and the worker only once it no longer runs the supervisor's handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            process.start()
            self.workers[index] = Worker(index, process, ours)
        finally:
            theirs.close()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def _wait_ready(self) -> bool:
        """Until every worker started is listening. One that dies first fails the start:
        what it said is its exit code (2 for a configuration or a port problem)."""
        while any(w.url is None for w in self.workers.values()):
            if self.stopping is not None:
                return False
            for worker in self._wake():
                if worker.url is None and not worker.process.is_alive():
                    code = worker.process.exitcode
                    log.error("worker failed to start", worker=worker.index, exit_code=code)
                    self.exit_code = code if code and code > 0 else 1
                    self._stop_all()
                    return False
        return True

    # --- keeping

    def _keep(self) -> None:
        """Until every worker has exited: restart the ones that die unasked; once stopping,
        kill those still running past the grace and STOP_SLACK_SECONDS."""
        while self.workers:
            for worker in self._wake():
                if worker.process.is_alive():
                    continue
                self._forget(worker)
                if self.stopping is None:
                    self._replace(worker)
            if self.stopping is not None and time.monotonic() > self._stop_deadline():
                self._kill_the_rest()

    def _replace(self, dead: Worker) -> None:
        code = dead.process.exitcode
        quick = time.monotonic() - dead.started < QUICK_DEATH_SECONDS
        self.quick_deaths[dead.index] = self.quick_deaths[dead.index] + 1 if quick else 0
        log.warning(
            "worker died", worker=dead.index, pid=dead.pid, exit_code=code,
            signal=_signal_name(code), seconds_up=round(time.monotonic() - dead.started, 1),
        )  # fmt: skip
        if self.quick_deaths[dead.index] >= QUICK_DEATHS:
            log.error(
                "worker keeps dying at start-up", worker=dead.index, stopping="all",
                deaths=QUICK_DEATHS, within_seconds=QUICK_DEATH_SECONDS,
            )  # fmt: skip
            self.exit_code = 1
            self._stop_all()
            return
        self._start(dead.index)
        log.info("worker restarted", worker=dead.index, pid=self.workers[dead.index].pid)

    def _forget(self, worker: Worker) -> None:
        worker.process.join()
        worker.messages.close()
        del self.workers[worker.index]

    def _wake(self) -> list[Worker]:
        """Sleep until a worker says it is ready, dies, or POLL_SECONDS pass; the workers
        whose news arrived (a signal's forwarding is done by its handler, at once)."""
        exits = {worker.process.sentinel: worker for worker in self.workers.values()}
        news = {w.messages: w for w in self.workers.values() if w.url is None}
        woken: dict[int, Worker] = {}  # a worker that died unready wakes us twice: once
        for ready in wait([*exits, *news], timeout=POLL_SECONDS):
            if isinstance(ready, int):
                worker = exits[ready]
            elif isinstance(ready, Connection):
                worker = news[ready]
                with contextlib.suppress(EOFError, OSError):  # it died before saying it
                    worker.url = ready.recv()
            woken[worker.index] = worker
        return list(woken.values())

    # --- stopping

    @contextlib.contextmanager
    def _signals_forwarded(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.held.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping is None:
            self.stopping = time.monotonic()
            log.info("stopping workers", signal=signal.Signals(signum).name)
        self._send(signum)  # a second one ends their grace, as it does for one process

    def _stop_all(self) -> None:
        if self.stopping is None:
            self.stopping = time.monotonic()
        self._send(signal.SIGTERM)

    def _send(self, signum: int) -> None:
        for worker in self.workers.values():
            if worker.pid is not None and worker.process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)

    def _stop_deadline(self) -> float:
        assert self.stopping is not None
        return self.stopping + self.config.server.shutdown_grace_seconds + STOP_SLACK_SECONDS

    def _kill_the_rest(self) -> None:
        for worker in list(self.workers.values()):
            log.error("worker did not stop in time: killed", worker=worker.index, pid=worker.pid)
            worker.process.kill()
            self._forget(worker)
        self.exit_code = 1


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _worker_main(
    work: Work,
    config: Config,
    index: int,
    messages: Connection,
    held: socket.socket,
    supervisor: int,
) -> None:
    """In the forked worker: signals only from the supervisor, and a SIGTERM if it dies;
    every log line names the worker; then serve."""
    for sig in _STOP_SIGNALS:  # the supervisor's handlers came with the fork
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by `_start`
    held.close()
    os.setpgid(0, 0)  # out of the terminal's process group: Ctrl-C comes from the supervisor
    _die_with(supervisor)
    structlog.contextvars.bind_contextvars(worker=index, pid=os.getpid())

    def ready(url: str) -> None:
        log.info("worker ready", url=url)
        messages.send(url)

    sys.exit(work(config, ready))


def _die_with(supervisor: int) -> None:
    """A supervisor killed with -9 takes its workers along (they stop as on SIGTERM)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def _signal_name(exit_code: int | None) -> str | None:
    """The signal that ended a process (a negative exit code), by name."""
    if exit_code is None or exit_code >= 0:
        return None
    with contextlib.suppress(ValueError):
        return signal.Signals(-exit_code).name
    return str(-exit_code)
