"""Choosing the operator for a call (R-10) by the offer's rule, skipping busy and unavailable ones.

Per operator: pk=OPERATOR#<pattern> sk=STATE with last_called_at and, while on a callbridge call,
busy_call/busy_until (a reservation that expires by itself like a channel lease). Round robin keeps
a counter per offer (pk=OFFER#<id> sk=ROUND_ROBIN).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from functions.calling import channels
from functions.core import store
from functions.core.config import Offer

UNAVAILABLE = ("OFFLINE", "BREAK")


def _key(pattern: str) -> dict:
    return {"pk": f"OPERATOR#{pattern}", "sk": "STATE"}


def candidates(offer: Offer) -> list[str]:
    """The offer's operators in the order its rule prefers them."""
    operators = list(offer.operators)
    if offer.distribution == "round_robin":
        counter = store.update({"pk": f"OFFER#{offer.id}", "sk": "ROUND_ROBIN"}, {}, add={"next": 1},
                               return_new=True)
        start = (int(counter["next"]) - 1) % len(operators)
        return operators[start:] + operators[:start]
    last = {p: (store.get(_key(p)) or {}).get("last_called_at", 0) for p in operators}
    return sorted(operators, key=lambda p: (last[p], operators.index(p)))


def reserve(pattern: str, call_id: str, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    return store.update(
        _key(pattern), {"busy_call": call_id, "busy_until": int(now + channels.lease_seconds()),
                        "last_called_at": now},
        condition="attribute_not_exists(busy_call) OR busy_until < :now OR busy_call = :call",
        values={":now": int(now), ":call": call_id},
    )


def busy_call(pattern: str) -> str | None:
    """The callbridge call the operator is reserved for, if any (expired or not)."""
    return (store.get(_key(pattern)) or {}).get("busy_call")


def release(pattern: str, call_id: str) -> bool:
    return store.update(_key(pattern), {}, remove=("busy_call", "busy_until"), condition="busy_call = :call",
                        values={":call": call_id})


def choose(offer: Offer, call_id: str, agent_status: Callable[[str], str] | None) -> str | None:
    """Reserve and return the first preferred operator who is free (and available, when the offer
    skips OFFLINE/BREAK agents); None when nobody is."""
    for pattern in candidates(offer):
        if offer.skip_unavailable_operators and agent_status is not None:
            if agent_status(pattern) in UNAVAILABLE:
                continue
        if reserve(pattern, call_id):
            return pattern
    return None
