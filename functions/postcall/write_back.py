"""The write-back (R-19): the lead's call log, rebuilt from every call of the lead, written to each
enabled sink (`sinks()`). Rebuilding in full makes the write idempotent and independent of the order
in which jobs run: the last write always reflects every call.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from zoneinfo import ZoneInfo

from functions.core import config, links, times
from functions.core.config import Offer
from functions.core.observability import logger, metric
from functions.core.queues import Poison, Transient
from functions.providers.salesrender import client as salesrender
from functions.providers.salesrender.company import company_id
from functions.records import calls, leads, plugins

SHORT_CALL_SECONDS = 60  # seed §2.4.3
CALL_LOG_MAX_CHARS = 4000  # the same cap as the order comment (providers/salesrender/orders.py)

OUTCOME_WORDS = {
    "answered": "ответил",
    "operator_missed": "оператор не ответил",
    "busy": "занято",
    "no_answer": "нет ответа",
    "failed": "ошибка",
}
# Why a call was never placed (the dialer's not_dialled_reason), for the manager reading the CRM.
NOT_DIALLED_WORDS = {
    "do_not_call": "в списке «не звонить»",
    "budget_exhausted": "бюджет месяца исчерпан",
    "number outside +7": "номер вне +7, автодозвон невозможен",
}


@dataclasses.dataclass(frozen=True)
class CallLog:
    """What a sink writes: the lead's every call, oldest first, and the call that triggered the job."""

    lead: dict
    offer: Offer
    order_id: str
    calls: list[dict]
    call: dict

    def text(self) -> str:
        return call_log_text(self.calls, self.offer)


@dataclasses.dataclass(frozen=True)
class Sink:
    """One place the call log goes. `write` must be idempotent: a retried job runs every sink again."""

    name: str
    enabled: Callable[[Offer], bool]
    write: Callable[[CallLog], None]


def _write_call_log_field(log: CallLog) -> None:
    salesrender.default_client().update_order({
        "id": str(log.order_id),
        "orderData": {"stringFields": [{"field": log.offer.salesrender.fields.call_log, "value": log.text()}]},
    })


def call_log_switched_on() -> bool:
    """`crm.call_log_write_back`: "always", "never", or "auto" = only while the company has no PBX plugin
    registered (its CDRs, crm/cdr.py, then show every call in the lead card)."""
    mode = config.load().crm.call_log_write_back
    if mode == "auto":
        return not plugins.registered(company_id())
    return mode == "always"


def sinks() -> list[Sink]:
    """The write-back sinks: the GraphQL call-log string field, unless switched off (`call_log_switched_on`).
    The PBX plugin's CDRs go their own way (the cdrs queue), queued by the recorder."""
    return [Sink("call_log_field", lambda offer: bool(offer.salesrender.fields.call_log) and call_log_switched_on(),
                 _write_call_log_field)]


def _zone_label(moment: dt.datetime) -> str:
    offset = moment.utcoffset() or dt.timedelta(0)
    if offset == dt.timedelta(hours=3):
        return "МСК"
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    hours, rest = divmod(abs(minutes), 60)
    return f"UTC{sign}{hours}" + (f":{rest:02d}" if rest else "")


def _duration(seconds: int) -> str:
    minutes, rest = divmod(max(0, seconds), 60)
    return f"{minutes}:{rest:02d}"


def call_line(call: dict, zone: ZoneInfo) -> str:
    """`2026-11-25 14:03 МСК · оператор 200 · ответил · 1:15 · запись: <link>` (times in the offer's zone)."""
    started = next((t for t in (times.parse(call.get(k)) for k in ("dialing_at", "created_at", "answered_at",
                                                                   "ended_at") if call.get(k)) if t), None)
    parts = []
    if started is not None:
        local = started.astimezone(zone)
        parts.append(f"{local:%Y-%m-%d %H:%M} {_zone_label(local)}")
    if call.get("direction") == "inbound":
        parts.append("входящий")
    if call.get("outcome") == "not_dialled":
        reason = str(call.get("not_dialled_reason") or "")
        parts.append(f"не звонили: {NOT_DIALLED_WORDS.get(reason, reason or 'причина неизвестна')}")
        return " · ".join(parts)
    operator = str(call.get("operator") or "—").split("@", 1)[0]  # a userId's domain says nothing to a manager
    parts.append(f"оператор {operator}")
    outcome = call.get("outcome")
    parts.append(OUTCOME_WORDS.get(outcome, outcome or "неизвестно"))
    if outcome == "answered":
        talk = int(call.get("talk_seconds") or 0)
        parts.append(_duration(talk) + (f" (< {SHORT_CALL_SECONDS} с)" if talk < SHORT_CALL_SECONDS else ""))
        url = links.stored_recording_link(str(call["call_id"]), call) if call.get("call_id") else None
        if url:
            parts.append(f"запись: {url}")
        elif call.get("recording_state") == "missing":
            parts.append("запись: не найдена")
    return " · ".join(parts)


def call_log_text(lead_calls_: list[dict], offer: Offer) -> str:
    zone = ZoneInfo(offer.working_hours.timezone)
    lines = [call_line(c, zone) for c in lead_calls_]
    text = "\n".join(lines)
    while len(text) > CALL_LOG_MAX_CHARS and len(lines) > 1:  # keep the newest calls
        lines.pop(0)
        text = "…\n" + "\n".join(lines)
    return text[:CALL_LOG_MAX_CHARS]


def write_back(call_id: str, call: dict | None = None, also: dict | None = None) -> str:
    """The write-back job; returns what happened. `call`: the call item if the caller has just read it.
    `also`: attributes (flags of effects already done) set with this job's own update of the call, one write
    instead of two; written whenever this returns (alone when it has no update of its own), never on a raise."""
    also = also or {}
    call = call if call is not None else calls.get(call_id)
    if call is None:
        raise Poison(f"call {call_id} does not exist", code="unknown_call")
    lead_id = call.get("lead_id")
    lead = leads.get(lead_id) if lead_id else None
    if lead is None:
        raise Poison(f"lead {lead_id} of call {call_id} does not exist", code="unknown_lead")
    offer = config.load().offer(lead.get("offer_id", call.get("offer_id")))
    if offer is None:
        raise Poison(f"offer {lead.get('offer_id')} is not configured", code="unknown_offer")
    log = {"call_id": call_id, "lead_id": lead_id, "offer_id": offer.id}
    active = [s for s in sinks() if s.enabled(offer)]
    if not active:
        logger.info("no write-back for the offer (salesrender.fields.call_log unset, or crm.call_log_write_back "
                    "off): skipped", extra=log)
        if also:
            calls.update(call_id, **also)
        return "no_sink"
    order_id = lead.get("order_id")
    if not order_id and lead.get("source") == "api" and lead.get("order_via") != "intake":
        # A manual call's lead from before manual leads got orders: none will ever exist, so waiting
        # would only retry into the DLQ. Recorded on the call instead.
        calls.update(call_id, write_back_skipped="no_crm_order", **also)
        logger.info("no CRM order for the call's lead: write-back skipped", extra=log)
        metric("WriteBackSkipped", reason="no_crm_order")
        return "no_order"
    if not order_id:
        if lead.get("order_state") == "failed" or lead.get("state") == "failed":
            raise Poison(f"lead {lead_id} has no CRM order (intake failed)", code="no_order")
        raise Transient(f"lead {lead_id} has no CRM order yet")  # the intake worker is still retrying
    history = calls.ended_of_lead(lead_id)
    if not any(c["call_id"] == call_id for c in history):
        # The call log item is written before the job is queued; this covers a call recorded without one.
        history = sorted([*history, {**call, "call_id": call_id}], key=lambda c: str(c.get("ended_at") or ""))
    entry = CallLog(lead=lead, offer=offer, order_id=str(order_id), calls=history, call=call)
    for sink in active:
        try:
            sink.write(entry)
        except salesrender.SalesRenderError as exc:
            logger.warning("write-back failed", extra={**log, "sink": sink.name, "order_id": order_id,
                                                      "code": exc.code, "transient": exc.transient})
            metric("WriteBackFailures", sink=sink.name, code=exc.code)
            if exc.transient:
                raise Transient(str(exc)) from None
            raise Poison(str(exc), code=exc.code) from None
    calls.update(call_id, written_back_at=times.now_iso(), **also)
    logger.info("call written back", extra={**log, "order_id": order_id, "calls": len(history),
                                            "sinks": [s.name for s in active]})
    metric("CallsWrittenBack")
    return "written"
