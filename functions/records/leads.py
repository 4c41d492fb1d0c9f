"""Data access for leads in the state table (single-table design, keys `pk`/`sk`).

Items:
- lead            pk=LEAD#<lead_id>            sk=LEAD   (expires after the configured data retention)
- rejected post   pk=REJECTED#<yyyy-mm-dd>     sk=<iso time>#<id>   (kept 30 days for inspection)
Only this module knows the key layout; logic passes and receives plain dicts.
"""

from __future__ import annotations

import json
import time
import uuid

from functions.core import resources, store, times
from functions.core.text import clip
from functions.records import daily, retention

LEAD_NAMESPACE = uuid.UUID("5d3f2a4e-8a1b-4c7e-9f00-c0ffee0b1d9e")
REJECTED_TTL_SECONDS = 30 * 86400


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


def store_rejected(source: str, reason: str, field_name: str, raw: dict | str | bytes) -> str:
    """Keep a rejected post (R-5: nothing lost) where an operator can find it by day: a parsed post
    (dict) as JSON, an unreadable one as it came. A post too large for a DynamoDB item (400 KB) is kept
    whole in the recordings bucket under `raw/` (same 30-day lifecycle); the item holds its start."""
    inline_bytes = 100_000  # with the other attributes, far below the item limit whatever the script

    rejected_id = str(uuid.uuid4())
    now = times.now_iso()
    if isinstance(raw, dict):
        raw = json.dumps(raw, ensure_ascii=False)
    data = raw if isinstance(raw, bytes) else raw.encode()
    text = data.decode("utf-8", "replace")
    item = {
        "pk": f"REJECTED#{now[:10]}",
        "sk": f"{now}#{rejected_id}",
        "rejected_id": rejected_id,
        "source": source,
        "reason": clip(reason, 1000),
        "field": clip(field_name, 256),
        "raw": text,
        "received_at": now,
        "ttl": int(time.time()) + REJECTED_TTL_SECONDS,
    }
    if len(data) > inline_bytes or text.encode() != data:  # too big, or not text: the bytes go to S3
        key = f"raw/rejected/{now[:10]}/{rejected_id}"
        resources.client("s3").put_object(Bucket=resources.bucket_name(), Key=key, Body=data,
                                          ContentType="application/octet-stream")
        item.update(raw=clip(text, inline_bytes), raw_s3_key=key, raw_bytes=len(data), raw_truncated=True)
    resources.table().put_item(Item=item)
    return rejected_id


def rejected_on(day: str) -> list[dict]:
    """Rejected posts of one UTC day (yyyy-mm-dd), oldest first (all pages, unlike a single query)."""
    return store.query(f"REJECTED#{day}")
