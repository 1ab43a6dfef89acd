"""The `chatbus` command: `serve` the API, `chat` from the terminal, look at what is stored.

Every command runs in-process on the configuration (no server needs to run): `chat` opens
the chat service itself, `conversations` and `webhooks` open the history store.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import structlog

from core.chat import Caller, ChatService
from core.chat_input import ChatInput, stored_turns_wanted
from core.config import Config, ConfigError
from core.config_sources import load_config, misnamed_overrides
from core.errors import ChatError, StoreUnavailable
from core.history import HistoryStore
from core.logs import configure_logging
from core.outbox import DeliveryStatus
from core.providers import GenerationParams
from core.registry import Failure
from core.turn import TurnResult
from core.validation import query_problem

T = TypeVar("T")
log = structlog.get_logger("chatbus.cli")
CHATCHAT_PORT = 7861  # Langchain-Chatchat's API port, chatbus's default
LEAVE_WORDS = ("exit", "quit")  # as `llm chat`: these end an interactive session too


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", "info"))
    try:
        config = load_config(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"chatbus: configuration error: {exc}", file=sys.stderr)
        return 2
    for variable, meant in misnamed_overrides(os.environ, config).items():
        log.warning("not a configuration override", variable=variable, did_you_mean=meant)
    try:
        code: int = args.run(config, args)
        return code
    except ConfigError as exc:  # found while building what the config names
        print(f"chatbus: configuration error: {config.source}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    # Accepted before the command and after it (`chatbus serve --config my.toml`): each
    # parser has them, and SUPPRESS leaves an option given earlier alone.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="TOML file (default: $CHATBUS_CONFIG or ./config.toml)",
    )
    common.add_argument(
        "--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning"]
    )
    parser = argparse.ArgumentParser(prog="chatbus", description=__doc__, parents=[common])
    parser.add_argument("--version", action="version", version=f"chatbus {_version()}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, parents=[common])

    serve = command("serve", "serve the HTTP API")
    serve.add_argument("--host", help="address to listen on (default: config, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: config, 7861)")
    serve.set_defaults(run=_serve)

    chat = command(
        "chat",
        "ask a question, the answer streamed to stdout; with no question, an interactive"
        " session (Ctrl-D leaves)",
    )
    chat.add_argument("question", nargs="?", help="the question; '-' reads it from stdin")
    chat.add_argument("--model", help="a configured model (default: default_model)")
    chat.add_argument("--conversation", default="", help="conversation id to continue")
    chat.add_argument(
        "--history-len",
        type=int,
        help="past turns of the conversation to send (default: [chat] default_history_len)",
    )
    chat.add_argument("--system", help="a system message sent before the conversation")
    chat.add_argument("--temperature", type=float, help="0.0 to 2.0 (default 0.7)")
    chat.add_argument("--prompt-name", default="default", help="a template in [prompts]")
    chat.set_defaults(run=_chat)

    models = command("models", "the configured models")
    models.set_defaults(run=_models)

    conversations = command(
        "conversations", "stored conversations, the latest first; with an ID, its turns"
    )
    conversations.add_argument("conversation_id", nargs="?", metavar="ID")
    conversations.add_argument("--tenant", default="default", help="whose (default: default)")
    conversations.add_argument("--limit", type=int, default=20, help="at most this many")
    conversations.set_defaults(run=_conversations)

    webhooks = command("webhooks", "the webhook outbox: list, redeliver")
    actions = webhooks.add_subparsers(required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="deliveries, newest first", parents=[common])
    listing.add_argument("--status", choices=[str(status) for status in DeliveryStatus])
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(run=_outbox, action="list")
    redeliver = actions.add_parser(
        "redeliver", help="make a delivery pending again, due now", parents=[common]
    )
    redeliver.add_argument("delivery_id")
    redeliver.set_defaults(run=_outbox, action="redeliver")
    return parser


def _version() -> str:
    try:
        return version("chatbus")
    except PackageNotFoundError:  # run from a clone without installing it
        return "unknown"


# --- serve ---------------------------------------------------------------------------------


def _serve(config: Config, args: argparse.Namespace) -> int:
    from core.server import serve

    server = config.server.model_copy(
        update={
            key: value
            for key, value in (("host", args.host), ("port", args.port))
            if value is not None
        }
    )
    try:
        _run(serve(config.model_copy(update={"server": server})))
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


# --- chat ----------------------------------------------------------------------------------


def _chat(config: Config, args: argparse.Namespace) -> int:
    if args.question is None:
        return _session(config, args)
    question = sys.stdin.read().rstrip() if args.question == "-" else args.question
    conversation = args.conversation or uuid.uuid4().hex  # so a next call can continue it
    request = _request(config, args, question, conversation)
    if request is None:
        return 2
    return _run(_chat_once(config, request))


def _request(
    config: Config, args: argparse.Namespace, question: str, conversation: str
) -> ChatInput | None:
    """The chat input for one question; None (the problem said) when it is not valid."""
    problem = query_problem(question, config.chat.max_query_chars)
    if problem is not None:
        print(f"chatbus: query: {problem}", file=sys.stderr)
        return None
    history_len = args.history_len
    if history_len is None:
        history_len = config.chat.default_history_len
    # System messages alone: the stored turns follow them.
    history = ({"role": "system", "content": args.system},) if args.system else ()
    return ChatInput(
        query=question,
        history=history,
        conversation_id=conversation,
        history_len=stored_turns_wanted(conversation, history, history_len),
        model=args.model,
        prompt_name=args.prompt_name,
        stream=True,
        params=GenerationParams(temperature=args.temperature),
    )


async def _chat_once(config: Config, request: ChatInput) -> int:
    from core.app import open_service

    async with open_service(config) as service:
        result = await _answer(service, request)
    if result is None:
        return 2
    if result.error is not None:
        return 1
    print(f"[conversation {request.conversation_id}, message {result.message_id}]", file=sys.stderr)
    return 0


async def _answer(service: ChatService, request: ChatInput) -> TurnResult | None:
    """Stream one answer to stdout and say on stderr which model answered, after which
    failures, or why there is no answer; None when the chat could not start."""

    async def send(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        async with service.start(request, Caller(request_id=uuid.uuid4().hex)) as turn:
            result = await turn.run(send)
    except (ChatError, StoreUnavailable) as exc:
        print(f"chatbus: {exc}", file=sys.stderr)
        return None
    print()
    failures = list(result.failures)
    if result.error is not None:
        if not failures or failures[-1].error is not result.error:
            failures.append(Failure(result.model, result.error))  # after text, a time limit
        print(f"chatbus: {result.error.type}: {_said(failures)}", file=sys.stderr)
    elif failures:
        print(f"[{_said(failures)}; answered by {result.model}]", file=sys.stderr)
    return result


def _said(failures: list[Failure]) -> str:
    """`model: error` for each model and error, with how many attempts failed that way."""
    counted: dict[tuple[str, str], int] = {}
    for failure in failures:
        key = (failure.model, str(failure.error))
        counted[key] = counted.get(key, 0) + 1
    return "; ".join(
        f"{model}: {error}" + (f" ({count} attempts)" if count > 1 else "")
        for (model, error), count in counted.items()
    )


def _session(config: Config, args: argparse.Namespace) -> int:
    """An interactive chat, as `llm chat`: one conversation, each question a line, until
    Ctrl-D (or `exit`). The service stays open between questions; its loop runs only while
    a question is answered (and at the end), not while the terminal is read, so background
    work (an answer's end retried after a store failure) waits for the next question."""
    from core.app import open_service

    conversation = args.conversation or uuid.uuid4().hex
    with _runner() as runner:
        stack = AsyncExitStack()
        service = runner.run(stack.enter_async_context(open_service(config)))
        try:
            model = args.model or config.default_model
            print(f"Chatting with {model}, conversation {conversation}.", file=sys.stderr)
            print("Type 'exit' or 'quit' (or press Ctrl-D) to leave.", file=sys.stderr)
            while (question := _next_question()) is not None:
                request = _request(config, args, question, conversation) if question else None
                if request is not None:
                    runner.run(_answer(service, request))
        finally:
            runner.run(stack.aclose())
    return 0


def _next_question() -> str | None:
    """The next line typed (line editing on a terminal), stripped; None to leave."""
    try:
        line = input("> " if sys.stdin.isatty() else "")
    except EOFError:
        return None
    line = line.strip()
    return None if line in LEAVE_WORDS else line


# --- models and conversations --------------------------------------------------------------


def _models(config: Config, args: argparse.Namespace) -> int:
    rows = [
        [
            name + (" (default)" if name == config.default_model else ""),
            model.provider,
            str(model.options().get("model", "")),
            ", ".join(model.fallbacks),
        ]
        for name, model in config.models.items()
    ]
    print_table(["NAME", "PROVIDER", "UPSTREAM MODEL", "FALLBACKS"], rows)
    return 0


def _conversations(config: Config, args: argparse.Namespace) -> int:
    return _run(_show_conversations(config, args))


async def _show_conversations(config: Config, args: argparse.Namespace) -> int:
    async with _store(config) as store:
        if args.conversation_id is None:
            found = await store.conversations(args.tenant, args.limit, 0)
            if not found:
                print(f"no conversations (tenant {args.tenant})", file=sys.stderr)
            else:
                rows = [
                    [c.conversation_id, str(c.turns), _when(c.updated_at), _line(c.first_query)]
                    for c in found
                ]
                print_table(["ID", "TURNS", "UPDATED", "FIRST QUESTION"], rows)
            return 0
        turns = await store.messages(args.tenant, args.conversation_id, args.limit, 0)
        if not turns:
            print(f"chatbus: no conversation '{args.conversation_id}'", file=sys.stderr)
            return 1
        for turn in turns:
            error = f" ({turn.error})" if turn.error else ""
            print(f"[{_when(turn.created_at)}  {turn.model}  {turn.status}{error}]")
            print(f"> {turn.query}\n{turn.response}\n")
        return 0


# --- webhooks ------------------------------------------------------------------------------


def _outbox(config: Config, args: argparse.Namespace) -> int:
    return _run(_outbox_action(config, args))


async def _outbox_action(config: Config, args: argparse.Namespace) -> int:
    async with _store(config) as store:
        if args.action == "redeliver":
            if not await store.outbox.redeliver(args.delivery_id, time.time()):
                print(f"chatbus: no delivery '{args.delivery_id}'", file=sys.stderr)
                return 1
            print(f"{args.delivery_id}: pending, due now")
            return 0
        status = DeliveryStatus(args.status) if args.status else None
        found = await store.outbox.deliveries(status, args.limit)
        if not found:
            what = f"{status} deliveries" if status else "deliveries"
            print(f"no {what} in the outbox", file=sys.stderr)
            return 0
        rows = [
            [d.delivery_id, str(d.status), str(d.attempts), d.event_type, d.url,
             _when(d.next_attempt_at), d.last_error or ""]
            for d in found
        ]  # fmt: skip
        header = ["ID", "STATUS", "ATTEMPTS", "EVENT", "URL", "NEXT ATTEMPT", "LAST ERROR"]
        print_table(header, rows)
        return 0


# --- helpers -------------------------------------------------------------------------------


@asynccontextmanager
async def _store(config: Config) -> AsyncIterator[HistoryStore]:
    """The configured history store, opened, without the rest of the service."""
    from core.app import make_store
    from core.plugins import plugin_manager

    store = make_store(config, plugin_manager(config))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns aligned, two spaces apart, a header first."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _line(text: str, width: int = 60) -> str:
    """Text on one line, cut at `width` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _runner() -> asyncio.Runner:
    """An event loop on uvloop when it is installed: the hot path's I/O costs about half."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _run(main: Coroutine[Any, Any, T]) -> T:
    with _runner() as runner:
        return runner.run(main)


if __name__ == "__main__":
    sys.exit(main())
