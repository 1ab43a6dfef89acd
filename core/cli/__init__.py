"""The `chatbus` command: `serve` the API, `chat` from the terminal, look at what is stored.

Every command runs in-process on the configuration (no server needs to run): `chat` opens
the chat service itself, `conversations` and `webhooks` open the history store.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import PackageNotFoundError, version

import structlog

from core.cli.chatting import chat_command
from core.cli.listing import conversations_command, models_command, outbox_command
from core.cli.running import config_problem
from core.cli.serving import serve_command
from core.config import ConfigError
from core.config_sources import load_config, misnamed_overrides
from core.logs import configure_logging
from core.outbox import DeliveryStatus

log = structlog.get_logger("chatbus.cli")


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
        print(config_problem(config, exc), file=sys.stderr)
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
    serve.add_argument(
        "--workers",
        type=_at_least_one,
        metavar="N",
        help="processes serving the port together (SO_REUSEPORT, Linux; default: config, 1)",
    )
    serve.set_defaults(run=serve_command)

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
    chat.set_defaults(run=chat_command)

    models = command("models", "the configured models")
    models.set_defaults(run=models_command)

    conversations = command(
        "conversations", "stored conversations, the latest first; with an ID, its turns"
    )
    conversations.add_argument("conversation_id", nargs="?", metavar="ID")
    conversations.add_argument("--tenant", default="default", help="whose (default: default)")
    conversations.add_argument("--limit", type=int, default=20, help="at most this many")
    conversations.set_defaults(run=conversations_command)

    webhooks = command("webhooks", "the webhook outbox: list, redeliver")
    actions = webhooks.add_subparsers(required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="deliveries, newest first", parents=[common])
    listing.add_argument("--status", choices=[str(status) for status in DeliveryStatus])
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(run=outbox_command, action="list")
    redeliver = actions.add_parser(
        "redeliver", help="make a delivery pending again, due now", parents=[common]
    )
    redeliver.add_argument("delivery_id")
    redeliver.set_defaults(run=outbox_command, action="redeliver")
    return parser


def _at_least_one(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {number}")
    return number


def _version() -> str:
    try:
        return version("chatbus")
    except PackageNotFoundError:  # run from a clone without installing it
        return "unknown"
