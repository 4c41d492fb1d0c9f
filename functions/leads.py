"""Data access for leads in the state table (single-table design, keys `pk`/`sk`).

Items:
- lead            pk=LEAD#<lead_id>            sk=LEAD
- rejected post   pk=REJECTED#<yyyy-mm-dd>     sk=<iso time>#<id>   (kept 30 days for inspection)
Only this module knows the key layout; logic passes and receives plain dicts.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from decimal import Decimal

from functions import resources

LEAD_NAMESPACE = uuid.UUID("5d3f2a4e-8a1b-4c7e-9f00-c0ffee0b1d9e")
REJECTED_TTL_SECONDS = 30 * 86400


def lead_id_for(source: str, dedupe_key: str) -> str:
    """Deterministic: every copy of one submission maps to the same lead id (R-4)."""
    return str(uuid.uuid5(LEAD_NAMESPACE, f"{source}:{dedupe_key}"))


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _key(lead_id: str) -> dict:
    return {"pk": f"LEAD#{lead_id}", "sk": "LEAD"}


def _to_dynamo(value):
    # DynamoDB wants Decimal, not float; round-trip through JSON keeps nested data intact.
    return json.loads(json.dumps(value, ensure_ascii=False), parse_float=Decimal)


def _from_dynamo(value):
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _from_dynamo(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_dynamo(v) for v in value]
    return value


def create(lead: dict) -> bool:
    """Store a new lead unless one with that id exists. True when this call created it."""
    from botocore.exceptions import ClientError

    item = {**_key(lead["lead_id"]), **_to_dynamo(lead)}
    try:
        resources.table().put_item(Item=item, ConditionExpression="attribute_not_exists(pk)")
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
            return False
        raise
    return True


def get(lead_id: str) -> dict | None:
    item = resources.table().get_item(Key=_key(lead_id), ConsistentRead=True).get("Item")
    if item is None:
        return None
    return {k: v for k, v in _from_dynamo(item).items() if k not in ("pk", "sk")}


def update(lead_id: str, *, only_if_missing: str | None = None, **changes) -> bool:
    """Set attributes on an existing lead. With `only_if_missing`, only when that attribute is absent
    (a once-only step such as scheduling the first callback); False when the condition fails."""
    from botocore.exceptions import ClientError

    names = {f"#k{i}": k for i, k in enumerate(changes)}
    values = {f":v{i}": _to_dynamo(v) for i, v in enumerate(changes.values())}
    condition = "attribute_exists(pk)"
    if only_if_missing:
        names["#once"] = only_if_missing
        condition += " AND attribute_not_exists(#once)"
    try:
        resources.table().update_item(
            Key=_key(lead_id),
            UpdateExpression="SET " + ", ".join(f"#k{i} = :v{i}" for i in range(len(changes))),
            ConditionExpression=condition,
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
            return False
        raise
    return True


def store_rejected(source: str, reason: str, field_name: str, raw: dict) -> str:
    """Keep a rejected post (R-5: nothing lost) where an operator can find it by day."""
    rejected_id = str(uuid.uuid4())
    now = now_iso()
    resources.table().put_item(
        Item={
            "pk": f"REJECTED#{now[:10]}",
            "sk": f"{now}#{rejected_id}",
            "rejected_id": rejected_id,
            "source": source,
            "reason": reason,
            "field": field_name,
            # UTF-8 Cyrillic is 2 bytes a char: this stays under DynamoDB's 400 KB item limit.
            "raw": json.dumps(raw, ensure_ascii=False)[:150_000],
            "received_at": now,
            "ttl": int(time.time()) + REJECTED_TTL_SECONDS,
        }
    )
    return rejected_id


def rejected_on(day: str) -> list[dict]:
    """Rejected posts of one UTC day (yyyy-mm-dd), oldest first."""
    from boto3.dynamodb.conditions import Key

    items = resources.table().query(KeyConditionExpression=Key("pk").eq(f"REJECTED#{day}"))["Items"]
    return [_from_dynamo(i) for i in items]
