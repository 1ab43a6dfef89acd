"""`Retry-After` (RFC 9110 section 10.2.3), read safely: what an upstream or a webhook receiver
asks us to wait, as a number of seconds we can sleep on or store.

The header is whatever the other side sent: nothing in it may reach `asyncio.sleep` or a
store unchecked (NaN makes one raise and the other reject the row; inf parks forever).
"""

from __future__ import annotations

import re
import time
from datetime import UTC
from email.utils import parsedate_to_datetime

# delta-seconds is digits only; a fraction or an exponent is accepted (some servers send
# them), a sign, "nan", "inf" or an underscore is not.
DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?")


def retry_after_seconds(value: str | None, cap: float, now: float | None = None) -> float | None:
    """Seconds to wait, a finite float in [0, cap]; None when `value` is missing or unusable
    (then the caller's own schedule applies). `value` is delta-seconds or an HTTP-date,
    relative to `now` (wall clock, `time.time()` by default): a date in the past means 0."""
    if not value or not isinstance(value, str):
        return None
    text = value.strip()
    if DELTA_SECONDS.fullmatch(text):
        seconds: float | None = float(text)  # beyond a float's range gives inf: capped below
    else:
        seconds = _seconds_until(text, time.time() if now is None else now)
    if seconds is None:
        return None
    return min(max(seconds, 0.0), cap)


def _seconds_until(http_date: str, now: float) -> float | None:
    try:
        at = parsedate_to_datetime(http_date)
        if at.tzinfo is None:  # "-0000" or asctime: RFC 9110 dates are always UTC
            at = at.replace(tzinfo=UTC)
        return at.timestamp() - now
    except (ValueError, TypeError, OverflowError, IndexError):
        return None
