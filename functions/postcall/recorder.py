"""After a call (R-19): its recording into S3, then the lead's call log written back to SalesRender.

The recordings queue carries two jobs, both safe to repeat:
- `{"job": "recording", "call_id"}` (answered calls): fetch the MP3 from Beeline, by extTrackingId and
  the operator's userId, else through the `records` list. Files appear minutes after the call, so a
  missing file is `Transient` (the queue backs off: 30 s doubling) for RECORDING_WAIT after the call
  ended; after that the call is marked `recording_state="missing"` and the write-back goes ahead
  anyway. The file is stored privately (SSE AES256) and the call gets its stable app link.
- `{"job": "writeback", "call_id"}`: the lead's whole call log is rebuilt from every call of the lead
  and written to each enabled sink (`sinks()`). Rebuilding in full makes the write idempotent and
  independent of the order in which jobs run: the last write always reflects every call.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from zoneinfo import ZoneInfo

from functions.core import config, queues, resources, store
from functions.core.config import Offer
from functions.core.observability import logger, metric
from functions.core.phones import InvalidPhone, national_digits
from functions.core.queues import Poison, Transient
from functions.postcall import recording_links
from functions.providers.beeline import client as beeline
from functions.providers.salesrender import client as salesrender
from functions.records import calls, leads

# Beeline publishes files minutes late: keep asking this long after the call ended.
RECORDING_WAIT = dt.timedelta(minutes=30)
# A Beeline outage (5xx, network) is not "no file": keep retrying longer, but give up before the
# queue's last delivery (about 2 h of backoff at the earliest) so the write-back is never parked.
OUTAGE_WAIT = dt.timedelta(minutes=90)
RECORDS_MATCH = dt.timedelta(minutes=2)  # a records-list entry with the call's phone this close counts
RECORDS_SEARCH_BEFORE = dt.timedelta(minutes=15)  # the record's date is the call's start, before the answer
RECORDS_SEARCH_AFTER = dt.timedelta(minutes=5)
RECORDS_MAX_PAGES = 10
SHORT_CALL_SECONDS = 60  # seed §2.4.3
CALL_LOG_MAX_CHARS = 4000  # the same cap as the order comment (salesrender/orders.py)

OUTCOME_WORDS = {
    "answered": "ответил",
    "operator_missed": "оператор не ответил",
    "busy": "занято",
    "no_answer": "нет ответа",
    "failed": "ошибка",
}


def process(message: dict) -> None:
    """The recordings-queue handler (run through queues.run)."""
    call_id = message.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise Poison("message has no call_id", code="malformed")
    job = message.get("job")
    if job == "recording":
        fetch_recording(call_id)
    elif job == "writeback":
        write_back(call_id)
    else:
        raise Poison(f"unknown job {job!r}", code="unknown_job")


# --- recordings ----------------------------------------------------------------------------------------

def _parse_time(value) -> dt.datetime | None:
    try:
        parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def is_mp3(data: bytes) -> bool:
    """An ID3 tag or an MPEG audio frame sync: anything else (a JSON error, an HTML page) is not a file."""
    return data[:3] == b"ID3" or (len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


def _iso_z(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _find_record(client: beeline.BeelineClient, call: dict) -> dict | None:
    """The call's entry in the `records` list: the same extTrackingId, else the same phone with a date
    within RECORDS_MATCH of the answer (the closest one)."""
    answered = _parse_time(call.get("answered_at")) or _parse_time(call.get("ended_at"))
    ended = _parse_time(call.get("ended_at")) or answered
    if answered is None:
        return None
    try:
        phone = national_digits(call["phone"]) if call.get("phone") else None
    except (InvalidPhone, ValueError):
        phone = None
    date_from, date_to = _iso_z(answered - RECORDS_SEARCH_BEFORE), _iso_z(ended + RECORDS_SEARCH_AFTER)
    best, best_gap, after = None, None, None
    for _ in range(RECORDS_MAX_PAGES):
        page = client.records(date_from, date_to, after_id=after)
        for record in page:
            if not isinstance(record, dict):
                continue
            if call.get("ext_tracking_id") and record.get("externalId") == call["ext_tracking_id"]:
                return record
            if phone and str(record.get("phone") or "")[-10:] == phone and isinstance(record.get("date"), int | float):
                gap = abs(record["date"] / 1000 - answered.timestamp())
                if gap <= RECORDS_MATCH.total_seconds() and (best_gap is None or gap < best_gap):
                    best, best_gap = record, gap
        if len(page) < 100:  # a full page (100) may have more after its last id
            break
        after = str(page[-1].get("id"))
    return best


def _download(call: dict, log: dict) -> tuple[bytes | None, bool]:
    """The call's MP3, or None when it is not there; and whether a failure looked like an outage."""
    client = beeline.default_client()
    outage = False
    ext = call.get("ext_tracking_id")
    user_id = call.get("target_id") or call.get("operator")
    if ext and user_id:
        try:
            audio = client.download_record(ext, user_id)
            if is_mp3(audio):
                return audio, False
            logger.info("recording download is not an MP3", extra={**log, "bytes": len(audio)})
        except beeline.BeelineError as exc:
            outage = outage or exc.transient
            logger.info("recording not downloadable yet", extra={**log, "code": exc.code})
    try:
        record = _find_record(client, call)
        if record is not None:
            audio = client.download_record_by_id(str(record["id"]))
            if is_mp3(audio):
                return audio, False
    except beeline.BeelineError as exc:
        outage = outage or exc.transient
        logger.info("records list fallback failed", extra={**log, "code": exc.code})
    return None, outage


def recording_key(call: dict, call_id: str) -> str:
    day = (_parse_time(call.get("ended_at")) or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return f"recordings/{day:%Y/%m/%d}/lead-{call['lead_id']}/call-{call_id}.mp3"


def fetch_recording(call_id: str, now: dt.datetime | None = None) -> str:
    """The recording job; returns what happened. Raises Transient while the file is not ready."""
    now = now or dt.datetime.now(dt.UTC)
    call = calls.get(call_id)
    if call is None:
        raise Poison(f"call {call_id} does not exist", code="unknown_call")
    log = {"call_id": call_id, "lead_id": call.get("lead_id"), "ext_tracking_id": call.get("ext_tracking_id")}
    if call.get("state") != "ended":
        raise Transient(f"call {call_id} has not ended yet")  # a call only moves on to "ended"
    if call.get("outcome") != "answered":
        _queue_writeback(call_id, call)  # nothing was recorded, but the call log still gets the line
        return "not_answered"
    if call.get("recording_key") or call.get("recording_state") == "missing":
        _queue_writeback(call_id, call)  # a repeated job: the file is settled, make sure the write-back went
        return "already_settled"

    audio, outage = _download(call, log)
    if audio is None:
        ended = _parse_time(call.get("ended_at")) or now
        waited = now - ended
        if waited < RECORDING_WAIT or (outage and waited < OUTAGE_WAIT):
            raise Transient(f"recording of call {call_id} not ready" + (" (Beeline unavailable)" if outage else ""))
        calls.update(call_id, recording_state="missing", recording_missing_at=store.now_iso())
        logger.warning("recording not found: giving up, writing back without it",
                       extra={**log, "waited_seconds": int(waited.total_seconds())})
        metric("RecordingsMissing")
        _queue_writeback(call_id, call)
        return "missing"

    key = recording_key(call, call_id)
    url = recording_links.link(call_id)  # before the upload: a missing link secret fails before any write
    resources.client("s3").put_object(
        Bucket=resources.bucket_name(), Key=key, Body=audio, ContentType="audio/mpeg",
        ServerSideEncryption="AES256",
        # Identifiers only: object metadata is readable by anyone who may list the bucket; no phone.
        Metadata={"lead_id": str(call["lead_id"]), "call_id": call_id, "offer_id": str(call.get("offer_id", ""))},
    )
    talk = int(call.get("talk_seconds") or 0)
    calls.update(call_id, recording_key=key, recording_state="stored", recording_url=url,
                 recording_bytes=len(audio), recording_stored_at=store.now_iso(),
                 short_call=talk < SHORT_CALL_SECONDS)
    logger.info("recording stored", extra={**log, "key": key, "bytes": len(audio)})
    metric("RecordingsStored")
    _queue_writeback(call_id, call)
    return "stored"


def _queue_writeback(call_id: str, call: dict) -> None:
    # Sent, then flagged: a crash in between sends a second write-back, which is harmless (it rebuilds
    # the same text); flagging first would lose the write-back if the send failed.
    if call.get("writeback_queued"):
        return
    queues.send("recordings", {"job": "writeback", "call_id": call_id})
    calls.flag_once(call_id, "writeback_queued")


# --- write-back ----------------------------------------------------------------------------------------

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


def sinks() -> list[Sink]:
    """The write-back sinks. Today the GraphQL call-log string field; the PBX plugin's CDRs (R-20)
    belong beside it as a second Sink (enabled when the plugin is registered for the company)."""
    return [Sink("call_log_field", lambda offer: bool(offer.salesrender.fields.call_log), _write_call_log_field)]


def lead_calls(lead_id: str) -> list[dict]:
    """Every call of the lead that has ended, oldest first (the CALLLOG items sort by ended_at)."""
    found = []
    for item in store.query(f"LEAD#{lead_id}", "CALLLOG#"):
        call = calls.get(str(item["call_id"]))
        if call is not None:
            found.append({**call, "call_id": str(item["call_id"])})
    return found


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
    started = next((t for t in (_parse_time(call.get(k)) for k in ("dialing_at", "created_at", "answered_at",
                                                                   "ended_at") if call.get(k)) if t), None)
    parts = []
    if started is not None:
        local = started.astimezone(zone)
        parts.append(f"{local:%Y-%m-%d %H:%M} {_zone_label(local)}")
    if call.get("direction") == "inbound":
        parts.append("входящий")
    operator = str(call.get("operator") or "—").split("@", 1)[0]  # a userId's domain says nothing to a manager
    parts.append(f"оператор {operator}")
    outcome = call.get("outcome")
    parts.append(OUTCOME_WORDS.get(outcome, outcome or "неизвестно"))
    if outcome == "answered":
        talk = int(call.get("talk_seconds") or 0)
        parts.append(_duration(talk) + (f" (< {SHORT_CALL_SECONDS} с)" if talk < SHORT_CALL_SECONDS else ""))
        if call.get("recording_url"):
            parts.append(f"запись: {call['recording_url']}")
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


def write_back(call_id: str) -> str:
    """The write-back job; returns what happened."""
    call = calls.get(call_id)
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
        logger.info("no write-back configured for the offer (salesrender.fields.call_log): skipped", extra=log)
        return "no_sink"
    order_id = lead.get("order_id")
    if not order_id:
        if lead.get("state") == "failed":
            raise Poison(f"lead {lead_id} has no CRM order (intake failed)", code="no_order")
        raise Transient(f"lead {lead_id} has no CRM order yet")  # the intake worker is still retrying
    history = lead_calls(lead_id)
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
    calls.update(call_id, written_back_at=store.now_iso())
    logger.info("call written back", extra={**log, "order_id": order_id, "calls": len(history),
                                            "sinks": [s.name for s in active]})
    metric("CallsWrittenBack")
    return "written"
