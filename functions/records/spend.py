"""Telephony spend per calendar month (R-23), pk=SPEND#<yyyy-mm> sk=TOTAL.

The month is the business's: the calendar month in `budget.timezone` (Moscow by default), so a call at
01:00 Moscow on the 1st counts in the new month although it is still the old one in UTC.
Each call's cost is added once: by the call's finish when the finish knows it (records/calls.end, the
cost_counted flag in the same transaction), else by `add_call_cost`; calling/budget.py checks it before
every call.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from functions.core import config, resources, store, times
from functions.records import calls, daily


def month(now: dt.datetime | None = None) -> str:
    """The budget month (yyyy-mm) of a moment (naive means UTC), now by default."""
    moment = now or times.utcnow()
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(ZoneInfo(config.load().budget.timezone)).strftime("%Y-%m")


def _key(yyyy_mm: str) -> dict:
    return {"pk": f"SPEND#{yyyy_mm}", "sk": "TOTAL"}


def spent(yyyy_mm: str | None = None) -> float:
    return float((store.get(_key(yyyy_mm or month())) or {}).get("rub", 0))


def add(rub: float, yyyy_mm: str | None = None) -> float:
    """Add a cost that belongs to no call; returns the month's new total."""
    item = store.update(_key(yyyy_mm or month()), {}, add={"rub": round(rub, 2), "calls": 1}, return_new=True)
    return float(item["rub"])


def tx_add(rub: float, yyyy_mm: str) -> dict:
    """The TransactWriteItems `Update` that adds one call's cost to the month, for a transaction that also
    marks the call `cost_counted` (here, or the call's finish in records/calls.end)."""
    from boto3.dynamodb.types import TypeSerializer

    typed = TypeSerializer().serialize
    return {
        "TableName": resources.table_name(), "Key": {k: typed(v) for k, v in _key(yyyy_mm).items()},
        "UpdateExpression": "ADD #rub :rub, #calls :one",
        "ExpressionAttributeNames": {"#rub": "rub", "#calls": "calls"},
        "ExpressionAttributeValues": {":rub": typed(store.to_dynamo(round(rub, 2))), ":one": typed(1)},
    }


def add_call_cost(call_id: str, rub: float, yyyy_mm: str | None = None, call: dict | None = None) -> bool:
    """Add a call's cost to the month and mark the call `cost_counted`, in one transaction: both or
    neither, so a crash never loses the cost and a retry (also after a lost answer) never counts it
    twice. True when this call counted it, False when it had been counted before. The call's day
    (records/daily.py, the day it was dialled) gets the cost in the same transaction. `call`: the call
    item as the caller just read it (its offer and day are read from it)."""
    from boto3.dynamodb.types import TypeSerializer
    from botocore.exceptions import ClientError

    typed = TypeSerializer().serialize
    spend_update = tx_add(rub, yyyy_mm or month())
    flag_update = {
        "TableName": resources.table_name(), "Key": {k: typed(v) for k, v in calls.key(call_id).items()},
        "UpdateExpression": "SET #flag = :at",
        "ConditionExpression": "attribute_exists(pk) AND attribute_not_exists(#flag)",
        "ExpressionAttributeNames": {"#flag": "cost_counted"},
        "ExpressionAttributeValues": {":at": typed(times.now_iso())},
    }
    call = (call if call is not None else calls.get(call_id)) or {}  # the caller's read, when it has one
    offer_id = call.get("offer_id")
    if isinstance(offer_id, int) and not isinstance(offer_id, bool):
        day = call.get("counted_day") or daily.day_of(offer_id, call.get("dialing_at") or call.get("created_at"))
        return not daily.write(flag_update, daily.tx_count(offer_id, day, {"cost_rub": round(rub, 2)}),
                               also=spend_update)
    try:
        resources.client("dynamodb").transact_write_items(
            TransactItems=[{"Update": spend_update}, {"Update": flag_update}])
    except ClientError as exc:
        reasons = exc.response.get("CancellationReasons") or []
        if exc.response["Error"]["Code"] == "TransactionCanceledException" and any(
                r.get("Code") == "ConditionalCheckFailed" for r in reasons):
            return False
        raise
    return True
