"""Choosing the operator for a call (R-10) by the offer's rule, skipping busy and unavailable ones.

Per operator: pk=OPERATORS sk=<pattern> with last_called_at and, while on a callbridge call,
busy_call/busy_until (a reservation that expires by itself like a channel lease) and busy_holder, the
token of the one delivery that took it: only that holder extends or releases it. A call's release
sets `available_at` = its end + the offer's wrap-up time (after-call work, seed §6.2): nobody reserves
the operator before then. Round robin keeps a counter per offer (pk=OFFER#<id> sk=ROUND_ROBIN).

All operators share one partition, so an offer's states are one Query (not a read per operator: with a
dozen operators and a backlog that was most of a dial's DynamoDB requests). `choose` reads the states
first and asks the PBX for the agent status (a provider request, cached by the caller) only of operators
who are free here: a busy or wrapping-up operator costs no request.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from functions.calling import channels
from functions.core import store
from functions.core.config import Offer

UNAVAILABLE = ("OFFLINE", "BREAK")


PARTITION = "OPERATORS"


def _key(pattern: str) -> dict:
    return {"pk": PARTITION, "sk": pattern}


def state(pattern: str) -> dict:
    return store.get(_key(pattern)) or {}


def states(patterns) -> dict[str, dict]:
    """The state of each of `patterns` ({} for one never called), in one Query."""
    items = {item["sk"]: item for item in store.query(PARTITION)}
    return {p: items.get(p, {}) for p in patterns}


def free_now(item: dict, now: float) -> bool:
    """No unexpired reservation, and past the wrap-up of the last call."""
    reserved = item.get("busy_call") and item.get("busy_until", 0) >= now
    return not reserved and item.get("available_at", 0) <= now


def candidates(offer: Offer, known: dict[str, dict] | None = None) -> list[str]:
    """The offer's operators in the order its rule prefers them."""
    operators = list(offer.operators)
    if offer.distribution == "round_robin":
        counter = store.update({"pk": f"OFFER#{offer.id}", "sk": "ROUND_ROBIN"}, {}, add={"next": 1},
                               return_new=True)
        start = (int(counter["next"]) - 1) % len(operators)
        return operators[start:] + operators[:start]
    known = known if known is not None else states(operators)
    last = {p: known[p].get("last_called_at", 0) for p in operators}
    return sorted(operators, key=lambda p: (last[p], operators.index(p)))


def free_in(offer: Offer, now: float | None = None, known: dict[str, dict] | None = None) -> float | None:
    """Seconds until one of the offer's operators is free (0: one is now); None when every one is on a
    call (its release triggers the next dispatch). DynamoDB reads only (none with `known`, from `states`)."""
    now = time.time() if now is None else now
    waits = []
    for item in (known if known is not None else states(offer.operators)).values():
        if item.get("busy_call") and item.get("busy_until", 0) >= now:
            continue
        waits.append(max(0.0, float(item.get("available_at", 0)) - now))
    return min(waits) if waits else None


def reserve(pattern: str, call_id: str, now: float | None = None, *, holder: str | None = None) -> bool:
    """Reserve the operator for `call_id`, held by `holder` (the delivery that took it; the call id when
    not given). The holder reserving again extends the reservation."""
    now = time.time() if now is None else now
    holder = holder or call_id
    return store.update(
        _key(pattern), {"busy_call": call_id, "busy_holder": holder,
                        "busy_until": int(now + channels.lease_seconds()), "last_called_at": now},
        # Free (no reservation, or an expired one) and past the last call's wrap-up; or already this holder's
        # (extending). A reservation made before holders existed (no busy_holder) is held by its call id.
        condition="((attribute_not_exists(busy_call) OR busy_until < :now)"
                  " AND (attribute_not_exists(available_at) OR available_at <= :exact))"
                  " OR busy_holder = :holder OR (attribute_not_exists(busy_holder) AND busy_call = :holder)",
        values={":now": int(now), ":exact": now, ":holder": holder},
    )


def release(pattern: str, holder: str, wrap_up_seconds: float = 0, now: float | None = None) -> bool:
    """Free the operator, only if `holder` (what reserved it) still holds it. After a call that took place,
    `wrap_up_seconds` keeps them from being reserved again until their after-call work is done."""
    now = time.time() if now is None else now
    changes = {"released_at": now, "available_at": now + wrap_up_seconds} if wrap_up_seconds else {}
    return store.update(_key(pattern), changes, remove=("busy_call", "busy_holder", "busy_until"),
                        condition="busy_holder = :holder"
                                  " OR (attribute_not_exists(busy_holder) AND busy_call = :holder)",
                        values={":holder": holder})


def choose(offer: Offer, call_id: str, agent_status: Callable[[str], str] | None,
           holder: str | None = None, now: float | None = None, prefer: str | None = None,
           known: dict[str, dict] | None = None) -> str | None:
    """Reserve (for `holder`) and return the first preferred operator who is free (and available, when
    the offer skips OFFLINE/BREAK agents); None when nobody is. `prefer` (the CRM user who pressed "Call")
    goes first when it is one of the offer's operators; otherwise the offer's rule decides. `known`: the
    states as the caller read them a moment ago (a reservation is conditional, so one taken since only
    moves the choice on to the next operator)."""
    now = time.time() if now is None else now
    known = known if known is not None else states(offer.operators)
    order = candidates(offer, known)
    if prefer in order:
        order = [prefer, *(p for p in order if p != prefer)]
    for pattern in order:
        if not free_now(known[pattern], now):
            continue  # on a call or wrapping up: no need to ask the PBX about them
        if offer.skip_unavailable_operators and agent_status is not None:
            if agent_status(pattern) in UNAVAILABLE:
                continue
        if reserve(pattern, call_id, now, holder=holder):
            return pattern
    return None
