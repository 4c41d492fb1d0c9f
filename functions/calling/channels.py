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


def acquire(provider: str, limit: int, holder: str, now: float | None = None) -> int | None:
    """Take a free slot for `holder`; the slot number, or None when all `limit` are busy."""
    now = time.time() if now is None else now
    slots = list(range(limit))
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


def busy(provider: str, limit: int, now: float | None = None) -> int:
    """Slots (of the first `limit`) held by an unexpired lease: one Query over the provider's slots."""
    now = time.time() if now is None else now
    count = 0
    for item in store.query(f"CHANNELS#{provider}", "SLOT#"):
        if int(item["sk"].removeprefix("SLOT#")) < limit and item.get("holder") and item.get("expires_at", 0) >= now:
            count += 1
    return count
