"""The PBX's call events and the binding of its call ids to callbridge calls.

Items:
- event           pk=TRACK#<extTrackingId>  sk=EVENT#<eventID>   every event once, by its eventID
- binding         pk=TRACK#<extTrackingId>  sk=CALL              which callbridge call the id is
- event marker    pk=XSIEVENT#<eventID>     sk=EVENT             events with no call (subscription ends)
Events and bindings hold phone numbers: they expire (`ttl`) after the configured data retention.
Provider-neutral: an event is stored as its leg's fields, whatever the provider's wire format was.
"""

from __future__ import annotations

import dataclasses
import time

from functions.core import resources, store, times
from functions.providers.beeline.events import CallData, XsiEvent
from functions.records import calls, retention

MARKER_TTL_SECONDS = 7 * 86400  # no personal data: just long enough to recognise a copy


def _track(ext: str) -> str:
    return f"TRACK#{ext}"


def store_event(event: XsiEvent) -> bool:
    """Store the event once (deduplicated by eventID); False for a copy already stored."""
    leg = event.call
    return store.put_new({"pk": _track(leg.ext_tracking_id), "sk": f"EVENT#{event.event_id}"}, {
        "event_type": event.event_type, "target_id": event.target_id, "leg": dataclasses.asdict(leg),
        "received_at": times.now_iso(), "ttl": retention.ttl(),
    })


def _leg(item: dict) -> CallData:
    leg = dict(item["leg"])
    leg["redirect_addresses"] = tuple(leg.get("redirect_addresses") or ())
    return CallData(**leg)


def legs(ext: str) -> list[CallData]:
    """Every stored leg state of one provider call, in eventID order."""
    return [_leg(item) for item in store.query(_track(ext), "EVENT#")]


def track(ext: str) -> tuple[str | None, list[CallData]]:
    """The call the id is bound to (None before the binding) and every stored leg, in eventID order: the
    binding and the events share the partition, so an event costs one Query for both, not a read each."""
    bound, found = None, []
    for item in store.query(_track(ext)):
        if item["sk"] == "CALL":
            bound = item.get("call_id")
        elif item["sk"].startswith("EVENT#"):
            found.append(_leg(item))
    return bound, found


def bind(ext: str, call_id: str, target_id: str = "", **changes) -> str:
    """Tie an extTrackingId to a call, once; returns the call it is bound to (the first binding wins).
    `changes`: more of the call's attributes (the dialer's originated_at), set in the same update as the
    binding's, so that a dial that learns its id costs one call write. The call gets them even when the
    id was bound first (the events, through the operator): then they are all it gets, never the binding."""
    key = {"pk": _track(ext), "sk": "CALL"}
    if not store.put_new(key, {"call_id": call_id, "ttl": retention.ttl()}):
        if changes:
            calls.update(call_id, **changes)
        return store.get(key)["call_id"]
    calls.update(call_id, ext_tracking_id=ext, **({"target_id": target_id} if target_id else {}), **changes)
    return call_id


def mark_seen(event_id: str, event_type: str) -> bool:
    """Once per eventID for events that belong to no call; True for the first copy."""
    return store.put_new({"pk": f"XSIEVENT#{event_id}", "sk": "EVENT"},
                         {"type": event_type, "ttl": int(time.time()) + MARKER_TTL_SECONDS})


def unmark_seen(event_id: str) -> None:
    """Undo `mark_seen` when handling the event failed, so the sender's retry counts again."""
    resources.table().delete_item(Key={"pk": f"XSIEVENT#{event_id}", "sk": "EVENT"})
