"""The do-not-call list (R-10): pk=DNC#<E.164> sk=DNC."""

from __future__ import annotations

from functions.core import store, times


def _key(phone: str) -> dict:
    return {"pk": f"DNC#{phone}", "sk": "DNC"}


def add(phone: str, reason: str = "") -> None:
    store.update(_key(phone), {"phone": phone, "reason": reason, "added_at": times.now_iso()})


def remove(phone: str) -> None:
    from functions.core import resources

    resources.table().delete_item(Key=_key(phone))


def listed(phone: str) -> bool:
    return store.get(_key(phone)) is not None
