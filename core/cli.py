"""The `chatbus` command: `serve` the API, or `chat` from the terminal."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

from core.chat import Caller
from core.chat_input import ChatInput, stored_turns_wanted
from core.config import Config, ConfigError, load_config
from core.errors import ChatError, StoreUnavailable
from core.logs import configure_logging
from core.outbox import DeliveryStatus
from core.validation import query_problem

T = TypeVar("T")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"chatbus: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return args.run(config, args)
    except ConfigError as exc:  # found while building what the config names
        print(f"chatbus: configuration error: {config.source}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatbus", description=__doc__)
    parser.add_argument("--config", help="TOML file (default: $CHATBUS_CONFIG or ./config.toml)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--host", help="address to listen on (default: config, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: config, 7861)")
    serve.set_defaults(run=_serve)

    chat = commands.add_parser("chat", help="ask one question; the answer streams to stdout")
    chat.add_argument("question")
    chat.add_argument("--model", help="a configured model (default: default_model)")
    chat.add_argument("--conversation", default="", help="conversation id to continue")
    chat.add_argument(
        "--history-len",
        type=int,
        default=10,
        help="past turns of --conversation to send (default 10)",
    )
    chat.set_defaults(run=_chat)

    webhooks = commands.add_parser("webhooks", help="the webhook outbox: list, redeliver")
    actions = webhooks.add_subparsers(required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="deliveries, newest first")
    listing.add_argument("--status", choices=[str(status) for status in DeliveryStatus])
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(run=_outbox, action="list")
    redeliver = actions.add_parser("redeliver", help="make a delivery pending again, due now")
    redeliver.add_argument("delivery_id")
    redeliver.set_defaults(run=_outbox, action="redeliver")
    return parser


def _serve(config: Config, args: argparse.Namespace) -> int:
    from core.server import serve

    server = config.server.model_copy(
        update={
            key: value
            for key, value in (("host", args.host), ("port", args.port))
            if value is not None
        }
    )
    _run(serve(config.model_copy(update={"server": server})))
    return 0


def _chat(config: Config, args: argparse.Namespace) -> int:
    problem = query_problem(args.question, config.chat.max_query_chars)
    if problem is not None:
        print(f"chatbus: query: {problem}", file=sys.stderr)
        return 2
    conversation = args.conversation or uuid.uuid4().hex  # so a next call can continue it
    request = ChatInput(
        query=args.question,
        conversation_id=conversation,
        history_len=stored_turns_wanted(conversation, (), args.history_len),
        model=args.model,
        stream=True,
    )
    return _run(_chat_once(config, request))


async def _chat_once(config: Config, request: ChatInput) -> int:
    from core.app import open_service

    async def send(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    async with open_service(config) as service:
        try:
            async with service.start(request, Caller(request_id=uuid.uuid4().hex)) as turn:
                result = await turn.run(send)
        except (ChatError, StoreUnavailable) as exc:
            print(f"chatbus: {exc}", file=sys.stderr)
            return 2
    print()
    if result.error is not None:
        print(f"chatbus: {result.error.type}: {result.error}", file=sys.stderr)
        return 1
    print(f"[conversation {request.conversation_id}, message {result.message_id}]", file=sys.stderr)
    return 0


def _outbox(config: Config, args: argparse.Namespace) -> int:
    return _run(_outbox_action(config, args))


async def _outbox_action(config: Config, args: argparse.Namespace) -> int:
    from core.app import make_store
    from core.plugins import make_plugin_manager

    store = make_store(config, make_plugin_manager(config.plugins.modules))
    await store.open()
    try:
        if args.action == "redeliver":
            if not await store.outbox.redeliver(args.delivery_id, time.time()):
                print(f"chatbus: no delivery '{args.delivery_id}'", file=sys.stderr)
                return 1
            print(f"{args.delivery_id}: pending, due now")
            return 0
        status = DeliveryStatus(args.status) if args.status else None
        for d in await store.outbox.deliveries(status, args.limit):
            due = datetime.fromtimestamp(d.next_attempt_at, UTC).isoformat(timespec="seconds")
            print(f"{d.delivery_id}  {d.status:<9}  attempts={d.attempts}  {d.event_type}"
                  f"  {d.url}  next={due}  {d.last_error or ''}".rstrip())  # fmt: skip
        return 0
    finally:
        await store.close()


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed: the hot path's I/O costs about half."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


if __name__ == "__main__":
    sys.exit(main())
