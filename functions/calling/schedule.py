"""Scheduling callbacks on the callbacks queue (R-8).

A callback message says which lead to call, which attempt this is, and when it is due. SQS delays at
most 900 s, so a callback due later is sent with the longest delay and re-sent by the dialer until due
(`hop`): nothing is dropped however far away the due time is.
"""

from __future__ import annotations

import datetime as dt

from functions.core import queues, times

QUEUE = "callbacks"


def schedule(lead_id: str, attempt: int, due_at: dt.datetime, reason: str,
             now: dt.datetime | None = None, extra: dict | None = None) -> dict:
    """Send the callback message; returns the message body (tests and the dialer read it back).
    `extra` carries a manual call's `call_id` and `manual` flag."""
    now = now or dt.datetime.now(dt.UTC)
    delay = max(0, int((due_at - now).total_seconds() + 0.999))
    message = {"lead_id": lead_id, "attempt": attempt, "due_at": times.iso(due_at), "reason": reason, **(extra or {})}
    queues.send(QUEUE, message, delay_seconds=min(delay, queues.SQS_MAX_DELAY))
    return message


def hop(message: dict, now: dt.datetime | None = None) -> bool:
    """If the message is not yet due, send it on again for the remaining time; True if it hopped."""
    now = now or dt.datetime.now(dt.UTC)
    due_at = times.parse(message["due_at"])
    if due_at is None or due_at <= now:
        return False
    queues.send(QUEUE, message, delay_seconds=min(queues.SQS_MAX_DELAY, int((due_at - now).total_seconds() + 0.999)))
    return True
