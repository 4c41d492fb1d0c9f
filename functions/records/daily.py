"""Aggregates per offer and day (R-22), kept as things happen: pk=DAILY#<offer_id> sk=DAY#<yyyy-mm-dd>.

A report never scans leads or calls: it reads at most one item per offer and day. Each counter is
added in the *same DynamoDB transaction* as the once-only write of the fact it counts, so a duplicate
(a Tilda retry, an SQS redelivery, a repeated Beeline event, a reconciler pass) whose fact write fails
its condition adds nothing, and a crash never leaves a fact without its count or a count without its
fact:

| counter | fact (once-only write it rides on) | module |
|---|---|---|
| `leads`, `leads_<source>` | the lead's conditional create | records/leads.create |
| `calls`, speed-to-lead sample | the call's claim (an un-claim takes both back) | records/calls.claim / unclaim |
| `answered`, `talk_seconds`, `calls_over_60s`, `outcome_<o>`, `inbound_*` | the call's finish | records/calls.finish |
| `cost_rub` | the call's `cost_counted` flag (with the month's spend) | records/calls.finish, or spend.add_call_cost |
| `approved`, `revenue_rub` | a once-marker per order, APPROVED#<order_id> | `order_approved` here |
| `adspend_rub` | set, not added (`set_adspend`, PUT /v1/adspend) | here |

The day is the offer's calendar day (`offer.working_hours.timezone`) of the moment the fact belongs
to: a lead's `created_at`; a call's claim (`dialing_at`) for everything about that call, so a call
placed at 23:59 and answered at 00:01 counts on one day; an inbound call's `created_at`. Calls placed
before this module existed are counted as placed when they finish.

Speed to lead (form to first call) is a histogram: 1 s buckets below 10 min, 10 s below an hour, 1 min
below a day, 1 h up to 30 days, so the median and p95 of any range of days are exact to the bucket and
histograms add up across days and offers. Each bucket of a day is an item of its own beside the day's
(sk DAY#<day>#STL#<lower bound>, a counter `n`): as attributes of the day item, a day's few hundred buckets
would make that item several KB, and every transaction that counts anything on the day (a lead, a claim, a
call's end) pays a write unit per KB of it, twice. A bucket item stays tiny: the claim pays two units for
it. The sample is taken once per lead, at the claim of its first call (a marker `first_dialled_call` on the
lead in the same transaction). Days counted before the split keep their buckets as `stl_h_<lower bound>`
attributes of the day item, which are still read.

The recent-calls feed (RECENT#CALLS, sk <ended_at>#<call_id>) gets one item per finished call, a plain
put right after the finish transaction (half the capacity of a transaction item; the same key every
time, so a repeat is harmless): a crash in between is repaired by the tracker's next `finalize`, which
puts it again before the call's `effects_done`. The feed is read newest first with a bounded Query (at
most RECENT_CAP items), and is trimmed back to RECENT_CAP by one finish in TRIM_EVERY: a trim reads
RECENT_CAP items and more, so trimming on every finish would cost more than the finish itself, and the
few items above the cap are never read.

DynamoDB cancels a transaction that meets another one on the same item (TransactionConflict, not
retried by botocore): the hot day item makes that possible, so a cancelled transaction is tried again
a few times with jitter. Nothing of a cancelled transaction was applied, so the retry is safe.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import re
import time
import zlib
from zoneinfo import ZoneInfo

from functions.core import config, resources, store, times
from functions.core.observability import logger

COUNTERS = ("leads", "calls", "answered", "talk_seconds", "calls_over_60s", "approved", "revenue_rub",
            "cost_rub", "inbound_calls", "inbound_answered", "inbound_talk_seconds")
OVER_SECONDS = 60  # "calls over 60 s": talk strictly longer than this (the seed: "превышает 60 секунд")
STL_PREFIX = "stl_h_"  # a bucket as an attribute of the day item: days counted before the bucket items
STL_SK = "#STL#"
STL_CAP_SECONDS = 30 * 86400  # anything slower lands in this last bucket
RECENT_PK = "RECENT#CALLS"
RECENT_CAP = 200
TRIM_EVERY = 10
APPROVED_TTL_SECONDS = 400 * 86400  # an order's once-marker outlives any plausible webhook redelivery
CONFLICT_ATTEMPTS = 6
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


# --- days -------------------------------------------------------------------------------------------

def zone(offer_id) -> ZoneInfo:
    """The offer's time zone; an offer no longer configured falls back to the budget's."""
    cfg = config.load()
    offer = cfg.offer(offer_id) if isinstance(offer_id, int) else None
    return ZoneInfo(offer.working_hours.timezone if offer else cfg.budget.timezone)


def day_of(offer_id, moment=None) -> str:
    """The offer's calendar day (yyyy-mm-dd) of a moment (ISO text or datetime; unreadable = now)."""
    if isinstance(moment, dt.datetime):
        parsed = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    else:
        parsed = times.parse(moment) or times.utcnow()
    return parsed.astimezone(zone(offer_id)).date().isoformat()


def today(offer_id=None) -> dt.date:
    return dt.date.fromisoformat(day_of(offer_id))


def _day_text(day) -> str:
    if isinstance(day, dt.date) and not isinstance(day, dt.datetime):
        return day.isoformat()
    if isinstance(day, str) and _DAY.fullmatch(day):
        dt.date.fromisoformat(day)  # raises ValueError for 2026-02-30
        return day
    raise ValueError(f"day must be a date or yyyy-mm-dd, not {day!r}")


def _key(offer_id: int, day: str) -> dict:
    return {"pk": f"DAILY#{offer_id}", "sk": f"DAY#{day}"}


# --- speed-to-lead histogram ---------------------------------------------------------------------------

def _width(lower: int) -> int:
    if lower < 600:
        return 1
    if lower < 3600:
        return 10
    if lower < 86400:
        return 60
    return 3600


def bucket(seconds: float) -> int:
    """The histogram bucket (its lower bound in whole seconds) of a speed-to-lead value."""
    s = min(max(0, math.floor(seconds)), STL_CAP_SECONDS)
    return s - s % _width(s)


def bucket_value(lower: int) -> float:
    """What a bucket stands for: the value itself for 1 s buckets, else the bucket's middle."""
    width = _width(lower)
    return float(lower) if width == 1 else lower + width / 2


def tx_speed(offer_id: int, day, seconds: float, sign: int = 1) -> dict:
    """The `Update` that adds one speed-to-lead sample to its bucket's item of the offer's day (sign -1 takes
    it back)."""
    day_text, lower = _day_text(day), bucket(seconds)
    return tx_update({"pk": f"DAILY#{offer_id}", "sk": f"DAY#{day_text}{STL_SK}{lower}"},
                     {"offer_id": offer_id, "day": day_text, "bucket": lower}, add={"n": sign})


def quantile(histogram: dict[int, int], q: float) -> float | None:
    """From {bucket lower bound: count}: the median (q=0.5, the mean of the two middle values for an even
    count) or the nearest-rank q-quantile otherwise; None without samples."""
    items = sorted((b, c) for b, c in histogram.items() if c > 0)
    n = sum(c for _, c in items)
    if n == 0:
        return None

    def at(rank: int) -> float:  # 0-based rank in the sorted samples
        seen = 0
        for lower, count in items:
            seen += count
            if rank < seen:
                return bucket_value(lower)
        return bucket_value(items[-1][0])

    if q == 0.5:
        return (at((n - 1) // 2) + at(n // 2)) / 2
    return at(max(0, math.ceil(q * n) - 1))


def seconds_between(start, end) -> float | None:
    first, last = times.parse(start), times.parse(end)
    if first is None or last is None:
        return None
    return max(0.0, (last - first).total_seconds())


# --- transaction items (records/ modules pass their own keys) -----------------------------------------

def _typed(value):
    from boto3.dynamodb.types import TypeSerializer

    return TypeSerializer().serialize(store.to_dynamo(value))


def tx_update(key: dict, changes: dict | None = None, *, condition: str | None = None, names: dict | None = None,
              values: dict | None = None, remove: tuple[str, ...] = (), add: dict | None = None) -> dict:
    """A TransactWriteItems `Update` with the semantics of core.store.update (SET, REMOVE, ADD)."""
    expression, names, typed_values = store.update_expression(changes, remove=remove, add=add, names=names,
                                                              values=values, encode=_typed)
    update = {"TableName": resources.table_name(), "Key": {k: _typed(v) for k, v in key.items()},
              "UpdateExpression": expression, "ExpressionAttributeNames": names}
    if typed_values:
        update["ExpressionAttributeValues"] = typed_values
    if condition:
        update["ConditionExpression"] = condition
    return update


def tx_put(key: dict, item: dict, *, new: bool = False) -> dict:
    """A TransactWriteItems `Put`; `new`: only if no item has this key."""
    put = {"TableName": resources.table_name(), "Item": {k: _typed(v) for k, v in {**key, **item}.items()}}
    if new:
        put["ConditionExpression"] = "attribute_not_exists(pk)"
    return put


def tx_count(offer_id: int, day: str, adds: dict) -> dict:
    """The `Update` that adds to an offer's day counters (rub rounded to kopecks)."""
    adds = {k: round(v, 2) if isinstance(v, float) else v for k, v in adds.items() if v}
    return tx_update(_key(offer_id, _day_text(day)), {"offer_id": offer_id, "day": _day_text(day)}, add=adds)


def _cancel_codes(exc) -> list[str] | None:
    if exc.response.get("Error", {}).get("Code") != "TransactionCanceledException":
        return None
    return [r.get("Code") or "None" for r in exc.response.get("CancellationReasons") or []]


def _conflict(exc) -> bool:
    if exc.response.get("Error", {}).get("Code") == "TransactionConflictException":
        return True
    codes = _cancel_codes(exc) or []
    return "TransactionConflict" in codes and "ConditionalCheckFailed" not in codes


def _retrying(write) -> set[int]:
    """Run one transaction; the indices of its items whose condition failed (empty: it was applied).
    A conflict with another transaction is retried with jitter; any other error is raised."""
    from botocore.exceptions import ClientError

    for attempt in range(CONFLICT_ATTEMPTS):
        try:
            write()
            return set()
        except ClientError as exc:
            if _conflict(exc) and attempt < CONFLICT_ATTEMPTS - 1:
                time.sleep(random.uniform(0.01, 0.05) * 2 ** attempt)
                continue
            codes = _cancel_codes(exc)
            if codes and "ConditionalCheckFailed" in codes:
                return {i for i, code in enumerate(codes) if code == "ConditionalCheckFailed"}
            raise
    raise AssertionError("unreachable")


def write(fact: dict, count: dict, *, put: bool = False, also: dict | None = None, also_put: bool = False,
          more: dict | None = None) -> set[int]:
    """Write a fact (an `Update`, or a `Put` with `put`) and its counters (tx_count) in one transaction,
    optionally with one more item `also` (an `Update`, or a `Put` with `also_put`) and, after an `Update`
    `also`, a fourth `Update` `more`. Returns the indices (0 fact, 1 counters, 2 also, 3 more) whose
    condition failed; empty when everything was written.
    The TransactItems lists are spelled out: tests/test_iam.py reads their kinds for the IAM grants."""
    dynamodb = resources.client("dynamodb")
    if more is not None:
        if also is None or also_put or put:
            raise ValueError("`more` goes with an Update fact and an Update `also`")
        return _retrying(lambda: dynamodb.transact_write_items(
            TransactItems=[{"Update": fact}, {"Update": count}, {"Update": also}, {"Update": more}]))
    if also is None and put:
        return _retrying(lambda: dynamodb.transact_write_items(TransactItems=[{"Put": fact}, {"Update": count}]))
    if also is None:
        return _retrying(lambda: dynamodb.transact_write_items(TransactItems=[{"Update": fact}, {"Update": count}]))
    if also_put:
        return _retrying(lambda: dynamodb.transact_write_items(
            TransactItems=[{"Update": fact}, {"Update": count}, {"Put": also}]))
    return _retrying(lambda: dynamodb.transact_write_items(
        TransactItems=[{"Update": fact}, {"Update": count}, {"Update": also}]))


# --- facts counted here ------------------------------------------------------------------------------

def order_approved(order_id, offer_id: int, day=None, payout: float | None = None) -> bool:
    """Count an approved order once: `approved` +1 and `revenue_rub` + payout (default: the offer's
    `payout_rub`) on `day` (a date or yyyy-mm-dd, default today in the offer's time zone), with a
    once-marker per order in the same transaction. Safe to call from every place that sees the order
    APPROVED (the SalesRender webhook, the dialer's CRM re-read): True for the call that counted it."""
    if isinstance(order_id, bool) or not isinstance(order_id, (int, str)) or not str(order_id).strip() \
            or len(str(order_id).encode()) > 256:  # far below DynamoDB's key limit
        raise ValueError("order_id must be a non-empty id of at most 256 bytes")
    if isinstance(offer_id, bool) or not isinstance(offer_id, int):
        raise ValueError("offer_id must be an integer")
    day_text = _day_text(day) if day is not None else day_of(offer_id)
    if payout is None:
        offer = config.load().offer(offer_id)
        payout = offer.payout_rub if offer else 0.0
    payout = float(payout)
    if not math.isfinite(payout) or payout < 0:
        raise ValueError("payout must be a finite number >= 0")
    marker = tx_put({"pk": f"APPROVED#{order_id}", "sk": "ORDER"},
                    {"order_id": str(order_id), "offer_id": offer_id, "day": day_text, "payout_rub": payout,
                     "counted_at": times.now_iso(), "ttl": int(time.time()) + APPROVED_TTL_SECONDS}, new=True)
    failed = write(marker, tx_count(offer_id, day_text, {"approved": 1, "revenue_rub": payout}), put=True)
    return not failed


def set_adspend(offer_id: int, day, rub: float) -> dict:
    """Set (not add) the offer's ad spend of a day; a repeat with the same figure changes nothing."""
    from botocore.exceptions import ClientError

    day_text = _day_text(day)
    for attempt in range(CONFLICT_ATTEMPTS):
        try:
            store.update(_key(offer_id, day_text), {"offer_id": offer_id, "day": day_text,
                                                     "adspend_rub": round(float(rub), 2),
                                                     "adspend_set_at": times.now_iso()})
            return {"offer_id": offer_id, "day": day_text, "rub": round(float(rub), 2)}
        except ClientError as exc:
            if not _conflict(exc) or attempt == CONFLICT_ATTEMPTS - 1:
                raise
            time.sleep(random.uniform(0.01, 0.05) * 2 ** attempt)
    raise AssertionError("unreachable")


# --- reading ---------------------------------------------------------------------------------------------

def _row(item: dict) -> dict:
    row = {name: item.get(name, 0) for name in COUNTERS}
    row["adspend_rub"] = item.get("adspend_rub", 0)
    row["day"] = item.get("day") or str(item.get("sk", "")).removeprefix("DAY#")
    row["offer_id"] = item.get("offer_id")
    row["leads_by_source"] = {k.removeprefix("leads_"): v for k, v in item.items()
                              if k.startswith("leads_") and k != "leads"}
    row["outcomes"] = {k.removeprefix("outcome_"): v for k, v in item.items() if k.startswith("outcome_")}
    row["speed_to_lead"] = {int(k.removeprefix(STL_PREFIX)): v for k, v in item.items()
                            if k.startswith(STL_PREFIX) and v}
    return row


def days(offer_id: int, from_day, to_day) -> dict[str, dict]:
    """The offer's stored days in [from_day, to_day] (one bounded Query), by yyyy-mm-dd. Each: the
    COUNTERS, `adspend_rub`, `leads_by_source`, `outcomes` and `speed_to_lead` ({bucket: count}, see
    `quantile`). Days with nothing stored are absent."""
    from boto3.dynamodb.conditions import Key

    start, end = _day_text(from_day), _day_text(to_day)
    # "~" sorts after "#": the last day's bucket items (DAY#<end>#STL#...) are in the range too.
    condition = Key("pk").eq(f"DAILY#{offer_id}") & Key("sk").between(f"DAY#{start}", f"DAY#{end}~")
    found, buckets, kwargs = {}, [], {"KeyConditionExpression": condition, "ConsistentRead": True}
    while True:
        page = resources.table().query(**kwargs)
        for item in map(store.from_dynamo, page["Items"]):
            if STL_SK in str(item["sk"]):
                buckets.append(item)
            else:
                row = _row(item)
                found[row["day"]] = row
        if "LastEvaluatedKey" not in page:
            break
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    for item in buckets:
        if item.get("n"):
            day = str(item["day"])
            histogram = found.setdefault(day, _row({"day": day, "offer_id": offer_id}))["speed_to_lead"]
            histogram[int(item["bucket"])] = histogram.get(int(item["bucket"]), 0) + int(item["n"])
    return found


# --- the recent-calls feed ---------------------------------------------------------------------------------

def put_recent(call: dict, ttl: int) -> None:
    """Put an ended call (`call` with its final fields and call_id) on the feed; the key is the call's
    (ended_at, call_id), so putting it again (calls.finish, then a repairing tracker.finalize) changes nothing."""
    ended_at = str(call.get("ended_at") or times.now_iso())
    item = {"call_id": call["call_id"], "lead_id": call.get("lead_id"), "offer_id": call.get("offer_id"),
            "started_at": call.get("dialing_at") or call.get("created_at") or ended_at, "ended_at": ended_at,
            "outcome": call.get("outcome"), "talk_seconds": int(call.get("talk_seconds") or 0),
            "phone": call.get("phone"), "direction": call.get("direction") or "outbound", "ttl": ttl}
    resources.table().put_item(Item={"pk": RECENT_PK, "sk": f"{ended_at}#{call['call_id']}", **store.to_dynamo(item)})


def recent_calls(limit: int = 20) -> list[dict]:
    """The last `limit` (at most RECENT_CAP) finished calls, newest first: call_id, lead_id, offer_id,
    started_at, ended_at, outcome, talk_seconds, phone (in full: the caller masks it), direction."""
    from boto3.dynamodb.conditions import Key

    limit = max(1, min(int(limit), RECENT_CAP))
    page = resources.table().query(KeyConditionExpression=Key("pk").eq(RECENT_PK), ScanIndexForward=False,
                                   Limit=limit, ConsistentRead=True)
    return [{k: v for k, v in store.from_dynamo(item).items() if k not in ("pk", "sk", "ttl")}
            for item in page["Items"]]


def trim_recent(call_id: str | None = None) -> None:
    """Keep the feed near RECENT_CAP items: each finish adds one, and the finish of one call in TRIM_EVERY
    (by its id; every call when None) removes what is beyond (up to 25 a pass, more than TRIM_EVERY). Best
    effort: the items also expire with the data retention."""
    from boto3.dynamodb.conditions import Key

    if call_id is not None and zlib.crc32(call_id.encode()) % TRIM_EVERY:
        return
    try:
        page = resources.table().query(KeyConditionExpression=Key("pk").eq(RECENT_PK), ScanIndexForward=False,
                                       Limit=RECENT_CAP + 25, ProjectionExpression="pk, sk")
        for item in page["Items"][RECENT_CAP:]:
            resources.table().delete_item(Key={"pk": item["pk"], "sk": item["sk"]})
    except Exception as exc:  # noqa: BLE001 - the call has ended; an untrimmed feed only grows a little
        logger.warning("recent-calls feed not trimmed", extra={"error": str(exc)[:300]})


# Groups that mean the order was approved: a later one seen first (a lost or skipped webhook) still counts it.
APPROVED_GROUPS = ("APPROVED", "SHIPPED", "DELIVERED", "UNDELIVERED", "REFUNDED")


def order_status_seen(order_id, offer_id, group: str | None) -> bool:
    """An order's status group was seen (webhook or the dialer's re-read): count it approved once if it is."""
    if group not in APPROVED_GROUPS or isinstance(offer_id, bool) or not isinstance(offer_id, int):
        return False
    return order_approved(order_id, offer_id)
