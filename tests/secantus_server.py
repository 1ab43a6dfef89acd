"""SecantusDB for the tests, as `python -m secantus` runs it, but aborting abandoned
transactions the way mongod does: a background thread aborts a transaction idle past its
lifetime (mongod: `transactionLifetimeLimitSeconds`, 60 s by default, checked by a periodic
thread). SecantusDB's daemon has no setting for the lifetime (60 s) and aborts an expired
transaction only when another transaction command arrives: a client killed inside a
transaction (kill -9) leaves its documents locked until then, so a plain write to them,
and a drop of their database, can wait forever (tests/test_mongo_server.py shows it).

A test dependency run as its own process (GPL-2.0); chatbus never imports SecantusDB.
Usage: python tests/secantus_server.py --port P --storage-path DIR --transaction-lifetime S
[--auth]"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from secantus.server import SecantusDBServer  # type: ignore[import-untyped]

REAPS_PER_LIFETIME = 5  # how often within a lifetime expired transactions are looked for


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--storage-path", required=True)
    parser.add_argument("--auth", action="store_true")
    parser.add_argument("--transaction-lifetime", type=float, required=True, metavar="SECONDS")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    server = SecantusDBServer(
        host=args.host,
        port=args.port,
        storage_path=args.storage_path,
        require_auth=args.auth,
        enable_test_commands=False,  # as the daemon
        transaction_lifetime_seconds=args.transaction_lifetime,
    )
    stopped = threading.Event()

    def abort_expired_transactions() -> None:
        while not stopped.wait(args.transaction_lifetime / REAPS_PER_LIFETIME):
            server.transactions.prune_expired()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopped.set()
        server.stop()
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    server.start()
    threading.Thread(target=abort_expired_transactions, daemon=True).start()
    server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
