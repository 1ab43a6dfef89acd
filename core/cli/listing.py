"""What is stored: `chatbus models`, `conversations` and the `webhooks` outbox."""

from __future__ import annotations

import argparse
import sys
import time

from core.cli.running import line, opened_store, print_table, run, when
from core.config import Config
from core.outbox import DeliveryStatus


def models_command(config: Config, args: argparse.Namespace) -> int:
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


def conversations_command(config: Config, args: argparse.Namespace) -> int:
    return run(_show_conversations(config, args))


async def _show_conversations(config: Config, args: argparse.Namespace) -> int:
    async with opened_store(config) as store:
        if args.conversation_id is None:
            found = await store.conversations(args.tenant, args.limit, 0)
            if not found:
                print(f"no conversations (tenant {args.tenant})", file=sys.stderr)
            else:
                rows = [
                    [c.conversation_id, str(c.turns), when(c.updated_at), line(c.first_query)]
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
            print(f"[{when(turn.created_at)}  {turn.model}  {turn.status}{error}]")
            print(f"> {turn.query}\n{turn.response}\n")
        return 0


# --- webhooks ------------------------------------------------------------------------------


def outbox_command(config: Config, args: argparse.Namespace) -> int:
    return run(_outbox_action(config, args))


async def _outbox_action(config: Config, args: argparse.Namespace) -> int:
    async with opened_store(config) as store:
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
             when(d.next_attempt_at), d.last_error or ""]
            for d in found
        ]  # fmt: skip
        header = ["ID", "STATUS", "ATTEMPTS", "EVENT", "URL", "NEXT ATTEMPT", "LAST ERROR"]
        print_table(header, rows)
        return 0
