"""`python -m bench.store [--quick] [--out bench/results/store.md]`: the history stores at
scale, over HTTP.

For 10k, 100k and 1M turns (3 a conversation, over a few tenants), on SQLite and on
SecantusDB (a MongoDB-compatible server this run starts, as the tests do): the store is
filled directly (a bulk insert through the store's own schema: its columns, its documents,
its summaries), then a real chatbus process is started on it, and measured over loopback:
`GET /conversations` (the first page, and pages followed by `next_cursor`) for the tenant
with the most conversations, and a chat of another tenant (`/chat/chat` against the fake
upstream) alone and while a second process keeps listing at a steady rate. Each step adds
turns to the same store (10k, then 90k more, then 900k more). `--quick`: 10k turns only.

    python -m bench.store listing-load --url URL --key KEY --clients N --rate R --ready-file F

is that second process: it lists until SIGTERM, then prints one JSON object.
Loopback only; every child is ended on the way out, by its id.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import itertools
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import aiohttp
import orjson

from bench.load import BadAnswer, Errors, Target, chat, summary
from bench.procs import BenchError, Deadline, Procs, free_port, stop, wait_for_file

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "store.md"
FULL_SIZES, QUICK_SIZES = (10_000, 100_000, 1_000_000), (10_000,)
TURNS_A_CONVERSATION = 3
TENANTS = 4  # the filled turns' tenants; the listing is the first's (a quarter of them)
LISTER, CHATTER = "tenant-0", "chatter"  # the chatting tenant has no filled turns
KEYS = {LISTER: "bench-lister-0123456789abcdef", CHATTER: "bench-chatter-0123456789abcdef"}
TOKENS = 20
PAGE = 20  # conversations a listing asks for
ROUNDS = 3  # blocks of chats alone and under listing load, taken in turns
MEASURE_CAP_S = 60.0  # the most one series of requests may take (its count says how many)
MONGO_FILL_BUDGET_S = 300.0  # a size whose fill would take longer is skipped on MongoDB
REQUEST_LIMITS = aiohttp.ClientTimeout(total=30)
FAILURES = (BadAnswer, aiohttp.ClientError, OSError, TimeoutError, ValueError)  # counted
STARTED = 1_700_000_000.0  # the filled turns' wall clock: one turn a millisecond from here


@dataclass(frozen=True)
class Counts:
    listings: int  # first pages timed (and as many cursor pages)
    chats: int  # chats timed alone, and again under listing load
    warmup: int
    load_clients: int  # the listing load: clients, and listings a second they keep to
    load_rate: float
    deadline_s: float


FULL = Counts(300, 300, 30, 4, 100.0, 3600.0)
QUICK = Counts(40, 40, 10, 2, 50.0, 240.0)

CONFIG = """\
default_model = "fast"

[server]
host = "127.0.0.1"
shutdown_grace_seconds = 1

[models.fast]
provider = "openai_compat"
base_url = "{upstream}"
model = "fake-model"

[auth.keys.lister]
tenant = "{lister}"
sha256 = "{lister_digest}"

[auth.keys.chatter]
tenant = "{chatter}"
sha256 = "{chatter_digest}"

[history]
backend = "{backend}"
"""
SQLITE = '\n[history.sqlite]\npath = "{path}"\n'
MONGO = '\n[history.mongo]\nuri = "{uri}"\ndatabase = "bench"\n'


@dataclass(frozen=True)
class Turn:
    """One filled turn, as every store stores it."""

    message_id: str
    conversation_id: str
    tenant: str
    query: str
    seq: int
    created_at: float


def filled_turns(first_conversation: int, conversations: int, first_seq: int) -> Iterator[Turn]:
    """`conversations` new conversations of 3 turns each, taken in rounds (each
    conversation's first turn, then each one's second, ...), as interleaved chats are."""
    seqs = itertools.count(first_seq)
    for round_ in range(TURNS_A_CONVERSATION):
        for n in range(first_conversation, first_conversation + conversations):
            seq = next(seqs)
            yield Turn(f"m{n}-{round_}", f"c{n}", f"tenant-{n % TENANTS}",
                       f"question {round_} of conversation {n}", seq,
                       STARTED + seq / 1000)  # fmt: skip


RESPONSE = "An answer of about the usual length, stored for the benchmark. " * 4
USAGE = {"prompt_tokens": 12, "completion_tokens": 48}


class SqliteFill:
    """The store's own file: its schema from opening a SqliteStore, rows by its columns
    (its triggers keep the conversations table, as they do for served turns)."""

    name = "sqlite"

    def __init__(self, tmp: Path) -> None:
        (tmp / "sqlite").mkdir()
        self.path = tmp / "sqlite" / "store.db"

    def config(self) -> str:
        return SQLITE.format(path=self.path)

    async def prepare(self) -> None:
        from plugins.history_sqlite.store import SqliteStore

        store = SqliteStore(str(self.path))
        await store.open()
        await store.close()

    def add(self, turns: Iterator[Turn]) -> None:
        from plugins.history_sqlite.store import COLUMNS, INSERT

        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(INSERT, ([_sqlite_row(turn)[c] for c in COLUMNS] for turn in turns))
            db.execute("COMMIT")
        finally:
            db.close()

    def close(self) -> None:
        pass


def _sqlite_row(turn: Turn) -> dict[str, Any]:
    return {
        "message_id": turn.message_id, "conversation_id": turn.conversation_id,
        "tenant": turn.tenant, "chat_type": "llm_chat", "query": turn.query,
        "response": RESPONSE, "status": "completed", "model": "fast",
        "usage": orjson.dumps(USAGE).decode(), "latency": 0.05, "error": None,
        "feedback_score": -1, "feedback_reason": "", "meta": '{"finish_reason": "stop"}',
        "created_at": turn.created_at, "instance_id": "bench-fill",
    }  # fmt: skip


class MongoFill:
    """A SecantusDB of this run's own: indexes from opening a MongoStore, then the turns'
    documents and their conversations' summaries as the store writes them, in bulk."""

    name = "mongo"
    BATCH = 5000

    def __init__(self, tmp: Path) -> None:
        from tests.mongo_server import MongoServer

        (tmp / "secantus").mkdir()
        self.server = MongoServer(tmp / "secantus")

    def config(self) -> str:
        return MONGO.format(uri=self.server.uri())

    async def prepare(self) -> None:
        from pymongo import AsyncMongoClient

        from plugins.history_mongo.store import MongoStore

        self.server.start()
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(self.server.uri())
        store = MongoStore(client, "bench")
        await store.open()
        await store.close()

    def add(self, turns: Iterator[Turn]) -> None:
        from pymongo import MongoClient

        client: MongoClient[dict[str, Any]] = MongoClient(self.server.uri())
        try:
            database = client["bench"]
            summaries: dict[tuple[str, str], dict[str, Any]] = {}
            for batch in batched(turns, self.BATCH):
                database["messages"].insert_many([_mongo_document(t) for t in batch])
                for turn in batch:
                    _summarise(summaries, turn)
            for documents in batched(iter(summaries.values()), self.BATCH):
                database["messages_conversations"].insert_many(documents)
        finally:
            client.close()

    def close(self) -> None:
        self.server.stop()


def _mongo_document(turn: Turn) -> dict[str, Any]:
    return {
        "_id": turn.message_id, "conversation_id": turn.conversation_id,
        "tenant": turn.tenant, "chat_type": "llm_chat", "query": turn.query,
        "response": RESPONSE, "status": "completed", "model": "fast", "usage": USAGE,
        "latency": 0.05, "error": None, "feedback_score": -1, "feedback_reason": "",
        "meta": {"finish_reason": "stop"}, "created_at": turn.created_at,
        "instance_id": "bench-fill", "seq": turn.seq,
    }  # fmt: skip


def _summarise(summaries: dict[tuple[str, str], dict[str, Any]], turn: Turn) -> None:
    """The summary MongoStore upserts with each turn (turns come oldest first)."""
    key = (turn.tenant, turn.conversation_id)
    found = summaries.get(key)
    if found is None:
        summaries[key] = {
            "tenant": turn.tenant, "conversation_id": turn.conversation_id, "turns": 1,
            "first_query": turn.query, "created_at": turn.created_at,
            "updated_at": turn.created_at, "last_seq": turn.seq,
        }  # fmt: skip
    else:
        found.update(turns=found["turns"] + 1, updated_at=turn.created_at, last_seq=turn.seq)


Fill = SqliteFill | MongoFill


class StoreBench:
    """One run: its children, its deadline, the fake upstream every chatbus talks to."""

    def __init__(self, counts: Counts, procs: Procs, deadline: Deadline, tmp: Path) -> None:
        self.counts = counts
        self.procs = procs
        self.deadline = deadline
        self.tmp = tmp
        self.upstream_url = ""

    def start_upstream(self) -> None:
        ready = self.tmp / "upstream.url"
        argv = [sys.executable, "-m", "chatbus.testing.fake_upstream", "--port", "0"]
        argv += ["--token-count", str(TOKENS), "--ready-file", str(ready)]
        proc = self.procs.spawn("upstream", argv)
        self.upstream_url = wait_for_file(ready, proc, self.deadline.left(15))

    def chatbus(self, name: str, fill: Fill) -> tuple[subprocess.Popen[bytes], str]:
        config = self.tmp / f"{name}.toml"
        digests = {tenant: hashlib.sha256(key.encode()).hexdigest() for tenant, key in KEYS.items()}
        config.write_text(
            CONFIG.format(upstream=self.upstream_url, lister=LISTER, chatter=CHATTER,
                          lister_digest=digests[LISTER], chatter_digest=digests[CHATTER],
                          backend=fill.name)
            + fill.config()
        )  # fmt: skip
        port = free_port()
        argv = [sys.executable, "-m", "core.cli", "--config", str(config)]
        argv += ["serve", "--port", str(port)]
        proc = self.procs.spawn(name, argv)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_until_ready(url, proc, self.deadline.left(60)))
        return proc, url

    def measure(self, name: str, url: str) -> dict[str, Any]:
        """Listings; then chats alone and chats under the listing load of a child, in turns
        (ROUNDS blocks of each), so that the machine's drift falls on both alike."""
        c = self.counts
        progress(f"{name}: {c.listings} listings, then {c.listings} cursor pages")
        listing, pages = asyncio.run(_listings(url, c))
        alone, under, loads = Series(), Series(), []
        block, warmup = c.chats // ROUNDS, c.warmup // ROUNDS
        for round_ in range(ROUNDS):
            progress(f"{name}: round {round_ + 1}/{ROUNDS}, {block} chats alone, {block}"
                     f" under {c.load_rate:.0f} listings/s")  # fmt: skip
            asyncio.run(_chats(url, block, warmup, alone))
            loads.append(self._under_load(f"{name}-load-{round_}", url, block, warmup, under))
        return {
            "listing": listing.json(),
            "cursor_pages": pages.json(),
            "chat_alone": alone.json(),
            "chat_under_load": under.json(),
            "load": _merged(loads),
        }

    def _under_load(
        self, name: str, url: str, count: int, warmup: int, into: Series
    ) -> dict[str, Any]:
        """`count` chats while a child lists; what the child measured."""
        c = self.counts
        ready = self.tmp / f"{name}.ready"
        argv = [sys.executable, "-m", "bench.store", "listing-load", "--url", url]
        argv += ["--key", KEYS[LISTER], "--clients", str(c.load_clients)]
        argv += ["--rate", str(c.load_rate), "--ready-file", str(ready)]
        load = self.procs.spawn(name, argv, stdout=subprocess.PIPE)
        try:
            wait_for_file(ready, load, self.deadline.left(30))
            asyncio.run(_chats(url, count, warmup, into))
        finally:
            load.send_signal(signal.SIGTERM)  # it stops listing, and says how it went
        out, _ = load.communicate(timeout=self.deadline.left(30))
        if load.returncode != 0:
            tail = self.procs.log_tail(name)
            raise BenchError(f"the listing load exited {load.returncode}:\n{tail}")
        found: dict[str, Any] = orjson.loads(out)
        return found


def _merged(loads: list[dict[str, Any]]) -> dict[str, Any]:
    """The listing load's rounds as one: listings a second, latencies, errors."""
    times = [ms for load in loads for ms in load["times"]]
    seconds = sum(load["seconds"] for load in loads)
    return {
        "listings_per_s": len(times) / max(seconds, 1e-9),
        "latency_ms": summary(times),
        "errors": {"total": sum(load["errors"]["total"] for load in loads)},
    }


async def _until_ready(url: str, proc: subprocess.Popen[bytes], seconds: float) -> None:
    """`/health/ready` answers 200 (the store open), and a chat is answered whole."""
    ends = time.monotonic() + seconds
    async with _session(CHATTER) as session:
        while time.monotonic() < ends:
            if proc.poll() is not None:
                raise BenchError(f"chatbus exited {proc.returncode} before it was ready")
            try:
                async with session.get(f"{url}/health/ready") as response:
                    if response.status == 200:
                        await chat(session, _chat_target(url), REQUEST_LIMITS)
                        return
            except (aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.05)
    raise BenchError(f"chatbus at {url} not ready after {seconds:.0f} s")


def _session(tenant: str) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
    return aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0))


def _chat_target(url: str) -> Target:
    return Target.of("chatbus:fast", url, TOKENS)


@dataclass
class Series:
    """One kind of request's latencies (ms) and errors, over one run or several."""

    times: list[float] = field(default_factory=list)
    errors: Errors = field(default_factory=Errors)

    def json(self) -> dict[str, Any]:
        return {"latency_ms": summary(self.times), "errors": self.errors.json()}


async def _timed(
    count: int, warmup: int, once: Callable[[], Awaitable[None]], into: Series
) -> None:
    """`count` calls of `once` one after another (after `warmup` untimed), or as many as
    fit in MEASURE_CAP_S (a slow store), into `into`."""
    ends = time.perf_counter() + MEASURE_CAP_S
    for n in range(warmup + count):
        started = time.perf_counter()
        if started > ends:
            break
        try:
            await once()
        except FAILURES as exc:
            into.errors.add(exc)
            continue
        if n >= warmup:
            into.times.append((time.perf_counter() - started) * 1000)


async def _chats(url: str, count: int, warmup: int, into: Series) -> None:
    target = _chat_target(url)
    async with _session(CHATTER) as session:
        await _timed(count, warmup, lambda: chat(session, target, REQUEST_LIMITS), into)


async def list_once(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """A whole page of 20 conversations (every tenant listed has more)."""
    async with session.get(url, timeout=REQUEST_LIMITS) as response:
        if response.status != 200:
            raise ValueError(f"listing: status {response.status}")
        body: dict[str, Any] = await response.json()
    if len(body["conversations"]) != PAGE:
        raise ValueError(f"listing: {len(body['conversations'])} conversations, not {PAGE}")
    return body


async def _listings(url: str, c: Counts) -> tuple[Series, Series]:
    """The first page, again and again; then pages followed by `next_cursor`."""
    first_page = f"{url}/conversations?limit={PAGE}"
    listing, pages = Series(), Series()
    async with _session(LISTER) as session:

        async def list_first() -> None:
            await list_once(session, first_page)

        await _timed(c.listings, c.warmup, list_first, listing)
        cursor = [(await list_once(session, first_page))["next_cursor"]]

        async def next_page() -> None:
            # Deeper and deeper; from the first page again once the next is not whole.
            page = f"{first_page}&cursor={cursor[0]}" if cursor[0] else first_page
            try:
                cursor[0] = (await list_once(session, page))["next_cursor"]
            except ValueError:
                cursor[0] = None
                raise

        await _timed(c.listings, 0, next_page, pages)
    return listing, pages


def run_size(bench: StoreBench, fill: Fill, turns: int, added: int) -> dict[str, Any]:
    """Fill `fill` up to `turns` (it holds `added`), start chatbus on it, measure, stop it."""
    new = (turns - added) // TURNS_A_CONVERSATION
    progress(f"{fill.name}: filling to {turns} turns")
    started = time.perf_counter()
    fill.add(filled_turns(added // TURNS_A_CONVERSATION, new, first_seq=added + 1))
    fill_s = time.perf_counter() - started
    name = f"chatbus-{fill.name}-{turns}"
    proc, url = bench.chatbus(name, fill)
    try:
        measured = bench.measure(name, url)
    finally:
        stop(proc)
    return {
        "store": fill.name,
        "turns": turns,
        "conversations": turns // TURNS_A_CONVERSATION,
        "lister_conversations": turns // TURNS_A_CONVERSATION // TENANTS,
        "fill_s": fill_s,
        "fill_turns_per_s": (turns - added) / max(fill_s, 1e-9),
        **measured,
    }


def batched(items: Iterator[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (itertools.batched is Python 3.12's)."""
    while batch := list(itertools.islice(items, size)):
        yield batch


def run_store(
    bench: StoreBench, fill: Fill, sizes: tuple[int, ...]
) -> tuple[list[dict[str, Any]], list[str]]:
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    asyncio.run(fill.prepare())
    try:
        added = 0
        for turns in sizes:
            if fill.name == "mongo" and rows:
                projected = (turns - added) / rows[-1]["fill_turns_per_s"]
                if projected > MONGO_FILL_BUDGET_S:
                    notes.append(
                        f"MongoDB (SecantusDB) at {turns:,} turns skipped: filling would take"
                        f" about {projected / 60:.1f} min at the"
                        f" {rows[-1]['fill_turns_per_s']:,.0f} turns/s measured (over the"
                        f" {MONGO_FILL_BUDGET_S / 60:.0f} min budget)"
                    )
                    break
            rows.append(run_size(bench, fill, turns, added))
            added = turns
    finally:
        fill.close()
    return rows, notes


def run(
    counts: Counts, sizes: tuple[int, ...], procs: Procs, deadline: Deadline, tmp: Path
) -> dict[str, Any]:
    bench = StoreBench(counts, procs, deadline, tmp)
    progress("starting the fake upstream")
    bench.start_upstream()
    rows, notes = [], []
    for fill in (SqliteFill(tmp), MongoFill(tmp)):
        found, skipped = run_store(bench, fill, sizes)
        rows += found
        notes += skipped
    return {"rows": rows, "notes": notes}


# The listing load (a child process)


async def listing_load(args: argparse.Namespace) -> dict[str, Any]:
    """`clients` loops, each listing `rate / clients` times a second, until SIGTERM."""
    url = f"{args.url}/conversations?limit={PAGE}"
    interval = args.clients / args.rate
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    times: list[float] = []
    errors = Errors()
    headers = {"Authorization": f"Bearer {args.key}"}

    async def client(session: aiohttp.ClientSession) -> None:
        while not stopped.is_set():
            started = time.perf_counter()
            try:
                await list_once(session, url)
                times.append((time.perf_counter() - started) * 1000)
            except FAILURES as exc:
                errors.add(exc)
            with contextlib.suppress(TimeoutError):  # paced; woken at once by the stop
                pause = max(0.0, interval - (time.perf_counter() - started))
                await asyncio.wait_for(stopped.wait(), pause)

    async with aiohttp.ClientSession(headers=headers) as session:
        await list_once(session, url)
        await asyncio.to_thread(Path(args.ready_file).write_text, "ready")
        began = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(args.clients)))
        seconds = time.perf_counter() - began
    return {"seconds": seconds, "times": times, "errors": errors.json()}


# The report


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| store | turns | conversations (listed tenant's) | fill (turns/s) | listing p50"
        " | listing p95 | cursor page p50 | chat p50 alone | chat p50 under listing load"
        " | ratio | load listings/s (p50) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        listing, alone = row["listing"]["latency_ms"], row["chat_alone"]["latency_ms"]
        under, load = row["chat_under_load"]["latency_ms"], row["load"]
        ratio = under["p50"] / alone["p50"] if under["p50"] and alone["p50"] else None
        lines.append(
            f"| {'SQLite' if row['store'] == 'sqlite' else 'MongoDB (SecantusDB)'}"
            f" | {row['turns']:,} | {row['conversations']:,} ({row['lister_conversations']:,})"
            f" | {row['fill_s']:.1f} s ({row['fill_turns_per_s']:,.0f})"
            f" | {ms(listing['p50'])} ms | {ms(listing['p95'])} ms"
            f" | {ms(row['cursor_pages']['latency_ms']['p50'])} ms"
            f" | {ms(alone['p50'])} ms | {ms(under['p50'])} ms"
            f" | {'—' if ratio is None else f'{ratio:.2f}'}"
            f" | {load['listings_per_s']:.0f} ({ms(load['latency_ms']['p50'])} ms) |"
        )
    return lines


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sqlite = [row for row in rows if row["store"] == "sqlite"]
    found = []
    largest = max(sqlite, key=lambda row: row["turns"], default=None)
    if largest is not None:
        p50 = largest["listing"]["latency_ms"]["p50"]
        found.append({
            "target": f"SQLite: listing p50 < 10 ms at {largest['turns']:,} turns"
                      + ("" if largest["turns"] >= 1_000_000 else " (the target is at 1M)"),
            "value": f"{ms(p50)} ms", "met": p50 is not None and p50 < 10,
        })  # fmt: skip
    for row in sqlite:
        alone, under = (
            row["chat_alone"]["latency_ms"]["p50"],
            row["chat_under_load"]["latency_ms"]["p50"],
        )
        ratio = under / alone if alone and under else None
        found.append({
            "target": f"SQLite, {row['turns']:,} turns: a chat's p50 under listing load"
                      " within 10% of its p50 alone",
            "value": "—" if ratio is None else f"{ratio:.2f} of it",
            "met": ratio is not None and ratio <= 1.10,
        })  # fmt: skip
    return found


def render(results: dict[str, Any]) -> str:
    c = results["counts"]
    lines = [
        "# Store benchmark (`make bench-store`, bench/store.py)",
        "",
        f"{results['date']}, commit {results['commit']}, {results['machine']}."
        + (" Quick run (10k turns only)." if results["quick"] else ""),
        "",
        f"Each store filled directly, {TURNS_A_CONVERSATION} turns a conversation over"
        f" {TENANTS} tenants, by a bulk insert through the store's own schema (SQLite: its"
        " columns, its triggers keeping the conversations table; MongoDB: its turn documents"
        " and conversation summaries), then a real chatbus process started on it and measured"
        f" over loopback: `GET /conversations?limit=20` for the tenant with a quarter of the"
        f" conversations ({c['listings']} first pages, then {c['listings']} pages followed by"
        f" `next_cursor`), and another tenant's `/chat/chat` ({TOKENS} tokens from the fake"
        f" upstream; chats one after another) alone and while another process lists at"
        f" {c['load_rate']:.0f} listings/s ({c['load_clients']} clients), in turns:"
        f" {ROUNDS} blocks of {c['chats'] // ROUNDS} chats each way. Latencies in ms, whole"
        " answers; the load's own listing rate and p50 in the last column.",
        "",
        *table(results["rows"]),
        "",
        "## Targets",
        "",
        "| target | value | met |",
        "|---|---:|---|",
        *(
            f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'NO'} |"
            for t in results["targets"]
        ),
        "",
    ]
    if results["notes"]:
        lines += ["## Notes", "", *(f"- {note}" for note in results["notes"]), ""]
    return "\n".join(lines)


def errors_total(rows: list[dict[str, Any]]) -> int:
    parts = ("listing", "cursor_pages", "chat_alone", "chat_under_load", "load")
    return sum(row[part]["errors"]["total"] for row in rows for part in parts)


def commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def progress(message: str) -> None:
    print(f"bench.store: {message}", file=sys.stderr, flush=True)


def _terminated(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def bench_main(args: argparse.Namespace) -> int:
    counts, sizes = (QUICK, QUICK_SIZES) if args.quick else (FULL, FULL_SIZES)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _terminated)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="chatbus-bench-store-") as tmp:
        logdir = Path(tmp)
        with Procs(logdir, env, ROOT) as procs:
            try:
                found = run(counts, sizes, procs, Deadline(counts.deadline_s), logdir)
            except (BenchError, KeyboardInterrupt) as exc:
                print(f"bench.store: {exc or 'interrupted'}", file=sys.stderr)
                return 1
    results = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores,"
        f" Python {platform.python_version()}",
        "quick": args.quick,
        "counts": asdict(counts),
        **found,
        "targets": targets(found["rows"]),
    }
    results["errors_total"] = errors_total(found["rows"])
    text = render(results)
    out.write_text(text)
    out.with_suffix(".json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--quick", action="store_true", help="10k turns only")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    load = sub.add_parser("listing-load", help="a child of the benchmark: list until told")
    load.add_argument("--url", required=True)
    load.add_argument("--key", required=True)
    load.add_argument("--clients", type=int, default=4)
    load.add_argument("--rate", type=float, default=100.0, help="listings a second, in all")
    load.add_argument("--ready-file", required=True)
    args = parser.parse_args(argv)
    if args.command == "listing-load":
        if not args.url.startswith("http://127.0.0.1:"):
            parser.error("--url must be on loopback")
        sys.stdout.buffer.write(orjson.dumps(asyncio.run(listing_load(args))))
        return 0
    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
