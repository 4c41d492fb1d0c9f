"""Channel leases (R-10): never more simultaneous calls than the provider's channel limit, across
every Lambda instance.

The limit is N slot items (pk=CHANNELS#<provider>, sk=SLOT#<k>). A call takes a free slot with a
conditional write: free means no holder, or a lease past its expiry, so a slot whose release event
was lost frees itself. Only the holder can release its slot.
"""

from __future__ import annotations

import os
import random
import time

from functions.core import store

DEFAULT_LEASE_SECONDS = 20 * 60  # longer than nearly every call; call events extend or release it sooner


def lease_seconds() -> int:
    return int(os.environ.get("CHANNEL_LEASE_SECONDS", DEFAULT_LEASE_SECONDS))


def _key(provider: str, slot: int) -> dict:
    return {"pk": f"CHANNELS#{provider}", "sk": f"SLOT#{slot:03d}"}


def acquire(provider: str, limit: int, holder: str, now: float | None = None,
            candidates: list[int] | None = None) -> int | None:
    """Take a free slot for `holder`; the slot number, or None when all `limit` are busy. `candidates`: the
    slots a read (`free`) found free, tried alone, so a caller that looked first spends no conditional write
    on a slot it knows to be held (None when they were all taken meanwhile)."""
    now = time.time() if now is None else now
    slots = list(range(limit)) if candidates is None else [s for s in candidates if s < limit]
    random.shuffle(slots)  # concurrent callers start at different slots instead of all racing for 0
    for slot in slots:
        taken = store.update(
            _key(provider, slot), {"holder": holder, "expires_at": int(now + lease_seconds()),
                                   "acquired_at": int(now)},
            condition="attribute_not_exists(holder) OR expires_at < :now OR holder = :holder",
            values={":now": int(now), ":holder": holder},
        )
        if taken:
            return slot
    return None


def release(provider: str, slot: int, holder: str) -> bool:
    return store.update(_key(provider, slot), {}, remove=("holder", "expires_at", "acquired_at"),
                        condition="holder = :holder", values={":holder": holder})


def extend(provider: str, slot: int, holder: str, seconds: int, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    return store.update(_key(provider, slot), {"expires_at": int(now + seconds)}, condition="holder = :holder",
                        values={":holder": holder})


def free(provider: str, limit: int, now: float | None = None) -> list[int]:
    """Slots (of the first `limit`) that no unexpired lease holds: one Query over the provider's slots."""
    now = time.time() if now is None else now
    held = {int(item["sk"].removeprefix("SLOT#")) for item in store.query(f"CHANNELS#{provider}", "SLOT#")
            if item.get("holder") and item.get("expires_at", 0) >= now}
    return [slot for slot in range(limit) if slot not in held]


def busy(provider: str, limit: int, now: float | None = None) -> int:
    """Slots (of the first `limit`) held by an unexpired lease: one Query over the provider's slots."""
    return limit - len(free(provider, limit, now))
