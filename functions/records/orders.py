"""SalesRender orders as callbridge knows them: which lead an order belongs to (R-21).

Item: pk=ORDER#<order_id> sk=ORDER {order_id, lead_id, origin, linked_at, last_group, last_seen_at}.
`origin` is "callbridge" for an order the intake worker created (or one found carrying a lead id), "crm"
for one made outside callbridge (in the CRM, imported, from a CPA network). The link is written once
(create-if-absent) and never moved: every copy of a webhook and every racing worker agrees on the lead.
"""

from __future__ import annotations

from functions.core import store, times
from functions.records import retention

MAX_ORDER_ID_BYTES = 64


def _key(order_id: str) -> dict:
    return {"pk": f"ORDER#{order_id}", "sk": "ORDER"}


def link(order_id: str, lead_id: str, origin: str) -> str:
    """Tie the order to a lead unless it is tied already; returns the lead it is tied to (first one wins)."""
    if store.put_new(_key(order_id), {"order_id": order_id, "lead_id": lead_id, "origin": origin,
                                      "linked_at": times.now_iso(), "ttl": retention.ttl()}):
        return lead_id
    return str((get(order_id) or {}).get("lead_id") or lead_id)


def get(order_id: str) -> dict | None:
    return store.get(_key(order_id))


def lead_of(order_id: str) -> str | None:
    item = get(order_id)
    return str(item["lead_id"]) if item and item.get("lead_id") else None


def note_status(order_id: str, group: str, status_name: str) -> None:
    """The last status the CRM showed for a linked order (for people reading the table; nothing decides on it)."""
    store.update(_key(order_id), {"last_group": group, "last_status_name": status_name,
                                  "last_seen_at": times.now_iso()}, condition="attribute_exists(pk)")
