"""The one place that reads and writes timestamps.

Stored times are ISO-8601 UTC with a `Z`; anything read back (our items, providers' fields, queue
messages) may be naive, offset or junk, so parsing never raises: it answers None.
"""

from __future__ import annotations

import datetime as dt


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def parse(value) -> dt.datetime | None:
    """An aware datetime from ISO-8601 (`Z` or an offset; naive means UTC), or None."""
    if not value:
        return None
    try:
        moment = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def iso(moment: dt.datetime, timespec: str = "seconds") -> str:
    """`2026-11-25T14:03:00Z` (timespec as datetime.isoformat: "seconds", "milliseconds")."""
    return moment.astimezone(dt.UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def now_iso() -> str:
    """Now, to the millisecond: what every stored `*_at` attribute holds."""
    return iso(utcnow(), "milliseconds")


def from_epoch_ms(ms: float | None) -> str | None:
    """A provider's epoch milliseconds as an ISO string (seconds), or None."""
    if ms is None:
        return None
    return iso(dt.datetime.fromtimestamp(ms / 1000, dt.UTC))

