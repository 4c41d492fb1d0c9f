"""SalesRender orders as callbridge knows them: which lead an order belongs to (R-21).

Item: pk=ORDER#<order_id> sk=ORDER {order_id, lead_id, origin, linked_at, last_group, last_seen_at}.
`origin` is "callbridge" for an order the intake worker created (or one found carrying a lead id), "crm"
for one made outside callbridge (in the CRM, imported, from a CPA network). The link is written once
(create-if-absent) and never moved: every copy of a webhook and every racing worker agrees on the lead.
"""

from __future__ import annotations

from functions.core import resources, store, times
from functions.records import retention

MAX_ORDER_ID_BYTES = 64


def _key(order_id: str) -> dict:
    return {"pk": f"ORDER#{order_id}", "sk": "ORDER"}


def link(order_id: str, lead_id: str, origin: str) -> str:
    """Tie the order to a lead unless it is tied already; returns the lead it is tied to (first one wins)."""
    from botocore.exceptions import ClientError

    item = {"order_id": order_id, "lead_id": lead_id, "origin": origin, "linked_at": times.now_iso(),
            "ttl": retention.ttl()}
    try:
        # A refused put hands back the link that is there (ALL_OLD): no GetItem after it. The webhook and
        # the intake worker race to link every new order, so the loser's read was a request per lead.
        resources.table().put_item(Item={**_key(order_id), **store.to_dynamo(item)},
                                   ConditionExpression="attribute_not_exists(pk)",
                                   ReturnValuesOnConditionCheckFailure="ALL_OLD")
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
            raise
        linked = _lead_in(exc.response.get("Item"))
        if linked is None:  # an endpoint that ignores ReturnValuesOnConditionCheckFailure: read it
            linked = (get(order_id) or {}).get("lead_id")
        return str(linked or lead_id)
    return lead_id


def _lead_in(raw: dict | None) -> str | None:
    """The lead id of an item in DynamoDB's wire shape (an error response is not deserialised by boto3)."""
    value = (raw or {}).get("lead_id")
    if isinstance(value, dict):
        value = value.get("S")
    return str(value) if value else None


def get(order_id: str) -> dict | None:
    return store.get(_key(order_id))


def lead_of(order_id: str) -> str | None:
    item = get(order_id)
    return str(item["lead_id"]) if item and item.get("lead_id") else None


def note_status(order_id: str, group: str, status_name: str) -> None:
    """The last status the CRM showed for a linked order (for people reading the table; nothing decides on it)."""
    store.update(_key(order_id), {"last_group": group, "last_status_name": status_name,
                                  "last_seen_at": times.now_iso()}, condition="attribute_exists(pk)")
