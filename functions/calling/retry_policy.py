"""The retry policy (R-12): what happens to a lead once one of its calls has ended.

Answered: the lead is done. Otherwise the offer's rule for that outcome decides: the next attempt
after its interval, or the lead is exhausted. The call tracker asks this once per ended call; a
duplicate ask schedules nothing twice.
"""

from __future__ import annotations

import datetime as dt

from functions.calling import schedule
from functions.core import config, times
from functions.core.observability import logger
from functions.records import calls, leads


def on_outcome(call_id: str, now: dt.datetime | None = None) -> str:
    """Schedule the next attempt after the outcome's interval, or finish the lead; returns what it did."""
    now = now or dt.datetime.now(dt.UTC)
    call = calls.get(call_id)
    if call is None or call.get("state") != "ended":
        raise ValueError(f"call {call_id} has not ended")
    lead_id, attempt, outcome = call["lead_id"], int(call["attempt"]), call["outcome"]
    log = {"lead_id": lead_id, "call_id": call_id, "attempt": attempt, "outcome": outcome}
    if outcome == "answered":
        leads.update(lead_id, state="done", finished_reason="answered", finished_at=times.now_iso())
        return "done"
    offer = config.load().offer(call["offer_id"])
    if call.get("manual") or offer is None:
        leads.update(lead_id, state="done", finished_reason=f"manual_{outcome}", finished_at=times.now_iso())
        return "done"
    rule = getattr(offer.retry, outcome)
    if attempt >= min(rule.max_attempts, offer.retry.max_attempts):
        leads.update(lead_id, state="exhausted", finished_reason=outcome, finished_at=times.now_iso())
        logger.info("no more attempts", extra=log)
        return "exhausted"
    next_attempt = attempt + 1
    # Marked on the lead once per attempt, so a duplicate outcome cannot schedule it twice.
    if not leads.update(lead_id, only_if_missing=f"retry_{next_attempt}_at", **{f"retry_{next_attempt}_at":
                                                                                times.now_iso()}):
        return "already_scheduled"
    schedule.schedule(lead_id, next_attempt, now + dt.timedelta(seconds=rule.interval_seconds), outcome, now=now)
    leads.update(lead_id, state="callback_scheduled")
    logger.info("retry scheduled", extra={**log, "next_attempt": next_attempt, "in_seconds": rule.interval_seconds})
    return "retry_scheduled"
