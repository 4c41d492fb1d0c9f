"""Call tracking (R-15, R-17, R-18): Beeline's XSI events become one correct record per call.

Every event is stored once (keyed by eventID) under its call's extTrackingId, and the call's state
is *derived from the whole stored set* each time: events that arrive late, twice or out of order
give the same result, and an event whose processing failed is repaired by the next one or by the
reconciler. A call ends when its decisive release is seen:
- the customer leg (personality Originator) released: answered if it has an answerTime, else busy /
  failed / no answer by its release cause;
- the operator leg (Click-to-Dial) released without an answer: operator missed (failed on a server
  failure); with an answer, the customer leg decides;
- an inbound leg (Terminator): answered, or missed (no_answer).
`finalize` then runs the side effects once each: cost to the month's spend (counted in the finish's own
transaction, calls.end), the channel lease and operator freed (the operator for a new call only after the
offer's wrap-up time), a dispatch of the leads waiting for that capacity (calling/dispatch.py), the call log
line, the dialer's retry policy, and the post-call job (recording or write-back) on the recordings queue.

Which of our calls an extTrackingId belongs to: the operator abonent named by the event's targetId
is reserved for exactly one callbridge call while it rings (functions/calling/operators.py), so the first
event binds the id to that call. A Terminator leg with no such call is an inbound call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

from functions.calling import budget, channels, dispatch, operators, retry_policy
from functions.core import config, queues, times
from functions.core.observability import logger, metric
from functions.providers.beeline.events import CallData, XsiEvent
from functions.records import call_events, calls, leads, spend
from functions.tracking import inbound

ABONENTS_CACHE_SECONDS = 300


@dataclasses.dataclass(frozen=True)
class Derived:
    state: str  # dialing | ringing | talking | ended
    outcome: str | None = None
    answered_ms: int | None = None
    ended_ms: int | None = None

    @property
    def talk_seconds(self) -> int:
        if self.answered_ms is None or self.ended_ms is None:
            return 0
        return talk_seconds_of(self.ended_ms - self.answered_ms)


def talk_seconds_of(duration_ms: float) -> int:
    """Talk time in whole seconds, the same on every path (events, statistics): rounded up, because
    60.4 s is two started minutes when billed and must not show as 60."""
    return max(0, math.ceil(duration_ms / 1000))


def _release_outcome(leg: CallData) -> str | None:
    cause = leg.release_cause.lower()
    if leg.personality == "Click-to-Dial":
        if leg.answer_ms:
            return None  # the operator answered: the customer leg's release decides
        return "failed" if "server failure" in cause else "operator_missed"
    if leg.personality == "Terminator":
        return "answered" if leg.answer_ms else "no_answer"
    if leg.answer_ms:
        return "answered"
    if cause == "busy":
        return "busy"
    if cause in ("server failure", "forbidden"):
        return "failed"
    return "no_answer"


def derive(legs: list[CallData]) -> Derived:
    """The call's state from every event seen so far; the same for any order or duplication."""
    releases = sorted((leg for leg in legs if leg.state == "Released"),
                      key=lambda leg: (leg.release_ms or 0, leg.call_id, leg.personality))
    for personality in ("Originator", "Terminator", "Click-to-Dial"):
        for leg in releases:
            if leg.personality == personality:
                outcome = _release_outcome(leg)
                if outcome:
                    answered = leg.answer_ms if outcome == "answered" else None
                    return Derived("ended", outcome, answered, leg.release_ms)
    customer_answers = [leg.answer_ms for leg in legs if leg.answer_ms and leg.personality != "Click-to-Dial"]
    if customer_answers:
        return Derived("talking", answered_ms=min(customer_answers))
    if legs:
        return Derived("ringing")
    return Derived("dialing")


# --- which callbridge call an event belongs to ------------------------------------------------------

@functools.cache
def _abonent_index(_bucket: int) -> dict[str, set[str]]:
    """userId -> every pattern that names the abonent (userId, extension, phone); cached 5 minutes."""
    from functions.providers.beeline import client as beeline  # deferred: most events never need it

    index: dict[str, set[str]] = {}
    for abonent in beeline.default_client().abonents():
        names = {str(abonent.get(k)) for k in ("userId", "extension", "phone") if abonent.get(k)}
        index[str(abonent.get("userId"))] = names
    return index


def _patterns_for(target_id: str) -> set[str]:
    try:
        return {target_id} | _abonent_index(int(time.time() // ABONENTS_CACHE_SECONDS)).get(target_id, set())
    except Exception as exc:  # noqa: BLE001 - the directory is a convenience; the userId itself may match
        logger.warning("abonent directory unavailable", extra={"error": str(exc)})
        return {target_id}


def _find_outbound(event: XsiEvent) -> str | None:
    # Every name of the abonent at once: one Query of the operators' partition, not a read per name.
    for item in operators.states(sorted(_patterns_for(event.target_id))).values():
        call_id = item.get("busy_call")
        if call_id:
            call = calls.get(call_id) or {}
            if call.get("state") not in (None, "ended", "queued") and not call.get("ext_tracking_id"):
                return call_id
    return None


# --- applying events -----------------------------------------------------------------------------------

def apply(event: XsiEvent) -> str:
    """Store one call event and bring its call up to date; returns what happened."""
    leg = event.call
    if leg is None or not leg.ext_tracking_id:
        return "no_call"
    if not call_events.store_event(event):
        return "duplicate"
    return process(event)


def process(event: XsiEvent) -> str:
    """Bring the event's call up to date from every stored event (the event itself already stored)."""
    leg = event.call
    ext = leg.ext_tracking_id
    call_id, legs = call_events.track(ext)  # read after this event was stored: it is among the legs
    if call_id is None:
        found = _find_outbound(event)
        if found is None and leg.personality == "Terminator":
            found = inbound.start(event)
        if found is None:
            logger.info("event for no known call: kept", extra={"ext_tracking_id": ext, "type": event.event_type})
            return "unbound"
        call_id = call_events.bind(ext, found, event.target_id)
    return refresh(call_id, ext, legs)


def refresh(call_id: str, ext: str, legs: list[CallData] | None = None) -> str:
    """Re-derive the call from its stored events (`legs`, when the caller has just read them) and record the
    result."""
    derived = derive(call_events.legs(ext) if legs is None else legs)
    if derived.state == "ended":
        finalize(call_id, derived.outcome, answered_at=times.from_epoch_ms(derived.answered_ms),
                 ended_at=times.from_epoch_ms(derived.ended_ms), talk_seconds=derived.talk_seconds, source="events")
        return "ended"
    changes = {"state": derived.state}
    if derived.answered_ms:
        changes["answered_at"] = times.from_epoch_ms(derived.answered_ms)
    call = calls.progress(call_id, **changes)
    if call and derived.state == "talking":  # an ended call's lease and operator are not to be kept
        keep_alive(call_id, call)
    return derived.state


def keep_alive(call_id: str, call: dict, now: float | None = None) -> None:
    """A call still talking keeps its channel lease and its operator for another lease period: run on
    every event and on the reconciler's pass (every 5 min), so a 40-minute call that sends no event after
    its answer never outlives its 20-minute lease. While the call is younger than a third of a lease
    period (from `dialing_at`, set at the claim right after both were taken for a full period) both still
    have two thirds of it left and are not written (2 WRU a talking event): the reconciler's first pass
    past that (7 to 12 minutes after dialling with a 20-minute lease) extends them, and one failed pass
    still leaves the next in time."""
    dialled = times.parse(call.get("dialing_at"))
    now = time.time() if now is None else now
    if dialled is not None and now - dialled.timestamp() < channels.lease_seconds() / 3:
        return
    if call.get("channel_slot") is not None:
        channels.extend(call["provider"], int(call["channel_slot"]), call.get("holder") or call_id,
                        channels.lease_seconds())
    if call.get("operator") and call.get("direction") != "inbound":
        operators.reserve(call["operator"], call_id, holder=call.get("holder") or call_id)  # extends busy_until


def _dispatch_waiting(call_id: str, call: dict) -> bool:
    """Capacity just freed: a waiting lead gets it once the operator's wrap-up is over (calling/dispatch.py).
    True when sent; a failure to send is left to the dispatch sweep (each minute) rather than holding up the
    call's other consequences."""
    try:
        dispatch.released(call)
    except Exception:  # noqa: BLE001
        logger.warning("dispatch after release not sent: the sweep dispatches", extra={"call_id": call_id},
                       exc_info=True)
        return False
    return True


def finalize(call_id: str, outcome: str, *, answered_at: str | None = None, ended_at: str | None = None,
             talk_seconds: int = 0, source: str = "events") -> bool:
    """End the call with its outcome and run the consequences, each exactly once. Safe to call again
    (a crash between steps is finished by the next call); True if this call ended it."""
    cfg = config.load()
    answered = outcome == "answered"
    talk = int(talk_seconds) if answered else 0
    cost = math.ceil(talk / 60) * cfg.tariff_rub_per_minute if talk else 0.0
    ended_at = ended_at or times.now_iso()
    # The cost is counted in the finish's own transaction, in the business month the call ended in.
    month_add = spend.tx_add(round(cost, 2), spend.month(times.parse(ended_at))) if cost > 0 else None
    ended_now, call = calls.end(call_id, outcome, month_add=month_add, answered_at=answered_at if answered else None,
                                ended_at=ended_at, talk_seconds=talk, cost_rub=round(cost, 2),
                                short_call=answered and talk < 60, settled_by=source)
    if call is None or call.get("effects_done"):
        return ended_now
    if not ended_now:  # an earlier run may have stopped between the finish and its feed put: the same item again
        calls.list_recent(call_id, call)
    # Flags of the steps below that are not once-only by themselves, written together with effects_done
    # after every step: a crash in between repeats a step whose repeat is harmless (a second dispatch pass
    # finds nothing more to do; the recorder and the write-back are idempotent), never skips one.
    done = {"effects_done": True}
    if call.get("direction") != "inbound":
        if call.get("channel_slot") is not None:
            channels.release(call["provider"], int(call["channel_slot"]), call.get("holder") or call_id)
        if call.get("operator"):
            offer = cfg.offer(call.get("offer_id"))
            operators.release(call["operator"], call.get("holder") or call_id,  # the claim's holder token
                              wrap_up_seconds=offer.wrap_up_seconds if offer else 0)
        if not call.get("dispatch_triggered") and _dispatch_waiting(call_id, call):
            done["dispatch_triggered"] = times.now_iso()
    # A cost the finish did not count (it knew none) is counted here, after the capacity is handed on: the
    # next dial waits out a wrap-up, long after this is counted.
    if call.get("cost_rub"):
        month = spend.month(times.parse(call["ended_at"]))  # the business month the call ended in
        if not call.get("cost_counted"):  # the finish counts a cost it knows; one counted later comes here
            spend.add_call_cost(call_id, float(call["cost_rub"]), month, call=call)  # with its flag, once
        # Owner alerts at 80%/100% (R-23), once per threshold (alerts.py): also on a run repairing one cut
        # short after the cost was counted, which effects_done (written after this) tells apart.
        budget.cost_added(month)
    calls.log_ended(call["lead_id"], call["ended_at"], call_id)
    if call.get("direction") == "inbound":
        if call["outcome"] == "answered":
            leads.update(call["lead_id"], called_by_person_at=times.now_iso())
    else:
        retry_policy.on_outcome(call_id, call=call)
    if not call.get("post_call_queued"):
        # Sent, then flagged: a crash in between sends the job twice, which is harmless; flagging first
        # would lose the recording and the write-back.
        job = "recording" if call["outcome"] == "answered" and cfg.provider.recording else "writeback"
        queues.send("recordings", {"job": job, "call_id": call_id})
        done["post_call_queued"] = times.now_iso()
    calls.update(call_id, **done)
    calls.mark_closed(call_id)
    if ended_now:
        logger.info("call ended", extra={"call_id": call_id, "lead_id": call["lead_id"], "outcome": call["outcome"],
                                         "talk_seconds": call.get("talk_seconds"), "settled_by": source})
        metric("CallsEnded", outcome=call["outcome"])
        if call.get("talk_seconds"):
            metric("TalkSeconds", call["talk_seconds"], unit="Seconds")
    return ended_now
