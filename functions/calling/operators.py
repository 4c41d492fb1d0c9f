"""Choosing the operator for a call (R-10) by the offer's rule, skipping busy and unavailable ones.

Per operator: pk=OPERATOR#<pattern> sk=STATE with last_called_at and, while on a callbridge call,
busy_call/busy_until (a reservation that expires by itself like a channel lease) and busy_holder, the
token of the one delivery that took it: only that holder extends or releases it. Round robin keeps
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


def reserve(pattern: str, call_id: str, now: float | None = None, *, holder: str | None = None) -> bool:
    """Reserve the operator for `call_id`, held by `holder` (the delivery that took it; the call id when
    not given). The holder reserving again extends the reservation."""
    now = time.time() if now is None else now
    holder = holder or call_id
    return store.update(
        _key(pattern), {"busy_call": call_id, "busy_holder": holder,
                        "busy_until": int(now + channels.lease_seconds()), "last_called_at": now},
        # A reservation made before holders existed (no busy_holder) is held by its call id.
        condition="attribute_not_exists(busy_call) OR busy_until < :now OR busy_holder = :holder"
                  " OR (attribute_not_exists(busy_holder) AND busy_call = :holder)",
        values={":now": int(now), ":holder": holder},
    )


def busy_call(pattern: str) -> str | None:
    """The callbridge call the operator is reserved for, if any (expired or not)."""
    return (store.get(_key(pattern)) or {}).get("busy_call")


def release(pattern: str, holder: str) -> bool:
    """Free the operator, only if `holder` (what reserved it) still holds it."""
    return store.update(_key(pattern), {}, remove=("busy_call", "busy_holder", "busy_until"),
                        condition="busy_holder = :holder"
                                  " OR (attribute_not_exists(busy_holder) AND busy_call = :holder)",
                        values={":holder": holder})


def choose(offer: Offer, call_id: str, agent_status: Callable[[str], str] | None,
           holder: str | None = None) -> str | None:
    """Reserve (for `holder`) and return the first preferred operator who is free (and available, when
    the offer skips OFFLINE/BREAK agents); None when nobody is."""
    for pattern in candidates(offer):
        if offer.skip_unavailable_operators and agent_status is not None:
            if agent_status(pattern) in UNAVAILABLE:
                continue
        if reserve(pattern, call_id, holder=holder):
            return pattern
    return None
