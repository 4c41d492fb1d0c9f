"""Call records: one per (lead, attempt), item pk=CALL#<call_id> sk=CALL.

The call id is derived from the lead id and the attempt number, so every duplicate of a callback
message names the same call, and `claim` (queued/absent -> dialing, conditional) lets exactly one
worker dial it (R-11). Calls and their call-log lines expire (`ttl`) after the configured data retention.
"""

from __future__ import annotations

import uuid

from functions.core import resources, store, times
from functions.records import daily, leads, retention

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


def claim(call_id: str, attributes: dict, lead: dict | None = None) -> bool:
    """Move the call to "dialing" if nobody has: absent (automatic callback) or "queued" (created by
    POST /v1/calls). Exactly one concurrent caller gets True. The same transaction counts the call as
    placed on its day (`counted_day`) and, for the lead's first call, the speed-to-lead sample. `lead`: the
    call's lead as the caller read it (else it is read here; its first-call marker is conditional anyway)."""
    changes = {**attributes, "call_id": call_id, "state": "dialing", "ttl": retention.ttl()}
    claimable = {"condition": "attribute_not_exists(pk) OR #state = :queued", "names": {"#state": "state"},
                 "values": {":queued": "queued"}}
    offer_id = attributes.get("offer_id")
    if not isinstance(offer_id, int) or isinstance(offer_id, bool):
        return store.update(_key(call_id), changes, **claimable)
    dialing_at = attributes.get("dialing_at") or times.now_iso()
    changes["counted_day"] = day = daily.day_of(offer_id, dialing_at)
    lead_id = attributes.get("lead_id")
    if lead is None or lead.get("lead_id") != lead_id:
        lead = leads.get(lead_id) if isinstance(lead_id, str) else None
    speed = daily.seconds_between((lead or {}).get("created_at"), dialing_at)
    if lead is not None and speed is not None and lead.get("first_dialled_call") in (None, call_id):
        marker = daily.tx_update(
            leads.key(lead_id), {"first_dialled_call": call_id, "first_dialled_at": dialing_at},
            condition="attribute_exists(pk) AND (attribute_not_exists(#first) OR #first = :call)",
            names={"#first": "first_dialled_call"}, values={":call": call_id})
        failed = daily.write(daily.tx_update(_key(call_id), {**changes, "counted_speed_s": speed}, **claimable),
                             daily.tx_count(offer_id, day, {"calls": 1}), also=marker,
                             more=daily.tx_speed(offer_id, day, speed))
        if 0 in failed or not failed:
            return not failed
        # Another call of this lead was claimed first (a race since the read): this one is no first call.
    return not daily.write(daily.tx_update(_key(call_id), changes, **claimable),
                           daily.tx_count(offer_id, day, {"calls": 1}))


def unclaim(call_id: str) -> bool:
    """Back to "queued" after an originate that surely never reached Beeline, so a retry may dial. The
    claim's counts are taken back in the same transaction (the retry's claim counts the call again)."""
    remove = ("operator", "channel_slot", "dialing_at", "counted_day", "counted_speed_s")
    call = get(call_id) or {}
    day, offer_id = call.get("counted_day"), call.get("offer_id")
    if not day or not isinstance(offer_id, int) or call.get("state") != "dialing":
        return store.update(_key(call_id), {"state": "queued"}, condition="#state = :dialing",
                            names={"#state": "state"}, values={":dialing": "dialing"}, remove=remove)
    speed = call.get("counted_speed_s")
    return not daily.write(
        daily.tx_update(_key(call_id), {"state": "queued"}, condition="#state = :dialing AND #day = :day",
                        names={"#state": "state", "#day": "counted_day"}, values={":dialing": "dialing", ":day": day},
                        remove=remove),
        daily.tx_count(offer_id, day, {"calls": -1}),
        also=daily.tx_speed(offer_id, day, float(speed), sign=-1) if speed is not None else None)


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


def progress(call_id: str, **changes) -> dict | bool:
    """Update a call that has not ended (a late "ringing" event must not reopen an ended call): the call as
    it is now, or False when it has ended (or does not exist)."""
    return store.update(_key(call_id), changes, condition="attribute_exists(pk) AND #state <> :ended",
                        names={"#state": "state"}, values={":ended": "ended"}, return_new=True)


def finish(call_id: str, outcome: str, *, month_add: dict | None = None, **changes) -> bool:
    """Mark the call ended with its outcome, once: a second finish (duplicate events) is False. The same
    transaction adds the call's outcome to its day's counters and, given `month_add` (spend.tx_add of its
    `cost_rub`), counts that cost: the call's `cost_counted`, the day's `cost_rub`, the month's spend. The
    call then goes on the recent-calls feed (records/daily.put_recent)."""
    return end(call_id, outcome, month_add=month_add, **changes)[0]


def end(call_id: str, outcome: str, *, month_add: dict | None = None, **changes) -> tuple[bool, dict | None]:
    """`finish`, and the call as it is afterwards (None when there is none), so that the caller running the
    ended call's consequences needs no read of its own."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}")
    fields = {**changes, "state": "ended", "outcome": outcome, "ended_at": changes.get("ended_at") or times.now_iso()}
    cost = round(float(fields.get("cost_rub") or 0), 2)
    for _ in range(3):  # the counts are computed from a read: a change since then means read again
        call = get(call_id)
        if call is None or call.get("state") == "ended":
            return False, call
        offer_id = call.get("offer_id")
        if not isinstance(offer_id, int) or isinstance(offer_id, bool):
            ended = store.update(_key(call_id), fields, condition="attribute_exists(pk) AND #state <> :ended",
                                 names={"#state": "state"}, values={":ended": "ended"}, return_new=True)
            return (True, ended) if ended else (False, get(call_id))
        # The cost rides on this transaction unless something counted it already (spend.add_call_cost).
        counts_cost = month_add is not None and cost > 0 and not call.get("cost_counted")
        written = {**fields, "cost_counted": times.now_iso()} if counts_cost else fields
        ended = {**call, **written, "call_id": call_id}
        day, adds = _finish_counts(offer_id, ended)
        values = {":ended": "ended"}
        if call.get("counted_day"):
            same_claim, values[":day"] = "#day = :day", call["counted_day"]
        else:
            same_claim = "attribute_not_exists(#day)"
        condition = f"attribute_exists(pk) AND #state <> :ended AND {same_claim}"
        if counts_cost:  # counted meanwhile: the condition fails and the next read sees the flag
            condition += " AND attribute_not_exists(#cost)"
            adds["cost_rub"] = cost  # the same day add_call_cost would use: the claim's, else dialled/created
        fact = daily.tx_update(_key(call_id), written, condition=condition,
                               names={"#state": "state", "#day": "counted_day",
                                      **({"#cost": "cost_counted"} if counts_cost else {})}, values=values)
        if not daily.write(fact, daily.tx_count(offer_id, day, adds), also=month_add if counts_cost else None):
            # After the finish: a crash before this put is repaired by tracker.finalize (effects_done unset).
            daily.put_recent(ended, retention.ttl())
            daily.trim_recent(call_id)
            return True, ended  # what a read would return now
    return False, get(call_id)


def list_recent(call_id: str, call: dict) -> None:
    """Put an ended call on the recent-calls feed again (a repair after a crash that may have come between
    its finish and the feed put); the same item each time. Only calls the finish lists: an offer's calls."""
    offer_id = call.get("offer_id")
    if isinstance(offer_id, int) and not isinstance(offer_id, bool) and call.get("outcome") in OUTCOMES:
        daily.put_recent({**call, "call_id": call_id}, retention.ttl())


def _finish_counts(offer_id: int, call: dict) -> tuple[str, dict]:
    """The day and the counters an ended call adds (an outbound call's day is its claim's)."""
    answered = call["outcome"] == "answered"
    talk = int(call.get("talk_seconds") or 0) if answered else 0
    if call.get("direction") == "inbound":
        return daily.day_of(offer_id, call.get("created_at")), {
            "inbound_calls": 1, "inbound_answered": int(answered), "inbound_talk_seconds": talk}
    adds = {f"outcome_{call['outcome']}": 1, "answered": int(answered), "talk_seconds": talk,
            "calls_over_60s": int(talk > daily.OVER_SECONDS)}
    day = call.get("counted_day")
    if not day:  # claimed before the counts existed: counted as placed now, on the day it was dialled
        day, adds["calls"] = daily.day_of(offer_id, call.get("dialing_at") or call.get("created_at")), 1
    return day, adds


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
