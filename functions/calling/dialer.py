"""The dialer (R-10..R-12): a due callback becomes at most one Beeline click-to-call.

For each callback message `{lead_id, attempt, due_at, reason, [call_id, manual]}`:
1. not yet due (delays beyond SQS's 900 s): hop on until due;
2. the call of this (lead, attempt) already left "queued": a duplicate, nothing to do;
3. the lead is re-read: finished, over the attempt cap, or called by a person already: no call;
4. a number the provider cannot dial (functions/calling/dialable.py), or on the do-not-call list: no
   call, ever. The attempt is recorded as a call that ended "not_dialled" with its reason (so the API
   and the CRM call log say why) and the lead is finished;
5. the month's budget spent (R-23): an automatic callback waits (looked at again every
   BUDGET_RECHECK_SECONDS, so a new month or a higher budget resumes it); a manual one is not dialled;
6. outside the offer's working hours: rescheduled to the next opening (manual calls skip this);
7. a dispatch pass runs at once (functions/calling/dispatch.py) with this callback where it would stand in
   its offer's waiting list: a free channel and operator go to the oldest waiting lead, which is this one
   when nobody older waits, and then it is dialled without ever being stored in the list. Not dialled (none
   free, or an older lead took them): it joins the list, the message is acknowledged and the lead waits,
   at no cost, until a call's release (or the minute's sweep) dispatches it. Steps 2-6 run again then
   (DynamoDB only);
8. dialling a lead (its turn come): a channel lease, then an operator by the offer's rule, both under this
   delivery's own holder token; then the CRM status, read once, right before the dial (no call when the
   order is no longer "processing"; manual calls skip it); then the call is claimed (conditional write: one
   winner among duplicates and racing workers; the holder token is stored with it), and only then
   originated: `POST abonents/{operator}/call?phoneNumber={10 digits}`.
Whatever fails before the originate gives back the lease and the operator (and un-claims). An
originate that surely never reached Beeline is un-claimed and retried; one that may have (timeout, or
any error that is not Beeline's answer) is left "dialing" for the call events or the reconciler to
settle: it is never dialled twice.

Provider requests per dialled lead: the CRM order once, the originate once, and the operators' agent status
from a per-container cache (AGENT_STATUS_TTL_SECONDS) asked only for operators free in DynamoDB; a waiting
lead costs none. Both providers' clients share a client-side rate limit (functions/core/http.py).
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
import weakref

from functions.calling import budget, channels, dialable, dispatch, dnc, operators, retry_policy, schedule
from functions.calling.working_hours import next_opening
from functions.core import config, queues, times
from functions.core.observability import logger, metric
from functions.core.phones import mask, national_digits
from functions.core.queues import Poison, Transient
from functions.providers.beeline import client as beeline
from functions.providers.salesrender import client as salesrender
from functions.records import call_events, calls, daily, leads, postbacks, waiting

BUDGET_RECHECK_SECONDS = 900  # a lead stopped by the budget looks again this often
_EXT_TRACKING_ID = re.compile(r"\d+:\d+")
FINAL_LEAD_STATES = ("done", "closed", "exhausted", "do_not_call", "not_dialable")
# An operator's agent status is asked at most once per this many seconds per container (whatever the backlog).
AGENT_STATUS_TTL_SECONDS = 5.0


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
                       extra={k: message[k] for k in ("call_id", "manual", "operator_hint") if k in message})


def _settle_not_dialled(call_id: str, existing: dict | None, reason: str, lead: dict, offer_id: int, attempt: int,
                        manual: bool, log: dict) -> bool:
    """Record a call that will never be placed, with why; the lead's call log in the CRM gets its line.
    True when this delivery settled it (False: a racing worker claimed the call first)."""
    settled = calls.settle_not_dialled(call_id, reason, {
        "lead_id": lead["lead_id"], "offer_id": offer_id, "attempt": attempt, "phone": lead["phone"],
        "manual": manual, "created_at": (existing or {}).get("created_at") or times.now_iso(),
    })
    if settled:
        _not_dialled_effects(call_id)
        logger.info("call not dialled", extra={**log, "reason": reason})
        metric("CallsNotDialled", reason=reason.split(",")[0])
    return settled


def _not_dialled_effects(call_id: str) -> None:
    """The call log entry and the write-back job of a not-dialled call; repeated by a redelivery until
    the flag (written after the job is queued) says they are done."""
    call = calls.get(call_id) or {}
    calls.log_ended(call["lead_id"], call["ended_at"], call_id)
    queues.send("recordings", {"job": "writeback", "call_id": call_id})
    calls.flag_once(call_id, "post_call_queued")


def process(message: dict, now: dt.datetime | None = None) -> str:
    """Handle one message of the callbacks queue (a due callback, or a dispatch request); returns what
    happened (for logs and tests)."""
    if dispatch.is_dispatch(message):
        return _dispatch_request(message, now)
    return _process(message, now)


def _dispatch_request(message: dict, now: dt.datetime | None) -> str:
    offers = message.get("offers")
    if offers is not None and (not isinstance(offers, list) or not all(
            isinstance(o, int) and not isinstance(o, bool) for o in offers)):
        raise Poison("dispatch request: offers must be a list of offer ids", code="malformed")
    done = dispatch.run(_turn(now), offers, reason=str(message.get("dispatch"))[:40])
    return f"dispatched {sum(1 for _, result in done if result == 'originated')}"


def _turn(now: dt.datetime | None, checked: dict | None = None):
    """The dialer as a dispatch pass runs it on a waiting entry's message, with the pass's channel lease.
    `checked`: {call_id: what `_process` read and checked for it}, for this delivery's own callback: when the
    pass dials that one (at once, or from the list it joined), it is dialled without reading the lead and the
    call again (a moment ago; the claim still settles any race, as for every check before it)."""
    def turn(entry_message: dict, lease: dispatch.Lease) -> str:
        fresh = (checked or {}).get(entry_message.get("call_id") or _call_id_of(entry_message))
        if fresh is not None:
            return _dial(entry_message, *fresh, now or dt.datetime.now(dt.UTC), lease)
        return _process(entry_message, now, lease=lease)

    return turn


def _call_id_of(message: dict) -> str | None:
    lead_id, attempt = message.get("lead_id"), message.get("attempt")
    return calls.call_id_for(lead_id, attempt) if isinstance(lead_id, str) and isinstance(attempt, int) else None


def _process(message: dict, now: dt.datetime | None, lease: dispatch.Lease | None = None) -> str:
    waiting_turn = lease is not None
    now = now or dt.datetime.now(dt.UTC)
    lead_id, attempt = message.get("lead_id"), message.get("attempt")
    if not isinstance(lead_id, str) or not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise Poison("callback needs lead_id and a positive attempt", code="malformed")
    due = _parse_due(message.get("due_at"))
    if due > now + dt.timedelta(seconds=1) and not waiting_turn:
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
        if existing.get("outcome") == "not_dialled" and not existing.get("post_call_queued"):
            _not_dialled_effects(call_id)  # the delivery that settled it died before queueing the write-back
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
    # Before anything is taken: a number the provider cannot dial must never reach the originate.
    refusal = dialable.refusal(lead["phone"], cfg)
    if refusal:
        _settle_not_dialled(call_id, existing, refusal, lead, offer.id, attempt, manual, log)
        if not manual or lead.get("source") == "api":
            leads.update(lead_id, state="not_dialable", finished_reason=refusal, finished_at=times.now_iso(),
                         last_call_id=call_id)
        return "not_dialable"
    if dnc.listed(lead["phone"]):
        if manual:
            _settle_not_dialled(call_id, existing, "do_not_call", lead, offer.id, attempt, manual, log)
        _finish_lead(lead_id, "do_not_call", "do_not_call", log)
        return "do_not_call"
    if not budget.allows_call(cfg, manual, now):
        if manual:  # a person asked for this call now: say no now rather than hold it for a month
            _settle_not_dialled(call_id, existing, "budget_exhausted", lead, offer.id, attempt, manual, log)
            return "budget_exhausted"
        # Not the end of the lead: look again in a while, so a new month or a raised budget resumes it
        # (SQS's longest delay: the same cost as hopping towards the month's start, and it sees both).
        _again(message, now + dt.timedelta(seconds=BUDGET_RECHECK_SECONDS), "budget_exhausted", now)
        leads.update(lead_id, state="budget_waiting", waiting_reason="budget_exhausted",
                     waiting_since=lead.get("waiting_since") or times.now_iso())
        metric("CallbacksWaitingForBudget", offer=str(offer.id))
        return "budget_waiting"
    if not manual:
        opening = next_opening(offer.working_hours, now)
        if opening > now:
            _again(message, opening, "working_hours", now)
            logger.info("outside working hours: rescheduled", extra={**log, "due_at": opening.isoformat()})
            return "rescheduled_working_hours"
    if lease is not None:
        return _dial(message, lead, offer, cfg, call_id, existing, manual, log, now, lease)
    # A dispatch pass with this callback where it would stand in its offer's waiting list: oldest first, also
    # against leads already waiting. Dialled at once, it is never stored; a lead that finds everything busy
    # joins the list and is simply left there (no re-send, no provider request).
    since = lead.get("created_at")
    fresh = dispatch.Fresh(waiting.entry(offer.id, message, call_id, manual, since=since),
                           lambda: waiting.join(offer.id, message, call_id, manual, since=since))
    checked = {call_id: (lead, offer, cfg, call_id, existing, manual, log)}
    result = dict(dispatch.run(_turn(now, checked), [offer.id], reason="due", fresh=fresh)).get(call_id)
    if result is None:
        logger.info("callback waiting for a free channel and operator", extra=log)
        metric("CallbacksWaiting", offer=str(offer.id))
        return "waiting"
    return result


def _crm_closed(lead: dict, manual: bool, log: dict) -> bool:
    """Read the order's status once, right before the dial: True (and the lead closed) when it has left
    "processing". A lead without an order yet is dialled (speed to lead never waits for the CRM)."""
    if manual or not lead.get("order_id"):
        return False
    try:
        order = salesrender.default_client().get_order(lead["order_id"])
    except salesrender.SalesRenderError as exc:
        if exc.transient:
            raise Transient(str(exc)) from None
        raise Poison(str(exc), code=exc.code) from None
    group = ((order or {}).get("status") or {}).get("group")
    if group:
        try:  # a status group seen here fires its postbacks too (once each: records/postbacks.status_seen)
            postbacks.status_seen(lead["order_id"], group, ((order or {}).get("status") or {}).get("name") or "",
                                  lead_id=lead["lead_id"], offer_id=lead.get("offer_id"))
            daily.order_status_seen(lead["order_id"], lead.get("offer_id"), group)
        except Exception:  # noqa: BLE001 - neither blocks a call; the webhook sees the status too
            logger.exception("postback or approval count not recorded", extra=log)
    if group == "PROCESSING":
        return False
    _finish_lead(lead["lead_id"], "closed", f"crm_status_{(group or 'missing').lower()}", log)
    return True


def _give_back(provider: str, slot: int, operator: str | None, holder: str) -> None:
    """Free what this delivery took (only its own: both releases are conditional on the holder)."""
    try:
        if operator:
            operators.release(operator, holder)
    finally:
        channels.release(provider, slot, holder)


def _dial(message: dict, lead: dict, offer, cfg, call_id: str, existing: dict | None, manual: bool, log: dict,
          now: dt.datetime, lease: dispatch.Lease) -> str:
    lead_id, attempt = lead["lead_id"], message["attempt"]
    digits = national_digits(lead["phone"])  # dialable.refusal() passed: this cannot raise
    # The channel lease is the dispatch pass's (taken for the oldest entry, under a token of its own); the
    # operator is reserved under the same token, and both go to the call with its claim: a duplicate that
    # loses the claim releases only its own operator, and the tracker releases the winner's.
    provider, slot, holder = lease.provider, lease.slot, lease.holder
    operator, claimed = None, False
    try:  # whatever fails before the claim, the operator is given back (the pass keeps or frees the lease)
        client = beeline.default_client()
        operator = operators.choose(offer, call_id, _agent_status(client, log), holder=holder,
                                    prefer=message.get("operator_hint") or (existing or {}).get("operator_hint"),
                                    known=lease.operator_states)
        if operator is None:
            metric("NoFreeOperator", offer=str(offer.id))
            return "no_free_operator"
        if _crm_closed(lead, manual, log):
            return "crm_closed"
        claimed = calls.claim(call_id, lead=lead, attributes={
            "lead_id": lead_id, "offer_id": offer.id, "attempt": attempt, "phone": lead["phone"],
            "operator": operator, "channel_slot": slot, "provider": provider, "holder": holder, "manual": manual,
            "dialing_at": times.now_iso(), "created_at": (existing or {}).get("created_at") or times.now_iso(),
        })
        lease.claimed = claimed
        if not claimed:
            return "duplicate"
    finally:
        if not claimed and operator:
            operators.release(operator, holder)

    log["operator"] = operator
    try:
        calls.mark_open(call_id)
        if manual and lead.get("source") != "api":
            leads.update(lead_id, last_call_id=call_id)  # an existing lead: its state and attempts are its own
        else:
            leads.update(lead_id, state="dialing", attempts=attempt, last_call_id=call_id)
    except Exception:
        # Nothing reached Beeline yet: give everything back so the redelivery can dial this attempt.
        _give_back(provider, slot, operator, holder)
        calls.unclaim(call_id)
        calls.mark_closed(call_id)
        raise
    try:
        response_text = client.originate(operator, digits)
    except beeline.OriginateUncertain as exc:
        return _uncertain(call_id, str(exc), log, provider)
    except beeline.BeelineError as exc:
        _give_back(provider, slot, operator, holder)
        if exc.transient:  # never reached the PBX: safe to dial this attempt later
            calls.unclaim(call_id)
            calls.mark_closed(call_id)
            raise Transient(str(exc)) from None
        calls.finish(call_id, "failed", originate_error=str(exc))
        logger.error("originate rejected", extra={**log, "error": str(exc)})
        metric("OriginateFailed", provider=provider, code=exc.code)
        retry_policy.on_outcome(call_id, now=now)  # the call stays listed open: the reconciler finishes the rest
        return "originate_failed"
    except Exception as exc:  # noqa: BLE001
        # Not a provider error, so nobody can say whether the request left: dialling again could ring the
        # customer twice. Settled like a timeout: by the call events or the reconciler.
        return _uncertain(call_id, f"{type(exc).__name__}: {exc}", log, provider)
    try:
        annotated = {"originated_at": times.now_iso(), "originate_response": (response_text or "")[:200]}
        if response_text and _EXT_TRACKING_ID.fullmatch(response_text):
            # Beeline said which call this is: bound with no guessing, in the same call write as the rest.
            call_events.bind(response_text, call_id, **annotated)
        else:
            calls.update(call_id, **annotated)
    except Exception:  # noqa: BLE001 - the call is ringing: the events bind it through the operator instead
        logger.exception("originated call not annotated", extra=log)
    logger.info("call originated", extra=log)
    metric("CallsOriginated", offer=str(offer.id))
    return "originated"


def _uncertain(call_id: str, error: str, log: dict, provider: str) -> str:
    try:
        calls.update(call_id, originate_uncertain=True, originate_error=error[:500])
    except Exception:  # noqa: BLE001 - the reconciler settles the call from its dialing_at alone
        logger.exception("uncertain originate not annotated", extra=log)
    logger.warning("originate uncertain: left for call events to settle", extra={**log, "error": error[:500]})
    metric("OriginateUncertain", provider=provider)
    return "uncertain"


_status_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client -> {pattern: (until, status)}
_status_lock = threading.Lock()


def _agent_status(client: beeline.BeelineClient, log: dict):
    """The operator's agent status, asked at most once per AGENT_STATUS_TTL_SECONDS per operator in this
    container (a client rebuilt for a new token starts afresh)."""
    with _status_lock:
        cache = _status_cache.setdefault(client, {})

    def status(pattern: str) -> str:
        now = time.monotonic()
        with _status_lock:
            hit = cache.get(pattern)
        if hit and hit[0] > now:
            return hit[1]
        try:
            value = client.agent_status(pattern)
        except beeline.BeelineError as exc:
            # Unknown status must not stop calls: ring the operator rather than nobody.
            logger.warning("agent status unknown", extra={**log, "operator": pattern, "error": str(exc)})
            value = "UNKNOWN"
        with _status_lock:
            cache[pattern] = (now + AGENT_STATUS_TTL_SECONDS, value)
        return value

    return status
