"""The waiting list: due callbacks that found no free channel or operator, per offer, oldest first.

A due callback is not stored here first: its own dispatch pass dials it at once when nobody older waits and
capacity is free (functions/calling/dispatch.py), and it joins only when that pass does not dial it.

Item: pk=WAIT#<offer_id>  sk=<rank>#<due_at>#<since>#<call_id>, with the callback message itself. `rank` is 0
for a manual call (a person asked for it now: it goes ahead of automatic callbacks) and 1 for an automatic
one; `due_at` is ISO-8601 UTC with milliseconds, so the sort key orders the partition by due time and a Query
with a small Limit returns the oldest. Callbacks are due to the second, so `since` (the lead's creation,
to the millisecond) breaks ties: the lead that came first. The call id (derived from lead and attempt, or a
manual call's own) makes one entry per dial: duplicate messages join once.

An entry is worked on under a lock (`taken_by`, `taken_until`), taken with a conditional write, so racing
dispatchers never dial the same entry and none loses it: the holder removes the entry after the dial's
effect (the call claimed, or the lead finished), or puts it back where it was when the dial did not happen.
A holder that dies leaves a lock that expires by itself (LOCK_SECONDS, longer than a dialer Lambda lives).
An entry whose dial failed transiently waits `not_before` (its own backoff) and counts its `failures`.
Entries expire (`ttl`) after the data retention, so one of an offer removed from the configuration goes.
"""

from __future__ import annotations

import time

from functions.core import resources, store, times
from functions.records import retention

LOCK_SECONDS = 120  # > the callbacks Lambda's 60 s timeout: a live holder never loses its lock
HEAD_LIMIT = 25     # entries read per look at the head of a list (locked or backing-off ones are skipped)


def _pk(offer_id: int) -> str:
    return f"WAIT#{int(offer_id)}"


def _ms(value) -> str:
    moment = times.parse(value)
    return times.iso(moment, "milliseconds") if moment else "-"


def sort_key(due_at: str, call_id: str, manual: bool, since: str | None = None) -> str:
    return f"{0 if manual else 1}#{_ms(due_at)}#{_ms(since)}#{call_id}"


def entry(offer_id: int, message: dict, call_id: str, manual: bool, since: str | None = None) -> dict:
    """The callback as an entry of its offer's list, not stored: where it would stand (its sort key). A fresh
    callback's pass compares it with the heads, and stores it (`join`) only when the pass does not dial it."""
    return {"pk": _pk(offer_id), "sk": sort_key(message["due_at"], call_id, manual, since), "message": message,
            "offer_id": int(offer_id), "call_id": call_id, "manual": manual}


def join(offer_id: int, message: dict, call_id: str, manual: bool, since: str | None = None) -> dict:
    """Put the callback on its offer's list (once per call id and due time); returns the entry. `since`:
    the lead's creation time, the tie-break between callbacks due in the same second."""
    found = entry(offer_id, message, call_id, manual, since)
    store.put_new({"pk": found["pk"], "sk": found["sk"]}, {
        "message": message, "offer_id": int(offer_id), "call_id": call_id, "lead_id": message["lead_id"],
        "attempt": message["attempt"], "manual": manual, "joined_at": times.now_iso(), "failures": 0,
        "ttl": retention.ttl()})
    return {key: found[key] for key in ("pk", "sk", "message", "offer_id", "call_id")}


def heads(offer_id: int, now: float | None = None, limit: int = HEAD_LIMIT) -> list[dict]:
    """The oldest entries of the offer's list that nobody holds and that are not backing off."""
    return look(offer_id, now, limit)[0]


def look(offer_id: int, now: float | None = None, limit: int = HEAD_LIMIT) -> tuple[list[dict], set[str]]:
    """`heads`, and the call ids of every entry the same Query read, held or backing off too (a fresh callback
    found there is on the list already: a redelivery after its join)."""
    now = time.time() if now is None else now
    page = resources.table().query(KeyConditionExpression="#pk = :pk", ExpressionAttributeNames={"#pk": "pk"},
                                   ExpressionAttributeValues={":pk": _pk(offer_id)}, ConsistentRead=True, Limit=limit)
    entries = [store.from_dynamo(item) for item in page["Items"]]
    return ([e for e in entries
             if not (e.get("taken_by") and e.get("taken_until", 0) >= now) and e.get("not_before", 0) <= now],
            {str(e.get("call_id")) for e in entries})


def waiting(offer_id: int) -> bool:
    """Anything on the offer's list at all (held or not)."""
    page = resources.table().query(KeyConditionExpression="#pk = :pk", ExpressionAttributeNames={"#pk": "pk"},
                                   ExpressionAttributeValues={":pk": _pk(offer_id)}, ConsistentRead=True, Limit=1,
                                   ProjectionExpression="#pk")
    return bool(page["Items"])


def entries(offer_id: int) -> list[dict]:
    """The whole list, oldest first (tests and diagnostics)."""
    return store.query(_pk(offer_id))


def take(entry: dict, token: str, now: float | None = None) -> bool:
    """Lock the entry for `token`; False when it is gone, held by someone else, or backing off."""
    now = time.time() if now is None else now
    return store.update(
        {"pk": entry["pk"], "sk": entry["sk"]}, {"taken_by": token, "taken_until": int(now + LOCK_SECONDS)},
        condition="attribute_exists(pk) AND (attribute_not_exists(taken_by) OR taken_until < :now)"
                  " AND (attribute_not_exists(not_before) OR not_before <= :now)",
        values={":now": int(now)})


def put_back(entry: dict, token: str, *, backoff_seconds: int = 0, now: float | None = None) -> bool:
    """Unlock the entry, in its place; with `backoff_seconds`, it also waits that long and counts a failure."""
    now = time.time() if now is None else now
    changes, add = {}, None
    if backoff_seconds:
        changes, add = {"not_before": int(now + backoff_seconds)}, {"failures": 1}
    return store.update({"pk": entry["pk"], "sk": entry["sk"]}, changes, remove=("taken_by", "taken_until"),
                        add=add, condition="taken_by = :token", values={":token": token})


def remove(entry: dict, token: str) -> bool:
    """Delete the entry this holder has dealt with (only the lock's holder can)."""
    from botocore.exceptions import ClientError

    try:
        resources.table().delete_item(Key={"pk": entry["pk"], "sk": entry["sk"]},
                                      ConditionExpression="taken_by = :token",
                                      ExpressionAttributeValues={":token": token})
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
            return False
        raise
    return True
