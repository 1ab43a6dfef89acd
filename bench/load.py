"""The load generator, a process of its own: drives one path and prints one JSON object.

    python -m bench.load seq     --kind direct|litellm|litellm:at-usage|chatbus:MODEL
                                        |chatbus-v1:MODEL --url URL [--kind ... --url ...]
                                 --tokens N --count N --warmup N
                                 (several paths: one answer from each in turn, round after round)
    python -m bench.load rate    --kind ... --count N --concurrency C
    python -m bench.load streams --kind ... --count N   (all open at once, frame gaps measured)

`--url` is the upstream's base URL (`.../v1`) for `direct` and `litellm`, chatbus's root for
`chatbus:MODEL` (`POST /chat/chat`, chatchat's route) and `chatbus-v1:MODEL` (`POST
/v1/chat/completions`, OpenAI's). `litellm` is litellm called in this process
(`litellm.acompletion`, streamed, read to its end), the floor of chatbus's litellm path;
`litellm:at-usage` reads it as chatbus does, up to the usage chunk (litellm's success logging
skipped). An answer counts only if it is whole: status 200, exactly `--tokens` content frames,
the end of the stream (`[DONE]` then EOF direct and on /v1, EOF on /chat/chat, litellm's end)
and no error frame.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import math
import os
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import aiohttp
import orjson

QUERY = "Tell me something for the benchmark."
MESSAGES = [{"role": "user", "content": QUERY}]
HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
GC_YOUNG_THRESHOLD = 50_000  # chatbus's own setting (core/server.py), for the litellm floor


class BadAnswer(Exception):
    """An answer that arrived but was not whole."""


@dataclass(frozen=True)
class Target:
    """Where one path's requests go and what a whole answer looks like there."""

    openai: bool  # OpenAI's chunks ended by [DONE] (upstream, /v1), else chatchat's frames
    url: str
    body: bytes
    tokens: int
    litellm: bool = False
    at_usage: bool = False  # stop reading litellm's stream at its usage chunk, as chatbus does

    @classmethod
    def of(cls, kind: str, url: str, tokens: int) -> Target:
        if kind in ("litellm", "litellm:at-usage"):  # chatbus's litellm call, in this process
            at_usage = kind == "litellm:at-usage"
            return cls(False, url.rstrip("/"), b"", tokens, litellm=True, at_usage=at_usage)
        if kind == "direct":  # the request chatbus itself sends upstream
            body = {
                "model": "fake-model",
                "messages": MESSAGES,
                "stream": True,
                "temperature": 0.7,
                "stream_options": {"include_usage": True},
            }
            return cls(True, f"{url.rstrip('/')}/chat/completions", orjson.dumps(body), tokens)
        if kind.startswith("chatbus-v1:"):  # chatbus's OpenAI route, with its own model name
            body = {"model": kind.removeprefix("chatbus-v1:"), "messages": MESSAGES, "stream": True}
            return cls(True, f"{url.rstrip('/')}/v1/chat/completions", orjson.dumps(body), tokens)
        body = {"query": QUERY, "stream": True, "model_name": kind.removeprefix("chatbus:")}
        return cls(False, f"{url.rstrip('/')}/chat/chat", orjson.dumps(body), tokens)


class Errors:
    """Failed answers by kind, with the first few messages."""

    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.examples: list[str] = []

    def add(self, exc: BaseException) -> None:
        kind = type(exc).__name__
        self.kinds[kind] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{kind}: {exc}"[:300])

    def json(self) -> dict[str, Any]:
        total = sum(self.kinds.values())
        return {"total": total, "kinds": dict(self.kinds), "examples": self.examples}


async def chat(
    session: aiohttp.ClientSession,
    target: Target,
    limits: aiohttp.ClientTimeout,
    stamps: list[float] | None = None,
    on_first: Callable[[], None] | None = None,
) -> None:
    """One whole streamed answer, read to EOF; `stamps` gets each content frame's time."""
    if target.litellm:
        return await litellm_chat(target, limits, stamps, on_first)
    clock = time.perf_counter
    async with session.post(target.url, data=target.body, headers=HEADERS, timeout=limits) as r:
        if r.status != 200:
            raise BadAnswer(f"status {r.status}: {(await r.content.read(200))!r}")
        frames = 0
        done = False
        async for line in r.content:
            if not line.startswith(b"data:"):
                continue
            if target.openai and line.startswith(b"data: [DONE]"):
                done = True
                continue
            if b'"error"' in line:
                raise BadAnswer(f"error frame: {line[:200]!r}")
            if target.openai and (b'"content"' not in line or b'"content":""' in line):
                continue  # the finish_reason and usage chunks; /v1's opening role chunk
            frames += 1
            if stamps is not None:
                stamps.append(clock())
                if frames == 1 and on_first is not None:
                    on_first()
    if target.openai and not done:
        raise BadAnswer("the stream ended without [DONE]")
    if frames != target.tokens:
        raise BadAnswer(f"{frames} content frames, expected {target.tokens}")


_litellm: ModuleType | None = None
_litellm_errors: tuple[type[Exception], ...] = ()


def load_litellm() -> ModuleType:
    """Import litellm as chatbus's provider does: cost map local, banners off."""
    global _litellm, _litellm_errors
    if _litellm is None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm
        import openai  # litellm's dependency: the base class of all its errors

        litellm.suppress_debug_info = True
        _litellm, _litellm_errors = litellm, (openai.OpenAIError,)
    return _litellm


async def litellm_chat(
    target: Target,
    limits: aiohttp.ClientTimeout,
    stamps: list[float] | None = None,
    on_first: Callable[[], None] | None = None,
) -> None:
    """One whole answer through `litellm.acompletion(stream=True)`, as chatbus calls it."""
    litellm = load_litellm()
    clock = time.perf_counter
    frames = 0
    usage = None
    response = None
    try:
        response = await litellm.acompletion(
            model="openai/fake-model",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            temperature=0.7,
            api_base=target.url,
            api_key="sk-bench",
            timeout=limits.total,
            num_retries=0,
        )
        async for chunk in response:
            choices = chunk.choices
            if choices and choices[0].delta.content:
                frames += 1
                if stamps is not None:
                    stamps.append(clock())
                    if frames == 1 and on_first is not None:
                        on_first()
            found = getattr(chunk, "usage", None)
            if found is not None:
                usage = found
                if target.at_usage and not choices:
                    break
    except _litellm_errors as exc:
        raise BadAnswer(f"{type(exc).__name__}: {exc}"[:300]) from None
    finally:
        if response is not None:
            await response.aclose()
    if frames != target.tokens:
        raise BadAnswer(f"{frames} content frames, expected {target.tokens}")
    if usage is None:
        raise BadAnswer("no usage at the end")


async def attempt(
    session: aiohttp.ClientSession, target: Target, limits: aiohttp.ClientTimeout, errors: Errors
) -> bool:
    try:
        await chat(session, target, limits)
    except (BadAnswer, aiohttp.ClientError, TimeoutError, OSError) as exc:
        errors.add(exc)
        return False
    return True


def summary(values: list[float]) -> dict[str, float | int | None]:
    """Count, mean and nearest-rank percentiles of `values` (milliseconds in, out)."""
    if not values:
        return {"count": 0, "min": None, "p50": None, "p90": None, "p95": None, "p99": None,
                "max": None}  # fmt: skip
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {
        "count": len(ordered),
        "min": ordered[0],
        "mean": sum(ordered) / len(ordered),
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "max": ordered[-1],
    }


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def seq(args: argparse.Namespace, targets: list[Target]) -> dict[str, Any]:
    """Sequential latency of whole answers, one path or several on one warm connection each.

    Several paths take turns: a round is one answer from each, in an order that rotates, so
    whatever else the machine does meanwhile falls on every path alike. Each path after the
    first also gets `ratio_to_first`: the median, over the rounds, of its latency divided by
    the first path's in the same round; every path gets `ratio_to_each`, the same against
    each path in order (None against itself)."""
    timeout = aiohttp.ClientTimeout(total=args.timeout, sock_connect=5)
    n = len(targets)
    errors = [Errors() for _ in targets]
    warmup_errors = [Errors() for _ in targets]
    rounds: list[list[float | None]] = []
    async with session() as s:
        for _ in range(args.warmup):
            for target, its_errors in zip(targets, warmup_errors, strict=True):
                await attempt(s, target, timeout, its_errors)
        for r in range(args.count):
            latencies: list[float | None] = [None] * n
            for i in ((r + k) % n for k in range(n)):
                started = time.perf_counter()
                if await attempt(s, targets[i], timeout, errors[i]):
                    latencies[i] = (time.perf_counter() - started) * 1000
            rounds.append(latencies)

    def paired(i: int, j: int) -> float | None:
        """The median over the rounds of path i's latency over path j's; None if i is j."""
        ratios = [a / b for row in rounds if (a := row[i]) is not None and (b := row[j])]
        return statistics.median(ratios) if i != j and ratios else None

    paths = []
    for i in range(n):
        paths.append(
            {
                "count": args.count,
                "warmup": args.warmup,
                "latency_ms": summary([ms for row in rounds if (ms := row[i]) is not None]),
                "ratio_to_first": paired(i, 0),
                "ratio_to_each": [paired(i, j) for j in range(n)],
                "errors": errors[i].json(),
                "warmup_errors": warmup_errors[i].json(),
            }
        )
    return {"paths": paths}


async def rate(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    """Whole answers per second with `concurrency` clients until `count` answers are done."""
    timeout = aiohttp.ClientTimeout(total=args.timeout, sock_connect=5)
    errors, warmup_errors = Errors(), Errors()
    latencies: list[float] = []
    left = args.count

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            started = time.perf_counter()
            if await attempt(s, target, timeout, errors):
                latencies.append((time.perf_counter() - started) * 1000)

    async with session() as s:
        # One answer per client first, so the timed run starts with open connections.
        await asyncio.gather(
            *(attempt(s, target, timeout, warmup_errors) for _ in range(args.concurrency))
        )
        cpu = time.process_time()
        started_wall, started = time.time(), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
    return {
        "count": args.count,
        "concurrency": args.concurrency,
        "elapsed_s": elapsed,
        "window_wall": [started_wall, started_wall + elapsed],
        "chats_per_s": len(latencies) / elapsed,
        "latency_ms": summary(latencies),
        "client_cpu_s": cpu,
        "errors": errors.json(),
        "warmup_errors": warmup_errors.json(),
    }


async def streams(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    """`count` streams opened together and held open at once; gaps between their frames.

    A stream is open from its first content frame to its end. Gaps are measured only between
    frames arriving after every stream is open, so they show the steady state of N at once.
    """
    timeout = aiohttp.ClientTimeout(total=args.timeout, sock_connect=10, sock_read=30)
    errors = Errors()
    stamps: list[list[float]] = [[] for _ in range(args.count)]
    ended: list[float] = []
    open_now = most_open = 0

    def opened() -> None:
        nonlocal open_now, most_open
        open_now += 1
        most_open = max(most_open, open_now)

    async def one(mine: list[float]) -> None:
        nonlocal open_now
        try:
            await chat(s, target, timeout, mine, opened)
        except (BadAnswer, aiohttp.ClientError, TimeoutError, OSError) as exc:
            errors.add(exc)
        finally:
            if mine:
                open_now -= 1
            ended.append(time.perf_counter())

    to_wall = time.time() - time.perf_counter()
    cpu = time.process_time()
    async with session() as s:
        started = time.perf_counter()
        await asyncio.gather(*(one(mine) for mine in stamps))
    cpu = time.process_time() - cpu
    firsts = [mine[0] for mine in stamps if mine]
    all_open = max(firsts) if firsts else started
    first_end = min(ended) if ended else started
    gaps = [(b - a) * 1000 for mine in stamps for a, b in itertools.pairwise(mine) if a >= all_open]
    return {
        "count": args.count,
        "tokens": args.tokens,
        "max_open": most_open,
        "all_open_at_once": most_open == args.count,
        "open_all_s": all_open - started,
        "duration_s": max(ended) - started if ended else 0.0,
        "all_open_wall": all_open + to_wall,
        "first_end_wall": first_end + to_wall,
        "gap_ms": summary(gaps),
        "client_cpu_s": cpu,
        "errors": errors.json(),
    }


ONE_PATH = {"rate": rate, "streams": streams}  # seq takes one path or several


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("mode", choices=["seq", *ONE_PATH])
    kinds = "direct, litellm, litellm:at-usage, chatbus:<model> (/chat/chat) or chatbus-v1:<model>"
    kinds += " (/v1/chat/completions); seq takes several"
    parser.add_argument("--kind", required=True, action="append", help=kinds)
    parser.add_argument("--url", required=True, action="append", help="one per --kind")
    parser.add_argument("--tokens", type=int, required=True, help="content frames per answer")
    parser.add_argument("--count", type=int, required=True, help="answers (seq: rounds)")
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds for the run")
    args = parser.parse_args(argv)
    if len(args.kind) != len(args.url):
        parser.error("give one --url for each --kind")
    if args.mode != "seq" and len(args.kind) > 1:
        parser.error(f"{args.mode} takes one path")
    if not all(url.startswith(("http://127.0.0.1:", "http://localhost:")) for url in args.url):
        parser.error("--url must be on loopback")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < wanted:  # a thousand streams, as many sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    targets = [Target.of(k, u, args.tokens) for k, u in zip(args.kind, args.url, strict=True)]

    async def bounded() -> dict[str, Any]:
        async with asyncio.timeout(args.deadline):
            if args.mode == "seq":
                return await seq(args, targets)
            return await ONE_PATH[args.mode](args, targets[0])

    run: Callable[[Any], Any] = asyncio.run
    if any(target.litellm for target in targets):
        # Here this process is the path measured, not only its client: it runs litellm the
        # way chatbus runs it (uvloop; start-up frozen out of the GC, young collections rare).
        load_litellm()
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            pass
    else:
        # The instrument must not stall: with the cyclic GC on, this process's own pauses
        # (tens of ms with a thousand streams) would be charged to whichever path is
        # measured. One short run leaks at most some MB of cycles.
        gc.disable()
    try:
        result = run(bounded())
    except TimeoutError:
        print(f"bench.load: {args.mode} passed its {args.deadline:.0f} s deadline", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(orjson.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
