"""`python -m bench [--quick] [--out bench/results/latest.md]`: the whole benchmark, one run.

Starts two fake upstreams (fast: no delay; slow: a token every 50 ms) and chatbus against
them, drives each path from a separate load process (`bench.load`), samples chatbus's RSS,
and writes the side-by-side table (markdown) and the raw numbers (JSON, next to it). chatbus
is driven through both its streaming routes, the same model behind each: `/chat/chat`
(chatchat's, one write a frame) and `/v1/chat/completions` (OpenAI's, bursts joined). Then
the litellm path: a second chatbus whose only model is litellm's (`openai/fake-model` at the
fast upstream, so its start-up includes the import), against litellm called directly in the
load process. Between the two, /chat/chat's rate run again on a chatbus of two workers
(`serve --workers 2`). Loopback only; every child is killed on the way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import importlib.metadata
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import orjson

from bench import report
from bench.procs import (
    BenchError,
    Deadline,
    Procs,
    Sampler,
    cpu_seconds,
    free_port,
    rss_kb,
    wait_for_file,
    wait_for_line,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "latest.md"
DIRECT, CHATBUS, CHATBUS_V1 = report.DIRECT, report.CHATBUS, report.CHATBUS_V1
LITELLM_DIRECT, CHATBUS_LITELLM = report.LITELLM_DIRECT, report.CHATBUS_LITELLM
LITELLM_AT_USAGE = report.LITELLM_AT_USAGE
LITELLM_KEY_ENV = "BENCH_LITELLM_API_KEY"  # the fake upstream takes any key; litellm wants one
WORKERS = 2  # /chat/chat's rate run again with `chatbus serve --workers 2`


@dataclass(frozen=True)
class Counts:
    seq_count: int
    seq_warmup: int
    rate_count: int
    concurrency: int
    tokens: int
    slow_streams: int
    slow_tokens: int
    slow_gap_ms: float
    deadline_s: float
    # litellm costs ~15 ms of CPU an answer: fewer answers for its rate runs
    lite_seq_count: int
    lite_seq_warmup: int
    lite_rate_count: int


FULL = Counts(1000, 100, 3000, 100, 20, 1000, 200, 50.0, 420.0, 1000, 100, 1000)
QUICK = Counts(50, 10, 200, 100, 20, 50, 20, 50.0, 110.0, 30, 5, 100)

CONFIG = """\
default_model = "{default}"

[server]
host = "127.0.0.1"
shutdown_grace_seconds = 1

[history]
backend = "sqlite"

[history.sqlite]
path = "{db}"
"""

MODELS = """
[models.fast]
provider = "openai_compat"
base_url = "{fast}"
model = "fake-model"

[models.slow]
provider = "openai_compat"
base_url = "{slow}"
model = "fake-model"
"""

LITELLM_MODELS = """
[models.lite]
provider = "litellm"
model = "openai/fake-model"
api_base = "{fast}"
api_key_env = "{key_env}"
"""


class Bench:
    """One run: its children, its deadline, its measurements."""

    def __init__(self, counts: Counts, procs: Procs, deadline: Deadline, tmp: Path) -> None:
        self.counts = counts
        self.procs = procs
        self.deadline = deadline
        self.tmp = tmp

    def upstream(self, name: str, tokens: int, delay: float) -> tuple[int, str]:
        ready = self.tmp / f"{name}.url"
        argv = [sys.executable, "-m", "chatbus.testing.fake_upstream", "--port", "0"]
        argv += ["--token-count", str(tokens), "--delay", str(delay), "--ready-file", str(ready)]
        proc = self.procs.spawn(name, argv)
        return proc.pid, wait_for_file(ready, proc, self.deadline.left(15))

    def chatbus(
        self, name: str, default: str, models: str, workers: int = 1
    ) -> tuple[subprocess.Popen[bytes], str, float]:
        """Start chatbus; seconds from spawning it to its first successful answer (with
        workers, to its "ready" line: every worker listening)."""
        config = self.tmp / f"{name}.toml"
        db = self.tmp / f"{name}.db"
        config.write_text(CONFIG.format(default=default, db=db) + models)
        port = free_port()
        argv = [sys.executable, "-m", "core.cli", "--config", str(config)]
        argv += ["serve", "--port", str(port)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        started = time.perf_counter()
        proc = self.procs.spawn(name, argv)
        first_answer(port, proc, default, self.deadline.left(30))
        if workers > 1:
            wait_for_line(self.procs.logdir / f"{name}.log", '"event": "ready"', proc,
                          self.deadline.left(30))  # fmt: skip
        return proc, f"http://127.0.0.1:{port}", time.perf_counter() - started

    def load(self, mode: str, kind: str, url: str, tokens: int, count: int, **opts: Any) -> Any:
        return self._load(mode, [(kind, url)], tokens, count, **opts)

    def seq(
        self, routes: dict[str, tuple[str, str]], count: int, warmup: int, cap: float
    ) -> dict[str, Any]:
        """Sequential latency of several paths taken in turns (see `bench.load`), by path;
        each path's paired ratios by the other paths' names (`ratio_to`)."""
        tokens = self.counts.tokens
        out = self._load("seq", list(routes.values()), tokens, count, warmup=warmup, cap=cap)
        for run in out["paths"]:
            ratios = zip(routes, run.pop("ratio_to_each"), strict=True)
            run["ratio_to"] = {key: ratio for key, ratio in ratios if ratio is not None}
        return dict(zip(routes, out["paths"], strict=True))

    def rate(
        self,
        kind: str,
        url: str,
        count: int,
        chatbus_pid: int,
        upstream_pid: int,
        rss: bool,
        workers: list[int] | None = None,
    ) -> dict[str, Any]:
        """A rate run with chatbus's and the upstream's CPU sampled meanwhile: the run, the
        cores busy, the CPU an answer took in each process (and chatbus's peak RSS if `rss`).
        `workers`: chatbus's worker pids, each sampled (`chatbus` is then their sum)."""
        pids = {"chatbus": chatbus_pid, "upstream": upstream_pid}
        pids |= {f"worker{i}": pid for i, pid in enumerate(workers or [])}
        before = (time.time(), {name: cpu_seconds(pid) or 0.0 for name, pid in pids.items()})
        with Sampler(chatbus_pid, pids) as sampler:
            rate = self.load(
                "rate", kind, url, self.counts.tokens, count, concurrency=self.counts.concurrency
            )
        after = (time.time(), {name: cpu_seconds(pid) or 0.0 for name, pid in pids.items()})
        window = rate["window_wall"]
        # A window too short for two samples (a quick run on two workers): the whole call's.
        cores = sampler.cores(*window) or _cores_between(before, after)
        if workers and cores:  # the supervisor only waits: chatbus's work is the workers'
            cores["chatbus"] = sum(cores.pop(f"worker{i}") for i in range(len(workers)))
        per_chat = {
            name: busy * 1000 / max(rate["chats_per_s"], 1e-9) for name, busy in cores.items()
        }
        result = {
            "rate": rate,
            "cpu_cores": cores,
            "cpu_ms_per_chat": {**per_chat, "client": rate["client_cpu_s"] * 1000 / count},
        }
        if rss:
            result["rss_peak_kb"] = sampler.peak_rss(*window)
        return result

    def _load(
        self, mode: str, routes: list[tuple[str, str]], tokens: int, count: int, **opts: Any
    ) -> Any:
        cap = opts.pop("cap", 90.0)
        timeout = self.deadline.left(cap)
        argv = [sys.executable, "-m", "bench.load", mode]
        for kind, url in routes:
            argv += ["--kind", kind, "--url", url]
        argv += ["--tokens", str(tokens), "--count", str(count)]
        argv += ["--deadline", str(max(1.0, timeout - 2))]
        for key, value in opts.items():
            argv += [f"--{key}", str(value)]
        kinds = " | ".join(kind for kind, _ in routes)
        progress(f"{mode} {kinds}: {count} {'rounds' if len(routes) > 1 else 'answers'}")
        return self.procs.run_json(f"load-{mode}", argv, timeout + 5)


def first_answer(port: int, proc: subprocess.Popen[bytes], model: str, timeout: float) -> None:
    """Poll `/chat/chat` until chatbus answers 200 with a text from `model`."""
    body = orjson.dumps({"query": "ready?", "model_name": model})
    ends = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < ends:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("POST", "/chat/chat", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            if response.status == 200 and b'"text"' in data:
                return
            last = f"{response.status} {data[:200]!r}"
        except OSError as exc:
            last = repr(exc)
        finally:
            conn.close()
        if proc.poll() is not None:
            raise BenchError(f"chatbus exited {proc.returncode} before answering")
        time.sleep(0.005)
    raise BenchError(f"chatbus did not answer within {timeout:.0f} s (last: {last})")


def run(counts: Counts, procs: Procs, deadline: Deadline, tmp: Path) -> dict[str, Any]:
    c = counts
    bench = Bench(counts, procs, deadline, tmp)
    progress("starting the fake upstreams")
    fast_pid, fast_url = bench.upstream("upstream-fast", c.tokens, 0.0)
    slow_pid, slow_url = bench.upstream("upstream-slow", c.slow_tokens, c.slow_gap_ms / 1000)
    progress("starting chatbus")
    proc, chatbus_url, startup = bench.chatbus(
        "chatbus", "fast", MODELS.format(fast=fast_url, slow=slow_url)
    )
    time.sleep(0.5)
    rest = rss_kb(proc.pid)

    # path -> (kind, URL) for the fast answers, then for the slow streams. /v1 comes last in
    # the runs one path at a time, so /chat/chat's (which the targets judge) run as before.
    routes = {
        DIRECT: (("direct", fast_url), ("direct", slow_url)),
        CHATBUS: (("chatbus:fast", chatbus_url), ("chatbus:slow", chatbus_url)),
        CHATBUS_V1: (("chatbus-v1:fast", chatbus_url), ("chatbus-v1:slow", chatbus_url)),
    }
    paths: dict[str, dict[str, Any]] = {key: {} for key in routes}
    fast_routes = {key: fast for key, (fast, _) in routes.items()}
    for key, run in bench.seq(fast_routes, c.seq_count, c.seq_warmup, cap=90.0).items():
        paths[key]["seq"] = run
    for key, ((kind, url), _) in routes.items():
        paths[key].update(bench.rate(kind, url, c.rate_count, proc.pid, fast_pid, key != DIRECT))

    slow: dict[str, dict[str, Any]] = {}
    stream_s = c.slow_tokens * c.slow_gap_ms / 1000
    for key, (_, (kind, url)) in routes.items():
        time.sleep(0.5)
        before_kb = rss_kb(proc.pid)
        pids = {"chatbus": proc.pid, "upstream": slow_pid}
        with Sampler(proc.pid, pids) as sampler:
            result = bench.load(
                "streams",
                kind,
                url,
                c.slow_tokens,
                c.slow_streams,
                timeout=stream_s + 30,
                cap=stream_s + 60,
            )
        window = result["all_open_wall"], result["first_end_wall"]
        result["cpu_cores"] = sampler.cores(*window)
        if key != DIRECT:
            open_kb = sampler.peak_rss(*window)
            result["rss_rest_kb"] = before_kb
            result["rss_open_kb"] = open_kb
            if open_kb is not None and before_kb is not None:
                result["rss_per_stream_kb"] = (open_kb - before_kb) / c.slow_streams
        slow[key] = result

    if proc.poll() is not None:
        raise BenchError(f"chatbus exited {proc.returncode} during the run")

    workers = workers_rate(bench, MODELS.format(fast=fast_url, slow=slow_url), fast_pid)
    lite, lite_startup, lite_rest = litellm_paths(bench, fast_url, fast_pid)
    paths.update(lite)
    runs = [*(p[k] for p in paths.values() for k in ("seq", "rate")), *slow.values()]
    runs.append(workers["rate"])
    return {
        "startup": {"seconds": startup, "litellm_seconds": lite_startup},
        "rss_kb": {"rest": rest, "litellm_rest": lite_rest},
        "paths": paths,
        "slow": slow,
        "workers": workers,
        "errors_total": sum(report.errors_of(r) for r in runs),
    }


def workers_rate(bench: Bench, models: str, fast_pid: int) -> dict[str, Any]:
    """/chat/chat's rate run again, on a chatbus of WORKERS workers (`chatbus serve
    --workers`): the same model, upstream and counts as the one-process run above."""
    progress(f"starting chatbus with {WORKERS} workers")
    proc, url, startup = bench.chatbus("chatbus-workers", "fast", models, workers=WORKERS)
    pids = children(proc.pid)
    if len(pids) != WORKERS:
        raise BenchError(f"chatbus --workers {WORKERS} runs {len(pids)} workers")
    result = bench.rate("chatbus:fast", url, bench.counts.rate_count, proc.pid, fast_pid, False,
                        workers=pids)  # fmt: skip
    if proc.poll() is not None:
        raise BenchError(f"chatbus-workers exited {proc.returncode} during the run")
    return {"count": WORKERS, "startup_seconds": startup, **result}


def _cores_between(
    before: tuple[float, dict[str, float]], after: tuple[float, dict[str, float]]
) -> dict[str, float]:
    """CPUs each process kept busy between two readings of their CPU times."""
    seconds = max(after[0] - before[0], 1e-9)
    return {name: (after[1][name] - before[1][name]) / seconds for name in before[1]}


def children(pid: int) -> list[int]:
    """A live process's children (Linux)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def litellm_paths(
    bench: Bench, fast_url: str, fast_pid: int
) -> tuple[dict[str, dict[str, Any]], float, int | None]:
    """litellm in the load process (the floor), the same read as chatbus reads it (up to the
    usage chunk), and chatbus's litellm model: the same requests.

    A chatbus of its own, started only now: its start-up includes importing litellm, and
    the openai_compat figures above are of a chatbus that never imported it."""
    c = bench.counts
    progress("starting chatbus with a litellm model")
    models = LITELLM_MODELS.format(fast=fast_url, key_env=LITELLM_KEY_ENV)
    proc, url, startup = bench.chatbus("chatbus-litellm", "lite", models)
    time.sleep(0.5)
    rest = rss_kb(proc.pid)
    routes = {
        LITELLM_DIRECT: ("litellm", fast_url),
        LITELLM_AT_USAGE: ("litellm:at-usage", fast_url),
        CHATBUS_LITELLM: ("chatbus:lite", url),
    }
    paths: dict[str, dict[str, Any]] = {key: {} for key in routes}
    for key, run in bench.seq(routes, c.lite_seq_count, c.lite_seq_warmup, cap=150.0).items():
        paths[key]["seq"] = run
    for key, (kind, target) in routes.items():
        through_chatbus = key == CHATBUS_LITELLM
        run = bench.rate(kind, target, c.lite_rate_count, proc.pid, fast_pid, through_chatbus)
        paths[key].update(run)
    if proc.poll() is not None:
        raise BenchError(f"chatbus-litellm exited {proc.returncode} during the run")
    return paths, startup, rest


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        litellm = importlib.metadata.version("litellm")
    except importlib.metadata.PackageNotFoundError:
        litellm = "not installed"
    return {
        "litellm": litellm,
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, timeout=5
        )
        # A result from an earlier run is no change to what is measured.
        status = ["git", "status", "--porcelain", "--", ".", ":(exclude)bench/results"]
        dirty = subprocess.run(status, cwd=ROOT, capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.decode().strip() + (" (with uncommitted changes)" if dirty.stdout else "")


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _terminated(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny counts, well under 30 s")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report path")
    args = parser.parse_args(argv)
    counts = QUICK if args.quick else FULL
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminated)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBUS_")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env[LITELLM_KEY_ENV] = "sk-bench"
    began = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="chatbus-bench-") as tmp,
        Procs(Path(tmp), env, ROOT) as procs,
    ):
        try:
            results = run(counts, procs, Deadline(counts.deadline_s), Path(tmp))
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            names = ("chatbus", "chatbus-workers", "chatbus-litellm", "upstream-fast",
                     "upstream-slow")  # fmt: skip
            for name in names:
                print(f"--- {name} log:\n{procs.log_tail(name)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench: interrupted; children stopped", file=sys.stderr)
            return 130
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine(),
        "commit": commit(),
        "counts": asdict(counts),
        "elapsed_s": time.perf_counter() - began,
        **results,
    }
    results["targets"] = report.targets(results)
    text = report.markdown(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
