"""The retry policy (R-12): what happens to a lead once one of its calls has ended.

Answered: the lead is done. Otherwise the offer's rule for that outcome decides: the next attempt
after its interval, or the lead is exhausted. The call tracker asks this once per ended call, and
again after a crash (the reconciler); the next attempt's callback is sent before its once-only flag
is written, so a crash never loses it, and a duplicate ask never dials twice.
"""

from __future__ import annotations

import datetime as dt

from functions.calling import schedule
from functions.core import config, times
from functions.core.observability import logger
from functions.records import calls, leads


def on_outcome(call_id: str, now: dt.datetime | None = None, call: dict | None = None) -> str:
    """Schedule the next attempt after the outcome's interval, or finish the lead; returns what it did.
    `call`: the ended call as the caller just read it (else it is read here)."""
    now = now or dt.datetime.now(dt.UTC)
    call = call if call is not None else calls.get(call_id)
    if call is None or call.get("state") != "ended":
        raise ValueError(f"call {call_id} has not ended")
    lead_id, attempt, outcome = call["lead_id"], int(call["attempt"]), call["outcome"]
    log = {"lead_id": lead_id, "call_id": call_id, "attempt": attempt, "outcome": outcome}
    lead = leads.get(lead_id) or {}
    # A manual call on a lead of its own (source "api") ends it; on an existing lead (POST /v1/calls for a
    # known number) it ends the lead only when it reached the customer, else leaves its own retries be.
    foreign = bool(call.get("manual")) and lead.get("source") not in (None, "api")
    if outcome == "answered":
        leads.update(lead_id, state="done", finished_reason="manual_answered" if foreign else "answered",
                     finished_at=times.now_iso())
        return "done"
    if foreign:
        return "lead_untouched"
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
    flag = f"retry_{next_attempt}_at"
    if lead.get(flag):
        return "already_scheduled"
    # The callback first, then its once-only flag: a crash in between leaves the flag unset, so the
    # reconciler's (or a duplicate's) next ask sends it again. Two sends are harmless: the dialer dials
    # each (lead, attempt) once (its claim on the call id derived from both).
    schedule.schedule(lead_id, next_attempt, now + dt.timedelta(seconds=rule.interval_seconds), outcome, now=now)
    if not leads.update(lead_id, only_if_missing=flag, state="callback_scheduled", **{flag: times.now_iso()}):
        return "already_scheduled"  # a concurrent ask sent it too: the dialer's claim keeps it one call
    logger.info("retry scheduled", extra={**log, "next_attempt": next_attempt, "in_seconds": rule.interval_seconds})
    return "retry_scheduled"
