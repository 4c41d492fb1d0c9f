"""Small helpers over the state table (single-table design, keys `pk`/`sk`).

Each data module (records/, and the calling stage's leases) owns its key layout and uses these
for the DynamoDB mechanics: Decimal conversion, create-if-absent, conditional updates.
"""

from __future__ import annotations

import json
from decimal import Decimal

from functions.core import resources


def to_dynamo(value):
    # DynamoDB wants Decimal, not float; a JSON round trip converts nested data too.
    return json.loads(json.dumps(value, ensure_ascii=False), parse_float=Decimal)


def from_dynamo(value):
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: from_dynamo(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_dynamo(v) for v in value]
    return value


def _conditional_failed(exc) -> bool:
    return exc.response["Error"]["Code"] == "ConditionalCheckFailedException"


def put_new(key: dict, attributes: dict) -> bool:
    """Create the item unless it exists; True when this call created it."""
    from botocore.exceptions import ClientError

    try:
        resources.table().put_item(Item={**key, **to_dynamo(attributes)},
                                   ConditionExpression="attribute_not_exists(pk)")
    except ClientError as exc:
        if _conditional_failed(exc):
            return False
        raise
    return True


# DynamoDB's key limits: a longer key cannot exist, and a GetItem with one is a ValidationException (moto
# does not check), so an id from outside that long is simply not found.
MAX_PK_BYTES, MAX_SK_BYTES = 2048, 1024


def get(key: dict) -> dict | None:
    if len(str(key["pk"]).encode()) > MAX_PK_BYTES or len(str(key.get("sk", "")).encode()) > MAX_SK_BYTES:
        return None
    item = resources.table().get_item(Key=key, ConsistentRead=True).get("Item")
    if item is None:
        return None
    return {k: v for k, v in from_dynamo(item).items() if k not in ("pk", "sk")}


def update_expression(changes: dict | None, *, remove: tuple[str, ...] = (), add: dict | None = None,
                      names: dict | None = None, values: dict | None = None, encode=to_dynamo):
    """(UpdateExpression, names, values) for SET `changes`, REMOVE `remove`, ADD `add`, merged with a condition's
    own `#names`/`:values`; `encode` turns a value into what the caller's API takes (resource or client shape)."""
    names = dict(names or {})
    values = {k: encode(v) for k, v in (values or {}).items()}
    clauses = []
    if changes:
        names.update({f"#s{i}": k for i, k in enumerate(changes)})
        values.update({f":s{i}": encode(v) for i, v in enumerate(changes.values())})
        clauses.append("SET " + ", ".join(f"#s{i} = :s{i}" for i in range(len(changes))))
    if remove:
        names.update({f"#r{i}": k for i, k in enumerate(remove)})
        clauses.append("REMOVE " + ", ".join(f"#r{i}" for i in range(len(remove))))
    if add:
        names.update({f"#a{i}": k for i, k in enumerate(add)})
        values.update({f":a{i}": encode(v) for i, v in enumerate(add.values())})
        clauses.append("ADD " + ", ".join(f"#a{i} :a{i}" for i in range(len(add))))
    return " ".join(clauses), names, values


def update(key: dict, changes: dict, *, condition: str | None = None, names: dict | None = None,
           values: dict | None = None, remove: tuple[str, ...] = (), add: dict | None = None,
           return_new: bool = False):
    """SET `changes`, REMOVE `remove`, ADD `add` (numbers) under an optional condition expression
    (with its own `#names`/`:values`). False when the condition fails; the new item if `return_new`."""
    from botocore.exceptions import ClientError

    expression, names, values = update_expression(changes, remove=remove, add=add, names=names, values=values)
    kwargs = {"Key": key, "UpdateExpression": expression, "ExpressionAttributeNames": names}
    if values:
        kwargs["ExpressionAttributeValues"] = values
    if condition:
        kwargs["ConditionExpression"] = condition
    if return_new:
        kwargs["ReturnValues"] = "ALL_NEW"
    try:
        response = resources.table().update_item(**kwargs)
    except ClientError as exc:
        if condition and _conditional_failed(exc):
            return False
        raise
    if return_new:
        return {k: v for k, v in from_dynamo(response["Attributes"]).items() if k not in ("pk", "sk")}
    return True


def query(pk: str, sk_prefix: str | None = None) -> list[dict]:
    """Every item of a partition (optionally only sort keys with a prefix), in sort-key order, all pages,
    strongly consistent, converted from DynamoDB's types (pk/sk kept: callers read the sort key)."""
    from boto3.dynamodb.conditions import Key

    condition = Key("pk").eq(pk)
    if sk_prefix:
        condition = condition & Key("sk").begins_with(sk_prefix)
    items, kwargs = [], {"KeyConditionExpression": condition, "ConsistentRead": True}
    while True:
        page = resources.table().query(**kwargs)
        items += [from_dynamo(i) for i in page["Items"]]
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
