"""How the MongoDB driver's errors reach chatbus: as StoreUnavailable, when the store cannot
be used now."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pymongo.errors import ConnectionFailure, ExecutionTimeout, OperationFailure, WTimeoutError

from core.history import StoreUnavailable

UNREACHABLE = (ConnectionFailure, ExecutionTimeout, WTimeoutError)
AUTHENTICATION_FAILED, UNAUTHORIZED = 18, 13  # MongoDB's error codes
BAD_CREDENTIALS = "MongoDB authentication failed: check the user and password in the URI"


@contextmanager
def reachable() -> Iterator[None]:
    """Connection trouble, and credentials the server refuses, become StoreUnavailable (the
    service keeps running, and /health/ready says why); other driver errors stay what they
    are. No message of the driver's is passed on: the URI it was given holds the password."""
    try:
        yield
    except UNREACHABLE as exc:
        # After a refused login, the driver reports the server as not found, with why.
        if "AuthenticationFailed" in str(exc):
            raise StoreUnavailable(BAD_CREDENTIALS) from None
        raise StoreUnavailable(f"MongoDB unreachable ({type(exc).__name__})") from None
    except OperationFailure as exc:
        if exc.code == AUTHENTICATION_FAILED:
            raise StoreUnavailable(BAD_CREDENTIALS) from None
        if exc.code == UNAUTHORIZED:
            raise StoreUnavailable(
                "MongoDB refused the operation: the user lacks the readWrite role on the database"
            ) from None
        raise
