"""Call records: one per (lead, attempt), item pk=CALL#<call_id> sk=CALL.

The call id is derived from the lead id and the attempt number, so every duplicate of a callback
message names the same call, and `claim` (queued/absent -> dialing, conditional) lets exactly one
worker dial it (R-11). Calls and their call-log lines expire (`ttl`) after the configured data retention.
"""

from __future__ import annotations

import uuid

from functions.core import resources, store, times
from functions.records import retention

CALL_NAMESPACE = uuid.UUID("0c5d1e2a-3b4f-4a6b-9c8d-7e6f5a4b3c2d")
STATES = ("queued", "dialing", "ringing", "talking", "ended")
OUTCOMES = ("answered", "operator_missed", "busy", "no_answer", "failed")


def call_id_for(lead_id: str, attempt: int) -> str:
    return str(uuid.uuid5(CALL_NAMESPACE, f"{lead_id}:{attempt}"))


def _key(call_id: str) -> dict:
    return {"pk": f"CALL#{call_id}", "sk": "CALL"}


def key(call_id: str) -> dict:
    """The call item's key, for a transaction another record module writes together with it."""
    return _key(call_id)


def create(call: dict) -> bool:
    """Store a new call record unless one with its id exists; True when this created it."""
    return store.put_new(_key(call["call_id"]), {**call, "ttl": retention.ttl()})


def create_queued(call: dict) -> bool:
    return store.put_new(_key(call["call_id"]), {**call, "state": "queued", "ttl": retention.ttl()})


def get(call_id: str) -> dict | None:
    return store.get(_key(call_id))


def claim(call_id: str, attributes: dict) -> bool:
    """Move the call to "dialing" if nobody has: absent (automatic callback) or "queued" (created by
    POST /v1/calls). Exactly one concurrent caller gets True."""
    return store.update(
        _key(call_id), {**attributes, "call_id": call_id, "state": "dialing", "ttl": retention.ttl()},
        condition="attribute_not_exists(pk) OR #state = :queued", names={"#state": "state"},
        values={":queued": "queued"},
    )


def unclaim(call_id: str) -> bool:
    """Back to "queued" after an originate that surely never reached Beeline, so a retry may dial."""
    return store.update(_key(call_id), {"state": "queued"}, condition="#state = :dialing",
                        names={"#state": "state"}, values={":dialing": "dialing"},
                        remove=("operator", "channel_slot", "dialing_at"))


def settle_not_dialled(call_id: str, reason: str, attributes: dict) -> bool:
    """End a call that will never be placed (absent or "queued" -> "ended", outcome "not_dialled", with
    the reason), unless a worker claimed it meanwhile. True when this write settled it."""
    return store.update(
        _key(call_id), {**attributes, "call_id": call_id, "state": "ended", "outcome": "not_dialled",
                        "not_dialled_reason": reason, "ended_at": times.now_iso(), "ttl": retention.ttl()},
        condition="attribute_not_exists(pk) OR #state = :queued", names={"#state": "state"},
        values={":queued": "queued"},
    )


def update(call_id: str, **changes) -> bool:
    return store.update(_key(call_id), changes, condition="attribute_exists(pk)")


def progress(call_id: str, **changes) -> bool:
    """Update a call that has not ended (a late "ringing" event must not reopen an ended call)."""
    return store.update(_key(call_id), changes, condition="attribute_exists(pk) AND #state <> :ended",
                        names={"#state": "state"}, values={":ended": "ended"})


def finish(call_id: str, outcome: str, **changes) -> bool:
    """Mark the call ended with its outcome, once: a second finish (duplicate events) is False."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}")
    return store.update(_key(call_id), {**changes, "state": "ended", "outcome": outcome, "ended_at":
                                        changes.get("ended_at") or times.now_iso()},
                        condition="attribute_exists(pk) AND #state <> :ended", names={"#state": "state"},
                        values={":ended": "ended"})


def flag_once(call_id: str, flag: str) -> bool:
    """Set a marker attribute if absent: True for exactly one caller (a side effect runs once)."""
    return store.update(_key(call_id), {flag: times.now_iso()},
                        condition="attribute_exists(pk) AND attribute_not_exists(#flag)", names={"#flag": flag})


# The lead's call history (pk=LEAD#<lead_id> sk=CALLLOG#<ended_at>#<call_id>): sorted by when each ended.
def log_ended(lead_id: str, ended_at: str, call_id: str) -> None:
    store.put_new({"pk": f"LEAD#{lead_id}", "sk": f"CALLLOG#{ended_at}#{call_id}"},
                  {"call_id": call_id, "ttl": retention.ttl()})


def ended_of_lead(lead_id: str) -> list[dict]:
    """Every ended call of the lead, oldest first, each with its call_id."""
    found = []
    for item in store.query(f"LEAD#{lead_id}", "CALLLOG#"):
        call = get(str(item["call_id"]))
        if call is not None:
            found.append({**call, "call_id": str(item["call_id"])})
    return found


# Calls not yet ended, for the reconciler (pk=OPENCALLS sk=<call_id>).
def mark_open(call_id: str) -> None:
    store.update({"pk": "OPENCALLS", "sk": call_id}, {"opened_at": times.now_iso()})


def mark_closed(call_id: str) -> None:
    resources.table().delete_item(Key={"pk": "OPENCALLS", "sk": call_id})


def open_calls() -> list[str]:
    return [item["sk"] for item in store.query("OPENCALLS")]
