"""The dialer (R-10..R-12): a due callback becomes at most one Beeline click-to-call.

For each callback message `{lead_id, attempt, due_at, reason, [call_id, manual]}`:
1. not yet due (delays beyond SQS's 900 s): hop on until due;
2. the call of this (lead, attempt) already left "queued": a duplicate, nothing to do;
3. the lead is re-read: finished, over the attempt cap, its CRM order no longer "processing", or
   called by a person already: no call;
4. outside the offer's working hours: rescheduled to the next opening (manual calls skip this);
5. on the do-not-call list, or the month's budget spent (R-23): no call;
6. a channel lease, then an operator by the offer's rule: none free = try again in ~30 s;
7. the call is claimed (conditional write: one winner among duplicates and racing workers), and
   only then originated: `POST abonents/{operator}/call?phoneNumber={10 digits}`.
An originate that surely never reached Beeline is un-claimed and retried; one that may have (timeout)
is left "dialing" for the call events or the reconciler to settle: it is never dialled twice.
"""

from __future__ import annotations

import datetime as dt
import re

from functions.calling import budget, channels, dnc, operators, retry_policy, schedule
from functions.calling.working_hours import next_opening
from functions.core import config, times
from functions.core.observability import logger, metric
from functions.core.phones import mask, national_digits
from functions.core.queues import Poison, Transient
from functions.providers.beeline import client as beeline
from functions.providers.salesrender import client as salesrender
from functions.records import call_events, calls, leads

NO_CHANNEL_RETRY_SECONDS = 30
_EXT_TRACKING_ID = re.compile(r"\d+:\d+")
FINAL_LEAD_STATES = ("done", "closed", "exhausted", "do_not_call", "budget_stopped")


def _parse_due(value) -> dt.datetime:
    due = times.parse(value)
    if due is None:
        raise Poison("callback has no valid due_at", code="malformed")
    return due


def _finish_lead(lead_id: str, state: str, reason: str, log: dict) -> None:
    leads.update(lead_id, state=state, finished_reason=reason, finished_at=times.now_iso())
    logger.info("lead finished without a call", extra={**log, "state": state, "reason": reason})
    metric("CallbacksSkipped", reason=reason)


def _again(message: dict, when: dt.datetime, reason: str, now: dt.datetime) -> None:
    schedule.schedule(message["lead_id"], message["attempt"], when, reason, now=now,
                       extra={k: message[k] for k in ("call_id", "manual") if k in message})


def process(message: dict, now: dt.datetime | None = None) -> str:
    """Handle one callback message; returns what happened (for logs and tests)."""
    now = now or dt.datetime.now(dt.UTC)
    lead_id, attempt = message.get("lead_id"), message.get("attempt")
    if not isinstance(lead_id, str) or not isinstance(attempt, int) or attempt < 1:
        raise Poison("callback needs lead_id and a positive attempt", code="malformed")
    due = _parse_due(message.get("due_at"))
    if due > now + dt.timedelta(seconds=1):
        schedule.hop(message, now)
        return "hopped"
    lead = leads.get(lead_id)
    if lead is None:
        raise Poison(f"lead {lead_id} does not exist", code="unknown_lead")
    cfg = config.load()
    offer = cfg.offer(lead["offer_id"])
    if offer is None:
        raise Poison(f"offer {lead['offer_id']} is not configured", code="unknown_offer")
    manual = bool(message.get("manual"))
    call_id = message.get("call_id") or calls.call_id_for(lead_id, attempt)
    log = {"lead_id": lead_id, "call_id": call_id, "attempt": attempt, "offer_id": offer.id,
           "phone": mask(lead["phone"])}

    existing = calls.get(call_id)
    if existing and existing.get("state") != "queued":
        logger.info("callback already dialled", extra={**log, "state": existing.get("state")})
        return "duplicate"
    if lead.get("state") in FINAL_LEAD_STATES and not manual:
        return "lead_finished"
    if not manual and attempt > offer.retry.max_attempts:
        _finish_lead(lead_id, "exhausted", "max_attempts", log)
        return "max_attempts"
    if lead.get("called_by_person_at") and not manual:
        _finish_lead(lead_id, "closed", "called_by_person", log)
        return "called_by_person"
    if lead.get("order_id") and not manual:
        try:
            order = salesrender.default_client().get_order(lead["order_id"])
        except salesrender.SalesRenderError as exc:
            if exc.transient:
                raise Transient(str(exc)) from None
            raise Poison(str(exc), code=exc.code) from None
        group = ((order or {}).get("status") or {}).get("group")
        if group != "PROCESSING":
            _finish_lead(lead_id, "closed", f"crm_status_{(group or 'missing').lower()}", log)
            return "crm_closed"
    if not manual:
        opening = next_opening(offer.working_hours, now)
        if opening > now:
            _again(message, opening, "working_hours", now)
            logger.info("outside working hours: rescheduled", extra={**log, "due_at": opening.isoformat()})
            return "rescheduled_working_hours"
    if dnc.listed(lead["phone"]):
        _finish_lead(lead_id, "do_not_call", "do_not_call", log)
        return "do_not_call"
    if not budget.allows_call(cfg, manual, now):
        _finish_lead(lead_id, "budget_stopped", "budget_exhausted", log)
        return "budget_exhausted"

    provider = cfg.provider.name
    slot = channels.acquire(provider, cfg.provider.channel_limit, call_id)
    if slot is None:
        _again(message, now + dt.timedelta(seconds=NO_CHANNEL_RETRY_SECONDS), "no_free_channel", now)
        metric("NoFreeChannel", provider=provider)
        return "no_free_channel"
    client = beeline.default_client()
    operator = operators.choose(offer, call_id, _agent_status(client, log))
    if operator is None:
        channels.release(provider, slot, call_id)
        _again(message, now + dt.timedelta(seconds=NO_CHANNEL_RETRY_SECONDS), "no_free_operator", now)
        metric("NoFreeOperator", offer=str(offer.id))
        return "no_free_operator"
    claimed = calls.claim(call_id, {
        "lead_id": lead_id, "offer_id": offer.id, "attempt": attempt, "phone": lead["phone"], "operator": operator,
        "channel_slot": slot, "provider": provider, "manual": manual, "dialing_at": times.now_iso(),
        "created_at": (existing or {}).get("created_at") or times.now_iso(),
    })
    if not claimed:
        operators.release(operator, call_id)
        channels.release(provider, slot, call_id)
        return "duplicate"
    calls.mark_open(call_id)
    leads.update(lead_id, state="dialing", attempts=attempt, last_call_id=call_id)
    log["operator"] = operator
    try:
        response_text = client.originate(operator, national_digits(lead["phone"]))
    except beeline.OriginateUncertain as exc:
        calls.update(call_id, originate_uncertain=True, originate_error=str(exc))
        logger.warning("originate uncertain: left for call events to settle", extra={**log, "error": str(exc)})
        metric("OriginateUncertain", provider=provider)
        return "uncertain"
    except beeline.BeelineError as exc:
        operators.release(operator, call_id)
        channels.release(provider, slot, call_id)
        if exc.transient:  # never reached the PBX: safe to dial this attempt later
            calls.unclaim(call_id)
            calls.mark_closed(call_id)
            raise Transient(str(exc)) from None
        calls.finish(call_id, "failed", originate_error=str(exc))
        logger.error("originate rejected", extra={**log, "error": str(exc)})
        metric("OriginateFailed", provider=provider, code=exc.code)
        retry_policy.on_outcome(call_id, now=now)
        return "originate_failed"
    calls.update(call_id, originated_at=times.now_iso(), originate_response=(response_text or "")[:200])
    if response_text and _EXT_TRACKING_ID.fullmatch(response_text):
        call_events.bind(response_text, call_id)  # Beeline said which call this is: no guessing needed
    logger.info("call originated", extra=log)
    metric("CallsOriginated", offer=str(offer.id))
    return "originated"


def _agent_status(client: beeline.BeelineClient, log: dict):
    def status(pattern: str) -> str:
        try:
            return client.agent_status(pattern)
        except beeline.BeelineError as exc:
            # Unknown status must not stop calls: ring the operator rather than nobody.
            logger.warning("agent status unknown", extra={**log, "operator": pattern, "error": str(exc)})
            return "UNKNOWN"

    return status
