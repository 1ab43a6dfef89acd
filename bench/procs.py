"""Subprocess helpers: spawn children in their own sessions, read /proc, always clean up."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark could not measure something (a child died, a deadline passed)."""


class Deadline:
    """The whole run's time budget; every wait asks it how long it may take."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ends = time.monotonic() + seconds

    def left(self, cap: float) -> float:
        """At most `cap` seconds, never past the deadline; raises once it has passed."""
        left = self.ends - time.monotonic()
        if left <= 0:
            raise BenchError(f"the run went past its {self.seconds:.0f} s deadline")
        return min(cap, left)


class Procs:
    """Every child the bench starts, so that `close` ends each one, by its id."""

    def __init__(self, logdir: Path, env: dict[str, str], cwd: Path) -> None:
        self.logdir = logdir
        self.env = env
        self.cwd = cwd
        self._children: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def spawn(self, name: str, argv: list[str], stdout: Any = None) -> subprocess.Popen[bytes]:
        """Start `argv` in its own session (Ctrl-C is ours to handle); stderr goes to a log."""
        log = (self.logdir / f"{name}.log").open("ab")
        try:
            proc = subprocess.Popen(
                argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()
        self._children.append(proc)
        return proc

    def run_json(self, name: str, argv: list[str], timeout: float) -> dict[str, Any]:
        """Run a child to completion and parse the one JSON object it prints."""
        proc = self.spawn(name, argv, stdout=subprocess.PIPE)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise BenchError(f"{name} took longer than {timeout:.0f} s") from None
        self._children.remove(proc)  # only once it is over; `close` stops it otherwise
        if proc.returncode != 0:
            raise BenchError(f"{name} exited {proc.returncode}:\n{self.log_tail(name)}")
        try:
            result: dict[str, Any] = orjson.loads(out)
        except orjson.JSONDecodeError:
            raise BenchError(f"{name} printed no JSON: {out[:200]!r}") from None
        return result

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        while self._children:
            stop(self._children.pop())


def stop(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM the child's process group (its id is the child's pid), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The text of `path` once a child has written it."""
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        if path.exists():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited {proc.returncode} before it was ready")
        time.sleep(0.01)
    raise BenchError(f"{proc.args!r} not ready after {timeout:.0f} s")


def wait_for_line(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until a child's log at `path` has a line containing `text`."""
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        if path.exists() and any(text in line for line in path.read_text().splitlines()):
            return
        if proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited {proc.returncode} before it was ready")
        time.sleep(0.01)
    raise BenchError(f"{proc.args!r} not ready after {timeout:.0f} s")


def rss_kb(pid: int) -> int | None:
    """VmRSS of a live process, in KiB."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time a live process has used."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


class Sampler:
    """Every `interval` seconds, in a thread: one process's RSS and some processes' CPU time.

    Samples carry wall-clock times, so a window another process reports can be cut out.
    """

    def __init__(self, rss_pid: int, cpu_pids: dict[str, int], interval: float = 0.1) -> None:
        self.rss_pid = rss_pid
        self.cpu_pids = cpu_pids
        self.interval = interval
        self.samples: list[tuple[float, int | None, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            cpu = {name: cpu_seconds(pid) or 0.0 for name, pid in self.cpu_pids.items()}
            self.samples.append((time.time(), rss_kb(self.rss_pid), cpu))
            if self._stop.wait(self.interval):
                return

    def peak_rss(self, since: float = 0.0, until: float = float("inf")) -> int | None:
        """The largest RSS sampled in [since, until], else the sample nearest that window."""
        rss = [(at, kb) for at, kb, _ in self.samples if kb is not None]
        inside = [kb for at, kb in rss if since <= at <= until]
        if inside:
            return max(inside)
        if not rss:
            return None
        middle = since if until == float("inf") else (since + until) / 2
        return min(rss, key=lambda sample: abs(sample[0] - middle))[1]

    def cores(self, since: float, until: float) -> dict[str, float]:
        """CPUs each process kept busy on average in [since, until] (1.0 = a whole core)."""
        inside = [(at, cpu) for at, _, cpu in self.samples if since <= at <= until]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return {}
        (t0, first), (t1, last) = inside[0], inside[-1]
        return {name: (last[name] - first[name]) / (t1 - t0) for name in self.cpu_pids}
