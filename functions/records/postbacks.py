"""Postbacks to a tracker (R-21): "fire once per order and status group", and every attempt kept.

Items, in one partition per order (pk=POSTBACK#<order_id>):
- marker   sk=FIRE#<group>#<postback_id>  {order_id, lead_id, offer_id, group, status_name, postback_id,
           state: pending|sent, attempt (the attempt due next), claimed_until, queued_at, sent_at, gave_up_at}
- attempt  sk=ATTEMPT#<at>#<group>#<postback_id>#<n>  {at, attempt, method, url (secrets masked),
           status_code, error}
`postback_id` is a digest of the offer's postback (method, url, body): stable when the list is reordered.

`status_seen` is the one entry point for "this order is in this status group": the order webhook calls
it, and so can the dialer when its CRM re-read sees a group (it sits on this floor for that reason).
The marker is created with a conditional write, so however often a group is seen there is one marker
and, after it, one send job on the postbacks queue; `queued_at` is set after the send, so a crash in
between sends it again the next time the status is seen, and a second job is harmless: each attempt is
claimed (a lease, conditional on the attempt number) before its request goes out.
"""

from __future__ import annotations

import hashlib
import json

from functions.core import config, queues, store, times
from functions.records import retention

QUEUE = "postbacks"


def postback_id(postback: config.Postback) -> str:
    text = json.dumps([postback.method, postback.url, postback.body], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pk(order_id: str) -> str:
    return f"POSTBACK#{order_id}"


def _marker_key(order_id: str, group: str, pid: str) -> dict:
    return {"pk": _pk(order_id), "sk": f"FIRE#{group}#{pid}"}


def status_seen(order_id: str, group: str, status_name: str = "", *, lead_id: str | None, offer_id: int | None
                ) -> list[str]:
    """The order is in `group` now: queue each of its offer's postbacks for that group, once ever.
    Returns the ids of the postbacks queued by this call."""
    offer = config.load().offer(int(offer_id)) if offer_id is not None else None
    if offer is None or not group:
        return []
    queued = []
    for postback in offer.postbacks:
        if group not in postback.on:
            continue
        pid = postback_id(postback)
        key = _marker_key(order_id, group, pid)
        created = store.put_new(key, {
            "order_id": order_id, "lead_id": lead_id, "offer_id": offer.id, "group": group,
            "status_name": status_name, "postback_id": pid, "method": postback.method, "state": "pending",
            "attempt": 1, "created_at": times.now_iso(), "ttl": retention.ttl()})
        if not created:
            marker = store.get(key) or {}
            if marker.get("queued_at") or marker.get("state") != "pending":
                continue  # seen before: fired, or its job is on the queue
        queues.send(QUEUE, {"job": "postback", "order_id": order_id, "group": group, "postback_id": pid,
                            "attempt": 1})
        store.update(key, {"queued_at": times.now_iso()}, condition="attribute_exists(pk)")
        queued.append(pid)
    return queued


def marker(order_id: str, group: str, pid: str) -> dict | None:
    return store.get(_marker_key(order_id, group, pid))


def claim(order_id: str, group: str, pid: str, attempt: int, lease_seconds: int, now_epoch: float) -> bool:
    """Take attempt `attempt` for `lease_seconds`: True for one holder; a holder that died leaves the lease
    to expire, and then the message's redelivery takes it."""
    return store.update(
        _marker_key(order_id, group, pid),
        {"claimed_until": int(now_epoch) + lease_seconds, "last_attempt_at": times.now_iso()},
        condition="#state = :pending AND #attempt = :n AND "
                  "(attribute_not_exists(claimed_until) OR claimed_until < :now)",
        names={"#state": "state", "#attempt": "attempt"},
        values={":pending": "pending", ":n": attempt, ":now": int(now_epoch)},
    )


def first_attempt_at(order_id: str, group: str, pid: str, now: str) -> str:
    """When the first attempt went out (`now` for the first caller, written once; later callers read it)."""
    key = _marker_key(order_id, group, pid)
    current = store.get(key) or {}
    if current.get("first_attempt_at"):
        return str(current["first_attempt_at"])
    if store.update(key, {"first_attempt_at": now},
                    condition="attribute_exists(pk) AND attribute_not_exists(first_attempt_at)"):
        return now
    return str((store.get(key) or {}).get("first_attempt_at") or now)


def record_attempt(order_id: str, group: str, pid: str, attempt: int, *, method: str, url: str,
                   status_code: int | None, error: str | None) -> None:
    at = times.now_iso()
    store.put_new({"pk": _pk(order_id), "sk": f"ATTEMPT#{at}#{group}#{pid}#{attempt:04d}"}, {
        "order_id": order_id, "group": group, "postback_id": pid, "attempt": attempt, "at": at, "method": method,
        "url": url, "status_code": status_code, "error": error, "ttl": retention.ttl()})


def mark_sent(order_id: str, group: str, pid: str, attempt: int, status_code: int) -> bool:
    return store.update(_marker_key(order_id, group, pid),
                        {"state": "sent", "sent_at": times.now_iso(), "status_code": status_code},
                        condition="#attempt = :n", names={"#attempt": "attempt"}, values={":n": attempt},
                        remove=("claimed_until",))


def advance(order_id: str, group: str, pid: str, attempt: int, due_at: str) -> bool:
    """Attempt `attempt` failed and the next one is on the queue: count it, free the lease."""
    return store.update(_marker_key(order_id, group, pid), {"attempt": attempt + 1, "next_due_at": due_at},
                        condition="#attempt = :n", names={"#attempt": "attempt"}, values={":n": attempt},
                        remove=("claimed_until",))


def give_up(order_id: str, group: str, pid: str, attempt: int, reason: str) -> None:
    """Retries are over; the job goes to the DLQ. The marker stays pending at this attempt, so a replay from
    the DLQ (make replay-dlq QUEUE=postbacks) tries once more."""
    store.update(_marker_key(order_id, group, pid), {"gave_up_at": times.now_iso(), "gave_up_reason": reason[:500]},
                 condition="#attempt = :n", names={"#attempt": "attempt"}, values={":n": attempt},
                 remove=("claimed_until",))


def release(order_id: str, group: str, pid: str, attempt: int) -> None:
    """Give the lease back without counting an attempt (the request never went out)."""
    store.update(_marker_key(order_id, group, pid), {}, condition="#attempt = :n", names={"#attempt": "attempt"},
                 values={":n": attempt}, remove=("claimed_until",))


def of_order(order_id: str) -> dict:
    """The order's postbacks (markers) and every attempt, oldest first."""
    items = store.query(_pk(order_id))
    fired = [{k: v for k, v in i.items() if k not in ("pk", "sk", "ttl", "claimed_until")}
             for i in items if str(i["sk"]).startswith("FIRE#")]
    attempts = [{k: v for k, v in i.items() if k not in ("pk", "sk", "ttl")}
                for i in items if str(i["sk"]).startswith("ATTEMPT#")]
    return {"postbacks": fired, "attempts": attempts}
