"""Data access for leads in the state table (single-table design, keys `pk`/`sk`).

Items:
- lead            pk=LEAD#<lead_id>            sk=LEAD   (expires after the configured data retention)
Only this module knows the key layout; logic passes and receives plain dicts.
"""

from __future__ import annotations

import uuid

from functions.core import resources, store
from functions.records import daily, retention

LEAD_NAMESPACE = uuid.UUID("5d3f2a4e-8a1b-4c7e-9f00-c0ffee0b1d9e")


def lead_id_for(source: str, dedupe_key: str) -> str:
    """Deterministic: every copy of one submission maps to the same lead id (R-4)."""
    return str(uuid.uuid5(LEAD_NAMESPACE, f"{source}:{dedupe_key}"))


def _key(lead_id: str) -> dict:
    return {"pk": f"LEAD#{lead_id}", "sk": "LEAD"}


def key(lead_id: str) -> dict:
    """The lead item's key, for a transaction another record module writes together with it."""
    return _key(lead_id)


def create(lead: dict) -> bool:
    """Store a new lead unless one with that id exists. True when this call created it. It expires
    (`ttl`) after the configured data retention. The day's `leads` counter (records/daily.py) is added
    in the same transaction, so a duplicate submission counts nothing."""
    item = {**lead, "ttl": retention.ttl()}
    offer_id = lead.get("offer_id")
    if not isinstance(offer_id, int) or isinstance(offer_id, bool):
        return store.put_new(_key(lead["lead_id"]), item)  # no offer, no day to count it on
    adds = {"leads": 1, f"leads_{lead.get('source') or 'unknown'}": 1}
    count = daily.tx_count(offer_id, daily.day_of(offer_id, lead.get("created_at")), adds)
    return not daily.write(daily.tx_put(_key(lead["lead_id"]), item, new=True), count, put=True)


def get(lead_id: str) -> dict | None:
    return store.get(_key(lead_id))


def update(lead_id: str, *, only_if_missing: str | None = None, **changes) -> bool:
    """Set attributes on an existing lead. With `only_if_missing`, only when that attribute is absent
    (a once-only step such as scheduling the first callback); False when the condition fails."""
    condition, names = "attribute_exists(pk)", {}
    if only_if_missing:
        condition += " AND attribute_not_exists(#once)"
        names["#once"] = only_if_missing
    return store.update(_key(lead_id), changes, condition=condition, names=names)


def latest_by_phone(phone: str) -> dict | None:
    """The newest lead of this phone number (through the sparse by_phone index), or None."""
    from boto3.dynamodb.conditions import Key

    found = resources.table().query(IndexName="by_phone", KeyConditionExpression=Key("phone_key").eq(phone),
                                    ScanIndexForward=False, Limit=1)["Items"]
    return get(found[0]["pk"].removeprefix("LEAD#")) if found else None
