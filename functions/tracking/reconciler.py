"""The call reconciler: a schedule (every 5 minutes) that settles calls the events did not.

Events can be lost (no subscription for a while, a delivery Beeline gave up on) or stored but not
applied (the webhook acknowledges after storing). Every call not yet ended is listed under
pk=OPENCALLS; for each one:
1. already ended: its consequences are completed if a crash interrupted them, and it leaves the list
   (so does a call put back to "queued": the dialer marks it open again when it dials);
2. bound to an extTrackingId: re-derived from its stored events (`tracker.refresh`), which heals
   an event whose processing failed;
3. still open RECONCILE_AFTER_SECONDS (default 15 min) after dialling: looked up in Beeline's
   `v2/statistics` (same customer number, same operator, started within 5 minutes of dialling):
   answered with the talk time from there, operator missed, or not answered;
4. nothing in the statistics RECONCILE_EXPIRE_SECONDS (default 1 h) after dialling: ended "failed"
   (settled_by "expired"). A call the events show talking gets RECONCILE_TALKING_EXPIRE_SECONDS
   (default 4 h) instead: a long conversation has no statistics row until it ends.
`tracker.finalize` does the rest: channel lease and operator freed, the retry policy, the
post-call job. One bad call (Beeline error, a broken item) is logged and skipped, never the run.

Before all that, a cheap first pass keeps every call that is still talking alive (its channel lease and
operator reservation extended, `tracker.keep_alive`), so a long conversation that sends no event keeps
its channel even when the statistics look-ups eat the run's time budget. An inbound call's new lead that
a crash left unqueued is queued again (`inbound.ensure_lead`).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import re
import time

from functions.core import times
from functions.core.observability import logger, metric
from functions.providers.beeline import client as beeline
from functions.records import calls
from functions.tracking import inbound, tracker

DEFAULT_AFTER_SECONDS = 900
DEFAULT_EXPIRE_SECONDS = 3600
DEFAULT_TALKING_EXPIRE_SECONDS = 4 * 3600
MATCH_SECONDS = 300           # a statistics row's startDate within this of dialling
PAGE_SIZE = 100
MAX_PAGES = 20                # a runaway server that ignores `page` must not loop forever
TIME_BUDGET_SECONDS = 10.0    # the schedule's Lambda has 15 s: stop early, the rest waits 5 minutes
OUTBOUND_ROW_STATUSES = ("PLACED", "MISSED")
INBOUND_ROW_STATUSES = ("RECIEVED", "RECEIVED", "MISSED")  # sic: Beeline spells it RECIEVED
INBOUND_DIRECTIONS = ("INBOUND", "INCOMING")


def _seconds(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value else default
    except ValueError:
        logger.warning("not an integer: default used", extra={"variable": name, "default": default})
        return default


def _epoch(value) -> float | None:
    moment = times.parse(value)
    return moment.timestamp() if moment else None


def _iso_z(epoch: float) -> str:
    """Beeline's query format: ISO-8601 UTC with milliseconds and `Z`."""
    return times.iso(dt.datetime.fromtimestamp(epoch, dt.UTC), "milliseconds")


def _ten_digits(value) -> str:
    digits = re.sub(r"\D", "", str(value or ""))
    return digits[-10:] if len(digits) >= 10 else ""


# --- statistics --------------------------------------------------------------------------------------

def _statistics(date_from: str, date_to: str) -> list[dict]:
    client = beeline.default_client()
    rows: list[dict] = []
    for page in range(MAX_PAGES):
        batch = client.statistics(date_from, date_to, page=page, page_size=PAGE_SIZE)
        if not batch:
            break
        rows += [r for r in batch if isinstance(r, dict)]
    return rows


def _matches(call: dict, row: dict, dialled_at: float) -> bool:
    start = row.get("startDate")
    if isinstance(start, bool) or not isinstance(start, int | float) or abs(start / 1000 - dialled_at) > MATCH_SECONDS:
        return False
    customer = _ten_digits(call.get("phone"))
    if not customer or customer not in (_ten_digits(row.get("phone_to")), _ten_digits(row.get("phone_from"))):
        return False
    abonent = row.get("abonent") or {}
    names = {str(abonent[k]) for k in ("userId", "extension", "phone") if isinstance(abonent, dict) and abonent.get(k)}
    ours = {str(call[k]) for k in ("operator", "target_id") if call.get(k)}
    if not names & ours:
        return False
    status = str(row.get("status") or "").upper()
    direction = str(row.get("direction") or "").upper()
    if call.get("direction") == "inbound":
        return status in INBOUND_ROW_STATUSES and (not direction or direction in INBOUND_DIRECTIONS)
    # An outbound call never matches an inbound row (the customer calling the same operator back).
    return status in OUTBOUND_ROW_STATUSES and (not direction or direction == "OUTBOUND")


def find_row(call: dict, dialled_at: float) -> dict | None:
    """The call's statistics row: the matching one that started closest to the dialling time."""
    rows = _statistics(_iso_z(dialled_at - MATCH_SECONDS), _iso_z(dialled_at + MATCH_SECONDS))
    found = [r for r in rows if _matches(call, r, dialled_at)]
    return min(found, key=lambda r: abs(r["startDate"] / 1000 - dialled_at)) if found else None


def _settle_from_row(call_id: str, call: dict, row: dict) -> bool:
    status = str(row.get("status") or "").upper()
    duration_ms = row.get("duration") if isinstance(row.get("duration"), int | float) else 0
    start_ms = row["startDate"]
    # Statistics give the start and the talk time, not the answer moment: answered_at is the start (the
    # records list dates recordings by it too) and ended_at start + talk, both slightly early.
    ended_at = times.from_epoch_ms(start_ms + max(0, duration_ms))
    if status != "MISSED" and duration_ms > 0:
        return tracker.finalize(call_id, "answered", answered_at=times.from_epoch_ms(start_ms), ended_at=ended_at,
                                talk_seconds=tracker.talk_seconds_of(duration_ms), source="statistics")
    if status == "MISSED":
        outcome = "no_answer" if call.get("direction") == "inbound" else "operator_missed"
    else:
        outcome = "no_answer"  # the customer was dialled, no talk: busy and no answer look alike here
    return tracker.finalize(call_id, outcome, ended_at=ended_at, source="statistics")


# --- one call, the run -------------------------------------------------------------------------------

def _reconcile_call(call_id: str, now: float, counts: dict) -> None:
    call = calls.get(call_id)
    if call is None:
        calls.mark_closed(call_id)
        counts["closed"] += 1
        return
    if call.get("direction") == "inbound" and inbound.ensure_lead(call, older_than=inbound.REQUEUE_AFTER_SECONDS,
                                                                   now=now):
        counts["requeued"] += 1
    if call.get("state") == "ended":
        # Ended but its consequences were cut short (a crash inside finalize): finish them. A call ended
        # without being placed (outcome not_dialled) holds nothing the tracker would free.
        if not call.get("effects_done") and call.get("outcome") in calls.OUTCOMES:
            tracker.finalize(call_id, call.get("outcome") or "failed", source=call.get("settled_by") or "events")
        calls.mark_closed(call_id)
        counts["closed"] += 1
        return
    if call.get("state") == "queued":
        # Un-claimed after an originate that never reached Beeline: not in flight, nothing held. The
        # callbacks queue dials it again (and marks it open then); expiring it here would fail an
        # attempt that is still coming.
        calls.mark_closed(call_id)
        counts["closed"] += 1
        return
    ext = call.get("ext_tracking_id")
    if ext:
        counts["refreshed"] += 1
        if tracker.refresh(call_id, ext) == "ended":
            counts["settled_events"] += 1
            metric("CallsReconciled", how="events")
            logger.info("call settled from stored events", extra={"call_id": call_id})
            return
        call = calls.get(call_id) or call
    dialled_at = _epoch(call.get("dialing_at")) or _epoch(call.get("created_at"))
    age = now - dialled_at if dialled_at is not None else float("inf")  # no time at all: treat as stale
    if age < _seconds("RECONCILE_AFTER_SECONDS", DEFAULT_AFTER_SECONDS):
        return
    log = {"call_id": call_id, "lead_id": call.get("lead_id"), "state": call.get("state"), "age_seconds": int(age)}
    if dialled_at is not None:
        try:
            row = find_row(call, dialled_at)
        except beeline.BeelineError as exc:
            counts["errors"] += 1
            logger.warning("statistics unavailable: call left for the next run", extra={**log, "error": str(exc)})
            metric("ReconcileStatisticsFailed", code=exc.code)
            return
        if row is not None:
            ended_now = _settle_from_row(call_id, call, row)
            if ended_now:
                counts["settled_statistics"] += 1
                metric("CallsReconciled", how="statistics")
                logger.info("call settled from statistics", extra={**log, "status": row.get("status")})
            return
    limit = _seconds("RECONCILE_EXPIRE_SECONDS", DEFAULT_EXPIRE_SECONDS)
    if call.get("state") == "talking":
        limit = max(limit, _seconds("RECONCILE_TALKING_EXPIRE_SECONDS", DEFAULT_TALKING_EXPIRE_SECONDS))
    if age >= limit:
        if tracker.finalize(call_id, "failed", source="expired"):
            counts["expired"] += 1
            metric("CallsReconciled", how="expired")
            logger.warning("call expired without events or statistics", extra=log)


def _keep_talking_calls_alive(open_ids: list[str], counts: dict) -> None:
    for call_id in open_ids:
        try:
            call = calls.get(call_id)
            if call is not None and call.get("state") == "talking":
                tracker.keep_alive(call_id, call)
                counts["kept_alive"] += 1
        except Exception:  # noqa: BLE001 - one broken call must not stop the others (the main pass counts it)
            logger.exception("talking call not kept alive", extra={"call_id": call_id})


def reconcile(now: float | None = None) -> dict:
    """One pass over the open calls; returns counts (checked, refreshed, settled_statistics, expired,
    plus settled_events, closed, kept_alive, requeued, errors, deferred)."""
    now = time.time() if now is None else now
    counts = dict.fromkeys(("checked", "refreshed", "settled_events", "settled_statistics", "expired", "closed",
                            "kept_alive", "requeued", "errors", "deferred"), 0)
    open_ids = calls.open_calls()
    _keep_talking_calls_alive(open_ids, counts)  # first: DynamoDB only, never cut short by the time budget
    random.shuffle(open_ids)  # with the time budget, no call is always at the back of the line
    started = time.monotonic()
    for index, call_id in enumerate(open_ids):
        if time.monotonic() - started > TIME_BUDGET_SECONDS:
            counts["deferred"] = len(open_ids) - index
            break
        counts["checked"] += 1
        try:
            _reconcile_call(call_id, now, counts)
        except Exception:  # noqa: BLE001 - one broken call must not stop the others
            counts["errors"] += 1
            logger.exception("call not reconciled", extra={"call_id": call_id})
    metric("OpenCalls", len(open_ids))
    if counts["errors"]:
        metric("ReconcileErrors", counts["errors"])
    logger.info("reconciled", extra=counts)
    return counts
