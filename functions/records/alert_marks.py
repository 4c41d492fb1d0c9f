"""Which owner alerts were sent (R-23): the once-markers of calling/alerts.py.

- budget: pk=ALERTS#BUDGET sk=<yyyy-mm>, one attribute `sent_<percent>` per threshold crossed that month
  (`sent_80`, `sent_100`), holding when it was sent;
- channels: pk=ALERTS#CHANNELS sk=CURRENT: `saturated` (an episode is going on) and `alerted_at`.

A marker is written after the alert it records has gone out, with a condition, so of two senders racing
only one marker write wins; both may have sent (a duplicate alert, never a missing one). Items expire
(`ttl`) a year after they were written: they hold no personal data and old months need no marker.
"""

from __future__ import annotations

import time

from functions.core import store, times

KEEP_SECONDS = 400 * 86400


def _budget_key(yyyy_mm: str) -> dict:
    return {"pk": "ALERTS#BUDGET", "sk": yyyy_mm}


_CHANNELS = {"pk": "ALERTS#CHANNELS", "sk": "CURRENT"}


def _attribute(threshold: float) -> str:
    return f"sent_{round(threshold * 100, 2):g}".replace(".", "_")


def budget_sent(yyyy_mm: str) -> dict[str, str]:
    """attribute -> when, for the thresholds already alerted in this month."""
    item = store.get(_budget_key(yyyy_mm)) or {}
    return {k: v for k, v in item.items() if k.startswith("sent_")}


def budget_was_sent(sent: dict[str, str], threshold: float) -> bool:
    return _attribute(threshold) in sent


def mark_budget_sent(yyyy_mm: str, threshold: float) -> bool:
    """Record that the alert went out; False when another sender recorded it first."""
    attribute = _attribute(threshold)
    return store.update(_budget_key(yyyy_mm), {attribute: times.now_iso(), "ttl": int(time.time()) + KEEP_SECONDS},
                        condition="attribute_not_exists(#t)", names={"#t": attribute})


def channels() -> dict:
    """{"saturated": bool, "alerted_at": epoch seconds or None}."""
    item = store.get(_CHANNELS) or {}
    return {"saturated": bool(item.get("saturated")), "alerted_at": item.get("alerted_at")}


def mark_saturated(alerted_at: float | None) -> bool:
    """An episode began (and was alerted at `alerted_at`, if it was); False when one was already marked."""
    changes = {"saturated": True, "since": times.now_iso(), "ttl": int(time.time()) + KEEP_SECONDS}
    if alerted_at is not None:
        changes["alerted_at"] = int(alerted_at)
    return store.update(_CHANNELS, changes, condition="attribute_not_exists(saturated) OR saturated = :no",
                        values={":no": False})


def mark_unsaturated() -> bool:
    """The episode ended: the next saturation is a new one."""
    return store.update(_CHANNELS, {"saturated": False, "ended": times.now_iso()}, condition="saturated = :yes",
                        values={":yes": True})
