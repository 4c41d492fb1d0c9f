"""CDRs to SalesRender (R-20): every finished call of a company with the PBX plugin registered shows up in
the lead card the way SalesRender's own telephony would show it.

The recorder (postcall/recorder.py) queues `{"call_id", "attempt": 1, "first_at"}` on the `cdrs` queue once
a call's post-call work reaches its write-back step: after its recording is stored (or given up on), and
directly for calls that were never answered. Calls never placed (`not_dialled`: do-not-call, budget,
a number the provider cannot dial) reached no telephony and get none. This worker builds the extended CDR
from the call record as it is now, signs it with the registration's HPT (a fresh token per attempt) and
PUTs it to `{cluster}companies/{cid}/CRM/plugin/pbx/cdr`. 202 is success, flagged on the call
(`cdr_sent_at`) after the answer, so a duplicate job sends nothing more.

Anything but 202 is retried like SalesRender's own sender does (every 60 s for 24 h), and longer: the job
is sent again with a delay of 60 s doubling to 900 s and its attempt counter, for RETRY_FOR (48 h) from
`first_at`; then it goes to the DLQ with the last answer as the reason. The queue's own backoff
(functions/core/queues.py, ~2.8 h) would not last 24 h, so a refused CDR is never left to it; only a
failure to send the next attempt is (Transient). A CDR whose 202 was lost is sent again: its `callId` is
the call's id, the same on every attempt, as SalesRender's sender repeats its own.
"""

from __future__ import annotations

import datetime as dt

from functions.core import links, queues, times
from functions.core.observability import logger, metric
from functions.core.queues import Poison
from functions.crm import plugin
from functions.providers.salesrender import plugin_tokens as tokens
from functions.records import calls, plugins

QUEUE = "cdrs"
RETRY_FOR = dt.timedelta(hours=48)
FIRST_RETRY_SECONDS = 60
MAX_RETRY_SECONDS = queues.SQS_MAX_DELAY

# outcome -> (SIP status, phrase) and (Q.850 hangup cause, name), as a SIP PBX would report them.
SIP = {
    "answered": (200, "OK"),
    "busy": (486, "Busy Here"),
    "no_answer": (480, "Temporarily Unavailable"),
    "operator_missed": (487, "Request Terminated"),
    "failed": (500, "Server Internal Error"),
}
HANGUP = {
    "answered": (16, "NORMAL_CLEARING"),
    "busy": (17, "USER_BUSY"),
    "no_answer": (19, "NO_ANSWER"),
    "operator_missed": (19, "NO_ANSWER"),
    "failed": (41, "TEMPORARY_FAILURE"),
}


def job(call_id: str) -> dict:
    """The first CDR job of a call (what the recorder sends)."""
    return {"call_id": call_id, "attempt": 1, "first_at": times.now_iso()}


def _seconds(later: dt.datetime | None, earlier: dt.datetime | None) -> int:
    if later is None or earlier is None:
        return 0
    return max(0, round((later - earlier).total_seconds()))


def build(call: dict, registration: dict) -> dict:
    """The call's extended CDR (providers/salesrender/plugin_tokens.cdr)."""
    started = next((t for t in (times.parse(call.get(k)) for k in ("dialing_at", "created_at", "answered_at",
                                                                   "ended_at")) if t), None)
    answered, ended = times.parse(call.get("answered_at")), times.parse(call.get("ended_at"))
    started = started or ended or times.utcnow()
    outcome = str(call.get("outcome") or "failed")
    talk = int(call.get("talk_seconds") or 0) if outcome == "answered" else 0
    url = links.stored_recording_link(str(call["call_id"]), call)
    operator = str(call.get("operator") or "").split("@", 1)[0]  # a userId's domain says nothing in the CRM
    staff = ({"alias": "user", "id": str(call["crm_user"])} if call.get("crm_user")
             else {"alias": "operator", "id": operator})
    client = {"alias": "client", "id": str(call.get("phone") or "")}
    incoming = call.get("direction") == "inbound"
    return tokens.cdr(
        phone=str(call.get("phone") or ""), call_id=str(call["call_id"]), call_start=int(started.timestamp()),
        early_media_duration=_seconds(answered or ended, started), bill_sec=talk, record_url=url,
        provider_kopecks=round(float(call.get("cost_rub") or 0) * 100),
        sip_fail=tokens.sip_cause(*SIP.get(outcome, SIP["failed"])),
        hangup_cause=tokens.sip_cause(*HANGUP.get(outcome, HANGUP["failed"])),
        caller=client if incoming else staff, callee=staff if incoming else client,
        plugin=tokens.PluginRef(alias=str(registration["plugin_alias"]), id=str(registration["plugin_id"])),
        direction="incoming" if incoming else "outgoing",
    )


def process(message: dict, now: dt.datetime | None = None) -> str:
    """The cdrs-queue handler (run through queues.run); returns what happened."""
    now = now or times.utcnow()
    call_id = message.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise Poison("CDR job has no call_id", code="malformed")
    call = calls.get(call_id)
    if call is None:
        raise Poison(f"call {call_id} does not exist", code="unknown_call")
    log = {"call_id": call_id, "attempt": message.get("attempt", 1)}
    if call.get("cdr_sent_at"):
        return "already_sent"
    if call.get("state") != "ended" or call.get("outcome") == "not_dialled":
        raise Poison(f"call {call_id} is not a finished call", code="not_finished")
    cid = tokens.company_id()
    registration = plugins.get(cid) if cid else None
    if registration is None:
        logger.info("no PBX plugin registered any more: CDR dropped", extra={**log, "cid": cid})
        metric("CdrsDropped", reason="no_plugin")
        return "no_plugin"
    try:
        secret = plugins.secret(cid)
    except plugins.UnreadableSecret as exc:
        raise Poison(str(exc), code="undecryptable") from None
    record = build({**call, "call_id": call_id}, registration)
    token = tokens.cdr_request_token([record], secret=secret, plugin_url=plugin.plugin_url(),
                                     cluster=registration["cluster_uri"], cid=cid,
                                     plugin=tokens.PluginRef(alias=str(registration["plugin_alias"]),
                                                             id=str(registration["plugin_id"])))
    try:
        tokens.send_cdrs(registration["cluster_uri"], cid, token)
    except tokens.CdrNotAccepted as exc:
        return _again(message, call_id, str(exc), exc.status, now, log)
    calls.update(call_id, cdr_sent_at=times.now_iso())  # after the 202: a crash before it sends once more
    logger.info("CDR accepted by SalesRender", extra={**log, "outcome": call.get("outcome")})
    metric("CdrsSent")
    return "sent"


def _again(message: dict, call_id: str, reason: str, status: int | None, now: dt.datetime, log: dict) -> str:
    attempt = message.get("attempt") if isinstance(message.get("attempt"), int) else 1
    first = times.parse(message.get("first_at")) or now
    if now - first >= RETRY_FOR:
        raise Poison(f"SalesRender did not take the CDR for {RETRY_FOR}: {reason}", code="cdr_refused")
    delay = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** min(max(0, attempt - 1), 10))
    # The next attempt first, then this message is acknowledged (by returning): a crash in between sends two
    # jobs, and the second finds cdr_sent_at, or sends the same callId once more.
    queues.send(QUEUE, {"call_id": call_id, "attempt": attempt + 1, "first_at": times.iso(first, "milliseconds")},
                delay_seconds=delay)
    logger.warning("CDR not accepted: sent again later", extra={**log, "status": status, "reason": reason,
                                                                "retry_in_seconds": delay})
    metric("CdrRetries", status=str(status or "none"))
    return "retry_scheduled"
